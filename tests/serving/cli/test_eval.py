"""``freshet eval`` as the command line parses and runs it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from serving.cli.eval import add_parser, cmd_eval
from tests.serving.cli.helpers import REPO, cli_env


def test_cli_runs_on_synthetic_and_rejects_bad_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--data", "synthetic", "--events", "1200", "--strategies", "popularity,frozen:fraction=0.5;epochs=2",
                              "--report", str(tmp_path), "--no-progress"])
    assert cmd_eval(args) == 0
    out = capsys.readouterr().out
    assert "| popularity |" in out and "| frozen:fraction=0.5,epochs=2 |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["drift_offset"] == 600 and "recovery" in report["strategies"]["popularity"]
    bad = parser.parse_args(["eval", "--data", "synthetic", "--strategies", "nope", "--report", str(tmp_path)])
    assert cmd_eval(bad) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    missing = parser.parse_args(["eval", "--data", str(tmp_path / "absent.csv"), "--report", str(tmp_path)])
    assert cmd_eval(missing) == 2


def _ray_daemons(mark: str) -> dict[int, tuple[str | None, str]]:
    """``{pid: (RAY_AUTH_MODE, command line)}`` of the GCS servers and raylets whose environment carries ``mark``."""
    found = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_bytes().decode().split("\0") if "=" in kv)
            cmd = (p / "cmdline").read_bytes().decode().replace("\0", " ")
        except (OSError, ValueError):
            continue
        if env.get("FRESHET_TEST_MARK") == mark and ("gcs_server" in cmd or "raylet/raylet" in cmd):
            found[int(p.name)] = (env.get("RAY_AUTH_MODE"), cmd)
    return found


def test_eval_starts_its_ray_on_loopback_with_token_auth(tmp_path):
    # In a user's shell (no RAY_AUTH_MODE) the cluster `freshet eval` starts for `incremental` is
    # `freshet run`'s kind: token auth, loopback; and 2 CPUs, whatever the host. Ray's processes
    # inherit the environment the command set up, so the GCS's and raylet's own environments tell.
    mark = uuid.uuid4().hex
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "eval", "--data", "synthetic", "--events", "300",
                                 "--strategies", "incremental", "--report", str(tmp_path / "r"), "--no-progress"],
                                stdout=out, stderr=subprocess.STDOUT, env=cli_env({"FRESHET_TEST_MARK": mark}), cwd=REPO)
        seen: dict[int, tuple[str | None, str]] = {}
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_ray_daemons(mark))
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0, log.read_text()
    assert {"gcs" if "gcs_server" in cmd else "raylet" for _, cmd in seen.values()} == {"gcs", "raylet"}, seen
    for mode, cmd in seen.values():
        assert mode == "token", (mode, cmd)
        assert "127.0.0.1" in cmd, cmd
        assert "raylet/raylet" not in cmd or ",CPU,2," in cmd, cmd
    assert "| incremental |" in log.read_text()
