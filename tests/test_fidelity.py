"""A reduced run of benchmarks/fidelity.py: one bundled model, one ratio, two methods."""

import argparse
import importlib.util
import json
import logging
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", REPO / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_fidelity_run_matches_the_card():
    fidelity = _fidelity()
    args = argparse.Namespace(calib=["python-code"], samples=[8], ratios=[0.5], methods=["mone", "frequency"],
                              seq_len=64)
    rows = fidelity.run_model("mixtral", args, logging.getLogger("test"))
    card = json.loads((REPO / "models" / "mixtral" / "card.json").read_text())["evaluation"]["perplexity"]
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    for source in fidelity.SOURCES:
        assert math.isclose(unpruned[f"{source}_ppl"], card[source]["ppl"], rel_tol=1e-6)
    pruned = [r for r in rows if r["method"] != "unpruned"]
    assert [r["method"] for r in pruned] == ["mone", "frequency"]
    for row in pruned:
        for source in fidelity.SOURCES:
            assert math.isfinite(row[f"{source}_ppl"]) and row[f"{source}_ppl"] > unpruned[f"{source}_ppl"]
            assert 0.0 < row[f"{source}_agreement"] < 1.0
    table = fidelity.markdown(rows)
    assert "| 0.5 | mone |" in table and "| 0.5 | frequency |" in table
