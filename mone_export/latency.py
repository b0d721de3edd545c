"""Latency of an export against the unpruned export and PyTorch eager: prefill and per-token decode medians."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mone_export.ort_session import OrtDecoder, ort_threads
from mone_export.reference import torch_step

__all__ = ["DECODE_BLOCK", "DECODE_TOKENS", "LatencyRunner", "compare_latency", "cuda_torch_runner", "decode_tokens",
           "measure_latencies", "measure_ort_latency", "measure_torch_latency", "ort_runner", "torch_runner"]

DECODE_BLOCK = 5
"""Decode steps timed back to back in one contestant's turn (see :func:`measure_latencies`)."""


DECODE_TOKENS = 8
"""Distinct tokens the timed decode steps cycle through. With novices the cost of a step depends on its token's
routing (a token routed to novices runs no expert product; measured on a 640M Qwen3-MoE MoNE 0.5 int4 export,
4.9-6.9 ms per step across 12 tokens), so one token's time is a sample of one."""


def decode_tokens(ids: np.ndarray) -> list[np.ndarray]:
    """The ``[B, 1]`` next-token inputs the decode steps cycle through: the prompt's first :data:`DECODE_TOKENS`
    columns (real ids of the vocabulary, deterministic)."""
    ids = np.asarray(ids, dtype=np.int64)
    return [ids[:, column:column + 1].copy() for column in range(min(DECODE_TOKENS, ids.shape[1]))]


@dataclasses.dataclass
class LatencyRunner:
    """What one latency contestant runs: a prefill, a one-token decode after it, and a reset before each decode."""

    prefill: Callable[[], Any]
    decode: Callable[[], Any]
    reset: Callable[[], Any] | None = None


def ort_runner(decoder: OrtDecoder, ids: np.ndarray, io_binding: bool | None = None) -> LatencyRunner:
    """Prefill of ``ids [1, T]`` and a decode step with a past of T in ONNX Runtime (successive steps cycle through
    :func:`decode_tokens`).

    With ``io_binding`` (default: on the CUDA provider) inputs, outputs and the KV cache stay bound on the device
    (:func:`mone_export.io_binding.bound_runner`), as a GPU application runs it; otherwise numpy in and out.
    """
    if io_binding if io_binding is not None else decoder.provider == "cuda":
        from mone_export.io_binding import bound_runner

        return bound_runner(decoder, ids)
    tokens = ids.shape[1]
    mask = np.ones((1, tokens), dtype=np.int64)
    positions = np.arange(tokens, dtype=np.int64)[None]
    empty = decoder.empty_past(1)
    _, past = decoder(ids, mask, positions, empty)
    nexts = itertools.cycle(decode_tokens(ids))
    mask1, pos1 = np.ones((1, tokens + 1), dtype=np.int64), np.array([[tokens]])
    return LatencyRunner(prefill=lambda: decoder(ids, mask, positions, empty),
                         decode=lambda: decoder(next(nexts), mask1, pos1, past))


def torch_runner(model, ids: np.ndarray) -> LatencyRunner:
    """The PyTorch eager counterpart of :func:`ort_runner` (the model's own forward and ``DynamicCache``), on the
    model's device (a CUDA model is timed with the stream synchronised after every call)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return cuda_torch_runner(model, ids)
    tokens = ids.shape[1]
    mask = np.ones((1, tokens), dtype=np.int64)
    positions = np.arange(tokens, dtype=np.int64)[None]
    _, prefilled = torch_step(model, ids, mask, positions, None)
    nexts = itertools.cycle(decode_tokens(ids))
    mask1, pos1 = np.ones((1, tokens + 1), dtype=np.int64), np.array([[tokens]])
    state = {"cache": copy.deepcopy(prefilled)}

    def reset():  # every timed step sees a past of ``tokens``: a fresh copy of the prefilled cache (a copy, not
        # ``crop``, which a sliding-window layer past its window cannot undo: gpt-oss)
        state["cache"] = copy.deepcopy(prefilled)

    return LatencyRunner(prefill=lambda: torch_step(model, ids, mask, positions, None),
                         decode=lambda: torch_step(model, next(nexts), mask1, pos1, state["cache"]), reset=reset)


def cuda_torch_runner(model, ids: np.ndarray) -> LatencyRunner:
    """:func:`torch_runner` for a model on a CUDA device: inputs on the device, synchronised after every call."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    batch, tokens = ids.shape
    prompt = torch.as_tensor(ids, device=device)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    positions = torch.arange(tokens, device=device).expand(batch, tokens)
    mask1 = torch.ones(batch, tokens + 1, dtype=torch.long, device=device)
    pos1 = torch.full((batch, 1), tokens, dtype=torch.long, device=device)

    def step(input_ids, attention_mask, position_ids, cache):
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache if cache is not None else DynamicCache(config=model.config), use_cache=True,
                        return_dict=True)
        torch.cuda.synchronize(device)
        return out

    cache = step(prompt, mask, positions, None).cache
    nexts = itertools.cycle([torch.as_tensor(t, device=device) for t in decode_tokens(ids)])

    def reset():
        extra = cache.get_seq_length() - tokens
        if extra > 0:
            cache.crop(-extra)

    return LatencyRunner(prefill=lambda: step(prompt, mask, positions, None),
                         decode=lambda: step(next(nexts), mask1, pos1, cache), reset=reset)


def measure_latencies(runners: dict[str, LatencyRunner], warmup: int = 2, prefill_repeats: int = 5,
                      decode_repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median prefill and per-token decode times (ms) of every runner, measured interleaved.

    The contestants take turns, round by round, so that a change of machine load during the run affects all of them
    alike (the ratios stay meaningful on a shared machine). In its turn a contestant first runs once untimed (its
    threads and caches settle, the previous contestant's idle threads stop spinning), then runs timed: one prefill,
    or a block of :data:`DECODE_BLOCK` decode steps (steady state, as in a generation loop). The first ``warmup``
    rounds are not counted; ``prefill_repeats`` / ``decode_repeats`` timed runs of each contestant are (0 skips the
    phase: its median is None).
    """
    times = {name: {"prefill": [], "decode": []} for name in runners}
    for phase, repeats, block in (("prefill", prefill_repeats, 1), ("decode", decode_repeats, DECODE_BLOCK)):
        if repeats == 0:  # a phase not asked for (its median is None)
            continue
        rounds = warmup + -(-repeats // block)
        for round_ in range(rounds):
            for name, runner in runners.items():
                run = getattr(runner, phase)
                for timed in [False] + [True] * block:
                    if phase == "decode" and runner.reset is not None:
                        runner.reset()
                    start = time.perf_counter()
                    run()
                    elapsed = time.perf_counter() - start
                    if timed and round_ >= warmup and len(times[name][phase]) < repeats:
                        times[name][phase].append(elapsed)
    def median_ms(values: list[float]) -> float | None:
        return statistics.median(values) * 1e3 if values else None

    return {name: {"prefill_ms": median_ms(t["prefill"]), "decode_ms_per_token": median_ms(t["decode"])}
            for name, t in times.items()}


def measure_ort_latency(decoder: OrtDecoder, ids: np.ndarray, warmup: int = 2, prefill_repeats: int = 5,
                        decode_repeats: int = 20) -> dict:
    """Median prefill time of ``ids [1, T]`` and per-token decode time after it (past of T), in milliseconds."""
    return measure_latencies({"x": ort_runner(decoder, ids)}, warmup, prefill_repeats, decode_repeats)["x"]


def measure_torch_latency(model, ids: np.ndarray, warmup: int = 2, prefill_repeats: int = 5,
                          decode_repeats: int = 20) -> dict:
    """PyTorch eager counterpart of :func:`measure_ort_latency`."""
    return measure_latencies({"x": torch_runner(model, ids)}, warmup, prefill_repeats, decode_repeats)["x"]


def compare_latency(decoder: OrtDecoder, model, baseline: Path | None, ids: np.ndarray, provider: str, warmup: int,
             prefill_repeats: int, decode_repeats: int) -> dict:
    """Medians for the export, the unpruned export and PyTorch eager, measured interleaved in this process."""
    runners = {"onnx": ort_runner(decoder, ids)}
    if baseline is not None:
        runners["onnx_unpruned"] = ort_runner(OrtDecoder(baseline, provider), ids)
    on_gpu = provider == "cuda" and torch.cuda.is_available()
    # On the CUDA provider ONNX Runtime is compared with PyTorch eager on the same GPU, not with the CPU model.
    runners["pytorch"] = torch_runner(copy.deepcopy(model).to("cuda") if on_gpu else model, ids)
    runs = measure_latencies(runners, warmup, prefill_repeats, decode_repeats)
    del runners
    ratios = {}
    for other in ("onnx_unpruned", "pytorch"):
        if other in runs:
            for key in ("prefill_ms", "decode_ms_per_token"):
                ratios[f"{key.split('_')[0]}_onnx_vs_{other}"] = runs["onnx"][key] / runs[other][key]
    return {"prefill_tokens": int(ids.shape[1]), "warmup": warmup, "prefill_repeats": prefill_repeats,
            "decode_repeats": decode_repeats, "threads": ort_threads(), "ort_spinning": False, "provider": provider,
            "io_binding": provider == "cuda", "pytorch_device": "cuda" if on_gpu else "cpu",
            **runs,
            "ratios": ratios}
