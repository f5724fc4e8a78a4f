"""Tests of ``bench.soak``: the growth fit (no Ray), and a tiny run of the whole code path (a
real deployment over HTTP, kills and restarts, report files). No speed or memory figure is
asserted: those are the benchmark's output (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os

import pytest

from bench.soak import REPORT_KEYS, growth, main, proc_memory


def _sample(applied: int, procs: dict) -> dict:
    return {"applied": applied, "procs": procs}


def test_growth_fits_each_incarnation_after_warm_up_and_excludes_ps_rows():
    samples = []
    for k in range(21):  # 0 .. 2M events, one sample per 100k
        ev = k * 100_000
        procs = {
            # 10 MB per million events, after a 50 MB jump while warming up.
            "ingest-log": {"pid": 1, "rss_mb": 100 + (50 if ev >= 200_000 else 25) + 10 * ev / 1e6},
            # RSS grows only by its rows: flat once they are subtracted.
            "ps-shard-0": {"pid": 2, "rss_mb": 300 + 80 * ev / 1e6, "rows_mb": 80 * ev / 1e6},
        }
        # The trainer restarts at 1M: a fresh process, growing 30 MB per million events.
        procs["trainer-0"] = {"pid": 3 if ev < 1_000_000 else 4,
                              "rss_mb": 200 + 30 * ((ev if ev < 1_000_000 else ev - 1_000_000) / 1e6)}
        samples.append(_sample(ev, procs))
    got = growth(samples, warmup_events=400_000, restart_warmup_events=200_000, min_span_events=300_000)
    (log,) = got["ingest-log"]
    assert log["mb_per_m_events"] == pytest.approx(10.0) and log["from_events"] == 400_000
    (shard,) = got["ps-shard-0"]
    assert shard["mb_per_m_events"] == pytest.approx(0.0, abs=1e-9)
    first, second = got["trainer-0"]
    assert (first["pid"], second["pid"]) == (3, 4)
    assert first["mb_per_m_events"] == pytest.approx(30.0) and first["to_events"] == 900_000
    assert second["from_events"] == 1_200_000 and second["mb_per_m_events"] == pytest.approx(30.0)
    short = growth(samples[:5], warmup_events=0, restart_warmup_events=0, min_span_events=1_000_000)
    assert short["ingest-log"][0]["mb_per_m_events"] is None  # too short a span to fit


def test_proc_memory_reads_this_process():
    mem = proc_memory(os.getpid())
    assert mem is not None and mem["rss_mb"] > 10 and mem["anon_mb"] > 0
    assert proc_memory(2**22 + 12345) is None  # beyond pid_max: no such process


def test_a_tiny_soak_runs_end_to_end(tmp_path):
    ray_env = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env_before = {k: os.environ.get(k) for k in ray_env}
    rc = main(["--events", "6000", "--rate", "3000", "--batch", "500", "--tail", "2000", "--sample-s", "0.5",
               "--users", "200", "--items", "100", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "soak.json").read_text())
    assert tuple(report) == REPORT_KEYS
    assert (tmp_path / "soak.png").stat().st_size > 0
    fin, v = report["final"], report["verdict"]
    assert fin["posted"] == 8000 and fin["drained"], fin
    assert fin["events_accepted"] == fin["events_applied"] + fin["dead_lettered"] == 8000, fin
    kills = [(k["kind"], k["posted"]) for k in report["kills"]]
    assert kills == [("trainer", 3000), ("shard", 3000), ("trainer", 6000), ("shard", 6000)], kills
    assert all(k["restart_s"] is not None and k["actor_back_s"] is not None for k in report["kills"])
    labels = {label for s in report["samples"] for label in s["procs"]}
    assert {"ps-shard-0", "ps-shard-1", "trainer-0", "ingest-log", "serve-replica"} <= labels, labels
    assert v["exactly_once"] and v["all_recovered"]
    assert rc in (0, 1)  # the memory goal is not meaningful over 8,000 events
    # Its own Ray head (free ports, token auth) is gone, and this process's Ray settings are back.
    assert {k: os.environ.get(k) for k in ray_env} == env_before
