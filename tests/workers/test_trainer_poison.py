"""Poison never stops training and never reaches a shard or the WAL (the trainer, without Ray).

An in-process :class:`workers.trainer.Trainer` (rows in a ``ps.local.LocalClient`` shard, a
real WAL and dead-letter file under ``tmp_path``) learns batches as the ingest stream delivers
them, with poisoned events among them:

* weights the model refuses (beyond ``model.max_abs_weight``, NaN, outside an MSE model's
  ``rating_range``): what ``POST /events`` answers 422 for, here arriving behind the door. A
  weight of 1e20 on a BPR model gives finite gradients whose squares overflow the shards'
  float32 Adagrad state; such events must be set aside with their offset and reason and
  leave no trace: the shard ends bit-identical to a run that never saw them;
* an event whose loss is not finite (injected into one event's loss term): set aside, the
  rest of its batch trained.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ps.ids import Keyed
from ps.local import LocalClient
from serving.config import load_config
from workers.events import make_events
from workers.trainer import Trainer

N = 40


def _trainer(tmp_path, model: dict) -> Trainer:
    cfg = load_config(None, {"ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}}, "model": model,
                             "trainer": {"batch_size": 64, "passes": 2, "device": "cpu"},
                             "ingest": {"dir": str(tmp_path)}})
    return Trainer(0, cfg, state_dir=tmp_path, client=LocalClient(cfg.ps))


def _events(weights: np.ndarray, first: int = 0, event_type: str | None = None) -> pa.RecordBatch:
    n = len(weights)
    return make_events(np.arange(first, first + n), [f"u{j % 6}" for j in range(n)], [j % 9 for j in range(n)],
                       np.full(n, 1.7e9), weights, 1.7e9, event_types=None if event_type is None else [event_type] * n)


def _shard_state(t: Trainer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every table's rows and optimizer state (by key order), from the in-process shard."""
    out = {}
    for name, table in t.client.shard.tables.items():
        keys = t.client.live_keys(name)[0][1]
        order = np.argsort(keys)
        rows = t.client.pull_many({name: Keyed(keys[order])})[name][0]
        out[name] = (rows, table.state.numpy().copy())
    return out


def _wal_grads(t: Trainer) -> np.ndarray:
    with pa.memory_map(str(t.root / "wal.arrows")) as src:
        table = pa.ipc.open_stream(src).read_all()
    return table.column("grads").combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _dead_letters(t: Trainer) -> list[dict]:
    with pa.OSFile(str(t.root / "dead-letter.arrows"), "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


@pytest.mark.parametrize(("model", "poison", "why", "event_type"), [
    ({"loss": "bpr"}, {3: 1e20, 17: 3.0e38, 29: float("nan")}, ["max_abs_weight", "max_abs_weight", "refused"], None),
    ({"loss": "mse", "rating_range": [1.0, 5.0]}, {3: 6.0, 17: 3.0e38, 29: 0.5}, ["rating_range", "max_abs_weight",
                                                                               "rating_range"], None),
    # Ratings past model.ratings.scale (5), which a direct append can still put in the log.
    ({"loss": "bpr"}, {3: 6.0, 17: 1000.0, 29: -5.5}, ["ratings.scale"] * 3, "rating"),
], ids=["bpr", "mse", "ratings"])
def test_refused_weights_are_set_aside_and_leave_no_trace(tmp_path, model, poison, why, event_type):
    weights = np.asarray([1.0 + j % 5 for j in range(N)])  # 1..5: positives, and legal ratings
    for j, w in poison.items():
        weights[j] = w
    raw, clean = _events(weights, event_type=event_type), _events(weights, event_type=event_type)
    keep = np.ones(N, bool)
    keep[list(poison)] = False
    clean = clean.filter(pa.array(keep))

    t = _trainer(tmp_path / "poisoned", model)
    ref = _trainer(tmp_path / "reference", model)
    for first, (a, b) in enumerate([(raw, clean), (_events(np.ones(N), N), _events(np.ones(N), N))]):
        t.learn(a, (first + 1) * N)
        ref.learn(b, (first + 1) * N)

    s = t.stats()
    assert s["dead_lettered"] == len(poison) and s["events_applied"] == 2 * N - len(poison), s
    assert s["applied_offset"] == 2 * N
    dead = _dead_letters(t)
    assert [d["offset"] for d in dead] == sorted(poison)
    for d, word in zip(dead, why):
        assert d["partition"] == 0 and d["reason"].startswith("weight") and word in d["reason"], d
    # No trace: rows, optimizer state and push count are those of a run without the poison.
    got, want = _shard_state(t), _shard_state(ref)
    for name in want:
        np.testing.assert_array_equal(got[name][0], want[name][0], err_msg=name)
        np.testing.assert_array_equal(got[name][1], want[name][1], err_msg=name)
        assert np.isfinite(got[name][0]).all() and np.isfinite(got[name][1]).all(), name
    assert t.client.shard.version == ref.client.shard.version  # the same pushes applied
    assert np.isfinite(_wal_grads(t)).all()


def test_an_event_with_a_non_finite_loss_is_set_aside_and_the_batch_trains(tmp_path):
    t = _trainer(tmp_path, {"loss": "bpr"})
    original = t.step.losses

    def losses(batch, pulled, p, events):
        # An event of weight 7 (legal) gets a NaN loss term, as a corrupted row would give it.
        terms, leaves = original(batch, pulled, p, events)
        marked = torch.from_numpy(batch.weights[events] == 7.0)
        return terms + torch.where(marked, torch.tensor(float("nan")), torch.tensor(0.0)), leaves

    t.step.losses = losses
    weights = np.ones(N)
    weights[11] = 7.0
    weights[5] = -1.0  # a dislike: the batch takes the general (autograd) path, which calls losses()
    t.learn(_events(weights), N)
    s = t.stats()
    assert s["dead_lettered"] == 1 and s["events_applied"] == N - 1 and s["applied_offset"] == N, s  # the dislike applies
    (dead,) = _dead_letters(t)
    assert dead["offset"] == 11 and "non-finite" in dead["reason"], dead
    assert s["metrics"]["loss_sum"] is not None and s["metrics"]["loss_sum"] > 0
    for name, (rows, state) in _shard_state(t).items():
        assert np.isfinite(rows).all() and np.isfinite(state).all(), name
    assert np.isfinite(_wal_grads(t)).all()
    # The other events trained: their items have popularity counts, the poisoned one's adds nothing.
    pop = t.client.pull_many({"item_pop": list(range(9))})["item_pop"][0][:, 0]
    assert pop.sum() == N - 2  # every positive but the poisoned one (the dislike is never popular)
