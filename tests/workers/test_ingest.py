"""IngestLog as a plain object: dense offsets, reads across batches of different ID
types, recovery on restart and dropping a torn tail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ps.config import IngestConfig
from workers.events import EVENT_COLUMNS
from workers.ingest import IngestLog


# One segment per append and many appends per segment (the default) exercise different
# writer paths: segment rollover versus appending to an open stream.
SEGMENTS = [pytest.param(1, id="segment-per-append"), pytest.param(100_000, id="shared-segment")]


def _log(tmp_path: Path, **kw) -> IngestLog:
    return IngestLog(IngestConfig(dir=str(tmp_path), **{"fsync": False, **kw}))


def _events(batch) -> list[tuple]:
    d = batch.to_pydict()
    assert list(d) == list(EVENT_COLUMNS)
    return list(zip(d["offset"], d["user_id"], d["item_id"], d["timestamp"], d["weight"]))


def _fill(log: IngestLog) -> list[tuple]:
    """Three appends: int IDs, string IDs, mixed; returns the expected (offset, user, item, ts, w) rows."""
    batches = [
        ([1, 2, 3], [10, 20, 30], [100.0, 101.0, 102.0], [1.0, 2.0, 0.5]),
        (["a", "b"], ["x", "y"], [103.0, 104.0], [1.0, 1.0]),
        ([5, "5"], ["5", 5], [105.0, 106.0], [3.0, 4.0]),
    ]
    out = []
    for users, items, ts, w in batches:
        first, last = log.append(users, items, ts, w)
        assert (first, last) == (len(out), len(out) + len(users) - 1)
        out += [(len(out) + j, u, i, t, x) for j, (u, i, t, x) in enumerate(zip(users, items, ts, w))]
    return out


@pytest.mark.parametrize("segment_events", SEGMENTS)
def test_append_returns_dense_offsets_and_reads_by_offset(tmp_path, segment_events):
    log = _log(tmp_path, segment_events=segment_events)
    want = _fill(log)
    assert log.stats()["events_accepted"] == 7
    assert _events(log.read(0, 100)) == want
    # Reads starting mid-batch, spanning batches of different ID types, in any order.
    for off in range(8):
        for n in range(0, 9):
            got = _events(log.read(off, n))
            assert got == want[off : off + n], (off, n)
            types = [type(r[1]) for r in got]
            assert types == [type(r[1]) for r in want[off : off + n]]
    assert log.read(7, 5).num_rows == 0
    assert log.read(100, 5).num_rows == 0


def test_none_timestamp_becomes_server_time(tmp_path):
    import time

    log = _log(tmp_path)
    t0 = time.time()
    log.append([1], [2], [None], [1.0])
    got = log.read(0, 1).to_pydict()
    assert t0 - 1 <= got["timestamp"][0] <= time.time() + 1
    assert t0 - 1 <= got["ingest_ts"][0] <= time.time() + 1


def test_empty_append_changes_nothing(tmp_path):
    log = _log(tmp_path)
    assert log.append([], [], [], []) == (0, -1)
    log.append([1], [2], [1.0], [1.0])
    assert log.append([], [], [], []) == (1, 0)
    assert log.stats()["events_accepted"] == 1
    assert log.read(0, 10).num_rows == 1
    assert _log(tmp_path).stats()["events_accepted"] == 1


@pytest.mark.parametrize("segment_events", [*SEGMENTS, 2])
def test_restart_recovers_all_events_and_continues_offsets(tmp_path, segment_events):
    log = _log(tmp_path, segment_events=segment_events)
    want = _fill(log)
    again = _log(tmp_path, segment_events=segment_events)
    assert again.stats()["events_accepted"] == 7
    assert _events(again.read(0, 100)) == want
    assert again.append([9], ["z"], [107.0], [1.0]) == (7, 7)
    want.append((7, 9, "z", 107.0, 1.0))
    third = _log(tmp_path, segment_events=segment_events)
    assert _events(third.read(0, 100)) == want
    assert _events(third.read(6, 2)) == want[6:]


def _segments(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ingest").glob("segment-*"))


@pytest.mark.parametrize("segment_events", SEGMENTS)
def test_torn_tail_garbage_is_dropped_on_recovery(tmp_path, segment_events):
    log = _log(tmp_path, segment_events=segment_events)
    want = _fill(log)
    last = _segments(tmp_path)[-1]
    size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\xff\xff\xff\xff\x10\x00\x00\x00garbage-bytes")
    again = _log(tmp_path, segment_events=segment_events)
    assert _events(again.read(0, 100)) == want
    assert last.stat().st_size == size  # the torn bytes were cut off
    assert again.append([1], [1], [1.0], [1.0]) == (7, 7)
    assert _events(_log(tmp_path).read(0, 100)) == want + [(7, 1, 1, 1.0, 1.0)]


def test_truncated_last_segment_drops_its_batch_and_earlier_segments_survive(tmp_path):
    log = _log(tmp_path, segment_events=1)
    want = _fill(log)  # three segments: 3 int events, 2 str events, 2 mixed events
    last = _segments(tmp_path)[-1]
    assert len(_segments(tmp_path)) == 3
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 20)  # inside the last batch's body
    again = _log(tmp_path, segment_events=1)
    assert _events(again.read(0, 100)) == want[:5]
    assert again.append(["n"], [1], [9.0], [1.0]) == (5, 5)
    assert _events(_log(tmp_path).read(0, 100)) == want[:5] + [(5, "n", 1, 9.0, 1.0)]


def test_truncated_last_batch_is_dropped_and_earlier_events_survive(tmp_path):
    log = _log(tmp_path)
    log.append([1, 2], [3, 4], [1.0, 2.0], [1.0, 1.0])
    seg = _segments(tmp_path)[-1]
    size_one = seg.stat().st_size
    log.append([5, 6, 7], [8, 9, 10], [3.0, 4.0, 5.0], [1.0, 1.0, 1.0])  # same schema: same segment
    assert _segments(tmp_path) == [seg]
    size_two = seg.stat().st_size
    assert size_two > size_one
    with open(seg, "r+b") as f:
        f.truncate(size_one + (size_two - size_one) // 2)  # cut the second batch mid-body
    again = _log(tmp_path)
    assert again.stats()["events_accepted"] == 2
    assert [e[:3] for e in _events(again.read(0, 10))] == [(0, 1, 3), (1, 2, 4)]
    # The lost (never acknowledged as far as recovery knows) offsets are reused densely.
    assert again.append([11], [12], [6.0], [1.0]) == (2, 2)
    assert [e[:3] for e in _events(_log(tmp_path).read(0, 10))] == [(0, 1, 3), (1, 2, 4), (2, 11, 12)]


def test_a_few_stray_bytes_after_the_last_batch_are_dropped(tmp_path):
    log = _log(tmp_path, segment_events=1)
    log.append([1], [2], [1.0], [1.0])
    log.append(["s"], ["t"], [2.0], [1.0])
    segs = _segments(tmp_path)
    assert len(segs) == 2
    with open(segs[1], "ab") as f:
        f.write(b"\x00" * 3)
    again = _log(tmp_path, segment_events=1)
    assert [e[:3] for e in _events(again.read(0, 10))] == [(0, 1, 2), (1, "s", "t")]


def test_ids_and_weights_keep_their_types(tmp_path):
    log = _log(tmp_path)
    log.append([2**62, -1], ["é", "x" * 300], [0.0, 1.5], [np.float32(0.25), 7])
    b = _log(tmp_path).read(0, 2).to_pydict()
    assert b["user_id"] == [2**62, -1]
    assert b["item_id"] == ["é", "x" * 300]
    assert b["weight"] == [0.25, 7.0]
