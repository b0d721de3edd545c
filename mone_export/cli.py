"""The ``mone-export`` command line: thin commands that call one library function each.

Exit codes: 0 success; 1 a failed check (parity) or an environment error (disk full, out of memory); 2 a usage error
(bad input; one-line message, no traceback); 3 an internal error (a bug: one line with the path of a log holding the
traceback); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Whatever the exit, a previous output is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

from mone_export.errors import MoneError, ParityError, Terminated, UsageError

__all__ = ["main", "COMMANDS", "Command", "register_command", "EXIT_INTERNAL_ERROR", "crash_log_dir"]

logger = logging.getLogger("mone_export")

EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

ATOL_HELP = ("absolute tolerance on logits (default fp32 1e-4); for fp16 the floor of ε in the bound "
             "1.5 × PyTorch fp16's error + ε (default 2e-2)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that say what to do."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Command:
    """A subcommand: ``add_arguments`` declares its options, ``run`` calls the library and returns a report dict."""

    name: str = ""
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # pragma: no cover - interface
        """Declare the command's arguments."""
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> dict:  # pragma: no cover - interface
        """Run the command; return its report."""
        raise NotImplementedError

    def summary(self, report: dict) -> str:
        """Human-readable closing summary of a report."""
        return json.dumps(report, indent=1)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """--quiet, --json, --overwrite: shared by every command that writes or reports."""
    group = parser.add_argument_group("Output")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a previous mone-export output folder (other non-empty folders are refused)")
    group.add_argument("--quiet", action="store_true", help="print errors only: no progress, log lines or summary")
    group.add_argument("--json", action="store_true", help="print the report as JSON")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """--method, --scope and the calibration data options."""
    from mone_export.calibration import SOURCES
    from mone_export.scoring import DEFAULT_METHOD, METHODS, SCOPES

    group = parser.add_argument_group("Pruning")
    group.add_argument("--method", default=DEFAULT_METHOD,
                       help=f"scoring method: {', '.join(METHODS)} (default {DEFAULT_METHOD})")
    group.add_argument("--scope", default="layer", help=f"selection scope: {', '.join(SCOPES)} (default layer)")
    group = parser.add_argument_group("Calibration")
    group.add_argument("--calib", default="python-code",
                       help=f"calibration source: {', '.join(SOURCES)}, or datasets:PATH (default python-code)")
    group.add_argument("--calib-data", metavar="FILE", help="calibration text file (.txt or .jsonl with field 'text')")
    group.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    group.add_argument("--seed", type=int, default=0, help="seed of sampling and the random method (default 0)")
    group.add_argument("--calib-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="compute dtype of the calibration forward (default fp32); statistics are float64")


def calibration_options(args: argparse.Namespace):
    """The :class:`CalibrationOptions` of parsed arguments."""
    from mone_export.pipeline import CalibrationOptions

    return CalibrationOptions(source=args.calib_data or args.calib, samples=args.calib_samples,
                              seq_len=args.seq_len, seed=args.seed, dtype=args.calib_dtype)


class PruneCommand(Command):
    """``mone-export prune``: calibrate, plan, prune and save a PyTorch checkpoint with its plan."""

    name = "prune"
    help = "calibrate and prune a model; write the pruned checkpoint and its plan"

    def add_arguments(self, parser):
        required = parser.add_argument_group("Required")
        required.add_argument("--model", required=True, help="bundled model name or local HF checkpoint folder")
        required.add_argument("--ratio", type=float, required=True, help="fraction of routed experts to prune, [0, 1)")
        required.add_argument("-o", "--output", required=True, help="output folder")
        add_calibration_options(parser)
        parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model dtype")
        add_common_options(parser)

    def run(self, args):
        from mone_export.pipeline import prune

        return prune(model=args.model, ratio=args.ratio, output=args.output, method=args.method, scope=args.scope,
                     calib=calibration_options(args), dtype=args.dtype, overwrite=args.overwrite,
                     progress=not args.quiet)

    def summary(self, report):
        lines = [f"pruned {report['num_pruned']} of {report['num_experts']} routed experts of {report['model']} "
                 f"({report['method']}, ratio {report['ratio']}, scope {report['scope']})"]
        lines += [f"  layer {k}: {v}" for k, v in report["pruned"].items()]
        mb = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        lines.append(f"parameters: {mb(report['parameter_bytes_before'])} -> {mb(report['parameter_bytes_after'])}")
        lines.append(f"wrote {report['output']} in {report['seconds']} s")
        return "\n".join(lines)


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """--dtype, --provider, --atol, --no-validate: how the ONNX model is written and checked."""
    from graph_passes.quantize_weights import DEFAULT_BLOCK_SIZE

    group = parser.add_argument_group("Export and validation")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="dtype of the exported graph")
    group.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                       help="ONNX Runtime execution provider of the validation (default cpu)")
    group.add_argument("--moe-form", default="auto", choices=["auto", "dispatch", "fused"],
                       help="graph form of the routed experts: dispatch (one branch per expert, fastest on the CPU "
                       "provider), fused (one com.microsoft.MoE node per layer, dispatch kept on the GPU); auto: "
                       "fused with --provider cuda, else dispatch")
    group.add_argument("--attention", default="auto", choices=["plain", "gqa", "auto"],
                       help="graph form of attention: plain (standard ops, any ONNX runtime), gqa (one "
                       "com.microsoft.GroupQueryAttention per layer: ONNX Runtime's fused kernel, KV cache appended "
                       "in the kernel), auto (gqa where it computes the model's attention, measured at export; plain "
                       "with --provider cuda or a layer-streamed run) (default auto)")
    group.add_argument("--quant", default="none", choices=["none", "int4", "int8"],
                       help="quantise the weights block-wise (MatMulNBits / GatherBlockQuantized; routers and "
                       "novice biases stay float32), validated against PyTorch with the same weights (default none)")
    group.add_argument("--quant-block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                       help="elements per quantisation block, a power of two >= 16 (default "
                       f"{DEFAULT_BLOCK_SIZE}; 32: finer scales, slower kernels)")
    group.add_argument("--quant-accuracy-level", type=int, default=4, choices=[0, 4],
                       help="MatMulNBits accuracy level: 4 quantises activations to int8 (fast on CPU), 0 keeps "
                       "them float (default 4)")
    group.add_argument("--atol", type=float, default=None, help=ATOL_HELP)
    group.add_argument("--no-validate", dest="validate", action="store_false",
                       help="skip the parity, memory and latency checks (and the unpruned export they compare to)")
    group.add_argument("--keep-failed", action="store_true",
                       help="when parity fails, keep the export in OUT.failed for debugging (OUT is never replaced "
                       "by a failed export)")
    group.add_argument("--streaming", default="auto", choices=["auto", "on", "off"],
                       help="load, calibrate, export and validate one decoder layer at a time, for checkpoints "
                       "larger than memory (auto: when the weights exceed a quarter of the available memory)")


def add_plan_weights_option(parser: argparse.ArgumentParser) -> None:
    """--allow-other-weights: apply a plan to weights other than those it was computed on."""
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="apply the plan even though the model's experts differ from those it was computed on "
                        "(its fingerprint); refused by default")


def _print_parity_report(args: argparse.Namespace, command: Command, exc: ParityError) -> None:
    """On a parity failure, still print the report (JSON or summary) before main() prints the error and exits 1."""
    report = getattr(exc, "report", None)
    if report is None:
        return
    if args.json:
        print(json.dumps(report, indent=1))
    elif not args.quiet:
        print(command.summary(report))


class ExportCommand(Command):
    """``mone-export [export]``: prune (or load a saved plan), export to ONNX, validate, report."""

    name = "export"
    help = "prune a model and export it to ONNX Runtime (the default command)"

    def add_arguments(self, parser):
        required = parser.add_argument_group("Required")
        required.add_argument("--model", required=True, help="bundled model name or local HF checkpoint folder")
        required.add_argument("-o", "--output", required=True, help="output folder, or FOLDER/model.onnx")
        required.add_argument("--ratio", type=float, help="fraction of routed experts to prune, [0, 1); 0 exports "
                              "the unpruned model (required unless --plan)")
        parser.add_argument("--plan", metavar="DIR", help="export this saved plan (a plan folder or an output folder "
                            "with plan/) without calibrating; --ratio, --method, --scope and --calib* are not used")
        add_plan_weights_option(parser)
        add_calibration_options(parser)
        add_export_options(parser)
        add_common_options(parser)

    def run(self, args):
        from mone_export.export_pipeline import export_model

        if args.plan is None and args.ratio is None:
            raise UsageError("--ratio is required (or --plan DIR to export a saved plan).")
        if args.plan is not None and args.ratio is not None:
            raise UsageError("--plan brings its own ratio; drop --ratio (or drop --plan to calibrate again).")
        try:
            return export_model(model=args.model, ratio=args.ratio, output=args.output, method=args.method,
                                scope=args.scope, calib=calibration_options(args), dtype=args.dtype,
                                provider=args.provider, validate=args.validate, overwrite=args.overwrite,
                                progress=not args.quiet, plan_dir=args.plan, atol=args.atol,
                                keep_failed=args.keep_failed, allow_other_weights=args.allow_other_weights,
                                streaming=args.streaming, moe_form=args.moe_form, quant=args.quant,
                                quant_block_size=args.quant_block_size,
                                quant_accuracy_level=args.quant_accuracy_level, attention=args.attention)
        except ParityError as exc:
            _print_parity_report(args, self, exc)
            raise

    def summary(self, report):
        from mone_export.report import summary_text

        return summary_text(report)


class ValidateCommand(Command):
    """``mone-export validate OUT_DIR``: re-check an export against the PyTorch model (exit 1 on a parity failure)."""

    name = "validate"
    help = "re-check an export folder against the pruned PyTorch model; exit 1 when parity fails"

    def add_arguments(self, parser):
        required = parser.add_argument_group("Required")
        required.add_argument("output_dir", metavar="OUT_DIR", help="folder written by mone-export (or its model.onnx)")
        optional = parser.add_argument_group("Optional")
        optional.add_argument("--model", help="the original unpruned model (default: the source recorded in "
                              "OUT_DIR/report.json)")
        optional.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                              help="ONNX Runtime execution provider (default cpu)")
        optional.add_argument("--atol", type=float, default=None, help=ATOL_HELP)
        optional.add_argument("--no-latency", dest="latency", action="store_false",
                              help="skip the latency measurement")
        add_plan_weights_option(optional)
        optional.add_argument("--streaming", default="auto", choices=["auto", "on", "off"],
                              help="compute the PyTorch reference one decoder layer at a time (teacher-forced), for "
                              "checkpoints larger than memory (auto: when the weights exceed a quarter of it)")
        group = parser.add_argument_group("Output")
        group.add_argument("--quiet", action="store_true", help="print errors only: no progress, log lines or summary")
        group.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(self, args):
        from mone_export.export_pipeline import validate_folder

        report = validate_folder(args.output_dir, model=args.model, provider=args.provider, atol=args.atol,
                                 latency=args.latency, progress=not args.quiet,
                                 allow_other_weights=args.allow_other_weights, streaming=args.streaming)
        if not report["passed"]:
            from mone_export.validate import raise_for_failures

            try:
                raise_for_failures(report["validation"])
            except ParityError as exc:
                exc.report = report
                _print_parity_report(args, self, exc)
                raise
        return report

    def summary(self, report):
        from mone_export.report import summary_text

        return summary_text(report)


COMMANDS: dict[str, Command] = {}
DEFAULT_COMMAND: str | None = None


def register_command(command: Command, default: bool = False) -> Command:
    """Add a subcommand; ``default`` makes it run when the first argument is an option."""
    global DEFAULT_COMMAND
    COMMANDS[command.name] = command
    if default:
        DEFAULT_COMMAND = command.name
    return command


register_command(PruneCommand())
register_command(ExportCommand(), default=True)
register_command(ValidateCommand())


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with one subparser per command."""
    parser = _Parser(prog="mone-export", description="Prune MoE LLMs with MoNE and export them to ONNX Runtime.")
    from mone_export import __version__

    parser.add_argument("--version", action="version", version=f"mone-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    if DEFAULT_COMMAND and argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return [DEFAULT_COMMAND, *argv]
    return argv


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(message)s", force=True)
    logging.getLogger("mone_export").setLevel(logging.ERROR if quiet else logging.INFO)
    # Library warnings (deprecations in transformers, torch's tracer notes) are for developers, not for users of the
    # command: they go to the log at DEBUG level, i.e. nowhere unless a caller configures logging otherwise.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    # Progress bars and stage lines tell the story; the chattier modules only speak up about problems.
    for noisy in ("transformers", "torch", "onnxscript", "onnx_ir", "graph_passes", "mone_export.calibration",
                  "mone_export.novices", "mone_export.stats", "mone_export.validate", "mone_export.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR if quiet else logging.WARNING)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated`, so scratch folders and locks are cleaned up."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def crash_log_dir() -> Path:
    """Where tracebacks of internal errors go: ``$MONE_EXPORT_LOG_DIR``, else ``<tmp>/mone-export``."""
    return Path(os.environ.get("MONE_EXPORT_LOG_DIR") or Path(tempfile.gettempdir()) / "mone-export")


def _write_crash_log(argv: list[str], error: BaseException) -> Path | None:
    """Write the traceback of an unexpected error with the command line and versions; its path, or None."""
    from mone_export import __version__

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder = crash_log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{stamp}-{os.getpid()}.log"
        text = (f"mone-export {__version__}, Python {sys.version.split()[0]}\n"
                f"command: mone-export {' '.join(argv)}\n\n"
                + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
        path.write_text(text)
        return path
    except OSError:
        return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mone-export`` console script; returns the exit code."""
    argv = _with_default_command([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.command:
        parser.print_help()
        return 2
    command = COMMANDS[args.command]
    quiet = getattr(args, "quiet", False)
    _configure_logging(quiet)
    _quiet_libraries(quiet)
    prefix = f"mone-export {command.name}"
    try:
        with _sigterm_unwinds():
            try:
                report = command.run(args)
            finally:
                _leave_process_group()
    except UsageError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"{prefix}: parity check failed: {exc}", file=sys.stderr)
        return 1
    except MoneError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{prefix}: error: out of memory; nothing was written (try a machine with more memory, or fewer "
              "--calib-samples / a shorter --seq-len)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prefix}: error: {exc}; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing was written (a previous output is unchanged)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prefix}: terminated; nothing was written (a previous output is unchanged)", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: one line for the user, the traceback in a log for the report
        log = _write_crash_log(argv, exc)
        where = f"the traceback is in {log}" if log else "run with python -X dev for the traceback"
        print(f"{prefix}: internal error ({_first_line(exc)}); nothing was written; this is a bug, please report it: "
              f"{where}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    if "rank" in report:  # a secondary rank of a torchrun launch: it calibrated its share, rank 0 reports
        return int(report.get("exit_code", 0))
    if getattr(args, "json", False):
        print(json.dumps(report, indent=1))
    elif not quiet:
        print(command.summary(report))
    return int(report.get("exit_code", 0))


def _leave_process_group() -> None:
    """Under torchrun, all ranks leave together once rank 0 is done (mone_export.distributed.finish)."""
    from mone_export.distributed import finish

    finish()  # a no-op unless this command calibrated across ranks


def _quiet_libraries(quiet: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
