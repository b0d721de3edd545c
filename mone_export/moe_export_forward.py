"""An export-friendly routed-experts forward that traces to the canonical dispatch form (docs/graph.md).

transformers' eager experts loop only visits the experts some token selected (``expert_hit``), a data-dependent
Python loop that a tracer freezes to the example input. :func:`export_friendly_moe` swaps, for the duration of an
export, every MoE layer's experts forward for :func:`canonical_dispatch`, which emits one branch per routed
expert whatever the input, in the form the graph passes (``graph_passes``) recognise. For ``x [T, H]`` and the
routing weights the model actually applies, ``W [T, E]`` (the router's top-k weights scattered into zeros)::

    col_e = Gather(W, e, axis=1)                         # e: int64 scalar constant
    nz_e  = NonZero(Greater(col_e, 0))                   # [1, n]: the tokens that selected e
    idx_e = Transpose(nz_e, perm=[1, 0])                 # [n, 1]
    tok_e = Squeeze(nz_e, axes=[0])                      # [n]
    w_e   = Unsqueeze(Gather(col_e, tok_e, axis=0), axes=[1])
    real expert:  upd_e = Mul(f_e(Gather(x, tok_e, axis=0)), w_e)
    novice:       upd_e = Mul(w_e, C_e)                  # C_e [H]: the novice's constant output
    acc = ScatterND(acc, idx_e, upd_e, reduction="add")  # acc starts as zeros [T, H]

So each token pays only for the experts it selected (sparse dispatch), a token routed only to novices runs no
expert matrix product, and the router runs unchanged (it is traced as is). The token selection and the scatter-add
are two small ``torch.autograd.Function``s whose ``symbolic`` emits exactly the ops above (the TorchScript exporter's
own ``nonzero``/``index_put`` give ``Gather(Transpose(NonZero))`` and ``Add(acc, ScatterND(zeros, ...))``, an extra
dense ``[T, H]`` add per expert); in eager mode they run the equivalent torch ops, equal to transformers' eager
loop to float rounding (same products, same expert order of accumulation).

In fp16/bf16 models W, the updates and the accumulator are float32 (see :func:`accumulation_dtype`): a real
branch is ``Mul(Cast(f_e(...), float), w_e)`` and a novice's ``C_e`` is a float32 constant.

Routing weights are assumed non-negative (softmax or sigmoid gates, positive scaling): a selected expert with
weight exactly 0 contributes ``0 · f_e(x) = 0`` and is skipped.

**The fused form** (``form="fused"``, chosen by ``--provider cuda``): the real experts of a layer are one
``com.microsoft.MoE`` node, which keeps the token dispatch on the device (the branch form's ``NonZero`` per expert is
a data-dependent shape, i.e. a device-to-host copy and a stream sync on a GPU). The fused op does its own softmax,
top-k and renormalisation over its ``router_probs``, so it is fed what makes that an identity on the model's own
routing: with ``W_r = Gather(W, real_ids, axis=1)`` the applied weights of the real experts::

    logits = Where(Greater(W_r, 0), Log(W_r), -1e4)     # softmax(logits) = W_r / Σ W_r; unselected -> exactly 0
    moe    = MoE(x, logits, fc1, fc2, k=min(k, E_r), normalize_routing_weights=1,
                 activation_type="swiglu", swiglu_fusion=1, activation_alpha=1, activation_beta=0)
    acc    = Mul(Cast(moe, float), ReduceSum(W_r, axes=[1]))          # undo the renormalisation

The top-k of the op picks exactly the real experts the model's router selected (their logits are finite, the others
-1e4, whose softmax weight is 0 in float16 and float32), so the router still selects over all E experts, a token that
selected a novice gets g_e·C_e (the novice branches follow, in the canonical form above, and the graph passes fold
them into the bias node), and no token is re-routed to another real expert. ``fc1 [E_r, 2I, H]`` holds each expert's
gate and up rows interleaved (row 2j = gate j, row 2j+1 = up j: the op's fused SwiGLU layout), ``fc2 = down_proj``.
It needs SiLU-gated experts without biases (every supported family).
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mone_export.adapters import (expert_forward, experts_forwards_swapped, get_adapter, uses_default_gate,
                                  weighted_expert_output)
from mone_export.errors import UsageError

__all__ = [
    "MOE_FORMS",
    "accumulation_dtype",
    "canonical_dispatch",
    "export_friendly_moe",
    "export_forward_for",
    "fused_dispatch",
    "interleave_gate_up",
]

#: Graph forms of the routed experts: one branch per expert (CPU) or one fused ``com.microsoft.MoE`` node (GPU).
MOE_FORMS = ("dispatch", "fused")

#: The router logit given to an unselected real expert in the fused form: its softmax weight is exactly 0.
UNSELECTED_LOGIT = -1.0e4

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _TokensOf(torch.autograd.Function):
    """``(idx [n, 1], tok [n])``: the tokens whose routing weight in ``column [T]`` is above ``zero``.

    Exported as ``nz = NonZero(Greater(column, zero)); idx = Transpose(nz, [1, 0]); tok = Squeeze(nz, [0])``.
    """

    @staticmethod
    def forward(ctx, column, zero):
        idx = torch.nonzero(column > zero)
        return idx, idx[:, 0]

    @staticmethod
    def symbolic(g, column, zero):
        nz = g.op("NonZero", g.op("Greater", column, zero))
        idx = g.op("Transpose", nz, perm_i=[1, 0])
        tok = g.op("Squeeze", nz, g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64)))
        return idx, tok


class _ScatterAdd(torch.autograd.Function):
    """``acc`` with ``update [n, H]`` added at rows ``idx [n, 1]``: exported as ``ScatterND(reduction="add")``."""

    @staticmethod
    def forward(ctx, acc, idx, update):
        return acc.index_put((idx[:, 0],), update, accumulate=True)

    @staticmethod
    def symbolic(g, acc, idx, update):
        return g.op("ScatterND", acc, idx, update, reduction_s="add")


def canonical_dispatch(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    real: Mapping[int, ExpertFn],
    novices: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """Σ_e g_e(x)·f_e(x) over a layer's routed experts, one branch per expert, in the canonical dispatch form.

    Args:
        hidden_states: ``[T, H]`` tokens entering the experts.
        top_k_index, top_k_weights: ``[T, k]`` the router's selection and the weights the model applies.
        num_experts: E, the width of the routing space.
        real: expert index → its weighted output g·f_e on ``(x [n, H], g [n, 1])``, in g's dtype.
        novices: expert index → its constant output ``[H]`` (a novice).

    Every index in ``range(num_experts)`` must be in exactly one of ``real`` and ``novices``. W, the weighted
    updates and the accumulator are in :func:`accumulation_dtype` (the model dtype, float32 for fp16/bf16 models);
    the result is cast back to the hidden dtype.
    """
    missing = [e for e in range(num_experts) if (e in real) == (e in novices)]
    if missing:
        raise ValueError(f"experts {missing} must be either real or novice (exactly one).")
    weights = _dense_routing_weights(hidden_states, top_k_index, top_k_weights, num_experts)
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    acc = torch.zeros(hidden_states.shape, dtype=weights.dtype, device=hidden_states.device)
    for expert in range(num_experts):
        if expert in novices:
            acc = _add_novice_branch(acc, weights, expert, zero, novices[expert])
        else:
            acc = _add_branch(acc, weights, expert, zero, lambda token, w, e=expert: real[e](hidden_states[token], w))
    return _as(acc, hidden_states.dtype)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, with no cast traced when it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _dense_routing_weights(hidden_states, top_k_index, top_k_weights, num_experts: int) -> torch.Tensor:
    """W ``[T, E]``: the applied top-k weights scattered into zeros, in :func:`accumulation_dtype`."""
    weights = torch.zeros(hidden_states.shape[0], num_experts, dtype=top_k_weights.dtype, device=hidden_states.device)
    return _as(weights.scatter(1, top_k_index, top_k_weights), accumulation_dtype(hidden_states.dtype))


def _add_branch(acc, weights, expert: int, zero, update) -> torch.Tensor:
    """One expert's branch of the canonical dispatch: ``acc`` plus ``update(token, w)`` at the tokens that selected
    ``expert`` (``token [n]``, their weights ``w [n, 1]``)."""
    column = weights[:, expert]
    idx, token = _TokensOf.apply(column, zero)
    return _ScatterAdd.apply(acc, idx, update(token, column[token].unsqueeze(1)))


def _add_novice_branch(acc, weights, expert: int, zero, constant: torch.Tensor) -> torch.Tensor:
    """A novice's branch: ``w · C_e`` at the tokens that selected it (folded into the bias node by the graph pass)."""
    return _add_branch(acc, weights, expert, zero, lambda token, w: w * _as(constant, w.dtype))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of W, the updates and the accumulator: float32 for half-precision models.

    ONNX Runtime's CPU ScatterND has no float16 ``reduction="add"`` kernel, and the routers of every supported
    family already produce float32 weights; the expert MLPs themselves stay in the model dtype. (transformers' eager
    loop also multiplies f_e by the float32 weight before casting back.)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _FusedRealExperts(torch.autograd.Function):
    """Σ_e (w_e / Σ w) · f_e(x) over the real experts, exported as one ``com.microsoft.MoE`` node (module docstring).

    ``weights [T, E_r]`` are the applied routing weights of the real experts (zero where not selected), ``fc1``
    ``[E_r, 2I, H]`` interleaved gate/up rows, ``fc2 [E_r, H, I]``. The eager forward computes what the op computes
    (its fused SwiGLU on the interleaved rows; a traced Function takes tensors only, so not the experts module): the
    renormalised weighted sum, zero for a token that selected no real expert.
    """

    @staticmethod
    def forward(ctx, hidden, weights, fc1, fc2, top_k):
        total = weights.sum(dim=1, keepdim=True)
        share = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
        out = torch.zeros(hidden.shape, dtype=weights.dtype, device=hidden.device)
        for slot in range(fc1.shape[0]):
            token = torch.nonzero(share[:, slot] > 0)[:, 0]
            if token.numel():
                gate_up = F.linear(hidden[token], fc1[slot])
                f_e = F.linear(F.silu(gate_up[:, 0::2]) * gate_up[:, 1::2], fc2[slot])
                out.index_add_(0, token, _as(f_e, out.dtype) * share[token, slot, None])
        return out.to(hidden.dtype)

    @staticmethod
    def symbolic(g, hidden, weights, fc1, fc2, top_k):
        from torch.onnx._internal.torchscript_exporter import _type_utils

        scalar = _type_utils.JitScalarType.from_value(weights)
        zero = g.op("Constant", value_t=torch.tensor(0.0, dtype=scalar.dtype()))
        floor = g.op("Constant", value_t=torch.tensor(UNSELECTED_LOGIT, dtype=scalar.dtype()))
        logits = g.op("Where", g.op("Greater", weights, zero), g.op("Log", weights), floor)
        hidden_type = _type_utils.JitScalarType.from_value(hidden)
        if hidden_type != scalar:
            logits = g.op("Cast", logits, to_i=hidden_type.onnx_type())
        none = g.op("prim::Constant")  # an absent optional input (fc1_experts_bias): an empty name in the graph
        none.setType(torch._C.OptionalType.ofTensor())
        moe = g.op("com.microsoft::MoE", hidden, logits, fc1, none, fc2, k_i=top_k, normalize_routing_weights_i=1,
                   activation_type_s="swiglu", swiglu_fusion_i=1, activation_alpha_f=1.0, activation_beta_f=0.0)
        moe.setType(hidden.type())  # the output is shaped and typed as the input (no exporter shape inference)
        return moe


def interleave_gate_up(gate_up_proj: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, H]`` with gate rows then up rows -> rows interleaved (2j = gate j, 2j+1 = up j), the fused op's
    SwiGLU layout (``swiglu_fusion=1``)."""
    experts, rows, hidden = gate_up_proj.shape
    return gate_up_proj.reshape(experts, 2, rows // 2, hidden).transpose(1, 2).reshape(experts, rows, hidden)


def fused_dispatch(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    experts: nn.Module,
    real_ids: list[int],
    novices: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """The fused form of :func:`canonical_dispatch`: the real experts as one fused MoE op, novices as branches.

    ``experts`` holds the real experts' fused weights in ``real_ids`` order (``gate_up_proj [E_r, 2I, H]``,
    ``down_proj [E_r, H, I]``, SiLU-gated); ``novices`` maps the other expert indices to their constant outputs.
    """
    if set(real_ids) & set(novices) or len(real_ids) + len(novices) != num_experts:
        raise ValueError(f"experts {sorted(set(range(num_experts)) - set(real_ids) - set(novices))} must be either "
                         "real or novice (exactly one).")
    weights = _dense_routing_weights(hidden_states, top_k_index, top_k_weights, num_experts)
    if real_ids:
        real = weights if list(real_ids) == list(range(num_experts)) else weights[:, torch.tensor(real_ids)]
        fc1 = interleave_gate_up(experts.gate_up_proj.detach())
        top_k = min(int(top_k_index.shape[1]), len(real_ids))
        moe = _FusedRealExperts.apply(hidden_states, real, fc1, experts.down_proj.detach(), top_k)
        acc = _as(moe, weights.dtype) * real.sum(dim=1, keepdim=True)
    else:
        acc = torch.zeros(hidden_states.shape, dtype=weights.dtype, device=hidden_states.device)
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    for expert in sorted(novices):
        acc = _add_novice_branch(acc, weights, expert, zero, novices[expert])
    return _as(acc, hidden_states.dtype)


def _check_fusable(experts: nn.Module) -> None:
    """The fused op computes SiLU-gated experts in the default layout (concatenated gate/up rows, ``[E, out, in]``
    weights) without biases or post-expert norms; anything else keeps the branch form."""
    act = getattr(experts, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or getattr(act, "__name__", None) == "silu" or type(act).__name__ == "SiLUActivation"
    biased = any(getattr(experts, name, None) is not None for name in ("gate_up_proj_bias", "down_proj_bias"))
    layout = [what for what, present in (
        ("its own gate function", not uses_default_gate(experts)),
        ("inputs scaled by the routing weight", getattr(experts, "scales_input", False)),
        ("transposed weights", getattr(experts, "is_transposed", False)),
        ("ungated experts", not getattr(experts, "has_gate", True)),
        ("a post-expert norm", getattr(experts, "has_post_expert_norm", False)),
        ("biases", biased),
        (f"{type(act).__name__} activation", not silu)) if present]
    if layout:
        raise UsageError(f"{type(experts).__name__}: the fused MoE graph form needs SiLU-gated experts in the default "
                         f"layout without biases (this one has {', '.join(layout)}); export with the branch form "
                         "(--moe-form dispatch).")


def _fused_stock_forward(self, hidden_states, top_k_index, top_k_weights):
    num_experts = int(self.gate_up_proj.shape[0])
    return fused_dispatch(hidden_states, top_k_index, top_k_weights, num_experts, self, list(range(num_experts)), {})


def _fused_novice_forward(self, hidden_states, top_k_index, top_k_weights):
    novices = {e: self.novice_means[row] for row, e in enumerate(self.novice_ids)}
    return fused_dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts, self, list(self.real_ids),
                          novices)


def _stock_forward(self, hidden_states, top_k_index, top_k_weights):
    num_experts = int(self.gate_up_proj.shape[0])
    real = {e: _weighted_output(self, e) for e in range(num_experts)}
    return canonical_dispatch(hidden_states, top_k_index, top_k_weights, num_experts, real, {})


def _weighted_output(experts: nn.Module, slot: int) -> ExpertFn:
    """g·f_e of the expert at ``slot`` in the accumulation dtype of g (f_e cast up before the product, as
    transformers' eager loop multiplies by the float32 weight)."""
    if getattr(experts, "scales_input", False):
        return lambda x, w: _as(weighted_expert_output(experts, slot, x, w), w.dtype)
    return lambda x, w: _as(expert_forward(experts, slot, x), w.dtype) * w


def _novice_forward(self, hidden_states, top_k_index, top_k_weights):
    real = {e: _weighted_output(self, slot) for slot, e in enumerate(self.real_ids)}
    novices = {e: self.novice_means[row] for row, e in enumerate(self.novice_ids)}
    return canonical_dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts, real, novices)


def export_forward_for(experts: nn.Module, form: str = "dispatch"):
    """The export forward for one experts module (stock fused experts or ``NoviceExperts``) in graph form ``form``
    (:data:`MOE_FORMS`)."""
    if form not in MOE_FORMS:
        raise UsageError(f"unknown MoE graph form {form!r}; choose one of: {', '.join(MOE_FORMS)}.")
    if form == "fused":
        _check_fusable(experts)
    novice = getattr(experts, "is_pruned", False) and hasattr(experts, "novice_ids")
    if novice:
        return types.MethodType(_fused_novice_forward if form == "fused" else _novice_forward, experts)
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        return types.MethodType(_fused_stock_forward if form == "fused" else _stock_forward, experts)
    raise TypeError(f"{type(experts).__name__} is not a fused experts module (no gate_up_proj/down_proj).")


@contextlib.contextmanager
def export_friendly_moe(model: nn.Module, form: str = "dispatch") -> Iterator[nn.Module]:
    """Within the block, every MoE layer's experts run :func:`canonical_dispatch` (``form="dispatch"``) or
    :func:`fused_dispatch` (``"fused"``); the originals come back on exit.

    The swap is :func:`mone_export.adapters.experts_forwards_swapped`: on exit (also after an exception) each
    experts module's forward is what it was before.
    """
    layers = get_adapter(model).moe_layers(model)  # none in a layer-streamed export's dense-layer piece
    with experts_forwards_swapped(layers, lambda layer: export_forward_for(layer.experts, form)):
        yield model
