"""The prequential protocol (:mod:`workers.eval.protocol`) against a scripted strategy."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tests.workers.eval.scripted import N_ITEMS, ListSource, Scripted, ramp
from workers.eval.protocol import hit_rank, prequential, recovery_events, windowed_recall
from workers.ranking import Ranked

# --------------------------------------------------------------------------- protocol


def test_hit_counts_only_what_was_ranked_before_the_update():
    # Chunk 0 makes user 1 known; chunk 1's item (slot 29) is ranked last before learning.
    # Learning chunk 1 moves slot 29 and slot 5 to the top; chunk 2's item (slot 5) then hits at rank 0.
    def learn(self, chunk):
        if 129 in chunk.items.tolist():
            self.scores[1] = np.asarray(ramp([29, 5]), np.float32)

    s = Scripted({1: ramp([0])}, after_learn=learn)
    res = prequential(ListSource([(1, 100), (1, 129), (1, 105)]), s, chunk_size=1)
    assert res.eval_offsets.tolist() == [1, 2]
    # Offset 1: slot 29 scored lowest of 29 eligible (rank 28) -> a miss even though learning then made it top.
    # Offset 2: slot 29 is seen now, so slot 5 is first.
    assert res.eval_ranks.tolist() == [-1, 0]
    assert res.recall(10) == 0.5
    assert s.chunks == [[(1, 100)], [(1, 129)], [(1, 105)]]


def test_seen_items_are_excluded_and_never_hit():
    s = Scripted({1: ramp([3, 4])})
    res = prequential(ListSource([(1, 103), (1, 103), (1, 104)]), s, chunk_size=1)
    # Re-consuming slot 3 cannot hit (excluded); slot 4 moves up to rank 0.
    assert res.eval_ranks.tolist() == [-1, 0]
    ranked = s.ranker().rank_many(*s.user_vectors(np.array([1])), [[103]], 20)[0]
    assert 103 not in ranked.item_ids and ranked.item_ids[0] == 104


def test_cold_users_are_scored_by_the_popular_fallback_separately():
    pop = [0.0] * N_ITEMS
    pop[7], pop[2] = 50.0, 40.0
    # User 2's first event is cold even though the model has a vector for them, and so is
    # their second event in the same chunk; only a later chunk evaluates them.
    s = Scripted({2: ramp([9])}, pop=pop)
    res = prequential(ListSource([(2, 107), (2, 102), (2, 109), (3, 120)]), s, chunk_size=2)
    assert res.cold_ranks.tolist() == [0, 1, -1]  # popularity order: slot 7, slot 2, ...; item 120 has count 0 -> rank 2+
    assert res.eval_offsets.tolist() == [2]
    assert res.eval_ranks.tolist() == [0]
    summary = res.summary()
    assert summary["cold_events"] == 3 and summary["evaluated"] == 1
    assert summary["cold_recall@10"] == pytest.approx(2 / 3)


def test_nan_and_infinite_scores_never_count_as_hits():
    bias = [0.0] * N_ITEMS
    bias[1], bias[2], bias[3] = float("inf"), float("nan"), float("-inf")
    s = Scripted({1: [0.0] * N_ITEMS}, bias=bias)
    res = prequential(ListSource([(1, 110), (1, 101), (1, 102), (1, 103), (1, 104)]), s, chunk_size=1)
    # +inf ranks first but is no hit; NaN and -inf are no hit; the finite item 104 is.
    assert res.eval_ranks.tolist()[:3] == [-1, -1, -1]
    assert res.eval_ranks[3] >= 0
    r = Ranked([101, 102], [float("inf"), float("nan")], None)
    assert hit_rank(r, 101) == -1 and hit_rank(r, 102) == -1
    assert hit_rank(Ranked([101, 102], [2.0, 1.0], None), 102) == 1


def test_ties_break_deterministically_by_catalogue_order():
    pairs = [(1, 100), (1, 101), (1, 115), (1, 125)]
    a = prequential(ListSource(pairs), Scripted({1: [0.0] * N_ITEMS}), chunk_size=1)
    b = prequential(ListSource(pairs), Scripted({1: [0.0] * N_ITEMS}), chunk_size=1)
    # All scores tie: the lowest slot not yet seen comes first.
    assert a.eval_ranks.tolist() == [0, 13, -1]
    assert b.eval_ranks.tolist() == a.eval_ranks.tolist()
    assert a.recall(10) == pytest.approx(1 / 3) and a.recall(20) == pytest.approx(2 / 3)
    assert a.ndcg(10) == pytest.approx(1.0 / 3)


def test_score_from_learns_the_warm_up_without_scoring_it():
    # Offsets 0-2 are warm-up: learned (in chunks that end at offset 3), never ranked. User 1
    # is known from the warm-up, so their offset-3 event is evaluated (not cold) and their
    # warm-up items 100 and 103 are excluded: slot 4 ranks first. User 2 first appears at
    # offset 4, after the warm-up, so their event is cold.
    s = Scripted({1: ramp([3, 0, 4])})
    pairs = [(1, 100), (1, 103), (3, 101), (1, 104), (2, 102), (1, 105)]
    res = prequential(ListSource(pairs), s, chunk_size=2, score_from=3)
    assert s.chunks == [[(1, 100), (1, 103)], [(3, 101)], [(1, 104), (2, 102)], [(1, 105)]]
    assert res.eval_offsets.tolist() == [3, 5]
    assert res.eval_ranks.tolist()[0] == 0
    assert len(res.cold_ranks) == 1  # user 2's event; none from the warm-up
    assert res.events == 6 and res.summary()["score_from"] == 3
    # Without the warm-up, chunks start at offset 0 and offsets 0, 1, 2 and 4 are cold events.
    plain = Scripted({1: ramp([3, 0, 4])})
    full = prequential(ListSource(pairs), plain, chunk_size=2)
    assert [len(c) for c in plain.chunks] == [2, 2, 2] and len(full.cold_ranks) == 4
    with pytest.raises(ValueError, match="score_from"):
        prequential(ListSource(pairs), Scripted(), score_from=-1)


def test_metrics_coverage_staleness_and_explicit_errors():
    class Lagging(Scripted):
        def _learn(self, chunk):  # learns, but serves a model that knows only up to the previous chunk
            end = self.learned_end
            super()._learn(chunk)
            self.learned_end, self.learned_ts = end, float(chunk.timestamps.min()) - 1

    s = Lagging({1: ramp([4, 5]), 2: ramp([6])})
    pairs = [(1, 100), (2, 101), (1, 104), (2, 106), (3, 129)]
    res = prequential(ListSource(pairs, weights=[1.0, 1.0, 2.0, 4.0, 1.0]), s, chunk_size=2, explicit=True)
    assert res.eval_ranks.tolist() == [0, 0]
    assert res.staleness_events.tolist() == [2.0, 2.0]  # offsets 0..1 unlearned by the served model at offset 2
    assert res.staleness_s.tolist() == [3.0, 3.0]
    # Served top-10 lists hold 100, 101, 104, 106 of the stream's items but never 129.
    assert (res.recommended, res.catalogue) == (4, 5)
    assert res.summary()["coverage"] == pytest.approx(0.8)
    # Explicit view: predicted = score of the item (100 - rank position) vs the weight.
    assert res.predicted == 2
    assert res.summary()["rmse"] == pytest.approx(np.sqrt(((100 - 2.0) ** 2 + (100 - 4.0) ** 2) / 2))


def test_windowed_recall_and_recovery_have_known_answers():
    offsets = np.arange(0, 4000)
    ranks = np.where((offsets < 2000) | (offsets >= 2600), 0, -1)  # hits, a 600-event dip, hits again
    x, y = windowed_recall(offsets, ranks, window=100, points=41, end=4000)
    assert y[x == 1500][0] == 1.0 and y[x == 2300][0] == 0.0
    rec = recovery_events(offsets, ranks, 2000, window=200, pre_window=1000, step=50)
    assert rec["pre_recall@10"] == 1.0 and rec["min_recall@10"] == 0.0
    assert rec["events"] == 800  # the first 200-event window fully past the dip ends at 2800
    never = recovery_events(offsets, np.where(offsets < 2000, 0, -1), 2000, window=200)
    assert never["events"] is None
    with pytest.raises(ValueError, match="window"):
        windowed_recall(offsets, ranks, window=0)


def test_summary_metrics_count_ranks_below_k_only():
    # Ranks are 0-based: recall@10 and NDCG@10 count ranks 0..9, never rank 10.
    from workers.eval.protocol import EvalResult

    res = EvalResult("s", {}, events=4, eval_offsets=np.array([0, 1, 2, 3]), eval_ranks=np.array([9, 10, -1, 0]),
                     cold_ranks=np.array([0, 15, -1]), staleness_events=np.array([2.0, 2.0, 8.0, 0.0]),
                     staleness_s=np.array([np.nan, 1.0, 3.0, 9.0]))
    assert res.recall(10) == 0.5 and res.recall(11) == 0.75 and res.recall(20) == 0.75
    assert res.ndcg(10) == pytest.approx((1 / np.log2(11) + 1.0) / 4)
    # since= is inclusive: offsets 2 and 3 (a miss, a hit).
    assert res.recall(10, since=2) == 0.5 and res.recall(10, since=4) is None
    row = res.summary(warmup_offset=2)
    assert row["recall@10_after_warmup"] == 0.5
    assert row["cold_recall@10"] == pytest.approx(1 / 3) and row["cold_recall@20"] == pytest.approx(2 / 3)
    assert row["staleness_events_mean"] == 3.0  # the mean, not the median (2.0)
    assert row["staleness_s_median"] == 3.0  # NaN (before any learning) left out


def test_windowed_recall_window_is_open_at_its_start():
    # At x, the window holds offsets in (x - window, x]: at x = 9 with window 5, offsets 5..9
    # (all misses), not offset 4 (a hit).
    offsets = np.arange(10)
    ranks = np.where(offsets < 5, 0, -1)
    x, y = windowed_recall(offsets, ranks, window=5, points=11, end=10)
    assert x.tolist() == list(range(11))
    assert y[9] == 0.0 and y[8] == pytest.approx(1 / 5) and y[4] == 1.0


def test_recovery_needs_a_window_of_at_least_min_events():
    # Sparse hits after the dip fill 200-event windows with 20 events, all hits: too few to count
    # as recovered (that would say 800 events). The first window of >= 100 events at the
    # pre-shift level is [2900, 3100): 10 sparse and 100 dense hits.
    pre = np.arange(0, 1000)
    dip = np.arange(1000, 1600)
    sparse = np.arange(1600, 3000, 10)
    dense = np.arange(3000, 4000)
    offsets = np.concatenate([pre, dip, sparse, dense])
    ranks = np.concatenate([np.zeros(len(pre)), np.full(len(dip), -1), np.zeros(len(sparse)), np.zeros(len(dense))])
    rec = recovery_events(offsets, ranks.astype(np.int64), 1000, window=200, pre_window=1000, min_events=100, step=50)
    assert rec["pre_recall@10"] == 1.0 and rec["min_recall@10"] == 0.0
    assert rec["events"] == 2100


# --------------------------------------------------------------------------- progressive_ranks (freshet run)


def _catalogue():
    """30 items (IDs 100..129): item s scores s/30 for a user row [1, 0], except item 111,
    which only the context of item 110 finds; popularity falls with the slot."""
    from workers.eval.strategies import ItemView

    n = 30
    vec = np.stack([np.arange(n) / n, np.zeros(n)], axis=1).astype(np.float32)
    vec[11] = [0.0, 5.0]
    ctx = np.zeros((n, 2), np.float32)
    ctx[10] = [0.0, 1.0]
    mats = {"item": vec, "item_bias": np.zeros((n, 1), np.float32), "item_ctx": ctx,
            "item_pop": (n - np.arange(n, dtype=np.float32))[:, None]}
    return ItemView(list(range(100, 100 + n)), mats)


def test_progressive_ranks_update_seen_and_context_within_the_batch():
    from ps.ids import id_keys
    from workers.config import ModelConfig
    from workers.eval.protocol import RankTally, progressive_ranks
    from workers.ranking import Ranker

    view = _catalogue()
    model = ModelConfig(recent_table=None)
    ranker, pop = Ranker(view, model), Ranker(view, model.model_copy(update={"context_table": None}))
    u = id_keys([1, 2, 3, 4]).tolist()
    k = {i: int(x) for i, x in zip(range(100, 130), id_keys(list(range(100, 130))).tolist())}
    events = [(u[0], 129, True), (u[0], 128, True), (u[1], 110, True), (u[1], 111, True), (u[2], 120, False),
              (u[2], 121, True), (u[3], 102, True)]
    users = np.asarray([e[0] for e in events], np.uint64)
    items = np.asarray([k[e[1]] for e in events], np.uint64)
    positive = np.asarray([e[2] for e in events])
    seen = {u[0]: np.asarray([k[100]], np.uint64), u[3]: np.asarray([k[101]], np.uint64)}
    rows = {u[0]: np.asarray([1.0, 0.0], np.float32), u[1]: None, u[2]: None, u[3]: None}
    model_r, pop_r, fallbacks = progressive_ranks(ranker, pop, users, items, positive, rows, seen, {})
    # 129 tops user 1's list; then it is seen, so 128 does (rank 1 without the in-batch update).
    # User 2's first positive is cold; their second is ranked by the context of the first (no row
    # yet, as /rank serves a user the trainers have not reached). User 3: a non-positive, then a
    # cold positive (a non-positive makes no one warm). User 4 (earlier positive, no row, no
    # context): the model's popular fallback, their seen item 101 excluded.
    assert model_r.tolist() == [0, 0, -2, 0, -2, -2, 1]
    assert fallbacks == 1
    # All-time popularity (slot 0 first), the same exclusions: 129 and 128 are far down; 111 is
    # 11th with 110 excluded (the in-batch update); 102 is second with 101 excluded (100 first).
    assert pop_r.tolist() == [-1, -1, -2, 10, -2, -2, 1]
    assert seen[u[0]].tolist() == [k[100]]  # inputs are not modified
    tally: collections.Counter = collections.Counter()
    RankTally.add(tally, model_r, "m_")
    assert tally["m_hits@10"] == 4 and tally["m_hits@20"] == 4
    assert tally["m_ndcg@10"] == pytest.approx(3 + 1 / np.log2(3))


def test_warm_chunks_is_freshet_evals_rule_across_batches():
    from workers.eval.protocol import WarmChunks

    w = WarmChunks(chunk=2)
    # Positives 0,1 form chunk 0, 2,3 chunk 1, ... (non-positives do not count). User 1 is warm
    # from chunk 1 on; user 2 first appears in chunk 1 and is warm from chunk 2, whatever batch.
    a = w.mark(np.array([1, 1, 9, 2]), np.array([True, True, False, True]))
    b = w.mark(np.array([2, 1, 2]), np.array([True, True, True]))
    assert a.tolist() == [False, False, False, False]
    assert b.tolist() == [False, True, True]
    with pytest.raises(ValueError):
        WarmChunks(chunk=0)


def test_explicit_errors_score_the_regression_without_the_recent_popularity_prior():
    # An MSE model is trained on u.item + bias against the rating (workers.model.mse_loss); the
    # recent-popularity prior is added only to rank. Item 104's recent count is e - 1, so the
    # ranking score carries recent_weight * log1p(e - 1) = recent_weight on top of the regression.
    from tests.workers.eval.scripted import CFG, ITEMS
    from workers.eval.strategies import ItemView
    from workers.ranking import Ranker

    m = CFG.model
    assert m.recent_table is not None and m.recent_weight == 1.5
    with_prior = m.model_copy(update={"context_table": None})

    class WithPrior(Scripted):
        def __init__(self, scores):
            super().__init__(scores)
            recent = np.zeros((N_ITEMS, 2), np.float32)
            recent[4] = [np.e - 1.0, 1.0]  # (count, clock): the newest clock, so no decay
            self.view = ItemView(ITEMS, {**self.view._mats, m.recent_table: recent})

        def ranker(self):
            return Ranker(self.view, with_prior)

    scores = [0.0] * N_ITEMS
    scores[4] = 3.0  # the regression predicts a rating of 3 for item 104
    res = prequential(ListSource([(1, 100), (1, 104)], weights=[5.0, 3.0]), WithPrior({1: scores}),
                      chunk_size=1, explicit=True)
    assert res.predicted == 1
    assert res.summary()["rmse"] == pytest.approx(0.0, abs=1e-5)
    assert res.summary()["mae"] == pytest.approx(0.0, abs=1e-5)


def test_session_context_is_the_latest_events_items_even_when_one_repeats():
    # The trainer's context (workers.step.Histories) and /rank's (the shard's recent items, by
    # offset) are the items of the user's latest events, repeats included. User 1 consumes 110,
    # 111, then 110 again: with a context of one item, 110's context row (which points at item
    # 120) must steer the next ranking, not 111's (which points at item 121).
    from tests.workers.eval.scripted import CFG, ITEMS
    from workers.eval.strategies import ItemView
    from workers.ranking import Ranker

    m = CFG.model
    model = m.model_copy(update={"recent_table": None, "context_items": 1})
    ctx = np.zeros((N_ITEMS, N_ITEMS), np.float32)
    ctx[10, 20] = ctx[11, 21] = 50.0

    class WithContext(Scripted):
        def __init__(self, scores):
            super().__init__(scores)
            self.view = ItemView(ITEMS, {**self.view._mats, m.context_table: ctx})

        def ranker(self):
            return Ranker(self.view, model)

    res = prequential(ListSource([(1, 110), (1, 111), (1, 110), (1, 120)]), WithContext({1: [0.0] * N_ITEMS}),
                      chunk_size=1)
    assert res.eval_offsets.tolist() == [1, 2, 3]
    assert res.eval_ranks.tolist()[2] == 0
