"""RecentItems: users' recent items, bounded, idempotent by offset, in offset order."""

from __future__ import annotations

import numpy as np

from ps.recent import RecentItems


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


def test_off_when_per_user_is_zero():
    r = RecentItems(0)
    assert r.record(_u(1), _u(2), np.array([0])) == 0 and len(r) == 0
