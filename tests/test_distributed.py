"""Data-parallel calibration: 2 ranks on gloo (launched by torchrun) make the plan a single process makes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mone_export import collect_stats, load_model, plan_pruning
from tiny_models import tiny_batches, tiny_model

RANK_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    import torch.distributed as dist
    from mone_export import load_model, plan_pruning
    from mone_export.distributed import collect_stats_distributed, init_from_environment
    from mone_export.streaming import LayerStreamedModel

    folder, out, streamed = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed"
    torch.set_num_threads(1)
    init_from_environment("gloo")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 97, (2, 11), generator=gen) for _ in range(5)]
    model = LayerStreamedModel(folder) if streamed else load_model(folder)[0]
    stats = collect_stats_distributed(model, batches, progress=False, measure_removal=True)
    plan = plan_pruning(stats, 0.5, "mone")
    ne_plan = plan_pruning(stats, 0.5, "ne")
    auto_plan = plan_pruning(stats, 0.5, "auto")
    layers = {str(i): {k: getattr(l, k).tolist() for k in ("count", "routing_sum", "reap_sum", "mean", "m2", "sq_weight_sum", "weighted_mean", "weighted_m2", "removal_sq_sum")}
              | {"num_tokens": l.num_tokens} for i, l in stats.layers.items()}
    with open(f"{out}.{dist.get_rank()}.json", "w") as handle:
        json.dump({"pruned": {str(k): v for k, v in plan.pruned.items()},
                   "ne_pruned": {str(k): v for k, v in ne_plan.pruned.items()}, "layers": layers,
                   "auto": [{str(k): v for k, v in auto_plan.pruned.items()},
                            {str(k): v for k, v in auto_plan.removed.items()}],
                   "tokens": stats.calibration["tokens"]}, handle)
    dist.barrier()
    dist.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(tmp_path, folder, mode: str) -> list[dict]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / f"result-{mode}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                             str(folder), str(out), mode], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"result-{mode}.{rank}.json").read_text()) for rank in (0, 1)]


def test_two_gloo_ranks_merge_to_the_single_process_statistics_and_plan(tmp_path):
    folder = tmp_path / "model"
    tiny_model("mixtral", seed=0).save_pretrained(folder)
    model, _ = load_model(folder)  # as the ranks load it (the same attention implementation)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 97, (2, 11), generator=gen) for _ in range(5)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: fp32 kernels may round differently with other thread counts
    try:
        single = collect_stats(model, batches, progress=False, measure_removal=True)
    finally:
        torch.set_num_threads(threads)
    expected_plan = {str(k): v for k, v in plan_pruning(single, 0.5, "mone").pruned.items()}
    for mode in ("in-memory", "streamed"):
        ranks = run_two_ranks(tmp_path, folder, mode)
        assert ranks[0] == ranks[1]  # every rank holds the same merged statistics
        assert ranks[0]["pruned"] == expected_plan and ranks[0]["tokens"] == 5 * 22
        assert ranks[0]["ne_pruned"] == {str(k): v for k, v in plan_pruning(single, 0.5, "ne").pruned.items()}
        auto = plan_pruning(single, 0.5, "auto")
        assert ranks[0]["auto"] == [{str(k): v for k, v in auto.pruned.items()}, {str(k): v for k, v in auto.removed.items()}]
        for index, layer in single.layers.items():
            merged = ranks[0]["layers"][str(index)]
            assert merged["num_tokens"] == layer.num_tokens
            for key in ("count", "routing_sum", "reap_sum", "mean", "m2", "sq_weight_sum", "weighted_mean", "weighted_m2",
                        "removal_sq_sum"):
                np.testing.assert_allclose(np.asarray(merged[key]), getattr(layer, key), rtol=1e-9,
                                           atol=1e-12 * float(np.abs(getattr(layer, key)).max() or 1), err_msg=key)


def test_merging_is_chans_update_against_brute_force():
    """Statistics of two token sets merged equal those of the union computed directly from the outputs."""
    from mone_export.stats import LayerStats

    rng = np.random.default_rng(0)
    a, b, union = LayerStats(3, 4, 1), LayerStats(3, 4, 1), LayerStats(3, 4, 1)
    outputs = {e: rng.normal(size=(int(rng.integers(0, 9)), 4)) * (e + 1) for e in range(3)}
    for expert, rows in outputs.items():
        weights = rng.uniform(size=len(rows))
        split = len(rows) // 3
        a.add_expert_outputs(expert, rows[:split], weights[:split])
        b.add_expert_outputs(expert, rows[split:], weights[split:])
        union.add_expert_outputs(expert, rows, weights)
    a.merge(b)
    for expert, rows in outputs.items():
        assert a.count[expert] == len(rows)
        if len(rows):
            np.testing.assert_allclose(a.mean[expert], rows.mean(axis=0), rtol=1e-12)
            np.testing.assert_allclose(a.m2[expert], ((rows - rows.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(a.reap_sum, union.reap_sum, rtol=1e-12)
    np.testing.assert_allclose(a.sq_weight_sum, union.sq_weight_sum, rtol=1e-12)
    np.testing.assert_allclose(a.weighted_mean, union.weighted_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.weighted_m2, union.weighted_m2, rtol=1e-10, atol=1e-15)


def test_fewer_samples_than_ranks_is_a_usage_error_and_one_rank_is_a_plain_run():
    import torch.distributed as dist

    from mone_export.distributed import collect_stats_distributed, share_of_samples
    from mone_export.errors import UsageError

    with pytest.raises(UsageError, match="1 calibration samples cannot be shared by 2 ranks"):
        share_of_samples([torch.zeros((1, 3), dtype=torch.long)], 0, 2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model("mixtral")
        merged = collect_stats_distributed(model, tiny_batches(num=2), progress=False)
        plain = collect_stats(model, tiny_batches(num=2), progress=False)
        assert merged.num_tokens == plain.num_tokens == 44
        np.testing.assert_array_equal(merged.layers[0].m2, plain.layers[0].m2)
    finally:
        dist.destroy_process_group()


def test_ranks_share_whole_batches_or_else_every_world_th_sample():
    from mone_export.distributed import share_of_samples

    five = [torch.full((2, 3), i) for i in range(5)]
    assert [[int(b[0, 0]) for b in share_of_samples(five, r, 2)] for r in range(2)] == [[0, 2, 4], [1, 3]]
    batches = [torch.arange(8).view(4, 2) + 10 * i for i in range(2)]  # 8 samples of 2 tokens, 2 batches of 4
    shares = [share_of_samples(batches, rank, 3) for rank in range(3)]
    rows = [[row.tolist() for batch in share for row in batch] for share in shares]
    all_rows = [row.tolist() for batch in batches for row in batch]
    assert rows == [all_rows[r::3] for r in range(3)] and all(b.shape[0] <= 4 for s in shares for b in s)


def test_torchrun_prune_writes_once_with_the_single_process_plan(tmp_path):
    from mone_export import PruningPlan
    from mone_export.cli import main

    folder = tmp_path / "model"
    tiny_model("qwen2_moe", seed=0).save_pretrained(folder)
    args = ["prune", "--model", str(folder), "--ratio", "0.5", "--calib", "random", "--calib-samples", "8",
            "--seq-len", "12", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(free_port()), "-m", "mone_export.cli", *args, "-o",
                             str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ranks" / "report.json").read_text())
    assert report["calibration"]["tokens"] == 8 * 12
    assert PruningPlan.load(tmp_path / "ranks" / "plan").pruned == PruningPlan.load(tmp_path / "single" / "plan").pruned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ranks", "single"]  # rank 1 wrote nothing
