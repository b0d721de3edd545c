"""Peak memory of an ONNX Runtime session, measured in a child process: ``python -m mone_export.memory_probe``.

    python -m mone_export.memory_probe MODEL.onnx CPUExecutionProvider|CUDAExecutionProvider TOKENS THREADS

The child creates the session, runs a ``TOKENS`` prefill and one decode step, and prints one JSON line:

- CPU: ``session_peak_bytes``, the growth of the peak resident set (``VmHWM``) over the resident set before the
  session was created;
- CUDA: ``device_memory_bytes``, the free device memory per ``cudaMemGetInfo`` before the session (the CUDA context
  already made) minus after the decode step (ORT's arena keeps what it allocated, so this is the session's peak; the
  arena grows by what is requested, ``arena_extend_strategy=kSameAsRequested``),
  and ``device_bytes``, the child's GPU memory as ``nvidia-smi`` reports it (CUDA context included), where the
  machine reports it.

The child imports numpy and onnxruntime only (the package's ``__init__`` is lazy), so that its resident set
before the session is small and owes nothing to PyTorch. :func:`session_memory` runs it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

__all__ = ["measure", "session_memory"]

logger = logging.getLogger(__name__)


def _status(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return None


def _nvidia_smi_bytes() -> dict:
    try:
        query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=60).stdout
        used = [int(line.split(",")[1]) for line in query.splitlines() if line.split(",")[0].strip() == str(os.getpid())]
        return {"device_bytes": used[0] * 1024 * 1024 if used else None}
    except Exception as exc:  # noqa: BLE001 - a missing or failing nvidia-smi is a reading we report, not an error
        return {"device_bytes": None, "device_error": str(exc)}


def measure(path: str, provider: str, tokens: int, threads: int) -> dict:
    """Create a session on ``path``, prefill ``tokens`` tokens and decode one; return the memory readings."""
    import numpy as np
    import onnxruntime as ort

    from mone_export.io_binding import cuda_free_bytes

    cuda = provider == "CUDAExecutionProvider"
    free_before = cuda_free_bytes() if cuda else None
    rss_before = _status("VmRSS:")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # On CUDA the arena grows by what is asked, not by the next power of two, so the reading is what the session
    # needs rather than the arena's rounding (measured on an H200 with the default: 1.1 GB above the weights).
    providers = ([provider] if provider == "CPUExecutionProvider"
                 else [(provider, {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"])
    session = ort.InferenceSession(path, sess_options=options, providers=providers)
    rss_session = _status("VmRSS:")
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), dtype=types.get(value.type, np.float32))
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
    result = {"rss_before_session": rss_before, "rss_after_session": rss_session, "peak_rss": _status("VmHWM:")}
    result["session_peak_bytes"] = max(0, result["peak_rss"] - rss_before)
    if free_before is not None:
        free_after = cuda_free_bytes()
        result["device_memory_bytes"] = None if free_after is None else free_before - free_after
    if cuda:
        result.update(_nvidia_smi_bytes())
    return result


def session_memory(path, provider: str = "cpu", tokens: int = 128, threads: int | None = None) -> dict:
    """Peak memory of an ORT session (creation, a ``tokens`` prefill and one decode step) in a child process."""
    from mone_export.ort_session import check_provider, model_file, ort_threads

    file = model_file(path)
    name = check_provider(provider)
    command = [sys.executable, "-m", "mone_export.memory_probe", str(file), name, str(tokens),
               str(threads or ort_threads())]
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


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) != 4:
        sys.exit("usage: python -m mone_export.memory_probe MODEL.onnx PROVIDER TOKENS THREADS")
    print(json.dumps(measure(arguments[0], arguments[1], int(arguments[2]), int(arguments[3]))))
