"""Checkpoint integrity: every weight a model needs is in its files, whole, with the right shape; else a clear error.

Two layers of checks, both naming the file or tensor at fault (a :class:`~mone_export.errors.UsageError`, CLI exit 2):

1. :func:`check_checkpoint_files`, before any weight is read: the weight files exist (a sharded index lists no
   missing shard: an interrupted download), every safetensors header parses and its tensors exactly cover the file
   (a truncated or corrupt file), and the per-expert tensors (``...experts.{j}.{name}``, the names checkpoints use)
   are complete and of one shape across experts.
2. :func:`load_pretrained_checked`, around transformers' own loading: the load report transformers builds (missing,
   unexpected and wrongly shaped tensors, errors while fusing the per-expert tensors) becomes an error instead of a
   log table and a randomly initialised weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Iterator

from mone_export.errors import UsageError

__all__ = ["WEIGHT_FILES", "StoredTensor", "check_checkpoint_files", "config_parameter_count",
           "load_pretrained_checked", "safetensors_header", "stored_tensors", "torch_dtype", "weight_files"]

logger = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TORCH_BIN_INDEX, TORCH_BIN)
"""The weight files transformers reads, in the order it prefers them."""

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<leaf>.+)$")
_SHOWN = 3


def _listed(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _read_index(path: Path) -> list[Path]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a valid weight index ({type(exc).__name__}); copy the checkpoint again.") \
            from None
    missing = [name for name in shards if not (path.parent / name).is_file()]
    if missing:
        raise UsageError(f"{path.parent} lacks the shard(s) {_listed(missing)} that {path.name} lists: an interrupted "
                         "download or copy? Copy the checkpoint again.")
    return [path.parent / name for name in shards]


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder (shards of an index, or the single file); a UsageError if none."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return _read_index(path) if name.endswith(".index.json") else [path]
        if path.exists():
            raise UsageError(f"{path} is not a file; copy the checkpoint again.")
    raise UsageError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}): an interrupted download or copy? "
                     "Pass a complete checkpoint folder.")


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, read with plain file reads when indexed (``stored[...]``).

    It stands in for safetensors' own slice object in transformers' loader (which materialises a tensor as
    ``slice[...]``). safetensors memory-maps the file, and every page a load touches stays in the process's RSS
    while any tensor of the file is alive (measured on a 2.9 GB Mixtral-8x7B layer: the whole layer stayed mapped
    beside its fused copy, 12.3 GB peak for an fp32 load against 8 GB through reads). Read, the bytes go to the page
    cache, which the kernel reclaims, and the tensor owns its memory.
    """

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def get_shape(self) -> list[int]:
        """The tensor's shape (safetensors' slice interface)."""
        return list(self.shape)

    def get_dtype(self) -> str:
        """The safetensors dtype name, e.g. ``BF16`` (safetensors' slice interface)."""
        return self.dtype

    def __getitem__(self, key):
        import torch

        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.offset)
            done = 0
            while done < self.nbytes:
                count = handle.readinto(view[done:])
                if not count:
                    raise UsageError(f"{self.path} ended while reading a tensor: truncated; copy the checkpoint again.")
                done += count
        tensor = buffer.view(torch_dtype(self.dtype)).reshape(self.shape)
        return tensor if key is Ellipsis else tensor[key]


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (``BF16`` → ``torch.bfloat16``); a UsageError for one torch lacks."""
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
             "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    dtype = getattr(torch, names.get(name, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"safetensors dtype {name} is not supported by this PyTorch; convert the checkpoint.")
    return dtype


def stored_tensors(path: str | os.PathLike, names=None) -> dict[str, StoredTensor]:
    """``name → StoredTensor`` for the tensors ``names`` (default: all) of a safetensors file whose header is
    consistent (:func:`safetensors_header`'s checks)."""
    path = Path(path)
    wanted = None if names is None else set(names)
    return {name: StoredTensor(path, entry.dtype, entry.shape, entry.offset, entry.nbytes)
            for name, entry in _header_entries(path).items() if wanted is None or name in wanted}


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name → (dtype, shape)`` of a safetensors file whose header and size are consistent; a UsageError if not."""
    return {name: (entry.dtype, entry.shape) for name, entry in _header_entries(Path(path)).items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the file
    nbytes: int


def _header_entries(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    broken = f"{path} is not a complete safetensors file"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UsageError(f"{broken} ({size} bytes); copy the checkpoint again.")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise UsageError(f"{broken} (its header claims {length} bytes, the file has {size}): truncated or corrupt; "
                             "copy the checkpoint again.")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{broken} (its header is not valid JSON): corrupt; copy the checkpoint again.") from None
    if not isinstance(header, dict):
        raise UsageError(f"{broken} (its header is not a JSON object): corrupt; copy the checkpoint again.")
    data_bytes = size - 8 - length
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, stop = int(begin), int(stop)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{broken} (tensor {name} has a malformed header entry): corrupt.") from None
        expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if _DTYPE_BYTES.get(dtype) and stop - begin != expected:
            raise UsageError(f"{broken}: tensor {name} {dtype}{list(shape)} needs {expected} bytes, its entry has "
                             f"{stop - begin}; corrupt, copy the checkpoint again.")
        tensors[name] = _Entry(dtype, shape, 8 + length + begin, stop - begin)
        end = max(end, stop)
    if end > data_bytes:
        raise UsageError(f"{broken}: its tensors need {end} bytes of data, the file holds {data_bytes} "
                         f"(truncated by {end - data_bytes} bytes); copy the checkpoint again.")
    return tensors


def _check_experts_complete(tensors: dict[str, tuple[str, tuple[int, ...]]], folder: Path) -> None:
    """Per-expert tensors: every expert of a layer has every weight, all of one shape."""
    groups: dict[str, dict[str, dict[int, tuple[int, ...]]]] = {}
    for name, (_, shape) in tensors.items():
        match = _EXPERT_NAME.match(name)
        if match:
            leaves = groups.setdefault(match["prefix"], {})
            leaves.setdefault(match["leaf"], {})[int(match["index"])] = shape
    for prefix, leaves in sorted(groups.items()):
        experts = set().union(*(set(ids) for ids in leaves.values()))
        count = max(experts) + 1
        for leaf, shapes in sorted(leaves.items()):
            missing = [f"{prefix}.{j}.{leaf}" for j in range(count) if j not in shapes]
            if missing:
                raise UsageError(f"the checkpoint in {folder} lacks {_listed(missing)}: an incomplete checkpoint; "
                                 "copy it again.")
            common = max(set(shapes.values()), key=list(shapes.values()).count)
            odd = [j for j, shape in sorted(shapes.items()) if shape != common]
            if odd:
                j = odd[0]
                raise UsageError(f"the checkpoint in {folder}: {prefix}.{j}.{leaf} has shape {list(shapes[j])}, the "
                                 f"other experts' {leaf} {list(common)}; the checkpoint is inconsistent.")


SIZE_SLACK = 1.25
"""How many times the values the checkpoint holds a config may describe before it is refused unloaded. Loose on
purpose: it guards memory against absurd configs (a typo'd expert count); a missing tensor or two is left to the
load report, which names them."""


def config_parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (nothing is allocated)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _check_config_matches_size(config, tensors: dict[str, tuple[str, tuple[int, ...]]], folder: Path) -> None:
    """Refuse a config that describes a (much) bigger model than the weights: loading it would allocate that much
    memory (a typo'd expert count can ask for terabytes) before the mismatch is found."""
    if not tensors or getattr(config, "quantization_config", None):
        return  # no safetensors headers to count, or packed quantised tensors that hold fewer values
    stored = sum(math.prod(shape) for _, shape in tensors.values())
    try:
        wanted = config_parameter_count(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build it means the config is unusable
        raise UsageError(f"{folder}/config.json does not describe a buildable model "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix config.json."
                         ) from None
    if wanted > stored * SIZE_SLACK:
        raise UsageError(f"{folder}/config.json describes a model of {wanted:,} parameters but the weights hold "
                         f"{stored:,} values: config.json does not match the checkpoint (check the expert count and "
                         "sizes in it).")


def check_checkpoint_files(folder: str | os.PathLike, config=None) -> list[Path]:
    """Check a checkpoint's weight files before loading (see the module docstring); return them.

    With ``config``, also check that it does not describe a bigger model than the files hold.
    """
    folder = Path(folder)
    files = weight_files(folder)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            tensors.update(safetensors_header(path))
    _check_experts_complete(tensors, folder)
    if config is not None:
        _check_config_matches_size(config, tensors, folder)
    return files


@contextlib.contextmanager
def _captured_load_report() -> Iterator[dict]:
    """Catch the load report transformers logs (and raises on) during ``from_pretrained``; yield it when set."""
    import transformers.modeling_utils as modeling_utils

    captured: dict = {}
    original = getattr(modeling_utils, "log_state_dict_report", None)
    if original is None:  # another transformers layout: rely on output_loading_info alone
        yield captured
        return

    def capture(*args, **kwargs):
        info = kwargs.get("loading_info", args[3] if len(args) > 3 else None)
        captured["info"] = info
        if getattr(info, "error_msgs", None):
            original(*args, **kwargs)  # raises transformers' own error, which the caller turns into one line

    modeling_utils.log_state_dict_report = capture
    try:
        yield captured
    finally:
        modeling_utils.log_state_dict_report = original


def _field(info, name: str):
    return (info.get(name) if isinstance(info, dict) else getattr(info, name, None)) or ()


def _raise_for_load_problems(info, folder: Path, allow_unexpected: bool = False) -> None:
    conversion = dict(_field(info, "conversion_errors"))
    mismatched = list(_field(info, "mismatched_keys"))
    missing = set(_field(info, "missing_keys")) - set(conversion)
    unexpected = set(_field(info, "unexpected_keys"))
    where = f"the checkpoint in {folder}"
    if conversion:
        raise UsageError(f"{where} could not be converted to {_listed(conversion)} (its per-expert tensors are "
                         "missing or of the wrong shape); copy the checkpoint again.")
    if mismatched:
        name, got, want = mismatched[0][:3]
        raise UsageError(f"{where}: tensor {name} has shape {list(got)}, the model expects {list(want)}; the weights do "
                         "not match config.json.")
    if missing:
        raise UsageError(f"{where} lacks {_listed(missing)}, which the model needs (it would be randomly "
                         "initialised); copy the checkpoint again.")
    if unexpected and allow_unexpected:
        logger.info("%d tensors of %s's other modalities left unread", len(unexpected), folder)
    elif unexpected:
        raise UsageError(f"{where} holds tensors the model does not have: {_listed(unexpected)}; the weights do not "
                         "match config.json.")


@contextlib.contextmanager
def _without_transformers_progress_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar writes to stderr even in logs; the pipeline reports its own stages."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def load_pretrained_checked(folder: str | os.PathLike, text_of_multimodal: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(folder)`` that fails with a one-line error on any load problem.

    ``text_of_multimodal``: the folder holds a multimodal checkpoint of which the causal LM is the text model
    (:func:`mone_export.loading.causal_lm_config`): the other modalities' tensors are left unread, not an error.
    """
    import transformers

    folder = Path(folder)
    check_checkpoint_files(folder)
    try:
        with _captured_load_report() as captured, _without_transformers_progress_bar():
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except UsageError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load the weights in {folder}: {message}") from None
    _raise_for_load_problems(captured.get("info") or info, folder, allow_unexpected=text_of_multimodal)
    return model
