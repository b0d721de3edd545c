"""Clients of the output folder besides onnxruntime-genai: transformers 5.x and 4.5x readers, Optimum.

Always run (main venv, transformers 5): the transformers files :func:`write_output_folder` writes for every bundled
model, rewritten for 4.x readers (:func:`make_readable_by_transformers_4`), read back by 5.x to the same config values,
special tokens and token ids as the files 5.x alone saves; no loader keys leak; ``rope_theta`` is top-level and the
model's.

Optimum (opt-in): with ``MONE_OPTIMUM_PYTHON`` set to a Python that has ``optimum-onnx`` and ``transformers<4.58``,
every bundled model is pruned and exported, ``benchmarks/optimum_client_check.py`` runs ``ORTModelForCausalLM`` on the
folders in that Python, and its greedy tokens must equal onnxruntime-genai's and transformers 5's ``generate`` (and
its transformers 4.x config and token ids transformers 5's).
"""

from __future__ import annotations

import json
import logging
import os
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


def _tokenizer_view(tokenizer) -> dict:
    """What a tokenizer does with text: class, vocabulary size, special tokens, ids and decoding."""
    return {
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "special": {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                             "unk_token_id")},
        "all_special_tokens": tokenizer.all_special_tokens,
        "max_length": tokenizer.model_max_length,
        "encoded": [dict(tokenizer(text)) for text in TEXTS],
        "decoded": [tokenizer.decode(tokenizer(text)["input_ids"]) for text in TEXTS],
    }


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


def _genai_greedy(folder: Path, prompt: str) -> tuple[list[int], list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = [int(t) for t in og.Tokenizer(model).encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return ids, [int(t) for t in generator.get_sequence(0)[len(ids):]]


def _torch_greedy(model, tokenizer, prompt: str) -> list[int]:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def _rope_4x(values: dict) -> dict:
    """The RoPE a 4.x config holds, in 5.x's ``rope_parameters`` form."""
    return {"rope_type": "default", **(values["rope_scaling"] or {}), "rope_theta": values["rope_theta"]}


@needs_bundled
@pytest.mark.skipif(not OPTIMUM_PYTHON, reason="MONE_OPTIMUM_PYTHON is not set: point it to a Python with "
                    "optimum-onnx and transformers<4.58 (see benchmarks/optimum_client_check.py) to compare Optimum's "
                    "ORTModelForCausalLM with onnxruntime-genai")
def test_optimum_generates_the_same_greedy_tokens_as_genai(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from mone_export import apply_plan, collect_stats, load_model, plan_pruning

    probe = subprocess.run([OPTIMUM_PYTHON, "-c", "import optimum.onnxruntime"], capture_output=True, text=True)
    # Set but unusable is a broken setup (e.g. CI's second venv), not a reason to skip.
    assert probe.returncode == 0, f"MONE_OPTIMUM_PYTHON={OPTIMUM_PYTHON} has no optimum-onnx: {probe.stderr[-2000:]}"

    exported = {}
    for name in AVAILABLE:
        model, tokenizer = load_model(name)
        batch = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n" * 4, return_tensors="pt").input_ids
        plan = plan_pruning(collect_stats(model, [batch], progress=False), 0.5, method="mone")
        apply_plan(model, plan)
        exported[name] = model, tokenizer, write_output_folder(model, tokenizer, None, tmp_path / name, plan=plan)

    command = [OPTIMUM_PYTHON, str(CHECK_SCRIPT), *(str(out) for *_, out in exported.values()),
               "--new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    assert report["versions"]["transformers"].startswith("4.")

    for name, (model, tokenizer, out) in exported.items():
        seen = report["folders"][str(out)]
        assert seen["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
        spec = cache_shapes(model.config)[0]
        assert seen["graph_cache_shape"] == [spec.heads, spec.key_dim]
        config_4x = seen["config"]
        config_5x = transformers.AutoConfig.from_pretrained(out)
        assert _rope_4x(config_4x) == config_5x.rope_parameters, name
        for key, value in config_4x.items():
            if key not in ("rope_theta", "rope_scaling"):
                assert value == getattr(config_5x, key, None), (name, key)
        for row, prompt in zip(seen["prompts"], PROMPTS):
            genai_ids, genai_tokens = _genai_greedy(out, prompt)
            assert row["input_names"] == sorted(GRAPH_TEXT_INPUTS)
            assert row["input_ids"] == genai_ids == tokenizer(prompt)["input_ids"], (name, prompt)
            assert row["generated"] == genai_tokens == _torch_greedy(model, tokenizer, prompt), (name, prompt)


def test_check_script_help_needs_no_optimum():
    """The script parses its arguments before importing optimum, so ``--help`` works in any venv."""
    run = subprocess.run([sys.executable, str(CHECK_SCRIPT), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "ORTModelForCausalLM" in run.stdout
