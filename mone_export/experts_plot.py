"""A picture of a pruning plan: every routed expert's score, routing score and output spread, pruned ones marked.

``plot_experts(plan, path)`` writes a PNG (``experts.png`` when ``path`` is a folder). Up to
:data:`MAX_BAR_LAYERS` MoE layers it draws one row per layer and one bar chart per quantity
(pruned experts red and hatched); deeper models get one heat map per quantity (layers × experts,
each layer scaled to its own maximum, pruned experts crossed). Matplotlib's Agg canvas is used
directly (pyplot and the global backend are never touched) and the PNG carries no version or date
metadata, so the same plan gives the same bytes with the same matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mone_export.errors import UsageError
from mone_export.plan import PruningPlan

__all__ = ["plot_experts", "QUANTITIES", "MAX_BAR_LAYERS"]

QUANTITIES = (
    ("score", "score"),
    ("routing_score", "routing score  (1/N) Σ g_e"),
    ("phi_var", "output spread  φ_var = sqrt(Σ_d var f_e)"),
)
"""(key in ``plan.experts[layer]``, panel title) of the quantities drawn."""

MAX_BAR_LAYERS = 16
"""Plans with more MoE layers than this (or more than :data:`MAX_BAR_EXPERTS` experts) are drawn as heat maps."""

MAX_BAR_EXPERTS = 64

KEPT_COLOR = "#4C72B0"
PRUNED_COLOR = "#C44E52"


def _output_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir() or (not path.suffix and not path.exists()):
        path = path / "experts.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _layer_data(plan: PruningPlan) -> list[tuple[int, dict[str, np.ndarray], set[int]]]:
    if not plan.experts:
        raise UsageError("the plan has no per-expert statistics to plot; make it with plan_pruning from calibration statistics.")
    rows = []
    for layer in sorted(int(k) for k in plan.experts):
        stats = plan.experts[layer] if layer in plan.experts else plan.experts[str(layer)]
        values = {}
        for key, _ in QUANTITIES:
            if key not in stats:
                raise UsageError(f"plan layer {layer} has no {key!r} statistic to plot; save the plan with this mone-export.")
            values[key] = np.asarray(stats[key], dtype=np.float64)
        rows.append((layer, values, set(plan.pruned.get(layer, ()))))
    return rows


def _title(plan: PruningPlan) -> str:
    return (f"{plan.model.get('model_type', '?')}: method {plan.method} ({plan.replacement}), ratio {plan.ratio:g}, "
            f"scope {plan.scope}; {plan.num_pruned} pruned experts (red)")


def _xticks(ax, num_experts: int, pruned: set[int] = frozenset()) -> None:
    """Expert-index ticks (every one up to 32 experts, about 16 beyond); pruned experts' labels red and bold."""
    step = 1 if num_experts <= 32 else int(np.ceil(num_experts / 16))
    ticks = list(range(0, num_experts, step))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    for tick, label in zip(ticks, ax.get_xticklabels()):
        if tick in pruned:
            label.set_color(PRUNED_COLOR)
            label.set_fontweight("bold")
    ax.set_xlim(-0.6, num_experts - 0.4)
    ax.tick_params(axis="both", labelsize=7)


def _bars(fig, plan: PruningPlan, rows) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    axes = fig.subplots(len(rows), len(QUANTITIES), squeeze=False)
    for r, (layer, values, pruned) in enumerate(rows):
        for c, (key, label) in enumerate(QUANTITIES):
            ax = axes[r][c]
            vals = values[key]
            num_e = len(vals)
            colors = [PRUNED_COLOR if e in pruned else KEPT_COLOR for e in range(num_e)]
            hatches = ["////" if e in pruned else "" for e in range(num_e)]
            bars = ax.bar(np.arange(num_e), vals, color=colors, width=0.8, edgecolor="white", linewidth=0.3)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
            _xticks(ax, num_e, pruned)
            # Mark pruned experts whatever their bar height: a triangle on the axis and a red tick label.
            marked = sorted(e for e in pruned if e < num_e)
            ax.scatter(marked, [0.0] * len(marked), marker="^", s=22, color=PRUNED_COLOR, zorder=3, clip_on=False,
                       transform=blended_transform_factory(ax.transData, ax.transAxes))
            ax.grid(axis="y", linewidth=0.3, alpha=0.6)
            ax.set_axisbelow(True)
            if r == 0:
                ax.set_title(f"{plan.method} {label}" if key == "score" else label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {layer}\n({len(pruned)}/{num_e} pruned)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("expert", fontsize=8)
    handles = [Patch(color=KEPT_COLOR, label="kept"), Patch(facecolor=PRUNED_COLOR, hatch="////", label="pruned"),
               Line2D([], [], color=PRUNED_COLOR, marker="^", linestyle="", label="pruned (marker)")]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=3, frameon=False)


def _heatmaps(fig, plan: PruningPlan, rows) -> None:
    width = max(len(values["score"]) for _, values, _ in rows)
    axes = fig.subplots(1, len(QUANTITIES), squeeze=False)[0]
    for ax, (key, label) in zip(axes, QUANTITIES):
        grid = np.full((len(rows), width), np.nan)
        for r, (_, values, _) in enumerate(rows):
            vals = values[key]
            top = np.nanmax(np.abs(vals)) if len(vals) else 0.0
            grid[r, : len(vals)] = vals / top if top > 0 else vals
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        xs = [e for _, _, pruned in rows for e in sorted(pruned)]
        ys = [r for r, (_, _, pruned) in enumerate(rows) for _ in pruned]
        ax.scatter(xs, ys, marker="x", s=16, linewidths=1.0, color="#FF2A2A", label="pruned")
        ax.set_yticks(np.arange(len(rows)), [str(layer) for layer, _, _ in rows], fontsize=6)
        _xticks(ax, width)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{plan.method} {label}" if key == "score" else label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="÷ layer max")
    axes[0].set_ylabel("MoE layer", fontsize=8)
    axes[-1].legend(loc="upper right", fontsize=7, frameon=True)


def plot_experts(plan: PruningPlan, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a PNG of every MoE layer's per-expert score, routing score and output spread (φ_var), pruned ones marked.

    Args:
        plan: a :class:`PruningPlan` with per-expert statistics (``plan.experts``), e.g. from ``plan_pruning``
            or ``PruningPlan.load``.
        path: the PNG file, or a folder to write ``experts.png`` into (created if needed).
        dpi: resolution.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    rows = _layer_data(plan)
    out = _output_path(path)
    num_e = max(len(values["score"]) for _, values, _ in rows)
    bars = len(rows) <= MAX_BAR_LAYERS and num_e <= MAX_BAR_EXPERTS
    if bars:
        width = min(18.0, max(10.0, 0.16 * num_e * len(QUANTITIES) + 2.0))
        fig = Figure(figsize=(width, 1.0 + 1.7 * len(rows)), dpi=dpi, layout="constrained")
        _bars(fig, plan, rows)
    else:
        fig = Figure(figsize=(16.0, min(30.0, 2.0 + 0.22 * len(rows))), dpi=dpi, layout="constrained")
        _heatmaps(fig, plan, rows)
    fig.suptitle(_title(plan), fontsize=10)
    fig.savefig(out, format="png", dpi=dpi, metadata={"Software": None})
    return out
