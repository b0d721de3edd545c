"""Adapters: registry, MoE layer discovery and the reconstruction invariant (docs/method.md) for every family."""

import pytest
import torch
import transformers

from mone_export.adapters import ADAPTERS, expert_forward, get_adapter, moe_layers_or_error, supported_model_types
from mone_export.errors import UnsupportedModelError
from tiny_models import FAMILIES, tiny_model


def test_every_registered_family_has_a_tiny_model():
    """The five original families have tiny models here; Llama 4, whose adapter puts its blocks into the standard
    form, is tested with the architecture census (tests/test_architectures.py) and tests/test_stats.py."""
    assert set(supported_model_types()) == set(FAMILIES) | {"llama4_text"}


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_invariant(family):
    """Σ_e g_e(x) f_e(x) + shared part equals the MoE block's real output, to 1e-5."""
    model = tiny_model(family, seed=1)
    adapter, layers = moe_layers_or_error(model)
    gen = torch.Generator().manual_seed(3)
    for layer in layers:
        # Large inputs so that routing is far from uniform and expert outputs are not tiny.
        x = torch.randn(2, 13, layer.hidden_size, generator=gen) * 4
        with torch.no_grad():
            expected = layer.block(x).reshape(-1, layer.hidden_size)
            hidden = x.reshape(-1, layer.hidden_size)
            index, weights = adapter.route(layer, hidden)
            out = torch.zeros_like(hidden)
            for e in range(layer.num_experts):
                token, slot = torch.where(index == e)
                out[token] += weights[token, slot, None] * expert_forward(layer.experts, e, hidden[token])
            shared = adapter.shared_output(layer, hidden)
            if shared is not None:
                out += shared
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_deepseek_weights_include_scaling_and_group_limit():
    model = tiny_model("deepseek_v2", seed=2)
    adapter, layers = moe_layers_or_error(model)
    layer = layers[0]
    hidden = torch.randn(50, layer.hidden_size) * 4
    with torch.no_grad():
        index, weights = adapter.route(layer, hidden)
    # No renormalisation, scaled by routed_scaling_factor: the sum is 1.7 × (softmax mass of the selection) < 1.7.
    assert torch.all(weights.sum(-1) < 1.7) and torch.all(weights.sum(-1) > 0)
    probs = torch.softmax(hidden @ layer.router.weight.T, dim=-1)
    torch.testing.assert_close(weights, 1.7 * probs.gather(1, index))
    # Group-limited (2 groups of 3, topk_group 1): both selected experts lie in one group.
    assert torch.all(index.div(3, rounding_mode="floor").eq(index[:, :1].div(3, rounding_mode="floor")))


def test_dense_layers_are_skipped():
    assert [l.index for l in moe_layers_or_error(tiny_model("deepseek_v2"))[1]] == [1, 2]
    assert [l.index for l in moe_layers_or_error(tiny_model("qwen2_moe"))[1]] == [0, 2]


def test_unknown_model_type_lists_supported():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=8)
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(config)
    message = str(info.value)
    assert "'llama'" in message and all(name in message for name in ADAPTERS)


def test_moe_family_without_experts_is_rejected():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(UnsupportedModelError, match="no routed MoE layer"):
        moe_layers_or_error(model)
