"""EmbeddingTable: keyed rows, admission, eviction within max_rows, TTL, tombstones, capture/restore."""

from __future__ import annotations

import numpy as np
import pytest

from ps.admission import Admission
from ps.config import AdmissionConfig, OptimizerConfig, OptimizerKind, TableConfig
from ps.ids import id_keys
from ps.table import EmbeddingTable

DIM = 4
OPT = OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.1)


def _table(**cfg) -> EmbeddingTable:
    return EmbeddingTable("item", TableConfig(dim=DIM, **cfg), OPT, 0)


def _push(t: EmbeddingTable, ids, version: int, now: float = 0.0, create=None):
    keys = id_keys(ids)
    return t.push(keys, np.ones((len(keys), DIM), np.float32), ids=np.asarray(ids), create=create, version=version, now=now)


def _live(t: EmbeddingTable) -> set:
    return set(t.ids_at(t.live_slots()).tolist())


def test_admission_gives_a_row_on_the_min_count_th_push_only():
    t = _table(admission=AdmissionConfig(min_count=3))
    for v in (1, 2):
        out = _push(t, [7], v)
        assert not len(out.created) and out.dropped == 1
        assert t.lookup(id_keys([7]))[0] == -1  # below the bar: no row, pulls read the default row
    rows, found = t.pull(id_keys([7]))
    assert not found[0]
    np.testing.assert_array_equal(rows, t.initial_rows(id_keys([7])))
    out = _push(t, [7], 3)
    assert out.created.tolist() == id_keys([7]).tolist()
    assert _live(t) == {7}
    # Repeats inside one push count: 3 occurrences of a new ID admit it at once.
    assert _push(t, [9, 9, 9], 4).created.tolist() == id_keys([9]).tolist()
    # Non-interactions (negatives) are not counted toward admission.
    for v in range(5, 10):
        _push(t, [11], v, create=np.array([False]))
    assert 11 not in _live(t)


def test_admission_probability_is_deterministic_per_id_and_count():
    a, b = (_table(admission=AdmissionConfig(probability=0.5)) for _ in range(2))
    ids = list(range(400))
    got_a = set(_push(a, ids, 1).created.tolist())
    got_b = set(_push(b, ids, 1).created.tolist())
    assert got_a == got_b  # the same decision, in any replay
    assert 120 < len(got_a) < 280  # about half
    # Those refused get another chance at their next occurrence.
    again = set(_push(a, ids, 2).created.tolist())
    assert again and not again & got_a


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_keeps_max_rows_and_drops_the_lowest_scores(policy):
    t = _table(max_rows=3, eviction=policy)
    _push(t, ["a"], 1)
    _push(t, ["b"], 2)
    _push(t, ["c"], 3)
    for v in (4, 5, 6):  # "a" is the most frequent; "b" the most recent of the other two
        _push(t, ["a"], v)
    _push(t, ["b"], 7)
    out = _push(t, ["d"], 8)
    gone = "c"
    assert out.removed.tolist() == id_keys([gone]).tolist()
    assert _live(t) == {"a", "b", "c", "d"} - {gone} and len(t) == 3
    out = _push(t, ["e"], 9)
    # LRU: "a" (v6) went before "b" (v7) and "d" (v8); LFU: "b" and "d" have 2 and 1 interactions.
    expected = {"lru": "a", "lfu": "d"}[policy]
    assert out.removed.tolist() == id_keys([expected]).tolist()
    # The evicted row's optimizer state went with it: re-created, it starts over.
    _push(t, [expected], 10)
    slot = t.lookup(id_keys([expected]))[0]
    assert t.state[slot].sum() == pytest.approx((np.ones(DIM) ** 2).mean())


def test_lfu_counts_every_occurrence_of_an_id_in_one_push():
    # A popular item shows up several times in one batch (several users, one push): each is a
    # real interaction for LFU, not one per push.
    t = _table(max_rows=2, eviction="lfu")
    _push(t, ["a", "a", "a"], 1)  # 3 interactions in one push
    _push(t, ["b"], 2)
    _push(t, ["b"], 3)  # 2 interactions in two pushes
    out = _push(t, ["c"], 4)
    assert out.removed.tolist() == id_keys(["b"]).tolist()
    assert _live(t) == {"a", "c"}
    # Negatives in a push do not count: "c" is pushed 5 times as a negative, once as real.
    _push(t, ["c"] * 6, 5, create=np.array([True] + [False] * 5))
    assert t.score[t.lookup(id_keys(["c"]))[0]] == 2


def test_eviction_never_takes_a_row_of_the_same_push_and_ties_go_to_the_lower_key():
    t = _table(max_rows=2, eviction="lru")
    _push(t, [1, 2], 1)  # same score: the lower key goes first
    low, high = sorted(id_keys([1, 4]).tolist())
    t2 = _table(max_rows=2, eviction="lru")
    _push(t2, [1, 4], 1)
    assert _push(t2, [5], 2).removed.tolist() == [low]
    out = _push(t, [2, 3], 2)  # 2 is in this push: only 1 may go
    assert out.removed.tolist() == id_keys([1]).tolist()
    assert _live(t) == {2, 3}
    # More new IDs than fit: the ones that fit get rows, the rest are dropped.
    out = _push(t, [10, 11, 12], 3)
    assert len(t) == 2 and len(out.created) == 2 and out.dropped == 1


def test_ttl_expires_ids_without_a_real_interaction():
    t = _table(ttl_s=10.0)
    _push(t, [1, 2], 1, now=100.0)
    _push(t, [2], 2, now=105.0, create=np.array([False]))  # a negative: no refresh
    _push(t, [3], 3, now=108.0)
    assert not len(t.expire(now=109.0, version=3))
    gone = t.expire(now=111.0, version=3)
    assert sorted(gone.tolist()) == sorted(id_keys([1, 2]).tolist())
    assert _live(t) == {3}
    assert sorted(t.removed_since(3).tolist()) == sorted(gone.tolist())


def test_tombstones_are_pruned_below_a_version_and_bounded_in_number():
    t = _table(max_rows=1)
    for v, x in enumerate("abcdef", start=1):
        _push(t, [x], v)
    assert t.tombstones() == 5 and t.pruned_below == 0
    # a..e were evicted at versions 2..6: those below 4 are a and b.
    assert t.prune_tombstones(4) == 2
    assert t.pruned_below == 4 and t.tombstones() == 3
    assert t.prune_tombstones(0, max_kept=1) == 2
    assert t.tombstones() == 1 and t.pruned_below == 6
    assert t.removed_since(6).tolist() == id_keys(["e"]).tolist()


def test_capture_and_load_restore_rows_state_scores_and_admission_bitwise():
    # halve_every 50: the sketch is halved in both halves of the run, so the pushes counted
    # since the last halving must be restored too for the two to go on identically.
    cfg = dict(max_rows=50, eviction="lfu", ttl_s=1e9, admission=AdmissionConfig(min_count=2, halve_every=50))
    t = _table(**cfg)
    rng = np.random.default_rng(0)
    for v in range(1, 40):
        ids = rng.integers(0, 80, size=12).tolist() + ["s" + str(v % 7)]
        _push(t, ids, v, now=float(v))
    st = t.capture()
    u = _table(**cfg)
    u.load(st)
    assert _live(u) == _live(t)
    keys = t.keys[t.live_slots()]
    np.testing.assert_array_equal(u.pull(keys)[0], t.pull(keys)[0])
    np.testing.assert_array_equal(u.admission.counts.numpy(), t.admission.counts.numpy())
    # And they go on identically: the same admissions, evictions and rows.
    for v in range(40, 60):
        ids = rng.integers(0, 120, size=12).tolist()
        a, b = _push(t, ids, v, now=float(v)), _push(u, ids, v, now=float(v))
        assert a.created.tolist() == b.created.tolist() and a.removed.tolist() == b.removed.tolist()
    keys = t.keys[t.live_slots()]
    np.testing.assert_array_equal(u.pull(keys)[0], t.pull(keys)[0])


def _first_sight_admitted(t: EmbeddingTable, one_offs: int, fresh: int) -> float:
    """Push ``one_offs`` IDs once each, then ``fresh`` new ones (in pushes of 10, as in the
    stream): the share of those admitted on first sight."""
    for v, start in enumerate(range(0, one_offs, 100), start=1):
        _push(t, [f"bot{j}" for j in range(start, min(start + 100, one_offs))], v)
    created = sum(len(_push(t, [f"new{j}" for j in range(s, s + 10)], 10**6 + s).created) for s in range(0, fresh, 10))
    return created / fresh


def test_admission_sketch_is_halved_so_one_off_ids_never_fill_it():
    # Without aging, the counts of every one-off ID stayed: after ~0.5-4 sketch widths of them
    # a brand-new ID found all its counters taken and was admitted on first sight.
    sketch = dict(min_count=2, sketch_width=1024, sketch_depth=4)
    never = _table(admission=AdmissionConfig(**sketch, halve_every=1 << 62))
    assert _first_sight_admitted(never, 20_000, 1000) > 0.9
    aged = _table(admission=AdmissionConfig(**sketch))  # halved every 1024 / 4 = 256 pushes
    assert _first_sight_admitted(aged, 20_000, 1000) < 0.05
    assert aged.admission.added < 256
    # An ID pushed min_count times within a sample is still admitted, among the one-offs.
    while aged.admission.added > 256 - 2 * 51:  # no halving between its two pushes
        _push(aged, [f"pad{aged.admission.added}"], 2 * 10**6)
    for v in range(2):
        _push(aged, [f"bot{v}-{j}" for j in range(50)] + ["returning"], 2 * 10**6 + 1 + v)
    assert "returning" in _live(aged)


def test_admission_halving_must_let_min_count_be_reached():
    with pytest.raises(ValueError, match="halve_every=2 is below min_count=3"):
        AdmissionConfig(min_count=3, halve_every=2)
    with pytest.raises(ValueError, match="min_count=20 is above sketch_width / 4 = 16"):
        AdmissionConfig(min_count=20, sketch_width=64)


def test_admission_halves_after_halve_every_pushes_counting_repeats():
    # A push of an ID 3 times is 3 pushes toward halve_every, as it is toward min_count.
    adm = Admission(AdmissionConfig(min_count=2, halve_every=8), seed=1)
    adm.admit(id_keys(["a", "b"]), np.array([3, 3]))
    assert adm.added == 6 and adm.count(id_keys(["a"]))[0] == 3
    adm.admit(id_keys(["c"]), np.array([2]))  # 8 counted: every counter halves
    assert adm.added == 0
    assert adm.count(id_keys(["a", "b", "c"])).tolist() == [1, 1, 1]


def test_admission_count_takes_the_least_collided_sketch_row():
    # Count-min: each row over-counts where other keys share the cell; the minimum over the rows
    # is exact for nearly every key (the most collided row would be for about half of them).
    adm = Admission(AdmissionConfig(min_count=1, sketch_width=1024, sketch_depth=4, halve_every=1 << 40), seed=3)
    keys = id_keys(list(range(200)))
    true = np.arange(200) % 5 + 1
    adm.admit(keys, true)
    est = adm.count(keys)
    assert (est >= true).all()
    assert (est == true).mean() > 0.95


def test_lifecycle_counts_what_admission_eviction_and_expiry_did():
    t = _table(max_rows=3, ttl_s=10.0, admission=AdmissionConfig(min_count=2))
    _push(t, ["a", "b"], 1, now=0.0)  # first sight: refused
    _push(t, ["a", "b", "c", "d"], 2, now=1.0)  # a, b admitted; c, d refused
    _push(t, ["c", "d"], 3, now=2.0)  # c, d admitted: one of a, b, c, d evicted to stay at 3
    _push(t, ["x"], 4, now=3.0, create=np.array([False]))  # a negative: no row, not counted
    assert t.stats()["lifecycle"] == {"created": 4, "not_admitted": 4, "evicted": 1, "expired": 0, "removed": 1}
    assert len(t.expire(now=11.5, version=5)) == 1  # the one of a, b left, last pushed at 1.0
    life = t.stats()["lifecycle"]
    assert (life["expired"], life["removed"], t.stats()["rows"]) == (1, 2, 2)
    t.remove(t.keys[t.live_slots()], 6)  # forgotten
    assert t.stats()["lifecycle"]["removed"] == 4 and t.stats()["lifecycle"]["expired"] == 1
    t.reset_lifecycle()
    assert set(t.stats()["lifecycle"].values()) == {0}


def test_memory_is_reported_per_row():
    t = _table()
    _push(t, list(range(1000)), 1)
    st = t.stats()
    assert st["rows"] == 1000 and st["row_bytes"] == 4 * (DIM + 1)
    assert st["bytes"] >= 1000 * st["row_bytes"]
    assert st["bytes_per_row"] == pytest.approx(st["bytes"] / 1000)


def test_memory_counts_the_string_ids_and_stays_flat_under_churn():
    # /stats counted a string ID as its 8-byte pointer: 1 KB IDs read as ~100 bytes a row.
    t = _table(max_rows=100)
    long_ids = [f"{j:04d}" + "x" * 1000 for j in range(100)]
    _push(t, [f"{j}" for j in range(100)], 1)
    small = t.nbytes()
    u = _table(max_rows=100)
    _push(u, long_ids, 1)
    assert u.nbytes() - small >= 100 * 1000  # the characters are counted
    for v in range(2, 12):  # churn: every push replaces every row with new long IDs
        _push(u, [f"{v}-{j:04d}" + "x" * 1000 for j in range(100)], v)
    assert abs(u.nbytes() - small - 100 * 1000) < 100 * 200  # replaced IDs are no longer counted
    w = _table(max_rows=100)
    w.load(u.capture())
    assert w.nbytes() == pytest.approx(u.nbytes(), rel=0.05)  # less only the tombstones


def test_add_gives_slots_in_first_appearance_order():
    t = _table()
    slots = t.add(id_keys([5, 3, 5, 9]), np.array([5, 3, 5, 9]))
    assert slots.tolist() == [0, 1, 0, 2]
    assert t.ids_at(np.arange(3)).tolist() == [5, 3, 9]
