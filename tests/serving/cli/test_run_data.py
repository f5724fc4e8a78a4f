"""``freshet run`` on MovieLens files, as a user runs it (a real subprocess, issue 13): a
``::`` ratings.dat is read (4 lines give 4 events), and a stream that would train nothing, or
mostly quarantined rows, is an error naming the file, the layout and the counts (non-zero
exit, before anything is started), never "events trained 0"."""

from __future__ import annotations

import re

import pytest

from tests.serving.cli.helpers import freshet

ML_1M = ["1::1193::5::978300760", "1::661::3::978302109", "1::914::3::978301968", "1::3408::4::978300275"]


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "lines, expect",
    [
        ([], ["no data rows", "detected nothing"]),
        (["1;1193;5;978300760", "1;661;3;978302109", "1;914;3;978301968", "1;3408;4;978300275"],
         ["detected no separator in the first line '1;1193;5;978300760'"]),
        ([*ML_1M[:1], "1;661;3;1", "1;914;3;2", "1;3408;4;3"],
         ["3 of 4 rows quarantined, more than 50% (1 valid;", "expected ratings.dat (ML-1M/10M"]),
    ],
    ids=["empty", "no-separator", "mostly-quarantined"],
)
def test_run_refuses_a_stream_that_would_train_nothing(tmp_path, lines, expect):
    f = _write(tmp_path / "ml-1m" / "ratings.dat", lines)
    r = freshet("run", "--data", str(f), timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(f) in r.stderr, r.stderr
    for text in expect:
        assert text in r.stderr, r.stderr
    assert "events trained" not in r.stdout


def test_run_trains_every_line_of_a_ratings_dat(tmp_path):
    # The report: these 4 lines used to give "events trained 0" and exit 0. By the default
    # rating rule (positive at >= 4 of 5), 2 of them are positives; all 4 are events.
    d = _write(tmp_path / "ml-1m" / "ratings.dat", ML_1M).parent
    r = freshet("run", "--data", str(d), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "movielens stream, 4 events" in r.stdout
    assert re.search(r"^events trained\s+4$", r.stdout, re.M), r.stdout[-2000:]
    assert re.search(r"^quarantined rows\s+0$", r.stdout, re.M), r.stdout[-2000:]
