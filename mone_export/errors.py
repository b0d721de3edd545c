"""Typed errors. A ``UsageError`` is the user's mistake: the CLI prints its one-line message and exits 2."""

from __future__ import annotations


class MoneError(Exception):
    """Base class of every error mone-export raises on purpose."""


class UsageError(MoneError, ValueError):
    """Bad input from the user: the message says what is wrong and what to do instead (CLI exit code 2)."""


class UnsupportedModelError(UsageError):
    """The model is not a supported transformers MoE architecture."""


class PlanMismatchError(UsageError):
    """A pruning plan does not fit the model it is applied to."""


class ParityError(MoneError):
    """An exported model's outputs differ from PyTorch by more than the tolerance (CLI exit code 1)."""


class Terminated(BaseException):
    """The process got SIGTERM. A BaseException like KeyboardInterrupt, so that ``except Exception`` handlers let it
    through and every ``with`` block (scratch folders, locks) unwinds before the CLI exits 143."""
