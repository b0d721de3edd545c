"""mone-export: prune Mixture-of-Experts LLMs with MoNE (experts -> novices) and export them to ONNX Runtime.

Python API::

    from mone_export import load_model, calibration_batches, collect_stats, plan_pruning, apply_plan, PruningPlan

    model, tokenizer = load_model("mixtral")
    stats = collect_stats(model, calibration_batches("python-code", tokenizer, num_samples=64, seq_len=256))
    plan = plan_pruning(stats, ratio=0.5, method="mone")
    apply_plan(model, plan)          # in place
    plan.save("out/plan")
"""

from mone_export.calibration import calibration_batches
from mone_export.loading import load_model, save_pruned
from mone_export.novices import apply_plan
from mone_export.plan import PruningPlan
from mone_export.scoring import METHODS, SCOPES, plan_pruning
from mone_export.stats import ExpertStats, collect_stats

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "calibration_batches",
    "collect_stats",
    "plan_pruning",
    "apply_plan",
    "PruningPlan",
    "ExpertStats",
    "save_pruned",
    "METHODS",
    "SCOPES",
    "__version__",
]
