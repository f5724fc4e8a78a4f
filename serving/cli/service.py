"""``freshet up``, ``freshet status`` and ``freshet down``: the long-running service.

``up`` starts (or joins) Ray and runs :func:`serving.deploy.start` with detached actors,
then records what it started in ``<state dir>/freshet-up.json``; ``down`` reads that
file and removes everything, including the Ray it started (by PID, never a host-wide
``ray stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving.cli._common import add_config_argument, load, ray_init
from serving.config import FreshetConfig
from workers.config import StreamKind

__all__ = ["STATE_FILE", "add_parsers", "cmd_down", "cmd_status", "cmd_up", "read_state"]

STATE_FILE = "freshet-up.json"
"""Name of the file, in the local state dir, where ``freshet up`` records what it started."""


def state_path(cfg: FreshetConfig) -> Path:
    """Where ``freshet up`` records what it started for ``cfg``."""
    return cfg.ingest.local_state_dir() / STATE_FILE


def read_state(cfg: FreshetConfig) -> dict[str, Any] | None:
    """What ``freshet up`` recorded for ``cfg``, or None when it did not start anything here."""
    p = state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else None


def _ray_pids(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (our Ray's temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


def cmd_up(args: argparse.Namespace) -> int:
    """Start (or join) Ray and deploy PS, ingest, trainers and Serve as detached services."""
    from serving import deploy
    from serving.cli.ckpt import checkpoint_dir, restore_trainer_offsets

    cfg = load(args, {"stream": {"kind": StreamKind.INGEST.value}} if not args.keep_stream else None)
    cfg.ingest.local_state_dir().mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"namespace": cfg.namespace, "config": args.config, "started_ray": False}
    address = args.address
    if address is None:
        ray_dir = tempfile.mkdtemp(prefix="frup", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        port = args.ray_port
        subprocess.run(
            ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={ray_dir}", "--disable-usage-stats"],
            check=True, env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")},
        )
        address = f"127.0.0.1:{port}"
        state.update(started_ray=True, ray_dir=ray_dir)
    state["address"] = address
    ray_init(address, cfg.namespace)
    restore_from = None
    if getattr(args, "restore", None):
        restore_from = checkpoint_dir(cfg, args.restore)
        restore_trainer_offsets(cfg, restore_from)
        state["restored_from"] = args.restore
    # autostart: a trainer restarted by Ray resumes training from its committed offset.
    dep = deploy.start(cfg, detached=True, restore_from=restore_from, autostart=True)
    state["url"] = dep.url
    state_path(cfg).write_text(json.dumps(state, indent=2))
    print(f"Freshet is up: {dep.url} (Ray at {address}, namespace {cfg.namespace}). Stop it with `freshet down`.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running service's /stats (and whether /healthz is OK)."""
    import httpx

    cfg = load(args)
    state = read_state(cfg)
    url = (state or {}).get("url", f"http://{cfg.serving.host}:{cfg.serving.port}")
    try:
        health = httpx.get(url + "/healthz", timeout=5)
        stats = httpx.get(url + "/stats", timeout=10).json()
    except httpx.HTTPError as e:
        print(f"freshet status: no service at {url} ({e})", file=sys.stderr)
        return 1
    print(f"{url}: healthz {health.status_code}")
    print(json.dumps(stats, indent=2, default=str))
    return 0 if health.status_code == 200 else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Remove the Serve app and the named actors; stop the Ray that ``up`` started."""
    import ray

    from serving import deploy

    cfg = load(args)
    state = read_state(cfg)
    if state is None:
        print(f"freshet down: no {STATE_FILE} under {cfg.ingest.local_state_dir()}; nothing started by `freshet up` here",
              file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        ray_init(state["address"], state["namespace"])
        deploy.stop(cfg.model_copy(update={"namespace": state["namespace"]}))
        ray.shutdown()
    if state.get("started_ray"):
        # Stop only the Ray we started: its processes carry our private temp dir.
        pids = _ray_pids(state["ray_dir"])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1.0)
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            if not pids:
                break
    state_path(cfg).unlink(missing_ok=True)
    print("Freshet is down.")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet up``, ``status`` and ``down``."""
    u = sub.add_parser("up", help="start the long-running service")
    add_config_argument(u)
    u.add_argument("--address", help="join this Ray cluster (e.g. 'auto') instead of starting one")
    u.add_argument("--ray-port", type=int, default=6379, help="GCS port when starting Ray")
    u.add_argument("--keep-stream", action="store_true", help="train on the configured stream instead of /events")
    u.add_argument("--restore", metavar="NAME", help="start from named checkpoint NAME (see `freshet ckpt`)")
    u.set_defaults(fn=cmd_up)

    s = sub.add_parser("status", help="show the running service's health and stats")
    add_config_argument(s)
    s.set_defaults(fn=cmd_status)

    d = sub.add_parser("down", help="stop the service started by `freshet up`")
    add_config_argument(d)
    d.set_defaults(fn=cmd_down)
