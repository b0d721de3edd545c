"""Export time and peak memory: layer-streamed export against the in-memory export and Optimum-ONNX, one run.

    python benchmarks/streamed_export.py --dir /tmp/streamed-bench --optimum-python /work/optimum-venv/bin/python

Builds a seeded Qwen3-MoE of about 640M parameters (8 layers, hidden 1024, 8 experts of intermediate 2816, vocab
32768; fp32), saves it as a transformers 5.x checkpoint and in the 4.x per-expert form Optimum-ONNX loads
(``optimum_compare.write_transformers4_checkpoint``), then exports the unpruned model three ways, each in its own
child process whose whole process tree's RSS is sampled from outside (``mone_export.process_memory``):

- ``optimum``: Optimum-ONNX's ``main_export`` (``text-generation-with-past``, no validation, no post-processing,
  opset 18; needs ``--optimum-python``, a venv with ``optimum-onnx==0.1.0`` and ``transformers<4.58``);
- ``in-memory``: ``load_model`` + :func:`mone_export.export.export_onnx`;
- ``streamed``: :class:`~mone_export.streaming.LayerStreamedModel` + :func:`~mone_export.streamed_export.export_onnx_streamed`.

Wall seconds include loading the checkpoint (each tool's whole job). It then runs the in-memory and streamed
graphs in ONNX Runtime on the same inputs and reports their largest output difference. Writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=2816,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048, rms_norm_eps=1e-6,
             tie_word_embeddings=False)

EXPORTS = {
    "in-memory": """
import sys
from mone_export import load_model
from mone_export.export import export_onnx
model, _ = load_model(sys.argv[1])
export_onnx(model, sys.argv[2], progress=False)
""",
    "streamed": """
import sys
from mone_export.streaming import LayerStreamedModel
from mone_export.streamed_export import export_onnx_streamed
export_onnx_streamed(LayerStreamedModel(sys.argv[1]), sys.argv[2], progress=False)
""",
    "optimum": """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", device="cpu", do_validation=False,
            no_post_process=True, opset=18)
""",
}


def prepare(folder: Path) -> int:
    """The seeded model as ``hf5`` (transformers 5.x) and ``hf4`` (Optimum's form); returns its parameter count."""
    import torch
    import transformers

    from optimum_compare import ROPE_THETA, write_transformers4_checkpoint

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if not (folder / "hf5" / "config.json").is_file():
        model.save_pretrained(folder / "hf5")
    if not (folder / "hf4" / "config.json").is_file():
        write_transformers4_checkpoint(model, SHAPE, folder / "hf4")
    return sum(p.numel() for p in model.parameters())


def run_export(name: str, python: str, source: Path, out: Path) -> dict:
    """One export in a child process; wall seconds and the peak RSS of its process tree."""
    from mone_export.process_memory import TreePeakSampler

    started = time.perf_counter()
    child = subprocess.Popen([python, "-c", EXPORTS[name], str(source), str(out)])
    with TreePeakSampler(child.pid) as sampler:
        code = child.wait()
    if code:
        raise SystemExit(f"{name} export failed with exit code {code}")
    return {"wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(sampler.peak / 1e6)}


def max_output_difference(a: Path, b: Path, vocab: int) -> float:
    """Largest |difference| of every output of two decoders on one prefill through a 4-token cache."""
    import numpy as np
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b)]
    rng = np.random.default_rng(0)
    batch, seq, past = 1, 16, 4
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.arange(past, past + seq)[None].astype(np.int64)}
    for value in sessions[0].get_inputs():
        if value.name.startswith("past_key_values."):
            shape = [batch, value.shape[1], past, value.shape[3]]
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    outputs = [s.run(None, feeds) for s in sessions]
    return max(float(np.abs(x - y).max()) for x, y in zip(*outputs))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/streamed-bench"))
    parser.add_argument("--optimum-python", help="python of a venv with optimum-onnx (skip Optimum without it)")
    parser.add_argument("--json", default="benchmarks/results/streamed_export.json")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    parameters = prepare(args.dir)
    rows = {}
    order = (["optimum"] if args.optimum_python else []) + ["in-memory", "streamed"]
    for name in order:
        python = args.optimum_python if name == "optimum" else sys.executable
        source = args.dir / ("hf4" if name == "optimum" else "hf5")
        rows[name] = run_export(name, python, source, args.dir / name)
        print(f"{name}: {rows[name]}", file=sys.stderr)
    result = {"shape": SHAPE, "parameters": parameters, "rows": rows,
              "streamed_vs_in_memory_max_abs_output_diff": max_output_difference(
                  args.dir / "in-memory" / "model.onnx", args.dir / "streamed" / "model.onnx", SHAPE["vocab_size"])}
    if "optimum" in rows:
        result["streamed_seconds_vs_optimum"] = round(rows["streamed"]["wall_seconds"] /
                                                      rows["optimum"]["wall_seconds"], 2)
    result["command"] = "python benchmarks/streamed_export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
