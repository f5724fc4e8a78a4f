"""A vectorised hash index from 64-bit keys to table slots.

A shard's table finds an ID's row by the ID's 64-bit key (``ps.ids.id_keys``).
``KeyIndex`` keeps that map in numpy arrays and answers a whole batch with a few dozen
array operations, so the pull/push path makes no Python call per ID.

Design (SwissTable's tags and F14's overflow counts, done with numpy): open addressing
over buckets of 8 entries, probing linearly from bucket to bucket. Each entry has a
``uint64`` key, an ``int32`` slot and a one-byte tag: 7 bits of the key's hash, or
``_EMPTY``. A bucket's 8 tags are read as one ``uint64`` and compared with the wanted
tag in all 8 bytes at once (SWAR), so nearly every key costs one tag read and at most
one key read. Each bucket also counts the keys that probed past it; a search goes on
only past a bucket whose count is not zero. So a removal just empties its entry (no
tombstones pile up under churn), and every 64-bit value is a valid key.

Memory: 13.125 bytes an entry (key 8, slot 4, tag 1, overflow count 1/8), and 1.33 to
4 entries a key: 2.1 at 1,000,000 keys, so 27.5 bytes a key. The index never shrinks, so
after removals it keeps the entries it had.

Why not a library: a Python dict costs a Python call per key; cykhash (khash) ships no
wheels (an sdist built with Cython and a compiler) and deletes one key per Python call;
pandas' khash tables are private API and cannot delete; ``pyarrow.compute.index_in``
builds a hash table of the whole value set on every call; numba adds a JIT compiler and
LLVM (~200 MB) to every process. Measured against them on batches of 20,480 keys at
1,000,000 keys, this index looks up about as fast as the C khash tables, at less memory
a key. ``python -m bench.index_compare`` measures it against the dict.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KeyIndex", "unique_keys"]

_WAYS = 8  # entries per bucket: one uint64 of tags, one 64-byte cache line of keys
_EMPTY = 0x80  # the tag of an unused entry; a used entry's tag is 7 hash bits (high bit clear)
_MAX_LOAD = 0.75  # keys / entries above which an insert grows the table first
_GROW_LOAD = 0.5  # keys / entries right after growing, so growth stays amortised O(1)
_MIN_BUCKETS = 8
_MAX_SLOT = int(np.iinfo(np.int32).max)  # int32 slots keep an entry at 13 bytes
_SATURATED = 255  # an overflow count this high stays put until the next rehash (as in F14)

# Bit tricks on a bucket's 8 tags read as one little-endian uint64 (byte j is entry j).
_U64 = np.dtype("<u8")
_ONES = np.uint64(0x0101010101010101)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_BYTE_INDEX = np.uint64(0x0001020304050607)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: multiplicative (Fibonacci) hashing
_GOLDEN_INV = np.uint64(pow(int(_GOLDEN), -1, 1 << 64))


def _equal_bytes(words: np.ndarray, bytes_x8: np.ndarray) -> np.ndarray:
    """0x80 in each byte where ``words`` equals ``bytes_x8``, 0 elsewhere (exact: the sum
    of two 7-bit halves never carries into the next byte)."""
    x = words ^ bytes_x8
    return ~(((x & _LOW7) + _LOW7) | x | _LOW7)


def _top_byte(flags: np.ndarray) -> np.ndarray:
    """Index (0-7, ``intp``) of the highest flagged byte of each nonzero ``flags``.

    Converting to float64 leaves the highest set bit, 8 * i + 7, in the exponent
    (rounding cannot reach the next power of two: the flags sit 8 bits apart).
    """
    exponent = flags.astype(np.float64).view(np.uint64) >> np.uint64(52)  # 1023 + 8 * i + 7
    return ((exponent - np.uint64(1030)) >> np.uint64(3)).view(np.intp)


def _low_byte(flags: np.ndarray) -> np.ndarray:
    """Index (0-7, ``intp``) of the lowest flagged byte of each nonzero ``flags``."""
    lowest = (flags & (~flags + np.uint64(1))) >> np.uint64(7)  # 1 << 8 * i
    # Multiplying shifts _BYTE_INDEX up by i bytes, which brings its byte 7 - i, holding i, to the top.
    return ((lowest * _BYTE_INDEX) >> np.uint64(56)).view(np.intp)


def _mix(keys: np.ndarray) -> np.ndarray:
    # A bijection, so equal hashes mean equal keys. Folding the high half in first keeps
    # keys that differ only in their top bits (raw counters shifted up, say) apart.
    return (keys ^ (keys >> np.uint64(32))) * _GOLDEN


def _unmix(h: np.ndarray) -> np.ndarray:
    """Inverse of ``_mix``, to name a key known only by its hash."""
    x = h * _GOLDEN_INV
    return x ^ (x >> np.uint64(32))


def _buckets_for(n: int) -> int:
    """Power-of-two bucket count that holds ``n`` keys at ``_GROW_LOAD``."""
    need = -(-int(n) // int(_GROW_LOAD * _WAYS))
    return max(_MIN_BUCKETS, 1 << max(need - 1, 0).bit_length())


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs (``np.unique`` is slower)."""
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    return sorted_values[starts], np.diff(np.append(starts, len(sorted_values)))


def unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(keys, return_index=True, return_inverse=True)`` for ``uint64`` keys,
    several times faster: ``(unique ascending, index of each one's first occurrence,
    inverse int64 [n])``, the very same arrays.

    One sort of ``(key >> b) << b | i`` (``b`` bits hold the position ``i``; numpy sorts a
    plain ``uint64`` array far faster than it argsorts one) orders the keys by their high
    bits and, among equal keys, by position. Distinct keys that share their high bits
    would need a full comparison; they are rare (hashed keys), and then ``np.unique``
    answers instead.
    """
    keys = np.asarray(keys)
    n = len(keys)
    if keys.dtype != np.uint64 or n < 2:
        return np.unique(keys, return_index=True, return_inverse=True)
    bits = np.uint64(max(n - 1, 1).bit_length())
    composite = ((keys >> bits) << bits) | np.arange(n, dtype=np.uint64)
    composite.sort()
    order = (composite & ((np.uint64(1) << bits) - np.uint64(1))).view(np.intp)
    ranked = keys[order]
    step = np.empty(n, bool)
    step[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=step[1:])
    high = composite >> bits
    if (step[1:] & (high[1:] == high[:-1])).any():
        # Two distinct keys share their high bits: the order among them is by position,
        # not by key, so equal keys may not be adjacent.
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        return uniq, first, inverse.reshape(-1)
    starts = np.flatnonzero(step)
    inverse = np.empty(n, np.int64)
    inverse[order] = np.cumsum(step) - 1
    return ranked[starts], order[starts].astype(np.int64), inverse


def _key_array(keys: np.ndarray, op: str) -> np.ndarray:
    arr = np.asarray(keys)
    if arr.dtype != np.uint64:
        raise TypeError(f"{op}: keys must be a uint64 array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{op}: keys must be 1-D, got shape {arr.shape}")
    return arr


def _slot_array(slots: np.ndarray, keys: np.ndarray, op: str) -> np.ndarray:
    """``slots`` checked against ``keys`` for ``op``: integers, one per key, in ``[0, 2**31 - 1]``."""
    slots = np.asarray(slots)
    if slots.dtype.kind not in "iu":
        raise TypeError(f"{op}: slots must be an integer array, got dtype {slots.dtype}")
    if slots.shape != keys.shape:
        raise ValueError(f"{op}: keys and slots differ in shape: {keys.shape} vs {slots.shape}")
    if len(slots):
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi > _MAX_SLOT:
            raise ValueError(f"{op}: slots must be in [0, {_MAX_SLOT}], got {lo if lo < 0 else hi}")
    return slots


def _hash_order(h: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Order that sorts ``h`` by its high bits (so by bucket, at any table size), and a
    hash that occurs twice or None.

    One sort of ``(h >> b) << b | i``, where ``b`` bits hold the position ``i``, is
    several times faster than ``np.argsort``. Hashes that share their high bits are
    rare; only those are compared in full, with a second sort.
    """
    m = len(h)
    bits = np.uint64(max(m - 1, 1).bit_length())
    composite = ((h >> bits) << bits) | np.arange(m, dtype=np.uint64)
    composite.sort()
    order = (composite & ((np.uint64(1) << bits) - np.uint64(1))).view(np.intp)
    twin = np.flatnonzero((composite[1:] >> bits) == (composite[:-1] >> bits))
    if not twin.size:
        return order, None
    close = np.sort(h[order[np.concatenate((twin, twin + 1))]])
    same = close[1:][close[1:] == close[:-1]]
    return order, (int(same[0]) if same.size else None)


class KeyIndex:
    """Map from ``uint64`` keys to non-negative ``int64`` slots, operated on in batches.

    ``capacity`` is the number of keys expected; the index grows by rehashing inside
    ``insert`` when it would pass 3/4 full, and never shrinks. Every 64-bit value is a valid
    key. Results are deterministic: the same calls give the same arrays, including the
    order of ``keys()`` and ``items()``.

    Raises:
        ValueError: ``capacity`` is negative.
    """

    __slots__ = ("_keys", "_overflow", "_shift", "_slots", "_tag_words", "_tags", "_used")

    def __init__(self, capacity: int = 1024):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._allocate(_buckets_for(capacity))

    def _allocate(self, buckets: int) -> None:
        entries = buckets * _WAYS
        self._keys = np.zeros(entries, dtype=np.uint64)
        # One slot past the entries holds -1, so that taking position -1 (not found) reads -1.
        self._slots = np.zeros(entries + 1, dtype=np.int32)
        self._slots[-1] = -1
        self._tags = np.full(entries, _EMPTY, dtype=np.uint8)
        self._tag_words = self._tags.view(_U64)
        self._overflow = np.zeros(buckets, dtype=np.uint8)  # keys that probed past each bucket
        self._shift = np.uint64(64 - (buckets.bit_length() - 1))  # a bucket is its hash's top bits
        self._used = 0

    def __len__(self) -> int:
        """Number of keys stored."""
        return self._used

    def __repr__(self) -> str:
        return f"KeyIndex(len={self._used}, buckets={len(self._overflow)})"

    def __getstate__(self) -> tuple:
        return self._keys, self._slots, self._tags, self._overflow, self._used

    def __setstate__(self, state: tuple) -> None:
        self._keys, self._slots, self._tags, self._overflow, self._used = state
        self._tag_words = self._tags.view(_U64)  # pickling copies arrays, so the view is made anew
        self._shift = np.uint64(64 - (len(self._overflow).bit_length() - 1))

    def nbytes(self) -> int:
        """Bytes of memory the index's arrays hold: 13.125 per entry, with 1.33 to 4
        entries per key (more below ``capacity`` keys or after removals)."""
        return self._keys.nbytes + self._slots.nbytes + self._tags.nbytes + self._overflow.nbytes

    def _home(self, h: np.ndarray) -> np.ndarray:
        return (h >> self._shift).view(np.intp)

    def _tag(self, h: np.ndarray) -> np.ndarray:
        # The 7 hash bits just below the bucket's: the best-mixed bits left.
        return (h >> (self._shift - np.uint64(7))) & np.uint64(0x7F)

    def _find(self, keys: np.ndarray, h: np.ndarray, words: np.ndarray | None = None) -> np.ndarray:
        """Entry positions (``intp [n]``) of ``keys``, whose hashes are ``h``; -1 where absent.
        ``words`` are the home buckets' tags when the caller has read them already."""
        pos = np.full(len(keys), -1, dtype=np.intp)
        bucket = self._home(h)
        tag_x8 = self._tag(h) * _ONES
        # Nearly every key is settled by its home bucket's tags and at most one key.
        match = _equal_bytes(self._tag_words.take(bucket) if words is None else words, tag_x8)
        cand = np.flatnonzero(match)
        at = bucket[cand] * _WAYS + _top_byte(match[cand])
        same = self._keys.take(at) == keys.take(cand)
        pos[cand[same]] = at[same]
        # Search further for the keys not found whose tag matched more entries than the one
        # checked (rare: check those too), and whose home bucket some key probed past
        # (about 1 in 20 at 1/2 load: go on to the next buckets).
        shared = np.flatnonzero((pos < 0) & ((match & (match - np.uint64(1))) != 0))
        if shared.size:
            self._check(keys, shared, bucket[shared], match[shared], pos)
        passed = np.flatnonzero((pos < 0) & (self._overflow.take(bucket) != 0))
        if passed.size:
            self._find_further(keys, bucket[passed] + 1, tag_x8[passed], passed, pos)
        return pos

    def _check(self, keys: np.ndarray, which: np.ndarray, bucket: np.ndarray, flags: np.ndarray, pos: np.ndarray) -> None:
        """Set ``pos`` of ``keys[which]`` where one of the entries flagged (as by
        ``_equal_bytes``) in ``flags`` of ``bucket`` holds the key."""
        cand = np.flatnonzero(flags)
        flags = flags[cand]
        while cand.size:
            byte = _top_byte(flags)
            at = bucket[cand] * _WAYS + byte
            same = self._keys.take(at) == keys.take(which[cand])
            pos[which[cand[same]]] = at[same]
            flags = flags ^ (np.uint64(0x80) << (byte.astype(np.uint64) * np.uint64(8)))
            more = (flags != 0) & ~same
            cand, flags = cand[more], flags[more]

    def _find_further(self, keys: np.ndarray, start: np.ndarray, tag_x8: np.ndarray, which: np.ndarray, pos: np.ndarray) -> None:
        """``_find`` for keys ``keys[which]`` past their home buckets, from buckets ``start``.

        Reads 4 buckets a key at a time, so that a long probe sequence costs one pass of
        array operations rather than one per bucket.
        """
        window = 4
        last = len(self._overflow) - 1
        while which.size:
            m = len(which)
            buckets = ((start[:, None] + np.arange(window)) & last).ravel()
            passed = (self._overflow.take(buckets) != 0).reshape(m, window)
            # A search reads a bucket only if it went past every bucket before it.
            reached = np.ones((m, window), dtype=bool)
            np.logical_and.accumulate(passed[:, :-1], axis=1, out=reached[:, 1:])
            match = _equal_bytes(self._tag_words.take(buckets), np.repeat(tag_x8, window))
            match[~reached.ravel()] = 0
            self._check(keys, np.repeat(which, window), buckets, match, pos)
            go_on = (pos[which] < 0) & passed[:, -1] & reached[:, -1]
            which, start, tag_x8 = which[go_on], start[go_on] + window, tag_x8[go_on]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slots of ``keys``.

        Args:
            keys: ``uint64 [n]``; repeats are fine.

        Returns:
            ``int64 [n]``: each key's slot, -1 where the key is absent.

        Raises:
            TypeError: ``keys`` is not a ``uint64`` array.
            ValueError: ``keys`` is not 1-D.
        """
        keys = _key_array(keys, "lookup")
        return self._slots.take(self._find(keys, _mix(keys))).astype(np.int64)

    def insert(self, keys: np.ndarray, slots: np.ndarray, *, absent: bool = False) -> None:
        """Add ``keys`` with their ``slots``; on an error nothing is added.

        Args:
            keys: ``uint64 [n]``, distinct and not in the index.
            slots: integer ``[n]``, each in ``[0, 2**31 - 1]``. Slots are not checked for
                uniqueness: the table that owns them keeps them apart.
            absent: the caller has just looked every key up and found none (a table
                creating rows for the keys it missed): the search for keys already
                present is skipped. A key that is present after all corrupts the index.

        Raises:
            TypeError: ``keys`` is not a ``uint64`` array, or ``slots`` not an integer one.
            ValueError: shapes differ, a slot is out of range, a key repeats within
                ``keys``, or a key is already in the index.
        """
        keys = _key_array(keys, "insert")
        slots = _slot_array(slots, keys, "insert")
        n = len(keys)
        if n == 0:
            return
        h = _mix(keys)
        order, repeated = _hash_order(h)
        if repeated is not None:
            key = int(_unmix(np.array([repeated], dtype=np.uint64))[0])
            raise ValueError(f"insert: key {key} appears more than once in keys")
        if self._used + n > _MAX_LOAD * len(self._keys):
            self._rehash(self._used + n)  # changes no content, so it may come before the checks
        # In bucket order the table is read in one ascending sweep, and the search for keys
        # already present reads the tags that placing the keys needs.
        keys, slots, h = keys[order], slots[order], h[order]
        words = self._tag_words.take(self._home(h))
        present = np.flatnonzero(self._find(keys, h, words) >= 0) if not absent else np.empty(0, np.intp)
        if present.size:
            raise ValueError(f"insert: {present.size} of {n} keys are already in the index, e.g. key {int(keys[present[0]])}")
        self._place(keys, slots.astype(np.int32), h, words)
        self._used += n

    def update(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Give ``keys``, all in the index, the new ``slots``; on an error nothing changes.

        Args:
            keys: ``uint64 [n]``, distinct.
            slots: integer ``[n]``, each in ``[0, 2**31 - 1]``.

        Raises:
            TypeError: ``keys`` is not a ``uint64`` array, or ``slots`` not an integer one.
            ValueError: shapes differ, a slot is out of range, or a key is not in the index.
        """
        keys = _key_array(keys, "update")
        slots = _slot_array(slots, keys, "update")
        if not len(keys):
            return
        pos = self._find(keys, _mix(keys))
        absent = np.flatnonzero(pos < 0)
        if absent.size:
            raise ValueError(f"update: {absent.size} of {len(keys)} keys are not in the index, e.g. key {int(keys[absent[0]])}")
        self._slots[pos] = slots.astype(np.int32)

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Remove ``keys`` where present.

        Args:
            keys: ``uint64 [n]``; absent keys are skipped, and every copy of a repeated
                key reports its slot.

        Returns:
            ``int64 [n]``: the slot each key had, -1 where it was absent.

        Raises:
            TypeError: ``keys`` is not a ``uint64`` array.
            ValueError: ``keys`` is not 1-D.
        """
        keys = _key_array(keys, "remove")
        h = _mix(keys)
        pos = self._find(keys, h)
        slot = self._slots.take(pos).astype(np.int64)
        found = np.flatnonzero(pos >= 0)
        pos = pos[found]
        ordered = np.sort(pos)
        if (ordered[1:] == ordered[:-1]).any():
            # Copies of a key found the same entry. To count each entry once, every copy
            # writes its own number there and only the copy that reads it back stays; the
            # entries' slots are dead from here on, so they serve as the scratch space.
            mark = np.arange(pos.size, dtype=np.int32)
            self._slots[pos] = mark
            once = self._slots.take(pos) == mark
            pos, found = pos[once], found[once]
        if not pos.size:
            return slot
        self._tags[pos] = _EMPTY
        self._used -= int(pos.size)
        # A key stored past its home bucket had counted itself in every bucket it passed.
        home = self._home(h[found])
        passed = (pos // _WAYS - home) & (len(self._overflow) - 1)
        moved = np.flatnonzero(passed)
        if moved.size:
            steps = passed[moved]
            first = np.repeat(home[moved], steps)
            offset = np.arange(len(first)) - np.repeat(np.cumsum(steps) - steps, steps)
            self._count_passes((first + offset) & (len(self._overflow) - 1), -1)
        return slot

    def keys(self) -> np.ndarray:
        """All stored keys, ``uint64 [len]``, in entry order (deterministic, not sorted)."""
        return self._keys[self._tags != _EMPTY]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored ``(keys uint64 [len], slots int64 [len])``, aligned, in the order of ``keys()``."""
        used = self._tags != _EMPTY
        return self._keys[used], self._slots[:-1][used].astype(np.int64)

    def _count_passes(self, buckets: np.ndarray, sign: int) -> None:
        """Add ``sign`` (+1 or -1) to the overflow count of each of ``buckets`` (repeats add up)."""
        where, times = _runs(np.sort(buckets))
        count = self._overflow[where].astype(np.intp)
        self._overflow[where] = np.where(count == _SATURATED, _SATURATED, np.minimum(count + sign * times, _SATURATED))

    def _rehash(self, n: int) -> None:
        used = self._tags != _EMPTY
        keys, slots = self._keys[used], self._slots[:-1][used]
        self._allocate(max(len(self._overflow), _buckets_for(n)))
        h = _mix(keys)
        order = _hash_order(h)[0]
        h = h[order]
        self._place(keys[order], slots[order], h, self._tag_words.take(self._home(h)))
        self._used = len(keys)

    def _place(self, keys: np.ndarray, slots: np.ndarray, h: np.ndarray, words: np.ndarray) -> None:
        """Store absent, distinct ``keys`` with ``int32 slots``, given in the order of their
        hashes ``h``, with ``words`` the tags of their home buckets; the caller made room
        and counts them."""
        bucket = self._home(h)
        tag = self._tag(h).astype(np.uint8)
        last = len(self._overflow) - 1
        passed = []  # buckets that keys went past, counted once at the end
        while True:
            # Keys of a bucket come together. The first takes the bucket's lowest free
            # entry, the r-th its r-th, and those the bucket has no room for move on to
            # the next bucket.
            free = words & _HIGH
            at = bucket * _WAYS + _low_byte(free)
            fits = free != 0
            later = np.flatnonzero(bucket[1:] == bucket[:-1]) + 1  # keys behind another in their bucket
            if later.size:
                run = np.arange(len(later))
                rank = run - np.maximum.accumulate(np.where(np.diff(later, prepend=-2) != 1, run, 0)) + 1
                seen_free = (free[later] >> np.uint64(7)) * _ONES  # byte j: free entries 0..j (at most 8: no carry)
                fits[later] = rank < (seen_free >> np.uint64(56)).view(np.intp)
                # The first byte whose count reaches rank + 1 is the (rank + 1)-th free entry.
                nth = _equal_bytes(seen_free, (rank + 1).astype(np.uint64) * _ONES)
                at[later] = bucket[later] * _WAYS + _low_byte(nth)
            done = bool(fits.all())
            i = slice(None) if done else np.flatnonzero(fits)
            at = at[i]
            self._tags[at] = tag[i]
            self._keys[at] = keys[i]
            self._slots[at] = slots[i]
            if done:
                break
            left = ~fits
            passed.append(bucket[left])
            keys, slots, tag = keys[left], slots[left], tag[left]
            # Keys of one bucket stay together: b -> b + 1 (mod buckets) maps distinct
            # buckets to distinct buckets, wrapping around from the last or not.
            bucket = (bucket[left] + 1) & last
            words = self._tag_words.take(bucket)
        if passed:
            self._count_passes(np.concatenate(passed), +1)
