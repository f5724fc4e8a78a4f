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

from collections.abc import Callable

import numpy as np

from ps.index import KeyIndex

__all__ = ["RecentItems", "RowlessSweep"]

_EMPTY_I = np.empty(0, np.int64)
_EMPTY_K = np.empty(0, np.uint64)

_BASE = 8  # entries per row of the smallest tier: most users of a skewed stream fit there
_GROWTH = 4  # each tier's rows hold 4x the entries of the one below: a user moves O(log) times
# A user's place is one int, row << 4 | tier (8 tiers at most: per_user <= 100,000), stored
# as a KeyIndex slot (below 2**31), so a tier holds up to 2**27 users: 134M on one shard.
_TIER_BITS = 4
_MAX_ROWS = 1 << (31 - _TIER_BITS)


class _Tier:
    """Rows of ``width`` entries: a user's ``(offset, item)`` entries ascending, ``n`` of them."""

    __slots__ = ("width", "n", "user", "off", "item", "free", "top")

    def __init__(self, width: int, capacity: int):
        self.width = width
        self.n = np.zeros(capacity, np.int64)  # entries per row (0: free)
        self.user = np.zeros(capacity, np.uint64)  # user key of each row
        self.off = np.zeros((capacity, width), np.int64)
        self.item = np.zeros((capacity, width), np.uint64)
        self.free: list[int] = []
        self.top = 0

    def rows(self, k: int) -> np.ndarray:
        """``k`` free rows (reused ones first), growing the arrays as needed."""
        reuse = self.free[-k:] if k else []
        del self.free[len(self.free) - len(reuse):]
        fresh = k - len(reuse)
        if self.top + fresh > len(self.n):
            cap = max(self.top + fresh, 2 * len(self.n))
            # Rows are written before they are read (a row's count says how much of it holds
            # entries), so only the rows in use are copied; the new ones stay untouched.
            self.n = np.concatenate([self.n, np.zeros(cap - len(self.n), np.int64)])
            self.user, self.off, self.item = (_grown(a, cap, self.top) for a in (self.user, self.off, self.item))
        rows = np.concatenate([np.asarray(reuse, np.int64)[::-1], np.arange(self.top, self.top + fresh)])
        self.top += fresh
        return rows

    def release(self, rows: np.ndarray) -> None:
        self.n[rows] = 0
        self.free.extend(np.asarray(rows, np.int64).tolist())


class RecentItems:
    """Up to ``per_user`` ``(offset, item key)`` entries per user key, newest by offset kept.

    A user's entries sit in one row of a tier of dense arrays whose rows hold 8, 32, 128,
    ... entries (the last tier exactly ``per_user``); a user outgrowing their row moves up
    a tier. Recording a batch is a few array operations whatever the number of users,
    including users at the cap; only entries older than some the user already keeps that
    are not already kept (a late delivery) take a per-user step. Memory (:meth:`nbytes`):
    about 180–230 bytes per user with at most 8 entries (measured, the arrays' growth slack
    included), and 16 bytes per entry slot of a larger tier's row (at most 4x the user's
    entries). The user map is a :class:`ps.index.KeyIndex` (34–46 bytes a user measured at
    10,000–300,000 users; a dict took 101–124 and one Python call per user of every batch).
    """

    def __init__(self, per_user: int):
        if per_user < 0:
            raise ValueError(f"per_user: must be >= 0, got {per_user}")
        self.per_user = int(per_user)
        widths, w = [], _BASE
        while w < self.per_user:
            widths.append(w)
            w *= _GROWTH
        if self.per_user:
            widths.append(self.per_user)
        self._widths = np.asarray(widths, np.int64)
        self._reset()

    def _reset(self) -> None:
        self._where = KeyIndex(1024)  # user key -> row << _TIER_BITS | tier
        self._tiers = [_Tier(int(w), 1024 if t == 0 else 16) for t, w in enumerate(self._widths)]

    def __len__(self) -> int:
        return len(self._where)

    def entries(self) -> int:
        """Entries kept over all users."""
        return sum(int(t.n[: t.top].sum()) for t in self._tiers)

    def nbytes(self) -> int:
        """Bytes of memory held: the tiers' arrays (free rows included) and the user map's."""
        tiers = sum(a.nbytes for t in self._tiers for a in (t.n, t.user, t.off, t.item))
        return tiers + self._where.nbytes()

    # -- one user ---------------------------------------------------------------------------
    def _tier_for(self, k: int) -> int:
        return int(np.searchsorted(self._widths, k))

    def _code(self, user: int) -> int:
        """The user's place, -1 for an unknown user."""
        return int(self._where.lookup(np.asarray([user], np.uint64))[0])

    def _release_codes(self, codes: np.ndarray) -> None:
        """Free the rows of the places ``codes`` (distinct; their users already left the map)."""
        for t, tr in enumerate(self._tiers):
            rows = codes[(codes & _MASK) == t] >> _TIER_BITS
            if rows.size:
                tr.release(rows)

    def _release(self, user: int) -> None:
        codes = self._where.remove(np.asarray([user], np.uint64))
        self._release_codes(codes[codes >= 0])

    def _entries(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the offsets and items kept at the place ``code`` (a known user's)."""
        t, r = self._tiers[code & _MASK], code >> _TIER_BITS
        n = int(t.n[r])
        return t.off[r, :n], t.item[r, :n]

    def _get(self, user: int) -> tuple[np.ndarray, np.ndarray] | None:
        code = self._code(user)
        return None if code < 0 else self._entries(code)

    def _put(self, user: int, o: np.ndarray, i: np.ndarray) -> None:
        """Store ``user``'s entries (ascending by offset, at most ``per_user``; not views of
        the user's own row), wherever they fit."""
        k = len(o)
        if not k:
            self._release(user)
            return
        want = self._tier_for(k)
        code = self._code(user)
        if code >= 0 and code & _MASK == want:
            r = code >> _TIER_BITS
        else:
            self._release(user)
            r = int(self._tiers[want].rows(1)[0])
            self._where.insert(np.asarray([user], np.uint64), np.asarray([r << _TIER_BITS | want]), absent=True)
            self._tiers[want].user[r] = user
        t = self._tiers[want]
        t.off[r, :k] = o
        t.item[r, :k] = i
        t.n[r] = k

    # -- recording -------------------------------------------------------------------------
    def record(self, users: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> int:
        """Add ``(user, offset, item)`` entries (``uint64``, ``int64``, ``uint64`` ``[n]``);
        entries whose offset the user already has are ignored. Returns entries added.

        Raises:
            ValueError: a tier could pass 2**27 users (nothing changes).
        """
        if self.per_user == 0 or not len(users):
            return 0
        users = np.asarray(users, np.uint64)
        items = np.asarray(items, np.uint64)
        offsets = np.asarray(offsets, np.int64)
        if max(t.top for t in self._tiers) + len(users) > _MAX_ROWS:
            # Checked before anything moves: a place past the limit would fail half-way.
            raise ValueError(f"recent items: more than {_MAX_ROWS} users in one tier of a shard")
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
        codes = self._where.lookup(keys)
        known = codes >= 0
        tier = np.where(known, codes & _MASK, -1)
        row = np.where(known, codes >> _TIER_BITS, 0)
        have = np.zeros(len(keys), np.int64)
        last = np.full(len(keys), np.iinfo(np.int64).min, np.int64)
        for t, tr in enumerate(self._tiers):
            m = np.flatnonzero(tier == t)
            if m.size:
                have[m] = tr.n[row[m]]
                last[m] = tr.off[row[m], np.maximum(have[m] - 1, 0)]
        append = ~known | (offsets[starts] > last)  # a new user, or newer than everything the user keeps
        added = 0
        slow = np.empty(0, np.int64)
        if not append.all():
            # The usual non-append is a second delivery (the trainer's of what the app recorded
            # at /events): every entry already held, nothing to do.
            e = np.flatnonzero(~append[group])
            g = group[e]
            held = self._held(tier[g], row[g], have[g], offsets[e])
            missing = np.bincount(g[~held], minlength=len(keys))
            slow = np.flatnonzero(~append & (missing > 0))
        if append.any():
            added += self._append(np.flatnonzero(append), keys, known, tier, row, have, counts, group, col,
                                  offsets, items)
        # The rest one user at a time: entries older than some kept and not held yet.
        cap = self.per_user
        ends = starts + counts
        for g in slow.tolist():
            u, lo, hi = int(keys[g]), int(starts[g]), int(ends[g])
            new_o, new_i = offsets[lo:hi], items[lo:hi]
            old_o, old_i = self._get(u)
            at = np.minimum(old_o.searchsorted(new_o), len(old_o) - 1)  # kept offsets are sorted
            fresh = old_o[at] != new_o
            added += int(fresh.sum())
            o = np.concatenate((old_o, new_o[fresh]))
            i = np.concatenate((old_i, new_i[fresh]))
            srt = np.argsort(o, kind="stable")
            o, i = o[srt][-cap:], i[srt][-cap:]
            self._put(u, o, i)
        return added

    def _held(self, tier: np.ndarray, row: np.ndarray, have: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Whether each entry's offset is among its user's kept ones (``tier``/``row``/``have``
        per entry): one binary search over every row at once per tier."""
        held = np.zeros(len(offsets), bool)
        for t, tr in enumerate(self._tiers):
            m = np.flatnonzero(tier == t)
            if not m.size:
                continue
            r, o, h = row[m], offsets[m], have[m]
            lo, hi = np.zeros(len(m), np.int64), h.copy()
            while True:  # first kept offset >= o
                active = lo < hi
                if not active.any():
                    break
                mid = (lo + hi) // 2
                below = tr.off[r, np.minimum(mid, tr.width - 1)] < o
                lo = np.where(active & below, mid + 1, lo)
                hi = np.where(active & ~below, mid, hi)
            held[m] = (lo < h) & (tr.off[r, np.minimum(lo, tr.width - 1)] == o)
        return held

    def _append(self, gs, keys, known, tier, row, have, counts, group, col, offsets, items) -> int:
        """Append each group ``gs``'s entries (all newer than what its user keeps), keeping
        the newest ``per_user``; users move to the tier their entries now need."""
        cap = self.per_user
        keys, known, tier, row, have = keys[gs], known[gs], tier[gs], row[gs], have[gs]  # per group of gs
        total = have + counts[gs]
        keep = np.minimum(total, cap)
        drop = total - keep  # oldest entries that fall out, old ones first
        keep_old = np.maximum(have - drop, 0)
        skip_new = np.maximum(drop - have, 0)
        dst = np.searchsorted(self._widths, keep)
        stay = known & (dst == tier)
        # Old entries that must be rewritten: a user changing rows, or one at the cap whose
        # oldest fall out (the rest shift to the row's front). Gathered before rows are freed.
        move_old = np.flatnonzero(known & (keep_old > 0) & (~stay | (drop > 0)))
        lens = keep_old[move_old]
        fg = np.repeat(move_old, lens)  # position in gs of each old entry rewritten
        fj = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        old_o, old_i = np.empty(len(fg), np.int64), np.empty(len(fg), np.uint64)
        for t, tr in enumerate(self._tiers):
            m = np.flatnonzero(tier[fg] == t)
            if m.size:
                src_r, src_c = row[fg[m]], drop[fg[m]] + fj[m]
                old_o[m], old_i[m] = tr.off[src_r, src_c], tr.item[src_r, src_c]
        moving = np.flatnonzero(~stay)
        drow = row.copy()
        for t, tr in enumerate(self._tiers):
            leave = moving[known[moving] & (tier[moving] == t)]
            if leave.size:
                tr.release(row[leave])
        for t, tr in enumerate(self._tiers):
            arrive = moving[dst[moving] == t]
            if arrive.size:
                drow[arrive] = tr.rows(arrive.size)
                tr.user[drow[arrive]] = keys[arrive]
        if moving.size:
            codes = (drow[moving] << _TIER_BITS) | dst[moving]
            old = known[moving]
            self._where.update(keys[moving][old], codes[old])
            self._where.insert(keys[moving][~old], codes[~old], absent=True)  # looked up above: absent
        # Each group's new entries, without those that fall out at once.
        pos_of = np.full(len(counts), -1, np.int64)  # every group's position in gs, -1 outside it
        pos_of[gs] = np.arange(len(gs))
        e = np.flatnonzero(pos_of[group] >= 0)
        p = pos_of[group[e]]
        e_keep = col[e] >= skip_new[p]
        e, p = e[e_keep], p[e_keep]
        for t, tr in enumerate(self._tiers):
            m = np.flatnonzero(dst[fg] == t)
            if m.size:
                tr.off[drow[fg[m]], fj[m]], tr.item[drow[fg[m]], fj[m]] = old_o[m], old_i[m]
            m = np.flatnonzero(dst[p] == t)
            if m.size:
                c = keep_old[p[m]] + col[e[m]] - skip_new[p[m]]
                tr.off[drow[p[m]], c], tr.item[drow[p[m]], c] = offsets[e[m]], items[e[m]]
            m = np.flatnonzero(dst == t)
            if m.size:
                tr.n[drow[m]] = keep[m]
        return int(counts[gs].sum())

    # -- reading and forgetting --------------------------------------------------------------
    def users(self) -> np.ndarray:
        """The users with recent items (``uint64`` keys, in no particular order)."""
        return self._where.keys()

    def items_of(self, user: int) -> np.ndarray:
        """The user's item keys, oldest first (``uint64``; empty for an unknown user)."""
        return self.lists(np.asarray([user], np.uint64))[0]

    def lists(self, users: np.ndarray) -> list[np.ndarray]:
        """:meth:`items_of` of each of ``users`` (``uint64 [n]`` keys), in the order given
        (one lookup for them all)."""
        codes = self._where.lookup(np.asarray(users, np.uint64)).tolist()
        return [_EMPTY_K if code < 0 else self._entries(code)[1].copy() for code in codes]

    def forget_users(self, users: np.ndarray) -> int:
        """Drop everything kept for ``users`` (keys); returns how many users went."""
        codes = self._where.remove(np.unique(np.asarray(users, np.uint64)))
        codes = codes[codes >= 0]
        self._release_codes(codes)
        return len(codes)

    def forget_items(self, items: np.ndarray) -> int:
        """Drop every entry of the item keys ``items``; returns how many entries went."""
        items = np.asarray(items, np.uint64)
        if not len(items) or not len(self._where):
            return 0
        gone, emptied = 0, []
        for tr in self._tiers:
            valid = np.arange(tr.width)[None, :] < tr.n[: tr.top, None]
            hit = np.isin(tr.item[: tr.top], items) & valid
            rows = np.flatnonzero(hit.any(1))
            if not rows.size:
                continue
            gone += int(hit[rows].sum())
            # The entries left slide to the front of their row, in order (a user stays in
            # their tier; the next append that fits a smaller one moves them).
            keep = valid[rows] & ~hit[rows]
            r, c = np.nonzero(keep)
            to = (np.cumsum(keep, axis=1) - 1)[r, c]
            o, i = tr.off[rows[r], c], tr.item[rows[r], c]
            tr.off[rows[r], to], tr.item[rows[r], to] = o, i
            tr.n[rows] = keep.sum(1)
            emptied += tr.user[rows[tr.n[rows] == 0]].tolist()
        self.forget_users(np.asarray(emptied, np.uint64))
        return gone

    def capture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users uint64, offsets int64, items uint64)``, flat, users in ascending key order."""
        if not len(self._where):
            return _EMPTY_K, _EMPTY_I, _EMPTY_K
        parts_u, parts_o, parts_i = [], [], []
        for tr in self._tiers:
            rr = np.flatnonzero(tr.n[: tr.top] > 0)
            if rr.size:
                cnt = tr.n[rr]
                mask = np.arange(tr.width)[None, :] < cnt[:, None]
                parts_u.append(np.repeat(tr.user[rr], cnt))
                parts_o.append(tr.off[rr][mask])
                parts_i.append(tr.item[rr][mask])
        users, offsets, items = np.concatenate(parts_u), np.concatenate(parts_o), np.concatenate(parts_i)
        order = np.lexsort((offsets, users))
        return users[order], offsets[order], items[order]

    def load(self, users: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> None:
        """Replace everything with the flat arrays :meth:`capture` gives."""
        self._reset()
        self.record(users, items, offsets)


class RowlessSweep:
    """Finds the users who hold per-user state (a shard's recent items, a trainer's histories)
    without a row in the user table and with no event for a while: a user who never gets a row
    (not admitted, turned away by a full table) is named by no removal, and one-off users would
    otherwise keep that state forever.

    A sweep runs at most every ``every_s`` seconds and names the users without a row that had
    no event noted (:meth:`note`) since the previous one. Only the users noted since then and
    those kept then without a row are looked at (every user at the first sweep of a process),
    so a sweep costs what the recent traffic is, not what is held.
    """

    def __init__(self, every_s: float, now: float):
        self.every_s = every_s
        self.swept_at = now
        self._noted: list[np.ndarray] = []  # user keys with an event since the last sweep
        self._rowless: np.ndarray | None = None  # kept at the last sweep without a row (None: not swept yet)

    def note(self, users: np.ndarray) -> None:
        """Users (``uint64 [n]`` keys) with an event now."""
        self._noted.append(users)
        if len(self._noted) >= 256:  # a sweep interval can hold many calls: keep them compact
            self._noted = [np.unique(np.concatenate(self._noted))]

    def sweep(self, now: float, held: Callable[[], np.ndarray], rowless: Callable[[np.ndarray], np.ndarray],
              keep: np.ndarray | None = None) -> np.ndarray | None:
        """The users to drop (``uint64 [k]``), or None when the last sweep is under ``every_s``
        seconds before ``now`` (in the clock given to the constructor).

        ``held()``: every user holding state (``uint64``; asked at the first sweep only);
        ``rowless(users)``: ``bool [n]``, which of ``users`` have no row; ``keep``: users kept
        whatever (``uint64``; say, those of batches whose push may still give them a row).
        """
        if now - self.swept_at < self.every_s:
            return None
        self.swept_at = now
        noted = np.unique(np.concatenate(self._noted)) if self._noted else np.empty(0, np.uint64)
        self._noted = []
        pool = held() if self._rowless is None else np.union1d(self._rowless, noted)
        pool = pool[rowless(pool)] if len(pool) else pool
        quiet = ~np.isin(pool, noted)
        if keep is not None:
            quiet &= ~np.isin(pool, keep)
        self._rowless = pool[~quiet]
        return pool[quiet]


_MASK = (1 << _TIER_BITS) - 1


def _grown(a: np.ndarray, cap: int, used: int) -> np.ndarray:
    out = np.empty((cap, *a.shape[1:]), a.dtype)
    out[:used] = a[:used]
    return out
