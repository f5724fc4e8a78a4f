"""``open_source``: the configured stream, of every kind."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.workers.streams.helpers import ML_DAT_LINES, ML_LINES, _write
from workers.config import LossKind, ModelConfig, StreamConfig, StreamKind
from workers.streams import (
    MovieLensSource,
    ParquetSource,
    StreamDataError,
    SyntheticSource,
    open_source,
    read_quarantine,
)
from workers.streams.base import weight_out_of_bounds, weight_reason


def test_open_source_kinds(tmp_path):
    syn = open_source(StreamConfig(num_events=123))
    assert isinstance(syn, SyntheticSource) and syn.end_offset == 123
    assert syn.quarantined == 0 and syn.quarantine_file is None
    f = _write(tmp_path / "ratings.csv", ML_LINES + ["x,1,1,1"])
    q = tmp_path / "q.arrow"
    ml = open_source(StreamConfig(kind=StreamKind.MOVIELENS, path=str(f), min_weight=4.0, num_events=None), quarantine_path=q)
    assert isinstance(ml, MovieLensSource) and ml.end_offset == 3 and ml.quarantined == 1
    assert read_quarantine(q).num_rows == 1 and ml.quarantine_file == q
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": [3.0]}), tmp_path / "e.parquet")
    pqs = open_source(StreamConfig(kind=StreamKind.PARQUET, path=str(tmp_path / "e.parquet")))
    assert isinstance(pqs, ParquetSource) and pqs.end_offset == 1
    with pytest.raises(ValueError, match="ingest"):
        open_source(StreamConfig(kind=StreamKind.INGEST))


def test_open_source_ratings_dat_directory(tmp_path):
    _write(tmp_path / "ml-10M100K" / "ratings.dat", ML_DAT_LINES, "\r\n")
    src = open_source(StreamConfig(kind=StreamKind.MOVIELENS, path=str(tmp_path / "ml-10M100K"), num_events=None))
    assert isinstance(src, MovieLensSource) and src.end_offset == 5
    assert src.read(0, 10).column("event_type").to_pylist() == ["rating"] * 5


def test_open_source_passes_the_model_and_the_quarantine_share(tmp_path):
    f = _write(tmp_path / "ratings.csv", ML_LINES)
    cfg = StreamConfig(kind=StreamKind.MOVIELENS, path=str(f), num_events=None)
    assert open_source(cfg).end_offset == 5  # without a model, ratings up to 5 are fine
    mse = ModelConfig(loss="mse", rating_range=(4.0, 5.0))  # keeps 4.0, 4.5, 5.0 of the five
    src = open_source(cfg, model=mse)
    assert src.end_offset == 3 and src.quarantined == 2
    strict = ModelConfig(loss="mse", rating_range=(4.6, 5.0))  # keeps only 5.0: 4 of 5 rejected
    with pytest.raises(StreamDataError, match="4 of 5 rows quarantined"):
        open_source(cfg, model=strict)
    lenient = cfg.model_copy(update={"max_quarantined_fraction": 1.0})
    assert open_source(lenient, model=strict).end_offset == 1


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),
        ModelConfig(max_abs_weight=4.5),
        ModelConfig(loss=LossKind.MSE, rating_range=(1.0, 5.0)),
        ModelConfig(loss=LossKind.BPR, rating_range=(1.0, 5.0)),
        None,
    ],
)
def test_vectorised_weight_check_agrees_with_the_model(model):
    # The file sources check weights vectorised; ModelConfig.weight_problem is the rule.
    w = np.array([-1e39, -1001.0, -1000.0, -4.5, 0.0, 0.5, 0.99, 1.0, 4.5, 4.51, 5.0, 5.01, 1000.0, 1000.5, 3e38, 4e38])
    mask = weight_out_of_bounds(w, model)
    assert mask.tolist() == [weight_reason(float(x), model) is not None for x in w]
    if model is not None:
        small = np.abs(w) < 3e38
        assert mask[small].tolist() == [model.weight_problem(float(x)) is not None for x in w[small]]
    # Every other event a rating: those past model.ratings.scale (5) in size are refused too.
    is_rating = np.arange(len(w)) % 2 == 1
    mask = weight_out_of_bounds(w, model, is_rating)
    assert mask.tolist() == [weight_reason(float(x), model, "rating" if r else None) is not None
                             for x, r in zip(w, is_rating)]
    if model is not None and model.loss == LossKind.BPR and model.max_abs_weight > 5:
        assert model.weight_problem(5.01, "rating") and model.weight_problem(-5.01, "rating")
        assert not model.weight_problem(5.0, "rating") and not model.weight_problem(5.01, "view")


def test_the_rating_bound_is_judged_in_float32_as_the_log_stores_ratings():
    # A scale of 4.3 is not a float32: compared in float64, a rating of exactly 4.3 passed the
    # door and was then dead-lettered by the trainer, which reads it back as float32(4.3).
    # (The trainer's check, Trainer._admitted, is weight_out_of_bounds on the stored weights.)
    model = ModelConfig(ratings={"scale": 4.3})
    up = float(np.nextafter(np.float32(4.3), np.float32(5)))
    assert model.weight_problem(4.3, "rating") is None and model.weight_problem(up, "rating") is not None
    stored = np.asarray([4.3, up, -4.3], np.float32).astype(np.float64)  # what a trainer reads from the log
    assert weight_out_of_bounds(stored, model, True).tolist() == [False, True, False]
    assert weight_out_of_bounds(np.asarray([4.3, up]), model, True).tolist() == [False, True]
