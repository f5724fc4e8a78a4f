"""IngestLog as a plain object: dense offsets, reads across batches of different ID
types, recovery on restart and dropping a torn tail; and with ``ingest.dir`` a
``pyarrow.fs`` URI, one object per append and strict recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from workers.config import IngestConfig
from workers.events import EVENT_COLUMNS
from workers.ingest_log import IngestLog, read_log_id


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


# --- ingest.dir as a pyarrow.fs URI: one object per append ------------------------------


def _uri_cfg(tmp_path: Path, **kw) -> IngestConfig:
    return IngestConfig(dir=(tmp_path / "store").as_uri(), state_dir=str(tmp_path / "state"), **{"fsync": False, **kw})


def _objects(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "store" / "ingest").iterdir())


def _seg(first: int) -> str:
    return f"segment-{first:020d}.arrows"


class _ObjectStoreHandler(pafs.FileSystemHandler):
    """A local directory behaving like an object store: no append streams and no rename
    (both raise), and every object written is recorded."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()
        self.written: list[str] = []

    def open_append_stream(self, path, metadata):
        raise OSError(f"object stores cannot append: open_append_stream({path!r})")

    def move(self, src, dest):
        raise OSError(f"object stores have no atomic rename: move({src!r}, {dest!r})")

    def open_output_stream(self, path, metadata):
        self.written.append(path.rsplit("/", 1)[-1])
        return self.fs.open_output_stream(path, metadata=metadata)

    def get_type_name(self):
        return "object-store-test"

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not needed")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)


def test_uri_log_writes_one_object_per_append_and_recovers(tmp_path):
    cfg = _uri_cfg(tmp_path, fsync=True)  # file://: temp name, fsync, rename
    log = IngestLog(cfg)
    want = _fill(log)  # appends of 3, 2 and 2 events; segment_events (100k) does not apply
    assert _objects(tmp_path) == ["LOG_ID", _seg(0), _seg(3), _seg(5)]  # no temp object left behind
    for name, rows in [(_seg(0), want[:3]), (_seg(3), want[3:5]), (_seg(5), want[5:])]:
        with pa.OSFile(str(tmp_path / "store" / "ingest" / name)) as f:
            assert _events(pa.ipc.open_stream(f).read_all().to_batches()[0]) == rows
    assert log.stats()["dir"] == cfg.dir + "/ingest"
    assert not (tmp_path / "state").exists()  # the log itself needs no local state

    again = IngestLog(cfg)
    assert again.log_id == log.log_id == read_log_id(cfg)
    assert again.stats()["events_accepted"] == 7
    assert _events(again.read(0, 100)) == want
    assert again.append([9], ["z"], [107.0], [1.0]) == (7, 7)
    assert _objects(tmp_path)[-1] == _seg(7)
    assert _events(IngestLog(cfg).read(0, 100)) == want + [(7, 9, "z", 107.0, 1.0)]


def test_uri_log_never_appends_or_renames_on_an_object_store(tmp_path):
    cfg = _uri_cfg(tmp_path)
    store = _ObjectStoreHandler()
    log = IngestLog(cfg, filesystem=pafs.PyFileSystem(store))
    want = []
    for k, (users, items) in enumerate([([1, 2, 3], [4, 5, 6]), (["a"], ["b"]), ([7], ["c"])]):
        first, _ = log.append(users, items, [1.0] * len(users), [1.0] * len(users))
        want += _events(log.read(first, len(users)))
        # Each acknowledged append is already a complete object another reader recovers.
        assert _events(IngestLog(cfg, filesystem=pafs.PyFileSystem(_ObjectStoreHandler())).read(0, 100)) == want, k
    # Every object was PUT exactly once, under its final name: no temp objects, no rewrites.
    assert store.written == ["LOG_ID", _seg(0), _seg(3), _seg(4)]
    assert _objects(tmp_path) == ["LOG_ID", _seg(0), _seg(3), _seg(4)]


def test_uri_log_drops_a_leftover_temp_object(tmp_path):
    cfg = _uri_cfg(tmp_path)
    want = _fill(IngestLog(cfg))
    # A crash between writing an object's temp file and renaming it: never acknowledged.
    leftover = tmp_path / "store" / "ingest" / f".{_seg(7)}.0123abcd.tmp"
    leftover.write_bytes(b"half an object")
    again = IngestLog(cfg)
    assert not leftover.exists()
    assert _events(again.read(0, 100)) == want
    assert again.append([1], [1], [1.0], [1.0]) == (7, 7)


def test_uri_log_with_a_missing_object_refuses_to_start(tmp_path):
    cfg = _uri_cfg(tmp_path)
    _fill(IngestLog(cfg))
    (tmp_path / "store" / "ingest" / _seg(3)).unlink()
    with pytest.raises(RuntimeError, match=r"offsets 3\.\.4 are missing \(the next object is segment-0+5\.arrows\)") as info:
        IngestLog(cfg)
    assert cfg.dir in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_uri_log_with_an_unreadable_object_refuses_to_start(tmp_path, damage):
    cfg = _uri_cfg(tmp_path)
    _fill(IngestLog(cfg))
    obj = tmp_path / "store" / "ingest" / _seg(3)
    data = obj.read_bytes()
    obj.write_bytes({"truncate": data[: len(data) - 20], "garbage": b"\x00not arrow" * 10, "empty": b""}[damage])
    with pytest.raises(RuntimeError, match=rf"object {_seg(3)} is unreadable"):
        IngestLog(cfg)


def test_uri_log_rejects_an_object_whose_offsets_do_not_match_its_name(tmp_path):
    cfg = _uri_cfg(tmp_path)
    _fill(IngestLog(cfg))
    ingest = tmp_path / "store" / "ingest"
    (ingest / _seg(5)).write_bytes((ingest / _seg(3)).read_bytes())  # offsets 3..4 named as from 5
    with pytest.raises(RuntimeError, match=rf"object {_seg(5)} holds offsets 3\.\.4, expected a run from 5"):
        IngestLog(cfg)


def test_read_log_id_creates_nothing(tmp_path):
    local = IngestConfig(dir=str(tmp_path / "local"), fsync=False)
    uri = _uri_cfg(tmp_path)
    assert read_log_id(local) is None and read_log_id(uri) is None
    assert not (tmp_path / "local").exists() and not (tmp_path / "store").exists()
    local_id, uri_id = IngestLog(local).log_id, IngestLog(uri).log_id
    assert read_log_id(local) == local_id and read_log_id(uri) == uri_id != local_id
    with pytest.raises(ValueError, match="filesystem"):
        IngestLog(local, filesystem=pafs.LocalFileSystem())
