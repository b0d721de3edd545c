"""fp16 exports of the bundled models, judged against float32 PyTorch by PyTorch fp16's yardstick (issue 12).

Every bundled model is exported in fp16 at ratios 0, 0.25 and 0.5 through the whole pipeline (small calibration,
no latency run) and must pass; genuinely bad fp16 exports (a slightly wrong weight, a wrong router) must fail, so
the gate cannot be always-pass. The exports are built once per module and shared (about 5 s each on an idle
2-core machine).
"""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mone_export import load_model
from mone_export.export import export_onnx
from mone_export.export_pipeline import export_model
from mone_export.half_precision import FACTOR, _agreement, _classify, epsilon
from mone_export.pipeline import CalibrationOptions
from mone_export.validate import TOLERANCES, validate_export

MODELS = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2"]
RATIOS = [0.0, 0.25, 0.5]
CALIB = CalibrationOptions(samples=8, seq_len=64)
FAST = {"latency": False, "memory": False}  # timings are not checks; the weight bound is in report["weights"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    """``(name, ratio) -> report`` of ``mone-export --dtype fp16``, each exported once for the module."""
    root = tmp_path_factory.mktemp("fp16")
    cache = {}

    def get(name, ratio):
        if (name, ratio) not in cache:
            out = root / f"{name}-{ratio}"
            try:
                report = export_model(name, ratio, out, calib=CALIB, dtype="fp16", progress=False,
                                      validation_options=FAST)
            except Exception as exc:  # a ParityError carries the report: show what failed
                report = getattr(exc, "report", None)
                if report is None:
                    raise
            cache[name, ratio] = report
        return cache[name, ratio]

    return get


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_bundled_fp16_export_passes(fp16_export, name, ratio):
    report = fp16_export(name, ratio)
    validation = report["validation"]
    assert report["passed"], validation["failures"]
    half = validation["half_precision"]
    assert half["reference"] == "PyTorch float32" and half["yardstick"] == "PyTorch float16"
    # Judged against float32: PyTorch fp16 itself is measurably off, and ONNX Runtime within the bound.
    assert half["torch_fp16_max_abs_diff"] > 1e-3
    assert half["bound"] == pytest.approx(FACTOR * half["torch_fp16_max_abs_diff"] + half["epsilon"])
    assert half["onnx_max_abs_diff"] <= half["bound"]
    assert half["routing"]["available"] and half["routing"]["onnx_beyond_near_tie"] == 0
    agreement = half["agreement"]
    assert agreement["onnx"] >= agreement["torch_fp16"] and agreement["tokens"] == 4 * 32
    assert all(row["passed"] and row["positions_compared"] > 0 for row in validation["logits"])
    assert report["weights"]["ratio_to_bound"] <= 1.005
    markdown = (report_folder(report) / "report.md").read_text()
    assert "PyTorch fp16 max abs diff" in markdown and "Greedy agreement with float32" in markdown
    assert f"{half['bound']:.3g}" in markdown


def report_folder(report):
    """The folder an export report was written into."""
    return Path(report["output"])


# --- the gate rejects bad fp16 exports --------------------------------------------------------------------------


def _perturbed(report, tmp_path, initializer, change):
    """A copy of an export folder whose float16 initializer ``initializer`` went through ``change``."""
    folder = tmp_path / "broken"
    shutil.copytree(report_folder(report), folder)
    path = folder / "model.onnx"
    proto = onnx.load(str(path))
    tensor = next(t for t in proto.graph.initializer if t.name == initializer)
    array = change(onnx.numpy_helper.to_array(tensor).astype(np.float32)).astype(np.float16)
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, initializer))
    onnx.save(proto, str(path))
    return folder


@pytest.fixture(scope="module")
def mixtral32():
    model, tokenizer = load_model("mixtral")
    return model, tokenizer


def test_slightly_wrong_weight_fails(fp16_export, mixtral32, tmp_path):
    """The final norm weight 0.4 % off: logits about 6× PyTorch fp16's error away from float32."""
    model, tokenizer = mixtral32
    broken = _perturbed(fp16_export("mixtral", 0.0), tmp_path, "model.norm.weight", lambda w: w * 1.004)
    report = validate_export(broken, model, tokenizer=tokenizer, latency=False, memory=False)
    assert not report["passed"]
    half = report["half_precision"]
    assert half["onnx_max_abs_diff"] > half["bound"]
    first = report["failures"][0]
    assert first["output"] == "logits at prefill" and first["max_abs_diff"] > half["bound"]
    assert "1.5 × PyTorch fp16's" in first["message"] and "against float32 PyTorch" in first["message"]


def test_wrong_router_fails_routing_and_agreement(fp16_export, mixtral32, tmp_path):
    """A router biased towards one expert: flips far from a near tie are failures, not excused as ties."""
    model, tokenizer = mixtral32

    def bias_expert(weight):
        weight = weight.copy()
        weight[:, 3] += 0.05  # [H, E]: expert 3 of layer 1 scores higher for every token
        return weight

    broken = _perturbed(fp16_export("mixtral", 0.0), tmp_path, "model.layers.1.mlp.gate.weight.T", bias_expert)
    report = validate_export(broken, model, tokenizer=tokenizer, latency=False, memory=False)
    assert not report["passed"]
    routing = report["half_precision"]["routing"]
    assert routing["onnx_beyond_near_tie"] > 0
    outputs = {f["output"] for f in report["failures"]}
    assert {"routing (experts chosen per token)", "logits at prefill"} <= outputs
    assert report["half_precision"]["agreement"]["onnx"] < report["half_precision"]["agreement"]["torch_fp16"]


# --- the export itself ------------------------------------------------------------------------------------------


def test_fp16_graph_is_deterministic_and_softmax_runs_in_float32(mixtral32, tmp_path):
    """``softmax(x, dtype=float32)`` is exported as Softmax(Cast(x)) (PyTorch's order), byte-identically twice."""
    model, _ = mixtral32
    first = export_onnx(model, tmp_path / "a", dtype="fp16", progress=False)
    second = export_onnx(model, tmp_path / "b", dtype="fp16", progress=False)
    assert first.read_bytes() == second.read_bytes()
    proto = onnx.load(str(first))
    producers = {out: node for node in proto.graph.node for out in node.output}
    softmax = [node for node in proto.graph.node if node.op_type == "Softmax"]
    assert len(softmax) == 2 * model.config.num_hidden_layers  # attention and router per layer
    for node in softmax:
        cast = producers[node.input[0]]
        to = next(a.i for a in cast.attribute if a.name == "to") if cast.op_type == "Cast" else None
        assert to == onnx.TensorProto.FLOAT, node.name


# --- pieces of the gate -----------------------------------------------------------------------------------------


def test_epsilon_is_the_floor_or_one_float16_ulp():
    assert epsilon(TOLERANCES["float16"], 17.3) == TOLERANCES["float16"]  # ulp 0.0156 below the floor
    assert epsilon(TOLERANCES["float16"], 70.0) == 0.0625  # ulp of [64, 128)
    assert epsilon(0.0, 17.3) == 0.015625


def test_only_a_prompts_first_flip_is_judged():
    flips = [{"prompt": 0, "position": 5, "layer": 1, "margin": 1e-4},
             {"prompt": 0, "position": 5, "layer": 2, "margin": 0.5},  # same token, later layer: a consequence
             {"prompt": 0, "position": 9, "layer": 0, "margin": 0.5},
             {"prompt": 1, "position": 2, "layer": 0, "margin": 0.5}]
    _classify(flips, delta=1e-3)
    assert [f["kind"] for f in flips] == ["near_tie", "downstream", "downstream", "beyond"]


def test_agreement_counts_a_near_tie_divergence_as_agreement():
    logits = [torch.tensor([0.0, 1.0, 0.99]), torch.tensor([2.0, 0.0, 0.0])]
    assert _agreement([1, 0], [1, 0], logits, bound=0.05)["agreeing"] == 2
    tie = _agreement([2, 0], [1, 0], logits, bound=0.05)
    assert tie["near_tie"] and tie["agreeing"] == 2
    wrong = _agreement([1, 1], [1, 0], logits, bound=0.05)
    assert not wrong["near_tie"] and wrong["agreeing"] == 1
