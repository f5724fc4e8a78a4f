"""Retention (a real log on real files, no Ray): consumers' committed offsets and pins
decide what may go, only whole consumed segments below all of them are deleted (never the
newest), what retention keeps is honoured, and everything survives a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tests.workers.test_ingest_log import SyncLog, span
from workers import ingest_log
from workers.config import IngestConfig
from workers.ingest_log import TrimmedOffsetError

DELETE_CONSUMED = {"keep_bytes": 0, "keep_age_s": 0}


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(ingest_log, "time", clock)
    return clock


def _cfg(tmp_path: Path, **kw) -> IngestConfig:
    # Two events per segment, one append per segment below.
    opts = {"fsync": False, "segment_events": 2, "dedup_max_age_s": 60, "retention": DELETE_CONSUMED, **kw}
    return IngestConfig(dir=str(tmp_path), **opts)


def _fill(log: SyncLog, appends: int, partition_users=None) -> None:
    for i in range(appends):
        users = partition_users or [2 * i, 2 * i + 1]
        log.append(users, [1, 2], [1.0, 2.0], [1.0, 1.0])


def _firsts(tmp_path: Path, sub: str = "") -> list[int]:
    return [int(p.name[8:28]) for p in sorted((tmp_path / "ingest" / sub).glob("segment-*"))]


def test_only_segments_below_every_consumer_and_pin_are_deleted(tmp_path, clock):
    cfg = _cfg(tmp_path)
    log = SyncLog(cfg)
    _fill(log, 10)  # segments from 0, 2, ..., 18
    clock.now += 3600  # all of them older than the dedup window
    assert _firsts(tmp_path) == list(range(0, 20, 2))

    log.commit("trainer-1", {0: 3})
    assert _firsts(tmp_path)[0] == 2  # [0, 2) is consumed; [2, 4) is not yet
    log.commit("trainer-0", {0: 7})
    assert _firsts(tmp_path)[0] == 2  # the slowest consumer decides
    log.pin("ckpt-a", {0: 4})
    log.commit("trainer-1", {0: 9})
    assert _firsts(tmp_path)[0] == 4  # min(7, 9, pin 4)
    assert log.unpin("ckpt-a") is True
    assert _firsts(tmp_path)[0] == 6  # min(7, 9)
    st = log.stats()
    assert st["first_offsets"] == [6] and st["end_offsets"] == [20] and st["segments"] == 7
    assert st["consumers"] == {"trainer-0": {"0": 7}, "trainer-1": {"0": 9}} and st["pins"] == {}

    with pytest.raises(TrimmedOffsetError, match=r"partition 0: offset 5 was deleted by retention; the first retained offset is 6"):
        log.read(5, 10)
    assert log.read(6, 100).column("offset").to_pylist() == list(range(6, 20))

    # Everyone has applied everything: all but the newest segment go.
    log.commit("trainer-0", {0: 20})
    log.commit("trainer-1", {0: 20})
    assert _firsts(tmp_path) == [18]

    again = SyncLog(cfg)  # offsets, consumers and the first retained offset survive a restart
    st = again.stats()
    assert st["consumers"] == {"trainer-0": {"0": 20}, "trainer-1": {"0": 20}}
    assert (st["first_offsets"], st["end_offsets"]) == ([18], [20])
    assert again.read(18, 10).column("offset").to_pylist() == [18, 19]
    with pytest.raises(TrimmedOffsetError):
        again.read(0, 1)
    assert span(again.append([2], [2], [1.0], [1.0])) == (20, 20)


def test_nothing_is_deleted_for_a_partition_no_consumer_registered_for(tmp_path, clock):
    from ps.ids import id_keys

    users = list(range(40))
    where = [int(k % 2) for k in id_keys(users)]
    u0, u1 = [u for u, p in zip(users, where) if p == 0][:2], [u for u, p in zip(users, where) if p == 1][:2]
    cfg = _cfg(tmp_path, partitions=2)
    log = SyncLog(cfg)
    _fill(log, 5, u0)
    _fill(log, 5, u1)
    clock.now += 3600
    log.pin("ckpt", {1: 6})  # a pin alone does not make a partition consumed
    log.commit("trainer-0", {0: 10})
    assert _firsts(tmp_path, "p0") == [8]
    assert _firsts(tmp_path, "p1") == [0, 2, 4, 6, 8]
    log.commit("trainer-1", {1: 10})
    assert _firsts(tmp_path, "p1") == [6, 8]  # held back by the pin
    assert log.stats()["first_offsets"] == [8, 6]


def test_retention_keeps_the_newest_consumed_bytes(tmp_path, clock):
    log = SyncLog(_cfg(tmp_path, retention={"keep_bytes": None, "keep_age_s": 0}))
    _fill(log, 5)
    clock.now += 3600
    log.commit("c", {0: 10})
    assert _firsts(tmp_path) == [0, 2, 4, 6, 8]  # keep_bytes null keeps all consumed history

    sizes = {p.stat().st_size for p in (tmp_path / "ingest").glob("segment-*")}
    assert len(sizes) == 1  # equal segments, so a budget of two segments is exact
    log = SyncLog(_cfg(tmp_path / "b", retention={"keep_bytes": 2 * sizes.pop(), "keep_age_s": 0}))
    _fill(log, 5)
    clock.now += 3600
    log.commit("c", {0: 10})
    # Consumed: 0..6 (8 is the newest and always stays); the newest two of them fit the budget.
    assert _firsts(tmp_path / "b") == [4, 6, 8]


def test_retention_keeps_consumed_segments_younger_than_keep_age(tmp_path, clock):
    log = SyncLog(_cfg(tmp_path, retention={"keep_bytes": 0, "keep_age_s": 600}))
    _fill(log, 3)  # segments 0, 2, 4
    clock.now += 3600
    _fill(log, 3)  # segments 6, 8, 10
    clock.now += 300
    log.commit("c", {0: 12})
    assert _firsts(tmp_path) == [6, 8, 10]  # 6 and 8 are 5 minutes old; 10 is the newest


def test_segments_younger_than_the_dedup_window_are_kept(tmp_path, clock):
    log = SyncLog(_cfg(tmp_path, dedup_max_age_s=600))
    _fill(log, 3)
    clock.now += 599
    log.commit("c", {0: 6})
    assert _firsts(tmp_path) == [0, 2, 4]
    clock.now += 2
    log.commit("c", {0: 6})
    assert _firsts(tmp_path) == [4]


def test_commit_and_pin_refuse_offsets_outside_the_retained_range(tmp_path, clock):
    log = SyncLog(_cfg(tmp_path))
    _fill(log, 3)
    clock.now += 3600
    log.commit("c", {0: 4})
    for call, args, match in [
        (log.commit, ("c", {0: 7}), r"offset 7 of partition 0 must be an int in 4\.\.6"),
        (log.commit, ("c", {0: 3}), r"offset 3 of partition 0 must be an int in 4\.\.6"),
        (log.commit, ("c", {1: 1}), r"partition: must be an int in 0\.\.0"),
        (log.commit, ("", {0: 4}), r"consumer: must be a non-empty string"),
        (log.pin, ("p", {0: 0}), r"offset 0 of partition 0 must be an int in 4\.\.6"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(*args)
    assert log.stats()["consumers"] == {"c": {"0": 4}}
    assert log.forget("c") is True and log.stats()["consumers"] == {}


def test_an_interrupted_retention_pass_is_finished_on_restart(tmp_path, clock):
    cfg = _cfg(tmp_path)
    log = SyncLog(cfg)
    _fill(log, 4)
    clock.now += 3600
    first = tmp_path / "ingest" / "segment-00000000000000000000.arrows"
    data = first.read_bytes()
    log.commit("c", {0: 4})
    assert _firsts(tmp_path) == [4, 6]
    first.write_bytes(data)  # as if the process died after recording the new start, before deleting
    again = SyncLog(cfg)
    assert _firsts(tmp_path) == [4, 6]
    assert again.read(4, 10).column("offset").to_pylist() == [4, 5, 6, 7]


def test_uri_retention_deletes_objects_and_recovers_from_the_first_retained(tmp_path, clock):
    cfg = IngestConfig(
        dir=(tmp_path / "store").as_uri(), state_dir=str(tmp_path / "state"), fsync=False,
        dedup_max_age_s=60, retention=DELETE_CONSUMED,
    )
    log = SyncLog(cfg)
    _fill(log, 4)  # one object per append: 0, 2, 4, 6
    clock.now += 3600
    log.commit("c", {0: 5})
    objects = sorted(p.name for p in (tmp_path / "store" / "ingest").iterdir())
    assert objects == ["LOG_ID", "META.json", "segment-00000000000000000004.arrows", "segment-00000000000000000006.arrows"]
    again = SyncLog(cfg)
    assert again.stats()["first_offsets"] == [4]
    assert again.read(4, 10).column("offset").to_pylist() == [4, 5, 6, 7]
    assert span(again.append([1], [1], [1.0], [1.0])) == (8, 8)
