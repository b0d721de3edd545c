"""The architecture census: every Mixture-of-Experts model type of the installed transformers whose modeling code uses
the standard experts interface (``use_experts_implementation``) is covered end to end or excluded with a reason.

A covered type is found and pruned by the generic adapter (no adapter of its own needed), and on a tiny random model
of it: the experts' output recomputed as Σ g_e·f_e with the package's one expert formula reproduces the model
(1e-5), and a MoNE plan and a removal plan each export to ONNX whose logits match the pruned PyTorch model through
a prefill and decode steps with the KV cache (1e-4) with identical greedy tokens. A transformers release that adds or
drops such a type fails :func:`test_every_experts_interface_type_is_covered_or_excluded` until this file says which.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mone_export import apply_plan, collect_stats, plan_pruning
from mone_export.adapters import expert_forward, experts_classes, moe_layers_or_error
from mone_export.errors import UsageError
from mone_export.export import export_onnx
from tiny_models import tiny_batches, tiny_model_of

ort = pytest.importorskip("onnxruntime")
from test_export import eos_ids, make_session, ort_greedy, prefill_and_decode, torch_greedy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COVERED = sorted([
    "aria_text", "axk1", "deepseek_v2", "deepseek_v3", "dots1", "exaone_moe", "flex_olmo", "glm4_moe",
    "glm4_moe_lite", "granitemoe", "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "kolibri1",
    "laguna", "mellum", "minimax_m2", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe", "solar_open",
])
"""Types that prune, export and match PyTorch in ONNX Runtime."""

ROUTER_KEPT = {"hunyuan_v1_moe": "its router (HunYuanMoEV1Gate) keeps its weight in an inner Linear"}
"""Covered types whose router removal cannot cut: MoNE only, removal refused with a clear error."""

_HYBRID = ("hybrid: some layers keep a linear-attention / SSM state that the export's cache contract (past/present "
           "key and value per layer) does not carry yet; it prunes, it does not export")
_INDEXER = ("sparse attention with an indexer key cache (DynamicIndexedLayer) that the export's cache contract does "
            "not carry yet")
_WRAPPER = "multimodal wrapper: its text model type is listed on its own"
_PER_LAYER = "per-layer attention settings the tiny-config builder cannot shrink yet (AmbiguousGlobalPerLayerAttribute)"

EXCLUDED = {
    "afmoe": "exports, but ONNX Runtime's logits differ from PyTorch (1e-1): not investigated yet",
    "axk2": _INDEXER, "deepseek_v32": _INDEXER, "glm_moe_dsa": _INDEXER, "hy_v4": _INDEXER,
    "bailing_hybrid": _HYBRID, "granitemoehybrid": _HYBRID, "jamba": _HYBRID, "kimi_linear": _HYBRID,
    "lara_mini": _HYBRID, "lfm2_moe": _HYBRID, "minimax": _HYBRID, "qwen3_5_moe_text": _HYBRID,
    "qwen3_next": _HYBRID, "qwen4_exp_text": _HYBRID, "inkling_text": _HYBRID, "inkling2_text": _HYBRID,
    "inkling2_loop_text": _HYBRID, "nemotron_h": _HYBRID,
    "dots3_note": _WRAPPER, "gemma4": _WRAPPER, "qwen3_5_moe": _WRAPPER, "qwen4_exp": _WRAPPER,
    "dots3_note_text": _PER_LAYER, "gemma4_text": _PER_LAYER,
    "beam": "the tiny config builds no routed MoE layer (its MoE layer pattern is not set yet)",
    "flint": "the tiny config builds no routed MoE layer (its MoE layer pattern is not set yet)",
    "cohere2_moe": "the TorchScript exporter cannot translate its rotary embedding's repeat_interleave",
    "ernie4_5_moe": "the TorchScript exporter cannot translate its rotary embedding's repeat_interleave",
    "gpt_oss": "the TorchScript exporter cannot translate its experts' one-sided clamp (clamped SwiGLU) yet",
    "minimax_m3_vl_text": "the TorchScript exporter cannot translate its experts' one-sided clamp yet",
    "deepseek_v4": "its attention does not build from the tiny config yet (shape mismatch)",
    "mimo_v2_flash": "its attention does not build from the tiny config yet (shape mismatch)",
    "zaya": "its config validation rejects the tiny sizes",
}
"""Types with the experts interface that are not covered yet, and why."""


def experts_interface_types() -> list[str]:
    """Causal-LM model types whose modeling code has an experts class of the standard interface."""
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if experts_classes(t))


def test_every_experts_interface_type_is_covered_or_excluded():
    found = set(experts_interface_types())
    listed = set(COVERED) | set(EXCLUDED)
    assert not set(COVERED) & set(EXCLUDED)
    assert found - listed == set(), f"new MoE types in transformers: cover or exclude {sorted(found - listed)}"
    assert listed - found == set(), f"no longer MoE types with the experts interface: {sorted(listed - found)}"
    assert len(COVERED) >= 24


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
                f_e = expert_forward(experts, expert, hidden[token:token + 1])[0]
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
        with pytest.raises(UsageError, match="--method mone"):
            apply_plan(model, plan)
        return
    apply_plan(model, plan)
    assert all(len(plan.pruned[layer.index]) == 2 for layer in moe_layers_or_error(model)[1])
    session = make_session(export_onnx(model, tmp_path, progress=False))
    diffs = prefill_and_decode(session, model)
    assert max(diffs) <= 1e-4, diffs
    prompt = [5, 17, 33, 60, 41, 8]
    assert ort_greedy(session, prompt, 6, eos_ids(model)) == torch_greedy(model, prompt, 6)


def test_a_router_that_cannot_be_cut_refuses_removal_clearly():
    """Removal needs a router whose rows are the experts; one without a [E, H] weight gets a clear error."""
    model = tiny_model_of("mixtral")
    stats = collect_stats(model, tiny_batches(vocab_size=model.config.vocab_size), progress=False)
    router = moe_layers_or_error(model)[1][0].router
    weight = router.weight
    del router.weight
    router.register_parameter("kernel", torch.nn.Parameter(weight.detach().T.clone()))
    with pytest.raises(UsageError, match="--method mone"):
        apply_plan(model, plan_pruning(stats, 1 / 3, "frequency"))
    assert np.isfinite(stats.layers[0].frequency).all()
