"""``workers.model.signals`` and the training step that reads it: what an event's weight,
type and rating teach (issue 13), without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from workers.config import ModelConfig
from workers.model import signals


def _sig(weights, types=None, **model):
    conf, pos, neg = signals(np.asarray(weights, np.float64), types, ModelConfig(**model))
    return conf.tolist(), pos.tolist(), neg.tolist()


def test_weight_is_the_confidence_of_a_positive_and_at_or_below_zero_is_a_dislike():
    conf, pos, neg = _sig([1.0, -1.0, 0.0, 5.0, -5.0, 0.25])
    assert pos == [True, False, False, True, False, True]
    assert neg == [False, True, False, False, True, False]  # 0 teaches nothing at all
    assert conf == pytest.approx([1.0, 1.0, 0.0, 5.0, 5.0, 0.25])


def test_event_types_multiply_the_weight_and_unlisted_types_count_one():
    types = ["purchase", "view", "click", None, "view"]
    conf, pos, neg = _sig([1.0, 1.0, 2.0, 3.0, -1.0], types, event_weights={"purchase": 5.0, "view": 0.5})
    assert conf == pytest.approx([5.0, 0.5, 2.0, 3.0, 0.5])
    assert pos == [True, True, True, True, False] and neg == [False] * 4 + [True]


@pytest.mark.parametrize("below, dislikes", [("ignore", [False] * 5), ("negative", [False, False, True, True, True])])
def test_ratings_follow_the_rating_rule(below, dislikes):
    ratings = [5.0, 4.0, 3.5, 1.0, 0.5]
    conf, pos, neg = _sig(ratings, ["rating"] * 5, ratings={"positive_at": 4.0, "scale": 5.0, "below": below})
    assert pos == [True, True, False, False, False]
    assert neg == dislikes
    assert conf[:2] == pytest.approx([1.0, 0.8])  # rating / scale
    assert conf[2:] == pytest.approx([0.1, 0.6, 0.7])  # (positive_at - rating) / scale, used only as dislikes


def test_ratings_and_other_types_mix_in_one_batch():
    conf, pos, neg = _sig([4.5, 4.5, 2.0], ["rating", "purchase", "rating"], event_weights={"purchase": 2.0})
    assert pos == [True, True, False] and neg == [False, False, False]
    assert conf[:2] == pytest.approx([0.9, 9.0])


def _batch(weights, types):
    from ps.ids import id_keys

    n = len(weights)
    users, items = np.arange(n, dtype=np.int64) % 2, np.arange(n, dtype=np.int64) + 100
    return pa.RecordBatch.from_pydict({
        "offset": pa.array(np.arange(n), pa.int64()), "user_id": pa.array(users), "item_id": pa.array(items),
        "user_key": pa.array(id_keys(users.tolist()), pa.uint64()), "item_key": pa.array(id_keys(items.tolist()), pa.uint64()),
        "timestamp": pa.array(np.zeros(n)), "weight": pa.array(np.asarray(weights, np.float32)),
        "event_type": pa.array(types, pa.string()), "event_id": pa.array([None] * n, pa.string()),
        "ingest_ts": pa.array(np.zeros(n)),
    })


@pytest.mark.parametrize("feedback", ["explicit", "ignore"])
def test_training_step_counts_only_positives_by_confidence_and_dislikes_only_when_explicit(feedback):
    from ps.ids import id_keys
    from serving.config import load_config
    from workers.negatives import Catalogue
    from workers.step import Histories, TrainStep

    cfg = load_config(None, {"model": {"negative_feedback": feedback, "event_weights": {"purchase": 5.0}}})
    step = TrainStep(cfg)
    raw = _batch([1.0, -1.0, 0.0, 1.0, 2.0], [None, None, None, "purchase", "rating"])
    batch = step.prepare(raw, 5, Catalogue(), Histories(cfg.model.context_items))
    assert batch.positive.tolist() == [True, False, False, True, False]  # a rating of 2 is below positive_at
    assert batch.dislike.tolist() == [False, feedback == "explicit", False, False, False]
    counts = step.counts(batch)[cfg.model.popularity_table]
    assert counts[0].ids.tolist() == [100, 103] and counts[1][:, 0].tolist() == pytest.approx([1.0, 5.0])
    users, items, offsets = step.recent(batch)
    assert items.keys.tolist() == id_keys([100, 103]).tolist() and offsets.tolist() == [0, 3]
