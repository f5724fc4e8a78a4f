"""The ``freshet`` command line: ``run``, ``up``, ``status``, ``down``, ``config``.

``freshet run`` is the main job: it starts the whole system, replays a stream through
``POST /events`` (the closed loop: HTTP → durable ingest log → trainers → PS → /rank)
with a progress bar, and prints a summary of throughput, prequential quality,
freshness and ranking latency.
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
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ps.config import ConfigError, FreshetConfig, StreamKind, _merge, load_config

__all__ = ["main"]

_STATE_FILE = "freshet-up.json"


def _env_defaults() -> None:
    # Local-first defaults; an operator's explicit environment wins.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _data_overrides(data: str | None, events: int | None) -> dict[str, Any]:
    stream: dict[str, Any] = {}
    if data:
        p = Path(data)
        if data == "synthetic":
            stream["kind"] = StreamKind.SYNTHETIC.value
        elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
            stream.update(kind=StreamKind.PARQUET.value, path=str(p))
        else:
            stream.update(kind=StreamKind.MOVIELENS.value, path=str(p))
            stream.setdefault("num_events", None)
    if events is not None:
        stream["num_events"] = events
    return {"stream": stream} if stream else {}


def _load(args, extra: dict[str, Any] | None = None) -> FreshetConfig:
    overrides = _data_overrides(getattr(args, "data", None), getattr(args, "events", None))
    if extra:
        overrides = _merge(overrides, extra)
    return load_config(args.config, overrides)


def _ray_init(address: str | None, namespace: str):
    import ray

    _env_defaults()
    if address:
        return ray.init(address=address, namespace=namespace, log_to_driver=False)
    return ray.init(namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


class _Feeder(threading.Thread):
    """Posts the stream to ``/events`` in batches, keeping the training backlog bounded,
    and samples ``/rank`` latency for recently active users along the way."""

    def __init__(self, cfg: FreshetConfig, url: str, source, total: int, trainers, backlog: int):
        super().__init__(name="freshet-feeder", daemon=True)
        self.cfg, self.url, self.source, self.total = cfg, url, source, total
        self.trainers, self.backlog = trainers, backlog
        self.posted = 0
        self.rank_ms: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def applied(self) -> int:
        import ray

        return min(s["applied_offset"] for s in ray.get([t.stats.remote() for t in self.trainers]))

    def run(self) -> None:
        import httpx

        from ps.ids import ids_from_arrow

        headers = {"Authorization": f"Bearer {self.cfg.serving.auth_token}"} if self.cfg.serving.auth_token else {}
        size = min(self.cfg.trainer.batch_size, self.cfg.serving.max_events_per_request)
        try:
            with httpx.Client(base_url=self.url, timeout=30.0, headers=headers) as http:
                while self.posted < self.total and not self._stop.is_set():
                    batch = self.source.read(self.posted, min(size, self.total - self.posted))
                    if batch.num_rows == 0:
                        break
                    users = ids_from_arrow(batch.column("user_id")).tolist()
                    items = ids_from_arrow(batch.column("item_id")).tolist()
                    ts = batch.column("timestamp").to_pylist()
                    ws = batch.column("weight").to_pylist()
                    body = {"events": [{"user_id": u, "item_id": i, "timestamp": t, "weight": w} for u, i, t, w in zip(users, items, ts, ws)]}
                    r = http.post("/events", json=body)
                    r.raise_for_status()
                    self.posted += batch.num_rows
                    # Sample live ranking latency for a user active right now.
                    t0 = time.perf_counter()
                    http.post("/rank", json={"user_id": users[-1], "k": 10}).raise_for_status()
                    self.rank_ms.append((time.perf_counter() - t0) * 1000.0)
                    while self.posted - self.applied() > self.backlog and not self._stop.is_set():
                        time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def stop(self) -> None:
        """Ask the feeder to finish after its current request."""
        self._stop.set()


def _summary_rows(stats: list[dict], feeder_ms: list[float], after_ms: list[float], wall_s: float) -> list[tuple[str, str]]:
    m: dict[str, float] = {}
    for s in stats:
        for k, v in s["metrics"].items():
            m[k] = m.get(k, 0) + v
    applied = sum(s["events_applied"] for s in stats)
    ev = max(1, int(m.get("eval_events", 0)))
    model_r, pop_r = m.get("model_hits", 0) / ev, m.get("popular_hits", 0) / ev
    fr50 = max((s["freshness_ms"]["p50"] or 0) for s in stats)
    fr99 = max((s["freshness_ms"]["p99"] or 0) for s in stats)
    lat = np.asarray(feeder_ms + after_ms) if (feeder_ms or after_ms) else np.asarray([np.nan])
    return [
        ("events trained", f"{applied:,}"),
        ("throughput", f"{applied / max(wall_s, 1e-9):,.0f} events/s (wall, incl. HTTP ingest)"),
        ("trainer device", ", ".join(sorted({s['device'] for s in stats}))),
        ("prequential recall@10 (model)", f"{model_r:.4f}  over {int(m.get('eval_events', 0)):,} warm events"),
        ("prequential recall@10 (popularity)", f"{pop_r:.4f}"),
        ("model / popularity", f"{model_r / pop_r:.2f}x" if pop_r else "n/a"),
        ("freshness ack->applied p50 / p99", f"{fr50:.0f} / {fr99:.0f} ms"),
        ("/rank latency p50 / p99", f"{np.nanpercentile(lat, 50):.1f} / {np.nanpercentile(lat, 99):.1f} ms over {len(lat)} requests"),
    ]


def _print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(line)


def cmd_run(args) -> int:
    """The main job: run the whole loop on a stream and print the summary table."""
    import httpx
    import ray
    from ray import serve
    from tqdm import tqdm

    from ps.client import start_shards
    from serving.app import run_app
    from workers.ingest import start_ingest
    from workers.streams import open_source
    from workers.trainer import start_trainers

    base = _load(args)
    work = Path(tempfile.mkdtemp(prefix="freshet-run-"))
    ns = f"{base.namespace}-run-{os.getpid()}"
    stream_overrides = {} if args.direct else {"kind": StreamKind.INGEST.value}
    # A throwaway run keeps its log and state together in a local temp dir, whatever the config says.
    cfg = _load(args, {"namespace": ns, "ingest": {"dir": str(work), "state_dir": None}, "stream": stream_overrides})
    source = open_source(base.stream)
    total = base.stream.num_events if base.stream.num_events is not None else source.end_offset
    if total is None:
        print("freshet run: the stream is unbounded; pass --events N", file=sys.stderr)
        return 2
    total = min(total, source.end_offset or total)
    print(f"freshet run: {base.stream.kind.value} stream, {total:,} events, "
          f"{cfg.ps.num_shards} shards, {cfg.trainer.num_workers} trainer(s), ingest log in {work}")
    _ray_init(args.address, ns)
    try:
        # Keep the handles: a non-detached actor is collected once its last handle is gone.
        ps_client = start_shards(cfg.ps, namespace=ns, state_dir=cfg.ingest.local_state_dir() / "ps")
        ingest = start_ingest(cfg.ingest, namespace=ns)
        trainers = start_trainers(cfg, evaluate=True, max_events=total, state_dir=cfg.ingest.local_state_dir() / "trainers")
        ray.get([t.ping.remote() for t in trainers])
        run_app(cfg)
        url = f"http://{cfg.serving.host}:{cfg.serving.port}"
        t_start = time.time()
        ray.get([t.start.remote() for t in trainers])
        feeder = None
        if not args.direct:
            feeder = _Feeder(cfg, url, source, total, trainers, backlog=4 * cfg.trainer.batch_size)
            feeder.start()
        with tqdm(total=total, unit="ev", desc="training", smoothing=0.1, dynamic_ncols=True) as bar:
            while True:
                stats = ray.get([t.stats.remote() for t in trainers])
                errors = [s["error"] for s in stats if s["error"]]
                if errors:
                    raise RuntimeError(f"trainer failed:\n{errors[0]}")
                if feeder is not None and feeder.error is not None:
                    raise RuntimeError(f"feeding /events failed: {feeder.error!r}")
                read = min(s["applied_offset"] for s in stats)
                bar.update(read - bar.n)
                if all(not s["running"] for s in stats) or read >= total:
                    break
                time.sleep(0.25)
        wall = time.time() - t_start
        stats = ray.get([t.stop.remote() for t in trainers])
        # Post-training latency sample: ranking for users the stream has seen.
        after_ms: list[float] = []
        with httpx.Client(base_url=url, timeout=30.0) as http:
            from ps.ids import ids_from_arrow

            users = ids_from_arrow(source.read(max(0, total - 2000), 2000).column("user_id")).tolist()
            for u in users[:: max(1, len(users) // 200)][:200]:
                t0 = time.perf_counter()
                http.post("/rank", json={"user_id": u, "k": 10}).raise_for_status()
                after_ms.append((time.perf_counter() - t0) * 1000.0)
        rows = _summary_rows(stats, feeder.rank_ms if feeder else [], after_ms, wall)
        del ps_client, ingest
        print()
        _print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": dict(rows), "trainers": stats}, indent=2, default=str))
        return 0
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# -- the long-running service ---------------------------------------------------------
def _state_path(cfg: FreshetConfig) -> Path:
    return cfg.ingest.local_state_dir() / _STATE_FILE


def _ray_pids(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (our Ray's temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


def cmd_up(args) -> int:
    """Start (or join) Ray and deploy PS, ingest, trainers and Serve as detached services."""
    import httpx
    import ray

    from ps.client import start_shards
    from serving.app import run_app
    from workers.ingest import start_ingest
    from workers.trainer import start_trainers

    cfg = _load(args, {"stream": {"kind": StreamKind.INGEST.value}} if not args.keep_stream else None)
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
    _ray_init(address, cfg.namespace)
    restore_from = None
    if getattr(args, "restore", None):
        restore_from = _checkpoint_dir(cfg, args.restore)
        _restore_trainer_offsets(cfg, restore_from)
        state["restored_from"] = args.restore
    start_shards(cfg.ps, namespace=cfg.namespace, detached=True, state_dir=cfg.ingest.local_state_dir() / "ps",
                 restore_from=restore_from)
    start_ingest(cfg.ingest, namespace=cfg.namespace, detached=True)
    # autostart: a trainer restarted by Ray resumes training from its committed offset.
    trainers = start_trainers(cfg, detached=True, state_dir=cfg.ingest.local_state_dir() / "trainers", autostart=True)
    ray.get([t.ping.remote() for t in trainers])
    run_app(cfg)
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    state["url"] = url
    deadline = time.time() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        if time.time() > deadline:
            print("freshet up: /healthz did not become ready within 120 s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    _state_path(cfg).write_text(json.dumps(state, indent=2))
    print(f"Freshet is up: {url} (Ray at {address}, namespace {cfg.namespace}). Stop it with `freshet down`.")
    return 0


def _read_state(cfg: FreshetConfig) -> dict[str, Any] | None:
    p = _state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else None


def cmd_status(args) -> int:
    """Print the running service's /stats (and whether /healthz is OK)."""
    import httpx

    cfg = _load(args)
    state = _read_state(cfg)
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


def cmd_down(args) -> int:
    """Remove the Serve app and the named actors; stop the Ray that ``up`` started."""
    import ray
    from ray import serve

    cfg = _load(args)
    state = _read_state(cfg)
    if state is None:
        print(f"freshet down: no {_STATE_FILE} under {cfg.ingest.local_state_dir()}; nothing started by `freshet up` here", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        _ray_init(state["address"], state["namespace"])
        serve.shutdown()
        from ps.client import shard_actor_name
        from workers.ingest import INGEST_ACTOR
        from workers.trainer import trainer_actor_name

        names = [shard_actor_name(i) for i in range(cfg.ps.num_shards)] + [INGEST_ACTOR]
        names += [trainer_actor_name(i) for i in range(cfg.trainer.num_workers)]
        for name in names:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=state["namespace"]))
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
    _state_path(cfg).unlink(missing_ok=True)
    print("Freshet is down.")
    return 0


# -- checkpoints ------------------------------------------------------------------------
_TRAINER_OFFSETS = "trainers.json"


def _checkpoint_root(cfg: FreshetConfig) -> Path:
    return cfg.ingest.local_state_dir() / "ps" / "checkpoints"


def _checkpoint_dir(cfg: FreshetConfig, name: str) -> Path:
    from ps.persist import validate_checkpoint_name

    # A path names a checkpoint anywhere (e.g. another deployment's); a bare name one of ours.
    path = Path(name) if os.sep in name else _checkpoint_root(cfg) / validate_checkpoint_name(name)
    if not (path / _TRAINER_OFFSETS).exists():
        raise FileNotFoundError(f"no complete checkpoint {name!r} under {_checkpoint_root(cfg)}")
    return path


def _restore_trainer_offsets(cfg: FreshetConfig, ckpt: Path) -> None:
    """Point each trainer's committed offset at the checkpoint, dropping pending pushes:
    the restored PS reflects exactly the events before those offsets."""
    import shutil

    from workers._wal import TrainerWAL
    from workers.ingest import read_log_id
    from workers.trainer import trainer_actor_name

    saved = json.loads((ckpt / _TRAINER_OFFSETS).read_text())
    log_id = read_log_id(cfg.ingest)
    current = "ingest:" + log_id if log_id is not None else None
    if len(saved["trainers"]) != cfg.trainer.num_workers:
        raise ValueError(
            f"checkpoint has {len(saved['trainers'])} trainers, config trainer.num_workers={cfg.trainer.num_workers}"
        )
    for i, t in enumerate(saved["trainers"]):
        root = cfg.ingest.local_state_dir() / "trainers" / trainer_actor_name(i)
        shutil.rmtree(root, ignore_errors=True)
        # Same log: resume after the events the checkpoint covers. A fresh deployment
        # has a new log (new producer names), so its trainers start at its beginning.
        if t["source_id"] == current:
            TrainerWAL(root).commit(t["applied_offset"], t["events_applied"])


def cmd_ckpt(args) -> int:
    """``freshet ckpt save|list|restore``: named, cross-shard-consistent PS checkpoints."""
    import ray

    cfg = _load(args)
    if args.action == "list":
        from ps.persist import list_checkpoints

        rows = [c for c in list_checkpoints(_checkpoint_root(cfg)) if (Path(c["path"]) / _TRAINER_OFFSETS).exists()]
        if not rows:
            print(f"no checkpoints under {_checkpoint_root(cfg)}")
        for c in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created_at"])) if c.get("created_at") else "?"
            print(f"{c['name']:<24} {when}  versions {c.get('versions')}")
        return 0
    if args.action == "restore":
        if not args.name:
            print("freshet ckpt restore: name the checkpoint (see `freshet ckpt list`)", file=sys.stderr)
            return 2
        if _read_state(cfg) is not None:
            print("freshet ckpt restore: a service is running here; `freshet down` first "
                  "(a checkpoint restores into a fresh deployment)", file=sys.stderr)
            return 1
        args.restore, args.address, args.keep_stream = args.name, None, False
        return cmd_up(args)
    # save: pause trainers so every shard snapshots the same set of pushes.
    from ps.client import PSClient
    from workers.trainer import trainer_actor_name

    state = _read_state(cfg)
    if state is None:
        print("freshet ckpt save: no service started by `freshet up` here", file=sys.stderr)
        return 1
    name = args.name or time.strftime("ckpt-%Y%m%d-%H%M%S")
    _ray_init(state["address"], state["namespace"])
    try:
        trainers = [ray.get_actor(trainer_actor_name(i), namespace=state["namespace"]) for i in range(cfg.trainer.num_workers)]
        stats = ray.get([t.stop.remote() for t in trainers])
        try:
            reports = PSClient.connect(state["namespace"]).snapshot(name)
            ckpt = _checkpoint_root(cfg) / name
            offsets = [{"applied_offset": s["applied_offset"], "events_applied": s["events_applied"],
                        "source_id": s["source_id"]} for s in stats]
            (ckpt / _TRAINER_OFFSETS).write_text(json.dumps({"trainers": offsets, "created_at": time.time()}))
        finally:
            ray.get([t.start.remote() for t in trainers])
    finally:
        ray.shutdown()
    print(f"checkpoint {name}: shard versions {[r['version'] for r in reports]}, "
          f"trainer offsets {[o['applied_offset'] for o in offsets]} -> {ckpt}")
    return 0


def cmd_config(args) -> int:
    """Print the effective configuration as YAML."""
    print(_load(args).to_yaml(), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshet", description="Incremental recommender training on a Ray parameter server.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data: bool = False):
        sp.add_argument("--config", help="Freshet YAML config (default: built-in defaults)")
        if data:
            sp.add_argument("--data", help="'synthetic' (default), a MovieLens ratings.csv/u.data, or Parquet file/dir")
            sp.add_argument("--events", type=int, help="stop after N events")

    r = sub.add_parser("run", help="run the whole loop on a stream and print a summary")
    common(r, data=True)
    r.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    r.add_argument("--direct", action="store_true", help="trainers read the stream directly instead of via POST /events")
    r.add_argument("--json", help="also write the summary as JSON to this file")
    r.set_defaults(fn=cmd_run)

    u = sub.add_parser("up", help="start the long-running service")
    common(u)
    u.add_argument("--address", help="join this Ray cluster (e.g. 'auto') instead of starting one")
    u.add_argument("--ray-port", type=int, default=6379, help="GCS port when starting Ray")
    u.add_argument("--keep-stream", action="store_true", help="train on the configured stream instead of /events")
    u.set_defaults(fn=cmd_up)

    s = sub.add_parser("status", help="show the running service's health and stats")
    common(s)
    s.set_defaults(fn=cmd_status)

    d = sub.add_parser("down", help="stop the service started by `freshet up`")
    common(d)
    d.set_defaults(fn=cmd_down)

    u.add_argument("--restore", metavar="NAME", help="start from named checkpoint NAME (see `freshet ckpt`)")

    k = sub.add_parser("ckpt", help="save, list or restore named PS checkpoints")
    common(k)
    k.add_argument("action", choices=["save", "list", "restore"])
    k.add_argument("name", nargs="?", help="checkpoint name (save: default ckpt-<time>; restore: required)")
    k.add_argument("--ray-port", type=int, default=6379, help="GCS port when restore starts Ray")
    k.set_defaults(fn=cmd_ckpt)

    from workers.evaluate import add_eval_arguments, cmd_eval

    e = sub.add_parser("eval", help="prequential comparison of update strategies; writes a report")
    add_eval_arguments(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("config", help="print the effective config as YAML")
    common(c, data=True)
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freshet`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"freshet {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
