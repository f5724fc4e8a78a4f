"""The synthetic stream (:mod:`workers.streams.synthetic`)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.workers.streams.helpers import EVENT_TYPES, concat, keys, rows
from workers.config import SyntheticConfig
from workers.events import EVENT_COLUMNS
from workers.streams import SyntheticSource


def test_synthetic_random_access_is_order_independent():
    cfg = SyntheticConfig(seed=3)
    a = SyntheticSource(cfg, 20_000)
    whole = rows(a.read(0, 1000))
    assert whole == concat(a.read(0, 500), a.read(500, 500))
    # Across a chunk boundary, read backwards on a fresh source and forwards on another.
    b, c = SyntheticSource(cfg, 20_000), SyntheticSource(cfg, 20_000)
    backwards = [b.read(o, 700) for o in range(12_600, 3000, -700)][::-1]
    forwards = c.read(3500, 9800)
    assert concat(*backwards) == rows(forwards)
    assert rows(b.read(0, 1000)) == whole


def test_synthetic_seed_determines_stream():
    a = SyntheticSource(SyntheticConfig(seed=1), 5000).read(0, 5000)
    b = SyntheticSource(SyntheticConfig(seed=1), 5000).read(0, 5000)
    c = SyntheticSource(SyntheticConfig(seed=2), 5000).read(0, 5000)
    assert rows(a) == rows(b)
    assert rows(a)["item_id"] != rows(c)["item_id"]
    assert rows(a)["user_id"] != rows(c)["user_id"]


def test_synthetic_schema_and_values():
    cfg = SyntheticConfig(num_users=300, num_items=200)
    src = SyntheticSource(cfg, 10_000)
    before = time.time()
    b = src.read(100, 5000)
    assert b.schema.names == list(EVENT_COLUMNS)
    assert [str(t) for t in b.schema.types] == EVENT_TYPES
    d = b.to_pydict()
    assert d["offset"] == list(range(100, 5100))
    assert all(0 <= u < 300 for u in d["user_id"])
    assert all(0 <= i < 200 for i in d["item_id"])
    assert d["user_key"] == keys(d["user_id"]) and d["item_key"] == keys(d["item_id"])
    assert set(d["event_type"]) == set(d["event_id"]) == {None}
    assert set(d["weight"]) == {1.0}
    ts = np.array(d["timestamp"])
    assert np.all(np.diff(ts) >= 0)
    assert 1_700_000_000 <= ts[0] < 1_700_000_000 + 200
    assert 0.9 < np.diff(ts).mean() < 1.1
    assert all(before - 1 <= t <= time.time() + 1 for t in d["ingest_ts"])


def test_synthetic_end_offset_and_past_end():
    src = SyntheticSource(SyntheticConfig(), 1000)
    assert src.end_offset == 1000
    assert src.quarantined == 0
    assert src.read(900, 500).num_rows == 100
    assert src.read(1000, 10).num_rows == 0
    assert src.read(5000, 10).num_rows == 0
    assert src.read(0, 0).num_rows == 0
    unbounded = SyntheticSource(SyntheticConfig(), None)
    assert unbounded.end_offset is None
    far = unbounded.read(10_000_000, 10)
    assert far.column("offset").to_pylist() == list(range(10_000_000, 10_000_010))
    with pytest.raises(ValueError, match="offset"):
        src.read(-1, 10)
    with pytest.raises(ValueError, match="num_events"):
        SyntheticSource(SyntheticConfig(), -5)
    src.close()
    with pytest.raises(ValueError, match="closed"):
        src.read(0, 10)


def test_synthetic_popularity_is_skewed_and_shuffled():
    cfg = SyntheticConfig(num_items=1000, drift_at=None)
    d = SyntheticSource(cfg, 50_000).read(0, 50_000).to_pydict()
    counts = np.bincount(d["item_id"], minlength=1000)
    top = np.sort(counts)[::-1]
    assert top[:100].sum() / counts.sum() > 0.5  # uniform would give 0.1
    # Item ids are not popularity ranks: count is not ordered by id.
    ranks_by_id = np.argsort(np.argsort(-counts))
    assert abs(np.corrcoef(np.arange(1000), ranks_by_id)[0, 1]) < 0.2


def test_synthetic_sessions():
    cfg = SyntheticConfig(num_users=2000, session_mean=5.0)
    users = np.array(SyntheticSource(cfg, 40_000).read(0, 40_000).column("user_id").to_pylist())
    same = (users[1:] == users[:-1]).mean()
    assert same > 0.6  # independent draws would give about 1/num_users plus heavy-user chance
    runs = np.diff(np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1], [True]])))
    assert 4.0 < runs.mean() < 7.0
    # One-event sessions are almost independent draws.
    single = np.array(SyntheticSource(SyntheticConfig(session_mean=1.0), 20_000).read(0, 20_000).column("user_id").to_pylist())
    assert (single[1:] == single[:-1]).mean() < 0.1


def _cluster_item_counts(src: SyntheticSource, lo: int, hi: int, num_clusters: int, num_items: int) -> np.ndarray:
    d = src.read(lo, hi - lo).to_pydict()
    clusters = src.cluster_of(np.array(d["user_id"]))
    counts = np.zeros((num_clusters, num_items))
    np.add.at(counts, (clusters, np.array(d["item_id"])), 1)
    return counts


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int = 20) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def test_synthetic_drift_changes_cluster_tastes():
    n, c, items = 80_000, 4, 500
    src = SyntheticSource(SyntheticConfig(num_items=items, num_clusters=c, drift_at=0.5), n)
    assert src.drift_offset == 40_000
    early = _cluster_item_counts(src, 0, 20_000, c, items)
    late_pre = _cluster_item_counts(src, 20_000, 40_000, c, items)
    post = _cluster_item_counts(src, 40_000, 60_000, c, items)
    # Globally popular items stay shared, so compare the in-taste heads.
    stable = np.mean([_top_overlap(early[k], late_pre[k]) for k in range(c)])
    shifted = np.mean([_top_overlap(late_pre[k], post[k]) for k in range(c)])
    assert stable > 0.7
    assert shifted < 0.5
    assert stable - shifted > 0.3

    nodrift = SyntheticSource(SyntheticConfig(num_items=items, num_clusters=c, drift_at=None), n)
    assert nodrift.drift_offset is None
    a = _cluster_item_counts(nodrift, 20_000, 40_000, c, items)
    b = _cluster_item_counts(nodrift, 40_000, 60_000, c, items)
    assert np.mean([_top_overlap(a[k], b[k]) for k in range(c)]) > 0.7


def test_synthetic_unbounded_drift_uses_default_horizon():
    src = SyntheticSource(SyntheticConfig(drift_at=0.25), None)
    assert src.drift_offset == 25_000


def test_synthetic_long_sequential_read():
    # Speed lives in benchmarks, not in timed tests: this only reads a long stream through.
    src = SyntheticSource(SyntheticConfig(), 200_000)
    n = sum(src.read(o, 10_000).num_rows for o in range(0, 200_000, 10_000))
    assert n == 200_000
