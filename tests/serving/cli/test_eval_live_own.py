"""``freshet eval --live`` without ``--url``: it starts a fresh service of ``--config`` for the
replay and removes it afterwards (its own module: it needs a Ray with no other Freshet app)."""

from __future__ import annotations

import json
import uuid

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
