"""Running an exported decoder with ONNX Runtime IO binding: inputs, outputs and the KV cache stay on the device.

``session.run`` with numpy arrays copies every input to the device and every output (logits and the whole KV cache)
back to the host at every step; on the CUDA provider that is the cost of the cache itself, twice per token. With IO
binding the past tensors of step n+1 are the ``present`` OrtValues of step n, left where ONNX Runtime wrote them;
only the few int64 ids, mask and positions travel to the device per step. The same code runs on the CPU provider
(device ``cpu``), which is how it is tested without a GPU.

CUDA graph capture (``enable_cuda_graph``) needs every input and output at a fixed address with a fixed shape; the
exported graph returns ``present`` as a new, longer tensor at every step (docs/graph.md: no shared past/present
buffer), so it cannot be captured, and this module does not ask for it.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Sequence

import numpy as np

__all__ = ["BoundDecoder", "bound_runner", "cuda_free_bytes"]

logger = logging.getLogger(__name__)

DEVICES = {"cpu": "cpu", "cuda": "cuda"}


class BoundDecoder:
    """An :class:`~mone_export.ort_session.OrtDecoder` run through IO binding on its provider's device.

    :meth:`step` takes and returns OrtValues for the cache, so a decode loop never copies the cache to the host;
    :meth:`logits` copies only the logits a caller asks for.
    """

    def __init__(self, decoder):
        import onnxruntime as ort

        self.decoder = decoder
        self.device = DEVICES[decoder.provider]
        self._ort = ort

    def value(self, array: np.ndarray):
        """``array`` as an OrtValue on the device."""
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty_past(self, batch: int) -> list:
        """Zero-length past OrtValues on the device for a prefill of ``batch`` sequences."""
        return [self.value(array) for array in self.decoder.empty_past(batch)]

    def step(self, input_ids, attention_mask, position_ids, past: Sequence) -> tuple[object, list]:
        """One run: ``(logits OrtValue, present OrtValues)``, all left on the device. ``input_ids``, ``attention_mask``
        and ``position_ids`` are int64 numpy arrays or OrtValues; ``past`` OrtValues (e.g. the previous ``present``)."""
        session = self.decoder.session
        binding = session.io_binding()
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("position_ids", position_ids)):
            binding.bind_ortvalue_input(name, array if isinstance(array, self._ort.OrtValue)
                                        else self.value(np.asarray(array, dtype=np.int64)))
        for name, value in zip(self.decoder.past_names, past):
            binding.bind_ortvalue_input(name, value)
        for name in self.decoder.output_names:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        outputs = binding.get_outputs()
        return outputs[0], list(outputs[1:])

    @staticmethod
    def logits(value) -> np.ndarray:
        """Copy a logits OrtValue to the host."""
        return value.numpy()


def bound_runner(decoder, ids: np.ndarray):
    """The IO-binding counterpart of :func:`mone_export.latency.ort_runner`: a prefill of ``ids [B, T]`` and a
    one-token decode with a past of T, inputs and cache bound on the device (nothing but the ids crosses per step)."""
    import itertools

    from mone_export.latency import LatencyRunner, decode_tokens

    bound = BoundDecoder(decoder)
    batch, tokens = ids.shape
    mask = bound.value(np.ones((batch, tokens), dtype=np.int64))
    positions = bound.value(np.broadcast_to(np.arange(tokens, dtype=np.int64), (batch, tokens)).copy())
    prompt = bound.value(np.asarray(ids, dtype=np.int64))
    empty = bound.empty_past(batch)
    _, past = bound.step(prompt, mask, positions, empty)
    nexts = itertools.cycle([bound.value(tokens_) for tokens_ in decode_tokens(ids)])
    mask1 = bound.value(np.ones((batch, tokens + 1), dtype=np.int64))
    pos1 = bound.value(np.full((batch, 1), tokens, dtype=np.int64))
    return LatencyRunner(prefill=lambda: bound.step(prompt, mask, positions, empty),
                         decode=lambda: bound.step(next(nexts), mask1, pos1, past))


def cuda_free_bytes() -> int | None:
    """Free device memory per ``cudaMemGetInfo`` on the current device (the CUDA runtime ONNX Runtime uses), or None
    when no CUDA runtime library can be loaded."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if runtime.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
        return None
    return None
