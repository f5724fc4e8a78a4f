"""The training step's fast paths: hand-written BPR gradients equal autograd's, the CPU
path copies no inputs, and (only where a GPU is present) the trainer runs on CUDA with
pinned, batched transfers and trains like the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps.local import LocalClient
from serving.config import load_config
from workers.negatives import Catalogue
from workers.step import DeviceTransfer, Histories, TrainStep
from workers.streams import open_source
from workers.trainer import Trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(cfg, n_events: int, size: int):
    step, catalogue, histories = TrainStep(cfg), Catalogue(), Histories(cfg.model.context_items)
    src = open_source(cfg.stream)
    for lo in range(0, n_events, size):
        raw = src.read(lo, size)
        yield step, step.prepare(raw, lo + raw.num_rows, catalogue, histories)


@pytest.mark.parametrize("context", [True, False])
def test_hand_written_bpr_gradients_equal_autograd(context):
    cfg = load_config(None, {"stream": {"num_events": 2048}, "model": {} if context else {"context_table": None}})
    client = LocalClient(cfg.ps)
    seen_context = False
    for k, (step, batch) in enumerate(_batches(cfg, 2048, 256)):
        pulled = client.pull_many(step.pull_requests(batch), initial=True)
        fast = step._bpr_fast(batch, pulled, 0)
        assert fast is not None
        events = np.flatnonzero(batch.trained)
        terms, leaves = step.losses(batch, pulled, 0, events)
        loss = terms.sum()
        loss.backward()
        assert float(fast[1]) == float(loss.detach())  # the same loss terms, summed the same way
        for got, leaf in zip(fast[2], leaves):
            if leaf is None:
                assert got is None
                continue
            torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-6)
        seen_context |= leaves[3] is not None
        updates, _, bad = step.gradients(batch, pulled, 0)
        assert not len(bad)
        client.push_async(updates, ("t", k))  # train on, so later batches have trained rows and contexts
    assert seen_context == context


def test_general_path_still_used_for_dislikes():
    cfg = load_config(None, {"stream": {"num_events": 256}})
    client = LocalClient(cfg.ps)
    ((step, batch),) = list(_batches(cfg, 256, 256))
    batch.positive[:3] = False
    batch.dislike[:3] = True
    pulled = client.pull_many(step.pull_requests(batch), initial=True)
    assert step._bpr_fast(batch, pulled, 0) is None
    updates, loss, bad = step.gradients(batch, pulled, 0)
    assert np.isfinite(loss) and not len(bad) and cfg.model.user_table in updates


def test_cpu_transfer_copies_nothing():
    t = DeviceTransfer(torch.device("cpu"))
    rows, idx = np.ones((4, 3), np.float32), np.arange(5, dtype=np.int64)
    out = t.to_device({"rows": rows}, {"idx": idx})
    assert out["rows"].data_ptr() == rows.ctypes.data and out["idx"].data_ptr() == idx.ctypes.data
    (back,) = t.to_host([out["rows"]])
    assert back.ctypes.data == rows.ctypes.data


@needs_cuda
def test_transfer_round_trip_on_cuda():
    t = DeviceTransfer(torch.device("cuda"))
    rows = np.random.default_rng(0).random((100, 8), dtype=np.float32)
    idx = np.arange(7, dtype=np.int64)
    out = t.to_device({"rows": rows, "w": rows[:, 0].copy()}, {"idx": idx})
    assert all(v.is_cuda for v in out.values())
    assert all(b.is_pinned() for b in t._pinned.values())
    np.testing.assert_array_equal(out["rows"].cpu().numpy(), rows)
    np.testing.assert_array_equal(out["idx"].cpu().numpy(), idx)
    back = t.to_host([out["rows"] * 2, out["w"]])
    np.testing.assert_array_equal(back[0], rows * 2)
    assert back[0].shape == rows.shape


@needs_cuda
def test_trainer_runs_on_cuda_and_trains_like_the_cpu():
    cfg = load_config(None, {"stream": {"num_events": 3000}, "trainer": {"device": "auto"}})
    gpu = Trainer(0, cfg, client=LocalClient(cfg.ps))
    assert gpu.device.type == "cuda" and gpu.stats()["device"].startswith("cuda")
    gpu.run()
    cpu_cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"device": "cpu"})})
    cpu = Trainer(0, cpu_cfg, client=LocalClient(cpu_cfg.ps))
    cpu.run()
    assert gpu.events_applied == cpu.events_applied == 3000
    assert gpu.metrics["loss_sum"] == pytest.approx(cpu.metrics["loss_sum"], rel=1e-3)
    assert all(b.is_pinned() for b in gpu.step.transfer._pinned.values())


def test_trainer_actors_reserve_gpus_for_auto():
    from workers.trainer import gpus_per_trainer

    cfg = load_config(None, {"trainer": {"num_workers": 2}})
    assert cfg.trainer.device == "auto" and cfg.trainer.num_gpus == 0
    assert gpus_per_trainer(cfg, 0.0) == 0.0  # no GPU: CPU trainers
    assert gpus_per_trainer(cfg, 1.0) == 0.5  # one GPU shared by both trainers (Ray hides it otherwise)
    assert gpus_per_trainer(cfg, 8.0) == 1.0
    cpu = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"device": "cpu"})})
    assert gpus_per_trainer(cpu, 8.0) == 0.0
    fixed = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"num_gpus": 0.25})})
    assert gpus_per_trainer(fixed, 8.0) == 0.25


@pytest.mark.parametrize("weights,types", [([2.0, 3.5], ["rating", "rating"]), ([0.0, 0.0], None)])
def test_a_first_batch_that_teaches_nothing_prepares_and_trains_nothing(weights, types):
    # A fresh trainer (empty catalogue) whose first batch holds only events that teach nothing
    # (ratings below model.ratings.positive_at with below: ignore, or weights of 0) has no item
    # to draw negatives from; it must prepare an empty draw, not fail on every retry.
    from workers.events import make_events

    cfg = load_config(None, {})
    step, catalogue = TrainStep(cfg), Catalogue()
    raw = make_events([0, 1], [1, 2], [10, 11], [1.0, 2.0], weights, event_types=types)
    batch = step.prepare(raw, 2, catalogue, Histories(cfg.model.context_items))
    assert not batch.trained.any() and len(catalogue) == 0
    assert batch.neg_inv.shape == (cfg.trainer.passes, 2, 0)
    updates, loss, bad = step.gradients(batch, {}, 0)
    assert updates == {} and loss == 0.0 and not len(bad)
    # The next batch, with a positive, draws its negatives as usual.
    raw = make_events([2], [1], [12], [3.0], [1.0])
    batch = step.prepare(raw, 3, catalogue, Histories(cfg.model.context_items))
    assert batch.neg_inv.shape == (cfg.trainer.passes, 1, cfg.model.num_negatives)
