"""Applying plans: the invariants of docs/method.md, generate(), save/reload, and plan round trips."""

import pytest
import torch
import transformers

from mone_export import PruningPlan, apply_plan, collect_stats, load_model, plan_pruning, save_pruned
from mone_export.adapters import expert_forward, moe_layers_or_error
from mone_export.errors import PlanMismatchError, UsageError
from mone_export.novices import NoviceExperts
from tiny_models import FAMILIES, tiny_batches, tiny_model

REMOVAL = ["frequency", "routing-score", "reap", "random"]


def calibrated(family, seed=0, method="mone", ratio=0.5, scope="layer", **overrides):
    model = tiny_model(family, seed=seed, **overrides)
    stats = collect_stats(model, tiny_batches(seed=seed), progress=False)
    return model, stats, plan_pruning(stats, ratio, method=method, scope=scope)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def routed_over(adapter, layer, x, rows, constant=None):
    """Brute force of a softmax-top-k block whose router keeps only the expert ``rows``: each picked expert e adds
    w · constant[e] (a novice) or w · f_e(x), renormalised as the router says, plus the shared expert."""
    constant = constant or {}
    probs = torch.softmax((x @ layer.router.weight[rows].T).float(), -1)
    top, pos = torch.topk(probs, layer.top_k, dim=-1)
    if getattr(layer.router, "norm_topk_prob", True):
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, p in zip(top[t], pos[t]):
            e = rows[p]
            out[t] += w * (constant[e] if e in constant else expert_forward(layer.experts, e, x[t:t + 1])[0])
    shared = adapter.shared_output(layer, x)
    return out + (shared if shared is not None else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing_bit_for_bit(family):
    model, _, plan = calibrated(family, ratio=0.0)
    reference = tiny_model(family)
    tokens = tiny_batches(seed=9)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_novice_layer_equals_unpruned_with_means(family):
    """Layer output after MoNE = Σ g_e f_e with f_e replaced by mean_e for pruned e (router unchanged)."""
    model, stats, plan = calibrated(family, seed=1)
    adapter, layers = moe_layers_or_error(model)
    hidden = {l.index: torch.randn(17, l.hidden_size, generator=torch.Generator().manual_seed(l.index)) * 3 for l in layers}
    expected = {}
    with torch.no_grad():
        for layer in layers:
            x = hidden[layer.index]
            index, weights = adapter.route(layer, x)
            out = torch.zeros_like(x)
            pruned = plan.pruned[layer.index]
            for e in range(layer.num_experts):
                token, slot = torch.where(index == e)
                if e in pruned:
                    f = torch.from_numpy(stats.layers[layer.index].mean[e]).float().expand(len(token), -1)
                else:
                    f = expert_forward(layer.experts, e, x[token])
                out[token] += weights[token, slot, None] * f
            shared = adapter.shared_output(layer, x)
            expected[layer.index] = out + (shared if shared is not None else 0)
    apply_plan(model, plan)
    _, pruned_layers = moe_layers_or_error(model)
    with torch.no_grad():
        for layer in pruned_layers:
            assert isinstance(layer.experts, NoviceExperts)
            got = layer.block(hidden[layer.index][None])[0]
            torch.testing.assert_close(got, expected[layer.index], rtol=0, atol=1e-5)


def test_novice_error_on_calibration_tokens_has_zero_mean():
    """On calibration tokens, Σ over R_e of (f_e - mean_e) = 0: the novice is an unbiased estimate."""
    model, stats, plan = calibrated("mixtral", seed=2)
    layer_index, pruned = next((i, p) for i, p in plan.pruned.items() if p)
    e = pruned[0]
    # The novice vector is exactly the recorded mean of f_e over R_e.
    torch.testing.assert_close(plan.novices[layer_index][0].double(),
                               torch.from_numpy(stats.layers[layer_index].mean[e]), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["mone", "frequency"])
def test_generate_works_after_pruning(family, method):
    model, _, plan = calibrated(family, method=method, ratio=0.34)
    if family == "deepseek_v2" and method == "frequency":
        pytest.skip("group-limited removal tested separately")
    apply_plan(model, plan)
    out = model.generate(tiny_batches(seed=4)[0][:1, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_removal_equals_router_over_remaining_experts(family):
    model, _, plan = calibrated(family, method="reap", ratio=0.34)
    adapter, layers = moe_layers_or_error(model)
    x = torch.randn(19, layers[0].hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    expected = {}
    with torch.no_grad():
        for layer in layers:
            expected[layer.index] = routed_over(adapter, layer, x, plan.kept(layer.index))
    apply_plan(model, plan)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            assert layer.num_experts == len(plan.kept(layer.index))
            torch.testing.assert_close(layer.block(x[None])[0], expected[layer.index], rtol=0, atol=1e-5)


def test_removal_on_group_limited_routing_needs_equal_group_losses():
    model, _, plan = calibrated("deepseek_v2", method="frequency", ratio=0.34)
    unequal = any(len({e // 3 for e in p}) == 1 and len(p) > 0 for p in plan.pruned.values())
    if unequal:
        with pytest.raises(UsageError, match="group-limited routing"):
            apply_plan(model, plan)
    greedy, _, plan = calibrated("deepseek_v2", method="frequency", ratio=0.34, topk_method="greedy", n_group=1,
                                 topk_group=1)
    apply_plan(greedy, plan)
    assert all(l.num_experts == 4 for l in moe_layers_or_error(greedy)[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_plan_reproduces_pruned_model_bit_for_bit(family, tmp_path):
    model, _, plan = calibrated(family, seed=3)
    apply_plan(model, plan)
    plan.save(tmp_path / "plan")
    loaded = PruningPlan.load(tmp_path / "plan")
    assert loaded.pruned == plan.pruned and loaded.to_dict() == plan.to_dict()
    again = tiny_model(family, seed=3)
    apply_plan(again, loaded)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_folder_reloads_identical(family, tmp_path):
    model, _, plan = calibrated(family, seed=4)
    apply_plan(model, plan)
    save_pruned(model, None, plan, tmp_path / "out")
    reloaded, _ = load_model(tmp_path / "out", attn_implementation="eager")
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = tiny_batches(seed=6)[0]
    assert torch.equal(logits(model, tokens), logits(reloaded, tokens))
    # Plain transformers must not silently load a novice model as if it were unpruned.
    with pytest.raises(Exception):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_removal_folder_is_a_standard_checkpoint(family, tmp_path):
    model, _, plan = calibrated(family, method="routing-score", ratio=0.34)
    apply_plan(model, plan)
    save_pruned(model, None, plan, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", experts_implementation="eager",
                                                             attn_implementation="eager").eval()
    assert plain.config.num_experts == moe_layers_or_error(model)[1][0].num_experts
    tokens = tiny_batches(seed=6)[0]
    torch.testing.assert_close(logits(plain, tokens), logits(model, tokens), rtol=0, atol=0)


def test_plan_mismatch_is_named():
    _, _, plan = calibrated("mixtral")
    with pytest.raises(PlanMismatchError, match="model_type 'mixtral'.*'olmoe'"):
        apply_plan(tiny_model("olmoe"), plan)
    with pytest.raises(PlanMismatchError, match="7 experts but the plan expects 6"):
        apply_plan(tiny_model("mixtral", num_local_experts=7), plan)
    with pytest.raises(PlanMismatchError, match="3 layers but the model has 4"):
        apply_plan(tiny_model("mixtral", num_hidden_layers=4), plan)


def test_plan_load_validates_against_model(tmp_path):
    _, _, plan = calibrated("qwen3_moe")
    plan.save(tmp_path)
    with pytest.raises(PlanMismatchError, match="hidden size"):
        PruningPlan.load(tmp_path, model=tiny_model("qwen3_moe", hidden_size=48))
    with pytest.raises(UsageError, match="no plan.json"):
        PruningPlan.load(tmp_path / "missing")


def mixed_plan(family, seed=0, ratio=0.5):
    """An ne plan turned mixed by hand: in each layer the first half of its pruned experts are removed instead."""
    import dataclasses

    model, stats, plan = calibrated(family, seed=seed, method="ne", ratio=ratio)
    removed = {index: experts[:len(experts) // 2] for index, experts in plan.pruned.items() if len(experts) > 1}
    novices = {}
    for index, experts in plan.pruned.items():
        rows = [row for row, e in enumerate(experts) if e not in removed.get(index, [])]
        novices[index] = plan.novices[index][rows]
    return model, dataclasses.replace(plan, removed=removed, novices=novices, replacement="mixed", method="auto")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_mixed_plan_reroutes_around_removed_experts_and_keeps_novices(family):
    """Brute force: the router over the remaining experts' rows picks top-k; a picked novice adds g·C, a picked real
    expert g·f."""
    model, plan = mixed_plan(family)
    assert plan.removed and all(plan.novice_ids(i) for i in plan.pruned)
    adapter, layers = moe_layers_or_error(model)
    x = torch.randn(19, layers[0].hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    expected = {}
    with torch.no_grad():
        for layer in layers:
            remaining = [e for e in range(layer.num_experts) if e not in plan.removed.get(layer.index, [])]
            constant = dict(zip(plan.novice_ids(layer.index), plan.novices[layer.index]))
            expected[layer.index] = routed_over(adapter, layer, x, remaining, constant)
    apply_plan(model, plan)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            remaining = [e for e in range(plan.model["num_experts"][layer.index])
                         if e not in plan.removed.get(layer.index, [])]
            assert layer.num_experts == len(remaining)
            assert layer.experts.novice_ids == [remaining.index(e) for e in plan.novice_ids(layer.index)]
            torch.testing.assert_close(layer.block(x[None])[0], expected[layer.index], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixed_plan_and_pruned_folder_round_trip(family, tmp_path):
    model, plan = mixed_plan(family, seed=4)
    plan.save(tmp_path / "plan")
    loaded = PruningPlan.load(tmp_path / "plan")
    assert (loaded.removed, loaded.replacement, loaded.to_dict()) == (plan.removed, "mixed", plan.to_dict())
    apply_plan(model, loaded)
    save_pruned(model, None, loaded, tmp_path / "out")
    reloaded, _ = load_model(tmp_path / "out", attn_implementation="eager")
    tokens = tiny_batches(seed=6)[0]
    assert torch.equal(logits(model, tokens), logits(reloaded, tokens))


def test_mixed_plan_is_checked():
    import dataclasses

    _, plan = mixed_plan("mixtral")
    index = next(iter(plan.removed))
    with pytest.raises(UsageError, match="not all pruned"):
        dataclasses.replace(plan, removed={index: [e for e in plan.kept(index)][:1]})
    with pytest.raises(UsageError, match="only a mixed plan"):
        dataclasses.replace(plan, replacement="novice")
    with pytest.raises(UsageError, match="novice vectors have shape"):
        dataclasses.replace(plan, removed={}, replacement="novice")  # the novice rows are the mixed plan's
