"""Small ONNX helpers for the export: IR version, tied weights, deterministic saving, weight bytes.

Everything here works on ``onnx_ir`` models (the graph passes use the same IR) and never loads external
tensor data unless it has to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "IR_VERSION",
    "EXTERNAL_DATA_THRESHOLD",
    "DATA_SUFFIX",
    "initializer_bytes",
    "weight_bytes",
    "rotary_table_bytes",
    "share_transposed_initializers",
    "name_initializers",
    "dispatch_weight_values",
    "fused_moe_nodes",
    "name_fused_expert_weights",
    "name_values",
    "store_float32_as",
    "finalize_model",
    "lift_external_constants",
    "save_model",
]

logger = logging.getLogger(__name__)

IR_VERSION = 10
"""IR version written into every export: onnxruntime 1.31+ rejects onnx 1.23's default (14); 9–11 load."""

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
"""Initializer bytes above which weights go to ``model.onnx.data`` (a protobuf cannot exceed 2 GiB)."""

DATA_SUFFIX = ".data"


def initializer_bytes(model: ir.Model) -> int:
    """Σ bytes of the main graph's initializers (external data is not read)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        total += int(np.prod(tensor.shape.numpy(), dtype=np.int64)) * tensor.dtype.itemsize
    return total


SMALL_INTEGER_ELEMENTS = 64
"""Integer tensors up to this many elements are graph structure (shapes, axes, expert ids), not weights."""


def weight_bytes(onnx_path: str | os.PathLike) -> int:
    """Σ bytes of a saved ONNX model's weights, external data included, without loading them.

    Weights are the main graph's initializers and ``Constant``-node tensors (so a weight cannot hide in a node
    attribute), except small signed integer tensors (≤ :data:`SMALL_INTEGER_ELEMENTS` elements: shapes, axes,
    indices), which are graph structure and would otherwise dominate the count for the tiny test models.
    """
    proto = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return sum(_tensor_proto_bytes(t) for t in tensors if _is_weight(t))


def rotary_table_bytes(onnx_path: str | os.PathLike) -> int:
    """Σ bytes of the cos/sin tables that ``GroupQueryAttention`` nodes read (inputs 7 and 8: the rotary inside the
    kernel, ``--attention gqa``), each table counted once. They are derived from the model's rotary buffers, not
    parameters, so the weight bound adds them (docs/graph.md#weight-bytes)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = {name for node in proto.graph.node if node.op_type == "GroupQueryAttention"
             for name in list(node.input)[7:9] if name}
    tensors = [t for t in proto.graph.initializer if t.name in names]
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            tensors += [a.t for a in node.attribute if a.name == "value"]
    return sum(_tensor_proto_bytes(t) for t in tensors)


def _is_weight(tensor: onnx.TensorProto) -> bool:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    # uint8 holds quantised weights and their zero points (one byte per output row with a single block per row),
    # never shapes or indices
    return (np.issubdtype(dtype, np.floating) or dtype == np.uint8
            or int(np.prod(tensor.dims, dtype=np.int64)) > SMALL_INTEGER_ELEMENTS)


def _tensor_proto_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _reads_untransposed(value: ir.Value) -> bool:
    """Whether some consumer uses ``value`` other than as the weight (second input) of a MatMul."""
    return any(not (user.op_type == "MatMul" and index == 1) for user, index in value.uses())


def share_transposed_initializers(model: ir.Model) -> int:
    """Stop the exporter's folded ``W.T`` copies from duplicating a weight that is also used untransposed.

    The TorchScript exporter folds ``Transpose(W)`` into a new initializer. For a tied ``lm_head`` (the same
    parameter as the token embedding, read by a ``Gather``) that stores the embedding twice. Each ``MatMul(x, B)``
    whose ``B`` initializer equals ``A.T`` for a 2-D initializer ``A`` that is also read untransposed becomes
    ``Reshape(Gemm(Reshape(x, [-1, K]), A, transB=1), [..., N])``, and ``B`` is dropped. Arrays are compared on
    views (a probe of a few elements, then every element), never copied or hashed.

    Returns the number of rewritten MatMuls.
    """
    graph = model.graph
    # Only a 2-D initializer whose transpose has the shape of some MatMul weight can be one's copy.
    weight_shapes = {tuple(int(d) for d in node.inputs[1].const_value.shape.numpy()) for node in graph
                     if node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is not None
                     and node.inputs[1].is_initializer() and node.inputs[1].const_value is not None}
    # A.T as a view, keyed by its shape and a probe of a few elements: compared in full only on a probe match.
    transposed: dict[tuple, list[tuple[ir.Value, np.ndarray]]] = {}
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is not None and len(tensor.shape) == 2 and _reads_untransposed(value)
                and tuple(int(d) for d in tensor.shape.numpy())[::-1] in weight_shapes):
            view = _bit_view(tensor).T
            transposed.setdefault((view.shape, _probe(view)), []).append((value, view))
    if not transposed:
        return 0
    shapes = {key[0] for key in transposed}
    rewritten = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, b = node.inputs
        if b is None or not b.is_initializer() or b.const_value is None:
            continue
        shape = tuple(int(d) for d in b.const_value.shape.numpy())
        if shape not in shapes:
            continue
        bits = _bit_view(b.const_value)
        match = next((a for a, view in transposed.get((shape, _probe(bits)), [])
                      if a is not b and a.const_value.dtype == b.const_value.dtype and _same_bits(view, bits)), None)
        if match is None:
            continue
        k, n = shape
        _matmul_to_gemm_transb(graph, node, x, match, k, n)
        rewritten += 1
        if not b.uses():
            graph.initializers.pop(b.name)
    return rewritten


def _matmul_to_gemm_transb(graph: ir.Graph, node: ir.Node, x: ir.Value, weight: ir.Value, k: int, n: int) -> None:
    name = node.name or "matmul"

    def const(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{name}/{suffix}", const_value=ir.tensor(array, name=f"{name}/{suffix}"))
        graph.initializers.add(value)
        return value

    out = node.outputs[0]
    flat_shape = const("flat_shape", np.array([-1, k], dtype=np.int64))
    reshape_in = ir.node("Reshape", [x, flat_shape], name=f"{name}/flatten")
    gemm = ir.node("Gemm", [reshape_in.outputs[0], weight], attributes={"transB": 1}, name=f"{name}/gemm")
    # Output shape: x's leading dims + [n]
    lead = ir.node("Shape", [x], attributes={"start": 0, "end": -1}, name=f"{name}/lead_shape")
    out_shape = ir.node(
        "Concat", [lead.outputs[0], const("n", np.array([n], dtype=np.int64))], attributes={"axis": 0},
        name=f"{name}/out_shape",
    )
    reshape_out = ir.node("Reshape", [gemm.outputs[0], out_shape.outputs[0]], name=f"{name}/unflatten")
    graph.insert_before(node, [reshape_in, gemm, lead, out_shape, reshape_out])
    new_out = reshape_out.outputs[0]
    new_out.dtype, new_out.shape = out.dtype, out.shape
    if out.is_graph_output():
        name = out.name
        out.name = None
        new_out.name = name
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def name_initializers(
    model: ir.Model, tensors: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]], prefix: str = ""
) -> int:
    """Give initializers the names of the tensors they hold.

    Args:
        model: an exported model, renamed in place.
        tensors: name → (shape, a function returning the tensor's bits as a numpy integer array of that shape, a
            view in any layout) for every array the graph may hold (a weight, its transpose, an expert's slice), in
            priority order. Only tensors of a shape some anonymous initializer has are looked at, one at a time.
        prefix: initializers named ``prefix + name`` (the export wrapper's module path) lose the prefix.

    Anonymous initializers (``onnx::MatMul_123``, the exporter's folded transposes) whose bytes equal one of
    ``tensors`` take its name. Returns how many initializers were renamed.
    """
    graph = model.graph
    renamed = 0
    taken = set(graph.initializers)
    anonymous: dict[tuple[int, ...], list[ir.Value]] = {}
    for name, value in list(graph.initializers.items()):
        short = name[len(prefix):] if prefix and name.startswith(prefix) else None
        if short is not None and short in tensors and short not in taken:
            _rename_initializer(graph, value, short)
            taken.add(short)
            renamed += 1
        elif name.startswith("onnx::") and value.const_value is not None:
            anonymous.setdefault(tuple(int(d) for d in value.const_value.shape.numpy()), []).append(value)
    if not anonymous:
        return renamed
    # Candidates by shape and a few sampled elements, then a full comparison of the bits, all on views: no hash and
    # no contiguous copy of a weight or of its transpose (measured: building each candidate's bytes was most of the
    # naming time of a 640M-parameter export).
    by_probe: dict[tuple, list[ir.Value]] = {}
    for shape, values in anonymous.items():
        for value in values:
            by_probe.setdefault((shape, _probe(_bit_view(value.const_value))), []).append(value)
    remaining = sum(len(values) for values in anonymous.values())
    for name, (shape, make) in tensors.items():
        if remaining == 0:
            break
        if tuple(shape) not in anonymous or name in taken:
            continue
        data = make()
        values = by_probe.get((tuple(shape), _probe(data)), [])
        match = next((v for v in values if _same_bits(_bit_view(v.const_value), data)), None)
        if match is not None:
            values.remove(match)
            _rename_initializer(graph, match, name)
            taken.add(name)
            renamed += 1
            remaining -= 1
    return renamed


_NUMPY_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _bit_view(tensor) -> np.ndarray:
    """An ``onnx_ir`` tensor's bits as a numpy integer array of its shape (a view where the tensor allows it)."""
    array = np.asarray(tensor.numpy())
    return array.view(_NUMPY_INT_OF_SIZE[array.dtype.itemsize])


def _probe(array: np.ndarray, width: int = 16) -> bytes:
    """The elements at the start, the middle and the end in row-major order, read from a view in any layout: equal
    tensors have equal probes, most different ones do not."""
    size = array.size
    middle = max(0, size // 2 - width // 2)
    flat = np.unique(np.concatenate([np.arange(min(width, size)), np.arange(middle, min(middle + width, size)),
                                     np.arange(max(0, size - width), size)]))
    return array[np.unravel_index(flat, array.shape)].tobytes() if array.ndim else array.tobytes()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two integer bit views hold the same values, compared in place (no contiguous copy)."""
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and bool(
        np.array_equal(a, b.view(a.dtype) if b.dtype != a.dtype else b))


def _fused_moe_routing(node: ir.Node) -> ir.Value | None:
    """W of a fused ``com.microsoft.MoE`` node of the export: ``router_probs = [Cast](Where(Greater(W_r, 0), Log(W_r),
    c))`` with ``W_r = Gather(W, real_ids, axis=1)``, or W itself when every expert is real."""
    if node.op_type != "MoE" or node.domain != "com.microsoft" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    where = node.inputs[1].producer()
    if where is not None and where.op_type == "Cast" and where.inputs[0] is not None:
        where = where.inputs[0].producer()
    if where is None or where.op_type != "Where" or where.inputs[1] is None:
        return None
    log = where.inputs[1].producer()
    if log is None or log.op_type != "Log" or log.inputs[0] is None:
        return None
    real = log.inputs[0]
    gather = real.producer()
    if gather is not None and gather.op_type == "Gather" and gather.attributes.get_int("axis", 0) == 1:
        return gather.inputs[0]
    return real


def fused_moe_nodes(model: ir.Model) -> list[ir.Node]:
    """The fused ``com.microsoft.MoE`` nodes of an export's GPU form (docs/graph.md), in graph order."""
    return [node for node in model.graph if _fused_moe_routing(node) is not None]


def dispatch_weight_values(model: ir.Model) -> list[ir.Value]:
    """The routing-weight matrices W of the MoE layers, in graph order (one per MoE layer).

    W is the first input of a ``Gather(W, e, axis=1)`` whose output feeds ``Greater`` → ``NonZero`` (the canonical
    dispatch of a real expert or a novice), or the routing input of a fused ``com.microsoft.MoE`` node (the GPU form).
    """
    found: list[ir.Value] = []
    for node in model.graph:
        weights = _fused_moe_routing(node)
        if weights is None and node.op_type == "NonZero" and node.inputs[0] is not None:
            greater = node.inputs[0].producer()
            if greater is not None and greater.op_type == "Greater" and greater.inputs[0] is not None:
                gather = greater.inputs[0].producer()
                if gather is not None and gather.op_type == "Gather" and gather.attributes.get_int("axis", 0) == 1:
                    weights = gather.inputs[0]
        if weights is not None and all(weights is not w for w in found):
            found.append(weights)
    return found


def name_fused_expert_weights(model: ir.Model) -> int:
    """Name the fused MoE nodes' expert initializers after their layer: ``{block}.experts.gate_up_proj.interleaved``
    (fc1: the gate/up rows interleaved) and ``{block}.experts.down_proj`` (fc2), where W is named
    ``model.layers.{i}.{block}.routing_weights``. Only initializers that no other node reads are renamed. Call after
    the routing weights are named; returns how many initializers were renamed."""
    graph, renamed = model.graph, 0
    for node in fused_moe_nodes(model):
        routing = _fused_moe_routing(node)
        prefix = routing.name.removesuffix("routing_weights") if routing.name.endswith(".routing_weights") else None
        if prefix is None:
            continue
        for index, leaf in ((2, "experts.gate_up_proj.interleaved"), (4, "experts.down_proj")):
            value = node.inputs[index] if len(node.inputs) > index else None
            name = prefix + leaf
            if value is None or not value.is_initializer() or value.name == name or name in graph.initializers:
                continue
            if any(user is not node for user, _ in value.uses()):
                continue
            _rename_initializer(graph, value, name)
            renamed += 1
    return renamed


def name_values(values: list[ir.Value], names: list[str]) -> None:
    """Rename graph values (not graph inputs/outputs or initializers); a clear error when the counts differ."""
    if len(values) != len(names):
        raise ValueError(f"found {len(values)} values to name but {len(names)} names: {names}")
    for value, name in zip(values, names):
        if not (value.is_graph_input() or value.is_graph_output() or value.is_initializer()):
            value.name = name


def _rename_initializer(graph: ir.Graph, value: ir.Value, name: str) -> None:
    graph.initializers.pop(value.name)
    value.name = name
    if value.const_value is not None:
        value.const_value.name = name
    graph.initializers[name] = value


def store_float32_as(model: ir.Model, dtype: ir.DataType, min_elements: int = 64) -> int:
    """Store float32 initializers whose values ``dtype`` holds exactly in ``dtype``, read through a ``Cast``.

    In a half-precision export the float32 constants are copies of half-precision parameters (DeepSeek-V2's
    router weight, which the model casts to float32; the novice bias of the float32 MoE dispatch): storing them in
    the model dtype halves their bytes and changes no value. ONNX Runtime folds the ``Cast`` when it loads the
    model. Initializers under ``min_elements`` are left alone. Returns the number of initializers converted.
    """
    graph = model.graph
    target = dtype.numpy()
    converted = 0
    anchor = next(iter(graph), None)
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if (tensor is None or tensor.dtype != ir.DataType.FLOAT or value.is_graph_input() or value.is_graph_output()
                or tensor.size < min_elements or not value.uses()):
            continue
        array = tensor.numpy()
        narrow = array.astype(target)
        if not np.array_equal(narrow.astype(np.float32), array):
            continue
        stored = ir.Value(name=f"{name}.{dtype.name.lower()}", const_value=ir.tensor(narrow, name=f"{name}.{dtype.name.lower()}"))
        graph.initializers.add(stored)
        cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/cast")
        out = cast.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(tensor.shape)
        value.replace_all_uses_with(out)
        graph.initializers.pop(name)
        out.name = name
        if anchor is None:
            graph.append(cast)
        else:
            graph.insert_before(anchor, cast)
        converted += 1
    return converted


def finalize_model(model: ir.Model, opset: int | None = None, producer_version: str = "") -> ir.Model:
    """IR version 10, one default-domain opset, our producer name: a model the pinned ONNX Runtime loads."""
    model.ir_version = IR_VERSION
    if opset is not None:
        model.graph.opset_imports[""] = opset
        model.opset_imports[""] = opset
    model.producer_name = "mone-export"
    model.producer_version = producer_version
    return model


def lift_external_constants(model: ir.Model) -> int:
    """``Constant`` nodes of the main graph whose tensor lives in an external file become initializers; returns
    how many.

    Tracing a model over 2 GiB writes every large tensor beside the trace, those of ``Constant`` nodes too (the
    fused attention's rotary caches). An initializer is rewritten into the output's ``.data`` file by
    :func:`save_model`; a ``Constant`` attribute would keep pointing at the trace's scratch folder, which is
    removed after the export.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or node.outputs[0].is_graph_output():
            continue
        attribute = node.attributes.get("value")
        if attribute is None or not isinstance(attribute.value, ir.ExternalTensor):
            continue
        tensor, output = attribute.value, node.outputs[0]
        initializer = ir.Value(name=output.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                               const_value=tensor)
        output.replace_all_uses_with(initializer)
        model.graph.remove(node, safe=True)
        model.graph.register_initializer(initializer)
        count += 1
    return count


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save ``model`` deterministically (same model → same bytes) to ``path``.

    Weights go to ``<path>.data`` beside it when ``external_data`` is True, or when it is None and the
    initializers exceed :data:`EXTERNAL_DATA_THRESHOLD`; the file is then referenced by its name only.
    """
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, path, external_data=path.name + DATA_SUFFIX, size_threshold_bytes=1024)
    else:
        # A traced model over 2 GiB reads its weights from the exporter's files; when the passes bring it under the
        # threshold (pruning, quantisation) they must be written into the file, not referenced where they were.
        ir.external_data.load_to_model(model)
        ir.save(model, path)
    return path
