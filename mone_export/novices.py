"""Applying a pruning plan to a PyTorch model, in place: novices or removal (docs/method.md#applying-a-plan)."""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator

import torch
from torch import nn

from mone_export.adapters import (MoeAdapter, MoeLayer, moe_layers_or_error, uses_default_gate,
                                  weighted_expert_output)
from mone_export.errors import UsageError
from mone_export.plan import PruningPlan

__all__ = ["NoviceExperts", "apply_plan", "dense_routing_weights", "expert_count", "expert_parameter_names",
           "layer_pruned", "removal_possible", "routing_without"]

logger = logging.getLogger(__name__)


def dense_routing_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` routing weights g_e(x): the applied top-k weights scattered into zeros."""
    dense = torch.zeros(top_k_index.shape[0], num_experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    return dense.scatter(1, top_k_index, top_k_weights)


class NoviceExperts(nn.Module):
    """Routed experts of one layer after MoNE pruning: real experts keep their weights, novices are constants.

    The router is unchanged and still selects novices; a token routed to novice ``e`` with weight g_e(x)
    receives ``g_e(x) * novice_means[row(e)]``. Only the real experts' weights are stored (every per-expert tensor
    of the experts module, e.g. ``gate_up_proj [E_real, 2I, H]``, ``down_proj [E_real, H, I]`` and any biases, under
    the same names), so a pruned expert's weights are freed; the layout (transposed weights, the family's own gate,
    a post-expert norm) is the experts module's.
    Called like the transformers experts module: ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
    ``means_dtype`` is the dtype of the novice means (default: the experts' weights' dtype).
    """

    is_pruned = True

    def __init__(self, experts: nn.Module, novice_ids: list[int], novice_means: torch.Tensor,
                 means_dtype: torch.dtype | None = None):
        super().__init__()
        num_experts = expert_count(experts)
        novice_set = set(novice_ids)
        self.num_experts = num_experts
        self.real_ids = [e for e in range(num_experts) if e not in novice_set]
        self.novice_ids = sorted(novice_ids)
        real = torch.tensor(self.real_ids, dtype=torch.long)
        for name in expert_parameter_names(experts):
            weights = getattr(experts, name).detach()[real].clone()
            setattr(self, name, nn.Parameter(weights, requires_grad=False))
        _copy_layout(experts, self)
        # The means in the model's compute dtype, even when the weights are still in a narrower storage dtype (a
        # layer-streamed layer is pruned before it is widened): they come from float64 statistics, not the weights.
        dtype = means_dtype or experts.down_proj.dtype
        self.register_buffer("novice_means", novice_means.detach().to(dtype).clone().reshape(len(novice_ids), -1))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Σ over real experts of g_e f_e (as transformers' eager loop) plus the novices' constant outputs."""
        out = torch.zeros_like(hidden_states)
        hit = set(torch.unique(top_k_index).tolist())
        for slot, expert in enumerate(self.real_ids):
            if expert not in hit:
                continue
            token, pos = torch.where(top_k_index == expert)
            update = weighted_expert_output(self, slot, hidden_states[token], top_k_weights[token, pos, None])
            out.index_add_(0, token, update.to(out.dtype))
        if self.novice_ids:
            dense = dense_routing_weights(top_k_index, top_k_weights, self.num_experts)
            out = out + (dense[:, self.novice_ids] @ self.novice_means.to(dense.dtype)).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, real={len(self.real_ids)}, novices={self.novice_ids}"


def expert_count(experts: nn.Module) -> int:
    """E, the experts a fused experts module stores (``down_proj``'s leading dimension)."""
    return int(experts.down_proj.shape[0])


def expert_parameter_names(experts: nn.Module) -> list[str]:
    """The experts module's per-expert tensors (leading dimension E: ``gate_up_proj`` or ``up_proj``, ``down_proj``,
    their biases), in registration order; anything else it holds has no expert dimension to cut."""
    count = expert_count(experts)
    return [name for name, tensor in experts.named_parameters(recurse=False) if tensor.dim() and tensor.shape[0] == count]


_LAYOUT_VALUES = (bool, int, float, str)


def _copy_layout(experts: nn.Module, pruned: nn.Module) -> None:
    """Give the pruned module what :func:`~mone_export.adapters.expert_forward` reads besides the weights: the
    submodules (``act_fn``, ``post_expert_norm``), the layout flags and scalars the experts class keeps (``has_gate``,
    ``is_transposed``, gpt-oss's ``alpha`` / ``limit``, ...) and the class's own gate function."""
    for name, child in experts.named_children():
        setattr(pruned, name, child)
    for name, value in vars(experts).items():
        if name.startswith("_") or name in ("training", "num_experts"):
            continue
        if isinstance(value, _LAYOUT_VALUES) or (callable(value) and not isinstance(value, nn.Module)):
            setattr(pruned, name, value)  # a flag, a scalar, or an activation kept as a plain function
    if not uses_default_gate(experts):
        pruned._apply_gate = types.MethodType(type(experts)._apply_gate, pruned)


def _apply_novices(layer: MoeLayer, adapter: MoeAdapter, pruned: list[int], vectors: torch.Tensor,
                   means_dtype: torch.dtype | None = None) -> None:
    setattr(layer.block, adapter.experts_attr, NoviceExperts(layer.experts, pruned, vectors, means_dtype))


COUNT_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")
"""Attributes in which routers and experts modules keep their expert count (updated when experts are removed)."""

GROUP_ATTRS = ("n_group", "num_group")
"""Attributes in which group-limited routers keep their group count."""


def _router_groups(router: nn.Module) -> int:
    """The expert groups of a group-limited router (1 when routing is not group-limited)."""
    if getattr(router, "topk_method", "group_limited") not in ("group_limited", "group_limited_greedy", "noaux_tc"):
        return 1  # e.g. DeepSeek-V2's plain greedy top-k ignores its groups
    return int(next((getattr(router, a) for a in GROUP_ATTRS if getattr(router, a, None)), 1))


def _check_group_removal(layer: MoeLayer, pruned: list[int]) -> None:
    """Group-limited routing keeps groups contiguous and equal-sized only if each group loses as many experts."""
    groups = _router_groups(layer.router)
    if groups <= 1:
        return
    size = layer.num_experts // groups
    lost = [sum(1 for e in pruned if e // size == g) for g in range(groups)]
    if len(set(lost)) != 1:
        raise UsageError(
            f"layer {layer.index} uses group-limited routing ({groups} groups) and removal would take {lost} experts "
            "from its groups; removal needs equal losses per group. Use --method ne, mone, mone-zero or auto (router kept)."
        )


def _router_rows(layer: MoeLayer) -> list[str]:
    """The router's per-expert tensors (leading dimension E: its ``[E, H]`` weight, a bias, DeepSeek-V3's
    ``e_score_correction_bias``); a clear error when it has no ``[E, H]`` weight to cut."""
    router, count = layer.router, layer.num_experts
    tensors = [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]
    rows = [name for name, tensor in tensors if tensor.dim() and tensor.shape[0] == count]
    weight = getattr(router, "weight", None)
    uncut = [name for name, tensor in router.named_parameters() if "." in name and count in tensor.shape]
    uncut += [name for name, tensor in router.named_buffers() if "." in name and count in tensor.shape]
    if uncut:  # per-expert tensors inside the router's own submodules (ERNIE-4.5's moe_statics): not cut generically
        raise UsageError(
            f"the router of layer {layer.index} ({type(router).__name__}) keeps per-expert tensors removal does not "
            f"know how to cut ({', '.join(sorted(uncut)[:3])}); removal methods cannot prune this model. Use "
            "--method ne, mone, mone-zero or auto: they keep the router (auto then makes novices only)."
        )
    if "weight" not in rows or weight.dim() != 2:
        raise UsageError(
            f"the router of layer {layer.index} ({type(router).__name__}) has no [experts, hidden] weight that removal "
            "could cut; removal methods (frequency, routing-score, reap, random) cannot prune this model. Use "
            "--method ne, mone, mone-zero or auto: they keep the router (auto then makes novices only)."
        )
    return rows


def _block_rows(layer: MoeLayer) -> list[str]:
    """Per-expert vectors the MoE block keeps itself and hands to its router (MiniMax-M2's and HY-V3's
    ``e_score_correction_bias``): the block's own 1-D tensors of length E."""
    tensors = [*layer.block.named_parameters(recurse=False), *layer.block.named_buffers(recurse=False)]
    return [name for name, tensor in tensors if tensor.dim() == 1 and tensor.shape[0] == layer.num_experts]


def _cut_rows(module: nn.Module, names: list[str], kept: torch.Tensor) -> None:
    for name in names:
        cut = getattr(module, name).detach()[kept].clone()
        if name in module._buffers:
            module._buffers[name] = cut
        else:
            setattr(module, name, nn.Parameter(cut, requires_grad=False))


def _cut_routing(layer: MoeLayer, removed: list[int]) -> torch.Tensor:
    """Delete the router rows of ``removed`` (and the per-expert vectors the block keeps) and lower the expert counts
    of router and experts, as removal does; the experts' weights are not touched. Returns the kept ids."""
    _check_group_removal(layer, removed)
    rows, block_rows = _router_rows(layer), _block_rows(layer)
    kept = torch.tensor([e for e in range(layer.num_experts) if e not in set(removed)], dtype=torch.long)
    _cut_rows(layer.router, rows, kept)
    _cut_rows(layer.block, block_rows, kept)
    for module in (layer.router, layer.experts):
        for attr in COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, len(kept))
    return kept


def _remove_experts(layer: MoeLayer, pruned: list[int]) -> list[int]:
    """Delete the experts ``pruned`` with their router rows; returns the ids of the experts that remain, in order."""
    experts = layer.experts
    kept = _cut_routing(layer, pruned)
    for name in expert_parameter_names(experts):
        setattr(experts, name, nn.Parameter(getattr(experts, name).detach()[kept].clone(), requires_grad=False))
    return kept.tolist()


def removal_possible(layer: MoeLayer) -> bool:
    """Whether one expert of ``layer`` can be removed with its router row (not under group-limited routing, nor with
    a router whose per-expert tensors removal cannot cut)."""
    try:
        _check_group_removal(layer, [0])
        _router_rows(layer)
    except UsageError:
        return False
    return True


@contextlib.contextmanager
def routing_without(layer: MoeLayer, removed: list[int]) -> Iterator[torch.Tensor]:
    """Within the block, ``layer`` routes as it would with the experts ``removed`` deleted (router rows cut as
    :func:`apply_plan` cuts them for a removal); the experts' weights are untouched. Yields the kept ids (the new
    router's output ``j`` is expert ``kept[j]``); the router, block and expert counts come back on exit."""
    modules = (layer.router, layer.block, layer.experts)
    saved = [(module, dict(module._parameters), dict(module._buffers),
              {attr: module.__dict__[attr] for attr in COUNT_ATTRS if attr in module.__dict__}) for module in modules]
    try:
        yield _cut_routing(layer, removed)
    finally:
        for module, parameters, buffers, counts in saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            module.__dict__.update(counts)


def _prune_layer(layer: MoeLayer, adapter: MoeAdapter, plan: PruningPlan,
                 means_dtype: torch.dtype | None = None) -> None:
    """Prune one layer as ``plan`` says: remove (experts and router rows), make novices, or, for a mixed plan, remove
    its removed experts first and make the others novices at their slots among the experts that remain."""
    if plan.replacement == "remove":
        _remove_experts(layer, plan.pruned[layer.index])
        return
    removed = plan.removed.get(layer.index, [])
    novices = plan.novice_ids(layer.index)
    if removed:
        remaining = _remove_experts(layer, removed)
        novices = [remaining.index(e) for e in novices]
    if novices:
        _apply_novices(layer, adapter, novices, plan.novices[layer.index], means_dtype)


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` in place as ``plan`` says and return it; ``model.generate()`` keeps working.

    Novice plans replace each layer's experts module by :class:`NoviceExperts` (router unchanged); removal plans
    delete the pruned experts and their router rows, so top-k runs over the remaining experts; mixed plans (method
    ``auto``) do both in a layer: removal of the removed experts first, then novices among the rest. A removal that
    leaves every MoE layer with the same expert count also updates the config, so the model saves as a
    standard checkpoint with fewer experts.
    """
    # Shapes only: whether the weights are the plan's is checked where a plan is read for a model
    # (PruningPlan.load(..., model=)), and a pruned folder applies its plan before its weights are loaded.
    plan.validate_for(model, check_weights=False)
    adapter, layers = moe_layers_or_error(model)
    for layer in layers:
        if plan.pruned.get(layer.index):
            _prune_layer(layer, adapter, plan)
    if plan.replacement == "remove":
        counts = {layer.num_experts for layer in adapter.moe_layers(model)}
        if len(counts) == 1:
            adapter.set_num_experts(model.config, counts.pop())
    if plan.num_pruned:
        model.config.mone_pruning = plan.summary()
    logger.info("applied plan: %s %s", plan.method, plan.summary()["pruned_per_layer"])
    return model


@contextlib.contextmanager
def layer_pruned(adapter: MoeAdapter, layer: MoeLayer, plan: PruningPlan | None, *,
                 means_dtype: torch.dtype | None = None, release_original: bool = False) -> Iterator[MoeLayer]:
    """Within the block, one loaded MoE layer is pruned as ``plan`` says; what it was comes back on exit.

    The layer-streamed export and validation prune one decoder layer at a time (the others are not in memory):
    this is :func:`apply_plan` for one layer. It yields the layer as pruned (its experts module is a
    :class:`NoviceExperts` for a novice plan). The plan must already have been checked against the model
    (:meth:`PruningPlan.validate_for`).

    Args:
        means_dtype: dtype of the novice means (default: the weights'); the compute dtype when the layer is pruned
            while its weights are still in a narrower storage dtype.
        release_original: free the pruned experts' weights while the block runs, and put the original modules
            back on the ``meta`` device on exit (for a layer-streamed layer that is released after the block: only
            the pruned layer's weights are then in memory). Otherwise the original tensors come back on exit, so
            the layer can be used unpruned again.
    """
    pruned = [] if plan is None else plan.pruned.get(layer.index, [])
    if not pruned:
        yield layer
        return
    block, router, experts = layer.block, layer.router, layer.experts
    saved_router = dict(router.__dict__)
    saved_experts = dict(experts.__dict__)
    saved_params = {module: dict(module._parameters) for module in (router, experts, block)}
    saved_buffers = {module: dict(module._buffers) for module in (router, experts, block)}
    try:
        _prune_layer(layer, adapter, plan, means_dtype)
        experts_now = getattr(block, adapter.experts_attr)
        if release_original:
            saved_params = {module: {name: _on_meta(p) for name, p in params.items()}
                            for module, params in saved_params.items()}
            if experts_now is not experts:  # replaced, not cut: the original module's weights are unused now
                experts.to("meta")
        yield MoeLayer(layer.index, block, router, experts_now)
    finally:
        setattr(block, adapter.experts_attr, experts)
        for module, saved in ((router, saved_router), (experts, saved_experts)):
            module.__dict__.clear()
            module.__dict__.update(saved)
        for module, params in saved_params.items():
            module._parameters.clear()
            module._parameters.update(params)
        for module, buffers in saved_buffers.items():
            module._buffers.clear()
            module._buffers.update(buffers)


def _on_meta(parameter: nn.Parameter | None) -> nn.Parameter | None:
    if parameter is None:
        return None
    return nn.Parameter(parameter.detach().to("meta"), requires_grad=parameter.requires_grad)
