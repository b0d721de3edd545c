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
    real expert:  upd_e = Mul(expert_mlp(Gather(x, tok_e, axis=0)), w_e)
    novice:       upd_e = Mul(w_e, C_e)                  # C_e [H]: the novice's constant output
    acc = ScatterND(acc, idx_e, upd_e, reduction="add")  # acc starts as zeros [T, H]

So each token pays only for the experts it selected (sparse dispatch), a token routed only to novices runs no
expert matrix product, and the router runs unchanged (it is traced as is). The token selection and the scatter-add
are two small ``torch.autograd.Function``s whose ``symbolic`` emits exactly the ops above (the TorchScript exporter's
own ``nonzero``/``index_put`` give ``Gather(Transpose(NonZero))`` and ``Add(acc, ScatterND(zeros, ...))``, an extra
dense ``[T, H]`` add per expert); in eager mode they run the equivalent torch ops, equal to transformers' eager
loop to float rounding (same products, same expert order of accumulation).

In fp16/bf16 models W, the updates and the accumulator are float32 (see :func:`accumulation_dtype`): a real
branch is ``Mul(Cast(expert_mlp(...), float), w_e)`` and a novice's ``C_e`` is a float32 constant.

Routing weights are assumed non-negative (softmax or sigmoid gates, positive scaling): a selected expert with
weight exactly 0 contributes ``0 · f_e(x) = 0`` and is skipped.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mone_export.adapters import get_adapter

__all__ = ["accumulation_dtype", "canonical_dispatch", "expert_mlp", "export_friendly_moe", "export_forward_for"]

ExpertFn = Callable[[torch.Tensor], torch.Tensor]


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
        real: expert index → its raw output function f_e on ``[n, H]``.
        novices: expert index → its constant output ``[H]`` (a novice).

    Every index in ``range(num_experts)`` must be in exactly one of ``real`` and ``novices``. W, the weighted
    updates and the accumulator are in :func:`accumulation_dtype` (the model dtype, float32 for fp16/bf16 models);
    the result is cast back to the hidden dtype.
    """
    missing = [e for e in range(num_experts) if (e in real) == (e in novices)]
    if missing:
        raise ValueError(f"experts {missing} must be either real or novice (exactly one).")
    dtype = hidden_states.dtype
    acc_dtype = accumulation_dtype(dtype)
    weights = torch.zeros(hidden_states.shape[0], num_experts, dtype=top_k_weights.dtype, device=hidden_states.device)
    weights = weights.scatter(1, top_k_index, top_k_weights)
    if weights.dtype != acc_dtype:
        weights = weights.to(acc_dtype)
    zero = torch.zeros((), dtype=acc_dtype, device=hidden_states.device)
    acc = torch.zeros(hidden_states.shape, dtype=acc_dtype, device=hidden_states.device)
    for expert in range(num_experts):
        column = weights[:, expert]
        idx, token = _TokensOf.apply(column, zero)
        w = column[token].unsqueeze(1)
        if expert in novices:
            constant = novices[expert]
            update = w * (constant if constant.dtype == acc_dtype else constant.to(acc_dtype))
        else:
            out = real[expert](hidden_states[token])
            update = (out if out.dtype == acc_dtype else out.to(acc_dtype)) * w
        acc = _ScatterAdd.apply(acc, idx, update)
    return acc if acc.dtype == dtype else acc.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of W, the updates and the accumulator: float32 for half-precision models.

    ONNX Runtime's CPU ScatterND has no float16 ``reduction="add"`` kernel, and the routers of every supported
    family already produce float32 weights; the expert MLPs themselves stay in the model dtype. (transformers' eager
    loop also multiplies f_e by the float32 weight before casting back.)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def expert_mlp(experts: nn.Module, slot: int, hidden: torch.Tensor) -> torch.Tensor:
    """f_e on ``hidden [n, H]`` from fused weights ``gate_up_proj[slot]``, ``down_proj[slot]``.

    The same arithmetic as :func:`mone_export.adapters.expert_forward` (transformers' eager loop), with the gate/up
    split at a static size so that it exports as one ``Split`` instead of run-time shape arithmetic.
    """
    inter = int(experts.down_proj.shape[-1])
    gate, up = F.linear(hidden, experts.gate_up_proj[slot]).split([inter, inter], dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[slot])


def _stock_forward(self, hidden_states, top_k_index, top_k_weights):
    num_experts = int(self.gate_up_proj.shape[0])
    real = {e: (lambda x, e=e: expert_mlp(self, e, x)) for e in range(num_experts)}
    return canonical_dispatch(hidden_states, top_k_index, top_k_weights, num_experts, real, {})


def _novice_forward(self, hidden_states, top_k_index, top_k_weights):
    real = {e: (lambda x, slot=slot: expert_mlp(self, slot, x)) for slot, e in enumerate(self.real_ids)}
    novices = {e: self.novice_means[row] for row, e in enumerate(self.novice_ids)}
    return canonical_dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts, real, novices)


def export_forward_for(experts: nn.Module):
    """The canonical-dispatch forward for one experts module (stock fused experts or ``NoviceExperts``)."""
    if getattr(experts, "is_pruned", False) and hasattr(experts, "novice_ids"):
        return types.MethodType(_novice_forward, experts)
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        return types.MethodType(_stock_forward, experts)
    raise TypeError(f"{type(experts).__name__} is not a fused experts module (no gate_up_proj/down_proj).")


@contextlib.contextmanager
def export_friendly_moe(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every MoE layer's experts run :func:`canonical_dispatch`; the originals come back on exit.

    The swapped forward is an instance attribute shadowing the class forward; on exit (also after an exception)
    it is deleted, or the instance forward that was there before is put back.
    """
    layers = get_adapter(model).moe_layers(model)  # none in a layer-streamed export's dense-layer piece
    patched: list[tuple[nn.Module, object]] = []
    try:
        for layer in layers:
            experts = layer.experts
            previous = experts.__dict__.get("forward", _MISSING)
            experts.forward = export_forward_for(experts)
            patched.append((experts, previous))
        yield model
    finally:
        for experts, previous in reversed(patched):
            if previous is _MISSING:
                del experts.forward
            else:
                experts.forward = previous


_MISSING = object()
