"""``trainer.staleness``: with 1, a batch's pull may miss the previous batch's push and no
other; evaluation still sees every earlier push; with 0 every pull sees every earlier push."""

from __future__ import annotations

import uuid

import pytest
import ray

from ps.client import start_shards
from ps.local import LocalClient
from serving.config import load_config
from tests.conftest import config_error
from workers.trainer import Trainer

BATCH = 64
BATCHES = 10


def _cfg(tmp_path, staleness: int, *, prefetch: bool = True, passes: int = 1, events: int = BATCH * BATCHES, **over):
    return load_config(overrides={
        "namespace": f"test-stale-{uuid.uuid4().hex[:8]}",
        "ingest": {"dir": str(tmp_path)},
        "stream": {"num_events": events},
        "trainer": {"device": "cpu", "batch_size": BATCH, "passes": passes, "prefetch": prefetch, "staleness": staleness},
        **over,
    })


class _Recording(LocalClient):
    """The in-process PS, noting its version (pushes applied) when each training pull is
    answered (a trainer pulls a batch's rows with ``initial=True``)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pulled_at: list[int] = []  # a batch's first pass
        self.later_pass_at: list[int] = []  # brought back by the previous pass's push

    def pull_async(self, requests, *, initial=False, after=None):
        if initial:
            self.pulled_at.append(self.shard.version)
        return super().pull_async(requests, initial=initial, after=after)

    def push_pull_async(self, updates, push_id, recent, requests, *, initial=True):
        pushed = self.push_async(updates, push_id, recent)
        self.later_pass_at.append(self.shard.version)
        return pushed, LocalClient.pull_async(self, requests, initial=initial)


def _train(cfg) -> tuple[Trainer, _Recording, list[tuple[int, float]]]:
    client = _Recording(cfg.ps)
    t = Trainer(0, cfg, client=client)
    seen: list[tuple[int, float]] = []
    t.run(on_batch=lambda events, loss: seen.append((events, loss)))
    return t, client, seen


@pytest.mark.parametrize("staleness, prefetch", [(0, True), (0, False), (1, True), (1, False)])
def test_a_pull_misses_at_most_the_previous_batch_push(tmp_path, staleness, prefetch):
    t, client, seen = _train(_cfg(tmp_path, staleness, prefetch=prefetch))
    # One pass, one push per batch: batch j's pull finds j pushes applied when exact, and
    # j - 1 (all but the previous batch's) with staleness 1.
    want = [j if staleness == 0 else max(0, j - 1) for j in range(BATCHES)]
    assert client.pulled_at == want
    assert t.done and t.batches == BATCHES and t.events_applied == BATCH * BATCHES
    assert client.shard.version == BATCHES  # every push applied once
    assert [e for e, _ in seen] == [BATCH] * BATCHES
    assert sum(loss for _, loss in seen) == pytest.approx(t.metrics["loss_sum"])


def test_only_a_batch_first_pass_is_stale(tmp_path):
    _, client, _ = _train(_cfg(tmp_path, 1, passes=2))
    # Pushes are counted per pass. Batch j's first pass reads rows pulled before batch
    # j - 1's pushes; its second pass reads what its own first pass pushed.
    assert client.pulled_at == [2 * max(0, j - 1) for j in range(BATCHES)]
    assert client.later_pass_at == [2 * j + 1 for j in range(BATCHES)]


def test_staleness_changes_the_learning_not_what_is_applied(tmp_path):
    exact, c0, _ = _train(_cfg(tmp_path, 0))
    stale, c1, _ = _train(_cfg(tmp_path, 1))
    assert stale.events_applied == exact.events_applied and c1.shard.stats()["rows"] == c0.shard.stats()["rows"]
    assert stale.metrics["loss_sum"] != pytest.approx(exact.metrics["loss_sum"], rel=1e-9)
    # A driver that runs one batch at a time trains what is read ahead before each return,
    # so it reads fresher rows than one long run: the same events, a different loss.
    cfg = _cfg(tmp_path, 1)
    stepped = Trainer(0, cfg, client=_Recording(cfg.ps))
    while not stepped.done:
        stepped.run(max_batches=1)
    assert stepped.events_applied == stale.events_applied
    assert stepped.client.pulled_at != c1.pulled_at


def test_staleness_above_one_is_a_load_time_error(tmp_path):
    msg = config_error(tmp_path, {"trainer": {"staleness": 2}})
    assert "trainer.staleness" in msg and "1" in msg


class _EvalProbe(Trainer):
    """A trainer that notes the shards' versions each time it evaluates a batch."""

    eval_versions: list[list[int]]

    def _evaluate(self, batch):
        self.eval_versions.append(self.client.versions())
        super()._evaluate(batch)


def test_evaluation_sees_every_earlier_push_though_training_is_stale(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, 1, passes=2, events=BATCH * 40, ps={"num_shards": 2, "shard_num_cpus": 0.1})
    # 40 users: most have a first chunk of positives behind them well before the end, so
    # there is something to rank.
    cfg = cfg.model_copy(update={"stream": cfg.stream.model_copy(update={
        "synthetic": cfg.stream.synthetic.model_copy(update={"num_users": 40})})})
    client = start_shards(cfg.ps, namespace=cfg.namespace)
    try:
        t = _EvalProbe(0, cfg, evaluate=True)
        t.eval_versions = []
        st = t.run()
        batches = 40
        assert st["events_applied"] == BATCH * batches and t.batches == batches
        # Batch j is ranked after both passes of every earlier batch reached both shards.
        assert t.eval_versions == [[2 * j, 2 * j] for j in range(batches)]
        m = st["metrics"]
        assert m["eval_events"] + m["cold_events"] == BATCH * batches and m["eval_events"] > 0
        assert client.versions() == [2 * batches] * 2
    finally:
        for h in client.shards:
            ray.kill(h)
