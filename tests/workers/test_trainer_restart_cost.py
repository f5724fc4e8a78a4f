"""A restarted trainer reads only the events since its last local-state snapshot, however long
the history: counted reads, not wall time.

A real deployment (PS shards, the durable ingest log, one trainer with its WAL and snapshots;
no Serve) is fed ``N`` events in one append, so the trainer's batches are ``[0, 50), [50, 100)
...``; it snapshots its catalogue and histories every 4 batches. The trainer is killed
(SIGKILL) once it has applied them and Ray restarts it; the ingest log's count of events
served (``events_read``) tells how many the restart read. Then ``N`` more, and again.

With ``N = 1030`` both restarts find their last snapshot 30 events back (at 1000 and 2030), so
both must read exactly 30 events; a restart that rebuilt its state from offset 0 would read
1030 and then 2060.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import uuid

import pytest
import ray

from tests.conftest import wait_for

BATCH = 50
SNAPSHOT_EVERY = 4  # batches
N = 1030


@pytest.fixture(scope="module")
def deployment(ray_cluster):
    from serving import deploy
    from serving.config import load_config

    cfg = load_config(None, {
        "namespace": f"t-rcost-{uuid.uuid4().hex[:6]}",
        "ps": {"num_shards": 2, "num_buckets": 32, "shard_num_cpus": 0.1,
               "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"batch_size": BATCH, "passes": 1, "snapshot_every_batches": SNAPSHOT_EVERY, "device": "cpu",
                    "num_cpus": 0.25},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tempfile.mkdtemp(prefix="freshet-rcost-"), "fsync": False},
    })
    dep = deploy.start(cfg, durable=True, autostart=True, serving=False)
    try:
        yield cfg, dep
    finally:
        deploy.stop(cfg, serving=False)


def _append(dep, first: int, n: int) -> None:
    """One append of ``n`` events (users and items cycle, weight 1): one batch in the log."""
    users = [f"ru{(first + j) % 97}" for j in range(n)]
    items = [(first + j) % 41 for j in range(n)]
    r = ray.get(dep.ingest.append.remote(users, items, [None] * n, [1.0] * n), timeout=60)
    assert r.accepted == n and r.offset == first + n - 1


def _trainer_stats(cfg) -> dict | None:
    try:
        return ray.get(ray.get_actor("trainer-0", namespace=cfg.namespace).stats.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # restarting


def _events_read(dep) -> int:
    return ray.get(dep.ingest.stats.remote(), timeout=60)["events_read"]


def _restart_reads(cfg, dep, applied: int) -> tuple[int, int]:
    """Kill the trainer once it has applied ``applied`` events; ``(events the restarted trainer
    read from the log, offset of the snapshot it restarted from)``."""
    wait_for(lambda: (s := _trainer_stats(cfg)) and s["applied_offset"] == applied, 120,
             f"the trainer to apply {applied} events")
    trainer = ray.get_actor("trainer-0", namespace=cfg.namespace)
    pid = ray.get(trainer.pid.remote(), timeout=30)
    before = _events_read(dep)
    os.kill(pid, signal.SIGKILL)

    def restarted():
        s = _trainer_stats(cfg)
        if s is None or s["state"] != "running":
            return None
        return ray.get(trainer.pid.remote(), timeout=30) != pid and s

    s = wait_for(restarted, 120, "Ray to restart the trainer")
    # __init__ (recovery included) has returned once the new incarnation answers.
    assert s["applied_offset"] == applied and s["events_applied"] == applied, s
    reads = _events_read(dep) - before
    from serving.deploy import state_dirs

    meta = json.loads((state_dirs(cfg)["trainers"] / "trainer-0" / "state" / "meta.json").read_text())
    return reads, int(meta["offsets"]["0"])


def test_restart_reads_only_the_events_since_the_last_snapshot(deployment):
    cfg, dep = deployment
    _append(dep, 0, N)
    reads_n, snap_n = _restart_reads(cfg, dep, N)
    _append(dep, N, N)
    reads_2n, snap_2n = _restart_reads(cfg, dep, 2 * N)
    assert (snap_n, snap_2n) == (1000, 2030)
    assert reads_n == N - snap_n and reads_2n == 2 * N - snap_2n  # exactly the work since the snapshot
    assert reads_n == reads_2n == 30, (reads_n, reads_2n)
    assert reads_2n <= BATCH * SNAPSHOT_EVERY < N  # bounded by the snapshot interval, not by history
