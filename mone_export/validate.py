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
greedy agreement with float32 at least PyTorch fp16's, routing flips only at near ties).

Test prompts are fixed-length chunks of the held-out split of ``python-code`` (never calibration text), or seeded
random ids when there is no tokenizer. Every failed check is a :class:`ParityFailure` that names the output, the
difference and the tolerance; :func:`raise_for_failures` turns them into a :class:`~mone_export.errors.ParityError`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mone_export.errors import MoneError, ParityError, UsageError

__all__ = [
    "TOLERANCES",
    "WEIGHT_BOUND",
    "ParityFailure",
    "OrtDecoder",
    "validate_export",
    "raise_for_failures",
    "ort_providers",
    "make_prompts",
    "LatencyRunner",
    "ort_runner",
    "torch_runner",
    "measure_latencies",
    "measure_ort_latency",
    "measure_torch_latency",
    "session_memory",
]

logger = logging.getLogger(__name__)

TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
"""Absolute tolerance on logits per export dtype (fp32 1e-4; bf16 is our choice): docs/validation.md. For fp16 the
floor of ε in the bound ``1.5 × PyTorch fp16's error + ε`` against float32 (:mod:`mone_export.half_precision`)."""

WEIGHT_BOUND = 1.005
"""The export's weight bytes may exceed the pruned model's parameter bytes by at most 0.5 % (docs/graph.md)."""

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DTYPE_NAMES = {np.float32: "float32", np.float16: "float16", np.float64: "float64"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}

DECODE_BLOCK = 5
"""Decode steps timed back to back in one contestant's turn (see :func:`measure_latencies`)."""

MAX_MESSAGES = 3
"""Failed checks named in a ParityError's message (the report lists all)."""

DEFAULT_PROMPTS = 4
PROMPT_TOKENS = 24
PROMPT_SEED = 0


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


def ort_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA), "
                         "or pass --no-validate.") from None

    return list(ort.get_available_providers())


def _provider_name(provider: str) -> str:
    try:
        return PROVIDERS[provider]
    except KeyError:
        raise UsageError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}.") from None


def check_provider(provider: str) -> str:
    """The ORT provider name for ``cpu``/``cuda``; a UsageError when this onnxruntime lacks it."""
    name = _provider_name(provider)
    if name not in ort_providers():
        raise UsageError(
            f"--provider {provider}: this onnxruntime has no {name} (available: {', '.join(ort_providers())}); "
            "install onnxruntime-gpu in place of onnxruntime (see README) or use --provider cpu."
        )
    return name


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _with_outputs(path: Path, names: Sequence[str]) -> bytes:
    """The serialized model at ``path`` with the graph values ``names`` added as outputs (external data not read)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return proto.SerializeToString()


def create_session(path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                   extra_outputs: Sequence[str] = ()):
    """An ``InferenceSession`` on exactly ``provider`` (no silent CPU fallback for ``cuda``).

    ``extra_outputs`` names intermediate graph values to return as well (the session is built from a copy of the
    graph; external weights are still read from beside ``path``).
    """
    import onnxruntime as ort

    name = check_provider(provider)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _threads()
    options.log_severity_level = 3
    # No busy-waiting between runs: spinning ORT threads would steal the cores PyTorch is timed on (and other
    # processes'); every ORT figure of one report is measured the same way.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    model: str | bytes = str(path)
    if extra_outputs:
        model = _with_outputs(Path(path), extra_outputs)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(path).resolve().parent))
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise MoneError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}") from exc
    if session.get_providers()[0] != name:
        raise UsageError(f"--provider {provider}: ONNX Runtime could not start {name} (no usable GPU?); "
                         "use --provider cpu.")
    return session


def _model_file(path: str | os.PathLike) -> Path:
    from mone_export.export import MODEL_FILE

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path} holds no {MODEL_FILE}; pass the folder an export was written to.")
    return file


class OrtDecoder:
    """An exported decoder with KV cache in ONNX Runtime, called with numpy arrays.

    Reads the layout from the session: ``past_key_values.{i}.key|value [B, heads, P, dim]`` inputs and
    ``logits``/``present.{i}.key|value`` outputs (the names of docs/graph.md#names-and-shapes). ``extra_outputs``
    (intermediate values, e.g. the routing weights) come back from :meth:`run`.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 extra_outputs: Sequence[str] = ()):
        self.path = _model_file(path)
        self.provider = provider
        self.extra_outputs = list(extra_outputs)
        self.session = create_session(self.path, provider, threads, self.extra_outputs)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        if missing or "logits" not in outputs:
            raise MoneError(f"{self.path} is not a decoder with KV cache: missing {missing or ['logits']} "
                            "(expected the input and output names of docs/graph.md#names-and-shapes).")
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.output_names = ["logits", *self.present_names]
        self._past_dims = []
        for name in self.past_names:
            shape = inputs[name].shape
            if len(shape) != 4 or not all(isinstance(shape[d], int) for d in (1, 3)):
                raise MoneError(f"{self.path}: input {name} has shape {shape}; expected [batch, heads, past, dim].")
            self._past_dims.append((shape[1], shape[3]))
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        if logits_type not in ORT_DTYPES:
            raise UsageError(f"{self.path}: logits of type {logits_type} cannot be validated with numpy; "
                             "validate an fp32 or fp16 export.")
        self.dtype = ORT_DTYPES[logits_type]
        past_type = inputs[self.past_names[0]].type if self.past_names else logits_type
        self.past_dtype = ORT_DTYPES.get(past_type, self.dtype)

    @property
    def dtype_name(self) -> str:
        """``float32`` or ``float16``."""
        return DTYPE_NAMES[self.dtype]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors for a prefill of ``batch`` sequences."""
        return [np.zeros((batch, heads, 0, dim), dtype=self.past_dtype) for heads, dim in self._past_dims]

    def __call__(self, input_ids, attention_mask, position_ids, past: Sequence[np.ndarray]):
        """``(logits, present)`` for numpy int64 inputs and the past list."""
        logits, present, _ = self.run(input_ids, attention_mask, position_ids, past)
        return logits, present

    def run(self, input_ids, attention_mask, position_ids, past: Sequence[np.ndarray]):
        """``(logits, present, extras)``: :meth:`__call__` plus ``{name: array}`` of the ``extra_outputs``."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feeds.update(zip(self.past_names, past))
        try:
            outputs = self.session.run(self.output_names + self.extra_outputs, feeds)
        except Exception as exc:
            raise MoneError(f"ONNX Runtime failed to run {self.path} on {self.provider}: "
                            f"{str(exc).splitlines()[0]}") from exc
        count = len(self.output_names)
        return outputs[0], outputs[1:count], dict(zip(self.extra_outputs, outputs[count:]))


# --- PyTorch side ---------------------------------------------------------------------------------------------------


def _torch_step(model, input_ids, attention_mask, position_ids, cache):
    """One forward of the PyTorch model through its own cache: ``(logits, cache)``."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                    position_ids=torch.as_tensor(position_ids), cache=cache, use_cache=True,
                    return_dict=True)
    return out.logits, out.cache


def _eos_ids(model) -> set[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _greedy_torch(model, prompt: torch.Tensor, new_tokens: int, eos: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """``model.generate(do_sample=False)``: the new tokens and the raw logits of each step."""
    from transformers import GenerationConfig

    vocab = int(model.config.vocab_size)
    eos_list = sorted(e for e in eos if 0 <= e < vocab) or None
    pad = eos_list[0] if eos_list else 0
    # Explicit values: generate() fills unset fields from the model's own generation config.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=0,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos_list,
                              pad_token_id=pad, use_cache=True, output_logits=True, return_dict_in_generate=True)
    ids = prompt.reshape(1, -1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out.sequences[0, ids.shape[1]:]], [step[0] for step in out.logits]


def _greedy_ort(decoder: OrtDecoder, prompt: np.ndarray, new_tokens: int, eos: set[int]) -> list[int]:
    ids = prompt.reshape(1, -1).astype(np.int64)
    length = ids.shape[1]
    logits, past = decoder(ids, np.ones_like(ids), np.arange(length, dtype=np.int64)[None], decoder.empty_past(1))
    tokens: list[int] = []
    while True:
        token = int(np.argmax(logits[0, -1]))
        tokens.append(token)
        if len(tokens) >= new_tokens or token in eos:
            return tokens
        total = length + len(tokens)
        logits, past = decoder(np.array([[token]]), np.ones((1, total), dtype=np.int64),
                               np.array([[total - 1]]), past)


# --- prompts --------------------------------------------------------------------------------------------------------


def make_prompts(tokenizer, vocab_size: int, num: int = DEFAULT_PROMPTS, length: int = PROMPT_TOKENS,
                 seed: int = PROMPT_SEED) -> tuple[torch.Tensor, str]:
    """``([num, length] int64 ids, source)``: held-out ``python-code`` chunks, or seeded random ids.

    Random ids are used when there is no tokenizer, or when the tokenizer's ids do not fit the model's vocabulary.
    """
    from mone_export.calibration import calibration_batches

    if tokenizer is not None:
        try:
            batches = calibration_batches("python-code", tokenizer, num_samples=num, seq_len=length, seed=seed,
                                          batch_size=num, split="heldout")
            ids = torch.cat(batches)
            if int(ids.max()) < vocab_size:
                return ids, "python-code (held-out split)"
            logger.info("tokenizer ids exceed the model's vocabulary; using random prompts")
        except MoneError as exc:
            logger.info("no held-out prompts (%s); using random prompts", exc)
    batches = calibration_batches("random", None, num_samples=num, seq_len=length, seed=seed, batch_size=num,
                                  vocab_size=vocab_size)
    return torch.cat(batches), "random ids"


def _as_prompt_tensor(prompts, tokenizer, vocab_size: int) -> tuple[torch.Tensor, str]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts.reshape(-1, prompts.shape[-1]).long()
    elif prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise UsageError("text prompts need a tokenizer; pass token ids instead.")
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        length = min(len(e) for e in encoded)
        if length < 1:
            raise UsageError("a prompt encodes to no tokens.")
        ids = torch.tensor([e[:length] for e in encoded], dtype=torch.long)  # equal lengths: no padding
    else:
        rows = [list(map(int, p)) for p in prompts]
        if len({len(r) for r in rows}) != 1:
            raise UsageError("token-id prompts must all have the same length.")
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.numel() == 0 or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise UsageError(f"prompt token ids must be in [0, {vocab_size}).")
    return ids, "given"


# --- checks ---------------------------------------------------------------------------------------------------------


def _diff(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> tuple[float, float]:
    reference = torch_logits.detach().to(torch.float64).numpy()
    delta = np.abs(onnx_logits.astype(np.float64) - reference)
    return float(delta.max()), float(delta.mean())


def _check_logits(decoder: OrtDecoder, model, prompts: torch.Tensor, decode_steps: int, atol: float,
                  dtype_name: str) -> tuple[list[dict], list[ParityFailure]]:
    """Prefill the prompts (one batch), then ``decode_steps`` greedy steps through each side's own cache."""
    batch, length = prompts.shape
    ids = prompts.numpy()
    mask = np.ones((batch, length), dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    onnx_logits, past = decoder(ids, mask, positions, decoder.empty_past(batch))
    torch_logits, cache = _torch_step(model, ids, mask, positions, None)
    rows, failures = [], []
    tolerance = f"{atol:.0e} absolute ({dtype_name})"
    for step in range(decode_steps + 1):
        name = "logits at prefill" if step == 0 else f"logits at decode step {step}"
        max_diff, mean_diff = _diff(onnx_logits, torch_logits)
        ok = bool(np.isfinite(max_diff) and max_diff <= atol)
        rows.append({"output": name, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "tolerance": atol,
                     "passed": ok})
        if not ok:
            failures.append(ParityFailure(name, f"max |Δ| {max_diff:.3g} (mean |Δ| {mean_diff:.3g})", tolerance,
                                          max_diff))
        if step == decode_steps:
            break
        nxt = torch_logits[:, -1].float().argmax(-1).reshape(batch, 1).numpy()
        total = length + step + 1
        mask = np.ones((batch, total), dtype=np.int64)
        positions = np.full((batch, 1), total - 1, dtype=np.int64)
        onnx_logits, past = decoder(nxt, mask, positions, past)
        torch_logits, cache = _torch_step(model, nxt, mask, positions, cache)
    return rows, failures


def _check_generation(decoder: OrtDecoder, model, prompts: torch.Tensor, new_tokens: int,
                      atol: float) -> tuple[dict, list[ParityFailure]]:
    """Greedy tokens of ORT and ``model.generate`` must agree, except at a *near tie*.

    A near tie: where the two first differ, PyTorch's logit of the token ONNX Runtime chose is within ``atol`` of
    PyTorch's top logit, i.e. the two choices are equally right within the logits tolerance (fp16 on small random
    models meets such ties). The rest of that prompt is not compared (the sequences have diverged); the prompt is
    reported as ``near_tie``, not as a failure.
    """
    eos = _eos_ids(model)
    results, failures = [], []
    for index, prompt in enumerate(prompts):
        onnx_tokens = _greedy_ort(decoder, prompt.numpy(), new_tokens, eos)
        torch_tokens, torch_logits = _greedy_torch(model, prompt, new_tokens, eos)
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
        by = f"new token {first} differs (ONNX {got if got is not None else 'end'}, " \
             f"PyTorch {want if want is not None else 'end'}"
        by += f"; PyTorch prefers its token by {margin:.3g} in logits)" if margin is not None else ")"
        failures.append(ParityFailure(f"generated tokens of prompt {index}", by,
                                      f"identical first {new_tokens} greedy tokens (or a near tie within {atol:.0e})"))
    summary = {"new_tokens": new_tokens, "prompts": len(results),
               "identical": sum(r["identical"] for r in results),
               "near_ties": sum(bool(r.get("near_tie")) for r in results), "passed": not failures,
               "per_prompt": results}
    return summary, failures


# --- memory ---------------------------------------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import json, os, subprocess, sys
import numpy as np
import onnxruntime as ort

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return None

path, provider, tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def cuda_free():
    import ctypes
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        return int(free.value) if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0 else None
    return None

free_before = cuda_free() if provider == "CUDAExecutionProvider" else None
rss_before = status("VmRSS:")
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.log_severity_level = 3
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
session = ort.InferenceSession(path, sess_options=options, providers=providers)
rss_session = status("VmRSS:")
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
feeds = {}
for i in session.get_inputs():
    if i.name.startswith("past_key_values."):
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=types.get(i.type, np.float32))
feeds["input_ids"] = np.zeros((1, tokens), dtype=np.int64)
feeds["attention_mask"] = np.ones((1, tokens), dtype=np.int64)
feeds["position_ids"] = np.arange(tokens, dtype=np.int64)[None]
names = [o.name for o in session.get_outputs()]
out = dict(zip(names, session.run(None, feeds)))
for name in list(feeds):
    if name.startswith("past_key_values."):
        feeds[name] = out["present." + name[len("past_key_values."):]]
feeds["input_ids"] = np.zeros((1, 1), dtype=np.int64)
feeds["attention_mask"] = np.ones((1, tokens + 1), dtype=np.int64)
feeds["position_ids"] = np.array([[tokens]], dtype=np.int64)
session.run(None, feeds)
result = {"rss_before_session": rss_before, "rss_after_session": rss_session, "peak_rss": status("VmHWM:")}
result["session_peak_bytes"] = max(0, result["peak_rss"] - rss_before)
if free_before is not None:
    free_after = cuda_free()
    # ORT's arena keeps what it allocated, so after the prefill and the decode step this is the session's peak.
    result["device_memory_bytes"] = None if free_after is None else free_before - free_after
if provider == "CUDAExecutionProvider":
    try:
        query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=60).stdout
        used = [int(l.split(",")[1]) for l in query.splitlines() if l.split(",")[0].strip() == str(os.getpid())]
        result["device_bytes"] = used[0] * 1024 * 1024 if used else None
    except Exception as exc:
        result["device_bytes"] = None
        result["device_error"] = str(exc)
print(json.dumps(result))
"""


def session_memory(path: str | os.PathLike, provider: str = "cpu", tokens: int = 128,
                   threads: int | None = None) -> dict:
    """Peak memory of an ORT session (creation, a ``tokens`` prefill and one decode step) in a child process."""
    file = _model_file(path)
    name = check_provider(provider)
    command = [sys.executable, "-c", _MEMORY_PROBE, str(file), name, str(tokens), str(threads or _threads())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1])
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # a measurement, not a check: report why it is missing
        logger.warning("session memory of %s not measured: %s", file, exc)
        return {"error": str(exc)}
    how = "VmHWM growth over VmRSS before the session, in a child process"
    if name == "CUDAExecutionProvider":
        how += ("; device_memory_bytes: cudaMemGetInfo's free memory before the session (CUDA context already made) "
                "minus after the prefill and decode step (ORT's arena keeps its peak); device_bytes: the child's GPU "
                "memory per nvidia-smi (CUDA context included)")
    return {**result, "method": how}


def _memory(decoder: OrtDecoder, model, baseline: Path | None, provider: str,
            tokens: int) -> tuple[dict, list[ParityFailure]]:
    from mone_export.export import lower_bound_bytes, weight_bytes

    weights = weight_bytes(decoder.path)
    bound = lower_bound_bytes(model, TORCH_DTYPES[decoder.dtype_name])
    report = {"weight_bytes": weights, "lower_bound_bytes": bound, "weight_ratio_to_bound": weights / bound,
              "session": session_memory(decoder.path, provider, tokens)}
    if baseline is not None:
        report["unpruned_weight_bytes"] = weight_bytes(baseline)
        report["unpruned_session"] = session_memory(baseline, provider, tokens)
    failures = []
    if weights > WEIGHT_BOUND * bound:
        failures.append(ParityFailure("weight bytes of model.onnx", f"{weights} bytes = {weights / bound:.4f}× the "
                                      f"lower bound {bound}", f"{WEIGHT_BOUND}× the lower bound"))
    return report, failures


# --- latency --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatencyRunner:
    """What one latency contestant runs: a prefill, a one-token decode after it, and a reset before each decode."""

    prefill: Callable[[], Any]
    decode: Callable[[], Any]
    reset: Callable[[], Any] | None = None


def ort_runner(decoder: OrtDecoder, ids: np.ndarray, io_binding: bool | None = None) -> LatencyRunner:
    """Prefill of ``ids [1, T]`` and a decode step with a past of T in ONNX Runtime.

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
    logits, past = decoder(ids, mask, positions, empty)
    nxt = np.array([[int(np.argmax(logits[0, -1]))]])
    mask1, pos1 = np.ones((1, tokens + 1), dtype=np.int64), np.array([[tokens]])
    return LatencyRunner(prefill=lambda: decoder(ids, mask, positions, empty),
                         decode=lambda: decoder(nxt, mask1, pos1, past))


def torch_runner(model, ids: np.ndarray) -> LatencyRunner:
    """The PyTorch eager counterpart of :func:`ort_runner` (the model's own forward and ``DynamicCache``), on the
    model's device (a CUDA model is timed with the stream synchronised after every call)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return _cuda_torch_runner(model, ids)
    tokens = ids.shape[1]
    mask = np.ones((1, tokens), dtype=np.int64)
    positions = np.arange(tokens, dtype=np.int64)[None]
    logits, cache = _torch_step(model, ids, mask, positions, None)
    nxt = logits[:, -1].float().argmax(-1).reshape(1, 1).numpy()
    mask1, pos1 = np.ones((1, tokens + 1), dtype=np.int64), np.array([[tokens]])

    def reset():  # drop the decoded position so that every timed step sees a past of ``tokens``
        extra = cache.get_seq_length() - tokens
        if extra > 0:
            cache.crop(-extra)

    return LatencyRunner(prefill=lambda: _torch_step(model, ids, mask, positions, None),
                         decode=lambda: _torch_step(model, nxt, mask1, pos1, cache), reset=reset)


def _cuda_torch_runner(model, ids: np.ndarray) -> LatencyRunner:
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

    first = step(prompt, mask, positions, None)
    cache, nxt = first.cache, first.logits[:, -1].argmax(-1, keepdim=True)

    def reset():
        extra = cache.get_seq_length() - tokens
        if extra > 0:
            cache.crop(-extra)

    return LatencyRunner(prefill=lambda: step(prompt, mask, positions, None),
                         decode=lambda: step(nxt, mask1, pos1, cache), reset=reset)


def measure_latencies(runners: dict[str, LatencyRunner], warmup: int = 2, prefill_repeats: int = 5,
                      decode_repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median prefill and per-token decode times (ms) of every runner, measured interleaved.

    The contestants take turns, round by round, so that a change of machine load during the run affects all of them
    alike (the ratios stay meaningful on a shared machine). In its turn a contestant first runs once untimed (its
    threads and caches settle, the previous contestant's idle threads stop spinning), then runs timed: one prefill,
    or a block of :data:`DECODE_BLOCK` decode steps (steady state, as in a generation loop). The first ``warmup``
    rounds are not counted; ``prefill_repeats`` / ``decode_repeats`` timed runs of each contestant are.
    """
    times = {name: {"prefill": [], "decode": []} for name in runners}
    for phase, repeats, block in (("prefill", prefill_repeats, 1), ("decode", decode_repeats, DECODE_BLOCK)):
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
    return {name: {"prefill_ms": statistics.median(t["prefill"]) * 1e3,
                   "decode_ms_per_token": statistics.median(t["decode"]) * 1e3} for name, t in times.items()}


def measure_ort_latency(decoder: OrtDecoder, ids: np.ndarray, warmup: int = 2, prefill_repeats: int = 5,
                        decode_repeats: int = 20) -> dict:
    """Median prefill time of ``ids [1, T]`` and per-token decode time after it (past of T), in milliseconds."""
    return measure_latencies({"x": ort_runner(decoder, ids)}, warmup, prefill_repeats, decode_repeats)["x"]


def measure_torch_latency(model, ids: np.ndarray, warmup: int = 2, prefill_repeats: int = 5,
                          decode_repeats: int = 20) -> dict:
    """PyTorch eager counterpart of :func:`measure_ort_latency`."""
    return measure_latencies({"x": torch_runner(model, ids)}, warmup, prefill_repeats, decode_repeats)["x"]


def _latency_ids(tokenizer, vocab_size: int, tokens: int) -> np.ndarray:
    ids, _ = make_prompts(tokenizer, vocab_size, num=1, length=tokens, seed=PROMPT_SEED + 1)
    return ids.numpy()


def _latency(decoder: OrtDecoder, model, baseline: Path | None, ids: np.ndarray, provider: str, warmup: int,
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
            "decode_repeats": decode_repeats, "threads": _threads(), "ort_spinning": False, "provider": provider,
            "io_binding": provider == "cuda", "pytorch_device": "cuda" if on_gpu else "cpu",
            **runs,
            "ratios": ratios}


# --- entry point ----------------------------------------------------------------------------------------------------


def _reference_model(model, dtype_name: str):
    """The PyTorch model in the export's dtype (a converted copy when it differs)."""
    target = TORCH_DTYPES[dtype_name]
    current = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if current == target:
        return model
    logger.info("comparing against a %s copy of the PyTorch model", dtype_name)
    return copy.deepcopy(model).to(target)


def validate_export(
    onnx_dir: str | os.PathLike,
    torch_model,
    *,
    provider: str = "cpu",
    atol: float | None = None,
    prompts=None,
    decode_steps: int = 4,
    new_tokens: int = 32,
    latency: bool = True,
    baseline_dir: str | os.PathLike | None = None,
    tokenizer=None,
    memory: bool = True,
    prefill_tokens: int = 128,
    warmup: int = 2,
    prefill_repeats: int = 5,
    decode_repeats: int = 20,
    progress: bool = False,
) -> dict:
    """Check an export against the pruned PyTorch model it came from (docs/validation.md) and return the report.

    Args:
        onnx_dir: the export folder (or its ``model.onnx``).
        torch_model: the pruned PyTorch model; compared in the export's dtype (a converted copy if needed). A
            float16 export is judged against its float32 version instead, with the float16 model as the yardstick
            (:mod:`mone_export.half_precision`).
        provider: ``cpu`` or ``cuda`` (a UsageError when this onnxruntime or machine cannot run CUDA).
        atol: absolute tolerance on logits; default :data:`TOLERANCES` for the export's dtype. For float16, the
            floor of ε in the bound ``1.5 × PyTorch fp16's error + ε`` (:func:`mone_export.half_precision.epsilon`).
        prompts: ``[N, L]`` token ids, equal-length token-id lists, or texts (cut to the shortest); default
            :data:`DEFAULT_PROMPTS` held-out ``python-code`` chunks of :data:`PROMPT_TOKENS` tokens, or random ids
            without a tokenizer.
        decode_steps: decode steps through the KV cache whose logits are compared after the prefill.
        new_tokens: greedy tokens that must be identical for every prompt (0 skips the check).
        latency: measure prefill/decode medians (export, ``baseline_dir``'s unpruned export, PyTorch eager).
        baseline_dir: the unpruned model's export, for the latency and memory comparison.
        tokenizer: for the test prompts; default the tokenizer saved in ``onnx_dir``, if any.
        memory: measure the session's peak memory in a child process.
        prefill_tokens, warmup, prefill_repeats, decode_repeats: the latency measurement.
        progress: log each stage at INFO level.

    Returns:
        ``{"passed", "failures" (list of ParityFailure dicts), "logits" (per output), "generation", "memory",
        "latency", "provider", "dtype", "atol", "prompts"}``, and for float16 ``"half_precision"`` (both errors,
        ε, the bound, greedy agreements, routing flips). Nothing is raised for a failed check; call
        :func:`raise_for_failures` for that.
    """
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
    half = dtype_name == "float16"
    if half:
        from mone_export.half_precision import check_half_generation, check_half_logits, float32_reference

        reference = float32_reference(torch_model)  # what an fp16 export is judged against; ``model``: the yardstick
    model = _reference_model(torch_model, dtype_name)
    vocab = int(model.config.vocab_size)
    if tokenizer is None and Path(onnx_dir).is_dir():
        from mone_export.loading import _load_tokenizer

        tokenizer = _load_tokenizer(Path(onnx_dir))
    if prompts is None:
        ids, source = make_prompts(tokenizer, vocab)
    else:
        ids, source = _as_prompt_tensor(prompts, tokenizer, vocab)
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
        report["logits"], report["half_precision"], found = check_half_logits(
            decoder.path, provider, reference, model, ids, decode_steps, atol)
    else:
        report["logits"], found = _check_logits(decoder, model, ids, decode_steps, atol, dtype_name)
    failures += found
    lap("logits")
    if new_tokens > 0:
        log("greedy generation: %d prompts x %d new tokens", ids.shape[0], new_tokens)
        if half:
            report["generation"], found = check_half_generation(decoder, reference, model, ids, new_tokens,
                                                                report["half_precision"]["bound"])
            report["half_precision"]["agreement"] = report["generation"]["agreement"]
        else:
            report["generation"], found = _check_generation(decoder, model, ids, new_tokens, atol)
        failures += found
        lap("generation")
    baseline = _model_file(baseline_dir) if baseline_dir is not None else None
    if memory:
        log("memory: weight bytes and session peak")
        report["memory"], found = _memory(decoder, model, baseline, provider, prefill_tokens)
        failures += found
        lap("memory")
    if latency:
        log("latency: prefill %d tokens and decode, medians after %d warm-up runs", prefill_tokens, warmup)
        ids_latency = _latency_ids(tokenizer, vocab, prefill_tokens)
        report["latency"] = _latency(decoder, model, baseline, ids_latency, provider, warmup, prefill_repeats,
                                     decode_repeats)
        lap("latency")
    report["failures"] = [f.to_dict() for f in failures]
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["seconds_per_check"] = seconds
    return report
