"""One-shot check of the CUDA execution provider path on a GPU machine; writes ``cuda_check.json``.

Run through ``benchmarks/cuda_check.sh`` (which installs onnxruntime-gpu and points it at the image's CUDA
libraries), or directly where ``onnxruntime`` has the CUDA provider::

    python benchmarks/cuda_check.py --out OUT_DIR                 # GPU: the bundled mixtral + a ~2 GB synthetic model
    python benchmarks/cuda_check.py --out OUT_DIR --provider cpu --mid-hidden 128 --mid-inter 96   # dry run, CPU

Per model (the bundled ``mixtral``, and a synthetic Mixtral-shaped model generated here with seeded random
weights), MoNE at ratio 0.5 (calibration on random tokens) is exported in float16 in the GPU form
(``--moe-form fused``: one ``com.microsoft.MoE`` node per layer, novices as the bias node) next to the unpruned
export in the same form, and measured in one process:

- **parity** on the device: prefill logits of ORT float16 against PyTorch float32 on the same device, with PyTorch's
  own float16 run as the yardstick (docs/validation.md), and greedy tokens of ORT against PyTorch float32;
- **latency** (IO binding: inputs, outputs and KV cache on the device): decode ms/token at batch 1 and 8 after a
  128-token prefill, prefill of 1024 tokens at batch 1, for the pruned export, the unpruned export and PyTorch eager
  on the same GPU (pruned and unpruned model, float16), interleaved round by round, medians after warm-up;
- **device memory** of each session (cudaMemGetInfo, in a child process, after a 1024-token prefill and a decode);
- **host syncs**: ORT's profiler over one decode step: nodes run on the CPU provider, Memcpy nodes, NonZero nodes;
- the same decode timing for the branch form (``--moe-form dispatch``) of the pruned model, for comparison.

The bundled model also goes through the package's own ``validate_export(provider="cuda")``. Every stage is timed
and guarded: a failing stage is recorded with its error and the run goes on; the JSON is rewritten after each stage.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mone_export import apply_plan, calibration_batches, collect_stats, load_model, plan_pruning  # noqa: E402
from mone_export.export import export_onnx  # noqa: E402
from mone_export.io_binding import BoundDecoder  # noqa: E402
from mone_export.validate import (OrtDecoder, measure_latencies, ort_runner, session_memory,  # noqa: E402
                                  torch_runner)

logger = logging.getLogger("cuda_check")

RESULT: dict = {}


def save(out: Path) -> None:
    (out / "cuda_check.json").write_text(json.dumps(RESULT, indent=1, default=str) + "\n")


class Stage:
    """A guarded, timed stage: its seconds and any error go into ``record``; the JSON is saved after it."""

    def __init__(self, name: str, record: dict, out: Path):
        self.name, self.record, self.out = name, record, out

    def __enter__(self):
        self.started = time.perf_counter()
        logger.info("stage %s", self.name)
        return self

    def __exit__(self, kind, error, tb):
        self.record.setdefault("seconds", {})[self.name] = round(time.perf_counter() - self.started, 2)
        if error is not None:
            self.record.setdefault("errors", {})[self.name] = "".join(traceback.format_exception_only(kind, error))
            logger.error("stage %s failed: %s", self.name, error)
            traceback.print_exception(kind, error, tb)
        save(self.out)
        return error is not None and not isinstance(error, KeyboardInterrupt)


def environment(provider: str) -> dict:
    import onnxruntime as ort

    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
           "ort_providers": ort.get_available_providers(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["device_memory_total"] = torch.cuda.get_device_properties(0).total_memory
    import transformers

    env["transformers"] = transformers.__version__
    env["provider"] = provider
    return env


def synthetic_model(hidden: int, inter: int, layers: int, experts: int, vocab: int, seed: int):
    """A Mixtral-shaped model with seeded random weights (float32, CPU)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 256),
                           num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    return model


def device_copy(model, dtype: torch.dtype):
    return copy.deepcopy(model).to(dtype=dtype, device="cuda")


def parity(onnx_path: Path, provider: str, pruned, prompts: torch.Tensor, new_tokens: int) -> dict:
    """The export on the device vs PyTorch fp32 on the device (pruned model), with PyTorch fp16 as the yardstick
    (bf16 in a CPU dry run, where PyTorch's fp16 matrix products are slow)."""
    decoder = OrtDecoder(onnx_path, provider)
    bound = BoundDecoder(decoder)
    batch, length = prompts.shape
    mask = np.ones((batch, length), np.int64)
    positions = np.tile(np.arange(length), (batch, 1))
    logits_value, _ = bound.step(prompts.numpy(), mask, positions, bound.empty_past(batch))
    ort_logits = BoundDecoder.logits(logits_value).astype(np.float32)
    device = "cuda" if provider == "cuda" else "cpu"
    reference_model = copy.deepcopy(pruned).to(device=device, dtype=torch.float32)
    half_model = copy.deepcopy(pruned).to(device=device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)
    with torch.no_grad():
        ids = prompts.to(device)
        reference = reference_model(input_ids=ids).logits.float().cpu().numpy()
        half = half_model(input_ids=ids).logits.float().cpu().numpy()
        reference_tokens = torch_greedy(reference_model, ids, new_tokens)
        half_tokens = torch_greedy(half_model, ids, new_tokens)
    ort_tokens = ort_greedy(bound, prompts.numpy(), new_tokens)
    ort_error, half_error = float(np.abs(ort_logits - reference).max()), float(np.abs(half - reference).max())
    ulp = float(np.spacing(np.float16(np.abs(reference).max())))
    bound_value = 1.5 * half_error + max(2e-2, ulp)
    return {"prompts": int(batch), "prompt_tokens": int(length), "new_tokens": new_tokens,
            "export_dtype": decoder.dtype_name, "ort_vs_pytorch_fp32_max_abs": ort_error,
            "ort_vs_pytorch_fp32_mean_abs": float(np.abs(ort_logits - reference).mean()),
            "pytorch_half_vs_fp32_max_abs": half_error, "bound": bound_value,
            "logits_within_bound": ort_error <= bound_value,
            "greedy_tokens_equal_to_fp32": int((ort_tokens == reference_tokens).sum()),
            "pytorch_half_greedy_tokens_equal_to_fp32": int((half_tokens == reference_tokens).sum()),
            "greedy_tokens_total": int(reference_tokens.size),
            "yardstick_dtype": "float16" if device == "cuda" else "bfloat16"}


def torch_greedy(model, ids: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy tokens through the model's own cache, without EOS handling (as :func:`ort_greedy`)."""
    out = model(input_ids=ids, use_cache=True)
    tokens = []
    for step in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        if step + 1 < new_tokens:
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    return torch.cat(tokens, dim=1).cpu().numpy()


def ort_greedy(bound: BoundDecoder, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    batch, length = prompts.shape
    value, past = bound.step(prompts, np.ones((batch, length), np.int64), np.tile(np.arange(length), (batch, 1)),
                             bound.empty_past(batch))
    tokens = []
    for step in range(new_tokens):
        nxt = BoundDecoder.logits(value)[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
        tokens.append(nxt)
        if step + 1 == new_tokens:
            break
        total = length + step + 1
        value, past = bound.step(nxt, np.ones((batch, total), np.int64), np.full((batch, 1), total - 1), past)
    return np.concatenate(tokens, axis=1)


def latency(onnx_runs: dict, torch_models: dict, provider: str, batch: int, tokens: int, vocab: int,
            decode_repeats: int = 20) -> dict:
    ids = np.random.default_rng(batch * 7919 + tokens).integers(0, vocab, (batch, tokens))
    runners = {name: ort_runner(decoder, ids, io_binding=True) for name, decoder in onnx_runs.items()}
    runners.update({name: torch_runner(model, ids) for name, model in torch_models.items()})
    times = measure_latencies(runners, warmup=2, prefill_repeats=5, decode_repeats=decode_repeats)
    return {"batch": batch, "prefill_tokens": tokens, **times}


def host_syncs(onnx_path: Path, provider: str, tokens: int = 128) -> dict:
    """ORT's profile of one decode step (IO binding): nodes per provider, Memcpy and NonZero nodes."""
    import onnxruntime as ort

    from mone_export.validate import PROVIDERS

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider == "cuda" else [])
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)

    decoder = OrtDecoder(onnx_path, provider)
    decoder.session = session  # the same model, profiled
    bound = BoundDecoder(decoder)
    ids = np.random.default_rng(0).integers(0, 100, (1, tokens))
    value, past = bound.step(ids, np.ones((1, tokens), np.int64), np.arange(tokens)[None], bound.empty_past(1))
    started = time.time()
    value, past = bound.step(np.array([[1]]), np.ones((1, tokens + 1), np.int64), np.array([[tokens]]), past)
    profile = session.end_profiling()
    events = json.loads(Path(profile).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1] if runs else None
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    if last is not None:
        nodes = [e for e in nodes if last["ts"] <= e["ts"] <= last["ts"] + last["dur"]]
    by_provider: dict = {}
    memcpy = nonzero = 0
    for event in nodes:
        args = event.get("args", {})
        by_provider[args.get("provider", "?")] = by_provider.get(args.get("provider", "?"), 0) + 1
        op = args.get("op_name", "")
        memcpy += op.startswith("Memcpy")
        nonzero += op == "NonZero"
    return {"decode_step_nodes_by_provider": by_provider, "decode_step_memcpy_nodes": memcpy,
            "decode_step_nonzero_nodes": nonzero, "profile_events": len(events),
            "profile_seconds": round(time.time() - started, 2)}


def check_model(name: str, model, tokenizer, args, out: Path, record: dict) -> None:
    provider = args.provider
    half = "fp16" if provider == "cuda" else "fp32"
    work = Path(tempfile.mkdtemp(prefix=f"cuda-check-{name}-", dir=args.work))
    vocab = int(model.config.vocab_size)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    with Stage("calibrate", record, out):
        batches = calibration_batches("random", tokenizer, num_samples=args.calib_samples, seq_len=64, seed=0,
                                      vocab_size=vocab)
        plan = plan_pruning(collect_stats(model, batches, progress=False), ratio=0.5, method="mone")
        record["pruned_experts"] = plan.num_pruned
    with Stage("export unpruned", record, out):
        unpruned_path = export_onnx(model, work / "unpruned", dtype=half, moe_form="fused", progress=False)
    unpruned = copy.deepcopy(model) if provider == "cuda" else None
    apply_plan(model, plan)
    with Stage("export pruned", record, out):
        pruned_path = export_onnx(model, work / "pruned", dtype=half, moe_form="fused", progress=False)
        record["weight_bytes"] = {"pruned": _bytes(pruned_path), "unpruned": _bytes(unpruned_path)}
    if name == "mixtral":
        with Stage("validate_export", record, out):
            from mone_export.validate import validate_export

            report = validate_export(pruned_path.parent, model, provider=provider, baseline_dir=unpruned_path.parent,
                                     tokenizer=tokenizer, progress=False)
            record["validate_export"] = {k: report.get(k) for k in ("passed", "failures", "half_precision", "latency",
                                                                    "memory", "logits", "generation")}
    with Stage("parity", record, out):
        prompts = torch.as_tensor(np.random.default_rng(1).integers(0, vocab, (4, 64)))
        record["parity"] = parity(pruned_path, provider, model, prompts, args.new_tokens)
    with Stage("device memory", record, out):
        record["memory"] = {"pruned": session_memory(pruned_path, provider, 1024),
                            "unpruned": session_memory(unpruned_path, provider, 1024)}
        pruned_mem = record["memory"]["pruned"].get("device_memory_bytes")
        unpruned_mem = record["memory"]["unpruned"].get("device_memory_bytes")
        record["device_memory_bytes"] = pruned_mem
        record["unpruned_device_memory_bytes"] = unpruned_mem
        if pruned_mem and unpruned_mem:
            record["device_memory_vs_unpruned"] = pruned_mem / unpruned_mem
    with Stage("host syncs", record, out):
        record["host_syncs"] = {"fused_pruned": host_syncs(pruned_path, provider)}
    torch_models = {}
    if provider == "cuda":
        torch_models = {"pytorch": device_copy(model, torch.float16),
                        "pytorch_unpruned": device_copy(unpruned, torch.float16)}
        del unpruned
    decoders = {"onnx": OrtDecoder(pruned_path, provider), "onnx_unpruned": OrtDecoder(unpruned_path, provider)}
    rows = record.setdefault("latency", [])
    for batch, tokens in ((1, 128), (8, 128), (1, 1024)):
        if time.perf_counter() - START > args.budget:
            record.setdefault("skipped", []).append(f"latency batch {batch} x {tokens}: time budget")
            continue
        with Stage(f"latency b{batch} t{tokens}", record, out):
            rows.append(latency(decoders, torch_models, provider, batch, tokens, vocab,
                                decode_repeats=20 if tokens <= 128 else 10))
    summarise(record)
    if time.perf_counter() - START < args.budget:
        with Stage("dispatch form", record, out):
            dispatch_path = export_onnx(model, work / "dispatch", dtype=half, moe_form="dispatch", progress=False)
            record["host_syncs"]["dispatch_pruned"] = host_syncs(dispatch_path, provider)
            dispatch = {"onnx_fused": decoders["onnx"], "onnx_dispatch": OrtDecoder(dispatch_path, provider)}
            record["dispatch_vs_fused"] = latency(dispatch, {}, provider, 1, 128, vocab)
    save(out)


def summarise(record: dict) -> None:
    """The headline figures the issue asks for, from the batch-1 rows."""
    rows = {(r["batch"], r["prefill_tokens"]): r for r in record.get("latency", [])}
    one = rows.get((1, 128))
    if one:
        record["decode_ms_per_token"] = one["onnx"]["decode_ms_per_token"]
        record["decode_vs_unpruned"] = one["onnx"]["decode_ms_per_token"] / one["onnx_unpruned"]["decode_ms_per_token"]
        if "pytorch" in one:
            record["decode_vs_pytorch"] = one["onnx"]["decode_ms_per_token"] / one["pytorch"]["decode_ms_per_token"]
            record["decode_vs_pytorch_unpruned"] = (one["onnx"]["decode_ms_per_token"]
                                                    / one["pytorch_unpruned"]["decode_ms_per_token"])
    eight = rows.get((8, 128))
    if eight:
        record["decode_ms_per_token_batch8"] = eight["onnx"]["decode_ms_per_token"]
    long = rows.get((1, 1024))
    if long:
        record["prefill_ms"] = long["onnx"]["prefill_ms"]
        record["prefill_tokens"] = 1024
        record["prefill_vs_unpruned"] = long["onnx"]["prefill_ms"] / long["onnx_unpruned"]["prefill_ms"]


def _bytes(path: Path) -> int:
    from mone_export.export import weight_bytes

    return weight_bytes(path)


START = time.perf_counter()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for cuda_check.json")
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", default=None, help="scratch folder for the exports (default: the temp folder)")
    parser.add_argument("--mid-hidden", type=int, default=2048)
    parser.add_argument("--mid-inter", type=int, default=4096)
    parser.add_argument("--mid-layers", type=int, default=4)
    parser.add_argument("--mid-experts", type=int, default=8)
    parser.add_argument("--mid-vocab", type=int, default=32000)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=float, default=400, help="seconds after which optional stages are skipped")
    parser.add_argument("--skip-mid", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from big_model import _without_paths  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

    RESULT["command"] = "python benchmarks/cuda_check.py " + " ".join(_without_paths(sys.argv[1:], ("--out", "--work")))
    RESULT["environment"] = environment(args.provider)
    RESULT["device"] = RESULT["environment"].get("device_name", "cpu")
    models = RESULT.setdefault("models", {})
    save(out)
    model, tokenizer = load_model("mixtral")
    check_model("mixtral", model, tokenizer, args, out, models.setdefault("mixtral", {}))
    del model
    if not args.skip_mid:
        record = models.setdefault("synthetic_mixtral", {"shape": {
            "hidden": args.mid_hidden, "intermediate": args.mid_inter, "layers": args.mid_layers,
            "experts": args.mid_experts, "top_k": 2, "vocab": args.mid_vocab}})
        with Stage("generate", record, out):
            mid = synthetic_model(args.mid_hidden, args.mid_inter, args.mid_layers, args.mid_experts, args.mid_vocab, 0)
        if "errors" not in record:
            check_model("synthetic_mixtral", mid, None, args, out, record)
    RESULT["seconds"] = round(time.perf_counter() - START, 1)
    save(out)
    print(json.dumps({name: {k: v for k, v in rec.items() if k in (
        "decode_ms_per_token", "decode_ms_per_token_batch8", "prefill_ms", "device_memory_bytes",
        "device_memory_vs_unpruned", "decode_vs_unpruned", "decode_vs_pytorch", "errors")}
        for name, rec in models.items()}, indent=1, default=str))
    return RESULT


if __name__ == "__main__":
    main()
