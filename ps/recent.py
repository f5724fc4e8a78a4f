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

import numpy as np

__all__ = ["RecentItems"]

_EMPTY_I = np.empty(0, np.int64)
_EMPTY_K = np.empty(0, np.uint64)


class RecentItems:
    """Up to ``per_user`` ``(offset, item key)`` entries per user key, newest by offset kept.

    Memory is 16 bytes per entry plus about 200 bytes per user.
    """

    def __init__(self, per_user: int):
        if per_user < 0:
            raise ValueError(f"per_user: must be >= 0, got {per_user}")
        self.per_user = int(per_user)
        self._users: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._users)

    def entries(self) -> int:
        """Entries kept over all users."""
        return sum(len(o) for o, _ in self._users.values())

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
        bounds = np.flatnonzero(np.diff(users)) + 1
        added = 0
        for lo, hi in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [len(users)]]).tolist()):
            u = int(users[lo])
            new_o, new_i = offsets[lo:hi], items[lo:hi]
            old = self._users.get(u)
            if old is None:
                o, keep = np.unique(new_o, return_index=True)
                i = new_i[keep]
                added += len(o)
            elif new_o[0] > old[0][-1]:  # the usual case: newer than everything kept
                o, keep = np.unique(new_o, return_index=True)
                i = np.concatenate([old[1], new_i[keep]])
                added += len(o)
                o = np.concatenate([old[0], o])
            else:
                fresh = ~np.isin(new_o, old[0])
                cand_o, keep = np.unique(new_o[fresh], return_index=True)
                added += len(cand_o)
                o = np.concatenate([old[0], cand_o])
                i = np.concatenate([old[1], new_i[fresh][keep]])
                srt = np.argsort(o, kind="stable")
                o, i = o[srt], i[srt]
            if len(o) > self.per_user:
                o, i = o[-self.per_user :], i[-self.per_user :]
            self._users[u] = (o, i)
        return added

    def items_of(self, user: int) -> np.ndarray:
        """The user's item keys, oldest first (``uint64``; empty for an unknown user)."""
        got = self._users.get(int(user))
        return got[1] if got is not None else _EMPTY_K

    def forget_users(self, users: np.ndarray) -> int:
        """Drop everything kept for ``users`` (keys); returns how many users went."""
        return sum(self._users.pop(int(u), None) is not None for u in np.asarray(users, np.uint64).tolist())

    def forget_items(self, items: np.ndarray) -> int:
        """Drop every entry of the item keys ``items``; returns how many entries went."""
        items = np.asarray(items, np.uint64)
        if not len(items) or not self._users:
            return 0
        gone = 0
        for u, (o, i) in list(self._users.items()):
            hit = np.isin(i, items)
            if hit.any():
                gone += int(hit.sum())
                if hit.all():
                    del self._users[u]
                else:
                    self._users[u] = (o[~hit], i[~hit])
        return gone

    def capture(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users uint64, offsets int64, items uint64)``, flat, users in ascending key order."""
        if not self._users:
            return _EMPTY_K, _EMPTY_I, _EMPTY_K
        keys = sorted(self._users)
        users = np.concatenate([np.full(len(self._users[u][0]), u, np.uint64) for u in keys])
        return users, np.concatenate([self._users[u][0] for u in keys]), np.concatenate([self._users[u][1] for u in keys])

    def load(self, users: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> None:
        """Replace everything with the flat arrays :meth:`capture` gives."""
        self._users = {}
        self.record(users, items, offsets)
