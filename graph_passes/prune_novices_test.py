"""Tests for graph_passes.prune_novices (ExpertsToNovices -> NoviceBranchesToBias -> cleanup)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graph_passes
from graph_passes import _synthetic_moe as moe

NOVICES = [{0, 2}, {1, 2, 3}]


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _plan(m: moe.SyntheticMoE) -> dict[str, dict[int, np.ndarray]]:
    return {
        moe.routing_weights_name(layer): {
            e: m.expert_means[moe.routing_weights_name(layer)][e] for e in experts
        }
        for layer, experts in enumerate(NOVICES)
    }


def test_from_unpruned_export_and_plan():
    full = moe.build_moe_model(novices=[])
    reference = moe.build_moe_model(novices=NOVICES)  # the same model with novices built in
    inputs = [
        np.random.default_rng(0).standard_normal((1, full.hidden)).astype(np.float32),
        np.random.default_rng(1).standard_normal((7, full.hidden)).astype(np.float32),
        moe.tokens_routed_to(full, [(0, 2), (2, 0)]),  # layer 0: only novices
    ]
    expected = [moe.run_ort(reference.model, x) for x in inputs]

    model = graph_passes.prune_novices(full.model, _plan(full))

    for x, y in zip(inputs, expected):
        assert np.abs(moe.run_ort(model, x) - y).max() <= 1e-5
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    counts = moe.op_counts(model)
    num_real = sum(full.num_experts - len(n) for n in NOVICES)
    assert counts["NonZero"] == counts["ScatterND"] == num_real
    # one router and one bias per layer, three per real expert
    assert counts["MatMul"] == 2 * len(NOVICES) + 3 * num_real

    # What is left of the weights: routers, real experts, one [n_novices, H] table per layer.
    initializers = model.graph.initializers
    for layer, experts in enumerate(NOVICES):
        for e in range(full.num_experts):
            for name in moe.expert_weight_names(layer, e):
                assert (name in initializers) == (e not in experts)
    weights = {n: v.const_value for n, v in initializers.items() if v.const_value.size > 4}
    expected_bytes = sum(w.nbytes for w in full.router_weights)
    expected_bytes += sum(3 * 8 * 16 * 4 * (full.num_experts - len(n)) for n in NOVICES)
    expected_bytes += sum(len(n) * full.hidden * 4 for n in NOVICES)
    assert sum(t.nbytes for t in weights.values()) == expected_bytes
    tables = sorted(n for n in weights if n.endswith(".novice_bias"))
    assert tables == [f"{moe.routing_weights_name(i)}.novice_bias" for i in range(len(NOVICES))]


def test_fp16_from_unpruned_export_and_plan():
    full = moe.build_moe_model(novices=[], dtype=np.float16)
    reference = moe.build_moe_model(novices=NOVICES, dtype=np.float16)
    x = np.random.default_rng(4).standard_normal((7, full.hidden)).astype(np.float16)
    # ORT's CPU ScatterND has no float16 kernel with reduction="add": ONNX's reference.
    expected = moe.run_reference(reference.model, x).astype(np.float32)

    model = graph_passes.prune_novices(full.model, _plan(full))

    actual = moe.run_reference(model, x).astype(np.float32)
    assert np.abs(actual - expected).max() <= 2e-2
    for i, experts in enumerate(NOVICES):
        table = model.graph.initializers[f"{moe.routing_weights_name(i)}.novice_bias"]
        assert table.const_value.dtype == ir.DataType.FLOAT16
        assert table.const_value.shape == (len(experts), full.hidden)


def test_without_plan_on_a_novice_export():
    m = moe.build_moe_model(novices=NOVICES)
    x = np.random.default_rng(2).standard_normal((7, m.hidden)).astype(np.float32)
    expected = moe.run_ort(m.model, x)
    model = graph_passes.prune_novices(m.model)
    assert model is m.model
    assert np.abs(moe.run_ort(model, x) - expected).max() <= 1e-5
    assert not any(name.endswith(".novice") for name in model.graph.initializers)


def test_second_run_changes_nothing_and_output_is_deterministic():
    outputs = []
    for _ in range(2):
        full = moe.build_moe_model(novices=[])
        model = graph_passes.prune_novices(full.model, _plan(full))
        outputs.append(_bytes(model))
    assert outputs[0] == outputs[1]
    again = graph_passes.prune_novices(model, _plan(full))
    assert _bytes(again) == outputs[0]


def test_pruning_more_experts_later_extends_the_bias():
    full = moe.build_moe_model(novices=[])
    x = np.random.default_rng(3).standard_normal((7, full.hidden)).astype(np.float32)
    expected = moe.run_ort(moe.build_moe_model(novices=NOVICES).model, x)
    first = _plan(full)
    w_name = moe.routing_weights_name(1)
    first[w_name] = {e: v for e, v in first[w_name].items() if e != 2}
    model = graph_passes.prune_novices(full.model, first)

    model = graph_passes.prune_novices(model, _plan(full))

    assert np.abs(moe.run_ort(model, x) - expected).max() <= 1e-5
    gathers = [
        n
        for n in model.graph
        if n.op_type == "Gather" and n.inputs[1].name == f"{w_name}.novice_ids"
    ]
    assert len(gathers) == 1
    assert gathers[0].inputs[1].const_value.numpy().tolist() == [1, 2, 3]
    assert sum(name.startswith(f"{w_name}.novice") for name in model.graph.initializers) == 2


def test_bad_plan_changes_nothing():
    full = moe.build_moe_model(novices=[])
    before = _bytes(full.model)
    plan = {moe.routing_weights_name(0): {9: np.zeros(full.hidden, np.float32)}}
    with pytest.raises(ir.passes.PreconditionError, match="expert 9"):
        graph_passes.prune_novices(full.model, plan)
    assert _bytes(full.model) == before


def test_public_api():
    assert set(graph_passes.__all__) >= {
        "ExpertsToNovicesPass",
        "NoviceBranchesToBiasPass",
        "cleanup_passes",
        "prune_novices",
    }
    assert isinstance(graph_passes.NoviceBranchesToBiasPass(), ir.passes.InPlacePass)
    assert isinstance(graph_passes.cleanup_passes(), ir.passes.PassManager)
