"""Exact per-expert calibration statistics (docs/method.md#statistics), collected in one pass over the data.

During collection each MoE layer's experts module runs an instrumented forward that computes every
selected expert's raw output f_e(x) once, uses it both for the block output (so the model runs as usual)
and for the statistics. Statistics are float64 and merged across batches with Chan's parallel update,
which is exact up to float64 rounding however the data is batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from mone_export.adapters import (MoeAdapter, MoeLayer, expert_forward, expert_outputs, experts_forwards_swapped,
                                  moe_layers_or_error, weighted_expert_output)
from mone_export.errors import UsageError
from mone_export.fingerprint import experts_dtype, experts_fingerprints
from mone_export.novices import removal_possible, routing_without
from mone_export.progress import progress_bar

__all__ = ["LayerStats", "ExpertStats", "check_unpruned", "collect_stats", "recording_experts"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerStats:
    """Running statistics of one MoE layer's routed experts (float64)."""

    num_experts: int
    hidden_size: int
    top_k: int
    num_tokens: int = 0
    count: np.ndarray = None  # [E] tokens routed to each expert
    routing_sum: np.ndarray = None  # [E] sum of g_e(x) over all tokens
    reap_sum: np.ndarray = None  # [E] sum over R_e of g_e(x) * ||f_e(x)||
    mean: np.ndarray = None  # [E, H] running mean of f_e over R_e
    m2: np.ndarray = None  # [E, H] running sum of squared deviations from the mean
    sq_weight_sum: np.ndarray = None  # [E] Σ over R_e of g_e(x)²
    weighted_mean: np.ndarray = None  # [E, H] the g_e²-weighted mean of f_e over R_e
    weighted_m2: np.ndarray = None  # [E, H] Σ over R_e of g_e(x)² (f_e(x) − weighted_mean_e)²
    measures_removal: bool = False  # whether removal_sq_sum is measured (it costs a routing pass per expert)
    removal_sq_sum: np.ndarray = None  # [E] Σ over all tokens of ‖y(x) without e − y(x)‖² (inf: cannot remove)

    def __post_init__(self):
        e, h = self.num_experts, self.hidden_size
        for name, shape in (("count", (e,)), ("routing_sum", (e,)), ("reap_sum", (e,)), ("mean", (e, h)), ("m2", (e, h)),
                            ("sq_weight_sum", (e,)), ("weighted_mean", (e, h)), ("weighted_m2", (e, h)),
                            ("removal_sq_sum", (e,))):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=np.int64 if name == "count" else np.float64))

    def add_tokens(self, num_tokens: int, routing_sum: np.ndarray) -> None:
        """Account for a batch of tokens reaching the layer and their summed routing weights per expert."""
        self.num_tokens += int(num_tokens)
        self.routing_sum += routing_sum

    def add_expert_outputs(self, expert: int, outputs: np.ndarray, weights: np.ndarray) -> None:
        """Merge f_e(x) for a batch of routed tokens (``outputs [n, H]``, ``weights [n]`` = g_e(x)) into the stats."""
        n = outputs.shape[0]
        if n == 0:
            return
        batch_mean = outputs.mean(axis=0)
        batch_m2 = ((outputs - batch_mean) ** 2).sum(axis=0)
        total = self.count[expert] + n
        delta = batch_mean - self.mean[expert]
        self.mean[expert] += delta * (n / total)
        self.m2[expert] += batch_m2 + delta**2 * (self.count[expert] * n / total)
        self.count[expert] = total
        self.reap_sum[expert] += float(np.dot(weights, np.linalg.norm(outputs, axis=1)))
        self._add_weighted(expert, outputs, weights**2)

    def _add_weighted(self, expert: int, outputs: np.ndarray, sq_weights: np.ndarray) -> None:
        """West's weighted form of Chan's update for the g²-weighted mean and sum of squared deviations."""
        batch_weight = float(sq_weights.sum())
        if batch_weight == 0.0:  # every token of the batch has weight 0: it moves no weighted statistic
            return
        batch_mean = sq_weights @ outputs / batch_weight
        batch_m2 = sq_weights @ (outputs - batch_mean) ** 2
        total = self.sq_weight_sum[expert] + batch_weight
        delta = batch_mean - self.weighted_mean[expert]
        self.weighted_mean[expert] += delta * (batch_weight / total)
        self.weighted_m2[expert] += batch_m2 + delta**2 * (self.sq_weight_sum[expert] * batch_weight / total)
        self.sq_weight_sum[expert] = total

    def merge(self, other: "LayerStats") -> None:
        """Add the statistics ``other`` collected on other tokens (another rank's): Chan et al.'s pairwise update
        of the means and M2, exact up to float64 rounding; counts and sums add."""
        if (other.num_experts, other.hidden_size) != (self.num_experts, self.hidden_size):
            raise ValueError("cannot merge statistics of layers of different shapes")
        if other.measures_removal != self.measures_removal:
            raise ValueError("cannot merge statistics where only one side measured the removal error")
        total = self.count + other.count
        safe = np.maximum(total, 1).astype(np.float64)[:, None]
        delta = other.mean - self.mean
        self.m2 += other.m2 + delta**2 * (self.count.astype(np.float64) * other.count / safe[:, 0])[:, None]
        self.mean += delta * (other.count[:, None] / safe)
        self.count = total
        weight = self.sq_weight_sum + other.sq_weight_sum
        safe_weight = np.where(weight > 0, weight, 1.0)
        delta = other.weighted_mean - self.weighted_mean
        self.weighted_m2 += other.weighted_m2 + delta**2 * (self.sq_weight_sum * other.sq_weight_sum / safe_weight)[:, None]
        self.weighted_mean += delta * (other.sq_weight_sum / safe_weight)[:, None]
        self.sq_weight_sum = weight
        self.num_tokens += other.num_tokens
        self.routing_sum += other.routing_sum
        self.reap_sum += other.reap_sum
        self.removal_sq_sum += other.removal_sq_sum

    @property
    def frequency(self) -> np.ndarray:
        """count_e / N."""
        return self.count / max(self.num_tokens, 1)

    @property
    def routing_score(self) -> np.ndarray:
        """(1/N) Σ_x g_e(x)."""
        return self.routing_sum / max(self.num_tokens, 1)

    @property
    def var(self) -> np.ndarray:
        """[E, H] unbiased variance of f_e over R_e (0 when count_e < 2)."""
        denom = (self.count - 1).astype(np.float64)[:, None]
        return np.where(denom > 0, self.m2 / np.maximum(denom, 1.0), 0.0)

    @property
    def phi_var(self) -> np.ndarray:
        """sqrt(Σ_d var_e[d])."""
        return np.sqrt(self.var.sum(axis=1))

    @property
    def novice_error(self) -> np.ndarray:
        """(1/N) Σ over R_e of g_e(x)² ‖f_e(x) − c_e‖², c_e = ``weighted_mean``: the mean squared change of the layer
        output when expert e alone becomes the novice c_e, the constant that makes that change smallest."""
        return self.weighted_m2.sum(axis=1) / max(self.num_tokens, 1)

    @property
    def removal_error(self) -> np.ndarray | None:
        """(1/N) Σ over all tokens of ‖y_{−e}(x) − y(x)‖², y the routed output and y_{−e} the routed output with expert e
        removed and its tokens re-routed by the router without e's row (measured, not estimated); inf in a layer
        where removal is not possible; None when it was not measured (``collect_stats(..., measure_removal=True)``)."""
        if not self.measures_removal:
            return None
        return self.removal_sq_sum / max(self.num_tokens, 1)

    @property
    def reap(self) -> np.ndarray:
        """Mean over R_e of g_e(x) · ‖f_e(x)‖₂ (0 for an expert no token reached)."""
        return np.where(self.count > 0, self.reap_sum / np.maximum(self.count, 1), 0.0)


@dataclasses.dataclass
class ExpertStats:
    """Calibration statistics of every MoE layer of one model, keyed by decoder-layer index."""

    model_type: str
    num_hidden_layers: int
    layers: dict[int, LayerStats]
    calibration: dict = dataclasses.field(default_factory=dict)
    experts_fingerprints: dict[str, str] | None = None
    """:func:`mone_export.fingerprint.experts_fingerprints` of the model the statistics were collected on."""
    experts_dtype: str | None = None
    """The dtype of that model's expert weights (``float32``, ...)."""

    def merge(self, other: "ExpertStats") -> None:
        """Add the statistics of the same model collected on other calibration tokens (another rank's)."""
        if (other.model_type, sorted(other.layers)) != (self.model_type, sorted(self.layers)):
            raise ValueError("cannot merge statistics of different models")
        if other.experts_fingerprints != self.experts_fingerprints:
            raise ValueError("cannot merge statistics collected on different weights")
        for index, layer in self.layers.items():
            layer.merge(other.layers[index])
        if "tokens" in self.calibration and "tokens" in other.calibration:
            self.calibration["tokens"] += other.calibration["tokens"]

    @property
    def num_tokens(self) -> int:
        """Tokens seen by the first MoE layer (every MoE layer sees all of them)."""
        return next(iter(self.layers.values())).num_tokens if self.layers else 0


Rerouter = Callable[[int], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``rerouted(e)``: the (top_k_index, top_k_weights) of the current tokens, in the original expert ids, when expert e is
removed with its router row; None where removal is not possible."""


def _instrumented_forward(layer_stats: LayerStats, experts: nn.Module, rerouted: Rerouter | None = None):
    """An experts forward that returns the block's routed output and records each expert's f_e (and, given
    ``rerouted``, the change of the routed output when each expert is removed)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        num_experts = layer_stats.num_experts
        weights64 = top_k_weights.detach().to(torch.float64)
        dense = torch.zeros(hidden_states.shape[0], num_experts, dtype=torch.float64)
        dense.scatter_add_(1, top_k_index, weights64)
        layer_stats.add_tokens(hidden_states.shape[0], dense.sum(dim=0).numpy())
        out = torch.zeros_like(hidden_states)
        outputs = _ExpertOutputs(self, hidden_states) if rerouted is not None else None
        for expert in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == expert)
            f_e, update = expert_outputs(self, expert, hidden_states[token], top_k_weights[token, slot, None])
            out.index_add_(0, token, update.to(out.dtype))
            layer_stats.add_expert_outputs(
                expert, f_e.detach().to(torch.float64).numpy(), weights64[token, slot].numpy()
            )
            if outputs is not None:
                outputs.keep(expert, token, f_e)
        if outputs is not None:
            _add_removal_errors(layer_stats, dense, outputs, rerouted)
        return out

    return types.MethodType(forward, experts)


class _ExpertOutputs:
    """f_j(x) of one batch, computed once per (expert, token): the ones the forward computed, and any other one the
    removal measurement asks for (a token re-routed to an expert it had not selected)."""

    def __init__(self, experts: nn.Module, hidden: torch.Tensor):
        self.experts, self.hidden = experts, hidden
        self.scales_input = bool(getattr(experts, "scales_input", False))
        self.row: dict[int, torch.Tensor] = {}  # expert → [T] row of each token in values (−1: not computed)
        self.values: dict[int, torch.Tensor] = {}  # expert → [n, H] float64

    def keep(self, expert: int, token: torch.Tensor, f_e: torch.Tensor) -> None:
        """Record f_e on ``token`` (as computed by the forward)."""
        row = torch.full((self.hidden.shape[0],), -1, dtype=torch.long)
        row[token] = torch.arange(len(token))
        self.row[expert], self.values[expert] = row, f_e.detach().to(torch.float64)

    def raw(self, expert: int, token: torch.Tensor) -> torch.Tensor:
        """f_j(x) [n, H] float64 on ``token``, computing only what was not computed before."""
        row = self.row.setdefault(expert, torch.full((self.hidden.shape[0],), -1, dtype=torch.long))
        values = self.values.get(expert, torch.zeros(0, self.hidden.shape[1], dtype=torch.float64))
        missing = token[row[token] < 0]
        if len(missing):
            computed = expert_forward(self.experts, expert, self.hidden[missing]).detach().to(torch.float64)
            row[missing] = len(values) + torch.arange(len(missing))
            values = self.values[expert] = torch.cat([values, computed])
        return values[row[token]]

    def change(self, expert: int, token: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """What the model adds from ``expert`` on ``token`` with routing weight ``after`` minus what it adds with
        ``before`` ([n] float64, 0 = not selected): (after − before)·f_j, or, for experts that scale their input,
        expert_j(after·x) − expert_j(before·x)."""
        if not self.scales_input:
            return (after - before)[:, None] * self.raw(expert, token)
        result = torch.zeros(len(token), self.hidden.shape[1], dtype=torch.float64)
        for weights, sign in ((after, 1.0), (before, -1.0)):
            on = weights != 0
            if on.any():
                x, g = self.hidden[token[on]], weights[on, None].to(self.hidden.dtype)
                result[on] += sign * weighted_expert_output(self.experts, expert, x, g).detach().to(torch.float64)
        return result


def _add_removal_errors(stats: LayerStats, before: torch.Tensor, outputs: _ExpertOutputs, rerouted: Rerouter) -> None:
    """For each expert e, Σ over the batch of ‖y_{−e}(x) − y(x)‖²: the tokens re-routed without e's router row, and
    the routed output recomputed where their routing changed (``before``: the dense [T, E] routing weights)."""
    for expert in range(stats.num_experts):
        routing = rerouted(expert)
        if routing is None:
            stats.removal_sq_sum[:] = np.inf
            return
        index, weights = routing
        after = torch.zeros_like(before).scatter_add_(1, index, weights.detach().to(torch.float64))
        difference = after - before
        changed = torch.nonzero(difference.abs().sum(dim=1) > 0).squeeze(1)
        if not len(changed):
            continue
        delta = torch.zeros(len(changed), outputs.hidden.shape[1], dtype=torch.float64)
        for other in torch.nonzero((difference[changed] != 0).any(dim=0)).squeeze(1).tolist():
            rows = torch.nonzero(difference[changed, other] != 0).squeeze(1)
            token = changed[rows]
            delta[rows] += outputs.change(other, token, before[token, other], after[token, other])
        stats.removal_sq_sum[expert] += float((delta**2).sum())


def _rerouter(adapter: MoeAdapter, layer: MoeLayer, block_call: dict) -> Rerouter | None:
    """The routing of the block's current input (``block_call``: the args of its running forward) with one expert
    removed, as :func:`~mone_export.novices.routing_without` cuts it; None when the layer cannot lose an expert."""
    if not removal_possible(layer):
        return lambda expert: None

    def rerouted(expert: int):
        with routing_without(layer, [expert]) as kept:
            index, weights = adapter.routing_of(layer, *block_call["args"], **block_call["kwargs"])
        return kept[index], weights

    return rerouted


@contextlib.contextmanager
def recording_experts(model: nn.Module, stats: dict[int, LayerStats], only: Iterable[int] | None = None
                      ) -> Iterator[None]:
    """Swap an instrumented forward into every MoE layer's experts (or those of the decoder layers ``only``);
    always restore the original ones. A layer whose statistics measure the removal error also records its block's
    input (a forward pre-hook), so the block can be routed again without each expert."""
    adapter, layers = moe_layers_or_error(model)
    if only is not None:
        wanted = set(only)
        layers = [layer for layer in layers if layer.index in wanted]
    calls: dict[int, dict] = {layer.index: {} for layer in layers}
    handles = []

    def make_forward(layer: MoeLayer):
        rerouted = None
        if stats[layer.index].measures_removal:
            def remember(module, args, kwargs, call=calls[layer.index]):
                call.update(args=args, kwargs=kwargs)
            handles.append(layer.block.register_forward_pre_hook(remember, with_kwargs=True))
            rerouted = _rerouter(adapter, layer, calls[layer.index])
        return _instrumented_forward(stats[layer.index], layer.experts, rerouted)

    try:
        with experts_forwards_swapped(layers, make_forward):
            yield
    finally:
        for handle in handles:
            handle.remove()


def check_unpruned(layers: list[MoeLayer]) -> None:
    """A clear error when a layer was already pruned: statistics are collected on the original experts."""
    for layer in layers:
        if getattr(layer.experts, "is_pruned", False):
            raise UsageError(
                f"layer {layer.index} is already pruned; collect statistics on the original model "
                "(load it again) and apply the plan afterwards."
            )


def collect_stats(
    model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True, calibration: dict | None = None,
    measure_removal: bool = False,
) -> ExpertStats:
    """Run ``batches`` (LongTensor ``[B, S]`` token ids, no padding) through ``model`` and return exact expert statistics.

    Args:
        model: a transformers causal LM of a supported MoE family, unpruned.
        batches: calibration token batches (see :func:`mone_export.calibration_batches`).
        progress: show a progress bar (on a terminal only).
        calibration: a description of the data, kept in the stats and the plan.
        measure_removal: also measure each expert's removal error (:attr:`LayerStats.removal_error`, which method
            ``auto`` needs): one more routing pass of each MoE block per expert, and the outputs of the experts the
            tokens are re-routed to.
    """
    adapter, layers = moe_layers_or_error(model)
    check_unpruned(layers)
    fingerprints = experts_fingerprints(model)
    dtype = str(experts_dtype(model)).removeprefix("torch.")
    stats = {
        layer.index: LayerStats(layer.num_experts, layer.hidden_size, layer.top_k, measures_removal=measure_removal)
        for layer in layers
    }
    batches = list(batches)
    if not batches:
        raise UsageError("no calibration batches were given; pass at least one [B, S] token batch.")
    device = next(model.parameters()).device
    with recording_experts(model, stats), torch.inference_mode():
        for batch in progress_bar(batches, desc="calibrating", unit="batch", enabled=progress):
            model(input_ids=batch.to(device), use_cache=False)
    tokens = sum(int(b.numel()) for b in batches)
    logger.info("collected expert statistics over %d tokens in %d MoE layers", tokens, len(stats))
    info = dict(calibration or {})
    info.setdefault("tokens", tokens)
    return ExpertStats(adapter.model_type, int(model.config.num_hidden_layers), stats, info, fingerprints, dtype)
