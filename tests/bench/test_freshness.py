"""``bench.freshness`` without Ray: the feed schedule, the probe summary, the verdict
against issue 12's goals and the report files. No timing assertions (figures live in
BENCHMARKS.md)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from bench.freshness import (
    GOALS,
    REPORT_KEYS,
    FeedPlan,
    Probe,
    feed_schedule,
    format_table,
    summarize_probes,
    verdict,
    write_report,
)


def _probes(latencies: list[float | None], rows: list[float | None] | None = None) -> list[Probe]:
    rows = rows or [None] * len(latencies)
    return [Probe(i, f"u{i}", float(i), None if ms is None else i + ms / 1000.0, 1 if ms else 3, ms, 2.0,
                  row_ms=row, row_polls=4, first_reason=None if ms else "new_user")
            for i, (ms, row) in enumerate(zip(latencies, rows))]


def test_feed_schedule_paces_the_rate():
    plan = feed_schedule(2400.0)
    assert plan.batch == 120 and plan.feeders == 4  # 20 requests/s at most
    # feeders x batch / interval = the rate
    assert plan.feeders * plan.batch / plan.interval_s == pytest.approx(2400.0)
    assert feed_schedule(10.0).batch == 5  # small rates: small batches, fewer requests
    assert feed_schedule(1e7).batch == 1000
    with pytest.raises(ValueError):
        feed_schedule(0.0)
    assert FeedPlan(100.0, 10, 1).interval_s == pytest.approx(0.1)


def test_summary_and_verdict():
    s = summarize_probes(_probes([10.0] * 99 + [200.0] + [None]))
    assert (s["n"], s["fresh"], s["timeouts"]) == (101, 100, 1)
    assert s["p50_ms"] == pytest.approx(10.0) and s["max_ms"] == 200.0
    v = verdict(s, 400.0, min_probes=100)
    assert v["goals"]["stats_freshness_p99_ms"]["met"] is True
    assert v["goals"]["probe_p50_ms"]["met"] is False  # a timeout fails the probe goals
    assert v["met"] is False and v["enough_probes"] is False
    ok = verdict(summarize_probes(_probes([20.0] * 120)), 100.0, min_probes=100)
    assert ok["met"] is True and ok["goals"]["probe_p99_ms"]["target"] == GOALS["probe_p99_ms"]
    few = verdict(summarize_probes(_probes([20.0] * 10)), 100.0, min_probes=100)
    assert few["goals"]["probe_p50_ms"]["met"] is False
    # Too few probes leave the goal unjudged, and the table says so instead of "NOT met" beside 20 ms.
    assert few["goals"]["probe_p50_ms"]["measured"] is False and few["goals"]["stats_freshness_p99_ms"]["measured"]
    lines = format_table({"capacity": {"events": 1, "seconds": 1.0, "events_per_s": 1.0, "loadavg_1m": 0.1},
                          "feed": {"share": 0.5, "target_events_per_s": 1.0, "batch": 1, "achieved_events_per_s": 1.0,
                                   "seconds": 1.0, "errors": 0, "post_p50_ms": 1.0},
                          "probes": summarize_probes(_probes([20.0] * 10)), "stats": {}, "bench": {"poll_ms": 5.0},
                          "verdict": few}).splitlines()
    assert "probe_p50_ms: 20.0 (goal <= 100): not measured (needs >= 100 probes and no timeout)" in lines
    assert verdict(summarize_probes([]), None, min_probes=1)["met"] is False


def test_report_files_and_table(tmp_path):
    probes = _probes([12.0, 30.0, 55.0], [150.0, 220.0, None])
    s = summarize_probes(probes)
    v = verdict(s, 250.0, min_probes=3)
    report = {
        "bench": {"poll_ms": 5.0},
        "date": "2025-01-01T00:00:00+00:00",
        "machine": {},
        "config": {},
        "capacity": {"events": 30000, "seconds": 6.0, "events_per_s": 5000.0, "loadavg_1m": 0.5},
        "feed": {"share": 0.5, "target_events_per_s": 2500.0, "batch": 42, "achieved_events_per_s": 2490.0,
                 "seconds": 60.0, "errors": 0, "post_p50_ms": 8.0},
        "probes": s,
        "stats": {"end": {"freshness_ms": {"p50": 80.0, "p99": 250.0}},
                  "series": [{"t": 1.0, "p50": 70.0, "p99": 240.0}, {"t": 2.0, "p50": None, "p99": None}]},
        "goals": v["goals"],
        "verdict": {"met": v["met"], "enough_probes": v["enough_probes"], "goals": v["goals"]},
        "probe_samples": [asdict(p) for p in probes],
    }
    report["verdict"]["row_served"] = v["row_served"]
    assert tuple(report) == REPORT_KEYS
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["probes"]["fresh"] == 3
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report)
    assert "5,000 events/s" in table and "probe_p99_ms" in table and "met" in table
    assert "own row served" in table and "row_p99_ms" in table


def test_row_served_is_summarised_apart_and_does_not_decide_the_verdict():
    s = summarize_probes(_probes([8.0] * 100, [120.0] * 98 + [400.0, None]))
    assert s["fresh_on_first_rank"] == 100 and s["first_rank_fallback_reasons"] == {"None": 100}
    assert (s["row"]["served"], s["row"]["timeouts"]) == (99, 1)
    assert s["row"]["p50_ms"] == 120.0 and s["row"]["max_ms"] == 400.0
    v = verdict(s, 300.0, min_probes=100)
    assert v["met"] is True  # the goals: /rank leaves the fallback, /stats freshness
    assert v["row_served"]["row_p50_ms"]["met"] is False  # a row timeout fails the informative row figures
    ok = verdict(summarize_probes(_probes([8.0] * 100, [90.0] * 100)), 300.0, min_probes=100)
    assert ok["row_served"]["row_p50_ms"]["met"] and ok["row_served"]["row_p99_ms"]["met"]
