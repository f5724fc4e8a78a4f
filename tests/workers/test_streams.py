"""Tests for workers.streams: synthetic, MovieLens and Parquet sources and quarantine."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ps.config import StreamConfig, StreamKind, SyntheticConfig
from workers.events import EVENT_COLUMNS
from tests.conftest import MOVIELENS
from workers.streams import (
    QUARANTINE_SCHEMA,
    MovieLensSource,
    ParquetSource,
    SyntheticSource,
    open_source,
    read_quarantine,
)



def rows(batch: pa.RecordBatch) -> dict:
    """Batch contents without ingest_ts (which is the read time)."""
    d = batch.to_pydict()
    d.pop("ingest_ts")
    return d


def concat(*batches: pa.RecordBatch) -> dict:
    out: dict = {}
    for b in batches:
        for k, v in rows(b).items():
            out.setdefault(k, []).extend(v)
    return out


# --------------------------------------------------------------------------- synthetic


def test_synthetic_random_access_is_order_independent():
    cfg = SyntheticConfig(seed=3)
    a = SyntheticSource(cfg, 20_000)
    whole = rows(a.read(0, 1000))
    assert whole == concat(a.read(0, 500), a.read(500, 500))
    # Across a chunk boundary, read backwards on a fresh source and forwards on another.
    b, c = SyntheticSource(cfg, 20_000), SyntheticSource(cfg, 20_000)
    backwards = [b.read(o, 700) for o in range(12_600, 3000, -700)][::-1]
    forwards = c.read(3500, 9800)
    assert concat(*backwards) == rows(forwards)
    assert rows(b.read(0, 1000)) == whole


def test_synthetic_seed_determines_stream():
    a = SyntheticSource(SyntheticConfig(seed=1), 5000).read(0, 5000)
    b = SyntheticSource(SyntheticConfig(seed=1), 5000).read(0, 5000)
    c = SyntheticSource(SyntheticConfig(seed=2), 5000).read(0, 5000)
    assert rows(a) == rows(b)
    assert rows(a)["item_id"] != rows(c)["item_id"]
    assert rows(a)["user_id"] != rows(c)["user_id"]


def test_synthetic_schema_and_values():
    cfg = SyntheticConfig(num_users=300, num_items=200)
    src = SyntheticSource(cfg, 10_000)
    before = time.time()
    b = src.read(100, 5000)
    assert b.schema.names == list(EVENT_COLUMNS)
    assert [str(t) for t in b.schema.types] == ["int64", "int64", "int64", "double", "float", "double"]
    d = b.to_pydict()
    assert d["offset"] == list(range(100, 5100))
    assert all(0 <= u < 300 for u in d["user_id"])
    assert all(0 <= i < 200 for i in d["item_id"])
    assert set(d["weight"]) == {1.0}
    ts = np.array(d["timestamp"])
    assert np.all(np.diff(ts) >= 0)
    assert 1_700_000_000 <= ts[0] < 1_700_000_000 + 200
    assert 0.9 < np.diff(ts).mean() < 1.1
    assert all(before - 1 <= t <= time.time() + 1 for t in d["ingest_ts"])


def test_synthetic_end_offset_and_past_end():
    src = SyntheticSource(SyntheticConfig(), 1000)
    assert src.end_offset == 1000
    assert src.quarantined == 0
    assert src.read(900, 500).num_rows == 100
    assert src.read(1000, 10).num_rows == 0
    assert src.read(5000, 10).num_rows == 0
    assert src.read(0, 0).num_rows == 0
    unbounded = SyntheticSource(SyntheticConfig(), None)
    assert unbounded.end_offset is None
    far = unbounded.read(10_000_000, 10)
    assert far.column("offset").to_pylist() == list(range(10_000_000, 10_000_010))
    with pytest.raises(ValueError, match="offset"):
        src.read(-1, 10)
    with pytest.raises(ValueError, match="num_events"):
        SyntheticSource(SyntheticConfig(), -5)
    src.close()
    with pytest.raises(ValueError, match="closed"):
        src.read(0, 10)


def test_synthetic_popularity_is_skewed_and_shuffled():
    cfg = SyntheticConfig(num_items=1000, drift_at=None)
    d = SyntheticSource(cfg, 50_000).read(0, 50_000).to_pydict()
    counts = np.bincount(d["item_id"], minlength=1000)
    top = np.sort(counts)[::-1]
    assert top[:100].sum() / counts.sum() > 0.5  # uniform would give 0.1
    # Item ids are not popularity ranks: count is not ordered by id.
    ranks_by_id = np.argsort(np.argsort(-counts))
    assert abs(np.corrcoef(np.arange(1000), ranks_by_id)[0, 1]) < 0.2


def test_synthetic_sessions():
    cfg = SyntheticConfig(num_users=2000, session_mean=5.0)
    users = np.array(SyntheticSource(cfg, 40_000).read(0, 40_000).column("user_id").to_pylist())
    same = (users[1:] == users[:-1]).mean()
    assert same > 0.6  # independent draws would give about 1/num_users plus heavy-user chance
    runs = np.diff(np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1], [True]])))
    assert 4.0 < runs.mean() < 7.0
    # One-event sessions are almost independent draws.
    single = np.array(SyntheticSource(SyntheticConfig(session_mean=1.0), 20_000).read(0, 20_000).column("user_id").to_pylist())
    assert (single[1:] == single[:-1]).mean() < 0.1


def _cluster_item_counts(src: SyntheticSource, lo: int, hi: int, num_clusters: int, num_items: int) -> np.ndarray:
    d = src.read(lo, hi - lo).to_pydict()
    clusters = src.cluster_of(np.array(d["user_id"]))
    counts = np.zeros((num_clusters, num_items))
    np.add.at(counts, (clusters, np.array(d["item_id"])), 1)
    return counts


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int = 20) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def test_synthetic_drift_changes_cluster_tastes():
    n, c, items = 80_000, 4, 500
    src = SyntheticSource(SyntheticConfig(num_items=items, num_clusters=c, drift_at=0.5), n)
    assert src.drift_offset == 40_000
    early = _cluster_item_counts(src, 0, 20_000, c, items)
    late_pre = _cluster_item_counts(src, 20_000, 40_000, c, items)
    post = _cluster_item_counts(src, 40_000, 60_000, c, items)
    # Globally popular items stay shared, so compare the in-taste heads.
    stable = np.mean([_top_overlap(early[k], late_pre[k]) for k in range(c)])
    shifted = np.mean([_top_overlap(late_pre[k], post[k]) for k in range(c)])
    assert stable > 0.7
    assert shifted < 0.5
    assert stable - shifted > 0.3

    nodrift = SyntheticSource(SyntheticConfig(num_items=items, num_clusters=c, drift_at=None), n)
    assert nodrift.drift_offset is None
    a = _cluster_item_counts(nodrift, 20_000, 40_000, c, items)
    b = _cluster_item_counts(nodrift, 40_000, 60_000, c, items)
    assert np.mean([_top_overlap(a[k], b[k]) for k in range(c)]) > 0.7


def test_synthetic_unbounded_drift_uses_default_horizon():
    src = SyntheticSource(SyntheticConfig(drift_at=0.25), None)
    assert src.drift_offset == 25_000


def test_synthetic_throughput():
    src = SyntheticSource(SyntheticConfig(), 200_000)
    t = time.perf_counter()
    n = sum(src.read(o, 10_000).num_rows for o in range(0, 200_000, 10_000))
    elapsed = time.perf_counter() - t
    assert n == 200_000
    assert elapsed < 2.0  # >= 100k events/s even on a loaded CI core; ~700k/s measured


# --------------------------------------------------------------------------- MovieLens

ML_LINES = [
    "userId,movieId,rating,timestamp",
    "1,10,4.0,300",
    "1,11,2.5,100",
    "2,10,5.0,200",
    "2,12,3.0,100",
    "3,13,4.5,50",
]


def _write(path: Path, lines: list[str], eol: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((eol.join(lines) + eol).encode())
    return path


def test_movielens_crlf_and_lf_agree_and_are_time_ordered(tmp_path):
    lf = MovieLensSource(_write(tmp_path / "lf" / "ratings.csv", ML_LINES))
    crlf = MovieLensSource(_write(tmp_path / "crlf" / "ratings.csv", ML_LINES, "\r\n"))
    assert lf.end_offset == crlf.end_offset == 5
    a, b = lf.read(0, 100), crlf.read(0, 100)
    assert rows(a) == rows(b)
    d = rows(a)
    assert d["timestamp"] == [50.0, 100.0, 100.0, 200.0, 300.0]
    # Ties (timestamp 100) keep file order: (1, 11) is before (2, 12) in the file.
    assert list(zip(d["user_id"], d["item_id"])) == [(3, 13), (1, 11), (2, 12), (2, 10), (1, 10)]
    assert d["weight"] == [4.5, 2.5, 3.0, 5.0, 4.0]
    assert d["offset"] == [0, 1, 2, 3, 4]
    assert [str(t) for t in a.schema.types] == ["int64", "int64", "int64", "double", "float", "double"]
    assert rows(lf.read(1, 2)) == {k: v[1:3] for k, v in d.items()}
    assert lf.read(5, 10).num_rows == 0
    assert lf.quarantined == 0


def test_movielens_min_weight_and_cap(tmp_path):
    f = _write(tmp_path / "ratings.csv", ML_LINES)
    src = MovieLensSource(f, min_weight=4.0)
    d = rows(src.read(0, 100))
    assert d["weight"] == [4.5, 5.0, 4.0]
    assert d["offset"] == [0, 1, 2]  # dense over kept rows
    capped = MovieLensSource(f, num_events=2)
    assert capped.end_offset == 2
    assert rows(capped.read(0, 100))["item_id"] == [13, 11]


def test_movielens_u_data(tmp_path):
    tsv = ["\t".join(line.split(",")) for line in ML_LINES[1:]]
    udata = _write(tmp_path / "ml-100k" / "u.data", tsv)
    from_file = MovieLensSource(udata)
    from_dir = MovieLensSource(tmp_path / "ml-100k")
    ref = MovieLensSource(_write(tmp_path / "ratings.csv", ML_LINES))
    assert rows(from_file.read(0, 100)) == rows(from_dir.read(0, 100)) == rows(ref.read(0, 100))
    # Detected by content too: tab-separated, no header, any name.
    other = MovieLensSource(_write(tmp_path / "x.txt", tsv))
    assert rows(other.read(0, 100)) == rows(ref.read(0, 100))


def test_movielens_lenient_numbers_and_empty_file(tmp_path):
    f = _write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp", " 7 , 8 , +2 , 1e3 "])
    expected = {"offset": [0], "user_id": [7], "item_id": [8], "timestamp": [1000.0], "weight": [2.0]}
    assert rows(MovieLensSource(f).read(0, 5)) == expected
    (tmp_path / "empty.csv").write_bytes(b"")
    assert MovieLensSource(tmp_path / "empty.csv").end_offset == 0
    header_only = _write(tmp_path / "h" / "ratings.csv", ML_LINES[:1])
    assert MovieLensSource(header_only).read(0, 5).num_rows == 0


def test_movielens_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        MovieLensSource(tmp_path / "nope.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        MovieLensSource(tmp_path / "empty")


def test_movielens_quarantine(tmp_path):
    lines = [
        "userId,movieId,rating,timestamp",
        "1,10,4.0,300",  # line 2
        "1,11,4.0",  # line 3: missing column
        "2,12,great,100",  # line 4: non-numeric rating
        ",13,3.0,100",  # line 5: empty userId
        "",  # line 6: blank, skipped silently
        "4,14,nan,100",  # line 7: non-finite rating
        "5,15,1.0,-3",  # line 8: negative timestamp
        "6,16,2.0,20",  # line 9
    ]
    f = _write(tmp_path / "ratings.csv", lines, "\r\n")
    q = tmp_path / "q" / "quarantine.arrow"
    src = MovieLensSource(f, quarantine_path=q)
    d = rows(src.read(0, 100))
    assert list(zip(d["user_id"], d["item_id"])) == [(6, 16), (1, 10)]
    assert src.end_offset == 2
    assert src.quarantined == 5
    table = read_quarantine(q)
    assert table.schema.equals(QUARANTINE_SCHEMA)
    got = {r["row"]: r for r in table.to_pylist()}
    assert sorted(got) == [3, 4, 5, 7, 8]
    assert all(r["source"] == str(f) for r in got.values())
    assert got[3]["reason"].startswith("timestamp: missing") and got[3]["raw"] == "1,11,4.0"
    assert got[4]["reason"].startswith("weight:") and "great" in got[4]["reason"]
    assert got[4]["raw"] == "2,12,great,100"
    assert got[5]["reason"] == "user_id: missing" and got[5]["raw"] == ",13,3.0,100"
    assert got[7]["reason"].startswith("weight:") and "finite" in got[7]["reason"]
    assert got[8]["reason"].startswith("timestamp:") and ">= 0" in got[8]["reason"]

    # Reopening replaces this file's rows instead of duplicating them; no path: count only.
    MovieLensSource(f, quarantine_path=q)
    assert read_quarantine(q).num_rows == 5
    nowrite = MovieLensSource(f, quarantine_path=None)
    assert nowrite.quarantined == 5


def test_quarantine_file_keeps_other_sources(tmp_path):
    q = tmp_path / "quarantine.arrow"
    a = _write(tmp_path / "a" / "ratings.csv", ["userId,movieId,rating,timestamp", "x,1,1,1", "1,1,1,1"])
    b = _write(tmp_path / "b" / "ratings.csv", ["userId,movieId,rating,timestamp", "1,y,1,1", "1,1,1,1"])
    MovieLensSource(a, quarantine_path=q)
    MovieLensSource(b, quarantine_path=q)
    t = read_quarantine(q).to_pylist()
    assert sorted((r["source"], r["reason"]) for r in t) == [
        (str(a), "user_id: must be an integer, got 'x'"),
        (str(b), "item_id: must be an integer, got 'y'"),
    ]


@pytest.mark.skipif(not (MOVIELENS / "ratings.csv").is_file(), reason="shared MovieLens data absent")
def test_movielens_real_ratings():
    path = MOVIELENS / "ratings.csv"
    src = MovieLensSource(MOVIELENS)
    assert src.end_offset == 100_836
    assert src.quarantined == 0
    ts = np.concatenate([src.read(o, 20_000).column("timestamp").to_numpy() for o in range(0, 100_836, 20_000)])
    assert len(ts) == 100_836 and np.all(np.diff(ts) >= 0)
    with open(path, newline="") as f:
        expected = sum(1 for r in csv.DictReader(f) if float(r["rating"]) >= 4)
    assert MovieLensSource(path, min_weight=4).end_offset == expected
    last = MovieLensSource(path, min_weight=4).read(expected - 1, 10)
    assert last.num_rows == 1 and last.column("weight")[0].as_py() >= 4


# --------------------------------------------------------------------------- Parquet


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


# --------------------------------------------------------------------------- open_source


def test_open_source_kinds(tmp_path):
    syn = open_source(StreamConfig(num_events=123))
    assert isinstance(syn, SyntheticSource) and syn.end_offset == 123
    f = _write(tmp_path / "ratings.csv", ML_LINES + ["x,1,1,1"])
    q = tmp_path / "q.arrow"
    ml = open_source(StreamConfig(kind=StreamKind.MOVIELENS, path=str(f), min_weight=4.0, num_events=None), quarantine_path=q)
    assert isinstance(ml, MovieLensSource) and ml.end_offset == 3 and ml.quarantined == 1
    assert read_quarantine(q).num_rows == 1
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": [3.0]}), tmp_path / "e.parquet")
    pqs = open_source(StreamConfig(kind=StreamKind.PARQUET, path=str(tmp_path / "e.parquet")))
    assert isinstance(pqs, ParquetSource) and pqs.end_offset == 1
    with pytest.raises(ValueError, match="workers.ingest"):
        open_source(StreamConfig(kind=StreamKind.INGEST))
