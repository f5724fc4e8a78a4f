"""Crash points of the trainer, in process (a real ``Trainer`` with a WAL and dead-letter file
under ``tmp_path``, rows in a ``ps.local.LocalClient`` shard that outlives the "crash"): the
end state must be the one an uninterrupted run reaches.

* ``stop()`` while a failed batch waits for its retry, then ``start()``: the retry's recovery
  must still run (the failed batch was read and prepared but not applied);
* a dead-letter file with a torn tail (a crash mid-append): later dead letters must stay
  readable, so a restart still knows them;
* an event set aside as poison in one pass stays set aside when a restart redoes the batch's
  later passes;
* ``stats()`` after a restart, and while a retry's recovery keeps failing: events read and
  applied agree with the committed offsets;
* local state replayed after a restart is the one training left: users' histories under a
  cap on users, and the catalogue of a trainer of two partitions (replayed in the order its
  batches were committed, which the WAL keeps through rotation since the last snapshot).
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from ps.ids import Keyed
from ps.local import LocalClient
from serving.config import load_config
from workers.config import StreamKind
from workers.step import TrainStep
from workers.trainer import Trainer


def _rows(cfg, client) -> dict[str, list]:
    users, items = np.arange(cfg.stream.synthetic.num_users), np.arange(cfg.stream.synthetic.num_items)
    got = client.pull_many({"user": users, "item": items, "item_bias": items, "item_pop": items})
    return {t: r.tolist() for t, (r, _) in got.items()}


def _retrying(tmp_path, **trainer):
    """A small config whose trainer retries failed batches (``trainer`` overrides), the client of
    a run of it without any failure, and the rows that run leaves (what a crash test must end with)."""
    cfg = load_config(overrides={
        "stream": {"num_events": 1000},
        "trainer": {"batch_size": 100, "passes": 2, "device": "cpu", **trainer},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
    })
    whole = LocalClient(cfg.ps)
    Trainer(0, cfg, client=whole, state_dir=tmp_path / "whole").run()
    return cfg, whole, _rows(cfg, whole)


def test_start_after_a_stop_during_a_retry_backoff_recovers_the_failed_batch(tmp_path):
    cfg, whole, want = _retrying(tmp_path, retry_backoff_s=60.0, max_retries=5)

    client = LocalClient(cfg.ps)
    t = Trainer(0, cfg, client=client, state_dir=tmp_path / "cut")
    failing = threading.Event()
    failing.set()
    gradients = t.step.gradients

    def flaky(batch, pulled, p):
        if failing.is_set() and batch.start == 300 and p == 1:  # after the batch's first push went out
            raise RuntimeError("injected: a shard went away")
        return gradients(batch, pulled, p)

    t.step.gradients = flaky
    t.start()
    for _ in range(6000):  # until the supervisor waits out its backoff (60 s) before the retry
        if t.state == "retrying":
            break
        t._thread.join(0.01)
    assert t.state == "retrying", t.stats()
    t.stop()
    failing.clear()
    t.start()
    t._thread.join(120)
    s = t.stats()
    assert not t._thread.is_alive() and s["done"], s
    assert s["applied_offset"] == s["events_applied"] == 1000, s
    assert _rows(cfg, client) == want
    assert client.shard.version == whole.shard.version


def _trainer(root, client=None) -> Trainer:
    cfg = load_config(None, {"ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
                             "stream": {"num_events": 200},
                             "trainer": {"batch_size": 100, "passes": 2, "device": "cpu"},
                             "ingest": {"dir": str(root)}})
    return Trainer(0, cfg, state_dir=root, client=client or LocalClient(cfg.ps))


def _poison(monkeypatch, offsets: list[int], passes: tuple[int, ...] = (0, 1)) -> None:
    """The events at ``offsets`` get a NaN loss term in ``passes`` (as a corrupted row would
    give them), in every trainer of the test (one recovering in its constructor too)."""
    original = TrainStep.losses

    def losses(self, batch, pulled, p, events):
        terms, leaves = original(self, batch, pulled, p, events)
        if p not in passes:
            return terms, leaves
        marked = torch.from_numpy(np.isin(batch.offsets[events], offsets))
        return terms + torch.where(marked, torch.tensor(float("nan")), torch.tensor(0.0)), leaves

    monkeypatch.setattr(TrainStep, "losses", losses)
    monkeypatch.setattr(TrainStep, "_bpr_fast", lambda self, batch, pulled, p: None)  # losses() is the general path's


def _dead_offsets(t: Trainer) -> list[int]:
    with pa.OSFile(str(t.root / "dead-letter.arrows"), "rb") as f:
        return [d["offset"] for d in pa.ipc.open_stream(f).read_all().to_pylist()]


def test_dead_letters_after_a_torn_tail_are_kept_across_a_restart(tmp_path, monkeypatch):
    _poison(monkeypatch, [11, 111])
    first = _trainer(tmp_path)
    first.run(max_batches=1)
    assert _dead_offsets(first) == [11]
    first.dead._file.close()
    with open(first.root / "dead-letter.arrows", "ab") as f:  # a crash mid-append of a later set-aside group
        f.write(pa.record_batch([pa.array([1])], names=["x"]).serialize().to_pybytes()[:37])
    second = _trainer(tmp_path, first.client)  # recovers in __init__
    second.run()
    second.dead._file.close()
    third = _trainer(tmp_path, first.client)  # replays both batches from offset 0
    s = third.stats()
    assert s["dead_lettered"] == 2 and s["events_applied"] == 198 and s["applied_offset"] == 200, s
    assert _dead_offsets(third) == [11, 111]


def test_a_redone_pass_leaves_out_the_events_an_earlier_pass_set_aside(tmp_path, monkeypatch):
    # The event's loss is not finite in pass 0 only: the uninterrupted run trains pass 1
    # without it. A crash between the passes redoes pass 1 from a freshly prepared batch.
    _poison(monkeypatch, [111], passes=(0,))
    ref = _trainer(tmp_path / "whole")
    ref.run()
    assert ref.stats()["events_applied"] == 199 and ref.stats()["dead_lettered"] == 1

    client = LocalClient(ref.cfg.ps)
    cut = _trainer(tmp_path / "cut", client)
    gradients = cut.step.gradients

    def crash_in_pass_1(batch, pulled, p):
        if batch.start == 100 and p == 1:
            raise RuntimeError("injected: the trainer died between the passes")
        return gradients(batch, pulled, p)

    cut.step.gradients = crash_in_pass_1
    with pytest.raises(RuntimeError, match="injected"):
        cut.run()
    again = _trainer(tmp_path / "cut", client)  # recovers in __init__: re-sends pass 0, redoes pass 1
    again.run()
    s = again.stats()
    assert s["dead_lettered"] == 1 and s["events_applied"] == 199 and s["applied_offset"] == 200, s
    assert client.shard.version == ref.client.shard.version  # the same pushes applied
    for name in ref.client.shard.tables:
        keys = np.sort(ref.client.live_keys(name)[0][1])
        assert np.array_equal(np.sort(client.live_keys(name)[0][1]), keys), name
        got, want = (c.pull_many({name: Keyed(keys)})[name][0] for c in (client, ref.client))
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_events_read_after_a_restart_agree_with_the_committed_offsets(tmp_path):
    first = _trainer(tmp_path)
    first.run()
    s = first.stats()
    assert s["events_read"] == s["events_applied"] == s["applied_offset"] == 200, s
    again = _trainer(tmp_path, first.client)
    s = again.stats()
    assert s["events_read"] == s["events_applied"] == s["applied_offset"] == 200, s


def test_a_stop_while_recovery_keeps_failing_reports_the_committed_offsets(tmp_path):
    # A failed batch's retry first rebuilds local state from offset 0 (or the last snapshot);
    # when that recovery fails too (here: re-sending the batch's first push), stats() and the
    # stop() a checkpoint save records its offsets from must still say what is committed.
    cfg, _, want = _retrying(tmp_path, retry_backoff_s=0.01, max_retries=1000)

    failing = threading.Event()
    failing.set()

    class Refusing(LocalClient):
        def push_async(self, updates, push_id, recent=None):
            if failing.is_set() and self.shard.high_water.get(push_id.producer, -1) >= push_id.seq:
                raise RuntimeError("injected: the re-sent push is refused")
            return super().push_async(updates, push_id, recent)

    client = Refusing(cfg.ps)
    t = Trainer(0, cfg, client=client, state_dir=tmp_path / "cut")
    gradients = t.step.gradients

    def flaky(batch, pulled, p):
        if failing.is_set() and batch.start == 300 and p == 1:
            raise RuntimeError("injected: a shard went away")
        return gradients(batch, pulled, p)

    t.step.gradients = flaky
    t.start()
    for _ in range(6000):
        if t.retries >= 3:  # the first failure and two failed recoveries
            break
        t._thread.join(0.01)
    assert t.retries >= 3, t.stats()
    s = t.stop()
    assert s["applied_offset"] == t.wal.committed().offsets[0] == 300, s
    assert s["events_applied"] == t.wal.committed().events_applied == 300, s
    failing.clear()
    t.start()
    t._thread.join(120)
    s = t.stats()
    assert s["done"] and s["applied_offset"] == s["events_applied"] == 1000, s
    assert _rows(cfg, client) == want


def test_histories_replayed_after_a_restart_are_those_training_left(tmp_path):
    # With a cap on users (the user table's max_rows), the least recently active user's history
    # goes when a batch brings a new one. A restart replays the events in larger reads than the
    # batches were: a user dropped between two batches, and active again later within one read,
    # kept the history they had lost.
    cfg = load_config(overrides={
        "stream": {"num_events": 1000},
        "trainer": {"batch_size": 50, "passes": 1, "device": "cpu", "lifecycle_sync_s": 1e6},
        "ps": {"num_shards": 1, "tables": {"user": {"dim": 8, "max_rows": 40}, "item": {"dim": 8}}},
    })
    client = LocalClient(cfg.ps)
    first = Trainer(0, cfg, client=client, state_dir=tmp_path)
    first.run()
    assert len(first.histories) == 40
    again = Trainer(0, cfg, client=client, state_dir=tmp_path)  # replays from offset 0
    assert again.offsets == first.offsets == {0: 1000}
    want, got = first.histories.capture(), again.histories.capture()
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


class _Partition:
    """One in-memory partition of a live stream (as ``IngestSource`` reads the ingest log)."""

    def __init__(self, events: pa.RecordBatch, p: int, clocks: np.ndarray):
        self.events, self.source_id, self.clocks = events, f"mem/p{p}", clocks
        self.end_offset, self.quarantined = None, 0

    def read(self, offset: int, max_events: int) -> pa.RecordBatch:
        return self.events.slice(offset, max(0, min(max_events, self.events.num_rows - offset)))

    def clock(self, offset: int) -> int:
        return int(self.clocks[offset])

    def wait(self, positions, timeout_s) -> None:
        pass

    def commit(self, consumer, offset) -> None:
        pass


class _TwoPartitions(Trainer):
    """A trainer of two ingest partitions, the synthetic stream split by user key."""

    def _open_sources(self):
        from workers.streams import open_source

        raw = open_source(self.cfg.stream.model_copy(update={"kind": StreamKind.SYNTHETIC, "num_events": 1200}), model=self.cfg.model).read(0, 1200)
        out = {}
        for p in range(2):
            sel = np.flatnonzero(raw.column("user_key").to_numpy() % 2 == p)
            part = raw.take(pa.array(sel))
            part = part.set_column(part.schema.get_field_index("offset"), "offset", pa.array(np.arange(len(sel)), pa.int64()))
            out[p] = _Partition(part, p, sel + 1)
        return out


def test_local_state_replayed_over_two_partitions_is_the_one_training_left(tmp_path):
    # A trainer of two partitions prepares their batches in turn; a restart replayed one
    # partition's events and then the other's, so the catalogue (whose order the negatives
    # are drawn by) held the items in another order than the run it resumes.
    cfg = load_config(overrides={
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": str(tmp_path), "partitions": 2},
        "trainer": {"batch_size": 50, "passes": 1, "device": "cpu", "snapshot_every_batches": 1000},
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
    })
    client = LocalClient(cfg.ps)
    first = _TwoPartitions(0, cfg, client=client, state_dir=tmp_path / "trainers")
    first.run(max_batches=8)
    assert min(first.offsets.values()) > 0
    again = _TwoPartitions(0, cfg, client=client, state_dir=tmp_path / "trainers")  # replays both partitions
    assert again.offsets == first.offsets
    assert again.catalogue.keys().tolist() == first.catalogue.keys().tolist()
    assert again.catalogue.counts().tolist() == first.catalogue.counts().tolist()


def test_the_wal_keeps_the_commits_since_the_last_snapshot_through_rotation(tmp_path):
    from ps.ids import keyed
    from ps.persist import TableUpdate
    from workers.wal import PushRecord, TrainerWAL

    k = keyed([1, 2])
    upd = {"item": TableUpdate("item", k.keys, np.ones((2, 64), np.float32), k.ids, None)}
    wal = TrainerWAL(tmp_path, rotate_bytes=8192, keep_history=True)
    offsets = {0: 0, 1: 0}
    want = []
    for b in range(40):  # batches of 10 events, partitions in turn
        p = b % 2
        wal.write(PushRecord(b, offsets[p], offsets[p] + 10, 0, partition=p), upd)
        offsets[p] += 10
        wal.commit(offsets, 10 * (b + 1))
        want.append(dict(offsets))
        if b == 29:
            wal.forget(offsets)  # local state persisted here
            want = []
    assert (tmp_path / "wal.arrows").stat().st_size < 8 * 8192  # rotated
    wal.write(PushRecord(99, 200, 210, 0), upd)
    again = TrainerWAL(tmp_path, keep_history=True)
    got = again.history()
    assert got[-len(want):] == want and all(h in want or all(h[p] <= 150 for p in h) for h in got), got
    assert [r.seq for r, _, _ in again.pending()] == [99] and again.committed().offsets == {0: 200, 1: 200}
