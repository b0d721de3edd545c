"""Peak memory of calibration on checkpoints larger than memory: layer-streamed against in-memory.

    python benchmarks/big_model.py --layers 4 8 12 --hidden 1024 --inter 2816 --experts 8 [--in-memory]
    python benchmarks/big_model.py --mixtral-8x7b --layers 12      # real Mixtral-8x7B layers, ~34 GB of bf16

Synthesises a sharded bf16 Mixtral checkpoint (one shard per decoder layer, legacy per-expert tensor names, as
``save_pretrained`` writes them) layer by layer, so writing it never holds more than one layer, then runs
calibration (random tokens) in a child process per configuration and samples the RSS of that process tree from
outside (mone_export.process_memory). Reports per layer count: checkpoint bytes, the largest decoder layer's bytes,
peak RSS and seconds of layer-streamed calibration (and of in-memory calibration with ``--in-memory``, where it
fits). Writes JSON (``--json``).

With ``--pipeline`` it runs the main command instead, layer-streamed, as two processes: ``mone-export --model DIR
--ratio R --streaming on --calib random --no-validate ...`` (calibrate, prune, export in fp32), then ``mone-export
validate OUT --model DIR --streaming on``; it reports each one's peak RSS (process tree, sampled from outside) against
the issue's bounds (1.5 GB + 4 × the largest layer; plus 1.2 × the exported weight bytes for validation), the
seconds, the bytes and the validation result:

    python benchmarks/big_model.py --mixtral-8x7b --layers 12 --pipeline --ratio 0.875 --samples 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIXTRAL_8X7B = {"hidden": 4096, "inter": 14336, "experts": 8, "heads": 32, "kv_heads": 8, "vocab": 32000}

CALIBRATE = '''
import sys, time, torch
from mone_export.streaming import LayerStreamedModel, collect_stats_streamed
from mone_export import collect_stats, load_model
folder, mode, samples, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gen = torch.Generator().manual_seed(0)
started = time.perf_counter()
model = LayerStreamedModel(folder, dtype="bf16") if mode == "streamed" else load_model(folder, dtype="bf16")[0]
vocab = model.config.vocab_size
batches = [torch.randint(0, vocab, (1, seq), generator=gen) for _ in range(samples)]
stats = (collect_stats_streamed if mode == "streamed" else collect_stats)(model, batches, progress=False)
print(time.perf_counter() - started)
'''


def mixtral_config(layers: int, hidden: int, inter: int, experts: int, heads: int = 8, kv_heads: int = 2,
                   vocab: int = 8192):
    """A Mixtral config of the given sizes (top-2 routing)."""
    import transformers

    return transformers.MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, num_local_experts=experts,
                                      num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False)


def synthesize_checkpoint(folder: Path, config, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """Write a random checkpoint of ``config`` to ``folder`` one decoder layer at a time (one shard each)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    one_layer = transformers.MixtralConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    weight_map, largest, total = {}, 0, 0
    shards = config.num_hidden_layers + 1
    for index in range(config.num_hidden_layers):
        torch.manual_seed(seed + index)
        model = transformers.AutoModelForCausalLM.from_config(one_layer, dtype=getattr(torch, dtype))
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch)  # legacy per-expert names, as real checkpoints have them
            tensors = {}
            for path in sorted(Path(scratch).glob("*.safetensors")):
                tensors.update(load_file(path))
        del model
        layer = {name.replace("model.layers.0.", f"model.layers.{index}."): t for name, t in tensors.items()
                 if name.startswith("model.layers.0.")}
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        if index == 0:  # embeddings, final norm and LM head go to the last shard
            rest = {name: t for name, t in tensors.items() if not name.startswith("model.layers.")}
            last = f"model-{shards:05d}-of-{shards:05d}.safetensors"
            save_file(rest, folder / last, metadata={"format": "pt"})
            weight_map.update({name: last for name in rest})
            total += sum(t.numel() * t.element_size() for t in rest.values())
        save_file(layer, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in layer})
        size = sum(t.numel() * t.element_size() for t in layer.values())
        largest, total = max(largest, size), total + size
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    config.dtype = dtype
    config.save_pretrained(str(folder))
    return {"checkpoint_bytes": total, "largest_layer_bytes": largest}


def measure(folder: Path, mode: str, samples: int, seq: int) -> dict:
    """Peak RSS of the process tree and seconds of one calibration run in a child process."""
    from mone_export.process_memory import TreePeakSampler

    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CALIBRATE, str(folder), mode, str(samples), str(seq)],
                               stdout=subprocess.PIPE, text=True)
    with TreePeakSampler(process.pid) as sampler:
        out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{mode} calibration of {folder} failed")
    return {"peak_rss_bytes": sampler.peak, "seconds": round(time.perf_counter() - started, 2),
            "calibration_seconds": round(float(out.strip().splitlines()[-1]), 2)}


def _run_tree(command: list[str]) -> tuple[int, dict, int, float]:
    """Run a ``mone-export`` command in a child process: ``(exit code, its JSON report, the process tree's peak RSS,
    wall seconds)``."""
    from mone_export.process_memory import TreePeakSampler

    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", "from mone_export.cli import main; raise SystemExit(main())",
                                *command], stdout=subprocess.PIPE, text=True)
    with TreePeakSampler(process.pid, interval=0.05) as sampler:
        stdout, _ = process.communicate()
    if process.returncode not in (0, 1):
        raise RuntimeError(f"mone-export {' '.join(command)} failed with exit code {process.returncode}")
    return process.returncode, json.loads(stdout), sampler.peak, round(time.perf_counter() - started, 1)


def measure_pipeline(folder: Path, out: Path, ratio: float, samples: int, seq: int, validate: bool) -> dict:
    """The main command, layer-streamed, as two child processes whose process trees are sampled from outside:
    ``export --no-validate`` (load, calibrate, prune, export: the peak that must not grow with the layer count), then
    ``validate OUT --streaming on`` (ONNX Runtime session + the layer-streamed, teacher-forced PyTorch reference).
    Returns each one's peak RSS, wall seconds and stage seconds, the bytes, and the validation summary."""
    code, report, peak, wall = _run_tree([
        "--model", str(folder), "--ratio", str(ratio), "--method", "mone", "--streaming", "on", "--calib", "random", "--calib-samples",
        str(samples), "--seq-len", str(seq), "-o", str(out), "--overwrite", "--no-validate", "--json", "--quiet"])
    row = {"export": {"exit_code": code, "peak_rss_bytes": peak, "wall_seconds": wall,
                      "stage_seconds": report["timings"]}, "weights": report["weights"]}
    if validate:
        code, report, peak, wall = _run_tree(["validate", str(out), "--model", str(folder), "--streaming", "on",
                                              "--json", "--quiet"])
        validation = report.get("validation") or {}
        row["validate"] = {
            "exit_code": code, "peak_rss_bytes": peak, "wall_seconds": wall, "passed": report.get("passed"),
            "seconds_per_check": validation.get("seconds_per_check"),
            "logits_max_abs_diff": max((r["max_abs_diff"] for r in validation.get("logits", [])), default=None),
            "greedy_identical": (validation.get("generation") or {}).get("identical"),
            "session_peak_bytes": ((validation.get("memory") or {}).get("session") or {}).get("session_peak_bytes"),
            "latency": {k: v for k, v in (validation.get("latency") or {}).items() if k == "onnx"}}
    return row


def _without_paths(argv: list[str], options: tuple[str, ...] = ("--dir", "--json")) -> list[str]:
    """The arguments minus those naming folders of the machine it ran on (the command recorded in the JSON)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in options)):
            kept.append(arg)
    return kept


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--mixtral-8x7b", action="store_true", help="real Mixtral-8x7B layer dimensions")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--in-memory", action="store_true", help="also measure in-memory calibration")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--pipeline", action="store_true",
                        help="run the main command (calibrate, prune, export, validate) layer-streamed, not only "
                        "calibration")
    parser.add_argument("--ratio", type=float, default=0.875, help="with --pipeline: the pruning ratio")
    parser.add_argument("--no-validate", dest="validate", action="store_false", help="with --pipeline")
    parser.add_argument("--json", default="benchmarks/results/big_model.json")
    args = parser.parse_args(argv)
    sizes = dict(MIXTRAL_8X7B) if args.mixtral_8x7b else {"hidden": args.hidden, "inter": args.inter,
                                                           "experts": args.experts}
    root = Path(args.dir or tempfile.mkdtemp(prefix="mone-big-"))
    rows = []
    for layers in args.layers:
        folder = root / f"mixtral-{layers}"
        if (folder / "model.safetensors.index.json").is_file():  # written by an earlier run: reuse it
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            shard_sizes = {}
            for name in set(index["weight_map"].values()):
                shard_sizes[name] = (folder / name).stat().st_size
            written = {"checkpoint_bytes": index["metadata"]["total_size"],
                       "largest_layer_bytes": max(shard_sizes.values())}
        else:
            written = synthesize_checkpoint(folder, mixtral_config(layers, **sizes))
        row = {"layers": layers, **sizes, **written}
        if args.pipeline:
            row["pipeline"] = measure_pipeline(folder, root / f"out-{layers}", args.ratio, args.samples,
                                               args.seq_len, args.validate)
            row["bound_calibrate_prune_export_bytes"] = int(1.5e9 + 4 * row["largest_layer_bytes"])
            row["bound_validate_bytes"] = int(row["bound_calibrate_prune_export_bytes"]
                                              + 1.2 * row["pipeline"]["weights"]["pruned_bytes"])
            rows.append(row)
            print(json.dumps(row))
            continue
        row["streamed"] = measure(folder, "streamed", args.samples, args.seq_len)
        if args.in_memory:
            row["in_memory"] = measure(folder, "in-memory", args.samples, args.seq_len)
        rows.append(row)
        print(json.dumps(row))
    result = {"command": "python benchmarks/big_model.py " + " ".join(_without_paths(argv or sys.argv[1:])),
              "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.pipeline:
        print(f"{'layers':>6} {'ckpt GB':>8} {'layer MB':>9} {'export peak MB':>15} {'bound MB':>9} "
              f"{'export s':>9} {'validate peak MB':>17} {'bound MB':>9} {'validate s':>11} passed")
        for row in rows:
            run, check = row["pipeline"]["export"], row["pipeline"].get("validate") or {}
            print(f"{row['layers']:>6} {row['checkpoint_bytes'] / 1e9:>8.1f} {row['largest_layer_bytes'] / 1e6:>9.0f} "
                  f"{run['peak_rss_bytes'] / 1e6:>15.0f} {row['bound_calibrate_prune_export_bytes'] / 1e6:>9.0f} "
                  f"{run['wall_seconds']:>9.0f} {check.get('peak_rss_bytes', 0) / 1e6:>17.0f} "
                  f"{row['bound_validate_bytes'] / 1e6:>9.0f} {check.get('wall_seconds', 0):>11.0f} "
                  f"{check.get('passed')}")
        return result
    print(f"{'layers':>6} {'ckpt MB':>9} {'layer MB':>9} {'streamed peak MB':>17} {'in-memory peak MB':>18}")
    for row in rows:
        memory = row.get("in_memory", {}).get("peak_rss_bytes")
        print(f"{row['layers']:>6} {row['checkpoint_bytes'] / 1e6:>9.0f} {row['largest_layer_bytes'] / 1e6:>9.0f} "
              f"{row['streamed']['peak_rss_bytes'] / 1e6:>17.0f} {memory / 1e6 if memory else float('nan'):>18.0f}")
    return result


if __name__ == "__main__":
    main()
