"""``mone-export --streaming on``: the same command, one decoder layer in memory at a time, the same result.

The layer-streamed run (calibration, export, teacher-forced validation) must write what the in-memory run writes
for the same checkpoint and options: the same plan, a graph computing the same function, a passing validation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mone_export.export_pipeline as export_pipeline
from mone_export import PruningPlan
from mone_export.cli import main
from test_cli_export import CALIB, VOCAB, tiny_tokenizer
from test_streamed_export import assert_same_graph_function
from tiny_models import tiny_model

FAST = ["--calib-samples", "6", "--seq-len", "24", "--seed", "0"]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """Tiny Qwen2-MoE (shared expert, one dense layer), sharded, with a tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "qwen2_moe"
    model = tiny_model("qwen2_moe", seed=0, vocab_size=VOCAB)
    tokenizer = tiny_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def both_runs(sharded_dir, tmp_path_factory):
    """The default command in memory and layer-streamed: ``(streamed report, in-memory report, folders)``."""
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("runs")
    reports = {}
    for mode in ("on", "off"):
        stdout = io.StringIO()
        with redirect_stdout(stdout):
            code = main(["--model", str(sharded_dir), "--ratio", "0.5", "-o", str(root / mode), *CALIB,
                         "--streaming", mode, "--json", "--quiet"])
        assert code == 0
        reports[mode] = json.loads(stdout.getvalue())
    return reports["on"], reports["off"], root / "on", root / "off"


def test_a_streamed_run_writes_what_the_in_memory_run_writes(both_runs, sharded_dir):
    streamed, in_memory, out, reference = both_runs
    assert streamed["streaming"] is True and "streaming" not in in_memory
    assert streamed["passed"] is True and streamed["exit_code"] == 0
    assert streamed["validation"]["reference"] == "layer-streamed, teacher-forced"
    assert streamed["pruned"] == in_memory["pruned"]
    a, b = PruningPlan.load(out / "plan"), PruningPlan.load(reference / "plan")
    assert all(np.array_equal(a.novices[k].numpy(), b.novices[k].numpy()) for k in b.novices)
    assert_same_graph_function(reference / "model.onnx", out / "model.onnx", VOCAB)
    assert streamed["weights"]["pruned_bytes"] == in_memory["weights"]["pruned_bytes"]
    assert streamed["weights"]["lower_bound_bytes"] == in_memory["weights"]["lower_bound_bytes"]
    assert streamed["weights"]["unpruned_bytes"] == in_memory["weights"]["unpruned_bytes"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "genai_config.json", "tokenizer.json", "report.json", "mone_export.json", "plan",
            "model.onnx", "model.onnx.data"} <= names
    assert not list(out.parent.glob(".on.mone-scratch-*")), "no scratch folder is left behind"


def test_validate_streams_the_reference_and_passes(both_runs, capsys):
    _, _, out, _ = both_runs
    code, stdout, _ = run(["validate", out, "--streaming", "on", "--no-latency", "--json", "--quiet"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["passed"] and report["validation"]["reference"] == "layer-streamed, teacher-forced"


def test_auto_streams_a_checkpoint_larger_than_a_quarter_of_the_memory(sharded_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_pipeline, "available_memory_bytes", lambda: 1000)  # bytes: any checkpoint is "large"
    code, stdout, _ = run(["--model", sharded_dir, "--ratio", "0.5", "-o", tmp_path / "out", *FAST, "--no-validate",
                           "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(stdout)["streaming"] is True


def test_a_streamed_fp16_run_that_would_validate_is_refused_before_anything_runs(sharded_dir, tmp_path, capsys):
    code, _, err = run(["--model", sharded_dir, "--ratio", "0.5", "-o", tmp_path / "out", *FAST, "--streaming", "on",
                        "--dtype", "fp16"], capsys)
    assert code == 2 and "validates fp32 exports only" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_streamed_fp16_export_without_validation_runs_in_ort(sharded_dir, tmp_path, capsys):
    code, _, _ = run(["--model", sharded_dir, "--ratio", "0.5", "-o", tmp_path / "out", *FAST, "--streaming", "on",
                      "--dtype", "fp16", "--no-validate", "--quiet"], capsys)
    assert code == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[3].type == "tensor(float16)"


def test_a_streamed_run_writes_the_fused_gpu_form_and_validates_it(sharded_dir, tmp_path, capsys):
    """``--streaming on --moe-form fused`` (what ``--provider cuda`` picks): one MoE node per MoE layer, no
    per-expert NonZero, teacher-forced validation passes on the CPU provider."""
    import collections

    import onnx

    code, out, _ = run(["--model", sharded_dir, "--ratio", "0.5", "-o", tmp_path / "out", *FAST, "--streaming", "on",
                        "--moe-form", "fused", "--json", "--quiet"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["moe_form"] == "fused" and report["streaming"] is True and report["passed"] is True
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["MoE"] == 2 and ops["NonZero"] == 0  # qwen2_moe tiny: 3 layers, layer 1 dense
