"""Tiny random MoE models of every supported family, with awkward sizes, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers

# hidden not a power of two, E not a power of two, top_k 3, GQA (4 heads / 2 kv heads), intermediate 30.
COMMON = dict(
    vocab_size=97,
    hidden_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=3,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

CONFIGS = {
    "mixtral": dict(model_type="mixtral", intermediate_size=30, num_local_experts=6, head_dim=10),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        intermediate_size=44,
        moe_intermediate_size=30,
        shared_expert_intermediate_size=26,
        num_experts=7,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", intermediate_size=44, moe_intermediate_size=30, num_experts=6, norm_topk_prob=True, head_dim=10
    ),
    "olmoe": dict(model_type="olmoe", intermediate_size=30, num_experts=7, norm_topk_prob=False),
    "deepseek_v2": dict(
        model_type="deepseek_v2",
        intermediate_size=44,
        moe_intermediate_size=30,
        n_routed_experts=6,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.7,
        q_lora_rank=None,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=10,
        num_key_value_heads=4,
        num_experts_per_tok=2,
    ),
}

FAMILIES = sorted(CONFIGS)


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with the awkward tiny sizes above."""
    kwargs = {**COMMON, **CONFIGS[family], **overrides}
    model_type = kwargs.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A seeded random tiny causal LM of ``family`` in eval mode, fp32, eager attention."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def tiny_batches(vocab_size: int = 97, num: int = 3, batch: int = 2, seq: int = 11, seed: int = 0):
    """Seeded random token batches."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq), generator=gen) for _ in range(num)]


# --- tiny models of any Mixture-of-Experts type (the architecture census, tests/test_architectures.py) -----------

ANY_TYPE_SIZES = dict(
    vocab_size=97, hidden_size=48, intermediate_size=44, moe_intermediate_size=26, expert_intermediate_size=26,
    shared_expert_intermediate_size=34, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=12, num_local_experts=6, num_experts=6, n_routed_experts=6, moe_num_experts=6, num_experts_per_tok=2,
    moe_topk=2, max_position_embeddings=256, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=12, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
    sliding_window=16, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
"""Sizes given to every config field of these names that a model type's config has (odd widths, E = 6, k = 2)."""


_HYBRID_LAYERS = dict(layer_types=["linear_attention", "full_attention", "linear_attention"])

TYPE_SIZES = {
    # Hybrid models: the default layer pattern of 3 layers has no attention layer (transformers' cache then fails).
    "qwen3_next": _HYBRID_LAYERS, "qwen3_5_moe_text": _HYBRID_LAYERS, "bailing_hybrid": _HYBRID_LAYERS,
    "kimi_linear": dict(_HYBRID_LAYERS, linear_num_heads=4, linear_head_dim=12),
    "qwen4_exp_text": dict(_HYBRID_LAYERS, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=12,
                           indexer_budget=8, indexer_compress_ratio=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, mamba_dt_rank=8),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=12,
                             mamba_d_state=16, mamba_chunk_size=16),
    # Layer patterns of 3 layers with a routed MoE layer in them.
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"],
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "flint": dict(mlp_only_layers=[0], layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1, layer_types=["hybrid"] * 3),
    "dots3_note_text": dict(mlp_layer_types=["dense", "sparse", "sparse"], per_layer_config={}, head_dim=16,
                            layer_types=["indexed_attention", "sliding_attention", "indexed_attention"]),
    # Llama 4: a dense layer between MoE layers, a layer without rotary, chunked attention shorter than a prompt.
    # No padding row: the pad token's zero embedding stays zero through layer 0 (no biases, no rotary at the first
    # token), every router logit ties at 0, and ONNX's TopK (lowest index first) and PyTorch's topk pick different
    # experts, which a novice's constant output makes visible. A trained model has no exact ties.
    "llama4_text": dict(moe_layers=[0, 2], intermediate_size_mlp=44, no_rope_layers=[1, 0, 1], attention_chunk_size=8,
                        pad_token_id=None),
    "cohere2_moe": dict(pad_token_id=None),  # the same tie: its first MoE input is the normed embedding alone
    "gemma4_text": dict(enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=26,
                        per_layer_config={}, hidden_size_per_layer_input=8, vocab_size_per_layer_input=97,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
"""Per type, what :data:`ANY_TYPE_SIZES` cannot say: layer patterns of 3 layers that still hold every layer kind,
and the sizes of a type's own sublayers."""


def tiny_config_of(model_type: str, **overrides):
    """A tiny config of any model type: :data:`ANY_TYPE_SIZES` for the fields its config class has, then the type's
    own :data:`TYPE_SIZES`. Multi-head latent attention (``kv_lora_rank``) gets as many KV heads as query heads and
    ``head_dim`` = the rotary part."""
    config_class = type(transformers.AutoConfig.for_model(model_type))
    defaults = config_class()
    # Fields and their aliases; not hasattr: per-layer configs raise on attributes that differ between layers.
    fields = {*defaults.to_dict(), *getattr(defaults, "attribute_map", {})}
    kwargs = {key: value for key, value in ANY_TYPE_SIZES.items() if key in fields}
    if "kv_lora_rank" in fields:
        kwargs.update(num_key_value_heads=kwargs["num_attention_heads"], head_dim=kwargs["qk_rope_head_dim"])
    return config_class(**{**kwargs, **TYPE_SIZES.get(model_type, {}), **overrides})


def tiny_model_of(model_type: str, seed: int = 0, **overrides):
    """A seeded random tiny causal LM of any model type, fp32, eager attention and experts. Routers that the type's
    initialisation leaves at zero (AFMoE) get random weights: a zero router ties every expert for every token, and
    ONNX's TopK and PyTorch's topk break ties differently."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config_of(model_type, **overrides), attn_implementation="eager", experts_implementation="eager")
    from mone_export.adapters import ROUTER_ATTRS

    with torch.no_grad():  # by name, not through the adapter: that would put Llama 4's blocks into standard form
        for name, weight in model.named_parameters():
            parts = name.split(".")
            if any(part in ROUTER_ATTRS for part in parts[-3:-1]) and weight.dim() == 2 and not weight.any():
                weight.normal_(0.0, 0.2)
    return model.eval()
