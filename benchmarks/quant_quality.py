"""What pruning and quantisation cost together: held-out perplexity of the exported ONNX models themselves.

For every bundled model, unpruned and pruned by every method at ratio 0.25 / 0.5 (calibrated on 32 × 128 tokens of
python-code; ``random`` with seed 0), exported in fp32, int8 and int4 (``--quant``, the export's block size unless
``--block-size`` says otherwise, accuracy level 4: the fast CPU path), ONNX Runtime computes the held-out perplexity
of python-code and python-docs (64 chunks × 128 tokens each, the model cards' setting) and the top-1
agreement of its next-token predictions with the unpruned float32 PyTorch model. Everything is measured on the
graph a user ships (quantised kernels, int8 activations included), not on a simulation.

    python benchmarks/quant_quality.py        # table + benchmarks/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2")
RATIOS = (0.25, 0.5)
METHODS = ("mone", "mone-zero", "ne", "auto", "frequency", "routing-score", "reap", "random")
FORMATS = ("fp32", "int8", "int4")
SOURCES = ("python-code", "python-docs")


def onnx_scores(path: Path, batches, reference_top1) -> tuple[float, float]:
    """(perplexity, top-1 agreement with the reference) of an export over the held-out chunks, in float64."""
    import numpy as np

    from mone_export.ort_session import OrtDecoder

    decoder = OrtDecoder(path, "cpu", threads=2)
    nll, count, agree = 0.0, 0, 0
    for batch, top1 in zip(batches, reference_top1):
        ids = batch.numpy()
        mask = np.ones_like(ids)
        positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
        logits, _ = decoder(ids, mask, positions, decoder.empty_past(ids.shape[0]))
        logits = logits[:, :-1].astype(np.float64)
        targets = ids[:, 1:]
        shifted = logits - logits.max(-1, keepdims=True)
        logprob = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= np.take_along_axis(logprob, targets[..., None], -1).sum()
        count += targets.size
        agree += int((logits.argmax(-1) == top1).sum())
    return math.exp(nll / count), agree / count


def run(args) -> dict:
    import torch

    from mone_export import load_model
    from mone_export.evaluate import eval_batches
    from mone_export.export import export_onnx
    from mone_export.novices import apply_plan
    from mone_export.pipeline import CalibrationOptions, calibrate_and_plan
    from mone_export.quantization import quantization_config

    torch.set_num_threads(2)
    calib = CalibrationOptions(source="python-code", samples=32, seq_len=128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, tokenizer = load_model(name, dtype="fp32")
            batches = {source: eval_batches(tokenizer, source, num_samples=64, seq_len=128) for source in SOURCES}
            # eval_batches returns a list of [B, L] tensors; the unpruned fp32 model's top-1 is the reference
            with torch.no_grad():
                top1 = {source: [model(input_ids=b, use_cache=False).logits[:, :-1].argmax(-1).numpy() for b in chunks]
                        for source, chunks in batches.items()}
            settings = [("unpruned", 0.0)] + [(m, r) for m in args.methods for r in args.ratios]
            for method, ratio in settings:
                pruned, _ = load_model(name, dtype="fp32")
                if ratio:
                    plan, _ = calibrate_and_plan(pruned, tokenizer, ratio, method, "layer", calib, False)
                    apply_plan(pruned, plan)
                for fmt in args.formats:
                    out = Path(tmp) / f"{name}-{method}-{ratio}-{fmt}"
                    quant = quantization_config(None if fmt == "fp32" else fmt, block_size=args.block_size)
                    path = export_onnx(pruned, out, progress=False, quantization=quant)
                    row = {"model": name, "method": method, "ratio": ratio, "format": fmt}
                    for source in SOURCES:
                        ppl, agreement = onnx_scores(path, batches[source], top1[source])
                        row[f"{source}_perplexity"] = ppl
                        row[f"{source}_top1_agreement"] = agreement
                    rows.append(row)
                    print(f"{name} {method} {ratio} {fmt}: " + ", ".join(
                        f"{s} {row[f'{s}_perplexity']:.2f} ({row[f'{s}_top1_agreement']:.3f})" for s in SOURCES),
                        file=sys.stderr)
    return {"command": "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:]),
            "calibration": "python-code, 32 x 128 tokens", "evaluation": "held-out, 64 x 128 tokens per source",
            "quantization": f"block {args.block_size}, accuracy_level 4",
            "rows": rows, "summary": summary(rows), "markdown": markdown(rows)}


def markdown(rows: list[dict]) -> str:
    """Per model and setting: perplexity (code / docs) per format, and int4's top-1 agreement with unpruned fp32."""
    lines = ["| model | method | ratio | fp32 code / docs | int8 code / docs | int4 code / docs | int4 top-1 "
             "agreement code / docs |", "| --- | --- | ---: | --- | --- | --- | --- |"]
    cells = {(r["model"], r["method"], r["ratio"], r["format"]): r for r in rows}
    for model, method, ratio in dict.fromkeys((r["model"], r["method"], r["ratio"]) for r in rows):
        parts = []
        for fmt in FORMATS:
            r = cells.get((model, method, ratio, fmt))
            parts.append("n/a" if r is None else
                         f"{r['python-code_perplexity']:.1f} / {r['python-docs_perplexity']:.1f}")
        r = cells.get((model, method, ratio, "int4"))
        agreement = "n/a" if r is None else \
            f"{r['python-code_top1_agreement']:.3f} / {r['python-docs_top1_agreement']:.3f}"
        lines.append(f"| {model} | {method} | {ratio} | {' | '.join(parts)} | {agreement} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Perplexity increase of int8 and int4 over fp32 of the same pruned model (relative, over both sources):
    mean and max; and whether the methods' order by perplexity changes under quantisation."""
    cells = {(r["model"], r["method"], r["ratio"], r["format"]): r for r in rows}
    out = {}
    for fmt in ("int8", "int4"):
        increases = []
        for (model, method, ratio, f), r in cells.items():
            base = cells.get((model, method, ratio, "fp32"))
            if f != fmt or base is None:
                continue
            for source in SOURCES:
                increases.append(r[f"{source}_perplexity"] / base[f"{source}_perplexity"] - 1)
        if increases:
            out[f"{fmt}_perplexity_increase_mean"] = sum(increases) / len(increases)
            out[f"{fmt}_perplexity_increase_max"] = max(increases)
    winners_changed, cells_compared = 0, 0
    for model, ratio in {(r["model"], r["ratio"]) for r in rows if r["ratio"]}:
        for source in SOURCES:
            best = {}
            for fmt in FORMATS:
                scored = [(r[f"{source}_perplexity"], r["method"]) for r in rows
                          if r["model"] == model and r["ratio"] == ratio and r["format"] == fmt]
                if scored:
                    best[fmt] = min(scored)[1]
            if "fp32" in best and "int4" in best:
                cells_compared += 1
                winners_changed += best["fp32"] != best["int4"]
    out["best_method_changed_by_int4"] = f"{winners_changed} of {cells_compared} (model, ratio, source) cells"
    return out


def main(argv=None):
    from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"elements per quantisation block (default {DEFAULT_BLOCK_SIZE}, the export's)")
    parser.add_argument("--json", default="benchmarks/results/quant_quality.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(result["markdown"])
    print(json.dumps(result["summary"], indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
