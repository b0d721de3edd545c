"""Whatever ends a run leaves the previous output intact: bugs (crash log), SIGTERM, SIGINT and SIGKILL anywhere.

The kill tests run the real console command in a subprocess against a tiny checkpoint, over a previous output made
at another ratio, so "previous" and "new" are told apart by content: after every kill the output folder is either
byte-identical to the previous one or (killed after the final atomic exchange) the complete new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from mone_export import PruningPlan
from mone_export.cli import main
from mone_export.safe_output import SCRATCH_TAG
from tiny_models import tiny_model

CALIB = ["--calib", "random", "--calib-samples", "4", "--seq-len", "8"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "mixtral"
    tiny_model("mixtral", seed=0).save_pretrained(path)
    return path


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def export_args(model: Path, out: Path, ratio: str) -> list[str]:
    return ["export", "--model", str(model), "--ratio", ratio, "-o", str(out), "--overwrite", *CALIB, "--quiet"]


def command(model: Path, out: Path, ratio: str) -> list[str]:
    return [sys.executable, "-m", "mone_export.cli", *export_args(model, out, ratio)]


def scratch_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{SCRATCH_TAG}*"))


def hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))


def assert_loadable_output(out: Path, ratio: float) -> None:
    """A complete output folder of the given ratio: its graph, plan and report load."""
    onnx.checker.check_model(str(out / "model.onnx"))
    assert PruningPlan.load(out / "plan").ratio == pytest.approx(ratio)
    report = json.loads((out / "report.json").read_text())
    assert report["ratio"] == pytest.approx(ratio) and report["passed"]


@pytest.fixture(scope="module")
def first_output(model, tmp_path_factory):
    """A good output at ratio 0.25, made once."""
    out = tmp_path_factory.mktemp("first") / "out"
    assert main(export_args(model, out, "0.25")) == 0
    return out


@pytest.fixture
def previous(first_output, tmp_path):
    """A copy of the good output as this test's previous output, and its file hashes."""
    out = tmp_path / "out"
    shutil.copytree(first_output, out)
    return out, folder_hashes(out)


def test_a_bug_prints_one_line_and_the_path_of_its_traceback(model, previous, tmp_path, monkeypatch, capsys):
    out, before = previous
    logs = tmp_path / "logs"
    monkeypatch.setenv("MONE_EXPORT_LOG_DIR", str(logs))
    import mone_export.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug\nwith a second line")

    monkeypatch.setattr(mone_export.pipeline, "collect_stats", broken)
    capsys.readouterr()
    assert main(export_args(model, out, "0.5")) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: an internal bug" in err and "Traceback" not in err
    (log,) = logs.iterdir()
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "an internal bug" in text and "--ratio 0.5" in text
    assert folder_hashes(out) == before and hidden_leftovers(out) == []


def wait_for(process: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll ``condition()`` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the run neither reached the kill point nor ended")


def count_in_scratch(out: Path, name: str) -> int:
    """How many files ``name`` the scratch folders of ``out`` hold now (they change while we look)."""
    count = 0
    for folder in scratch_folders(out):
        try:
            count += sum(1 for _ in folder.rglob(name))
        except FileNotFoundError:  # removed or renamed while we walked it
            pass
    return count


def in_scratch(out: Path, name: str, at_least: int = 1):
    return lambda: count_in_scratch(out, name) >= at_least


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_unwinds_cleanly(model, previous, sig, code):
    out, before = previous
    process = subprocess.Popen(command(model, out, "0.5"), stderr=subprocess.PIPE, text=True)
    assert wait_for(process, in_scratch(out, "model.onnx")), "the run ended before writing its graph"
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "previous output is unchanged" in err
    assert folder_hashes(out) == before and hidden_leftovers(out) == []


def test_sigkill_anywhere_keeps_the_previous_output(model, previous):
    """SIGKILL at points of the run found by watching it, then at fractions of its measured duration."""
    out, before = previous
    start = time.monotonic()  # a whole run's duration, measured on a run of the same size into another folder
    subprocess.run(command(model, out.parent / "timing", "0.5"), check=True)
    duration = time.monotonic() - start
    points = [("scratch made", lambda: bool(scratch_folders(out))),
              ("graph written", in_scratch(out, "model.onnx")),
              ("unpruned graph written", lambda: in_scratch(out, "model.onnx", 2)() or in_scratch(out, "report.json")()),
              ("report written", in_scratch(out, "report.json"))]
    points += [(f"{fraction:.0%} of a run", fraction) for fraction in (0.5, 0.8, 0.95)]
    outcomes = []
    for label, condition in points:
        process = subprocess.Popen(command(model, out, "0.5"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        launched = time.monotonic()
        if isinstance(condition, float):
            condition = (lambda f: lambda: time.monotonic() - launched >= f * duration)(condition)
        reached = wait_for(process, condition)
        process.kill()
        process.wait(timeout=60)
        if folder_hashes(out) == before:
            outcomes.append((label, reached, "previous"))
        else:  # killed after the atomic exchange: the new output, complete; it becomes the previous one
            assert_loadable_output(out, 0.5)
            outcomes.append((label, reached, "new"))
            before = folder_hashes(out)
        onnx.checker.check_model(str(out / "model.onnx"))
    # the first three points were really reached (the report exists only a moment before the exchange: best effort)
    assert [(reached, kept) for _, reached, kept in outcomes[:3]] == [(True, "previous")] * 3, outcomes
    # the next run removes what the killed ones left, and completes
    assert subprocess.run(command(model, out, "0.5")).returncode == 0
    assert_loadable_output(out, 0.5)
    assert hidden_leftovers(out) == []


def test_a_run_killed_between_the_two_fallback_renames_gets_its_previous_output_back(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; dying between them leaves OUT in the dead run's scratch."""
    from mone_export import safe_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous")
    monkeypatch.setattr(safe_output, "_exchange", lambda a, b: False)
    scratch = tmp_path / f".out{SCRATCH_TAG}dead"
    scratch.mkdir()
    (scratch / safe_output.LOCK_FILE).write_bytes(b"{}")  # unlocked: its process is gone
    os.rename(out, scratch / safe_output.PREVIOUS)  # the first rename happened, the second never did
    assert not out.exists()
    with safe_output.RunScratch(out) as run:  # the next run puts it back before anything else
        assert (out / "model.onnx").read_bytes() == b"previous" and not scratch.exists()
        built = run.folder("output")
        (built / "model.onnx").write_bytes(b"new")
        run.commit(built)  # the fallback path, whole this time
    assert (out / "model.onnx").read_bytes() == b"new" and hidden_leftovers(out) == []


def test_quiet_prints_nothing_and_logs_have_no_terminal_codes(model, tmp_path):
    """--quiet: no output at all on success; without it, a non-TTY log gets plain lines (no bars, no escapes);
    every file written is 0644 whatever the writer (mkstemp and safetensors use 0600)."""
    quiet = subprocess.run(command(model, tmp_path / "quiet", "0.5"), capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    args = [a for a in command(model, tmp_path / "log", "0.5") if a != "--quiet"]
    logged = subprocess.run(args, capture_output=True, text=True)
    assert logged.returncode == 0, logged.stderr
    text = logged.stdout + logged.stderr
    assert "\r" not in text and "\x1b" not in text and "Warning" not in text, text
    assert "calibrat" in logged.stderr  # the stages are still logged, one plain line each
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    for path in (tmp_path / "quiet").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644) & ~old_umask | 0, path
