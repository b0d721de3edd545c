"""`mone-export [export]` and `mone-export validate`: the default command end to end, plans, output rules, CI exit codes."""

import functools
import json
import os
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

import mone_export.validate as validate_module
from mone_export import PruningPlan
from mone_export.cli import main
from test_validate import perturb_initializer
from tiny_models import tiny_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
VOCAB = 320
CALIB = ["--calib-samples", "6", "--seq-len", "24", "--seed", "0"]


def tiny_tokenizer():
    """A byte-level BPE tokenizer of VOCAB ids trained on one stdlib file (python-code prompts become real ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([Path(functools.__file__).read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny Qwen2-MoE (shared expert, one dense layer) with a tiny trained tokenizer, saved as a HF folder."""
    path = tmp_path_factory.mktemp("tiny") / "qwen2_moe"
    model = tiny_model("qwen2_moe", seed=0, vocab_size=VOCAB)
    tokenizer = tiny_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def fast_validation(monkeypatch):
    """Validation without latency and with fewer generated tokens (the full run is covered once)."""
    fast = functools.partial(validate_module.validate_export, latency=False, new_tokens=6, decode_steps=2)
    monkeypatch.setattr(validate_module, "validate_export", fast)


@pytest.fixture(scope="module")
def default_export(model_dir, tmp_path_factory):
    """The default command, end to end with full validation: ``mone-export --model DIR --ratio 0.5 -o out/model.onnx``."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("export") / "out"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["--model", str(model_dir), "--ratio", "0.5", "-o", str(out / "model.onnx"), *CALIB, "--json",
                     "--quiet"])
    return code, stdout.getvalue(), out


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_default_command_writes_the_folder_and_a_json_report(default_export, model_dir):
    code, stdout, out = default_export
    assert code == 0, stdout
    report = json.loads(stdout)
    for name in ("model.onnx", "report.json", "report.md", "experts.png", "genai_config.json", "config.json",
                 "tokenizer.json", "plan/plan.json", "plan/novices.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["pruned"] == report["pruned"]
    assert report["command"] == "export" and report["passed"] is True and report["exit_code"] == 0
    assert report["source_model"] == str(model_dir.resolve()) and report["pruned_per_layer"] == {"0": 3, "2": 3}
    weights = report["weights"]
    assert weights["pruned_bytes"] < weights["unpruned_bytes"] and weights["unpruned_source"] == "unpruned export"
    assert weights["pruned_bytes"] <= 1.005 * weights["lower_bound_bytes"]
    validation = report["validation"]
    assert validation["prompts"]["source"] == "python-code (held-out split)"
    assert validation["generation"]["identical"] == validation["generation"]["prompts"]
    assert {"onnx", "onnx_unpruned", "pytorch", "ratios"} <= set(validation["latency"])
    markdown = (out / "report.md").read_text()
    assert "logits at decode step 4" in markdown and "ratio to unpruned export" in markdown
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch or temp folders left


def test_export_from_saved_plan_is_byte_identical(default_export, model_dir, tmp_path, capsys):
    _, _, out = default_export
    again = tmp_path / "again"
    code, _, err = run(["export", "--plan", out, "--model", model_dir, "-o", again, "--no-validate", "--quiet"], capsys)
    assert code == 0, err
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert PruningPlan.load(again / "plan").pruned == PruningPlan.load(out / "plan").pruned
    report = json.loads((again / "report.json").read_text())
    assert report["passed"] is None and report["plan_source"] == str(out / "plan")


def test_validate_good_export_exits_0(default_export, capsys, fast_validation):
    _, _, out = default_export
    code, stdout, err = run(["validate", out, "--no-latency", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["passed"] and report["command"] == "validate" and report["method"] == "ne"  # the default


def test_validate_corrupted_export_exits_1_naming_output(default_export, tmp_path, capsys, fast_validation):
    _, _, out = default_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    perturb_initializer(broken)
    code, stdout, err = run(["validate", broken, "--no-latency"], capsys)
    assert code == 1
    assert "parity check failed: logits at prefill: max |Δ|" in err
    assert "exceeds the tolerance 1e-04 absolute (float32)" in err and "Traceback" not in err
    assert "FAILED logits at prefill" in stdout  # the closing summary names it too


def test_validate_needs_the_original_model(default_export, tmp_path, capsys):
    _, _, out = default_export
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    report = json.loads((moved / "report.json").read_text())
    report["source_model"] = report["model"] = str(tmp_path / "gone")
    (moved / "report.json").write_text(json.dumps(report))
    code, _, err = run(["validate", moved, "--quiet"], capsys)
    assert code == 2 and "--model" in err


def test_parity_failure_exits_1_and_never_replaces_the_previous_output(model_dir, tmp_path, capsys,
                                                                       fast_validation):
    out = tmp_path / "strict"
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "-o", out, "--calib", "random", *CALIB, "--quiet"],
                       capsys)
    assert code == 0, err
    before = snapshot(out)
    code, stdout, err = run(["--model", model_dir, "--ratio", "0.25", "-o", out, "--calib", "random", *CALIB,
                             "--atol", "0", "--json", "--quiet", "--overwrite"], capsys)
    assert code == 1 and "parity check failed: logits at prefill" in err and "tolerance 0e+00" in err
    report = json.loads(stdout)
    assert report["passed"] is False and report["output_written"] is False and report["kept_failed"] is None
    assert snapshot(out) == before  # the good export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict"]  # no scratch, no .failed

    code, stdout, err = run(["--model", model_dir, "--ratio", "0.25", "-o", out, "--calib", "random", *CALIB,
                             "--atol", "0", "--json", "--quiet", "--overwrite", "--keep-failed"], capsys)
    assert code == 1 and snapshot(out) == before
    kept = tmp_path / "strict.failed"
    assert json.loads(stdout)["kept_failed"] == str(kept)
    failed_report = json.loads((kept / "report.json").read_text())
    assert failed_report["exit_code"] == 1 and failed_report["ratio"] == 0.25 and (kept / "model.onnx").is_file()
    assert failed_report["output"] == str(kept) and failed_report["onnx"] == str(kept / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict", "strict.failed"]


def test_method_ne_exports_and_validates_with_weighted_mean_novices(model_dir, tmp_path, capsys, fast_validation):
    """``--method ne`` end to end: the export passes its parity gate, and its plan holds the g²-weighted means of
    the statistics collected on the same calibration data (not the plain means MoNE uses)."""
    import numpy as np

    from mone_export import calibration_batches, collect_stats, load_model

    out = tmp_path / "ne"
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "--method", "ne", "-o", out, *CALIB, "--quiet"],
                       capsys)
    assert code == 0, err
    plan = PruningPlan.load(out / "plan")
    assert plan.method == "ne" and plan.replacement == "novice"
    model, tokenizer = load_model(str(model_dir))
    stats = collect_stats(model, calibration_batches("python-code", tokenizer, 6, 24, seed=0), progress=False)
    for index, experts in plan.pruned.items():
        layer = stats.layers[index]
        np.testing.assert_allclose(plan.novices[index].numpy(), layer.weighted_mean[experts], rtol=1e-5, atol=1e-7)
        assert not np.allclose(layer.weighted_mean[experts], layer.mean[experts], rtol=1e-3)
        assert plan.pruned[index] == sorted(np.argsort(layer.novice_error, kind="stable")[:len(experts)].tolist())


def test_ratio_zero_exports_the_unpruned_model(model_dir, tmp_path, capsys):
    out = tmp_path / "ref"
    code, stdout, err = run(["--model", model_dir, "--ratio", "0", "-o", out, "--calib", "random", *CALIB,
                             "--no-validate", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["num_pruned"] == 0 and report["weights"]["unpruned_source"] == "this export (ratio 0)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.0"], "outside [0, 1)"),
        (["--method", "magic"], "unknown method"),
        (["--dtype", "int3"], "invalid choice"),
        (["-o", "{out}/weights.onnx"], "always named model.onnx"),
        (["--plan", "{out}/noplan"], "no plan.json"),
        (["--plan", "{out}/noplan", "--ratio", "0.5"], "drop --ratio"),
        (["--model", "/nonexistent/model"], "not found"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    base = ["--model", model_dir, "--ratio", "0.5", "-o", out, "--calib", "random", "--quiet"]
    for flag in ("--ratio", "--model", "-o"):
        if flag in args and flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    if "--plan" in args and "--ratio" in base and "--ratio" not in args:
        i = base.index("--ratio")
        del base[i:i + 2]
    argv = ["export", *base, *[a.format(out=tmp_path) for a in args]]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ratio_or_plan_is_required(model_dir, tmp_path, capsys):
    code, _, err = run(["--model", model_dir, "-o", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and "--ratio is required" in err


def test_non_empty_output_needs_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "-o", out / "model.onnx", "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err and snapshot(out) == {"keep.txt": b"previous"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(model_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "-o", locked / "o", "--quiet"], capsys)
    assert code == 2 and "not writable" in err


def test_failure_midway_leaves_previous_export_intact(default_export, model_dir, tmp_path, capsys, monkeypatch):
    _, _, out = default_export
    previous = tmp_path / "prev"
    shutil.copytree(out, previous)
    before = snapshot(previous)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # Fails after the unpruned scratch export and the new folder's files were written, before the rename.
    monkeypatch.setattr(validate_module, "validate_export", disk_full)
    code, _, err = run(["--model", model_dir, "--ratio", "0.25", "-o", previous, "--calib", "random", *CALIB,
                        "--overwrite", "--quiet"], capsys)
    assert code == 1 and "disk full" in err and "Traceback" not in err
    assert snapshot(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_cuda_provider_without_cuda_exits_2(model_dir, tmp_path, capsys):
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "-o", tmp_path / "o", "--provider", "cuda",
                        "--quiet"], capsys)
    assert code == 2 and "onnxruntime-gpu" in err and not (tmp_path / "o").exists()


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_validate_on_cuda(default_export, capsys, fast_validation):
    _, _, out = default_export
    code, _, err = run(["validate", out, "--provider", "cuda", "--quiet"], capsys)
    assert code == 0, err


def test_method_auto_exports_with_the_plan_its_measured_errors_choose(model_dir, tmp_path, capsys, fast_validation):
    """``--method auto`` end to end: the plan records each expert's measured removal error and prunes, per layer, the
    experts whose cheaper option (novice or removal) costs least: the selection recomputed from statistics collected
    independently on the same calibration data. (On this model every removal costs more than the novice, so the plan
    is a novice plan; the next test exports a mixed one.)"""
    import numpy as np

    from mone_export import calibration_batches, collect_stats, load_model, plan_pruning

    out = tmp_path / "auto"
    code, _, err = run(["--model", model_dir, "--ratio", "0.5", "--method", "auto", "-o", out, *CALIB, "--quiet"],
                       capsys)
    assert code == 0, err
    plan = PruningPlan.load(out / "plan")
    model, tokenizer = load_model(str(model_dir))
    stats = collect_stats(model, calibration_batches("python-code", tokenizer, 6, 24, seed=0), progress=False,
                          measure_removal=True)
    expected = plan_pruning(stats, 0.5, "auto")
    assert plan.method == "auto" and (plan.pruned, plan.removed) == (expected.pruned, expected.removed)
    assert plan.replacement == expected.replacement
    for index, layer in stats.layers.items():
        np.testing.assert_allclose(plan.experts[index]["removal_error"], layer.removal_error, rtol=1e-6)
        cost = np.minimum(layer.novice_error, layer.removal_error)
        assert plan.pruned[index] == sorted(np.argsort(cost, kind="stable")[:len(plan.pruned[index])].tolist())


def test_a_mixed_plan_exports_without_its_removed_experts_and_passes_parity(model_dir, tmp_path, capsys,
                                                                            fast_validation):
    """A plan mixing novices and removed experts in one layer (as ``auto`` makes them) exports through ``--plan``:
    the parity gate against the pruned PyTorch model passes, and the graph holds exactly the remaining real experts'
    weights (the export's size equals its lower bound)."""
    import dataclasses

    from mone_export import calibration_batches, collect_stats, load_model, plan_pruning

    model, tokenizer = load_model(str(model_dir))
    stats = collect_stats(model, calibration_batches("python-code", tokenizer, 6, 24, seed=0), progress=False)
    ne = plan_pruning(stats, 0.5, "ne")
    removed = {index: experts[:1] for index, experts in ne.pruned.items()}
    novices = {index: ne.novices[index][1:] for index in ne.pruned}
    dataclasses.replace(ne, removed=removed, novices=novices, replacement="mixed", method="auto").save(tmp_path / "plan")
    out = tmp_path / "mixed"
    code, stdout, err = run(["--model", model_dir, "--plan", tmp_path / "plan", "-o", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["passed"] and report["removed_per_layer"] == {str(i): 1 for i in removed}
    assert report["weights"]["pruned_bytes"] <= report["weights"]["lower_bound_bytes"] * 1.001
