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


def tiny_config_of(model_type: str, **overrides):
    """A tiny config of any model type: :data:`ANY_TYPE_SIZES` for the fields its config class has. Multi-head
    latent attention (``kv_lora_rank``) gets as many KV heads as query heads and ``head_dim`` = the rotary part."""
    config_class = type(transformers.AutoConfig.for_model(model_type))
    defaults = config_class()
    kwargs = {key: value for key, value in ANY_TYPE_SIZES.items() if hasattr(defaults, key)}
    if hasattr(defaults, "kv_lora_rank"):
        kwargs.update(num_key_value_heads=kwargs["num_attention_heads"], head_dim=kwargs["qk_rope_head_dim"])
    return config_class(**{**kwargs, **overrides})


def tiny_model_of(model_type: str, seed: int = 0, **overrides):
    """A seeded random tiny causal LM of any model type, fp32, eager attention and experts."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config_of(model_type, **overrides), attn_implementation="eager", experts_implementation="eager")
    return model.eval()
