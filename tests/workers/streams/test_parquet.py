"""Parquet files as a stream (:mod:`workers.streams.parquet`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.workers.streams.helpers import rows
from workers.streams import ParquetSource, read_quarantine

def test_parquet_directory_truncated_file_is_quarantined(tmp_path):
    good = pa.table({"user_id": [1, 2, 3], "item_id": [7, 8, 9], "timestamp": [30.0, 10.0, 20.0], "weight": [1.0, 2.0, 3.0]})
    pq.write_table(good, tmp_path / "b_good.parquet")
    pq.write_table(good, tmp_path / "a_bad.parquet")
    data = (tmp_path / "a_bad.parquet").read_bytes()
    (tmp_path / "a_bad.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("ignored")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q)
    d = rows(src.read(0, 100))
    assert d["user_id"] == [1, 2, 3]  # file order, not sorted by time
    assert d["weight"] == [1.0, 2.0, 3.0]
    assert src.quarantined == 1
    (rec,) = read_quarantine(q).to_pylist()
    assert rec["source"] == str(tmp_path / "a_bad.parquet") and rec["row"] == -1
    assert "unreadable" in rec["reason"]


def test_parquet_bad_rows(tmp_path):
    t = pa.table(
        {
            "user_id": pa.array([1, None, 3, 4, 5], pa.int64()),
            "item_id": pa.array([10, 11, None, 13, 14], pa.int64()),
            "timestamp": pa.array([1.0, 2.0, 3.0, float("inf"), 5.0]),
            "weight": pa.array([1.0, 1.0, 1.0, 1.0, None]),
        }
    )
    f = tmp_path / "events.parquet"
    pq.write_table(t, f)
    q = tmp_path / "q.arrow"
    src = ParquetSource(f, quarantine_path=q)
    assert rows(src.read(0, 10))["user_id"] == [1]
    assert src.quarantined == 4
    got = {r["row"]: r for r in read_quarantine(q).to_pylist()}
    assert got[1]["reason"] == "user_id: missing"
    assert got[2]["reason"] == "item_id: missing"
    assert got[3]["reason"].startswith("timestamp: must be finite")
    assert got[4]["reason"] == "weight: missing"
    assert "'user_id': None" in got[1]["raw"]


def test_parquet_string_ids_default_weight_and_file_order(tmp_path):
    pq.write_table(
        pa.table({"user_id": ["u2"], "item_id": ["i9"], "timestamp": pa.array([5], pa.int64())}), tmp_path / "2.parquet"
    )
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", ""],
                "item_id": ["i1", "i2"],
                "timestamp": pa.array([1_000_000, 2_000_000], pa.timestamp("ms")),
            }
        ),
        tmp_path / "1.parquet",
    )
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q)
    b = src.read(0, 10)
    assert b.schema.field("user_id").type == pa.string()
    d = rows(b)
    assert d["user_id"] == ["u1", "u2"] and d["item_id"] == ["i1", "i9"]
    assert d["timestamp"] == [1000.0, 5.0] and d["weight"] == [1.0, 1.0]
    (rec,) = read_quarantine(q).to_pylist()
    assert rec["row"] == 1 and rec["reason"].startswith("user_id:") and "empty" in rec["reason"]


def test_parquet_wrong_types_and_missing_column(tmp_path):
    pq.write_table(pa.table({"user_id": [1.5], "item_id": [1], "timestamp": ["yesterday"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": ["yesterday"]}), tmp_path / "c.parquet")
    big = pa.array([2**64 - 1, 5], pa.uint64())
    pq.write_table(pa.table({"user_id": [7, 8], "item_id": big, "timestamp": [1.0, 2.0]}), tmp_path / "d.parquet")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q)
    assert rows(src.read(0, 10)) == {"offset": [0], "user_id": [8], "item_id": [5], "timestamp": [2.0], "weight": [1.0]}
    got = {Path(r["source"]).name: r for r in read_quarantine(q).to_pylist()}
    assert got["a.parquet"]["reason"].startswith("user_id: must be an int or str ID")
    assert got["b.parquet"]["row"] == -1 and got["b.parquet"]["reason"].startswith("timestamp: column missing")
    assert got["c.parquet"]["reason"].startswith("timestamp: must be a number")
    assert got["d.parquet"]["row"] == 0 and "64-bit" in got["d.parquet"]["reason"]
    assert src.quarantined == 4


def test_parquet_mixed_id_types_across_files(tmp_path):
    pq.write_table(pa.table({"user_id": [1], "item_id": ["a"], "timestamp": [1.0]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"user_id": ["x"], "item_id": [2], "timestamp": [2.0]}), tmp_path / "2.parquet")
    d = rows(ParquetSource(tmp_path).read(0, 10))
    assert d["user_id"] == [1, "x"] and d["item_id"] == ["a", 2]  # 5 and "5" stay distinct types


def test_parquet_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone"):
        ParquetSource(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        ParquetSource(tmp_path)
