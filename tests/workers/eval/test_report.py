"""``workers.eval.report``: the targets are computed against the right baselines."""

from __future__ import annotations

import pytest

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


def test_the_targets_heading_only_when_a_target_applies(tmp_path):
    # `freshet eval --strategies popularity` printed an empty "## Targets" heading.
    import numpy as np

    from workers.eval.protocol import EvalResult
    from workers.eval.report import write_report

    def result(name: str) -> EvalResult:
        return EvalResult(name, {}, events=100, eval_offsets=np.arange(50, 100), eval_ranks=np.arange(50) % 25 - 5)

    meta = {"data": "synthetic", "events": 100, "chunk_size": 20, "min_weight": None, "loss": "bpr", "created": "now"}
    write_report([result("popularity")], tmp_path / "one", meta, window=20)
    assert "## Targets" not in (tmp_path / "one" / "report.md").read_text()
    write_report([result("popularity"), result("incremental")], tmp_path / "two", meta, window=20)
    md = (tmp_path / "two" / "report.md").read_text()
    assert "## Targets\n\n- incremental / popularity recall@10 = 1.000" in md


def test_retrain_cpu_at_the_same_staleness_is_extrapolated_over_every_chunks_history():
    # Retraining after each of m chunks fits 1, 2, ..., m chunks of history: m(m + 1)/2 chunks
    # in all. 100 events in chunks of 20 -> m = 5 -> 15 chunks = 300 events, x 20 epochs x
    # 0.001 CPU-s per event-epoch = 6 CPU-s.
    meta = {"events": 100, "chunk_size": 20}

    def rows(inc_cpu: float) -> dict:
        retrain = {**_row("retrain:every=2000", 0.05, {"epochs": 20}), "cpu_s_per_event_epoch": 0.001}
        return {"incremental": {**_row("incremental", 0.06), "cpu_s": inc_cpu}, "retrain": retrain}

    slow = _targets(rows(1.0), [], meta)["cpu_vs_retrain_at_same_staleness"]
    assert slow["retrain_every_chunk_cpu_s_extrapolated"] == pytest.approx(6.0)
    assert slow["ratio"] == pytest.approx(1.0 / 6.0)
    assert slow["met"] is False  # 1 CPU-s is more than a tenth of 6
    fast = _targets(rows(0.5), [], meta)["cpu_vs_retrain_at_same_staleness"]
    assert fast["met"] is True


def test_targets_are_met_at_exactly_their_thresholds():
    # The report prints "target >= 1.4" and "recovery <= 2000 events": equality meets them.
    rows = {r["strategy"]: r for r in (_row("popularity", 0.5, {"halflife_events": None}), _row("incremental", 0.7))}
    assert 0.7 / 0.5 == 1.4
    assert _targets(rows, [], {"events": 100, "chunk_size": 20})["incremental_over_popularity"]["met"] is True
    for events, met in ((2000, True), (2001, False), (None, False)):
        rows["incremental"]["recovery"] = {"events": events}
        t = _targets(rows, [], {"events": 100, "chunk_size": 20, "drift_offset": 50})
        assert t["incremental_recovery"] == {"events": events, "target": 2000, "met": met}
        assert t["recovery_events"]["incremental"] == events
