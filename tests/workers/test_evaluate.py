"""Tests for workers.evaluate (the prequential protocol and report) and workers.strategies.

The protocol tests use a scripted strategy whose scores the test sets directly, so
every hit, miss and rank is known in advance; the end-to-end tests run each real
strategy on a slice of the shared MovieLens file.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from ps.config import FreshetConfig, load_config
from workers.evaluate import (
    add_eval_arguments,
    cmd_eval,
    hit_rank,
    prequential,
    recovery_events,
    run_eval,
    windowed_recall,
)
from workers.events import empty_events, make_events
from workers.ranking import Ranked, Ranker
from workers.strategies import Chunk, ItemView, Strategy, make_strategy, parse_strategy_spec

CFG = FreshetConfig()
# The scripted scores are the whole score: no recent-popularity prior, no session context.
MODEL = CFG.model.model_copy(update={"recent_table": None, "context_table": None})
N_ITEMS = 30
ITEMS = [100 + j for j in range(N_ITEMS)]  # catalogue slot j holds item 100 + j


class ListSource:
    """A finite stream of (user, item) pairs, one second apart."""

    def __init__(self, pairs: list[tuple[int, int]], weights: list[float] | None = None):
        self.pairs = pairs
        self.weights = weights or [1.0] * len(pairs)

    @property
    def end_offset(self) -> int:
        return len(self.pairs)

    def read(self, offset: int, n: int):
        stop = min(offset + n, len(self.pairs))
        if stop <= offset:
            return empty_events()
        sel = self.pairs[offset:stop]
        return make_events(
            np.arange(offset, stop), [u for u, _ in sel], [i for _, i in sel],
            [1000.0 + o for o in range(offset, stop)], self.weights[offset:stop],
        )


class Scripted(Strategy):
    """Scores are whatever the test sets: user vector = one score per catalogue slot."""

    name = "scripted"

    def __init__(self, scores: dict[int, list[float]] | None = None, bias: list[float] | None = None,
                 pop: list[float] | None = None, after_learn=None):
        super().__init__()
        self.scores = {u: np.asarray(s, np.float32) for u, s in (scores or {}).items()}
        m = CFG.model
        self.view = ItemView(ITEMS, {
            m.item_table: np.eye(N_ITEMS, dtype=np.float32),
            m.item_bias_table: np.asarray(bias or [0.0] * N_ITEMS, np.float32)[:, None],
            m.popularity_table: np.asarray(pop or [0.0] * N_ITEMS, np.float32)[:, None],
        })
        self.after_learn = after_learn
        self.chunks: list[list[tuple[int, int]]] = []

    def ranker(self) -> Ranker:
        return Ranker(self.view, MODEL)

    def user_vectors(self, users):
        found = np.array([u in self.scores for u in users.tolist()], bool)
        vecs = np.stack([self.scores.get(u, np.zeros(N_ITEMS, np.float32)) for u in users.tolist()])
        return vecs, found

    def _learn(self, chunk: Chunk) -> None:
        self.chunks.append(list(zip(chunk.users.tolist(), chunk.items.tolist())))
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1
        if self.after_learn:
            self.after_learn(self, chunk)


def ramp(best_first: list[int]) -> list[float]:
    """Scores giving the listed slots the top places in that order, the rest descending by slot."""
    s = [float(-j) for j in range(N_ITEMS)]
    for r, slot in enumerate(best_first):
        s[slot] = 100.0 - r
    return s


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


def test_strategy_specs_are_validated():
    assert parse_strategy_spec("retrain:every=1000,epochs=5") == ("retrain", {"every": 1000, "epochs": 5})
    assert parse_strategy_spec("popularity:halflife=none") == ("popularity", {"halflife": None})
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        parse_strategy_spec("bogus")
    with pytest.raises(ValueError, match="epochs must be a number"):
        parse_strategy_spec("retrain:epochs=lots")
    with pytest.raises(ValueError, match="retrain has no setting 'speed'"):
        make_strategy("retrain:speed=3", CFG, total_events=100)
    with pytest.raises(ValueError, match="chunk_size"):
        prequential(ListSource([(1, 100)]), Scripted(), chunk_size=0)


# --------------------------------------------------------------------------- end to end



def test_every_strategy_runs_end_to_end_and_the_report_parses(movielens_ratings, tmp_path, ray_cluster):
    cfg = load_config(None, {"ps": {"tables": {"user": {"dim": 16}, "item": {"dim": 16}}}})
    specs = ["incremental", "popularity", "frozen:epochs=3", "retrain:every=500,epochs=2", "finetune:every=500,epochs=2", "als"]
    report = run_eval(cfg, data=str(movielens_ratings), strategies=specs, report_dir=tmp_path, max_events=2000, progress=False)
    rows = report["strategies"]
    assert set(rows) == set(specs) - {"als"} | ({"als"} & set(rows))
    if "als" not in rows:
        assert "implicit" in report["skipped"]["als"]
    for name, r in rows.items():
        assert r["events"] == 2000, name
        assert r["evaluated"] > 500 and r["evaluated"] + r["cold_events"] == 2000, name
        assert 0.0 <= r["recall@10"] <= r["recall@20"] <= 1.0, name
        assert 0.0 < r["coverage"] <= 1.0, name
    # Same stream, same protocol: every strategy evaluates the same events.
    assert len({r["evaluated"] for r in rows.values()}) == 1
    assert rows["incremental"]["staleness_events_mean"] == 0.0
    assert rows["incremental"]["cpu_s"] > 0 and rows["incremental"]["settings"]["shard_cpu_s"] > 0
    assert rows["frozen:epochs=3"]["staleness_events_mean"] > 0
    assert rows["retrain:every=500,epochs=2"]["settings"]["fits"] == 4
    assert rows["incremental"]["recall@10"] > 0.5 * rows["popularity"]["recall@10"]

    loaded = json.loads((tmp_path / "report.json").read_text())
    assert set(loaded["strategies"]) == set(rows)
    assert "incremental_over_popularity" in loaded["targets"]
    md = (tmp_path / "report.md").read_text()
    assert "| strategy | recall@10 | recall@20 | NDCG@10 | coverage | CPU-s |" in md
    for png in ("windowed_recall.png", "quality_vs_cpu.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_runs_on_synthetic_and_rejects_bad_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--data", "synthetic", "--events", "1200", "--strategies", "popularity,frozen:fraction=0.5;epochs=2",
                              "--report", str(tmp_path), "--no-progress"])
    assert cmd_eval(args) == 0
    out = capsys.readouterr().out
    assert "| popularity |" in out and "| frozen:fraction=0.5,epochs=2 |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["drift_offset"] == 600 and "recovery" in report["strategies"]["popularity"]
    bad = parser.parse_args(["--data", "synthetic", "--strategies", "nope", "--report", str(tmp_path)])
    assert cmd_eval(bad) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    missing = parser.parse_args(["--data", str(tmp_path / "absent.csv"), "--report", str(tmp_path)])
    assert cmd_eval(missing) == 2
