"""The verdict logic of benchmarks/ablations.py (paired differences, per-claim verdicts)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

spec = importlib.util.spec_from_file_location("ablations", Path(__file__).parents[1] / "benchmarks" / "ablations.py")
abl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(abl)


def frame(kl, correct, order=None):
    n = len(kl)
    idx = np.arange(n) if order is None else order
    return pd.DataFrame({"task": "t", "doc_id": idx, "kl_to_fp": np.asarray(kl)[idx],
                         "correct": np.asarray(correct)[idx]})


def test_paired_matches_closed_form_and_aligns_by_question():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    perm = rng.permutation(50)  # rows in another order: pairing is by (task, doc_id)
    m, se = abl.paired(frame(a, a > 0.5), frame(b, b > 0.5, perm), "kl_to_fp")
    d = a - b
    assert m == pytest.approx(d.mean(), abs=1e-12)
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(50), abs=1e-12)


@pytest.mark.parametrize("delta,claim,want", [
    (-3.0, "lower", "reproduced"), (3.0, "lower", "opposite"), (-1.0, "lower", "within noise"),
    (3.0, "higher", "reproduced"), (-3.0, "higher", "opposite"), (1.9, "higher", "within noise"),
    (1.9, "not_worse", "reproduced"), (-5.0, "not_worse", "reproduced"), (2.1, "not_worse", "opposite"),
])
def test_verdict_thresholds(delta, claim, want):
    assert abl.verdict(delta, 1.0, claim) == want


def test_compare_rows_and_table_verdict():
    rng = np.random.default_rng(1)
    base = rng.random(400) * 0.01
    rows = {"VLMQ": ("vlmq", frame(base, np.ones(400)), {"accuracy": 1.0, "kl_to_fp": base.mean()}),
            "RTN": ("rtn", frame(base + 0.005, np.ones(400)), {"accuracy": 1.0, "kl_to_fp": base.mean() + 0.005}),
            "GPTQ": ("gptq", frame(base - 0.004 + rng.normal(0, 1e-4, 400), np.ones(400)),
                     {"accuracy": 1.0, "kl_to_fp": base.mean() - 0.004})}
    lines, verdicts = abl.compare_rows(rows, [("RTN", "VLMQ"), ("GPTQ", "VLMQ")], "higher")
    assert verdicts == ["reproduced", "opposite"]
    assert "reference" in lines[0] and "(vs VLMQ)" in lines[1]
    assert abl.table_verdict(verdicts).startswith("not reproduced (1 of 2")
    assert abl.table_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert abl.table_verdict(["reproduced", "within noise"]).startswith("not shown (1 of 2")


def test_tables_cover_the_papers_ablations():
    assert set(abl.METHOD_TABLES.values()) == {(3, 128), (2, 128), (3, -1)}
    t9 = abl.TABLES["Table 9 (precursor, W2g128)"]
    assert t9[1][0] == "lower" and {b for _, b in t9[1][1]} == {"GPTQ", "GPTAQ"}
