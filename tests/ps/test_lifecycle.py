"""The ID lifecycle at the PS level, without Ray: admission, eviction under ``max_rows``,
TTL expiry, no resurrection, and tombstones bounded by the readers' lag.

Shards are plain :class:`ps.shard.PSShard` objects with the ``time`` module replaced by a
:class:`tests.conftest.FakeClock`, so ages and reader timeouts are exact. The mirror in
the reader tests is the real :class:`ps.cache.RowCache`; only the Ray transport between
it and the shards is replaced by direct calls (:class:`_InProcess`), with the same routing
as :class:`ps.client.PSClient` (every shard sees every push id).

The end-to-end versions (real Ray, Serve, HTTP and trainers) are in
``tests/serving/test_id_lifecycle.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from ps.cache import RowCache
from ps.config import PSConfig
from ps.ids import id_keys, init_rows
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from serving.config import load_config
from tests.conftest import FakeClock
from tests.ps.test_persist import _assert_identical, _dump

DIM = 4
FOLLOWERS = {
    "item_bias": {"dim": 1, "init": "zeros", "follows": "item"},
    "item_pop": {"dim": 1, "init": "zeros", "follows": "item", "optimizer": {"kind": "accumulate", "lr": 1.0}},
}


def _cfg(item: dict | None = None, user: dict | None = None, **ps) -> PSConfig:
    tables = {"user": {"dim": DIM, **(user or {})}, "item": {"dim": DIM, **(item or {})}, **FOLLOWERS}
    return load_config(overrides={"ps": {"num_shards": 1, "num_buckets": 8, "tables": tables, **ps}}).ps


@pytest.fixture
def clock(monkeypatch):
    """The shards' clock, at a fixed start; tests move ``clock.now`` (unix seconds)."""
    import ps.shard as shard_mod

    c = FakeClock(1_000_000.0)
    monkeypatch.setattr(shard_mod, "time", c)
    return c


class _InProcess:
    """The ``PSClient`` calls a :class:`RowCache` and the tests make, on in-process shards.

    Pushes are split by the plan and every shard gets every push id (as ``PSClient.push_async``
    does), so the shards' versions advance together.
    """

    def __init__(self, cfg: PSConfig, state_dir=None):
        self.cfg = cfg
        self.plan = ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards)
        self.shards = [PSShard(i, self.plan, cfg, None if state_dir is None else state_dir / f"s{i}")
                       for i in range(cfg.num_shards)]
        self.num_shards = cfg.num_shards
        self.dims = self.shards[0].table_dims()
        self.seq = 0

    def push(self, items: list[int], *, negatives: list[int] = (), users: list[int] = ()) -> list[bool]:
        """One push: ``items`` as real interactions (item, item_bias and item_pop), then
        ``negatives`` (item and item_bias, ``create`` False), and ``users`` (real)."""
        ids = np.asarray(list(items) + list(negatives), np.int64)
        real = np.arange(len(ids)) < len(items)
        keys, uk = id_keys(ids), id_keys(np.asarray(users, np.int64))
        out = []
        for s, shard in enumerate(self.shards):
            mine = self.plan.shards_of_keys(keys) == s
            k, i, c = keys[mine], ids[mine], real[mine]
            parts = {
                "item": (k, np.full((len(k), DIM), 0.1, np.float32), i, c),
                "item_bias": (k, np.full((len(k), 1), 0.1, np.float32), i, c),
                "item_pop": (k[c], np.ones((int(c.sum()), 1), np.float32), i[c], None),
            }
            mu = self.plan.shards_of_keys(uk) == s
            if mu.any():
                parts["user"] = (uk[mu], np.full((int(mu.sum()), DIM), 0.1, np.float32), np.asarray(users)[mu], None)
            out.append(shard.push(PushId("t", self.seq), parts)[1])
        self.seq += 1
        return out

    def delta(self, tables, since, reader=None, cursors=None):
        cursors = cursors or [None] * len(self.shards)
        return [sh.delta(tables, int(v), reader, c) for sh, v, c in zip(self.shards, since, cursors)]

    def live(self, table: str = "item") -> set[int]:
        """Keys (as ints) of every row of ``table`` on every shard."""
        return {int(k) for sh in self.shards for k in sh.live_keys(table)[1].tolist()}

    def tombstones(self) -> int:
        """The most tombstones any table of any shard keeps."""
        return max(t.tombstones() for sh in self.shards for t in sh.tables.values())


def _keys(ids) -> set[int]:
    return {int(k) for k in id_keys(np.asarray(list(ids), np.int64)).tolist()}


def _mirrored(cache: RowCache) -> set[int]:
    return {int(k) for k in cache.keys()[cache.valid()].tolist()}


def _assert_mirror_exact(cache: RowCache, ps: _InProcess) -> None:
    """The mirror holds exactly the PS's live items, with the PS's current rows in every table."""
    assert _mirrored(cache) == ps.live("item")
    keys = cache.keys()[cache.valid()]
    slots = cache.slots_of_keys(keys)
    route = ps.plan.shards_of_keys(keys)
    for t in cache.tables:
        for s, sh in enumerate(ps.shards):
            rows, found = sh.pull({t: keys[route == s]}, initial=False)[t]
            assert found.all(), t
            np.testing.assert_array_equal(cache.matrix(t)[slots[route == s]], rows, err_msg=t)


# --------------------------------------------------------------------------- admission


def test_an_id_posted_n_minus_1_times_has_no_row_anywhere_and_n_times_has_one(clock):
    ps = _InProcess(_cfg(item={"admission": {"min_count": 3}}, user={"admission": {"min_count": 3}}))
    reader = RowCache(ps, ["item", "item_bias", "item_pop"], reader="r")
    for _ in range(2):
        ps.push([7], negatives=[8], users=[70])
    sh = ps.shards[0]
    # A user below the bar has no row: /rank's one PS call (rank_context) finds none, so
    # serving treats them as cold (fallback "new_user").
    assert len(sh.tables["user"]) == 0 and sh.rank_context("user", int(id_keys([70])[0])).row is None
    # Below the bar: no row in the table or its followers; a pull reads the default row
    # and stores nothing; readers never see the ID.
    for t in ("item", "item_bias", "item_pop"):
        assert len(sh.tables[t]) == 0, t
    rows, found = sh.pull({"item": id_keys([7])})["item"]
    assert not found[0]
    np.testing.assert_array_equal(rows, init_rows(id_keys([7]), seed=sh.tables["item"].seed, dim=DIM, scale=0.01))
    assert len(sh.tables["item"]) == 0
    reader.sync()
    assert len(reader) == 0
    # The N-th real interaction creates the row, and its followers' rows with it. Negatives
    # were never counted toward admission: 8 still has no row.
    ps.push([7], negatives=[8], users=[70])
    assert ps.live("item") == _keys([7]) and ps.live("user") == _keys([70])
    assert sh.rank_context("user", int(id_keys([70])[0])).row is not None
    for t in ("item_bias", "item_pop"):
        assert len(sh.tables[t]) == 1, t
    assert sh.pull({"item_pop": id_keys([7])})["item_pop"][0][0, 0] == 1.0  # counted once: on the push that created it
    reader.sync()
    assert _mirrored(reader) == _keys([7])


# --------------------------------------------------------------------------- eviction


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_under_a_cap_takes_the_lowest_score_with_followers_and_tells_readers(clock, policy):
    ps = _InProcess(_cfg(item={"max_rows": 3, "eviction": policy}))
    reader = RowCache(ps, ["item", "item_bias", "item_pop"], reader="r")
    ps.push([1, 2, 3])
    ps.push([1])
    ps.push([1])  # 1: most frequent, and most recent so far
    ps.push([2])  # 2: most recent; 3: least recent and least frequent
    reader.sync()
    ps.push([4])
    assert ps.live() == _keys([1, 2, 4])  # both policies drop 3
    ps.push([5])
    # LRU: 1 (last at push 3) goes before 2 (push 4); LFU: 4 and 2 have 1 and 2 interactions.
    gone = {"lru": 1, "lfu": 4}[policy]
    assert ps.live() == _keys({1, 2, 4, 5} - {gone})
    sh = ps.shards[0]
    for t in ("item_bias", "item_pop"):  # followers hold exactly the leader's IDs
        assert {int(k) for k in sh.live_keys(t)[1].tolist()} == ps.live(), t
    reader.sync()
    _assert_mirror_exact(reader, ps)
    assert reader.full_resyncs == 0  # the reader kept up: told by tombstones, no full resync


def test_a_negative_sample_does_not_shield_a_row_from_eviction(clock):
    """At the cap, a new real interaction gets its row even when every row is also in the
    push as a negative: the lowest-score row goes (its negative gradient is dropped), not
    the real interaction. (Trainers sample negatives from a catalogue about the table's
    size, so with a small cap every push covers every row.)"""
    ps = _InProcess(_cfg(item={"max_rows": 3}))
    ps.push([1, 2, 3])
    ps.push([2, 3])
    assert ps.push([4], negatives=[1, 2, 3]) == [True]
    assert ps.live() == _keys([2, 3, 4])
    sh = ps.shards[0]
    # The evicted row took its gradient with it; the others got theirs.
    before = init_rows(id_keys([2, 3]), seed=sh.tables["item"].seed, dim=DIM, scale=0.01)
    rows = sh.pull({"item": id_keys([2, 3])}, initial=False)["item"][0]
    assert (rows < before).all()  # three pushes of +0.1 gradients moved them down
    # A real interaction in the same push is still protected: 4 (the newest row) is real
    # here, so one of 2 and 3 (tied at push 2) goes: the lower key.
    ps.push([5, 4], negatives=[2, 3])
    tied = sorted(_keys([2, 3]))
    assert ps.live() == _keys([4, 5]) | {tied[1]}


# --------------------------------------------------------------------------- TTL


def test_ttl_expiry_on_a_fake_clock_is_exact_and_checked_at_most_once_a_second(clock):
    """An ID goes once it has had no real interaction for more than ``ttl_s``: a push checks
    (at most once a second, so a row can outlive its TTL by up to a second), and so does
    ``expire()`` at any time; followers and the user's table go by the same rule."""
    ps = _InProcess(_cfg(item={"ttl_s": 3.0}, user={"ttl_s": 3.0}))
    sh, t0 = ps.shards[0], clock.now
    ps.push([1], users=[100])
    clock.now = t0 + 1.5
    ps.push([2])  # checked: nothing is older than 3 s
    clock.now = t0 + 3.0
    ps.push([3])  # checked: 1 and user 100 are exactly 3 s old, not more: they stay
    assert ps.live() == _keys([1, 2, 3]) and ps.live("user") == _keys([100])
    clock.now = t0 + 3.5
    ps.push([4])  # 0.5 s after the last check: not checked, so 1 (3.5 s old) is still there
    assert ps.live() == _keys([1, 2, 3, 4])
    assert sh.expire() == {**dict.fromkeys(sh.tables, 0), "user": 1, "item": 1, "item_bias": 1, "item_pop": 1}
    assert ps.live() == _keys([2, 3, 4]) and ps.live("user") == set()
    for t in ("item_bias", "item_pop"):
        assert {int(k) for k in sh.live_keys(t)[1].tolist()} == ps.live(), t
    clock.now = t0 + 4.6
    ps.push([3])  # checked (1.1 s after expire()): 2 is 3.1 s old; 3 is refreshed by this push
    assert ps.live() == _keys([3, 4])
    assert sh.expire() == dict.fromkeys(sh.tables, 0)


# --------------------------------------------------------------------------- no resurrection


def test_an_expired_id_comes_back_only_through_a_new_real_interaction(clock):
    ps = _InProcess(_cfg(item={"ttl_s": 3.0}, user={"ttl_s": 3.0}))
    sh = ps.shards[0]
    ps.push([1, 2], users=[100])
    stale = PushId("t", 0)
    clock.now += 2
    ps.push([2], negatives=[1])  # a negative refreshes nothing: 1 is still 2 s old
    clock.now += 2
    ps.push([3], users=[101])  # 1 and user 100 (4 s old) expire; 2 (2 s old) stays
    assert ps.live() == _keys([2, 3]) and ps.live("user") == _keys([101])
    for t in ("item_bias", "item_pop"):
        assert _keys([1]).isdisjoint(int(k) for k in sh.live_keys(t)[1].tolist()), t
    # Not by a pull (with or without the default row) ...
    for initial in (True, False):
        assert not sh.pull({"item": id_keys([1]), "item_bias": id_keys([1])}, initial)["item"][1].any()
    # ... nor a stale push re-sent (a retry after a restart), nor a negative, nor a
    # follower-only update (a popularity count of an item that has no row) ...
    parts = {"item": (id_keys([1]), np.ones((1, DIM), np.float32), np.asarray([1]), None)}
    assert sh.push(stale, parts) == (sh.version, False)
    ps.push([], negatives=[1])
    sh.push(PushId("other", 0), {"item_pop": (id_keys([1]), np.ones((1, 1), np.float32), np.asarray([1]), None)})
    assert _keys([1]).isdisjoint(ps.live()) and len(sh.tables["item_pop"]) == 2
    # ... only a new real interaction, and then from the initial row with fresh state.
    ps.push([1])
    got = sh.pull({"item": id_keys([1])}, initial=False)["item"][0]
    start = init_rows(id_keys([1]), seed=sh.tables["item"].seed, dim=DIM, scale=0.01)
    slot = sh.tables["item"].lookup(id_keys([1]))[0]
    assert float(sh.tables["item"].state[slot].sum()) == pytest.approx(0.01)  # one step of 0.1**2 from zero
    assert np.abs(got - start).max() < 0.06  # one row-wise Adagrad step from the initial row


def test_a_replayed_log_brings_back_no_expired_or_evicted_row(clock, tmp_path):
    """Churn with admission, a cap, TTL and stale negatives on a durable shard; a new shard
    on the same directory (a crash and restart) has bitwise the state, and none of the
    removed IDs is live."""
    cfg = _cfg(item={"ttl_s": 5.0, "max_rows": 40, "eviction": "lfu", "admission": {"min_count": 2}},
               snapshot_every_pushes=7)
    ps = _InProcess(cfg, state_dir=tmp_path)
    rng = np.random.default_rng(3)
    ever: list[int] = []
    removed: set[int] = set()
    for step in range(60):
        clock.now += float(rng.uniform(0, 1.5))
        new = list(range(step * 10, step * 10 + 10))
        again = rng.choice(ever, 8).tolist() if ever else []
        before = ps.live()
        ps.push(new + new[:4] + again, negatives=rng.choice(ever, 6).tolist() if ever else [])
        removed |= before - ps.live()
        ever += new
    assert removed and len(ps.live()) <= 40
    sh = ps.shards[0]
    sh.wait_for_snapshots()
    again = PSShard(0, ps.plan, cfg, tmp_path / "s0")
    assert again.recovery["snapshot_lsn"] is not None and again.recovery["replayed"] > 0
    _assert_identical(_dump(again), _dump(sh))
    live = {int(k) for k in again.live_keys("item")[1].tolist()}
    assert live == ps.live()
    np.testing.assert_array_equal(again.tables["item"].admission.counts.numpy(), sh.tables["item"].admission.counts.numpy())


def test_evicting_a_user_drops_their_recent_items(clock):
    ps = _InProcess(_cfg(user={"max_rows": 2}, seen_per_user=10))
    sh = ps.shards[0]
    for u in (1, 2):
        ps.push([10 + u], users=[u])
        sh.record_recent(id_keys([u]), id_keys([10 + u]), np.asarray([u]))
    assert [len(x) for x in sh.recent_items(id_keys([1, 2]))] == [1, 1]
    ps.push([13], users=[3])  # user 1 is least recent: evicted, and their recent items with them
    assert ps.live("user") == _keys([2, 3])
    assert [len(x) for x in sh.recent_items(id_keys([1, 2]))] == [0, 1]


def test_recent_items_of_users_who_never_get_a_row_go_after_a_quiet_spell(clock, tmp_path):
    # Users turned away by admission kept their recent items forever: 200k one-off users
    # held 68 MiB on a shard whose user table had no row at all.
    cfg = _cfg(user={"admission": {"min_count": 2}}, seen_per_user=10, recent_without_row_s=60.0)
    ps = _InProcess(cfg, state_dir=tmp_path)
    sh = ps.shards[0]
    one_off = list(range(100, 150))
    ps.push([1], users=one_off)  # not admitted: no rows
    ps.push([1], users=[7])
    ps.push([1], users=[7])  # the 2nd push admits user 7
    sh.record_recent(id_keys(one_off + [7]), id_keys([1] * 51), np.arange(51))
    assert ps.live("user") == _keys([7]) and len(sh.recent) == 51

    clock.now += 61  # the first sweep: everyone was recorded since the start
    sh.expire()
    assert len(sh.recent) == 51
    clock.now += 30
    sh.record_recent(id_keys([100]), id_keys([2]), np.asarray([60]))  # a one-off user comes back
    clock.now += 31  # the second sweep: rowless and quiet for a whole spell go
    sh.expire()
    assert {int(k) for k in sh.recent.users().tolist()} == _keys([7, 100])
    assert sh.stats()["users_with_recent"] == 2
    # Later sweeps look only at recent traffic and at what they kept: a newcomer without a
    # row is kept while active and goes after a quiet spell, like the rest.
    sh.record_recent(id_keys([200]), id_keys([3]), np.asarray([61]))
    clock.now += 61
    sh.expire()
    assert {int(k) for k in sh.recent.users().tolist()} == _keys([7, 200])
    clock.now += 61
    sh.expire()
    assert {int(k) for k in sh.recent.users().tolist()} == _keys([7])

    sh.wait_for_snapshots()
    again = PSShard(0, ps.plan, cfg, tmp_path / "s0")  # a restart replays the sweeps from the log
    assert {int(k) for k in again.recent.users().tolist()} == _keys([7])


def test_recent_items_are_never_swept_when_the_user_table_has_no_lifecycle(clock):
    ps = _InProcess(_cfg(seen_per_user=10))
    sh = ps.shards[0]
    sh.record_recent(id_keys([5]), id_keys([1]), np.asarray([0]))  # posted, not trained yet
    for _ in range(3):
        clock.now += 3600
        sh.expire()
    assert len(sh.recent) == 1
    assert sh._sweep is None  # nothing kept for a sweep that never runs


# --------------------------------------------------------------------------- tombstones


def _churn(ps: _InProcess, steps: int, start: int) -> int:
    """``steps`` pushes of 5 new items each into a capped table; returns the next new ID."""
    for _ in range(steps):
        ps.push(list(range(start, start + 5)))
        start += 5
    return start


def test_a_lagging_reader_keeps_its_tombstones_and_misses_no_removal(clock):
    ps = _InProcess(_cfg(item={"max_rows": 10}, num_shards=2, reader_timeout_s=60.0))
    fast = RowCache(ps, ["item", "item_bias"], reader="fast")
    slow = RowCache(ps, ["item", "item_bias"], reader="slow")
    nxt = _churn(ps, 4, 0)
    fast.sync(), slow.sync()
    mirrored_then = _mirrored(slow)
    for _ in range(10):
        nxt = _churn(ps, 2, nxt)
        clock.now += 1
        fast.sync()
    # 20 pushes of 5 new items since the slow reader's sync: all it had are gone, and the
    # shards kept every tombstone it has not seen, whatever the fast reader did.
    assert mirrored_then.isdisjoint(ps.live())
    assert sum(sh.tables["item"].tombstones() for sh in ps.shards) >= 100
    slow.sync()
    assert slow.full_resyncs == 0
    _assert_mirror_exact(slow, ps)
    # Once both have synced past them, the next syncs prune every tombstone but those of
    # the newest push (a reader at that version still asks from it).
    fast.sync(), slow.sync()
    assert ps.tombstones() <= 5


def test_a_reader_silent_past_reader_timeout_stops_holding_tombstones_and_resyncs_fully(clock):
    ps = _InProcess(_cfg(item={"max_rows": 10}, num_shards=2, reader_timeout_s=30.0))
    fast = RowCache(ps, ["item", "item_bias"], reader="fast")
    gone = RowCache(ps, ["item", "item_bias"], reader="gone")
    nxt = _churn(ps, 4, 0)
    fast.sync(), gone.sync()
    for _ in range(10):
        nxt = _churn(ps, 2, nxt)
        clock.now += 4  # 40 s in all: "gone" is past the 30 s timeout from the 8th round on
        fast.sync()
    fast.sync()
    # Tombstones are bounded by the live reader's lag (the newest push), not by the silent one.
    assert ps.tombstones() <= 5
    assert gone.full_resyncs == 0
    gone.sync()
    assert gone.full_resyncs == ps.num_shards  # every shard pruned past it: a full resync of each
    _assert_mirror_exact(gone, ps)
    assert "gone" in ps.shards[0].stats()["readers"]  # registered again by its sync


def test_max_tombstones_bounds_them_for_a_live_but_lagging_reader(clock):
    ps = _InProcess(_cfg(item={"max_rows": 10}, num_shards=2, max_tombstones=12))
    fast = RowCache(ps, ["item", "item_bias"], reader="fast")
    slow = RowCache(ps, ["item", "item_bias"], reader="slow")
    nxt = _churn(ps, 4, 0)
    fast.sync(), slow.sync()
    for _ in range(10):
        nxt = _churn(ps, 2, nxt)
        fast.sync()
        assert ps.tombstones() <= 12
    slow.sync()
    assert slow.full_resyncs >= 1
    _assert_mirror_exact(slow, ps)
    fast.sync()
    _assert_mirror_exact(fast, ps)


def test_tombstones_stay_within_max_tombstones_with_no_reader_at_all(clock):
    """A shard nobody syncs from (no Serve replica yet, trainers without a lifecycle) still
    bounds its removal record; the first reader to come is told everything it needs."""
    ps = _InProcess(_cfg(item={"max_rows": 10, "ttl_s": 2.0}, user={"ttl_s": 2.0}, max_tombstones=25))
    nxt = 0
    for _ in range(60):
        ps.push(list(range(nxt, nxt + 5)), users=list(range(nxt, nxt + 5)))
        nxt += 5
        clock.now += 0.5
        assert ps.tombstones() <= 25
    assert ps.shards[0].stats()["tables"]["item"]["tombstones"] <= 25
    first = RowCache(ps, ["item", "item_bias"], reader="first")
    first.sync()
    _assert_mirror_exact(first, ps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mirrors_with_any_lag_stay_exact_under_churn(clock, seed):
    """Random churn (new IDs, Zipf re-occurrences, stale negatives, TTL and a cap) and three
    readers syncing at different rates, one of them silent past ``reader_timeout_s`` at
    times: after every sync a mirror holds exactly the PS's live rows, and tombstones
    never exceed ``max_tombstones``."""
    ps = _InProcess(_cfg(item={"max_rows": 25, "ttl_s": 20.0, "eviction": ["lru", "lfu"][seed % 2]},
                         num_shards=2, reader_timeout_s=15.0, max_tombstones=30))
    caches = {every: RowCache(ps, ["item", "item_bias", "item_pop"], reader=f"every-{every}") for every in (1, 4, 23)}
    rng = np.random.default_rng(seed)
    ever: list[int] = []
    real: set[int] = set()
    for step in range(150):
        clock.now += float(rng.exponential(1.0))
        new = list(range(step * 4, step * 4 + int(rng.integers(0, 5))))
        again = [ever[min(int(r) - 1, len(ever) - 1)] for r in rng.zipf(1.3, 4)] if ever else []
        negatives = rng.choice(ever, 8).tolist() if ever else []
        ps.push(new + again, negatives=negatives)
        ever += new
        real |= _keys(new + again)
        live = ps.live()
        assert live <= real  # only real interactions ever created a row
        assert all(len(sh.tables["item"]) <= 25 for sh in ps.shards)
        assert ps.tombstones() <= 30
        for every, cache in caches.items():
            if step % every == 0:
                cache.sync()
                _assert_mirror_exact(cache, ps)
    assert caches[23].full_resyncs > 0  # the slowest one did fall too far behind
