"""The library functions behind ``mone-export [export]`` and ``mone-export validate``.

:func:`export_model`: load → calibrate and plan (or load a saved plan) → apply → export to ONNX (graph passes
included) → write the output folder atomically → validate against the pruned PyTorch model → ``report.json``,
``report.md`` and ``experts.png`` in the folder. Validation runs on the folder before it replaces the previous
output, so the report is part of the same atomic write; a failure of any stage leaves the previous output intact
and no temporary files. A *parity* failure never replaces the previous output either: the export and its report
are dropped, or with ``keep_failed`` committed to ``OUT.failed`` beside it (what one debugs with), and
:class:`~mone_export.errors.ParityError` is raised afterwards (CLI exit code 1).

:func:`validate_folder`: re-check an existing export folder against the PyTorch model rebuilt from the original
weights (``source_model`` in ``report.json``, or ``model=``) and the folder's plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE
from mone_export.architectures import check_exportable
from mone_export.errors import UsageError
from mone_export.pipeline import CalibrationOptions
from mone_export.scoring import DEFAULT_METHOD
from mone_export.process_memory import available_memory_bytes

__all__ = ["EXPORT_DTYPES", "STREAMING_MEMORY_FRACTION", "check_onnx_file", "export_model", "export_model_streamed",
           "find_plan_dir", "resolve_output", "use_streaming", "validate_folder", "ExportOptions", "resolve_moe_form"]

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("fp32", "fp16")
"""Export dtypes that can be validated (numpy has no bfloat16; ``bf16`` exports need ``validate=False``)."""

def resolve_output(output: str | os.PathLike) -> Path:
    """The output folder of ``-o``: ``out/model.onnx`` and ``out/`` both mean the folder ``out``."""
    from mone_export.export import MODEL_FILE

    path = Path(output)
    if path.suffix.lower() == ".onnx":
        if path.name != MODEL_FILE:
            raise UsageError(f"-o {output}: the model file is always named {MODEL_FILE} (the name onnxruntime-genai "
                             f"reads); pass -o {path.parent / MODEL_FILE} or the folder -o {path.parent}/.")
        return path.parent
    return path


def find_plan_dir(path: str | os.PathLike) -> Path:
    """A plan folder (``plan.json`` inside), or an export/prune output folder that holds one under ``plan/``."""
    from mone_export.plan import PLAN_FILE

    path = Path(path)
    if (path / PLAN_FILE).is_file():
        return path
    if (path / "plan" / PLAN_FILE).is_file():
        return path / "plan"
    raise UsageError(f"--plan {path}: no {PLAN_FILE} there or in {path / 'plan'}; pass the folder a plan was saved "
                     "to (or an output folder of mone-export prune/export).")


def _dtype_name(dtype: str, validate: bool) -> str:
    import torch

    from mone_export.loading import parse_dtype

    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[parse_dtype(dtype)]
    if validate and name not in EXPORT_DTYPES:
        raise UsageError(f"--dtype {name} exports cannot be validated here (numpy has no bfloat16); "
                         "pass --no-validate or use fp32/fp16.")
    return name


class _Stages:
    """Times each pipeline stage; a bar on a terminal, one line per finished stage in logs, silent without progress.

    The line is written when a stage *ends* ("load: 0.8 s"), so that an input error found during a stage is the only
    line on standard error.
    """

    def __init__(self, names: list[str], progress: bool):
        from mone_export.progress import progress_bar

        self.names = names
        self.bar = progress_bar(total=len(names), desc="mone-export", unit="stage", enabled=progress)
        self.log = logger.info if progress and self.bar.disable else logger.debug
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)
        self.bar.update(1)
        self.log("[%d/%d] %s: %.1f s", len(self.seconds), len(self.names), name, self.seconds[name])

    def close(self) -> None:
        self.bar.close()


def _source_record(model: str) -> dict:
    from mone_export.loading import resolve_model_path

    return {"model": str(model), "source_model": str(resolve_model_path(model).resolve())}


def failed_output_path(folder: str | os.PathLike) -> Path:
    """Where ``--keep-failed`` keeps an export that failed its parity check: ``OUT.failed`` beside ``OUT``."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".failed")


def run_inputs(model, plan_dir=None, calib: CalibrationOptions | None = None) -> dict:
    """What a run reads (label → path), which its output may not overlap."""
    from mone_export.calibration import source_path
    from mone_export.loading import resolve_model_path

    return {"model folder": resolve_model_path(model), "plan folder": plan_dir,
            "calibration data": source_path(calib.source) if calib is not None else None}


def check_tolerance(atol: float | None) -> None:
    """A logits tolerance must be a finite non-negative number (NaN would make every check fail, inf none)."""
    if atol is not None and not (math.isfinite(atol) and atol >= 0):
        raise UsageError(f"--atol must be a finite number >= 0 (got {atol}).")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_model` prunes, writes and checks a model (the CLI's options, as one value)."""

    method: str = DEFAULT_METHOD
    """Scoring and replacement method (see ``mone-export prune``)."""
    scope: str = "layer"
    """Experts ranked per layer or globally."""
    calib: CalibrationOptions = CalibrationOptions()
    """Calibration data."""
    dtype: str = "fp32"
    """``fp32`` or ``fp16`` (``bf16`` only with ``validate=False``)."""
    provider: str = "cpu"
    """ONNX Runtime provider of the validation: ``cpu`` or ``cuda``."""
    quant: str = "none"
    """Weights in the export: ``none`` (the ``dtype``), ``int4`` or ``int8`` (block-wise ``MatMulNBits`` /
    ``GatherBlockQuantized``, routers and novice biases in float32: :mod:`mone_export.quantization`). Needs
    ``dtype="fp32"``."""
    quant_block_size: int = DEFAULT_BLOCK_SIZE
    """Elements per quantisation block along the contraction dimension (a power of two >= 16)."""
    quant_accuracy_level: int = 4
    """``MatMulNBits`` accuracy level: 4 (int8 activations, the fast CPU path) or 0 (float activations)."""
    attention: str = "auto"
    """Graph form of attention: ``plain`` (standard ops, any ONNX runtime), ``gqa`` (one
    ``com.microsoft.GroupQueryAttention`` per layer: :mod:`mone_export.fused_attention`), ``auto`` (``gqa`` where
    it computes the model's attention; ``plain`` for ``provider="cuda"`` and in a layer-streamed run)."""
    moe_form: str = "auto"
    """Graph form of the routed experts (:func:`resolve_moe_form`): ``dispatch``, ``fused``, or ``auto`` (fused for
    ``provider="cuda"``)."""
    validate: bool = True
    """Check parity, memory and latency (docs/validation.md); for the latency comparison the unpruned model is also
    exported, into the run's scratch folder."""
    atol: float | None = None
    """Absolute logits tolerance (default per dtype, see :data:`mone_export.validate.TOLERANCES`)."""
    validation_options: dict | None = None
    """Fields of :class:`mone_export.validate.ValidationOptions` (``decode_steps``, ``new_tokens``, ``latency``, ...)."""
    keep_failed: bool = False
    """When the parity check fails, keep the export in ``OUT.failed`` (see :func:`failed_output_path`) for debugging;
    the output is never replaced by a failed export."""
    overwrite: bool = False
    """Replace a previous mone-export output."""
    allow_other_weights: bool = False
    """Export a saved plan onto weights other than those it was computed on (refused by default)."""
    streaming: str = "auto"
    """``on``: load, calibrate, export and validate one decoder layer at a time (models larger than memory:
    :func:`export_model_streamed`); ``off``: the whole model in memory; ``auto``: ``on`` when the checkpoint's weights
    exceed :data:`STREAMING_MEMORY_FRACTION` of the available memory."""
    progress: bool = True
    """Progress bars (on a terminal) or one line per finished stage (in logs)."""


def export_model(model: str | os.PathLike, ratio: float | None, output: str | os.PathLike,
                 options: ExportOptions | None = None, *, plan_dir: str | os.PathLike | None = None,
                 **overrides) -> dict:
    """Prune ``model`` with MoNE (or a baseline) and export it to an ONNX Runtime folder; return the report.

    Args:
        model: a bundled model name or a local Hugging Face checkpoint folder.
        ratio: fraction of routed experts pruned per MoE layer, in [0, 1); 0 exports the unpruned model (the
            reference). Ignored (may be None) with ``plan_dir``, which brings its own.
        output: the output folder, or ``folder/model.onnx``. It may not overlap the model, the plan or the
            calibration data.
        options: how to prune, write and check (:class:`ExportOptions`); ``overrides`` replace single fields, e.g.
            ``export_model("mixtral", 0.5, "out", dtype="fp16", validate=False)``.
        plan_dir: export from this saved plan (a plan folder, or an output folder with ``plan/``) without calibrating.

    Returns:
        The report (also written to ``report.json``/``report.md``).

    Raises:
        UsageError: bad input; nothing is written.
        ParityError: the export differs from PyTorch beyond tolerance; ``output`` is left as it was (see
            ``keep_failed``) and the error's ``report`` attribute holds the report.
    """
    from mone_export import __version__
    from mone_export.errors import ParityError
    from mone_export.export import MODEL_FILE, export_onnx, lower_bound_bytes, weight_bytes
    from mone_export.distributed import is_primary
    from mone_export.onnx_utils import rotary_table_bytes
    from mone_export.fused_attention import check_attention_form, resolve_attention
    from mone_export.loading import check_output_dir, load_model
    from mone_export.novices import apply_plan
    from mone_export.output_folder import output_folder
    from mone_export.pipeline import calibrate_and_plan, check_pruning_options, preflight, secondary_rank_report
    from mone_export.plan import PruningPlan
    from mone_export.report import write_report
    from mone_export.safe_output import RunScratch
    from mone_export.scoring import check_ratio_feasible
    from mone_export.validate import check_provider, raise_for_failures, validate_export

    options = dataclasses.replace(options or ExportOptions(), **overrides)
    method, scope, calib, provider, validate = (options.method, options.scope, options.calib, options.provider,
                                                options.validate)
    atol, progress, overwrite, keep_failed = options.atol, options.progress, options.overwrite, options.keep_failed
    started = time.perf_counter()
    folder = resolve_output(output)
    dtype = _dtype_name(options.dtype, validate)
    check_tolerance(atol)
    plan_path = find_plan_dir(plan_dir) if plan_dir is not None else None
    inputs = run_inputs(model, plan_path, None if plan_path else calib)
    check_output_dir(folder, overwrite, inputs)
    failed_folder = failed_output_path(folder)
    if keep_failed and validate:
        check_output_dir(failed_folder, True, inputs)
    if plan_path is None:
        if ratio is None:
            raise UsageError("--ratio is required (or --plan DIR to export a saved plan).")
        check_pruning_options(method, scope, calib)
    if validate:
        check_provider(provider)
    form = resolve_moe_form(options.moe_form, provider)
    quantization = _quantization(options, dtype, form)
    check_attention_form(options.attention)
    preflight(model, None if plan_path else calib)
    if use_streaming(model, options.streaming):
        if quantization is not None:
            raise UsageError("--quant is not available in a layer-streamed run yet; pass --streaming off if the "
                             "model fits in memory, or export without --quant.")
        if options.attention == "gqa":
            raise UsageError("--attention gqa is not available in a layer-streamed run yet; pass --streaming off if "
                             "the model fits in memory, or --attention plain.")
        return export_model_streamed(model, ratio, folder, dataclasses.replace(options, dtype=dtype, moe_form=form),
                                     plan_path)
    source = _source_record(str(model))

    stages = ["load", "load plan" if plan_path else "calibrate", "export", "report"]
    # The unpruned export only serves the memory and latency comparisons: skip it when both are off.
    checks = options.validation_options or {}
    compare_unpruned = validate and (checks.get("memory", True) or checks.get("latency", True))
    if compare_unpruned:
        stages[2:2] = ["export unpruned"]
    if validate:
        stages[-1:-1] = ["validate"]
    run = _Stages(stages, progress)
    validation = None
    try:
        with run.stage("load"):
            loaded, tokenizer = load_model(model, dtype="fp32")
            check_exportable(loaded.config)  # before minutes of calibration
            attention = resolve_attention(options.attention, loaded, provider)
            if plan_path is None:
                check_ratio_feasible(loaded, ratio, method, scope)
        if plan_path is not None:
            with run.stage("load plan"):
                plan = PruningPlan.load(plan_path, model=loaded, check_weights=not options.allow_other_weights)
        else:
            with run.stage("calibrate"):
                plan, _ = calibrate_and_plan(loaded, tokenizer, ratio, method, scope, calib, progress)
            if not is_primary():
                return secondary_rank_report("export", plan)
        unpruned_bound = lower_bound_bytes(loaded, dtype)
        with RunScratch(folder) as scratch, contextlib.ExitStack() as writing:
            baseline = None
            if compare_unpruned:
                with run.stage("export unpruned"):
                    if plan.num_pruned:
                        baseline = scratch.folder("unpruned")
                        export_onnx(loaded, baseline, dtype=dtype, progress=False, moe_form=form,
                                    quantization=quantization, attention=attention)
            apply_plan(loaded, plan)
            report = {
                "command": "export",
                "mone_export_version": __version__,
                **source,
                "model_type": plan.model["model_type"],
                "output": str(folder),
                "onnx": str(folder / MODEL_FILE),
                "dtype": dtype,
                "quantization": None if quantization is None else quantization.to_dict(),
                "attention": attention,
                "provider": provider,
                "moe_form": form,
                **plan.summary(),
                "pruned": {str(k): v for k, v in plan.pruned.items()},
                "num_experts_per_layer": {str(k): int(v) for k, v in plan.model["num_experts"].items()},
                "plan_source": str(plan_path) if plan_path else "calibrated",
                "calibration": plan.calibration,
            }
            with run.stage("export"):
                # Exits first (LIFO): the folder replaces the previous output, then the scratch folder goes.
                tmp = writing.enter_context(
                    output_folder(loaded, tokenizer, _exporter(loaded, dtype, form, quantization, attention), folder,
                                  plan=plan, overwrite=overwrite, dtype=dtype, share_kv_buffer=attention == "gqa"))
            pruned_bytes = weight_bytes(tmp / MODEL_FILE)
            # the fused attention's cos/sin tables count beside the parameters, as in validation
            tables = rotary_table_bytes(tmp / MODEL_FILE)
            bound = lower_bound_bytes(loaded, dtype) + tables
            report["weights"] = {
                "unpruned_bytes": weight_bytes(baseline / MODEL_FILE) if baseline else
                (pruned_bytes if not plan.num_pruned else unpruned_bound),
                "unpruned_source": "unpruned export" if baseline else
                ("this export (ratio 0)" if not plan.num_pruned else "parameters of the unpruned model"),
                "pruned_bytes": pruned_bytes,
                "lower_bound_bytes": bound,
                "rotary_table_bytes": tables,
                "ratio_to_bound": pruned_bytes / bound,
            }
            if validate:
                with run.stage("validate"):
                    validation = validate_export(tmp, loaded, provider=provider, atol=atol, baseline_dir=baseline,
                                                 tokenizer=tokenizer, progress=progress, **checks)
                validation["onnx"] = report["onnx"]
            report["validation"] = validation
            report["passed"] = None if validation is None else validation["passed"]
            report["exit_code"] = 0 if validation is None or validation["passed"] else 1
            failed = report["passed"] is False
            if failed:
                # A failed export never replaces the previous output; on request it is kept beside it.
                report["output_written"] = False
                report["kept_failed"] = str(failed_folder) if keep_failed else None
                if keep_failed:  # the report written there names where its files are
                    report["output"], report["onnx"] = str(failed_folder), str(failed_folder / MODEL_FILE)
                    validation["onnx"] = report["onnx"]
            with run.stage("report"):
                report["timings"] = dict(run.seconds)
                report["seconds"] = round(time.perf_counter() - started, 2)
                write_report(tmp, report, plan)
            if failed:
                if keep_failed:
                    scratch.commit(tmp, failed_folder)
                raise_for_failures(validation)
    except ParityError as exc:
        exc.report = report
        raise
    finally:
        run.close()
    return report


STREAMING_MEMORY_FRACTION = 0.25
"""``streaming="auto"`` streams when the checkpoint's weights exceed this share of the available memory (an
in-memory run peaks at several times the checkpoint's bytes: the model, the traced graph, ONNX Runtime's session)."""


def resolve_moe_form(moe_form: str, provider: str) -> str:
    """The experts' graph form for ``--moe-form`` (``auto``: ``fused`` for the CUDA provider, where the branch form's
    ``NonZero`` per expert would sync the stream, else ``dispatch``, the fastest form on the CPU provider)."""
    from mone_export.moe_export_forward import MOE_FORMS

    if moe_form == "auto":
        return "fused" if provider == "cuda" else "dispatch"
    if moe_form not in MOE_FORMS:
        raise UsageError(f"--moe-form must be auto, {' or '.join(MOE_FORMS)} (got {moe_form!r}).")
    return moe_form


def _exporter(model, dtype: str, form: str, quantization=None, attention: str = "plain"):
    """Writes ``model``'s export in graph form ``form`` to the path it is given (for the output folder)."""
    from mone_export.export import export_onnx

    return lambda target: export_onnx(model, target, dtype=dtype, progress=False, moe_form=form,
                                      quantization=quantization, attention=attention)


def _quantization(options: ExportOptions, dtype: str, form: str):
    """The export's :class:`~mone_export.quantization.WeightQuantization` (None without ``--quant``), checked."""
    from mone_export.quantization import quantization_config

    quantization = quantization_config(options.quant, options.quant_block_size, options.quant_accuracy_level)
    if quantization is not None and dtype != "fp32":
        raise UsageError(f"--quant {options.quant} needs --dtype fp32 (the quantised kernels take float32 "
                         "activations); drop --dtype or --quant.")
    if quantization is not None and form == "fused":
        raise UsageError(f"--quant {options.quant} quantises the dispatch form's expert MatMuls; the fused MoE node "
                         "(--moe-form fused, the default with --provider cuda) keeps float weights. Pass "
                         "--moe-form dispatch.")
    return quantization


def use_streaming(model, streaming: str) -> bool:
    """Whether a run on ``model`` goes layer by layer (``streaming``: ``on``, ``off`` or ``auto``)."""
    from mone_export.checkpoint import weight_files
    from mone_export.loading import PRUNED_MARKER, resolve_model_path

    if streaming not in ("on", "off", "auto"):
        raise UsageError(f"--streaming must be on, off or auto (got {streaming!r}).")
    if streaming == "off":
        return False
    folder = resolve_model_path(model)
    if (folder / PRUNED_MARKER).is_file():  # a mone-export prune output: its own loader applies the plan
        if streaming == "on":
            raise UsageError(f"{folder} is a pruned checkpoint (mone-export prune); a layer-streamed run reads the "
                             "original checkpoint: pass it with --plan " + str(folder) + ".")
        return False
    if streaming == "on":
        return True
    try:
        weights = sum(path.stat().st_size for path in weight_files(folder))
    except UsageError:  # the in-memory loader reports a broken checkpoint in its own words
        return False
    available = available_memory_bytes()
    chosen = available is not None and weights > STREAMING_MEMORY_FRACTION * available
    if chosen:
        logger.info("the checkpoint's %.1f GB of weights exceed %d%% of the %.1f GB of available memory: streaming "
                    "it one decoder layer at a time (--streaming off to force an in-memory run)", weights / 1e9,
                    round(100 * STREAMING_MEMORY_FRACTION), available / 1e9)
    return chosen


def _unpruned_export_fits(streamed, dtype, folder: Path) -> bool:
    """Whether the unpruned export of the size and latency comparison can be written (disk) and run by ONNX Runtime
    (memory); when not, the report compares with the unpruned parameter bytes and times no unpruned model."""
    import shutil

    from mone_export.streamed_validation import streamed_lower_bound_bytes

    unpruned = streamed_lower_bound_bytes(streamed, None, dtype)
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.cwd()).free
    available = available_memory_bytes()
    if unpruned > 0.8 * free or (available is not None and unpruned > 0.8 * available):
        logger.info("the unpruned export (%.1f GB) would not fit on disk (%.1f GB free) or in memory for ONNX "
                    "Runtime (%.1f GB available): compared by parameter bytes, no unpruned latency", unpruned / 1e9,
                    free / 1e9, (available or 0) / 1e9)
        return False
    return True


def export_model_streamed(model, ratio, folder: Path, options: ExportOptions, plan_path: Path | None) -> dict:
    """:func:`export_model` with one decoder layer in memory at a time (docs/method.md, models larger than memory).

    Calibration (:func:`mone_export.streaming.collect_stats_streamed`, float32 compute), the export
    (:func:`mone_export.streamed_export.export_onnx_streamed`, written in place into the output folder) and the
    validation (:func:`mone_export.streamed_validation.validate_streamed`, teacher-forced) each stream the
    checkpoint's layers; the unpruned export of the memory and latency comparison is streamed too. The arguments
    are :func:`export_model`'s, already checked by it; the report has the same form, plus ``"streaming": true``.
    """
    import torch

    from mone_export import __version__
    from mone_export.distributed import is_primary
    from mone_export.errors import ParityError
    from mone_export.export import MODEL_FILE, weight_bytes
    from mone_export.loading import load_tokenizer, resolve_model_path
    from mone_export.output_folder import output_folder
    from mone_export.pipeline import calibrate_and_plan, secondary_rank_report
    from mone_export.plan import PruningPlan
    from mone_export.report import write_report
    from mone_export.safe_output import RunScratch
    from mone_export.scoring import check_ratio_feasible
    from mone_export.streamed_export import export_onnx_streamed
    from mone_export.streamed_validation import (StreamedValidationOptions, streamed_lower_bound_bytes,
                                                 validate_streamed)
    from mone_export.streaming import LayerStreamedModel
    from mone_export.validate import raise_for_failures

    method, scope, calib, dtype, provider, validate = (options.method, options.scope, options.calib, options.dtype,
                                                       options.provider, options.validate)
    atol, progress, overwrite, keep_failed = options.atol, options.progress, options.overwrite, options.keep_failed
    form = resolve_moe_form(options.moe_form, provider)
    started = time.perf_counter()
    path = resolve_model_path(model)
    source = _source_record(str(model))
    export_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    checks = dict(options.validation_options or {})
    compare_unpruned = validate and (checks.get("memory", True) or checks.get("latency", True))
    stages = ["load", "load plan" if plan_path else "calibrate", "export", "report"]
    if compare_unpruned:
        stages[2:2] = ["export unpruned"]
    if validate:
        stages[-1:-1] = ["validate"]
    if validate and dtype != "fp32":
        raise UsageError(f"--dtype {dtype}: a layer-streamed run validates fp32 exports only; pass --dtype fp32, "
                         "--no-validate, or --streaming off if the model fits in memory.")
    run = _Stages(stages, progress)
    report: dict = {}
    try:
        with run.stage("load"):
            streamed = LayerStreamedModel(path, dtype=torch.float32)
            check_exportable(streamed.config)  # before minutes of calibration
            tokenizer = load_tokenizer(path)
            if plan_path is None:
                check_ratio_feasible(streamed.model, ratio, method, scope)
        if plan_path is not None:
            with run.stage("load plan"):
                if not options.allow_other_weights:
                    logger.warning("a layer-streamed run checks the plan's shapes, not its experts fingerprint")
                plan = PruningPlan.load(plan_path, model=streamed.model, check_weights=False)
        else:
            with run.stage("calibrate"):
                plan, _ = calibrate_and_plan(streamed, tokenizer, ratio, method, scope, calib, progress,
                                             scratch=folder.parent if folder.parent.is_dir() else None)
            if not is_primary():
                return secondary_rank_report("export", plan)
        exporting = streamed if export_dtype == torch.float32 else LayerStreamedModel(path, dtype=export_dtype)
        if plan.num_pruned:
            exporting.model.config.mone_pruning = plan.summary()
        with RunScratch(folder) as scratch, contextlib.ExitStack() as writing:
            baseline = None
            if compare_unpruned and plan.num_pruned:
                with run.stage("export unpruned"):
                    if _unpruned_export_fits(streamed, export_dtype, folder):
                        baseline = scratch.folder("unpruned")
                        export_onnx_streamed(exporting, baseline, None, progress=progress, moe_form=form)
            report = {
                "command": "export", "mone_export_version": __version__, **source,
                "model_type": plan.model["model_type"], "output": str(folder), "onnx": str(folder / MODEL_FILE),
                "dtype": dtype, "provider": provider, "moe_form": form, "streaming": True, **plan.summary(),
                "pruned": {str(k): v for k, v in plan.pruned.items()},
                "num_experts_per_layer": {str(k): int(v) for k, v in plan.model["num_experts"].items()},
                "plan_source": str(plan_path) if plan_path else "calibrated", "calibration": plan.calibration,
            }
            with run.stage("export"):
                tmp = writing.enter_context(output_folder(
                    exporting.model, tokenizer, lambda target: export_onnx_streamed(exporting, target, plan,
                                                                                    progress=progress, moe_form=form),
                    folder, plan=plan, overwrite=overwrite, dtype=dtype))
            pruned_bytes = weight_bytes(tmp / MODEL_FILE)
            bound = streamed_lower_bound_bytes(streamed, plan, export_dtype)
            report["weights"] = {
                "unpruned_bytes": weight_bytes(baseline / MODEL_FILE) if baseline else
                (pruned_bytes if not plan.num_pruned else streamed_lower_bound_bytes(streamed, None, export_dtype)),
                "unpruned_source": "unpruned export" if baseline else
                ("this export (ratio 0)" if not plan.num_pruned else "parameters of the unpruned model"),
                "pruned_bytes": pruned_bytes, "lower_bound_bytes": bound, "ratio_to_bound": pruned_bytes / bound,
            }
            validation = None
            if validate:
                with run.stage("validate"):
                    known = {f.name for f in dataclasses.fields(StreamedValidationOptions)}
                    chosen = StreamedValidationOptions(provider=provider, atol=atol, baseline_dir=baseline,
                                                       **{k: v for k, v in checks.items() if k in known})
                    validation = validate_streamed(tmp, streamed, plan, tokenizer, chosen, progress=progress)
                validation["onnx"] = report["onnx"]
            report["validation"] = validation
            report["passed"] = None if validation is None else validation["passed"]
            report["exit_code"] = 0 if validation is None or validation["passed"] else 1
            failed = report["passed"] is False
            if failed:
                report["output_written"] = False
                report["kept_failed"] = str(failed_output_path(folder)) if keep_failed else None
                if keep_failed:
                    report["output"] = str(failed_output_path(folder))
                    report["onnx"] = validation["onnx"] = str(failed_output_path(folder) / MODEL_FILE)
            with run.stage("report"):
                report["timings"] = dict(run.seconds)
                report["seconds"] = round(time.perf_counter() - started, 2)
                write_report(tmp, report, plan)
            if failed:
                if keep_failed:
                    scratch.commit(tmp, failed_output_path(folder))
                raise_for_failures(validation)
    except ParityError as exc:
        exc.report = report
        raise
    finally:
        run.close()
    return report


def check_onnx_file(path: Path) -> None:
    """A clear error for a ``model.onnx`` that is not a whole ONNX model, or whose external weights are missing or
    short (a truncated copy); reads the graph, not the weights."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError (and others) on a broken file
        raise UsageError(f"{path} is not a complete ONNX model ({type(exc).__name__}): truncated or corrupt; copy "
                         "the folder again, or export again.") from None
    needed: dict[str, int] = {}  # external data file → bytes the graph reads from it
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, size in sorted(needed.items()):
        data = path.parent / location
        have = data.stat().st_size if data.is_file() else None
        if have is None or have < size:
            state = "is missing" if have is None else f"holds {have} bytes, the graph needs {size}"
            raise UsageError(f"{data} {state}: the folder is incomplete; copy it again, or export again.")


def _report_of(folder: Path) -> dict:
    from mone_export.report import REPORT_JSON

    path = folder / REPORT_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def validate_folder(
    output_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    provider: str = "cpu",
    atol: float | None = None,
    latency: bool = True,
    progress: bool = True,
    allow_other_weights: bool = False,
    streaming: str = "auto",
    **options,
) -> dict:
    """Re-check an export folder against the pruned PyTorch model rebuilt from the original weights and its plan.

    Args:
        output_dir: an export folder (``model.onnx``, ``plan/``, ``report.json``), or its ``model.onnx``.
        model: the original (unpruned) model, a bundled name or folder; default the ``source_model`` recorded in
            the folder's ``report.json``.
        provider, atol, latency: as in :func:`mone_export.validate.validate_export` (no unpruned export here, so
            latency compares the export with PyTorch eager only).
        allow_other_weights: accept a ``model`` whose experts differ from those the plan was computed on.
        streaming: ``on`` / ``off`` / ``auto``, as for :func:`export_model`: the PyTorch reference layer-streamed
            and teacher-forced (:func:`mone_export.streamed_validation.validate_streamed`).
        options: further keyword arguments for ``validate_export`` (or the fields of
            :class:`~mone_export.streamed_validation.StreamedValidationOptions`).

    Returns:
        The validation report, plus ``model``, ``source_model``, ``output`` and ``command``; ``passed`` False when a
        check failed (the CLI then exits 1).
    """
    from mone_export.export import MODEL_FILE
    from mone_export.loading import load_model, resolve_model_path
    from mone_export.novices import apply_plan
    from mone_export.pipeline import preflight
    from mone_export.plan import PLAN_FILE, PruningPlan
    from mone_export.validate import check_provider, validate_export

    folder = resolve_output(output_dir)
    if not (folder / MODEL_FILE).is_file():
        raise UsageError(f"{folder} holds no {MODEL_FILE}; pass the folder mone-export wrote.")
    check_onnx_file(folder / MODEL_FILE)
    check_provider(provider)
    saved = _report_of(folder)
    if model is None:
        candidates = [saved.get("source_model"), saved.get("model")]
        model = next((c for c in candidates if c and _resolvable(c)), None)
        if model is None:
            recorded = " or ".join(repr(c) for c in candidates if c) or "none"
            raise UsageError(f"cannot find the original model of {folder} (recorded: {recorded}); "
                             "pass --model NAME_OR_PATH with the unpruned checkpoint.")
    check_tolerance(atol)
    has_plan = (folder / "plan" / PLAN_FILE).is_file()
    if not has_plan and saved.get("num_pruned", 1) != 0:
        raise UsageError(f"{folder} has no plan/{PLAN_FILE}, so the pruned model cannot be rebuilt to compare with; "
                         "copy the whole output folder (plan/ included), or export again.")
    preflight(model)
    log = logger.info if progress else logger.debug
    log("rebuilding the pruned model from %s%s", model, f" and {folder / 'plan'}" if has_plan else " (unpruned export)")
    if use_streaming(model, streaming):
        report = _validate_folder_streamed(folder, model, has_plan, provider, atol, latency, progress, options)
    else:
        original, _ = load_model(model, dtype="fp32")
        if has_plan:
            apply_plan(original, PruningPlan.load(folder / "plan", model=original,
                                                  check_weights=not allow_other_weights))
        report = validate_export(folder, original, provider=provider, atol=atol, latency=latency,
                                 progress=progress, **options)
    return {"command": "validate", "model": str(model), "source_model": str(resolve_model_path(model).resolve()),
            "output": str(folder), **{k: saved[k] for k in ("model_type", "method", "ratio", "scope") if k in saved},
            "validation": report, "passed": report["passed"], "exit_code": 0 if report["passed"] else 1}


def _validate_folder_streamed(folder: Path, model, has_plan: bool, provider: str, atol, latency: bool,
                              progress: bool, options: dict) -> dict:
    """:func:`validate_folder`'s check with the reference layer-streamed (the plan's shapes are checked, not its
    experts fingerprint: that would read every layer once more)."""
    import torch

    from mone_export.loading import load_tokenizer, resolve_model_path
    from mone_export.plan import PruningPlan
    from mone_export.streamed_validation import StreamedValidationOptions, validate_streamed
    from mone_export.streaming import LayerStreamedModel

    path = resolve_model_path(model)
    streamed = LayerStreamedModel(path, dtype=torch.float32)
    plan = PruningPlan.load(folder / "plan", model=streamed.model, check_weights=False) if has_plan else None
    known = {f.name for f in dataclasses.fields(StreamedValidationOptions)}
    chosen = StreamedValidationOptions(provider=provider, atol=atol, latency=latency,
                                       **{k: v for k, v in options.items() if k in known})
    tokenizer = load_tokenizer(folder) or load_tokenizer(path)
    return validate_streamed(folder, streamed, plan, tokenizer, chosen, progress=progress)


def _resolvable(name: str) -> bool:
    from mone_export.loading import resolve_model_path

    try:
        resolve_model_path(name)
        return True
    except UsageError:
        return False
