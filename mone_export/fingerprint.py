"""A fingerprint of a model's routed experts, which binds a pruning plan to the weights it was computed on.

A plan's statistics, scores and novice vectors describe one set of expert weights: exported onto another checkpoint
of the same shape (another seed, a fine-tune) it would silently prune the wrong experts and add the wrong novices.
The fingerprint is a SHA-256 over, per MoE layer, the router weight and every parameter of the fused experts
module: its name, its shape and a strided sample of :data:`SAMPLES_PER_EXPERT` values of each expert's slice,
as float32 (exact for fp32, fp16 and bf16 weights). It reads E × 256 values per tensor, not the weights, so it is
cheap for any model size and can be computed one layer at a time. It is a guard against the wrong checkpoint, not a
cryptographic seal: a change to values the sample does not visit goes unnoticed.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mone_export.adapters import MoeLayer, moe_layers_or_error

__all__ = ["FINGERPRINT_SCHEME", "SAMPLES_PER_EXPERT", "experts_fingerprint", "layer_fingerprint_update"]

FINGERPRINT_SCHEME = "mone-export/experts-fingerprint/v1"
SAMPLES_PER_EXPERT = 256


def _per_expert_sample(tensor: torch.Tensor) -> bytes:
    """``SAMPLES_PER_EXPERT`` evenly strided values of each expert's slice (leading dimension = experts)."""
    rows = tensor.detach().reshape(tensor.shape[0], -1)
    step = max(1, rows.shape[1] // SAMPLES_PER_EXPERT)
    sample = rows[:, ::step][:, :SAMPLES_PER_EXPERT]
    return sample.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def layer_fingerprint_update(digest, layer: MoeLayer) -> None:
    """Feed one MoE layer's router and expert weights (their sample) into ``digest``."""
    digest.update(f"layer {layer.index}\n".encode())
    tensors = [("router.weight", layer.router.weight), *sorted(layer.experts.named_parameters())]
    for name, tensor in tensors:
        digest.update(f"{name} {list(tensor.shape)}\n".encode())
        digest.update(_per_expert_sample(tensor))


def experts_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of the routed experts of an unpruned MoE model (see the module docstring)."""
    _, layers = moe_layers_or_error(model)
    digest = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\n")
    for layer in layers:
        layer_fingerprint_update(digest, layer)
    return "sha256:" + digest.hexdigest()
