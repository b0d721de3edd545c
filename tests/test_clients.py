"""Clients of the output folder besides onnxruntime-genai: transformers 5.x and 4.5x readers, Optimum.

Always run (main venv, transformers 5): the transformers files :func:`write_output_folder` writes for every bundled
model, rewritten for 4.x readers (:func:`make_readable_by_transformers_4`), read back by 5.x to the same config values,
special tokens and token ids as the files 5.x alone saves; no loader keys leak; ``rope_theta`` is top-level and the
model's.

Optimum (opt-in, under a minute): with ``MONE_OPTIMUM_PYTHON`` set to a Python that has ``optimum-onnx`` and
``transformers<4.58`` (the second venv of benchmarks/optimum_client_check.py), every bundled model is MoNE-pruned and
exported, the script's ``compare`` runs ``ORTModelForCausalLM`` on the folders in that Python (with the documented
cache-shape workaround, with and without IO binding), and here its greedy tokens must equal onnxruntime-genai's; the
config values and tokenizer ids transformers 4.57 reads must equal 5.x's; and Optimum without the workaround must fail
exactly where its KV-shape guess differs from the graph. Unset, these tests are skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from mone_export.export import cache_shapes
from mone_export.loading import BUNDLED_MODELS, bundled_model_path
from mone_export.output_folder import (
    GRAPH_TEXT_INPUTS,
    PORTABLE_TOKENIZER_CLASS,
    TOKENIZER_LOADER_KEYS,
    config_for_transformers_4,
    make_readable_by_transformers_4,
    tokenizer_config_for_transformers_4,
    write_output_folder,
)
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = ROOT / "benchmarks" / "optimum_client_check.py"
OPTIMUM_PYTHON = os.environ.get("MONE_OPTIMUM_PYTHON")
TEXTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "  émigré\t<|pad|>tabs\n\n", ""]
PROMPTS = ["def fibonacci(n):\n    ", "import os\n\nclass ", "The results of the"]
NEW_TOKENS = 12
# The README's "Optimum / transformers 4" example, for a folder ``out`` (kept identical to the README's block, if any,
# by test_readme_optimum_example_is_the_tested_one).
OPTIMUM_EXAMPLE = """\
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("out")
model = ORTModelForCausalLM.from_pretrained("out")
# Optimum-ONNX 0.1 takes the KV-cache shape from config.json only for some model types: use the graph's.
shape = {i.name: i.shape for i in model.session.get_inputs()}["past_key_values.0.key"]  # [batch, heads, past, size]
model.num_key_value_heads, model.embed_size_per_head = shape[1], shape[3]

inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
print(model.generate(**inputs, max_new_tokens=16, do_sample=False)[0].tolist())
"""

AVAILABLE = [name for name in BUNDLED_MODELS if bundled_model_path(name) is not None]
needs_bundled = pytest.mark.skipif(not AVAILABLE, reason="no bundled model under models/")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per bundled model: (model, tokenizer, output folder with a placeholder graph, what 5.x alone saves)."""
    from mone_export import load_model

    root = tmp_path_factory.mktemp("clients")
    graph = root / "placeholder.onnx"
    graph.write_bytes(b"not a graph: these tests read the transformers files only")
    made = {}
    for name in AVAILABLE:
        model, tokenizer = load_model(name)
        out = write_output_folder(model, tokenizer, graph, root / name)
        plain = root / f"{name}-5x"
        model.config.save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        made[name] = model, tokenizer, out, plain
    return made


def _config_dict(folder: Path) -> dict:
    values = transformers.AutoConfig.from_pretrained(folder).to_dict()
    values.pop("_name_or_path", None)  # where it was read from
    return values


def _tokenizer_view(tokenizer, texts=TEXTS) -> dict:
    """What a tokenizer does with text (the check script's view, so both venvs compare the same fields)."""
    return _check_script().tokenizer_view(tokenizer, texts)


# --- transformers 4.x spellings, read back by 5.x (always run) --------------------------------------------------------


@needs_bundled
@pytest.mark.parametrize("name", AVAILABLE)
def test_tokenizer_files_are_4x_spelled_and_read_the_same_by_5x(folders, name):
    _, tokenizer, out, plain = folders[name]
    written = _json(out / "tokenizer_config.json")
    assert written["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS  # 5.x saved TokenizersBackend, unknown to 4.x
    assert written["model_input_names"] == GRAPH_TEXT_INPUTS
    assert not set(TOKENIZER_LOADER_KEYS) & set(written), "5.x loader state leaked into tokenizer_config.json"
    assert not isinstance(written.get("extra_special_tokens"), list)  # 4.x wants a dict there
    assert _json(plain / "tokenizer_config.json")["tokenizer_class"] == "TokenizersBackend"  # what is fixed

    reread = transformers.AutoTokenizer.from_pretrained(out)
    assert _tokenizer_view(reread) == _tokenizer_view(transformers.AutoTokenizer.from_pretrained(plain))
    assert _tokenizer_view(reread) == _tokenizer_view(tokenizer)
    assert sorted(reread(PROMPTS[0])) == sorted(GRAPH_TEXT_INPUTS)  # no token_type_ids for the graph to reject


@needs_bundled
@pytest.mark.parametrize("name", AVAILABLE)
def test_config_has_top_level_rope_theta_and_reads_the_same_by_5x(folders, name):
    model, _, out, plain = folders[name]
    written, saved = _json(out / "config.json"), _json(plain / "config.json")
    source = _json(bundled_model_path(name) / "config.json")
    theta = model.config.rope_parameters["rope_theta"]
    assert written["rope_theta"] == theta == source["rope_parameters"]["rope_theta"]
    assert "rope_theta" not in saved  # 5.x alone keeps it inside rope_parameters; 4.57's Mixtral then uses 1e6
    assert written["rope_parameters"] == saved["rope_parameters"]
    assert "rope_scaling" not in written  # default RoPE: 4.x wants none
    assert {key: value for key, value in written.items() if key != "rope_theta"} == saved
    assert _config_dict(out) == _config_dict(plain)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e5},
])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_scaled_rope_gets_its_4x_rope_scaling(tmp_path, family, rope):
    config = tiny_config(family)
    config.rope_parameters = dict(rope)
    config.save_pretrained(tmp_path / "5x")
    saved = _json(tmp_path / "5x" / "config.json")
    converted = config_for_transformers_4(saved)
    assert converted["rope_theta"] == rope["rope_theta"]
    assert converted["rope_scaling"] == {key: value for key, value in rope.items() if key != "rope_theta"}
    (tmp_path / "4x").mkdir()
    (tmp_path / "4x" / "config.json").write_text(json.dumps(converted))
    assert _config_dict(tmp_path / "4x") == _config_dict(tmp_path / "5x")
    assert config_for_transformers_4(converted) == converted  # idempotent


def test_rope_per_layer_type_is_left_alone(caplog):
    nested = {"model_type": "x", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    with caplog.at_level(logging.WARNING, logger="mone_export.output_folder"):
        assert config_for_transformers_4(nested) == nested
    assert "per layer type" in caplog.text
    assert config_for_transformers_4({"model_type": "x"}) == {"model_type": "x"}  # no RoPE: nothing to add


def test_tokenizer_config_rewrite_rules():
    saved = {"backend": "tokenizers", "is_local": True, "local_files_only": False, "files_loaded": ["tokenizer.json"],
             "tokenizer_class": "TokenizersBackend", "eos_token": "</s>", "model_max_length": 128,
             "extra_special_tokens": ["<a>", "<b>"], "additional_special_tokens": ["<b>"]}
    converted = tokenizer_config_for_transformers_4(saved)
    assert converted == {"tokenizer_class": PORTABLE_TOKENIZER_CLASS, "eos_token": "</s>", "model_max_length": 128,
                         "additional_special_tokens": ["<b>", "<a>"], "model_input_names": GRAPH_TEXT_INPUTS}
    assert tokenizer_config_for_transformers_4(converted) == converted  # idempotent
    # Model-specific classes are kept (4.x builds their Fast class; genai's tokenizer keys on the name) ...
    assert tokenizer_config_for_transformers_4({"tokenizer_class": "Qwen2Tokenizer"})["tokenizer_class"] == \
        "Qwen2Tokenizer"
    # ... a missing one is named, and without tokenizer.json nothing is claimed about the class.
    assert tokenizer_config_for_transformers_4({})["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    assert tokenizer_config_for_transformers_4({"tokenizer_class": "TokenizersBackend"}, has_tokenizer_json=False)[
        "tokenizer_class"] == "TokenizersBackend"


@needs_bundled
def test_extra_special_tokens_read_the_same_by_5x(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path(AVAILABLE[0]))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|fim_prefix|>", "<|fim_suffix|>"]})
    tokenizer.save_pretrained(tmp_path / "5x")
    tokenizer.save_pretrained(tmp_path / "4x")
    make_readable_by_transformers_4(tmp_path / "4x")
    assert isinstance(_json(tmp_path / "5x" / "tokenizer_config.json")["extra_special_tokens"], list)
    assert _json(tmp_path / "4x" / "tokenizer_config.json")["additional_special_tokens"] == [
        "<|fim_prefix|>", "<|fim_suffix|>"]
    again = [transformers.AutoTokenizer.from_pretrained(tmp_path / kind) for kind in ("5x", "4x")]
    assert _tokenizer_view(again[0]) == _tokenizer_view(again[1])
    assert again[1]("a<|fim_prefix|>b")["input_ids"][1] == tokenizer.convert_tokens_to_ids("<|fim_prefix|>")


# --- Optimum's ORTModelForCausalLM (transformers 4.57) vs onnxruntime-genai and transformers 5 ------------------------

needs_optimum = pytest.mark.skipif(
    not OPTIMUM_PYTHON, reason="MONE_OPTIMUM_PYTHON is not set: point it to a Python with optimum-onnx and "
    "transformers<4.58 (see benchmarks/optimum_client_check.py) to compare Optimum's ORTModelForCausalLM with "
    "onnxruntime-genai")


def _check_script():
    """benchmarks/optimum_client_check.py as a module (its helpers run in any venv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("optimum_client_check", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def optimum_run(tmp_path_factory):
    """Every bundled model MoNE-pruned (ratio 0.5) and exported, then the check script's ``compare`` on the folders.

    Yields ``(exported, report, optimum)``: per model (pruned model, tokenizer, folder); the script's report; and the
    JSON of its Optimum half (what Optimum and transformers 4.x saw).
    """
    pytest.importorskip("onnxruntime_genai")
    from mone_export import apply_plan, collect_stats, load_model, plan_pruning

    probe = subprocess.run([OPTIMUM_PYTHON, "-c", "import optimum.onnxruntime"], capture_output=True, text=True)
    # Set but unusable is a broken setup (e.g. CI's second venv), not a reason to skip.
    assert probe.returncode == 0, f"MONE_OPTIMUM_PYTHON={OPTIMUM_PYTHON} has no optimum-onnx: {probe.stderr[-2000:]}"

    root = tmp_path_factory.mktemp("optimum")
    exported = {}
    for name in AVAILABLE:
        model, tokenizer = load_model(name)
        batch = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n" * 4, return_tensors="pt").input_ids
        plan = plan_pruning(collect_stats(model, [batch], progress=False), 0.5, method="mone")
        apply_plan(model, plan)
        exported[name] = model, tokenizer, write_output_folder(model, tokenizer, None, root / name, plan=plan)

    command = [sys.executable, str(CHECK_SCRIPT), "compare", "--optimum-python", OPTIMUM_PYTHON,
               "--folders", *(str(out) for *_, out in exported.values()), "--new-tokens", str(NEW_TOKENS),
               "--json", str(root / "report.json"), "--optimum-json", str(root / "optimum.json")]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert (root / "report.json").is_file(), run.stderr[-4000:]
    report, optimum = _json(root / "report.json"), _json(root / "optimum.json")
    assert optimum["versions"]["transformers"].startswith("4.")
    assert run.returncode == (0 if _check_script().passed(report) else 1), run.stdout  # the exit code tells the verdict
    yield exported, report, optimum


def _genai_greedy(folder: Path, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], list[int]]]:
    """onnxruntime-genai's (prompt ids, greedy tokens) per prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    return [_check_script().genai_generate(model, tokenizer, prompt, new_tokens) for prompt in prompts]


@needs_bundled
@needs_optimum
@pytest.mark.parametrize("name", AVAILABLE)
def test_optimum_generates_the_same_greedy_tokens_as_genai(optimum_run, name):
    exported, report, optimum = optimum_run
    _, tokenizer, out = exported[name]
    seen = optimum["folders"][str(out)]
    assert "error" not in seen, seen["error"]
    assert [row["prompt"] for row in seen["prompts"]] == PROMPTS
    genai = _genai_greedy(out, PROMPTS)
    for row, io_bound, prompt, (genai_ids, genai_tokens) in zip(seen["prompts"], seen["io_binding"], PROMPTS, genai):
        assert "error" not in row and "error" not in io_bound, (name, prompt, row.get("error"), io_bound.get("error"))
        assert row["input_names"] == sorted(GRAPH_TEXT_INPUTS)  # no token_type_ids for the graph to reject
        assert row["input_ids"] == genai_ids == tokenizer(prompt)["input_ids"], (name, prompt)
        assert len(genai_tokens) == NEW_TOKENS
        assert row["generated"] == genai_tokens, (name, prompt)
        assert io_bound["generated"] == genai_tokens, (name, prompt)  # IO binding: output buffers Optimum sizes
    verdict = report["models"][str(out)]
    assert verdict["tokens_equal"] and all(row["first_difference"] is None for row in verdict["prompts"])


@needs_bundled
@needs_optimum
@pytest.mark.parametrize("name", AVAILABLE)
def test_transformers_4_reads_the_same_config_values(optimum_run, name):
    exported, report, optimum = optimum_run
    model, _, out = exported[name]
    config_4x = optimum["folders"][str(out)]["config"]
    config_5x = json.loads(json.dumps(transformers.AutoConfig.from_pretrained(out).to_dict()))  # as 4.x's came
    written = _json(out / "config.json")

    assert config_4x["rope_theta"] == model.config.rope_parameters["rope_theta"]  # not 4.57's own default (1e6)
    assert config_4x.get("rope_scaling") is None and config_5x["rope_parameters"]["rope_type"] == "default"
    assert not config_5x.keys() - config_4x.keys()
    for key in config_5x.keys() & config_4x.keys():
        if key == "transformers_version" or config_4x[key] == config_5x[key]:
            continue
        # The one spelling difference: sliding window off, which 4.57's Qwen2-MoE stores as None and 5.x as 0.
        assert key == "sliding_window" and (config_4x[key], config_5x[key]) == (None, 0), (name, key)
        assert config_4x["use_sliding_window"] is config_5x["use_sliding_window"] is False, name
    # What only 4.x has: its defaults for settings 5.x dropped (generation defaults, training losses), not the file's.
    assert not (config_4x.keys() - config_5x.keys() - {"rope_theta", "rope_scaling"}) & written.keys(), name
    assert not report["models"][str(out)]["config_differences"]

    generation_4x = optimum["folders"][str(out)]["generation_config"]
    generation_5x = transformers.GenerationConfig.from_pretrained(out).to_dict()
    for key in _json(out / "generation_config.json").keys() - {"transformers_version"}:
        assert generation_4x.get(key) == generation_5x[key], (name, key)


@needs_bundled
@needs_optimum
@pytest.mark.parametrize("name", AVAILABLE)
def test_transformers_4_tokenizes_the_same(optimum_run, name):
    exported, report, optimum = optimum_run
    _, tokenizer, out = exported[name]
    seen = optimum["folders"][str(out)]["tokenizer"]
    assert seen["class"] == PORTABLE_TOKENIZER_CLASS
    expected = _tokenizer_view(transformers.AutoTokenizer.from_pretrained(out), optimum["texts"])
    assert {key: value for key, value in seen.items() if key != "class"} == \
        {key: value for key, value in expected.items() if key != "class"}
    assert [enc["input_ids"] for enc in seen["encoded"]] == [tokenizer(text)["input_ids"] for text in optimum["texts"]]
    assert report["models"][str(out)]["tokenizer_equal"]


@needs_bundled
@needs_optimum
@pytest.mark.parametrize("name", AVAILABLE)
def test_optimum_as_is_fails_only_where_it_guesses_the_cache_shape(optimum_run, name):
    """The documented gap: Optimum's own KV shape, the graph's, and the error ORT gives when they differ."""
    exported, _, optimum = optimum_run
    model, _, out = exported[name]
    seen = optimum["folders"][str(out)]
    spec = cache_shapes(model.config)[0]
    assert seen["graph_cache_shape"] == [spec.heads, spec.key_dim]
    if seen["optimum_cache_shape"] == seen["graph_cache_shape"]:  # Optimum's guess is right: it works as it is
        assert seen["as_is"]["generated"] == seen["prompts"][0]["generated"]
    else:
        assert "Got invalid dimensions for input: past_key_values" in seen["as_is"].get("error", ""), seen["as_is"]


@needs_bundled
@needs_optimum
@pytest.mark.parametrize("name", [n for n in AVAILABLE if n in ("mixtral", "deepseek_v2")])  # GQA; MLA cache
def test_optimum_example_generates_genai_tokens(optimum_run, tmp_path, name):
    """The copy-paste example, run as it is in the Optimum Python on a folder called ``out``."""
    exported, _, _ = optimum_run
    (tmp_path / "out").symlink_to(exported[name][2], target_is_directory=True)
    run = subprocess.run([OPTIMUM_PYTHON, "-c", OPTIMUM_EXAMPLE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    [(ids, tokens)] = _genai_greedy(exported[name][2], ["def fibonacci(n):"], new_tokens=16)
    assert json.loads(run.stdout.splitlines()[-1]) == ids + tokens


OPTIMUM_BATCH = """\
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], padding_side="left")
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
shape = {i.name: i.shape for i in model.session.get_inputs()}["past_key_values.0.key"]
model.num_key_value_heads, model.embed_size_per_head = shape[1], shape[3]
prompts = json.loads(sys.argv[2])
alone = [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=12, do_sample=False)[0].tolist()
         for p in prompts]
batch = tokenizer(prompts, return_tensors="pt", padding=True)
together = model.generate(**batch, max_new_tokens=12, do_sample=False).tolist()
width = batch["input_ids"].shape[1]
print(json.dumps({"padding": (1 - batch["attention_mask"]).sum(-1).tolist(),
                  "alone": [a[len(tokenizer(p).input_ids):] for p, a in zip(prompts, alone)],
                  "together": [t[width:] for t in together]}))
"""


@needs_bundled
@needs_optimum
def test_optimum_batched_generate_on_the_default_export(tmp_path):
    """The command line's default export (GroupQueryAttention) under Optimum's batched ``generate``: prompts of
    different lengths, left-padded, give each prompt's own greedy tokens."""
    from mone_export.export_pipeline import export_model
    from mone_export.pipeline import CalibrationOptions

    out = tmp_path / "out"
    report = export_model("mixtral", 0.5, out, calib=CalibrationOptions(samples=8, seq_len=64), validate=False,
                          progress=False)
    assert report["attention"] == "gqa"
    prompts = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os", "The results of the"]
    run = subprocess.run([OPTIMUM_PYTHON, "-c", OPTIMUM_BATCH, str(out), json.dumps(prompts)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert min(result["padding"]) == 0 and max(result["padding"]) >= 10  # really padded, by different amounts
    assert result["together"] == result["alone"]


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_optimum_example_is_the_tested_one():
    """A README example that loads an export with ORTModelForCausalLM is the one tested above, letter for letter."""
    for block in _readme_python_blocks():
        if "ORTModelForCausalLM.from_pretrained" in block:
            assert block == OPTIMUM_EXAMPLE, "README's Optimum example differs from tests/test_clients.py's"


def test_check_script_helpers():
    script = _check_script()
    assert script.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert script.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert script.first_difference([1, 2], [1, 2, 3]) == 2
    rope = {"rope_type": "default", "rope_theta": 1e4}
    config_5x = {"model_type": "mixtral", "num_key_value_heads": 2, "rope_parameters": rope,
                 "transformers_version": "5.24.0"}
    config_4x = {**config_5x, "rope_theta": 1e4, "rope_scaling": None, "top_k": 50, "transformers_version": "4.57.6"}
    assert script.config_differences(config_4x, config_5x, written=config_5x) == {}
    # 4.57's Mixtral on a file without a top-level rope_theta: its own default, which the check must catch.
    assert "rope_theta / rope_scaling" in script.config_differences({**config_4x, "rope_theta": 1e6}, config_5x, {})
    assert script.config_differences({**config_4x, "num_key_value_heads": 4}, config_5x, {}) == {
        "num_key_value_heads": [4, 2]}
    # A key the file sets that 5.x dropped is a difference; 4.x's own defaults are not.
    assert script.config_differences(config_4x, config_5x, written={"top_k": 50}) == {"top_k": [50, None]}


def test_check_script_help_needs_no_optimum():
    """The script parses its arguments before importing optimum, so ``--help`` works in any venv."""
    for command in ([], ["compare"], ["optimum"]):
        run = subprocess.run([sys.executable, str(CHECK_SCRIPT), *command, "--help"], capture_output=True, text=True)
        assert run.returncode == 0 and "usage" in run.stdout, run.stderr
    assert "ORTModelForCausalLM" in subprocess.run([sys.executable, str(CHECK_SCRIPT), "--help"], capture_output=True,
                                                   text=True).stdout
