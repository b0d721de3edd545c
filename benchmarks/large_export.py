"""Export a synthetic MoE model whose weights exceed 2 GiB and check that it goes to external data and still runs.

    python benchmarks/large_export.py [--out /tmp/large-export] [--hidden 1536 --layers 6 --experts 8 --inter 4096]

Too slow and too large for CI (a few minutes and ~8 GB of memory on 2 cores), so it is a script: it builds a
random Mixtral-shaped model (about 2.3 GiB in fp32 with the defaults), prunes it with MoNE at ratio 0.25 on
random calibration tokens, exports it with ``export_onnx`` and checks: ``model.onnx`` is a small protobuf,
the weights are in ``model.onnx.data``, the weight bytes are within 1.005× of the lower bound, and ONNX
Runtime's logits match PyTorch's. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from mone_export import apply_plan, calibration_batches, collect_stats, plan_pruning
from mone_export.export import cache_shapes, export_onnx, lower_bound_bytes, weight_bytes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/large-export")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--inter", type=int, default=4096)
    parser.add_argument("--json", default="benchmarks/results/large_export.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.inter,
                                        num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=4,
                                        num_local_experts=args.experts, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    stats = collect_stats(model, calibration_batches("random", None, 4, 64, vocab_size=8192), progress=False)
    apply_plan(model, plan_pruning(stats, 0.25, method="mone"))
    started = time.perf_counter()
    path = export_onnx(model, Path(args.out), progress=True)
    seconds = time.perf_counter() - started
    data = path.with_name(path.name + ".data")

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(1))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 16), np.int64),
             "position_ids": np.arange(16, dtype=np.int64)[None]}
    for i, spec in enumerate(cache_shapes(model.config)):
        feeds[f"past_key_values.{i}.key"] = np.zeros((1, spec.heads, 0, spec.key_dim), np.float32)
        feeds[f"past_key_values.{i}.value"] = np.zeros((1, spec.heads, 0, spec.value_dim), np.float32)
    ort_logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        torch_logits = model(ids).logits.numpy()
    result = {
        "parameters_bytes_unpruned": params,
        "model_onnx_bytes": path.stat().st_size,
        "external_data_bytes": data.stat().st_size if data.exists() else 0,
        "weight_bytes": weight_bytes(path),
        "lower_bound_bytes": lower_bound_bytes(model),
        "export_seconds": round(seconds, 1),
        "max_abs_logit_diff": float(np.abs(ort_logits - torch_logits).max()),
    }
    result["weights_over_bound"] = round(result["weight_bytes"] / result["lower_bound_bytes"], 5)
    result["ok"] = bool(data.exists() and result["model_onnx_bytes"] < 2**31 and result["weights_over_bound"] <= 1.005
                        and result["max_abs_logit_diff"] < 1e-3)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
