"""mone-export: prune Mixture-of-Experts LLMs with MoNE (experts -> novices) and export them to ONNX Runtime.

Python API::

    from mone_export import load_model, calibration_batches, collect_stats, plan_pruning, apply_plan, PruningPlan

    model, tokenizer = load_model("mixtral")
    stats = collect_stats(model, calibration_batches("python-code", tokenizer, num_samples=64, seq_len=256))
    plan = plan_pruning(stats, ratio=0.5)  # method "ne" (novice error); "mone" is the paper's
    apply_plan(model, plan)          # in place
    plan.save("out/plan")
"""

import importlib

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``python -m mone_export.memory_probe`` and other light entry points do not
# pay for torch and transformers.
_EXPORTS = {
    "load_model": "mone_export.loading",
    "save_pruned": "mone_export.loading",
    "calibration_batches": "mone_export.calibration",
    "collect_stats": "mone_export.stats",
    "ExpertStats": "mone_export.stats",
    "plan_pruning": "mone_export.scoring",
    "METHODS": "mone_export.scoring",
    "SCOPES": "mone_export.scoring",
    "apply_plan": "mone_export.novices",
    "PruningPlan": "mone_export.plan",
}

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


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mone_export' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
