"""Test prompts of a validation: held-out ``python-code`` chunks (never calibration text), or seeded random ids."""

from __future__ import annotations

import logging

import numpy as np
import torch

from mone_export.errors import MoneError, UsageError

__all__ = ["DEFAULT_PROMPTS", "PROMPT_TOKENS", "PROMPT_SEED", "as_prompt_tensor", "latency_ids", "make_prompts"]

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = 4
PROMPT_TOKENS = 24
PROMPT_SEED = 0


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


def as_prompt_tensor(prompts, tokenizer, vocab_size: int) -> tuple[torch.Tensor, str]:
    """``([N, L] int64 ids, "given")`` from a tensor, equal-length token-id lists, or texts (cut to the shortest)."""
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


def latency_ids(tokenizer, vocab_size: int, tokens: int) -> np.ndarray:
    """``[1, tokens]`` ids for the latency measurement: one held-out chunk (another seed than the test prompts)."""
    ids, _ = make_prompts(tokenizer, vocab_size, num=1, length=tokens, seed=PROMPT_SEED + 1)
    return ids.numpy()
