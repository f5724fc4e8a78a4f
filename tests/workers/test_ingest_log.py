"""IngestLog as a plain object: dense offsets, reads across batches of different ID
types, recovery on restart and dropping a torn tail; and with ``ingest.dir`` a
``pyarrow.fs`` URI, one object per append and strict recovery.

``SyncLog`` and ``span`` are shared by the other ``test_ingest_*`` modules."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from workers.config import IngestConfig
from workers.events import EVENT_COLUMNS
from workers.ingest_log import AppendResult, IngestLog, read_log_id

# One loop for every SyncLog of the session: a loop per log would leave its executor threads behind.
_LOOP = asyncio.new_event_loop()


class SyncLog:
    """An ``IngestLog`` (a real one, no Ray) driven from synchronous test code: each of its
    coroutine methods runs to completion on a shared event loop; other attributes pass
    through. ``run`` runs any coroutine (e.g. a ``gather`` of appends) on that loop."""

    def __init__(self, cfg: IngestConfig, **kw):
        self.log = IngestLog(cfg, **kw)

    @staticmethod
    def run(coro):
        return _LOOP.run_until_complete(coro)

    def __getattr__(self, name):
        attr = getattr(self.log, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **k: self.run(attr(*a, **k))
        return attr


def span(result: AppendResult) -> tuple[int, int]:
    """``(first, last)`` offset of a single-partition append without duplicates."""
    assert result.duplicates == 0 and list(result.offsets) == [0], result
    last = result.offsets[0]
    assert result.offset == last
    return last - result.accepted + 1, last


# One segment per append and many appends per segment (the default) exercise different
# writer paths: segment rollover versus appending to an open stream.
SEGMENTS = [pytest.param(1, id="segment-per-append"), pytest.param(100_000, id="shared-segment")]


def _log(tmp_path: Path, **kw) -> SyncLog:
    return SyncLog(IngestConfig(dir=str(tmp_path), **{"fsync": False, **kw}))


def _events(batch) -> list[tuple]:
    d = batch.to_pydict()
    assert list(d) == list(EVENT_COLUMNS)
    return list(zip(d["offset"], d["user_id"], d["item_id"], d["timestamp"], d["weight"]))


def _fill(log: SyncLog) -> list[tuple]:
    """Three appends: int IDs, string IDs, mixed; returns the expected (offset, user, item, ts, w) rows."""
    batches = [
        ([1, 2, 3], [10, 20, 30], [100.0, 101.0, 102.0], [1.0, 2.0, 0.5]),
        (["a", "b"], ["x", "y"], [103.0, 104.0], [1.0, 1.0]),
        ([5, "5"], ["5", 5], [105.0, 106.0], [3.0, 4.0]),
    ]
    out = []
    for users, items, ts, w in batches:
        first, last = span(log.append(users, items, ts, w))
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
    assert log.append([], [], [], []) == AppendResult(accepted=0, duplicates=0, offset=None, offsets={})
    log.append([1], [2], [1.0], [1.0])
    assert log.append([], [], [], []) == AppendResult(accepted=0, duplicates=0, offset=None, offsets={})
    assert log.stats()["events_accepted"] == 1
    assert log.stats()["appends"] == 1
    assert log.read(0, 10).num_rows == 1
    assert _log(tmp_path).stats()["events_accepted"] == 1


@pytest.mark.parametrize("segment_events", [*SEGMENTS, 2])
def test_restart_recovers_all_events_and_continues_offsets(tmp_path, segment_events):
    log = _log(tmp_path, segment_events=segment_events)
    want = _fill(log)
    again = _log(tmp_path, segment_events=segment_events)
    assert again.stats()["events_accepted"] == 7
    assert _events(again.read(0, 100)) == want
    assert span(again.append([9], ["z"], [107.0], [1.0])) == (7, 7)
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
    assert span(again.append([1], [1], [1.0], [1.0])) == (7, 7)
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
    assert span(again.append(["n"], [1], [9.0], [1.0])) == (5, 5)
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
    assert span(again.append([11], [12], [6.0], [1.0])) == (2, 2)
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
    log = SyncLog(cfg)
    want = _fill(log)  # appends of 3, 2 and 2 events; segment_events (100k) does not apply
    assert _objects(tmp_path) == ["LOG_ID", _seg(0), _seg(3), _seg(5)]  # no temp object left behind
    for name, rows in [(_seg(0), want[:3]), (_seg(3), want[3:5]), (_seg(5), want[5:])]:
        with pa.OSFile(str(tmp_path / "store" / "ingest" / name)) as f:
            assert _events(pa.ipc.open_stream(f).read_all().to_batches()[0]) == rows
    assert log.stats()["dir"] == cfg.dir + "/ingest"
    assert not (tmp_path / "state").exists()  # the log itself needs no local state

    again = SyncLog(cfg)
    assert again.log_id == log.log_id == read_log_id(cfg)
    assert again.stats()["events_accepted"] == 7
    assert _events(again.read(0, 100)) == want
    assert span(again.append([9], ["z"], [107.0], [1.0])) == (7, 7)
    assert _objects(tmp_path)[-1] == _seg(7)
    assert _events(SyncLog(cfg).read(0, 100)) == want + [(7, 9, "z", 107.0, 1.0)]


def test_uri_log_never_appends_or_renames_on_an_object_store(tmp_path):
    cfg = _uri_cfg(tmp_path)
    store = _ObjectStoreHandler()
    log = SyncLog(cfg, filesystem=pafs.PyFileSystem(store))
    want = []
    for k, (users, items) in enumerate([([1, 2, 3], [4, 5, 6]), (["a"], ["b"]), ([7], ["c"])]):
        first, _ = span(log.append(users, items, [1.0] * len(users), [1.0] * len(users)))
        want += _events(log.read(first, len(users)))
        # Each acknowledged append is already a complete object another reader recovers.
        assert _events(SyncLog(cfg, filesystem=pafs.PyFileSystem(_ObjectStoreHandler())).read(0, 100)) == want, k
    # Every object was PUT exactly once, under its final name: no temp objects, no rewrites.
    assert store.written == ["LOG_ID", _seg(0), _seg(3), _seg(4)]
    assert _objects(tmp_path) == ["LOG_ID", _seg(0), _seg(3), _seg(4)]


def test_uri_log_drops_a_leftover_temp_object(tmp_path):
    cfg = _uri_cfg(tmp_path)
    want = _fill(SyncLog(cfg))
    # A crash between writing an object's temp file and renaming it: never acknowledged.
    leftover = tmp_path / "store" / "ingest" / f".{_seg(7)}.0123abcd.tmp"
    leftover.write_bytes(b"half an object")
    again = SyncLog(cfg)
    assert not leftover.exists()
    assert _events(again.read(0, 100)) == want
    assert span(again.append([1], [1], [1.0], [1.0])) == (7, 7)


def test_uri_log_with_a_missing_object_refuses_to_start(tmp_path):
    cfg = _uri_cfg(tmp_path)
    _fill(SyncLog(cfg))
    (tmp_path / "store" / "ingest" / _seg(3)).unlink()
    with pytest.raises(RuntimeError, match=r"offsets 3\.\.4 are missing \(the next object is segment-0+5\.arrows\)") as info:
        SyncLog(cfg)
    assert cfg.dir in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_uri_log_with_an_unreadable_object_refuses_to_start(tmp_path, damage):
    cfg = _uri_cfg(tmp_path)
    _fill(SyncLog(cfg))
    obj = tmp_path / "store" / "ingest" / _seg(3)
    data = obj.read_bytes()
    obj.write_bytes({"truncate": data[: len(data) - 20], "garbage": b"\x00not arrow" * 10, "empty": b""}[damage])
    with pytest.raises(RuntimeError, match=rf"object {_seg(3)} is unreadable"):
        SyncLog(cfg)


def test_uri_log_rejects_an_object_whose_offsets_do_not_match_its_name(tmp_path):
    cfg = _uri_cfg(tmp_path)
    _fill(SyncLog(cfg))
    ingest = tmp_path / "store" / "ingest"
    (ingest / _seg(5)).write_bytes((ingest / _seg(3)).read_bytes())  # offsets 3..4 named as from 5
    with pytest.raises(RuntimeError, match=rf"object {_seg(5)} holds offsets 3\.\.4, expected a run from 5"):
        SyncLog(cfg)


def test_read_log_id_creates_nothing(tmp_path):
    local = IngestConfig(dir=str(tmp_path / "local"), fsync=False)
    uri = _uri_cfg(tmp_path)
    assert read_log_id(local) is None and read_log_id(uri) is None
    assert not (tmp_path / "local").exists() and not (tmp_path / "store").exists()
    local_id, uri_id = SyncLog(local).log_id, SyncLog(uri).log_id
    assert read_log_id(local) == local_id and read_log_id(uri) == uri_id != local_id
    with pytest.raises(ValueError, match="filesystem"):
        SyncLog(local, filesystem=pafs.LocalFileSystem())


# --- partitions, the earlier layout, and reads from the files ----------------------------


def test_partitions_route_by_user_key_with_dense_offsets(tmp_path):
    from ps.ids import id_keys

    cfg = IngestConfig(dir=str(tmp_path), partitions=3, fsync=False)
    log = SyncLog(cfg)
    users = [f"u{i}" for i in range(30)] + list(range(30))
    items = list(range(100, 160))
    where = [int(k % 3) for k in id_keys(users)]
    assert sorted(set(where)) == [0, 1, 2]
    want: dict[int, list] = {0: [], 1: [], 2: []}
    for lo in range(0, 60, 7):
        hi = min(lo + 7, 60)
        r = log.append(users[lo:hi], items[lo:hi], [float(j) for j in range(lo, hi)], [1.0] * (hi - lo))
        for j in range(lo, hi):
            want[where[j]].append((users[j], items[j]))
        assert r.accepted == hi - lo and r.duplicates == 0
        assert r.offsets == {p: len(want[p]) - 1 for p in set(where[lo:hi])}
        assert r.offset == r.offsets[where[hi - 1]]
    assert log.stats()["end_offsets"] == [len(want[p]) for p in range(3)]
    assert log.stats()["events_accepted"] == 60
    assert sorted(p.name for p in (tmp_path / "ingest").iterdir()) == ["LOG_ID", "META.json", "p0", "p1", "p2"]

    def check(log):
        for p in range(3):
            b = log.read(0, 100, p).to_pydict()
            assert b["offset"] == list(range(len(want[p])))
            assert list(zip(b["user_id"], b["item_id"])) == want[p]
            assert all(k % 3 == p for k in b["user_key"])

    check(log)
    again = SyncLog(cfg)
    check(again)
    r = again.append([users[0]], [1], [1.0], [1.0])
    assert r.offsets == {where[0]: len(want[where[0]])}
    with pytest.raises(ValueError, match=r"partition: must be an int in 0\.\.2, got 3"):
        again.read(0, 1, 3)


def test_the_partition_count_of_a_log_is_fixed(tmp_path):
    SyncLog(IngestConfig(dir=str(tmp_path / "one"), fsync=False)).append([1], [2], [1.0], [1.0])
    with pytest.raises(RuntimeError, match=r"ingest.partitions=2 but the log has 1 partition"):
        SyncLog(IngestConfig(dir=str(tmp_path / "one"), partitions=2, fsync=False))
    SyncLog(IngestConfig(dir=str(tmp_path / "four"), partitions=4, fsync=False))
    with pytest.raises(RuntimeError, match=r"ingest.partitions=1 but the log has 4 partition"):
        SyncLog(IngestConfig(dir=str(tmp_path / "four"), fsync=False))


def test_a_log_written_by_the_unpartitioned_code_recovers_as_partition_0(tmp_path):
    from workers.events import make_events

    root = tmp_path / "ingest"
    root.mkdir()
    (root / "LOG_ID").write_text("0123456789abcdef")
    b1 = make_events([0, 1], [1, 2], [3, 4], [1.0, 2.0], [1.0, 0.5], 5.0)
    b2 = make_events([2], ["s"], ["t"], [3.0], [1.0], 6.0)
    # The earlier writer: one pa.ipc stream per segment, closed (an end-of-stream marker)
    # when it rolled over to the next; the last one still open.
    with open(root / _seg(0), "wb") as f, pa.ipc.new_stream(f, b1.schema) as w:
        w.write_batch(b1)
    with open(root / _seg(2), "wb") as f:
        w = pa.ipc.new_stream(f, b2.schema)
        w.write_batch(b2)
        f.flush()
    log = _log(tmp_path)
    assert log.log_id == "0123456789abcdef"
    assert _events(log.read(0, 10)) == [(0, 1, 3, 1.0, 1.0), (1, 2, 4, 2.0, 0.5), (2, "s", "t", 3.0, 1.0)]
    assert span(log.append([7], [8], [4.0], [1.0])) == (3, 3)
    assert _events(_log(tmp_path).read(2, 10)) == [(2, "s", "t", 3.0, 1.0), (3, 7, 8, 4.0, 1.0)]
    assert not (root / "META.json").exists()  # nothing to record for one partition without consumers


def test_reads_come_from_the_segment_files(tmp_path):
    log = _log(tmp_path)
    log.append(["aaaa", "bbbb"], [1, 2], [1.0, 2.0], [1.0, 1.0])
    seg = _segments(tmp_path)[0]
    data = seg.read_bytes()
    assert data.count(b"aaaa") == 1
    with open(seg, "r+b") as f:  # change the stored bytes behind the log's back
        f.seek(data.index(b"aaaa"))
        f.write(b"zzzz")
    assert log.read(0, 2).column("user_id").to_pylist() == ["zzzz", "bbbb"]


def test_memory_does_not_grow_with_the_events_stored(tmp_path):
    from workers import ingest_log

    log = _log(tmp_path, segment_events=1000)
    users, items = [f"user-{i:06d}" for i in range(2000)], list(range(2000))
    log.append(users, items, [1.0] * 2000, [1.0] * 2000)
    base = pa.total_allocated_bytes()
    for _ in range(40):
        log.append(users, items, [1.0] * 2000, [1.0] * 2000)
    # 82,000 events (about 4 MB of Arrow data) are on disk; none of them is held in memory.
    assert pa.total_allocated_bytes() - base < 256 * 1024
    assert len(_segments(tmp_path)) == 41
    seen = 0
    for offset in range(0, 82_000, 3000):
        batch = log.read(offset, 3000)
        assert batch.column("offset")[0].as_py() == offset
        seen += batch.num_rows
    assert seen == 82_000
    assert len(log._store._maps) <= ingest_log._OPEN_MAPS
    del batch
    assert pa.total_allocated_bytes() - base < 256 * 1024


def test_uri_reads_go_through_a_bounded_cache(tmp_path):
    from workers import ingest_log

    log = SyncLog(_uri_cfg(tmp_path))
    n = ingest_log._CACHED_OBJECTS + 10
    for i in range(n):
        log.append([i], [i], [1.0], [1.0])
    assert log.read(0, n).column("offset").to_pylist() == list(range(n))
    assert len(log._store._cache) == ingest_log._CACHED_OBJECTS
    assert log.read(3, 2).column("user_id").to_pylist() == [3, 4]


def test_stats_are_plain_finite_json(tmp_path):
    import json

    log = SyncLog(IngestConfig(dir=str(tmp_path), partitions=2, fsync=True))
    log.append(["a", "b", "b"], [1, 2, 3], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], None, ["e1", "e2", "e2"], "k")
    log.commit("trainer-0", {0: 0})
    log.pin("ckpt", {1: 0})
    st = log.stats()
    assert json.loads(json.dumps(st, allow_nan=False)) == st
    assert st["events_accepted"] == sum(st["end_offsets"]) == 2 and st["duplicates"] == 1
    assert st["first_offsets"] == [0, 0] and st["partitions"] == 2
    assert st["consumers"] == {"trainer-0": {"0": 0}} and st["pins"] == {"ckpt": {"1": 0}}
    assert st["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "ingest").glob("p*/segment-*"))
    assert st["segments"] == len(list((tmp_path / "ingest").glob("p*/segment-*")))
    assert st["fsyncs"] >= 1 and st["appends"] == st["segments"]


def test_wait_returns_when_an_append_becomes_durable_and_times_out_without_one(tmp_path):
    log = _log(tmp_path, partitions=2)
    first = log.append([1], ["a"], [1.0], [1.0])  # user 1's partition
    (p,) = list(first.offsets)
    q = 1 - p
    # Already there: at once. Nothing at or after the offsets: False after the timeout.
    assert log.wait({p: 0}, 5.0) is True
    t0 = time.monotonic()
    assert log.wait({p: 1, q: 0}, 0.2) is False
    assert time.monotonic() - t0 >= 0.19

    async def wait_then_append():
        waiting = asyncio.ensure_future(log.log.wait({p: 1, q: 0}, 30.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing new yet
        t = time.monotonic()
        await log.log.append([1], ["b"], [2.0], [1.0])
        return await waiting, time.monotonic() - t

    woke, after_s = log.run(wait_then_append())
    assert woke is True and after_s < 5.0  # woken by the append, not by the 30 s timeout
    with pytest.raises(ValueError, match="partition"):
        log.wait({7: 0}, 0.1)


def test_arrival_times_are_the_ingest_ts_at_each_offset(tmp_path):
    # What /stats ages a trainer's backlog by: when the first event it has not applied arrived.
    log = SyncLog(IngestConfig(dir=str(tmp_path), fsync=False))
    for n in (2, 3):
        log.append(["u"] * n, list(range(n)), [None] * n, [1.0] * n)
        time.sleep(0.01)
    got = log.arrival_times([(0, 0), (0, 1), (0, 2), (0, 4), (0, 5), (0, 99)])
    assert log.stats()["events_read"] == 0  # a probe, not a consumer's read
    ts = log.read(0, 5).column("ingest_ts").to_pylist()
    assert got[:4] == [ts[i] for i in (0, 1, 2, 4)]
    assert got[0] == got[1] < got[2] == got[3] and got[4:] == [None, None]  # caught up: nothing waits there
    with pytest.raises(ValueError):
        log.arrival_times([(1, 0)])


def test_clocks_count_every_partitions_events_up_to_each_append(tmp_path):
    # A consumer of several partitions needs a position comparable across them: partition
    # offsets drift apart, and the recent-popularity clock built on them decayed the counts
    # of a partition that was behind.
    from ps.ids import id_keys

    cfg = IngestConfig(dir=str(tmp_path), fsync=False, partitions=2)
    log = SyncLog(cfg)
    users = [f"u{j}" for j in range(40)]
    by_part = {p: [u for u, k in zip(users, id_keys(users).tolist()) if k % 2 == p] for p in (0, 1)}
    for p, n in ((0, 3), (1, 5), (0, 2)):
        log.append(by_part[p][:n], list(range(n)), [None] * n, [1.0] * n)
        time.sleep(0.01)
    want = {(0, 0): 3, (0, 2): 3, (1, 0): 8, (1, 4): 8, (0, 3): 10, (0, 4): 10, (0, 5): None, (1, 5): None}
    assert dict(zip(want, log.clocks(list(want)))) == want
    assert dict(zip(want, SyncLog(cfg).clocks(list(want)))) == want  # the same after a restart


def test_clocks_keep_the_order_of_appends_when_the_system_clock_steps_back(tmp_path, monkeypatch):
    # clocks() orders appends across partitions by their ingest times: a clock stepped back
    # (a slew, or appends taking their locks out of order) between two appends put the second
    # before the first, so the first event's clock counted the second append's events too.
    # Ingest times now rise strictly through steps back of up to a second, across restarts too;
    # a larger step back is the clock correcting itself, and times follow it.
    import math

    from ps.ids import id_keys
    from tests.conftest import FakeClock
    from workers import ingest_log

    def after(t: float) -> float:
        return math.nextafter(t, math.inf)

    clock = FakeClock(1000.0)
    monkeypatch.setattr(ingest_log, "time", clock)
    cfg = IngestConfig(dir=str(tmp_path), fsync=False, partitions=2)
    log = SyncLog(cfg)
    users = [f"u{j}" for j in range(40)]
    by_part = {p: [u for u, k in zip(users, id_keys(users).tolist()) if k % 2 == p] for p in (0, 1)}
    for p, n, now in ((0, 3, 1000.0), (1, 5, 999.5), (0, 2, 2000.0)):
        clock.now = now
        log.append(by_part[p][:n], list(range(n)), [None] * n, [1.0] * n)
    want = {(0, 0): 3, (0, 2): 3, (1, 0): 8, (1, 4): 8, (0, 3): 10, (0, 4): 10}
    assert dict(zip(want, log.clocks(list(want)))) == want
    assert log.arrival_times([(0, 0), (1, 0), (0, 3)]) == [1000.0, after(1000.0), 2000.0]
    clock.now = 1999.8  # a restart under a clock a little behind: the next append comes after the last
    again = SyncLog(cfg)
    assert dict(zip(want, again.clocks(list(want)))) == want
    again.append(by_part[1][:1], [0], [None], [1.0])
    assert again.clocks([(1, 5)]) == [11] and again.arrival_times([(1, 5)]) == [after(2000.0)]
    clock.now = 1500.0  # corrected by minutes: the times follow the clock, not the last one
    again.append(by_part[0][:1], [0], [None], [1.0])
    assert again.arrival_times([(0, 5)]) == [1500.0]


def test_a_failed_metadata_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import os

    from workers import ingest_log

    store = ingest_log._LocalStore(IngestConfig(dir=str(tmp_path), fsync=True))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest_log.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        store.put("META.json", b"{}", durable=True)
    monkeypatch.setattr(ingest_log.os, "fsync", os.fsync)
    assert sorted(p.name for p in store.root.iterdir()) == []  # neither the file nor its half-written copy


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_log_the_deployment_expects_is_never_created_anew(tmp_path, partitions):
    # A lost ingest dir used to come back as a new, empty log (a new LOG_ID, offsets from 0)
    # whose events the trainers, holding the old log's offsets, never trained.
    from workers.ingest_log import LogMissingError

    cfg = IngestConfig(dir=str(tmp_path / "data"), fsync=False, partitions=partitions)
    with pytest.raises(LogMissingError, match=r"ingest\.dir '.*data': the ingest log is gone \(.*LOG_ID not found\)"):
        IngestLog(cfg, expect_log=True)
    assert read_log_id(cfg) is None  # refusing wrote nothing that would pass for a log next time
    first = SyncLog(cfg)  # a first start creates it, as before
    first.append([1], [2], [None], [1.0])
    assert SyncLog(cfg, expect_log=True).log_id == first.log_id == read_log_id(cfg)
