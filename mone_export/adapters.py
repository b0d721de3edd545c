"""Adapters: where a transformers 5.x Mixture-of-Experts model keeps its MoE blocks, as data.

transformers 5 keeps the routed experts of (nearly) every MoE family behind one interface: an experts module whose
class is decorated with ``use_experts_implementation`` (which records the weight layout on it: gated, transposed,
biased, the family's own gate function, a post-expert norm) and which the MoE block calls as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` with exactly the weights the model applies.
Everything the package needs comes from that call: g_e from ``top_k_weights``, f_e from :func:`expert_forward`
(the one place that computes an expert's output, for every layout).

A model type with the interface needs no adapter of its own: :func:`get_adapter` finds, on the model, the decoder
layer child that holds an experts module of the interface and a router (:data:`ROUTER_ATTRS`), and the config key of
the expert count (:data:`NUM_EXPERTS_KEYS`). A registered :class:`MoeAdapter` declares, as data, what a family does
differently (shared experts for the reconstruction checks, group-limited routing); nothing in the package branches
on the model type. The census of which types go end to end is :mod:`mone_export.architectures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mone_export.errors import UnsupportedModelError

__all__ = [
    "MoeAdapter",
    "MoeLayer",
    "ADAPTERS",
    "register_adapter",
    "get_adapter",
    "supported_model_types",
    "experts_classes",
    "expert_forward",
    "weighted_expert_output",
    "expert_outputs",
    "InputScaledExperts",
    "llama4_standard_form",
    "is_experts_class",
    "is_experts_module",
    "intermediate_size",
    "uses_default_gate",
    "experts_forwards_swapped",
    "routing_recorded",
]


@dataclasses.dataclass(frozen=True)
class MoeLayer:
    """One MoE block of a decoder: its index in ``model.model.layers`` and its modules."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        """Routed experts in this layer (after any removal): the routing space, novices included."""
        if getattr(self.experts, "is_pruned", False):
            return int(self.experts.num_experts)
        return int(self.experts.down_proj.shape[0])

    @property
    def top_k(self) -> int:
        """Experts each token selects."""
        top_k = getattr(self.router, "top_k", None)
        if top_k is None:
            config = getattr(self.experts, "config", None) or self.router.config
            top_k = next(getattr(config, key) for key in TOP_K_KEYS if getattr(config, key, None))
        return int(top_k)

    @property
    def hidden_size(self) -> int:
        """Model hidden size H (the experts' output width)."""
        down = self.experts.down_proj
        return int(down.shape[-1] if getattr(self.experts, "is_transposed", False) else down.shape[-2])


@dataclasses.dataclass(frozen=True)
class MoeAdapter:
    """What one architecture family looks like, as data.

    Attributes:
        model_type: HF ``config.model_type``.
        num_experts_key: the config field that holds the routed-expert count (what a removal checkpoint rewrites).
        block_attr: attribute of a decoder layer that holds the MLP / MoE block; empty where the decoder layer
            holds the router and experts itself (gemma4).
        router_attr: attribute of the MoE block that holds the router.
        experts_attr: attribute of the MoE block that holds the fused routed experts.
        shared_expert_attr: attribute of the MoE block holding the always-on shared expert(s), if any.
        shared_gate_attr: attribute of a ``Linear(H, 1)`` whose sigmoid scales the shared expert, if any.
        group_limited: whether routing may restrict top-k to expert groups (``n_group``/``topk_group``).
        standard_form: for a family whose MoE block does not call its experts through the standard interface, a
            function that puts a block into that form in place (same parameters, same outputs); the adapter applies
            it when it finds the block, so everything else sees the standard interface.
        router_logits_at: which of the router's outputs holds the logits its top-k ranks (transformers 5's routers
            return ``(logits, top_k_weights, top_k_index)``; Llama 4's ``(scores, logits)``).
    """

    model_type: str
    num_experts_key: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attr: str | None = None
    shared_gate_attr: str | None = None
    group_limited: bool = False
    standard_form: Callable[[nn.Module], None] | None = None
    router_logits_at: int = 0

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers`` of a causal LM (or ``model.layers`` of a bare decoder)."""
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no decoder layers at .model.layers; load it with "
                "AutoModelForCausalLM (mone_export.load_model does)."
            )
        return layers

    def block_path(self, index: int) -> str:
        """The module path of layer ``index``'s MoE block in a causal LM (``model.layers.{i}.{block_attr}``), the
        prefix of the export's names for that block."""
        return f"model.layers.{index}" + (f".{self.block_attr}" if self.block_attr else "")

    def is_moe_block(self, block: nn.Module) -> bool:
        """Whether a decoder layer's MLP is a routed MoE block (dense layers are not)."""
        experts = getattr(block, self.experts_attr, None)
        return hasattr(block, self.router_attr) and experts is not None and is_experts_module(experts)

    def moe_layers(self, model: nn.Module) -> list[MoeLayer]:
        """The MoE blocks of ``model`` in layer order (dense layers skipped)."""
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr, None) if self.block_attr else layer
            if block is not None and self.standard_form is not None and hasattr(block, self.router_attr):
                self.standard_form(block)
            if block is not None and self.is_moe_block(block):
                found.append(
                    MoeLayer(index, block, getattr(block, self.router_attr), getattr(block, self.experts_attr))
                )
        return found

    def route(self, layer: MoeLayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index [T, k], top_k_weights [T, k]) exactly as the block passes them to its experts, for the
        tokens ``hidden [T, H]`` entering the block (the block runs with its experts replaced by a recorder)."""
        return self.routing_of(layer, hidden.reshape(1, -1, layer.hidden_size))

    def routing_of(self, layer: MoeLayer, *block_args, **block_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index, top_k_weights) as the block passes them to its experts when called with ``block_args`` and
        ``block_kwargs``: the block runs with its experts replaced by a recorder and without its shared expert (whose
        output the routing does not read), so only the routing is computed."""
        seen = {}

        def record(_layer):
            def forward(states, top_k_index, top_k_weights):
                seen.update(index=top_k_index, weights=top_k_weights)
                return torch.zeros_like(states)
            return forward

        shared = getattr(layer.block, self.shared_expert_attr) if self.shared_expert_attr else None
        try:
            if shared is not None:
                setattr(layer.block, self.shared_expert_attr, _ZeroOutput())
            with experts_forwards_swapped([layer], record):
                layer.block(*block_args, **block_kwargs)
        finally:
            if shared is not None:
                setattr(layer.block, self.shared_expert_attr, shared)
        return seen["index"], seen["weights"]

    def shared_output(self, layer: MoeLayer, hidden: torch.Tensor) -> torch.Tensor | None:
        """The shared-expert part of the block output for ``hidden [T, H]``, or None without shared experts."""
        if self.shared_expert_attr is None:
            return None
        out = getattr(layer.block, self.shared_expert_attr)(hidden)
        if self.shared_gate_attr is not None:
            out = torch.sigmoid(getattr(layer.block, self.shared_gate_attr)(hidden)) * out
        return out

    def set_num_experts(self, config, num_experts: int) -> None:
        """Write a routed-expert count into a config (removal checkpoints)."""
        setattr(config, self.num_experts_key, int(num_experts))


class _ZeroOutput(nn.Module):
    """Stands in for a shared expert while only the routing is wanted: zeros shaped like its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def expert_forward(experts: nn.Module, slot: int, hidden: torch.Tensor, weight: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """f_e: the raw output of the expert stored at ``slot`` on ``hidden [n, H]``, before its routing weight.

    The one place the package computes an expert's output (statistics, novices, the exported graph). It follows
    the layout that transformers' ``use_experts_implementation`` records on the experts module and computes what
    transformers' own experts implementations compute:

    - gated experts (``has_gate``, the default) project with ``gate_up_proj`` and combine gate and up with the
      class's ``_apply_gate`` (transformers' default: SiLU-style ``act_fn(gate) * up`` on concatenated halves,
      split here at the static intermediate size so that it exports as one ``Split``; a family's own gate, such as
      gpt-oss's clamped SwiGLU on interleaved rows, is called as is); ungated experts use ``up_proj`` and ``act_fn``;
    - ``is_transposed`` weights are ``[E, in, out]`` (``x @ W``), otherwise ``[E, out, in]`` (``F.linear``);
    - ``has_bias`` adds ``{gate_up,up,down}_proj_bias[slot]``; ``has_post_expert_norm`` applies
      ``post_expert_norm`` to the output;
    - experts that take the routing weight on their input (``scales_input``: Llama 4 adds ``expert_e(g·x)``) have
      f_e(x) = expert_e(g·x) / g, so that g·f_e is what the model adds and the statistics keep their meaning (the
      novice, E[f_e] weighted by g², reproduces g·f_e best in the mean); ``weight [n, 1]``, the tokens' g, is
      needed.
    """
    if getattr(experts, "scales_input", False):
        if weight is None:
            raise ValueError(f"{type(experts).__name__} scales its input by the routing weight: pass weight.")
        return expert_outputs(experts, slot, hidden, weight)[0]
    return _expert_mlp(experts, slot, hidden)


def weighted_expert_output(experts: nn.Module, slot: int, hidden: torch.Tensor, weight: torch.Tensor
                           ) -> torch.Tensor:
    """g·f_e(x): what the model adds for the tokens ``hidden [n, H]`` routed to the expert at ``slot`` with routing
    weights ``weight [n, 1]`` (computed as the model does: ``f_e · g``, or ``expert_e(g·x)`` for experts that scale
    their input)."""
    if getattr(experts, "scales_input", False):
        return _expert_mlp(experts, slot, hidden * weight.to(hidden.dtype))
    return expert_forward(experts, slot, hidden) * weight


def expert_outputs(experts: nn.Module, slot: int, hidden: torch.Tensor, weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_e(x), g·f_e(x))`` for the tokens ``hidden [n, H]`` with routing weights ``weight [n, 1]``, the expert run
    once: :func:`expert_forward` and :func:`weighted_expert_output` together (the statistics need both)."""
    if getattr(experts, "scales_input", False):
        g = weight.to(hidden.dtype)
        weighted = _expert_mlp(experts, slot, hidden * g)
        return weighted / g.clamp_min(torch.finfo(g.dtype).tiny), weighted
    f_e = _expert_mlp(experts, slot, hidden)
    return f_e, f_e * weight


def _expert_mlp(experts: nn.Module, slot: int, hidden: torch.Tensor) -> torch.Tensor:
    gated = getattr(experts, "has_gate", True)
    projected = _expert_linear(experts, "gate_up_proj" if gated else "up_proj", slot, hidden)
    activated = _expert_gate(experts, projected) if gated else experts.act_fn(projected)
    out = _expert_linear(experts, "down_proj", slot, activated)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def _expert_linear(experts: nn.Module, name: str, slot: int, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(experts, name)[slot]
    out = x @ weight if getattr(experts, "is_transposed", False) else F.linear(x, weight)
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    return out if bias is None else out + bias[slot]


def uses_default_gate(experts: nn.Module) -> bool:
    """Whether the experts combine gate and up as transformers' default does (``act_fn(gate) * up`` on the
    concatenated halves of ``gate_up_proj``'s output) rather than with a family's own ``_apply_gate``."""
    apply_gate = getattr(experts, "_apply_gate", None)
    function = getattr(apply_gate, "__func__", apply_gate)  # a bound method's function
    return function is None or getattr(function, "__name__", "") == "_default_apply_gate"


def intermediate_size(experts: nn.Module) -> int:
    """I, the width of one expert's hidden layer, from ``down_proj``'s static shape."""
    transposed = getattr(experts, "is_transposed", False)
    return int(experts.down_proj.shape[-2] if transposed else experts.down_proj.shape[-1])


def _expert_gate(experts: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    if not uses_default_gate(experts):
        return experts._apply_gate(projected)
    inter = intermediate_size(experts)
    gate, up = projected.split([inter, inter], dim=-1)
    return experts.act_fn(gate) * up


@contextlib.contextmanager
def routing_recorded(model: nn.Module, record: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every MoE layer's routing calls ``record(layer index, router logits [.., E], top_k_index
    [T, k])`` as the model runs: the logits from the router's output (:attr:`MoeAdapter.router_logits_at`), the
    choice as the block passes it to its experts. Hooks only: nothing is swapped; they are removed on exit."""
    adapter, layers = moe_layers_or_error(model)
    handles = []
    try:
        for layer in layers:
            last: dict[str, torch.Tensor] = {}

            def router_hook(module, args, output, last=last):
                last["logits"] = output[adapter.router_logits_at]

            def experts_hook(module, args, kwargs, index=layer.index, last=last):
                top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                record(index, last.pop("logits"), top_k_index)

            handles.append(layer.router.register_forward_hook(router_hook))
            handles.append(layer.experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


_NO_INSTANCE_FORWARD = object()


@contextlib.contextmanager
def experts_forwards_swapped(layers: Iterable[MoeLayer], make_forward: Callable[[MoeLayer], Callable]
                             ) -> Iterator[None]:
    """Within the block, each layer's experts module runs ``make_forward(layer)`` instead of its own forward; what
    was there before comes back on exit, also after an exception.

    The one mechanism the package uses to swap an experts forward (the statistics' recording forward, the export's
    dispatch forms). The new forward is an instance attribute that shadows the class's forward, so the swap is per
    module and carries per-layer state. transformers' ``ExpertsInterface`` cannot carry this job: its dispatch reads
    ``config._experts_implementation`` on every call, one choice for every experts module sharing that config, and
    an implementation gets no per-layer state (which layer's statistics to fill, which experts are novices).
    """
    patched: list[tuple[nn.Module, object]] = []
    try:
        for layer in layers:
            experts, forward = layer.experts, make_forward(layer)  # may refuse: nothing of this layer swapped yet
            patched.append((experts, experts.__dict__.get("forward", _NO_INSTANCE_FORWARD)))
            experts.forward = forward
        yield
    finally:
        for experts, previous in reversed(patched):
            if previous is _NO_INSTANCE_FORWARD:
                del experts.forward
            else:
                experts.forward = previous


class InputScaledExperts(nn.Module):
    """Experts that take their routing weight on the input, adding ``expert_e(g·x)`` (Llama 4), behind the standard
    call ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    It holds the source module's parameters (no copy) under the same names, in Llama 4's layout: gated, gate and up
    concatenated, transposed ``[E, in, out]``, no biases. Its layout flags are instance attributes, as
    ``use_experts_implementation`` sets them, so a pruned copy keeps them (f_e: :func:`expert_forward`). The
    forward is eager (transformers' fused kernels would apply the weight to the output).
    """

    implements_experts_interface = True

    def __init__(self, source: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = source.gate_up_proj, source.down_proj, source.act_fn
        self.num_experts = int(source.gate_up_proj.shape[0])
        self.has_gate, self.is_concatenated, self.is_transposed = True, True, True
        self.has_bias, self.has_post_expert_norm, self.scales_input = False, False, True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Σ over each token's selected experts of ``expert_e(g·x)``."""
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == expert)
            update = weighted_expert_output(self, expert, hidden_states[token], top_k_weights[token, slot, None])
            out.index_add_(0, token, update.to(out.dtype))
        return out


def llama4_standard_form(block: nn.Module) -> None:
    """Llama 4's MoE block (``Llama4TextMoe``) in the standard form, in place: the router's top-k over its logits
    with sigmoid weights, as ``Llama4Router`` computes them, become ``top_k_index`` / ``top_k_weights``, and the
    experts (which the model runs densely on ``g·x`` for every expert, 0 where unselected: an expert of 0 is 0)
    become :class:`InputScaledExperts`. The block returns ``(shared + routed, router_logits)`` as before."""
    if not is_experts_module(block.experts):
        block.experts = InputScaledExperts(block.experts)
        block.forward = types.MethodType(_llama4_moe_forward, block)


def _llama4_moe_forward(self, hidden_states):
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, router_logits = self.router(flat)
    top_values, top_k_index = torch.topk(router_logits, self.router.top_k, dim=1)
    top_k_weights = torch.sigmoid(top_values.float()).to(router_logits.dtype)
    out = self.shared_expert(flat) + self.experts(flat, top_k_index, top_k_weights)
    return out, router_logits


ADAPTERS: dict[str, MoeAdapter] = {}


def register_adapter(adapter: MoeAdapter) -> MoeAdapter:
    """Register an adapter under its ``model_type`` (last registration wins)."""
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """Model types with a registered adapter (their quirks declared as data), sorted. Other types whose modeling
    code uses transformers' experts interface get the generic adapter (:func:`get_adapter`)."""
    return sorted(ADAPTERS)


NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
"""Config fields that hold the routed-expert count, in the order they are looked up (the first one present wins)."""

TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "num_experts_per_token")
"""Config fields that hold the number of experts a token selects, looked up in this order where the router does not
say (``router.top_k``)."""

ROUTER_ATTRS = ("gate", "router")
"""Attributes of an MoE block that hold its router in transformers 5 (every modeling file uses one of these)."""


def is_experts_class(cls) -> bool:
    """Whether ``cls`` is an experts class of transformers' standard interface: decorated with
    ``use_experts_implementation``, which wraps its ``forward`` and gives it an ``_apply_gate``."""
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "_apply_gate")
            and getattr(cls.forward, "__wrapped__", None) is not None)


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` computes a layer's routed experts through the standard interface (or is one pruned by
    this package, which keeps that call signature)."""
    return (is_experts_class(type(module)) or getattr(module, "is_pruned", False)
            or getattr(module, "implements_experts_interface", False))


@functools.lru_cache(maxsize=None)
def experts_classes(model_type: str) -> tuple[type, ...]:
    """The experts classes of the standard interface in ``model_type``'s modeling module (empty if it has none or
    transformers has no causal-LM class for it)."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return ()
    name = model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name.split('.')[-1]}")
    except ImportError:
        return ()
    return tuple(cls for cls in vars(module).values() if is_experts_class(cls) and cls.__module__ == module.__name__)


def _generic_adapter(config, model: nn.Module | None) -> MoeAdapter | None:
    """An adapter for a model type without a registered one, when its modeling code uses the experts interface:
    the config key of the expert count from :data:`NUM_EXPERTS_KEYS`, and, given a model, the attribute names of
    its MoE block, router and experts found on its first MoE decoder layer."""
    model_type = getattr(config, "model_type", None)
    if not model_type or not experts_classes(model_type):
        return None
    key = next((k for k in NUM_EXPERTS_KEYS if getattr(config, k, None)), NUM_EXPERTS_KEYS[0])
    adapter = MoeAdapter(model_type, num_experts_key=key)
    if model is None:
        return adapter
    for layer in adapter.decoder_layers(model):
        for block_attr, block in [("", layer), *layer.named_children()]:
            experts_attr = next((name for name, child in block.named_children() if is_experts_module(child)), None)
            router_attr = next((name for name in ROUTER_ATTRS if isinstance(getattr(block, name, None), nn.Module)),
                               None)
            if experts_attr and router_attr:
                return dataclasses.replace(adapter, block_attr=block_attr, router_attr=router_attr,
                                           experts_attr=experts_attr)
    return adapter


def get_adapter(model_or_config) -> MoeAdapter:
    """The adapter for a model or config: the registered one for its type, else the generic one for any type whose
    modeling code uses transformers' experts interface; a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        model = model_or_config if isinstance(model_or_config, nn.Module) else None
        adapter = _generic_adapter(config, model)
    if adapter is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a Mixture-of-Experts architecture with transformers' experts "
            f"interface (use_experts_implementation); models with one are supported, e.g. "
            f"{', '.join(supported_model_types())}."
        )
    return adapter


def moe_layers_or_error(model: nn.Module) -> tuple[MoeAdapter, list[MoeLayer]]:
    """Adapter and MoE layers of ``model``; an error when the model has no routed MoE layer."""
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"this {adapter.model_type} model has no routed MoE layer (num_experts is 0 or every layer is dense); "
            "nothing to prune."
        )
    return adapter, layers


register_adapter(MoeAdapter("mixtral", num_experts_key="num_local_experts"))
register_adapter(MoeAdapter("qwen3_moe", num_experts_key="num_experts"))
register_adapter(MoeAdapter("olmoe", num_experts_key="num_experts"))
register_adapter(
    MoeAdapter(
        "qwen2_moe",
        num_experts_key="num_experts",
        shared_expert_attr="shared_expert",
        shared_gate_attr="shared_expert_gate",
    )
)
register_adapter(
    MoeAdapter("deepseek_v2", num_experts_key="n_routed_experts", shared_expert_attr="shared_experts", group_limited=True)
)
register_adapter(MoeAdapter("llama4_text", num_experts_key="num_local_experts", block_attr="feed_forward",
                            router_attr="router", shared_expert_attr="shared_expert",
                            standard_form=llama4_standard_form, router_logits_at=1))
