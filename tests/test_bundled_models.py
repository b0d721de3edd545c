"""The bundled checkpoints (models/<family>/, trained by models/train.py): resolvable, loadable, small, as carded.

Fast (well under a minute on one CPU thread): every model is loaded once per module, the perplexity
check uses the card's own 64 x 128-token held-out chunks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mone_export
from mone_export import evaluate
from mone_export.adapters import moe_layers_or_error
from mone_export.loading import BUNDLED_MODELS, bundled_model_path, resolve_model_path
from mone_export.plan import PruningPlan

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
MAX_FOLDER_BYTES = 10_000_000
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "CARD.md", "card.json")




pytestmark = pytest.mark.usefixtures("one_torch_thread")


_LOADED: dict[str, tuple] = {}


def loaded(name: str):
    """``load_model(name)``, once per test session."""
    if name not in _LOADED:
        _LOADED[name] = mone_export.load_model(name)
    return _LOADED[name]


def card(name: str) -> dict:
    return json.loads((resolve_model_path(name) / "card.json").read_text())


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_name_resolves_to_the_checkout_folder(name):
    path = resolve_model_path(name)
    assert path == bundled_model_path(name)
    assert path.resolve() == (MODELS / name).resolve() or path.parent.name == "bundled_models"
    for file in REQUIRED_FILES:
        assert (path / file).is_file(), f"{name} lacks {file}"


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_folder_is_at_most_10_mb(name):
    path = resolve_model_path(name)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{name} is {size:,} bytes"


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_loads_and_generates_greedily(name):
    model, tokenizer = loaded(name)
    assert tokenizer is not None
    assert model.config.model_type == card(name)["model_type"]
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("def parse(self, text):\n    ", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        first = model.generate(ids, **kwargs)
        again = model.generate(ids, **kwargs)
    assert first.shape == (1, ids.shape[1] + 8)
    assert torch.equal(first, again)
    assert isinstance(tokenizer.decode(first[0, ids.shape[1]:]), str)


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_tokenizer_loads_offline_with_autotokenizer(name):
    import transformers

    path = resolve_model_path(name)
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert tok.bos_token and tok.eos_token and tok.pad_token
    assert len(tok) == transformers.AutoConfig.from_pretrained(str(path), local_files_only=True).vocab_size
    text = "    def __init__(self, value=None):\n        self.value = value  # ok\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless round trip
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_card_parameters_match_the_checkpoint(name):
    model, _ = loaded(name)
    data = card(name)
    assert data["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert data["parameters"]["active_per_token"] < data["parameters"]["total"]
    for key in ("command", "seed", "training", "evaluation", "environment"):
        assert key in data
    assert data["command"].startswith("python models/train.py --family ")
    _, layers = moe_layers_or_error(model)
    usage = data["evaluation"]["expert_usage"]
    assert sorted(usage) == sorted(str(layer.index) for layer in layers)
    for layer in layers:
        shares = usage[str(layer.index)]
        assert len(shares) == layer.num_experts
        assert abs(sum(shares) - 1.0) < 1e-9


@pytest.mark.parametrize("name", BUNDLED_MODELS)
@pytest.mark.parametrize("source", ["python-code", "python-docs"])
def test_heldout_perplexity_matches_the_card(name, source):
    model, tokenizer = loaded(name)
    recorded = card(name)["evaluation"]
    settings = recorded["settings"]
    assert settings == evaluate.EVAL_SETTINGS
    result = evaluate.heldout_perplexity(model, tokenizer, source)
    want = recorded["perplexity"][source]
    assert result["tokens"] == want["tokens"]
    assert result["ppl"] == pytest.approx(want["ppl"], rel=1e-3)


def test_expert_usage_matches_the_card():
    name = BUNDLED_MODELS[0]
    model, tokenizer = loaded(name)
    batches = evaluate.eval_batches(tokenizer, "python-code", **evaluate.EVAL_SETTINGS)
    usage = evaluate.expert_usage(model, batches)
    recorded = card(name)["evaluation"]["expert_usage"]
    assert sorted(map(str, usage)) == sorted(recorded)
    for layer, shares in usage.items():
        np.testing.assert_allclose(shares, recorded[str(layer)], atol=2e-3)


# -- plot_experts ----------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def real_plan():
    model, tokenizer = loaded(BUNDLED_MODELS[0])
    batches = mone_export.calibration_batches("python-code", tokenizer, num_samples=8, seq_len=64, seed=0)
    stats = mone_export.collect_stats(model, batches, progress=False)
    return mone_export.plan_pruning(stats, 0.25, method="mone")


def test_plot_experts_on_a_real_plan(real_plan, tmp_path):
    from mone_export.experts_plot import plot_experts

    out = plot_experts(real_plan, tmp_path)
    assert out == tmp_path / "experts.png"
    width, height = _png_size(out)
    layers = len(real_plan.experts)
    assert 800 <= width <= 2000 and 150 * layers <= height <= 300 * layers + 200
    assert 20_000 < out.stat().st_size < 2_000_000
    again = plot_experts(real_plan, tmp_path / "again.png")
    assert again.read_bytes() == out.read_bytes()  # deterministic


def test_plot_experts_after_save_and_load(real_plan, tmp_path):
    from mone_export.experts_plot import plot_experts

    reloaded = PruningPlan.load(real_plan.save(tmp_path / "plan"))
    assert plot_experts(reloaded, tmp_path / "a.png").read_bytes() == plot_experts(real_plan, tmp_path / "b.png").read_bytes()


def test_plot_experts_many_layers_uses_heat_maps(tmp_path):
    from mone_export.experts_plot import MAX_BAR_LAYERS, plot_experts

    rng = np.random.default_rng(0)
    layers, experts, pruned = MAX_BAR_LAYERS + 8, 64, 16
    stats = {
        i: {key: rng.random(experts).tolist() for key in ("score", "count", "frequency", "routing_score", "phi_var", "reap")}
        for i in range(layers)
    }
    plan = PruningPlan(
        pruned={i: sorted(rng.choice(experts, pruned, replace=False).tolist()) for i in range(layers)},
        novices={i: torch.zeros(pruned, 16) for i in range(layers)},
        method="mone", replacement="novice", ratio=0.25, scope="layer", seed=0,
        model={"model_type": "qwen3_moe", "num_hidden_layers": layers, "hidden_size": 16,
               "num_experts": {i: experts for i in range(layers)}, "top_k": {i: 4 for i in range(layers)}},
        experts=stats,
    )
    out = plot_experts(plan, tmp_path / "deep.png")
    width, height = _png_size(out)
    assert width >= 1200 and 300 <= height <= 3100
    assert out.stat().st_size > 20_000


def test_plot_experts_needs_statistics(real_plan, tmp_path):
    from mone_export.errors import UsageError
    from mone_export.experts_plot import plot_experts

    bare = PruningPlan(pruned=real_plan.pruned, novices=real_plan.novices, method=real_plan.method,
                       replacement=real_plan.replacement, ratio=real_plan.ratio, scope=real_plan.scope,
                       seed=real_plan.seed, model=real_plan.model)
    with pytest.raises(UsageError, match="no per-expert statistics"):
        plot_experts(bare, tmp_path)
