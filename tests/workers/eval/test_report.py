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
