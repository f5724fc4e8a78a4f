"""``workers.eval.report``: the targets are computed against the right baselines."""

from __future__ import annotations

from workers.eval.report import _targets


def _row(spec: str, recall: float, settings: dict | None = None) -> dict:
    return {"strategy": spec, "recall@10": recall, "settings": settings or {}, "cpu_s": 1.0}


def test_targets_use_all_time_popularity_and_every_full_retrain():
    # The first popularity spec given was the baseline (a half-life one when listed first), and
    # only MF retrains counted as "full retrain": an ALS row that beat incremental printed "met".
    rows = {r["strategy"]: r for r in (
        _row("popularity:halflife=2000", 0.050, {"halflife_events": 2000}),
        _row("popularity", 0.040, {"halflife_events": None}),
        _row("incremental", 0.056),
        _row("retrain:every=2000", 0.049, {"epochs": 20}),
        _row("als", 0.060, {"epochs": 15}),
    )}
    t = _targets(rows, [], {"events": 100, "chunk_size": 20})
    assert t["incremental_over_popularity"]["popularity"] == "popularity"
    assert t["incremental_over_popularity"]["ratio"] == 0.056 / 0.040
    assert t["incremental_vs_best_retrain"]["retrain"] == "als" and not t["incremental_vs_best_retrain"]["met"]
