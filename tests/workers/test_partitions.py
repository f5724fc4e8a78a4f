"""Partitioned ingest: 2 trainers x 4 partitions apply exactly the events a 1 x 1 run applies.

Both runs are real deployments (PS shards, the durable ingest log, trainer actors; no Serve)
on one Ray, fed the same 600 events through the ingest log actor. Events go to partition
``user_key % 4``; trainer ``i`` consumes partitions ``p % 2 == i`` only. Compared:

* the set of applied events, through what they leave on the shards: each item's popularity
  count (one per event of weight 1) and each user's recent items, equal between the runs and
  to the events posted (exactly once);
* what each trainer read: only its own partitions, each event once (the log's count of
  events served equals the events posted: nobody reads the whole stream and filters).
"""

from __future__ import annotations

import collections
import tempfile
import uuid

import numpy as np
import pytest
import ray

from ps.optim import row_clocks
from tests.conftest import wait_for
from workers.trainer import partitions_of

EVENTS = 600
USERS = [f"pu{j}" for j in range(53)]
ITEMS = list(range(37))


def _events() -> list[tuple[str, int]]:
    # Each user's events are spread over the stream, so a user's recent items depend on order.
    return [(USERS[(j * 7) % len(USERS)], ITEMS[(j * j + j // 5) % len(ITEMS)]) for j in range(EVENTS)]


def _run(partitions: int, trainers: int) -> dict:
    """Deploy, feed :func:`_events` in appends of 100, wait until all are applied; what it left."""
    from ps.client import PSClient
    from serving import deploy
    from serving.config import load_config

    cfg = load_config(None, {
        "namespace": f"t-part-{partitions}x{trainers}-{uuid.uuid4().hex[:6]}",
        "ps": {"num_shards": 2, "num_buckets": 32, "shard_num_cpus": 0.1,
               "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"num_workers": trainers, "batch_size": 32, "passes": 1, "device": "cpu", "num_cpus": 0.25},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tempfile.mkdtemp(prefix="freshet-part-"), "fsync": False, "partitions": partitions},
    })
    dep = deploy.start(cfg, durable=True, autostart=True, serving=False)
    try:
        events = _events()
        for s in range(0, EVENTS, 100):
            chunk = events[s : s + 100]
            r = ray.get(dep.ingest.append.remote([u for u, _ in chunk], [i for _, i in chunk], [None] * len(chunk),
                                                 [1.0] * len(chunk)), timeout=60)
            assert r.accepted == len(chunk)

        def applied():
            st = ray.get([t.stats.remote() for t in dep.trainers], timeout=60)
            return sum(s["events_applied"] for s in st) == EVENTS and st

        stats = wait_for(applied, 120, f"{trainers} trainer(s) to apply {EVENTS} events")
        ps = PSClient.connect(cfg.namespace)
        return {
            "cfg": cfg,
            "ingest": ray.get(dep.ingest.stats.remote(), timeout=60),
            "trainers": stats,
            "popularity": ps.pull("item_pop", ITEMS)[:, 0],
            "recent_clock": row_clocks(ps.pull(cfg.model.recent_table, ITEMS)) * cfg.model.recent_halflife_events,
            "recent": ps.seen(USERS),
        }
    finally:
        deploy.stop(cfg, serving=False)


@pytest.fixture(scope="module")
def single(ray_cluster):
    return _run(partitions=1, trainers=1)


@pytest.fixture(scope="module")
def partitioned(ray_cluster):
    return _run(partitions=4, trainers=2)


def test_single_trainer_applies_every_event_once(single):
    want = collections.Counter(i for _, i in _events())
    np.testing.assert_array_equal(single["popularity"], np.asarray([want[i] for i in ITEMS], np.float32))
    (t,) = single["trainers"]
    assert t["applied_offsets"] == {"0": EVENTS} and t["events_applied"] == EVENTS and t["dead_lettered"] == 0
    assert single["ingest"]["events_read"] == EVENTS


def test_each_trainer_consumes_only_its_partitions_each_event_once(partitioned):
    ingest, cfg = partitioned["ingest"], partitioned["cfg"]
    ends = ingest["end_offsets"]
    assert len(ends) == 4 and sum(ends) == EVENTS and min(ends) > 0, ends
    for i, t in enumerate(partitioned["trainers"]):
        mine = partitions_of(i, cfg)
        assert mine == [p for p in range(4) if p % 2 == i]
        assert t["applied_offsets"] == {str(p): ends[p] for p in mine}, t["applied_offsets"]
        assert t["events_read"] == t["events_applied"] == sum(ends[p] for p in mine)
        assert t["dead_lettered"] == 0
    # Every event was served once, to the one trainer that owns its partition.
    assert ingest["events_read"] == EVENTS


def test_partitioned_run_applies_the_same_events_as_a_single_trainer(single, partitioned):
    np.testing.assert_array_equal(partitioned["popularity"], single["popularity"])
    assert partitioned["recent"] == single["recent"]
    assert all(partitioned["recent"]), "every user should have recent items"


def test_the_recent_popularity_clock_counts_every_partition(single, partitioned):
    # The clock was each partition's own offset: with 4 partitions the newest counts were
    # stamped at ~150 events where 600 had arrived, and a partition behind the others had
    # its counts decayed against theirs. Now it is the log's position across partitions,
    # within one append (100 events here) of the single-partition run's.
    assert single["recent_clock"].max() == pytest.approx(EVENTS, abs=1)
    assert abs(partitioned["recent_clock"].max() - EVENTS) <= 100, partitioned["recent_clock"]
