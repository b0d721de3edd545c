"""mone-export against its peers on ONNX Runtime CPU: Optimum's export, our unpruned and MoNE exports in fp32 and
int4, and the onnxruntime-genai model builder, with the machine's memory bandwidth as the physical limit.

Two synthetic models with seeded random weights, about 640M parameters each (8 layers, hidden 1024, 8 experts of
intermediate 2816, top-2, vocabulary 32768):

- **Qwen3-MoE** (which Optimum exports): Optimum-ONNX's ``main_export`` fp32, ours unpruned fp32 / int4, ours
  MoNE 0.5 fp32 / int4 (the command line's defaults: ``--attention auto``, GroupQueryAttention; int4 in blocks of
  128), MoNE 0.5 int4 with plain attention and with blocks of 32 instead of 128, all timed through
  ``onnxruntime.InferenceSession`` (:func:`mone_export.latency.ort_runner`);
- **gpt-oss** (which the onnxruntime-genai builder takes; our five bundled families it does not): the builder's fp32
  and int4 models beside ours unpruned / MoNE 0.5, fp32 / int4, all timed through ``onnxruntime_genai`` (a prefill
  is ``append_tokens`` of the prompt; decode steps are ``append_tokens`` of one token each, one after the other:
  genai cannot rewind gpt-oss's sliding-window cache once it is full).

Per contestant: prefill of 128 and 1024 tokens, and one decode step with a past of 128 and of 2048 tokens (attention
grows with the context); medians after warm-up, contestants interleaved round by round
(:func:`mone_export.latency.measure_latencies`); 2 threads. Beside the times: the weight bytes a decode step reads
(every non-expert weight, one embedding row, and top-k / E of each layer's expert bytes: the expectation under
uniform routing; a novice reads nothing), those bytes per second, and this machine's memory bandwidth measured in
the same run (a numpy copy, bytes read + written per second, best of several).

Steps (Optimum-ONNX needs transformers < 4.58, so it runs in the CI's second venv)::

    python benchmarks/peers.py prepare --dir /tmp/peers                       # models and every export but Optimum's
    $MONE_OPTIMUM_PYTHON benchmarks/peers.py optimum --dir /tmp/peers         # Optimum-ONNX, transformers 4.57
    python benchmarks/peers.py time --dir /tmp/peers                          # table + benchmarks/results/peers.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

QWEN = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=2816,
            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
GPT_OSS = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
               num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=8,
               num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=128, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
ROPE_THETA = 1000000.0
RATIO = 0.5
PREFILLS, PASTS = (128, 1024), (128, 2048)
CALIB = dict(source="random", samples=16, seq_len=128)
SMALL_BLOCK = 32
"""The finer variant beside the default block (``--quant-block-size 32``: more scales, slower kernels)."""
DECODE_STEPS = 128
"""Room for the decode steps of one genai generator (warm-up and timed, untimed settling runs included)."""


def _tokenizer_into(folder: Path) -> None:
    """The bundled mixtral's tokenizer files (the builder and genai want one; the ids used here are random)."""
    import shutil

    source = Path(__file__).resolve().parent.parent / "models" / "mixtral"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)


def _build_models(folder: Path) -> None:
    import torch
    import transformers

    from optimum_compare import write_transformers4_checkpoint

    torch.manual_seed(0)
    qwen = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(
        **QWEN, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})).eval()
    qwen.save_pretrained(folder / "qwen3_moe")
    _tokenizer_into(folder / "qwen3_moe")
    write_transformers4_checkpoint(qwen, QWEN, folder / "qwen3_moe-hf4")
    del qwen
    torch.manual_seed(1)
    config = transformers.GptOssConfig(**GPT_OSS)
    gpt = transformers.AutoModelForCausalLM.from_config(config).eval()
    mxfp4 = mxfp4_experts(gpt)  # the experts become the MXFP4 grid's values: every contestant reads the same weights
    gpt.save_pretrained(folder / "gpt_oss")
    _tokenizer_into(folder / "gpt_oss")
    _with_mxfp4(folder / "gpt_oss", folder / "gpt_oss-mxfp4", mxfp4)


FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The e2m1 values of MXFP4 (a sign bit above them), as gpt-oss checkpoints and transformers' dequantiser use."""


def mxfp4_encode(matrix):
    """``[E, N, K]`` float -> gpt-oss's MXFP4 ``blocks [E, N, K/32, 16]`` uint8 (element 2c in the low nibble) and
    ``scales [E, N, K/32]`` uint8 (power of two + 127), round to nearest, and the values they decode to."""
    import torch

    experts, rows, depth = matrix.shape
    blocks = matrix.float().reshape(experts, rows, depth // 32, 32)
    largest = blocks.abs().amax(dim=-1)
    exponent = torch.where(largest > 0, torch.ceil(torch.log2(largest / 6.0)), torch.full_like(largest, -127.0))
    exponent = exponent.clamp(-127, 127)
    scaled = blocks / torch.pow(2.0, exponent)[..., None]
    magnitudes = torch.tensor(FP4_MAGNITUDES)
    index = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
    codes = (index | ((scaled < 0).long() << 3)).to(torch.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    values = torch.where(scaled < 0, -magnitudes[index], magnitudes[index]) * torch.pow(2.0, exponent)[..., None]
    return packed, (exponent + 127).to(torch.uint8), values.reshape(experts, rows, depth)


def mxfp4_experts(model) -> dict:
    """Round every expert matrix of a gpt-oss model to MXFP4 in place (its float weights become the values the MXFP4
    tensors decode to) and return those tensors under the original checkpoint's names (``*_blocks``, ``*_scales``:
    what the onnxruntime-genai builder's int4 path reads)."""
    import torch

    tensors = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            blocks, scales, values = mxfp4_encode(parameter.transpose(1, 2))  # checkpoints store [E, out, in]
            parameter.copy_(values.transpose(1, 2))
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    return tensors


def _with_mxfp4(source: Path, target: Path, mxfp4: dict) -> None:
    """A copy of the checkpoint folder with the MXFP4 tensors added in their own shard (transformers ignores them
    when it loads the float weights; the builder finds them through the index)."""
    import shutil

    from safetensors.torch import save_file

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    index_path = target / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # one file: give it an index, so that two shards can be found
        from safetensors import safe_open

        with safe_open(target / "model.safetensors", "pt") as handle:
            index = {"metadata": {}, "weight_map": {key: "model.safetensors" for key in handle.keys()}}
    save_file(mxfp4, target / "mxfp4.safetensors")
    index["weight_map"].update({name: "mxfp4.safetensors" for name in mxfp4})
    index_path.write_text(json.dumps(index, indent=2))


def _our_exports(folder: Path, family: str) -> None:
    """Unpruned and MoNE 0.5 output folders, fp32 and int4, as the command line writes them by default
    (``--attention auto``: GroupQueryAttention where the family allows it; int4 in blocks of
    ``DEFAULT_BLOCK_SIZE``), and beside them the MoNE int4 export with plain attention and with blocks of 32. Every
    export after the first of a ratio reuses that run's plan."""
    from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE
    from mone_export.export_pipeline import export_model
    from mone_export.pipeline import CalibrationOptions

    calib = CalibrationOptions(**CALIB)
    model = folder / family
    variants = [(ratio, quant, "auto", DEFAULT_BLOCK_SIZE) for ratio in (0.0, RATIO) for quant in ("none", "int4")]
    variants += [(RATIO, "int4", "plain", DEFAULT_BLOCK_SIZE), (RATIO, "int4", "auto", SMALL_BLOCK)]
    for ratio, quant, attention, block in variants:
        out = folder / _our_name(family, ratio, "fp32" if quant == "none" else quant, attention, block)
        first = folder / _our_name(family, ratio, "fp32", "auto")
        plan = first / "plan" if out != first else None
        export_model(model, None if plan else ratio, out, plan_dir=plan, calib=calib, quant=quant, method="mone",
                     quant_block_size=block, attention=attention, validate=False, overwrite=True, progress=False,
                     streaming="off")
        print(f"exported {out}", file=sys.stderr)


def _our_name(family: str, ratio: float, precision: str, attention: str, block: int | None = None) -> str:
    from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE

    return (f"{family}-ours-{ratio}-{precision}" + ("-plain" if attention == "plain" else "")
            + (f"-b{block}" if block not in (None, DEFAULT_BLOCK_SIZE) else ""))


def _genai_builds(folder: Path) -> None:
    """The builder's fp32 and int4 models from the checkpoint with MXFP4 tensors (its gpt-oss int4 path converts
    those, as it would a real gpt-oss checkpoint's); a build that fails leaves ``NAME.failed`` with the builder's last
    error line, reported beside the table."""
    import subprocess

    for precision in ("fp32", "int4"):
        out = folder / f"gpt_oss-genai-{precision}"
        run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder",
                              "-i", str(folder / "gpt_oss-mxfp4"), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(folder / "genai-cache")],
                             capture_output=True, text=True)
        failed = out.with_name(out.name + ".failed")
        if run.returncode:
            failed.write_text(run.stderr.strip().splitlines()[-1] + "\n")
            print(f"the builder failed on {precision}: {failed.read_text().strip()}", file=sys.stderr)
        else:
            failed.unlink(missing_ok=True)
            print(f"built {out}", file=sys.stderr)


def prepare(folder: Path) -> None:
    """Both models, the transformers-4 checkpoint for Optimum, our eight exports and the builder's two."""
    folder.mkdir(parents=True, exist_ok=True)
    _build_models(folder)
    for family in ("qwen3_moe", "gpt_oss"):
        _our_exports(folder, family)
    _genai_builds(folder)


def optimum(folder: Path) -> None:
    """Optimum-ONNX's own export of the Qwen3-MoE (run in the optimum venv)."""
    from optimum.exporters.onnx import main_export

    main_export(str(folder / "qwen3_moe-hf4"), output=str(folder / "qwen3_moe-optimum"),
                task="text-generation-with-past", device="cpu", do_validation=False, no_post_process=True, opset=18)
    print(f"exported {folder / 'qwen3_moe-optimum'}", file=sys.stderr)


# --- what a decode step reads ---------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)\.")


def decode_read_bytes(onnx_path: Path, vocab: int, top_k: int, experts: int) -> int | None:
    """Weight bytes one decode step reads: all non-expert weights, one embedding row, top_k / E of the expert bytes.

    Expert weights are the initializers whose name holds ``.experts.`` (per expert or a fused stack); a novice has
    none, so a pruned export's expectation is lower by exactly the bytes it dropped. None when no initializer is
    named so (Optimum's export keeps the exporter's anonymous names): the estimate would count every expert.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    if not any(".experts." in tensor.name for tensor in proto.graph.initializer):
        return None
    total = 0
    for tensor in proto.graph.initializer:
        size = _tensor_bytes(tensor)
        if ".experts." in tensor.name:
            total += size * top_k / experts
        elif "embed_tokens" in tensor.name:
            total += size / vocab
        else:
            total += size
    return int(total)


def _tensor_bytes(tensor) -> int:
    """Bytes of an initializer from its shape and element type (external data need not say its length)."""
    import numpy as np
    import onnx

    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """This machine's memory bandwidth in bytes/s: a numpy copy of ``megabytes`` (read + written), best run."""
    import numpy as np

    source = np.ones(megabytes << 20, dtype=np.uint8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


# --- runners --------------------------------------------------------------------------------------------------------


def genai_runner(model, ids):
    """Prefill and decode steps after it through onnxruntime-genai. Unlike :func:`ort_runner` the decode steps
    follow each other (the past grows from the prompt's length by one per step, at most ``DECODE_STEPS``): genai
    cannot rewind a sliding-window cache once it is full (gpt-oss)."""
    import numpy as np
    import onnxruntime_genai as og

    import itertools

    from mone_export.latency import LatencyRunner, decode_tokens

    tokens = ids.shape[1]
    prompt = ids.astype(np.int32)

    def generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=tokens + DECODE_STEPS, do_sample=False)
        return og.Generator(model, params)

    def prefill():
        generator().append_tokens(prompt)

    held = generator()
    held.append_tokens(prompt)
    nexts = itertools.cycle([t.astype(np.int32) for t in decode_tokens(ids)])
    return LatencyRunner(prefill=prefill, decode=lambda: held.append_tokens(next(nexts)))


def _contestants(folder: Path, family: str) -> dict[str, Path]:
    names = {}
    if family == "qwen3_moe":
        names["Optimum-ONNX fp32"] = folder / "qwen3_moe-optimum"
    else:
        for precision in ("fp32", "int4"):
            if not (folder / f"gpt_oss-genai-{precision}.failed").exists():
                names[f"genai builder {precision}"] = folder / f"gpt_oss-genai-{precision}"
    for ratio, label in ((0.0, "unpruned"), (RATIO, f"MoNE {RATIO}")):
        for precision in ("fp32", "int4"):
            names[f"ours {label} {precision}"] = folder / _our_name(family, ratio, precision, "auto")
    fused = json.loads((folder / _our_name(family, RATIO, "int4", "auto") / "report.json").read_text())["attention"]
    if fused == "gqa":  # the control: the same export with plain attention
        names[f"ours MoNE {RATIO} int4, plain attention"] = folder / _our_name(family, RATIO, "int4", "plain")
    names[f"ours MoNE {RATIO} int4, block {SMALL_BLOCK}"] = folder / _our_name(family, RATIO, "int4", "auto",
                                                                               SMALL_BLOCK)
    return names


def _onnx_file(path: Path) -> Path:
    return path if path.suffix == ".onnx" else path / "model.onnx"


def time_family(folder: Path, family: str, args, bandwidth: float) -> dict:
    """Every contestant of one family, timed interleaved at each prefill length and past length."""
    import numpy as np

    from mone_export.export import weight_bytes
    from mone_export.latency import measure_latencies, ort_runner
    from mone_export.ort_session import OrtDecoder

    shape = QWEN if family == "qwen3_moe" else GPT_OSS
    experts = shape.get("num_experts", shape.get("num_local_experts"))
    contestants = _contestants(folder, family)
    missing = [str(path) for path in contestants.values() if not path.exists()]
    if missing:
        raise SystemExit(f"missing exports {missing}: run the prepare (and optimum) steps first")
    rng = np.random.default_rng(1)
    rows = {name: {"weight_bytes": weight_bytes(_onnx_file(path)),
                   "decode_read_bytes": decode_read_bytes(_onnx_file(path), shape["vocab_size"],
                                                          shape["num_experts_per_tok"], experts)}
            for name, path in contestants.items()}
    if family == "qwen3_moe":
        sessions = {name: OrtDecoder(path, "cpu", threads=args.threads) for name, path in contestants.items()}
    else:
        import onnxruntime_genai as og

        sessions = {}
        for name, path in contestants.items():
            config = og.Config(str(path))
            config.clear_providers()
            sessions[name] = og.Model(config)
    lengths = sorted(set(PREFILLS) | set(PASTS))
    for tokens in lengths:
        ids = rng.integers(0, shape["vocab_size"], size=(1, tokens), dtype=np.int64)
        runners = {name: (ort_runner(session, ids) if family == "qwen3_moe" else genai_runner(session, ids))
                   for name, session in sessions.items()}
        prefill_repeats = args.prefill_repeats if tokens in PREFILLS else 0
        decode_repeats = args.decode_repeats if tokens in PASTS else 0
        times = measure_latencies(runners, args.warmup, prefill_repeats, decode_repeats)
        for name, measured in times.items():
            if measured["prefill_ms"] is not None:
                rows[name][f"prefill_{tokens}_ms"] = measured["prefill_ms"]
            if measured["decode_ms_per_token"] is not None:
                rows[name][f"decode_past_{tokens}_ms"] = measured["decode_ms_per_token"]
        del runners
        print(f"{family}: timed length {tokens}", file=sys.stderr)
    base = next(iter(rows))
    for name, row in rows.items():
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.removesuffix("_ms") + "_vs_" + ("optimum" if family == "qwen3_moe" else "builder_fp32")] = \
                row[key] / rows[base][key]
        decode = row[f"decode_past_{PASTS[0]}_ms"] / 1e3
        read = row["decode_read_bytes"]
        row["achieved_bytes_per_s"] = None if read is None else read / decode
        row["achieved_vs_copy_bandwidth"] = None if read is None else row["achieved_bytes_per_s"] / bandwidth
    not_built = {path.name.removesuffix(".failed"): path.read_text().strip()
                 for path in sorted(folder.glob(f"{family}-*.failed"))}
    return {"shape": shape, "reference": base, "rows": rows, "not_built": not_built}


def markdown(result: dict) -> str:
    lines = [f"ORT CPU, {result['threads']} threads; memory bandwidth (numpy copy, read + write): "
             f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s.", ""]
    for family, data in result["families"].items():
        base = data["reference"]
        lines += [f"**{family}** ({'onnxruntime.InferenceSession' if family == 'qwen3_moe' else 'onnxruntime-genai'}; "
                  f"ratios against {base})", "",
                  "| export | weights MB | prefill 128 ms | prefill 1024 ms | decode @128 ms | decode @2048 ms "
                  "| ratios p128 / p1024 / d128 / d2048 | read/token MB | achieved GB/s (of copy) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for name, row in data["rows"].items():
            ratios = " / ".join(f"{row[f'{key}_vs_{suffix}']:.2f}"
                                for key in ("prefill_128", "prefill_1024", "decode_past_128", "decode_past_2048")
                                for suffix in [("optimum" if family == "qwen3_moe" else "builder_fp32")])
            lines.append(f"| {name} | {row['weight_bytes'] / 1e6:.0f} | {row['prefill_128_ms']:.0f} | "
                         f"{row['prefill_1024_ms']:.0f} | {row['decode_past_128_ms']:.1f} | "
                         f"{row['decode_past_2048_ms']:.1f} | {ratios} | " + (
                             "n/a | n/a |" if row["decode_read_bytes"] is None else
                             f"{row['decode_read_bytes'] / 1e6:.0f} | {row['achieved_bytes_per_s'] / 1e9:.1f} "
                             f"({row['achieved_vs_copy_bandwidth']:.0%}) |"))
        for name, reason in data.get("not_built", {}).items():
            lines.append(f"Not built: {name} ({reason}).")
        lines.append("")
    return "\n".join(lines)


def time_all(folder: Path, args) -> dict:
    bandwidth = copy_bandwidth()
    result = {"threads": args.threads, "copy_bandwidth_bytes_per_s": bandwidth, "warmup": args.warmup,
              "prefill_repeats": args.prefill_repeats, "decode_repeats": args.decode_repeats,
              "command": "python benchmarks/peers.py prepare|optimum|time --dir DIR", "families": {}}
    for family in args.families:
        result["families"][family] = time_family(folder, family, args, bandwidth)
    result["markdown"] = markdown(result)
    print(result["markdown"])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "optimum", "time"])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--families", nargs="+", default=["qwen3_moe", "gpt_oss"], choices=["qwen3_moe", "gpt_oss"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--decode-repeats", type=int, default=20)
    parser.add_argument("--json", default="benchmarks/results/peers.json")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.dir)
    elif args.step == "optimum":
        optimum(args.dir)
    else:
        result = time_all(args.dir, args)
        path = Path(args.json)
        if path.exists():  # a run of some families keeps the others' results
            previous = json.loads(path.read_text())
            result["families"] = {**previous.get("families", {}), **result["families"]}
            result["markdown"] = markdown(result)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
