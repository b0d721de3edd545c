"""Block-wise int4 / int8 weights: ``MatMul`` → ``MatMulNBits``, ``Gather`` → ``GatherBlockQuantized``.

:class:`QuantizeWeightsPass` rewrites every consumer of a selected 2-D float32 initializer ``B`` into ONNX
Runtime's block-quantised contrib ops (``com.microsoft``):

- ``MatMul(A, B)`` with ``B: [K, N]``  →  ``MatMulNBits(A, Bq, scales, zero_points)``;
- ``Gemm(A, B, transB=1)`` (no bias, ``alpha = 1``) with ``B: [N, K]``  →  the same (a tied ``lm_head``);
- ``Gather(B, ids, axis=0)`` with ``B: [V, H]``  →  ``GatherBlockQuantized(Bq, ids, scales, zero_points)``
  (the token embedding, in blocks that divide ``H``, which that kernel needs).

Blocks of ``block_size`` consecutive elements run along the contraction dimension ``K`` (the hidden dimension of
an embedding row), one scale and one zero point per block and output column; round to nearest (ties to even),
asymmetric: ``w ≈ (q − zp) · scale`` with ``q, zp ∈ [0, 2^bits − 1]`` and the block's range widened to include 0
so that zero stays exact. Layouts (measured in ``../shared/ORT_NOTES.md``): ``Bq: [N, ceil(K/bs), bs·bits/8]``
uint8 holding each output column's blocks, element ``2c`` in the low nibble; ``zero_points`` packed the same way
per column; ``scales: [N, ceil(K/bs)]``.

The numpy arithmetic (:func:`quantize_blocks`, :func:`dequantize_blocks`) is public so that a caller can build the
model the quantised graph computes (a PyTorch yardstick, see ``mone_export.quantization``): both sides quantise
the same float32 values with the same function.

What was quantised is recorded in the model's ``metadata_props`` under :data:`METADATA_KEY`: the configuration
and, per original initializer name, the axis of the stored array the blocks ran along (0 for a ``MatMul`` weight
``[K, N]``, 1 for a ``[N, K]`` or embedding weight), and under ``block_sizes`` the weights quantised with a
smaller block than the configured one: an embedding whose width the block size does not divide gets the largest
power of two that does (:func:`gather_block_size`), which ``GatherBlockQuantized`` needs. An initializer whose consumers need blocks along different
axes, or that some other node reads, is left in float32 (logged at DEBUG with the reason), as is every initializer
``select`` declines (routers and novice biases, in mone-export's use).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "METADATA_KEY",
    "QuantizedBlocks",
    "QuantizeWeightsPass",
    "WeightQuantization",
    "dequantize_blocks",
    "quantization_record",
    "gather_block_size",
    "quantize_blocks",
    "weight_block_size",
]

import dataclasses
import json
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes._graph_utils import Liveness, is_onnx_op

logger = logging.getLogger(__name__)

METADATA_KEY = "mone_export.quantization"
"""``metadata_props`` key of the JSON record of a quantised model (:func:`quantization_record`)."""

MS_DOMAIN = "com.microsoft"

DEFAULT_BLOCK_SIZE = 128
"""Elements per block unless told otherwise: ONNX Runtime's own quantiser's default and the common group size of
int4 LLM checkpoints. Measured against 32 (``benchmarks/peers.py``, ``benchmarks/quant_quality.py``): the int4
kernels read about 15 % fewer bytes and decode faster, for a larger perplexity cost that stays small (README)."""


@dataclasses.dataclass(frozen=True)
class WeightQuantization:
    """How weights are quantised; round-trips through :meth:`to_dict` / :meth:`from_dict`."""

    bits: int = 4
    """4 or 8."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Elements per block along the contraction dimension: a power of two ≥ 16."""
    accuracy_level: int = 4
    """``MatMulNBits`` compute type: 4 quantises the activations to int8 per block (the fast CPU path), 0 computes
    in the activations' float type."""
    version: int = 1
    """Version of this record's meaning (a change of scheme bumps it)."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 (got {self.bits}).")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 (got {self.block_size}).")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4 (got {self.accuracy_level}).")

    @property
    def name(self) -> str:
        """``int4`` / ``int8``."""
        return f"int{self.bits}"

    def to_dict(self) -> dict:
        return {"scheme": "asymmetric block-wise, round to nearest", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> WeightQuantization:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})


@dataclasses.dataclass(frozen=True)
class QuantizedBlocks:
    """A ``[N, K]`` matrix quantised along ``K``, in ONNX Runtime's ``MatMulNBits`` layout."""

    packed: np.ndarray
    """uint8 ``[N, n_blocks, block_size · bits / 8]``."""
    scales: np.ndarray
    """float32 ``[N, n_blocks]``."""
    zero_points: np.ndarray
    """uint8 ``[N, ceil(n_blocks · bits / 8)]``."""
    levels: np.ndarray
    """The unpacked integers ``[N, n_blocks, block_size]`` (int32, padding included)."""
    zero_levels: np.ndarray
    """Unpacked zero points ``[N, n_blocks]`` (int32)."""


def _pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis: 8 bits one per byte; 4 bits two per byte, element ``2c`` in the low nibble."""
    if bits == 8:
        return levels.astype(np.uint8)
    if levels.shape[-1] % 2:
        levels = np.concatenate([levels, np.zeros((*levels.shape[:-1], 1), levels.dtype)], axis=-1)
    return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)


def quantize_blocks(matrix: np.ndarray, bits: int, block_size: int) -> QuantizedBlocks:
    """Quantise a float32 ``[N, K]`` matrix block-wise along ``K`` (module docstring); K is zero-padded to blocks."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {matrix.shape}")
    rows, depth = matrix.shape
    n_blocks = -(-depth // block_size)
    blocks = np.zeros((rows, n_blocks * block_size), np.float32)
    blocks[:, :depth] = matrix
    blocks = blocks.reshape(rows, n_blocks, block_size)
    top = (1 << bits) - 1
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scales = ((high - low) / np.float32(top)).astype(np.float32)
    scales[scales == 0] = 1.0  # an all-zero block: any scale reproduces it
    zero = np.clip(np.round(-low / scales), 0, top).astype(np.int32)
    levels = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, top).astype(np.int32)
    return QuantizedBlocks(packed=_pack(levels, bits), scales=scales, zero_points=_pack(zero, bits),
                           levels=levels, zero_levels=zero)


def dequantize_blocks(quantized: QuantizedBlocks, depth: int) -> np.ndarray:
    """The float32 ``[N, K]`` matrix the quantised blocks stand for (``depth`` = K, dropping the padding)."""
    values = (quantized.levels - quantized.zero_levels[..., None]).astype(np.float32) * quantized.scales[..., None]
    return values.reshape(values.shape[0], -1)[:, :depth]


def weight_block_size(record: dict, name: str) -> int:
    """The block size the weight ``name`` of a quantisation record was quantised with: the record's, or the smaller
    one an embedding needed (``block_sizes``)."""
    return int(record.get("block_sizes", {}).get(name, record["block_size"]))


def quantization_record(model: ir.Model) -> dict | None:
    """The JSON record :class:`QuantizeWeightsPass` left in the model's metadata (None if never quantised)."""
    text = model.metadata_props.get(METADATA_KEY)
    return None if text is None else json.loads(text)


# --- the pass -------------------------------------------------------------------------------------------------------


def gather_block_size(width: int, block_size: int) -> int | None:
    """The block size of an embedding of ``width`` columns: ``GatherBlockQuantized`` needs blocks that divide the
    row, so the largest power of two ≥ 16 that does and is at most ``block_size`` (gpt-oss's 2880 with 128: 64);
    None when there is none."""
    size = block_size
    while size >= 16 and width % size:
        size //= 2
    return size if size >= 16 else None


def _is_matmul_weight(node: ir.Node, index: int) -> bool:
    return is_onnx_op(node, "MatMul") and index == 1


def _is_transposed_gemm_weight(node: ir.Node, index: int) -> tuple[bool, str]:
    if not is_onnx_op(node, "Gemm") or index != 1:
        return False, ""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
        return False, "a Gemm without transB=1 or with transA=1"
    if attrs.get("alpha", 1.0) != 1.0 or (len(node.inputs) > 2 and node.inputs[2] is not None):
        return False, "a Gemm with a bias or alpha != 1"
    return True, ""


def _consumer_axis(node: ir.Node, index: int, config: WeightQuantization, shape: tuple[int, int]) -> tuple[int | None, str]:
    """The axis of the stored weight the blocks must run along for this consumer, or None and why not."""
    if _is_matmul_weight(node, index):
        return 0, ""
    gemm, why = _is_transposed_gemm_weight(node, index)
    if gemm:
        return 1, ""
    if why:
        return None, why
    if is_onnx_op(node, "Gather") and index == 0:
        axis = node.attributes.get("axis")
        if (axis.value if axis is not None else 0) != 0:
            return None, "a Gather along axis 1"
        if gather_block_size(shape[1], config.block_size) is None:
            return None, f"an embedding of width {shape[1]}, which no power of two >= 16 divides"
        return 1, ""
    return None, f"read by {node.op_type} input {index}"


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Selected float32 weights to block-wise int4/int8 contrib ops (module docstring).

    Args:
        config: bits, block size and ``MatMulNBits`` accuracy level.
        select: initializer name → whether to quantise it (default: every eligible weight).
    """

    def __init__(self, config: WeightQuantization = WeightQuantization(),
                 select: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.config = config
        self.select = select

    def _candidates(self, graph: ir.Graph) -> list[tuple[ir.Value, int]]:
        found = []
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if (tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2
                    or value.is_graph_input() or value.is_graph_output() or not value.uses()):
                continue
            if self.select is not None and not self.select(name):
                continue
            shape = tuple(int(d) for d in tensor.shape.numpy())
            axes, reasons = set(), []
            for node, index in value.uses():
                axis, why = _consumer_axis(node, index, self.config, shape)
                if axis is None:
                    reasons.append(why)
                axes.add(axis)
            if reasons or len(axes) != 1:
                logger.debug("%s stays float32: %s", name, "; ".join(reasons) or "its consumers need different axes")
                continue
            found.append((value, axes.pop()))
        return found

    def _initializer(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.val(name, const_value=ir.tensor(array, name=name))
        graph.initializers.add(value)
        return value

    def _quantize(self, graph: ir.Graph, value: ir.Value, axis: int) -> int:
        """Rewrite the consumers of ``value``; returns the block size used (smaller for an embedding whose width
        the configured size does not divide: :func:`gather_block_size`)."""
        config = self.config
        array = value.const_value.numpy()
        matrix = array.T if axis == 0 else array  # [N, K]: blocks run along K
        rows, depth = matrix.shape
        block = config.block_size
        if any(is_onnx_op(node, "Gather") for node, _ in value.uses()):
            block = gather_block_size(depth, block)
        quantized = quantize_blocks(matrix, config.bits, block)
        suffix = f".{config.name}"
        scales = self._initializer(graph, value.name + suffix + ".scales", quantized.scales)
        zero_points = self._initializer(graph, value.name + suffix + ".zero_points", quantized.zero_points)
        packed = gathered = None
        for node, index in list(value.uses()):
            if is_onnx_op(node, "Gather"):
                if gathered is None:
                    gathered = self._initializer(graph, value.name + suffix + ".rows",
                                                 quantized.packed.reshape(rows, -1))
                inputs = [gathered, node.inputs[1], scales, zero_points]
                attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": config.bits}
                op_type = "GatherBlockQuantized"
            else:
                if packed is None:
                    packed = self._initializer(graph, value.name + suffix, quantized.packed)
                inputs = [node.inputs[0], packed, scales, zero_points]
                attrs = {"K": depth, "N": rows, "bits": config.bits, "block_size": block,
                         "accuracy_level": config.accuracy_level}
                op_type = "MatMulNBits"
            replacement = ir.node(op_type, inputs, attrs, domain=MS_DOMAIN, name=node.name)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs,
                                                    replacement.outputs)
        return block

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        candidates = self._candidates(graph)
        if not candidates:
            return ir.passes.PassResult(model, modified=False)
        liveness = Liveness(graph)
        record = quantization_record(model) or {**self.config.to_dict(), "weights": {}}
        if {k: v for k, v in record.items() if k not in ("weights", "block_sizes")} != self.config.to_dict():
            raise ir.passes.PreconditionError(
                f"the model is already quantised with {record}; quantise once, with one configuration")
        for value, axis in candidates:
            block = self._quantize(graph, value, axis)
            record["weights"][value.name] = axis
            if block != self.config.block_size:
                record.setdefault("block_sizes", {})[value.name] = block
        liveness.remove_newly_dead(graph)
        if model.opset_imports.get(MS_DOMAIN) is None:
            model.opset_imports[MS_DOMAIN] = 1
        record["weights"] = dict(sorted(record["weights"].items()))
        if "block_sizes" in record:
            record["block_sizes"] = dict(sorted(record["block_sizes"].items()))
        model.metadata_props[METADATA_KEY] = json.dumps(record, sort_keys=True)
        logger.debug("quantised %d weights to %s", len(candidates), self.config.name)
        return ir.passes.PassResult(model, modified=True)
