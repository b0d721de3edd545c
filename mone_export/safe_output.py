"""Output folders that never lose data: no overlap with any input, scratch space that cleans up, atomic replacement.

The rules (docs/validation.md, "Output safety"):

- **No overlap.** The output may not be, contain, or lie inside any input (the model folder, a plan folder, a
  calibration file, the bundled models): :func:`check_output_target` raises a :class:`UsageError` before anything
  is touched. A symbolic link as output is refused (what it points to is not ours to replace).
- **Only our own folders are replaced.** ``--overwrite`` replaces a previous mone-export output; a non-empty folder
  that is not one (no ``mone_export.json`` / ``mone_pruned.json`` / ``plan/plan.json`` of ours) is refused even
  with it.
- **Scratch beside the target, locked.** A run builds everything in one hidden folder
  ``.<name>.mone-scratch-XXXXXXXX`` next to the target (same file system, so the final move is a rename) and holds
  an ``flock`` on a file inside it for as long as it runs. The kernel drops the lock when the process dies, however
  it dies (SIGKILL included), so the next run can tell a dead run's scratch from a live one's and removes it.
- **One atomic step.** The finished folder replaces the previous output with ``renameat2(RENAME_EXCHANGE)``: at
  every instant the target is either the complete previous output or the complete new one. Where the kernel or
  file system lacks the exchange, two renames are used and the previous output waits in the scratch folder
  (``previous/``) during the gap; the next run puts it back if the process died in between.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

from mone_export.errors import UsageError

__all__ = [
    "SCRATCH_TAG",
    "RunScratch",
    "check_output_target",
    "check_no_overlap",
    "is_mone_output",
    "remove_stale_scratch",
    "replace_folder",
    "scratch_for",
]

logger = logging.getLogger(__name__)

SCRATCH_TAG = ".mone-scratch-"
LOCK_FILE = ".lock"
PREVIOUS = "previous"
STALE_UNLOCKED_SECONDS = 10.0
"""A scratch folder without a lock file is only removed when older than this: its run may be just starting (a run
writes and locks the file right after making the folder; one killed in between leaves a folder without it, which the
next run more than this many seconds later removes)."""

OUTPUT_MARKER = "mone_export.json"
"""The file every output folder of ``export`` holds: which tool and version wrote it, in which dtype."""

OUTPUT_MARKERS = (OUTPUT_MARKER, "mone_pruned.json", "plan/plan.json")
"""Files one of which every folder mone-export writes holds: what makes a folder safe to ``--overwrite``.
(Not ``report.json``: a name other tools use too.)"""

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_current: contextvars.ContextVar["RunScratch | None"] = contextvars.ContextVar("mone_export_scratch", default=None)


# --- checks ---------------------------------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    """The absolute path with every symbolic link of its existing part resolved (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def check_no_overlap(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an ``output`` that is, contains, or lies inside one of ``inputs`` (label → path; None is skipped)."""
    out = _real(output)
    for label, path in inputs.items():
        if path is None:
            continue
        source = _real(path)
        if out == source:
            raise UsageError(f"-o {output} is the {label} ({path}); writing there would destroy it: choose another -o.")
        if out in source.parents:
            raise UsageError(f"-o {output} contains the {label} ({path}); replacing it would destroy that: "
                             "choose another -o.")
        if source in out.parents:
            raise UsageError(f"-o {output} lies inside the {label} ({path}); write the output somewhere else.")


def is_mone_output(folder: Path) -> bool:
    """Whether ``folder`` holds a previous mone-export output (one of :data:`OUTPUT_MARKERS`)."""
    return any((folder / marker).is_file() for marker in OUTPUT_MARKERS)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_target(output: str | os.PathLike, overwrite: bool = False,
                        inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """Everything that must hold before a run may write ``output``; a :class:`UsageError` otherwise.

    ``output`` must not overlap an input, be a symbolic link or a file, hold anything without ``overwrite``, or hold
    anything but a previous mone-export output with it; its nearest existing parent must be a writable folder.
    """
    if not str(output).strip():
        raise UsageError("-o is empty; pass the output folder to write.")
    path = Path(output).expanduser()
    check_no_overlap(path, inputs or {})
    if path.is_symlink():
        raise UsageError(f"output {path} is a symbolic link; pass the folder it should be (a real path) as -o.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a folder; choose another -o.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {path} is not empty; pass --overwrite to replace it, or choose another -o.")
        if not is_mone_output(path):
            raise UsageError(f"output folder {path} is not empty and was not written by mone-export; --overwrite only "
                             "replaces mone-export outputs: choose another -o (or empty that folder yourself).")
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise UsageError(f"output {path}: {parent} is a file, not a folder; choose another -o.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {parent} is not writable; choose another -o.")
    return path


# --- scratch --------------------------------------------------------------------------------------------------------


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        raise


def _scratch_is_dead(folder: Path) -> bool:
    """True when no live process holds ``folder``'s lock (or it has none and is not brand new)."""
    lock = folder / LOCK_FILE
    try:
        with open(lock, "rb") as handle:
            return _try_lock(handle)  # the lock is released again when the file is closed
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > STALE_UNLOCKED_SECONDS
        except FileNotFoundError:
            return False


def remove_stale_scratch(target: str | os.PathLike) -> list[Path]:
    """Remove the scratch folders of dead runs that wrote ``target``; put back a previous output left in the gap.

    Returns the folders removed.
    """
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for folder in sorted(parent.glob(f".{target.name}{SCRATCH_TAG}*")):
        if not folder.is_dir() or folder.is_symlink() or not _scratch_is_dead(folder):
            continue
        previous = folder / PREVIOUS
        if previous.is_dir() and not target.exists():
            os.rename(previous, target)
            logger.warning("restored %s, left aside by a run that was killed while replacing it", target)
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, the scratch folder of a run that did not finish", folder)
        removed.append(folder)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot replace {b}: {os.strerror(code)}")


def _give_default_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, as if created normally (mkdtemp and some writers use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def replace_folder(built: Path, target: Path, scratch: Path) -> None:
    """Make ``built`` the folder ``target`` in one atomic step; the previous ``target`` ends up inside ``scratch``."""
    _give_default_permissions(built)
    if not target.exists() and not target.is_symlink():
        os.rename(built, target)
        return
    if _exchange(built, target):
        return  # ``built`` now holds the previous output; it goes with the scratch folder
    previous = scratch / PREVIOUS
    os.rename(target, previous)
    os.rename(built, target)


class RunScratch:
    """One run's locked scratch folder beside ``target``; removed on exit (and by the next run if this one dies).

    Use as a context manager: ``folder(label)`` makes a sub-folder to build in; ``commit(built)`` (or
    ``commit(built, other_target)``) replaces the target with it atomically. While it is active,
    :func:`scratch_for` returns it, so nested writers of the same target build inside it.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).absolute()
        self.path: Path | None = None
        self._lock = None
        self._token = None

    def __enter__(self) -> "RunScratch":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(self.target)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{SCRATCH_TAG}", dir=self.target.parent))
        self._lock = open(self.path / LOCK_FILE, "wb")
        _try_lock(self._lock)
        self._lock.write(json.dumps({"pid": os.getpid(), "target": str(self.target)}).encode())
        self._lock.flush()
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        try:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def folder(self, label: str) -> Path:
        """A new empty sub-folder of the scratch folder."""
        assert self.path is not None, "RunScratch used outside its with-block"
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.path))
        return path

    def commit(self, built: Path, target: str | os.PathLike | None = None) -> Path:
        """Replace ``target`` (default: this scratch's target) by ``built`` atomically; return the target."""
        assert self.path is not None, "RunScratch used outside its with-block"
        destination = self.target if target is None else Path(target).absolute()
        if destination.parent != self.target.parent:
            raise ValueError(f"{destination} is not beside {self.target}: a rename cannot move it atomically")
        previous = self.path / PREVIOUS
        if previous.exists():  # left by an earlier commit of this run, which completed
            shutil.rmtree(previous)
        replace_folder(built, destination, self.path)
        return destination


def scratch_for(target: str | os.PathLike) -> RunScratch | None:
    """The active :class:`RunScratch` of ``target`` in this context, if any."""
    active = _current.get()
    if active is not None and active.target == Path(target).absolute():
        return active
    return None


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to build in; on normal exit it replaces ``target`` atomically, on error it is dropped.

    Builds inside the active :class:`RunScratch` of ``target`` when there is one (so a caller can still decide, after
    the files are written, e.g. on a failed check, to raise and keep the previous output), else in its own.
    """
    active = scratch_for(target)
    with contextlib.ExitStack() as stack:
        scratch = active or stack.enter_context(RunScratch(target))
        built = scratch.folder("output")
        yield built
        if built.exists():  # a caller may have moved it elsewhere (a kept failed export)
            scratch.commit(built)
