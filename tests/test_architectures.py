"""The architecture census: every Mixture-of-Experts model type of the installed transformers whose modeling code uses
the standard experts interface (``use_experts_implementation``) is covered end to end or excluded with a reason.

A covered type is found and pruned by the generic adapter (no adapter of its own needed), and on a tiny random model
of it: the experts' output recomputed as Σ g_e·f_e with the package's one expert formula reproduces the model
(1e-5), and a MoNE plan and a removal plan each export to ONNX whose logits match the pruned PyTorch model through
a prefill and decode steps with the KV cache (1e-4) with identical greedy tokens, and the MoNE output folder
generates the same tokens in onnxruntime-genai. A transformers release that adds or drops such a type fails :func:`test_every_experts_interface_type_is_covered_or_excluded` until this file says which.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mone_export import apply_plan, collect_stats, plan_pruning
from mone_export.adapters import expert_forward, moe_layers_or_error
from mone_export.architectures import (COVERED, EXCLUDED, PRUNE_ONLY, ROUTER_KEPT, TEXT_MODEL_OF,
                                       architecture_table, experts_interface_types)
from mone_export.errors import UsageError
from mone_export.scoring import METHODS
from mone_export.export import export_onnx
from tiny_models import tiny_batches, tiny_model_of

ort = pytest.importorskip("onnxruntime")
from mone_export.output_folder import write_output_folder  # noqa: E402
from test_export import (eos_ids, make_session, ort_greedy, prefill_and_decode, tiny_tokenizer,  # noqa: E402
                         torch_greedy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def test_every_experts_interface_type_is_covered_or_excluded():
    found = set(experts_interface_types()) | set(TEXT_MODEL_OF)  # Llama 4's modeling file has no decorated experts
    groups = [set(COVERED), set(PRUNE_ONLY), set(EXCLUDED), set(TEXT_MODEL_OF)]
    listed = set().union(*groups)
    assert sum(map(len, groups)) == len(listed), "a type is listed twice"
    assert found - listed == set(), f"new MoE types in transformers: cover or exclude {sorted(found - listed)}"
    assert listed - found == set(), f"no longer MoE types with the experts interface: {sorted(listed - found)}"
    assert set(ROUTER_KEPT) <= set(COVERED)
    assert set(TEXT_MODEL_OF.values()) <= set(COVERED) | set(PRUNE_ONLY)
    assert len(COVERED) >= 24


@pytest.mark.parametrize("model_type", sorted(TEXT_MODEL_OF))
def test_a_multimodal_type_builds_its_text_model(model_type):
    """transformers builds the listed text model from the multimodal config, as :data:`TEXT_MODEL_OF` says."""
    import transformers

    from mone_export.loading import causal_lm_config

    config = transformers.AutoConfig.for_model(model_type)
    assert causal_lm_config(config).model_type == TEXT_MODEL_OF[model_type]
    assert causal_lm_config(transformers.AutoConfig.for_model("gemma4")).model_type == "gemma4"  # the whole model


@pytest.mark.parametrize("model_type", ["llama4", "qwen3_5_moe"])
def test_a_multimodal_checkpoint_prunes_as_its_text_model(model_type, tmp_path, capsys):
    """A multimodal checkpoint (vision tower included) through the CLI: Llama 4 exports and validates, Qwen3.5-MoE
    prunes; the text model loaded computes the multimodal model's logits on text (the weights went where they
    belong), and the other modalities' tensors are left unread."""
    import json

    import transformers

    from mone_export import load_model
    from mone_export.cli import main

    text_type = TEXT_MODEL_OF[model_type]
    config_class = type(transformers.AutoConfig.for_model(model_type))
    vision = config_class().vision_config
    small = dict(num_hidden_layers=1, depth=1, hidden_size=16, num_attention_heads=2, num_heads=2,
                 intermediate_size=16, out_hidden_size=48, vision_output_dim=48, projector_input_dim=16,
                 projector_output_dim=48)
    vision = type(vision)(**{key: value for key, value in small.items() if hasattr(vision, key)})
    from tiny_models import tiny_config_of

    torch.manual_seed(0)
    full = transformers.AutoModelForImageTextToText.from_config(
        config_class(text_config=tiny_config_of(text_type).to_dict(), vision_config=vision.to_dict()),
        attn_implementation="eager", experts_implementation="eager").eval()
    folder = tmp_path / model_type
    full.save_pretrained(folder)
    text, _ = load_model(folder, attn_implementation="eager")
    assert text.config.model_type == text_type
    ids = tiny_batches(vocab_size=97, num=1)[0]
    language = getattr(full, "language_model", None)  # Llama 4's wrapper forward needs images in transformers 5.24:
    if not hasattr(language, "lm_head"):  # its causal LM inside; Qwen3.5-MoE's wrapper runs on text alone
        language = full
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=ids).logits, language(input_ids=ids).logits, rtol=0, atol=1e-5)
    command = [] if text_type in COVERED else ["prune"]
    code = main([*command, "--model", str(folder), "--ratio", "0.5", "--calib", "random", "--calib-samples", "4",
                 "--seq-len", "16", "-o", str(tmp_path / "out"), "--quiet", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["model_type"] == text_type
    if not command:
        assert report["passed"] is True


def test_the_readme_table_is_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert architecture_table() in readme, "README.md's architecture table is stale: paste architecture_table()"


@pytest.mark.parametrize("model_type", sorted(PRUNE_ONLY))
def test_prune_only_types_prune(model_type):
    """The one expert formula reproduces the model, and a plan of every router-kept method (the README table's
    claim for these types) applies and runs."""
    test_the_one_expert_formula_reproduces_the_model(model_type)
    model = tiny_model_of(model_type)
    batches = tiny_batches(vocab_size=model.config.vocab_size)
    stats = collect_stats(model, batches, progress=False, measure_removal=True)  # auto needs it; the others ignore it
    for method in [name for name, chosen in METHODS.items() if chosen.keeps_router]:
        plan = plan_pruning(stats, 1 / 3, method)
        pruned_model = tiny_model_of(model_type)
        apply_plan(pruned_model, plan)
        assert all(len(pruned) == 2 for pruned in plan.pruned.values())
        with torch.no_grad():
            assert torch.isfinite(pruned_model(input_ids=batches[0]).logits).all(), method


@pytest.mark.parametrize("model_type", COVERED)
def test_the_one_expert_formula_reproduces_the_model(model_type):
    """Each MoE layer's experts replaced by Σ_k g·f_e(x) computed with :func:`expert_forward` from the top-k
    weights the block passes: the logits must not move."""
    model = tiny_model_of(model_type)
    batch = tiny_batches(vocab_size=model.config.vocab_size, num=1)[0]
    _, layers = moe_layers_or_error(model)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        for layer in layers:
            layer.experts.forward = _sum_of_expert_outputs(layer.experts)
        actual = model(input_ids=batch).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5), float((actual - expected).abs().max())


def _sum_of_expert_outputs(experts):
    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for token in range(hidden.shape[0]):
            for slot in range(top_k_index.shape[1]):
                expert = int(top_k_index[token, slot])
                weight = top_k_weights[token:token + 1, slot:slot + 1]  # g: Llama 4's experts scale their input
                f_e = expert_forward(experts, expert, hidden[token:token + 1], weight)[0]
                out[token] += top_k_weights[token, slot].to(out.dtype) * f_e.to(out.dtype)
        return out

    return forward


@pytest.mark.parametrize("method", ["mone", "frequency"])
@pytest.mark.parametrize("model_type", COVERED)
def test_prune_export_and_onnx_runtime_parity(model_type, method, tmp_path):
    model = tiny_model_of(model_type)
    stats = collect_stats(model, tiny_batches(vocab_size=model.config.vocab_size), progress=False)
    plan = plan_pruning(stats, 1 / 3, method)
    if plan.replacement == "remove" and model_type in ROUTER_KEPT:
        with pytest.raises(UsageError, match="--method ne, mone, mone-zero or auto"):
            apply_plan(model, plan)
        return
    apply_plan(model, plan)
    assert all(len(plan.pruned[layer.index]) == 2 for layer in moe_layers_or_error(model)[1])
    path = export_onnx(model, tmp_path, progress=False)
    session = make_session(path)
    diffs = prefill_and_decode(session, model)
    assert max(diffs) <= 1e-4, diffs
    prompt = [5, 17, 33, 60, 41, 8]
    expected = torch_greedy(model, prompt, 6)
    assert ort_greedy(session, prompt, 6, eos_ids(model)) == expected
    if method == "mone":  # the output folder, as shipped, generates the same tokens in onnxruntime-genai
        out = write_output_folder(model, tiny_tokenizer(model.config.vocab_size), path, tmp_path / "out", plan=plan)
        stop = next((i for i, token in enumerate(expected) if token in eos_ids(model)), len(expected))
        assert genai_greedy(out, prompt, 6) == expected[:stop]  # genai's sequence leaves out the eos that stopped it


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy tokens from an output folder (its eos stops it, as transformers' generate)."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


def test_a_router_that_cannot_be_cut_refuses_removal_clearly():
    """Removal needs a router whose rows are the experts; one without a [E, H] weight gets a clear error."""
    model = tiny_model_of("mixtral")
    stats = collect_stats(model, tiny_batches(vocab_size=model.config.vocab_size), progress=False)
    router = moe_layers_or_error(model)[1][0].router
    weight = router.weight
    del router.weight
    router.register_parameter("kernel", torch.nn.Parameter(weight.detach().T.clone()))
    with pytest.raises(UsageError, match="--method ne, mone, mone-zero or auto"):
        apply_plan(model, plan_pruning(stats, 1 / 3, "frequency"))
    assert np.isfinite(stats.layers[0].frequency).all()


def test_llama4_chunked_attention_across_chunks(tmp_path):
    """Llama 4 (experts on g·x behind the standard interface, complex rotary written as real arithmetic, chunked
    attention of 8 tokens): a 13-token prefill and 6 decode steps cross chunk boundaries at 1e-4."""
    model = tiny_model_of("llama4_text")
    assert model.config.attention_chunk_size == 8
    plan = plan_pruning(collect_stats(model, tiny_batches(vocab_size=model.config.vocab_size), progress=False), 0.5,
                        "mone")
    apply_plan(model, plan)
    session = make_session(export_onnx(model, tmp_path, progress=False))
    diffs = prefill_and_decode(session, model, seq=13, steps=6)
    assert max(diffs) <= 1e-4, diffs


@pytest.mark.parametrize("model_type", ["gpt_oss", "glm4_moe", "llama4_text", "cohere2_moe"])
def test_the_main_command_on_a_checkpoint_of_a_new_type(model_type, tmp_path, capsys):
    """Through the CLI, as a user runs it on a checkpoint folder: prune, export and validate (parity, greedy tokens,
    memory, latency) pass, with no adapter written for the type."""
    import json

    from mone_export.cli import main

    folder = tmp_path / model_type
    tiny_model_of(model_type).save_pretrained(folder)
    code = main(["--model", str(folder), "--ratio", "0.5", "--calib", "random", "--calib-samples", "4", "--seq-len",
                 "16", "-o", str(tmp_path / "out"), "--quiet", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] is True
    generation = report["validation"]["generation"]
    assert generation["passed"] and generation["identical"] == generation["prompts"] > 0
    assert max(r["max_abs_diff"] for r in report["validation"]["logits"]) <= 1e-4


@pytest.mark.parametrize("model_type", ["llama4_text", "gemma4_text", "beam"])
def test_a_float16_export_of_a_new_layout_passes_its_gate(model_type, tmp_path, capsys):
    """Through the CLI in float16, judged by PyTorch's own float16 (docs/validation.md#half-precision): Llama 4's
    router returns (scores, logits), so the routing is recorded where the block hands it to its experts; Gemma 4's
    tanh GELU needs its constants in float16; Beam returns float32 logits from a float16 model, whose precision is
    read from its cache."""
    import json

    from mone_export.cli import main

    folder = tmp_path / model_type
    tiny_model_of(model_type).save_pretrained(folder)
    code = main(["--model", str(folder), "--ratio", "0.5", "--dtype", "fp16", "--calib", "random", "--calib-samples",
                 "4", "--seq-len", "16", "-o", str(tmp_path / "out"), "--quiet", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] is True, report["validation"]["failures"]
    assert report["validation"]["dtype"] == "float16"


def test_types_not_covered_get_a_clear_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    """An excluded type stops at load with its reason; a prune-only type prunes, and its export stops before
    calibrating with its reason; both exit 2."""
    from mone_export import architectures
    from mone_export.cli import main

    calib = ["--calib", "random", "--calib-samples", "2", "--seq-len", "8", "--quiet"]
    excluded, prune_only = tmp_path / "olmoe", tmp_path / "deepseek_v32"
    # The types excluded today are multimodal wrappers too large to build tiny: exclude a small type for the test.
    monkeypatch.setitem(architectures.EXCLUDED, "olmoe", "a reason why olmoe is excluded")
    tiny_model_of("olmoe").save_pretrained(excluded)
    tiny_model_of("deepseek_v32").save_pretrained(prune_only)
    assert main(["--model", str(excluded), "--ratio", "0.5", "-o", str(tmp_path / "a"), *calib]) == 2
    assert "a reason why olmoe is excluded" in capsys.readouterr().err
    assert main(["--model", str(prune_only), "--ratio", "0.5", "-o", str(tmp_path / "b"), *calib]) == 2
    assert "prunes but does not export" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["prune", "--model", str(prune_only), "--ratio", "0.5", "-o", str(tmp_path / "c"), *calib]) == 0
