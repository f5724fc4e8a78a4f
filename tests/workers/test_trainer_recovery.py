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
    users = client.pull("user", np.arange(2000), create=False)
    items = client.pull("item", np.arange(1000), create=False)
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


def test_wal_round_trips_mixed_ids_and_forgets_acknowledged(tmp_path):
    wal = TrainerWAL(tmp_path)
    updates = {"user": (np.array(["a", 7], dtype=object), np.ones((2, 3), np.float32)),
               "item": (np.array([1, 2, 3]), np.arange(6, dtype=np.float32).reshape(3, 2))}
    wal.write(PushRecord(5, 0, 10, 1), updates, (np.array(["a", 7], dtype=object), np.array([1, 2])))
    (rec, got, hist), = wal.pending()
    assert rec == PushRecord(5, 0, 10, 1)
    assert got["user"][0].tolist() == ["a", 7] and got["item"][0].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(got["item"][1], updates["item"][1])
    assert hist[0].tolist() == ["a", 7]
    wal.acknowledged(5)
    assert wal.pending() == []
    wal.commit(10, 9)
    assert TrainerWAL(tmp_path).committed() == (10, 9)
