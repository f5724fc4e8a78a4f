"""workers.negatives: the negative draw (popularity share and uniform rest) and the catalogue it draws from."""

from __future__ import annotations

import numpy as np

from workers.negatives import Catalogue, negative_slots


def _shares(slots: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(slots.reshape(-1), minlength=n) / slots.size


def test_the_popularity_share_follows_the_counts_and_the_rest_is_uniform():
    counts = np.array([0.0, 1.0, 3.0, 0.0, 96.0])
    out = negative_slots(counts, 4000, 4, 0.5, np.random.default_rng(0))
    assert out.shape == (4000, 4) and out.dtype.kind == "i"
    # round(4 * 0.5) = 2 columns by popularity: an item with no interactions is never drawn there.
    pop = _shares(out[:, :2], 5)
    np.testing.assert_allclose(pop, counts / counts.sum(), atol=0.01)
    assert pop[0] == pop[3] == 0
    # The other 2 uniformly over the whole catalogue, items without interactions included.
    np.testing.assert_allclose(_shares(out[:, 2:], 5), np.full(5, 0.2), atol=0.03)


def test_all_popularity_or_none():
    counts = np.array([1.0, 0.0, 0.0, 9.0])
    every = negative_slots(counts, 2000, 3, 1.0, np.random.default_rng(1))
    np.testing.assert_allclose(_shares(every, 4), [0.1, 0, 0, 0.9], atol=0.02)
    none = negative_slots(counts, 2000, 3, 0.0, np.random.default_rng(1))
    np.testing.assert_allclose(_shares(none, 4), np.full(4, 0.25), atol=0.03)
    # No interactions counted yet: nothing to be proportional to, so all uniform.
    cold = negative_slots(np.zeros(4), 2000, 3, 1.0, np.random.default_rng(1))
    np.testing.assert_allclose(_shares(cold, 4), np.full(4, 0.25), atol=0.03)


def test_uniform_draws_do_not_depend_on_the_popularity_share():
    # The uniform draws come first from the generator: the uniform columns are the same
    # whatever share is drawn by popularity, so the stream of negatives is stable.
    counts = np.arange(10, dtype=np.float64)
    a = negative_slots(counts, 50, 8, 0.25, np.random.default_rng(7))
    b = negative_slots(counts, 50, 8, 0.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a[:, 2:], b[:, 2:])
    assert not np.array_equal(a[:, :2], b[:, :2])


def test_catalogue_adds_weighted_counts_in_order_of_first_appearance():
    cat = Catalogue()
    new = cat.add(np.array([30, 10, 30, 20], np.uint64), np.array([1.0, 2.0, 3.0, 0.5]))
    assert new.tolist() == [30, 10, 20]
    assert cat.keys().tolist() == [30, 10, 20]
    # Repeats within one call add up (30: 1 + 3).
    assert cat.counts().tolist() == [4.0, 2.0, 0.5]
    assert cat.add(np.array([10, 40, 10], np.uint64)).tolist() == [40]  # default: 1 interaction each
    assert cat.keys().tolist() == [30, 10, 20, 40]
    assert cat.counts().tolist() == [4.0, 4.0, 0.5, 1.0]


def test_catalogue_remove_keeps_keys_and_counts_together():
    cat = Catalogue()
    cat.add(np.array([1, 2, 3, 4, 5], np.uint64), np.array([10.0, 20.0, 30.0, 40.0, 50.0]))
    assert cat.remove(np.array([2, 99, 4], np.uint64)) == 2  # 99 was never there
    assert len(cat) == 3
    # The last items moved into the gaps with their counts.
    assert dict(zip(cat.keys().tolist(), cat.counts().tolist())) == {1: 10.0, 3: 30.0, 5: 50.0}
    # And the index follows the moves: counting an item again adds to its own count.
    cat.add(np.array([5], np.uint64))
    assert dict(zip(cat.keys().tolist(), cat.counts().tolist())) == {1: 10.0, 3: 30.0, 5: 51.0}
    # Negatives come only from what is left, by popularity too.
    drawn = cat.sample(500, 4, 1.0, np.random.default_rng(0))
    assert set(drawn.tolist()) == {1, 3, 5}
    share5 = float(np.mean(drawn == 5))
    assert abs(share5 - 51 / 91) < 0.05
