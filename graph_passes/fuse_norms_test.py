"""Tests for graph_passes.fuse_norms."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter.pattern import MatchingTracer

from graph_passes.fuse_norms import FuseNormsPass, SkipRmsNorm

D = 16
EPS = 1e-6


class _Builder:
    """A decoder-shaped graph in the form transformers' RMSNorm traces to (see the module docstring)."""

    def __init__(self, seed: int, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, array: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs, domain: str = "", **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], domain=domain, **attrs))
        return out

    def rms(self, x: str, *, reciprocal: bool, scale_first: bool, widen: bool, axis: int = -1, power: float = 2.0):
        xc = self.node("Cast", [x], to=TensorProto.FLOAT) if widen else x
        mean = self.node("ReduceMean", [self.node("Pow", [xc, self.const(np.float32(power), "two")]),
                                        self.const(np.array([axis], np.int64), "axes")])
        rms = self.node("Sqrt", [self.node("Add", [mean, self.const(np.float32(EPS), "eps")])])
        inverse = (self.node("Reciprocal", [rms]) if reciprocal
                   else self.node("Div", [self.const(np.float32(1.0), "one"), rms]))
        normalized = self.node("Mul", [xc, inverse])
        if widen:
            normalized = self.node("Cast", [normalized], to=self.elem)
        scale = self.const((1 + 0.1 * self.rng.standard_normal(D)).astype(self.dtype), "scale")
        return self.node("Mul", [scale, normalized] if scale_first else [normalized, scale])

    def linear(self, x: str) -> str:
        return self.node("MatMul", [x, self.const((self.rng.standard_normal((D, D)) / 4).astype(self.dtype), "w")])

    def model(self, output: str, typed: dict[str, int] | None = None) -> ir.Model:
        x = helper.make_tensor_value_info("x", self.elem, ["batch", "seq", D])
        y = helper.make_tensor_value_info(output, self.elem, ["batch", "seq", D])
        value_info = [helper.make_tensor_value_info(name, elem, None) for name, elem in (typed or {}).items()]
        graph = helper.make_graph(self.nodes, "g", [x], [y], self.inits, value_info=value_info)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        proto.ir_version = 10
        return ir.serde.deserialize_model(proto)


def _decoder(seed: int = 0, dtype=np.float32) -> ir.Model:
    """Three norms, two residual adds: the first through a no-op Cast (float32: ``x.to(float32)``), typed only where
    the exporter types values (the Casts)."""
    b = _Builder(seed, dtype)
    widen = dtype != np.float32
    stream = b.node("Cast", ["x"], to=b.elem)  # the residual stream, typed by its Cast
    typed = {stream: b.elem}
    h = b.linear(b.rms(stream, reciprocal=False, scale_first=True, widen=widen))
    total = b.node("Add", [stream, h])
    if widen:
        stream = total
        typed[total] = b.elem
    else:
        stream = b.node("Cast", [total], to=TensorProto.FLOAT)
        typed[stream] = b.elem
    h = b.linear(b.rms(stream, reciprocal=True, scale_first=False, widen=widen))
    total = b.node("Add", [h, stream])  # the other Add order
    out = b.linear(b.rms(total, reciprocal=False, scale_first=False, widen=widen))
    if not widen:
        typed[total] = b.elem
    return b.model(out, typed)


def _proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_residual_adds_and_norms_fuse_with_ort_parity(dtype):
    model = _decoder(seed=1, dtype=dtype)
    x = np.random.default_rng(2).standard_normal((2, 5, D)).astype(dtype)
    expected = _run(model, x)
    before = _ops(model)
    result = FuseNormsPass()(model)
    assert result.modified
    ops = _ops(result.model)
    assert ops["SkipSimplifiedLayerNormalization"] == 2
    # the first norm has no add before it: it stays (ONNX Runtime fuses it at load), the other two are gone
    for op_type in ("Pow", "ReduceMean", "Sqrt"):
        assert (before[op_type], ops[op_type]) == (3, 1), op_type
    assert ops["Add"] == 1  # the first norm's epsilon
    assert ops["MatMul"] == 3
    assert ops["Cast"] == (1 if dtype == np.float32 else 3)  # float16: the first norm's own two Casts
    assert any(o.domain == "com.microsoft" for o in _proto(result.model).opset_import)
    onnx.checker.check_model(_proto(result.model), full_check=True)
    got = _run(result.model, x)
    tolerance = 1e-5 if dtype == np.float32 else 5e-3
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    assert not FuseNormsPass()(result.model).modified  # a second run changes nothing


def test_epsilon_comes_from_the_graph():
    model = _decoder(seed=3)
    FuseNormsPass()(model)
    fused = [node for node in model.graph if node.op_type == "SkipSimplifiedLayerNormalization"]
    assert fused and all(node.attributes.get_float("epsilon") == pytest.approx(EPS) for node in fused)


def _root(model: ir.Model) -> ir.Node:
    return next(n for n in reversed(list(model.graph)) if n.op_type == "Mul")


def _reasons(model: ir.Model, root: ir.Node) -> str:
    """Why no variant of the rule matched at ``root`` (every variant's reason, joined)."""
    tracer = MatchingTracer()  # a failed check makes match() return None; the tracer keeps its reason
    for c in (True, False):
        for rule in SkipRmsNorm.rule(cast=c, reciprocal=False, scale_first=True).commute():
            assert not rule.match(model, model.graph, root, tracer=tracer)
    return " | ".join(info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos)


@pytest.mark.parametrize("axis, power, why", [(1, 2.0, "axes"), (-1, 3.0, "exponent")])
def test_a_reduction_that_is_not_an_rms_norm_stays(axis, power, why):
    b = _Builder(4)
    stream = b.node("Cast", ["x"], to=TensorProto.FLOAT)
    total = b.node("Add", [stream, b.linear(stream)])
    out = b.rms(total, reciprocal=False, scale_first=True, widen=False, axis=axis, power=power)
    model = b.model(out, {stream: TensorProto.FLOAT})
    before = _ops(model)
    assert why in _reasons(model, _root(model))
    assert not FuseNormsPass()(model).modified
    assert _ops(model) == before


def test_a_cast_to_another_type_keeps_the_add():
    """A float32 sum cast to float16 before the norm: the kernel computes in float32, so nothing fuses."""
    b = _Builder(5)
    stream = b.node("Cast", ["x"], to=TensorProto.FLOAT)
    narrowed = b.node("Cast", [b.node("Add", [stream, b.linear(stream)])], to=TensorProto.FLOAT16)
    b.dtype = np.float16
    out = b.rms(narrowed, reciprocal=False, scale_first=True, widen=False)  # matched, not run
    model = b.model(out, {stream: TensorProto.FLOAT})
    assert not FuseNormsPass()(model).modified
    assert "changes FLOAT into FLOAT16" in _reasons(model, _root(model))


def test_summands_of_unknown_type_are_not_fused():
    b = _Builder(7)
    total = b.node("Add", ["x", b.linear("x")])
    out = b.rms(total, reciprocal=False, scale_first=True, widen=True)
    model = b.model(out)
    model.graph.inputs[0].dtype = None  # the exporter's graphs type values through their Casts only
    assert not FuseNormsPass()(model).modified
    assert "known element type" in _reasons(model, _root(model))


def test_a_graph_without_norms_is_unchanged():
    b = _Builder(8)
    model = b.model(b.linear(b.linear("x")))
    before = _proto(model).SerializeToString()
    assert not FuseNormsPass()(model).modified
    assert _proto(model).SerializeToString() == before
