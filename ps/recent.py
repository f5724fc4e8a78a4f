"""Each user's most recent items: what ``exclude_seen`` leaves out and the session context
is built from, kept on the shard that owns the user.

Entries are ``(offset, item key)``: the event's offset in its ingest partition (a user's
events all go to one partition, so a user's offsets are comparable) and the item's key.
Two paths record the same events: the Serve app right after ``POST /events`` made them
durable (so a user's next ``/rank`` sees them, whatever the trainers' lag), and the
trainers with their pushes (so nothing acknowledged is missed if the first path failed
after the append). Recording is idempotent by offset, so the second delivery changes
nothing, and order-insensitive: entries are kept sorted by offset.
"""

from __future__ import annotations

from itertools import repeat as _forever

import numpy as np

__all__ = ["RecentItems"]

_EMPTY_I = np.empty(0, np.int64)
_EMPTY_K = np.empty(0, np.uint64)


_RING = 8  # entries a user keeps in the dense arrays; a user with more moves to a dict of arrays


class RecentItems:
    """Up to ``per_user`` ``(offset, item key)`` entries per user key, newest by offset kept.

    A user with at most 8 entries (most users of a skewed stream) keeps them in one row of
    dense arrays, so recording a batch is a few array operations whatever the number of
    users; a user with more keeps two arrays of their own. Memory is about 250 bytes per
    user, plus 16 bytes per entry beyond the first 8.
    """

    def __init__(self, per_user: int):
        if per_user < 0:
            raise ValueError(f"per_user: must be >= 0, got {per_user}")
        self.per_user = int(per_user)
        self._ring = max(1, min(_RING, self.per_user))
        self._reset()

    def _reset(self, capacity: int = 1024) -> None:
        self._row: dict[int, int] = {}  # user key -> row of the dense arrays, or -1 for a user in _big
        self._big: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # user key -> (offsets, items), ascending
        self._n = np.zeros(capacity, np.int64)  # entries per row (0: free)
        self._user = np.zeros(capacity, np.uint64)  # user key of each row
        self._off = np.zeros((capacity, self._ring), np.int64)
        self._item = np.zeros((capacity, self._ring), np.uint64)
        self._free: list[int] = []
        self._top = 0

    def __len__(self) -> int:
        return len(self._row)

    def entries(self) -> int:
        """Entries kept over all users."""
        return int(self._n[: self._top].sum()) + sum(len(o) for o, _ in self._big.values())

    # -- rows ------------------------------------------------------------------------------
    def _rows(self, k: int) -> np.ndarray:
        """``k`` free rows (reused ones first), growing the arrays as needed."""
        reuse = self._free[-k:] if k else []
        del self._free[len(self._free) - len(reuse):]
        fresh = k - len(reuse)
        if self._top + fresh > len(self._n):
            cap = max(self._top + fresh, 2 * len(self._n))
            grow = cap - len(self._n)
            self._n = np.concatenate([self._n, np.zeros(grow, np.int64)])
            # Rows are written before they are read (a row's count says how much of it holds
            # entries), so only the rows in use are copied; the new ones stay untouched.
            self._user, self._off, self._item = (_grown(a, cap) for a in (self._user, self._off, self._item))
        rows = np.concatenate([np.asarray(reuse, np.int64)[::-1], np.arange(self._top, self._top + fresh)])
        self._top += fresh
        return rows

    def _release(self, user: int) -> None:
        row = self._row.pop(user, None)
        if row is None:
            return
        if row < 0:
            del self._big[user]
        else:
            self._n[row] = 0
            self._free.append(row)

    def _get(self, user: int) -> tuple[np.ndarray, np.ndarray] | None:
        row = self._row.get(user)
        if row is None:
            return None
        if row < 0:
            return self._big[user]
        n = int(self._n[row])
        return self._off[row, :n], self._item[row, :n]

    def _put(self, user: int, o: np.ndarray, i: np.ndarray) -> None:
        """Store ``user``'s entries (ascending by offset, at most ``per_user``), wherever they fit."""
        row = self._row.get(user)
        if len(o) <= self._ring:
            if row is None or row < 0:
                if row is not None:
                    del self._big[user]
                row = int(self._rows(1)[0])
                self._row[user] = row
                self._user[row] = user
            self._off[row, : len(o)] = o
            self._item[row, : len(o)] = i
            self._n[row] = len(o)
        else:
            if row is not None and row >= 0:
                self._n[row] = 0
                self._free.append(row)
            self._row[user] = -1
            self._big[user] = (np.array(o, np.int64), np.array(i, np.uint64))

    # -- recording -------------------------------------------------------------------------
    def record(self, users: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> int:
        """Add ``(user, offset, item)`` entries (``uint64``, ``int64``, ``uint64`` ``[n]``);
        entries whose offset the user already has are ignored. Returns entries added."""
        if self.per_user == 0 or not len(users):
            return 0
        users = np.asarray(users, np.uint64)
        items = np.asarray(items, np.uint64)
        offsets = np.asarray(offsets, np.int64)
        order = np.lexsort((offsets, users))
        users, items, offsets = users[order], items[order], offsets[order]
        n = len(users)
        head = np.empty(n, bool)
        head[0] = True
        np.not_equal(users[1:], users[:-1], out=head[1:])
        # A (user, offset) repeated within the call counts once: its first entry is kept.
        repeat = ~head[1:] & (offsets[1:] == offsets[:-1])
        if repeat.any():
            keep = np.concatenate(([True], ~repeat))
            users, items, offsets, head = users[keep], items[keep], offsets[keep], head[keep]
            n = len(users)
        starts = np.flatnonzero(head)
        counts = np.diff(np.append(starts, n))
        group = np.cumsum(head) - 1  # each entry's group (user)
        col = np.arange(n) - starts[group]  # its position within the group
        keys = users[starts]
        # -2: a new user, -1: a user in _big (map with dict.get runs in C: no Python per user)
        rows = np.fromiter(map(self._row.get, keys.tolist(), _forever(-2)), np.int64, len(keys))
        have = np.where(rows >= 0, self._n[np.maximum(rows, 0)], 0)
        last = np.where(have > 0, self._off[np.maximum(rows, 0), np.maximum(have - 1, 0)], np.iinfo(np.int64).min)
        fits = rows != -1
        fits &= have + counts <= self._ring
        fits &= offsets[starts] > last  # newer than everything kept: a plain append
        added = 0
        # Users whose entries the row already holds, every one (the trainer delivering what
        # the app recorded at /events): nothing to do.
        ring = (rows >= 0) & ~fits
        if ring.any():
            e = ring[group]
            r = rows[group[e]]
            held = ((self._off[r] == offsets[e][:, None]) & (np.arange(self._ring) < have[group[e]][:, None])).any(1)
            missing = np.zeros(len(keys), np.int64)
            np.add.at(missing, group[e][~held], 1)
            fits |= ring & (missing == 0)  # counted as done, and skipped below
            easy_mask = fits & ~ring
        else:
            easy_mask = fits
        easy = np.flatnonzero(easy_mask)
        if easy.size:
            new = easy[rows[easy] == -2]
            if new.size:
                rows[new] = self._rows(new.size)
                self._row.update(zip(keys[new].tolist(), rows[new].tolist()))
                self._user[rows[new]] = keys[new]
            e = easy_mask[group]
            r, c = rows[group[e]], have[group[e]] + col[e]
            self._off[r, c] = offsets[e]
            self._item[r, c] = items[e]
            self._n[rows[easy]] = have[easy] + counts[easy]
            added += int(counts[easy].sum())
        # The rest one user at a time: duplicates (the app recorded them first), entries
        # older than some kept, and users outgrowing their row or ``per_user``.
        cap = self.per_user
        ends = starts + counts
        for g in np.flatnonzero(~fits).tolist():
            u, lo, hi = int(keys[g]), int(starts[g]), int(ends[g])
            new_o, new_i = offsets[lo:hi], items[lo:hi]
            old = self._get(u)
            if old is None:
                o, i = new_o, new_i
                added += hi - lo
            elif new_o[0] > old[0][-1]:
                o, i = np.concatenate((old[0], new_o)), np.concatenate((old[1], new_i))
                added += hi - lo
            else:
                at = np.minimum(old[0].searchsorted(new_o), len(old[0]) - 1)  # kept offsets are sorted
                fresh = old[0][at] != new_o
                if not fresh.any():
                    continue
                added += int(fresh.sum())
                o = np.concatenate((old[0], new_o[fresh]))
                i = np.concatenate((old[1], new_i[fresh]))
                srt = np.argsort(o, kind="stable")
                o, i = o[srt], i[srt]
            if len(o) > cap:
                o, i = o[-cap:], i[-cap:]
            self._put(u, o, i)
        return added

    # -- reading and forgetting --------------------------------------------------------------
    def items_of(self, user: int) -> np.ndarray:
        """The user's item keys, oldest first (``uint64``; empty for an unknown user)."""
        got = self._get(int(user))
        return got[1].copy() if got is not None else _EMPTY_K

    def forget_users(self, users: np.ndarray) -> int:
        """Drop everything kept for ``users`` (keys); returns how many users went."""
        gone = 0
        for u in np.asarray(users, np.uint64).tolist():
            if u in self._row:
                self._release(u)
                gone += 1
        return gone

    def forget_items(self, items: np.ndarray) -> int:
        """Drop every entry of the item keys ``items``; returns how many entries went."""
        items = np.asarray(items, np.uint64)
        if not len(items) or not self._row:
            return 0
        top = self._top
        valid = np.arange(self._ring)[None, :] < self._n[:top, None]
        hit = np.isin(self._item[:top], items) & valid
        gone = int(hit.sum())
        victims = self._user[:top][hit.any(1)].tolist()
        for u, (o, i) in self._big.items():
            h = np.isin(i, items)
            if h.any():
                gone += int(h.sum())
                victims.append(u)
        for u in victims:
            o, i = self._get(u)
            keep = ~np.isin(i, items)
            if keep.all():
                continue
            o, i = o[keep].copy(), i[keep].copy()
            if not len(o):
                self._release(u)
            else:
                self._put(u, o, i)
        return gone

    def capture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users uint64, offsets int64, items uint64)``, flat, users in ascending key order."""
        if not self._row:
            return _EMPTY_K, _EMPTY_I, _EMPTY_K
        rr = np.flatnonzero(self._n[: self._top] > 0)
        parts_u, parts_o, parts_i = [], [], []
        if rr.size:
            ru = self._user[rr]
            cnt = self._n[rr]
            mask = np.arange(self._ring)[None, :] < cnt[:, None]
            parts_u.append(np.repeat(ru, cnt))
            parts_o.append(self._off[rr][mask])
            parts_i.append(self._item[rr][mask])
        for u, (o, i) in self._big.items():
            parts_u.append(np.full(len(o), u, np.uint64))
            parts_o.append(o)
            parts_i.append(i)
        users, offsets, items = np.concatenate(parts_u), np.concatenate(parts_o), np.concatenate(parts_i)
        order = np.lexsort((offsets, users))
        return users[order], offsets[order], items[order]

    def load(self, users: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> None:
        """Replace everything with the flat arrays :meth:`capture` gives."""
        self._reset()
        self.record(users, items, offsets)


def _grown(a: np.ndarray, cap: int) -> np.ndarray:
    out = np.empty((cap, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out
