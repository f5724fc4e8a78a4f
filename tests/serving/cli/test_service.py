"""The ``freshet`` command line as a user runs it: real subprocesses, a real Ray head
started by ``freshet up`` and stopped by ``freshet down`` (by PID, never a host-wide
``ray stop``), real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import yaml
from tests.conftest import free_port
from tests.serving.cli.helpers import freshet




def _wait_applied(url: str, accepted: int, timeout_s: float = 90.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stats = httpx.get(url + "/stats", timeout=10).json()
        if stats["events_applied"] >= accepted:
            return stats
        time.sleep(0.3)
    raise AssertionError(f"events not applied in time: {stats}")


def _rankings(url: str, users) -> list:
    return [httpx.post(url + "/rank", json={"user_id": u, "k": 5}, timeout=10).json()["items"] for u in users]


def test_up_ckpt_down_restore_reproduces_rankings(tmp_path):
    # The first deployment keeps its ingest log behind a file:// URI (the object-per-append
    # layout a shared store gets) and its state in a separate local state_dir; the
    # restored one uses a plain local ingest.dir for both.
    port = free_port()
    log = tmp_path / "log"
    state = tmp_path / "data"
    cfg = tmp_path / "freshet.yaml"
    cfg.write_text(yaml.safe_dump({
        "namespace": "clitest",
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"batch_size": 32},
        "ingest": {"dir": log.as_uri(), "state_dir": str(state)},
        "serving": {"port": port},
    }))
    url = f"http://127.0.0.1:{port}"
    ray_port = str(free_port())
    up = freshet("up", "--config", str(cfg), "--ray-port", ray_port)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        users = [f"u{i}" for i in range(6)]
        events = [{"user_id": u, "item_id": (i * 7 + j) % 23, "timestamp": 1.7e9 + i * 10 + j}
                  for i, u in enumerate(users) for j in range(8)]
        r = httpx.post(url + "/events", json={"events": events}, timeout=30)
        assert r.status_code == 200 and r.json()["accepted"] == len(events)
        _wait_applied(url, len(events))
        assert sorted(os.listdir(log)) == ["ingest"]  # state stays out of the log's store
        assert sorted(os.listdir(log / "ingest")) == ["LOG_ID", f"segment-{0:020d}.arrows"]
        assert {"freshet-up.json", "ps", "trainers"} <= set(os.listdir(state))
        status = freshet("status", "--config", str(cfg))
        assert status.returncode == 0 and "healthz 200" in status.stdout
        before = _rankings(url, users)
        assert all(items for items in before)

        save = freshet("ckpt", "--config", str(cfg), "save", "first")
        assert save.returncode == 0, save.stderr
        listed = freshet("ckpt", "--config", str(cfg), "list")
        assert "first" in listed.stdout

        # Train more after the checkpoint: the live rankings move on.
        more = [{"user_id": u, "item_id": 100 + j} for u in users for j in range(5)]
        assert httpx.post(url + "/events", json={"events": more}, timeout=30).status_code == 200
        _wait_applied(url, len(events) + len(more))
        assert sorted(os.listdir(log / "ingest"))[1:] == [f"segment-{0:020d}.arrows", f"segment-{len(events):020d}.arrows"]
        assert _rankings(url, users) != before
    finally:
        down = freshet("down", "--config", str(cfg))
    assert down.returncode == 0, down.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=3)

    # A fresh deployment (new data dir, empty ingest log) restored from the checkpoint
    # ranks exactly as the service did when the checkpoint was saved.
    fresh = tmp_path / "fresh.yaml"
    conf = yaml.safe_load(cfg.read_text())
    conf["ingest"] = {"dir": str(tmp_path / "fresh-data")}
    fresh.write_text(yaml.safe_dump(conf))
    ckpt = state / "ps" / "checkpoints" / "first"
    saved = json.loads((ckpt / "trainers.json").read_text())["trainers"]
    assert saved[0]["source_id"] == "ingest:" + (log / "ingest" / "LOG_ID").read_text().strip()
    restore = freshet("ckpt", "--config", str(fresh), "restore", str(ckpt), "--ray-port", str(free_port()))
    assert restore.returncode == 0, restore.stdout + restore.stderr
    try:
        assert _rankings(url, users) == before
        # The fresh log's events train normally (its producer ids differ from the old log's).
        new = [{"user_id": "u0", "item_id": 500 + j} for j in range(6)]
        assert httpx.post(url + "/events", json={"events": new}, timeout=30).status_code == 200
        stats = _wait_applied(url, len(new))
        assert stats["events_accepted"] == stats["events_applied"] == len(new)
        assert _rankings(url, ["u0"]) != before[:1]
    finally:
        assert freshet("down", "--config", str(fresh)).returncode == 0
