"""``freshet run``'s summary reports its prequential figures as ``freshet eval`` does (issue 13):
recall@10, recall@20 and NDCG@10 of the model and of the all-time popularity baseline, summed
over trainers. No Ray: the rows are built from trainer stats."""

from __future__ import annotations

from serving.cli.run import _summary_rows


def _stats(metrics):
    return {"metrics": metrics, "events_applied": 500, "device": "cpu", "freshness_ms": {"p50": 10.0, "p99": 20.0}}


def test_summary_shows_recall_at_10_and_20_ndcg_and_all_time_popularity():
    a = {"eval_events": 300, "cold_events": 50, "model_hits@10": 30, "model_hits@20": 45, "model_ndcg@10": 12.0,
         "popular_hits@10": 20, "popular_hits@20": 33, "popular_ndcg@10": 9.0}
    b = {"eval_events": 100, "cold_events": 10, "model_hits@10": 10, "model_hits@20": 15, "model_ndcg@10": 4.0,
         "popular_hits@10": 5, "popular_hits@20": 7, "popular_ndcg@10": 1.0}
    rows = dict(_summary_rows([_stats(a), _stats(b)], [1.0], [2.0], 10.0, quarantined=0, quarantine_file=None))
    assert rows["events trained"] == "1,000"
    model = rows["prequential model recall@10 / @20 / NDCG@10"]
    assert model.startswith("0.1000 / 0.1500 / 0.0400 ") and "over 400 warm positives (60 cold)" in model
    assert rows["prequential popularity (all-time counts)"] == "0.0625 / 0.1000 / 0.0250"
    assert rows["model / popularity (recall@10)"] == "1.60x"


def test_summary_without_evaluated_events_says_so():
    rows = dict(_summary_rows([_stats({})], [], [], 1.0, quarantined=0, quarantine_file=None))
    assert rows["model / popularity (recall@10)"] == "n/a"
    assert "over 0 warm positives" in rows["prequential model recall@10 / @20 / NDCG@10"]
