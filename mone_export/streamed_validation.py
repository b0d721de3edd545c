"""Validation of an export against a model larger than memory: the PyTorch reference is computed layer-streamed.

:func:`validate_streamed` checks what :func:`mone_export.validate.validate_export` checks (docs/validation.md), with
the PyTorch side run one decoder layer at a time (:func:`mone_export.streaming.streamed_logits`), never the whole
model in memory, and in **one** streamed pass by teacher forcing:

1. ONNX Runtime prefills the prompts (one batch) and generates greedily through its KV cache;
2. the prompts followed by ONNX Runtime's generated tokens go once through the streamed PyTorch model;
3. PyTorch's logits at the prompt positions are compared with ONNX Runtime's prefill logits, those at the
   following positions with ONNX Runtime's logits at each decode step (the same positions, the same preceding
   tokens); and at every generated position PyTorch's greedy choice must be ONNX Runtime's token, except at a
   *near tie* (PyTorch's logits of the two tokens within the tolerance), which is reported, not failed.

Teacher forcing checks every generated position against the same context, where ``model.generate`` comparisons
stop at the first divergence. Memory (weight bytes against the pruned model's bound, the ORT session's peak) and
latency (the export against the unpruned export, in ONNX Runtime) are measured as in-memory validation does;
PyTorch eager latency is not (the model is never in memory), and the report says so.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mone_export.errors import UsageError

__all__ = ["StreamedValidationOptions", "streamed_lower_bound_bytes", "validate_streamed"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StreamedValidationOptions:
    """How :func:`validate_streamed` checks an export.

    Attributes:
        provider: ONNX Runtime provider, ``cpu`` or ``cuda``.
        atol: absolute logits tolerance; default :data:`mone_export.validate.TOLERANCES` of the export's dtype.
        decode_steps: decode steps whose logits are compared after the prefill.
        new_tokens: greedy tokens checked per prompt (at least ``decode_steps``).
        memory: weight bytes against the bound and the ORT session's peak memory.
        latency: prefill / decode medians of the export and of ``baseline_dir``'s unpruned export.
        baseline_dir: the unpruned export, for the memory and latency comparison.
        prefill_tokens, warmup, prefill_repeats, decode_repeats: the latency measurement.
    """

    provider: str = "cpu"
    atol: float | None = None
    decode_steps: int = 4
    new_tokens: int = 32
    memory: bool = True
    latency: bool = True
    baseline_dir: str | os.PathLike | None = None
    prefill_tokens: int = 128
    warmup: int = 2
    prefill_repeats: int = 5
    decode_repeats: int = 20


def streamed_lower_bound_bytes(streamed, plan=None, dtype: torch.dtype | None = None) -> int:
    """:func:`mone_export.export.lower_bound_bytes` of the model pruned by ``plan``, without loading a layer.

    The parts outside the decoder layers are in memory (tied weights counted once); each decoder layer is pruned
    on the ``meta`` device (:func:`mone_export.novices.layer_pruned`) and its tensors counted by shape.
    """
    from mone_export.export import lower_bound_bytes
    from mone_export.novices import layer_pruned
    from mone_export.streaming import only_layer

    dtype = dtype or streamed.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = streamed.decoder_layers
    with only_layer(layers, None):
        total = lower_bound_bytes(streamed.model, dtype)
    moe_by_index = {layer.index: layer for layer in streamed.moe_layers}
    for index, layer in enumerate(layers):
        if index in moe_by_index:
            with layer_pruned(streamed.adapter, moe_by_index[index], plan):
                total += _tensor_bytes(layer, itemsize)
        else:
            total += _tensor_bytes(layer, itemsize)
    return total


def _tensor_bytes(module: torch.nn.Module, itemsize: int) -> int:
    return sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size())
               for t in [*module.parameters(), *module.buffers()])


def _ort_greedy(decoder, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """ONNX Runtime's prefill logits ``[N, L, V]``, its logits at each of ``steps`` decode steps ``[N, V]``, and
    its greedy tokens ``[N, steps + 1]`` (the first from the prefill), all prompts in one batch."""
    batch, length = ids.shape
    mask = np.ones((batch, length), dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    prefill, past = decoder(ids, mask, positions, decoder.empty_past(batch))
    tokens = [prefill[:, -1].argmax(-1)]
    decoded = []
    for step in range(steps):
        total = length + step + 1
        logits, past = decoder(tokens[-1].reshape(batch, 1).astype(np.int64), np.ones((batch, total), np.int64),
                               np.full((batch, 1), total - 1, dtype=np.int64), past)
        decoded.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1))
    return prefill, decoded, np.stack(tokens, axis=1)


def _row(name: str, onnx_logits: np.ndarray, reference: torch.Tensor, atol: float, dtype_name: str):
    from mone_export.validate import ParityFailure

    delta = np.abs(onnx_logits.astype(np.float64) - reference.double().numpy())
    max_diff, mean_diff = float(delta.max()), float(delta.mean())
    ok = bool(np.isfinite(max_diff) and max_diff <= atol)
    row = {"output": name, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "tolerance": atol, "passed": ok}
    failure = None if ok else ParityFailure(name, f"max |Δ| {max_diff:.3g} (mean |Δ| {mean_diff:.3g})",
                                            f"{atol:.0e} absolute ({dtype_name})", max_diff)
    return row, failure


def _teacher_forced_generation(tokens: np.ndarray, reference: torch.Tensor, length: int, eos: set[int],
                               atol: float) -> tuple[dict, list]:
    """At every generated position (up to each prompt's first EOS), PyTorch's greedy choice given ONNX Runtime's
    preceding tokens must be ONNX Runtime's token, or a near tie."""
    from mone_export.validate import ParityFailure

    results, failures = [], []
    for prompt, row in enumerate(tokens.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        mismatches, ties = [], []
        for step, token in enumerate(row[:end]):
            logits = reference[prompt, length - 1 + step].double()
            choice = int(logits.argmax())
            if choice == token:
                continue
            margin = float(logits[choice] - logits[token])
            (ties if margin <= atol else mismatches).append({"step": step, "onnx": token, "torch": choice,
                                                            "margin": margin})
        results.append({"prompt": prompt, "identical": not mismatches and not ties, "onnx": row[:end],
                        "near_ties": ties, "mismatches": mismatches})
        if mismatches:
            first = mismatches[0]
            failures.append(ParityFailure(
                f"generated tokens of prompt {prompt}",
                f"new token {first['step']} differs (ONNX {first['onnx']}, PyTorch {first['torch']}; PyTorch prefers "
                f"its token by {first['margin']:.3g} in logits given the same preceding tokens)",
                f"PyTorch's greedy token at every generated position (or a near tie within {atol:.0e})"))
    summary = {"new_tokens": int(tokens.shape[1]), "prompts": len(results), "method": "teacher forcing",
               "identical": sum(r["identical"] for r in results),
               "near_ties": sum(bool(r["near_ties"]) and not r["mismatches"] for r in results),
               "passed": not failures, "per_prompt": results}
    return summary, failures


def validate_streamed(onnx_dir: str | os.PathLike, streamed, plan=None, tokenizer=None,
                      options: StreamedValidationOptions = StreamedValidationOptions(),
                      progress: bool = False) -> dict:
    """Check an export against the layer-streamed PyTorch model pruned by ``plan`` (module docstring).

    Args:
        onnx_dir: the export folder (or its ``model.onnx``); an fp32 export (fp16 exports are validated in memory).
        streamed: the :class:`~mone_export.streaming.LayerStreamedModel` of the original checkpoint, in float32.
        plan: the :class:`~mone_export.plan.PruningPlan` the export applied (None: an unpruned export).
        tokenizer: for the test prompts (held-out ``python-code``); None: seeded random ids.
        options: :class:`StreamedValidationOptions`.
        progress: a bar per streamed layer on a terminal; log lines otherwise.

    Returns:
        The report of :func:`mone_export.validate.validate_export` (``passed``, ``failures``, ``logits``,
        ``generation``, ``memory``, ``latency``, ...), with ``reference: "layer-streamed, teacher-forced"``.
    """
    from mone_export.export import weight_bytes
    from mone_export.streaming import streamed_logits
    from mone_export.latency import measure_latencies, ort_runner
    from mone_export.memory_probe import session_memory
    from mone_export.ort_session import OrtDecoder
    from mone_export.prompts import make_prompts
    from mone_export.reference import eos_ids
    from mone_export.validate import TOLERANCES, WEIGHT_BOUND, ParityFailure

    log = logger.info if progress else logger.debug
    started = time.perf_counter()
    decoder = OrtDecoder(onnx_dir, options.provider)
    dtype_name = decoder.dtype_name
    if dtype_name != "float32":
        raise UsageError(f"{decoder.path} is a {dtype_name} export: layer-streamed validation checks float32 "
                         "exports; export in fp32, or validate in memory.")
    if streamed.dtype != torch.float32:
        raise UsageError("layer-streamed validation needs the model loaded in float32 (LayerStreamedModel(dtype="
                         "torch.float32)).")
    num_layers = int(streamed.config.num_hidden_layers)
    if decoder.num_layers != num_layers:
        raise UsageError(f"{decoder.path} has {decoder.num_layers} cached layers but the model has {num_layers}; "
                         "validate the export against its own model.")
    atol = float(TOLERANCES[dtype_name] if options.atol is None else options.atol)
    steps = max(options.new_tokens, options.decode_steps)
    vocab = int(streamed.config.vocab_size)
    ids, source = make_prompts(tokenizer, vocab)
    report: dict[str, Any] = {"onnx": str(decoder.path), "provider": options.provider, "dtype": dtype_name,
                              "atol": atol, "reference": "layer-streamed, teacher-forced",
                              "prompts": {"source": source, "count": int(ids.shape[0]),
                                          "tokens": int(ids.shape[1])}}
    failures: list[ParityFailure] = []
    seconds: dict[str, float] = {}

    clock = time.perf_counter()
    log("validating %s: ONNX Runtime greedy, %d prompts x %d tokens", decoder.path, ids.shape[0], steps + 1)
    prefill, decoded, tokens = _ort_greedy(decoder, ids.numpy(), steps)
    # The session holds every exported weight: release it while the streamed reference loads its layers (the
    # peak is the larger of the two, not their sum); latency opens it again.
    onnx_path = decoder.path
    del decoder
    gc.collect()
    sequences = torch.cat([ids, torch.from_numpy(tokens[:, :-1]).long()], dim=1)
    (reference,) = streamed_logits(streamed, [sequences], plan, progress=progress, scratch=onnx_path.parent.parent)
    length = int(ids.shape[1])
    rows = []
    row, failure = _row("logits at prefill", prefill, reference[:, :length], atol, dtype_name)
    rows.append(row)
    failures += [failure] if failure else []
    for step in range(1, options.decode_steps + 1):
        row, failure = _row(f"logits at decode step {step}", decoded[step - 1], reference[:, length - 1 + step],
                            atol, dtype_name)
        rows.append(row)
        failures += [failure] if failure else []
    report["logits"] = rows
    if options.new_tokens > 0:
        eos = eos_ids(streamed.model)
        report["generation"], found = _teacher_forced_generation(tokens[:, :options.new_tokens], reference, length,
                                                                 eos, atol)
        failures += found
    seconds["parity"] = round(time.perf_counter() - clock, 2)

    baseline = Path(options.baseline_dir) / "model.onnx" if options.baseline_dir is not None else None
    if options.memory:
        clock = time.perf_counter()
        weights, bound = weight_bytes(onnx_path), streamed_lower_bound_bytes(streamed, plan, torch.float32)
        memory = {"weight_bytes": weights, "lower_bound_bytes": bound, "weight_ratio_to_bound": weights / bound,
                  "session": session_memory(onnx_path, options.provider, options.prefill_tokens)}
        if baseline is not None:
            memory["unpruned_weight_bytes"] = weight_bytes(baseline)
            memory["unpruned_session"] = session_memory(baseline, options.provider, options.prefill_tokens)
        if weights > WEIGHT_BOUND * bound:
            failures.append(ParityFailure("weight bytes of model.onnx", f"{weights} bytes = {weights / bound:.4f}× "
                                          f"the lower bound {bound}", f"{WEIGHT_BOUND}× the lower bound"))
        report["memory"] = memory
        seconds["memory"] = round(time.perf_counter() - clock, 2)
    if options.latency:
        clock = time.perf_counter()
        report["latency"] = _ort_latency(OrtDecoder(onnx_path, options.provider), baseline, tokenizer, vocab, options,
                                         measure_latencies, ort_runner)
        seconds["latency"] = round(time.perf_counter() - clock, 2)
    report["failures"] = [f.to_dict() for f in failures]
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["seconds_per_check"] = seconds
    return report


def _ort_latency(decoder, baseline: Path | None, tokenizer, vocab: int, options: StreamedValidationOptions,
                 measure_latencies, ort_runner) -> dict:
    """Medians of the export and of the unpruned export, interleaved; PyTorch eager is not timed here."""
    from mone_export.ort_session import OrtDecoder
    from mone_export.prompts import make_prompts

    ids, _ = make_prompts(tokenizer, vocab, num=1, length=options.prefill_tokens, seed=1)
    runners = {"onnx": ort_runner(decoder, ids.numpy())}
    if baseline is not None:
        runners["onnx_unpruned"] = ort_runner(OrtDecoder(baseline, options.provider), ids.numpy())
    runs = measure_latencies(runners, options.warmup, options.prefill_repeats, options.decode_repeats)
    ratios = {}
    if "onnx_unpruned" in runs:
        for key in ("prefill_ms", "decode_ms_per_token"):
            ratios[f"{key.split('_')[0]}_onnx_vs_onnx_unpruned"] = runs["onnx"][key] / runs["onnx_unpruned"][key]
    return {"prefill_tokens": int(ids.shape[1]), "warmup": options.warmup,
            "prefill_repeats": options.prefill_repeats, "decode_repeats": options.decode_repeats,
            "threads": max(1, torch.get_num_threads()), "ort_spinning": False, "provider": options.provider,
            **runs, "ratios": ratios,
            "pytorch_not_measured": "layer-streamed run: the PyTorch model is never whole in memory"}
