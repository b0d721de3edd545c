"""Fused attention in the export (``--attention gqa``): one ``com.microsoft.GroupQueryAttention`` node per layer.

The plain form (``--attention plain``, the default) traces transformers' eager attention: about a dozen standard
ops per layer, a ``Concat`` that copies the whole past into ``present`` at every step, the grouped keys repeated to
every query head, and a float mask built from ``attention_mask``. The fused form hands the attention of each layer
to ONNX Runtime's ``GroupQueryAttention`` kernel (the one the onnxruntime-genai builder uses): it reads the
grouped keys directly, applies the causal mask itself and appends the new keys to the past.

How it is traced. Within :func:`gqa_attention` the model runs with

- a cache whose ``update`` returns the new keys and values as they are (:class:`NewStatesCache`), so the model's
  own attention module computes its projections and norms exactly as in the plain form;
- the rotary embedding inside the kernel (``do_rotary=1`` with ``cos_cache`` / ``sin_cache`` of every position
  up to ``max_position_embeddings`` from the model's own rotary module, counted from each row's first slot) where
  the model's ``apply_rotary_pos_emb`` is checked to compute the kernel's ``rotate_half`` rotary on random inputs and
  the angles depend on the position only (:func:`rotary_cache`); otherwise the model's rotary ops stay;
- an attention implementation registered with transformers (``mone_gqa``) that calls :class:`GroupQueryAttention`
  on the query, the *new* keys and values and the layer's past, and records the layer's ``present``;
- not the model's attention mask: the kernel masks causally itself, with every row as long as the mask
  (``seqlens_k = total length − 1``), and the padding comes in as ``attention_bias [B, 1, S, P+S]``, a large
  negative number at each padded key, built once per forward from ``attention_mask``. The model's mask subgraph
  is dead code and the cleanup passes drop it. A sliding-window layer passes its window to the kernel
  (``local_window_size``), attention sinks (gpt-oss) their ``head_sink`` input.

Padding. A left-padded batch (Optimum's and transformers' ``generate``) is computed like the plain form computes
it: the padded keys are masked by the bias, and where the rotary is inside the kernel a row's tokens are rotated
at their slots in the padded row rather than at their positions from the mask, a constant shift per row that
rotary attention does not see (its scores depend on differences of positions only; the results agree to float
rounding). What the fused form still assumes, and the plain form does not: a batch with more than one new token
per row starts from an empty past (the kernel's CPU rule; a batched prompt, or one token per row with a past, are
both fine), and the padded row fits the rotary cache (``max_position_embeddings`` slots).
:func:`gqa_unsupported_reason` refuses models whose attention the kernel does not compute: MLA caches, keys and
values of different sizes, head sizes that are not a multiple of 8.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

__all__ = ["ATTENTION_FORMS", "GroupQueryAttention", "NewStatesCache", "check_attention_form", "fused_step",
           "gqa_attention", "gqa_unsupported_reason", "resolve_attention", "RotaryCache", "rotary_cache"]

ATTENTION_FORMS = ("plain", "gqa", "auto")
"""Values of ``--attention``: ``auto`` picks ``gqa`` where the model allows it."""

IMPLEMENTATION = "mone_gqa"
"""The name the fused attention is registered under in transformers' attention interfaces during an export."""


class GroupQueryAttention(torch.autograd.Function):
    """``com.microsoft.GroupQueryAttention`` in the trace, and the same function in PyTorch.

    Inputs: ``query [B, Hq, S, D]``, ``key`` / ``value [B, Hkv, S, D]`` (the new positions, as transformers'
    attention interface hands them over; the graph packs them into the kernel's ``[B, S, H·D]``), ``past_key`` /
    ``past_value [B, Hkv, P, D]``, ``seqlens_k [B]`` int32 (the row's length − 1: padding included),
    ``total_length`` int32 scalar, ``position_ids [B, S]`` (the kernel's rotary takes each row's first one and
    counts on), ``attention_bias [B, 1, S, P+S]`` (added to the scaled scores: 0, or a large negative number at a
    padded key), ``head_sink [Hq]`` (attention sinks: one extra logit per head in the softmax, gpt-oss; empty for
    none). Attributes: ``window`` is the kernel's ``local_window_size`` (a query sees that many positions, itself
    included, as transformers' ``sliding_window``; −1: all). Outputs: ``[B, S, Hq, D]`` and ``present_key`` /
    ``present_value [B, Hkv, P+S, D]``. Query head ``h`` reads key head ``h // (Hq / Hkv)`` (transformers'
    ``repeat_kv``).
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                position_ids, attention_bias, head_sink, num_heads: int, kv_num_heads: int, scale: float,
                softcap: float, window: int):
        batch, _, length, dim = query.shape
        if cos_cache.numel():  # the kernel's rotary: consecutive positions from each row's first position id
            positions = position_ids[:, :1].long() + torch.arange(length, device=query.device)
            query = _rotate(query.transpose(1, 2), cos_cache, sin_cache, positions).transpose(1, 2)
            key = _rotate(key.transpose(1, 2), cos_cache, sin_cache, positions).transpose(1, 2)
        present_key = torch.cat([past_key, key], dim=2)
        present_value = torch.cat([past_value, value], dim=2)
        groups = num_heads // kv_num_heads
        keys = present_key.repeat_interleave(groups, dim=1)
        values = present_value.repeat_interleave(groups, dim=1)
        scores = (query @ keys.transpose(-1, -2)).float() * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        past = present_key.shape[2] - length
        causal = torch.ones(length, past + length, dtype=torch.bool, device=query.device).tril(past)
        if window >= 0:  # the kernel's local_window_size: a query sees `window` positions, itself included
            causal &= ~torch.ones_like(causal).tril(past - window)
        scores = scores.masked_fill(~causal, float("-inf")) + attention_bias.float()
        if head_sink.numel():  # one more logit per head in the softmax's denominator, attending to nothing
            sink = head_sink.float().view(1, num_heads, 1, 1).expand(batch, -1, length, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out = (probs.to(values.dtype) @ values).transpose(1, 2).contiguous()
        return out, present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                 position_ids, attention_bias, head_sink, num_heads, kv_num_heads, scale, softcap, window):
        # [B, heads, S, D] -> the kernel's [B, S, heads·D], and its output back to [B, S, heads, D], by constant
        # shapes (0 copies a dimension): no Shape/Gather/Concat plumbing around the kernel
        packed_shape = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
        heads_shape = g.op("Constant", value_t=torch.tensor([0, 0, num_heads, -1], dtype=torch.int64))

        def packed(x):
            return g.op("Reshape", g.op("Transpose", x, perm_i=[0, 2, 1, 3]), packed_shape)

        rotary = bool(_static_numel(cos_cache))
        inputs = [packed(query), packed(key), packed(value), past_key, past_value, seqlens_k, total_length]
        inputs += [cos_cache, sin_cache, position_ids] if rotary else [_absent(g), _absent(g), _absent(g)]
        inputs.append(attention_bias)
        if _static_numel(head_sink):
            inputs.append(head_sink)
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", *inputs, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads,
            scale_f=scale, softcap_f=softcap, local_window_size_i=window, do_rotary_i=int(rotary),
            rotary_interleaved_i=0, outputs=3)
        out = g.op("Reshape", out, heads_shape)
        # The exporter cannot infer a contrib op's outputs: same element types and ranks as the inputs they follow.
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def _rotate(x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions: torch.Tensor):
    """Rotary embedding of ``x [B, S, heads, D]`` at ``positions [B, S]`` from half-width caches ``[P, D/2]``:
    transformers' ``rotate_half`` form (first half with second half), which the kernel computes with
    ``rotary_interleaved=0``."""
    cos = cos_cache[positions][:, :, None].to(x.dtype)
    sin = sin_cache[positions][:, :, None].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _static_numel(value) -> int:
    """Elements of a traced tensor whose shape the trace knows (the sinks are a parameter: always known)."""
    sizes = value.type().sizes()
    return 0 if sizes is None else int(np.prod(sizes))


def _absent(g):
    """An omitted optional input of an ONNX node, as the TorchScript exporter writes it (an empty name)."""
    from torch import _C

    placeholder = g.op("prim::Constant")
    placeholder.setType(_C.OptionalType.ofTensor())
    return placeholder


class NewStatesCache(DynamicCache):
    """transformers' cache during a fused-attention trace: ``update`` hands the new keys and values back unchanged
    (the kernel appends them to the past); the past length and everything else are the past's."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


@dataclasses.dataclass
class _Step:
    """What the fused attention of one forward needs besides its arguments, and what it leaves behind."""

    past: list[tuple[torch.Tensor, torch.Tensor]]
    seqlens_k: torch.Tensor
    total_length: torch.Tensor
    position_ids: torch.Tensor
    padding: torch.Tensor  # [B, 1, S, P+S]: 1 at a padded key, else 0
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    biases: dict[torch.dtype, torch.Tensor] = dataclasses.field(default_factory=dict)
    rotary_deferred: bool = False  # the layer now running skipped its rotary: the kernel applies it


_STEPS: list[_Step] = []
_ROTARY: list[tuple[torch.Tensor, torch.Tensor]] = []
"""The half-width cos/sin caches of the model under :func:`gqa_attention`, when its rotary is deferred."""

STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
"""Rotary types whose angles depend on the position only (not on the sequence length, as ``dynamic`` and
``longrope`` do), so that one cache of every position computes them."""


def _fused_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-interface signature: ``query [B, Hq, S, D]``, new ``key`` / ``value [B, Hkv, S, D]``
    (from :class:`NewStatesCache`); returns ``([B, S, Hq, D], None)``."""
    if not _STEPS:
        raise RuntimeError("the fused attention runs only inside mone_export.fused_attention.gqa_attention")
    step = _STEPS[-1]
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    past_key, past_value = step.past[module.layer_idx]
    sinks = kwargs.get("s_aux")
    cos_cache, sin_cache = (_ROTARY[-1] if step.rotary_deferred else (query.new_zeros(0), query.new_zeros(0)))
    step.rotary_deferred = False
    out, present_key, present_value = GroupQueryAttention.apply(
        query, key, value, past_key, past_value, step.seqlens_k, step.total_length, cos_cache.to(query.dtype),
        sin_cache.to(query.dtype), step.position_ids, _attention_bias(step, query.dtype),
        sinks.to(query.dtype) if sinks is not None else query.new_zeros(0), int(heads), int(kv_heads),
        float(scaling if scaling is not None else dim ** -0.5), float(softcap or 0.0),
        # measured against transformers' eager attention: both count the query itself in the window
        int(sliding_window) if sliding_window is not None else -1)
    step.present[module.layer_idx] = (present_key, present_value)
    return out, None


def _attention_bias(step: _Step, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's ``attention_bias`` in ``dtype``, computed once per forward and shared by every layer.

    A padded key gets half the dtype's most negative number: far below any score, yet finite after the addition,
    so that a query row with every key padded (a left-padded row's padding) still gets finite probabilities and
    no NaN reaches the next layer's keys."""
    if dtype not in step.biases:
        step.biases[dtype] = step.padding.to(dtype) * (torch.finfo(dtype).min / 2)
    return step.biases[dtype]


def _no_mask(*args, **kwargs):
    """The mask interface of the fused attention: the kernel masks causally itself."""
    return None


def gqa_unsupported_reason(model: nn.Module) -> str | None:
    """Why the model's attention cannot be one ``GroupQueryAttention`` per layer, or None when it can."""
    from mone_export.export import cache_shapes

    config = model.config
    if any(spec.mla for spec in cache_shapes(config)):
        return "its attention caches a compressed latent (MLA), which GroupQueryAttention does not compute"
    if any(spec.key_dim != spec.value_dim for spec in cache_shapes(config)):
        return "its keys and values have different head sizes"
    if any(spec.key_dim % 8 for spec in cache_shapes(config)):
        return "its head size is not a multiple of 8 (the kernel's requirement)"
    for module in model.modules():
        sinks = getattr(module, "sinks", None) if "Attention" in type(module).__name__ else None
        if isinstance(sinks, nn.Parameter) and sinks.dim() != 1:
            return f"its attention sinks have shape {list(sinks.shape)}, not one per query head"
    return None


GQA_PROBE_TOLERANCE = (1e-4, 1e-3)
"""(absolute, relative to the largest |logit|): how far the fused form's logits on the probe prompt may be from the
model's own attention. Real differences (a window the kernel does not apply) move logits by tenths of their scale;
two correct attentions in float32 differ by rounding."""

GQA_PROBE_MAX_TOKENS = 160
"""The probe prompt's length at most (twice the window or chunk plus a few tokens, where that is shorter)."""


def gqa_mismatch(model: nn.Module) -> str | None:
    """Why the fused attention does not compute the model's attention, measured, or None when it does.

    The model runs a random prompt longer than its sliding window (or chunk; at most :data:`GQA_PROBE_MAX_TOKENS`)
    twice in PyTorch: with its own attention, and as the export traces it with one ``GroupQueryAttention`` per layer
    (the kernel's arithmetic in PyTorch). A family whose attention the kernel does not express (a window applied by
    the mask alone, PhiMoE; chunked attention or a norm after the rotary, Llama 4) differs here, before anything is
    exported. A window longer than the probe is not tested by it.
    """
    from mone_export.export import DecoderWithCache, cache_shapes, export_patches

    config = model.config
    spans = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
    length = min(int(getattr(config, "max_position_embeddings", 64) or 64), GQA_PROBE_MAX_TOKENS,
                 2 * max([8, *filter(None, spans)]) + 5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (1, length), generator=generator)
    mask, positions = torch.ones_like(ids), torch.arange(length)[None]
    parameter = next(model.parameters())
    past = [torch.zeros(1, spec.heads, 0, dim, dtype=parameter.dtype, device=parameter.device)
            for spec in cache_shapes(config) for dim in (spec.key_dim, spec.value_dim)]
    with torch.no_grad():
        with export_patches(model, attention="plain"):
            expected = DecoderWithCache(model, "plain")(ids, mask, positions, past)[0]
        with export_patches(model, attention="gqa"):
            actual = DecoderWithCache(model, "gqa")(ids, mask, positions, past)[0]
    difference = float((actual.float() - expected.float()).abs().max())
    absolute, relative = GQA_PROBE_TOLERANCE
    if difference <= absolute + relative * float(expected.float().abs().max()):
        return None
    return (f"GroupQueryAttention does not compute its attention: on a {length}-token probe the logits differ by "
            f"{difference:.2g} (a window, chunk or norm the kernel does not express)")


def check_attention_form(form: str) -> None:
    """A UsageError unless ``form`` is one of :data:`ATTENTION_FORMS`."""
    from mone_export.errors import UsageError

    if form not in ATTENTION_FORMS:
        raise UsageError(f"--attention {form}: choose one of {', '.join(ATTENTION_FORMS)}.")


def resolve_attention(form: str, model: nn.Module, provider: str = "cpu") -> str:
    """``plain`` or ``gqa`` for ``--attention form``; ``gqa`` on a model that cannot take it is a UsageError.

    ``auto`` keeps plain attention for ``provider="cuda"``: the kernel's CUDA version takes float16 and bfloat16
    only and has never been run by this project's tests (no GPU), so a GPU user opts in with ``gqa``."""
    from mone_export.errors import UsageError

    check_attention_form(form)
    if form == "plain" or (form == "auto" and provider == "cuda"):
        return "plain"
    reason = gqa_unsupported_reason(model) or gqa_mismatch(model)
    if reason is None:
        return "gqa"
    if form == "auto":
        return "plain"
    raise UsageError(f"--attention gqa: {model.config.model_type} cannot use GroupQueryAttention ({reason}); "
                     "pass --attention plain (or auto).")


@dataclasses.dataclass(frozen=True)
class RotaryCache:
    """The kernel's rotary caches, ``[max_position_embeddings, D/2]`` float32, and the form of the model's angles."""

    cos: torch.Tensor
    sin: torch.Tensor
    duplicated: bool  # the model hands over [..., D] angles, the same in both halves (else [..., D/2]: gpt-oss)


def rotary_cache(model: nn.Module) -> RotaryCache | None:
    """The kernel's ``cos_cache`` / ``sin_cache [max_position_embeddings, D/2]`` (float32) computed by the model's
    own rotary embedding, or None where the kernel cannot take the model's rotary: more than one rotary module, a
    type whose angles depend on the sequence length (or one type per layer type), a rotary narrower than the head
    (partial rotary), complex angles, or angles that are not duplicated across the two halves (the ``rotate_half``
    form)."""
    from mone_export.export import cache_shapes

    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    specs = cache_shapes(model.config)
    rope_type = getattr(rotaries[0], "rope_type", None) if len(rotaries) == 1 else None
    if not isinstance(rope_type, str) or rope_type not in STATIC_ROPE_TYPES:  # per layer type: a dict of them
        return None
    dims = {spec.key_dim for spec in specs}
    positions = getattr(model.config, "max_position_embeddings", None)
    if len(dims) != 1 or not positions:
        return None
    (dim,) = dims
    half = dim // 2
    with torch.no_grad():
        probe = torch.zeros(1, 1, dtype=torch.float32, device=rotaries[0].inv_freq.device)
        angles = rotaries[0](probe, torch.arange(positions, device=probe.device)[None])
    if not (isinstance(angles, tuple) and len(angles) == 2):  # complex angles (Llama 4): not the kernel's cos / sin
        return None
    cos, sin = (t[0].float() for t in angles)
    if cos.shape[-1] == dim and torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:]):
        return RotaryCache(cos[:, :half].contiguous(), sin[:, :half].contiguous(), duplicated=True)
    if cos.shape[-1] == half:  # a family that keeps half-width angles (gpt-oss)
        return RotaryCache(cos.contiguous(), sin.contiguous(), duplicated=False)
    return None


def _rotary_function_matches(function, cache: RotaryCache, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether a modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)`` computes the kernel's rotary, tried on
    random queries and keys at a few positions (the angles as the model's rotary embedding hands them over)."""
    cos_cache, sin_cache = cache.cos, cache.sin
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 7, cos_cache.shape[0] - 1]])
    q = torch.randn(1, heads, 4, dim, generator=generator)
    k = torch.randn(1, kv_heads, 4, dim, generator=generator)
    cos = cos_cache[positions]
    sin = sin_cache[positions]
    if cache.duplicated:  # the angles as the model's rotary embedding hands them over
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    try:
        got_q, got_k = function(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a signature or shape this check does not know: keep the model's own rotary
        return False
    want_q = _rotate(q.transpose(1, 2), cos_cache, sin_cache, positions).transpose(1, 2)
    want_k = _rotate(k.transpose(1, 2), cos_cache, sin_cache, positions).transpose(1, 2)
    return bool(torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5))


@contextlib.contextmanager
def _deferred_rotary(model: nn.Module) -> Iterator[bool]:
    """Within the block, where the check allows it, the modeling module's ``apply_rotary_pos_emb`` hands the query
    and key back unrotated and flags the step, and the layer's kernel applies the rotary from :func:`rotary_cache`
    (no rotary ops in the graph). Yields whether it does."""
    import sys

    cache = rotary_cache(model)
    attentions = [m for m in model.modules() if "Attention" in type(m).__name__ and hasattr(m, "layer_idx")]
    modules = {sys.modules[type(m).__module__] for m in attentions}
    config = model.config
    dim = cache.cos.shape[-1] * 2 if cache is not None else 0
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    if cache is None or len(modules) != 1 or not all(
            _rotary_function_matches(getattr(m, "apply_rotary_pos_emb", None), cache, heads, kv_heads, dim)
            for m in modules):
        yield False
        return
    (module,) = modules
    original = module.apply_rotary_pos_emb

    def deferred(q, k, cos, sin, *args, **kwargs):
        if not _STEPS:
            return original(q, k, cos, sin, *args, **kwargs)
        _STEPS[-1].rotary_deferred = True
        return q, k

    module.apply_rotary_pos_emb = deferred
    _ROTARY.append((cache.cos, cache.sin))
    try:
        yield True
    finally:
        _ROTARY.pop()
        module.apply_rotary_pos_emb = original


@contextlib.contextmanager
def gqa_attention(model: nn.Module) -> Iterator[None]:
    """Within the block the model's attention is :func:`_fused_attention` (registered as ``mone_gqa``), with the
    rotary embedding inside the kernel where :func:`_deferred_rotary` allows it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _fused_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        with _deferred_rotary(model):
            yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def fused_step(past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
               position_ids: torch.Tensor) -> Iterator[_Step]:
    """One forward of the fused form: the past per layer, the kernel's lengths and the positions (for a rotary
    inside the kernel); yields the step, whose ``present`` the attention fills."""
    # The kernel's index space is the padded row: every row is as long as the mask, its padded keys are masked by
    # the bias, and the rotary inside the kernel counts from the row's first slot. A left-padded row's tokens are
    # rotated at their slots, not at their positions from the mask: a constant shift per row, which rotary
    # attention does not see (its scores depend on differences of positions only).
    ones = torch.ones_like(attention_mask)
    seqlens_k = (ones.sum(dim=-1) - 1).to(torch.int32)
    total_length = ones[0].sum().to(torch.int32)
    new = torch.ones_like(position_ids)
    slots = new.cumsum(dim=-1) - new.sum(dim=-1, keepdim=True) + ones.sum(dim=-1, keepdim=True) - 1  # past + s
    padding = (1 - attention_mask)[:, None, None, :] + torch.zeros_like(position_ids)[:, None, :, None]
    step = _Step(past=past, seqlens_k=seqlens_k, total_length=total_length, position_ids=slots, padding=padding)
    _STEPS.append(step)
    try:
        yield step
    finally:
        _STEPS.pop()
