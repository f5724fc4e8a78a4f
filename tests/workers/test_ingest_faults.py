"""IngestLog under injected file-system faults (a real log on real files, no Ray): a failed
write, flush or fsync acknowledges nothing, leaves no torn bytes before later acknowledged
data, and a partly written request is completed exactly once by a retry with its key."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pyarrow as pa
import pytest

from ps.ids import id_keys
from tests.workers.test_ingest_log import SyncLog, span
from workers import ingest_log
from workers.config import IngestConfig
from workers.ingest_log import IngestWriteError


def _log(tmp_path: Path, **kw) -> SyncLog:
    return SyncLog(IngestConfig(dir=str(tmp_path), **kw))


def _segments(tmp_path: Path, sub: str = "") -> list[Path]:
    return sorted((tmp_path / "ingest" / sub).glob("segment-*"))


def _stored_offsets(path: Path) -> list[int]:
    """Offsets of a segment file read as one IPC stream to its end; fails on torn bytes."""
    with pa.OSFile(str(path), "rb") as f:
        table = pa.ipc.open_stream(f).read_all()
    return table.column("offset").to_pylist()


def _offsets(log: SyncLog, partition: int = 0) -> list[int]:
    return log.read(0, 1000, partition).column("offset").to_pylist()


def _torn_write(fd: int, data: bytes) -> None:
    os.write(fd, data[: len(data) // 2])
    raise OSError(errno.EIO, "injected: the disk failed half-way through a write")


def _fail(*_args) -> None:
    raise OSError(errno.EIO, "injected: the disk failed")


@pytest.mark.parametrize("fsync", [True, False])
def test_a_write_that_fails_half_way_is_cut_off_before_the_next_append(tmp_path, monkeypatch, fsync):
    log = _log(tmp_path, fsync=fsync)
    assert span(log.append([1, 2], [3, 4], [1.0, 2.0], [1.0, 1.0])) == (0, 1)
    seg = _segments(tmp_path)[0]
    size = seg.stat().st_size
    with monkeypatch.context() as m:
        m.setattr(ingest_log, "_write_all", _torn_write)
        with pytest.raises(IngestWriteError, match="partition 0: writing segment-0+\\.arrows failed"):
            log.append([5, 6, 7], [8, 9, 10], [3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    assert seg.stat().st_size == size  # the torn half was cut off
    assert _offsets(log) == [0, 1]
    assert span(log.append([11], [12], [6.0], [1.0])) == (2, 2)  # the failed offsets are reused
    assert _stored_offsets(seg) == [0, 1, 2]  # a clean stream: every byte is acknowledged data
    again = _log(tmp_path, fsync=fsync)
    assert again.read(0, 10).column("user_id").to_pylist() == [1, 2, 11]


def test_a_failed_fsync_fails_every_append_waiting_on_it_and_cuts_their_bytes(tmp_path, monkeypatch):
    log = _log(tmp_path, fsync=True)
    assert span(log.append([1], [1], [1.0], [1.0])) == (0, 0)
    seg = _segments(tmp_path)[0]
    size = seg.stat().st_size
    real, calls = ingest_log._fsync, []

    def fail_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected: fsync failed")
        real(fd)

    monkeypatch.setattr(ingest_log, "_fsync", fail_once)

    async def three():
        return await asyncio.gather(*(log.log.append([u], [u], [1.0], [1.0]) for u in (2, 3, 4)), return_exceptions=True)

    results = log.run(three())
    assert all(isinstance(r, IngestWriteError) for r in results), results
    assert "fsync failed" in str(results[0].__cause__)
    assert seg.stat().st_size == size  # all three were written, none was durable: all cut
    assert _offsets(log) == [0]
    assert log.stats()["end_offsets"] == [0 + 1]
    assert span(log.append([5], [5], [1.0], [1.0])) == (1, 1)
    assert _stored_offsets(seg) == [0, 1]
    assert _log(tmp_path).read(0, 10).column("user_id").to_pylist() == [1, 5]


def test_when_the_bytes_cannot_be_cut_the_log_moves_to_a_new_segment(tmp_path, monkeypatch):
    log = _log(tmp_path, fsync=True)
    assert span(log.append([1], [1], [1.0], [1.0])) == (0, 0)
    first = _segments(tmp_path)[0]
    size = first.stat().st_size
    with monkeypatch.context() as m:
        # The whole batch reaches the file, its fsync fails, and so does every repair.
        m.setattr(ingest_log, "_fsync", _fail)
        m.setattr(ingest_log, "_truncate", _fail)
        with pytest.raises(IngestWriteError, match="rolled back"):
            log.append([2, 3], [2, 3], [1.0, 1.0], [1.0, 1.0])
    assert first.stat().st_size > size  # the unacknowledged batch is still in the old file
    assert _stored_offsets(first) == [0, 1, 2]
    assert span(log.append([9], [9], [1.0], [1.0])) == (1, 1)  # continues in a new segment
    assert [p.name for p in _segments(tmp_path)] == [first.name, "segment-00000000000000000001.arrows"]
    assert log.read(0, 10).column("user_id").to_pylist() == [1, 9]
    # Recovery: the new segment supersedes the old one's tail, which is cut off.
    again = _log(tmp_path, fsync=True)
    assert again.read(0, 10).column("user_id").to_pylist() == [1, 9]
    assert first.stat().st_size == size
    assert span(again.append([10], [10], [1.0], [1.0])) == (2, 2)


def test_a_partly_written_request_is_completed_by_a_retry_with_its_key(tmp_path, monkeypatch):
    cfg = IngestConfig(dir=str(tmp_path), partitions=2, fsync=True)
    users = [f"user-{i}" for i in range(12)]
    where = [int(k % 2) for k in id_keys(users)]
    assert set(where) == {0, 1}
    n0, n1 = where.count(0), where.count(1)
    items, ts, w = list(range(12)), [1.0] * 12, [1.0] * 12
    log = SyncLog(cfg)
    real = ingest_log._write_all

    def partition_1_fails(fd, data):
        if "/p1/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "injected: partition 1's disk failed")
        real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(ingest_log, "_write_all", partition_1_fails)
        with pytest.raises(IngestWriteError, match="partition 1"):
            log.append(users, items, ts, w, None, None, "req-7")
    assert log.stats()["end_offsets"] == [n0, 0]  # partition 0's part is durable

    # The actor restarts (the dedup window is rebuilt from the segments); the client retries.
    again = SyncLog(cfg)
    r = again.append(users, items, ts, w, None, None, "req-7")
    assert (r.accepted, r.duplicates, r.offsets) == (n0 + n1, 0, {0: n0 - 1, 1: n1 - 1})
    assert again.stats()["end_offsets"] == [n0, n1]  # partition 0 was not appended twice
    assert again.append(users, items, ts, w, None, None, "req-7") == r
    assert again.stats()["events_accepted"] == 12
    got = sorted(again.read(0, 100, 0).column("user_id").to_pylist() + again.read(0, 100, 1).column("user_id").to_pylist())
    assert got == sorted(users)


def test_when_the_fsync_cannot_even_start_the_append_fails_and_its_bytes_are_cut(tmp_path, monkeypatch):
    log = _log(tmp_path, fsync=True)
    assert span(log.append([1], [1], [1.0], [1.0])) == (0, 0)
    seg = _segments(tmp_path)[0]
    size = seg.stat().st_size
    with monkeypatch.context() as m:
        # The fsync works on a duplicate descriptor; the process is out of descriptors.
        m.setattr(ingest_log.os, "dup", lambda fd: _fail())
        with pytest.raises(IngestWriteError, match="rolled back"):
            log.append([2], [2], [1.0], [1.0])
    # Nothing of the failed append stays behind to become durable with the next one's fsync:
    # the client was told it failed, so a retry without a key must not make it appear twice.
    assert seg.stat().st_size == size
    assert span(log.append([3], [3], [1.0], [1.0])) == (1, 1)
    assert _log(tmp_path, fsync=True).read(0, 10).column("user_id").to_pylist() == [1, 3]
