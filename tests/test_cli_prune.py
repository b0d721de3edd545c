"""`mone-export prune`: the end-to-end command and its bad-input handling (exit 2, one line, nothing written)."""

import json
import os
import subprocess
import sys

import pytest

from mone_export import PruningPlan, load_model
from mone_export.cli import main
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2_moe"
    tiny_model("qwen2_moe", seed=0).save_pretrained(path)
    return path


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


CALIB = ["--calib", "random", "--calib-samples", "6", "--seq-len", "12", "--quiet"]


def test_prune_writes_a_reloadable_model_and_plan(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, _ = run(["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(out), *CALIB, "--json"],
                          capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["pruned_per_layer"] == {"0": 3, "2": 3} and report["method"] == "ne"  # the default
    plan = PruningPlan.load(out / "plan")
    assert plan.calibration["samples"] == 6 and plan.calibration["seq_len"] == 12
    assert plan.calibration["tokens"] == 72
    model, _ = load_model(out)
    assert model.model.layers[0].mlp.experts.novice_ids == plan.pruned[0]
    assert report["parameter_bytes_after"] < report["parameter_bytes_before"]


def test_same_inputs_same_plan(model_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert run(["prune", "--model", str(model_dir), "--ratio", "0.3", "-o", str(tmp_path / name), *CALIB], capsys)[0] == 0
    assert (tmp_path / "a/plan/plan.json").read_bytes() == (tmp_path / "b/plan/plan.json").read_bytes()
    assert (tmp_path / "a/plan/novices.safetensors").read_bytes() == (tmp_path / "b/plan/novices.safetensors").read_bytes()


def test_calibration_file(model_dir, tmp_path, capsys):
    tokenizer_dir = tmp_path / "with_tok"
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tokenizer_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(90)]
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]").save_pretrained(tokenizer_dir)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) for i in range(20)))
    out = tmp_path / "o"
    code, _, err = run(["prune", "--model", str(tokenizer_dir), "--ratio", "0.25", "-o", str(out), "--calib-data",
                        str(data), "--calib-samples", "4", "--seq-len", "16", "--quiet"], capsys)
    assert code == 0, err
    assert PruningPlan.load(out / "plan").calibration["tokens"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "not found"),
        (["--ratio", "1.0"], "outside [0, 1)"),
        (["--ratio", "-0.5"], "outside [0, 1)"),
        (["--ratio", "0.9", "--method", "frequency"], "fewer than top_k"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--scope", "model"], "unknown scope 'model'"),
        (["--calib", "wikipedia"], "unknown"),
        (["--calib-data", "/nonexistent.txt"], "not found"),
        (["--calib-samples", "0"], "at least 1"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    base = {"--model": str(model_dir), "--ratio": "0.5"}
    for flag in ("--model", "--ratio"):
        if flag in args:
            base.pop(flag)
    argv = ["prune", *[x for kv in base.items() for x in kv], "-o", str(out), "--calib", "random", "--quiet", *args]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_empty_and_short_calibration_files(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(tmp_path / "o"), "--calib-data",
                        str(empty), "--quiet"], capsys)
    assert code == 2 and "empty" in err


def test_non_moe_and_not_a_model(tmp_path, capsys):
    import transformers

    dense = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=8)).save_pretrained(dense)
    code, _, err = run(["prune", "--model", str(dense), "--ratio", "0.5", "-o", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "'llama' is not a Mixture-of-Experts architecture" in err and "mixtral" in err
    (tmp_path / "notamodel").mkdir()
    code, _, err = run(["prune", "--model", str(tmp_path / "notamodel"), "--ratio", "0.5", "-o", str(tmp_path / "o"),
                        "--quiet"], capsys)
    assert code == 2 and "no config.json" in err


def test_output_rules(model_dir, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    argv = ["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(out), *CALIB]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "previous"
    code, _, err = run([*argv, "--overwrite"], capsys)  # --overwrite never replaces a folder mone-export did not write
    assert code == 2 and "not written by mone-export" in err and (out / "keep.txt").read_text() == "previous"
    (out / "keep.txt").unlink()
    assert run(argv, capsys)[0] == 0 and (out / "plan/plan.json").is_file()
    (out / "plan/extra.txt").write_text("stale")
    assert run([*argv, "--overwrite"], capsys)[0] == 0  # a previous mone-export output is replaced whole
    assert not (out / "plan/extra.txt").exists() and (out / "plan/plan.json").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(afile), *CALIB], capsys)
    assert code == 2 and "not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(model_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(locked / "o"), *CALIB], capsys)
    assert code == 2 and "not writable" in err


def test_console_script_usage_error():
    result = subprocess.run([sys.executable, "-m", "mone_export.cli", "prune", "--ratio", "0.5"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "--model" in result.stderr and "Traceback" not in result.stderr


def test_failed_save_leaves_previous_output(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "prev"
    argv = ["prune", "--model", str(model_dir), "--ratio", "0.5", "-o", str(out), *CALIB]
    assert run(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import mone_export.plan as plan_module

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(plan_module, "save_file", boom)
    code, _, err = run([*argv, "--overwrite", "--ratio", "0.25"], capsys)
    assert code == 1 and "disk full" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["prev"]
