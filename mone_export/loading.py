"""Loading MoE checkpoints (bundled names or local folders) and saving pruned models."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from mone_export.adapters import get_adapter, moe_layers_or_error
from mone_export.architectures import check_prunable
from mone_export.errors import UsageError
from mone_export.plan import PruningPlan
from mone_export.safe_output import atomic_folder, check_output_target

__all__ = [
    "BUNDLED_MODELS",
    "bundled_model_path",
    "resolve_model_path",
    "load_model",
    "parse_dtype",
    "save_pruned",
    "check_output_dir",
    "preflight_model",
    "atomic_output_dir",
    "PRUNED_MARKER",
]

logger = logging.getLogger(__name__)

BUNDLED_MODELS = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v2")
PRUNED_MARKER = "mone_pruned.json"
PRUNED_WEIGHTS = "mone_model.safetensors"
PLAN_SUBDIR = "plan"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _bundled_roots() -> list[Path]:
    here = Path(__file__).resolve().parent
    # Installed wheel: models are package data; source checkout: the repository's top-level models/.
    return [here / "bundled_models", here.parent / "models"]


def bundled_model_path(name: str) -> Path | None:
    """Folder of the bundled model ``name`` (``mixtral``, ``qwen2_moe``, ``olmoe``, ``deepseek_v2``), if present."""
    if name not in BUNDLED_MODELS:
        return None
    for root in _bundled_roots():
        if (root / name / "config.json").is_file():
            return root / name
    return None


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local model folder for a bundled name or a path; a clear error when there is none."""
    text = str(name_or_path)
    if not text.strip():
        raise UsageError(f"the model name is empty; pass a bundled model name ({', '.join(BUNDLED_MODELS)}) or a "
                         "checkpoint folder.")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a model folder (no config.json); pass a Hugging Face checkpoint folder "
                             f"or a bundled model name ({', '.join(BUNDLED_MODELS)}).")
        return path
    bundled = bundled_model_path(text)
    if bundled is not None:
        return bundled
    raise UsageError(f"model {text!r} not found: no such folder and no bundled model of that name "
                     f"(bundled: {', '.join(BUNDLED_MODELS)}). Nothing is downloaded; pass a local checkpoint folder.")


def parse_dtype(dtype) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or a name (``fp32``/``float32``, ``fp16``, ``bf16``); None means fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16.") from None


def _experts_implementation(config, dtype: torch.dtype) -> str | None:
    """transformers' grouped_mm CPU kernel fails when an expert row is not a multiple of 16 bytes: use eager then."""
    size = torch.tensor([], dtype=dtype).element_size()
    inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", 0)
    rows = (int(config.hidden_size) * size, int(inter) * size, 2 * int(inter) * size)
    return "eager" if any(r % 16 for r in rows) else None


def model_build_options(config, dtype=None, attn_implementation: str | None = None) -> dict:
    """The keyword arguments every model of ``config`` is built with (loaded whole or streamed by layer): its
    dtype, the attention implementation (transformers' default unless given) and, where transformers' fused kernel
    cannot run, eager experts. One place, so both ways compute the same numbers."""
    torch_dtype = parse_dtype(dtype)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    experts_impl = _experts_implementation(config, torch_dtype)
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    return kwargs


def _load_config(path: Path):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(f"{path} does not hold a config transformers can read ({str(exc).splitlines()[0]}).") from None


def causal_lm_config(config):
    """The config of the model ``AutoModelForCausalLM`` builds from ``config``: for a multimodal checkpoint whose
    causal-LM class is its text model alone (Llama 4, Qwen3.5-MoE: transformers maps the wrapper type to a
    ``*ForCausalLM`` whose ``config_class`` is the text config), that text config; otherwise ``config`` itself. The
    families, the checks and the plan are those of the model actually built."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text = config.get_text_config()
    if text is config:
        return config
    try:
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return config
    return text if isinstance(text, causal_lm.config_class) else config


def preflight_model(name_or_path: str | os.PathLike):
    """Check a model without loading its weights: folder, config, MoE family and weight files; return the config.

    Cheap (it reads the config and the safetensors headers), so commands call it before their first stage: a
    truncated file or a missing expert tensor is reported before minutes of work, not after.
    """
    from mone_export.checkpoint import check_checkpoint_files

    path = resolve_model_path(name_or_path)
    config = causal_lm_config(_load_config(path))
    get_adapter(config)
    check_prunable(config)
    if not (path / PRUNED_MARKER).is_file():
        check_checkpoint_files(path, config)
    return config


def load_model(name_or_path: str | os.PathLike, dtype=None, attn_implementation: str | None = None):
    """Load a transformers 5.x MoE causal LM and its tokenizer from a local folder or bundled name.

    Args:
        name_or_path: a bundled model name (``mixtral``, ``qwen2_moe``, ``olmoe``, ``deepseek_v2``), a local Hugging
            Face checkpoint folder, or a folder written by :func:`save_pruned`.
        dtype: ``torch.dtype`` or ``"fp32"``/``"fp16"``/``"bf16"``; default fp32.
        attn_implementation: passed to transformers (default: its own choice).

    Returns:
        ``(model, tokenizer)``, the model in eval mode; ``tokenizer`` is None when the folder has none.
    """
    from mone_export.checkpoint import load_pretrained_checked

    path = resolve_model_path(name_or_path)
    stored = _load_config(path)
    config = causal_lm_config(stored)
    get_adapter(config)  # unknown or non-MoE families fail here, before any weight is read
    check_prunable(config)
    kwargs = model_build_options(config, dtype, attn_implementation)
    if (path / PRUNED_MARKER).is_file():
        model = _load_pruned(path, config, kwargs)
    else:
        model = load_pretrained_checked(path, text_of_multimodal=config is not stored, **kwargs)
    moe_layers_or_error(model)
    model.eval()
    return model, _load_tokenizer(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint folder, or None when it has none."""
    return _load_tokenizer(Path(path))


def _load_tokenizer(path: Path):
    import transformers

    # Without tokenizer files transformers 5 builds an empty tokenizer from the config: treat that as none.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        logger.info("no tokenizer in %s", path)
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError):
        logger.info("no tokenizer in %s", path)
        return None


def _load_pruned(path: Path, config, kwargs):
    import transformers
    from safetensors.torch import load_model as load_safetensors

    from mone_export.novices import apply_plan

    try:
        marker = json.loads((path / PRUNED_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path / PRUNED_MARKER} is not a readable mone-export marker ({exc}); prune again.") from None
    if hasattr(config, "mone_pruning"):
        del config.mone_pruning
    plan = PruningPlan.load(path / str(marker.get("plan", PLAN_SUBDIR)))
    model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    apply_plan(model, plan)
    weights = path / str(marker.get("weights", PRUNED_WEIGHTS))
    if not weights.is_file():
        raise UsageError(f"{weights} is missing: the pruned folder is incomplete; copy all of it, or prune again.")
    try:
        load_safetensors(model, str(weights), strict=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load {weights}: {message}; prune again.") from None
    return model


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs: dict | None = None) -> Path:
    """Refuse an output folder that overlaps an input, is a file or a link, or is non-empty without ``overwrite``.

    See :func:`mone_export.safe_output.check_output_target` (``inputs``: label → path of what must not be touched;
    the bundled models are always among them).
    """
    return check_output_target(path, overwrite, {**bundled_roots_as_inputs(), **(inputs or {})})


def bundled_roots_as_inputs() -> dict[str, Path]:
    """The folders of the bundled models, as inputs no output may overlap."""
    labels = ("bundled models (package data)", "bundled models folder")
    return {label: root for label, root in zip(labels, _bundled_roots()) if root.is_dir()}


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a folder to build ``path`` in; on success it replaces ``path`` atomically, on failure it is removed.

    A failure, or the process being killed at any moment, leaves any previous content of ``path`` intact; scratch
    left by a killed run is removed by the next one (:mod:`mone_export.safe_output`).
    """
    check_output_dir(path, overwrite)
    with atomic_folder(path) as tmp:
        yield tmp


def _is_standard_checkpoint(model, plan: PruningPlan) -> bool:
    """Removal plans with one expert count in every layer save as plain transformers checkpoints."""
    if plan.replacement != "remove":
        return False
    adapter, layers = moe_layers_or_error(model)
    return len({layer.num_experts for layer in layers}) == 1


def save_pruned(model, tokenizer, plan: PruningPlan, out_dir: str | os.PathLike, overwrite: bool = False,
                extra_files=None) -> Path:
    """Write a pruned model, its tokenizer and its plan to ``out_dir`` (atomically).

    Removal plans that leave one expert count everywhere give a standard HF checkpoint with fewer experts.
    Novice models (and uneven removals) are written with :data:`PRUNED_MARKER` and reload through
    :func:`load_model` into the identical model; plain transformers refuses them rather than misloading.
    ``extra_files(folder)``, if given, writes more files (reports) before the folder is moved into place.
    """
    from safetensors.torch import save_model as save_safetensors

    with atomic_output_dir(out_dir, overwrite) as tmp:
        if _is_standard_checkpoint(model, plan):
            model.save_pretrained(str(tmp))
        else:
            config = model.config
            saved = getattr(config, "mone_pruning", None)
            if saved is not None:
                del config.mone_pruning
            try:
                _original_config(model, plan).save_pretrained(str(tmp))
            finally:
                if saved is not None:
                    config.mone_pruning = saved
            save_safetensors(model, str(tmp / PRUNED_WEIGHTS), metadata={"format": "pt"})
            (tmp / PRUNED_MARKER).write_text(
                json.dumps({"format": "mone-export/pruned-model", "version": 1, "weights": PRUNED_WEIGHTS,
                            "plan": PLAN_SUBDIR}, indent=1) + "\n"
            )
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        plan.save(tmp / PLAN_SUBDIR)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out_dir)


def _original_config(model, plan: PruningPlan):
    """The config of the unpruned model (expert counts as the plan expects), so the plan re-applies on load."""
    import copy

    config = copy.deepcopy(model.config)
    counts = set(plan.model["num_experts"].values())
    if len(counts) == 1:
        get_adapter(config).set_num_experts(config, counts.pop())
    return config
