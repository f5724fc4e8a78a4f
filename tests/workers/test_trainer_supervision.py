"""Supervised trainers and honest health, on a real deployment over real HTTP.

One module-scoped deployment (real Ray, 2 PS shards, the durable ingest log, one trainer with
a write-ahead log, the Serve app on 127.0.0.1) takes faults injected into the trainer's loop:

* a batch that hangs: ``/healthz`` 503 names the trainer as stalled, ``/stats`` shows its lag;
* an exception in a later pass of a batch, which also fails the retry's recovery (the redo of
  that pass): the trainer keeps retrying with backoff (503 "retrying") and never idles past the
  unfinished batch; once the fault is gone every event is applied;
* the process stopped (SIGSTOP: ``stats`` times out, 503) and then killed (SIGKILL): Ray
  restarts the actor, which resumes from its committed offset;
* failures beyond ``trainer.max_retries``: the actor exits and Ray restarts it.

After each, every acknowledged event is applied exactly once: ``events_applied ==
events_accepted`` and each item's popularity count on the shards (one count per event of
weight 1, pushed in a batch's first pass) equals the number of events posted for it.

Faults are installed in the trainer process through ``__ray_call__`` (a wrapper around its
``TrainStep.gradients``) and switched by a flag file, so each lasts exactly until the test has
seen its effect: no assertion depends on timing.
"""

from __future__ import annotations

import collections
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray

from tests.conftest import _ray_start, free_port, wait_for

TRAINER = "trainer-0"


@pytest.fixture(scope="module")
def deployment():
    """``(http client, cfg, deploy.Deployment, PSClient, posted events list)``."""
    from ps.client import PSClient
    from serving import deploy
    from serving.config import load_config

    tmp = tempfile.mkdtemp(prefix="freshet-sup-")
    cfg = load_config(None, {
        "namespace": f"t-sup-{uuid.uuid4().hex[:8]}",
        "ps": {"num_shards": 2, "num_buckets": 32, "shard_num_cpus": 0.1,
               "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        # Two passes, so a fault can hit a batch after its first push went out (and is in the WAL).
        "trainer": {"batch_size": 64, "passes": 2, "device": "cpu", "num_cpus": 0.25,
                    "stall_s": 2.0, "max_retries": 50, "retry_backoff_s": 0.2},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": free_port(), "request_timeout_s": 2.0, "cache_refresh_s": 0.2},
    })
    with _ray_start():
        dep = deploy.start(cfg, durable=True, autostart=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{cfg.serving.port}", timeout=30.0) as http:
                yield http, cfg, dep, PSClient.connect(cfg.namespace), []
        finally:
            deploy.stop(cfg)


def _trainer(cfg):
    # Looked up by name each time: after a restart the name resolves to the new incarnation.
    return ray.get_actor(TRAINER, namespace=cfg.namespace)


def _post(http: httpx.Client, posted: list, n: int, tag: str) -> None:
    """POST ``n`` events (weight 1, 11 users, 13 items) and remember them in ``posted``."""
    start = len(posted)
    events = [{"user_id": f"{tag}-u{(start + j) % 11}", "item_id": (start + j) % 13} for j in range(n)]
    r = http.post("/events", json={"events": events})
    assert r.status_code == 200 and r.json()["accepted"] == n, r.text
    posted += events


def _stats(http: httpx.Client) -> dict:
    r = http.get("/stats")
    assert r.status_code == 200, r.text  # /stats never 500s, whatever a trainer is doing
    return r.json()


def _health(http: httpx.Client) -> httpx.Response:
    r = http.get("/healthz")
    assert r.status_code in (200, 503), r.text
    return r


def _down_reason(http: httpx.Client) -> str | None:
    """Why ``/healthz`` names the trainer (503), or None while it answers 200."""
    r = _health(http)
    return r.json()["down"].get(TRAINER, "") if r.status_code == 503 else None


def _assert_exactly_once(http: httpx.Client, ps, posted: list) -> dict:
    """Every posted event applied, once: counts, and each item's popularity on the shards."""
    s = wait_for(lambda: (s := _stats(http))["events_applied"] >= s["events_accepted"] and s, 90,
                 "the trainer to apply every accepted event")
    assert s["events_accepted"] == s["events_applied"] == len(posted), s
    assert s["dead_lettered"] == 0 and s["trainers_down"] == {}, s
    want = collections.Counter(e["item_id"] for e in posted)
    items = sorted(want)
    counts = ps.pull("item_pop", items)[:, 0]
    np.testing.assert_array_equal(counts, np.asarray([want[i] for i in items], np.float32))
    wait_for(lambda: _health(http).status_code == 200, 60, "/healthz 200")
    return s


def _install_fault(cfg, flag: Path, mode: str, on_pass: int | None = None) -> None:
    """Wrap the trainer's ``TrainStep.gradients``: while ``flag`` exists, pass ``on_pass`` (every
    pass when None) raises (``mode="raise"``) or blocks until the flag goes (``mode="hang"``)."""
    flag.touch()

    def install(self):
        import os as _os
        import time as _time

        original = getattr(self, "_test_original_gradients", None) or self.step.gradients
        self._test_original_gradients = original

        def gradients(batch, pulled, p):
            if (on_pass is None or p == on_pass) and _os.path.exists(flag):
                if mode == "raise":
                    raise RuntimeError(f"injected fault in pass {p}")
                while _os.path.exists(flag):
                    _time.sleep(0.05)
            return original(batch, pulled, p)

        self.step.gradients = gradients
        return True

    assert ray.get(_trainer(cfg).__ray_call__.remote(install), timeout=60)


def test_trains_and_is_healthy(deployment):
    http, _, _, ps, posted = deployment
    assert _health(http).status_code == 200
    _post(http, posted, 200, "a")
    _assert_exactly_once(http, ps, posted)


def test_lag_s_is_the_age_of_the_oldest_event_waiting_in_the_log(deployment):
    # The trainer's own figure sees only events it has read: stopped, or between two batches
    # of a backlog, it said 0.0 while events waited. /stats takes the age from the log.
    http, cfg, _, ps, posted = deployment
    _assert_exactly_once(http, ps, posted)
    assert _stats(http)["lag"][TRAINER]["lag_s"] == 0.0  # caught up
    trainer = _trainer(cfg)
    ray.get(trainer.stop.remote(), timeout=60)
    try:
        t0 = time.time()
        _post(http, posted, 30, "lag")
        time.sleep(0.5)
        s = _stats(http)
        lag = s["lag"][TRAINER]
        assert lag["lag_events"] == 30 and 0.5 <= lag["lag_s"] <= time.time() - t0 + 0.5, lag
        assert s["trainers"][0]["lag_s"] == 0.0  # what /stats used to report here
    finally:
        ray.get(trainer.start.remote(), timeout=60)
    _assert_exactly_once(http, ps, posted)


def test_a_hanging_batch_is_reported_stalled_then_recovers(deployment, tmp_path):
    http, cfg, _, ps, posted = deployment
    flag = tmp_path / "hang"
    _install_fault(cfg, flag, "hang")
    _post(http, posted, 100, "b")
    reason = wait_for(lambda: (d := _down_reason(http)) and d.startswith("stalled") and d, 60,
                      "/healthz 503 naming the stalled trainer")
    assert "events waiting" in reason, reason
    lag = _stats(http)["lag"][TRAINER]
    assert lag["stalled"] and lag["lag_events"] > 0 and lag["lag_s"] > 0, lag
    flag.unlink()
    _assert_exactly_once(http, ps, posted)


def test_a_failing_pass_is_retried_visibly_until_it_succeeds(deployment, tmp_path):
    # The fault hits pass 1, after pass 0's push is in the WAL: the retry's recovery must redo
    # pass 1 of that batch, which fails too. The trainer must count that as a failed try and
    # try again, not carry on reading past a batch it never finished.
    http, cfg, _, ps, posted = deployment
    flag = tmp_path / "raise"
    _install_fault(cfg, flag, "raise", on_pass=1)
    _post(http, posted, 40, "c")
    reason = wait_for(lambda: (d := _down_reason(http)) and d.startswith("retrying") and d, 60,
                      "/healthz 503 naming the retrying trainer")
    assert "injected fault in pass 1" in reason, reason
    tries = wait_for(lambda: (t := _stats(http)["trainers"][0])["retries"] >= 3 and t, 60,
                     "three failed tries (the recovery's redo of pass 1 fails as well)")
    assert tries["state"] == "retrying" and "injected fault" in tries["error"], tries
    assert _down_reason(http).startswith("retrying")
    assert _stats(http)["events_applied"] < len(posted)
    flag.unlink()
    _assert_exactly_once(http, ps, posted)


def test_a_stopped_then_killed_trainer_is_reported_then_restarted_exactly_once(deployment):
    http, cfg, _, ps, posted = deployment
    pid = ray.get(_trainer(cfg).pid.remote(), timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:
        _post(http, posted, 100, "d")  # accepted by the log while the trainer cannot train
        reason = wait_for(lambda: _down_reason(http), 60, "/healthz 503 naming the unresponsive trainer")
        assert "Timeout" in reason, reason
        assert TRAINER in _stats(http)["trainers_down"]
    finally:
        os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
    _post(http, posted, 50, "e")  # and while Ray restarts it
    _assert_exactly_once(http, ps, posted)
    assert ray.get(_trainer(cfg).pid.remote(), timeout=30) != pid


def test_failing_beyond_max_retries_exits_and_ray_restarts_it(deployment, tmp_path):
    http, cfg, _, ps, posted = deployment
    pid = ray.get(_trainer(cfg).pid.remote(), timeout=30)

    def no_retries(self):
        t = self.cfg.trainer.model_copy(update={"max_retries": 0})
        self.cfg = self.cfg.model_copy(update={"trainer": t})
        return True

    assert ray.get(_trainer(cfg).__ray_call__.remote(no_retries), timeout=30)
    _install_fault(cfg, tmp_path / "raise", "raise")  # the restarted process has no fault
    _post(http, posted, 60, "f")
    _assert_exactly_once(http, ps, posted)
    assert ray.get(_trainer(cfg).pid.remote(), timeout=30) != pid, "the failing actor should have exited"
