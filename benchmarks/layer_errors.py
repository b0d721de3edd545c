"""Does the layer-output error on calibration tokens predict held-out perplexity? The evidence behind ``auto``.

    python benchmarks/layer_errors.py                      # the four bundled models, ~4 minutes
    python benchmarks/layer_errors.py --models mixtral --ratios 0.5

For each model × calibration source × ratio, every method's plan is made from one set of statistics (with removal
errors measured), and for each plan it reports the mean squared change of every MoE layer's output on the
calibration tokens when all of the plan's pruned experts go together
(:func:`mone_export.layer_errors.layer_output_errors`, measured), the held-out perplexity of the pruned model on both
sources, and a ``per-layer best`` plan that takes in each layer the candidate with the smallest measured error.
Writes ``layer_errors.json`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import SOURCES, score  # noqa: E402

from mone_export import PruningPlan, apply_plan, calibration_batches, collect_stats, load_model, plan_pruning  # noqa: E402
from mone_export.evaluate import EVAL_SETTINGS, eval_batches  # noqa: E402
from mone_export.layer_errors import layer_output_errors  # noqa: E402
from mone_export.loading import BUNDLED_MODELS  # noqa: E402

CANDIDATES = ["ne", "auto", "mone", "frequency", "routing-score", "reap"]


def per_layer_best(plans: dict[str, PruningPlan], errors: dict[str, dict[int, float]]) -> tuple[PruningPlan, dict]:
    """A plan taking, in every layer, the pruned experts (and their novices or removal) of the candidate whose
    measured layer error is smallest there."""
    first = next(iter(plans.values()))
    pruned, removed, novices, choice = {}, {}, {}, {}
    for index in first.pruned:
        name = min(plans, key=lambda m: errors[m][index])
        plan = plans[name]
        choice[index] = name
        pruned[index] = plan.pruned[index]
        gone = plan.pruned[index] if plan.replacement == "remove" else plan.removed.get(index, [])
        if gone:
            removed[index] = gone
        if plan.novice_ids(index):
            novices[index] = plan.novices[index]
    combined = PruningPlan(pruned=pruned, novices=novices, removed=removed, method="per-layer best",
                           replacement="mixed" if removed else "novice", ratio=first.ratio, scope=first.scope,
                           seed=first.seed, model=first.model)
    return combined, choice


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    started = time.perf_counter()
    rows = []
    for name in args.models:
        model, tokenizer = load_model(name)
        held_out = {s: eval_batches(tokenizer, s, **{k: v for k, v in EVAL_SETTINGS.items() if k != "split"})
                    for s in SOURCES}
        for calib in SOURCES:
            batches = calibration_batches(calib, tokenizer, args.samples, args.seq_len, seed=0)
            stats = collect_stats(model, batches, progress=False, measure_removal=True)
            for ratio in args.ratios:
                plans = {m: plan_pruning(stats, ratio, m) for m in CANDIDATES}
                measured = dict(zip(plans, layer_output_errors(model, batches, list(plans.values()))))
                best, choice = per_layer_best(plans, measured)
                plans["per-layer best"] = best
                measured["per-layer best"] = {i: measured[choice[i]][i] for i in choice}
                for method, plan in plans.items():
                    pruned = apply_plan(copy.deepcopy(model), plan)
                    row = {"model": Path(name).name, "calib": calib, "ratio": ratio, "method": method,
                           "layer_error": statistics.mean(measured[method].values()),
                           **{f"{s}_ppl": score(pruned, held_out[s])["ppl"] for s in SOURCES}}
                    if method == "per-layer best":
                        row["choice"] = {str(i): m for i, m in choice.items()}
                    rows.append(row)
                    print(f"{row['model']:12s} {calib:11s} r={ratio:<4} {method:14s} layer error "
                          f"{row['layer_error']:10.4f}  ppl code {row['python-code_ppl']:7.2f} docs "
                          f"{row['python-docs_ppl']:7.2f}", flush=True)
    # How often the smallest layer error is also the lowest perplexity, per evaluation source.
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["calib"], row["ratio"]), []).append(row)
    agree = {s: sum(min(g, key=lambda r: r["layer_error"])["method"] == min(g, key=lambda r: r[f"{s}_ppl"])["method"]
                    for g in groups.values()) for s in SOURCES}
    result = {"settings": vars(args), "rows": rows, "groups": len(groups),
              "lowest_layer_error_is_lowest_ppl": agree, "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_errors.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("groups", "lowest_layer_error_is_lowest_ppl", "seconds")}))
    return result


if __name__ == "__main__":
    main()
