"""Quantised weights in the export (``--quant int4|int8``) and the PyTorch model they stand for.

The export runs :class:`graph_passes.quantize_weights.QuantizeWeightsPass` after the novice passes, so a novice
stays one float32 bias and a pruned expert has no weight to quantise. What is quantised, block-wise along the
contraction dimension (docs/graph.md#quantised-weights):

- every matrix product with a weight of the model: attention projections, the real experts (fused stacks and
  shared experts alike), dense MLPs, ``lm_head``, as ``MatMulNBits``;
- the token embedding, as ``GatherBlockQuantized`` (when the hidden size is a multiple of the block size);

and what stays float32 (:func:`full_precision_parameters`): the routers and every other gate of an MoE block (a
``Linear`` that is a direct child of the block, e.g. Qwen2-MoE's ``shared_expert_gate``): top-k routing is
discontinuous and the gates are a tiny share of the bytes, and the novice bias tables, which are not model
weights. Norms and biases are vectors and stay float32 too.

:func:`dequantized_model` builds the model that the quantised graph computes: a copy of the PyTorch model whose
quantised weights hold exactly the values of their blocks, from the record the pass writes into the ONNX file. It
is the yardstick of validation (:mod:`mone_export.half_precision`) and, in the fidelity benchmark, the model whose
perplexity is the quantised column.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graph_passes.quantize_weights import (
    DEFAULT_BLOCK_SIZE,
    METADATA_KEY,
    QuantizeWeightsPass,
    WeightQuantization,
    dequantize_blocks,
    quantize_blocks,
    weight_block_size,
)
from mone_export.adapters import moe_layers_or_error
from mone_export.errors import UsageError

__all__ = ["QUANT_CHOICES", "WeightQuantization", "dequantized_model", "full_precision_parameters",
           "quantization_config", "quantize_export", "read_quantization", "quantization_selector"]

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "int4", "int8")
"""Values of ``--quant``."""


def quantization_config(name: str | None, block_size: int = DEFAULT_BLOCK_SIZE,
                        accuracy_level: int = 4) -> WeightQuantization | None:
    """``--quant`` and its options as a :class:`WeightQuantization` (None for ``none``); a UsageError for bad values."""
    if name in (None, "none"):
        return None
    if name not in QUANT_CHOICES:
        raise UsageError(f"--quant {name}: choose one of {', '.join(QUANT_CHOICES)}.")
    try:
        return WeightQuantization(bits=int(name.removeprefix("int")), block_size=block_size,
                                  accuracy_level=accuracy_level)
    except ValueError as exc:
        raise UsageError(f"--quant {name}: {exc}") from exc


def full_precision_parameters(model: nn.Module) -> set[str]:
    """Names of the 2-D weights that stay float32: each MoE block's router and the ``Linear`` gates that are direct
    children of the block (a shared-expert gate)."""
    _, layers = moe_layers_or_error(model)
    names = {id(module): name for name, module in model.named_modules()}
    kept: set[str] = set()
    for layer in layers:
        gates = [layer.router, *(child for child in layer.block.children() if isinstance(child, nn.Linear))]
        for gate in gates:
            prefix = names[id(gate)]
            kept.update(f"{prefix}.{name}" for name, _ in gate.named_parameters())
    return kept


def quantization_selector(model: nn.Module) -> Callable[[str], bool]:
    """Initializer name → quantise it: a weight of ``model`` as the export names it, and not a gate or router."""
    from mone_export.export import exported_weight_names

    weights = exported_weight_names(model)
    kept = full_precision_parameters(model)
    return lambda name: name in weights and weights[name].parameter not in kept


def quantize_export(ir_model, model: nn.Module, config: WeightQuantization) -> int:
    """Quantise an exported model's weights in place (after the novice passes); returns how many were quantised."""
    before = len(_record_weights(ir_model.metadata_props.get(METADATA_KEY)))
    QuantizeWeightsPass(config, select=quantization_selector(model))(ir_model)
    count = len(_record_weights(ir_model.metadata_props.get(METADATA_KEY))) - before
    logger.debug("%d weights quantised to %s (block %d)", count, config.name, config.block_size)
    return count


def _record_weights(text: str | None) -> dict:
    return {} if text is None else json.loads(text)["weights"]


def read_quantization(onnx_path: str | Path) -> dict | None:
    """The quantisation record of an exported ``model.onnx`` (None when its weights are not quantised).

    Reads the model's metadata only (no weights)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


@torch.no_grad()
def dequantized_model(model: nn.Module, record: dict) -> nn.Module:
    """A copy of ``model`` in which every weight the record names holds the values its quantised blocks stand for.

    ``record`` is the quantisation record of the export of ``model`` (:func:`read_quantization`): its weights are
    initializer names as the export gives them, each with the axis its blocks ran along. The same float32 values
    go through the same :func:`~graph_passes.quantize_weights.quantize_blocks` as in the graph, so the copy computes
    what the quantised export computes with exact (float32) kernels.
    """
    from mone_export.export import exported_weight_names

    config = WeightQuantization.from_dict(record)
    copied = copy.deepcopy(model)
    names = exported_weight_names(copied)
    tensors = dict([*copied.named_parameters(), *copied.named_buffers()])
    missing = [name for name in record["weights"] if name not in names]
    if missing:
        raise UsageError(f"the export's quantised weights {missing[:3]} are not weights of this model; validate "
                         "the export against the model it came from.")
    for name, axis in record["weights"].items():
        weight = names[name]
        view = weight.view(tensors[weight.parameter].data)  # [K, N] for axis 0, [N, K] for axis 1
        matrix = view.T if axis == 0 else view
        values = matrix.detach().float().numpy()
        block = weight_block_size(record, name)
        restored = dequantize_blocks(quantize_blocks(values, config.bits, block), values.shape[1])
        matrix.copy_(torch.from_numpy(np.ascontiguousarray(restored)).to(matrix.dtype))
    return copied
