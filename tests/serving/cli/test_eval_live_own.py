"""``freshet eval --live`` without ``--url``: it starts a fresh service of ``--config`` for the
replay and removes it afterwards (its own module: it needs a Ray with no other Freshet app)."""

from __future__ import annotations

import json
import os
import tempfile
import uuid

import pytest
import ray
import yaml

from serving.cli import main
from tests.conftest import _ray_start
from tests.serving.cli.test_eval_live import _cfg_overrides, _in_unit


def test_live_eval_starts_and_removes_its_own_service(tmp_path, capsys):
    ns = f"t-live-own-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "freshet.yaml"
    path.write_text(yaml.safe_dump({**_cfg_overrides(), "namespace": ns, "ingest": {"fsync": False}}), encoding="utf-8")
    report_dir = tmp_path / "own"
    with _ray_start():
        rc = main(["eval", "--live", "--rate", "400", "--data", "synthetic", "--events", "200", "--report", str(report_dir),
                   "--config", str(path), "--no-offline", "--no-progress"])
        assert rc == 0, capsys.readouterr()
        report = json.loads((report_dir / "live.json").read_text())
        assert report["meta"]["started_service"] and "offline" not in report and "comparison" not in report
        assert report["live"]["events"] == 200 and _in_unit(report["live"]["recall@10"])
        assert report["live"]["evaluated"] == report["popularity"]["evaluated"] > 50
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"].startswith(ns)]
        assert not left, left
        from ray import serve

        assert "freshet" not in serve.status().applications


def test_a_live_eval_that_fails_after_starting_its_ray_shuts_that_ray_down(tmp_path, monkeypatch):
    # The service fails to start once this run's Ray is up: the caller (a library user, not
    # the CLI process that exits anyway) must not be left connected to a Ray it never asked for.
    from serving import live_eval
    from serving.config import FreshetConfig

    assert not ray.is_initialized()
    started = []

    def start_ray():
        # Under RAY_TMPDIR, which is short: Ray's socket paths must stay under 108 bytes.
        tmp = tempfile.mkdtemp(prefix="frt", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=tmp, log_to_driver=False, configure_logging=False)
        started.append(ray.get_runtime_context().get_node_id())

    def no_service(cfg, own_ray):
        assert own_ray and ray.is_initialized()
        raise RuntimeError("the deployment did not come up")

    monkeypatch.setattr(live_eval, "_start_service", no_service)
    cfg = FreshetConfig.model_validate(_cfg_overrides())
    try:
        with pytest.raises(RuntimeError, match="did not come up"):
            live_eval.run_live(cfg, data="synthetic", rate=100, report_dir=tmp_path / "r", max_events=50,
                               offline=False, progress=False, start_ray=start_ray)
        assert len(started) == 1
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()
