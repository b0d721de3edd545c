"""Fidelity benchmark: does MoNE lose less than the expert-pruning baselines, and by how much?

    python benchmarks/fidelity.py                     # full grid on the four bundled models
    python benchmarks/fidelity.py --models mixtral --ratios 0.5 --methods mone frequency --samples 8
    python benchmarks/fidelity.py --models DIR/mixtral-s0 DIR/mixtral-s1 --held-out mixtral-s1 --samples 32 \
        --out benchmarks/results/larger                # larger trained models (benchmarks/larger_models.py)

``--models`` takes bundled names and model folders; a folder called ``{family}-s{seed}`` is one instance of a
family, and the tables average a family's instances (seeds). ``--held-out`` names instances whose cells are
summarised apart: what a default chosen on the other instances achieves on models it never saw.

For every bundled model × ratio × calibration source × calibration samples × method, the pruned model is
scored on the held-out splits of both built-in sources: perplexity, and top-1 next-token agreement with
the unpruned model. Statistics are collected once per (model, source, samples) and shared by the methods.
The random baseline is averaged over three seeds. Writes ``fidelity.json``, ``fidelity.md`` and
``fidelity.png`` into ``--out`` (default ``benchmarks/results``), and ``fidelity.partial.json`` after each model.
``--reuse FILE`` takes the rows a previous run (its ``fidelity.json`` or ``fidelity.partial.json``) measured with the
same evaluation settings instead of measuring them again: resume a cut run, or add a method to one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mone_export import apply_plan, calibration_batches, collect_stats, load_model, plan_pruning
from mone_export.evaluate import EVAL_SETTINGS, eval_batches
from mone_export.loading import BUNDLED_MODELS
from mone_export.scoring import METHODS as METHOD_OF

METHODS = ["mone", "mone-zero", "ne", "auto", "frequency", "routing-score", "reap", "random"]
SOURCES = ["python-code", "python-docs"]
RANDOM_SEEDS = [0, 1, 2]


@torch.inference_mode()
def score(model, batches, reference_top1=None) -> dict:
    """Perplexity over ``batches`` and, with ``reference_top1``, the share of positions whose argmax agrees."""
    total, count, agree, top1 = 0.0, 0, 0, []
    for i, batch in enumerate(batches):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].to(torch.float64)
        targets = batch[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
        pred = logits.argmax(-1)
        top1.append(pred)
        if reference_top1 is not None:
            agree += int((pred == reference_top1[i]).sum())
    result = {"ppl": float(torch.tensor(total / count).exp()), "tokens": count, "top1": top1}
    if reference_top1 is not None:
        result["agreement"] = agree / count
    return result


def evaluate(model, held_out, reference) -> dict:
    """Perplexity and agreement on each source's held-out chunks."""
    out = {}
    for source, batches in held_out.items():
        r = score(model, batches, reference[source]["top1"])
        out[source] = {"ppl": r["ppl"], "agreement": r["agreement"]}
    return out


def instance_label(name: str) -> str:
    """A bundled model's name, or a model folder's own name (``mixtral-s0``)."""
    return Path(name).name


def family_of(label: str, preset: str | None = None) -> str:
    """The family an instance belongs to: its label without a ``-s{seed}`` suffix, and with the size preset its
    card names when that is not the bundled one (``mixtral-large``: never averaged with the bundled ``mixtral``)."""
    family = re.sub(r"-s\d+$", "", label)
    return family if preset in (None, "bundled") else f"{family}-{preset}"


def _preset(name: str) -> str | None:
    card = Path(name) / "card.json"
    return json.loads(card.read_text()).get("preset") if card.is_file() else None


def _family(row: dict) -> str:
    """A row's family (rows of runs before families were recorded: their model)."""
    return row.get("family") or family_of(row["model"])


def row_key(row: dict) -> tuple:
    """What identifies a measured row: instance, ratio, method, calibration source and samples."""
    return row["model"], float(row["ratio"]), row["method"], row["calib"], int(row["samples"])


def reusable_rows(path: str | None, seq_len: int) -> dict[tuple, dict]:
    """The rows of a previous run measured with this run's evaluation settings and calibration length, by key."""
    if not path:
        return {}
    previous = json.loads(Path(path).read_text())
    settings = previous["settings"]
    if settings.get("eval") != EVAL_SETTINGS or int(settings.get("seq_len", 128)) != seq_len:
        raise SystemExit(f"--reuse {path}: measured with other settings ({settings.get('eval')}, seq_len "
                         f"{settings.get('seq_len')}); run without it.")
    return {row_key(r): r for r in previous["rows"]}


def run_model(name, args, log, reuse: dict | None = None) -> list[dict]:
    reuse = reuse or {}
    model, tokenizer = load_model(name)
    family = family_of(instance_label(name), _preset(name))
    name = instance_label(name)
    held_out = {s: eval_batches(tokenizer, s, **{k: v for k, v in EVAL_SETTINGS.items() if k != "split"})
                for s in SOURCES}
    reference = {s: score(model, b) for s, b in held_out.items()}
    rows = [{"model": name, "family": family, "ratio": 0.0, "method": "unpruned", "calib": None, "samples": 0,
             **{f"{s}_ppl": reference[s]["ppl"] for s in SOURCES}, **{f"{s}_agreement": 1.0 for s in SOURCES}}]
    log.info("%s unpruned: %s", name, {s: round(reference[s]["ppl"], 3) for s in SOURCES})
    for calib in args.calib:
        for samples in args.samples:
            todo = [(ratio, method) for ratio in args.ratios for method in args.methods
                    if (name, float(ratio), method, calib, samples) not in reuse]
            rows.extend(reuse[(name, float(ratio), method, calib, samples)] for ratio in args.ratios
                        for method in args.methods if (ratio, method) not in todo)
            if not todo:
                continue
            batches = calibration_batches(calib, tokenizer, samples, args.seq_len, seed=0)
            measure = any(METHOD_OF[method].measures_removal for _, method in todo)  # auto: removal errors
            stats = collect_stats(model, batches, progress=False, measure_removal=measure)
            for ratio, method in todo:
                seeds = RANDOM_SEEDS if method == "random" else [0]
                results = []
                for seed in seeds:
                    plan = plan_pruning(stats, ratio, method=method, seed=seed)
                    pruned = apply_plan(copy.deepcopy(model), plan)
                    results.append(evaluate(pruned, held_out, reference))
                row = {"model": name, "family": family, "ratio": ratio, "method": method, "calib": calib,
                       "samples": samples}
                for s in SOURCES:
                    row[f"{s}_ppl"] = statistics.mean(r[s]["ppl"] for r in results)
                    row[f"{s}_agreement"] = statistics.mean(r[s]["agreement"] for r in results)
                rows.append(row)
                log.info("%s r=%s %s/%d %-13s ppl %s", name, ratio, calib, samples, method,
                         {s: round(row[f"{s}_ppl"], 3) for s in SOURCES})
    return rows


def markdown(rows: list[dict]) -> str:
    """One table per family and ratio: means over calibration settings and the family's instances (seeds)."""
    lines = []
    for family in dict.fromkeys(_family(r) for r in rows):
        mine = [r for r in rows if _family(r) == family]
        base = {k: statistics.mean(r[k] for r in mine if r["method"] == "unpruned") for k in
                ("python-code_ppl", "python-docs_ppl")}
        instances = sorted({r["model"] for r in mine})
        lines.append(f"\n**{family}** ({len(instances)} instance{'s' if len(instances) > 1 else ''}; unpruned "
                     f"held-out ppl: code {base['python-code_ppl']:.3f}, docs {base['python-docs_ppl']:.3f})\n")
        lines.append("| ratio | method | ppl code | ppl docs | Δppl code | Δppl docs | top-1 agree code | top-1 agree docs |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for ratio in sorted({r["ratio"] for r in mine if r["ratio"] > 0}):
            for method in METHODS:
                sel = [r for r in mine if r["ratio"] == ratio and r["method"] == method]
                if not sel:
                    continue
                mean = {k: statistics.mean(r[k] for r in sel) for k in sel[0] if k.endswith(("_ppl", "_agreement"))}
                lines.append(
                    f"| {ratio} | {method} | {mean['python-code_ppl']:.3f} | {mean['python-docs_ppl']:.3f} | "
                    f"{mean['python-code_ppl'] - base['python-code_ppl']:+.3f} | "
                    f"{mean['python-docs_ppl'] - base['python-docs_ppl']:+.3f} | "
                    f"{mean['python-code_agreement']:.3f} | {mean['python-docs_agreement']:.3f} |")
    return "\n".join(lines) + "\n"


REMOVAL = ["frequency", "routing-score", "reap", "random"]
"""The removal baselines every router-kept method is measured against."""


def cells(rows: list[dict], models=None):
    """Every (model, ratio, calibration source, samples, evaluation source) cell: {method: held-out ppl}."""
    out = {}
    for r in rows:
        if r["ratio"] == 0 or (models is not None and r["model"] not in models):
            continue
        for s in SOURCES:
            out.setdefault((r["model"], r["ratio"], r["calib"], r["samples"], s), {})[r["method"]] = r[f"{s}_ppl"]
    return out


def summary(rows: list[dict], models=None) -> dict:
    """Per router-kept method, over the cells of ``models`` (instance labels; all when None): the cells where it has
    a lower perplexity than every removal baseline (and the share), its mean rank among all methods (1 = best), and
    per family the ratio of its mean perplexity increase at
    ratio 0.25 to frequency pruning's (the issue's bar: at most 0.5)."""
    table = cells(rows, models)
    family = {r["model"]: _family(r) for r in rows}
    families = sorted({family[key[0]] for key in table})
    base = {r["model"]: r for r in rows if r["method"] == "unpruned"}
    result = {"cells": len(table)}
    for method in [m for m in METHODS if m not in REMOVAL]:
        present = {key: ppl for key, ppl in table.items() if method in ppl}
        # A cell counts only where every removal baseline ran: a method is not the best of an empty field.
        present = {key: ppl for key, ppl in present.items() if all(b in ppl for b in REMOVAL)}
        won = sum(all(ppl[method] < ppl[b] for b in REMOVAL) for ppl in present.values())
        ranks = [1 + sum(v < ppl[method] for m, v in ppl.items() if m != method) for ppl in present.values()]
        increase = {}
        for name in families:
            quarter = [(key, ppl) for key, ppl in present.items()
                       if family[key[0]] == name and key[1] == 0.25 and "frequency" in ppl]
            if quarter:
                ours = statistics.mean(ppl[method] - base[key[0]][f"{key[4]}_ppl"] for key, ppl in quarter)
                theirs = statistics.mean(ppl["frequency"] - base[key[0]][f"{key[4]}_ppl"] for key, ppl in quarter)
                increase[name] = ours / theirs if theirs > 0 else None
        result[method] = {"beats_every_removal": won, "of": len(present),
                          "share": won / len(present) if present else None,
                          "mean_rank": statistics.mean(ranks) if ranks else None,
                          "increase_vs_frequency_at_0.25": increase}
    return result


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity increase (code held-out) by method, one panel per model and ratio, bars = mean over settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(_family(r) for r in rows))
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] > 0})
    fig, axes = plt.subplots(len(ratios), len(models), figsize=(3.2 * len(models), 2.8 * len(ratios)), squeeze=False)
    for j, name in enumerate(models):
        base = {k: statistics.mean(r[k] for r in rows if _family(r) == name and r["method"] == "unpruned")
                for k in ("python-code_ppl", "python-docs_ppl")}
        for i, ratio in enumerate(ratios):
            ax = axes[i][j]
            highest = 0.0
            for k, s in enumerate(SOURCES):
                values = []
                for method in METHODS:
                    sel = [r[f"{s}_ppl"] - base[f"{s}_ppl"] for r in rows
                           if _family(r) == name and r["ratio"] == ratio and r["method"] == method]
                    values.append(statistics.mean(sel) if sel else 0.0)
                ax.bar([x + 0.4 * k for x in range(len(METHODS))], values, width=0.4, label=s)
                highest = max(highest, *values)
            ax.set_xticks([x + 0.2 for x in range(len(METHODS))], METHODS, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{name}, ratio {ratio}", fontsize=9)
            ax.set_ylabel("Δ perplexity", fontsize=8)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_ylim(0, highest * 2)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUNDLED_MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--calib", nargs="+", default=SOURCES)
    parser.add_argument("--samples", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", nargs="*", default=[],
                        help="instance labels summarised apart (models no default was chosen on)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reuse", help="a previous run's fidelity.json or fidelity.partial.json: rows it measured "
                                        "with the same settings are taken, not measured again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("fidelity")
    labels = {instance_label(name) for name in args.models}
    held = {instance_label(name) for name in args.held_out}
    if not held <= labels:  # before the run, not after it
        parser.error(f"--held-out {sorted(held - labels)}: not among --models ({sorted(labels)})")
    torch.manual_seed(0)
    started = time.perf_counter()
    reuse = reusable_rows(args.reuse, args.seq_len)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows.extend(run_model(name, args, log, reuse))
        partial = {"settings": {**vars(args), "eval": EVAL_SETTINGS, "random_seeds": RANDOM_SEEDS}, "rows": rows}
        (out / "fidelity.partial.json").write_text(json.dumps(partial, indent=1) + "\n")
    result = {"settings": {**vars(args), "eval": EVAL_SETTINGS, "random_seeds": RANDOM_SEEDS},
              "rows": rows, "summary": {"all": summary(rows)}, "seconds": round(time.perf_counter() - started, 1)}
    if held:
        labels = {r["model"] for r in rows}
        result["summary"]["tuning"] = summary(rows, labels - held)
        result["summary"]["held_out"] = summary(rows, held)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    (out / "fidelity.md").write_text(table)
    plot(rows, out / "fidelity.png")
    print(table)
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
