"""mone-export against Optimum-ONNX on the same synthetic Qwen3-MoE (random weights), ONNX Runtime CPU.

Optimum-ONNX needs transformers < 4.58, whose Qwen3-MoE checkpoints hold one module per expert
(``mlp.experts.{e}.gate_proj|up_proj|down_proj``) where transformers 5.x fuses them (``mlp.experts.gate_up_proj
[E, 2I, H]``, gate rows first, and ``down_proj [E, H, I]``). So it runs in three steps, two virtual environments:

    python benchmarks/optimum_compare.py prepare --dir /tmp/cmp         # this venv: model, 4.x checkpoint, our exports
    /path/to/optimum-venv/bin/python benchmarks/optimum_compare.py optimum --dir /tmp/cmp   # transformers<4.58
    python benchmarks/optimum_compare.py time --dir /tmp/cmp            # this venv: parity, bytes, latency table

The optimum venv: ``python -m venv V; echo <this venv's site-packages> > V/lib/python3.X/site-packages/zz.pth;
V/bin/pip install optimum-onnx==0.1.0 'transformers<4.58'`` (the .pth lends it this venv's torch and onnx; its own
transformers comes first on the path).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPE = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, moe_intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)
ROPE_THETA = 1000000.0


def write_transformers4_checkpoint(model, shape: dict, folder: Path) -> None:
    """The transformers 4.x form of a 5.x Qwen3-MoE (one module per expert), which Optimum-ONNX loads."""
    from safetensors.torch import save_file

    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                state[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter].contiguous()
                state[f"{prefix}{e}.up_proj.weight"] = value[e, inter:].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                state[f"{prefix}{e}.down_proj.weight"] = value[e].contiguous()
        else:
            state[key] = value.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config4 = {**shape, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "rope_theta": ROPE_THETA,
               "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "float32", "hidden_act": "silu",
               "use_cache": True, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config4, indent=1))


def prepare(folder: Path, ratio: float) -> None:
    """Seeded Qwen3-MoE in transformers 5.x, its 4.x checkpoint, and our unpruned and MoNE-pruned exports."""
    import torch
    import transformers

    from mone_export import apply_plan, calibration_batches, collect_stats, plan_pruning
    from mone_export.export import export_onnx

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder / "hf5")

    write_transformers4_checkpoint(model, SHAPE, folder / "hf4")
    export_onnx(model, folder / "mone-0", progress=False)
    batches = calibration_batches("random", None, 16, 128, seed=0, vocab_size=SHAPE["vocab_size"])
    apply_plan(model, plan_pruning(collect_stats(model, batches, progress=False), ratio, method="mone"))
    export_onnx(model, folder / f"mone-{ratio}", progress=False)
    print(f"prepared {folder}", file=sys.stderr)


def optimum(folder: Path) -> None:
    """Optimum-ONNX's own export (text-generation-with-past) of the 4.x checkpoint; run in the optimum venv."""
    from optimum.exporters.onnx import main_export

    main_export(str(folder / "hf4"), output=str(folder / "optimum"), task="text-generation-with-past", device="cpu",
                do_validation=False, no_post_process=True, opset=18)
    print(f"exported {folder / 'optimum'}", file=sys.stderr)


def time_all(folder: Path, ratio: float, args) -> dict:
    """Parity of every export against the 5.x PyTorch model, weight bytes, and interleaved ORT CPU latency."""
    import numpy as np
    import onnx
    import torch
    import transformers

    from mone_export.export import weight_bytes
    from mone_export.latency import measure_latencies, ort_runner
    from mone_export.ort_session import OrtDecoder
    from mone_export.reference import torch_step
    from mone_export.validate import logits_diff

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "hf5")).eval()
    exports = {"optimum-onnx": folder / "optimum" / "model.onnx", "mone-export, ratio 0": folder / "mone-0",
               f"mone-export, MoNE ratio {ratio}": folder / f"mone-{ratio}"}
    gen = np.random.default_rng(1)
    ids = gen.integers(0, SHAPE["vocab_size"], size=(1, args.prefill_tokens), dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
    reference, _ = torch_step(model, ids, mask, positions, None)
    rows, runners, keep = {}, {}, []
    for name, path in exports.items():
        decoder = OrtDecoder(path, "cpu", threads=args.threads)
        logits, _ = decoder(ids, mask, positions, decoder.empty_past(1))
        proto = onnx.load(str(decoder.path), load_external_data=False)
        ops = {}
        for node in proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        rows[name] = {"weight_bytes": weight_bytes(decoder.path),
                      "prefill_max_abs_diff_vs_unpruned_pytorch": logits_diff(logits, reference)[0],
                      "nodes": len(proto.graph.node), "ScatterND": ops.get("ScatterND", 0),
                      "MatMul": ops.get("MatMul", 0), "ir_version": proto.ir_version}
        runners[name] = ort_runner(decoder, ids)
        keep.append(decoder)
    times = measure_latencies(runners, args.warmup, args.prefill_repeats, args.decode_repeats)
    base = times["optimum-onnx"]
    for name in rows:
        rows[name].update(times[name])
        rows[name]["prefill_vs_optimum"] = times[name]["prefill_ms"] / base["prefill_ms"]
        rows[name]["decode_vs_optimum"] = times[name]["decode_ms_per_token"] / base["decode_ms_per_token"]
    lines = [f"Qwen3-MoE synthetic {SHAPE}; ORT CPU {args.threads} threads; prefill {args.prefill_tokens} tokens; "
             f"medians of {args.prefill_repeats}/{args.decode_repeats} interleaved runs after {args.warmup} warm-up.", "",
             "| export | weights MB | nodes | prefill max abs diff vs unpruned PyTorch | prefill ms | decode ms/token "
             "| prefill vs Optimum | decode vs Optimum |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.1f} | {r['nodes']} | "
                     f"{r['prefill_max_abs_diff_vs_unpruned_pytorch']:.2g} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['prefill_vs_optimum']:.2f}× | {r['decode_vs_optimum']:.2f}× |")
    table = "\n".join(lines)
    print(table)
    return {"shape": SHAPE, "rows": rows, "markdown": table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "optimum", "time"])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefill-repeats", type=int, default=9)
    parser.add_argument("--decode-repeats", type=int, default=40)
    parser.add_argument("--json", default="benchmarks/results/optimum_compare.json")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        prepare(args.dir, args.ratio)
    elif args.step == "optimum":
        optimum(args.dir)
    else:
        result = time_all(args.dir, args.ratio, args)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
