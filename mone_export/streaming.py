"""Models larger than memory: a checkpoint's skeleton on the ``meta`` device, decoder layers loaded one at a time.

:class:`LayerStreamedModel` builds the model from its config on ``meta`` (nothing allocated), loads what is not a
decoder layer (embeddings, final norm, LM head, rotary buffers), and loads / releases one decoder layer at a time
from the checkpoint's safetensors files, single or sharded. The tensors go through transformers' own loading
(:func:`transformers.core_model_loading.convert_and_load_state_dict_in_model` with the model's conversion mapping),
so the legacy per-expert names real checkpoints use are fused exactly as ``from_pretrained`` fuses them, for every
family transformers knows, and dtype casts are the same.

:func:`collect_stats_streamed` is calibration by *sequential onloading* (as llm-compressor does it): the two loops
of a forward are swapped. All calibration batches are embedded first; their inputs to the first decoder layer
(hidden states and the keyword arguments the model's own forward computes for its layers: mask, rotary position
embeddings, ...) are captured by running the real forward up to that layer. Then, per decoder layer: load it, run
every batch through it while the experts' statistics are recorded (the same instrumented experts forward as
:func:`mone_export.stats.collect_stats`), keep its outputs as the next layer's inputs, release it. Only one
decoder layer's weights are resident; the statistics are the ones of an in-memory forward over the same batches.

The hidden states handed from layer to layer live in an :class:`ActivationBuffer`: in memory while they fit a
budget (:data:`ACTIVATION_MEMORY_FRACTION` of the available memory, or ``activation_budget`` bytes), else in files of
a scratch folder, one per batch, read back when the batch's turn comes (a calibration set far larger than memory
passes through; the statistics are the same, bit for bit).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from mone_export.architectures import check_prunable
from mone_export.adapters import moe_layers_or_error
from mone_export.checkpoint import check_checkpoint_files
from mone_export.errors import UsageError
from mone_export.fingerprint import FingerprintBuilder
from mone_export.loading import causal_lm_config, model_build_options
from mone_export.process_memory import available_memory_bytes
from mone_export.progress import progress_bar
from mone_export.stats import ExpertStats, LayerStats, check_unpruned, recording_experts

__all__ = ["ACTIVATION_MEMORY_FRACTION", "ActivationBuffer", "LayerStreamedModel", "PassThroughLayer",
           "collect_stats_streamed", "only_layer", "return_freed_memory", "streamed_logits"]

logger = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

ACTIVATION_MEMORY_FRACTION = 0.25
"""Hidden states passed between layers stay in memory while they take at most this share of the available memory."""


class ActivationBuffer:
    """The hidden states of every calibration batch between two decoder layers: in memory, or spilled to disk.

    ``expected_bytes`` (all batches' hidden states) above ``budget`` (default :data:`ACTIVATION_MEMORY_FRACTION` of
    the available memory) puts each batch in its own file in a private folder under ``scratch`` (default: the
    system's temporary folder), removed by :meth:`close`. :meth:`put` replaces a batch's tensor, :meth:`get` reads it
    back; a layer reads batch i's input, then writes its output in the same slot, so one slot per batch suffices.
    """

    def __init__(self, expected_bytes: int, budget: int | None = None, scratch: str | os.PathLike | None = None):
        if budget is None:
            available = available_memory_bytes()
            budget = int(ACTIVATION_MEMORY_FRACTION * available) if available is not None else expected_bytes
        self.on_disk = expected_bytes > budget
        self._memory: dict[int, torch.Tensor] = {}
        self._folder: Path | None = None
        if self.on_disk:
            self._folder = Path(tempfile.mkdtemp(prefix=".mone-activations-", dir=scratch))
            logger.info("hidden states of %.1f GB exceed the %.1f GB activation budget: kept in %s, one file per "
                        "batch", expected_bytes / 1e9, budget / 1e9, self._folder)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        """Store batch ``index``'s hidden states (replacing what was there)."""
        if self._folder is None:
            self._memory[index] = hidden
            return
        path = self._folder / f"{index}.pt"
        torch.save(hidden.contiguous(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def get(self, index: int) -> torch.Tensor:
        """Batch ``index``'s hidden states."""
        if self._folder is None:
            return self._memory[index]
        return torch.load(self._folder / f"{index}.pt", weights_only=True)

    def close(self) -> None:
        """Drop every stored tensor and the spill folder."""
        self._memory.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "ActivationBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _replace_parameters(module: nn.Module, make) -> None:
    """Every floating parameter ``p`` of ``module`` replaced by ``Parameter(make(p))``, one at a time (a parameter's
    dtype cannot change in place)."""
    for owner in module.modules():
        # By name, so that each old tensor is freed as soon as it is replaced (a list of the parameters would keep
        # a layer's narrow expert weights alive beside their widened copies).
        for name in [name for name, _ in owner.named_parameters(recurse=False)]:
            parameter = getattr(owner, name)
            if parameter.is_floating_point():
                setattr(owner, name, nn.Parameter(make(parameter), requires_grad=parameter.requires_grad))
            del parameter


def _hidden_bytes(streamed: "LayerStreamedModel", batches: list[torch.Tensor]) -> int:
    """Bytes of all batches' hidden states in the compute dtype."""
    itemsize = torch.empty((), dtype=streamed.dtype).element_size()
    return sum(int(b.numel()) for b in batches) * int(streamed.model.config.hidden_size) * itemsize


def _streamed_hidden_states(streamed: "LayerStreamedModel", batches: list[torch.Tensor], buffer: ActivationBuffer,
                            desc: str, progress: bool, around_layer=None, plan=None) -> list:
    """Run every batch through every decoder layer, one layer in memory at a time, the hidden states in ``buffer``.

    ``around_layer(index, layer)`` is a context manager entered while layer ``index`` is loaded (recording); each
    layer is pruned as ``plan`` says (:meth:`LayerStreamedModel.loaded_layer`). Returns each batch's keyword
    arguments for its layers (for the epilogue); the last layer's outputs are in ``buffer``.
    """
    calls = []
    for i, batch in enumerate(batches):
        args, kwargs = _first_layer_inputs(streamed, batch)
        buffer.put(i, args[0] if args else kwargs.pop("hidden_states"))
        calls.append((args[1:], kwargs))
    for index in progress_bar(range(len(streamed.decoder_layers)), desc=desc, unit="layer", enabled=progress):
        with streamed.loaded_layer(index, plan) as layer, (
                around_layer(index, layer) if around_layer else contextlib.nullcontext()):
            for i, (args, kwargs) in enumerate(calls):
                buffer.put(i, _hidden_of(layer(buffer.get(i), *args, **kwargs)))
    return calls


class _StopAtFirstLayer(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are known."""


class LayerStreamedModel:
    """A causal LM whose decoder layers live on ``meta`` until :meth:`loaded_layer` brings one into memory.

    Args:
        folder: a local Hugging Face checkpoint folder with safetensors weights (single file or sharded).
        dtype: the dtype to load the weights in (the compute dtype), default float32.
        attn_implementation: as for :func:`mone_export.load_model` (default: transformers' choice), so a streamed
            forward computes what an in-memory one does.
    """

    def __init__(self, folder: str | os.PathLike, dtype=None, attn_implementation: str | None = None):
        import transformers

        self.folder = Path(folder)
        self.config = causal_lm_config(transformers.AutoConfig.from_pretrained(str(self.folder)))
        options = model_build_options(self.config, dtype, attn_implementation)
        self.dtype = options["dtype"]
        check_prunable(self.config)
        _refuse_mixed_layer_types(self.config)
        check_checkpoint_files(self.folder, self.config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(self.config, **options)
        self.model = model.eval()
        self.adapter, self.moe_layers = moe_layers_or_error(self.model)
        self._keys_by_layer, self._other_keys, self._files = _index_checkpoint(self.folder)
        self._headers: dict[Path, dict] = {}
        self._materialize_non_persistent_buffers()
        self._load_keys(self._other_keys, lambda name: _layer_of(name) is None)
        if getattr(self.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    # -- loading ---------------------------------------------------------------------------------------------------

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The model's decoder layers (on ``meta`` unless loaded)."""
        return self.adapter.decoder_layers(self.model)

    @contextlib.contextmanager
    def loaded_layer(self, index: int, plan=None) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights in memory for the block; released (back to ``meta``) after.

        A layer stored narrower than the compute dtype (a bf16 checkpoint computed in fp32) is loaded and fused in
        its storage dtype, then widened one parameter at a time: transformers' conversion otherwise holds the
        per-expert tensors and their fused copy at once *in the wide dtype*, twice the layer's fp32 bytes (measured
        on a Mixtral-8x7B layer of 2.9 GB in bf16: the fp32 calibration peaked at 16 GB). Widening is exact, so the
        values are the same as loading in the compute dtype.

        With a :class:`~mone_export.plan.PruningPlan`, the layer is pruned as it says
        (:func:`mone_export.novices.layer_pruned`) once loaded and before it is widened: the pruned experts' weights
        are freed and never widened, so only the pruned layer is in memory in the compute dtype.
        """
        layer = self.decoder_layers[index]
        keys = self._keys_by_layer.get(index, [])
        storage = self._narrower_storage_dtype(keys)
        if storage is not None:
            _replace_parameters(layer, lambda p: torch.empty_like(p, dtype=storage, device="meta"))
        self._load_keys(keys, lambda name: _layer_of(name) == index, dtype=storage)
        try:
            with self._pruned(index, plan):
                if storage is not None:
                    _replace_parameters(layer, lambda p: p.detach().to(self.dtype))
                yield layer
        finally:
            layer.to("meta")
            return_freed_memory()

    def _pruned(self, index: int, plan):
        from mone_export.novices import layer_pruned

        moe_layer = next((layer for layer in self.moe_layers if layer.index == index), None)
        if plan is None or moe_layer is None:
            return contextlib.nullcontext()
        return layer_pruned(self.adapter, moe_layer, plan, means_dtype=self.dtype, release_original=True)

    def _narrower_storage_dtype(self, keys: list[str]) -> torch.dtype | None:
        """The one floating dtype the checkpoint stores ``keys`` in, when it is narrower than the compute dtype
        (else None: load straight in the compute dtype)."""
        dtypes = {_SAFETENSORS_DTYPES.get(stored.get_dtype()) for stored in self._stored(keys).values()}
        if len(dtypes) != 1 or None in dtypes:
            return None
        (storage,) = dtypes
        narrower = torch.finfo(storage).bits < torch.finfo(self.dtype).bits if self.dtype.is_floating_point else False
        return storage if narrower else None

    def _stored(self, keys: list[str]) -> dict:
        """``key → StoredTensor``: the checkpoint tensors ``keys``, read from their files when transformers'
        loader materialises them (file reads, not a memory map: :class:`mone_export.checkpoint.StoredTensor`)."""
        from mone_export.checkpoint import stored_tensors

        stored = {}
        for key in keys:
            path = self._files[key]
            if path not in self._headers:
                self._headers[path] = stored_tensors(path)
            stored[key] = self._headers[path][key]
        return stored

    def _load_keys(self, keys: list[str], wanted, dtype: torch.dtype | None = None) -> None:
        """Load checkpoint tensors ``keys`` through transformers' conversion (in ``dtype``, default the compute
        dtype); every model tensor ``wanted(name)`` selects must be loaded, and nothing unexpected or misshapen may
        come."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        state = self._stored(keys)
        config = LoadStateDictConfig(dtype=dtype or self.dtype, weight_mapping=get_model_conversion_mapping(self.model))
        with _transformers_quiet():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        missing = sorted(k for k in info.missing_keys if wanted(k) and k not in self._tied_keys())
        problems = [("lacks", missing), ("holds unexpected", sorted(info.unexpected_keys)),
                    ("has wrongly shaped", sorted(k if isinstance(k, str) else k[0] for k in info.mismatched_keys))]
        for what, names in problems:
            if names:
                raise UsageError(f"the checkpoint in {self.folder} {what} tensors: {', '.join(names[:3])}"
                                 f"{' ...' if len(names) > 3 else ''}; copy it again.")
        if info.conversion_errors:
            name = sorted(info.conversion_errors)[0]
            raise UsageError(f"the checkpoint in {self.folder}: {name} could not be converted "
                             f"({info.conversion_errors[name]}); copy it again.")

    def _tied_keys(self) -> set[str]:
        return set(getattr(self.model, "all_tied_weights_keys", {}) or {})

    def _materialize_non_persistent_buffers(self) -> None:
        """Buffers the checkpoint does not hold (rotary ``inv_freq``) computed on the CPU, as ``from_pretrained``
        does after loading: an empty tensor, then the model's own initialisation of that module."""
        owners = {}
        for name, buffer in self.model.named_buffers():
            module_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if leaf in getattr(module, "_non_persistent_buffers_set", set()) and buffer.is_meta:
                module.register_buffer(leaf, torch.empty_like(buffer, device="cpu"), persistent=False)
                owners[module_name] = module
        for module in owners.values():
            self.model._init_weights(module)  # the one place transformers computes these buffers


class PassThroughLayer(nn.Module):
    """Stands in for a decoder layer that is not in the piece: returns its hidden states unchanged.

    Plain attributes of the real layer (``attention_type``, ``layer_idx``) are copied, because some models' forwards
    read them while iterating over their layers.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, key, value)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def only_layer(layers: nn.ModuleList, index: int | None) -> Iterator[None]:
    """Within the block every decoder layer but ``index`` (all of them with None) is a :class:`PassThroughLayer`:
    the model's own forward then computes its prologue, that one layer and its epilogue."""
    originals = list(layers)
    try:
        for j, layer in enumerate(originals):
            if j != index:
                layers[j] = PassThroughLayer(layer)
        yield
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer


def return_freed_memory() -> None:
    """Hand the freed heap back to the OS (glibc's ``malloc_trim``). A released layer's memory is free but glibc
    keeps fragmented heap pages: measured on a 6-layer bf16 checkpoint, without this the RSS grew by 1.3 layers'
    bytes per layer streamed, with it by under 0.15 and levelling off. Elsewhere (no glibc) a no-op."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _refuse_mixed_layer_types(config) -> None:
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1:
        raise UsageError(f"{config.model_type} mixes decoder layer types {sorted(types)}; layer-streamed "
                         "calibration reuses the first layer's attention inputs and does not support that yet: "
                         "calibrate in memory.")


def _layer_of(name: str) -> int | None:
    match = _LAYER_KEY.search(name)
    return int(match.group(1)) if match else None


def _index_checkpoint(folder: Path) -> tuple[dict[int, list[str]], list[str], dict[str, Path]]:
    """Checkpoint tensor names by decoder layer, the others, and the file of each (safetensors headers only)."""
    from mone_export.checkpoint import safetensors_header, weight_files

    files: dict[str, Path] = {}
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            raise UsageError(f"{path}: layer-streamed loading reads safetensors files only; convert the "
                             "checkpoint (transformers' save_pretrained writes safetensors).")
        files.update({name: path for name in safetensors_header(path)})
    by_layer: dict[int, list[str]] = {}
    others = []
    for name in sorted(files):
        layer = _layer_of(name)
        if layer is None:
            others.append(name)
        else:
            by_layer.setdefault(layer, []).append(name)
    return by_layer, others, files


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' loader shows a progress bar per call: one per layer would flood a log."""
    import transformers

    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def _first_layer_inputs(streamed: LayerStreamedModel, batch: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments the model's own forward passes to its first decoder layer."""
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopAtFirstLayer

    handle = streamed.decoder_layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        streamed.model(input_ids=batch, use_cache=False)
    except _StopAtFirstLayer:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def collect_stats_streamed(streamed: LayerStreamedModel, batches: Iterable[torch.Tensor], progress: bool = True,
                           calibration: dict | None = None, *, activation_budget: int | None = None,
                           scratch: str | os.PathLike | None = None, measure_removal: bool = False) -> ExpertStats:
    """:func:`mone_export.stats.collect_stats` with one decoder layer in memory at a time (module docstring).

    The statistics equal an in-memory forward's over the same batches: each layer sees the same inputs and runs
    the same instrumented experts forward. The experts fingerprint is built layer by layer as they are loaded. The
    hidden states between layers go to disk under ``scratch`` when they exceed ``activation_budget`` bytes
    (:class:`ActivationBuffer`).
    """
    batches = list(batches)
    if not batches:
        raise UsageError("no calibration batches were given; pass at least one [B, S] token batch.")
    model = streamed.model
    stats = {layer.index: LayerStats(layer.num_experts, layer.hidden_size, layer.top_k,
                                     measures_removal=measure_removal)
             for layer in streamed.moe_layers}
    moe_by_index = {layer.index: layer for layer in streamed.moe_layers}
    fingerprint = FingerprintBuilder(streamed.dtype)

    @contextlib.contextmanager
    def recording(index, layer):
        with _recording_layer(model, moe_by_index, index, stats):
            if index in moe_by_index:
                check_unpruned([moe_by_index[index]])
                fingerprint.update(moe_by_index[index])
            yield

    with torch.inference_mode(), ActivationBuffer(_hidden_bytes(streamed, batches), activation_budget,
                                                  scratch) as buffer:
        _streamed_hidden_states(streamed, batches, buffer, "calibrating (by layer)", progress, recording)
    tokens = sum(int(b.numel()) for b in batches)
    logger.info("collected expert statistics over %d tokens in %d MoE layers, one layer in memory at a time", tokens,
                len(stats))
    info = dict(calibration or {})
    info.setdefault("tokens", tokens)
    return ExpertStats(streamed.adapter.model_type, int(model.config.num_hidden_layers), stats, info,
                       fingerprint.result(), str(streamed.dtype).removeprefix("torch."))


@contextlib.contextmanager
def _recording_layer(model, moe_by_index, index: int, stats) -> Iterator[None]:
    """The instrumented experts forward on layer ``index`` only (a dense layer records nothing)."""
    if index not in moe_by_index:
        yield
        return
    with recording_experts(model, {index: stats[index]}, only=[index]):
        yield


def streamed_logits(streamed: LayerStreamedModel, batches: Iterable[torch.Tensor], plan=None,
                    progress: bool = True, desc: str = "reference logits (by layer)", *,
                    activation_budget: int | None = None,
                    scratch: str | os.PathLike | None = None) -> list[torch.Tensor]:
    """The model's logits ``[B, S, V]`` for each token batch, one decoder layer in memory at a time.

    Each layer is loaded, pruned as ``plan`` says (:func:`mone_export.novices.layer_pruned`; None: unpruned), run
    on every batch's hidden states and released, as in :func:`collect_stats_streamed`. The final norm, LM head and
    whatever the model does after them then run through the model's own forward, with every decoder layer a
    pass-through that hands on the streamed hidden states. Float32 logits, whatever the compute dtype. Hidden states
    beyond ``activation_budget`` bytes go to disk under ``scratch`` (:class:`ActivationBuffer`).
    """
    batches = list(batches)
    with torch.inference_mode(), ActivationBuffer(_hidden_bytes(streamed, batches), activation_budget,
                                                  scratch) as buffer:
        _streamed_hidden_states(streamed, batches, buffer, desc, progress, plan=plan)
        return [_logits_from_hidden(streamed, batch, buffer.get(i)).float() for i, batch in enumerate(batches)]


def _logits_from_hidden(streamed: LayerStreamedModel, batch: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's forward on ``batch`` with its decoder layers' output replaced by ``hidden``."""
    layers = streamed.decoder_layers

    def hand_on(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with only_layer(layers, None):
        handle = layers[len(layers) - 1].register_forward_pre_hook(hand_on, with_kwargs=True)
        try:
            return streamed.model(input_ids=batch, use_cache=False).logits
        finally:
            handle.remove()
