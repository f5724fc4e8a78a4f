"""Delta sync across a shard's history: a shard restarted or restored from a checkpoint,
a removal burst beyond ``max_tombstones`` on an idle shard, and the push tracing that
tells a replica whether its mirror is new enough for a user's row after a restart.

Shards are plain :class:`ps.shard.PSShard` objects on a fake clock, reached through the
in-process client of ``tests.ps.test_lifecycle``; a restart is a new ``PSShard`` put in
the old one's place (what Ray's restart or ``freshet ckpt restore`` does to a handle).
"""

from __future__ import annotations

import numpy as np
import pytest

from ps.cache import RowCache
from ps.ids import id_keys
from ps.shard import PSShard, PushId
from tests.conftest import FakeClock
from tests.ps.test_lifecycle import _assert_mirror_exact, _cfg, _InProcess

TABLES = ["item", "item_bias", "item_pop"]


@pytest.fixture
def clock(monkeypatch):
    """The shards' clock, at a fixed start; tests move ``clock.now`` (unix seconds)."""
    import ps.shard as shard_mod

    c = FakeClock(1_000_000.0)
    monkeypatch.setattr(shard_mod, "time", c)
    return c


def _restart(ps: _InProcess, state_dir=None, **kw) -> None:
    """Every shard replaced by a new process's ``PSShard`` (``state_dir/s{i}`` when given)."""
    ps.shards = [PSShard(i, ps.plan, ps.cfg, None if state_dir is None else state_dir / f"s{i}", **kw)
                 for i in range(ps.num_shards)]


def test_a_mirror_of_shards_restored_from_an_older_checkpoint_matches_them_after_one_sync(clock, tmp_path):
    ps = _InProcess(_cfg(num_shards=2))
    for sh in ps.shards:
        sh.checkpoint_root = tmp_path
    cache = RowCache(ps, TABLES, reader="r")
    ps.push(list(range(10)))
    ps.push(list(range(5)))
    for sh in ps.shards:
        sh.snapshot("ckpt")
    ps.push(list(range(10, 20)))
    ps.push(list(range(5)))
    cache.sync()
    _assert_mirror_exact(cache, ps)
    _restart(ps, restore_from=tmp_path / "ckpt")
    assert [sh.version for sh in ps.shards] == [2, 2]  # behind the mirror's 4
    cache.sync()
    _assert_mirror_exact(cache, ps)


def test_a_restored_shard_that_has_caught_up_with_the_mirrors_version_still_resyncs_it(clock, tmp_path):
    """The restored history's versions reach (and pass) the mirror's before it syncs: equal
    version numbers name different states."""
    ps = _InProcess(_cfg(num_shards=2))
    for sh in ps.shards:
        sh.checkpoint_root = tmp_path
    cache = RowCache(ps, TABLES, reader="r")
    ps.push(list(range(10)))
    for sh in ps.shards:
        sh.snapshot("ckpt")
    ps.push(list(range(10, 20)))
    ps.push(list(range(3)))
    cache.sync()
    _restart(ps, restore_from=tmp_path / "ckpt")
    ps.push(list(range(30, 35)))
    ps.push(list(range(4, 8)))
    assert [sh.version for sh in ps.shards] == [3, 3]  # what the mirror has synced to
    cache.sync()
    _assert_mirror_exact(cache, ps)
    ps.push(list(range(40, 42)))
    cache.sync()
    _assert_mirror_exact(cache, ps)


def test_an_in_memory_shard_restarted_empty_leaves_no_row_in_the_mirror(clock):
    ps = _InProcess(_cfg(num_shards=2))
    cache = RowCache(ps, TABLES, reader="r")
    ps.push(list(range(10)))
    cache.sync()
    _restart(ps)
    ps.push([100, 101])
    cache.sync()
    _assert_mirror_exact(cache, ps)


def test_a_reader_after_a_removal_burst_beyond_max_tombstones_on_an_idle_shard_resyncs_once(clock):
    ps = _InProcess(_cfg(item={"ttl_s": 10.0}, num_shards=1, max_tombstones=3))
    cache = RowCache(ps, TABLES, reader="r")
    ps.push(list(range(10)))
    cache.sync()
    clock.now += 60
    assert ps.shards[0].expire()["item"] == 10  # one version's removals, more than the 3 kept
    cache.sync()
    assert cache.full_resyncs == 1
    _assert_mirror_exact(cache, ps)
    for _ in range(3):  # idle: nothing changed, so nothing to resend
        assert cache.sync() == 0
    assert cache.full_resyncs == 1
    ps.push([50, 51])
    clock.now += 1
    ps.push([52])
    cache.sync()
    assert cache.full_resyncs == 1
    _assert_mirror_exact(cache, ps)


def test_a_full_answer_the_reader_never_applied_is_full_again(clock):
    """An answer lost on its way (a timed-out call) leaves the reader where it was: the
    shard keeps no state of it that would skip the full resync it still needs."""
    ps = _InProcess(_cfg(item={"ttl_s": 10.0}, num_shards=1, max_tombstones=3))
    cache = RowCache(ps, TABLES, reader="r")
    ps.push(list(range(10)))
    cache.sync()
    clock.now += 60
    ps.shards[0].expire()
    assert ps.shards[0].delta(TABLES, cache.versions[0], "r", cache.cursors[0]).full  # lost
    cache.sync()
    assert cache.full_resyncs == 1
    _assert_mirror_exact(cache, ps)
    ps.push([60])
    cache.sync()
    _assert_mirror_exact(cache, ps)


@pytest.mark.parametrize("pushed_since", ["none", "one short"])
def test_a_shard_whose_version_went_back_answers_removed_with_full(clock, pushed_since):
    # Back to 0, or the smallest step back: a reader at version v asking a shard now at v - 1
    # names no state of it; an empty answer would leave the reader keeping rows the shard no
    # longer has.
    ps = _InProcess(_cfg(num_shards=1))
    for _ in range(4):
        ps.push([1, 2])
    v = ps.shards[0].removed("item", 0, "t")[0]
    _restart(ps)
    if pushed_since == "one short":
        for _ in range(v - 1):
            ps.push([3])
        assert ps.shards[0].version == v - 1
        assert not ps.shards[0].removed("item", v - 1, "t")[2]  # caught up exactly: no resync needed
    assert ps.shards[0].removed("item", v, "t")[2]


def test_coverage_after_a_shard_restart_does_not_claim_a_push_from_before_it(clock, tmp_path):
    """A restarted shard no longer knows which push changed a row it loaded from its
    snapshot; a mirror that had not synced that push must not be taken as covering it."""
    ps = _InProcess(_cfg(num_shards=2), state_dir=tmp_path)
    cache = RowCache(ps, TABLES, reader="r")
    ps.push([1, 2, 3], users=[7])
    cache.sync()
    ps.push([4, 5, 6], users=[7])  # trains the user's row and adds items the mirror lacks
    user = int(id_keys(np.asarray([7], np.int64))[0])
    owner = int(ps.plan.shards_of_keys(np.asarray([user], np.uint64))[0])
    before = ps.shards[owner].rank_context("user", user, recent=False).pushed_by
    assert before == ("t", 1) and not cache.coverage().covers(before)
    for sh in ps.shards:
        sh.snapshot()
    _restart(ps, state_dir=tmp_path)
    after = ps.shards[owner].rank_context("user", user, recent=False).pushed_by
    assert not cache.coverage().covers(after)
    cache.sync()
    assert cache.coverage().covers(after)
    _assert_mirror_exact(cache, ps)
    # Pushes applied after the restart are traced again one by one.
    ps.push([8], users=[7])
    assert ps.shards[owner].rank_context("user", user, recent=False).pushed_by == ("t", 2)


def test_pushes_replayed_from_the_log_after_a_restart_stay_traced(clock, tmp_path):
    ps = _InProcess(_cfg(num_shards=1), state_dir=tmp_path)
    ps.push([1], users=[7])
    ps.push([2], users=[7])
    _restart(ps, state_dir=tmp_path)  # no snapshot since the first: both pushes replayed
    user = int(id_keys(np.asarray([7], np.int64))[0])
    assert ps.shards[0].rank_context("user", user, recent=False).pushed_by == ("t", 1)
    assert ps.shards[0].push(PushId("t", 1), {})[1] is False  # and still deduplicated
