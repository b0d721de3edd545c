"""Scores and selection rules (docs/method.md) on hand-made statistics, where the right answer is known."""

import math

import numpy as np
import pytest
import torch

from mone_export import plan_pruning
from mone_export.errors import UsageError
from mone_export.scoring import METHODS
from mone_export.stats import ExpertStats, LayerStats


def layer_from(g, counts, means, variances, top_k=2, n=100):
    """LayerStats with given routing sums, counts, means [E,H] and per-dim variances [E,H]."""
    e, h = np.asarray(means).shape
    layer = LayerStats(e, h, top_k)
    layer.num_tokens = n
    layer.routing_sum = np.asarray(g, dtype=float) * n
    layer.count = np.asarray(counts, dtype=np.int64)
    layer.mean = np.asarray(means, dtype=float)
    layer.m2 = np.asarray(variances, dtype=float) * np.maximum(layer.count - 1, 0)[:, None]
    layer.reap_sum = np.arange(1, e + 1, dtype=float)[::-1] * layer.count  # reap_e = E - e
    return layer


def stats_of(*layers):
    return ExpertStats("mixtral", len(layers) + 1, {i + 1: l for i, l in enumerate(layers)})


def four_expert_layer(**kw):
    # routing scores .4 .3 .2 .1 ; spreads phi = 1, 4, 1, 3 -> mone scores .4 1.2 .2 .3
    return layer_from(
        g=[0.4, 0.3, 0.2, 0.1],
        counts=[60, 50, 40, 50],
        means=[[1, 0], [2, 0], [3, 0], [4, 0]],
        variances=[[1, 0], [16, 0], [0.5, 0.5], [9, 0]],
        **kw,
    )


def test_mone_scores_are_routing_times_spread():
    stats = stats_of(four_expert_layer())
    plan = plan_pruning(stats, 0.5, "mone")
    np.testing.assert_allclose(plan.experts[1]["score"], [0.4, 1.2, 0.2, 0.3])
    assert plan.pruned == {1: [2, 3]}
    torch.testing.assert_close(plan.novices[1], torch.tensor([[3.0, 0.0], [4.0, 0.0]]))


@pytest.mark.parametrize(
    "method, pruned",
    [("frequency", [1, 2]), ("routing-score", [2, 3]), ("reap", [2, 3]), ("mone-zero", [2, 3])],
)
def test_baseline_selection(method, pruned):
    stats = stats_of(four_expert_layer())
    plan = plan_pruning(stats, 0.5, method)
    assert plan.pruned == {1: pruned}
    if method == "mone-zero":
        assert torch.equal(plan.novices[1], torch.zeros(2, 2))
    else:
        assert plan.novices == {} and plan.replacement == "remove"


def test_frequency_ties_break_by_lower_index():
    # counts 60 50 40 50 -> 2 first, then the tie between 1 and 3 goes to 1.
    assert plan_pruning(stats_of(four_expert_layer(top_k=1)), 0.5, "frequency").pruned == {1: [1, 2]}
    layer = layer_from(g=[.25] * 4, counts=[5, 5, 5, 5], means=np.zeros((4, 1)), variances=np.zeros((4, 1)), top_k=1)
    assert plan_pruning(stats_of(layer), 0.5, "frequency").pruned == {1: [0, 1]}


def test_floor_of_ratio_times_experts():
    layer = layer_from(g=np.linspace(.1, .2, 7), counts=[9] * 7, means=np.zeros((7, 1)), variances=np.ones((7, 1)), top_k=1)
    for ratio in (0.0, 0.1, 0.14, 0.15, 0.5, 0.99):
        plan = plan_pruning(stats_of(layer), ratio, "mone")
        assert len(plan.pruned[1]) == math.floor(ratio * 7)


def test_ratio_zero_prunes_nothing():
    plan = plan_pruning(stats_of(four_expert_layer()), 0.0, "mone")
    assert plan.pruned == {1: []} and plan.num_pruned == 0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_range(ratio):
    with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
        plan_pruning(stats_of(four_expert_layer()), ratio)


def test_removal_must_keep_top_k():
    stats = stats_of(four_expert_layer(top_k=3))
    with pytest.raises(UsageError, match="fewer than top_k=3"):
        plan_pruning(stats, 0.5, "frequency")
    assert plan_pruning(stats, 0.5, "mone").pruned == {1: [2, 3]}  # novices keep the router: fine


def test_unknown_method_and_scope():
    stats = stats_of(four_expert_layer())
    with pytest.raises(UsageError, match="unknown method 'magic'.*mone, mone-zero"):
        plan_pruning(stats, 0.5, "magic")
    with pytest.raises(UsageError, match="unknown scope 'model'.*layer, global"):
        plan_pruning(stats, 0.5, scope="model")


def test_global_scope_normalises_per_layer_and_keeps_one():
    a = four_expert_layer()  # mone scores .4 1.2 .2 .3, mean .525
    b = layer_from(  # scores 100x larger but same shape: raw ranking would never pick from b
        g=[0.4, 0.3, 0.2, 0.1], counts=[60, 50, 40, 50], means=np.zeros((4, 2)),
        variances=[[1e4, 0], [16e4, 0], [0.5e4, 0.5e4], [9e4, 0]],
    )
    plan = plan_pruning(stats_of(a, b), 0.5, "mone", scope="global")
    # Normalised scores are equal in both layers; total = 2 + 2; ties by (layer, expert) order.
    assert plan.pruned == {1: [2, 3], 2: [2, 3]}
    # Skewed: layer 2's normalised scores lower for all but one expert -> layer 2 loses up to E-1.
    c = layer_from(g=[0.4, 0.001, 0.001, 0.001], counts=[9] * 4, means=np.zeros((4, 2)), variances=np.ones((4, 2)))
    plan = plan_pruning(stats_of(a, c), 0.5, "mone", scope="global")
    assert plan.pruned[2] == [1, 2, 3] and plan.pruned[1] == [2]
    assert sum(len(v) for v in plan.pruned.values()) == 4


def test_global_scope_removal_keeps_top_k():
    a = four_expert_layer(top_k=2)
    c = layer_from(g=[0.4, 0.001, 0.001, 0.001], counts=[9] * 4, means=np.zeros((4, 2)), variances=np.ones((4, 2)))
    plan = plan_pruning(stats_of(a, c), 0.5, "routing-score", scope="global")
    assert len(plan.pruned[2]) == 2 and len(plan.pruned[1]) == 2


def test_random_is_seeded():
    stats = stats_of(four_expert_layer(), four_expert_layer())
    first = plan_pruning(stats, 0.5, "random", seed=3)
    assert first.pruned == plan_pruning(stats, 0.5, "random", seed=3).pruned
    picks = {str(plan_pruning(stats, 0.5, "random", seed=s).pruned) for s in range(8)}
    assert len(picks) > 1
    rng = np.random.default_rng(3)
    expected = [sorted(np.argsort(rng.random(4), kind="stable")[:2].tolist()) for _ in range(2)]
    assert [first.pruned[1], first.pruned[2]] == expected


def test_every_method_is_known():
    assert set(METHODS) == {"mone", "mone-zero", "ne", "auto", "frequency", "routing-score", "reap", "random"}


def test_ne_scores_the_weighted_error_and_keeps_the_weighted_mean():
    """Expert 0 spreads widely, but only on tokens of tiny weight: the error its novice causes is small, so NE
    prunes it while MoNE (mean weight × spread) prunes expert 1; NE's novice is the g²-weighted mean."""
    g0, f0 = np.array([0.01, 0.01, 1.0, 1.0]), np.array([[10.0], [-10.0], [0.5], [0.5]])
    g1, f1 = np.array([1.0, 1.0]), np.array([[0.0], [1.0]])
    layer = LayerStats(2, 1, 1)
    layer.add_tokens(6, np.array([g0.sum(), g1.sum()]))
    layer.add_expert_outputs(0, f0, g0)
    layer.add_expert_outputs(1, f1, g1)
    stats = stats_of(layer)
    c0 = (g0**2) @ f0[:, 0] / (g0**2).sum()
    errors = [(g0**2) @ (f0[:, 0] - c0) ** 2 / 6, (g1**2) @ (f1[:, 0] - 0.5) ** 2 / 6]
    plan = plan_pruning(stats, 0.5, "ne")
    np.testing.assert_allclose(plan.experts[1]["score"], errors, rtol=1e-12)
    assert plan.pruned == {1: [0]}
    np.testing.assert_allclose(plan.novices[1].numpy(), [[c0]], rtol=1e-6)
    assert abs(c0 - f0.mean()) > 0.1
    assert plan_pruning(stats, 0.5, "mone").pruned == {1: [1]}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_ne_score_is_the_measured_change_of_the_layer_output(family):
    """One expert per layer becomes its NE novice: the mean squared change of each MoE block's output on the
    calibration tokens (the block run on its recorded inputs, before and after) equals that expert's score, and
    the weighted mean beats the plain mean as the constant."""
    from mone_export import apply_plan, collect_stats
    from mone_export.adapters import moe_layers_or_error
    from tiny_models import tiny_batches, tiny_model

    model = tiny_model(family, seed=3).double()
    batches = tiny_batches(num=2, batch=2, seq=11, seed=2)
    _, layers = moe_layers_or_error(model)
    inputs, outputs = {}, {}

    def record(index):
        def hook(module, args, out):
            inputs[index] = args[0].detach().clone()
            outputs[index] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    hooks = [layer.block.register_forward_hook(record(layer.index)) for layer in layers]
    stats = collect_stats(model, batches[:1], progress=False)
    for hook in hooks:
        hook.remove()
    ratio = 1 / layers[0].num_experts
    ne, mone = plan_pruning(stats, ratio, "ne"), plan_pruning(stats, ratio, "mone")
    mone_like = plan_pruning(stats, ratio, "ne")
    mone_like.novices = {i: torch.from_numpy(stats.layers[i].mean[experts].astype(np.float32))
                         for i, experts in ne.pruned.items()}
    errors = {}
    for name, plan in (("ne", ne), ("plain mean", mone_like)):
        pruned = tiny_model(family, seed=3).double()
        apply_plan(pruned, plan)
        _, pruned_layers = moe_layers_or_error(pruned)
        with torch.no_grad():
            for layer in pruned_layers:
                out = layer.block(inputs[layer.index])
                out = out[0] if isinstance(out, tuple) else out
                errors[name, layer.index] = float(((out - outputs[layer.index]) ** 2).sum()) / stats.num_tokens
    for index, experts in ne.pruned.items():
        score = stats.layers[index].novice_error[experts[0]]
        np.testing.assert_allclose(errors["ne", index], score, rtol=1e-5, atol=1e-12)
        assert errors["ne", index] <= errors["plain mean", index] + 1e-12
    assert ne.method == "ne" and mone.method == "mone"


def test_unused_expert_has_zero_stats():
    layer = LayerStats(3, 2, 1)
    layer.num_tokens = 10
    layer.add_expert_outputs(0, np.ones((4, 2)), np.ones(4))
    assert layer.var[1].tolist() == [0, 0] and layer.mean[1].tolist() == [0, 0] and layer.reap[1] == 0
    layer.add_expert_outputs(2, np.ones((1, 2)), np.ones(1))
    assert layer.var[2].tolist() == [0, 0]  # count 1: variance 0


def _tiny(family: str, seed: int):
    """A tiny model of a family of tiny_models, or of any model type (Llama 4) through its own config helper."""
    from tiny_models import CONFIGS, tiny_model, tiny_model_of

    return tiny_model(family, seed=seed) if family in CONFIGS else tiny_model_of(family, seed=seed)


def _block_inputs_and_outputs(model, run):
    """Every MoE block's inputs and outputs during ``run()``, per layer, in call order."""
    from mone_export.adapters import moe_layers_or_error

    _, layers = moe_layers_or_error(model)
    seen = {layer.index: [] for layer in layers}

    def record(index):
        def hook(module, args, out):
            seen[index].append((args[0].detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone()))
        return hook

    hooks = [layer.block.register_forward_hook(record(layer.index)) for layer in layers]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return result, seen


def _mean_block_change(pruned, seen, num_tokens):
    """Per MoE layer of ``pruned``: Σ over the recorded calls of ‖block(input) − recorded output‖², over ``num_tokens``."""
    from mone_export.adapters import moe_layers_or_error

    _, layers = moe_layers_or_error(pruned)
    change = {}
    with torch.no_grad():
        for layer in layers:
            total = 0.0
            for x, before in seen[layer.index]:
                out = layer.block(x)
                out = out[0] if isinstance(out, tuple) else out
                total += float(((out - before) ** 2).sum())
            change[layer.index] = total / num_tokens
    return change


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama4_text"])
def test_removal_error_is_the_measured_change_of_the_layer_output(family):
    """Each expert in turn is removed (router row cut, its tokens re-routed) in every layer: the mean squared change
    of each MoE block's output on the calibration tokens, over two batches, equals that expert's measured
    removal_error. qwen2_moe and olmoe do not renormalise their top-k: removal changes every token's weights; Llama 4's
    experts scale their input (the re-routed token's new expert runs on g'·x)."""
    import dataclasses

    from mone_export import apply_plan, collect_stats
    from tiny_models import tiny_batches

    model = _tiny(family, seed=3).double()
    batches = tiny_batches(num=2, batch=2, seq=11, seed=2)
    # The blocks' inputs and outputs come from a plain run: measuring calls each block again to re-route.
    plain, seen = _block_inputs_and_outputs(model, lambda: collect_stats(model, batches, progress=False))
    stats = collect_stats(model, batches, progress=False, measure_removal=True)
    for index, layer in stats.layers.items():  # measuring the removal changes no other statistic
        np.testing.assert_array_equal(layer.weighted_m2, plain.layers[index].weighted_m2)
        assert plain.layers[index].removal_error is None
    frequency = plan_pruning(stats, 0.25, "frequency")
    num_experts = next(iter(stats.layers.values())).num_experts
    for expert in range(num_experts):
        plan = dataclasses.replace(frequency, pruned={index: [expert] for index in stats.layers})
        change = _mean_block_change(apply_plan(_tiny(family, seed=3).double(), plan), seen, stats.num_tokens)
        for index, layer in stats.layers.items():
            np.testing.assert_allclose(layer.removal_error[expert], change[index], rtol=1e-7, atol=1e-14)
            assert layer.removal_error[expert] > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_measuring_removal_leaves_the_model_as_it_was(family):
    """Re-routing without each expert cuts router rows, swaps the shared expert and hooks the blocks: afterwards
    the weights, modules, expert counts, hooks and forwards are the ones before, and the logits are bit-identical."""
    from mone_export import collect_stats
    from mone_export.adapters import moe_layers_or_error
    from tiny_models import tiny_batches, tiny_model

    model = tiny_model(family, seed=3)
    batch = tiny_batches(num=1, batch=2, seq=11, seed=2)[0]
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    _, layers = moe_layers_or_error(model)
    attrs = [(vars(layer.router).copy(), vars(layer.experts).copy(), len(layer.block._forward_pre_hooks)) for layer in layers]
    collect_stats(model, [batch], progress=False, measure_removal=True)
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    for layer, (router, experts, hooks) in zip(layers, attrs):
        assert {k: v for k, v in vars(layer.router).items() if not k.startswith("_")} == \
            {k: v for k, v in router.items() if not k.startswith("_")}
        assert "forward" not in vars(layer.experts) and len(layer.block._forward_pre_hooks) == hooks
        assert {k: v for k, v in vars(layer.experts).items() if not k.startswith("_")} == \
            {k: v for k, v in experts.items() if not k.startswith("_")}
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, logits)


def test_removal_error_is_infinite_where_removal_is_impossible_and_auto_then_makes_novices():
    """deepseek_v2 with group-limited routing cannot lose one expert: its removal error is inf, the plan records
    None (JSON has no infinity), and auto makes the same novices as ne."""
    from mone_export import collect_stats
    from tiny_models import tiny_batches, tiny_model

    model = tiny_model("deepseek_v2", seed=3)
    stats = collect_stats(model, tiny_batches(num=1, batch=2, seq=11, seed=2), progress=False, measure_removal=True)
    layer = next(iter(stats.layers.values()))
    assert np.isinf(layer.removal_error).all()
    auto, ne = plan_pruning(stats, 0.5, "auto"), plan_pruning(stats, 0.5, "ne")
    assert auto.replacement == "novice" and not auto.removed and auto.pruned == ne.pruned
    assert all(v is None for entry in auto.experts.values() for v in entry["removal_error"])
    for index in ne.novices:
        torch.testing.assert_close(auto.novices[index], ne.novices[index], rtol=0, atol=0)


def test_auto_without_measured_removal_is_a_clear_error():
    from mone_export import collect_stats
    from tiny_models import tiny_batches, tiny_model

    model = tiny_model("mixtral", seed=3)
    stats = collect_stats(model, tiny_batches(num=1, batch=2, seq=11, seed=2), progress=False)
    with pytest.raises(UsageError, match="measure_removal"):
        plan_pruning(stats, 0.5, "auto")


def test_auto_takes_per_expert_the_cheaper_of_novice_and_removal():
    """Hand-made errors: auto prunes the experts whose cheaper option is smallest, removes those whose removal is
    cheaper, and never removes so many that the router keeps fewer than top_k experts."""
    layer = LayerStats(6, 1, 2, measures_removal=True)
    layer.num_tokens = 1
    layer.count[:] = 1
    layer.sq_weight_sum[:] = 1.0
    layer.weighted_mean[:, 0] = np.arange(6) * 10.0
    layer.weighted_m2[:, 0] = [5.0, 1.0, 9.0, 2.0, 8.0, 7.0]  # novice errors
    layer.removal_sq_sum[:] = [0.5, 3.0, 0.7, 0.1, 9.0, 0.2]  # removal errors
    stats = ExpertStats("mixtral", 2, {1: layer})
    plan = plan_pruning(stats, 0.5, "auto")  # costs 0.5, 1, 0.7, 0.1, 8, 0.2: prune 3, 5, 0
    assert plan.pruned == {1: [0, 3, 5]} and plan.removed == {1: [0, 3, 5]} and plan.replacement == "mixed"
    assert plan.novice_ids(1) == [] and 1 not in plan.novices
    plan = plan_pruning(stats, 0.67, "auto")  # prune 3, 5, 0, 2: removal cheaper for all; room for 4 = 6 − top_k
    assert plan.pruned == {1: [0, 2, 3, 5]} and plan.removed == {1: [0, 2, 3, 5]}
    layer.removal_sq_sum[1] = 2.0
    plan = plan_pruning(stats, 0.84, "auto")  # five pruned; 1 is a novice (1 < 2), four removed at most
    assert plan.pruned == {1: [0, 1, 2, 3, 5]} and plan.removed == {1: [0, 2, 3, 5]}
    assert plan.novice_ids(1) == [1]
    np.testing.assert_allclose(plan.novices[1].numpy(), [[10.0]])
    layer.removal_sq_sum[1] = 0.9  # now five experts are cheaper removed; room for four: the smallest saving,
    plan = plan_pruning(stats, 0.84, "auto")  # 5 − 0.2 = 4.8 for expert 5 against 1 − 0.9 = 0.1 for expert 1, stays
    assert plan.pruned == {1: [0, 1, 2, 3, 5]} and plan.removed == {1: [0, 2, 3, 5]} and plan.novice_ids(1) == [1]
    layer.removal_sq_sum[1] = 2.0
    layer.weighted_m2[:, 0] = [0.01, 1.0, 0.02, 0.03, 8.0, 0.04]  # novices now cheaper than removal for 0, 2, 3, 5
    plan = plan_pruning(stats, 0.67, "auto")
    assert plan.pruned == {1: [0, 2, 3, 5]} and plan.replacement == "novice" and not plan.removed


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_layer_output_errors_of_one_expert_plans_are_its_novice_and_removal_errors(family):
    """layer_output_errors runs each plan's pruned blocks on the recorded inputs: with one pruned expert per layer it
    must give that expert's novice_error (ne) and removal_error (removal), computed by the statistics another way;
    the model is left as it was."""
    import dataclasses

    from mone_export import collect_stats
    from mone_export.layer_errors import layer_output_errors
    from tiny_models import tiny_batches, tiny_model

    model = tiny_model(family, seed=3).double()
    batches = tiny_batches(num=2, batch=2, seq=11, seed=2)
    stats = collect_stats(model, batches, progress=False, measure_removal=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratio = 1 / next(iter(stats.layers.values())).num_experts
    ne = plan_pruning(stats, ratio, "ne")
    removal = dataclasses.replace(plan_pruning(stats, ratio, "frequency"), pruned=ne.pruned)
    errors = layer_output_errors(model, batches, [ne, removal])
    for index, layer in stats.layers.items():
        expert = ne.pruned[index][0]
        np.testing.assert_allclose(errors[0][index], layer.novice_error[expert], rtol=1e-6)
        np.testing.assert_allclose(errors[1][index], layer.removal_error[expert], rtol=1e-6)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
