"""The measured error a pruning plan causes in each MoE layer's output on calibration tokens.

A plan's scores estimate, expert by expert, what pruning costs; what it costs a layer when all of its pruned experts
go together (a token that selected two novices, tokens re-routed among the remaining experts) is measured here: the
unpruned model runs the calibration batches, each MoE block's inputs and output are kept for the batch, and each
candidate plan's pruned block (:func:`~mone_export.novices.layer_pruned`, the very module the plan produces) runs on
the same inputs. Layers are measured independently, on the unpruned model's hidden states.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from mone_export.adapters import moe_layers_or_error
from mone_export.novices import layer_pruned
from mone_export.plan import PruningPlan
from mone_export.progress import progress_bar

__all__ = ["layer_output_errors"]


@contextlib.contextmanager
def _block_calls_recorded(layers) -> Iterator[dict[int, list]]:
    """Within the block, every MoE block call's (args, kwargs, output) of the current batch, by layer index."""
    calls: dict[int, list] = {layer.index: [] for layer in layers}
    handles = []

    def record(index):
        def hook(module, args, kwargs, output):
            calls[index].append((args, kwargs, _main_output(output)))
        return hook

    try:
        for layer in layers:
            handles.append(layer.block.register_forward_hook(record(layer.index), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _main_output(output) -> torch.Tensor:
    """A block's hidden-state output (some blocks also return their router logits)."""
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def layer_output_errors(model: nn.Module, batches: Iterable[torch.Tensor], plans: Sequence[PruningPlan],
                        progress: bool = False) -> list[dict[int, float]]:
    """Per plan, per MoE layer: the mean over calibration tokens of ‖pruned block output − block output‖².

    Args:
        model: the unpruned model the plans were made for (in memory; it is left unchanged).
        batches: calibration token batches (``[B, S]``), usually the ones the statistics came from.
        plans: candidate plans for ``model``; each is checked against it.
        progress: show a progress bar (on a terminal only).
    """
    adapter, layers = moe_layers_or_error(model)
    for plan in plans:
        plan.validate_for(model, check_weights=False)
    sums = [{layer.index: 0.0 for layer in layers} for _ in plans]
    tokens = 0
    device = next(model.parameters()).device
    for batch in progress_bar(list(batches), desc="measuring plans", unit="batch", enabled=progress):
        with _block_calls_recorded(layers) as calls:
            model(input_ids=batch.to(device), use_cache=False)
        tokens += int(batch.numel())
        for layer in layers:
            for p, plan in enumerate(plans):
                with layer_pruned(adapter, layer, plan) as pruned:
                    for args, kwargs, reference in calls[layer.index]:
                        out = _main_output(pruned.block(*args, **kwargs))
                        sums[p][layer.index] += float(((out.double() - reference.double()) ** 2).sum())
    return [{index: total / max(tokens, 1) for index, total in per_plan.items()} for per_plan in sums]
