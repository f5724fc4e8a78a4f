"""``Trainer.stats()`` is read while the training thread runs, without a lock: a snapshot that
says ``done`` must count every committed event (a fault test under load once saw ``done``
beside the counters of the batch before: 5,900 of 6,000 events)."""
from __future__ import annotations

import uuid

from ps.local import LocalClient
from serving.config import load_config
from workers.trainer import Trainer

BATCH = 64


def test_a_snapshot_that_says_done_counts_every_committed_batch(tmp_path):
    cfg = load_config(overrides={
        "namespace": f"test-stats-{uuid.uuid4().hex[:8]}",
        "ingest": {"dir": str(tmp_path)},
        "stream": {"num_events": 2 * BATCH},
        "trainer": {"device": "cpu", "batch_size": BATCH, "passes": 1},
    })
    t = Trainer(0, cfg, client=LocalClient(cfg.ps))
    t.run(max_batches=1)
    assert not t.done and t.batches == 1

    class FinishesWhileRead(dict):
        """The training thread's last batch and the end of its run, landing in the middle of a
        ``stats()`` call (after the counters, as a thread switch may)."""
        finished = False

        def items(self):
            if not FinishesWhileRead.finished:
                FinishesWhileRead.finished = True
                t.run()
            return super().items()

    t.metrics = FinishesWhileRead(t.metrics)
    torn = t.stats()
    assert FinishesWhileRead.finished and t.done and t.batches == 2
    # Not done yet when the snapshot began, or done with both batches: never done with one.
    assert not torn["done"] or (torn["batches"], torn["events_applied"]) == (2, 2 * BATCH), torn
    after = t.stats()
    assert after["done"] and after["state"] == "done" and (after["batches"], after["events_applied"]) == (2, 2 * BATCH)
