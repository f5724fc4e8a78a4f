"""Exactly-once training across trainer crashes: a trainer killed mid-stream (by
``ray.kill`` and by SIGKILL of its process) is restarted by Ray, re-sends its
unacknowledged pushes from its write-ahead files, and the final PS state equals that of
an identical run without the kill.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

from ps.client import start_shards
from serving.config import load_config
from workers.wal import PushRecord, TrainerWAL
from workers.trainer import start_trainers

EVENTS = 12_000


def _cfg(ns: str, state: str):
    return load_config(overrides={
        "namespace": ns,
        "stream": {"num_events": EVENTS},
        # Two passes so a kill can land between the passes of one batch.
        "trainer": {"passes": 2, "batch_size": 128},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "ingest": {"dir": state},
    })


def _wait_done(trainer, timeout_s: float = 120.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            s = ray.get(trainer.stats.remote(), timeout=10)
            if s["error"]:
                raise AssertionError(s["error"])
            if s["done"]:
                return s
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            pass  # restarting
        time.sleep(0.2)
    raise AssertionError("trainer did not finish")


def _run(ns: str, state: str, kill=None):
    cfg = _cfg(ns, state)
    client = start_shards(cfg.ps, namespace=ns)
    trainer = start_trainers(cfg, state_dir=os.path.join(state, "trainers"), autostart=True)[0]
    if kill is not None:
        while ray.get(trainer.stats.remote())["applied_offset"] < EVENTS // 4:
            time.sleep(0.02)
        kill(trainer)
    stats = _wait_done(trainer)
    users = client.pull("user", np.arange(2000))
    items = client.pull("item", np.arange(1000))
    versions = client.versions()
    for h in [trainer, *client.shards]:
        ray.kill(h)
    return stats, users, items, versions


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    return _run("rec-ref", str(tmp_path_factory.mktemp("ref")))


def _ray_kill(trainer):
    ray.kill(trainer, no_restart=False)


def _sigkill(trainer):
    os.kill(ray.get(trainer.pid.remote()), signal.SIGKILL)


@pytest.mark.parametrize("kill", [_ray_kill, _sigkill], ids=["ray.kill", "SIGKILL"])
def test_killed_trainer_resumes_exactly_once(reference, tmp_path, kill):
    ref_stats, ref_users, ref_items, ref_versions = reference
    stats, users, items, versions = _run(f"rec-{kill.__name__}", str(tmp_path), kill)
    assert stats["applied_offset"] == EVENTS
    # events_applied counts each event once, though a restarted incarnation counted it.
    assert stats["events_applied"] == ref_stats["events_applied"] == EVENTS
    # Every shard applied the same number of pushes: nothing lost, nothing twice.
    assert versions == ref_versions
    np.testing.assert_array_equal(users, ref_users)
    np.testing.assert_array_equal(items, ref_items)


def test_wal_round_trips_mixed_ids_and_settles_on_commit(tmp_path):
    from ps.ids import keyed
    from ps.persist import TableUpdate

    wal = TrainerWAL(tmp_path)
    users = keyed(np.array(["a", 7], dtype=object))
    updates = {"user": TableUpdate("user", users.keys, np.ones((2, 3), np.float32), users.ids, np.array([True, True])),
               "item": TableUpdate("item", keyed([1, 2, 3]).keys, np.arange(6, dtype=np.float32).reshape(3, 2),
                                   np.array([1, 2, 3]), np.array([True, False, False]))}
    recent = (users.keys, keyed([1, 2]).keys, np.array([4, 5]))
    wal.write(PushRecord(5, 0, 10, 1, partition=2), updates, recent)
    for w in (wal, TrainerWAL(tmp_path)):  # in memory, and read back after a "crash"
        (rec, got, rec_recent), = w.pending()
        assert rec == PushRecord(5, 0, 10, 1, partition=2)
        assert got["user"].ids.tolist() == ["a", 7] and got["user"].keys.tolist() == users.keys.tolist()
        assert got["item"].create.tolist() == [True, False, False] and got["item"].ids[0] == 1
        np.testing.assert_array_equal(got["item"].grads, updates["item"].grads)
        assert [a.tolist() for a in rec_recent] == [a.tolist() for a in recent]
    wal.commit({2: 10}, 9)
    assert wal.pending() == []
    again = TrainerWAL(tmp_path)
    assert again.pending() == [] and again.committed().offsets == {2: 10} and again.committed().events_applied == 9


def test_wal_drops_a_torn_tail_and_rotates(tmp_path):
    from ps.ids import keyed
    from ps.persist import TableUpdate

    wal = TrainerWAL(tmp_path, rotate_bytes=4096)
    k = keyed([1, 2])
    upd = {"item": TableUpdate("item", k.keys, np.ones((2, 64), np.float32), k.ids, None)}
    for seq in range(20):
        wal.write(PushRecord(seq, seq, seq + 1, 0), upd)
        wal.commit({0: seq + 1}, seq + 1)
    assert (tmp_path / "wal.arrows").stat().st_size < 3 * 4096  # rotated: not every record kept
    wal.write(PushRecord(99, 20, 21, 0), upd)
    size = (tmp_path / "wal.arrows").stat().st_size
    with open(tmp_path / "wal.arrows", "r+b") as f:
        f.truncate(size - 10)  # the last record is torn: it was never sent
    again = TrainerWAL(tmp_path)
    assert again.pending() == [] and again.committed().offsets == {0: 20}
    again.write(PushRecord(100, 20, 21, 0), upd)
    assert [r.seq for r, _, _ in TrainerWAL(tmp_path).pending()] == [100]


def test_wal_fsync_syncs_each_record_and_a_rotation_syncs_its_rename(tmp_path, monkeypatch):
    # trainer.wal_fsync promises that a record survives a machine crash: each push and commit
    # must fsync the WAL file itself (the flush done anyway reaches only the OS). Without it,
    # nothing is synced per record. A rotation replaces the file by a rename, durable only
    # once the directory is synced too.
    import workers.wal as wal_mod
    from ps.ids import keyed
    from ps.persist import TableUpdate

    synced: list[int] = []  # inode of each fsync'd descriptor
    dirs: list = []
    real_fsync, real_fsync_path = os.fsync, wal_mod.fsync_path

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def fsync_path(path):
        dirs.append(str(path))
        real_fsync_path(path)

    monkeypatch.setattr(wal_mod.os, "fsync", fsync)
    monkeypatch.setattr(wal_mod, "fsync_path", fsync_path)
    k = keyed([1, 2])
    upd = {"item": TableUpdate("item", k.keys, np.ones((2, 64), np.float32), k.ids, None)}
    for durable in (False, True):
        root = tmp_path / f"fsync-{durable}"
        wal = TrainerWAL(root, fsync=durable, rotate_bytes=16384)
        # Held open so the first file's inode stays allocated: once freed, the file system may
        # give the rotated file the same number, and "rotated" could not be told by it.
        first = open(root / "wal.arrows", "rb")
        ino = os.fstat(first.fileno()).st_ino
        synced.clear()
        dirs.clear()
        wal.write(PushRecord(0, 0, 10, 0), upd)
        after_write = synced.count(ino)
        wal.commit({0: 10}, 10)
        assert (after_write, synced.count(ino)) == ((1, 2) if durable else (0, 0)), durable
        assert dirs == []  # no rotation yet
        for seq in range(1, 20):
            wal.write(PushRecord(seq, 10 * seq, 10 * seq + 10, 0), upd)
            wal.commit({0: 10 * seq + 10}, 10 * seq + 10)
        assert (root / "wal.arrows").stat().st_ino != ino  # rotated
        assert str(root) in dirs
        wal.close()
        first.close()


def test_wal_keeps_a_read_ahead_batchs_pushes_pending_past_the_commit_of_the_batch_before(tmp_path):
    # With trainer.prefetch the next batch's pushes are written and sent before this batch's
    # commit: that commit must not settle them (a crash then would never re-send them, and the
    # retrained batch's gradients would differ on the shards that had not applied them).
    from ps.ids import keyed
    from ps.persist import TableUpdate

    k = keyed([1, 2])
    upd = {"item": TableUpdate("item", k.keys, np.ones((2, 64), np.float32), k.ids, None)}
    wal = TrainerWAL(tmp_path, rotate_bytes=4096)
    for b in range(12):  # batch b: events [10b, 10b + 10), two passes; batch b + 1 written before b commits
        if b == 0:
            wal.write(PushRecord(0, 0, 10, 0), upd)
            wal.write(PushRecord(1, 0, 10, 1), upd)
        wal.write(PushRecord(100 * (b + 1), 10 * (b + 1), 10 * (b + 2), 0), upd)
        wal.write(PushRecord(100 * (b + 1) + 1, 10 * (b + 1), 10 * (b + 2), 1), upd)
        wal.commit({0: 10 * (b + 1)}, 10 * (b + 1))
        want = [100 * (b + 1), 100 * (b + 1) + 1]
        assert [r.seq for r, _, _ in wal.pending()] == want, b
        assert [r.seq for r, _, _ in TrainerWAL(tmp_path).pending()] == want, b  # after a crash
    assert (tmp_path / "wal.arrows").stat().st_size < 3 * 4096  # rotated, the pending pushes kept
    again = TrainerWAL(tmp_path)
    (rec, got, _), _ = again.pending()
    assert rec == PushRecord(1200, 120, 130, 0) and np.array_equal(got["item"].grads, upd["item"].grads)
    again.commit({0: 130}, 130)
    assert again.pending() == [] and TrainerWAL(tmp_path).pending() == []


@pytest.mark.parametrize("prefetch, staleness", [(True, 0), (True, 1), (False, 0)])
def test_a_restart_from_a_snapshot_taken_while_a_batch_was_read_ahead_ends_bitwise_equal(tmp_path, prefetch, staleness):
    # A batch read ahead is prepared (catalogue, histories) before the batch before it commits:
    # a snapshot taken at that commit held it, under the earlier offsets, and the restart replayed
    # it again (its negatives and session contexts then differed). In process: the shard's rows
    # stay in memory across the "crash"; the trainer keeps only its files.
    from ps.local import LocalClient
    from workers.trainer import Trainer

    cfg = load_config(overrides={
        "stream": {"num_events": 2050},
        "trainer": {"batch_size": 100, "prefetch": prefetch, "staleness": staleness, "snapshot_every_batches": 3},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
    })

    def final(client, trainer):
        users, items = np.arange(cfg.stream.synthetic.num_users), np.arange(cfg.stream.synthetic.num_items)
        rows = client.pull_many({"user": users, "item": items, "item_bias": items, "item_pop": items})
        return {t: r.tolist() for t, (r, _) in rows.items()}, trainer.catalogue.counts().tolist(), trainer.histories.capture()

    whole = LocalClient(cfg.ps)
    t = Trainer(0, cfg, client=whole, state_dir=str(tmp_path / "whole"))
    t.run()
    want = final(whole, t)

    client = LocalClient(cfg.ps)
    first = Trainer(0, cfg, client=client, state_dir=str(tmp_path / "cut"))
    first.run(max_batches=11)  # snapshots were taken with a batch read ahead
    assert first._snapshot_dir().exists()
    again = Trainer(0, cfg, client=client, state_dir=str(tmp_path / "cut"))  # recovers in __init__
    again.run()
    got = final(client, again)
    assert again.stats()["applied_offset"] == again.events_applied == 2050
    assert got[1] == want[1] and [a.tolist() for a in got[2]] == [a.tolist() for a in want[2]]  # local state
    if not staleness:  # with staleness 1 a restart may pull rows holding a push the first run's pull had not (README)
        assert got[0] == want[0]


def test_a_snapshot_save_that_died_between_its_renames_restarts_from_the_previous_snapshot(tmp_path, monkeypatch):
    # The save moves the last snapshot aside (.state.old), then the new one in. A crash between
    # the two left no "state" dir: the restart rebuilt its local state from offset 0, which fails
    # once retention has trimmed the ingest log (the log may drop what is before the snapshot).
    import shutil

    from ps.local import LocalClient
    from workers.trainer import Trainer

    cfg = load_config(overrides={
        "stream": {"num_events": 1000},
        "trainer": {"batch_size": 100, "prefetch": False, "snapshot_every_batches": 3},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
    })
    client = LocalClient(cfg.ps)
    first = Trainer(0, cfg, client=client, state_dir=str(tmp_path))
    first.run(max_batches=7)  # snapshots at 300 and 600 events
    root = first.root
    (root / "state").rename(root / ".state.old")
    shutil.copytree(root / ".state.old", root / ".state.tmp")  # the new one, whole or not
    (root / ".state.tmp" / "meta.json").unlink()
    replayed: list[tuple[int, int]] = []
    replay = Trainer._replay
    monkeypatch.setattr(Trainer, "_replay", lambda self, p, start, end: (replayed.append((start, end)), replay(self, p, start, end))[1])
    again = Trainer(0, cfg, client=client, state_dir=str(tmp_path))  # recovers in __init__
    assert replayed == [(600, 700)]  # from the snapshot moved aside, not from 0
    assert (root / "state" / "meta.json").exists() and not (root / ".state.old").exists()
    again.run()
    assert again.events_applied == 1000 and again.stats()["applied_offset"] == 1000
    assert (root / "state" / "meta.json").exists() and not (root / ".state.old").exists()


@pytest.mark.parametrize("prefetch, staleness", [(True, 0), (True, 1), (False, 0)])
def test_a_push_is_sent_only_once_every_earlier_push_is_acknowledged(prefetch, staleness):
    # Shards that are slow to acknowledge (done() says no until the trainer waits): with a batch
    # read ahead, its push went out while the batch before was still unacknowledged on a shard
    # it had not pulled from. If that shard restarts, Ray may retry the two pushes out of order,
    # and a shard drops a push whose seq is below one it has applied: lost gradients. The
    # trainer must wait for (commit) the earlier batch before the later one's first push.
    from ps.local import LocalClient
    from workers.trainer import Trainer

    class SlowToAcknowledge(LocalClient):
        """A real in-process shard whose pushes count as acknowledged only once waited on."""

        def __init__(self, ps_cfg):
            super().__init__(ps_cfg)
            self.unacked: list[int] = []  # seqs sent and not yet waited on
            self.sent_over_unacked: list[tuple[int, list[int]]] = []

        def push_async(self, updates, push_id, recent=None):
            if self.unacked:
                self.sent_over_unacked.append((push_id.seq, list(self.unacked)))
            refs = super().push_async(updates, push_id, recent)
            self.unacked.append(push_id.seq)
            return [("push", push_id.seq, r) for r in refs]

        def wait(self, refs):
            done = {r[1] for r in refs if isinstance(r, tuple) and r[:1] == ("push",)}
            self.unacked = [s for s in self.unacked if s not in done]
            return [r[2] if isinstance(r, tuple) and r[:1] == ("push",) else r for r in refs]

        def done(self, refs):
            return False

    cfg = load_config(overrides={
        "stream": {"num_events": 1200},
        "trainer": {"batch_size": 100, "prefetch": prefetch, "staleness": staleness, "snapshot_every_batches": 1000},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
    })
    client = SlowToAcknowledge(cfg.ps)
    t = Trainer(0, cfg, client=client)
    t.run()
    assert t.stats()["applied_offset"] == 1200
    assert client.sent_over_unacked == [], client.sent_over_unacked[:5]
    assert client.unacked == []
