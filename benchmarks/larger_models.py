"""Larger trained MoE models for the fidelity benchmark (not bundled): ~21M parameters, 16 routed experts per layer.

    python benchmarks/larger_models.py --dir ~/.cache/mone-export/larger-models                 # train what is missing
    python benchmarks/larger_models.py --dir DIR --families mixtral qwen2_moe --seeds 0 1 --jobs 2

Each model is ``models/train.py --preset large`` (the bundled models' recipe at larger sizes: hidden 256, 6 layers,
16 experts of width 256, top-2, ~4.6M parameters active per token; byte-level BPE of 2048 tokens trained on the
``python-code`` train split) with one seed, written to ``DIR/{family}-s{seed}`` with its ``card.json`` (held-out
perplexity on ``python-code`` and ``python-docs``, expert usage, the exact command). A folder whose card exists is
reused: the models are cached on disk, and the same arguments on the same machine and library versions give the
same weights (one thread per model). ``--jobs`` trains that many models at once (one CPU thread each).

Prints and writes ``DIR/models.json``: every model's parameters, steps, training time and base perplexity, which
``benchmarks/fidelity.py --models DIR/mixtral-s0 ...`` then takes like a bundled model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("mixtral", "qwen2_moe")
SEEDS = (0, 1)
STEPS = 1000
"""Optimizer steps of 8 × 256 tokens (2.05M tokens, 0.7 epochs of the train stream), passed to every model (fewer
than the preset's own default of 1500, so that four models train in one session): ~35-55 minutes per model on one
thread of this machine."""


def model_folder(root: Path, family: str, seed: int) -> Path:
    """Where the model of ``family`` and ``seed`` lives."""
    return root / f"{family}-s{seed}"


def train_one(root: Path, family: str, seed: int, steps: int) -> Path:
    """Train one model unless its card exists; its log goes beside the folder (``DIR/{family}-s{seed}.train.log``)."""
    out = model_folder(root, family, seed)
    if (out / "card.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "models" / "train.py"), "--family", family, "--preset", "large",
               "--seed", str(seed), "--steps", str(steps), "--threads", "1", "--out", str(out)]
    with open(out.parent / f"{out.name}.train.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return out


def summary(folders: list[Path]) -> list[dict]:
    """Per model: parameters, training and the base held-out perplexity, read from its card."""
    rows = []
    for folder in folders:
        card = json.loads((folder / "card.json").read_text())
        rows.append({"model": str(folder), "family": card["family"], "seed": card["seed"],
                     "parameters": card["parameters"]["total"], "active": card["parameters"]["active_per_token"],
                     "steps": card["training"]["steps"], "tokens": card["training"]["tokens"],
                     "train_seconds": round(card["training"]["seconds"], 1),
                     **{f"{source}_ppl": round(r["ppl"], 3) for source, r in card["evaluation"]["perplexity"].items()}})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "mone-export" / "larger-models")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    wanted = [(family, seed) for seed in args.seeds for family in args.families]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(pool.map(lambda job: train_one(args.dir, *job, args.steps), wanted))
    rows = summary(folders)
    (args.dir / "models.json").write_text(json.dumps({"models": rows, "seconds": round(time.perf_counter() - started, 1)},
                                                      indent=1) + "\n")
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
