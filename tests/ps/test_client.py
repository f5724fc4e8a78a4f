"""PSClient against real shard actors: routing, caller order, placement, exactly-once
pushes, versions, users' recent items routing and reconnecting by namespace."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray
from ray.exceptions import GetTimeoutError

from ps.cache import RowCache
from ps.client import PSClient, start_shards
from ps.config import PSConfig
from ps.ids import as_id_array, keyed
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from tests.ps.test_shard import K, pull, push

DIM = 8
NUM_SHARDS = 3


def _cfg(**ps) -> PSConfig:
    # The PS's own config: "place" is a table no model role uses, which a deployment's config refuses.
    base = {
        "num_shards": NUM_SHARDS,
        "num_buckets": 64,
        "shard_num_cpus": 0.1,
        "optimizer": {"kind": "adagrad", "lr": 0.2},
        # "place" is only touched by the placement test, so its row counts are exact.
        "tables": {"user": {"dim": DIM}, "item": {"dim": DIM}, "place": {"dim": 2}},
    }
    return PSConfig.model_validate({**base, **ps})


@pytest.fixture(scope="module")
def deployment(ray_cluster):
    """Shards in a private namespace, shared by the module (actor start-up is seconds each):
    ``(cfg, namespace, client)``. Tests use their own IDs and producers and check versions
    relative to what they found."""
    cfg = _cfg()
    ns = f"test-client-{uuid.uuid4().hex[:8]}"
    client = start_shards(cfg, namespace=ns)
    yield cfg, ns, client
    for h in client.shards:
        ray.kill(h)


def _local(cfg: PSConfig) -> PSShard:
    """A single in-process shard holding every ID: the truth a sharded deployment must match."""
    return PSShard(0, ShardingPlan.uniform(cfg.num_buckets, 1), cfg)


def _mixed_ids(n: int, seed: int) -> list:
    """``n`` distinct IDs, half ints and half strings, including an int and its decimal string."""
    rng = np.random.default_rng(seed)
    ints = [int(x) for x in rng.choice(2**40, size=n // 2, replace=False) - 2**39]
    strs = [f"s{seed}-{j}" for j in range(n - n // 2 - 1)] + [str(ints[0])]
    return ints + strs


def _shuffled_with_dups(ids: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = ids + [ids[j] for j in rng.integers(0, len(ids), size=len(ids) // 3)]
    return [out[j] for j in rng.permutation(len(out))]


def _create(client, table: str, ids: list, producer: str) -> None:
    """Give ``ids`` rows in ``table`` at their initial value (a zero gradient leaves Adagrad rows in place)."""
    client.push_many({table: (ids, np.zeros((len(ids), client.dims[table]), np.float32))}, PushId(producer, 0))


def test_pull_returns_rows_in_caller_order(deployment):
    cfg, _, client = deployment
    ids = _mixed_ids(60, seed=1)
    _create(client, "user", ids, "order")
    req = _shuffled_with_dups(ids, seed=2)
    rows = client.pull("user", req)
    assert rows.shape == (len(req), DIM) and rows.dtype == np.float32
    local = _local(cfg)
    push(local, PushId("order", 0), {"user": (ids, np.zeros((len(ids), DIM), np.float32))})
    np.testing.assert_array_equal(rows, pull(local, {"user": req}, False)["user"][0])
    # Per-shard truth: ask each owning shard directly for each ID.
    owner = client.plan.shards_of(as_id_array(req))
    for x, s, r in zip(req, owner.tolist(), rows):
        got, found = ray.get(client.shards[s].pull.remote({"user": K([x])}, False))["user"]
        assert found.all()
        np.testing.assert_array_equal(got[0], r)
    # Several tables in one call, each in its own order.
    many = client.pull_many({"user": req[::-1], "item_bias": req[:7]})
    np.testing.assert_array_equal(many["user"][0], rows[::-1])
    assert many["user"][1].all() and not many["item_bias"][1].any()
    np.testing.assert_array_equal(many["item_bias"][0], np.zeros((7, 1), np.float32))
    # Keyed IDs (hashed where they entered) route the same way.
    np.testing.assert_array_equal(client.pull("user", keyed(req)), rows)
    assert client.pull("user", []).shape == (0, DIM)


def test_rows_live_on_the_shard_the_plan_names(deployment):
    _, _, client = deployment
    ids = _mixed_ids(90, seed=3)
    client.push_many({"place": (_shuffled_with_dups(ids, seed=4), np.zeros((120, 2), np.float32))}, PushId("place", 0))
    owner = client.plan.shards_of(as_id_array(ids))
    counts = np.bincount(owner, minlength=NUM_SHARDS)
    assert (counts > 0).all(), "test IDs should reach every shard"
    assert [st["rows"]["place"] for st in client.stats()] == counts.tolist()
    for s in range(NUM_SHARDS):
        _, found = ray.get(client.shards[s].pull.remote({"place": K(ids)}, False))["place"]
        assert found.tolist() == (owner == s).tolist()


def test_pulls_read_zeros_or_initial_rows_and_store_nothing(deployment):
    _, _, client = deployment
    before = sum(st["rows"]["user"] for st in client.stats())
    client.pull("user", [101, "nc-a"], initial=True)
    assert sum(st["rows"]["user"] for st in client.stats()) == before
    _create(client, "user", [101, "nc-a"], "nc")
    got = client.pull_many({"user": ["nc-b", 101, 102, "nc-a"]})["user"]
    assert got[1].tolist() == [False, True, False, True]
    np.testing.assert_array_equal(got[0][[0, 2]], 0)
    init = client.pull_many({"user": ["nc-b"]}, initial=True)["user"]
    assert not init[1][0] and np.abs(init[0]).max() > 0  # the row a push would create
    assert sum(st["rows"]["user"] for st in client.stats()) == before + 2


def test_pushes_match_a_single_shard_and_apply_once(deployment):
    cfg, _, client = deployment
    local = _local(cfg)
    ids = _mixed_ids(40, seed=5)
    rng = np.random.default_rng(6)
    v0 = np.array(client.versions())
    for seq in range(4):
        req = _shuffled_with_dups(ids[seq * 5 : seq * 5 + 25], seed=seq)
        g = rng.normal(size=(len(req), DIM)).astype(np.float32)
        pop = np.ones((len(req), 1), np.float32)
        updates = {"user": (req, g), "item_pop": (req, pop)}
        replies = client.push_many(updates, PushId("w", seq))
        assert replies == [(int(v) + seq + 1, True) for v in v0]
        push(local, PushId("w", seq), updates)
    np.testing.assert_allclose(client.pull("user", ids), pull(local, {"user": ids}, False)["user"][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(client.pull("item_pop", ids), pull(local, {"item_pop": ids}, False)["item_pop"][0])
    # The same push id again: no shard applies it, nothing moves.
    before_user, before_pop = client.pull("user", ids), client.pull("item_pop", ids)
    dups = np.array([st["duplicate_pushes"] for st in client.stats()])
    ones = np.ones((len(ids), DIM), np.float32)
    again = client.push_many({"user": (ids, ones), "item_pop": (ids, ones[:, :1])}, PushId("w", 3))
    assert again == [(int(v) + 4, False) for v in v0]
    np.testing.assert_array_equal(client.pull("user", ids), before_user)
    np.testing.assert_array_equal(client.pull("item_pop", ids), before_pop)
    assert client.versions() == (v0 + 4).tolist()
    assert [st["duplicate_pushes"] for st in client.stats()] == (dups + 1).tolist()


def test_versions_increase_on_every_shard_per_push(deployment):
    _, _, client = deployment
    one = "only-me"
    target = int(client.plan.shards_of([one])[0])
    v0 = np.array(client.versions())
    rows0 = np.array([st["rows"]["item"] for st in client.stats()])
    assert client.push("item", [one], np.ones((1, DIM), np.float32), PushId("v-p", 0)) == [(int(v) + 1, True) for v in v0]
    assert client.versions() == (v0 + 1).tolist()
    rows1 = np.array([st["rows"]["item"] for st in client.stats()])
    assert (rows1 - rows0).tolist() == [int(s == target) for s in range(NUM_SHARDS)]
    client.push_many({}, PushId("v-p", 1))
    client.push_many({}, PushId("v-q", 0))
    assert client.versions() == (v0 + 3).tolist()
    assert [st["version"] for st in client.stats()] == (v0 + 3).tolist()
    for marks in ray.get([h.high_water_marks.remote() for h in client.shards]):
        assert (marks["v-p"], marks["v-q"]) == (1, 0)


def test_bad_gradient_shape_is_rejected_before_any_shard_sees_it(deployment):
    _, _, client = deployment
    v0 = client.versions()
    with pytest.raises(ValueError, match="item"):
        client.push("item", [1, 2, 3], np.ones((3, DIM + 1), np.float32), PushId("bad", 0))
    with pytest.raises(KeyError, match="nope"):
        client.push("nope", [1], np.ones((1, DIM), np.float32), PushId("bad", 0))
    assert client.versions() == v0
    # The push id was not consumed anywhere.
    assert client.push("item", [1], np.ones((1, DIM), np.float32), PushId("bad", 0)) == [(v + 1, True) for v in v0]


def test_non_finite_push_is_applied_by_no_shard(deployment):
    _, _, client = deployment
    ids = _mixed_ids(30, seed=9)
    assert len(set(client.plan.shards_of(as_id_array(ids)).tolist())) == NUM_SHARDS
    v0 = client.versions()
    g = np.ones((len(ids), DIM), np.float32)
    g[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        client.push("item", ids, g, PushId("nan", 0))
    assert client.versions() == v0


@pytest.mark.parametrize("extra", [-1, 1])
def test_a_create_mask_of_the_wrong_length_is_applied_by_no_shard(deployment, extra):
    # Unchecked, a shard that owned every ID refused it while the others applied the push (their
    # versions apart under one push id), and a short mask split over shards raised IndexError.
    _, _, client = deployment
    ids = _mixed_ids(30, seed=10)
    v0 = client.versions()
    g = np.ones((len(ids), DIM), np.float32)
    with pytest.raises(ValueError, match=r"push to 'item': create shape"):
        client.push_many({"item": (ids, g, np.ones(len(ids) + extra, bool))}, PushId("create", 0))
    assert client.versions() == v0


def test_recent_items_are_routed_by_user(deployment):
    _, _, client = deployment
    users = [31, "31", "bob", 2**50, -7, "carol"]
    hist_u, hist_i = [], []
    for n, u in enumerate(users):
        for j in range(n + 1):
            hist_u.append(u)
            hist_i.append(f"i{n}-{j}" if j % 2 else n * 100 + j)
    client.push_many({}, PushId("hist", 0), recent=(hist_u, hist_i, np.arange(len(hist_u))))
    want = {u: K([i for uu, i in zip(hist_u, hist_i) if uu == u]).tolist() for u in users}
    order = [users[j] for j in np.random.default_rng(0).permutation(len(users))] + ["nobody", users[2]]
    assert client.seen(order) == [want.get(u, []) for u in order]
    owner = client.plan.shards_of(as_id_array(users))
    for s in range(NUM_SHARDS):
        got = [a.tolist() for a in ray.get(client.shards[s].recent_items.remote(K(users)))]
        assert got == [want[u] if o == s else [] for u, o in zip(users, owner.tolist())]
    # The ingest path records the same way, and idempotently by offset.
    assert client.record_recent(["dave", "dave"], ["x", "y"], np.array([7, 8])) == 2
    assert client.record_recent(["dave"], ["x"], np.array([7])) == 0
    assert client.seen(["dave"]) == [K(["x", "y"]).tolist()]


def test_recent_items_of_different_lengths_are_refused_before_anything_is_sent(deployment):
    _, _, client = deployment
    v0 = client.versions()
    # Split by the users' shards, an extra item used to be dropped silently, a missing one an IndexError.
    with pytest.raises(ValueError, match="2 users, 3 items and 2 offsets"):
        client.record_recent(["erin", "frank"], ["x", "y", "z"], np.array([1, 2]))
    with pytest.raises(ValueError, match="2 users, 2 items and 1 offsets"):
        client.push_many({}, PushId("recent-len", 0), recent=(["erin", "frank"], ["x", "y"], np.array([1])))
    assert client.versions() == v0
    assert client.seen(["erin", "frank"]) == [[], []]


def test_connect_by_namespace_sees_the_same_state(deployment):
    cfg, ns, client = deployment
    ids = _mixed_ids(20, seed=7)
    client.push("user", ids, np.ones((len(ids), DIM), np.float32), PushId("conn", 0))
    other = PSClient.connect(ns)
    assert other.num_shards == NUM_SHARDS
    assert other.plan == client.plan
    assert other.dims == {n: t.dim for n, t in cfg.tables.items()}
    np.testing.assert_array_equal(other.pull("user", ids[::-1]), client.pull("user", ids)[::-1])
    v = client.versions()
    assert other.versions() == v
    # Writes through either client are one stream of pushes per producer.
    ones = np.ones((len(ids), DIM), np.float32)
    assert other.push("user", ids, ones, PushId("conn", 0)) == [(x, False) for x in v]
    other.push("user", ids[:1], np.ones((1, DIM), np.float32), PushId("conn", 1))
    np.testing.assert_array_equal(client.pull("user", ids[:1]), other.pull("user", ids[:1]))
    assert other.ping() and client.ping()
    with pytest.raises(ValueError):
        PSClient.connect(f"no-such-{uuid.uuid4().hex[:6]}", timeout_s=5)


def test_pull_after_a_push_reflects_it_even_if_sent_before_it(deployment):
    # Simulates Ray running a retried push behind a later pull: the pull is sent before
    # the push it names, every shard answers "too early", and the client reads again once
    # the push is acknowledged.
    _, _, client = deployment
    ids = [f"after-{i}" for i in range(20)]
    before = client.pull("user", ids, initial=True)
    push_refs: list = []
    pending = client.pull_async({"user": ids}, after=(PushId("after-test", 0), push_refs))
    grads = np.ones((len(ids), client.dims["user"]), np.float32)
    push_refs += client.push_async({"user": (ids, grads)}, PushId("after-test", 0))
    rows, found = pending.result()["user"]
    assert found.all()
    np.testing.assert_array_equal(rows, client.pull("user", ids))
    assert not np.array_equal(rows, before)
    # Without the wait, shards say "not yet" rather than returning stale rows.
    shard = client.shards[0]
    assert ray.get(shard.pull_after.remote({"user": K(["x"])}, True, PushId("never", 0))) is None


def test_push_pull_brings_back_rows_after_the_push_in_caller_order(deployment):
    # One call per shard: rows in the caller's order, equal to a push followed by a pull,
    # and every shard counts the push, including those asked for no rows.
    _, _, client = deployment
    ids = _mixed_ids(40, seed=7)
    owner = client.shard_of(ids)
    assert len(set(owner.tolist())) == NUM_SHARDS  # the push reaches every shard with rows
    want = _shuffled_with_dups([i for i, o in zip(ids, owner) if o == owner[0]], seed=8)  # one shard's IDs only
    versions = client.versions()
    grads = np.full((len(ids), client.dims["user"]), 0.25, np.float32)
    refs, pending = client.push_pull_async({"user": (ids, grads)}, PushId("fused", 0), None, {"user": want})
    rows, found = pending.result()["user"]
    assert [v for v, applied in client.wait(refs)] == [v + 1 for v in versions]
    assert found.all() and rows.shape == (len(want), DIM)
    np.testing.assert_array_equal(rows, client.pull("user", want))


def test_push_pull_reads_ids_without_a_row_as_initial_rows_unless_told_otherwise(deployment):
    # What a trainer computes a first gradient from: an ID the push did not create reads as
    # the row a push would create it with (the default), or as zeros with initial=False.
    _, _, client = deployment
    pushed, other = ["pp-a", "pp-b"], ["pp-untouched"]
    init = client.pull("user", other, initial=True)
    assert np.abs(init).max() > 0
    for seq, initial in enumerate([True, False]):
        refs, pending = client.push_pull_async({"user": (pushed, np.zeros((2, DIM), np.float32))}, PushId("pp-init", seq),
                                               None, {"user": pushed + other}, initial=initial)
        rows, found = pending.result()["user"]
        client.wait(refs)
        assert found.tolist() == [True, True, False]
        np.testing.assert_array_equal(rows[2:], init if initial else 0)


def test_a_bare_id_or_a_bad_push_id_is_refused_before_anything_is_sent(deployment):
    # A bare string was pulled as one ID per character; a tuple push id failed in every shard.
    cfg, _, client = deployment
    versions = client.versions()
    with pytest.raises(ValueError, match="ids: expected a sequence of IDs, got a single str 'abc'"):
        client.pull("item", "abc")
    with pytest.raises(ValueError, match="ids: expected a 1-D sequence"):
        client.pull("item", np.zeros((2, 2), np.int64))
    grads = np.zeros((1, client.dims["item"]), np.float32)
    for bad in [("p", 1), PushId("p", "1"), PushId(7, 1), PushId("p", True), "p:1"]:
        with pytest.raises(ValueError, match=r"push_id: expected ps\.shard\.PushId\(producer: str, seq: int\)"):
            client.push_many({"item": (["i"], grads)}, bad)
    assert client.versions() == versions
    assert client.pull("item", ["abc"]).shape == (1, client.dims["item"])


def test_a_client_needs_one_handle_per_shard_of_its_plan(deployment):
    _, _, client = deployment
    with pytest.raises(ValueError, match=f"2 shard handles for a plan of {NUM_SHARDS} shards"):
        PSClient(client.shards[:2], client.plan, client.dims)


def test_create_is_the_old_name_of_initial(deployment):
    _, _, client = deployment
    x = ["alias-x", 123456789]
    want = client.pull("user", x, initial=True)
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(client.pull("user", x, create=True), want)
    np.testing.assert_array_equal(client.pull("user", x, create=False), 0)


def test_tables_of_one_pull_owned_by_different_shards_each_keep_their_rows(deployment):
    # A table whose IDs one shard owns takes that shard's reply as it is: it must be the
    # reply of that shard, whichever place it has among the shards asked.
    _, _, client = deployment
    ids = _mixed_ids(40, seed=14)
    _create(client, "user", ids, "whole-u")
    _create(client, "item", ids, "whole-i")
    owner = client.shard_of(ids)
    users = client.pull("user", ids)
    for s in range(NUM_SHARDS):
        only = [x for x, o in zip(ids, owner.tolist()) if o == s][::-1]
        assert only
        got = client.pull_many({"user": ids, "item": only})
        np.testing.assert_array_equal(got["user"][0], users)
        np.testing.assert_array_equal(got["item"][0], client.pull("item", only))
        assert got["item"][1].all() and got["user"][1].all()


def test_present_and_rank_context_ask_the_shard_that_owns_each_id(deployment):
    _, _, client = deployment
    ids = _mixed_ids(30, seed=11)
    have = ids[::2]
    assert set(client.shard_of(have).tolist()) == set(range(NUM_SHARDS))
    _create(client, "user", have, "present")
    req = _shuffled_with_dups(ids, seed=12)
    found = client.pull_many({"user": req})["user"][1]
    assert found.any() and not found.all()
    np.testing.assert_array_equal(client.present("user", req), found)
    assert client.present("user", []).shape == (0,)
    rows = client.pull("user", have)
    for x, row in zip(have, rows):
        ctx = client.rank_context("user", x, recent=False)
        assert ctx.row is not None, x
        np.testing.assert_array_equal(ctx.row, row)
    np.testing.assert_array_equal(client.rank_context("user", keyed([have[1]]), recent=False).row, rows[1])
    assert client.rank_context("user", ids[1], recent=False).row is None


def test_only_entries_marked_create_make_rows_yet_every_entry_trains_an_existing_row(deployment):
    _, _, client = deployment
    ids = _mixed_ids(30, seed=13)
    assert set(client.shard_of(ids).tolist()) == set(range(NUM_SHARDS))
    real = np.arange(len(ids)) % 2 == 0
    g = np.ones((len(ids), DIM), np.float32)
    client.push_many({"item": (ids, g, real.tolist())}, PushId("mask", 0))  # a list of bools is a mask too
    before, found = client.pull_many({"item": ids})["item"]
    assert found.tolist() == real.tolist()
    client.push_many({"item": (ids, g, np.zeros(len(ids), bool))}, PushId("mask", 1))  # negatives only
    after, found = client.pull_many({"item": ids})["item"]
    assert found.tolist() == real.tolist()
    assert (np.abs(after[real] - before[real]).max(axis=1) > 0).all()


def test_forget_items_drops_them_from_the_recent_items_of_users_on_every_shard(deployment):
    _, _, client = deployment
    users = [f"forget-{j}" for j in range(12)]
    assert set(client.shard_of(users).tolist()) == set(range(NUM_SHARDS))
    client.record_recent(users, ["gone"] * len(users), np.arange(len(users)))
    client.record_recent(users, ["kept"] * len(users), np.arange(len(users), 2 * len(users)))
    assert client.forget_items(["gone"]) == len(users)
    assert client.seen(users) == [K(["kept"]).tolist()] * len(users)


# ------------------------------------------------------- a fresh pair of shards that can be stalled


class _StallableShard(PSShard):
    """A real shard that can be kept busy, as a long pause would: calls queue behind :meth:`stall`."""

    def stall(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture(scope="module")
def pair(ray_cluster):
    """Two fresh shards (``gone`` has a TTL), no reader but this module's: ``client``."""
    cfg = _cfg(num_shards=2, tables={"user": {"dim": DIM}, "gone": {"dim": 2, "ttl_s": 3600.0}})
    plan = ShardingPlan.uniform(cfg.num_buckets, 2)
    actor = ray.remote(_StallableShard)
    handles = [actor.options(num_cpus=0.1, max_restarts=1).remote(i, plan, cfg) for i in range(2)]
    client = PSClient(handles, plan, {n: t.dim for n, t in cfg.tables.items()}, timeout_s=60)
    assert client.ping()
    yield client
    for h in handles:
        ray.kill(h)


def _on_shard(client, s: int, n: int, prefix: str) -> list:
    out = [x for x in (f"{prefix}{j}" for j in range(50 * n)) if int(client.shard_of([x])[0]) == s]
    return out[:n]


def test_a_mirrors_delta_names_it_so_shards_keep_the_tombstones_it_needs(pair):
    # First test of the pair: no other reader holds tombstones yet. The client passes the
    # mirror's name with each delta, so another reader moving past the removals prunes none
    # the mirror has not seen (that would cost it a full resync of every shard).
    client = pair
    cache = RowCache(client, ["gone"], reader="named")
    x = _on_shard(client, 0, 3, "tomb-") + _on_shard(client, 1, 3, "tomb-")
    client.push("gone", x, np.zeros((len(x), 2), np.float32), PushId("tomb", 0))
    cache.sync()
    assert len(cache) == len(x)
    ray.get([h.expire.remote(time.time() + 7200) for h in client.shards])
    client.push_many({}, PushId("tomb", 1))
    client.removed("gone", client.versions(), "other")  # another reader, already past them
    cache.sync()
    assert (cache.full_resyncs, len(cache)) == (0, 0)


def test_removed_and_live_keys_answer_each_shard_for_the_version_given(pair):
    client = pair
    a, b = [f"rm-a{j}" for j in range(20)], [f"rm-b{j}" for j in range(20)]
    ka, kb = keyed(a).keys, keyed(b).keys
    client.push("gone", a, np.zeros((len(a), 2), np.float32), PushId("rm", 0))
    va = client.versions()
    live = client.live_keys("gone")
    assert [v for v, _ in live] == va
    for s, (_, keys) in enumerate(live):
        assert sorted(keys.tolist()) == sorted(ka[client.plan.shards_of_keys(ka) == s].tolist())
    ray.get([h.expire.remote(time.time() + 7200) for h in client.shards])
    for s, (v, keys, full) in enumerate(client.removed("gone", va, "rm-reader")):
        assert (v, full) == (va[s], False)
        assert sorted(keys.tolist()) == sorted(ka[client.plan.shards_of_keys(ka) == s].tolist())
    client.push("gone", b, np.zeros((len(b), 2), np.float32), PushId("rm", 1))
    vb = client.versions()
    ray.get([h.expire.remote(time.time() + 7200) for h in client.shards])
    for s, (v, keys, full) in enumerate(client.removed("gone", vb, "rm-reader")):
        assert (v, full) == (vb[s], False)
        assert sorted(keys.tolist()) == sorted(kb[client.plan.shards_of_keys(kb) == s].tolist())
    assert [len(keys) for _, keys in client.live_keys("gone")] == [0, 0]


def test_done_is_true_only_once_every_push_has_answered(pair):
    client = pair
    assert client.done([])
    blocker = client.shards[1].stall.remote(3.0)
    refs = client.push_async({}, PushId("done", 0))
    ray.get(refs[0], timeout=60)
    assert client.done(refs[:1])
    assert not client.done(refs)  # shard 1 is still busy
    ray.get(blocker, timeout=60)
    client.wait(refs)
    assert client.done(refs)


def test_blocking_calls_give_up_after_timeout_s(pair):
    client = pair
    stall_s = 8.0
    quick = PSClient(client.shards, client.plan, client.dims, timeout_s=0.3)
    patient = PSClient(client.shards, client.plan, client.dims, timeout_s=None)
    on0, on1 = _on_shard(client, 0, 1, "to"), _on_shard(client, 1, 1, "to")
    blocker = client.shards[1].stall.remote(stall_s)
    t0 = time.monotonic()
    assert quick.pull("user", on0).shape == (1, DIM)  # shard 0 answers
    with pytest.raises(GetTimeoutError):
        quick.pull("user", on1)
    with pytest.raises(GetTimeoutError):
        quick.versions()
    with pytest.raises(GetTimeoutError):
        RowCache(quick, ["user"]).sync()
    # A call's own timeout_s wins over a client that would wait forever.
    with pytest.raises(GetTimeoutError):
        patient.rank_context("user", on1[0], timeout_s=0.3)
    with pytest.raises(GetTimeoutError):
        patient.record_recent(on1, ["i"], np.array([0]), timeout_s=0.3)
    assert not quick.ping()
    assert time.monotonic() - t0 < stall_s - 2
    ray.get(blocker, timeout=60)  # the shard is idle again for the next test
    assert quick.ping()


def test_a_mirror_resyncs_a_restarted_shard_even_once_it_caught_up(pair):
    # Last test of the pair: it restarts shard 1, empty. Its version counts up again past the
    # mirror's, so only the Delta.cursor the client passes on tells the shard it restarted.
    client = pair
    ids = _on_shard(client, 1, 5, "rs-") + _on_shard(client, 0, 5, "rs-")
    client.push("user", ids, np.ones((len(ids), DIM), np.float32), PushId("rs", 0))
    cache = RowCache(client, ["user"], reader="rs")
    cache.sync()
    assert len(cache) >= len(ids)
    ray.kill(client.shards[1], no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(client.shards[1].get_version.remote(), timeout=10) == 0:
                break
        except (ray.exceptions.RayActorError, GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "shard 1 did not come back"
        time.sleep(0.2)
    seq = 1
    while client.versions()[1] < cache.versions[1]:
        client.push_many({}, PushId("rs", seq))
        seq += 1
    cache.sync()
    assert cache.full_resyncs == 1
    live = {x for _, keys in client.live_keys("user") for x in keys.tolist()}
    assert set(cache.keys()[cache.valid()].tolist()) == live
    assert cache.slots_of(ids[:5]).tolist() == [-1] * 5 and (cache.slots_of(ids[5:]) >= 0).all()
