"""workers.ranking on an in-memory item view: the session context and the recent-popularity prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.config import ModelConfig
from workers.model import context_index, user_queries
from workers.ranking import Ranker
from workers.eval.strategies import ItemView

D = 4
ITEMS = ["a", "b", 7, "c", 9]
MODEL = ModelConfig(context_items=2, recent_weight=0.5)


def _view(recent: np.ndarray | None = None) -> ItemView:
    rng = np.random.default_rng(0)
    m = MODEL
    n = len(ITEMS)
    mats = {
        m.item_table: rng.normal(size=(n, D)).astype(np.float32),
        m.item_bias_table: rng.normal(size=(n, 1)).astype(np.float32),
        m.popularity_table: np.array([[5.0], [1.0], [3.0], [0.0], [2.0]], np.float32),
        m.context_table: rng.normal(size=(n, D)).astype(np.float32),
        m.recent_table: recent if recent is not None else np.zeros((n, 2), np.float32),
    }
    return ItemView(ITEMS, mats)


def test_user_queries_mean_the_context_rows_and_skip_padding():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    ctx = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    idx = torch.tensor([[0, 1], [1, -1], [-1, -1]])
    q = user_queries(users, ctx, idx)
    torch.testing.assert_close(q, torch.tensor([[3.0, 0.0], [3.0, 0.0], [2.0, 2.0]]))
    assert user_queries(users, ctx[:0], idx[:, :0]) is users


def test_queries_use_the_last_context_items_known_to_the_cache():
    view = _view()
    ranker = Ranker(view, MODEL)
    ctx = view.matrix(MODEL.context_table)
    u = np.ones((3, D), np.float32)
    # Oldest first: only the last two count; unknown items are skipped; no history keeps the row.
    q = ranker.queries(u, [["a", "b", 7], ["zzz", "c"], []])
    np.testing.assert_allclose(q[0], 1 + (ctx[1] + ctx[2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(q[1], 1 + ctx[3], rtol=1e-6)
    np.testing.assert_allclose(q[2], 1, rtol=1e-6)
    off = Ranker(view, MODEL.model_copy(update={"context_table": None}))
    np.testing.assert_array_equal(off.queries(u, [["a", "b"], [], []]), u)


def test_rank_many_scores_with_context_and_prior_and_excludes_seen():
    recent = np.array([[4.0, 3.0], [10.0, 2.0], [0.0, 0.0], [1.0, 3.0], [2.0, 3.0]], np.float32)
    view = _view(recent)
    ranker = Ranker(view, MODEL)
    counts = recent[:, 0] * np.exp2(recent[:, 1] - 3.0)  # decayed to the newest clock, 3
    np.testing.assert_allclose(ranker.recent_counts(), counts)
    u = np.random.default_rng(1).normal(size=(1, D)).astype(np.float32)
    q = u + view.matrix(MODEL.context_table)[[0, 1]].mean(0)
    want = (q @ view.matrix(MODEL.item_table).T)[0] + view.matrix(MODEL.item_bias_table)[:, 0] + 0.5 * np.log1p(counts)
    # "a" is excluded but still in the context (history defaults to seen)
    got = ranker.rank_many(u, np.array([True]), [["a", "b"]], 3)[0]
    order = [j for j in np.argsort(-want, kind="stable") if ITEMS[j] not in ("a", "b")][:3]
    assert got.item_ids == [ITEMS[j] for j in order] and got.fallback is None
    np.testing.assert_allclose(got.scores, want[order], rtol=1e-5, atol=1e-5)
    # An explicit history replaces seen as context; /score uses the same query.
    scores, fallback = ranker.score_items(u[0], ITEMS, ["a", "b"])
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    plain = ranker.rank_many(u, np.array([True]), [["a", "b"]], 3, history=[[]])[0]
    no_ctx = (u @ view.matrix(MODEL.item_table).T)[0] + view.matrix(MODEL.item_bias_table)[:, 0] + 0.5 * np.log1p(counts)
    np.testing.assert_allclose(plain.scores, sorted(no_ctx[[2, 3, 4]], reverse=True), rtol=1e-5, atol=1e-5)
    # Unknown users: the most recently popular items (b: 10 at clock 2 is 5 at clock 3), not the all-time ones ("a").
    pop = ranker.rank_many(u, np.array([False]), [[]], 2)[0]
    assert pop.fallback == "popular" and pop.item_ids == ["b", "a"]
    assert pop.scores == pytest.approx([5.0, 4.0])


def test_rank_many_ranks_a_user_without_a_row_by_their_session_context_as_rank_does():
    # /rank ranks a user the model has no row for yet (admission, a model fitted before they came)
    # by the context of their recent items, and falls back to popularity only without any
    # (serving.app._rank_requests); the evaluation must rank them the same way.
    view = _view()
    ranker = Ranker(view, MODEL)
    counts = ranker.recent_counts()
    q = view.matrix(MODEL.context_table)[[0, 1]].mean(0)
    want = q @ view.matrix(MODEL.item_table).T + view.matrix(MODEL.item_bias_table)[:, 0] + 0.5 * np.log1p(counts)
    rowless = np.full((2, D), np.nan, np.float32)  # rows where found is False are not read
    got = ranker.rank_many(rowless, np.array([False, False]), [["a", "b"], []], 3)
    order = [j for j in np.argsort(-want, kind="stable") if ITEMS[j] not in ("a", "b")][:3]
    assert got[0].item_ids == [ITEMS[j] for j in order] and got[0].fallback is None
    np.testing.assert_allclose(got[0].scores, want[order], rtol=1e-5, atol=1e-5)
    snap = ranker.snapshot()
    assert got[0] == snap.top(snap.scores(snap.context_query(["a", "b"]))[0], 3, snap._exclude(["a", "b"]))
    assert got[1].fallback == "popular"  # no history: nothing but popularity to go on
    # Without a context table such a user is popular too (the popularity baselines' rankers).
    off = Ranker(view, MODEL.model_copy(update={"context_table": None}))
    assert off.rank_many(rowless[:1], np.array([False]), [["a", "b"]], 3)[0].fallback == "popular"


class _ViewWithRemoved(ItemView):
    """An ItemView whose slot ``removed`` holds a removed item: invalid, its key still found
    by the lookup (the snapshot must not rely on the view's index forgetting it)."""

    def __init__(self, ids, mats, removed: int):
        super().__init__(ids, mats)
        self._valid = np.ones(len(ids), bool)
        self._valid[removed] = False

    def valid(self) -> np.ndarray:
        return self._valid


def test_a_removed_item_is_never_ranked_scored_or_used_as_context_even_when_k_exceeds_the_catalogue():
    # Its score is -inf, which still ranks above "nothing": with k past the live items, a
    # ranking that only sorted scores would hand it back.
    base, m = _view(), MODEL
    tables = (m.item_table, m.item_bias_table, m.popularity_table, m.context_table, m.recent_table)
    view = _ViewWithRemoved(ITEMS, {t: base.matrix(t) for t in tables}, removed=3)  # "c"
    ranker = Ranker(view, MODEL)
    u = np.ones((1, D), np.float32)
    got = ranker.rank_many(u, np.array([True]), [[]], 10)[0]
    assert sorted(map(str, got.item_ids)) == ["7", "9", "a", "b"]
    assert np.isfinite(got.scores).all()
    pop = ranker.rank_many(u, np.array([False]), [[]], 10)[0]
    assert pop.fallback == "popular" and "c" not in pop.item_ids and len(pop.item_ids) == 4
    scores, _ = ranker.score_items(u[0], ["c", "a"])
    assert scores[0] is None and scores[1] is not None
    np.testing.assert_array_equal(ranker.queries(u, [["c"]]), u)  # not a context item either


def test_the_prior_reads_a_split_clock_across_its_high_parts():
    # The default recent table keeps its clock in two parts (ps.optim.CLOCK_STEP); far into a
    # stream the high parts differ between items counted a few half-lives apart.
    from ps.optim import clock_columns

    clocks = np.array([3e7 + 1.0, 3e7 - 2.0, 0.0, 3e7 + 1.0, 3e7 - 4095.0])
    counts = np.array([4.0, 16.0, 0.0, 1.0, 2.0], np.float32)
    recent = np.concatenate([counts[:, None], clock_columns(clocks, 3)], axis=1)
    assert len(set(recent[:, 1].tolist())) > 2  # more than one high part among the counted items
    ranker = Ranker(_view(recent), MODEL)
    np.testing.assert_allclose(ranker.recent_counts(), counts * np.exp2(clocks - clocks.max()), rtol=1e-6)
    # b: 16 three half-lives back is 2, under a's 4.
    pop = ranker.rank_many(np.zeros((1, D), np.float32), np.array([False]), [[]], 2)[0]
    assert pop.item_ids == ["a", "b"] and pop.scores == pytest.approx([4.0, 2.0])


def test_context_index_keeps_each_tail_in_order_and_pads():
    items, idx = context_index([["a", 7, "b", 7], [], ["b", 9]], 3)
    # Tails of width 3, oldest first; items numbered by first appearance across histories.
    assert items.tolist() == [7, "b", 9]
    np.testing.assert_array_equal(idx, [[0, 1, 0], [-1, -1, -1], [1, 2, -1]])
    items, idx = context_index([[1, 2]], 0)
    assert len(items) == 0 and idx.shape == (1, 0)


def _random_snapshot(rng, n: int, dim: int):
    """A snapshot of ``n`` random items of width ``dim``, with a random bias and prior; and its
    tables."""
    from workers.ranking import RankingSnapshot

    m = MODEL
    mats = {
        m.item_table: rng.normal(size=(n, dim)).astype(np.float32),
        m.item_bias_table: rng.normal(size=(n, 1)).astype(np.float32),
        m.popularity_table: rng.integers(0, 9, size=(n, 1)).astype(np.float32),
        m.recent_table: np.stack([rng.integers(0, 9, n), rng.integers(0, 4, n)], 1).astype(np.float32),
    }
    return RankingSnapshot(ItemView(np.arange(n), mats), m), mats


@pytest.mark.parametrize("dim", [8, 64])
@pytest.mark.parametrize("blocks", [0.01, 1, 2.3, 8.5])
def test_several_queries_score_bit_for_bit_as_each_alone(dim, blocks):
    # Alone, or batched with any others in any order: equal to the last bit, below one block,
    # at exactly one and over several with a partial last one, with the prior and the bias fused in;
    # alone also with its blocks split over two threads (``threads=2``, from 8 blocks on).
    from workers.ranking import _SCORE_BLOCK

    rng = np.random.default_rng(dim)
    n = max(3, int(blocks * _SCORE_BLOCK))
    m = MODEL
    snap, mats = _random_snapshot(rng, n, dim)
    queries = (rng.normal(size=(16, dim)) * rng.uniform(0.01, 100, size=(16, 1))).astype(np.float32)
    alone = [snap.scores(q)[0] for q in queries]
    for q, a in zip(queries, alone):
        assert np.array_equal(snap.scores(q, threads=2)[0], a)
    for size in range(2, 17):
        pick = rng.permutation(16)[:size]
        together = snap.scores(queries[pick])
        for j, q in enumerate(pick.tolist()):
            assert np.array_equal(alone[q], together[j]), (size, q, np.abs(alone[q] - together[j]).max())
    want = mats[m.item_table].astype(np.float64) @ queries[0].astype(np.float64) + snap.bias
    np.testing.assert_allclose(alone[0], want, rtol=1e-4, atol=1e-3)
    assert snap.rank_queries(queries, 5, [[0, 1]] * len(queries)) == [snap.rank(q, [0, 1], 5, history=()) for q in queries]


_ONE_BLAS_THREAD = """
import ctypes, itertools
import numpy as np
lib = ctypes.CDLL(sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line})[0])
assert lib.scipy_openblas_get_num_threads64_() == 1
from tests.workers import test_ranking as t
for dim, blocks in itertools.product([1, 8, 64], [0.01, 1, 2.3, 8.5]):
    t.test_several_queries_score_bit_for_bit_as_each_alone(dim, blocks)
print("ok")
"""


def test_several_queries_score_bit_for_bit_with_one_blas_thread_as_in_a_replica():
    # Ray starts a replica with OMP_NUM_THREADS=1 (its default serving.replica_num_cpus, 0.25,
    # rounds up to 1), so its BLAS runs one thread where pytest's runs one per core, and BLAS
    # may pick other kernels for other thread counts: the bit-for-bit check again, in a child
    # with the replica's setting.
    import os
    import pathlib
    import subprocess
    import sys

    import ctypes

    libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line})
    if not libs or not hasattr(ctypes.CDLL(libs[0]), "scipy_openblas_get_num_threads64_"):
        pytest.skip("numpy's own OpenBLAS (scipy-openblas) is not what numpy uses here")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OPENBLAS_NUM_THREADS", None)
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _ONE_BLAS_THREAD], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_lone_query_split_over_two_threads_scores_as_on_one(monkeypatch):
    # The split changes who computes each block, never the block's product: the same bits as one
    # thread, and the helper thread did take its half.
    import threading

    import workers.ranking as ranking

    rng = np.random.default_rng(5)
    n, dim = (ranking._SPLIT_MIN_BLOCKS + 1) * ranking._SCORE_BLOCK + 17, 32
    snap, _ = _random_snapshot(rng, n, dim)
    queries = rng.normal(size=(8, dim)).astype(np.float32)
    ran_on = set()
    score_blocks = ranking.RankingSnapshot._score_blocks

    def spy(self, q, out, starts):
        ran_on.add(threading.current_thread().name)
        return score_blocks(self, q, out, starts)

    monkeypatch.setattr(ranking.RankingSnapshot, "_score_blocks", spy)
    split = [snap.scores(q, threads=2)[0] for q in queries]
    assert any(name.startswith(ranking._SPLIT_THREAD) for name in ran_on) and len(ran_on) == 2
    for threads in (1, 2):  # one thread by default, and a batch is never split
        ran_on.clear()
        single = [snap.scores(q)[0] for q in queries]
        both = snap.scores(queries[:2], threads=threads)
        assert ran_on == {threading.current_thread().name}
        for a, b in zip(split, single):
            assert np.array_equal(a, b)
        assert np.array_equal(both[1], split[1])


def test_scoring_from_the_helper_thread_does_not_wait_on_itself():
    # A split requested on the helper thread would queue behind the task that waits for it.
    import workers.ranking as ranking

    rng = np.random.default_rng(6)
    n = ranking._SPLIT_MIN_BLOCKS * ranking._SCORE_BLOCK
    snap, _ = _random_snapshot(rng, n, 8)
    q = rng.normal(size=8).astype(np.float32)
    got = ranking._score_pool().submit(snap.scores, q, threads=2).result(timeout=30)
    assert np.array_equal(got, snap.scores(q, threads=2))


def test_the_popular_fallback_breaks_ties_by_slot_whatever_k_and_seen():
    # Many items share a popularity (a fresh catalogue: every count 0 or 1). The fallback must
    # answer the same order from its precomputed prefix (small k) as from a full sort (k, or
    # k plus the user's seen items, beyond the prefix): ties to the lower slot, as top_k does,
    # so a user's top-k is always the start of their top-(k + 1).
    from workers.model import top_k
    from workers.ranking import _POPULAR_PREFIX, RankingSnapshot

    rng = np.random.default_rng(11)
    n = 3 * _POPULAR_PREFIX
    pop = np.zeros((n, 1), np.float32)
    pop[rng.choice(n, _POPULAR_PREFIX - 24, replace=False)] = 1.0  # the prefix ends inside the 0s
    m = MODEL.model_copy(update={"recent_table": None, "context_table": None})
    mats = {m.item_table: rng.normal(size=(n, D)).astype(np.float32),
            m.item_bias_table: np.zeros((n, 1), np.float32), m.popularity_table: pop}
    snap = RankingSnapshot(ItemView(np.arange(n), mats), m)
    want = top_k(snap.popularity, n).tolist()
    short = snap.popular(None, _POPULAR_PREFIX - 4)  # answered from the prefix
    long = snap.popular(None, _POPULAR_PREFIX + 4)  # answered by a full sort
    assert [int(i) for i in short.item_ids] == want[: _POPULAR_PREFIX - 4]
    assert [int(i) for i in long.item_ids] == want[: _POPULAR_PREFIX + 4]
    # With seen items too: the same order, less what was seen.
    seen = np.array(want[:3], np.int64)
    got = snap.popular(seen.tolist(), 30)
    assert [int(i) for i in got.item_ids] == want[3:33]


@pytest.mark.parametrize("dim", [8, 64])
@pytest.mark.parametrize("n", [5, 300, 5000])
def test_score_items_gives_exactly_the_scores_rank_gives(dim, n):
    # /score and /rank answer one user from one snapshot: an item's score must be the same
    # float in both (a matrix-vector product rounds differently from rank's blocked product,
    # so /score disagreed in the last bits and could order near-ties the other way).
    rng = np.random.default_rng(n + dim)
    snap, mats = _random_snapshot(rng, n, dim)
    for _ in range(3):
        row = rng.normal(size=dim).astype(np.float32)
        ranked = snap.rank(row, None, min(n, 50))
        asked = ranked.item_ids[::-1] + [ranked.item_ids[0], n + 7]  # reversed, a repeat, an unknown
        scores, fallback = snap.score_items(row, asked)
        assert fallback is None and scores[-1] is None
        assert scores[:-2] == ranked.scores[::-1] and scores[-2] == ranked.scores[0]
