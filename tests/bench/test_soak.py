"""Tests of ``bench.soak``: the growth fit (no Ray), and a tiny run of the whole code path (a
real deployment over HTTP, kills and restarts, report files). No speed or memory figure is
asserted: those are the benchmark's output (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import types

import pytest

from bench.soak import REPORT_KEYS, _Feed, _Soak, _write_interrupted, analyse, format_table, growth, main, proc_memory, write_report


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


def _report(kills: list[dict]) -> dict:
    samples = [{"t": i, "posted": i * 1000, "accepted": i * 1000, "applied": i * 1000, "applied_raw": i * 1000,
                "dead_lettered": 0, "rows": {}, "ingest_bytes_on_disk": 0, "ingest_segments": 1, "loadavg_1m": 1.0,
                "procs": {"trainer-0": {"pid": 7, "role": "deployment", "rss_mb": 100.0, "anon_mb": 90.0, "file_mb": 10.0}}}
               for i in range(5)]
    return {"bench": {"loadavg_start": 1.0, "restart_timeout": 30.0},
            "feed": {"rate": 100.0, "calibrated_rate": None, "retries": 0, "backlog_wait_s": 0.0},
            "samples": samples, "kills": kills, "growth": {"fit": {"warmup_events": 0, "restart_warmup_events": 0, "min_span_events": 0}},
            "final": {"posted": 4000, "drained": True, "wall_s": 60.0, "events_accepted": 4000, "events_applied": 4000,
                      "dead_lettered": 0, "rows": {}, "ingest_bytes_on_disk": 0, "ingest_segments": 1, "loadavg_end": 1.0}}


def test_an_actor_that_never_recovered_is_reported_as_not_recovered(tmp_path):
    kill = {"at_fraction": 0.5, "posted": 2000, "applied_at_kill": 2000, "loadavg_1m": 1.0, "recovery": None}
    report = analyse(_report([{**kill, "kind": "trainer", "actor_back_s": 1.0, "restart_s": 2.5},
                              {**kill, "kind": "shard", "actor_back_s": None, "restart_s": None}]))
    assert not report["verdict"]["all_recovered"]
    table = format_table(report)
    shard_row = next(line for line in table.splitlines() if line.startswith("shard "))
    # Not a blank figure, and never 0.0 s (the plot used to draw it as the fastest restart).
    assert shard_row.split()[2:5] == ["never", "not", "recovered"], shard_row
    assert "0.0" not in shard_row and "within --restart-timeout 30 s" in table
    assert "shard not recovered -> not recovered" in table and "trainer 2.5 s -> 2.5 s" in table
    _, png = write_report(report, tmp_path)
    assert png.stat().st_size > 0


def test_the_backlog_wait_counts_only_at_the_steady_rate():
    soak = _Soak.__new__(_Soak)  # the feeder's bookkeeping alone: no deployment, no HTTP
    soak.args = argparse.Namespace(max_backlog=10)
    soak.feed, soak._applied_hwm = _Feed(posted=100), 0
    soak.stats = lambda http=None: {"events_applied": 100, "dead_lettered": 0}  # the trainer catches up
    soak.latest = {"applied": 0, "dead_lettered": 0}
    soak._wait_backlog(steady=False)  # calibrating: held, as calibration means to be
    assert soak.feed.backlog_wait_s == 0.0 and soak._backlog() == 0
    soak.latest, soak._applied_hwm, soak.feed.posted = {"applied": 100, "dead_lettered": 0}, 100, 200
    soak.stats = lambda http=None: {"events_applied": 200, "dead_lettered": 0}
    soak._wait_backlog(steady=True)
    assert soak.feed.backlog_wait_s > 0.0


def test_an_interrupted_soak_keeps_its_samples_apart_from_soak_json(tmp_path):
    args = argparse.Namespace(out=tmp_path, events=1000)
    assert _write_interrupted(args, None, 1.0, 0.0) is None  # interrupted before feeding: nothing to keep
    soak = types.SimpleNamespace(samples=_report([])["samples"], kills=[{"kind": "trainer", "thread": object(), "t_kill": 1.0}],
                                 feed=_Feed(posted=4000))
    path = _write_interrupted(args, soak, 1.0, 0.0)
    assert path == tmp_path / "soak-interrupted.json" and not (tmp_path / "soak.json").exists()
    got = json.loads(path.read_text())
    assert len(got["samples"]) == 5 and got["kills"] == [{"kind": "trainer"}] and got["feed"]["posted"] == 4000


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
