"""Plans bind to the weights they were computed on: the experts fingerprint, and novices bound to plan.json."""

from __future__ import annotations

import copy
import hashlib
import shutil
import struct

import pytest
import torch

from mone_export import PruningPlan, collect_stats, plan_pruning
from mone_export.adapters import moe_layers_or_error
from mone_export.errors import PlanMismatchError, UsageError
from mone_export.fingerprint import experts_fingerprint, experts_fingerprints
from tiny_models import tiny_batches, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral", seed=0)


def plan_of(model, ratio: float = 0.5) -> PruningPlan:
    return plan_pruning(collect_stats(model, tiny_batches()), ratio, "mone")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan") / "plan"
    plan_of(model).save(folder)
    return folder


def fingerprint_by_hand(model, rounded_to=None) -> str:
    """docs/plan.md's definition, written out independently of mone_export.fingerprint."""
    digest = hashlib.sha256(b"mone-export/experts-fingerprint/v1\n")
    _, layers = moe_layers_or_error(model)
    for layer in layers:
        digest.update(f"layer {layer.index}\n".encode())
        named = [("router.weight", layer.router.weight)]
        named += sorted(layer.experts.named_parameters())
        for name, tensor in named:
            digest.update(f"{name} {list(tensor.shape)}\n".encode())
            for expert in range(tensor.shape[0]):
                flat = tensor[expert].detach().flatten()
                step = max(1, flat.numel() // 256)
                values = flat[::step][:256]
                if rounded_to is not None:
                    values = values.to(rounded_to)
                digest.update(struct.pack(f"<{values.numel()}f", *values.float().tolist()))
    return "sha256:" + digest.hexdigest()


def test_fingerprint_is_the_documented_hash(model):
    assert experts_fingerprint(model) == fingerprint_by_hand(model)
    prints = experts_fingerprints(model)
    assert prints == {"float32": fingerprint_by_hand(model),
                      "float16": fingerprint_by_hand(model, torch.float16),
                      "bfloat16": fingerprint_by_hand(model, torch.bfloat16)}
    assert len(set(prints.values())) == 3


def test_the_plan_loads_for_its_own_weights_in_any_dtype(model, saved):
    assert PruningPlan.load(saved, model=model).pruned
    assert PruningPlan.load(saved, model=copy.deepcopy(model).half()).pruned  # what an fp16 load of it gives
    assert PruningPlan.load(saved, model=copy.deepcopy(model).to(torch.bfloat16)).pruned


def test_a_plan_computed_in_fp16_binds_to_the_fp32_model(model, tmp_path):
    """prune --dtype fp16, then export --plan (which loads fp32): the fp32 weights rounded are the plan's."""
    half = copy.deepcopy(model).half()
    plan_of(half).save(tmp_path / "plan")
    assert PruningPlan.load(tmp_path / "plan", model=model).pruned
    other = tiny_model("mixtral", seed=1)
    with pytest.raises(PlanMismatchError, match="other weights"):
        PruningPlan.load(tmp_path / "plan", model=other)


def test_other_weights_are_refused_unless_allowed(model, saved):
    other = tiny_model("mixtral", seed=1)
    with pytest.raises(PlanMismatchError, match="--allow-other-weights"):
        PruningPlan.load(saved, model=other)
    assert PruningPlan.load(saved, model=other, check_weights=False).pruned


def test_one_sampled_expert_value_changed_is_other_weights(model, saved):
    tuned = copy.deepcopy(model)
    _, layers = moe_layers_or_error(tuned)
    with torch.no_grad():
        next(layers[-1].experts.parameters())[3].view(-1)[0] += 1e-3  # expert 3, its first (sampled) value
    with pytest.raises(PlanMismatchError):
        PruningPlan.load(saved, model=tuned)


def test_novices_of_another_plan_are_rejected(model, saved, tmp_path):
    other = tmp_path / "other"
    plan_of(model, ratio=0.25).save(other)
    mixed = tmp_path / "mixed"
    shutil.copytree(saved, mixed)
    shutil.copy(other / "novices.safetensors", mixed / "novices.safetensors")
    with pytest.raises(UsageError, match="does not belong"):
        PruningPlan.load(mixed)


def test_a_plan_that_prunes_nothing_round_trips(model, tmp_path):
    plan = plan_of(model, ratio=0.0)
    assert plan.num_pruned == 0
    plan.save(tmp_path / "plan")
    loaded = PruningPlan.load(tmp_path / "plan", model=model)
    assert loaded.pruned == plan.pruned and loaded.num_pruned == 0
