"""An exported decoder in ONNX Runtime: providers, sessions, and the decoder called with numpy arrays."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mone_export.errors import MoneError, UsageError

__all__ = ["PROVIDERS", "ORT_DTYPES", "DTYPE_NAMES", "TORCH_DTYPES", "OrtDecoder", "check_provider", "create_session",
           "greedy_ort", "model_file", "ort_providers", "ort_threads"]

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DTYPE_NAMES = {np.float32: "float32", np.float16: "float16", np.float64: "float64"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


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


def ort_threads() -> int:
    """ONNX Runtime threads: as many as PyTorch uses, so both are measured on the same cores."""
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
    options.intra_op_num_threads = threads or ort_threads()
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


def model_file(path: str | os.PathLike) -> Path:
    """The ``model.onnx`` of an export folder (or the file itself); a UsageError when there is none."""
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
        self.path = model_file(path)
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
        past_type = inputs[self.past_names[0]].type if self.past_names else logits_type
        self.past_dtype = ORT_DTYPES.get(past_type, ORT_DTYPES[logits_type])
        # The export's precision is its cache's (the model dtype): some families return float32 logits from a
        # float16 model (Beam casts its logits up), and the float32 tolerance would misjudge that export.
        self.dtype = self.past_dtype

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


def greedy_ort(decoder: OrtDecoder, prompt: np.ndarray, new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy new tokens of one prompt through the ORT cache, stopping after ``new_tokens`` or at an ``eos`` id."""
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
