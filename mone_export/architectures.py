"""The architecture registry: which Mixture-of-Experts model types of the installed transformers go end to end.

Every causal-LM model type whose modeling code has an experts class of transformers' standard interface
(``use_experts_implementation``) is in exactly one of :data:`COVERED`, :data:`PRUNE_ONLY`, :data:`TEXT_MODEL_OF`
and :data:`EXCLUDED` (the census test, tests/test_architectures.py, fails when a transformers release adds or drops
one). Covered types need no adapter of their own: the generic adapter finds their MoE blocks
(:func:`mone_export.adapters.get_adapter`). The README's architecture table is :func:`architecture_table`.
"""

from __future__ import annotations

from mone_export.adapters import ADAPTERS, experts_classes
from mone_export.errors import UnsupportedModelError

__all__ = ["COVERED", "EXCLUDED", "OUTSIDE_INTERFACE", "PRUNE_ONLY", "ROUTER_KEPT", "TEXT_MODEL_OF",
           "architecture_table", "check_exportable", "check_prunable", "experts_interface_types"]

COVERED = sorted([
    "afmoe", "aria_text", "axk1", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "flint", "gemma4_text", "glm4_moe", "glm4_moe_lite", "gpt_oss", "granitemoe",
    "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "kolibri1", "laguna", "llama4_text", "mellum",
    "minimax_m2", "minimax_m3_vl_text", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe", "solar_open",
])
"""Types that prune, export and match PyTorch in ONNX Runtime."""

ROUTER_KEPT = {"afmoe": "its router (AfmoeTokenChoiceRouter) keeps its weight in an inner Linear (gate)",
               "hunyuan_v1_moe": "its router (HunYuanMoEV1Gate) keeps its weight in an inner Linear",
               "ernie4_5_moe": "its router keeps a per-expert bias in a submodule (moe_statics)",
               "gemma4_text": "its router (Gemma4TextRouter) keeps its weight in an inner Linear (proj)"}
"""Covered types whose router removal cannot cut: MoNE only, removal refused with a clear error."""

_HYBRID = ("hybrid: some layers keep a linear-attention / SSM state, which the export's cache contract (past/present "
           "key and value per layer) does not carry yet")
_INDEXER = ("sparse attention with an indexer key cache (DynamicIndexedLayer), which the export's cache contract does "
            "not carry yet")

PRUNE_ONLY = {
    "axk2": _INDEXER, "deepseek_v32": _INDEXER, "dots3_note_text": _INDEXER, "glm_moe_dsa": _INDEXER, "hy_v4": _INDEXER,
    "inkling_text": _HYBRID, "inkling2_text": _HYBRID, "inkling2_loop_text": _HYBRID, "lara_mini": _HYBRID,
    "minimax": _HYBRID, "nemotron_h": _HYBRID, "bailing_hybrid": _HYBRID, "granitemoehybrid": _HYBRID,
    "jamba": _HYBRID, "kimi_linear": _HYBRID, "lfm2_moe": _HYBRID, "qwen3_5_moe_text": _HYBRID, "qwen3_next": _HYBRID,
    "qwen4_exp_text": _HYBRID, "zaya": _HYBRID,
    "deepseek_v4": ("its compressed attention caches one shared key-value tensor per layer (and an indexer), which "
                    "the export's cache contract (past/present key and value per KV head) does not carry yet"),
    "mimo_v2_flash": ("its sliding-window layers have twice the KV heads of its full-attention layers; the export's "
                      "cache contract, like onnxruntime-genai's config, has one KV head count for every layer"),
}
"""Types that calibrate and prune in PyTorch (the one expert formula reproduces them, a MoNE plan applies) but do not
export yet, and why."""

TEXT_MODEL_OF = {"dots3_note": "dots3_note_text", "llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text",
                 "qwen4_exp": "qwen4_exp_text"}
"""Multimodal types whose causal LM is their text model alone (transformers maps the type to a ``*ForCausalLM`` of
the text config): a checkpoint of the type loads as its text model, leaves the other modalities' tensors unread, and
prunes and exports as the text type (:func:`mone_export.loading.causal_lm_config`)."""

EXCLUDED = {
    "gemma4": ("multimodal: its causal-LM class is the whole image-text model (Gemma4ForConditionalGeneration), not "
               "its text model; a checkpoint of gemma4_text is covered"),
}
"""Types with the experts interface that are not covered yet, and why."""

OUTSIDE_INTERFACE = {
    "dbrx": "experts not decorated with use_experts_implementation (own fused layout)",
    "longcat_flash": "identity 'zero' experts beside the routed ones, outside the interface",
    "step3p7": "fused layout but not decorated, so the generic adapter does not see it",
    "jetmoe": "per-expert attention and MLP experts of its own form",
    "switch_transformers": "encoder-decoder with per-expert modules",
    "nllb_moe": "encoder-decoder with per-expert modules",
}
"""Mixture-of-Experts models in transformers whose experts do not use the standard interface (found by reading their
modeling code): the generic adapter does not cover them."""


def experts_interface_types() -> list[str]:
    """Causal-LM model types whose modeling code has an experts class of the standard interface, or whose adapter
    puts their MoE blocks into that form (:attr:`~mone_export.adapters.MoeAdapter.standard_form`: Llama 4)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def standard_form(model_type: str) -> bool:
        adapter = ADAPTERS.get(model_type)
        return adapter is not None and adapter.standard_form is not None

    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if experts_classes(t) or standard_form(t))


def check_prunable(config) -> None:
    """A clear error for a model type known not to calibrate and prune yet (:data:`EXCLUDED`), before any work."""
    model_type = getattr(config, "model_type", None)
    if model_type in EXCLUDED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported yet: {EXCLUDED[model_type]}.")


def check_exportable(config) -> None:
    """A clear error for a model type known to prune but not to export yet (:data:`PRUNE_ONLY`)."""
    model_type = getattr(config, "model_type", None)
    if model_type in PRUNE_ONLY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} prunes but does not export to ONNX yet: {PRUNE_ONLY[model_type]}. "
            "`mone-export prune` writes the pruned PyTorch model.")


def architecture_table() -> str:
    """The README's table: every type with the experts interface, what works (prune, export with ONNX Runtime
    parity, the pruning methods) and, where something does not yet, why."""
    from mone_export.scoring import METHODS

    router_kept = ", ".join(name for name, method in METHODS.items() if method.keeps_router)
    rows = ["| model_type | prune | export | methods | note |", "| --- | --- | --- | --- | --- |"]
    for model_type in sorted({*COVERED, *PRUNE_ONLY, *EXCLUDED, *TEXT_MODEL_OF}):
        if model_type in TEXT_MODEL_OF:
            text = TEXT_MODEL_OF[model_type]
            prune, export = ("yes", "yes") if text in COVERED else ("yes", "no")
            methods = router_kept if text in ROUTER_KEPT or text not in COVERED else "all"
            does = "loads, prunes and exports" if text in COVERED else "loads and prunes"
            rows.append(f"| `{model_type}` | {prune} | {export} | {methods} | multimodal: {does} as its text model, "
                        f"`{text}` |")
        elif model_type in COVERED:
            methods = router_kept if model_type in ROUTER_KEPT else "all"
            rows.append(f"| `{model_type}` | yes | yes | {methods} | {ROUTER_KEPT.get(model_type, '')} |")
        elif model_type in PRUNE_ONLY:
            rows.append(f"| `{model_type}` | yes | no | {router_kept} | {PRUNE_ONLY[model_type]} |")
        else:
            rows.append(f"| `{model_type}` | no | no | | {EXCLUDED[model_type]} |")
    outside = "; ".join(f"`{name}` ({why})" for name, why in sorted(OUTSIDE_INTERFACE.items()))
    return "\n".join(rows) + f"\n\nOutside the interface, not covered: {outside}.\n"
