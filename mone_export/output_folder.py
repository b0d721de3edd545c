"""The export output folder: ONNX model, configs, tokenizer, plan, onnxruntime-genai config; written atomically.

Layout::

    out/
      model.onnx (+ model.onnx.data above ~2 GiB)
      config.json, generation_config.json     (transformers 5.x and 4.5x, e.g. Optimum's ORTModelForCausalLM)
      tokenizer files                         (when the model has a tokenizer; also readable by transformers 4.5x)
      genai_config.json                       (onnxruntime-genai)
      plan/                                   (the pruning plan, when given)
      ...                                     (whatever the caller adds, e.g. report.json)

transformers 5 writes files a 4.x reader misreads or rejects (``tokenizer_class: TokenizersBackend``, a 5.x class; no
``model_input_names``, so a 4.x tokenizer also returns ``token_type_ids``; its loader state ``is_local`` /
``local_files_only`` / ``backend``; ``rope_theta`` only inside ``rope_parameters``, so 4.57's MixtralConfig silently
falls back to its own default); the writer adds the 4.x spellings beside the 5.x ones
(:func:`tokenizer_config_for_transformers_4`, :func:`config_for_transformers_4`), so both major versions, e.g.
Optimum's ``ORTModelForCausalLM`` on transformers 4.57, read the same values (tests/test_clients.py).

Everything is written into a temporary folder beside ``out`` that replaces it only when every file is there
(:func:`mone_export.loading.atomic_output_dir`): a failure leaves the previous ``out`` intact and no temp files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from mone_export.export import MODEL_FILE, cache_shapes, export_onnx
from mone_export.loading import atomic_output_dir
from mone_export.onnx_utils import DATA_SUFFIX, save_model
from mone_export.safe_output import OUTPUT_MARKER

__all__ = ["GENAI_CONFIG", "config_for_transformers_4", "genai_config", "make_readable_by_transformers_4",
           "output_folder", "output_marker", "tokenizer_config_for_transformers_4", "write_output_folder"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
PLAN_SUBDIR = "plan"
GENAI_MODEL_TYPE = "decoder"  # onnxruntime-genai's generic decoder-only model (the graph does all the modelling)
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
# The tokenizer outputs the graph takes (position_ids come from the client). Without this list a 4.x tokenizer also
# returns token_type_ids, which generate() then passes on and the graph rejects.
GRAPH_TEXT_INPUTS = ["input_ids", "attention_mask"]
# What transformers 5 records in tokenizer_config.json about how the tokenizer was loaded: loader state, not
# tokenizer settings (5.x's default backend for a tokenizer.json is "tokenizers" anyway).
TOKENIZER_LOADER_KEYS = ("backend", "files_loaded", "is_local", "local_files_only")
# The class both major versions build from tokenizer.json alone (5.x maps it to its TokenizersBackend).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# 5.x's generic tokenizers-backed class: no such class in 4.x. Model-specific names (``Qwen2Tokenizer``) are kept: 4.x
# builds their ``...Fast`` class from tokenizer.json, and onnxruntime-genai's tokenizer keys model quirks on the name.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend",)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _token_ids(model, tokenizer) -> dict:
    """bos / eos / pad ids: generation config first, then the model config, then the tokenizer.

    Ids outside the vocabulary (some configs keep the ids of a bigger tokenizer) are left out with a warning:
    onnxruntime-genai refuses them.
    """
    gen = getattr(model, "generation_config", None)
    config = model.config
    vocab = int(config.vocab_size)
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = _first(getattr(gen, key, None), getattr(config, key, None), getattr(tokenizer, key, None))
        values = value if isinstance(value, (list, tuple)) else [value]
        valid = [int(v) for v in values if v is not None and 0 <= int(v) < vocab]
        if len(valid) < len([v for v in values if v is not None]):
            logger.warning("%s %s is outside the vocabulary (%d tokens); left out of %s", key, value, vocab, GENAI_CONFIG)
        if valid:
            ids[key] = valid if isinstance(value, (list, tuple)) and len(valid) > 1 else valid[0]
    if "pad_token_id" not in ids and "eos_token_id" in ids:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return ids


def genai_config(model, tokenizer=None, *, filename: str = MODEL_FILE, context_length: int | None = None,
                 share_kv_buffer: bool = False) -> dict:
    """The ``genai_config.json`` that lets onnxruntime-genai run an export of ``model`` (greedy search by default).

    ``past_present_share_buffer`` is ``share_kv_buffer``: on for the fused attention, whose ``present`` outputs are
    GroupQueryAttention's own (genai then hands each layer one buffer of the search's ``max_length`` as past and
    present, and the kernel writes the new positions into it in place); off for the plain form, which returns
    ``present`` = ``past`` + new positions as new tensors. KV shapes are those of :func:`mone_export.export.cache_shapes` (DeepSeek-V2's
    MLA cache is packed into equal key/value halves, so one ``head_size`` fits). Token ids the model does not
    define are left out.
    """
    config = model.config
    layers = int(config.num_hidden_layers)
    spec = cache_shapes(config)[0]
    context = int(context_length or getattr(config, "max_position_embeddings", 0) or 4096)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": spec.key_dim,
        "hidden_size": int(config.hidden_size),
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": layers,
        "num_key_value_heads": spec.heads,
    }
    gen = getattr(model, "generation_config", None)
    search = {
        "diversity_penalty": 0.0,
        "do_sample": bool(getattr(gen, "do_sample", False) or False),
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": int(getattr(gen, "num_beams", 1) or 1),
        "num_return_sequences": 1,
        "past_present_share_buffer": bool(share_kv_buffer),
        "repetition_penalty": float(getattr(gen, "repetition_penalty", 1.0) or 1.0),
        "temperature": float(getattr(gen, "temperature", 1.0) or 1.0),
        "top_k": int(getattr(gen, "top_k", 1) or 1) if getattr(gen, "do_sample", False) else 1,
        "top_p": float(getattr(gen, "top_p", 1.0) or 1.0),
    }
    return {
        "model": {
            **_token_ids(model, tokenizer),
            "context_length": context,
            "decoder": decoder,
            "type": GENAI_MODEL_TYPE,
            "vocab_size": int(config.vocab_size),
        },
        "search": search,
    }


def _place_onnx(onnx_model, folder: Path, model, dtype: str) -> Path:
    """Put the ONNX model into ``folder`` as ``model.onnx`` (+ data): export it, save an IR model, or copy a file."""
    target = folder / MODEL_FILE
    if onnx_model is None:
        return export_onnx(model, target, dtype=dtype, progress=False)
    if callable(onnx_model):  # writes the model in place (the layer-streamed export: no copy of its weights)
        return onnx_model(target)
    if isinstance(onnx_model, (str, os.PathLike)):
        source = Path(onnx_model)
        source = source / MODEL_FILE if source.is_dir() else source
        data = source.with_name(source.name + DATA_SUFFIX)
        if data.is_file() and source.name != MODEL_FILE:
            # The model refers to its data file by name: re-save under the new name rather than copy.
            import onnx_ir as ir

            return save_model(ir.load(source), target, external_data=True)
        shutil.copyfile(source, target)
        if data.is_file():
            shutil.copyfile(data, target.with_name(target.name + DATA_SUFFIX))
        return target
    return save_model(onnx_model, target)  # an onnx_ir.Model, e.g. from export_onnx's passes


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tokenizer_config_for_transformers_4(tokenizer_config: dict, has_tokenizer_json: bool = True) -> dict:
    """``tokenizer_config.json`` as transformers 5 wrote it, made readable by 4.5x too (5.x reads it the same).

    - the 5.x loader keys (:data:`TOKENIZER_LOADER_KEYS`) are dropped;
    - a generic 5.x ``tokenizer_class`` (:data:`GENERIC_TOKENIZER_CLASSES`), or none, becomes
      ``PreTrainedTokenizerFast`` when ``tokenizer.json`` is there: ``TokenizersBackend`` does not exist in 4.x, and
      the fast file fully defines the tokenization in both (5.x reads ``PreTrainedTokenizerFast`` as
      ``TokenizersBackend``); model-specific class names are kept;
    - ``model_input_names`` is the graph's :data:`GRAPH_TEXT_INPUTS`;
    - a list ``extra_special_tokens`` (5.x) becomes ``additional_special_tokens``: 4.x wants a dict under the 5.x
      name and fails on a list, and 5.x reads the old name into the same list.
    """
    config = {key: value for key, value in tokenizer_config.items() if key not in TOKENIZER_LOADER_KEYS}
    if has_tokenizer_json and config.get("tokenizer_class") in (None, *GENERIC_TOKENIZER_CLASSES):
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config["model_input_names"] = list(GRAPH_TEXT_INPUTS)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        known = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = known + [token for token in extra if token not in known]
    return config


def _flat_rope_parameters(config: dict) -> dict | None:
    """The one ``rope_parameters`` dict of a 5.x config, or None (no RoPE, or one dict per layer type)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return None  # nested per layer type: 4.x has no spelling for it
    return rope


def config_for_transformers_4(config: dict) -> dict:
    """``config.json`` as transformers 5 wrote it, with the 4.x spellings of its RoPE settings added.

    4.x reads a top-level ``rope_theta`` (its config classes otherwise use their own default: 1e6 for Mixtral) and,
    for scaled RoPE, ``rope_scaling`` (the same dict without ``rope_theta``). 5.x reads ``rope_scaling`` as
    ``rope_parameters`` and takes ``rope_theta`` from the top level, so it rebuilds the same dict; ``rope_scaling``
    is left out for the default type, where 4.x wants none. Everything else in the supported families' configs
    already means the same to 4.57 (checked per family in tests/test_clients.py).
    """
    rope = _flat_rope_parameters(config)
    if rope is None:
        if config.get("rope_parameters"):
            logger.warning("rope_parameters per layer type have no transformers 4.x spelling; %s keeps only the 5.x "
                           "one", CONFIG_FILE)
        return dict(config)
    config = {**config, "rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    return config


def _rewrite_json(path: Path, transform: Callable[[dict], dict]) -> None:
    if path.is_file():
        _write_json(path, transform(json.loads(path.read_text())))


def make_readable_by_transformers_4(folder: str | os.PathLike) -> None:
    """Rewrite the transformers files 5.x saved in ``folder`` so 4.5x readers (Optimum) load the same settings.

    Idempotent; files that are not there are skipped. Optimum's ``ORTModelForCausalLM`` also needs the KV-cache
    shape set from the graph after loading (README, "Optimum / transformers 4"): Optimum-ONNX 0.1 chooses it by
    ``model_type`` alone, so no file here can (benchmarks/optimum_client_check.py).
    """
    folder = Path(folder)
    _rewrite_json(folder / CONFIG_FILE, config_for_transformers_4)
    has_tokenizer_json = (folder / TOKENIZER_FILE).is_file()
    _rewrite_json(folder / TOKENIZER_CONFIG, lambda c: tokenizer_config_for_transformers_4(c, has_tokenizer_json))


def output_marker(dtype: str) -> dict:
    """The contents of the folder's ``mone_export.json``: what lets a later ``--overwrite`` know the folder is ours."""
    from mone_export import __version__  # the package imports this module: resolve its version at call time

    return {"written_by": "mone-export", "version": __version__, "dtype": dtype}


@contextlib.contextmanager
def output_folder(model, tokenizer, onnx_model, out_dir: str | os.PathLike, plan=None, overwrite: bool = False,
                  dtype: str = "fp32", share_kv_buffer: bool = False) -> Iterator[Path]:
    """Write the output folder's files into a temporary folder and yield it; on normal exit it replaces ``out_dir``.

    The caller adds its own files (``report.json``, ...) to the yielded folder inside the ``with`` block; an
    exception there (or anywhere) leaves the previous ``out_dir`` as it was.

    Args:
        model: the (pruned) PyTorch model that was exported (its config, generation config and sizes are written).
        tokenizer: its tokenizer, or None.
        onnx_model: the exported model: a ``.onnx`` path (its ``.data`` file is copied too), an ``onnx_ir.Model``,
            a function that writes it to the ``model.onnx`` path it is given, or None to export ``model`` here in
            ``dtype``.
        out_dir: the folder to (re)place.
        plan: the :class:`~mone_export.plan.PruningPlan` that was applied, saved under ``plan/``.
        overwrite: replace a non-empty ``out_dir``.
        share_kv_buffer: the graph's ``present`` outputs come from GroupQueryAttention (``--attention gqa``), so
            onnxruntime-genai may share past and present buffers (:func:`genai_config`).
    """
    with atomic_output_dir(out_dir, overwrite) as tmp:
        _place_onnx(onnx_model, tmp, model, dtype)
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        make_readable_by_transformers_4(tmp)
        _write_json(tmp / GENAI_CONFIG, genai_config(model, tokenizer, share_kv_buffer=share_kv_buffer))
        _write_json(tmp / OUTPUT_MARKER, output_marker(dtype))
        if plan is not None:
            plan.save(tmp / PLAN_SUBDIR)
        yield tmp
    logger.debug("wrote %s", out_dir)


def write_output_folder(model, tokenizer, onnx_model, out_dir: str | os.PathLike, plan=None, overwrite: bool = False,
                        *, dtype: str = "fp32", extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write the whole output folder atomically and return its path; see :func:`output_folder`.

    ``extra_files(folder)`` is called with the temporary folder before it replaces ``out_dir``, to add files.
    """
    with output_folder(model, tokenizer, onnx_model, out_dir, plan, overwrite, dtype) as tmp:
        if extra_files is not None:
            extra_files(tmp)
    return Path(out_dir)
