"""ps.index.KeyIndex: a vectorised uint64 -> slot hash index, checked against a dict."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps.index import KeyIndex, _mix, _unmix

U64_MAX = (1 << 64) - 1
# Values an implementation might use as markers for empty or deleted entries, or get
# wrong at the edges of the uint64 range.
SENTINELS = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFE, 1 << 63, (1 << 63) - 1, U64_MAX, U64_MAX - 1, 0x8080808080808080]


def u64(values) -> np.ndarray:
    return np.array(list(values), dtype=np.uint64)


def check_against(index: KeyIndex, ref: dict[int, int], extra: np.ndarray | None = None) -> None:
    """Every stored key, and ``extra`` keys, look up as in ``ref``; ``items()`` equals ``ref``."""
    assert len(index) == len(ref)
    probe = u64(ref) if extra is None else np.concatenate([u64(ref), extra])
    expected = np.array([ref.get(k, -1) for k in probe.tolist()], dtype=np.int64)
    got = index.lookup(probe)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    keys, slots = index.items()
    assert keys.dtype == np.uint64 and slots.dtype == np.int64
    assert dict(zip(keys.tolist(), slots.tolist())) == ref
    assert sorted(index.keys().tolist()) == sorted(ref)


def colliding_keys(n: int, *, top_bits: int, prefix: int, tag_bits: int = 0) -> np.ndarray:
    """``n`` distinct keys whose hashes share their top ``top_bits`` bits (``prefix``),
    and the next ``tag_bits`` bits too, so they share a home bucket (and tag) in any
    table of at most ``2**top_bits`` buckets."""
    shared = top_bits + tag_bits
    h = (np.uint64(prefix) << np.uint64(64 - shared)) | np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B1)
    h &= ~np.uint64(0) >> np.uint64(shared) | (np.uint64(prefix) << np.uint64(64 - shared))
    keys = _unmix(h)
    assert len(set(keys.tolist())) == n
    assert len(set((_mix(keys) >> np.uint64(64 - shared)).tolist())) == 1  # the construction worked
    return keys


# --- against a dict, under random operation sequences -----------------------------------

# Keys from a small pool, so that batches repeat keys, remove present ones and re-insert
# removed ones; small tables, so that buckets overflow and the index rehashes.
_POOL = SENTINELS + list(range(3, 40)) + [int(k) for k in colliding_keys(24, top_bits=12, prefix=5, tag_bits=7)]
_key = st.sampled_from(_POOL) | st.integers(0, U64_MAX)
_op = st.one_of(
    st.tuples(st.just("insert"), st.lists(_key, max_size=40)),
    st.tuples(st.just("remove"), st.lists(_key, max_size=40)),
    st.tuples(st.just("lookup"), st.lists(_key, max_size=40)),
    st.tuples(st.just("update"), st.lists(_key, max_size=40)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(0, 64), ops=st.lists(_op, max_size=30), seed=st.integers(0, 2**32 - 1))
def test_random_operations_match_a_dict(capacity, ops, seed):
    rng = np.random.default_rng(seed)
    index, ref = KeyIndex(capacity), {}
    for kind, keys in ops:
        batch = u64(keys)
        if kind == "insert":
            new = u64(dict.fromkeys(k for k in keys if k not in ref))  # distinct and absent, in order
            slots = rng.integers(0, 2**31 - 1, size=len(new))
            index.insert(new, slots)
            ref.update(zip(new.tolist(), slots.tolist()))
        elif kind == "update":
            present = u64(dict.fromkeys(k for k in keys if k in ref))  # distinct and present
            slots = rng.integers(0, 2**31 - 1, size=len(present))
            index.update(present, slots)
            ref.update(zip(present.tolist(), slots.tolist()))
        elif kind == "remove":
            expected = [ref.get(k, -1) for k in keys]
            np.testing.assert_array_equal(index.remove(batch), expected)
            for k in keys:
                ref.pop(k, None)
        else:
            np.testing.assert_array_equal(index.lookup(batch), [ref.get(k, -1) for k in keys])
        check_against(index, ref, extra=u64(SENTINELS))


def test_long_churn_matches_a_dict():
    """Many rounds of evict-and-insert at a steady size, as a capped table sees them."""
    rng = np.random.default_rng(7)
    index, ref = KeyIndex(2000), {}
    for r in range(60):
        if ref:
            stored = u64(ref)
            evict = rng.choice(stored, size=min(len(stored), int(rng.integers(0, 400))), replace=False)
            np.testing.assert_array_equal(index.remove(evict), [ref.pop(k) for k in evict.tolist()])
        new = rng.integers(0, 2**64, size=int(rng.integers(0, 500)), dtype=np.uint64)
        new = u64(dict.fromkeys(k for k in new.tolist() if k not in ref))
        slots = np.arange(len(new)) + 1000 * r
        index.insert(new, slots)
        ref.update(zip(new.tolist(), slots.tolist()))
        check_against(index, ref, extra=rng.integers(0, 2**64, size=200, dtype=np.uint64))


# --- particular keys and cases -----------------------------------------------------------


def test_sentinel_valued_keys_are_ordinary_keys():
    index = KeyIndex(4)
    keys = u64(SENTINELS)
    index.insert(keys, np.arange(len(keys)) + 10)
    check_against(index, {k: i + 10 for i, k in enumerate(SENTINELS)}, extra=u64([3, 4, U64_MAX - 2]))
    removed = index.remove(u64([0, U64_MAX, 0x80]))
    np.testing.assert_array_equal(removed, [10, 19, 14])
    np.testing.assert_array_equal(index.lookup(u64([0, U64_MAX, 0x80, 1])), [-1, -1, -1, 11])
    index.insert(u64([U64_MAX, 0]), [7, 8])
    np.testing.assert_array_equal(index.lookup(u64([0, U64_MAX])), [8, 7])


def test_growth_across_many_rehashes_keeps_every_key():
    rng = np.random.default_rng(1)
    index, ref = KeyIndex(0), {}
    start = index.nbytes()
    keys = rng.integers(0, 2**64, size=200_000, dtype=np.uint64)
    lo = 0
    for size in [1, 1, 2, 5, 30, 100, 1000, 5000, 20_000, 60_000, 113_861]:
        batch = keys[lo : lo + size]
        index.insert(batch, np.arange(lo, lo + size))
        ref.update(zip(batch.tolist(), range(lo, lo + size)))
        lo += size
        np.testing.assert_array_equal(index.lookup(keys[:lo]), np.arange(lo))
    assert lo == len(keys) == len(index)
    check_against(index, ref, extra=rng.integers(0, 2**64, size=1000, dtype=np.uint64))
    assert index.nbytes() > 100 * start
    assert index.nbytes() <= 4 * 13.125 * len(index)  # growth sizes the table for at least 1/4 load


def test_capacity_is_honoured_and_memory_per_key_is_small():
    index = KeyIndex(1_000_000)
    before = index.nbytes()
    keys = np.random.default_rng(2).integers(0, 2**64, size=1_000_000, dtype=np.uint64)
    index.insert(keys, np.arange(len(keys)))
    assert index.nbytes() == before  # no rehash up to the stated capacity
    assert index.nbytes() / len(index) < 30  # the budget for the index at 1M rows


def test_inserts_keep_the_index_at_most_three_quarters_full():
    # The documented 1.33 entries a key at least: fuller, probe runs grow long, and in a full
    # table a search for an absent key finds no bucket where it may stop.
    rng = np.random.default_rng(5)
    index = KeyIndex(0)
    for size in [1] * 70 + [3, 7, 50, 200, 1000]:
        index.insert(rng.integers(0, 2**64, size=size, dtype=np.uint64), np.arange(size))
        assert index.nbytes() >= 13.125 * len(index) / 0.75, len(index)


def test_removing_every_key_leaves_no_overflow_counts_behind():
    # "No tombstones pile up under churn": a removed key takes back the overflow counts it
    # left in the buckets it probed past, or else every later search for an absent key there
    # reads on into the next buckets, for as long as the index lives.
    keys = colliding_keys(40, top_bits=10, prefix=77, tag_bits=7)  # 40 keys, one home bucket
    index = KeyIndex(3000)
    index.insert(keys, np.arange(40))
    assert index._overflow.any()  # the construction made keys probe past their home
    index.remove(keys)
    assert len(index) == 0
    assert not index._overflow.any()


def test_remove_then_reinsert_with_new_slots():
    index = KeyIndex()
    keys = np.arange(100, dtype=np.uint64) * np.uint64(0x10001)
    index.insert(keys, np.arange(100))
    np.testing.assert_array_equal(index.remove(keys[::2]), np.arange(0, 100, 2))
    assert len(index) == 50
    np.testing.assert_array_equal(index.lookup(keys[::2]), np.full(50, -1))
    np.testing.assert_array_equal(index.remove(keys[::2]), np.full(50, -1))  # removing again finds nothing
    index.insert(keys[::2], np.arange(1000, 1050))
    np.testing.assert_array_equal(index.lookup(keys), np.where(np.arange(100) % 2 == 0, 1000 + np.arange(100) // 2, np.arange(100)))


def test_lookup_and_remove_accept_repeated_keys():
    index = KeyIndex()
    index.insert(u64([5, 6]), [50, 60])
    np.testing.assert_array_equal(index.lookup(u64([5, 5, 7, 7, 6, 5])), [50, 50, -1, -1, 60, 50])
    np.testing.assert_array_equal(index.remove(u64([5, 7, 5, 5])), [50, -1, 50, 50])
    assert len(index) == 1
    np.testing.assert_array_equal(index.lookup(u64([5, 6])), [-1, 60])


def test_keys_sharing_a_bucket_and_tag_overflow_into_later_buckets():
    # 300 keys with one home bucket and one tag: they fill 38 buckets in a row, and every
    # lookup compares many tags that match. 292 keys probe past the home bucket, more
    # than its overflow count holds (255), so the count must stay put as keys go: removed
    # one at a time, the remaining keys must stay findable at every step.
    keys = colliding_keys(300, top_bits=10, prefix=77, tag_bits=7)
    absent_alike = colliding_keys(320, top_bits=10, prefix=77, tag_bits=7)[300:]
    index = KeyIndex(3000)  # 1024 buckets: the keys stay in their colliding layout
    others = np.random.default_rng(3).integers(0, 2**64, size=500, dtype=np.uint64)
    index.insert(others, np.arange(500))
    index.insert(keys, np.arange(1000, 1300))
    ref = dict(zip(others.tolist(), range(500))) | dict(zip(keys.tolist(), range(1000, 1300)))
    check_against(index, ref, extra=absent_alike)
    order = np.random.default_rng(4).permutation(300)
    for step, i in enumerate(order.tolist()):
        np.testing.assert_array_equal(index.remove(keys[i : i + 1]), [1000 + i])
        del ref[int(keys[i])]
        np.testing.assert_array_equal(index.lookup(keys), [ref.get(k, -1) for k in keys.tolist()])
        if step % 50 == 0:
            check_against(index, ref, extra=absent_alike)
    check_against(index, ref, extra=keys)
    index.insert(keys[:50], np.arange(50))  # and reinsert into the emptied run
    ref.update(zip(keys[:50].tolist(), range(50)))
    check_against(index, ref)


def test_probing_wraps_from_the_last_bucket_to_the_first():
    last = colliding_keys(40, top_bits=6, prefix=63)  # home is the last of 64 buckets
    first = colliding_keys(10, top_bits=6, prefix=0)
    index = KeyIndex(200)  # 64 buckets
    index.insert(last, np.arange(40))
    index.insert(first, np.arange(100, 110))
    ref = dict(zip(last.tolist(), range(40))) | dict(zip(first.tolist(), range(100, 110)))
    check_against(index, ref)
    np.testing.assert_array_equal(index.remove(last[::3]), np.arange(0, 40, 3))
    for k in last[::3].tolist():
        del ref[k]
    check_against(index, ref, extra=last[::3])


def test_insert_rejects_repeated_keys_and_present_keys_and_changes_nothing():
    index = KeyIndex()
    index.insert(u64([1, 2, 3]), [10, 20, 30])
    with pytest.raises(ValueError, match=r"key 9 appears more than once"):
        index.insert(u64([8, 9, 7, 9]), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"1 of 3 keys are already in the index, e.g. key 2\b"):
        index.insert(u64([4, 2, 5]), [0, 1, 2])
    with pytest.raises(ValueError, match=rf"key {U64_MAX} appears more than once"):
        index.insert(u64([U64_MAX, U64_MAX]), [0, 1])
    check_against(index, {1: 10, 2: 20, 3: 30}, extra=u64([4, 5, 7, 8, 9, U64_MAX]))


@pytest.mark.parametrize(
    ("keys", "slots", "error", "match"),
    [
        (np.array([1, 2], dtype=np.int64), [0, 1], TypeError, "uint64"),
        (u64([1, 2]), np.array([0.0, 1.0]), TypeError, "integer"),
        (u64([1, 2]), [0], ValueError, "differ in shape"),
        (u64([1, 2]), [0, -1], ValueError, r"slots must be in \[0, 2147483647\], got -1"),
        (u64([1, 2]), [0, 2**31], ValueError, "got 2147483648"),
        (u64([[1, 2]]), [[0, 1]], ValueError, "1-D"),
    ],
)
def test_insert_validates_its_arguments(keys, slots, error, match):
    index = KeyIndex()
    with pytest.raises(error, match=match):
        index.insert(keys, slots)
    assert len(index) == 0


def test_update_rejects_absent_keys_and_bad_slots_and_changes_nothing():
    index = KeyIndex()
    index.insert(u64([1, 2, 3]), [10, 20, 30])
    with pytest.raises(ValueError, match=r"1 of 2 keys are not in the index, e.g. key 4\b"):
        index.update(u64([2, 4]), [0, 1])
    with pytest.raises(ValueError, match=r"slots must be in \[0, 2147483647\], got -1"):
        index.update(u64([1, 2]), [5, -1])
    with pytest.raises(TypeError, match="integer"):
        index.update(u64([1]), np.array([1.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        index.update(u64([1, 2]), [1])
    check_against(index, {1: 10, 2: 20, 3: 30}, extra=u64([4]))
    index.update(u64([3, 1]), [7, 2**31 - 1])
    check_against(index, {1: 2**31 - 1, 2: 20, 3: 7})


def test_lookup_and_remove_validate_keys():
    index = KeyIndex()
    for op in (index.lookup, index.remove):
        with pytest.raises(TypeError, match="uint64"):
            op(np.array([1, 2]))
        with pytest.raises(ValueError, match="1-D"):
            op(np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="capacity"):
        KeyIndex(-1)


def test_empty_batches_and_empty_index():
    index = KeyIndex(0)
    empty = np.empty(0, dtype=np.uint64)
    assert index.lookup(empty).shape == (0,) and index.remove(empty).shape == (0,)
    index.insert(empty, np.empty(0, dtype=np.int64))
    np.testing.assert_array_equal(index.lookup(u64(SENTINELS)), np.full(len(SENTINELS), -1))
    assert len(index) == 0 and index.keys().size == 0


def test_slots_come_back_as_given():
    index = KeyIndex()
    slots = np.array([0, 2**31 - 1, 12345], dtype=np.uint32)  # any integer dtype in range
    index.insert(u64([1, 2, 3]), slots)
    np.testing.assert_array_equal(index.lookup(u64([1, 2, 3])), [0, 2**31 - 1, 12345])


def test_same_operations_give_the_same_arrays():
    def build() -> KeyIndex:
        rng = np.random.default_rng(5)
        index = KeyIndex(10)
        keys = rng.integers(0, 2**64, size=5000, dtype=np.uint64)
        index.insert(keys, np.arange(5000))
        index.remove(keys[::7])
        index.insert(keys[::7][:100], np.arange(100))
        return index

    a, b = build(), build()
    np.testing.assert_array_equal(a.keys(), b.keys())
    for x, y in zip(a.items(), b.items()):
        np.testing.assert_array_equal(x, y)


def test_pickle_round_trip_keeps_working():
    rng = np.random.default_rng(6)
    index = KeyIndex(10)
    keys = rng.integers(0, 2**64, size=3000, dtype=np.uint64)
    index.insert(keys, np.arange(3000))
    index.remove(keys[:1000])
    copy = pickle.loads(pickle.dumps(index))
    ref = dict(zip(keys[1000:].tolist(), range(1000, 3000)))
    check_against(copy, ref, extra=keys[:1000])
    more = rng.integers(0, 2**64, size=5000, dtype=np.uint64)
    copy.insert(more, np.arange(5000))  # grows: a rehash from the unpickled state
    ref.update(zip(more.tolist(), range(5000)))
    check_against(copy, ref)
    assert len(index) == 2000  # the original is untouched


def test_micro_benchmark_runs_and_the_indexes_agree():
    from bench.index_compare import run

    out = run(rows=3000, batch=256, rounds=3)  # raises if KeyIndex and the dict disagree
    assert set(out) == {"dict", "KeyIndex"}
    for r in out.values():
        assert set(r) == {"lookup", "insert", "remove", "bytes/key"} and all(v > 0 for v in r.values())
