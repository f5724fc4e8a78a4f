"""Trainers end to end against real shard actors: learning beats popularity, every event
is applied exactly once, rows exist only for streamed IDs, users are partitioned, and a
MovieLens slice trains."""

from __future__ import annotations

import collections
import csv
import uuid

import numpy as np
import pytest
import ray

from ps.client import start_shards
from serving.config import FreshetConfig, load_config
from ps.ids import id_keys
from workers.step import first_seen
from workers.streams import SyntheticSource
from workers.trainer import Trainer, start_trainers

NUM_SHARDS = 2


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _cfg(tmp_path, over: dict | None = None) -> FreshetConfig:
    base = {
        "namespace": f"test-trainer-{uuid.uuid4().hex[:8]}",
        "ingest": {"dir": str(tmp_path)},  # quarantine files land here, not in the repo
        "trainer": {"device": "cpu"},
        "ps": {"num_shards": NUM_SHARDS, "shard_num_cpus": 0.1},
    }
    return load_config(overrides=_merge(base, over or {}))


@pytest.fixture
def deploy(ray_cluster):
    """Starts shards for a config and kills every actor the test made."""
    made: list = []

    def _start(cfg: FreshetConfig):
        client = start_shards(cfg.ps, namespace=cfg.namespace)
        made.extend(client.shards)
        return client

    yield _start, made
    for h in made:
        ray.kill(h)


def _stream(cfg: FreshetConfig, n: int) -> tuple[list, list]:
    batch = SyntheticSource(cfg.stream.synthetic, n).read(0, n)
    return batch.column("user_id").to_pylist(), batch.column("item_id").to_pylist()


def _check_rows_and_history(cfg: FreshetConfig, client, users: list, items: list, confidence: list | None = None) -> None:
    """Rows exist exactly for streamed IDs; counts (summed ``confidence``, 1 per event by
    default) and histories saw each event once."""
    uniq_users, uniq_items = list(dict.fromkeys(users)), list(dict.fromkeys(items))
    stats = client.stats()
    rows = {t: sum(s["rows"][t] for s in stats) for t in ("user", "item", "item_bias", "item_pop")}
    assert rows == {"user": len(uniq_users), "item": len(uniq_items), "item_bias": len(uniq_items), "item_pop": len(uniq_items)}
    got = client.pull_many({"user": uniq_users, "item": uniq_items, "item_pop": uniq_items})
    assert got["user"][1].all() and got["item"][1].all() and got["item_pop"][1].all()
    counts: dict = collections.defaultdict(float)
    for i, c in zip(items, confidence or [1.0] * len(items)):
        counts[i] += c
    np.testing.assert_allclose(got["item_pop"][0][:, 0], [counts[i] for i in uniq_items], rtol=1e-5)
    per_user = collections.defaultdict(list)
    for u, i in zip(users, items):
        per_user[u].append(i)
    keep = cfg.ps.seen_per_user
    assert client.seen(uniq_users) == [id_keys(per_user[u][-keep:]).tolist() for u in uniq_users]


def test_trainer_beats_popularity_and_applies_every_event_once(deploy, tmp_path):
    start, made = deploy
    n = 30_000
    cfg = _cfg(tmp_path, {"stream": {"num_events": n}})
    client = start(cfg)
    [handle] = start_trainers(cfg, evaluate=True)
    made.append(handle)
    st = ray.get(handle.run.remote(), timeout=240)
    assert st["error"] is None and st["done"]
    assert st["events_read"] == st["events_applied"] == st["applied_offset"] == n
    batches = -(-n // cfg.trainer.batch_size)
    assert st["batches"] == batches
    # One push per pass of each batch, seen by every shard.
    assert client.versions() == [batches * cfg.trainer.passes] * NUM_SHARDS
    m = st["metrics"]
    assert m["eval_events"] + m["cold_events"] == n
    assert m["eval_events"] > n // 2
    # Popularity is a real baseline here (Zipf items), and the model must beat it.
    assert m["popular_hits"] > 0.05 * m["eval_events"]
    assert m["model_hits"] > m["popular_hits"], m
    users, items = _stream(cfg, n)
    assert len(set(items)) <= cfg.stream.synthetic.num_items
    _check_rows_and_history(cfg, client, users, items)


def test_two_trainers_partition_users(deploy, tmp_path):
    start, _ = deploy
    n = 5000
    cfg = _cfg(tmp_path, {"stream": {"num_events": n}, "trainer": {"num_workers": 2}})
    client = start(cfg)
    users, items = _stream(cfg, n)
    per_user = collections.defaultdict(list)
    for u, i in zip(users, items):
        per_user[u].append(i)
    uniq_users = list(per_user)
    # In-process Trainer objects (the actor wraps the same class) save two actor start-ups.
    # After trainer 0 alone, each user's history on the PS is all or nothing: no user's
    # events are split between the trainers.
    first = Trainer(0, cfg).run()
    seen0 = client.seen(uniq_users)
    mine = [u for u, h in zip(uniq_users, seen0) if h]
    assert all(h in ([], id_keys(per_user[u]).tolist()) for u, h in zip(uniq_users, seen0))
    assert 0 < len(mine) < len(uniq_users)
    assert first["events_applied"] == sum(len(per_user[u]) for u in mine)
    second = Trainer(1, cfg).run()
    seen1 = client.seen(uniq_users)
    assert [u for u, h0, h1 in zip(uniq_users, seen0, seen1) if h1 != h0] == [u for u in uniq_users if u not in set(mine)]
    stats = [first, second]
    assert all(s["error"] is None and s["done"] for s in stats)
    assert [s["events_read"] for s in stats] == [n, n]
    assert first["events_applied"] + second["events_applied"] == n
    _check_rows_and_history(cfg, client, users, items)
    batches = -(-n // cfg.trainer.batch_size)
    assert client.versions() == [2 * batches * cfg.trainer.passes] * NUM_SHARDS


def test_movielens_slice_trains_and_every_id_gets_a_row(deploy, tmp_path, movielens_ratings):
    start, _ = deploy
    n = 5000
    cfg = _cfg(tmp_path, {"stream": {"kind": "movielens", "path": str(movielens_ratings), "num_events": n}})
    client = start(cfg)
    st = Trainer(0, cfg).run()
    assert st["error"] is None and st["done"]
    # The source replays ratings in timestamp order, ties in file order. By the default
    # model.ratings, a rating >= 4 is a positive of confidence rating/5 and a lower one
    # teaches nothing: it makes no row and counts as no interaction.
    with open(movielens_ratings, newline="") as f:
        rows = sorted(list(csv.reader(f))[1:], key=lambda r: float(r[3]))[:n]
    liked = [r for r in rows if float(r[2]) >= 4.0]
    assert 0 < len(liked) < n
    # Every event is applied (processed for good), a low rating by teaching nothing.
    assert st["events_read"] == st["events_applied"] == n and st["quarantined"] == 0
    users, items = [int(r[0]) for r in liked], [int(r[1]) for r in liked]
    _check_rows_and_history(cfg, client, users, items, [float(r[2]) / 5.0 for r in liked])
    assert np.isfinite(client.pull("user", list(set(users)))).all()
    assert np.isfinite(client.pull("item", list(set(items)))).all()


def test_first_seen_preserves_first_seen_order():
    for ids in ([5, 3, 5, 9, 3, 1], ["b", 5, "5", "b", 3, 5, "a"], ["z", "y", "z"], [2**62, -1, 2**62]):
        keys = id_keys(ids)
        uniq, inv = first_seen(keys)
        assert uniq.tolist() == list(dict.fromkeys(keys.tolist()))
        assert [uniq[j] for j in inv.tolist()] == keys.tolist()
        assert inv.dtype == np.int64 and len(inv) == len(ids)
    uniq, inv = first_seen(np.empty(0, np.uint64))
    assert len(uniq) == 0 and len(inv) == 0
