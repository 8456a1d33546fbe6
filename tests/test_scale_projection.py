"""benchmarks/scale.py's projection: per-layer measurements to a whole model, by hand."""

from __future__ import annotations

import pytest

from benchmarks.scale import BATCH, SEQ, SHAPES, project


def test_projection_scales_the_token_part_and_keeps_the_solves():
    n = 2 * BATCH * SEQ  # a full batch and more
    rows = [
        {"model": "7b", "phase": "cache_fp", "tokens": n, "seconds": 10.0, "peak_rss_mb": 900.0,
         "disk_bytes_per_layer": 1000 * n},
        {"model": "7b", "phase": "gptaq", "tokens": n, "seconds": 100.0, "statistics_seconds": 60.0,
         "solve_seconds": 40.0, "peak_rss_mb": 5000.0},
        {"model": "7b", "phase": "gptaq", "tokens": n // 4, "seconds": 1.0, "solve_seconds": 0.5,
         "peak_rss_mb": 1.0},  # a smaller N: the largest N is the one projected from
        {"model": "2b", "phase": "gptaq", "tokens": n, "seconds": 7.0, "solve_seconds": 1.0, "peak_rss_mb": 1.0},
    ]
    s = SHAPES["7b"]
    p = project(rows, "7b", tokens=3 * n)
    assert p["measured_tokens"] == [n // 4, n]
    assert p["gptaq_hours"] == pytest.approx((40.0 + 60.0 * 3) * s["layers"] / 3600)
    assert p["cache_fp_hours"] == pytest.approx(10.0 * 3 * s["layers"] / 3600)
    stream_mb = (2 * s["hidden"] * 4 + 16) * (2 * n) / 2**20  # X and X̂ (float32) + g of the extra tokens
    assert p["gptaq_peak_rss_gb"] == pytest.approx((5000.0 + stream_mb) / 1024)
    assert p["cache_fp_peak_rss_gb"] == pytest.approx(900.0 / 1024)
    layer = 1000 * 3 * n
    assert p["disk_all_gb"] == pytest.approx((s["layers"] * layer + 3 * n * s["hidden"] * 4) / 1e9)
    assert p["disk_first_gb"] == pytest.approx((2 * layer + 2 * 3 * n * s["hidden"] * 4) / 1e9)
    small = project([dict(rows[1], tokens=SEQ)], "7b")  # below one full batch: no RAM projection
    assert small["gptaq_peak_rss_gb"] is None
