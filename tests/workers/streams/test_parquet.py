"""Parquet files as a stream (:mod:`workers.streams.parquet`)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.workers.streams.helpers import EVENT_TYPES, event, keys, rows
from workers.config import ModelConfig
from workers.streams import ParquetSource, StreamDataError, read_quarantine


def test_parquet_directory_truncated_file_is_quarantined(tmp_path):
    good = pa.table({"user_id": [1, 2, 3], "item_id": [7, 8, 9], "timestamp": [30.0, 10.0, 20.0], "weight": [1.0, 2.0, 3.0]})
    pq.write_table(good, tmp_path / "b_good.parquet")
    pq.write_table(good, tmp_path / "a_bad.parquet")
    data = (tmp_path / "a_bad.parquet").read_bytes()
    (tmp_path / "a_bad.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("ignored")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q)
    b = src.read(0, 100)
    assert [str(t) for t in b.schema.types] == EVENT_TYPES
    d = rows(b)
    assert d["user_id"] == [1, 2, 3]  # file order, not sorted by time
    assert d["weight"] == [1.0, 2.0, 3.0]
    assert d["user_key"] == keys([1, 2, 3]) and d["item_key"] == keys([7, 8, 9])
    assert d["event_type"] == d["event_id"] == [None] * 3  # no such columns: null
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
    with pytest.raises(StreamDataError, match="4 of 5 rows quarantined"):  # more than half by default
        ParquetSource(f, quarantine_path=q)
    src = ParquetSource(f, quarantine_path=q, max_quarantined_fraction=1.0)
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


def test_parquet_negative_timestamps_and_boolean_weights_are_quarantined_naming_the_field(tmp_path):
    # POST /events refuses a timestamp below 0 and a weight that is not a number; a file row
    # must be judged alike, and its quarantine reason must say which field is wrong.
    t = pa.table({"user_id": [1, 2, 3], "item_id": [10, 11, 12], "timestamp": [0.0, -1.0, 5.0], "weight": [1.0, 1.0, 2.0]})
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": [4], "item_id": [13], "timestamp": [6.0], "weight": [True]}), tmp_path / "b.parquet")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q, max_quarantined_fraction=1.0)
    assert rows(src.read(0, 10))["user_id"] == [1, 3]  # timestamp 0 is valid
    got = {(Path(r["source"]).name, r["row"]): r["reason"] for r in read_quarantine(q).to_pylist()}
    assert got == {("a.parquet", 1): "timestamp: must be >= 0 unix seconds, got -1.0",
                   ("b.parquet", 0): "weight: must be a number, got bool True"}


def test_parquet_min_weight_keeps_a_weight_equal_to_it(tmp_path):
    # min_weight drops weights *below* it (stream.min_weight); in file order (no sort_by_time).
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [10, 11, 12], "timestamp": [3.0, 2.0, 1.0],
                             "weight": [4.0, 3.5, 5.0]}), tmp_path / "a.parquet")
    assert rows(ParquetSource(tmp_path, min_weight=4.0).read(0, 10))["weight"] == [4.0, 5.0]
    assert rows(ParquetSource(tmp_path, min_weight=4.0, sort_by_time=True).read(0, 10))["weight"] == [5.0, 4.0]


def test_parquet_wrong_types_and_missing_column(tmp_path):
    pq.write_table(pa.table({"user_id": [1.5], "item_id": [1], "timestamp": ["yesterday"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": ["yesterday"]}), tmp_path / "c.parquet")
    big = pa.array([2**64 - 1, 5], pa.uint64())
    pq.write_table(pa.table({"user_id": [7, 8], "item_id": big, "timestamp": [1.0, 2.0]}), tmp_path / "d.parquet")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q, max_quarantined_fraction=1.0)
    assert rows(src.read(0, 10)) == event(0, 8, 5, 2.0, 1.0)
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


def test_parquet_event_type_and_event_id(tmp_path):
    n = 4
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 2, 3, 4],
                "item_id": [10, 20, 30, 40],
                "timestamp": [1.0, 2.0, 3.0, 4.0],
                "weight": [1.0, 0.5, 2.0, 4.0],
                "event_type": pa.array(["click", None, "purchase", "rating"]).dictionary_encode(),
                "event_id": pa.array(["e1", "e2", None, "x" * 256], pa.large_string()),
            }
        ),
        tmp_path / "1.parquet",
    )
    # A file without the optional columns joins the same stream with nulls.
    pq.write_table(pa.table({"user_id": [5], "item_id": [50], "timestamp": [5.0]}), tmp_path / "2.parquet")
    src = ParquetSource(tmp_path)
    assert src.end_offset == n + 1 and src.quarantined == 0
    b = src.read(0, 10)
    assert [str(t) for t in b.schema.types] == EVENT_TYPES
    d = rows(b)
    assert d["event_type"] == ["click", None, "purchase", "rating", None]
    assert d["event_id"] == ["e1", "e2", None, "x" * 256, None]
    assert rows(src.read(2, 2))["event_type"] == ["purchase", "rating"]  # sliced with their rows
    # min_weight still filters, and the types stay with their rows.
    kept = rows(ParquetSource(tmp_path, min_weight=1.5).read(0, 10))
    assert kept["user_id"] == [3, 4] and kept["event_type"] == ["purchase", "rating"]


def test_parquet_bad_event_type_and_event_id_are_quarantined(tmp_path):
    good = {"user_id": list(range(6)), "item_id": list(range(6)), "timestamp": [1.0] * 6}
    pq.write_table(
        pa.table({**good, "event_type": ["click", "", "t" * 65, "t" * 64, None, "view"],
                  "event_id": ["a", "b", "c", "d", "", "i" * 257]}),
        tmp_path / "a.parquet",
    )
    pq.write_table(pa.table({**good, "event_type": [1, None, 3, None, None, None]}), tmp_path / "b.parquet")
    q = tmp_path / "q.arrow"
    src = ParquetSource(tmp_path, quarantine_path=q)
    d = rows(src.read(0, 100))
    assert d["event_type"] == ["click", "t" * 64, None, None, None, None]
    assert d["event_id"] == ["a", "d", None, None, None, None]
    assert src.quarantined == 6
    got = {(Path(r["source"]).name, r["row"]): r["reason"] for r in read_quarantine(q).to_pylist()}
    assert got == {
        ("a.parquet", 1): "event_type: must not be empty",
        ("a.parquet", 2): "event_type: longer than 64 characters (65)",
        ("a.parquet", 4): "event_id: must not be empty",
        ("a.parquet", 5): "event_id: longer than 256 characters (257)",
        ("b.parquet", 0): "event_type: must be a string, got int64 1",
        ("b.parquet", 2): "event_type: must be a string, got int64 3",
    }


def test_parquet_weights_beyond_the_model_are_quarantined(tmp_path):
    f = tmp_path / "e.parquet"
    w = [1.0, -2000.0, 1000.0, 3e38, 5e38, 7.0]
    pq.write_table(pa.table({"user_id": list(range(6)), "item_id": list(range(6)), "timestamp": [1.0] * 6, "weight": w}), f)
    q = tmp_path / "q.arrow"
    plain = ParquetSource(f, quarantine_path=q)  # no model: only float32's range binds
    assert rows(plain.read(0, 10))["weight"] == [1.0, -2000.0, 1000.0, pytest.approx(3e38, rel=1e-6), 7.0]
    (rec,) = read_quarantine(q).to_pylist()
    assert rec["row"] == 4 and rec["reason"].startswith("weight: 5e+38 is beyond float32's range")
    model = ModelConfig()  # max_abs_weight 1000: |-2000| and 3e38 exceed it, 1000 does not
    src = ParquetSource(f, quarantine_path=q, model=model)
    assert rows(src.read(0, 10))["weight"] == [1.0, 1000.0, 7.0]
    got = {r["row"]: r["reason"] for r in read_quarantine(q).to_pylist()}
    assert got[1] == model.weight_problem(-2000.0) and got[3] == model.weight_problem(3e38)
    assert sorted(got) == [1, 3, 4]


def test_parquet_ratings_past_the_full_confidence_one_are_quarantined(tmp_path):
    f = tmp_path / "e.parquet"
    types = ["rating", "rating", "view", None, "rating"]
    pq.write_table(pa.table({"user_id": list(range(5)), "item_id": list(range(5)), "timestamp": [1.0] * 5,
                             "weight": [5.0, 7.0, 7.0, 7.0, -6.0], "event_type": types}), f)
    q = tmp_path / "q.arrow"
    model = ModelConfig()  # ratings.scale 5: only the ratings 7 and -6 are refused
    got = rows(ParquetSource(f, quarantine_path=q, model=model).read(0, 10))
    assert got["weight"] == [5.0, 7.0, 7.0] and got["event_type"] == ["rating", "view", None]
    reasons = {r["row"]: r["reason"] for r in read_quarantine(q).to_pylist()}
    assert reasons == {1: model.weight_problem(7.0, "rating"), 4: model.weight_problem(-6.0, "rating")}


def test_parquet_without_events_is_an_error(tmp_path):
    empty = pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()), "timestamp": pa.array([], pa.float64())})
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(StreamDataError) as e:
        ParquetSource(tmp_path)
    assert str(tmp_path) in str(e.value) and "no data rows" in str(e.value)
    assert "found columns empty.parquet: user_id, item_id, timestamp" in str(e.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(StreamDataError) as e:
        ParquetSource(tmp_path / "junk")
    msg = str(e.value)
    assert "no events: 0 of 1 rows valid, 1 quarantined" in msg and "unreadable Parquet" in msg
    assert "expected Parquet columns user_id, item_id" in msg and "found columns none readable" in msg


def test_nanosecond_timestamps_and_ints_beyond_float64s_exact_range_load_row_by_row(tmp_path):
    # pandas writes datetimes as timestamp[ns]; the float64 cast of 1.58e18 ns used to fail the
    # whole file ("Integer value ... not in range"), as did one weight of 2**60.
    from datetime import datetime

    f = tmp_path / "ns.parquet"
    when = [datetime(2020, 1, 1), datetime(2020, 1, 2), datetime(2020, 1, 3)]
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [5, 6, 7],
                             "timestamp": pa.array(when, pa.timestamp("ns")), "weight": [1, 2, 2**60]}), f)
    q = tmp_path / "q.arrow"
    model = ModelConfig()
    got = rows(ParquetSource(f, quarantine_path=q, model=model).read(0, 10))
    assert got["timestamp"] == [1577836800.0, 1577923200.0] and got["weight"] == [1.0, 2.0]
    (rec,) = read_quarantine(q).to_pylist()
    assert rec["row"] == 2 and rec["reason"] == model.weight_problem(float(2**60))
    ints = tmp_path / "int-ns.parquet"
    pq.write_table(pa.table({"user_id": [1], "item_id": [5], "timestamp": [1_577_836_800_123_456_789]}), ints)
    assert rows(ParquetSource(ints).read(0, 1))["timestamp"] == [pytest.approx(1.5778368e18, rel=1e-9)]
