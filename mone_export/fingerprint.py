"""A fingerprint of a model's routed experts, which binds a pruning plan to the weights it was computed on.

A plan's statistics, scores and novice vectors describe one set of expert weights: exported onto another checkpoint
of the same shape (another seed, a fine-tune) it would silently prune the wrong experts and add the wrong novices.
The fingerprint is a SHA-256 over, per MoE layer, the router weight and every parameter of the fused experts
module: its name, its shape and a strided sample of :data:`SAMPLES_PER_EXPERT` values of each expert's slice,
as float32 (exact for fp32, fp16 and bf16 weights). It reads E × 256 values per tensor, not the weights, so it is
cheap for any model size and can be computed one layer at a time. It is a guard against the wrong checkpoint, not a
cryptographic seal: a change to values the sample does not visit goes unnoticed.

The same checkpoint loaded in another dtype has other values, so a plan records one fingerprint per dtype it can
vouch for (:func:`experts_fingerprints`): the dtype it was computed in and, for float32 weights, their rounding to
float16 and bfloat16, which is exactly what loading the checkpoint in those dtypes does. A plan computed on fp32
weights therefore also binds to the fp16 model an fp16 export loads, and a plan computed on fp16 weights is checked
against an fp32 model by rounding that model's sample to fp16 (:func:`matches`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mone_export.adapters import MoeLayer, moe_layers_or_error

__all__ = ["FINGERPRINT_SCHEME", "FingerprintBuilder", "SAMPLES_PER_EXPERT", "experts_dtype",
           "experts_fingerprint", "experts_fingerprints", "layer_fingerprint_update", "matches"]

FINGERPRINT_SCHEME = "mone-export/experts-fingerprint/v1"
SAMPLES_PER_EXPERT = 256
ROUNDINGS_OF_FLOAT32 = (torch.float16, torch.bfloat16)
"""Dtypes a float32 checkpoint is commonly loaded in; a plan computed on fp32 weights records their fingerprints."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _per_expert_sample(tensor: torch.Tensor, rounded_to: torch.dtype | None = None) -> bytes:
    """``SAMPLES_PER_EXPERT`` evenly strided values of each expert's slice (leading dimension = experts)."""
    rows = tensor.detach().reshape(tensor.shape[0], -1)
    step = max(1, rows.shape[1] // SAMPLES_PER_EXPERT)
    sample = rows[:, ::step][:, :SAMPLES_PER_EXPERT].to("cpu")
    if rounded_to is not None:
        sample = sample.to(rounded_to)  # round-to-nearest-even, as loading the checkpoint in that dtype does
    return sample.to(torch.float32).contiguous().numpy().tobytes()


def layer_fingerprint_update(digest, layer: MoeLayer, rounded_to: torch.dtype | None = None) -> None:
    """Feed one MoE layer's router and expert weights (their sample, optionally rounded) into ``digest``."""
    digest.update(f"layer {layer.index}\n".encode())
    router = [(f"router.{name}", tensor) for name, tensor in sorted(layer.router.named_parameters())]
    tensors = [*router, *sorted(layer.experts.named_parameters())]
    for name, tensor in tensors:
        digest.update(f"{name} {list(tensor.shape)}\n".encode())
        digest.update(_per_expert_sample(tensor, rounded_to))


def experts_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's routed expert weights."""
    _, layers = moe_layers_or_error(model)
    return next(layers[0].experts.parameters()).dtype


def experts_fingerprint(model: nn.Module, rounded_to: torch.dtype | None = None) -> str:
    """``sha256:<hex>`` of the routed experts of an unpruned MoE model, optionally of their rounding to a dtype."""
    _, layers = moe_layers_or_error(model)
    digest = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\n")
    for layer in layers:
        layer_fingerprint_update(digest, layer, rounded_to)
    return "sha256:" + digest.hexdigest()


class FingerprintBuilder:
    """:func:`experts_fingerprints` built one MoE layer at a time (in layer order), for models streamed by layer."""

    def __init__(self, dtype: torch.dtype):
        roundings = [None] + (list(ROUNDINGS_OF_FLOAT32) if dtype == torch.float32 else [])
        names = [_dtype_name(dtype)] + [_dtype_name(d) for d in roundings[1:]]
        self._digests = {name: (hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\n"), rounded)
                         for name, rounded in zip(names, roundings)}

    def update(self, layer: MoeLayer) -> None:
        """Add the next MoE layer (its weights must be in memory)."""
        for digest, rounded in self._digests.values():
            layer_fingerprint_update(digest, layer, rounded)

    def result(self) -> dict[str, str]:
        """Dtype name → ``sha256:<hex>``, as :func:`experts_fingerprints` returns it."""
        return {name: "sha256:" + digest.hexdigest() for name, (digest, _) in self._digests.items()}


def experts_fingerprints(model: nn.Module) -> dict[str, str]:
    """Dtype name → fingerprint of the experts as loaded in that dtype: their own, and for float32 weights also
    their rounding to :data:`ROUNDINGS_OF_FLOAT32`."""
    _, layers = moe_layers_or_error(model)
    builder = FingerprintBuilder(experts_dtype(model))
    for layer in layers:
        builder.update(layer)
    return builder.result()


def matches(model: nn.Module, recorded: dict[str, str], computed_in: str) -> tuple[bool, str]:
    """Whether ``model``'s experts are the ones ``recorded`` (from :func:`experts_fingerprints` of a model whose
    experts were ``computed_in`` that dtype) describe; also the model's fingerprint that was compared.

    A model in a recorded dtype is compared as it is; one in a wider dtype (fp32 against an fp16 plan) is rounded to
    the plan's dtype first, which is what loading the same checkpoint in that dtype would have done.
    """
    own = _dtype_name(experts_dtype(model))
    if own in recorded:
        actual = experts_fingerprint(model)
        return actual == recorded[own], actual
    actual = experts_fingerprint(model, rounded_to=getattr(torch, computed_in))
    return actual == recorded.get(computed_in), actual
