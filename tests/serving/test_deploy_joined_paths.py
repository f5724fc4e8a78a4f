"""A deployment on a Ray cluster started elsewhere, as ``freshet up --address auto`` makes one:
relative state paths resolve against the deploying process's working directory for every
actor (Ray's workers run in the directory ``ray start`` ran in), and an ingest log whose
directory is lost is never silently replaced by a new, empty one.

One deployment (1 shard, the ingest log, 1 trainer, the app) serves the module; the last test
breaks it on purpose.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import ray

from serving import deploy
from serving.config import load_config
from tests.conftest import _ray_start, free_port, wait_for
from workers.ingest_log import INGEST_ACTOR

REQUEST_TIMEOUT_S = 2.0


@ray.remote(num_cpus=0)
def _worker_cwd() -> str:
    return os.getcwd()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """``(deploying cwd, relative ingest.dir, the Ray workers' cwd, url, Deployment)``; the
    deployment is started from a working directory of its own, with a relative ``ingest.dir``."""
    here = tmp_path_factory.mktemp("deployer")
    rel = f"freshet-data-{uuid.uuid4().hex[:8]}"  # unique: were it misplaced, it would land in the workers' cwd
    cfg = load_config(None, {
        "namespace": f"t-paths-{uuid.uuid4().hex[:8]}",
        "ps": {"num_shards": 1, "num_buckets": 16, "shard_num_cpus": 0.1, "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"batch_size": 16, "device": "cpu", "num_cpus": 0.25},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": rel, "fsync": False},
        "serving": {"port": free_port(), "replica_num_cpus": 0.1, "request_timeout_s": REQUEST_TIMEOUT_S},
    })
    with _ray_start():
        workers_cwd = Path(ray.get(_worker_cwd.remote(), timeout=60))
        before = os.getcwd()
        os.chdir(here)
        try:
            dep = deploy.start(cfg, autostart=True)
            try:
                yield here, rel, workers_cwd, dep.url, dep
            finally:
                deploy.stop(dep.cfg)
        finally:
            os.chdir(before)
            shutil.rmtree(workers_cwd / rel, ignore_errors=True)  # only there if the paths were misplaced


def _events(n: int, tag: str) -> dict:
    return {"events": [{"user_id": f"{tag}-{k}", "item_id": k % 7, "weight": 1.0} for k in range(n)]}


def test_every_actor_keeps_its_state_under_the_deploying_directory(deployed):
    here, rel, workers_cwd, url, dep = deployed
    # The premise: Ray's workers resolve relative paths somewhere else than this process.
    assert workers_cwd.resolve() != here.resolve()
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/events", json=_events(20, "a")).status_code == 200
        wait_for(lambda: http.get("/stats").json().get("events_applied") == 20, 60, "the trainer to apply 20 events")
    root = here / rel
    assert (root / "ingest" / "LOG_ID").is_file()
    assert (root / "ps" / "shard-0").is_dir()
    assert (root / "trainers" / "trainer-0" / "wal.arrows").is_file()
    assert not (workers_cwd / rel).exists()
    assert Path(dep.cfg.ingest.dir).is_absolute() and dep.cfg.ingest.dir == str(root)


def test_a_restarted_ingest_log_whose_directory_is_gone_is_dead_not_new(deployed):
    # Ray restarted the actor into a new, empty log: /events answered 200 with offsets from 0,
    # which the trainer (holding the old log's identity) never trained, and /healthz said 200.
    here, rel, _, url, _ = deployed
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/events", json=_events(5, "b")).status_code == 200
        ingest_dir = here / rel / "ingest"
        shutil.rmtree(ingest_dir)
        ray.kill(ray.get_actor(INGEST_ACTOR, namespace=deployed[4].cfg.namespace), no_restart=False)

        # ray.kill is asynchronous: an append may still reach the old actor (its open file in the
        # removed directory) until it is gone. Once /healthz sees the restart fail, none may.
        def dead():
            r = http.get("/healthz")
            return r.status_code == 503 and r.json()["down"].get(INGEST_ACTOR, "").startswith("dead")

        wait_for(dead, 60, "/healthz to report the restarted ingest log dead", interval_s=0.2)
        r = http.post("/events", json=_events(3, "c"))
        assert r.status_code == 503 and "ActorDiedError" in r.text, r.text  # not acknowledged into a new, empty log
        assert not (ingest_dir / "LOG_ID").exists()
