"""Group commit: concurrent appends share fsyncs, and each returns only once an fsync has
covered its bytes; in-process with real files, and through the real Ray actor. Also the
live source over the actor's partitions (``IngestSource``)."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pytest
import ray

from tests.conftest import _ray_start, wait_for
from tests.workers.test_ingest_log import SyncLog
from workers import ingest_log
from workers.config import IngestConfig
from workers.ingest_log import start_ingest


def _durable_offsets(path: str, size: int) -> set[int]:
    """Offsets a machine crash would keep: those in whole batches within the first ``size`` bytes."""
    with open(path, "rb") as f:
        data = f.read(size)
    reader = pa.ipc.open_stream(pa.py_buffer(data))
    out: set[int] = set()
    while True:
        try:
            out.update(reader.read_next_batch().column("offset").to_pylist())
        except (StopIteration, pa.ArrowInvalid, OSError):
            return out


def test_concurrent_appends_share_fsyncs_and_return_only_once_covered(tmp_path, monkeypatch):
    log = SyncLog(IngestConfig(dir=str(tmp_path), fsync=True))
    real, fsynced = ingest_log._fsync, {}

    def recording_fsync(fd):
        # What an fsync makes durable: every byte in the file when it started.
        path, size = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size
        real(fd)
        fsynced[path] = max(fsynced.get(path, 0), size)

    monkeypatch.setattr(ingest_log, "_fsync", recording_fsync)
    n = 24

    async def one(i):
        r = await log.log.append([f"u{i}"], [i], [1.0], [1.0])
        # Checked the moment the append returns: a crash now would keep this event.
        [path] = fsynced
        assert r.offset in _durable_offsets(path, fsynced[path])
        return r.offset

    async def many():
        import asyncio

        return await asyncio.gather(*(one(i) for i in range(n)))

    assert sorted(log.run(many())) == list(range(n))
    st = log.stats()
    assert st["appends"] == n
    assert 1 <= st["fsyncs"] < n


# --- through the Ray actor ------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    with _ray_start() as info:
        yield info


def _gate_fsyncs(log) -> None:
    """Run inside the actor: hold every fsync at a gate until ``log._gate`` is set (the real
    fsync then runs)."""
    import threading

    import workers.ingest_log as m

    gate, real = threading.Event(), m._fsync

    def gated(fd):
        gate.wait(120)
        real(fd)

    m._fsync = gated
    log._gate = gate


def test_concurrent_appends_to_the_actor_share_fsyncs(tmp_path, ray_cluster):
    ns = f"t-ingest-{uuid.uuid4().hex[:8]}"
    h = start_ingest(IngestConfig(dir=str(tmp_path), fsync=True), namespace=ns)
    try:
        ray.get(h.__ray_call__.remote(_gate_fsyncs))
        n = 16
        refs = [h.append.remote([f"u{i}"], [i], [1.0], [1.0]) for i in range(n)]
        wait_for(lambda: ray.get(h.__ray_call__.remote(lambda log: log._parts[0].next_offset)) == n, 60,
                 "every append to be written")
        # Written, but no fsync has finished: not one append may have returned.
        ready, _ = ray.wait(refs, num_returns=n, timeout=0)
        assert ready == []
        assert ray.get(h.stats.remote())["events_accepted"] == 0  # nor is anything readable yet
        ray.get(h.__ray_call__.remote(lambda log: log._gate.set()))
        results = ray.get(refs)
        assert sorted(r.offset for r in results) == list(range(n))
        st = ray.get(h.stats.remote())
        assert st["appends"] == n
        # One fsync was in flight when the rest arrived; the next one covered them all.
        assert st["fsyncs"] <= 2
    finally:
        ray.kill(h, no_restart=True)


def test_ingest_source_reads_one_partition_of_the_actor(tmp_path, ray_cluster):
    from ps.ids import id_keys
    from workers.ingest_log import TrimmedOffsetError
    from workers.streams.ingest import IngestSource

    ns = f"t-ingest-{uuid.uuid4().hex[:8]}"
    cfg = IngestConfig(dir=str(tmp_path), fsync=False, partitions=2, segment_events=2, dedup_max_age_s=1e-6,
                       retention={"keep_bytes": 0, "keep_age_s": 0})
    h = start_ingest(cfg, namespace=ns)
    try:
        candidates = [f"u{i}" for i in range(40)]
        side = [int(k % 2) for k in id_keys(candidates)]
        users = [u for u, p in zip(candidates, side) if p == 0][:4] + [u for u, p in zip(candidates, side) if p == 1][:6]
        where = [0] * 4 + [1] * 6
        for u in users:
            ray.get(h.append.remote([u], [1], [1.0], [1.0]))
        p0, p1 = IngestSource(ns), IngestSource(ns, 1)
        log_id = ray.get(h.stats.remote())["log_id"]
        assert (p0.source_id, p1.source_id) == (f"ingest:{log_id}", f"ingest:{log_id}/p1")
        assert p0.read(0, 100).column("user_id").to_pylist() == [u for u, p in zip(users, where) if p == 0]
        assert p1.read(0, 100).column("user_id").to_pylist() == [u for u, p in zip(users, where) if p == 1]
        assert p0.end_offset is None
        with pytest.raises(ValueError, match=r"partitions 0\.\.1, got 2"):
            IngestSource(ns, 2)

        n1 = where.count(1)
        p1.commit("trainer-1", n1)
        assert ray.get(h.stats.remote())["consumers"] == {"trainer-1": {"1": n1}}
        first = p1.first_offset
        assert first == 4  # segments [0, 2) and [2, 4) were consumed and deleted; [4, 6) is the newest
        with pytest.raises(TrimmedOffsetError, match=f"partition 1: offset 0 .* first retained offset is {first}"):
            p1.read(0, 1)
    finally:
        ray.kill(h, no_restart=True)
