"""Validation of an exported model against the pruned PyTorch model (docs/validation.md).

:func:`validate_export` runs the export in ONNX Runtime and the PyTorch model on the same inputs and reports:

- **logits**: max |Δ| and mean |Δ| at prefill and at ``decode_steps`` decode steps through the KV cache (each side
  keeps its own cache: ORT feeds its ``present.*`` back as ``past_key_values.*``, PyTorch its ``DynamicCache``; the
  next token is PyTorch's greedy choice on both sides), against a tolerance per dtype (:data:`TOLERANCES`);
- **generation**: a greedy loop in ORT through the cache and ``model.generate(do_sample=False)`` must produce the
  same first ``new_tokens`` tokens for every test prompt (both stop at the model's EOS); where they first differ
  at a *near tie* (PyTorch's logits of the two tokens within the logits tolerance) the prompt is reported as a
  near tie instead of a failure;
- **memory**: the export's weight bytes against the lower bound (at most 1.005×, docs/graph.md#weight-bytes), and
  the ORT session's peak memory, measured in a child process that only imports numpy and onnxruntime (CPU: growth
  of the peak resident set ``VmHWM`` over the resident set before the session is created, around session creation,
  a prefill and a decode step; CUDA: the child's device memory as ``nvidia-smi`` reports it, CUDA context
  included);
- **latency**: median prefill time (``prefill_tokens`` tokens) and per-token decode time (one token after that
  prefill), after warm-up, for the export, the unpruned export (``baseline_dir``) and PyTorch eager, in one run,
  interleaved round by round (machine-load drift hits all three alike), with their ratios. ORT sessions run
  without thread spinning, so that idle ORT threads do not steal the cores PyTorch is timed on.

A **float16** export is judged differently (:mod:`mone_export.half_precision`): against the float32 PyTorch model,
by the yardstick of the same model run by PyTorch in float16 (logits error at most 1.5 × PyTorch fp16's + ε,
greedy agreement with float32 at least PyTorch fp16's, routing flips only at near ties). An export with
**quantised weights** (``--quant``; the record in its metadata) is judged by the same rules, with the float32 model
holding the export's dequantised weights as the yardstick (:mod:`mone_export.quantization`).

Test prompts are fixed-length chunks of the held-out split of ``python-code`` (never calibration text), or seeded
random ids when there is no tokenizer. Every failed check is a :class:`ParityFailure` that names the output, the
difference and the tolerance; :func:`raise_for_failures` turns them into a :class:`~mone_export.errors.ParityError`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mone_export.errors import ParityError, UsageError
from mone_export.latency import (LatencyRunner, compare_latency, measure_latencies, measure_ort_latency,
                                 measure_torch_latency, ort_runner, torch_runner)
from mone_export.memory_probe import session_memory
from mone_export.ort_session import (PROVIDERS, TORCH_DTYPES, OrtDecoder, check_provider, greedy_ort, model_file,
                                     ort_providers)
from mone_export.prompts import as_prompt_tensor, latency_ids, make_prompts
from mone_export.reference import eos_ids, greedy_torch, torch_step

__all__ = [
    # this module: the checks and their entry point
    "TOLERANCES",
    "WEIGHT_BOUND",
    "ParityFailure",
    "ValidationOptions",
    "check_generation",
    "check_logits",
    "check_memory",
    "logits_diff",
    "raise_for_failures",
    "reference_model",
    "validate_export",
    # re-exported from the modules they live in (mone_export.ort_session, .prompts, .latency, .memory_probe)
    "PROVIDERS",
    "LatencyRunner",
    "OrtDecoder",
    "check_provider",
    "make_prompts",
    "measure_latencies",
    "measure_ort_latency",
    "measure_torch_latency",
    "ort_providers",
    "ort_runner",
    "session_memory",
    "torch_runner",
]

logger = logging.getLogger(__name__)

TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
"""Absolute tolerance on logits per export dtype (fp32 1e-4; bf16 is our choice): docs/validation.md. For fp16 the
floor of ε in the bound ``1.5 × PyTorch fp16's error + ε`` against float32 (:mod:`mone_export.half_precision`)."""

WEIGHT_BOUND = 1.005
"""The export's weight bytes may exceed the pruned model's parameter bytes by at most 0.5 % (docs/graph.md)."""

MAX_MESSAGES = 3
"""Failed checks named in a ParityError's message (the report lists all)."""


@dataclasses.dataclass(frozen=True)
class ParityFailure:
    """One failed check: which output, by how much, and the tolerance it exceeded."""

    output: str
    """What was compared, e.g. ``"logits at decode step 2"`` or ``"generated tokens of prompt 1"``."""
    difference: str
    """By how much, in words, e.g. ``"max |Δ| 3.1e-02 (mean 4.0e-03)"``."""
    tolerance: str
    """The tolerance, in words, e.g. ``"1e-04 absolute (float32)"`` or ``"identical tokens"``."""
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        return f"{self.output}: {self.difference} exceeds the tolerance {self.tolerance}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus the one-line message."""
        return {**dataclasses.asdict(self), "message": str(self)}


def raise_for_failures(report: dict) -> None:
    """Raise :class:`ParityError` (CLI exit 1) naming every failed check of a :func:`validate_export` report."""
    failures = report.get("failures") or []
    if failures:
        shown = "; ".join(f["message"] for f in failures[:MAX_MESSAGES])
        if len(failures) > MAX_MESSAGES:
            shown += f"; and {len(failures) - MAX_MESSAGES} more failed checks (see the report)"
        error = ParityError(shown)
        error.report = report
        raise error


# --- ONNX Runtime side ----------------------------------------------------------------------------------------------


# --- checks ---------------------------------------------------------------------------------------------------------


def logits_diff(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> tuple[float, float]:
    """``(max |Δ|, mean |Δ|)`` of ONNX Runtime's logits against PyTorch's, in float64."""
    reference = torch_logits.detach().to(torch.float64).numpy()
    delta = np.abs(onnx_logits.astype(np.float64) - reference)
    return float(delta.max()), float(delta.mean())


class RouterTies:
    """Exact ties at a PyTorch model's top-k boundaries, recorded as it runs (docs/validation.md#router-ties).

    Within ``with RouterTies(model) as ties:``, every forward of ``model`` over a ``[B, S]`` batch of positions
    ``start .. start+S-1`` (one prompt per row) marks the rows where some MoE layer's router logits tie exactly
    between its k-th and (k+1)-th expert: there ONNX's ``TopK`` (lowest index first) and PyTorch's ``topk`` may
    route the token to different experts, and from that position on the two sides need not agree.
    :attr:`first` holds, per row, the first such position (``inf`` where none).
    """

    def __init__(self, model, rows: int):
        self.model = model
        self.first = np.full(rows, np.inf)
        self._position = 0
        self._width = 0
        self._handles: list = []
        self._recording = None

    def __enter__(self) -> "RouterTies":
        from mone_export.adapters import routing_recorded

        self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._recording = routing_recorded(self.model, self._record)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def _on_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._position += self._width  # the previous forward's positions
        self._width = int(ids.shape[-1])

    def _record(self, layer: int, logits: torch.Tensor, top_k_index: torch.Tensor) -> None:
        k = int(top_k_index.shape[-1])
        flat = logits.detach().reshape(-1, logits.shape[-1])
        if flat.shape[-1] <= k:
            return
        top = flat.topk(k + 1, dim=-1).values
        tied = (top[:, k - 1] == top[:, k]).reshape(-1, self._width).numpy()
        for row, offsets in enumerate(tied):
            hit = np.flatnonzero(offsets)
            if hit.size:
                self.first[row] = min(self.first[row], self._position + int(hit[0]))


def _masked_diff(onnx_logits: np.ndarray, torch_logits: torch.Tensor, positions: np.ndarray,
                 first_tie: np.ndarray) -> tuple[float, float, int]:
    """``(max |Δ|, mean |Δ|, positions compared)`` over the positions before each row's first router tie."""
    delta = np.abs(onnx_logits.astype(np.float64) - torch_logits.detach().to(torch.float64).numpy()).max(axis=-1)
    keep = positions < first_tie[:, None]
    if not keep.any():
        return 0.0, 0.0, 0
    return float(delta[keep].max()), float(delta[keep].mean()), int(keep.sum())


def check_logits(decoder: OrtDecoder, model, prompts: torch.Tensor, decode_steps: int, atol: float,
                  dtype_name: str) -> tuple[list[dict], list[ParityFailure]]:
    """Prefill the prompts (one batch), then ``decode_steps`` greedy steps through each side's own cache. Positions
    from a prompt's first exact router tie on (:class:`RouterTies`) are not compared; a run where no prefill position
    is left fails (a router that ties everywhere, e.g. an untrained one, cannot be validated)."""
    batch, length = prompts.shape
    ids = prompts.numpy()
    mask = np.ones((batch, length), dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    with RouterTies(model, batch) as ties:
        onnx_logits, past = decoder(ids, mask, positions, decoder.empty_past(batch))
        torch_logits, cache = torch_step(model, ids, mask, positions, None)
        outputs = [(onnx_logits, torch_logits, positions)]
        for step in range(decode_steps):
            nxt = torch_logits[:, -1].float().argmax(-1).reshape(batch, 1).numpy()
            total = length + step + 1
            mask = np.ones((batch, total), dtype=np.int64)
            positions = np.full((batch, 1), total - 1, dtype=np.int64)
            onnx_logits, past = decoder(nxt, mask, positions, past)
            torch_logits, cache = torch_step(model, nxt, mask, positions, cache)
            outputs.append((onnx_logits, torch_logits, positions))
    rows, failures = [], []
    tolerance = f"{atol:.0e} absolute ({dtype_name})"
    for step, (onnx_logits, torch_logits, positions) in enumerate(outputs):
        name = "logits at prefill" if step == 0 else f"logits at decode step {step}"
        max_diff, mean_diff, compared = _masked_diff(onnx_logits, torch_logits, positions, ties.first)
        ok = bool(np.isfinite(max_diff) and max_diff <= atol) and (step > 0 or compared > 0)
        row = {"output": name, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "tolerance": atol, "passed": ok}
        if np.isfinite(ties.first).any():
            row["compared_positions"] = compared
        rows.append(row)
        if step == 0 and compared == 0:
            failures.append(ParityFailure(name, "no position compared (every prompt meets an exact router tie at "
                                          "its first token: an untrained router?)", "some position to compare"))
        elif not ok:
            failures.append(ParityFailure(name, f"max |Δ| {max_diff:.3g} (mean |Δ| {mean_diff:.3g})", tolerance,
                                          max_diff))
    if np.isfinite(ties.first).any():
        rows[0]["router_ties"] = [{"prompt": int(row), "position": int(position)}
                                  for row, position in enumerate(ties.first) if np.isfinite(position)]
    return rows, failures


def check_generation(decoder: OrtDecoder, model, prompts: torch.Tensor, new_tokens: int,
                      atol: float) -> tuple[dict, list[ParityFailure]]:
    """Greedy tokens of ORT and ``model.generate`` must agree, except at a *near tie*.

    A near tie: where the two first differ, PyTorch's logit of the token ONNX Runtime chose is within ``atol`` of
    PyTorch's top logit, i.e. the two choices are equally right within the logits tolerance (fp16 on small random
    models meets such ties). The rest of that prompt is not compared (the sequences have diverged); the prompt is
    reported as ``near_tie``, not as a failure.
    """
    eos = eos_ids(model)
    results, failures = [], []
    for index, prompt in enumerate(prompts):
        onnx_tokens = greedy_ort(decoder, prompt.numpy(), new_tokens, eos)
        with RouterTies(model, 1) as ties:
            torch_tokens, torch_logits = greedy_torch(model, prompt, new_tokens, eos)
        first = next((i for i, (a, b) in enumerate(zip(onnx_tokens, torch_tokens)) if a != b), None)
        if first is None and len(onnx_tokens) != len(torch_tokens):
            first = min(len(onnx_tokens), len(torch_tokens))
        result = {"prompt": index, "identical": first is None, "onnx": onnx_tokens, "torch": torch_tokens}
        results.append(result)
        if first is None:
            continue
        got = onnx_tokens[first] if first < len(onnx_tokens) else None
        want = torch_tokens[first] if first < len(torch_tokens) else None
        margin = None
        if got is not None and want is not None and first < len(torch_logits):
            step = torch_logits[first].double()
            margin = float(step[want] - step[got])
        result.update(first_difference=first, margin=margin)
        if margin is not None and margin <= atol:
            result["near_tie"] = True
            continue
        if ties.first[0] <= len(prompt) - 1 + first:  # an exact router tie at or before the token that differs
            result["router_tie"] = int(ties.first[0])
            continue
        by = f"new token {first} differs (ONNX {got if got is not None else 'end'}, " \
             f"PyTorch {want if want is not None else 'end'}"
        by += f"; PyTorch prefers its token by {margin:.3g} in logits)" if margin is not None else ")"
        failures.append(ParityFailure(f"generated tokens of prompt {index}", by,
                                      f"identical first {new_tokens} greedy tokens (or a near tie within {atol:.0e})"))
    summary = {"new_tokens": new_tokens, "prompts": len(results),
               "identical": sum(r["identical"] for r in results),
               "near_ties": sum(bool(r.get("near_tie")) for r in results),
               "router_ties": sum("router_tie" in r for r in results), "passed": not failures,
               "per_prompt": results}
    return summary, failures


# --- memory --------------------------------------------------------------------------------------------------------


def check_memory(decoder: OrtDecoder, model, baseline: Path | None, provider: str,
            tokens: int) -> tuple[dict, list[ParityFailure]]:
    """Weight bytes of the export against the lower bound (a failure above :data:`WEIGHT_BOUND`), and the session
    peak memory of the export and of the unpruned ``baseline`` (measurements, in child processes)."""
    from mone_export.export import lower_bound_bytes, weight_bytes
    from mone_export.onnx_utils import rotary_table_bytes

    weights = weight_bytes(decoder.path)
    # the fused attention's rotary tables: what the kernel reads instead of computing the angles from inv_freq
    tables = rotary_table_bytes(decoder.path)
    bound = lower_bound_bytes(model, TORCH_DTYPES[decoder.dtype_name]) + tables
    report = {"weight_bytes": weights, "lower_bound_bytes": bound, "rotary_table_bytes": tables,
              "weight_ratio_to_bound": weights / bound, "session": session_memory(decoder.path, provider, tokens)}
    if baseline is not None:
        report["unpruned_weight_bytes"] = weight_bytes(baseline)
        report["unpruned_session"] = session_memory(baseline, provider, tokens)
    failures = []
    if weights > WEIGHT_BOUND * bound:
        failures.append(ParityFailure("weight bytes of model.onnx", f"{weights} bytes = {weights / bound:.4f}× the "
                                      f"lower bound {bound}", f"{WEIGHT_BOUND}× the lower bound"))
    return report, failures


# --- entry point ----------------------------------------------------------------------------------------------------


def reference_model(model, dtype_name: str):
    """The PyTorch model in the export's dtype (a converted copy when it differs)."""
    target = TORCH_DTYPES[dtype_name]
    current = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if current == target:
        return model
    logger.info("comparing against a %s copy of the PyTorch model", dtype_name)
    return copy.deepcopy(model).to(target)


@dataclasses.dataclass(frozen=True)
class ValidationOptions:
    """What :func:`validate_export` checks and measures, and how."""

    provider: str = "cpu"
    """``cpu`` or ``cuda`` (a UsageError when this onnxruntime or machine cannot run CUDA)."""
    atol: float | None = None
    """Absolute tolerance on logits; default :data:`TOLERANCES` for the export's dtype. For float16, the floor of ε
    in the bound ``1.5 × PyTorch fp16's error + ε`` (:func:`mone_export.half_precision.epsilon`)."""
    prompts: Any = None
    """``[N, L]`` token ids, equal-length token-id lists, or texts (cut to the shortest); default
    :data:`~mone_export.prompts.DEFAULT_PROMPTS` held-out ``python-code`` chunks, or random ids without a tokenizer."""
    decode_steps: int = 4
    """Decode steps through the KV cache whose logits are compared after the prefill."""
    new_tokens: int = 32
    """Greedy tokens that must be identical for every prompt (0 skips the check)."""
    latency: bool = True
    """Measure prefill/decode medians (export, ``baseline_dir``'s unpruned export, PyTorch eager)."""
    memory: bool = True
    """Measure the session's peak memory in a child process."""
    baseline_dir: str | os.PathLike | None = None
    """The unpruned model's export, for the latency and memory comparison."""
    prefill_tokens: int = 128
    warmup: int = 2
    prefill_repeats: int = 5
    decode_repeats: int = 20


def validate_export(onnx_dir: str | os.PathLike, torch_model, options: ValidationOptions | None = None, *,
                    tokenizer=None, progress: bool = False, **overrides) -> dict:
    """Check an export against the pruned PyTorch model it came from (docs/validation.md) and return the report.

    Args:
        onnx_dir: the export folder (or its ``model.onnx``).
        torch_model: the pruned PyTorch model; compared in the export's dtype (a converted copy if needed). A
            float16 export is judged against its float32 version instead, with the float16 model as the yardstick
            (:mod:`mone_export.half_precision`).
        options: what to check and measure (:class:`ValidationOptions`); ``overrides`` replace single fields, e.g.
            ``validate_export(path, model, provider="cuda", latency=False)``.
        tokenizer: for the test prompts; default the tokenizer saved in ``onnx_dir``, if any.
        progress: log each stage at INFO level.

    Returns:
        ``{"passed", "failures" (list of ParityFailure dicts), "logits" (per output), "generation", "memory",
        "latency", "provider", "dtype", "atol", "prompts"}``, and for float16 ``"half_precision"`` (both errors,
        ε, the bound, greedy agreements, routing flips). Nothing is raised for a failed check; call
        :func:`raise_for_failures` for that.
    """
    options = dataclasses.replace(options or ValidationOptions(), **overrides)
    provider, atol, decode_steps, new_tokens = options.provider, options.atol, options.decode_steps, options.new_tokens
    log = logger.info if progress else logger.debug
    started = time.perf_counter()
    decoder = OrtDecoder(onnx_dir, provider)
    dtype_name = decoder.dtype_name
    atol = float(TOLERANCES.get(dtype_name, 1e-4) if atol is None else atol)
    if atol < 0:
        raise UsageError(f"--atol must be non-negative (got {atol}).")
    if decoder.num_layers != int(torch_model.config.num_hidden_layers):
        raise UsageError(f"{decoder.path} has {decoder.num_layers} cached layers but the PyTorch model has "
                         f"{torch_model.config.num_hidden_layers}; validate the export against its own model.")
    from mone_export.quantization import read_quantization

    quantized = read_quantization(decoder.path)
    half = dtype_name == "float16" or quantized is not None
    if half:
        from mone_export.half_precision import (
            HALF_PRECISION,
            check_half_generation,
            check_half_logits,
            float32_reference,
            quantized_yardstick,
        )

        reference = float32_reference(torch_model)  # what the export is judged against; ``model``: the yardstick
    if quantized is not None:
        from mone_export.quantization import dequantized_model

        kind = quantized_yardstick(f"int{quantized['bits']}")
        model = dequantized_model(reference, quantized)
    else:
        kind = HALF_PRECISION if half else None
        model = reference_model(torch_model, dtype_name)
    vocab = int(model.config.vocab_size)
    if tokenizer is None and Path(onnx_dir).is_dir():
        from mone_export.loading import load_tokenizer

        tokenizer = load_tokenizer(onnx_dir)
    if options.prompts is None:
        ids, source = make_prompts(tokenizer, vocab)
    else:
        ids, source = as_prompt_tensor(options.prompts, tokenizer, vocab)
    report: dict[str, Any] = {"onnx": str(decoder.path), "provider": provider, "dtype": dtype_name, "atol": atol,
                              "prompts": {"source": source, "count": int(ids.shape[0]), "tokens": int(ids.shape[1])}}
    failures: list[ParityFailure] = []
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    log("validating %s on %s: logits at prefill and %d decode steps", decoder.path, provider, decode_steps)
    if half:
        report["logits"], report[kind.section], found = check_half_logits(
            decoder.path, provider, reference, model, ids, decode_steps, atol, kind)
        if quantized is not None:
            report[kind.section]["weights"] = {key: value for key, value in quantized.items() if key != "weights"}
            report[kind.section]["weights"]["quantized"] = len(quantized["weights"])
    else:
        report["logits"], found = check_logits(decoder, model, ids, decode_steps, atol, dtype_name)
    failures += found
    lap("logits")
    if new_tokens > 0:
        log("greedy generation: %d prompts x %d new tokens", ids.shape[0], new_tokens)
        if half:
            report["generation"], found = check_half_generation(decoder, reference, model, ids, new_tokens,
                                                                report[kind.section]["bound"], kind)
            report[kind.section]["agreement"] = report["generation"]["agreement"]
        else:
            report["generation"], found = check_generation(decoder, model, ids, new_tokens, atol)
        failures += found
        lap("generation")
    baseline = model_file(options.baseline_dir) if options.baseline_dir is not None else None
    if options.memory:
        log("memory: weight bytes and session peak")
        report["memory"], found = check_memory(decoder, model, baseline, provider, options.prefill_tokens)
        failures += found
        lap("memory")
    if options.latency:
        log("latency: prefill %d tokens and decode, medians after %d warm-up runs", options.prefill_tokens,
            options.warmup)
        ids_latency = latency_ids(tokenizer, vocab, options.prefill_tokens)
        report["latency"] = compare_latency(decoder, model, baseline, ids_latency, provider, options.warmup,
                                            options.prefill_repeats, options.decode_repeats)
        lap("latency")
    report["failures"] = [f.to_dict() for f in failures]
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["seconds_per_check"] = seconds
    return report
