"""ONNX export of a (pruned) MoE causal LM as a decoder with KV cache (docs/graph.md).

The exported graph takes ``input_ids [B, S]``, ``attention_mask [B, P+S]``, ``position_ids [B, S]`` and
``past_key_values.{i}.key|value [B, kv_heads, P, head_dim]`` and returns ``logits [B, S, V]`` and
``present.{i}.key|value [B, kv_heads, P+S, head_dim]`` (Optimum / onnxruntime-genai names). Batch, sequence and past
lengths are dynamic, so one file serves prefill (P = 0) and decode through the cache.

How: the model runs inside :class:`DecoderWithCache` (flat tensors in and out, a transformers ``DynamicCache`` built
from the past tensors), with eager attention and :func:`~mone_export.moe_export_forward.export_friendly_moe` (one
canonical dispatch branch per routed expert), and is traced by the TorchScript exporter
(``torch.onnx.export(dynamo=False)``): on these models it is 10–30× faster than the dynamo exporter and, with the
custom symbolics of ``moe_export_forward``, emits the canonical dispatch form directly. The graph passes
(``graph_passes.prune_novices``) then fold each layer's novices into one constant bias node and clean up, and the
model is saved with IR version 10 (external data above ~2 GiB), byte-identically for the same model.

DeepSeek-V2 (transformers 5.x) caches MLA's compressed latent and shared rotary key, not per-head keys and values;
the export packs them into equal ``key`` / ``value`` halves (onnxruntime-genai wants one head size).
:func:`cache_shapes` gives the per-layer shapes for any supported family.
"""

from __future__ import annotations

import contextlib
import copy
import io
import dataclasses
import functools
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from mone_export.adapters import moe_layers_or_error
from mone_export.errors import UnsupportedModelError, UsageError
from mone_export.loading import parse_dtype
from mone_export.moe_export_forward import export_friendly_moe
from mone_export.onnx_utils import (
    finalize_model,
    dispatch_weight_values,
    initializer_bytes,
    lift_external_constants,
    name_fused_expert_weights,
    name_initializers,
    name_values,
    save_model,
    share_transposed_initializers,
    store_float32_as,
    weight_bytes,
)

__all__ = [
    "DEFAULT_OPSET",
    "MODEL_FILE",
    "CacheSpec",
    "DecoderWithCache",
    "cache_shapes",
    "pack_mla",
    "unpack_mla",
    "routing_weights_names",
    "input_names",
    "output_names",
    "export_onnx",
    "export_patches",
    "example_inputs",
    "dynamic_axes",
    "eval_mode",
    "model_dtype",
    "process_traced_graph",
    "trace_module_to_onnx",
    "weight_bytes",
    "lower_bound_bytes",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"

# Symbolic dimension names, as onnxruntime-genai and Optimum write them.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One layer's exported cache: ``key [B, heads, P, key_dim]`` and ``value [B, heads, P, value_dim]``.

    ``mla`` is ``(kv_lora_rank, qk_rope_head_dim)`` for a DeepSeek-V2 (MLA) layer, whose cache is packed (see
    :func:`cache_shapes`), else None.
    """

    heads: int
    key_dim: int
    value_dim: int
    mla: tuple[int, int] | None = None


def cache_shapes(config) -> list[CacheSpec]:
    """Per decoder layer, the shapes of the exported ``past_key_values`` / ``present`` tensors.

    Standard attention caches keys and values per KV head: ``[B, num_key_value_heads, P, head_dim]`` each.

    DeepSeek-V2's MLA (transformers 5.x) caches, per position, one normalised KV latent (``kv_lora_rank``) and one
    rotary key shared by all heads (``qk_rope_head_dim``), not per-head keys and values. onnxruntime-genai needs
    one head size for keys and values, so the export packs the two into one vector ``[latent | rope | pad]`` of
    even width ``2h`` (``pad`` is one zero when ``kv_lora_rank + qk_rope_head_dim`` is odd) and stores its first half
    as ``key`` and its second half as ``value``, both ``[B, 1, P, h]``: the MLA cache's own size, nothing expanded.
    """
    layers = int(config.num_hidden_layers)
    rank, rope = getattr(config, "kv_lora_rank", None), getattr(config, "qk_rope_head_dim", None)
    if rank and rope:
        half = (int(rank) + int(rope) + 1) // 2
        return [CacheSpec(1, half, half, mla=(int(rank), int(rope)))] * layers
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return [CacheSpec(heads, head_dim, head_dim)] * layers


def pack_mla(latent: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, value)`` halves of ``[latent | rope | pad]`` (see :func:`cache_shapes`)."""
    parts = [latent, rope]
    if (latent.shape[-1] + rope.shape[-1]) % 2:
        parts.append(torch.zeros_like(rope[..., :1]))
    packed = torch.cat(parts, dim=-1)
    half = packed.shape[-1] // 2
    return packed[..., :half], packed[..., half:]


def unpack_mla(key: torch.Tensor, value: torch.Tensor, rank: int, rope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latent, rope)`` from the packed ``key`` / ``value`` halves: the inverse of :func:`pack_mla`."""
    packed = torch.cat([key, value], dim=-1)
    return packed[..., :rank], packed[..., rank : rank + rope]


def routing_weights_names(model: nn.Module) -> list[str]:
    """Names of the MoE layers' dense routing weights W ``[T, E]`` in the export, in layer order.

    ``model.layers.{i}.{block}.routing_weights`` (``block`` = the adapter's MoE block attribute, e.g. ``mlp``, absent
    where the decoder layer is the block): the keys of the ``novices`` plan ``graph_passes.prune_novices`` accepts.
    """
    adapter, layers = moe_layers_or_error(model)
    return [f"{adapter.block_path(layer.index)}.routing_weights" for layer in layers]


def input_names(num_layers: int) -> list[str]:
    """``input_ids, attention_mask, position_ids, past_key_values.{i}.key, past_key_values.{i}.value, ...``."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    """``logits, present.{i}.key, present.{i}.value, ...``."""
    return ["logits", *(f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value"))]


class DecoderWithCache(nn.Module):
    """A causal LM as a function of flat tensors: ``(input_ids, attention_mask, position_ids, past) -> (logits, *present)``.

    ``past`` is the list ``[key_0, value_0, key_1, value_1, ...]`` shaped as :func:`cache_shapes` says; it is
    wrapped in a transformers ``DynamicCache`` (full-length layers, so ``present`` = ``past`` + the new positions,
    whatever the model's sliding window: the attention mask applies the window). With ``attention="gqa"`` the
    attention of every layer is one ``GroupQueryAttention`` (:mod:`mone_export.fused_attention`), which returns
    ``present`` itself.
    """

    def __init__(self, model: nn.Module, attention: str = "plain"):
        super().__init__()
        self.model = model
        self.specs = cache_shapes(model.config)
        self.num_layers = len(self.specs)
        self.attention = attention

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        layers = []
        for i, spec in enumerate(self.specs):
            key, value = past[2 * i], past[2 * i + 1]
            layers.append(unpack_mla(key, value, *spec.mla) if spec.mla else (key, value))
        if self.attention == "gqa":
            return self._fused_forward(input_ids, attention_mask, position_ids, layers)
        cache = DynamicCache(ddp_cache_data=layers)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        present = []
        for spec, layer in zip(self.specs, out.cache.layers):
            present += pack_mla(layer.keys, layer.values) if spec.mla else [layer.keys, layer.values]
        return (out.logits, *present)

    def _fused_forward(self, input_ids, attention_mask, position_ids, layers):
        from mone_export.fused_attention import NewStatesCache, fused_step

        with fused_step(layers, attention_mask, position_ids) as step:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=NewStatesCache(ddp_cache_data=layers), use_cache=True, return_dict=True)
        present = [tensor for index in range(self.num_layers) for tensor in step.present[index]]
        return (out.logits, *present)


# --- export-time patches ----------------------------------------------------------------------------------------


def _real_rotary_forward(self, x, position_ids):
    """DeepSeek-V2's rotary embedding as real ``[..., dim/2, 2]`` (cos, sin) pairs instead of complex ``freqs_cis``."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _real_apply_rotary_emb(xq, xk, freqs_cis, heads_axis: int = 1):
    """``apply_rotary_emb`` of complex ``freqs_cis`` with the complex product written out on (re, im) pairs; q and k
    hold their heads at ``heads_axis`` (DeepSeek-V2: ``[B, H, S, D]``, 1; Llama 4: ``[B, S, H, D]``, 2)."""
    freqs = freqs_cis.unsqueeze(heads_axis).to(xq.device)
    cos, sin = freqs[..., 0], freqs[..., 1]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        re, im = pairs[..., 0], pairs[..., 1]
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
        return out.flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


def _real_apply_rotary_emb_like(original: Callable) -> Callable:
    """:func:`_real_apply_rotary_emb` with the heads axis at which the modelling file's own ``apply_rotary_emb``
    (``original``) computes the same numbers, found by running both on random inputs (S ≠ H, so only one axis
    broadcasts); a clear error when neither does."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, heads, dim = 1, 3, 2, 8
    angles = torch.arange(seq, dtype=torch.float32)[None, :, None] * torch.rand(dim // 2, generator=gen)
    complex_freqs = torch.polar(torch.ones_like(angles), angles)
    real_freqs = torch.stack((angles.cos(), angles.sin()), dim=-1)
    for heads_axis in (1, 2):
        shape = (batch, heads, seq, dim) if heads_axis == 1 else (batch, seq, heads, dim)
        xq, xk = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        try:
            expected = original(xq, xk, complex_freqs)
        except RuntimeError:  # the heads are not where this function broadcasts the angles
            continue
        actual = _real_apply_rotary_emb(xq, xk, real_freqs, heads_axis)
        if all(torch.allclose(a, e, atol=1e-5) for a, e in zip(actual, expected)):
            return functools.partial(_real_apply_rotary_emb, heads_axis=heads_axis)
    raise UnsupportedModelError(f"{original.__module__}.apply_rotary_emb applies complex rotary embeddings in a "
                                "layout the export cannot write as real arithmetic.")


def _complex_rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Rotary-embedding modules whose modeling file applies complex ``freqs_cis`` (``view_as_complex``)."""
    found = []
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        apply = getattr(modeling, "apply_rotary_emb", None)
        code = getattr(apply, "__code__", None)
        if (
            type(module).__name__.endswith("RotaryEmbedding")
            and hasattr(module, "inv_freq")
            and code is not None
            and "view_as_complex" in code.co_names
        ):
            found.append(module)
    return found


@contextlib.contextmanager
def _patched_complex_rotary(model: nn.Module) -> Iterator[None]:
    """Trace complex rotary embeddings (DeepSeek-V2, Llama 4) as real arithmetic; ONNX has no complex tensors."""
    modules = _complex_rotary_modules(model)
    modelings = {sys.modules[type(m).__module__] for m in modules}
    saved = {mod: mod.apply_rotary_emb for mod in modelings}
    try:
        for module in modules:
            module.forward = _real_rotary_forward.__get__(module)
        for mod in modelings:
            mod.apply_rotary_emb = _real_apply_rotary_emb_like(saved[mod])
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)
        for mod, fn in saved.items():
            mod.apply_rotary_emb = fn


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention during the export (a traceable mask and softmax); the previous implementation comes back."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _softmax_symbolic(op_type: str, stock):
    """``aten::softmax`` / ``aten::log_softmax`` with a ``dtype`` argument: cast *before* the op, as PyTorch does.

    The TorchScript exporter's own symbolic emits ``Cast(Softmax(x), dtype)``: the softmax in the input dtype, then a
    cast. PyTorch casts first. In float32 the two agree; in a float16 model the stock form runs every
    ``softmax(..., dtype=torch.float32)`` (eager attention in all supported families, the Qwen2-MoE and OLMoE
    routers) on float16 in ONNX Runtime and hands the router's top-k float16-rounded probabilities. ONNX Runtime's CPU
    float16 Softmax computes in float32 inside, so on the bundled models the measured effect is one float16 ulp on
    some logits (median error against float32 PyTorch unchanged to 1e-5, no routing decision changed): the graph now
    computes what PyTorch computes, not a large accuracy gain. When no cast is needed the stock symbolic runs
    unchanged, so float32 graphs are exactly the stock export.
    """
    from torch.onnx import symbolic_helper
    from torch.onnx._internal.torchscript_exporter import _type_utils

    @symbolic_helper.parse_args("v", "i", "none")
    def symbolic(g, input, dim, dtype=None):
        if dtype is None or symbolic_helper._is_none(dtype):
            return stock(g, input, dim, dtype)
        wanted = _type_utils.JitScalarType(symbolic_helper._get_const(dtype, "i", "dtype"))
        if _type_utils.JitScalarType.from_value(input, wanted) == wanted:
            return stock(g, input, dim, dtype)
        return g.op(op_type, g.op("Cast", input, to_i=wanted.onnx_type()), axis_i=dim)

    return symbolic


def _clamp_symbolic(stock):
    """``aten::clamp`` on a value whose dtype the exporter does not know: ``Min`` / ``Max`` with the bounds cast like
    the input (``CastLike``), where the stock symbolic stops with "cannot determine scalar type" (our export runs
    without ONNX shape inference, so a value computed by a custom gate, gpt-oss's clamped SwiGLU, can be untyped). A
    value of known dtype takes the stock symbolic, so graphs that exported before are unchanged."""
    from torch.onnx import errors, symbolic_helper
    from torch.onnx._internal.torchscript_exporter import _type_utils

    def symbolic(g, input, min, max):
        undefined = _type_utils.JitScalarType.UNDEFINED
        if _type_utils.JitScalarType.from_value(input, undefined) != undefined:
            try:
                return stock(g, input, min, max)
            except errors.SymbolicValueError:  # an untyped intermediate (its clamp_max after clamp_min): ours
                pass  # the nodes it added before failing read nothing downstream; the exporter's cleanup drops them
        out = input
        if not symbolic_helper._is_none(min):
            out = g.op("Max", out, g.op("CastLike", min, input))
        if not symbolic_helper._is_none(max):
            out = g.op("Min", out, g.op("CastLike", max, input))
        return out

    return symbolic


def _repeat_interleave_symbolic(stock):
    """``aten::repeat_interleave(x, r, dim=-1)`` with a constant ``r`` (the interleaved rotary embeddings of ERNIE-4.5
    and Cohere-2): ``Reshape(Expand(Unsqueeze(x, -1), [r]), [..., -1])``, which needs neither the rank nor the shape
    of ``x``; the stock symbolic needs static shapes, which our export (without ONNX shape inference) does not give.
    Anything else takes the stock symbolic."""
    from torch.onnx import symbolic_helper

    def symbolic(g, input, repeats, dim=None, output_size=None):
        last = dim is not None and not symbolic_helper._is_none(dim) and symbolic_helper._maybe_get_const(dim, "i") == -1
        constant = symbolic_helper._is_constant(repeats) and symbolic_helper._get_tensor_rank(repeats) in (0, None)
        if not (last and constant):
            return stock(g, input, repeats, dim, output_size)
        count = int(symbolic_helper._maybe_get_const(repeats, "i"))
        widened = g.op("Expand", g.op("Unsqueeze", input, g.op("Constant", value_t=torch.tensor([-1]))),
                       g.op("Constant", value_t=torch.tensor([count])))
        leading = g.op("Slice", g.op("Shape", input), g.op("Constant", value_t=torch.tensor([0])),
                       g.op("Constant", value_t=torch.tensor([-1])))
        shape = g.op("Concat", leading, g.op("Constant", value_t=torch.tensor([-1])), axis_i=0)
        return g.op("Reshape", widened, shape)

    return symbolic


def _gelu_symbolic(stock):
    """``aten::gelu`` on a half-precision value, or one whose dtype the exporter does not know (our export runs
    without ONNX shape inference): the stock symbolic's constants stay float32 and meet a float16 input in one ``Add``
    (Gemma 4's tanh-approximated experts in a float16 export). Here every constant is cast like the input
    (``CastLike``); a float32 value takes the stock symbolic, so float32 graphs are unchanged."""
    from torch.onnx import symbolic_helper
    from torch.onnx._internal.torchscript_exporter import _type_utils

    def symbolic(g, input, approximate="none"):
        wide = (_type_utils.JitScalarType.FLOAT, _type_utils.JitScalarType.DOUBLE)
        if _type_utils.JitScalarType.from_value(input, _type_utils.JitScalarType.UNDEFINED) in wide:
            return stock(g, input, approximate)
        approximate = symbolic_helper._maybe_get_const(approximate, "s")

        def const(value: float):
            return g.op("CastLike", g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32)), input)

        if approximate == "tanh":
            cube = g.op("Mul", input, g.op("Mul", input, input))
            inner = g.op("Mul", const(math.sqrt(2 / math.pi)), g.op("Add", input, g.op("Mul", const(0.044715), cube)))
            return g.op("Mul", const(0.5), g.op("Mul", input, g.op("Add", const(1.0), g.op("Tanh", inner))))
        erf = g.op("Erf", g.op("Div", input, const(math.sqrt(2.0))))
        return g.op("Mul", g.op("Mul", input, g.op("Add", erf, const(1.0))), const(0.5))

    return symbolic


def _cumsum_symbolic(stock):
    """``aten::cumsum`` of a bool tensor (the chunked-attention mask's left-padding count, Llama 4): the stock
    symbolic on its int64 cast, as PyTorch sums booleans into int64; ONNX's ``CumSum`` takes no bool. Other inputs
    take the stock symbolic unchanged."""
    from torch.onnx._internal.torchscript_exporter import _type_utils

    def symbolic(g, input, dim, dtype=None):
        if _type_utils.JitScalarType.from_value(input, _type_utils.JitScalarType.UNDEFINED) == \
                _type_utils.JitScalarType.BOOL:
            input = g.op("Cast", input, to_i=_type_utils.JitScalarType.INT64.onnx_type())
        return stock(g, input, dim, dtype)

    return symbolic


@contextlib.contextmanager
def _softmax_in_requested_dtype(opset: int) -> Iterator[None]:
    """Within the block, the exporter emits ``softmax(x, dtype=d)`` as ``Softmax(Cast(x, d))`` (see
    :func:`_softmax_symbolic`), ``clamp`` and ``repeat_interleave`` where the stock symbolics need types or shapes
    our export does not infer (:func:`_clamp_symbolic`, :func:`_repeat_interleave_symbolic`, :func:`_gelu_symbolic`),
    and ``cumsum`` of booleans (:func:`_cumsum_symbolic`); the stock symbolics come back on exit."""
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9, symbolic_opset11, symbolic_opset13

    symbolics = {"softmax": _softmax_symbolic("Softmax", symbolic_opset13.softmax),
                 "log_softmax": _softmax_symbolic("LogSoftmax", symbolic_opset13.log_softmax),
                 "clamp": _clamp_symbolic(symbolic_opset11.clamp),
                 "repeat_interleave": _repeat_interleave_symbolic(symbolic_opset13.repeat_interleave),
                 "cumsum": _cumsum_symbolic(symbolic_opset11.cumsum),
                 "gelu": _gelu_symbolic(symbolic_opset9.gelu)}
    registered = []
    try:
        for name, function in symbolics.items():
            torch.onnx.register_custom_op_symbolic(f"aten::{name}", function, opset)
            registered.append(name)
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(f"aten::{name}", opset)


@contextlib.contextmanager
def export_patches(model: nn.Module, moe_form: str = "dispatch", attention: str = "plain") -> Iterator[nn.Module]:
    """Every export-time change to ``model``, undone on exit: eager attention (or with ``attention="gqa"`` the fused
    attention of :mod:`mone_export.fused_attention`), the MoE graph form (``moe_form``, see
    :data:`mone_export.moe_export_forward.MOE_FORMS`), real rotary."""
    from mone_export.fused_attention import gqa_attention

    attending = gqa_attention(model) if attention == "gqa" else _eager_attention(model)
    with attending, export_friendly_moe(model, moe_form), _patched_complex_rotary(model):
        yield model


# --- export ---------------------------------------------------------------------------------------------------------


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (its weights' dtype)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 5, past: int = 3):
    """Trace inputs with distinct, non-1 batch / sequence / past lengths (nothing specialises on a coincidence)."""
    config = model.config
    dtype = model_dtype(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = []
    for spec in cache_shapes(config):
        cache.append(torch.randn(batch, spec.heads, past, spec.key_dim, generator=gen).to(dtype))
        cache.append(torch.randn(batch, spec.heads, past, spec.value_dim, generator=gen).to(dtype))
    return ids, mask, positions, cache


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    """The symbolic batch / sequence / past / total dimensions of every input and output (Optimum's names)."""
    axes = {
        "input_ids": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: SEQ},
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: BATCH, 2: PAST}
            axes[f"present.{i}.{kind}"] = {0: BATCH, 2: TOTAL}
    return axes


def _trace_to_onnx(model: nn.Module, path: Path, opset: int, moe_form: str = "dispatch",
                   attention: str = "plain") -> None:
    """TorchScript-trace ``DecoderWithCache(model)`` (patched) into ``path``."""
    num_layers = int(model.config.num_hidden_layers)
    ids, mask, positions, cache = example_inputs(model)
    trace_module_to_onnx(model, DecoderWithCache(model, attention), (ids, mask, positions, cache), path, opset,
                         input_names(num_layers), output_names(num_layers), dynamic_axes(num_layers), moe_form,
                         attention)


def trace_module_to_onnx(model: nn.Module, wrapper: nn.Module, args: tuple, path, opset: int,
                         input_names: list[str], output_names: list[str], dynamic_axes: dict,
                         moe_form: str = "dispatch", attention: str = "plain") -> None:
    """TorchScript-trace ``wrapper`` (a module around ``model``) into ``path`` (a file path, or an ``io.BytesIO``
    for a model under 2 GiB), with every export-time patch of ``model`` applied (:func:`export_patches`) and
    softmax in the requested dtype."""
    with warnings.catch_warnings():
        # Expected noise: TracerWarnings on transformers' Python-side shape checks (they hold for every input the
        # graph serves), the TorchScript exporter's deprecation notice and its advanced-indexing remark.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        with torch.no_grad(), export_patches(model, moe_form, attention), _softmax_in_requested_dtype(opset):
            # torch.onnx.export(dynamo=False) without its ONNX shape inference: that pass serialises the weights
            # into a temporary model for every node that reads one (measured: 55 of 122 s of the streamed export
            # of a 640M-parameter Qwen3-MoE). Our symbolics do not need its shapes, the graph computes the same
            # (tests/test_export.py checks it against PyTorch) and ONNX Runtime infers shapes when it loads it.
            from torch.onnx._internal.torchscript_exporter import utils as torchscript_utils

            torchscript_utils._export(
                wrapper,
                args,
                path if isinstance(path, io.BytesIO) else str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                onnx_shape_inference=False,
            )


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a numpy integer array of the same shape and strides (a view: nothing is copied; bf16
    has no numpy dtype, its int16 bits do)."""
    detached = tensor.detach()
    return detached.view(_INT_OF_SIZE[detached.element_size()]).numpy()


@dataclasses.dataclass(frozen=True)
class ExportedWeight:
    """Where an initializer the export names came from: a parameter (or buffer), one expert's slot of an expert
    stack ``[E, a, b]``, as stored or transposed."""

    parameter: str
    """The model's parameter or buffer name."""
    slot: int | None
    """Index into the stack's first dimension, or None for the whole tensor."""
    transposed: bool

    def view(self, tensor):
        """The initializer's array as a view of the parameter (numpy array or torch tensor alike)."""
        tensor = tensor if self.slot is None else tensor[self.slot]
        return tensor.T if self.transposed else tensor


def exported_weight_names(model: nn.Module) -> dict[str, ExportedWeight]:
    """Every name the export may give an initializer (:func:`name_initializers`), in priority order.

    A parameter ``p`` is ``p`` as stored or ``p.T`` transposed (the exporter folds Linear / expert weights into
    ``W.T``); expert stacks ``[E, a, b]`` (``gate_up_proj``, ``down_proj``) are named per expert id
    (``model.layers.3.mlp.experts.5.gate_up_proj.T``); for ``NoviceExperts`` the slot is mapped to its expert id.
    """
    names: dict[str, ExportedWeight] = {}
    modules = dict(model.named_modules())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or tensor.is_meta:  # a layer-streamed model's unloaded layers
            continue
        # Transposed layouts first: the exporter folds Linear / expert weights into W.T.
        if tensor.dim() == 2:
            names[name + ".T"] = ExportedWeight(name, None, True)
        if tensor.dim() <= 2:
            names[name] = ExportedWeight(name, None, False)
        if tensor.dim() == 3:
            owner, _, leaf = name.rpartition(".")
            ids = getattr(modules.get(owner), "real_ids", None) or list(range(tensor.shape[0]))
            for slot, expert in enumerate(ids[: tensor.shape[0]]):
                names[f"{owner}.{expert}.{leaf}.T"] = ExportedWeight(name, slot, True)
                names[f"{owner}.{expert}.{leaf}"] = ExportedWeight(name, slot, False)
    return names


def _named_layouts(model: nn.Module) -> dict[str, tuple[tuple[int, ...], object]]:
    """:func:`exported_weight_names` with each array's shape and a function returning its bits (a view)."""
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    layouts: dict[str, tuple[tuple[int, ...], object]] = {}
    for name, weight in exported_weight_names(model).items():
        tensor = tensors[weight.parameter]
        shape = tuple(weight.view(tensor.detach()).shape)  # a view: no copy
        layouts[name] = (shape, lambda t=tensor, w=weight: w.view(_bits(t)))
    return layouts


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode within the block; its training flag comes back after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _run_graph_passes(model):
    """``graph_passes.prune_novices``: novices → one constant bias per layer, then cleanup."""
    try:
        from graph_passes import prune_novices
    except ImportError as exc:  # the passes live beside the package; a broken install should say so
        raise RuntimeError(f"graph_passes.prune_novices is not available ({exc}); reinstall mone-export.") from exc
    return prune_novices(model)


def process_traced_graph(ir_model, source: nn.Module, routing_names: list[str], target: torch.dtype,
                         run_passes: bool = True, log=logger.debug, quantization=None, fuse_norms: bool = False):
    """What follows the trace: initializers named after the parameters they hold, the dispatch's routing weights
    named ``routing_names`` (one per traced MoE layer), tied weights shared, the graph passes, with ``fuse_norms``
    each residual add and the RMS norm after it as one ``SkipSimplifiedLayerNormalization``
    (:mod:`graph_passes.fuse_norms`), with ``quantization`` (a :class:`~mone_export.quantization.WeightQuantization`)
    the weights quantised, and in a half-precision export the float32 constants with exact half values stored narrow.
    Returns the model."""
    import onnx_ir as ir
    import onnx_ir.passes.common  # noqa: F401  (IdentityEliminationPass)

    # The exporter shares equal initializers through Identity nodes (e.g. the zero vectors of mone-zero
    # novices), which hides that an operand is a constant: read the initializers directly.
    ir.passes.common.IdentityEliminationPass()(ir_model)
    lifted = lift_external_constants(ir_model)
    if lifted:
        log("%d constants the trace stored in files are initializers now", lifted)
    name_initializers(ir_model, _named_layouts(source), prefix="model.")
    name_values(dispatch_weight_values(ir_model), routing_names)
    name_fused_expert_weights(ir_model)
    shared = share_transposed_initializers(ir_model)
    if shared:
        log("tied weights: %d MatMul(s) now read the untransposed initializer", shared)
    if run_passes:
        ir_model = _run_graph_passes(ir_model)
    if fuse_norms:
        from graph_passes.fuse_norms import FuseNormsPass

        before = len(ir_model.graph)
        FuseNormsPass()(ir_model)
        log("residual adds and RMS norms fused: %d nodes fewer", before - len(ir_model.graph))
    if quantization is not None:
        from mone_export.quantization import quantize_export

        count = quantize_export(ir_model, source, quantization)
        log("%d weights quantised to %s (block %d)", count, quantization.name, quantization.block_size)
    if target in (torch.float16, torch.bfloat16):
        narrow = ir.DataType.FLOAT16 if target == torch.float16 else ir.DataType.BFLOAT16
        stored = store_float32_as(ir_model, narrow)
        if stored:
            log("%d float32 constants with exact %s values stored as %s", stored, narrow.name, narrow.name)
    return ir_model


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "fp32",
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    external_data: bool | None = None,
    run_passes: bool = True,
    moe_form: str = "dispatch",
    quantization=None,
    attention: str = "plain",
) -> Path:
    """Export a (pruned) transformers MoE causal LM to ONNX with KV cache and return the written ``.onnx`` path.

    Args:
        model: a causal LM of a supported family, unpruned or pruned by :func:`mone_export.apply_plan`. It is
            left as it was (export-time patches are undone; a dtype change works on a copy).
        output: a ``.onnx`` file path, or a folder that receives ``model.onnx`` (+ ``model.onnx.data``).
        dtype: ``fp32``, ``fp16`` or ``bf16``: the dtype of the weights and activations in the graph. When it differs
            from the model's, a converted copy is exported (load the model in that dtype to avoid the copy).
        opset: default-domain opset (≥ 16 for ``ScatterND(reduction="add")``).
        progress: log each stage at INFO level (otherwise DEBUG).
        external_data: force (True) or forbid (False) ``model.onnx.data``; default: only above ~2 GiB.
        run_passes: run ``graph_passes.prune_novices`` (turn it off only to inspect the raw export).
        moe_form: ``dispatch`` (one branch per real expert: the fastest form on ONNX Runtime's CPU provider) or
            ``fused`` (the real experts of a layer as one ``com.microsoft.MoE`` node, the dispatch kept on the device:
            the GPU form). Novices are the same bias node in both (docs/graph.md).
        quantization: a :class:`~mone_export.quantization.WeightQuantization` (``int4``/``int8`` weights, float32
            routers and novice biases: :mod:`mone_export.quantization`), or None for float weights. Needs ``fp32``.
        attention: ``plain`` (standard ops: any ONNX runtime), ``gqa`` (one ``com.microsoft.GroupQueryAttention`` per
            layer: :mod:`mone_export.fused_attention`) or ``auto`` (``gqa`` where the model allows it). With ``gqa``
            or ``quantization`` each residual add and the RMS norm after it become one
            ``com.microsoft.SkipSimplifiedLayerNormalization`` (:mod:`graph_passes.fuse_norms`).

    The file is written in place of any previous one; for an atomic folder use
    :func:`mone_export.output_folder.write_output_folder`.
    """
    import onnx_ir as ir

    from mone_export import __version__
    from mone_export.architectures import check_exportable

    if opset < 16:
        raise UsageError(f"opset {opset} is too old: ScatterND with reduction='add' needs opset 16 or newer.")
    moe_layers_or_error(model)
    check_exportable(model.config)
    from mone_export.fused_attention import resolve_attention

    attention = resolve_attention(attention, model)
    target = parse_dtype(dtype)
    if quantization is not None and target != torch.float32:
        raise UsageError("--quant needs --dtype fp32: the quantised kernels take float32 activations here "
                         "(ONNX Runtime's CPU path); pass --dtype fp32.")
    output = Path(output)
    path = output if output.suffix == ".onnx" else output / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logger.info if progress else logger.debug

    source = model
    if model_dtype(model) != target:
        log("converting a copy of the model to %s for the export", target)
        source = copy.deepcopy(model).to(target)

    started = time.perf_counter()
    with eval_mode(source), tempfile.TemporaryDirectory(prefix=".mone-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / MODEL_FILE
        log("tracing %s (%d layers) to ONNX", type(model).__name__, model.config.num_hidden_layers)
        _trace_to_onnx(source, raw, opset, moe_form, attention)
        ir_model = ir.load(raw)
        log("traced in %.1f s: %d nodes, %.1f MB of weights", time.perf_counter() - started,
            len(ir_model.graph), initializer_bytes(ir_model) / 1e6)
        # A graph that needs ONNX Runtime's contrib ops anyway (fused attention, quantised weights) takes its fused
        # norm too; the plain fp32/fp16 graph stays standard ONNX.
        fuse_norms = run_passes and (attention == "gqa" or quantization is not None)
        ir_model = process_traced_graph(ir_model, source, routing_weights_names(source), target, run_passes, log,
                                        quantization, fuse_norms)
        finalize_model(ir_model, opset=opset, producer_version=__version__)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        save_model(ir_model, path, external_data=external_data)
    log("wrote %s (%.1f MB of weights) in %.1f s", path, weight_bytes(path) / 1e6, time.perf_counter() - started)
    return path


def lower_bound_bytes(model: nn.Module, dtype: str | torch.dtype | None = None) -> int:
    """Σ bytes of the distinct parameters and buffers the pruned model keeps (tied weights counted once).

    With ``dtype``, floating-point tensors are counted at that dtype's size (the bound of an export in ``dtype``).
    Non-persistent buffers (rotary ``inv_freq``) are included: they are tiny and the graph keeps what it uses.
    Validation asks ``weight_bytes(export) ≤ 1.005 × lower_bound_bytes(model, dtype)`` (docs/graph.md#weight-bytes).
    """
    itemsize = None if dtype is None else torch.empty((), dtype=parse_dtype(dtype)).element_size()
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        size = itemsize if (itemsize is not None and tensor.is_floating_point()) else tensor.element_size()
        total += tensor.numel() * size
    return total
