"""Calibration (and evaluation) token data that needs no network.

Sources
-------
``"python-code"``
    The source of the running Python's standard library: every ``*.py`` file under
    ``sysconfig.get_paths()["stdlib"]``, one text per file, read as UTF-8 (undecodable files are
    skipped). Directories named in :data:`EXCLUDED_DIRS` (at any depth) and directories whose name
    starts with ``config-`` are skipped: third-party packages, test suites, the IDLE editor, the
    deprecated ``lib2to3`` and data-only modules. Files are sorted by their path relative to the
    stdlib root in posix form (``"json/decoder.py"``), so the order is deterministic.
``"python-docs"``
    The docstrings of those same files (module, class and function docstrings found with
    :mod:`ast`, ``ast.get_docstring(node, clean=True)``), one text per docstring, in file order and
    within a file in source order. Files that fail to parse are skipped.
``"random"``
    Seeded token ids drawn uniformly from ``[0, vocab_size)``, ``vocab_size = len(tokenizer)`` or
    the ``vocab_size=`` keyword. It has no texts.
a ``.txt`` path
    The whole file is one text.
a ``.jsonl`` path
    One JSON object per non-blank line, its string field ``"text"`` is one text (document).
``"datasets:PATH"`` or a ``datasets.Dataset`` object
    A dataset saved with ``Dataset.save_to_disk`` (loaded with ``datasets.load_from_disk``, needs
    ``pip install datasets``), or passed directly; its ``"text"`` column, one text per row.

Train / held-out split
----------------------
The split is deterministic and decided per FILE for the built-in text sources: the stdlib file
with relative path ``relpath`` is held out iff
``int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 10 == 0`` (about 10% of the files; see
:func:`is_heldout`). ``"python-code"`` and ``"python-docs"`` share the rule, so a file's docstrings
are held out exactly when its code is. For ``.jsonl`` files and datasets the same rule is applied
to documents: document ``i`` (0-based, blank lines not counted) is held out iff
``is_heldout(str(i))``. A ``.txt`` file is a single document and has no held-out part (use
``split="all"`` or ``"train"`` for it). Calibration uses ``split="train"``; evaluation (perplexity)
uses ``split="heldout"`` and so never scores on calibration text. ``split="all"`` uses everything.

Sampling
--------
The texts of the split are tokenized in order with
``tokenizer(text, add_special_tokens=False)["input_ids"]`` and concatenated into one token stream,
documents joined by the tokenizer's eos token id when it has one (nothing otherwise). Tokenizing is
lazy: reading stops once the stream holds the *pool*, ``max(4 * num_samples, num_samples + 16) *
seq_len`` tokens (or all the text when there is less), and the stream is cut to that length. So the
pool is the first tokens of the split in file order. The pool is cut into non-overlapping chunks of
``seq_len`` tokens and ``num_samples`` of them are chosen without replacement with
``numpy.random.default_rng(seed)``, kept in ascending order of position. No padding is ever used.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from mone_export.errors import UsageError

logger = logging.getLogger(__name__)

SOURCES = ("python-code", "python-docs", "random")
"""The built-in sources (besides a ``.txt`` / ``.jsonl`` path or ``datasets:PATH``)."""

TEXT_SOURCES = ("python-code", "python-docs")
"""The built-in sources that have texts (``"random"`` has none)."""

SPLITS = ("train", "heldout", "all")
"""Accepted values of ``split``."""

EXCLUDED_DIRS = (
    "__pycache__",
    "dist-packages",
    "idlelib",
    "lib-dynload",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "test",
    "tests",
    "turtledemo",
)
"""Directory names skipped at any depth under the stdlib root (so are names starting ``config-``)."""

DATASETS_PREFIX = "datasets:"
"""Prefix of a source string naming a folder saved with ``datasets.Dataset.save_to_disk``."""

HELDOUT_RULE = "held out iff int(sha256(key.encode()).hexdigest(), 16) % 10 == 0"
"""The split rule in words; ``key`` is a stdlib relative path or a document index ``str(i)``."""


def is_heldout(relpath: str) -> bool:
    """True iff the file (or document key) ``relpath`` is in the held-out split (about 10% are)."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 10 == 0


def _in_split(key: str, split: str) -> bool:
    """True iff the item with split key ``key`` belongs to ``split``."""
    if split == "all":
        return True
    return is_heldout(key) == (split == "heldout")


def _check_split(split: str) -> None:
    """Raise a UsageError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def stdlib_root() -> Path:
    """The running Python's standard-library folder, the root of the built-in text sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_dir(name: str) -> bool:
    """True iff a stdlib subdirectory called ``name`` is skipped."""
    return name in EXCLUDED_DIRS or name.startswith("config-")


@functools.lru_cache(maxsize=4)
def _list_stdlib_files(root: str) -> tuple[str, ...]:
    """Relative posix paths of the ``*.py`` files under ``root``, excluded dirs pruned, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return tuple(sorted(found))


def stdlib_files(split: str = "all") -> list[str]:
    """The stdlib files (relative posix paths, sorted) behind the built-in text sources in ``split``."""
    _check_split(split)
    return [rel for rel in _list_stdlib_files(str(stdlib_root())) if _in_split(rel, split)]


def _read_source_file(relpath: str) -> str | None:
    """The UTF-8 text of stdlib file ``relpath``, or None when it cannot be read or decoded."""
    try:
        return (stdlib_root() / relpath).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("skipping %s: %s", relpath, exc)
        return None


def _iter_code(split: str) -> Iterator[str]:
    """The source texts of the stdlib files in ``split``, one per file, in file order."""
    for rel in stdlib_files(split):
        text = _read_source_file(rel)
        if text is not None:
            yield text


def docstrings(source_text: str) -> list[str]:
    """Module, class and function docstrings of a Python source, in source order (empty if unparsable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source_text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, kinds)]
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    found = (ast.get_docstring(n, clean=True) for n in nodes)
    return [doc for doc in found if doc]


def _iter_docs(split: str) -> Iterator[str]:
    """The docstrings of the stdlib files in ``split``, in file order then source order."""
    for rel in stdlib_files(split):
        text = _read_source_file(rel)
        if text is not None:
            yield from docstrings(text)


def _require_file(path: Path) -> None:
    """Raise a UsageError unless ``path`` is an existing, non-empty file."""
    if not path.exists():
        raise UsageError(f"calibration file {str(path)!r} not found: check the path")
    if not path.is_file():
        raise UsageError(f"calibration source {str(path)!r} is not a file: give a .txt or .jsonl file")
    if path.stat().st_size == 0:
        raise UsageError(f"calibration file {str(path)!r} is empty: give a file with text in it")


def read_text_file(path: Path) -> str:
    """A calibration file's text; a UsageError naming the file when it is binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"calibration file {str(path)!r} cannot be read ({exc.strerror}): check the path") from None
    if b"\x00" in data:
        raise UsageError(f"calibration file {str(path)!r} is binary (it holds NUL bytes): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"calibration file {str(path)!r} is not UTF-8 text (byte {exc.start}): convert it to UTF-8, "
                         "e.g. iconv -f latin1 -t utf-8") from None


def source_path(source: Any) -> Path | None:
    """The file or folder a calibration source reads (a .txt/.jsonl file, a ``datasets:`` folder), if any."""
    if not isinstance(source, (str, os.PathLike)) or (isinstance(source, str) and source in SOURCES):
        return None
    text = str(source)
    if text.startswith(DATASETS_PREFIX):
        return Path(text[len(DATASETS_PREFIX):])
    return Path(text)


def check_source(source: Any) -> None:
    """Read and check a file source completely now (binary, not UTF-8, bad JSON lines, empty), before any model work.

    Built-in sources and datasets are checked when they are read.
    """
    if _is_dataset(source) or (isinstance(source, str) and (source in SOURCES or source.startswith(DATASETS_PREFIX))):
        return
    for _ in iter_texts(source, "all"):
        pass


def _iter_txt(path: Path, split: str) -> Iterator[str]:
    """The single text of a ``.txt`` file (it has no held-out part), read now."""
    if split == "heldout":
        raise UsageError(
            f"{str(path)!r} is a .txt file, one document with no held-out part: "
            "use split 'all', or a .jsonl file of several documents"
        )
    text = read_text_file(path)
    if not text.strip():
        raise UsageError(f"calibration file {str(path)!r} is empty: give a file with text in it")
    return iter([text])


def _jsonl_text(line: str, lineno: int, path: Path) -> str:
    """The string ``"text"`` field of one JSON line, or a UsageError naming the line."""
    where = f"{str(path)!r} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON ({exc.msg}): write one JSON object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise UsageError(f'{where} has no string "text" field: write objects like {{"text": "..."}}')
    return record["text"]


def _iter_jsonl(path: Path, split: str) -> Iterator[str]:
    """The ``"text"`` fields of a ``.jsonl`` file's documents in ``split``."""
    index = 0
    for lineno, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        text = _jsonl_text(line, lineno, path)
        if _in_split(str(index), split):
            yield text
        index += 1
    if index == 0:
        raise UsageError(f"calibration file {str(path)!r} is empty: give a file with text in it")


def _is_dataset(obj: Any) -> bool:
    """True iff ``obj`` looks like a ``datasets.Dataset`` with a ``"text"`` column."""
    columns = getattr(obj, "column_names", None)
    return isinstance(columns, (list, tuple)) and "text" in columns


def _load_dataset(path: str) -> Any:
    """Load a dataset folder saved with ``save_to_disk`` (``datasets`` is imported lazily)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UsageError(
            f"source {DATASETS_PREFIX}{path} needs the 'datasets' package: pip install datasets"
        ) from None
    if not Path(path).is_dir():
        raise UsageError(f"dataset folder {path!r} not found: give a folder saved with Dataset.save_to_disk")
    dataset = datasets.load_from_disk(path)
    if not _is_dataset(dataset):
        raise UsageError(
            f"dataset {path!r} is not a single Dataset with a 'text' column: "
            "save one split (a Dataset, not a DatasetDict) that has a 'text' column"
        )
    return dataset


def _iter_dataset(dataset: Any, split: str) -> Iterator[str]:
    """The ``"text"`` values of a dataset's rows in ``split``."""
    for index, row in enumerate(dataset):
        if not _in_split(str(index), split):
            continue
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UsageError(f"dataset row {index} has no string 'text' value: fix or drop that row")
        yield text


def _unknown_source(source: Any) -> UsageError:
    """The UsageError for a source that is none of the accepted kinds."""
    return UsageError(
        f"unknown calibration source {source!r}: use one of {', '.join(SOURCES)}, "
        f"a .txt or .jsonl file path, or {DATASETS_PREFIX}PATH"
    )


def _file_path(source: str | os.PathLike) -> Path:
    """``source`` as a ``.txt``/``.jsonl`` path, or a UsageError saying why it is not one."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        _require_file(path)
        return path
    if path.exists():
        raise UsageError(
            f"calibration file {str(path)!r} has unsupported extension {suffix or '(none)'!r}: "
            "use a .txt file (one text) or a .jsonl file (one {\"text\": ...} object per line)"
        )
    raise _unknown_source(source)


def iter_texts(source: Any, split: str = "train") -> Iterator[str]:
    """Texts of a built-in text source ("python-code" or "python-docs") or of a file path, for split "train" / "heldout" / "all".

    Also accepts ``"datasets:PATH"`` and a ``datasets.Dataset`` object. Source errors are raised
    at call time, not on first iteration; file content errors while iterating.
    """
    _check_split(split)
    if _is_dataset(source):
        return _iter_dataset(source, split)
    if isinstance(source, str) and source == "random":
        raise UsageError("source 'random' has no texts: use calibration_batches, or a text source")
    if isinstance(source, str) and source == "python-code":
        return _iter_code(split)
    if isinstance(source, str) and source == "python-docs":
        return _iter_docs(split)
    if isinstance(source, str) and source.startswith(DATASETS_PREFIX):
        return _iter_dataset(_load_dataset(source[len(DATASETS_PREFIX):]), split)
    if not isinstance(source, (str, os.PathLike)):
        raise _unknown_source(source)
    path = _file_path(source)
    return _iter_txt(path, split) if path.suffix.lower() == ".txt" else _iter_jsonl(path, split)


MAX_CALIBRATION_TOKENS = 1 << 24
"""At most this many calibration tokens (samples × sequence length): far more than pruning needs (a few hundred
thousand), and a guard against a typo that would ask for terabytes."""


def _check_sizes(num_samples: int, seq_len: int, batch_size: int) -> None:
    """Raise a UsageError for a non-positive sample count, too short ``seq_len`` or bad batch size."""
    if num_samples * seq_len > MAX_CALIBRATION_TOKENS and num_samples >= 1 and seq_len >= 2:
        raise UsageError(f"{num_samples} samples × {seq_len} tokens = {num_samples * seq_len} calibration tokens is "
                         f"more than the {MAX_CALIBRATION_TOKENS} allowed: use fewer --calib-samples or a shorter "
                         "--seq-len (a few hundred thousand tokens are plenty)")
    if num_samples < 1:
        raise UsageError(f"num_samples is {num_samples}: ask for at least 1 calibration sample")
    if seq_len < 2:
        raise UsageError(f"seq_len is {seq_len}: use a sequence length of at least 2 tokens")
    if batch_size < 1:
        raise UsageError(f"batch_size is {batch_size}: use a batch size of at least 1")


def pool_tokens(num_samples: int, seq_len: int) -> int:
    """How many tokens of the split are read for the pool the samples are chosen from."""
    return max(4 * num_samples, num_samples + 16) * seq_len


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens and without the sequence-length warning."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_stream(texts: Iterable[str], tokenizer: Any, max_tokens: int) -> np.ndarray:
    """The first ``max_tokens`` tokens of ``texts`` tokenized and joined by eos (fewer if the text ends)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    parts: list[list[int]] = []
    total = 0
    for text in texts:
        ids = _encode(tokenizer, text)
        if not ids:
            continue
        if parts and eos is not None:
            parts.append([int(eos)])
            total += 1
        parts.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    flat = [tok for part in parts for tok in part]
    return np.asarray(flat[:max_tokens], dtype=np.int64)


def _choose_chunks(stream: np.ndarray, num_samples: int, seq_len: int, seed: int, source: Any) -> np.ndarray:
    """``num_samples`` chunks of ``seq_len`` tokens chosen at random (positions ascending) from ``stream``."""
    n_chunks = len(stream) // seq_len
    if n_chunks == 0:
        raise UsageError(
            f"source {_name(source)!r} is too short: it has {len(stream)} tokens and one sample "
            f"needs seq_len={seq_len}; give more text or a smaller seq_len"
        )
    if n_chunks < num_samples:
        raise UsageError(
            f"source {_name(source)!r} has only {n_chunks} samples of seq_len={seq_len} "
            f"({len(stream)} tokens) but {num_samples} were asked: lower num_samples or seq_len, or give more text"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(n_chunks, size=num_samples, replace=False))
    chunks = stream[: n_chunks * seq_len].reshape(n_chunks, seq_len)
    return chunks[chosen]


def _random_ids(tokenizer: Any, vocab_size: int | None, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """Seeded uniform token ids in ``[0, vocab_size)``, shape ``[num_samples, seq_len]``."""
    if vocab_size is None:
        if tokenizer is None:
            raise UsageError("source 'random' needs a tokenizer or vocab_size=N to know the id range")
        vocab_size = len(tokenizer)
    if vocab_size < 1:
        raise UsageError(f"vocab_size is {vocab_size}: give a vocabulary size of at least 1")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(num_samples, seq_len), dtype=np.int64)


def _to_batches(rows: np.ndarray, batch_size: int) -> list[torch.LongTensor]:
    """Split ``[N, seq_len]`` ids into int64 tensors of ``batch_size`` rows (the last may be smaller)."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return [chunk.clone() for chunk in torch.split(tensor, batch_size, dim=0)]


def _name(source: Any) -> str:
    """A short printable name of ``source`` for messages and records."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return type(source).__name__


def calibration_batches(
    source: Any,
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 8,
    split: str = "train",
    *,
    vocab_size: int | None = None,
) -> list[torch.LongTensor]:
    """num_samples fixed-length token sequences ([B, seq_len] int64 LongTensors, last batch may be smaller), no padding.

    ``source`` is a built-in name (:data:`SOURCES`), a ``.txt``/``.jsonl`` path, ``"datasets:PATH"``
    or a ``datasets.Dataset``. For ``"random"``, ``tokenizer`` may be None when ``vocab_size`` is
    given (``vocab_size`` wins over ``len(tokenizer)``; ``split`` is ignored for it). Same arguments and seed give identical
    tensors. See the module docstring for how the pool of tokens is built and sampled.
    """
    _check_sizes(num_samples, seq_len, batch_size)
    _check_split(split)
    if isinstance(source, str) and source == "random":
        return _to_batches(_random_ids(tokenizer, vocab_size, num_samples, seq_len, seed), batch_size)
    texts = iter_texts(source, split)
    if tokenizer is None:
        raise UsageError(f"source {_name(source)!r} needs a tokenizer: pass the model's tokenizer")
    start = time.perf_counter()
    stream = token_stream(texts, tokenizer, pool_tokens(num_samples, seq_len))
    logger.info(
        "calibration pool: %d tokens of %s (split %s) in %.2fs",
        len(stream), _name(source), split, time.perf_counter() - start,
    )
    return _to_batches(_choose_chunks(stream, num_samples, seq_len, seed, source), batch_size)


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe_builtin(source: str, split: str) -> dict:
    """The record of a built-in text source: Python version, stdlib root, exclusions, file count."""
    return {
        "source": source,
        "kind": "builtin",
        "split": split,
        "split_rule": f"per stdlib file: {HELDOUT_RULE}, key = path relative to stdlib root",
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "stdlib_root": str(stdlib_root()),
        "excluded_dirs": list(EXCLUDED_DIRS) + ["config-*"],
        "num_files": len(stdlib_files(split)),
    }


def _describe_dataset(dataset: Any, name: str, split: str) -> dict:
    """The record of a ``datasets.Dataset`` source."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    return {
        "source": name,
        "kind": "datasets",
        "split": split,
        "split_rule": f"per document: {HELDOUT_RULE}, key = str(row index)",
        "num_rows": len(dataset) if hasattr(dataset, "__len__") else None,
        "fingerprint": fingerprint if isinstance(fingerprint, str) else None,
    }


def describe_source(source: Any, split: str = "train") -> dict:
    """A JSON-serialisable record of ``source`` and ``split`` for the pruning plan, e.g. ``{"source": "python-code", "split": "train", ...}``."""
    _check_split(split)
    if _is_dataset(source):
        return _describe_dataset(source, "datasets.Dataset", split)
    if isinstance(source, str) and source == "random":
        return {"source": "random", "kind": "random", "split": None,
                "distribution": "uniform token ids in [0, vocab_size)"}
    if isinstance(source, str) and source in TEXT_SOURCES:
        return _describe_builtin(source, split)
    if isinstance(source, str) and source.startswith(DATASETS_PREFIX):
        return _describe_dataset(_load_dataset(source[len(DATASETS_PREFIX):]), source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise _unknown_source(source)
    path = _file_path(source)
    if path.suffix.lower() == ".txt":
        rule = "none: a .txt file is one document"
    else:
        rule = f"per document: {HELDOUT_RULE}, key = str(document index)"
    return {
        "source": str(path),
        "kind": path.suffix.lower().lstrip("."),
        "split": split,
        "split_rule": rule,
        "path": str(path.resolve()),
        "sha256": _file_sha256(path),
        "size_bytes": path.stat().st_size,
    }
