"""MovieLens ratings files (:mod:`workers.streams.movielens`) and their quarantine file."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.conftest import MOVIELENS
from tests.workers.streams.helpers import ML_LINES, _write, rows
from workers.streams import QUARANTINE_SCHEMA, MovieLensSource, read_quarantine

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
