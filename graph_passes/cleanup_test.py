"""Tests for graph_passes.cleanup."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes import _synthetic_moe as moe
from graph_passes.cleanup import cleanup_passes
from graph_passes.novice_bias import NoviceBranchesToBiasPass


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _model(nodes, inputs, outputs, initializers=(), opsets=None) -> ir.Model:
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=nodes,
        initializers=initializers,
        opset_imports=opsets or {"": 18},
        name="g",
    )
    return ir.Model(graph, ir_version=10)


def _init(name: str, array: np.ndarray) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(array, name=name))


def test_removes_unused_nodes_and_initializers_but_keeps_inputs():
    x = ir.val("x", ir.DataType.FLOAT, ["N", 4])
    unused_input = ir.val("unused_input", ir.DataType.FLOAT, [4])
    w = _init("w", np.ones((4, 4), np.float32))
    dead_w = _init("dead_w", np.ones((4, 4), np.float32) * 2)
    dead = ir.node("Relu", [x])
    matmul = ir.node("MatMul", [x, w], outputs=[ir.val("y", ir.DataType.FLOAT, ["N", 4])])
    model = _model([dead, matmul], [x, unused_input], matmul.outputs, [w, dead_w])

    result = cleanup_passes()(model)

    assert result.modified
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert sorted(model.graph.initializers) == ["w"]
    assert [v.name for v in model.graph.inputs] == ["x", "unused_input"]


def test_folds_small_constants_but_not_weights():
    x = ir.val("x", ir.DataType.FLOAT, ["N", 64])
    big = _init("big.weight", np.arange(64 * 64, dtype=np.float32).reshape(64, 64))
    a = _init("a", np.full((64,), 2.0, np.float32))
    b = _init("b", np.full((64,), 3.0, np.float32))
    transpose = ir.node("Transpose", [big], {"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transpose.outputs[0]])
    scale = ir.node("Mul", [a, b])  # small and constant: folded
    y = ir.val("y", ir.DataType.FLOAT, ["N", 64])
    out = ir.node("Add", [matmul.outputs[0], scale.outputs[0]], outputs=[y])
    model = _model([transpose, matmul, scale, out], [x], out.outputs, [big, a, b])

    assert cleanup_passes()(model).modified

    ops = [n.op_type for n in model.graph]
    assert "Mul" not in ops
    assert "Transpose" in ops  # onnxscript alone would fold a Transpose of a weight used once
    assert model.graph.initializers["big.weight"].const_value.dtype == ir.DataType.FLOAT
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_deduplicates_small_initializers():
    x = ir.val("x", ir.DataType.FLOAT, [3])
    c1 = _init("c1", np.array([1.0, 2.0, 3.0], np.float32))
    c2 = _init("c2", np.array([1.0, 2.0, 3.0], np.float32))
    add = ir.node("Add", [x, c1])
    mul = ir.node("Mul", [add.outputs[0], c2], outputs=[ir.val("y", ir.DataType.FLOAT, [3])])
    model = _model([add, mul], [x], mul.outputs, [c1, c2])

    assert cleanup_passes()(model).modified
    assert sorted(model.graph.initializers) == ["c1"]


def test_removes_unused_functions_and_opsets():
    x = ir.val("x", ir.DataType.FLOAT, [3])
    relu = ir.node("Relu", [x], outputs=[ir.val("y", ir.DataType.FLOAT, [3])])
    model = _model([relu], [x], relu.outputs, opsets={"": 18, "custom.domain": 1})
    f_in = ir.val("a")
    f_node = ir.node("Neg", [f_in])
    function = ir.Function(
        "custom.domain",
        "Unused",
        graph=ir.Graph([f_in], f_node.outputs, nodes=[f_node], opset_imports={"": 18}),
        attributes=[],
    )
    model.functions[function.identifier()] = function

    assert cleanup_passes()(model).modified
    assert not model.functions
    assert "custom.domain" not in model.opset_imports


def test_second_run_changes_nothing():
    model = moe.build_moe_model(novices=[{1, 3}, {0}], constant_nodes=True).model
    NoviceBranchesToBiasPass()(model)
    cleanup_passes()(model)
    once = _bytes(model)
    assert not cleanup_passes()(model).modified
    assert _bytes(model) == once


def test_keeps_semantics_and_dtypes_fp16():
    m = moe.build_moe_model(novices=[{1, 3}, {0}], dtype=np.float16)
    model = m.model
    dtypes = {n: v.const_value.dtype for n, v in model.graph.initializers.items()}
    x = np.random.default_rng(3).standard_normal((5, m.hidden)).astype(np.float16)
    expected = moe.run_reference(model, x)

    cleanup_passes()(model)

    for name, value in model.graph.initializers.items():
        assert value.const_value.dtype == dtypes[name]
    np.testing.assert_array_equal(moe.run_reference(model, x), expected)


def test_keeps_semantics_fp32():
    m = moe.build_moe_model(novices=[{1, 3}, {0}], constant_nodes=True)
    x = np.random.default_rng(4).standard_normal((7, m.hidden)).astype(np.float32)
    expected = moe.run_ort(m.model, x)
    cleanup_passes()(m.model)
    assert np.abs(moe.run_ort(m.model, x) - expected).max() <= 1e-6
