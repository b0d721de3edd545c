"""Half-precision exports judged by PyTorch's own half precision (docs/validation.md#half-precision).

An fp16 export is compared with the **float32** PyTorch model (the reference). The same model run by PyTorch in
float16 is the yardstick: it shows what half precision costs by itself. The export passes when

- logits: ONNX Runtime's max |Δ| against float32 ≤ :data:`FACTOR` × PyTorch fp16's max |Δ| + ε, at the prefill and
  every decode step (ε: :func:`epsilon`);
- greedy generation: ONNX Runtime agrees with float32 PyTorch on at least as many new tokens as PyTorch fp16 does.

**Routing near ties.** Top-k routing is discontinuous. Where the float32 router scores a token's k-th and
(k+1)-th experts almost equally, the float16 rounding of the hidden state decides which one the token takes, and
the two experts' outputs differ by a lot (one such token moves the bundled Mixtral's logits by 0.36). Which tokens
flip is luck: on 3072 held-out tokens ONNX Runtime fp16 flipped 2 / 5 / 3 token-layers of the bundled mixtral /
qwen2_moe / olmoe, PyTorch fp16 7 / 12 / 6, yet on the 96 tokens of the default prompts ONNX Runtime flipped one
(mixtral, qwen2_moe) where PyTorch fp16 flipped none. A bare max-error comparison on a few prompts is a lottery.
So both sides' routing is recorded and compared with float32's: ONNX Runtime's from the routing-weight values
``model.layers.{i}.{block}.routing_weights`` the export names (read as extra session outputs), PyTorch's from hooks
on the routers. A token-layer routed to other experts than in float32 is a *near tie* when float32 prefers its own
choice by a router-logit margin of at most δ = 2 × the largest change PyTorch fp16 makes to any router logit (away
from its own flips): a choice PyTorch's own half precision could make. Only a prompt's first flip is judged (later
ones see hidden states that flip already changed: "downstream"); a first flip beyond δ fails the check. From a
side's near-tie flip on (that token and, through attention, every later token of the prompt) its logits are not
compared; the report counts the flips and the positions compared. PyTorch fp16's own flips are never failures: they
only remove its positions from the yardstick.

**Quantised weights** (``--quant int4|int8``) are judged by the same rules with another yardstick
(:func:`quantized_yardstick`): the float32 PyTorch model whose quantised weights are replaced by exactly the values
the export's blocks stand for (:func:`mone_export.quantization.dequantized_model`). It shows what the weight format
costs by itself; ONNX Runtime's kernels (int8 activations at ``accuracy_level`` 4) may add at most half as much
again, plus ε = ``atol``. The report's section is ``quantization`` and its fields are prefixed ``torch_int4`` /
``torch_int8`` where a float16 export's are ``torch_fp16``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mone_export.adapters import routing_recorded

__all__ = ["FACTOR", "HALF_PRECISION", "NEAR_TIE_FACTOR", "Yardstick", "epsilon", "RouterRecorder", "routing_outputs",
           "float32_reference", "check_half_logits", "check_half_generation", "quantized_yardstick"]

logger = logging.getLogger(__name__)

FACTOR = 1.5
"""ONNX Runtime fp16 may have at most this many times PyTorch fp16's logits error (plus ε)."""

NEAR_TIE_FACTOR = 2.0
"""δ = this × PyTorch fp16's largest router-logit change: a flip moves two logits, each by up to that change."""

MAX_LISTED_FLIPS = 20
"""Routing flips listed one by one in the report (all are counted)."""

_ROUTING_VALUE = re.compile(r"^model\.layers\.(\d+)(?:\.[A-Za-z_]\w*)?\.routing_weights$")


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """What a reduced-precision export is measured by: PyTorch's own version of the same reduction.

    The float16 export's yardstick is the model run by PyTorch in float16 (:data:`HALF_PRECISION`); a quantised
    export's is the float32 model with the same weights quantised and dequantised (:func:`quantized_yardstick`): the
    error the weight format costs by itself, before ONNX Runtime's kernels add theirs.
    """

    key: str
    """Prefix of the yardstick's fields in the report (``torch_fp16`` → ``torch_fp16_max_abs_diff``)."""
    label: str
    """How messages name it (``PyTorch fp16``)."""
    description: str
    """The summary's ``yardstick`` field."""
    section: str
    """The validation report's section for the comparison (``half_precision``, ``quantization``)."""
    export_label: str
    """How messages name the export (``ONNX Runtime fp16``)."""
    half_ulp_floor: bool = False
    """ε has a floor of one float16 ulp of the largest logit (float16 logits land on a float16 grid)."""

    def epsilon(self, atol: float, reference_max_abs: float) -> float:
        """ε of the logits bound (:func:`epsilon` for float16 exports, ``atol`` otherwise)."""
        return epsilon(atol, reference_max_abs) if self.half_ulp_floor else float(atol)


HALF_PRECISION = Yardstick(key="torch_fp16", label="PyTorch fp16", description="PyTorch float16",
                           section="half_precision", export_label="ONNX Runtime fp16", half_ulp_floor=True)
"""The yardstick of a float16 export."""


def quantized_yardstick(name: str) -> Yardstick:
    """The yardstick of an export whose weights are quantised to ``name`` (``int4``, ``int8``)."""
    return Yardstick(key=f"torch_{name}", label=f"PyTorch {name}-weights",
                     description=f"PyTorch float32 with the export's {name} weights, dequantised",
                     section="quantization", export_label=f"ONNX Runtime {name}")


def epsilon(atol: float, reference_max_abs: float) -> float:
    """ε of the logits bound: the larger of ``atol`` and one float16 ulp at the reference's largest |logit|.

    The exported logits are float16 values, and so are PyTorch fp16's: two equally accurate float16 computations may
    land on neighbouring float16 values, an absolute difference the proportional bound cannot absorb when PyTorch
    fp16's own error happens to be small. One ulp of the largest logit (0.0156 for logits in [16, 32)) is that
    floor; ``atol`` (default 2e-2, ~one ulp of logits up to 32) keeps it from shrinking with small logits.
    """
    ulp = float(np.spacing(np.float16(min(float(reference_max_abs), 65504.0))))
    return max(float(atol), ulp)


def float32_reference(model):
    """The float32 PyTorch model: ``model`` itself, or a float32 copy of a half-precision one."""
    if next(p.dtype for p in model.parameters() if p.is_floating_point()) == torch.float32:
        return model
    logger.info("comparing against a float32 copy of the PyTorch model")
    return copy.deepcopy(model).float()


def routing_outputs(onnx_path: str | Path) -> dict[int, str]:
    """Decoder layer index → the name of its routing-weight value W ``[T, E]`` in the export (empty if unnamed)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    found = {}
    for node in proto.graph.node:
        for name in node.output:
            match = _ROUTING_VALUE.match(name)
            if match:
                found[int(match.group(1))] = name
    return dict(sorted(found.items()))


class RouterRecorder:
    """Records the routers of a PyTorch MoE model: per decoder layer, the last call's logits and chosen experts.

    Use as a context manager; :meth:`take` returns ``{layer: (logits [T, E] float64, selected [T, E] bool)}`` of the
    forward that just ran and starts afresh.
    """

    def __init__(self, model):
        self._model = model
        self._calls: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._recording = None

    def __enter__(self) -> "RouterRecorder":
        self._recording = routing_recorded(self._model, self._record)
        self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._recording.__exit__(*exc)
        self._recording = None

    def _record(self, index: int, logits: torch.Tensor, top_k_index: torch.Tensor) -> None:
        logits = logits.detach().reshape(-1, logits.shape[-1]).double()
        selected = torch.zeros(logits.shape, dtype=torch.bool).scatter_(
            1, top_k_index.detach().reshape(logits.shape[0], -1).long(), True)
        self._calls[index] = (logits, selected)

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The routing of the forward that just ran (see the class docstring)."""
        calls, self._calls = self._calls, {}
        return calls


# --- logits ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    """One compared step (the prefill or a decode step) of all three runs."""

    name: str
    positions: np.ndarray
    """[B, S] absolute positions of the step's tokens."""
    errors: dict[str, np.ndarray]
    """side (``onnx``, ``yardstick``) → [B, S] max |Δ| against float32 over the vocabulary."""
    mean: float
    """mean |Δ| of ONNX Runtime's logits against float32, all positions."""
    reference_max: float
    routing: dict[str, dict[int, np.ndarray]]
    """side (``reference``, ``onnx``, ``yardstick``) → layer → [B·S, E] selected experts."""
    reference_logits: dict[int, np.ndarray]
    """layer → [B·S, E] float32 router logits."""
    half_logits: dict[int, np.ndarray]
    """layer → [B·S, E] the yardstick's router logits."""


def _errors(side_logits, reference: torch.Tensor) -> np.ndarray:
    side = side_logits.detach().double().numpy() if isinstance(side_logits, torch.Tensor) else \
        np.asarray(side_logits, dtype=np.float64)
    return np.abs(side - reference.detach().double().numpy()).max(axis=-1)


def _numpy_routing(calls: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict]:
    return ({layer: selected.numpy() for layer, (_, selected) in calls.items()},
            {layer: logits.numpy() for layer, (logits, _) in calls.items()})


def _run_steps(probe, names: dict[int, str], reference, yardstick, prompts: torch.Tensor,
               decode_steps: int) -> list[_Step]:
    """Prefill and ``decode_steps`` greedy steps (float32's choice) of ONNX Runtime, float32 PyTorch and the
    yardstick."""
    from mone_export.reference import torch_step

    batch, length = prompts.shape
    ids = prompts.numpy()
    mask = np.ones((batch, length), dtype=np.int64)
    positions = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    past, ref_cache, half_cache = probe.empty_past(batch), None, None
    steps = []
    with RouterRecorder(reference) as ref_routes, RouterRecorder(yardstick) as half_routes:
        for step in range(decode_steps + 1):
            onnx_logits, past, extras = probe.run(ids, mask, positions, past)
            ref_logits, ref_cache = torch_step(reference, ids, mask, positions, ref_cache)
            half_logits, half_cache = torch_step(yardstick, ids, mask, positions, half_cache)
            ref_selected, ref_router = _numpy_routing(ref_routes.take())
            half_selected, half_router = _numpy_routing(half_routes.take())
            onnx_selected = {layer: extras[name].reshape(-1, extras[name].shape[-1]) > 0
                             for layer, name in names.items()}
            onnx_errors = _errors(onnx_logits, ref_logits)
            steps.append(_Step(
                name="logits at prefill" if step == 0 else f"logits at decode step {step}",
                positions=positions.copy(),
                errors={"onnx": onnx_errors, "yardstick": _errors(half_logits, ref_logits)},
                mean=float(np.abs(onnx_logits.astype(np.float64) - ref_logits.double().numpy()).mean()),
                reference_max=float(ref_logits.abs().max()),
                routing={"reference": ref_selected, "onnx": onnx_selected, "yardstick": half_selected},
                reference_logits=ref_router, half_logits=half_router))
            ids = ref_logits[:, -1].float().argmax(-1).reshape(batch, 1).numpy()
            total = length + step + 1
            mask = np.ones((batch, total), dtype=np.int64)
            positions = np.full((batch, 1), total - 1, dtype=np.int64)
    return steps


def _flips(steps: list[_Step], side: str) -> list[dict[str, Any]]:
    """Every token-layer ``side`` routed to other experts than float32, with float32's margin for its own choice.

    The margin is float32's router logit of the best expert it chose that ``side`` dropped minus that of the worst
    expert ``side`` took instead (≥ 0 for softmax routers: how much float32 prefers its choice); infinite when
    ``side`` selected fewer experts.
    """
    found = []
    for step in steps:
        batch, width = step.positions.shape
        for layer, want in step.routing["reference"].items():
            got = step.routing[side].get(layer)
            if got is None:
                continue
            for token in np.flatnonzero((got != want).any(axis=-1)):
                logits = step.reference_logits[layer][token]
                dropped, added = want[token] & ~got[token], got[token] & ~want[token]
                margin = float(logits[dropped].max() - logits[added].min()) if added.any() and dropped.any() \
                    else float("inf")
                prompt, offset = divmod(int(token), width)
                found.append({"step": step.name, "prompt": prompt, "position": int(step.positions[prompt, offset]),
                              "layer": int(layer), "float32_experts": np.flatnonzero(want[token]).tolist(),
                              "experts": np.flatnonzero(got[token]).tolist(), "margin": margin})
    return found


def _classify(flips: list[dict[str, Any]], delta: float | None) -> None:
    """Mark each flip ``near_tie``, ``beyond`` (float32 margin above ``delta``) or ``downstream``, in place.

    Only a prompt's first flip is judged: every later one (a later token, or a later layer of the same token) sees
    hidden states that flip already changed, so its margin says nothing about precision. ``delta`` None (the
    yardstick's own flips) makes every first flip a near tie.
    """
    judged: set[int] = set()
    for flip in sorted(flips, key=lambda f: (f["prompt"], f["position"], f["layer"])):
        if flip["prompt"] in judged:
            flip["kind"] = "downstream"
            continue
        judged.add(flip["prompt"])
        flip["kind"] = "near_tie" if delta is None or flip["margin"] <= delta else "beyond"


def _first_positions(flips: list[dict[str, Any]], batch: int) -> np.ndarray:
    """Per prompt, the position of its near-tie flip (``inf`` without one): from there on a side is not compared."""
    first = np.full(batch, np.inf)
    for flip in flips:
        if flip["kind"] == "near_tie":
            first[flip["prompt"]] = flip["position"]
    return first


def _near_tie_margin(steps: list[_Step], half_first: np.ndarray) -> float:
    """δ: :data:`NEAR_TIE_FACTOR` × the yardstick's largest router-logit change before its own first flips."""
    largest, fallback = 0.0, 0.0
    for step in steps:
        clean = (step.positions < half_first[:, None]).reshape(-1)
        for layer, reference in step.reference_logits.items():
            change = np.abs(step.half_logits[layer] - reference).max(axis=-1)
            fallback = max(fallback, float(change.max()))
            if clean.any():
                largest = max(largest, float(change[clean].max()))
    return NEAR_TIE_FACTOR * (largest if largest > 0 else fallback)


def _count(flips: list[dict[str, Any]], kind: str) -> int:
    return sum(flip["kind"] == kind for flip in flips)


def _compared_max(errors: np.ndarray, clean: np.ndarray) -> float | None:
    return float(errors[clean].max()) if clean.any() else None


def _row(step: _Step, onnx_first: np.ndarray, half_first: np.ndarray, key: str) -> dict[str, Any]:
    onnx_clean = step.positions < onnx_first[:, None]
    half_clean = step.positions < half_first[:, None]
    onnx, half = step.errors["onnx"], step.errors["yardstick"]
    return {"output": step.name, "max_abs_diff": _compared_max(onnx, onnx_clean), "mean_abs_diff": step.mean,
            "max_abs_diff_all_positions": float(onnx.max()), "positions": int(onnx.size),
            "positions_compared": int(onnx_clean.sum()),
            f"{key}_max_abs_diff": _compared_max(half, half_clean),
            f"{key}_max_abs_diff_all_positions": float(half.max()),
            f"{key}_positions_compared": int(half_clean.sum()), "finite": bool(np.isfinite(onnx).all())}


def _routing_failure(hard: list[dict[str, Any]], delta: float, kind: Yardstick):
    from mone_export.validate import ParityFailure

    worst = max(hard, key=lambda f: f["margin"])
    where = (f"{worst['step']}, prompt {worst['prompt']}, position {worst['position']}, layer {worst['layer']}: "
             f"experts {worst['experts']} instead of {worst['float32_experts']}")
    return ParityFailure("routing (experts chosen per token)",
                         f"{len(hard)} token-layer(s) routed to other experts than float32 PyTorch beyond a near tie; "
                         f"largest float32 margin {worst['margin']:.3g} ({where})",
                         f"near ties only: float32 margin ≤ δ {delta:.2g} (2 × {kind.label}'s largest router-logit "
                         "change)", worst["margin"])


def _logits_failures(rows: list[dict], bound: float, yardstick: float, eps: float, kind: Yardstick) -> list:
    from mone_export.validate import ParityFailure

    tolerance = f"{FACTOR} × {kind.label}'s {yardstick:.3g} + ε {eps:.2g} = {bound:.3g} (against float32 PyTorch)"
    failures = []
    for row in rows:
        if not row["passed"]:
            got = row["max_abs_diff"]
            if not row["finite"]:
                by = "non-finite logits"
            else:
                half = row[f"{kind.key}_max_abs_diff"]
                by = f"max |Δ| {got:.3g} (mean |Δ| {row['mean_abs_diff']:.3g}; {kind.label} " \
                     f"{'n/a' if half is None else f'{half:.3g}'})"
            failures.append(ParityFailure(row["output"], by, tolerance, got))
    if not any(row["positions_compared"] for row in rows):
        failures.append(ParityFailure("logits", "no position before a routing near tie was left to compare",
                                      "at least one compared position"))
    return failures


def check_half_logits(onnx_path: str | Path, provider: str, reference, yardstick, prompts: torch.Tensor,
                      decode_steps: int, atol: float, kind: Yardstick = HALF_PRECISION
                      ) -> tuple[list[dict], dict, list]:
    """Logits of a float16 (or quantised) export against float32 PyTorch, by a yardstick (module docstring).

    Args:
        onnx_path: the export's ``model.onnx``.
        provider: ONNX Runtime provider (``cpu``/``cuda``).
        reference: the float32 PyTorch model; ``yardstick``: the same model in float16 (or with the export's
            quantised weights), described by ``kind``.
        prompts: ``[B, L]`` token ids, prefilled as one batch, then ``decode_steps`` greedy steps (float32's choice).
        atol: the floor of ε (see :meth:`Yardstick.epsilon`).

    Returns:
        ``(rows, summary, failures)``: one row per step (``max_abs_diff`` is ONNX Runtime's error on the compared
        positions, ``tolerance`` the bound), the summary of the report's ``kind.section``, and the failed checks.
    """
    from mone_export.ort_session import OrtDecoder

    names = routing_outputs(onnx_path)
    probe = OrtDecoder(onnx_path, provider, extra_outputs=list(names.values()))
    steps = _run_steps(probe, names, reference, yardstick, prompts, decode_steps)
    del probe
    batch = prompts.shape[0]
    half_flips = _flips(steps, "yardstick")
    _classify(half_flips, None)
    half_first = _first_positions(half_flips, batch)
    delta = _near_tie_margin(steps, half_first)
    onnx_flips = _flips(steps, "onnx") if names else []
    _classify(onnx_flips, delta)
    onnx_first = _first_positions(onnx_flips, batch)
    key = kind.key
    rows = [_row(step, onnx_first, half_first, key) for step in steps]
    compared = [r[f"{key}_max_abs_diff"] for r in rows if r[f"{key}_max_abs_diff"] is not None]
    yard = max(compared) if compared else max(r[f"{key}_max_abs_diff_all_positions"] for r in rows)
    eps = kind.epsilon(atol, max(step.reference_max for step in steps))
    bound = FACTOR * yard + eps
    for row in rows:
        row["tolerance"] = bound
        row["passed"] = row["finite"] and (row["max_abs_diff"] is None or row["max_abs_diff"] <= bound)
    hard = [f for f in onnx_flips if f["kind"] == "beyond"]
    failures = _logits_failures(rows, bound, yard, eps, kind)
    if hard:
        failures.append(_routing_failure(hard, delta, kind))
    judged = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    summary = {
        "reference": "PyTorch float32", "yardstick": kind.description, "yardstick_key": kind.key,
        "yardstick_label": kind.label, "export_label": kind.export_label, "factor": FACTOR, "atol": float(atol),
        "epsilon": eps, "largest_reference_logit": max(step.reference_max for step in steps),
        f"{key}_max_abs_diff": yard, "bound": bound, "onnx_max_abs_diff": max(judged) if judged else None,
        "onnx_max_abs_diff_all_positions": max(r["max_abs_diff_all_positions"] for r in rows),
        f"{key}_max_abs_diff_all_positions": max(r[f"{key}_max_abs_diff_all_positions"] for r in rows),
        "routing": {
            "available": bool(names), "near_tie_margin": delta,
            "onnx_flips": len(onnx_flips), "onnx_near_ties": _count(onnx_flips, "near_tie"),
            "onnx_beyond_near_tie": len(hard), "onnx_downstream": _count(onnx_flips, "downstream"),
            f"{key}_flips": len(half_flips), f"{key}_near_ties": _count(half_flips, "near_tie"),
            "onnx": onnx_flips[:MAX_LISTED_FLIPS], key: half_flips[:MAX_LISTED_FLIPS],
        },
    }
    if not names:
        logger.warning("%s names no routing weights (model.layers.N.*.routing_weights): routing flips of ONNX "
                       "Runtime cannot be told apart, every position is compared", onnx_path)
    return rows, summary, failures


# --- greedy generation ----------------------------------------------------------------------------------------------


def _agreement(tokens: list[int], reference: list[int], reference_logits: list[torch.Tensor],
               bound: float) -> dict[str, Any]:
    """How far ``tokens`` follow float32's greedy ``reference``; a first difference at a near tie counts as agreement.

    A near tie: float32's logit of the token chosen instead is within ``bound`` (the logits bound) of its own top.
    """
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if first is None and len(tokens) != len(reference):
        first = min(len(tokens), len(reference))
    result: dict[str, Any] = {"tokens": tokens, "identical": first is None}
    if first is None:
        return {**result, "agreeing": len(reference)}
    margin = None
    if first < len(tokens) and first < len(reference) and first < len(reference_logits):
        step = reference_logits[first].double()
        margin = float(step[reference[first]] - step[tokens[first]])
    near_tie = margin is not None and margin <= bound
    return {**result, "first_difference": first, "margin": margin, "near_tie": near_tie,
            "agreeing": len(reference) if near_tie else first}


def check_half_generation(decoder, reference, yardstick, prompts: torch.Tensor, new_tokens: int,
                          bound: float, kind: Yardstick = HALF_PRECISION) -> tuple[dict, list]:
    """Greedy tokens of ONNX Runtime and of the yardstick (``kind``), each against float32's ``model.generate``.

    Agreement is the number of new tokens that follow float32's, a divergence at a near tie (float32's logits of the
    two tokens within ``bound``) counting as agreement for the rest of that prompt; ONNX Runtime's may not fall below
    the yardstick's. Returns ``(generation summary, failures)``.
    """
    from mone_export.ort_session import greedy_ort
    from mone_export.reference import eos_ids, greedy_torch
    from mone_export.validate import ParityFailure

    eos = eos_ids(reference)
    key = kind.key
    per_prompt, totals = [], {"onnx": 0, key: 0, "tokens": 0}
    for index, prompt in enumerate(prompts):
        want, logits = greedy_torch(reference, prompt, new_tokens, eos)
        half, _ = greedy_torch(yardstick, prompt, new_tokens, eos)
        onnx = _agreement(greedy_ort(decoder, prompt.numpy(), new_tokens, eos), want, logits, bound)
        fp16 = _agreement(half, want, logits, bound)
        totals["onnx"] += onnx["agreeing"]
        totals[key] += fp16["agreeing"]
        totals["tokens"] += len(want)
        per_prompt.append({"prompt": index, "torch": want, "identical": onnx["identical"],
                           "onnx": onnx.pop("tokens"), "onnx_agreement": onnx,
                           key: fp16.pop("tokens"), f"{key}_agreement": fp16,
                           **({"near_tie": True} if onnx.get("near_tie") else {})})
    failures = []
    if totals["onnx"] < totals[key]:
        failures.append(ParityFailure(
            "greedy agreement with float32 PyTorch",
            f"{kind.export_label} follows float32 on {totals['onnx']}/{totals['tokens']} new tokens, {kind.label} on "
            f"{totals[key]}/{totals['tokens']}",
            f"at least {kind.label}'s agreement (a divergence at a near tie within {bound:.2g} counts as agreement)",
            None))
    summary = {"new_tokens": new_tokens, "prompts": len(per_prompt), "reference": "PyTorch float32",
               "identical": sum(p["identical"] for p in per_prompt),
               f"{key}_identical": sum(p[f"{key}_agreement"]["identical"] for p in per_prompt),
               "near_ties": sum(bool(p.get("near_tie")) for p in per_prompt),
               "agreement": totals, "passed": not failures, "per_prompt": per_prompt}
    return summary, failures
