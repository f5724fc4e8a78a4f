"""``freshet up --address``: a deployment on a Ray cluster it joins, as a user runs it (real
subprocesses, a real token-auth head, real HTTP on 127.0.0.1). A failed ``up`` removes what it
started there and nothing else; the next ``up`` works, in high-throughput mode, listening beyond
loopback with a token for reads too; a rival ``up`` into the same namespace is refused; ``down``
leaves the cluster running. (Split from ``test_service.py`` so the two run side by side.)"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid

import httpx
import pytest
import yaml

from serving.ray_head import client_env, head_pids, start_head, stop_head
from tests.conftest import wait_for
from tests.serving.cli.helpers import freshet
from tests.serving.cli.test_service import AUTH, TOKEN, _config, _haproxy_listeners, _named_actors, _state


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


def test_up_on_a_joined_cluster_is_all_or_nothing_and_guards_reads_off_loopback(tmp_path, other_head):
    join = client_env(other_head)  # the cluster's own settings: its token
    ns = f"clijoin-{uuid.uuid4().hex[:6]}"
    bad = _config(tmp_path, "bad.yaml", namespace=ns, stream={"kind": "movielens", "path": "/no/such/ratings.csv"})
    up = freshet("up", "--config", str(bad), "--address", other_head.address, "--keep-stream", extra_env=join)
    assert up.returncode == 1 and "failed while starting the deployment" in up.stderr, up.stdout + up.stderr
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
        calls = (("/events", {"events": [{"user_id": "x", "item_id": i} for i in range(3)]}),
                 ("/rank", {"user_id": "x", "k": 2}), ("/score", {"user_id": "x", "item_ids": [1]}))
        for path, body in calls:
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        for path, body in calls:
            r = httpx.post(url + path, json=body, headers=AUTH, timeout=30)
            assert r.status_code == 200, (path, r.text)
            if path == "/events":
                wait_for(lambda: httpx.get(url + "/stats", timeout=10).json()["events_applied"] == 3, 30,
                         "the trainer to apply the events")
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # probes stay open

        # Another `up` (another state dir) into the same namespace refuses, and removes nothing of this one.
        rival = _config(tmp_path, "rival.yaml", namespace=ns, ingest={"dir": str(tmp_path / "rival-data")})
        up = freshet("up", "--config", str(rival), "--address", other_head.address, extra_env=join)
        assert up.returncode == 1 and "already has actors" in up.stderr, up.stdout + up.stderr
        assert _state(rival) is None
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        down = freshet("down", "--config", str(good), extra_env=join)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _named_actors(other_head, ns) == []
    assert head_pids(other_head), "`down` must not stop a cluster `up` only joined"
    assert _haproxy_listeners(other_head) == []
    wait_for(lambda: _refused(url), 30, "the app to stop answering")


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=3)
    except httpx.HTTPError:
        return True
    return False
