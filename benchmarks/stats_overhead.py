"""Statistics-collection overhead: collect_stats against a plain forward of the same model on the same batches, and
collect_stats with the removal errors method ``auto`` needs (``measure_removal=True``) against plain collect_stats.

    python benchmarks/stats_overhead.py [--model mixtral] [--samples 32 --seq-len 256] [--json out.json]

Without --model it builds a synthetic Mixtral-shaped model (random weights) so it runs anywhere.
Prints the ratio measured side by side in one run (median of repeats) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from mone_export import collect_stats, load_model
from mone_export.calibration import calibration_batches


def synthetic_model(hidden: int, layers: int, experts: int, inter: int):
    config = transformers.MixtralConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                        num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="bundled name or checkpoint folder (default: synthetic Mixtral-shaped)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/stats_overhead.json")
    args = parser.parse_args(argv)
    if args.model:
        model, tokenizer = load_model(args.model)
        batches = calibration_batches("python-code", tokenizer, args.samples, args.seq_len)
        name = args.model
    else:
        model = synthetic_model(args.hidden, args.layers, args.experts, args.inter)
        batches = calibration_batches("random", None, args.samples, args.seq_len, vocab_size=4096)
        name = f"synthetic-mixtral-h{args.hidden}-l{args.layers}-e{args.experts}-i{args.inter}"

    def plain():
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False)

    plain_s = timed(plain, args.repeats)
    stats_s = timed(lambda: collect_stats(model, batches, progress=False), args.repeats)
    removal_s = timed(lambda: collect_stats(model, batches, progress=False, measure_removal=True), args.repeats)
    result = {
        "model": name,
        "experts_implementation": model.config._experts_implementation,
        "tokens": sum(b.numel() for b in batches),
        "threads": torch.get_num_threads(),
        "plain_forward_s": round(plain_s, 4),
        "collect_stats_s": round(stats_s, 4),
        "overhead_ratio": round(stats_s / plain_s, 3),
        "collect_stats_measure_removal_s": round(removal_s, 4),
        "measure_removal_ratio": round(removal_s / stats_s, 3),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
