"""Export benchmark: weight bytes against the lower bound, and ONNX Runtime CPU latency of MoNE-pruned exports.

    python benchmarks/export_bench.py [--models tiny,mid] [--ratios 0,0.25,0.5] [--json benchmarks/results/export_bench.json]

For each model and ratio (one run, one process): the MoNE plan is applied to a copy of the model, exported with
``export_onnx`` (graph passes included) and timed in ONNX Runtime (CPU provider, no thread spinning) against the
unpruned export (ratio 0) and PyTorch eager (the same pruned model, transformers' default implementations): median
prefill time of 128 tokens and median per-token decode time after it, after warm-up. All contestants of a model
(every ratio's export and PyTorch model) are timed interleaved, round by round, so that load drift on a shared
machine hits them alike.
Also: weight bytes of ``model.onnx`` against the lower bound (Σ bytes of the parameters that remain), and the ORT
session's peak memory (child process, VmHWM growth).

Models:
- ``tiny``: the bundled ``mixtral`` (trained; calibrated on ``python-code``) when present, else a synthetic one.
- ``mid``: synthetic Mixtral-shaped, random weights (hidden 768, 8 experts of intermediate 1024, top-2, 4 layers,
  vocabulary 8192: about 94 M parameters, 377 MB in fp32), calibrated on random ids.

Prints a markdown table and writes JSON. The default run takes about 5–10 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

from mone_export import apply_plan, calibration_batches, collect_stats, load_model, plan_pruning
from mone_export.export import export_onnx, lower_bound_bytes, weight_bytes
from mone_export.loading import bundled_model_path
from mone_export.validate import OrtDecoder, measure_latencies, ort_runner, session_memory, torch_runner

MID = dict(vocab_size=8192, hidden_size=768, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=12,
           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)


def synthetic(shape: dict, seed: int = 0):
    """A seeded random Mixtral-shaped causal LM (fp32, eval)."""
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(**shape)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def build(name: str, samples: int, seq_len: int):
    """``(model, calibration batches, description)`` of a benchmark model."""
    if name == "tiny" and bundled_model_path("mixtral") is not None:
        model, tokenizer = load_model("mixtral")
        batches = calibration_batches("python-code", tokenizer, samples, seq_len, seed=0)
        return model, batches, "bundled mixtral (trained), calibrated on python-code"
    shape = MID if name == "mid" else TINY
    model = synthetic(shape)
    batches = calibration_batches("random", None, samples, seq_len, seed=0, vocab_size=shape["vocab_size"])
    return model, batches, f"synthetic Mixtral {shape}, random weights, calibrated on random ids"


def bench_model(name: str, ratios: list[float], args, workdir: Path) -> dict:
    started = time.perf_counter()
    model, batches, description = build(name, args.samples, args.seq_len)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] {description}: {params / 1e6:.1f} M parameters", file=sys.stderr)
    stats = collect_stats(model, batches, progress=False)
    gen = np.random.default_rng(1)
    ids = gen.integers(0, int(model.config.vocab_size), size=(1, args.prefill_tokens), dtype=np.int64)
    rows, runners, keep = [], {}, []
    for ratio in ratios:
        plan = plan_pruning(stats, ratio, method="mone")
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        folder = workdir / f"{name}-{ratio}"
        t0 = time.perf_counter()
        path = export_onnx(pruned, folder, progress=False)
        export_s = time.perf_counter() - t0
        memory = session_memory(path, "cpu", args.prefill_tokens, threads=args.threads)
        decoder = OrtDecoder(path, "cpu", threads=args.threads)
        runners[f"onnx {ratio}"] = ort_runner(decoder, ids)
        runners[f"pytorch {ratio}"] = torch_runner(pruned, ids)
        keep += [decoder, pruned]
        rows.append({
            "ratio": ratio,
            "pruned_experts": plan.num_pruned,
            "num_experts": int(sum(plan.model["num_experts"].values())),
            "weight_bytes": weight_bytes(path),
            "lower_bound_bytes": lower_bound_bytes(pruned, "fp32"),
            "session_peak_bytes": memory.get("session_peak_bytes"),
            "export_seconds": round(export_s, 2),
        })
        print(f"[{name}] ratio {ratio}: exported in {export_s:.1f} s, {rows[-1]['weight_bytes']} weight bytes",
              file=sys.stderr)
    print(f"[{name}] timing {len(runners)} contestants, interleaved", file=sys.stderr)
    times = measure_latencies(runners, args.warmup, args.prefill_repeats, args.decode_repeats)
    for row in rows:
        row["onnx"], row["pytorch"] = times[f"onnx {row['ratio']}"], times[f"pytorch {row['ratio']}"]
    del runners, keep
    base = next((r for r in rows if r["ratio"] == 0), None)
    for row in rows:
        row["weight_ratio_to_bound"] = row["weight_bytes"] / row["lower_bound_bytes"]
        for key in ("prefill_ms", "decode_ms_per_token"):
            phase = key.split("_")[0]
            row[f"{phase}_vs_pytorch"] = row["onnx"][key] / row["pytorch"][key]
            if base is not None:
                row[f"{phase}_vs_unpruned_onnx"] = row["onnx"][key] / base["onnx"][key]
    return {"model": name, "description": description, "parameters": params, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(results: list[dict], args) -> str:
    lines = [f"ONNX Runtime {ort.__version__} CPU, {args.threads} threads, torch {torch.__version__}; "
             f"prefill {args.prefill_tokens} tokens, decode 1 token after it; medians of {args.prefill_repeats} / "
             f"{args.decode_repeats} runs after {args.warmup} warm-up; MoNE, scope layer.", "",
             "| model | ratio | pruned | weights MB | lower bound MB | × bound | ORT prefill ms | ORT decode ms/token "
             "| prefill vs unpruned ORT | decode vs unpruned ORT | PyTorch prefill ms | PyTorch decode ms/token "
             "| prefill vs PyTorch | decode vs PyTorch | session peak MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for r in result["rows"]:
            peak = r["session_peak_bytes"]
            lines.append(
                f"| {result['model']} | {r['ratio']} | {r['pruned_experts']}/{r['num_experts']} | "
                f"{r['weight_bytes'] / 1e6:.2f} | {r['lower_bound_bytes'] / 1e6:.2f} | {r['weight_ratio_to_bound']:.4f} | "
                f"{r['onnx']['prefill_ms']:.2f} | {r['onnx']['decode_ms_per_token']:.3f} | "
                f"{r.get('prefill_vs_unpruned_onnx', float('nan')):.2f}× | "
                f"{r.get('decode_vs_unpruned_onnx', float('nan')):.2f}× | "
                f"{r['pytorch']['prefill_ms']:.1f} | {r['pytorch']['decode_ms_per_token']:.2f} | "
                f"{r['prefill_vs_pytorch']:.3f}× | {r['decode_vs_pytorch']:.3f}× | "
                f"{'n/a' if peak is None else f'{peak / 1e6:.1f}'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--ratios", default="0,0.25,0.5", help="comma-separated pruning ratios (0 = unpruned)")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefill-repeats", type=int, default=9)
    parser.add_argument("--decode-repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--json", default="benchmarks/results/export_bench.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    ratios = [float(r) for r in args.ratios.split(",")]
    if 0.0 not in ratios:
        ratios = [0.0, *ratios]  # the unpruned export is the reference of every ratio
    results = []
    with tempfile.TemporaryDirectory(prefix="mone-export-bench-") as tmp:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), ratios, args, Path(tmp)))
    out = {"command": " ".join(["python benchmarks/export_bench.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"platform": platform.platform(), "cpu_threads": args.threads, "onnxruntime": ort.__version__,
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "results": results}
    table = markdown(results, args)
    out["markdown"] = table
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
