"""Read-your-writes user state (issue 13): once ``POST /events`` has answered 200, the user's
next ``/rank`` and ``/score`` exclude and use the posted items, whatever the trainers' lag.

One module-scoped durable deployment (real Ray, shards, ingest log, trainer, Serve over
HTTP). The trainer learns a small history first and is then *stopped*: from there on every
posted event is acknowledged but never trained, so anything ``/rank`` and ``/score`` show of
it came through the ingest path (``FreshetAPI._record_recent`` -> ``PSShard.record_recent``).
The tests run in file order: the last one restarts a shard and then the trainer.
"""

from __future__ import annotations

import tempfile
import uuid

import httpx
import numpy as np
import pytest
import ray

from tests.conftest import _ray_start, free_port, wait_for

N_ITEMS = 30


@pytest.fixture(scope="module")
def deployment():
    """``(http client, config, deploy.Deployment)`` with the history trained and the trainer stopped."""
    from serving import deploy
    from serving.config import load_config

    tmp = tempfile.mkdtemp(prefix="freshet-ryw-")
    cfg = load_config(None, {
        "namespace": f"t-ryw-{uuid.uuid4().hex[:8]}",
        "ps": {"num_shards": 2, "num_buckets": 64, "snapshot_every_pushes": 8,
               "tables": {"user": {"dim": 16}, "item": {"dim": 16}, "item_ctx": {"dim": 16}}},
        "trainer": {"batch_size": 64, "device": "cpu"},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": free_port(), "cache_refresh_s": 0.05, "request_timeout_s": 2.0},
    })
    with _ray_start():
        dep = deploy.start(cfg, durable=True, autostart=False)
        try:
            with httpx.Client(base_url=dep.url, timeout=30.0) as http:
                dep.start_training()
                history = [{"user_id": f"u{u}", "item_id": i, "timestamp": 1.7e9 + u * 100 + i}
                           for u in range(20) for i in range(N_ITEMS) if (u + i) % 3 == 0 or i < 5]
                for s in range(0, len(history), 100):
                    assert http.post("/events", json={"events": history[s:s + 100]}).status_code == 200
                _settled(http)
                ray.get([t.stop.remote() for t in dep.trainers])
                assert not any(s["running"] for s in ray.get([t.stats.remote() for t in dep.trainers]))
                yield http, cfg, dep
        finally:
            deploy.stop(cfg)


def _stats(http) -> dict:
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


def _settled(http) -> dict:
    return wait_for(lambda: (s := _stats(http))["events_applied"] == s["events_accepted"] and s, 60,
                    "the trainer to apply every accepted event")


def _rank(http, user, k=N_ITEMS, exclude_seen=True) -> dict:
    r = http.post("/rank", json={"user_id": user, "k": k, "exclude_seen": exclude_seen})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(ranked: dict) -> list:
    return [it["item_id"] for it in ranked["items"]]


def _local_snapshot(dep):
    """The item tables as the replica ranks them (the PS does not change while the trainer is stopped)."""
    from ps.cache import RowCache
    from workers.ranking import Ranker

    cache = RowCache(dep.ps, dep.cfg.model.item_tables())
    cache.sync()
    return Ranker(cache, dep.cfg.model).snapshot()


def _keys(ids) -> list[int]:
    from ps.ids import keyed

    return keyed(list(ids)).keys.tolist()


def test_rank_and_score_use_posted_items_at_once_with_the_trainer_stopped(deployment):
    http, cfg, dep = deployment
    user = "u0"
    before = _rank(http, user)
    assert before["fallback"] is None  # a trained user: the model ranks, not popularity
    posted = _ids(before)[:3]  # what the model would recommend first
    probe = [i for i in range(N_ITEMS) if i not in posted]
    recent_before = dep.ps.recent_items([user])[0].tolist()
    row = dep.ps.pull(cfg.model.user_table, [user])[0]
    accepted = _stats(http)["events_accepted"]

    r = http.post("/events", json={"events": [{"user_id": user, "item_id": i} for i in posted]})
    assert r.status_code == 200, r.text
    after = _rank(http, user)  # immediately: no wait, no retry
    scored = http.post("/score", json={"user_id": user, "item_ids": probe})
    assert scored.status_code == 200, scored.text

    # Excluded at once, and the model (not a fallback) still ranks the rest.
    assert after["fallback"] is None
    assert not set(_ids(after)) & set(posted), (posted, _ids(after))
    assert set(_ids(after)) == set(_ids(before)) - set(posted)
    # Nothing was trained: the trainer is stopped, the user's row is as it was.
    s = _stats(http)
    assert s["events_accepted"] == accepted + 3 and s["events_applied"] == accepted
    assert np.array_equal(dep.ps.pull(cfg.model.user_table, [user])[0], row)
    # The shard's recent items end with the posted items, in order.
    recent_after = dep.ps.recent_items([user])[0].tolist()
    assert recent_after == recent_before + _keys(posted)

    # The session context uses them: /score is the query (row + mean context row of the last
    # context_items recent items, the posted ones included), not the query before the post.
    snap = _local_snapshot(dep)
    want, _ = snap.score_items(row, probe, np.asarray(recent_after, np.uint64))
    old, _ = snap.score_items(row, probe, np.asarray(recent_before, np.uint64))
    got = scored.json()
    assert got["fallback"] is None
    assert got["scores"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(want, old)) > 1e-3  # the context really changed the scores
    # And /rank's order follows the new scores.
    full = _rank(http, user, exclude_seen=False)
    by_item = dict(zip(probe, want))
    ranked = [(it["item_id"], it["score"]) for it in full["items"] if it["item_id"] in by_item]
    assert [s for _, s in ranked] == pytest.approx([by_item[i] for i, _ in ranked], rel=1e-5, abs=1e-5)


def test_new_user_is_ranked_by_their_posted_items_at_once(deployment):
    # No row (the trainer is stopped), but the posted items are known at once: the model's
    # session context alone ranks the user (not the popular fallback), without those items.
    http, cfg, dep = deployment
    user = f"new-{uuid.uuid4().hex[:6]}"
    before = _rank(http, user, k=5)
    assert before["fallback"] == "popular" and before["fallback_reason"] == "new_user"
    posted = _ids(before)[:3]
    assert http.post("/events", json={"events": [{"user_id": user, "item_id": i} for i in posted]}).status_code == 200
    after = _rank(http, user)
    assert after["fallback"] is None and after["fallback_reason"] is None
    assert not set(_ids(after)) & set(posted) and len(_ids(after)) == N_ITEMS - 3
    assert not dep.ps.pull_many({cfg.model.user_table: [user]})[cfg.model.user_table][1][0]  # still no row
    # The scores are the context query's: a zero row plus the mean context row of the posted items.
    snap = _local_snapshot(dep)
    probe = _ids(after)
    want, fallback = snap.score_items(np.zeros(snap.ctx.shape[1], np.float32), probe, np.asarray(_keys(posted), np.uint64))
    assert fallback is None
    assert [it["score"] for it in after["items"]] == pytest.approx(want, rel=1e-5, abs=1e-5)
    scored = http.post("/score", json={"user_id": user, "item_ids": probe}).json()
    assert scored["fallback"] is None and scored["scores"] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_recent_items_survive_a_shard_restart_and_the_trainer_redelivers_nothing_twice(deployment):
    http, cfg, dep = deployment
    user = "u1"
    posted = _ids(_rank(http, user))[:2]
    assert http.post("/events", json={"events": [{"user_id": user, "item_id": i} for i in posted]}).status_code == 200
    recent = dep.ps.recent_items([user])[0].tolist()
    assert recent[-2:] == _keys(posted)
    shard = dep.ps.shards[int(dep.ps.shard_of([user])[0])]
    pid = ray.get(shard.pid.remote())
    ray.kill(shard, no_restart=False)  # Ray restarts it; it recovers from its state dir
    wait_for(lambda: _pid_changed(shard, pid), 60, "the shard to restart")
    # Still excluded after the restart, with the trainer still stopped (nothing redelivered yet).
    got = wait_for(lambda: (r := http.post("/rank", json={"user_id": user, "k": N_ITEMS})).status_code == 200 and r.json(),
                   30, "/rank to answer after the shard restart")
    assert got["fallback"] is None and not set(_ids(got)) & set(posted)
    assert dep.ps.recent_items([user])[0].tolist() == recent

    # The trainer, started again, trains the events posted while it was stopped and delivers
    # them to the recent items as well: idempotent by offset, so nothing is kept twice.
    dep.start_training()
    _settled(http)
    assert dep.ps.recent_items([user])[0].tolist() == recent
    final = _rank(http, user)
    assert final["fallback"] is None and not set(_ids(final)) & set(posted)


def _pid_changed(shard, old: int) -> bool:
    try:
        return ray.get(shard.pid.remote(), timeout=5) != old
    except Exception:  # noqa: BLE001 - restarting
        return False
