"""Hostile inputs, table-driven: each one exits with its code and one line on stderr, and writes nothing.

Every case runs ``mone-export`` in-process against a workspace (a tiny checkpoint, calibration files, a previous
prune output and a previous export) and a case folder of its own. Around each run the test hashes every file of the
workspace, the case folder and the bundled models, and asserts that nothing was created, changed or removed (no
output, no scratch, inputs intact), that stderr is exactly one line naming the problem, and that no crash log was
written (a user mistake is not a bug).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import transformers

from mone_export import safe_output
from mone_export.cli import main
from mone_export.loading import PRUNED_WEIGHTS, bundled_model_path
from tiny_models import tiny_model

CALIB = ["--calib", "random", "--calib-samples", "4", "--seq-len", "8"]
BUNDLED_DIR = bundled_model_path("mixtral").parent
TEXT = "def add(a, b):\n    return a + b\n\n" * 200


@dataclass(frozen=True)
class Workspace:
    """The inputs every case may point at; none of them may change."""

    root: Path
    model: Path  # a tiny mixtral checkpoint (legacy per-expert tensor names, as transformers saves them)
    calib_txt: Path
    calib_jsonl: Path
    pruned: Path  # a previous `prune` output (a pruned checkpoint with plan/)
    exported: Path  # a previous `export --no-validate` output


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_torch_thread) -> Workspace:
    root = tmp_path_factory.mktemp("hostile")
    model = root / "model"
    tiny_model("mixtral", seed=0).save_pretrained(model)
    calib_txt = root / "calib.txt"
    calib_txt.write_text(TEXT)
    calib_jsonl = root / "calib.jsonl"
    calib_jsonl.write_text("".join(json.dumps({"text": TEXT[i:i + 300]}) + "\n" for i in range(0, 3000, 300)))
    pruned, exported = root / "pruned", root / "exported"
    assert main(["prune", "--model", str(model), "--ratio", "0.5", "-o", str(pruned), *CALIB, "--quiet"]) == 0
    assert main(["export", "--model", str(model), "--plan", str(pruned), "-o", str(exported), "--no-validate",
                 "--quiet"]) == 0
    return Workspace(root, model, calib_txt, calib_jsonl, pruned, exported)


# --- helpers that build broken inputs in the case folder ------------------------------------------------------------


def copy_model(ws: Workspace, case: Path, name: str = "model") -> Path:
    target = case / name
    shutil.copytree(ws.model, target)
    return target


def rewrite_safetensors(path: Path, edit: Callable[[dict], dict]) -> None:
    """Rewrite a safetensors file through ``edit({name: (header entry, bytes)})`` (offsets recomputed)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = raw[8 + length:]
    metadata = header.pop("__metadata__", None)
    tensors = {name: (entry, data[entry["data_offsets"][0]:entry["data_offsets"][1]]) for name, entry in header.items()}
    new_header, blobs, offset = {}, [], 0
    for name, (entry, blob) in edit(tensors).items():
        new_header[name] = {**entry, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        new_header["__metadata__"] = metadata
    encoded = json.dumps(new_header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def drop_tensor(fragment: str):
    def edit(tensors):
        name = next(n for n in sorted(tensors) if fragment in n)
        del tensors[name]
        return tensors
    return edit


def add_tensor(name: str):
    def edit(tensors):
        tensors[name] = ({"dtype": "F32", "shape": [2]}, b"\0" * 8)
        return tensors
    return edit


def reshape_tensor(fragment: str):
    def edit(tensors):
        name = next(n for n in sorted(tensors) if fragment in n)
        entry, blob = tensors[name]
        half = len(blob) // 2
        tensors[name] = ({**entry, "shape": [half // 4]}, blob[:half])
        return tensors
    return edit


def broken_checkpoint(edit):
    def build(ws, case, monkeypatch):
        model = copy_model(ws, case)
        rewrite_safetensors(model / "model.safetensors", edit)
        return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]
    return build


def truncated_checkpoint(ws, case, monkeypatch):
    model = copy_model(ws, case)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def garbage_checkpoint(ws, case, monkeypatch):
    model = copy_model(ws, case)
    (model / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def partial_download(ws, case, monkeypatch):
    """A sharded checkpoint whose index lists a shard that never arrived (an interrupted download)."""
    model = copy_model(ws, case)
    weights = model / "model.safetensors"
    shard = "model-00001-of-00002.safetensors"
    weights.rename(model / shard)
    raw = (model / shard).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    names = [n for n in json.loads(raw[8:8 + length]) if n != "__metadata__"]
    index = {"metadata": {}, "weight_map": {n: shard for n in names}}
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def no_weights(ws, case, monkeypatch):
    model = copy_model(ws, case)
    (model / "model.safetensors").unlink()
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def weights_is_a_folder(ws, case, monkeypatch):
    model = copy_model(ws, case)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def garbage_config(ws, case, monkeypatch):
    model = copy_model(ws, case)
    (model / "config.json").write_text("{not json")
    return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def config_edit(**changes):
    """A checkpoint whose config.json was edited (a typo'd expert count would ask for terabytes at load)."""
    def build(ws, case, monkeypatch):
        model = copy_model(ws, case)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, **changes}))
        return ["prune", "--model", str(model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]
    return build


def dense_model(ws, case, monkeypatch):
    dense = case / "llama"
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=8)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    return ["prune", "--model", str(dense), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def calib_file(content: bytes, name: str):
    def build(ws, case, monkeypatch):
        path = case / name
        path.write_bytes(content)
        return ["prune", "--model", "mixtral", "--ratio", "0.5", "-o", str(case / "out"), "--calib-data", str(path),
                "--calib-samples", "2", "--seq-len", "8"]
    return build


def calib_is_a_folder(ws, case, monkeypatch):
    (case / "texts.txt").mkdir()
    return ["prune", "--model", "mixtral", "--ratio", "0.5", "-o", str(case / "out"), "--calib-data",
            str(case / "texts.txt")]


def symlinked_output(ws, case, monkeypatch):
    (case / "real").mkdir()
    (case / "link").symlink_to(case / "real")
    return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(case / "link"), *CALIB]


def output_is_a_file(ws, case, monkeypatch):
    (case / "out").write_text("precious")
    return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def foreign_folder(overwrite: bool, name: str = "thesis.tex"):
    """A folder of the user's (a report.json of some other tool's looks like ours to a careless check)."""
    def build(ws, case, monkeypatch):
        (case / "out").mkdir()
        (case / "out" / name).write_text("precious")
        extra = ["--overwrite"] if overwrite else []
        return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB, *extra]
    return build


def previous_output_without_overwrite(ws, case, monkeypatch):
    return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(ws.pruned), *CALIB]


def read_only_parent(ws, case, monkeypatch):
    """We may run as root, who can write anywhere: simulate a read-only parent through ``os.access``."""
    locked = case / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(safe_output.os, "access",
                        lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(locked / "out"), *CALIB]


def disk_full(ws, case, monkeypatch):
    """The disk fills up late in the run: the pruned weights are written, the plan's novices only half."""
    import mone_export.plan

    def save_file(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 4096)  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(mone_export.plan, "save_file", save_file)
    return ["prune", "--model", str(ws.model), "--ratio", "0.5", "-o", str(case / "out"), *CALIB]


def plan_of_other_weights(ws, case, monkeypatch):
    """A checkpoint of the same shape but other weights than the plan was computed on."""
    other = case / "other"
    tiny_model("mixtral", seed=1).save_pretrained(other)
    return ["export", "--model", str(other), "--plan", str(ws.pruned), "-o", str(case / "out"), "--no-validate"]


def tampered_novices(ws, case, monkeypatch):
    """A plan folder whose stored novice ids disagree with the experts the plan prunes."""
    import safetensors.torch

    plan = case / "plan"
    shutil.copytree(ws.pruned / "plan", plan)
    tensors = safetensors.torch.load_file(plan / "novices.safetensors")
    name = next(n for n in sorted(tensors) if n.startswith("experts."))
    tensors[name] = tensors[name].flip(0) + 1
    safetensors.torch.save_file(tensors, plan / "novices.safetensors")
    return ["export", "--model", str(ws.model), "--plan", str(plan), "-o", str(case / "out"), "--no-validate"]


def garbage_plan(ws, case, monkeypatch):
    plan = case / "plan"
    shutil.copytree(ws.pruned / "plan", plan)
    (plan / "plan.json").write_text("[1, 2")
    return ["export", "--model", str(ws.model), "--plan", str(plan), "-o", str(case / "out"), "--no-validate"]


def edited_plan(edit):
    """A copy of the previous prune's plan with ``edit(plan.json dict)`` applied (a hand-edited plan)."""
    def build(ws, case, monkeypatch):
        plan = case / "plan"
        shutil.copytree(ws.pruned / "plan", plan)
        data = json.loads((plan / "plan.json").read_text())
        edit(data)
        (plan / "plan.json").write_text(json.dumps(data))
        return ["export", "--model", str(ws.model), "--plan", str(plan), "-o", str(case / "out"), "--no-validate"]
    return build


def _set_first_layer(data, value):
    data["pruned"][next(iter(data["pruned"]))] = value


def plan_of_other_model(family: str):
    """The tiny mixtral's plan on a bundled model (of the same or another family)."""
    def build(ws, case, monkeypatch):
        return ["export", "--model", family, "--plan", str(ws.pruned), "-o", str(case / "out"), "--no-validate"]
    return build


def validate_without_plan(ws, case, monkeypatch):
    folder = case / "export"
    shutil.copytree(ws.exported, folder)
    shutil.rmtree(folder / "plan")
    return ["validate", str(folder), "--model", str(ws.model), "--no-latency"]


def broken_export(edit):
    """A copy of the previous export whose files ``edit(folder)`` damaged (an interrupted copy)."""
    def build(ws, case, monkeypatch):
        folder = case / "export"
        shutil.copytree(ws.exported, folder)
        edit(folder)
        return ["validate", str(folder), "--model", str(ws.model), "--no-latency"]
    return build


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def missing_pruned_weights(ws, case, monkeypatch):
    pruned = case / "pruned"
    shutil.copytree(ws.pruned, pruned)
    (pruned / PRUNED_WEIGHTS).unlink()
    return ["export", "--model", str(pruned), "--ratio", "0.5", "-o", str(case / "out"), *CALIB, "--no-validate"]


def argv(*args: str) -> Callable:
    """A case that is only its command line; ``{model}``, ``{pruned}``, ``{exported}``, ``{calib}``, ``{out}``,
    ``{case}`` and ``{models}`` are filled in."""
    def build(ws, case, monkeypatch):
        fields = {"model": ws.model, "pruned": ws.pruned, "exported": ws.exported, "calib": ws.calib_txt,
                  "jsonl": ws.calib_jsonl, "out": case / "out", "case": case, "models": BUNDLED_DIR,
                  "root": ws.root}
        return [arg.format(**fields) for arg in args]
    return build


def prune(*extra: str, out: str = "{out}", model: str = "{model}") -> Callable:
    return argv("prune", "--model", model, "-o", out, *extra)


def export(*extra: str, out: str = "{out}", model: str = "{model}") -> Callable:
    return argv("export", "--model", model, "-o", out, *extra)


R = ["--ratio", "0.5"]

# (id, build, exit code, a substring of the one stderr line)
CASES = [
    # outputs that would destroy an input
    ("out-is-model", prune(*R, *CALIB, "--overwrite", out="{model}"), 2, "is the model folder"),
    ("out-contains-model", prune(*R, *CALIB, "--overwrite", out="{root}"), 2, "contains the model folder"),
    ("out-inside-model", prune(*R, *CALIB, out="{model}/sub"), 2, "lies inside the model folder"),
    ("out-is-bundled-model", prune(*R, *CALIB, "--overwrite", model="mixtral", out="{models}/mixtral"), 2,
     "bundled models"),
    ("out-inside-bundled-models", prune(*R, *CALIB, out="{models}/mine"), 2, "lies inside the bundled models"),
    ("out-is-calib-file", prune(*R, "--calib-data", "{calib}", "--overwrite", model="mixtral", out="{calib}"), 2,
     "calibration"),
    ("out-inside-plan", export("--plan", "{pruned}/plan", "--no-validate", out="{pruned}/plan/x"), 2,
     "lies inside the plan"),
    ("out-is-plan-source", export("--plan", "{pruned}", "--no-validate", "--overwrite", out="{pruned}"), 2,
     "contains the plan"),
    ("prune-out-is-source", prune(*R, *CALIB, "--overwrite", model="{pruned}", out="{pruned}"), 2,
     "is the model folder"),
    ("out-is-root", prune(*R, *CALIB, "--overwrite", out="/"), 2, "contains the"),
    # outputs that are not a place to write
    ("out-symlink", symlinked_output, 2, "symbolic link"),
    ("out-is-file", output_is_a_file, 2, "not a folder"),
    ("out-foreign-no-overwrite", foreign_folder(False), 2, "--overwrite"),
    ("out-foreign-overwrite", foreign_folder(True), 2, "not written by mone-export"),
    ("out-foreign-report-overwrite", foreign_folder(True, "report.json"), 2, "not written by mone-export"),
    ("out-previous-no-overwrite", previous_output_without_overwrite, 2, "--overwrite"),
    ("out-read-only", read_only_parent, 2, "not writable"),
    ("out-weights-onnx", export(*R, *CALIB, "--no-validate", out="{case}/weights.onnx"), 2, "model.onnx"),
    ("out-disk-full", disk_full, 1, "No space left on device"),
    # numbers
    ("ratio-one", prune("--ratio", "1.0", *CALIB), 2, "outside [0, 1)"),
    ("ratio-negative", prune("--ratio", "-0.5", *CALIB), 2, "outside [0, 1)"),
    ("ratio-nan", prune("--ratio", "nan", *CALIB), 2, "outside [0, 1)"),
    ("ratio-inf", prune("--ratio", "inf", *CALIB), 2, "outside [0, 1)"),
    ("ratio-word", prune("--ratio", "half", *CALIB), 2, "--ratio"),
    ("samples-zero", prune(*R, "--calib", "random", "--calib-samples", "0", "--seq-len", "8"), 2, "--calib-samples"),
    ("samples-negative", prune(*R, "--calib", "random", "--calib-samples", "-5", "--seq-len", "8"), 2,
     "--calib-samples"),
    ("samples-huge", prune(*R, "--calib", "random", "--calib-samples", str(10 ** 12), "--seq-len", "8"), 2,
     "calibration tokens"),
    ("seq-len-one", prune(*R, "--calib", "random", "--calib-samples", "4", "--seq-len", "1"), 2, "--seq-len"),
    ("seq-len-beyond-context", prune(*R, "--calib", "random", "--calib-samples", "1", "--seq-len", "100000"), 2,
     "max_position_embeddings"),
    ("seed-negative", prune(*R, *CALIB, "--seed", "-1"), 2, "--seed"),
    ("seed-huge", prune(*R, *CALIB, "--seed", str(2 ** 64)), 2, "--seed"),
    ("atol-nan", export(*R, *CALIB, "--atol", "nan"), 2, "--atol"),
    ("atol-negative", export(*R, *CALIB, "--atol", "-1"), 2, "--atol"),
    ("atol-inf", export(*R, *CALIB, "--atol", "inf"), 2, "--atol"),
    ("dtype-unknown", export(*R, *CALIB, "--dtype", "int3"), 2, "--dtype"),
    ("method-unknown", prune(*R, *CALIB, "--method", "vibes"), 2, "vibes"),
    ("scope-unknown", prune(*R, *CALIB, "--scope", "galaxy"), 2, "galaxy"),
    ("calib-unknown", prune(*R, "--calib", "wikipedia"), 2, "wikipedia"),
    ("provider-unknown", export(*R, *CALIB, "--provider", "tpu"), 2, "--provider"),
    ("no-command-options", argv("export", "--ratio", "0.5"), 2, "--model"),
    # calibration files
    ("calib-missing", prune(*R, "--calib-data", "{case}/nope.txt", model="mixtral"), 2, "not found"),
    ("calib-folder", calib_is_a_folder, 2, "is not a file"),
    ("calib-empty", calib_file(b"", "empty.txt"), 2, "is empty"),
    ("calib-nul-txt", calib_file(b"text\x00\x01\x02" * 50, "binary.txt"), 2, "binary"),
    ("calib-binary-jsonl", calib_file(bytes(range(256)) * 4, "binary.jsonl"), 2, "binary"),
    ("calib-latin1", calib_file("café crème brûlée ".encode("latin-1") * 50, "latin1.txt"), 2, "not UTF-8"),
    ("calib-bad-json-line", calib_file(b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl"), 2, "not valid JSON"),
    ("calib-no-text-field", calib_file(b'{"body": "fine"}\n', "nofield.jsonl"), 2, '"text"'),
    ("calib-extension", calib_file(b"hello", "texts.parquet"), 2, "extension"),
    # models
    ("model-missing", prune(*R, *CALIB, model="{case}/nope"), 2, "not found"),
    ("model-is-file", prune(*R, *CALIB, model="{calib}"), 2, "not a model folder"),
    ("model-no-config", prune(*R, *CALIB, model="{case}"), 2, "no config.json"),
    ("model-garbage-config", garbage_config, 2, "config"),
    ("model-dense", dense_model, 2, "'llama' is not a Mixture-of-Experts architecture"),
    ("model-empty-name", prune(*R, *CALIB, model=""), 2, "model name is empty"),
    ("model-config-huge-experts", config_edit(num_local_experts=10 ** 9), 2, "does not match the checkpoint"),
    ("model-config-negative-size", config_edit(hidden_size=-16), 2, "negative dimension"),
    ("model-config-no-model-type", config_edit(model_type=None), 2, "config"),
    ("out-empty", prune(*R, *CALIB, out=""), 2, "-o is empty"),
    ("model-unknown-name", prune(*R, *CALIB, model="mixtral-8x7b"), 2, "not found"),
    # checkpoints
    ("ckpt-missing-q-proj", broken_checkpoint(drop_tensor("layers.0.self_attn.q_proj")), 2, "q_proj"),
    ("ckpt-missing-expert", broken_checkpoint(drop_tensor("experts.1.w2")), 2, "experts.1.w2"),
    ("ckpt-unexpected", broken_checkpoint(add_tensor("model.layers.0.bogus.weight")), 2, "bogus"),
    ("ckpt-wrong-shape", broken_checkpoint(reshape_tensor("layers.1.self_attn.o_proj")), 2, "o_proj"),
    ("ckpt-truncated", truncated_checkpoint, 2, "truncated"),
    ("ckpt-garbage", garbage_checkpoint, 2, "model.safetensors"),
    ("ckpt-no-weights", no_weights, 2, "has no weights"),
    ("ckpt-weights-folder", weights_is_a_folder, 2, "not a file"),
    ("ckpt-partial-download", partial_download, 2, "model-00002-of-00002.safetensors"),
    ("pruned-missing-weights", missing_pruned_weights, 2, PRUNED_WEIGHTS),
    # plans
    ("plan-missing", export("--plan", "{case}/noplan", "--no-validate"), 2, "plan.json"),
    ("plan-with-ratio", export("--plan", "{pruned}", *R, "--no-validate"), 2, "drop --ratio"),
    ("plan-other-weights", plan_of_other_weights, 2, "--allow-other-weights"),
    ("plan-tampered-novices", tampered_novices, 2, "novices"),
    ("plan-garbage-json", garbage_plan, 2, "plan.json"),
    ("plan-ids-out-of-range", edited_plan(lambda d: _set_first_layer(d, [99, 100, 101])), 2, "different plans"),
    ("plan-ids-not-numbers", edited_plan(lambda d: _set_first_layer(d, "abc")), 2, "not a complete pruning plan"),
    ("plan-ratio-not-number", edited_plan(lambda d: d.update(ratio="x")), 2, "not a complete pruning plan"),
    ("plan-other-model", plan_of_other_model("mixtral"), 2, "made for another model"),
    ("plan-other-family", plan_of_other_model("qwen2_moe"), 2, "model_type 'mixtral'"),
    # validate
    ("validate-no-onnx", argv("validate", "{pruned}", "--model", "{model}"), 2, "model.onnx"),
    ("validate-no-plan", validate_without_plan, 2, "no plan/"),
    ("validate-truncated-onnx", broken_export(lambda f: _truncate(f / "model.onnx", 1000)), 2, "truncated or corrupt"),
    ("validate-onnx-is-text", broken_export(lambda f: (f / "model.onnx").write_text("hello")), 2, "not a complete"),
    ("validate-atol-nan", argv("validate", "{exported}", "--model", "{model}", "--atol", "nan"), 2, "--atol"),
    ("validate-missing-folder", argv("validate", "{case}/nothing"), 2, "nothing"),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` (links not followed): path → content hash (or kind)."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                path = Path(dirpath, name)
                state[str(path)] = "link" if path.is_symlink() else "dir"
            for name in filenames:
                path = Path(dirpath, name)
                state[str(path)] = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def test_there_are_enough_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name,build,code,message", CASES, ids=[case[0] for case in CASES])
def test_hostile_input(name, build, code, message, ws, tmp_path, monkeypatch, capsys):
    case = tmp_path / "case"
    case.mkdir()
    logs = tmp_path / "logs"
    monkeypatch.setenv("MONE_EXPORT_LOG_DIR", str(logs))
    args = build(ws, case, monkeypatch)
    before = snapshot(ws.root, case, BUNDLED_DIR)
    capsys.readouterr()
    assert main([*args, "--quiet"]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    monkeypatch.undo()
    assert snapshot(ws.root, case, BUNDLED_DIR) == before  # nothing written, nothing touched, no scratch left
    assert not logs.exists()  # a user mistake is not a crash


def test_a_short_or_missing_external_data_file_is_named(tmp_path):
    """Large exports keep their weights in model.onnx.data: a truncated copy of it is refused before ORT reads it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from mone_export.errors import UsageError
    from mone_export.export_pipeline import check_onnx_file

    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    check_onnx_file(path)  # whole: accepted
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UsageError, match="holds 1000 bytes, the graph needs 16384"):
        check_onnx_file(path)
    data.unlink()
    with pytest.raises(UsageError, match="model.onnx.data is missing"):
        check_onnx_file(path)
