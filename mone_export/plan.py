"""The pruning plan (docs/plan.md): a versioned, self-describing, validated artifact.

On disk a plan is a folder with ``plan.json`` (everything but the novice vectors) and
``novices.safetensors`` (one ``[n_novices, H]`` float32 tensor per layer, key ``layers.{i}``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mone_export.errors import PlanMismatchError, UsageError

__all__ = ["PruningPlan", "PLAN_VERSION", "PLAN_FILE", "NOVICES_FILE"]

PLAN_VERSION = 3
"""Version 2 adds ``model.experts_fingerprints`` (dtype → fingerprint) and ``model.experts_dtype``, and binds
``novices.safetensors`` to ``plan.json``; version 3 adds ``removed`` (the pruned experts deleted with their router
rows in a ``mixed`` plan). 1 and 2 still load."""
READABLE_VERSIONS = (1, 2, 3)
PLAN_FILE = "plan.json"
NOVICES_FILE = "novices.safetensors"
logger = logging.getLogger(__name__)
FORMAT = "mone-export/pruning-plan"
REPLACEMENTS = ("novice", "zero", "remove", "mixed")


@dataclasses.dataclass
class PruningPlan:
    """Which routed experts of which MoE layer are pruned, how, and on what evidence.

    Attributes:
        pruned: decoder-layer index (in ``model.model.layers``) → sorted pruned expert indices.
        novices: decoder-layer index → ``[n_novices, H]`` float32 replacement vectors, rows in :meth:`novice_ids`
            order (means for ``mone``, zeros for ``mone-zero``, g²-weighted means for ``ne`` and ``auto``); empty
            for removal methods.
        removed: decoder-layer index → the pruned experts of a ``mixed`` plan (method ``auto``) that are deleted
            with their router rows, their tokens re-routed; the layer's other pruned experts are novices. Empty for
            every other plan (a ``remove`` plan deletes all of ``pruned``).
        method, replacement, ratio, scope, seed: how the plan was made.
        model: what the plan fits: ``model_type``, ``num_hidden_layers``, ``hidden_size``,
            ``num_experts`` (per MoE layer) and ``top_k`` (per MoE layer).
        calibration: the calibration data (source, samples, sequence length, seed, tokens).
        experts: per-layer per-expert statistics and scores (lists of floats), for reports.
        version: plan format version.
    """

    pruned: dict[int, list[int]]
    novices: dict[int, torch.Tensor]
    method: str
    replacement: str
    ratio: float
    scope: str
    seed: int
    model: dict[str, Any]
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    experts: dict[int, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    version: int | None = None
    removed: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.pruned = {int(k): sorted(int(e) for e in v) for k, v in sorted(self.pruned.items())}
        self.removed = {int(k): sorted(int(e) for e in v) for k, v in sorted(self.removed.items()) if v}
        if self.version is None or self.removed:  # a new plan, or a mixed one: the version it is written as
            self.version = max(self.version or 0, self._written_version())
        self.novices = {int(k): v for k, v in sorted(self.novices.items())}
        self.check()

    @classmethod
    def from_selection(cls, stats, scores, pruned, novices, removed=None, **how) -> "PruningPlan":
        """Build a plan from statistics, scores and a selection (used by :func:`mone_export.plan_pruning`)."""
        experts = {}
        for index, layer in stats.layers.items():
            experts[index] = {
                "score": scores[index].tolist(),
                "count": layer.count.tolist(),
                "frequency": layer.frequency.tolist(),
                "routing_score": layer.routing_score.tolist(),
                "phi_var": layer.phi_var.tolist(),
                "reap": layer.reap.tolist(),
                "novice_error": layer.novice_error.tolist(),
            }
            if layer.removal_error is not None:  # JSON has no infinity: None where removal is not possible
                experts[index]["removal_error"] = [v if math.isfinite(v) else None for v in layer.removal_error.tolist()]
        first = next(iter(stats.layers.values()))
        model = {
            "model_type": stats.model_type,
            "num_hidden_layers": stats.num_hidden_layers,
            "hidden_size": first.hidden_size,
            "num_experts": {i: l.num_experts for i, l in stats.layers.items()},
            "top_k": {i: l.top_k for i, l in stats.layers.items()},
        }
        if stats.experts_fingerprints:
            model["experts_fingerprints"] = dict(stats.experts_fingerprints)
            model["experts_dtype"] = stats.experts_dtype
        return cls(pruned=pruned, novices=novices, model=model, calibration=dict(stats.calibration), experts=experts,
                   removed=removed or {}, **how)

    # -- validation ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Internal consistency: known replacement, indices in range, novices shaped like ``pruned``."""
        if self.version not in READABLE_VERSIONS:
            raise UsageError(f"plan version {self.version} is not supported (this mone-export reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); make the plan again with this version.")
        if self.replacement not in REPLACEMENTS:
            raise UsageError(f"plan replacement {self.replacement!r} is not one of {REPLACEMENTS}.")
        num_experts = {int(k): int(v) for k, v in self.model.get("num_experts", {}).items()}
        hidden = int(self.model.get("hidden_size", 0))
        for index, experts in self.pruned.items():
            if index not in num_experts:
                raise UsageError(f"plan prunes layer {index}, which it does not list as a MoE layer.")
            if any(e < 0 or e >= num_experts[index] for e in experts) or len(set(experts)) != len(experts):
                raise UsageError(f"plan layer {index}: pruned experts {experts} are not distinct indices below {num_experts[index]}.")
            if len(experts) >= num_experts[index]:
                raise UsageError(f"plan layer {index} prunes all {num_experts[index]} experts; at least one must stay.")
        self._check_removed(num_experts)
        if self.replacement == "remove":
            if self.novices:
                raise UsageError("a removal plan carries no novice vectors.")
            return
        for index in self.pruned:
            novices = self.novice_ids(index)
            vectors = self.novices.get(index)
            if novices and (vectors is None or tuple(vectors.shape) != (len(novices), hidden)):
                shape = None if vectors is None else tuple(vectors.shape)
                raise UsageError(f"plan layer {index}: novice vectors have shape {shape}, expected {(len(novices), hidden)}.")

    def _check_removed(self, num_experts: dict[int, int]) -> None:
        """``removed`` only in a mixed plan, within ``pruned``, and leaving the router at least top_k experts."""
        if self.removed and self.replacement != "mixed":
            raise UsageError(f"a {self.replacement} plan lists removed experts; only a mixed plan does.")
        if self.replacement == "mixed" and not self.removed:
            raise UsageError("a mixed plan removes no expert; it would be a novice plan.")
        top_k = {int(k): int(v) for k, v in self.model.get("top_k", {}).items()}
        for index, experts in self.removed.items():
            if not set(experts) <= set(self.pruned.get(index, ())):
                raise UsageError(f"plan layer {index}: removed experts {experts} are not all pruned there.")
            if num_experts[index] - len(experts) < top_k.get(index, 1):
                raise UsageError(f"plan layer {index} removes {len(experts)} of {num_experts[index]} experts, fewer than "
                                 f"top_k={top_k.get(index)} would stay in the router.")

    def validate_for(self, model, check_weights: bool = True) -> None:
        """Raise :class:`PlanMismatchError` naming the mismatch when this plan does not fit ``model``.

        With ``check_weights`` the model's routed experts must also be the ones the plan was computed on (same
        :func:`~mone_export.fingerprint.experts_fingerprints`); a plan without a fingerprint (version 1) is accepted
        with a warning.
        """
        from mone_export.adapters import moe_layers_or_error

        adapter, layers = moe_layers_or_error(model)
        config = model.config
        expect = self.model
        if adapter.model_type != expect["model_type"]:
            raise PlanMismatchError(
                f"the plan is for model_type {expect['model_type']!r} but the model is {adapter.model_type!r}; "
                "apply it to the model it was made for."
            )
        other_model = "it was made for another model: apply it to that one, or prune this model again."
        if int(config.num_hidden_layers) != int(expect["num_hidden_layers"]):
            raise PlanMismatchError(f"the plan is for {expect['num_hidden_layers']} layers but the model has "
                                    f"{config.num_hidden_layers}; {other_model}")
        if int(config.hidden_size) != int(expect["hidden_size"]):
            raise PlanMismatchError(f"the plan is for hidden size {expect['hidden_size']} but the model has "
                                    f"{config.hidden_size}; {other_model}")
        have = {layer.index: layer.num_experts for layer in layers}
        want = {int(k): int(v) for k, v in expect["num_experts"].items()}
        if set(have) != set(want):
            raise PlanMismatchError(f"the plan's MoE layers {sorted(want)} differ from the model's {sorted(have)}; "
                                    f"{other_model}")
        for index, n in want.items():
            if have[index] != n:
                raise PlanMismatchError(
                    f"layer {index} has {have[index]} experts but the plan expects {n} (E mismatch); "
                    "apply the plan to the original, unpruned model."
                )
        if check_weights:
            self._check_fingerprint(model)

    def _check_fingerprint(self, model) -> None:
        from mone_export.fingerprint import matches

        recorded = self.model.get("experts_fingerprints")
        if not recorded:
            logger.warning("the plan records no experts fingerprint (plan version %s): cannot check that it was "
                           "computed on these weights", self.version)
            return
        computed_in = self.model.get("experts_dtype", "float32")
        same, actual = matches(model, recorded, computed_in)
        if not same:
            expected = recorded.get(computed_in, next(iter(recorded.values())))
            raise PlanMismatchError(
                f"the plan was computed on other weights (experts fingerprint {expected[:19]}..., this model's "
                f"{actual[:19]}...): calibrate this model instead, or pass --allow-other-weights to apply the plan "
                "anyway."
            )

    # -- derived --------------------------------------------------------------------------------------

    def _written_version(self) -> int:
        """Only a mixed plan needs version 3; any other is written as version 2, which earlier releases read."""
        return PLAN_VERSION if self.removed else 2

    def novice_ids(self, index: int) -> list[int]:
        """Pruned experts of layer ``index`` that become novices (all of them except a mixed plan's removed ones;
        none in a removal plan), in the order of the layer's novice rows."""
        if self.replacement == "remove":
            return []
        removed = set(self.removed.get(index, ()))
        return [e for e in self.pruned.get(index, ()) if e not in removed]

    def kept(self, index: int) -> list[int]:
        """Experts of layer ``index`` that stay real."""
        pruned = set(self.pruned.get(index, ()))
        return [e for e in range(int(self.model["num_experts"][index])) if e not in pruned]

    @property
    def num_pruned(self) -> int:
        """Total pruned routed experts."""
        return sum(len(v) for v in self.pruned.values())

    # -- persistence --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (novice vectors excluded; they live in safetensors)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "method": self.method,
            "replacement": self.replacement,
            "ratio": self.ratio,
            "scope": self.scope,
            "seed": self.seed,
            "model": {
                **self.model,
                "num_experts": {str(k): v for k, v in self.model["num_experts"].items()},
                "top_k": {str(k): v for k, v in self.model["top_k"].items()},
            },
            "calibration": self.calibration,
            "pruned": {str(k): v for k, v in self.pruned.items()},
            "removed": {str(k): v for k, v in self.removed.items()},
            "experts": {str(k): v for k, v in self.experts.items()},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``plan.json`` and ``novices.safetensors`` into ``directory`` (atomically, file by file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{k}": v.detach().to(torch.float32).contiguous() for k, v in self.novices.items()}
        # The novice file names the experts its rows belong to, and plan.json holds the file's hash: a novice file
        # of another plan (even one pruning as many experts) is rejected on load. The ids are tensors, not
        # metadata: safetensors writes a metadata map in random order, which would make the file (and hash) vary.
        tensors.update({f"{EXPERT_IDS_PREFIX}{k}": torch.tensor(self.novice_ids(k), dtype=torch.int64)
                        for k in self.novices})
        metadata = {"format": FORMAT}
        _atomic_write(directory / NOVICES_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
        data = {**self.to_dict(), "version": self._written_version(),
                "novices_sha256": _file_sha256(directory / NOVICES_FILE)}
        text = json.dumps(data, indent=1, sort_keys=True)
        _atomic_write(directory / PLAN_FILE, lambda p: p.write_text(text + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None, check_weights: bool = True) -> "PruningPlan":
        """Read a plan folder; with ``model``, also check that the plan fits it (and, with ``check_weights``, that
        it was computed on the same expert weights)."""
        directory = Path(directory)
        path = directory / PLAN_FILE
        if not path.is_file():
            raise UsageError(f"{directory} holds no {PLAN_FILE}; pass the folder a plan was saved to.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is not valid JSON ({exc}); save the plan again.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"{path} is not a mone-export pruning plan.")
        try:
            tensors = _load_novices(directory, data)
            plan = cls._from_dict(data, tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"{path} is not a complete pruning plan ({type(exc).__name__}: {exc}); "
                             "save the plan again.") from None
        if model is not None:
            plan.validate_for(model, check_weights=check_weights)
        return plan

    @classmethod
    def _from_dict(cls, data: dict, tensors: dict) -> "PruningPlan":
        spec = data["model"]
        return cls(
            pruned={int(k): v for k, v in data["pruned"].items()},
            novices={int(k.split(".", 1)[1]): v for k, v in tensors.items()},
            method=data["method"],
            replacement=data["replacement"],
            ratio=float(data["ratio"]),
            scope=data["scope"],
            seed=int(data["seed"]),
            model={
                **spec,
                "num_experts": {int(k): int(v) for k, v in spec["num_experts"].items()},
                "top_k": {int(k): int(v) for k, v in spec["top_k"].items()},
            },
            calibration=data.get("calibration", {}),
            experts={int(k): v for k, v in data.get("experts", {}).items()},
            version=int(data["version"]),
            removed={int(k): v for k, v in data.get("removed", {}).items()},
        )

    def summary(self) -> dict[str, Any]:
        """Short machine-readable summary: method, ratio, scope, pruned counts per layer."""
        return {
            "method": self.method,
            "ratio": self.ratio,
            "scope": self.scope,
            "pruned_per_layer": {str(k): len(v) for k, v in self.pruned.items()},
            "num_pruned": self.num_pruned,
            **({"removed_per_layer": {str(k): len(v) for k, v in self.removed.items()}} if self.removed else {}),
            "num_experts": int(sum(self.model["num_experts"].values())),
        }


EXPERT_IDS_PREFIX = "experts."
"""Tensors ``experts.{layer}`` in ``novices.safetensors``: the pruned expert ids, in the order of the novice rows."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_novices(directory: Path, data: dict) -> dict[str, torch.Tensor]:
    """The novice vectors of a plan folder, checked to belong to its ``plan.json``."""
    from safetensors import SafetensorError, safe_open

    path = directory / NOVICES_FILE
    if not path.is_file():
        if data.get("replacement") != "remove" and any(data.get("pruned", {}).values()):
            raise UsageError(f"{directory} has no {NOVICES_FILE}, which this {data.get('replacement')} plan needs; "
                             "copy the whole plan folder.")
        return {}
    expected_hash = data.get("novices_sha256")
    if expected_hash and _file_sha256(path) != expected_hash:
        raise UsageError(f"{path} does not belong to {directory / PLAN_FILE} (its hash differs from the one the plan "
                         "recorded): copy the plan folder as a whole.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                         "save the plan again.") from None
    rows = {int(key[len(EXPERT_IDS_PREFIX):]): tensors.pop(key).tolist() for key in list(tensors)
            if key.startswith(EXPERT_IDS_PREFIX)}
    if rows:
        # A layer that prunes nothing has an empty row in both files (ratio 0, or floor(ratio × E) = 0). The rows
        # are the novices: a mixed plan's removed experts have none.
        removed = {int(k): set(v) for k, v in data.get("removed", {}).items()}
        plan_rows = {int(k): sorted(int(e) for e in v if e not in removed.get(int(k), ()))
                     for k, v in data.get("pruned", {}).items()}
        for layer, ids in sorted(rows.items()):
            if plan_rows.get(layer) != sorted(ids):
                raise UsageError(f"{path} holds novices of layer {layer} for experts {sorted(ids)}, but the plan prunes "
                                 f"{plan_rows.get(layer, [])} there: the files come from different plans.")
    return tensors


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
