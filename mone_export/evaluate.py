"""Held-out evaluation of the bundled models: perplexity and per-layer expert usage.

Used by ``models/train.py`` to write each model card and by ``tests/test_bundled_models.py`` to
recompute the card's numbers; importable on its own (it needs only torch, numpy and mone_export).

Perplexity
----------
``exp(mean next-token cross-entropy)`` over fixed-length chunks: ``num_samples`` chunks of
``seq_len`` tokens from ``calibration_batches(source, tokenizer, num_samples, seq_len, seed,
split="heldout")`` (the documented per-file held-out split, never seen in training), each chunk
scored on its own (no context carried over), so ``num_samples * (seq_len - 1)`` tokens are
predicted. The cross-entropy is computed from the logits in float64, never from the model's
``loss`` (which for MoE families can include the router auxiliary loss). The defaults (64 chunks
× 128 tokens, seed 0) are the card's settings.

Expert usage
------------
For every routed MoE layer, the share of the routing slots each expert receives:
``count_e / (N * top_k)`` where ``count_e`` is the number of tokens that select expert ``e`` among
their top-k and ``N`` the number of tokens. The shares sum to 1; a perfectly balanced layer has
``1 / E`` everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mone_export.adapters import moe_layers_or_error, routing_recorded
from mone_export.calibration import calibration_batches

__all__ = [
    "EVAL_SETTINGS",
    "eval_batches",
    "perplexity",
    "heldout_perplexity",
    "expert_usage",
    "router_entropy",
    "usage_summary",
    "expert_tokens",
]

EVAL_SETTINGS = {"num_samples": 64, "seq_len": 128, "seed": 0, "split": "heldout", "batch_size": 8}
"""The settings behind every perplexity in the model cards."""


def eval_batches(tokenizer: Any, source: str, num_samples: int = 64, seq_len: int = 128, seed: int = 0,
                 split: str = "heldout", batch_size: int = 8) -> list[torch.LongTensor]:
    """The fixed evaluation chunks of ``source`` (``[B, seq_len]`` int64 batches)."""
    return calibration_batches(source, tokenizer, num_samples, seq_len, seed=seed, batch_size=batch_size, split=split)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: list[torch.LongTensor]) -> dict[str, float]:
    """``{"ppl", "nll", "tokens"}`` of ``model`` on ``batches``: mean next-token NLL (nats) over all predicted tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].to(torch.float64)
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += float(nll)
            count += int(targets.numel())
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def heldout_perplexity(model: torch.nn.Module, tokenizer: Any, source: str, **settings) -> dict[str, float]:
    """Perplexity on the held-out chunks of ``source`` with the card's settings (overridable by keyword)."""
    return perplexity(model, eval_batches(tokenizer, source, **{**EVAL_SETTINGS, **settings}))


@torch.inference_mode()
def _routing(model: torch.nn.Module, batches: list[torch.LongTensor]):
    """The MoE layers, and per layer the ``(router_logits [T, E], top_k_index [T, k])`` of every batch."""
    _, layers = moe_layers_or_error(model)
    sink: dict[int, list] = {layer.index: [] for layer in layers}

    def record(index, logits, top_k_index):
        sink[index].append((logits.detach().float().reshape(-1, logits.shape[-1]),
                            top_k_index.detach().reshape(-1, top_k_index.shape[-1])))

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with routing_recorded(model, record):
            for batch in batches:
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return layers, sink


def expert_usage(model: torch.nn.Module, batches: list[torch.LongTensor]) -> dict[int, list[float]]:
    """Decoder-layer index → per-expert share of routing slots (``count_e / (N * top_k)``, sums to 1)."""
    layers, sink = _routing(model, batches)
    usage = {}
    for layer in layers:
        index = torch.cat([top for _, top in sink[layer.index]])
        counts = torch.bincount(index.reshape(-1), minlength=layer.num_experts).to(torch.float64)
        usage[layer.index] = (counts / counts.sum()).tolist()
    return usage


def router_entropy(model: torch.nn.Module, batches: list[torch.LongTensor]) -> dict[int, float]:
    """Decoder-layer index → mean per-token entropy of the router softmax divided by ``log E``.

    1.0 means every token is routed by a uniform distribution (no preference); lower means the router
    commits to particular experts for particular tokens.
    """
    layers, sink = _routing(model, batches)
    result = {}
    for layer in layers:
        logits = torch.cat([lg for lg, _ in sink[layer.index]]).to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).mean()
        result[layer.index] = float(entropy / math.log(layer.num_experts))
    return result


def usage_summary(usage: dict[int, list[float]]) -> dict[int, dict[str, float]]:
    """Per layer: min and max share, max/min ratio and the normalised entropy of the usage distribution."""
    summary = {}
    for index, shares in usage.items():
        arr = np.asarray(shares, dtype=np.float64)
        nz = arr[arr > 0]
        entropy = float(-(nz * np.log(nz)).sum() / math.log(len(arr))) if len(arr) > 1 else 1.0
        summary[index] = {
            "min": float(arr.min()),
            "max": float(arr.max()),
            "max_over_min": float(arr.max() / arr.min()) if arr.min() > 0 else float("inf"),
            "entropy": entropy,
        }
    return summary


def expert_tokens(model: torch.nn.Module, batches: list[torch.LongTensor], tokenizer: Any, top: int = 5,
                  min_count: int = 20) -> dict[int, dict[str, Any]]:
    """How much the top-1 expert depends on the current token, per MoE layer.

    Returns decoder-layer index → ``{"token_purity": p, "baseline": b, "top_tokens": {expert: [str, ...]}}``.
    ``token_purity`` is the mean over token positions (whose token id occurs at least ``min_count``
    times) of ``max_e P(top-1 = e | token id)``; ``baseline`` is ``max_e P(top-1 = e)``, what the
    purity would be if routing ignored the token. ``top_tokens`` lists for each expert the ``top``
    token strings with the highest lift ``P(e | token) / P(e)`` among those tokens.
    """
    layers, sink = _routing(model, batches)
    ids = torch.cat([b.reshape(-1) for b in batches])
    result = {}
    for layer in layers:
        logits = torch.cat([lg for lg, _ in sink[layer.index]])
        top1 = logits.argmax(-1)
        num_e = layer.num_experts
        vocab = int(ids.max()) + 1
        joint = torch.zeros(vocab, num_e, dtype=torch.float64)
        joint.index_put_((ids, top1), torch.ones_like(ids, dtype=torch.float64), accumulate=True)
        per_token = joint.sum(1)
        keep = per_token >= min_count
        cond = joint[keep] / per_token[keep, None]
        weights = per_token[keep] / per_token[keep].sum()
        purity = float((cond.max(1).values * weights).sum())
        marginal = joint.sum(0) / joint.sum()
        lift = cond / marginal.clamp_min(1e-12)
        kept_ids = torch.nonzero(keep).reshape(-1)
        tops = {}
        for e in range(num_e):
            order = torch.argsort(lift[:, e], descending=True, stable=True)[:top]
            order = [int(i) for i in order if lift[i, e] > 0]  # an expert that is never top-1 has no tokens
            tops[str(e)] = [tokenizer.decode([int(kept_ids[i])]) for i in order]
        result[layer.index] = {"token_purity": purity, "baseline": float(marginal.max()), "top_tokens": tops}
    return result
