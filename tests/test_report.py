"""report: metrics.json shape, paired verdicts, and loud failure on missing/corrupt inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.report import ReportError, report, verdict


def fake_run(root: Path, run: str, acc: float, kl: float, quant: dict | None, seed: int):
    rng = np.random.default_rng(seed)
    d = root / "eval" / run
    d.mkdir(parents=True)
    n = 200
    correct = rng.random(n) < acc
    pq = pd.DataFrame({"question_id": np.arange(n), "skill": "color", "correct": correct,
                       "answer_nll": rng.random(n) + kl, "kl_to_fp": np.abs(rng.normal(kl, kl / 4 + 1e-9, n))})
    pq.to_parquet(d / "per_question.parquet")
    (d / "result.json").write_text(json.dumps({"accuracy": float(correct.mean()), "per_task": {"vlmq_demo": float(correct.mean())},
                                               "answer_nll": float(pq["answer_nll"].mean()), "kl_to_fp": float(pq["kl_to_fp"].mean()), "n": n}))
    if quant:
        (root / "quant").mkdir(exist_ok=True)
        (root / "quant" / f"{run}.json").write_text(json.dumps(quant))


def test_report_writes_metrics_tables_and_plots(tmp_path):
    fake_run(tmp_path, "fp", 0.95, 0.0, None, 0)
    fake_run(tmp_path, "rtn-w3g128", 0.70, 0.5, {"method": "rtn", "bits": 3, "group_size": 128, "quantize_seconds": 1.0, "peak_rss_mb": 10}, 1)
    fake_run(tmp_path, "vlmq-w3g128", 0.90, 0.05, {"method": "vlmq", "bits": 3, "group_size": 128, "precursor": "gptaq",
                                                    "importance": "gradient", "quantize_seconds": 2.0, "peak_rss_mb": 12}, 2)
    m = report(tmp_path / "eval", tmp_path / "quant", tmp_path / "out", tmp_path / "imp", tmp_path / "cache")
    methods = {r["method"]: r for r in m["runs"]}
    assert set(methods) == {"fp", "rtn", "vlmq"}
    for r in m["runs"]:
        assert set(r) >= {"method", "bits", "group_size", "precursor", "importance", "accuracy", "per_task",
                          "answer_nll", "kl_to_fp", "quantize_seconds", "peak_rss_mb"}
        assert 0 <= r["accuracy"] <= 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == m
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## W3" in md and "vlmq-w3g128" in md and "paired kl_to_fp" in md and "→ better" in md
    assert (tmp_path / "out" / "plots" / "accuracy_vs_bits.png").stat().st_size > 1000


def test_report_fails_naming_missing_or_corrupt_file(tmp_path):
    fake_run(tmp_path, "fp", 0.95, 0.0, None, 0)
    fake_run(tmp_path, "gptq-w3g128", 0.8, 0.1, {"method": "gptq", "bits": 3, "group_size": 128}, 1)
    (tmp_path / "eval" / "gptq-w3g128" / "result.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"gptq-w3g128/result\.json is not valid JSON"):
        report(tmp_path / "eval", tmp_path / "quant", tmp_path / "out", tmp_path / "imp", tmp_path / "cache")
    (tmp_path / "eval" / "gptq-w3g128" / "result.json").unlink()
    with pytest.raises(ReportError, match=r"gptq-w3g128/result\.json is missing"):
        report(tmp_path / "eval", tmp_path / "quant", tmp_path / "out", tmp_path / "imp", tmp_path / "cache")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_verdict_needs_two_standard_errors():
    assert verdict(-0.3, 0.1, lower_is_better=True) == "better"
    assert verdict(-0.15, 0.1, lower_is_better=True) == "within noise"
    assert verdict(0.3, 0.1, lower_is_better=True) == "worse"
    assert verdict(0.3, 0.1, lower_is_better=False) == "better"
