"""Tests for graph_passes.quantize_weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graph_passes
from graph_passes import _synthetic_moe as moe
from graph_passes.quantize_weights import (
    QuantizeWeightsPass,
    WeightQuantization,
    dequantize_blocks,
    quantization_record,
    quantize_blocks,
    weight_block_size,
)


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _dequantized_copy(model: ir.Model, original: ir.Model, config: WeightQuantization) -> ir.Model:
    """``original`` with every weight the record names replaced by its dequantised values (brute force)."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(original))
    for name, axis in quantization_record(model)["weights"].items():
        array = copy.graph.initializers[name].const_value.numpy()
        matrix = array.T if axis == 0 else array
        block = weight_block_size(quantization_record(model), name)
        restored = dequantize_blocks(quantize_blocks(matrix, config.bits, block), matrix.shape[1])
        restored = restored.T if axis == 0 else restored
        copy.graph.initializers[name].const_value = ir.tensor(np.ascontiguousarray(restored), name=name)
    return copy


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 40), (1, 16)])
def test_blocks_against_brute_force(bits, shape):
    rng = np.random.default_rng(bits * 100 + shape[1])
    matrix = rng.standard_normal(shape).astype(np.float32)
    matrix[0, :16] = 0.0  # an all-zero block stays zero
    block = 16
    q = quantize_blocks(matrix, bits, block)
    top = (1 << bits) - 1
    n_blocks = -(-shape[1] // block)
    assert q.packed.shape == (shape[0], n_blocks, block * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (shape[0], n_blocks)
    assert q.levels.min() >= 0 and q.levels.max() <= top
    restored = dequantize_blocks(q, shape[1])
    assert np.array_equal(restored[0, :16], np.zeros(16, np.float32))
    for row in range(shape[0]):
        for b in range(n_blocks):
            values = matrix[row, b * block:(b + 1) * block]
            low, high = min(values.min(), 0.0), max(values.max(), 0.0)
            scale = (high - low) / top if high > low else 1.0
            assert q.scales[row, b] == pytest.approx(scale, rel=1e-6)
            # round to nearest: every element within half a step (plus float rounding)
            error = np.abs(restored[row, b * block:(b + 1) * block] - values)
            assert error.max() <= scale / 2 * (1 + 1e-5) + 1e-7
            # the packed bytes hold the levels, element 2c in the low nibble
            packed = q.packed[row, b]
            unpacked = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)
            assert np.array_equal(unpacked, q.levels[row, b])


def test_config_round_trip_and_validation():
    config = WeightQuantization(bits=8, block_size=64, accuracy_level=0)
    assert WeightQuantization.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bits"):
        WeightQuantization(bits=3)
    with pytest.raises(ValueError, match="block_size"):
        WeightQuantization(block_size=48)


def _pruned_moe() -> moe.SyntheticMoE:
    m = moe.build_moe_model(num_layers=2, hidden=32, ffn=48, num_experts=4, novices=[{1}, {0, 3}], seed=3)
    graph_passes.prune_novices(m.model)
    return m


def _keep_routers_and_biases(name: str) -> bool:
    return not (name.endswith(".gate.weight") or ".novice_bias" in name)


@pytest.mark.parametrize("bits", [4, 8])
def test_experts_quantised_routers_and_novice_biases_kept(bits):
    m = _pruned_moe()
    original = ir.serde.deserialize_model(ir.serde.serialize_model(m.model))
    config = WeightQuantization(bits=bits, block_size=16, accuracy_level=0)
    before = moe.op_counts(m.model)

    result = QuantizeWeightsPass(config, select=_keep_routers_and_biases)(m.model)

    model = result.model
    assert result.modified
    counts = moe.op_counts(model)
    real_experts = (4 - 1) + (4 - 2)  # per layer, the experts that are not novices
    assert counts["MatMulNBits"] == 3 * real_experts
    # what stays float32: two routers and two novice-bias tables
    assert counts["MatMul"] == before["MatMul"] - 3 * real_experts == 4
    floats = {name for name, v in model.graph.initializers.items()
              if v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2}
    assert all(not _keep_routers_and_biases(name) or name.endswith(".scales") for name in floats)
    assert not any(".experts." in name and not name.endswith(".scales") for name in floats)
    record = quantization_record(model)
    assert record["bits"] == bits and len(record["weights"]) == 3 * real_experts
    assert set(record["weights"].values()) == {0}

    reference = _dequantized_copy(model, original, config)
    rng = np.random.default_rng(7)
    for x in (rng.standard_normal((9, 32)).astype(np.float32), moe.tokens_routed_to(m, [(1, 2), (0, 3)])):
        got, want = moe.run_ort(model, x), moe.run_ort(reference, x)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
        # and the quantisation really changed the function
        assert np.abs(moe.run_ort(original, x) - want).max() > 1e-4
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)

    # a second run finds nothing left to do and changes nothing
    frozen = _bytes(model)
    assert not QuantizeWeightsPass(config, select=_keep_routers_and_biases)(model).modified
    assert _bytes(model) == frozen


def test_fast_accuracy_level_is_close():
    m = _pruned_moe()
    original = ir.serde.deserialize_model(ir.serde.serialize_model(m.model))
    config = WeightQuantization(bits=4, block_size=16, accuracy_level=4)
    model = QuantizeWeightsPass(config, select=_keep_routers_and_biases)(m.model).model
    reference = _dequantized_copy(model, original, config)
    x = np.random.default_rng(2).standard_normal((6, 32)).astype(np.float32)
    want = moe.run_ort(reference, x)
    # int8 activations add error, small against the output's scale
    assert np.abs(moe.run_ort(model, x) - want).max() <= 2e-2 * np.abs(want).max()


def test_nothing_selected_changes_nothing():
    m = _pruned_moe()
    frozen = _bytes(m.model)
    assert not QuantizeWeightsPass(select=lambda name: False)(m.model).modified
    assert _bytes(m.model) == frozen


def _embedding_model(hidden: int, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """ids → Gather(embedding) → MatMul(W) → Gemm(·, embedding, transB=1): a tied head; plus a weight read both ways."""
    rng = np.random.default_rng(seed)
    arrays = {
        "embed.weight": rng.standard_normal((40, hidden)).astype(np.float32),
        "proj.weight.T": rng.standard_normal((hidden, hidden)).astype(np.float32),
        "both": rng.standard_normal((hidden, hidden)).astype(np.float32),
    }
    inits = {name: ir.val(name, const_value=ir.tensor(a, name=name)) for name, a in arrays.items()}
    ids = ir.val("ids", ir.DataType.INT64, ["T"])
    embed = ir.node("Gather", [inits["embed.weight"], ids], {"axis": 0})
    proj = ir.node("MatMul", [embed.outputs[0], inits["proj.weight.T"]])
    mixed_a = ir.node("MatMul", [proj.outputs[0], inits["both"]])  # blocks along axis 0 ...
    mixed_b = ir.node("Gemm", [mixed_a.outputs[0], inits["both"]], {"transB": 1})  # ... and along axis 1
    head = ir.node("Gemm", [mixed_b.outputs[0], inits["embed.weight"]], {"transB": 1},
                   outputs=[ir.val("logits", ir.DataType.FLOAT, ["T", 40])])
    graph = ir.Graph([ids], head.outputs, nodes=[embed, proj, mixed_a, mixed_b, head],
                     initializers=list(inits.values()), opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10), arrays


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_bytes(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


def _check_against_dequantized(model: ir.Model, original: ir.Model, config: WeightQuantization) -> None:
    """ORT parity of the quantised embedding model with its dequantised copy, a real change from the original, and
    ``onnx.checker``."""
    reference = _dequantized_copy(model, original, config)
    ids = np.array([0, 5, 39, 5], np.int64)
    want = _run(reference, ids)
    assert np.abs(_run(model, ids) - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(_run(original, ids) - want).max() > 1e-3
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_embedding_and_tied_head(bits):
    model, _ = _embedding_model(hidden=64)
    original = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    config = WeightQuantization(bits=bits, block_size=32, accuracy_level=0)

    assert QuantizeWeightsPass(config)(model).modified

    ops = [node.op_type for node in model.graph]
    assert ops == ["GatherBlockQuantized", "MatMulNBits", "MatMul", "Gemm", "MatMulNBits"]
    record = quantization_record(model)
    # the weight read along two axes stays float32; the tied embedding is quantised once, along its rows
    assert record["weights"] == {"embed.weight": 1, "proj.weight.T": 0}
    assert "embed.weight" not in model.graph.initializers and "both" in model.graph.initializers
    _check_against_dequantized(model, original, config)


def test_embedding_takes_the_largest_block_that_divides_its_width():
    """GatherBlockQuantized needs whole blocks: a width of 48 with blocks of 32 gets blocks of 16 (the embedding and
    its tied head, one quantised copy), recorded per weight; the other weights keep 32."""
    model, _ = _embedding_model(hidden=48)
    original = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    config = WeightQuantization(bits=4, block_size=32, accuracy_level=0)

    QuantizeWeightsPass(config)(model)

    record = quantization_record(model)
    assert record["weights"] == {"embed.weight": 1, "proj.weight.T": 0}
    assert record["block_sizes"] == {"embed.weight": 16}
    blocks = {node.op_type + ":" + node.inputs[1 if node.op_type == "MatMulNBits" else 0].name:
              node.attributes.get_int("block_size") for node in model.graph if node.domain == "com.microsoft"}
    assert blocks == {"GatherBlockQuantized:embed.weight.int4.rows": 16, "MatMulNBits:proj.weight.T.int4": 32,
                      "MatMulNBits:embed.weight.int4": 16}
    _check_against_dequantized(model, original, config)


def test_embedding_width_no_block_divides_stays_float32():
    model, _ = _embedding_model(hidden=40)  # 40 = 8 · 5: no power of two >= 16 divides it
    QuantizeWeightsPass(WeightQuantization(block_size=32))(model)
    assert quantization_record(model)["weights"] == {"proj.weight.T": 0}
    assert [node.op_type for node in model.graph][0] == "Gather"


def test_refuses_a_second_configuration():
    model, _ = _embedding_model(hidden=64)
    QuantizeWeightsPass(WeightQuantization(bits=4), select=lambda name: name == "proj.weight.T")(model)
    with pytest.raises(ir.passes.PreconditionError, match="already quantised"):
        QuantizeWeightsPass(WeightQuantization(bits=8))(model)
