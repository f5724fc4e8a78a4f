"""``freshet up --address``: a deployment on a Ray cluster it joins, as a user runs it (real
subprocesses, a real token-auth head, real HTTP on 127.0.0.1). A failed ``up`` removes what it
started there and nothing else; the next ``up`` works, in high-throughput mode, listening beyond
loopback with a token for reads too; a rival ``up`` into the same namespace is refused; ``down``
leaves the cluster running. (Split from ``test_service.py`` so the two run side by side.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from serving.cli.service import STATE_VERSION
from serving.ray_head import client_env, head_pids, start_head, stop_head
from tests.conftest import free_port, wait_for
from tests.serving.cli.helpers import freshet
from tests.serving.cli.test_service import (
    AUTH,
    TOKEN,
    _config,
    _haproxy_argvs,
    _haproxy_listeners,
    _named_actors,
    _state,
)


@pytest.fixture
def other_head():
    """A Ray cluster ``freshet up --address`` joins: a loopback head with token auth."""
    d = tempfile.mkdtemp(prefix="frjoin", dir="/tmp")
    info = start_head(d, num_cpus=2, timeout_s=60)
    try:
        yield info
    finally:
        with contextlib.suppress(Exception):
            stop_head(info)
        shutil.rmtree(d, ignore_errors=True)


def _leftover_state(cfg: Path, address: str) -> Path:
    """Write the state file of a finished ``up`` on the cluster at ``address`` for ``cfg``'s
    namespace, as one whose service went away without ``freshet down`` leaves it."""
    conf = yaml.safe_load(cfg.read_text())
    path = Path(conf["ingest"]["dir"]) / "freshet-up.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": STATE_VERSION, "namespace": conf["namespace"], "config": str(cfg),
                                "pid": 1, "phase": "up", "started_ray": False, "ray_root": None, "ray_dir": None,
                                "head": None, "address": address, "url": "http://127.0.0.1:1",
                                "restored_from": None}))
    return path


def test_up_on_a_joined_cluster_is_all_or_nothing_and_guards_reads_off_loopback(tmp_path, other_head):
    join = client_env(other_head)  # the cluster's own settings: its token
    ns = f"clijoin-{uuid.uuid4().hex[:6]}"
    bad = _config(tmp_path, "bad.yaml", namespace=ns, stream={"kind": "movielens", "path": "/no/such/ratings.csv"})
    # A finished `up` recorded here, but the cluster has no actors of its namespace (removed
    # without `freshet down`): not "already up"; the leftover is cleared and this `up` goes on.
    _leftover_state(bad, other_head.address)
    up = freshet("up", "--config", str(bad), "--address", other_head.address, "--keep-stream", extra_env=join)
    assert up.returncode == 1 and "failed while starting the deployment" in up.stderr, up.stdout + up.stderr
    assert (f"is gone (the Ray cluster at {other_head.address} has no actors in namespace {ns} and no Freshet app)"
            in up.stderr), up.stderr
    assert _state(bad) is None
    assert _named_actors(other_head, ns) == [], "a failed `up` left actors behind"
    assert head_pids(other_head), "a failed `up` must not touch a cluster it joined"

    # The next `up` in the same namespace works (no "ps-shard-0 is already taken"). Listening on all
    # interfaces with a token: reads need the token too. In high-throughput mode, which `up` hands
    # to the joined cluster's Serve controller (run_app's controller_options).
    good = _config(tmp_path, "good.yaml", namespace=ns,
                   serving={"host": "0.0.0.0", "auth_token": TOKEN, "high_throughput": True})
    port = yaml.safe_load(good.read_text())["serving"]["port"]
    url = f"http://127.0.0.1:{port}"
    up = freshet("up", "--config", str(good), "--address", other_head.address, extra_env=join)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "joined cluster's own auth" in up.stdout
        st = _state(good)
        assert st["phase"] == "up" and not st["started_ray"] and st["head"] is None
        assert set(_named_actors(other_head, ns)) >= {"ps-shard-0", "ps-shard-1", "ingest-log", "trainer-0"}
        hap = _haproxy_listeners(other_head)
        assert port in {s.port for s in hap}, hap  # HAProxy serves the app
        assert all(s.is_loopback for s in hap if s.port != port), hap  # its stats and metrics: loopback
        hap_dirs = _haproxy_dirs(other_head)  # the app made it (/tmp/frht-*): `down` removes it
        assert len(hap_dirs) == 1 and hap_dirs[0].name.startswith("frht-"), hap_dirs
        # While it runs, the same config is "already up": the state file stays, nothing is touched.
        again = freshet("up", "--config", str(good), "--address", other_head.address, extra_env=join)
        assert again.returncode == 1 and "already up at" in again.stderr, again.stdout + again.stderr
        assert _state(good)["phase"] == "up"
        calls = (("/events", {"events": [{"user_id": "x", "item_id": i} for i in range(3)]}),
                 ("/rank", {"user_id": "x", "k": 2}), ("/score", {"user_id": "x", "item_ids": [1]}))
        for path, body in calls:
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        for path, body in calls:
            r = httpx.post(url + path, json=body, headers=AUTH, timeout=30)
            assert r.status_code == 200, (path, r.text)
            if path == "/events":
                wait_for(lambda: httpx.get(url + "/stats", headers=AUTH, timeout=10).json()["events_applied"] == 3,
                         30, "the trainer to apply the events")
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # probes stay open
        for path in ("/stats", "/openapi.json", "/docs", "/docs/"):  # the counters and the API: the token too
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert httpx.get(url + "/openapi.json", headers=AUTH, timeout=10).json()["info"]["title"] == "Freshet"
        status = freshet("status", "--config", str(good), extra_env=join)  # sends the config's token
        assert status.returncode == 0 and '"events_applied": 3' in status.stdout, status.stdout + status.stderr

        # Another `up` (another state dir) into the same namespace refuses, and removes nothing of this one.
        rival = _config(tmp_path, "rival.yaml", namespace=ns, ingest={"dir": str(tmp_path / "rival-data")})
        up = freshet("up", "--config", str(rival), "--address", other_head.address, extra_env=join)
        assert up.returncode == 1 and "already has actors" in up.stderr, up.stdout + up.stderr
        assert _state(rival) is None
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        # So does one into another namespace: its Serve app would replace this one (one per cluster).
        ns2 = f"clijoin-{uuid.uuid4().hex[:6]}"
        other = _config(tmp_path, "other.yaml", namespace=ns2, ingest={"dir": str(tmp_path / "other-data")})
        up = freshet("up", "--config", str(other), "--address", other_head.address, extra_env=join)
        assert up.returncode == 1 and "already runs a Freshet app" in up.stderr, up.stdout + up.stderr
        assert _state(other) is None and _named_actors(other_head, ns2) == []
        assert httpx.post(url + "/rank", json={"user_id": "x", "k": 2}, headers=AUTH, timeout=30).status_code == 200
        # A leftover of that other namespace (its service gone without `down`) never takes this
        # one's app down: `up` cannot tell the app is not its own and refuses; `down` asks the
        # app whose it is, leaves it, and clears the leftover; then `up` is refused as above.
        _leftover_state(other, other_head.address)
        up = freshet("up", "--config", str(other), "--address", other_head.address, extra_env=join)
        assert up.returncode == 1 and "already up at" in up.stderr, up.stdout + up.stderr
        down = freshet("down", "--config", str(other), extra_env=join)
        assert down.returncode == 0 and _state(other) is None, down.stdout + down.stderr
        assert httpx.post(url + "/rank", json={"user_id": "x", "k": 2}, headers=AUTH, timeout=30).status_code == 200
        up = freshet("up", "--config", str(other), "--address", other_head.address, extra_env=join)
        assert up.returncode == 1 and "already runs a Freshet app" in up.stderr, up.stdout + up.stderr
    finally:
        down = freshet("down", "--config", str(good), extra_env=join)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _named_actors(other_head, ns) == []
    assert head_pids(other_head), "`down` must not stop a cluster `up` only joined"
    assert _haproxy_listeners(other_head) == []
    assert not hap_dirs[0].exists(), f"`down` left HAProxy's dir {hap_dirs[0]}"
    wait_for(lambda: _refused(url), 30, "the app to stop answering")

    # A leftover state whose cluster answers but holds nothing of it: `ckpt save --overwrite`
    # says the service is gone and keeps the checkpoint it would have replaced.
    _leftover_state(good, other_head.address)
    old = tmp_path / "data" / "ps" / "checkpoints" / "c1"
    old.mkdir(parents=True)
    (old / "trainers.json").write_text("{}")
    save = freshet("ckpt", "--config", str(good), "save", "c1", "--overwrite", extra_env=join)
    assert save.returncode == 1 and "the service is gone" in save.stderr, save.stdout + save.stderr
    assert (old / "trainers.json").exists() and "Traceback" not in save.stderr


def _haproxy_dirs(head) -> list[Path]:
    """The directories under /tmp that hold the config files (``-f``) of ``head``'s HAProxy processes."""
    return sorted({p for argv in _haproxy_argvs(head).values() if "-f" in argv
                   for p in Path(argv[argv.index("-f") + 1]).parents if p.parent == Path("/tmp")})


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=3)
    except httpx.HTTPError:
        return True
    return False


def test_a_joined_cluster_that_is_gone_neither_blocks_up_nor_hangs_down(tmp_path):
    # `ray.init` against an address where nothing listens waits minutes (the 60 s limits below
    # fail a wait): `up` and `down` must find out at once that the cluster a leftover state names is gone.
    dead = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path)
    _leftover_state(cfg, dead)
    up = freshet("up", "--config", str(cfg), "--address", dead, timeout=60)
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"is gone (nothing listens at {dead}" in up.stderr, up.stderr
    assert f"failed while connecting to Ray at {dead}: nothing listens at {dead}" in up.stderr
    assert _state(cfg) is None and "Traceback" not in up.stderr

    # A save with --overwrite finds out before it removes the checkpoint it would replace.
    _leftover_state(cfg, dead)
    old = tmp_path / "data" / "ps" / "checkpoints" / "c1"
    old.mkdir(parents=True)
    (old / "trainers.json").write_text("{}")
    save = freshet("ckpt", "--config", str(cfg), "save", "c1", "--overwrite", timeout=60)
    assert save.returncode == 1 and f"cannot reach the service's Ray: nothing listens at {dead}" in save.stderr
    assert (old / "trainers.json").exists() and "Traceback" not in save.stderr, save.stderr

    down = freshet("down", "--config", str(cfg), timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"nothing listens at {dead}" in down.stdout and _state(cfg) is None


def test_a_joined_cluster_that_cannot_be_reached_counts_as_running(tmp_path):
    # A host that does not resolve (`.invalid`, RFC 6761) is not "nothing listens": the service
    # may be alive behind it, so `up` refuses as "already up" and `down` keeps the state file.
    # (`up` is given the same address: were the leftover wrongly taken as gone, it would fail
    # there instead of starting a service.)
    where = "freshet-no-such-host.invalid:6379"
    cfg = _config(tmp_path)
    state = _leftover_state(cfg, where)
    up = freshet("up", "--config", str(cfg), "--address", where, timeout=60)
    assert up.returncode == 1 and "already up at" in up.stderr, up.stdout + up.stderr
    down = freshet("down", "--config", str(cfg), timeout=60)
    assert down.returncode == 1 and "cannot tell whether the actors of namespace" in down.stderr, down.stderr
    assert f"cannot resolve the host of {where}" in down.stderr and state.exists() and "Traceback" not in down.stderr
