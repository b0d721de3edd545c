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
from mone_export.latency import DECODE_TOKENS, ort_runner
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


# --- exact router ties (docs/validation.md#router-ties) -------------------------------------------------------------


def test_router_ties_mark_the_first_tied_position_of_each_prompt():
    """A router of zeros ties every token from the first; a random router ties none."""
    from mone_export.adapters import moe_layers_or_error
    from mone_export.validate import RouterTies
    from tiny_models import tiny_batches as batches_of, tiny_model as model_of

    model = model_of("mixtral", seed=3)
    ids = batches_of(num=1, batch=3, seq=6)[0]
    with RouterTies(model, 3) as ties, torch.no_grad():
        model(input_ids=ids)
    assert np.isinf(ties.first).all()
    with torch.no_grad():
        moe_layers_or_error(model)[1][1].router.weight.zero_()
    with RouterTies(model, 3) as ties, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], cache=out.cache)  # a decode step: positions 6 on
    assert ties.first.tolist() == [0, 0, 0]


def _cli_report(folder, out, capsys):
    import json

    from mone_export.cli import main

    code = main(["--model", str(folder), "--ratio", "0.5", "--calib", "random", "--calib-samples", "4", "--seq-len",
                 "16", "-o", str(out), "--quiet", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_router_tie_in_a_prompt_is_not_a_parity_failure(tmp_path, capsys):
    """Llama 4 with a zero pad embedding: where a chunk starts at a pad token, layer 0's router sees zeros and ties;
    ONNX's TopK and PyTorch's topk choose different novices there. Positions from the tie on are not compared,
    and the report says where the tie was."""
    from tiny_models import tiny_model_of

    tiny_model_of("llama4_text", pad_token_id=0).save_pretrained(tmp_path / "model")
    code, report = _cli_report(tmp_path / "model", tmp_path / "out", capsys)
    validation = report["validation"]
    assert code == 0 and report["passed"] is True, validation["failures"]
    assert validation["logits"][0]["router_ties"], "the prompts met no tie: the test no longer tests it"
    prompts, tokens = validation["prompts"]["count"], validation["prompts"]["tokens"]
    steps = len(validation["logits"]) - 1
    assert sum(row["compared_positions"] for row in validation["logits"]) < prompts * (tokens + steps)


def test_an_untrained_router_cannot_be_validated(tmp_path, capsys):
    """AFMoE initialises its router at zero: every token ties, nothing is left to compare, and validation fails
    saying so (rather than passing on no evidence)."""
    import transformers

    from tiny_models import tiny_config_of

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config_of("afmoe")).save_pretrained(tmp_path / "model")
    code, report = _cli_report(tmp_path / "model", tmp_path / "out", capsys)
    assert code == 1 and report["passed"] is False
    assert "exact router tie" in report["validation"]["failures"][0]["difference"]


def test_decode_steps_cycle_through_tokens():
    """A timed decode step is one token on the prefilled past; successive steps take the prompt's first tokens in
    turn (with novices a step's cost depends on its token's routing), and the past they are given is the same."""
    seen = []

    class Recorder:
        provider = "cpu"

        def empty_past(self, batch):
            return []

        def __call__(self, ids, mask, positions, past):
            seen.append((ids.copy(), mask.shape, positions.copy(), id(past)))
            return np.zeros((1, ids.shape[1], 4), np.float32), ["past"]

    ids = np.arange(100, 120, dtype=np.int64)[None]
    runner = ort_runner(Recorder(), ids)
    seen.clear()
    for _ in range(DECODE_TOKENS + 2):
        runner.decode()
    tokens = [int(step[0][0, 0]) for step in seen]
    assert tokens == [100 + i % DECODE_TOKENS for i in range(DECODE_TOKENS + 2)]
    assert {step[1] for step in seen} == {(1, 21)} and all(int(step[2][0, 0]) == 20 for step in seen)
    assert len({step[3] for step in seen}) == 1
