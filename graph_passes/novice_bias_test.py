"""Tests for graph_passes.novice_bias."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes import _synthetic_moe as moe
from graph_passes._graph_utils import const_array
from graph_passes.novice_bias import (
    ExpertsToNovicesPass,
    NoviceBranchesToBiasPass,
    explain_novice_mismatches,
)

NOVICES = [{1, 3}, {0, 1, 2}]  # layer 0: odd experts (Mul(C, w)); layer 1: starts with one
NUM_NOVICES = sum(len(n) for n in NOVICES)
ORT_ATOL = 1e-5


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _all_biases(model: ir.Model) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """W name -> [(ids, table)] of the MatMul(Gather(W, const ids, axis=1), const C)s."""
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        gather = node.inputs[0].producer()
        table = const_array(node.inputs[1])
        if gather is None or gather.op_type != "Gather" or table is None:
            continue
        ids = const_array(gather.inputs[1])
        if ids is None or gather.attributes.get_int("axis", 0) != 1:
            continue
        found.setdefault(gather.inputs[0].name, []).append((ids, table))
    return found


def _biases(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """W name -> (ids, table) of its one bias MatMul."""
    found = _all_biases(model)
    assert all(len(terms) == 1 for terms in found.values()), "more than one bias on one W"
    return {w: terms[0] for w, terms in found.items()}


def _dispatched_experts(model: ir.Model) -> dict[str, list[int]]:
    """W name -> experts that still have a NonZero dispatch."""
    result: dict[str, list[int]] = {}
    for node in model.graph:
        if node.op_type == "NonZero":
            col = node.inputs[0].producer().inputs[0].producer()
            result.setdefault(col.inputs[0].name, []).append(int(const_array(col.inputs[1])))
    return result


def _matmuls_outside_dispatch(model: ir.Model) -> set[str]:
    """Output names of MatMuls that run on every token (not behind a NonZero)."""
    tainted: set[ir.Value] = set()
    names = set()
    for node in model.graph:
        if node.op_type == "NonZero":
            tainted.update(node.outputs)
        elif node.op_type != "ScatterND" and any(v in tainted for v in node.inputs):
            tainted.update(node.outputs)
        elif node.op_type == "MatMul":
            names.add(node.outputs[0].name)
    return names


@pytest.fixture
def novice_model() -> moe.SyntheticMoE:
    return moe.build_moe_model(novices=NOVICES)


def test_fires_one_bias_per_layer(novice_model):
    model = novice_model.model
    before = moe.op_counts(model)
    result = NoviceBranchesToBiasPass()(model)
    after = moe.op_counts(model)

    assert result.modified
    assert after["NonZero"] == before["NonZero"] - NUM_NOVICES
    assert after["ScatterND"] == before["ScatterND"] - NUM_NOVICES
    assert after["Greater"] == before["Greater"] - NUM_NOVICES
    assert after["MatMul"] == before["MatMul"] + len(NOVICES)
    assert after["Add"] == before["Add"] + len(NOVICES)
    biases = _biases(model)
    assert sorted(biases) == [moe.routing_weights_name(i) for i in range(len(NOVICES))]
    for layer, novices in enumerate(NOVICES):
        w_name = moe.routing_weights_name(layer)
        ids, table = biases[w_name]
        assert ids.dtype == np.int64 and ids.tolist() == sorted(novices)
        assert table.dtype == np.float32 and table.shape == (len(novices), novice_model.hidden)
        expected = np.stack([novice_model.novice_means[w_name][e] for e in sorted(novices)])
        np.testing.assert_array_equal(table, expected)
        assert model.graph.initializers[f"{w_name}.novice_bias"].const_value.shape == table.shape
        assert model.graph.initializers[f"{w_name}.novice_ids"].const_value.shape == ids.shape
        # The novices' own constants went with their branches.
        for e in novices:
            assert f"layers.{layer}.moe.experts.{e}.novice" not in model.graph.initializers


def test_no_dispatch_remains_for_novices(novice_model):
    model = novice_model.model
    NoviceBranchesToBiasPass()(model)
    dispatched = _dispatched_experts(model)
    for layer, novices in enumerate(NOVICES):
        real = sorted(set(range(novice_model.num_experts)) - novices)
        assert sorted(dispatched[moe.routing_weights_name(layer)]) == real
    # Every MatMul that is not behind a real expert's NonZero is a router or a bias:
    # a token routed only to novices runs no expert matrix product.
    outside = _matmuls_outside_dispatch(model)
    routers = {f"layers.{i}.moe.router_logits" for i in range(len(NOVICES))}
    assert routers <= outside
    assert len(outside - routers) == len(NOVICES)
    bias_outputs = {
        n.outputs[0].name
        for n in model.graph
        if n.op_type == "MatMul" and "novice_bias" in n.inputs[1].name
    }
    assert outside - routers == bias_outputs


def _inputs(kind: str, m: moe.SyntheticMoE) -> np.ndarray:
    rng = np.random.default_rng(123)
    if kind == "T=1":
        return rng.standard_normal((1, m.hidden)).astype(np.float32)
    if kind == "T=7":
        return rng.standard_normal((7, m.hidden)).astype(np.float32)
    if kind == "only_novices":  # layer 0: every token picks experts 1 and 3 (both novices)
        return moe.tokens_routed_to(m, [(1, 3), (3, 1), (1, 3)])
    if kind == "expert_without_tokens":  # layer 0: experts 2 (and 3) get no token
        return moe.tokens_routed_to(m, [(0, 1), (1, 0), (0, 1), (1, 3)])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["T=1", "T=7", "only_novices", "expert_without_tokens"])
def test_parity_in_onnxruntime(novice_model, kind):
    x = _inputs(kind, novice_model)
    expected = moe.run_ort(novice_model.model, x)
    assert NoviceBranchesToBiasPass()(novice_model.model).modified
    actual = moe.run_ort(novice_model.model, x)
    assert np.abs(actual - expected).max() <= ORT_ATOL


def test_result_passes_full_checker(novice_model):
    NoviceBranchesToBiasPass()(novice_model.model)
    onnx.checker.check_model(ir.serde.serialize_model(novice_model.model), full_check=True)


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_noop_without_novices(constant_nodes):
    model = moe.build_moe_model(novices=[], constant_nodes=constant_nodes).model
    before = _bytes(model)
    result = NoviceBranchesToBiasPass()(model)
    assert not result.modified
    assert _bytes(model) == before


def test_second_run_changes_nothing(novice_model):
    model = novice_model.model
    assert NoviceBranchesToBiasPass()(model).modified
    once = _bytes(model)
    assert not NoviceBranchesToBiasPass()(model).modified
    assert _bytes(model) == once


def test_deterministic():
    outputs = []
    for _ in range(2):
        model = moe.build_moe_model(novices=NOVICES).model
        NoviceBranchesToBiasPass()(model)
        outputs.append(_bytes(model))
    assert outputs[0] == outputs[1]


def test_constant_nodes_instead_of_initializers():
    m = moe.build_moe_model(novices=NOVICES, constant_nodes=True)
    x = _inputs("T=7", m)
    expected = moe.run_ort(m.model, x)
    assert NoviceBranchesToBiasPass()(m.model).modified
    assert sorted(_biases(m.model)) == [moe.routing_weights_name(i) for i in range(2)]
    assert np.abs(moe.run_ort(m.model, x) - expected).max() <= ORT_ATOL
    onnx.checker.check_model(ir.serde.serialize_model(m.model), full_check=True)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("reduction_none", "reduction is 'none'"),
        ("update_not_constant", "not a constant (a real expert"),
        ("column_not_constant", "column index of the dispatch is not a constant"),
    ],
)
def test_near_miss_is_not_rewritten_and_says_why(kind, reason):
    # Layer 1 expert 1 is a near-miss; its fellow novices 0 and 2 are rewritten.
    m = moe.build_moe_model(novices=NOVICES, near_misses={(1, 1): kind})
    near_miss = "layers.1.moe.acc.1"
    explained = explain_novice_mismatches(m.model)
    assert reason in explained[near_miss]
    x = _inputs("T=7", m)
    expected = moe.run_ort(m.model, x)

    assert NoviceBranchesToBiasPass()(m.model).modified

    # The branch is still there (its ScatterND's output name moved on to the
    # bias Add when the bias was commuted past it).
    (scatter,) = [
        n
        for n in m.model.graph
        if n.op_type == "ScatterND" and n.inputs[2].name == "layers.1.moe.experts.1.update"
    ]
    assert reason in explain_novice_mismatches(m.model)[scatter.outputs[0].name]
    bias_ids = [ids.tolist() for ids, _ in _all_biases(m.model)[moe.routing_weights_name(1)]]
    # A bias cannot move past a scatter that overwrites (not linear in its data).
    assert bias_ids == ([[0], [2]] if kind == "reduction_none" else [[0, 2]])
    assert np.abs(moe.run_ort(m.model, x) - expected).max() <= ORT_ATOL


def test_real_experts_are_explained(novice_model):
    explained = explain_novice_mismatches(novice_model.model)
    assert set(explained) == {"layers.0.moe.acc.0", "layers.0.moe.acc.2", "layers.1.moe.acc.3"}
    assert all("not a constant (a real expert" in r for r in explained.values())


def test_reason_is_logged_when_nothing_fires(caplog):
    model = moe.build_moe_model(novices=[], num_layers=1).model
    with caplog.at_level(logging.DEBUG, logger="graph_passes.novice_bias"):
        assert not NoviceBranchesToBiasPass()(model).modified
    assert "is not a novice branch: updates are not routing weight x constant" in caplog.text


def test_fp16_graph():
    m = moe.build_moe_model(novices=NOVICES, dtype=np.float16)
    x = np.random.default_rng(5).standard_normal((7, m.hidden)).astype(np.float16)
    # ORT's CPU ScatterND has no float16 kernel with reduction="add": use ONNX's reference.
    expected = moe.run_reference(m.model, x)
    assert NoviceBranchesToBiasPass()(m.model).modified
    actual = moe.run_reference(m.model, x)
    for ids, table in _biases(m.model).values():
        assert table.dtype == np.float16
    assert np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max() <= 2e-2
    onnx.checker.check_model(ir.serde.serialize_model(m.model), full_check=True)


# ---------------------------------------------------------------------------
# ExpertsToNovicesPass
# ---------------------------------------------------------------------------


def _plan(m: moe.SyntheticMoE, novices=NOVICES) -> dict[str, dict[int, np.ndarray]]:
    names = [moe.routing_weights_name(layer) for layer in range(len(novices))]
    return {
        name: {e: m.expert_means[name][e] for e in experts}
        for name, experts in zip(names, novices)
    }


def test_experts_to_novices_matches_a_novice_export():
    full = moe.build_moe_model(novices=[])
    direct = moe.build_moe_model(novices=NOVICES)  # same weights, same means
    x = _inputs("T=7", full)
    expected = moe.run_ort(direct.model, x)

    result = ExpertsToNovicesPass(_plan(full))(full.model)

    assert result.modified
    assert moe.op_counts(full.model)["Sigmoid"] == moe.op_counts(direct.model)["Sigmoid"]
    for layer, experts in enumerate(NOVICES):
        for e in experts:
            for name in moe.expert_weight_names(layer, e):
                assert name not in full.model.graph.initializers
    assert np.abs(moe.run_ort(full.model, x) - expected).max() <= ORT_ATOL
    onnx.checker.check_model(ir.serde.serialize_model(full.model), full_check=True)


def test_experts_to_novices_second_run_changes_nothing():
    full = moe.build_moe_model(novices=[])
    plan = _plan(full)
    ExpertsToNovicesPass(plan)(full.model)
    once = _bytes(full.model)
    assert not ExpertsToNovicesPass(plan)(full.model).modified
    assert _bytes(full.model) == once
    # After the bias pass the experts live in the bias: still nothing to do.
    NoviceBranchesToBiasPass()(full.model)
    biased = _bytes(full.model)
    assert not ExpertsToNovicesPass(plan)(full.model).modified
    assert _bytes(full.model) == biased


def test_experts_to_novices_replaces_a_novice_vector():
    m = moe.build_moe_model(novices=NOVICES)
    w_name = moe.routing_weights_name(0)
    new = np.full(m.hidden, 0.5, np.float32)
    assert ExpertsToNovicesPass({w_name: {1: new}})(m.model).modified
    NoviceBranchesToBiasPass()(m.model)
    ids, table = _biases(m.model)[w_name]
    np.testing.assert_array_equal(table[ids.tolist().index(1)], new)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"no.such.value": {0: np.zeros(8)}}, "no value named 'no.such.value'"),
        (
            {moe.routing_weights_name(0): {7: np.zeros(8)}},
            "no canonical dispatch branch for expert 7",
        ),
    ],
)
def test_experts_to_novices_unknown_branch_is_an_error(plan, message):
    model = moe.build_moe_model(novices=[]).model
    before = _bytes(model)
    with pytest.raises(ir.passes.PreconditionError, match=message):
        ExpertsToNovicesPass(plan)(model)
    assert _bytes(model) == before


def test_experts_to_novices_rejects_a_non_vector():
    with pytest.raises(ValueError, match="must be a vector"):
        ExpertsToNovicesPass({"w": {0: np.zeros((2, 3))}})
