"""RowCache delta sync against real shard actors, and the Ranker on top of it.

One deployment serves the module; each test owns a group of tables so row counts and
rankings are exact: ``item``/``item_bias``/``item_pop`` for sync, ``r_*`` for the
Ranker, ``p_*`` for its recent-popularity prior, ``t_*`` (with a TTL) for expiry, ``s_*``
(with a TTL) for slot reuse and ``g_item`` for growth. The tests of a restarted shard and of
reader names run on in-process shards (``tests.ps.test_lifecycle``), no Ray.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray

from ps.cache import Coverage, RowCache
from ps.client import start_shards
from ps.config import PSConfig
from workers.config import ModelConfig
from ps.ids import as_id_array
from ps.shard import PSShard, PushId
from tests.ps.test_lifecycle import _assert_mirror_exact, _InProcess
from tests.ps.test_lifecycle import _cfg as _lc_cfg
from tests.ps.test_lifecycle import _keys as _lc_keys
from workers.model import top_k
from workers.ranking import Ranker

DIM = 8
NUM_SHARDS = 2
ITEM_TABLES = ["item", "item_bias", "item_pop"]
LC_TABLES = ["item", "item_bias", "item_pop"]  # of tests.ps.test_lifecycle's in-process shards
R_MODEL = ModelConfig(item_table="r_item", item_bias_table="r_bias", popularity_table="r_pop", recent_table=None, context_table=None)
T_MODEL = ModelConfig(item_table="t_item", item_bias_table="t_bias", popularity_table="t_pop", recent_table=None, context_table=None)
P_MODEL = ModelConfig(item_table="p_item", item_bias_table="p_bias", popularity_table="p_pop", recent_table="p_recent", recent_weight=2.0,
                      context_table=None)
TTL_S = 3600.0  # long enough that pushes never expire anything on their own during the test


def _tables() -> dict:
    zeros = {"dim": 1, "init": "zeros"}
    counter = {**zeros, "optimizer": {"kind": "accumulate", "lr": 1.0}}
    return {
        "user": {"dim": DIM},
        "item": {"dim": DIM},
        "r_item": {"dim": DIM},
        "r_bias": {**zeros, "follows": "r_item"},
        "r_pop": {**counter, "follows": "r_item"},
        "t_item": {"dim": DIM, "ttl_s": TTL_S},
        "t_bias": {**zeros, "follows": "t_item"},
        "t_pop": {**counter, "follows": "t_item"},
        "p_item": {"dim": DIM},
        "p_bias": {**zeros, "follows": "p_item"},
        "p_pop": {**counter, "follows": "p_item"},
        "p_recent": {"dim": 2, "init": "zeros", "optimizer": {"kind": "decayed_count"}, "follows": "p_item"},
        "s_item": {"dim": DIM, "ttl_s": TTL_S},
        "s_bias": {**zeros, "follows": "s_item"},
        "g_item": {"dim": DIM},
    }


@pytest.fixture(scope="module")
def client(ray_cluster):
    # The PS's own config: one PS holds the tables of several models here, which a deployment's
    # config (one model) refuses.
    cfg = PSConfig.model_validate({"num_shards": NUM_SHARDS, "num_buckets": 32, "shard_num_cpus": 0.1, "tables": _tables()})
    c = start_shards(cfg, namespace=f"test-cache-{uuid.uuid4().hex[:8]}")
    yield c
    for h in c.shards:
        ray.kill(h)


class _Pusher:
    """Pushes with one producer and increasing seqs."""

    def __init__(self, client, name: str):
        self.client, self.name, self.seq = client, name, 0

    def __call__(self, updates, recent=None):
        out = self.client.push_many(updates, PushId(self.name, self.seq), recent)
        self.seq += 1
        assert all(applied for _, applied in out)
        return out


def _grads(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _assert_mirrors(cache: RowCache, client, tables: list[str], ids: list) -> None:
    """The cache holds exactly the PS's current rows of ``ids`` and marks them valid."""
    slots = cache.slots_of(ids)
    assert (slots >= 0).all()
    assert cache.valid()[slots].all()
    truth = client.pull_many({t: ids for t in tables})
    for t in tables:
        rows, found = truth[t]
        np.testing.assert_array_equal(cache.matrix(t)[slots][found], rows[found], err_msg=t)
        np.testing.assert_array_equal(cache.matrix(t)[slots][~found], 0, err_msg=t)


def _ps_item_ids(client, table: str) -> set:
    """Every ID that currently has a row in ``table`` (from a full delta)."""
    out = set()
    for d in client.delta([table], [-1] * client.num_shards):
        out.update(d.tables[table].ids.tolist())
    return out


# --------------------------------------------------------------------------- sync


def test_sync_mirrors_all_rows_then_transfers_only_changes(client):
    push = _Pusher(client, "sync")
    ids = [1, 2, "a", "b", 300, "300", -5, "c", 42, "d"]
    push({"item": (ids, _grads(len(ids))), "item_bias": (ids[:6], _grads(6, 1)), "item_pop": (ids[:4], np.ones((4, 1), np.float32))})

    cache = RowCache(client, ITEM_TABLES)
    assert cache.model_version == 0 and len(cache) == 0
    n = cache.sync()
    assert n == len(ids) + 6 + 4  # rows per table, every table's rows once
    assert len(cache) == len(ids)
    assert set(cache.ids()[cache.valid()].tolist()) == set(ids) == _ps_item_ids(client, "item")
    _assert_mirrors(cache, client, ITEM_TABLES, ids)
    assert cache.model_version == sum(client.versions())
    assert cache.sync() == 0  # nothing changed

    # Several pushes touching few rows: the sync moves those rows, not the table.
    push({"item": ([2, "a", 2], _grads(3, seed=1))})
    push({"item": (["a"], _grads(1, seed=2)), "item_bias": (["300"], _grads(1, 1, seed=3))})
    push({"item_pop": ([42, 42, 42], np.ones((3, 1), np.float32))})
    push({})
    stale_version = cache.model_version
    assert stale_version < sum(client.versions())
    assert cache.sync() == 2 + 1 + 1  # item {2, "a"}, item_bias {"300"}, item_pop {42}
    assert cache.model_version == sum(client.versions()) == stale_version + 4 * NUM_SHARDS
    _assert_mirrors(cache, client, ITEM_TABLES, ids)
    assert cache.matrix("item_pop")[cache.slots_of([42])[0], 0] == 3.0

    # A pull creates nothing; rows a push creates arrive with every table that follows them.
    client.pull_many({"item": ["new1", "new2", 1]}, initial=True)
    assert cache.sync() == 0
    push({"item": (["new1", "new2"], np.zeros((2, DIM), np.float32)), "item_bias": (["new1"], np.zeros((1, 1), np.float32))})
    assert cache.sync() == 3
    _assert_mirrors(cache, client, ITEM_TABLES, ids + ["new1", "new2"])
    np.testing.assert_array_equal(cache.matrix("item_bias")[cache.slots_of(["new2"])], 0)
    assert cache.rows_synced == n + 4 + 3
    assert cache.slots_of(["never", "1"]).tolist() == [-1, -1]
    assert len(cache) == len(ids) + 2


def test_coverage_is_what_the_mirror_had_synced_then(client):
    # A replica pairs each ranking snapshot with the coverage taken when it was built: a
    # later sync moves the mirror on, and must not make an old snapshot look newer.
    push = _Pusher(client, "cover")
    cache = RowCache(client, ITEM_TABLES)
    before = cache.coverage()
    assert not before.synced and not before.covers(None) and not cache.coverage().covers(None)
    push({"item": ([900, 901], _grads(2))})
    cache.sync()
    first = cache.coverage()
    assert first.covers(None) and first.covers(("cover", 0)) and not first.covers(("cover", 1))
    push({"item": ([902], _grads(1))})
    assert not cache.coverage().covers(("cover", 1))
    cache.sync()
    assert cache.coverage().covers(("cover", 1))
    assert not first.covers(("cover", 1)) and not before.covers(("cover", 0))  # frozen
    assert not cache.coverage().covers(("other-producer", 0))


def test_two_caches_synced_at_different_times_agree(client):
    push = _Pusher(client, "agree")
    early = RowCache(client, ITEM_TABLES)
    early.sync()
    for k in range(3):
        push({"item": ([f"g{k}", 1, "a"], _grads(3, seed=10 + k))})
        early.sync()
    late = RowCache(client, ITEM_TABLES)
    late.sync()
    assert early.model_version == late.model_version
    ids = sorted(_ps_item_ids(client, "item"), key=str)
    for t in ITEM_TABLES:
        np.testing.assert_array_equal(early.matrix(t)[early.slots_of(ids)], late.matrix(t)[late.slots_of(ids)])
    assert len(early) == len(late) == len(ids)


def test_sync_if_older_syncs_only_when_stale(client):
    cache = RowCache(client, ITEM_TABLES)
    cache.sync()
    push = _Pusher(client, "older")
    push({"item": (["older"], _grads(1))})
    assert not cache.sync_if_older(3600.0)
    assert cache.slots_of(["older"]).tolist() == [-1]
    assert cache.sync_if_older(0.0)
    assert cache.valid()[cache.slots_of(["older"])].all()


def test_sync_if_older_always_syncs_a_never_synced_cache(client):
    cache = RowCache(client, ITEM_TABLES)
    assert cache.sync_if_older(1e9)
    assert len(cache) > 0


# --------------------------------------------------------------------------- expiry


def test_expired_rows_become_invalid_and_leave_rankings(client):
    push = _Pusher(client, "ttl")
    old, new = ["o1", 7, "o3"], ["n1", 8]
    push({"t_item": (old, _grads(3)), "t_bias": (old, _grads(3, 1)), "t_pop": (old, np.full((3, 1), 100.0, np.float32))})
    cut = time.time()
    time.sleep(0.05)
    push({"t_item": (new, _grads(2)), "t_bias": (new, _grads(2, 1)), "t_pop": (new, np.ones((2, 1), np.float32))})
    tables = ["t_item", "t_bias", "t_pop"]
    cache = RowCache(client, tables)
    cache.sync()
    assert len(cache) == 5
    ranker = Ranker(cache, T_MODEL)
    assert set(ranker.popular([], 3).item_ids) == set(old)  # the old items lead by count before expiry

    # Rows last pushed before ``cut`` are TTL_S old at ``cut + TTL_S``; the new ones are not.
    removed = ray.get([h.expire.remote(cut + TTL_S) for h in client.shards])
    assert sum(r["t_item"] for r in removed) == 3
    assert cache.sync() == 0
    assert len(cache) == 2
    assert cache.slots_of(old).tolist() == [-1] * 3  # forgotten: their slots are free for new items
    assert cache.valid()[cache.slots_of(new)].all()
    # The Ranker never offers or scores an expired item.
    pop = ranker.popular([], 10)
    assert pop.item_ids == ["n1", 8] or pop.item_ids == [8, "n1"]
    u = np.ones(DIM, np.float32)
    ranked = ranker.rank_many(u[None], np.array([True]), [[]], 10)[0]
    assert set(ranked.item_ids) == set(new)
    scores, fallback = ranker.score_items(u, ["o1", "n1", 7])
    assert scores[0] is None and scores[2] is None and scores[1] is not None and fallback is None
    # A fresh cache never sees them either.
    fresh = RowCache(client, tables)
    fresh.sync()
    assert set(fresh.ids()[fresh.valid()].tolist()) == set(new)


def test_expired_then_recreated_row_is_valid_after_sync(client):
    push = _Pusher(client, "recreate")
    tables = ["t_item", "t_bias", "t_pop"]
    x = "phoenix"
    push({"t_item": ([x], _grads(1)), "t_pop": ([x], np.ones((1, 1), np.float32))})
    cache = RowCache(client, tables)
    cache.sync()
    ray.get([h.expire.remote(time.time() + 2 * TTL_S) for h in client.shards])
    cache.sync()
    assert cache.slots_of([x]).tolist() == [-1]
    push({"t_item": ([x], _grads(1, seed=5)), "t_pop": ([x], np.ones((1, 1), np.float32))})
    cache.sync()
    fresh = RowCache(client, tables)
    fresh.sync()
    assert fresh.valid()[fresh.slots_of([x])].all()
    assert cache.valid()[cache.slots_of([x])].all()
    _assert_mirrors(cache, client, tables, [x])


# --------------------------------------------------------------------------- Ranker


COUNTS = {"a": 5.0, 7: 9.0, "b": 8.0, 3: 1.0, "c": 2.0, "7": 4.0}


@pytest.fixture(scope="module")
def ranker(client):
    push = _Pusher(client, "rank")
    ids = list(COUNTS)
    push({"r_item": (ids, _grads(len(ids), seed=20)), "r_bias": (ids, _grads(len(ids), 1, seed=21))})
    # Counts arrive over several pushes, with duplicates inside a push.
    for k in range(int(max(COUNTS.values()))):
        have = [x for x in ids if COUNTS[x] > k]
        push({"r_pop": (have + have[:1], np.array([[1.0]] * len(have) + [[0.0]], np.float32))})
    cache = RowCache(client, [R_MODEL.item_table, R_MODEL.item_bias_table, R_MODEL.popularity_table])
    cache.sync()
    return Ranker(cache, R_MODEL)


def test_popular_ranks_by_count_and_excludes_seen(ranker):
    p = ranker.popular([], 3)
    assert (p.item_ids, p.scores, p.fallback) == ([7, "b", "a"], [9.0, 8.0, 5.0], "popular")
    p = ranker.popular([7, "a", "unknown", 12345], 3)
    assert p.item_ids == ["b", "7", "c"]
    p = ranker.popular(["7"], 100)  # "7" is not 7
    assert p.item_ids == [7, "b", "a", "c", 3]
    assert ranker.popular(list(COUNTS), 5).item_ids == []


def test_rank_many_scores_every_item_and_falls_back_for_unknown_users(ranker, client):
    cache = ranker.cache
    ids = list(COUNTS)
    rows = client.pull_many({"r_item": ids, "r_bias": ids})
    items, bias = rows["r_item"][0].astype(np.float64), rows["r_bias"][0][:, 0].astype(np.float64)
    users = np.random.default_rng(3).normal(size=(2, DIM)).astype(np.float32)
    found = np.array([True, False, True])
    vecs = np.stack([users[0], np.zeros(DIM, np.float32), users[1]])
    seen = [["b"], [7], []]
    out = ranker.rank_many(vecs, found, seen, 4)
    assert len(out) == 3
    for r, u, s in ((out[0], users[0], seen[0]), (out[2], users[1], seen[2])):
        want = items @ u.astype(np.float64) + bias
        order = [j for j in np.argsort(-want, kind="stable") if ids[j] not in s][:4]
        assert r.fallback is None
        assert r.item_ids == [ids[j] for j in order]
        np.testing.assert_allclose(r.scores, want[order], rtol=1e-5, atol=1e-6)
        assert r.scores == sorted(r.scores, reverse=True)
    assert out[1].fallback == "popular"
    assert out[1].item_ids == ["b", "a", "7", "c"]
    # The same path through scores_for + top_k on the cache's slots.
    s = ranker.scores_for(users[:1])[0]
    assert s.shape == (len(cache.ids()),)
    idx = top_k(s, 4, cache.slots_of(["b"]))
    assert [cache.ids()[i] for i in idx] == out[0].item_ids


def test_score_items_in_order_with_none_for_unknown(ranker, client):
    u = np.random.default_rng(4).normal(size=DIM).astype(np.float32)
    scores, fallback = ranker.score_items(u, ["b", "nope", 7, "3"])
    assert fallback is None and scores[1] is None and scores[3] is None
    rows = client.pull_many({"r_item": ["b", 7], "r_bias": ["b", 7]})
    want = rows["r_item"][0] @ u + rows["r_bias"][0][:, 0]
    np.testing.assert_allclose([scores[0], scores[2]], want, rtol=1e-5, atol=1e-6)
    counts, fallback = ranker.score_items(None, [3, "zzz", "a"])
    assert (counts, fallback) == ([1.0, None, 5.0], "popular")
    assert ranker.score_items(u, []) == ([], None)
    assert as_id_array(ranker.cache.ids()).dtype == object  # mixed IDs kept as given


# --------------------------------------------------------------------------- recent-popularity prior


def test_recent_popularity_decays_ranks_the_fallback_and_adds_to_scores(client):
    push = _Pusher(client, "recent")
    ids = ["old", "mid", "new", 99]
    push({"p_item": (ids, _grads(4, seed=30)), "p_bias": (ids, _grads(4, 1, seed=31))})
    # All-time counts favour "old"; the clock (in half-lives) says its interactions are 4 half-lives old.
    push({"p_pop": (["old", "mid", "new"], np.array([[40.0], [10.0], [6.0]], np.float32)),
          "p_recent": (["old", "mid"], np.array([[40.0, 1.0], [10.0, 4.0]], np.float32))})
    # Two pushes for "new" in one request are merged at the later clock, not summed as rows.
    push({"p_recent": (["new", "new"], np.array([[4.0, 4.0], [4.0, 5.0]], np.float32))})
    cache = RowCache(client, P_MODEL.item_tables())
    cache.sync()
    ranker = Ranker(cache, P_MODEL)
    recent = dict(zip(cache.ids().tolist(), ranker.recent_counts().tolist()))
    # Now is clock 5: old 40/2**4, mid 10/2, new 4/2 + 4; 99 was never counted.
    assert recent == pytest.approx({"old": 2.5, "mid": 5.0, "new": 6.0, 99: 0.0})
    p = ranker.popular([], 4)
    assert p.item_ids == ["new", "mid", "old", 99] and p.fallback == "popular"
    assert p.scores == pytest.approx([6.0, 5.0, 2.5, 0.0])
    # The counts-only view of the same cache still ranks by all-time counts.
    assert Ranker(cache, P_MODEL.model_copy(update={"recent_table": None})).popular([], 2).item_ids == ["old", "mid"]

    u = np.random.default_rng(5).normal(size=DIM).astype(np.float32)
    rows = client.pull_many({"p_item": ids, "p_bias": ids})
    prior = 2.0 * np.log1p(np.array([2.5, 5.0, 6.0, 0.0]))
    want = rows["p_item"][0] @ u + rows["p_bias"][0][:, 0] + prior
    got = ranker.rank_many(u[None], np.array([True]), [[]], 4)[0]
    order = np.argsort(-want, kind="stable")
    assert got.item_ids == [ids[j] for j in order]
    np.testing.assert_allclose(got.scores, want[order], rtol=1e-5, atol=1e-5)
    scores, _ = ranker.score_items(u, ids)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    # Without a weight the prior is gone from the scores but still ranks the fallback.
    plain = Ranker(cache, P_MODEL.model_copy(update={"recent_weight": 0.0}))
    np.testing.assert_allclose(plain.score_items(u, ids)[0], want - prior, rtol=1e-5, atol=1e-5)
    assert plain.popular([], 1).item_ids == ["new"]


# --------------------------------------------------------------------------- slots, growth, coverage


def test_coverage_of_several_pushes_needs_every_one_and_a_synced_mirror():
    # A row a restarted shard loaded names every push its snapshot held: the mirror covers it
    # only when it covers each of them on every shard, and an empty tuple only once synced.
    cov = Coverage(({"a": 3, "b": 0}, {"a": 3, "b": 1}), synced=True)
    assert cov.covers((("a", 3), ("b", 0)))
    assert not cov.covers((("a", 3), ("b", 1)))  # shard 0 has not applied b's push 1
    assert not cov.covers((("a", 2), ("c", 0)))  # nothing of producer c
    assert cov.covers(())
    assert not Coverage(({"a": 3},), synced=False).covers(())


def test_a_removed_ids_slot_is_reused_only_from_the_next_sync_and_starts_empty(client):
    # x is removed and y added in one sync: y must not take x's slot in that sync (a ranking
    # snapshot built before it may still read the slot as x's); the next new ID does, and reads
    # zeros in a follower it has no row in, not x's old row.
    push = _Pusher(client, "reuse")
    tables = ["s_item", "s_bias"]
    push({"s_item": (["x"], _grads(1)), "s_bias": (["x"], _grads(1, 1, seed=1))})
    cache = RowCache(client, tables)
    cache.sync()
    sx = int(cache.slots_of(["x"])[0])
    assert cache.matrix("s_bias")[sx, 0] != 0
    removed = ray.get([h.expire.remote(time.time() + 2 * TTL_S) for h in client.shards])
    assert sum(r["s_item"] for r in removed) == 1
    push({"s_item": (["y"], _grads(1, seed=2))})
    cache.sync()
    assert cache.slots_of(["x"]).tolist() == [-1]
    sy = int(cache.slots_of(["y"])[0])
    assert sy != sx and cache.ids()[sx] == "x" and not cache.valid()[sx]
    push({"s_item": (["z"], _grads(1, seed=3))})  # z: a leader row only
    cache.sync()
    assert cache.slots_of(["z"]).tolist() == [sx]
    assert cache.ids()[sx] == "z" and cache.valid()[sx]
    np.testing.assert_array_equal(cache.matrix("s_bias")[sx], 0)
    assert len(cache.ids()) == 2 and len(cache) == 2
    _assert_mirrors(cache, client, tables, ["y", "z"])


def test_a_first_sync_of_more_rows_than_the_initial_capacity_mirrors_them_all(client):
    push = _Pusher(client, "grow")
    ids = list(range(5000, 8000))  # more than twice the 1024 slots a mirror starts with
    push({"g_item": (ids, _grads(len(ids), seed=40))})
    cache = RowCache(client, ["g_item"])
    assert cache.sync() == len(ids)
    assert len(cache) == len(ids)
    _assert_mirrors(cache, client, ["g_item"], ids)
    more = [f"g{j}" for j in range(3000)]
    push({"g_item": (more, _grads(len(more), seed=41))})
    assert cache.sync() == len(more)
    _assert_mirrors(cache, client, ["g_item"], ids + more)


# ----------------------------------------------------- in-process shards (tests.ps.test_lifecycle)


def test_a_mirror_resyncs_only_the_shard_that_restarted(tmp_path):
    # Shard 1 restarts empty and catches up past the mirror's version; shard 0 answers its
    # usual delta. The mirror must drop shard 1's rows only: shard 0 sends none of its old ones.
    ps = _InProcess(_lc_cfg(num_shards=2))
    cache = RowCache(ps, LC_TABLES, reader="r")
    ps.push(list(range(40)))
    cache.sync()
    on_1 = ps.plan.shards_of_keys(np.asarray(sorted(_lc_keys(range(40))), np.uint64)) == 1
    assert 0 < on_1.sum() < 40  # both shards hold rows the mirror has
    ps.shards[1] = PSShard(1, ps.plan, ps.cfg)
    for _ in range(3):
        ps.push([100, 101, 102, 103])
    cache.sync()
    assert cache.full_resyncs == 1
    _assert_mirror_exact(cache, ps)


def test_mirrors_without_a_reader_name_each_keep_their_own_tombstones():
    # The default reader name is one per mirror: a fast mirror's syncs must not prune the
    # tombstones a slower one still needs (which would cost it a full resync).
    ps = _InProcess(_lc_cfg(item={"max_rows": 10}, num_shards=2))
    fast, slow = RowCache(ps, LC_TABLES), RowCache(ps, LC_TABLES)
    assert fast.reader != slow.reader
    nxt = 0
    for step in range(8):
        ps.push(list(range(nxt, nxt + 5)))
        nxt += 5
        fast.sync()
        if step == 1:
            slow.sync()
    slow.sync()
    assert (fast.full_resyncs, slow.full_resyncs) == (0, 0)
    _assert_mirror_exact(slow, ps)
