"""Expert scores and the selection of pruned experts (docs/method.md#scores): low score = redundant = pruned first."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

from mone_export.errors import UsageError
from mone_export.plan import PruningPlan
from mone_export.stats import ExpertStats, LayerStats

__all__ = ["Method", "METHODS", "SCOPES", "DEFAULT_METHOD", "method_or_error", "scope_or_error", "check_ratio_feasible", "layer_scores", "select_pruned", "plan_pruning"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A pruning method: how experts are scored and what replaces a pruned one.

    ``replacement`` is ``"novice"`` (a constant output, router kept), ``"zero"`` (dropped, router kept)
    or ``"remove"`` (expert and its router row deleted). ``novice_of`` gives a layer's ``[E, H]`` novice
    constants (the plain mean of each expert's output for MoNE). ``removes``, where given, says per expert whether a
    pruned expert is removed (router row cut, tokens re-routed) rather than made a novice: it needs the measured
    removal error (``collect_stats(..., measure_removal=True)``).
    """

    name: str
    score: Callable[[LayerStats, np.random.Generator], np.ndarray]
    replacement: str
    novice_of: Callable[[LayerStats], np.ndarray] = lambda stats: stats.mean
    removes: Callable[[LayerStats], np.ndarray] | None = None

    @property
    def measures_removal(self) -> bool:
        """Whether the method needs each expert's measured removal error."""
        return self.removes is not None

    @property
    def keeps_router(self) -> bool:
        """Whether tokens still route to pruned experts (novice methods)."""
        return self.replacement != "remove"


def _mone_score(stats: LayerStats, rng) -> np.ndarray:
    return stats.routing_score * stats.phi_var


def _removal_error(stats: LayerStats) -> np.ndarray:
    if stats.removal_error is None:
        raise UsageError("method auto needs each expert's measured removal error: collect the statistics with "
                         "collect_stats(..., measure_removal=True) (the CLI does this for --method auto).")
    return stats.removal_error


def _auto_score(stats: LayerStats, rng) -> np.ndarray:
    return np.minimum(stats.novice_error, _removal_error(stats))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mone", _mone_score, "novice"),
        Method("mone-zero", _mone_score, "zero"),
        # Novice error: the layer-output error each novice causes, with the constant that minimises it.
        Method("ne", lambda s, rng: s.novice_error, "novice", novice_of=lambda stats: stats.weighted_mean),
        # Per expert the cheaper of a novice (its novice error) and removal (its measured removal error).
        Method("auto", _auto_score, "novice", novice_of=lambda stats: stats.weighted_mean,
               removes=lambda stats: _removal_error(stats) < stats.novice_error),
        Method("frequency", lambda s, rng: s.frequency, "remove"),
        Method("routing-score", lambda s, rng: s.routing_score, "remove"),
        Method("reap", lambda s, rng: s.reap, "remove"),
        Method("random", lambda s, rng: rng.random(s.num_experts), "remove"),
    )
}

SCOPES = ("layer", "global")

DEFAULT_METHOD = "ne"
"""The method used when none is named. ``ne`` replaced ``mone`` as the default after the fidelity benchmark
(README, Measured): on larger trained models that the choice never saw it beat MoNE head to head in 11 of 16 cells,
with the better mean rank and a smaller perplexity increase in both families (both beat every removal baseline in 14
of 16)."""


def method_or_error(name: str) -> Method:
    """The method called ``name``; an error listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}.") from None


def scope_or_error(scope: str) -> str:
    """``scope`` when it is a known selection scope; an error listing them otherwise."""
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}.")
    return scope


def layer_scores(stats: ExpertStats, method: Method, seed: int = 0) -> dict[int, np.ndarray]:
    """Per-layer float64 scores; ``random`` draws from ``numpy.random.default_rng(seed)`` layer by layer in order."""
    rng = np.random.default_rng(seed)
    return {index: np.asarray(method.score(layer, rng), dtype=np.float64) for index, layer in sorted(stats.layers.items())}


def _min_kept(layer: LayerStats, method: Method) -> int:
    return layer.top_k if method.replacement == "remove" else 1


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0) or math.isnan(ratio):
        raise UsageError(f"ratio {ratio!r} is outside [0, 1); pass the fraction of routed experts to prune, e.g. 0.25.")


def _lowest(scores: np.ndarray, n: int) -> list[int]:
    # Stable sort on (score, index): ties break by lower expert index.
    return sorted(np.lexsort((np.arange(len(scores)), scores))[:n].tolist())


def _select_layer_scope(stats: ExpertStats, scores, ratio: float, method: Method) -> dict[int, list[int]]:
    pruned = {}
    for index, layer in sorted(stats.layers.items()):
        n = math.floor(ratio * layer.num_experts)
        kept = layer.num_experts - n
        if kept < _min_kept(layer, method):
            need = "top_k" if method.replacement == "remove" else "one real expert"
            raise UsageError(
                f"ratio {ratio} prunes {n} of {layer.num_experts} experts in layer {index}, leaving {kept} "
                f"(fewer than {need}={_min_kept(layer, method)} for method {method.name}); use a smaller ratio."
            )
        pruned[index] = _lowest(scores[index], n)
    return pruned


def _select_global_scope(stats: ExpertStats, scores, ratio: float, method: Method) -> dict[int, list[int]]:
    total = sum(math.floor(ratio * layer.num_experts) for layer in stats.layers.values())
    ranked = []
    for index, s in sorted(scores.items()):
        mean = s.mean()
        normalised = s / mean if mean != 0 else s
        ranked.extend((float(v), index, e) for e, v in enumerate(normalised))
    ranked.sort()
    room = {index: layer.num_experts - _min_kept(layer, method) for index, layer in stats.layers.items()}
    pruned: dict[int, list[int]] = {index: [] for index in stats.layers}
    chosen = 0
    for _, index, expert in ranked:
        if chosen == total:
            break
        if len(pruned[index]) < room[index]:
            pruned[index].append(expert)
            chosen += 1
    if chosen < total:
        raise UsageError(
            f"ratio {ratio} asks for {total} pruned experts but only {chosen} can go while every layer keeps "
            f"{'top_k' if method.replacement == 'remove' else 'one'} expert(s); use a smaller ratio."
        )
    return {index: sorted(p) for index, p in sorted(pruned.items())}


def check_ratio_feasible(model, ratio: float, method: str, scope: str = "layer") -> None:
    """Fail before calibration when ``ratio`` cannot be met on ``model`` (range, top_k, at least one expert)."""
    from mone_export.adapters import moe_layers_or_error

    chosen = method_or_error(method)
    scope_or_error(scope)
    _check_ratio(ratio)
    adapter, layers = moe_layers_or_error(model)
    shapes = ExpertStats(adapter.model_type, 0, {l.index: LayerStats(l.num_experts, 1, l.top_k) for l in layers})
    zeros = {l.index: np.zeros(l.num_experts) for l in layers}
    select_pruned(shapes, zeros, ratio, chosen, scope)


def select_pruned(stats: ExpertStats, scores: dict[int, np.ndarray], ratio: float, method: Method, scope: str):
    """Pruned expert indices per layer for ``ratio`` and ``scope`` (docs/method.md#selection)."""
    _check_ratio(ratio)
    if scope == "layer":
        return _select_layer_scope(stats, scores, ratio, method)
    scope_or_error(scope)
    return _select_global_scope(stats, scores, ratio, method)


def _removed_experts(stats: ExpertStats, pruned: dict[int, list[int]], method: Method) -> dict[int, list[int]]:
    """The pruned experts a method removes rather than makes novices; at most E − top_k per layer (the router must
    still choose top_k), keeping the removals that save the most over a novice."""
    if not method.measures_removal:
        return {}
    removed = {}
    for index, experts in pruned.items():
        layer = stats.layers[index]
        cheaper = method.removes(layer)
        chosen = [e for e in experts if cheaper[e]]
        room = layer.num_experts - layer.top_k
        if len(chosen) > room:
            saving = layer.novice_error - _removal_error(layer)
            chosen = sorted(sorted(chosen, key=lambda e: (-saving[e], e))[:room])
        if chosen:
            removed[index] = chosen
    return removed


def _novice_vectors(stats: ExpertStats, pruned: dict[int, list[int]], method: Method,
                    removed: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    if method.replacement == "remove":
        return {}
    vectors = {}
    for index, experts in pruned.items():
        experts = [e for e in experts if e not in set(removed.get(index, ()))]
        if not experts and removed.get(index):
            continue
        means = method.novice_of(stats.layers[index])[experts]
        if method.replacement == "zero":
            means = np.zeros_like(means)
        vectors[index] = torch.from_numpy(means.astype(np.float32))
    return vectors


def plan_pruning(stats: ExpertStats, ratio: float, method: str = DEFAULT_METHOD, scope: str = "layer",
                 seed: int = 0) -> PruningPlan:
    """Score every routed expert and choose which to prune.

    Args:
        stats: calibration statistics from :func:`mone_export.collect_stats`.
        ratio: fraction of routed experts per MoE layer to prune, in [0, 1).
        method: ``ne`` (novice error, the default), ``mone``, ``mone-zero``, ``auto`` (per expert the cheaper of a
            novice and removal, by measured layer-output error; needs ``measure_removal`` statistics),
            ``frequency``, ``routing-score``, ``reap`` or ``random``.
        scope: ``layer`` (floor(ratio·E) per layer) or ``global`` (same total, ranked across layers).
        seed: seed of the ``random`` method.

    Returns:
        A :class:`PruningPlan` whose ``pruned`` maps decoder-layer index to sorted pruned experts and whose
        ``novices`` maps it to ``[n_novices, H]`` float32 novice vectors (absent for removal methods, and for a
        mixed plan's layers whose pruned experts are all removed); ``removed`` lists a mixed plan's removed experts.
    """
    chosen = method_or_error(method)
    scope_or_error(scope)
    _check_ratio(ratio)
    scores = layer_scores(stats, chosen, seed)
    pruned = select_pruned(stats, scores, ratio, chosen, scope)
    removed = _removed_experts(stats, pruned, chosen)
    return PruningPlan.from_selection(
        stats=stats,
        scores=scores,
        pruned=pruned,
        novices=_novice_vectors(stats, pruned, chosen, removed),
        removed=removed,
        method=chosen.name,
        replacement="mixed" if removed else chosen.replacement,
        ratio=float(ratio),
        scope=scope,
        seed=int(seed),
    )
