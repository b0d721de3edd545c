"""`mone_export.validate`: parity, generation, memory and latency checks of an export against PyTorch.

See docs/validation.md.
"""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mone_export import apply_plan, collect_stats, plan_pruning
from mone_export.errors import ParityError, UsageError
from mone_export.export import export_onnx
from mone_export.validate import TOLERANCES, make_prompts, raise_for_failures, validate_export
from tiny_models import tiny_batches, tiny_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
FAST = dict(latency=False, memory=False, decode_steps=2, new_tokens=8)


def _pruned(family, ratio=0.5):
    model = tiny_model(family, seed=0)
    plan = plan_pruning(collect_stats(model, tiny_batches(), progress=False), ratio)
    return model, plan


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny Mixtral: the unpruned export, then the MoNE-pruned model and its export."""
    root = tmp_path_factory.mktemp("validate")
    model, plan = _pruned("mixtral")
    export_onnx(model, root / "unpruned", progress=False)
    apply_plan(model, plan)
    export_onnx(model, root / "pruned", progress=False)
    return model, root / "pruned", root / "unpruned"


def perturb_initializer(folder, scale=1.05):
    """Scale the largest float initializer of ``folder/model.onnx`` in place (a numerically corrupted export)."""
    path = folder / "model.onnx"
    proto = onnx.load(str(path))
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    array = onnx.numpy_helper.to_array(target) * np.float32(scale) + np.float32(0.01)
    target.CopyFrom(onnx.numpy_helper.from_array(array, target.name))
    onnx.save(proto, str(path))
    return target.name


def test_good_export_passes_every_check(exported):
    model, pruned, unpruned = exported
    report = validate_export(pruned, model, baseline_dir=unpruned, new_tokens=12, warmup=1, prefill_repeats=2,
                             decode_repeats=3)
    assert report["passed"] and report["failures"] == []
    assert [r["output"] for r in report["logits"]] == ["logits at prefill"] + [f"logits at decode step {i}"
                                                                               for i in range(1, 5)]
    assert all(r["max_abs_diff"] <= TOLERANCES["float32"] and r["mean_abs_diff"] <= r["max_abs_diff"]
               for r in report["logits"])
    generation = report["generation"]
    assert generation["identical"] == generation["prompts"] == 4 and generation["new_tokens"] == 12
    assert report["prompts"]["source"] == "random ids"  # no tokenizer in the folder
    memory = report["memory"]
    assert memory["weight_bytes"] <= 1.005 * memory["lower_bound_bytes"]
    assert memory["unpruned_weight_bytes"] > memory["weight_bytes"]
    assert memory["session"]["session_peak_bytes"] > 0, memory["session"]
    latency = report["latency"]
    assert latency["prefill_tokens"] == 128
    for run in ("onnx", "onnx_unpruned", "pytorch"):
        assert latency[run]["prefill_ms"] > 0 and latency[run]["decode_ms_per_token"] > 0
    assert set(latency["ratios"]) == {"prefill_onnx_vs_onnx_unpruned", "decode_onnx_vs_onnx_unpruned",
                                      "prefill_onnx_vs_pytorch", "decode_onnx_vs_pytorch"}
    raise_for_failures(report)  # nothing to raise


def test_corrupted_export_names_output_difference_and_tolerance(exported, tmp_path):
    model, pruned, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(pruned, broken)
    perturb_initializer(broken)
    report = validate_export(broken, model, **FAST)
    assert not report["passed"]
    first = report["failures"][0]
    assert first["output"] == "logits at prefill"
    assert first["max_abs_diff"] > TOLERANCES["float32"]
    assert "max |Δ|" in first["message"] and "exceeds the tolerance 1e-04 absolute (float32)" in first["message"]
    with pytest.raises(ParityError, match=r"logits at prefill: max \|Δ\| .* exceeds the tolerance 1e-04"):
        raise_for_failures(report)


def test_atol_and_greedy_failures_are_reported(exported):
    model, pruned, _ = exported
    report = validate_export(pruned, model, atol=0.0, **FAST)
    assert not report["passed"] and report["atol"] == 0.0
    assert {f["output"] for f in report["failures"]} >= {"logits at prefill", "logits at decode step 2"}


def test_prompts():
    a, source = make_prompts(None, 97, num=3, length=5)
    b, _ = make_prompts(None, 97, num=3, length=5)
    assert source == "random ids" and a.shape == (3, 5) and torch.equal(a, b) and int(a.max()) < 97


def test_explicit_prompts(exported):
    model, pruned, _ = exported
    report = validate_export(pruned, model, prompts=[[1, 2, 3, 4], [5, 6, 7, 8]], **FAST)
    assert report["passed"] and report["prompts"] == {"source": "given", "count": 2, "tokens": 4}
    with pytest.raises(UsageError, match="same length"):
        validate_export(pruned, model, prompts=[[1, 2], [3]], **FAST)
    with pytest.raises(UsageError, match=r"in \[0, 97\)"):
        validate_export(pruned, model, prompts=[[1, 500]], **FAST)


def test_wrong_model_is_a_usage_error(exported):
    _, pruned, _ = exported
    with pytest.raises(UsageError, match="cached layers"):
        validate_export(pruned, tiny_model("mixtral", num_hidden_layers=2), **FAST)


def test_fp16_export_within_fp16_tolerance(exported, tmp_path):
    model, _, _ = exported
    export_onnx(model, tmp_path / "fp16", dtype="fp16", progress=False)
    report = validate_export(tmp_path / "fp16", model, latency=False, memory=True, new_tokens=8)
    assert report["dtype"] == "float16" and report["atol"] == TOLERANCES["float16"]
    assert report["passed"], report["failures"]
    assert report["memory"]["weight_bytes"] <= 1.005 * report["memory"]["lower_bound_bytes"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_provider_is_a_usage_error(exported):
    model, pruned, _ = exported
    with pytest.raises(UsageError, match="CUDAExecutionProvider"):
        validate_export(pruned, model, provider="cuda", **FAST)


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_parity(exported):
    model, pruned, _ = exported
    report = validate_export(pruned, model, provider="cuda", latency=True, warmup=1, prefill_repeats=2,
                             decode_repeats=3)
    assert report["passed"], report["failures"]
    assert report["memory"]["session"].get("device_bytes") is not None
