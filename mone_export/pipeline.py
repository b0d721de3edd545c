"""The library functions behind the CLI commands: each takes plain keyword arguments and returns a report dict."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from mone_export.calibration import MAX_CALIBRATION_TOKENS, calibration_batches, describe_source
from mone_export.distributed import (collect_stats_distributed, init_from_environment, is_distributed_launch,
                                     is_primary)
from mone_export.errors import UsageError
from mone_export.experts_plot import plot_experts
from mone_export.loading import check_output_dir, load_model, preflight_model, resolve_model_path, save_pruned
from mone_export.novices import apply_plan
from mone_export.scoring import DEFAULT_METHOD, check_ratio_feasible, method_or_error, plan_pruning, scope_or_error
from mone_export.stats import collect_stats

__all__ = ["CalibrationOptions", "check_pruning_options", "check_sequence_length", "calibrate_and_plan", "preflight",
           "prune", "parameter_bytes", "MAX_SEED"]

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
"""numpy's and torch's seeds are 64-bit; the random method draws from numpy."""


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """Which calibration data to run: source (built-in name or .txt/.jsonl path), samples, sequence length, seed,
    and the compute dtype of the calibration forward (``fp32``, ``bf16`` or ``fp16``; the statistics are float64
    whatever it is)."""

    source: str = "python-code"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    dtype: str = "fp32"

    def check(self) -> None:
        """Reject counts that cannot make a sample, a seed numpy cannot take, and unreadable calibration files."""
        from mone_export.calibration import check_source

        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed must be in [0, 2**63 - 1] (got {self.seed}).")
        if self.samples < 1:
            raise UsageError(f"--calib-samples must be at least 1 (got {self.samples}).")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (got {self.seq_len}).")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise UsageError(f"--calib-dtype must be fp32, bf16 or fp16 (got {self.dtype!r}).")
        if self.samples * self.seq_len > MAX_CALIBRATION_TOKENS:
            raise UsageError(f"--calib-samples {self.samples} × --seq-len {self.seq_len} = "
                             f"{self.samples * self.seq_len} calibration tokens is more than the "
                             f"{MAX_CALIBRATION_TOKENS} allowed; a few hundred thousand tokens are plenty.")
        check_source(self.source)


def check_sequence_length(config, seq_len: int) -> None:
    """Calibration sequences may not be longer than the model's context (``max_position_embeddings``)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > int(limit):
        raise UsageError(f"--seq-len {seq_len} is longer than the model's context of {limit} tokens "
                         "(max_position_embeddings); use at most that.")


def preflight(model, calib: CalibrationOptions | None = None):
    """Every check that needs no weights in memory (model files, calibration options and data); returns the config.

    Run before the first stage, so that a bad input costs seconds and is the only line the user sees.
    """
    config = preflight_model(model)
    if calib is not None:
        calib.check()
        check_sequence_length(config, calib.seq_len)
    return config


def check_pruning_options(method: str, scope: str, calib: CalibrationOptions) -> None:
    """Fail before any model is loaded on an unknown method or scope, or calibration counts that make no sample."""
    method_or_error(method)
    scope_or_error(scope)
    calib.check()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def calibrate_and_plan(model, tokenizer, ratio: float, method: str, scope: str, calib: CalibrationOptions,
                       progress: bool = True, scratch=None):
    """Calibrate ``model`` (in memory, or a :class:`~mone_export.streaming.LayerStreamedModel`) on ``calib`` and
    return ``(plan, stats)``; the model is not changed. A layer-streamed calibration spills hidden states that do
    not fit its memory budget into a folder under ``scratch`` (default: the temporary folder)."""
    from mone_export.streaming import LayerStreamedModel, collect_stats_streamed

    check_pruning_options(method, scope, calib)
    measure_removal = method_or_error(method).measures_removal  # auto: each expert's removal error, measured
    model = _in_compute_dtype(model, calib.dtype)
    vocab = int(model.config.vocab_size)
    batches = calibration_batches(calib.source, tokenizer, calib.samples, calib.seq_len, seed=calib.seed,
                                  batch_size=calib.batch_size, vocab_size=vocab)
    info = {**describe_source(calib.source), "samples": calib.samples, "seq_len": calib.seq_len, "seed": calib.seed,
            "compute_dtype": calib.dtype}
    if is_distributed_launch():  # started by torchrun: this rank calibrates its share, all merge (distributed.py)
        init_from_environment()
        stats = collect_stats_distributed(model, list(batches), progress=progress, calibration=info,
                                          measure_removal=measure_removal)
    elif isinstance(model, LayerStreamedModel):  # one decoder layer in memory at a time
        stats = collect_stats_streamed(model, batches, progress=progress, calibration=info, scratch=scratch,
                                       measure_removal=measure_removal)
    else:
        stats = collect_stats(model, batches, progress=progress, calibration=info, measure_removal=measure_removal)
    return plan_pruning(stats, ratio, method=method, scope=scope, seed=calib.seed), stats


def _in_compute_dtype(model, dtype: str):
    """``model`` for a calibration forward in ``dtype``: itself when it already computes in it, else a copy (in
    memory) or the same checkpoint streamed in that dtype (a :class:`~mone_export.streaming.LayerStreamedModel`)."""
    from mone_export.loading import parse_dtype
    from mone_export.streaming import LayerStreamedModel

    target = parse_dtype(dtype)
    if isinstance(model, LayerStreamedModel):
        return model if model.dtype == target else LayerStreamedModel(model.folder, dtype=target)
    current = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if current == target:
        return model
    logger.info("calibrating a %s copy of the model", dtype)
    # Parameters only, as loading in that dtype does: buffers such as the rotary inv_freq stay float32.
    converted = copy.deepcopy(model)
    for parameter in converted.parameters():
        parameter.data = parameter.data.to(target)
    return converted


def secondary_rank_report(command: str, plan) -> dict:
    """What a rank other than 0 of a distributed launch returns: it calibrated its share; rank 0 writes."""
    import torch.distributed as dist

    return {"command": command, "rank": dist.get_rank(), "world_size": dist.get_world_size(), **plan.summary(),
            "output_written": False, "exit_code": 0}


def prune(model: str, ratio: float, output: str, method: str = DEFAULT_METHOD, scope: str = "layer",
          calib: CalibrationOptions = CalibrationOptions(), dtype: str = "fp32", overwrite: bool = False,
          progress: bool = True) -> dict:
    """Load → calibrate → plan → apply → save the pruned model and its plan into ``output``; return the report."""
    from mone_export.calibration import source_path

    started = time.perf_counter()
    check_output_dir(output, overwrite, {"model folder": resolve_model_path(model),
                                         "calibration data": source_path(calib.source)})
    check_pruning_options(method, scope, calib)
    preflight(model, calib)
    loaded, tokenizer = load_model(model, dtype=dtype)
    check_ratio_feasible(loaded, ratio, method, scope)
    before = parameter_bytes(loaded)
    plan, _ = calibrate_and_plan(loaded, tokenizer, ratio, method, scope, calib, progress)
    if not is_primary():
        return secondary_rank_report("prune", plan)
    apply_plan(loaded, plan)
    report = {
        "command": "prune",
        "model": str(model),
        "model_type": plan.model["model_type"],
        "output": str(Path(output)),
        **plan.summary(),
        "pruned": {str(k): v for k, v in plan.pruned.items()},
        "calibration": plan.calibration,
        "parameter_bytes_before": before,
        "parameter_bytes_after": parameter_bytes(loaded),
    }

    def write_reports(folder: Path) -> None:
        plot_experts(plan, folder / "experts.png")
        report["seconds"] = round(time.perf_counter() - started, 2)
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    save_pruned(loaded, tokenizer, plan, output, overwrite=overwrite, extra_files=write_reports)
    return report
