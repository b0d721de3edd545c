"""The GPU graph form (``--moe-form fused``, docs/graph.md#the-fused-form-gpu): real experts as one
``com.microsoft.MoE`` node per layer, novices as the bias node, run on ONNX Runtime's CPU provider for parity.

The fused op does its own softmax, top-k and renormalisation; these tests check that the export feeds it what makes
that the model's own routing (PyTorch parity for every family, pruned and unpruned, and with fewer real experts left
than the router's top-k), that no per-expert dispatch (``NonZero``/``ScatterND``) is left, and that the novices are
still one bias per layer.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from mone_export import apply_plan, collect_stats, plan_pruning
from mone_export.adapters import moe_layers_or_error
from mone_export.errors import UsageError
from mone_export.export import export_onnx, lower_bound_bytes, weight_bytes
from mone_export.moe_export_forward import export_friendly_moe, interleave_gate_up
from test_export import PROMPTS, build_model, eos_ids, make_session, ort_greedy, prefill_and_decode, torch_greedy
from tiny_models import FAMILIES, tiny_batches, tiny_model

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32_ATOL = 1e-4


def op_counts(path) -> collections.Counter:
    """Node counts by op type; scatter-adds (the per-expert dispatch) counted as ``ScatterAdd``."""
    counts = collections.Counter()
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        add = node.op_type == "ScatterND" and any(a.name == "reduction" and a.s == b"add" for a in node.attribute)
        counts["ScatterAdd" if add else node.op_type] += 1
    return counts


def deep_mone(family: str):
    """MoNE at a ratio that leaves fewer real experts than the router's top-k (the op's k is clipped to E_r)."""
    model = tiny_model(family)
    stats = collect_stats(model, tiny_batches(), progress=False)
    plan = plan_pruning(stats, 0.67, method="mone")
    apply_plan(model, plan)
    return model, plan


@pytest.mark.parametrize("variant", ("unpruned", "mone", "remove", "deep-mone"))
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_form_matches_pytorch(family, variant, tmp_path):
    model, plan = deep_mone(family) if variant == "deep-mone" else build_model(family, variant)
    path = export_onnx(model, tmp_path, moe_form="fused", progress=False)
    onnx.checker.check_model(str(path))
    ops = op_counts(path)
    _, layers = moe_layers_or_error(model)
    assert ops["MoE"] == len(layers)  # fired: one fused node per MoE layer
    assert ops["NonZero"] == 0 and ops["ScatterAdd"] == 0  # no per-expert dispatch left, novices folded
    initializers = {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}
    novices = variant in ("mone", "deep-mone")
    assert any(name.endswith("routing_weights.novice_bias") for name in initializers) == novices
    assert all(f"model.layers.{layer.index}.mlp.experts.gate_up_proj.interleaved" in initializers for layer in layers)
    assert weight_bytes(path) <= 1.005 * lower_bound_bytes(model)
    session = make_session(path)
    diffs = prefill_and_decode(session, model)
    assert max(diffs) < FP32_ATOL, diffs
    for prompt in PROMPTS:
        assert ort_greedy(session, list(prompt), 6, eos_ids(model)) == torch_greedy(model, list(prompt), 6)[:len(
            ort_greedy(session, list(prompt), 6, eos_ids(model)))]


def test_deep_pruning_leaves_fewer_real_experts_than_top_k():
    model, _ = deep_mone("mixtral")
    _, layers = moe_layers_or_error(model)
    assert all(len(layer.experts.real_ids) < model.config.num_experts_per_tok for layer in layers)


def test_fused_form_is_deterministic(tmp_path):
    model, _ = build_model("qwen2_moe", "mone")
    first = export_onnx(model, tmp_path / "a", moe_form="fused", progress=False)
    second = export_onnx(model, tmp_path / "b", moe_form="fused", progress=False)
    assert first.read_bytes() == second.read_bytes()


def test_fused_eager_forward_equals_model(tmp_path):
    """The swapped-in forward computes what the model computes (the trace records that function)."""
    model, _ = build_model("olmoe", "mone")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with export_friendly_moe(model, "fused"):
            fused = model(input_ids=ids).logits
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


def test_interleave_gate_up_layout():
    """Row 2j is gate row j, row 2j+1 is up row j (the op's swiglu_fusion=1 layout)."""
    gate_up = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 6, 4)
    out = interleave_gate_up(gate_up)
    for e in range(2):
        for j in range(3):
            assert torch.equal(out[e, 2 * j], gate_up[e, j]) and torch.equal(out[e, 2 * j + 1], gate_up[e, 3 + j])


def test_fused_fp16_on_cpu_within_half_precision_error(tmp_path):
    """fp16 weights through the fused op (ONNX Runtime's CPU kernel): as close to fp32 PyTorch as PyTorch fp16 is."""
    model, _ = build_model("mixtral", "mone")
    path = export_onnx(model, tmp_path, moe_form="fused", dtype="fp16", progress=False)
    assert op_counts(path)["MoE"] == 3
    session = make_session(path)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64),
             "position_ids": np.arange(9)[None].repeat(2, 0)}
    for value in session.get_inputs()[3:]:
        feeds[value.name] = np.zeros((2, value.shape[1], 0, value.shape[3]), np.float16)
    logits = session.run(["logits"], feeds)[0].astype(np.float32)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.numpy()
        half = torch.nn.Module.half(__import__("copy").deepcopy(model))(input_ids=ids).logits.float().numpy()
    yardstick = np.abs(half - reference).max()
    assert np.abs(logits - reference).max() <= 1.5 * yardstick + 2e-2


def test_fused_form_refuses_experts_it_cannot_compute(tmp_path):
    model = tiny_model("mixtral")
    _, layers = moe_layers_or_error(model)
    layers[0].experts.act_fn = torch.nn.GELU()
    with pytest.raises(UsageError, match="SiLU"):
        export_onnx(model, tmp_path, moe_form="fused", progress=False)
    assert not hasattr(layers[1].experts.__dict__, "forward")  # every patch undone


def test_cli_fused_form_validates_on_cpu(tmp_path):
    """``--moe-form fused`` end to end on a bundled model: parity passes and the report records the form."""
    import json

    from mone_export.cli import main

    out = tmp_path / "out"
    code = main(["--model", "mixtral", "--ratio", "0.5", "--moe-form", "fused", "-o", str(out), "--calib-samples",
                 "8", "--seq-len", "32", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["moe_form"] == "fused" and report["passed"] is True
    assert op_counts(out / "model.onnx")["MoE"] == 4
