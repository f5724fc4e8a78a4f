"""Tests of ``bench.call_cost``: the break-even rule (no Ray), and a tiny run of the whole
command on a real Ray (every path carries every byte, the report has its keys and plot).

No speed figure is asserted: those are the benchmark's output (BENCHMARKS.md).
"""

from __future__ import annotations

import json

import pytest

from bench.call_cost import REPORT_KEYS, break_even_mb, format_table, main
from serving.config import RayConfig


def _rows(costs: dict[float, tuple[float, float]]) -> list[dict]:
    return [{"size_mb": mb, "path": path, "wall_ms": 1.0, "cpu_ms": c}
            for mb, (inline, store) in costs.items() for path, c in (("inline", inline), ("object store", store))]


def test_break_even_is_the_first_size_where_the_store_costs_less_cpu():
    assert break_even_mb(_rows({0.1: (1.5, 3.0), 1: (2.8, 3.4), 2: (4.2, 3.8), 4: (7.0, 4.5)})) == 2
    assert break_even_mb(_rows({0.1: (1.5, 3.0), 1: (2.8, 3.4)})) is None
    table = format_table(_rows({0.1: (1.5, 3.0), 2: (4.2, 3.8)})).splitlines()
    assert len(table) == 4 and table[2].split()[0] == "0.1" and table[3].split()[0] == "2"


# ~20 s on a quiet host; 300 s beside four busy processes (each compiled graph's setup and its
# polling actors compete for the 2 cores), more than any other test.
@pytest.mark.timeout(900)
def test_a_tiny_run_carries_every_byte_both_ways_and_writes_the_report(tmp_path, capsys):
    assert main(["--sizes", "0.01,0.3", "--calls", "20", "--idle-s", "0.5", "--pipeline-rounds", "1",
                 "--pipeline-batches", "2", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "call_cost.json").read_text())
    assert tuple(report) == REPORT_KEYS
    assert (tmp_path / "call_cost.png").stat().st_size > 0
    got = {(r["size_mb"], r["path"]) for r in report["rows"]}
    assert got == {(mb, path) for mb in (0.01, 0.3) for path in ("inline", "object store", "compiled graph")}
    # CPU comes in clock ticks (10 ms): one cell of 20 short calls may read 0, but not all six.
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] >= 0 for r in report["rows"])
    assert sum(r["cpu_ms"] for r in report["rows"]) > 0
    assert report["calls"] == 20 and report["idle_s"] == 0.5 and report["break_even_mb"] in (None, 0.01, 0.3)
    assert report["compiled_graph_idle_cores"] >= 0 and report["plain_idle_cores"] >= 0
    pipe = report["pipeline"]
    assert pipe["batches"] == 2 and len(pipe["rounds"]) == 1
    assert pipe["graph_idle_cores"] >= 0 and pipe["plain_idle_cores"] >= 0
    # On Freshet's own transport: its 3 MB parts go through the object store, as in the PS.
    assert pipe["max_inline_bytes"] == RayConfig().max_inline_bytes < pipe["mb"] * (1 << 20)
    # Each way takes at least the CPU work it models, whatever the transport.
    (r,) = pipe["rounds"]
    assert set(r) == {"plain_s", "graph_s", "plain_overlap_s", "graph_overlap_s"}
    assert min(r["plain_s"], r["graph_s"]) >= pipe["floor_s"] > pipe["overlap_floor_s"]
    assert min(r["plain_overlap_s"], r["graph_overlap_s"]) >= pipe["overlap_floor_s"]
    out = capsys.readouterr().out
    assert "object store cheaper in CPU from:" in out and "no calls for 0.5 s, all processes:" in out
    assert "round 1: serial: plain calls" in out


@pytest.mark.timeout(900)
def test_a_failed_pipeline_keeps_the_per_call_results(tmp_path, monkeypatch, capsys):
    import bench.call_cost as cc

    def fail(*a, **k):
        raise RuntimeError("no second Ray")

    monkeypatch.setattr(cc, "run_pipeline", fail)
    assert main(["--sizes", "0.01", "--calls", "5", "--idle-s", "0.1", "--pipeline-rounds", "1", "--quiet",
                 "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "call_cost.json").read_text())
    assert {r["path"] for r in report["rows"]} == {"inline", "object store", "compiled graph"}
    assert report["pipeline"] == {"failed": "RuntimeError: no second Ray"}
    assert "PS pipeline model: FAILED: RuntimeError: no second Ray" in capsys.readouterr().out
    m = report["machine"]
    assert m["loadavg_start"] >= 0 and m["loadavg_end"] >= 0 and report["date"].endswith("+00:00")


def test_the_table_has_a_column_pair_per_measured_path():
    rows = _rows({0.1: (1.5, 3.0)}) + [{"size_mb": 0.1, "path": "compiled graph", "wall_ms": 0.2, "cpu_ms": 0.7}]
    head, _, line = format_table(rows).splitlines()
    assert "graph wall ms" in head and head.rstrip().endswith("graph CPU ms")
    assert line.split() == ["0.1", "1.00", "1.50", "1.00", "3.00", "0.20", "0.70"]


@pytest.mark.parametrize(("flag", "value"), [("--idle-s", "0"), ("--idle-s", "61"), ("--idle-s", "x"),
                                           ("--pipeline-rounds", "-1"), ("--pipeline-rounds", "21"),
                                           ("--pipeline-batches", "0"), ("--pipeline-batches", "10001")])
def test_a_bad_idle_time_or_pipeline_size_is_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit):
        main([flag, value])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["", "1,x", "9", "-1", "nan", "0.5,inf", "1,0.5,1"])
def test_bad_sizes_are_refused_naming_the_flag(sizes, capsys):
    with pytest.raises(SystemExit):
        main(["--sizes", sizes])
    assert "--sizes" in capsys.readouterr().err
