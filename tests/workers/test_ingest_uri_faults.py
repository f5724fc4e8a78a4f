"""IngestLog with ``ingest.dir`` a ``file://`` URI (one object per append, a real log on
real files, no Ray): start-up errors name the partition's directory of the object at
fault, and an append cancelled while its object is being stored never overwrites a later,
acknowledged append's object."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ps.ids import id_keys
from tests.workers.test_ingest_log import SyncLog, _seg, _uri_cfg
from workers import ingest_log


def _users_of(partition: int, partitions: int, n: int) -> list[int]:
    return [u for u in range(1000) if int(id_keys([u])[0] % partitions) == partition][:n]


def test_a_missing_object_is_named_with_its_partitions_directory(tmp_path):
    cfg = _uri_cfg(tmp_path, partitions=2)
    log = SyncLog(cfg)
    for p in (0, 1):
        for u in _users_of(p, 2, 3):
            log.append([u], [1], [1.0], [1.0])
    (tmp_path / "store" / "ingest" / "p1" / _seg(1)).unlink()
    # Both partitions hold an object of that name: only the directory says which one is gone.
    with pytest.raises(RuntimeError, match=r"ingest/p1: offsets 1\.\.1 are missing \(the next object is segment-0+2\.arrows\)"):
        SyncLog(cfg)


def test_an_append_cancelled_while_storing_never_overwrites_a_later_acknowledged_one(tmp_path, monkeypatch):
    cfg = _uri_cfg(tmp_path)
    log = SyncLog(cfg)
    gate, started, landed = threading.Event(), threading.Event(), threading.Event()
    real_put = ingest_log._ObjectStore._put

    def slow_first_put(self, directory, name, data, *, durable):
        if name == _seg(0) and not started.is_set():
            started.set()
            gate.wait(10)  # the first PUT of offset 0 is slow: still in flight when its append is cancelled
            real_put(self, directory, name, data, durable=durable)
            landed.set()
            return
        real_put(self, directory, name, data, durable=durable)

    monkeypatch.setattr(ingest_log._ObjectStore, "_put", slow_first_put)

    async def scenario():
        first = asyncio.ensure_future(log.log.append([1], [10], [1.0], [1.0]))
        while not started.is_set():
            await asyncio.sleep(0.001)
        first.cancel()
        await asyncio.sleep(0)  # the cancellation is delivered
        second = asyncio.ensure_future(log.log.append([2], [20], [2.0], [1.0]))
        # Room for the second to store its object if it could; it must wait for the first PUT to end.
        await asyncio.wait({second}, timeout=0.5)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    result = log.run(scenario())
    assert landed.wait(10)  # the cancelled append's object is in the store too
    assert result.offsets == {0: result.offset}
    acked = result.offset
    # The acknowledged append is what the log holds at its offset, now and after a restart.
    assert log.read(acked, 1).column("user_id").to_pylist() == [2]
    assert SyncLog(cfg).read(acked, 1).column("user_id").to_pylist() == [2]
