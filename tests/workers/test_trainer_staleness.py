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
    answered (a trainer pulls a batch's rows with ``initial=True``) and the push it names
    as ``after``. ``acked=False``: a push counts as in flight until it is waited for."""

    def __init__(self, cfg, *, acked: bool = True):
        super().__init__(cfg)
        self.acked = acked
        self.pulled_at: list[int] = []  # a batch's first pass
        self.after: list[int | None] = []  # the seq each of those pulls names
        self.later_pass_at: list[int] = []  # brought back by the previous pass's push

    def pull_async(self, requests, *, initial=False, after=None):
        if initial:
            self.pulled_at.append(self.shard.version)
            self.after.append(None if after is None else after[0][1])
        return super().pull_async(requests, initial=initial, after=after)

    def done(self, refs):
        return self.acked

    def push_pull_async(self, updates, push_id, recent, requests, *, initial=True):
        pushed = self.push_async(updates, push_id, recent)
        self.later_pass_at.append(self.shard.version)
        return pushed, LocalClient.pull_async(self, requests, initial=initial)


def _train(cfg, **client_kw) -> tuple[Trainer, _Recording, list[tuple[int, float]]]:
    client = _Recording(cfg.ps, **client_kw)
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


def test_a_stale_pull_names_the_push_before_the_one_it_may_miss(tmp_path):
    # Pushes left unacknowledged until the trainer waits for them, as shard actors leave
    # them: batch j's pull (j >= 2) must name batch j - 2's push, so that a shard that
    # restarted and lost it answers only once it is applied again.
    cfg = _cfg(tmp_path, 1)
    _, client, _ = _train(cfg, acked=False)
    seq = [j * BATCH * 128 for j in range(BATCHES)]  # a batch's push seq: its start offset x 128 + pass
    assert client.after == [None, None] + seq[: BATCHES - 2]
    assert client.pulled_at == [max(0, j - 1) for j in range(BATCHES)]


@pytest.mark.parametrize("staleness", [0, 1])
def test_lag_counts_every_batch_read_and_not_applied(tmp_path, staleness):
    # Right after a batch's push is sent, that batch is not applied yet (and with staleness
    # 1 neither is the one read ahead): the trainer's lag is the age of their oldest event,
    # not 0 because the batch before them was just committed.
    cfg = _cfg(tmp_path, staleness)
    client = _Recording(cfg.ps, acked=False)
    t = Trainer(0, cfg, client=client)
    lags: list[float] = []
    t.run(on_batch=lambda events, loss: lags.append(t.stats()["lag_s"]))
    assert len(lags) == BATCHES and all(lag > 0 for lag in lags), lags
    assert t.stats()["lag_s"] == 0.0  # all applied


class _Ordered(LocalClient):
    """The in-process PS that hands out one token per push and checks, at every push, that
    the trainer has waited for every earlier one (a shard drops a push whose seq is below
    one it has applied, so an unacknowledged push must never have a successor in flight)."""

    class Token:
        def __init__(self, seq: int):
            self.seq, self.waited = seq, False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokens: list[_Ordered.Token] = []

    def push_async(self, updates, push_id, recent=None):
        unwaited = [t.seq for t in self.tokens if not t.waited]
        assert not unwaited, f"push {push_id[1]} sent while {unwaited} are not acknowledged"
        super().push_async(updates, push_id, recent)
        self.tokens.append(self.Token(push_id[1]))
        return [self.tokens[-1]]

    class Acked:
        """Rows that reflect a push: reading them acknowledges it, as on the shards
        (``pull_after``, and a pass's push that brings the next pass's rows)."""

        def __init__(self, pending, refs):
            self.pending, self.refs = pending, refs

        def result(self):
            for r in self.refs:
                r.waited = True
            return self.pending.result()

    def pull_async(self, requests, *, initial=False, after=None):
        pending = super().pull_async(requests, initial=initial, after=after)
        return pending if after is None else self.Acked(pending, after[1])

    def push_pull_async(self, updates, push_id, recent, requests, *, initial=True):
        refs = self.push_async(updates, push_id, recent)
        return refs, self.Acked(LocalClient.pull_async(self, requests, initial=initial), refs)

    def done(self, refs):
        return False

    def wait(self, refs):
        for r in refs:
            r.waited = True
        return refs


@pytest.mark.parametrize("staleness, passes", [(0, 1), (1, 1), (1, 3)])
def test_a_push_is_sent_only_once_every_earlier_one_is_acknowledged(tmp_path, staleness, passes):
    cfg = _cfg(tmp_path, staleness, passes=passes)
    client = _Ordered(cfg.ps)
    t = Trainer(0, cfg, client=client, state_dir=tmp_path / "state")
    t.run()
    assert len(client.tokens) == BATCHES * passes and all(tok.waited for tok in client.tokens)
    # Nothing pending in the write-ahead log: every push written was acknowledged.
    assert t.wal.pending() == []


class _OrderedTwoShards(_Ordered):
    """:class:`_Ordered` as ``PSClient`` answers a pass's push and pull when a second shard
    holds none of the next pass's rows: that shard gets the push alone, and reading the
    rows does not acknowledge it."""

    def push_pull_async(self, updates, push_id, recent, requests, *, initial=True):
        refs, rows = super().push_pull_async(updates, push_id, recent, requests, initial=initial)
        alone = self.Token(push_id[1])
        self.tokens.append(alone)
        return refs + [alone], rows


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_passs_push_to_a_shard_without_its_rows_is_acknowledged_before_the_next(tmp_path, staleness):
    cfg = _cfg(tmp_path, staleness, passes=3)
    client = _OrderedTwoShards(cfg.ps)
    t = Trainer(0, cfg, client=client, state_dir=tmp_path / "state")
    t.run()
    assert len(client.tokens) == BATCHES * 5 and all(tok.waited for tok in client.tokens)  # 3 pushes, 2 alone
    assert t.wal.pending() == []


class _Losing(LocalClient):
    """The in-process PS that loses one push on the way (its wait raises, and a pull that
    names it fails, as ``PSClient`` does when a push never reaches a shard)."""

    class Lost:
        pass

    def __init__(self, cfg, lose: int, times: int = 1):
        super().__init__(cfg)
        self.sent, self.lose, self.times, self.lost_seq = 0, lose, times, None

    def push_async(self, updates, push_id, recent=None):
        self.sent += 1
        if self.sent == self.lose:
            self.lost_seq = push_id[1]
        if push_id[1] == self.lost_seq and self.times > 0:  # lost, and so are the next times - 1 sends of it
            self.times -= 1
            return [self.Lost()]
        return super().push_async(updates, push_id, recent)

    class Failed:
        def result(self):
            raise TimeoutError("a pull after a lost push")

    def pull_async(self, requests, *, initial=False, after=None):
        if after is not None and any(isinstance(r, self.Lost) for r in after[1]):
            return self.Failed()
        return super().pull_async(requests, initial=initial, after=after)

    def done(self, refs):
        return not any(isinstance(r, self.Lost) for r in refs)

    def wait(self, refs):
        if any(isinstance(r, self.Lost) for r in refs):
            raise TimeoutError("push lost")
        return refs


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize("times", [1, 2])
def test_a_lost_push_is_sent_again_after_the_retry(tmp_path, staleness, times):
    # The trainer's own retry (write-ahead log, recovery from the last commit) must bring
    # back a push that never arrived, though with staleness 1 the next batch was already
    # pulled and computed before it was found missing; and again if the recovery's own
    # resend is lost too (times=2).
    cfg = _cfg(tmp_path, staleness)
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"retry_backoff_s": 0.01})})
    client = _Losing(cfg.ps, lose=4, times=times)
    t = Trainer(0, cfg, client=client, state_dir=tmp_path / "state")
    t._supervised()  # what start() runs in its thread: run, and on a failure recover and run again
    assert client.lost_seq is not None and "lost" in t.error  # it failed, and was retried
    assert client.shard.version == BATCHES  # every push applied, the lost one included, once
    assert client.lost_seq in {seq for _, seq in client.shard._push_at.values()}
    assert t.done and t.events_applied == BATCH * BATCHES and t.offsets == {0: BATCH * BATCHES}


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
    # run(max_batches=n) trains n batches and reads none ahead past them, so a driver that
    # runs one batch at a time trains exactly, whatever the setting.
    cfg = _cfg(tmp_path, 1)
    stepped = Trainer(0, cfg, client=_Recording(cfg.ps))
    while not stepped.done:
        before = stepped.batches
        stepped.run(max_batches=1)
        assert stepped.batches - before <= 1
    assert stepped.events_applied == stale.events_applied
    assert stepped.client.pulled_at == c0.pulled_at == list(range(BATCHES))
    assert stepped.metrics["loss_sum"] == pytest.approx(exact.metrics["loss_sum"], rel=1e-9)


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
