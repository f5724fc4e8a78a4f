"""RecentItems: users' recent items, bounded, idempotent by offset, in offset order; RowlessSweep."""

from __future__ import annotations

import numpy as np
import pytest

from ps.recent import RecentItems, RowlessSweep


def _u(*x) -> np.ndarray:
    return np.asarray(x, np.uint64)


def test_bounded_per_user_newest_kept():
    r = RecentItems(3)
    assert r.record(_u(1, 1, 1, 1, 2), _u(10, 11, 12, 13, 20), np.array([0, 1, 2, 3, 4])) == 5
    assert r.items_of(1).tolist() == [11, 12, 13]
    assert r.items_of(2).tolist() == [20]
    assert r.items_of(3).tolist() == []
    assert len(r) == 2 and r.entries() == 4


def test_idempotent_and_order_insensitive():
    a, b = RecentItems(10), RecentItems(10)
    users, items, offsets = _u(1, 1, 1, 2), _u(10, 11, 12, 20), np.array([5, 6, 7, 1])
    a.record(users, items, offsets)
    assert a.record(users, items, offsets) == 0  # a second delivery (the trainer's) changes nothing
    for j in (2, 0, 3, 1):  # any order, one at a time
        b.record(users[j : j + 1], items[j : j + 1], offsets[j : j + 1])
    assert [a.items_of(u).tolist() for u in (1, 2)] == [b.items_of(u).tolist() for u in (1, 2)] == [[10, 11, 12], [20]]


def test_forget_users_and_items():
    r = RecentItems(10)
    r.record(_u(1, 1, 2, 3), _u(10, 11, 10, 30), np.arange(4))
    assert r.forget_items(_u(10)) == 2
    assert r.items_of(1).tolist() == [11] and r.items_of(2).tolist() == []
    assert len(r) == 2  # user 2 had nothing left
    assert r.forget_users(_u(1, 99)) == 1
    assert r.items_of(1).tolist() == []


def test_capture_and_load_round_trip():
    r = RecentItems(2)
    r.record(_u(5, 5, 5, 7), _u(1, 2, 3, 4), np.array([9, 10, 11, 3]))
    s = RecentItems(2)
    s.load(*r.capture())
    assert [s.items_of(u).tolist() for u in (5, 7)] == [[2, 3], [4]]
    # Offsets survive too: the same events again are recognised.
    assert s.record(_u(5), _u(3), np.array([11])) == 0


def test_any_int64_offset_is_recorded_for_a_new_user():
    r = RecentItems(8)
    low = np.iinfo(np.int64).min
    assert r.record(_u(1, 1), _u(5, 6), np.array([low, low + 1])) == 2 and r.items_of(1).tolist() == [5, 6]


def test_off_when_per_user_is_zero():
    r = RecentItems(0)
    assert r.record(_u(1), _u(2), np.array([0])) == 0 and len(r) == 0


class _Reference:
    """The specification in plain Python: per user, offset -> item, newest ``per_user`` kept."""

    def __init__(self, per_user: int):
        self.per_user, self.users = per_user, {}

    def record(self, users, items, offsets) -> int:
        if not self.per_user:
            return 0
        added, touched = 0, set()
        for u, i, o in zip(users.tolist(), items.tolist(), offsets.tolist()):
            kept = self.users.setdefault(u, {})
            if o not in kept:
                kept[o], added = i, added + 1
                touched.add(u)
        for u in touched:
            kept = self.users[u]
            for o in sorted(kept)[: max(len(kept) - self.per_user, 0)]:
                del kept[o]
        return added

    def items_of(self, u) -> list[int]:
        kept = self.users.get(u, {})
        return [kept[o] for o in sorted(kept)]

    def forget_items(self, items) -> int:
        drop, gone = set(items.tolist()), 0
        for u in list(self.users):
            kept = self.users[u]
            for o in [o for o, i in kept.items() if i in drop]:
                del kept[o]
                gone += 1
            if not kept:
                del self.users[u]
        return gone

    def forget_users(self, users) -> int:
        return sum(self.users.pop(u, None) is not None for u in users.tolist())


@pytest.mark.parametrize("per_user", [1, 3, 8, 9, 40, 130, 1000])
def test_matches_the_reference_under_random_operations(per_user):
    """Appends that move users up tiers and past the cap, second deliveries, late and
    repeated entries, forgetting, and a capture/load round trip, against the plain-Python
    specification after every operation."""
    rng = np.random.default_rng(per_user)
    r, ref = RecentItems(per_user), _Reference(per_user)
    next_off = 0
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for step in range(150):
        op = rng.random()
        if op < 0.55:  # fresh events, skewed users: some reach every tier and the cap
            n = int(rng.integers(1, 400))
            users = (rng.zipf(1.3, n) % 60).astype(np.uint64)
            args = (users, rng.integers(0, 50, n).astype(np.uint64), np.arange(next_off, next_off + n))
            next_off += n
            history.append(args)
        elif op < 0.8 and history:  # an earlier batch again (the trainer's delivery), maybe cut and shuffled
            u, i, o = history[int(rng.integers(len(history)))]
            sel = rng.permutation(len(u))[: int(rng.integers(1, len(u) + 1))]
            args = (u[sel], i[sel], o[sel])
        elif op < 0.92:  # late entries mixed with repeats and fresh ones, in any order
            n = int(rng.integers(1, 60))
            args = ((rng.integers(0, 60, n)).astype(np.uint64), rng.integers(0, 50, n).astype(np.uint64),
                    rng.integers(0, next_off + 5, n))
            next_off += 5
        elif op < 0.96:
            items = rng.integers(0, 50, int(rng.integers(1, 4))).astype(np.uint64)
            assert r.forget_items(items) == ref.forget_items(items), step
            args = None
        else:
            users = rng.integers(0, 60, int(rng.integers(1, 6))).astype(np.uint64)
            assert r.forget_users(users) == ref.forget_users(users), step
            args = None
        if args is not None:
            assert r.record(*args) == ref.record(*args), step
        assert len(r) == len(ref.users) and r.entries() == sum(map(len, ref.users.values())), step
        assert all(r.items_of(u).tolist() == ref.items_of(u) for u in range(60)), step
        asked = rng.integers(0, 70, 12).astype(np.uint64)  # some unknown, some repeated
        assert [x.tolist() for x in r.lists(asked)] == [ref.items_of(u) for u in asked.tolist()], step
    s = RecentItems(per_user)
    s.load(*r.capture())
    assert all(s.items_of(u).tolist() == ref.items_of(u) for u in range(60))
    assert s.capture()[1].tolist() == r.capture()[1].tolist()


def test_nbytes_is_what_the_entries_hold():
    """``nbytes`` (reported in ``/stats``) within a quarter of what Python actually allocates."""
    import tracemalloc

    rng = np.random.default_rng(3)
    users = (rng.zipf(1.5, 60_000) % 20_000).astype(np.uint64) * np.uint64(2654435761)
    tracemalloc.start()
    try:
        r = RecentItems(50)
        for s in range(0, len(users), 4096):
            r.record(users[s : s + 4096], rng.integers(0, 500, len(users[s : s + 4096])).astype(np.uint64),
                     np.arange(s, s + len(users[s : s + 4096])))
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert r.nbytes() >= 16 * r.entries() + 13 * len(r)  # an entry's offset and item; the user map's entry
    assert abs(r.nbytes() / held - 1) < 0.25, (r.nbytes(), held)


def test_a_tier_past_its_place_limit_is_refused_before_anything_changes():
    import ps.recent

    r = RecentItems(4)
    r.record(_u(7), _u(70), np.array([0]))
    r._tiers[0].top = ps.recent._MAX_ROWS - 1  # as if 2**27 - 1 users had rows there
    with pytest.raises(ValueError, match="users in one tier"):
        r.record(_u(1, 2), _u(10, 20), np.array([1, 2]))
    assert len(r) == 1 and r.items_of(7).tolist() == [70] and r.items_of(1).tolist() == []


def test_rowless_sweep_drops_only_quiet_rowless_users_and_never_those_kept():
    # keep: users of batches not pushed yet (a trainer's read-ahead), whose push may still
    # admit them; dropping them would lose the session context of a user about to get a row.
    sweep = RowlessSweep(60.0, now=0.0)
    has_row = {1}

    def rowless(users: np.ndarray) -> np.ndarray:
        return np.array([int(u) not in has_row for u in users.tolist()], bool)

    def held() -> np.ndarray:
        return _u(1, 2, 3, 4, 5)

    sweep.note(_u(2))
    assert sweep.sweep(59.0, held, rowless) is None  # under every_s since the last sweep
    # 1 has a row, 2 had an event, 3 is kept: only 4 and 5 (rowless, quiet) go.
    assert sorted(sweep.sweep(60.0, held, rowless, keep=_u(3)).tolist()) == [4, 5]
    # Later sweeps look at what they kept without a row and at recent traffic: 2 and 3, quiet
    # since, go now (3 no longer kept); 6, just active, at the next.
    sweep.note(_u(6))
    assert sorted(sweep.sweep(120.0, held, rowless).tolist()) == [2, 3]
    assert sorted(sweep.sweep(180.0, held, rowless).tolist()) == [6]
