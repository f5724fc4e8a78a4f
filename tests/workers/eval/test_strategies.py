"""Update strategies (:mod:`workers.eval.strategies`): specs, and every strategy end to end
on a slice of the shared MovieLens file through :func:`workers.eval.compare.run_eval`."""

from __future__ import annotations

import json

import pytest

from serving.config import load_config
from tests.workers.eval.scripted import CFG, ListSource, Scripted
from workers.eval.compare import run_eval
from workers.eval.protocol import prequential
from workers.eval.strategies import make_strategy, parse_strategy_spec


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


def test_every_strategy_runs_end_to_end_and_the_report_parses(movielens_ratings, tmp_path, ray_cluster):
    cfg = load_config(None, {"ps": {"tables": {"user": {"dim": 16}, "item": {"dim": 16}},
                                    "optimizer": {"accumulator_decay": 0.995}}})
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
    assert rows["incremental"]["settings"]["accumulator_decay"] == 0.995  # the report says which rule learnt
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


@pytest.mark.parametrize("name", ["finetune", "retrain"])
def test_periodic_strategies_refit_every_n_events(name, monkeypatch):
    # Fine-tune used to refit after 2N, 3N, 4N, ... new events (its event count restarts at
    # each fit, its next refit point did not), each time on only the last N of them.

    from workers.eval import strategies
    from workers.eval.strategies import Chunk

    fits: list[tuple[int, int]] = []  # (events learned so far, events fitted on)

    def fit(self, users, items, weights, *, epochs, batch_size, contexts, confidence):
        fits.append((seen[0], len(users)))

    monkeypatch.setattr(strategies._LocalMF, "fit", fit)
    strat = make_strategy(f"{name}:every=100", CFG, total_events=1000)
    src, seen = ListSource([(u % 7, 100 + u % 11) for u in range(1000)]), [0]
    for lo in range(0, 1000, 20):
        seen[0] = lo + 20
        strat.learn(Chunk.from_batch(src.read(lo, 20)))
    assert [at for at, _ in fits] == list(range(100, 1001, 100))
    assert [n for _, n in fits] == ([100] * 10 if name == "finetune" else list(range(100, 1001, 100)))
    assert strat.describe()["fits"] == 10


def test_periodic_baselines_weigh_ratings_as_the_trainer_does():
    # The in-process MF baselines counted and trained every MovieLens positive at weight 1;
    # the trainer weighs a rating r at or above 4 by r / 5 (workers.model.signals).
    from workers.eval.strategies import Chunk
    from workers.events import make_events

    strat = make_strategy("retrain:every=4,epochs=1", CFG, total_events=4)
    ratings = [4.0, 5.0, 4.5, 5.0]
    strat.learn(Chunk.from_batch(make_events(range(4), [1, 2, 3, 4], [10, 10, 11, 12], [1000.0 + j for j in range(4)],
                                             ratings, event_types=["rating"] * 4)))
    assert strat.retrains == 1
    counts = dict(zip(strat.mf.item_ids, strat.mf.counts.tolist()))
    assert counts == pytest.approx({10: 1.8, 11: 0.9, 12: 1.0})
    assert strat.recent.rows_for([10, 11, 12])[:, 0].tolist() == pytest.approx([1.8, 0.9, 1.0])
