"""``bench.serve_latency`` without Ray: the goal evaluation, the table, the report files and the
CLI's checks. No timing assertions (figures live in BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from bench.serve_latency import (
    GOALS,
    _parse,
    evaluate_goals,
    format_table,
    write_report,
)


def _row(mode, target, clients, rps, p50=1.0, errors=0, items=100_000):
    return {"mode": mode, "items": items, "target": target, "clients": clients, "requests": int(rps * 8),
            "duration_s": 8.0, "req_per_s": rps, "p50_ms": p50, "p90_ms": p50 * 1.5, "p99_ms": p50 * 3,
            "max_ms": p50 * 5, "mean_ms": p50, "bad_status": errors, "bad_bodies": 0, "transport_errors": {},
            "errors": errors}


def _rows(mode, echo, rank, rank_p50=3.0, echo_p50=2.0, errors=0):
    out = []
    for c, e, r in zip((1, 8, 32, 64), echo, rank):
        out.append(_row(mode, "echo", c, e, p50=echo_p50 if c == 1 else 10.0))
        out.append(_row(mode, "rank", c, r, p50=rank_p50 if c == 1 else 20.0, errors=errors if c == 64 else 0))
    return out


def test_goals_met_and_missed_per_mode():
    rows = (_rows("default", [300, 400, 400, 400], [150, 250, 260, 255], rank_p50=3.9)
            + _rows("high_throughput", [2000, 4000, 4300, 4300], [400, 480, 520, 470], rank_p50=2.5, echo_p50=0.4))
    g = evaluate_goals(rows)
    assert set(g) == {"default", "high_throughput"}
    d, h = g["default"], g["high_throughput"]
    assert d["no_collapse"]["met"] is True
    assert d["sequential_p50"]["met"] is True  # 3.9 <= 2.0 + 2
    assert d["concurrent_default"]["met"] is True  # 260 >= 0.5 x 400
    assert "concurrent_high_throughput" not in d
    assert h["no_collapse"]["met"] is False  # 470 at 64 < 480 at 8
    assert h["sequential_p50"]["met"] is False  # 2.5 > 0.4 + 2
    assert h["concurrent_high_throughput"]["met"] is True  # 520 >= 500
    assert set(d) | set(h) <= set(GOALS)


def test_an_error_fails_no_collapse():
    g = evaluate_goals(_rows("default", [300, 400, 400, 400], [150, 250, 260, 255], errors=1))
    assert g["default"]["no_collapse"]["met"] is False and "errors 1" in g["default"]["no_collapse"]["detail"]


def test_table_and_report_files(tmp_path):
    rows = _rows("default", [300, 400, 400, 400], [150, 250, 260, 255])
    table = format_table(rows)
    assert table.splitlines()[0].startswith("mode") and len(table.splitlines()) == 2 + 4
    assert "0.65" in table  # 260 / 400 at 32 clients
    report = {"bench": {"clients": [1, 8, 32, 64], "k": 100, "dim": 64, "client": "wrk"}, "rows": rows,
              "goals": evaluate_goals(rows)}
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["goals"]["default"]["no_collapse"]["met"] is True
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_checks():
    a = _parse(["--items", "100000", "--clients", "1,8", "--client", "python"])
    assert a.items == [100_000] and a.clients == [1, 8] and a.modes == ["default", "high_throughput"]
    with pytest.raises(SystemExit):
        _parse(["--modes", "fast"])
    with pytest.raises(SystemExit):
        _parse(["--items", "10", "--seen", "20"])
