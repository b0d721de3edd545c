"""Statistics against a brute-force computation on concatenated expert outputs (docs/method.md#statistics)."""

import dataclasses

import numpy as np
import pytest
import torch

from mone_export import collect_stats
from mone_export.adapters import expert_forward, moe_layers_or_error
from mone_export.errors import UsageError
from mone_export.stats import LayerStats, recording_experts
from tiny_models import FAMILIES, tiny_batches, tiny_model


def stats_and_brute_force(model, batches):
    """collect_stats, and per layer every token's (g_e, f_e) recomputed from the block inputs of that same run."""
    adapter, layers = moe_layers_or_error(model)
    inputs = {layer.index: [] for layer in layers}
    hooks = [
        layer.block.register_forward_pre_hook(lambda m, args, i=layer.index: inputs[i].append(args[0].detach()))
        for layer in layers
    ]
    stats = collect_stats(model, batches, progress=False)
    for h in hooks:
        h.remove()
    result = {}
    for layer in layers:
        # Per batch (the shapes the model ran), then concatenated: the f_e values are the very outputs the
        # model produced, so only the accumulation is under test at 1e-9.
        gs = {e: [] for e in range(layer.num_experts)}
        fs = {e: [] for e in range(layer.num_experts)}
        n = 0
        for x in inputs[layer.index]:
            hidden = x.reshape(-1, layer.hidden_size)
            n += hidden.shape[0]
            with torch.no_grad():
                index, weights = adapter.route(layer, hidden)
                for e in range(layer.num_experts):
                    token, slot = torch.where(index == e)
                    fs[e].append(expert_forward(layer.experts, e, hidden[token]).double().numpy())
                    gs[e].append(weights[token, slot].double().numpy())
        per = {}
        for e in range(layer.num_experts):
            f, g = np.concatenate(fs[e]), np.concatenate(gs[e])
            count = len(g)
            per[e] = dict(
                count=count,
                frequency=count / n,
                routing_score=g.sum() / n,
                mean=f.mean(0) if count else np.zeros(layer.hidden_size),
                var=f.var(0, ddof=1) if count > 1 else np.zeros(layer.hidden_size),
                reap=(g * np.linalg.norm(f, axis=1)).mean() if count else 0.0,
                sq_weight_sum=(g**2).sum(),
                weighted_mean=(g**2) @ f / (g**2).sum() if count else np.zeros(layer.hidden_size),
            )
            c = per[e]["weighted_mean"]
            per[e]["novice_error"] = ((g**2)[:, None] * (f - c) ** 2).sum() / n
        result[layer.index] = (n, per)
    return stats, result


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_brute_force(family):
    model = tiny_model(family, seed=5)
    batches = tiny_batches(num=4, batch=3, seq=9, seed=1)
    stats, expected = stats_and_brute_force(model, batches)
    assert set(stats.layers) == set(expected)
    for index, (n, per) in expected.items():
        layer = stats.layers[index]
        assert layer.num_tokens == n == 4 * 3 * 9
        for e, want in per.items():
            assert layer.count[e] == want["count"]
            np.testing.assert_allclose(layer.frequency[e], want["frequency"], rtol=1e-12)
            np.testing.assert_allclose(layer.routing_score[e], want["routing_score"], rtol=1e-9)
            np.testing.assert_allclose(layer.mean[e], want["mean"], rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(layer.var[e], want["var"], rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(layer.phi_var[e], np.sqrt(want["var"].sum()), rtol=1e-9)
            np.testing.assert_allclose(layer.reap[e], want["reap"], rtol=1e-9)
            np.testing.assert_allclose(layer.sq_weight_sum[e], want["sq_weight_sum"], rtol=1e-9)
            np.testing.assert_allclose(layer.weighted_mean[e], want["weighted_mean"], rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(layer.novice_error[e], want["novice_error"], rtol=1e-9, atol=1e-300)
        assert layer.count.sum() == n * layer.top_k


def test_llama4_stats_match_its_own_experts():
    """Llama 4's experts scale their input (the model adds expert_e(g·x)): f_e = expert_e(g·x)/g. Brute force from the
    model's own modules, kept aside before the adapter puts the blocks into the standard form: the router's logits,
    top-k and sigmoid, and Llama4TextExperts run densely on g·x as Llama4TextMoe runs them."""
    import copy

    from tiny_models import tiny_model_of

    model = tiny_model_of("llama4_text", seed=5)
    originals = {index: copy.deepcopy(layer.feed_forward) for index, layer in enumerate(model.model.layers)
                 if hasattr(layer.feed_forward, "router")}
    inputs = {index: [] for index in originals}
    hooks = [model.model.layers[index].feed_forward.register_forward_pre_hook(
        lambda m, args, i=index: inputs[i].append(args[0].detach())) for index in originals]
    stats = collect_stats(model, tiny_batches(num=3, batch=2, seq=9, seed=1), progress=False)
    for hook in hooks:
        hook.remove()
    assert set(stats.layers) == set(originals)
    for index, block in originals.items():
        hidden = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[index]])
        with torch.no_grad():
            scores, _ = block.router(hidden)  # [T, E]: sigmoid of the top-k logits, 0 elsewhere
            routed = block.experts((hidden.repeat(scores.shape[1], 1) * scores.T.reshape(-1, 1)))
        routed = routed.reshape(scores.shape[1], -1, hidden.shape[-1]).double()
        layer = stats.layers[index]
        for e in range(scores.shape[1]):
            token = torch.nonzero(scores[:, e] > 0)[:, 0]
            g = scores[token, e].double()
            f = (routed[e, token] / g[:, None]).numpy()
            assert layer.count[e] == len(token)
            np.testing.assert_allclose(layer.routing_score[e], g.sum().item() / len(hidden), rtol=1e-6)
            if len(token):
                np.testing.assert_allclose(layer.mean[e], f.mean(0), rtol=1e-4, atol=1e-6)
            if len(token) > 1:
                np.testing.assert_allclose(layer.var[e], f.var(0, ddof=1), rtol=1e-3, atol=1e-8)
                # g²‖f − c‖² = ‖g·f − g·c‖²: the error of the output the model adds, g·f = expert_e(g·x)
                w = (g**2).numpy()
                c = w @ f / w.sum()
                np.testing.assert_allclose(layer.weighted_mean[e], c, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(layer.novice_error[e], (w[:, None] * (f - c) ** 2).sum() / len(hidden),
                                           rtol=1e-3)


def test_stats_do_not_depend_on_batching():
    # float64 model: expert outputs do not depend on the batch shape, so only the merge is under test.
    model = tiny_model("qwen3_moe", seed=7).double()
    tokens = torch.cat(tiny_batches(num=4, batch=2, seq=10, seed=4))
    whole = collect_stats(model, [tokens], progress=False)
    split = collect_stats(model, list(tokens.split(1)), progress=False)
    for index, layer in whole.layers.items():
        other = split.layers[index]
        np.testing.assert_array_equal(layer.count, other.count)
        np.testing.assert_allclose(other.mean, layer.mean, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(other.m2, layer.m2, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(other.reap, layer.reap, rtol=1e-9)
        np.testing.assert_allclose(other.sq_weight_sum, layer.sq_weight_sum, rtol=1e-12)
        np.testing.assert_allclose(other.weighted_mean, layer.weighted_mean, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(other.weighted_m2, layer.weighted_m2, rtol=1e-9, atol=1e-15)


def test_chan_merge_is_exact_for_offset_data():
    """Large common offset, small spread: a naive sum-of-squares formula would lose every digit here."""
    rng = np.random.default_rng(0)
    data = 1e6 + rng.standard_normal((1000, 3))
    layer = LayerStats(num_experts=1, hidden_size=3, top_k=1)
    for chunk in np.array_split(data, 37):
        layer.add_expert_outputs(0, chunk, np.ones(len(chunk)))
    np.testing.assert_allclose(layer.var[0], data.var(0, ddof=1), rtol=1e-9)


def test_weighted_merges_are_exact_for_offset_data_and_across_ranks():
    """The g²-weighted mean and squared deviations (West's update), batch by batch and merged across two
    'ranks' (LayerStats.merge), against the two-pass formula, with small weights (Σg² below 1), a batch of weight 0
    (it moves nothing) and an expert only one rank saw (the merge keeps that rank's statistics)."""
    rng = np.random.default_rng(1)
    data = 1e6 + rng.standard_normal((999, 4))
    g = rng.uniform(0.0, 0.03, 999)
    w = g**2
    assert w.sum() < 1
    mean = w @ data / w.sum()
    m2 = w @ (data - mean) ** 2
    other = rng.standard_normal((7, 4))
    halves = []
    for rows in (slice(0, 400), slice(400, None)):
        layer = LayerStats(num_experts=3, hidden_size=4, top_k=1)
        for chunk, weights in zip(np.array_split(data[rows], 13), np.array_split(g[rows], 13)):
            layer.add_expert_outputs(1, chunk, weights)
        layer.add_expert_outputs(1, rng.standard_normal((5, 4)) * 1e3, np.zeros(5))  # weight 0: moves nothing
        halves.append(layer)
    halves[1].add_expert_outputs(2, other, np.full(7, 0.5))
    alone = dataclasses.replace(halves[1], weighted_mean=halves[1].weighted_mean.copy(),
                                weighted_m2=halves[1].weighted_m2.copy(), sq_weight_sum=halves[1].sq_weight_sum.copy())
    halves[0].merge(halves[1])
    merged = halves[0]
    np.testing.assert_allclose(merged.sq_weight_sum[1], w.sum(), rtol=1e-12)
    np.testing.assert_allclose(merged.weighted_mean[1], mean, rtol=1e-12)
    np.testing.assert_allclose(merged.weighted_m2[1], m2, rtol=1e-8)
    for name in ("sq_weight_sum", "weighted_mean", "weighted_m2"):
        np.testing.assert_array_equal(getattr(merged, name)[2], getattr(alone, name)[2])
    np.testing.assert_allclose(alone.weighted_mean[2], other.mean(0), rtol=1e-12)
    assert merged.sq_weight_sum[0] == 0 and not merged.weighted_mean[0].any() and not merged.weighted_m2[0].any()


def test_collection_leaves_model_output_unchanged_and_restores_forward():
    model = tiny_model("qwen2_moe", seed=3)
    batch = tiny_batches(num=1)[0]
    with torch.no_grad():
        before = model(batch).logits
    _, layers = moe_layers_or_error(model)
    stats = {l.index: LayerStats(l.num_experts, l.hidden_size, l.top_k) for l in layers}
    with recording_experts(model, stats), torch.no_grad():
        during = model(batch).logits
    torch.testing.assert_close(during, before, rtol=0, atol=1e-6)
    assert all("forward" not in vars(l.experts) for l in layers)


def test_hooks_removed_when_forward_raises():
    model = tiny_model("olmoe")
    _, layers = moe_layers_or_error(model)
    bad = torch.full((1, 4), 10_000)  # token id out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        collect_stats(model, [bad], progress=False)
    assert all("forward" not in vars(l.experts) for l in layers)


def test_stats_refuse_a_pruned_model():
    from mone_export import apply_plan, plan_pruning

    model = tiny_model("mixtral")
    plan = plan_pruning(collect_stats(model, tiny_batches(), progress=False), 0.5)
    apply_plan(model, plan)
    with pytest.raises(UsageError, match="already pruned"):
        collect_stats(model, tiny_batches(), progress=False)
