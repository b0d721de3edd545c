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
    # --reuse: a second run adds a method and takes the rows measured before as they are.
    args.methods = ["mone", "auto", "frequency"]
    again = fidelity.run_model("mixtral", args, logging.getLogger("test"), {fidelity.row_key(r): r for r in pruned})
    assert [r for r in again if r["method"] in ("mone", "frequency")] == pruned
    auto = next(r for r in again if r["method"] == "auto")
    assert all(math.isfinite(auto[f"{source}_ppl"]) for source in fidelity.SOURCES)


def test_summary_counts_cells_won_against_every_removal_baseline():
    """Hand-made rows: two cells per evaluation source; 'ne' beats every removal method in three of four."""
    fidelity = _fidelity()
    rows = [{"model": "m", "family": "m", "ratio": 0.0, "method": "unpruned", "calib": None, "samples": 0,
             "python-code_ppl": 10.0, "python-docs_ppl": 20.0}]
    table = {  # (calib, code ppl, docs ppl) per method, one ratio 0.25
        "ne": [("python-code", 11.0, 21.0), ("python-docs", 12.0, 30.0)],
        "mone": [("python-code", 13.0, 22.0), ("python-docs", 11.5, 23.0)],
        "frequency": [("python-code", 14.0, 24.0), ("python-docs", 14.0, 24.0)],
        "reap": [("python-code", 12.0, 25.0), ("python-docs", 12.5, 26.0)],
        "routing-score": [("python-code", 50.0, 50.0), ("python-docs", 50.0, 50.0)],
        "random": [("python-code", 60.0, 60.0), ("python-docs", 60.0, 60.0)],
    }
    for method, entries in table.items():
        for calib, code, docs in entries:
            rows.append({"model": "m", "family": "m", "ratio": 0.25, "method": method, "calib": calib, "samples": 8,
                         "python-code_ppl": code, "python-docs_ppl": docs})
    result = fidelity.summary(rows)
    assert result["cells"] == 4
    assert result["ne"]["beats_every_removal"] == 3 and result["ne"]["of"] == 4
    assert result["mone"]["beats_every_removal"] == 3  # loses code/python-code to reap (13 > 12)
    assert math.isclose(result["ne"]["mean_rank"], (1 + 2 + 1 + 4) / 4)
    # mean increase over the four cells: ne (1 + 2 + 1 + 10) / 4 = 3.5, frequency (4 + 4 + 4 + 4) / 4 = 4
    assert math.isclose(result["ne"]["increase_vs_frequency_at_0.25"]["m"], 3.5 / 4)
    # without every removal baseline a cell is no contest: none is counted
    partial = [r for r in rows if r["method"] != "random"]
    assert fidelity.summary(partial)["ne"]["of"] == 0


def test_instances_of_a_family_share_its_name_and_presets_stay_apart():
    fidelity = _fidelity()
    assert fidelity.family_of(fidelity.instance_label("/cache/larger/mixtral-s1"), "large") == "mixtral-large"
    assert fidelity.family_of("qwen2_moe") == "qwen2_moe" and fidelity.family_of("olmoe-s12", "bundled") == "olmoe"
