"""The export report: ``report.json``, ``report.md`` (+ ``experts.png``) and the CLI's closing summary.

The report is a plain dict built by :func:`mone_export.export_pipeline.export_model` (keys below); this module only
renders and writes it, so the JSON, the markdown and the terminal summary always say the same thing.

Keys used: ``model``, ``model_type``, ``output``, ``dtype``, ``provider``, ``method``, ``ratio``, ``scope``,
``pruned`` (layer → expert ids), ``num_experts_per_layer`` (layer → E), ``weights`` (``unpruned_bytes``,
``pruned_bytes``, ``lower_bound_bytes``), ``validation`` (a :func:`mone_export.validate.validate_export` report or
None), ``passed``, ``seconds``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["REPORT_JSON", "REPORT_MD", "EXPERTS_PNG", "write_report", "render_markdown", "summary_text"]

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
EXPERTS_PNG = "experts.png"


def _mb(value: int | float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f} MB"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} ms"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}×"


def _pruned_rows(report: dict) -> list[tuple[str, int, int, list[int]]]:
    """(layer, pruned count, E, pruned ids) per MoE layer."""
    experts = report.get("num_experts_per_layer") or {}
    pruned = report.get("pruned") or {}
    layers = sorted({*experts, *pruned}, key=int)
    return [(layer, len(pruned.get(layer, [])), int(experts.get(layer, 0)), list(pruned.get(layer, [])))
            for layer in layers]


def _logit_extremes(validation: dict) -> tuple[float | None, float | None]:
    rows = validation.get("logits") or []
    prefill = next((r["max_abs_diff"] for r in rows if r["output"] == "logits at prefill"), None)
    decode = [r["max_abs_diff"] for r in rows if r["output"] != "logits at prefill"]
    return prefill, (max(decode) if decode else None)


def _session_bytes(memory: dict, key: str) -> int | None:
    session = memory.get(key) or {}
    return session.get("device_bytes") or session.get("session_peak_bytes")


# --- markdown -------------------------------------------------------------------------------------------------------


def render_markdown(report: dict) -> str:
    """The report as a markdown page (what ``report.md`` holds)."""
    lines = [f"# mone-export: {report.get('model_type', '?')} ({report.get('model', '?')})", ""]
    status = report.get("passed")
    verdict = "not validated" if status is None else ("**passed**" if status else "**FAILED**")
    lines += [
        f"- method `{report.get('method')}`, ratio {report.get('ratio')}, scope `{report.get('scope')}`; "
        f"{report.get('num_pruned', 0)} of {report.get('num_experts', 0)} routed experts pruned{_removed_text(report)}",
        f"- export: `{report.get('onnx', 'model.onnx')}`, dtype {report.get('dtype')}{_quant_text(report)}, "
        f"validated on "
        f"{report.get('provider')}: {verdict}",
        f"- plan: {report.get('plan_source', 'calibrated')}; calibration "
        f"{(report.get('calibration') or {}).get('source', 'n/a')}, "
        f"{(report.get('calibration') or {}).get('tokens', 'n/a')} tokens",
        "",
        "## Experts pruned per layer",
        "",
        "| layer | pruned | experts | pruned ids |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {layer} | {n} | {e} | {ids} |" for layer, n, e, ids in _pruned_rows(report)]
    weights = report.get("weights") or {}
    lines += [
        "",
        "## Weights",
        "",
        "| | bytes |",
        "| --- | --- |",
        f"| unpruned | {weights.get('unpruned_bytes', 'n/a')} ({weights.get('unpruned_source', '')}) |",
        f"| pruned export (model.onnx) | {weights.get('pruned_bytes', 'n/a')} |",
        f"| lower bound (parameters kept) | {weights.get('lower_bound_bytes', 'n/a')} |",
        f"| export / lower bound | {weights.get('ratio_to_bound', float('nan')):.4f}× "
        "(at most 1.005×: docs/graph.md#weight-bytes) |",
    ]
    validation = report.get("validation")
    if validation:
        lines += _validation_markdown(validation)
    if report.get("experts_png"):
        lines += ["", "## Expert scores", "", f"![experts]({EXPERTS_PNG})"]
    if report.get("seconds") is not None:
        lines += ["", f"Total time: {report['seconds']} s."]
    return "\n".join(lines) + "\n"


def _quant_text(report: dict) -> str:
    """``, int4 weights (block 128)`` for a quantised export and ``, GroupQueryAttention`` for fused attention."""
    quant = report.get("quantization")
    text = f", int{quant['bits']} weights (block {quant['block_size']})" if quant else ""
    return text + (", GroupQueryAttention" if report.get("attention") == "gqa" else "")


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


YARDSTICK_SECTIONS = ("half_precision", "quantization")
"""Validation report sections of an export judged against float32 by a yardstick (mone_export.half_precision)."""


def _yardstick(validation: dict) -> dict | None:
    """The yardstick verdict of a float16 or quantised export (None for an export judged by a fixed tolerance)."""
    return next((validation[key] for key in YARDSTICK_SECTIONS if validation.get(key)), None)


def _yardstick_names(half: dict) -> tuple[str, str, str]:
    """(report field prefix, yardstick label, export label); reports written before the labels were recorded are
    float16 verdicts."""
    return (half.get("yardstick_key", "torch_fp16"), half.get("yardstick_label", "PyTorch fp16"),
            half.get("export_label", "ONNX Runtime fp16"))


def _half_markdown(validation: dict) -> list[str]:
    """The float16 / quantised verdict: both errors against float32, the bound, greedy agreements, routing flips."""
    half = _yardstick(validation)
    key, label, export = _yardstick_names(half)
    routing = half.get("routing") or {}
    floor = (f"ε = max(atol {half['atol']:.0e}, one float16 ulp of the largest logit "
             f"{half['largest_reference_logit']:.3g})" if key == "torch_fp16" else f"ε = atol {half['atol']:.0e}")
    lines = [f"Judged against **{half['reference']}**, with {half['yardstick']} as the yardstick: ONNX Runtime's "
             f"max |Δ| may be at most {half['factor']} × {label}'s + ε = {half['factor']} × "
             f"{_g(half[f'{key}_max_abs_diff'])} + {half['epsilon']:.2g} = **{_g(half['bound'])}** ({floor}).", "",
             f"| output | {export} max abs diff | {label} max abs diff | bound | positions compared "
             f"| all positions: ONNX Runtime / {label} | |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in validation.get("logits", []):
        lines.append(f"| {row['output']} | {_g(row['max_abs_diff'])} | {_g(row[f'{key}_max_abs_diff'])} | "
                     f"{_g(row['tolerance'])} | {row['positions_compared']}/{row['positions']} | "
                     f"{_g(row['max_abs_diff_all_positions'])} / {_g(row[f'{key}_max_abs_diff_all_positions'])} "
                     f"| {'ok' if row['passed'] else 'FAIL'} |")
    if routing.get("available"):
        lines += ["", f"Routing against float32: ONNX Runtime sent {routing['onnx_flips']} token-layer(s) to other "
                      f"experts ({routing['onnx_near_ties']} at a near tie, {routing['onnx_beyond_near_tie']} "
                      f"beyond, {routing['onnx_downstream']} downstream of an earlier flip), {label} "
                      f"{routing[f'{key}_flips']}; near tie: float32 margin ≤ δ {routing['near_tie_margin']:.2g}. "
                      "Positions from a prompt's near-tie flip on are not compared."]
    else:
        lines += ["", "Routing of the export unknown (no named routing weights): every position is compared."]
    agreement = half.get("agreement")
    if agreement:
        lines += ["", f"Greedy agreement with float32: ONNX Runtime {agreement['onnx']}/{agreement['tokens']} "
                      f"new tokens, {label} {agreement[key]}/{agreement['tokens']} (must be at least "
                      f"{label}'s; a divergence at a near tie counts as agreement)."]
    return lines


def _validation_markdown(validation: dict) -> list[str]:
    half = _yardstick(validation)
    lines = ["", f"## Parity ({validation.get('provider')}, {validation.get('dtype')}, "
                 + (f"against float32, bound {_g(half['bound'])})" if half else f"atol {validation.get('atol'):.0e})"),
             "", f"Prompts: {validation['prompts']['count']} × {validation['prompts']['tokens']} tokens "
                 f"({validation['prompts']['source']}).", ""]
    if half:
        lines += _half_markdown(validation)
    else:
        lines += ["| output | max abs diff | mean abs diff | tolerance | |", "| --- | --- | --- | --- | --- |"]
        for row in validation.get("logits", []):
            lines.append(f"| {row['output']} | {row['max_abs_diff']:.3g} | {row['mean_abs_diff']:.3g} | "
                         f"{row['tolerance']:.0e} | {'ok' if row['passed'] else 'FAIL'} |")
    generation = validation.get("generation")
    if generation and not half:
        ties = generation.get("near_ties", 0)
        lines += ["", f"Greedy generation: {generation['identical']}/{generation['prompts']} prompts identical "
                      f"(up to {generation['new_tokens']} new tokens, ONNX Runtime loop vs `model.generate`)"
                      + (f"; {ties} diverged at a near tie (logits of both tokens within the tolerance)." if ties
                         else ".")]
    failures = validation.get("failures") or []
    if failures:
        lines += ["", "### Failures", ""] + [f"- {f['message']}" for f in failures]
    memory = validation.get("memory")
    if memory:
        lines += ["", "## Memory", "", "| | bytes |", "| --- | --- |",
                  f"| weights on disk | {memory['weight_bytes']} |",
                  f"| lower bound | {memory['lower_bound_bytes']} |",
                  f"| ORT session peak | {_session_bytes(memory, 'session') or 'n/a'} |"]
        if "unpruned_session" in memory:
            lines.append(f"| ORT session peak, unpruned export | {_session_bytes(memory, 'unpruned_session') or 'n/a'} |")
        method = (memory.get("session") or {}).get("method")
        if method:
            lines += ["", f"Session peak: {method}."]
    latency = validation.get("latency")
    if latency:
        lines += ["", f"## Latency ({latency['provider']}, {latency['threads']} threads; medians of "
                      f"{latency['prefill_repeats']} prefill / {latency['decode_repeats']} decode runs after "
                      f"{latency['warmup']} warm-up)", "",
                  f"| | prefill {latency['prefill_tokens']} tokens | decode, per token |", "| --- | --- | --- |"]
        names = {"onnx": "ONNX Runtime, this export", "onnx_unpruned": "ONNX Runtime, unpruned export",
                 "pytorch": "PyTorch eager (pruned model)"}
        for key, label in names.items():
            if key in latency:
                lines.append(f"| {label} | {_ms(latency[key]['prefill_ms'])} | "
                             f"{_ms(latency[key]['decode_ms_per_token'])} |")
        ratios = latency.get("ratios") or {}
        for other, label in (("onnx_unpruned", "unpruned export"), ("pytorch", "PyTorch eager")):
            if f"prefill_onnx_vs_{other}" in ratios:
                lines.append(f"| ratio to {label} | {_x(ratios[f'prefill_onnx_vs_{other}'])} | "
                             f"{_x(ratios[f'decode_onnx_vs_{other}'])} |")
    return lines


# --- terminal summary -----------------------------------------------------------------------------------------------


def _half_summary(validation: dict) -> str:
    """One line for a float16 / quantised verdict: ONNX Runtime's and the yardstick's errors against float32, the
    bound, agreement."""
    half = _yardstick(validation)
    key, label, export = _yardstick_names(half)
    text = (f"  parity ({validation['provider']}, {export.removeprefix('ONNX Runtime ')} vs float32 PyTorch): logits "
            f"max |Δ| {_g(half['onnx_max_abs_diff'])}, {label} {_g(half[f'{key}_max_abs_diff'])}, bound "
            f"{half['factor']}×{_g(half[f'{key}_max_abs_diff'])}+{half['epsilon']:.2g} = {_g(half['bound'])}")
    routing = half.get("routing") or {}
    if routing.get("onnx_near_ties"):
        text += (f"; {routing['onnx_near_ties']} routing near tie(s) (max |Δ| "
                 f"{_g(half['onnx_max_abs_diff_all_positions'])} from there on, not compared)")
    agreement = half.get("agreement")
    if agreement:
        text += (f"; greedy agreement with float32 {agreement['onnx']}/{agreement['tokens']} tokens "
                 f"({label} {agreement[key]}/{agreement['tokens']})")
    return text


def _removed_text(report: dict) -> str:
    """How many of a mixed plan's pruned experts were removed rather than made novices ("" for other plans)."""
    removed = sum((report.get("removed_per_layer") or {}).values())
    return f" ({removed} removed with their router rows, the rest novices)" if removed else ""


def summary_text(report: dict) -> str:
    """The CLI's closing summary: experts pruned per layer, weight bytes, parity figures, latency ratios."""
    if report.get("command") == "validate":
        lines = [f"validate: {report.get('output')} against {report.get('model')} "
                 f"({report.get('model_type', '?')}, method {report.get('method', '?')}, ratio {report.get('ratio', '?')})"]
    else:
        lines = [f"{report.get('command', 'export')}: {report.get('model')} ({report.get('model_type')}), method "
                 f"{report.get('method')}, ratio {report.get('ratio')}, scope {report.get('scope')}: "
                 f"{report.get('num_pruned', 0)} of {report.get('num_experts', 0)} routed experts pruned"
                 f"{_removed_text(report)}"]
    rows = _pruned_rows(report)
    if rows:
        lines.append("  pruned per layer: " + ", ".join(f"{layer}: {n}/{e}" for layer, n, e, _ in rows))
    weights = report.get("weights") or {}
    if weights:
        lines.append(f"  weights: {_mb(weights.get('unpruned_bytes'))} unpruned -> {_mb(weights.get('pruned_bytes'))} "
                     f"exported{_quant_text(report)}; lower bound {_mb(weights.get('lower_bound_bytes'))} "
                     f"(export = {weights.get('ratio_to_bound', 0):.4f}× the bound)")
    validation = report.get("validation")
    if validation:
        half = _yardstick(validation)
        if half:
            text = _half_summary(validation)
        else:
            prefill, decode = _logit_extremes(validation)
            text = (f"  parity ({validation['provider']}, {validation['dtype']}, atol {validation['atol']:.0e}): "
                    f"logits max |Δ| {prefill:.2g} at prefill")
            if decode is not None:
                text += f", {decode:.2g} over {len(validation['logits']) - 1} decode steps"
        generation = validation.get("generation")
        if generation and not half:
            text += (f"; greedy {generation['identical']}/{generation['prompts']} prompts identical "
                     f"({generation['new_tokens']} tokens)")
            if generation.get("near_ties"):
                text += f", {generation['near_ties']} near tie(s)"
        lines.append(text)
        memory = validation.get("memory") or {}
        peak = _session_bytes(memory, "session")
        if peak:
            text = f"  ORT session peak memory: {_mb(peak)}"
            base = _session_bytes(memory, "unpruned_session")
            if base:
                text += f" (unpruned export {_mb(base)})"
            lines.append(text)
        latency = validation.get("latency")
        if latency:
            ratios = latency.get("ratios") or {}
            text = (f"  latency: prefill {latency['prefill_tokens']} tokens {_ms(latency['onnx']['prefill_ms'])}, "
                    f"decode {_ms(latency['onnx']['decode_ms_per_token'])}/token")
            for other, label in (("onnx_unpruned", "unpruned export"), ("pytorch", "PyTorch eager")):
                if f"prefill_onnx_vs_{other}" in ratios:
                    text += (f"; vs {label} {_x(ratios[f'prefill_onnx_vs_{other}'])} prefill, "
                             f"{_x(ratios[f'decode_onnx_vs_{other}'])} decode")
            lines.append(text)
        for failure in validation.get("failures") or []:
            lines.append(f"  FAILED {failure['message']}")
        lines.append("  parity: " + ("passed" if validation.get("passed") else "FAILED"))
    elif report.get("command") != "validate":
        lines.append("  not validated (--no-validate)")
    if report.get("output") and report.get("command") != "validate":
        lines.append(f"wrote {report['output']}" + (f" in {report['seconds']} s" if report.get("seconds") else ""))
    return "\n".join(lines)


# --- files ----------------------------------------------------------------------------------------------------------


def _plot(plan, folder: Path) -> Path | None:
    try:
        from mone_export.experts_plot import plot_experts
    except ImportError:  # the plot is optional
        return None
    if plan is None or not getattr(plan, "experts", None):
        return None
    try:
        return plot_experts(plan, folder / EXPERTS_PNG)
    except Exception as exc:  # a picture must never fail an export
        logger.warning("experts.png not written: %s", exc)
        return None


def write_report(folder: str | os.PathLike, report: dict[str, Any], plan=None) -> list[Path]:
    """Write ``report.json``, ``report.md`` and (with a plan that has statistics) ``experts.png`` into ``folder``.

    Sets ``report["experts_png"]`` when the picture was written. Returns the written paths.
    """
    folder = Path(folder)
    written = []
    png = _plot(plan, folder)
    if png is not None:
        report["experts_png"] = EXPERTS_PNG
        written.append(png)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=1, default=str) + "\n")
    (folder / REPORT_MD).write_text(render_markdown(report))
    return [folder / REPORT_JSON, folder / REPORT_MD, *written]
