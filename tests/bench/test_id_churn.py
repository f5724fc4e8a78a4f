"""Smoke tests of ``bench.id_churn`` at a tiny size: the stream has the documented shape, the
capped shard stays at its cap, and the report has its keys, table and plot.

No speed or memory goal is asserted here; those figures live in BENCHMARKS.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.id_churn import REPORT_KEYS, format_table, main, run_ray, stream_batches
from ps.ids import id_keys


def test_stream_batches_bring_exactly_the_distinct_ids_asked_for_with_skewed_repeats():
    batches = list(stream_batches(5000, 1000, 0.5, 1.1, seed=3))
    keys = np.concatenate([k for k, _ in batches])
    assert [seen for _, seen in batches] == list(range(500, 5001, 500))
    assert len(np.unique(keys)) == 5000
    assert set(np.unique(keys).tolist()) == set(id_keys(np.arange(5000)).tolist())
    assert all(len(k) == 1000 for k, _ in batches[1:])  # after the first, half new and half repeats
    # Zipf repeats: the first ID is by far the most frequent.
    _, counts = np.unique(keys, return_counts=True)
    assert counts.max() == (keys == id_keys([0])[0]).sum() and counts.max() > 100
    with pytest.raises(ValueError, match="new_fraction"):
        next(stream_batches(10, 10, 0.0, 1.1))


def test_a_tiny_run_writes_the_report_and_holds_the_cap(tmp_path, capsys):
    report = main(["--ids", "20000", "--max-rows", "2000", "--batch", "1000", "--dim", "8", "--index-rows", "3000",
                   "--index-rounds", "2", "--ray-ids", "0", "--quiet", "--out", str(tmp_path)])
    assert tuple(report) == REPORT_KEYS
    s = report["stream"]
    assert s["table"]["rows"] == 2000 and max(s["samples"]["rows"]) == 2000
    assert s["cap_reached_at_ids"] == 2000
    assert s["raw_row_bytes"] == 4 * (8 + 1)
    assert s["bytes_per_row_ratio"] == pytest.approx(s["table"]["bytes_per_row"] / 36)
    # Every ID beyond the cap pushed one out, and the reader heard of each removal once.
    assert s["removals_seen_by_reader"] >= 20000 - 2000
    assert s["table"]["tombstones"] < 20000 - 2000  # pruned to the reader's lag
    assert set(report["index"]["ratio_to_dict"]) == {"lookup", "insert", "remove"}
    saved = json.loads((tmp_path / "churn.json").read_text())
    assert tuple(saved) == REPORT_KEYS and saved["machine"]["loadavg_start"]
    assert (tmp_path / "churn.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "bytes/row" in out and "KeyIndex lookup" in out and format_table(report) in out


def test_the_ray_part_holds_the_cap_on_a_shard_actor(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("RAY_TMPDIR", os.environ.get("RAY_TMPDIR", "/tmp"))
    r = run_ray(6000, 1000, batch=1000, dim=8, progress=False)
    assert r["table"]["rows"] == 1000 and max(r["samples"]["rows"]) == 1000
    assert r["keys_pushed"] > 6000 and r["flat"]["rss_at_cap_mb"] > 0
