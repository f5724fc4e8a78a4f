"""Update strategies (:mod:`workers.eval.strategies`): specs, and every strategy end to end
on a slice of the shared MovieLens file through :func:`workers.eval.compare.run_eval`."""

from __future__ import annotations

import json

import pytest

from serving.config import load_config
from tests.workers.eval.scripted import CFG, ListSource, Scripted
from workers.eval.compare import run_eval
from workers.eval.protocol import prequential
from workers.eval.strategies import make_strategy, parse_strategy_spec


def test_strategy_specs_are_validated():
    assert parse_strategy_spec("retrain:every=1000,epochs=5") == ("retrain", {"every": 1000, "epochs": 5})
    assert parse_strategy_spec("popularity:halflife=none") == ("popularity", {"halflife": None})
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        parse_strategy_spec("bogus")
    with pytest.raises(ValueError, match="epochs must be a number"):
        parse_strategy_spec("retrain:epochs=lots")
    with pytest.raises(ValueError, match="retrain has no setting 'speed'"):
        make_strategy("retrain:speed=3", CFG, total_events=100)
    with pytest.raises(ValueError, match="chunk_size"):
        prequential(ListSource([(1, 100)]), Scripted(), chunk_size=0)


def test_every_strategy_runs_end_to_end_and_the_report_parses(movielens_ratings, tmp_path, ray_cluster):
    cfg = load_config(None, {"ps": {"tables": {"user": {"dim": 16}, "item": {"dim": 16}}}})
    specs = ["incremental", "popularity", "frozen:epochs=3", "retrain:every=500,epochs=2", "finetune:every=500,epochs=2", "als"]
    report = run_eval(cfg, data=str(movielens_ratings), strategies=specs, report_dir=tmp_path, max_events=2000, progress=False)
    rows = report["strategies"]
    assert set(rows) == set(specs) - {"als"} | ({"als"} & set(rows))
    if "als" not in rows:
        assert "implicit" in report["skipped"]["als"]
    for name, r in rows.items():
        assert r["events"] == 2000, name
        assert r["evaluated"] > 500 and r["evaluated"] + r["cold_events"] == 2000, name
        assert 0.0 <= r["recall@10"] <= r["recall@20"] <= 1.0, name
        assert 0.0 < r["coverage"] <= 1.0, name
    # Same stream, same protocol: every strategy evaluates the same events.
    assert len({r["evaluated"] for r in rows.values()}) == 1
    assert rows["incremental"]["staleness_events_mean"] == 0.0
    assert rows["incremental"]["cpu_s"] > 0 and rows["incremental"]["settings"]["shard_cpu_s"] > 0
    assert rows["frozen:epochs=3"]["staleness_events_mean"] > 0
    assert rows["retrain:every=500,epochs=2"]["settings"]["fits"] == 4
    assert rows["incremental"]["recall@10"] > 0.5 * rows["popularity"]["recall@10"]

    loaded = json.loads((tmp_path / "report.json").read_text())
    assert set(loaded["strategies"]) == set(rows)
    assert "incremental_over_popularity" in loaded["targets"]
    md = (tmp_path / "report.md").read_text()
    assert "| strategy | recall@10 | recall@20 | NDCG@10 | coverage | CPU-s |" in md
    for png in ("windowed_recall.png", "quality_vs_cpu.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
