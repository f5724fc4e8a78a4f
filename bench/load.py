"""HTTP load test of a full local deployment: throughput, latency, errors and lost events.

``python -m bench.load [--seconds 60] [--clients 16] [--out DIR]`` starts everything on
127.0.0.1 the way ``freshet run`` does (Ray with 2 CPUs, PS shards, the ingest log,
trainers reading the ingest stream, the Serve app), pre-seeds events so most users have
trained rows, then runs ``--clients`` concurrent HTTP clients (one ``httpx.AsyncClient``
each, all in one event loop) for ``--seconds``. Each client loops: ``POST /events`` with a
batch of ``--batch`` events with probability ``--events-share``, else ``POST /rank`` for a
random user. When the clock stops it waits (up to ``--drain-timeout`` s) until the
trainers have applied every accepted event.

It prints a table and writes ``<out>/load.json`` and ``<out>/load.png`` (latency
percentiles per endpoint, and requests per second over the run). The target is zero
errors and zero lost events (``events_applied == events_accepted``); the exit status is
0 when it is met, 1 when not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import at_least, fraction, loadavg_1m, machine, ray_temp_dir
from serving.ray_head import free_port

__all__ = [
    "DEFAULT_OUT",
    "REPORT_KEYS",
    "LoadPlan",
    "Sample",
    "bench_config",
    "format_table",
    "main",
    "run_clients",
    "summarize",
    "write_report",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
"""Default output directory (git-ignored)."""

REPORT_KEYS = ("bench", "date", "machine", "config", "load", "endpoints", "errors", "drain", "verdict")
"""Top-level keys of ``load.json``, in order."""

_PCTS = (50, 90, 99)
_TOKEN = "bench-load-token"


@dataclass(frozen=True)
class Sample:
    """One finished request: endpoint, outcome and client-side latency."""

    endpoint: str  # "/rank" or "/events"
    status: int | None  # HTTP status, None when no response came back
    error: str | None  # exception class name when no response came back
    start_s: float  # seconds since the load started
    latency_ms: float  # wall milliseconds from send to full response
    events: int = 0  # events in the request (/events only)
    accepted: int = 0  # events the server acknowledged (200 /events only)


@dataclass
class LoadPlan:
    """What the clients do: mix, sizes, ID spaces and bounds."""

    seconds: float = 60.0
    clients: int = 16
    events_share: float = 0.3  # fraction of requests that are /events batches
    batch: int = 20  # events per /events request
    k: int = 10  # items per /rank
    num_users: int = 500
    num_items: int = 300
    max_requests: int = 200_000  # per client: bounds a run on a very fast machine
    max_events: int = 1_000_000  # all clients together; after it only /rank is sent
    request_timeout_s: float = 30.0
    seed: int = 0
    posted: int = field(default=0, init=False)  # events sent so far (all clients)

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"seconds: must be > 0, got {self.seconds}")
        if self.clients < 1:
            raise ValueError(f"clients: must be >= 1, got {self.clients}")
        if not 0 <= self.events_share <= 1:
            raise ValueError(f"events_share: must be in [0, 1], got {self.events_share}")
        if self.batch < 1:
            raise ValueError(f"batch: must be >= 1, got {self.batch}")
        if self.num_users < 1 or self.num_items < 2:
            raise ValueError(f"num_users/num_items: need >= 1 user and >= 2 items, got {self.num_users}/{self.num_items}")


def bench_config(config_path: str | None, ingest_dir: str, namespace: str, port: int | None = None):
    """The deployment's config: ``config_path`` (or defaults) with the bench's overrides.

    Overrides: private ``namespace`` and ``ingest.dir`` (``ingest.state_dir`` unset), trainers
    read the ingest stream without an end, Serve on 127.0.0.1 at a free ``port`` with a bearer token.
    """
    from serving.config import load_config
    from workers.config import StreamKind

    return load_config(
        config_path,
        {
            "namespace": namespace,
            # The bench keeps its log and state in its own local work dir, whatever the config says.
            "ingest": {"dir": ingest_dir, "state_dir": None},
            "stream": {"kind": StreamKind.INGEST.value, "num_events": None},
            "serving": {"host": "127.0.0.1", "port": port or free_port(), "auth_token": _TOKEN},
        },
    )


def _zipf_items(rng: random.Random, n: int, count: int) -> list[int]:
    # Popularity falls like 1/rank: a realistic skew without numpy in the hot loop.
    return [min(n - 1, int(n ** rng.random()) - 1) for _ in range(count)]


def _events_body(rng: random.Random, plan: LoadPlan, count: int) -> dict:
    users = [f"user-{rng.randrange(plan.num_users)}" for _ in range(count)]
    return {
        "events": [
            {"user_id": u, "item_id": i, "weight": 1.0} for u, i in zip(users, _zipf_items(rng, plan.num_items, count))
        ]
    }


async def _client(index: int, http, plan: LoadPlan, t0: float, out: list[Sample]) -> None:
    import httpx

    rng = random.Random(plan.seed * 1_000_003 + index)
    deadline = t0 + plan.seconds
    for _ in range(plan.max_requests):
        now = time.perf_counter()
        if now >= deadline:
            return
        send_events = rng.random() < plan.events_share and plan.posted + plan.batch <= plan.max_events
        if send_events:
            plan.posted += plan.batch  # single event loop: no lock needed
            path, body, n = "/events", _events_body(rng, plan, plan.batch), plan.batch
        else:
            path, body, n = "/rank", {"user_id": f"user-{rng.randrange(plan.num_users)}", "k": plan.k}, 0
        start = time.perf_counter()
        status = error = None
        accepted = 0
        try:
            r = await http.post(path, json=body)
            status = r.status_code
            if send_events and status == 200:
                accepted = int(r.json()["accepted"])
        except httpx.HTTPError as e:
            error = type(e).__name__
        out.append(Sample(path, status, error, start - t0, (time.perf_counter() - start) * 1000.0, n, accepted))


async def _show_progress(plan: LoadPlan, t0: float, samples: list[Sample]) -> None:
    """A progress bar over the load's seconds (rate and ETA), with requests/s and non-200s so far."""
    from tqdm import tqdm

    bad = counted = 0
    with tqdm(total=plan.seconds, unit="s", desc="load", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s "
              "[{elapsed}<{remaining}{postfix}]", leave=False) as bar:
        while True:
            await asyncio.sleep(1.0)
            elapsed = min(plan.seconds, time.perf_counter() - t0)
            # Only the samples since the last tick: this runs on the clients' own event loop,
            # and a scan of every sample each second grew with the run (240,000 at 4,000 req/s).
            bad += sum(1 for s in samples[counted:] if s.status != 200)
            counted = len(samples)
            bar.set_postfix_str(f"{len(samples) / max(elapsed, 1e-9):,.0f} req/s, {bad} not 200", refresh=False)
            bar.update(elapsed - bar.n)


async def run_clients(url: str, plan: LoadPlan, token: str | None = None,
                      progress: bool = False) -> tuple[list[Sample], float]:
    """Run ``plan.clients`` concurrent clients against ``url`` until ``plan.seconds`` pass
    (``progress``: a bar on stderr meanwhile).

    Returns ``(samples, wall seconds)``. Requests only ever go to ``url`` (127.0.0.1 here).
    """
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=plan.request_timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        bar = asyncio.ensure_future(_show_progress(plan, t0, samples)) if progress else None
        try:
            await asyncio.gather(*(_client(i, http, plan, t0, samples) for i in range(plan.clients)))
        finally:
            if bar is not None:
                bar.cancel()
        wall = time.perf_counter() - t0
    return samples, wall


def _percentiles(ms: np.ndarray) -> dict[str, float | None]:
    if not len(ms):
        return {**{f"p{p}_ms": None for p in _PCTS}, "mean_ms": None, "max_ms": None}
    out: dict[str, float | None] = {f"p{p}_ms": float(np.percentile(ms, p)) for p in _PCTS}
    out.update(mean_ms=float(ms.mean()), max_ms=float(ms.max()))
    return out


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """Per-endpoint throughput and latency (successful requests), error counts, events acknowledged.

    ``endpoints[e]``: ``requests``, ``ok`` (200s), ``req_per_s`` (all requests / wall s),
    ``ok_per_s``, ``p50_ms``/``p90_ms``/``p99_ms``/``mean_ms``/``max_ms`` over the 200s;
    ``/events`` also ``events_sent``, ``events_acked``, ``events_per_s`` (acked / wall s).
    ``errors``: ``"<endpoint> <status or exception>" -> count`` for everything but 200.
    """
    wall_s = max(wall_s, 1e-9)
    endpoints: dict[str, dict[str, Any]] = {}
    errors: dict[str, int] = {}
    for name in sorted({s.endpoint for s in samples}):
        mine = [s for s in samples if s.endpoint == name]
        ok = np.asarray([s.latency_ms for s in mine if s.status == 200], dtype=np.float64)
        entry: dict[str, Any] = {
            "requests": len(mine),
            "ok": int(len(ok)),
            "req_per_s": len(mine) / wall_s,
            "ok_per_s": len(ok) / wall_s,
            **_percentiles(ok),
        }
        if name == "/events":
            acked = sum(s.accepted for s in mine)
            entry.update(events_sent=sum(s.events for s in mine), events_acked=acked, events_per_s=acked / wall_s)
        endpoints[name] = entry
        for s in mine:
            if s.status != 200:
                key = f"{name} {s.status if s.status is not None else s.error}"
                errors[key] = errors.get(key, 0) + 1
    total = len(samples)
    return {
        "load": {"wall_s": wall_s, "requests": total, "req_per_s": total / wall_s,
                 "errors": sum(errors.values())},
        "endpoints": endpoints,
        "errors": dict(sorted(errors.items())),
    }


def _timeline(samples: list[Sample], seconds: float) -> dict[str, list[int]]:
    """Requests started in each whole second of a ``seconds``-long run, per endpoint."""
    n = max(1, int(np.ceil(seconds)))
    out: dict[str, list[int]] = {}
    for name in sorted({s.endpoint for s in samples}):
        starts = np.asarray([s.start_s for s in samples if s.endpoint == name])
        out[name] = np.bincount(np.minimum(starts.astype(np.int64), n - 1), minlength=n).tolist()
    return out


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report."""
    lines = []
    load, drain = report["load"], report["drain"]
    lines.append(
        f"{report['bench']['clients']} clients for {load['wall_s']:.1f} s: {load['requests']:,} requests, "
        f"{load['req_per_s']:,.1f} req/s, {load['errors']} errors"
    )
    head = f"{'endpoint':<9} {'requests':>9} {'ok':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    lines += ["-" * len(head), head, "-" * len(head)]

    def f(x):
        return f"{x:8.1f}" if x is not None else f"{'-':>8}"

    for name, e in report["endpoints"].items():
        lines.append(
            f"{name:<9} {e['requests']:>9,} {e['ok']:>9,} {e['req_per_s']:>8.1f} "
            f"{f(e['p50_ms'])} {f(e['p90_ms'])} {f(e['p99_ms'])} {f(e['max_ms'])}"
        )
    lines.append("-" * len(head))
    ev = report["endpoints"].get("/events")
    if ev:
        lines.append(f"events acknowledged: {ev['events_acked']:,} ({ev['events_per_s']:,.0f} events/s)")
    lines.append("errors: " + (", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"))
    lines.append(
        f"drain: {'done' if drain['drained'] else 'NOT done'} in {drain['wait_s']:.1f} s; "
        f"accepted {drain['events_accepted']:,}, applied {drain['events_applied']:,}, "
        f"lost {drain['lost']:,}, quarantined {drain['quarantined']:,}; "
        f"server accepted - (pre-seeded + client-acked) = {drain['unacked_accepted']:,}"
    )
    v = report["verdict"]
    lines.append(f"target (zero errors, zero lost events): {'MET' if v['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``load.json`` and ``load.png`` under ``out``; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "load.json", out / "load.png"
    json_path.write_text(json.dumps(report, indent=2, default=str))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(report["endpoints"])
    keys = [f"p{p}_ms" for p in _PCTS] + ["max_ms"]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        vals = [report["endpoints"][n][key] or 0.0 for n in names]
        bars = ax1.bar(np.arange(len(names)) + (j - (len(keys) - 1) / 2) * width, vals, width, label=key[:-3])
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
    ax1.set_xticks(np.arange(len(names)), names)
    ax1.set_ylabel("latency (ms, client side, 200s only)")
    ax1.set_title(f"latency per endpoint, {report['bench']['clients']} concurrent clients")
    ax1.legend()
    for name, counts in report["load"].get("timeline", {}).items():
        ax2.plot(np.arange(len(counts)), counts, label=name)
    ax2.set_xlabel("second of the run")
    ax2.set_ylabel("requests started per second")
    ax2.set_title(f"throughput ({report['load']['req_per_s']:.0f} req/s overall)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def _stats(http) -> dict[str, Any]:
    r = http.get("/stats")
    r.raise_for_status()
    return r.json()


def _drain(http, timeout_s: float) -> tuple[bool, float, dict[str, Any]]:
    """Poll ``/stats`` until ``events_applied == events_accepted``; ``(drained, seconds waited, last stats)``."""
    t0 = time.monotonic()
    while True:
        s = _stats(http)
        if s["events_applied"] == s["events_accepted"]:
            return True, time.monotonic() - t0, s
        if time.monotonic() - t0 > timeout_s:
            return False, time.monotonic() - t0, s
        time.sleep(0.25)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=at_least(0.001, float), default=60.0, help="load duration (seconds, default 60)")
    p.add_argument("--clients", type=at_least(1), default=16, help="concurrent HTTP clients (default 16)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/results/)")
    p.add_argument("--config", default=None, help="Freshet YAML config to start from (default: built-in defaults)")
    p.add_argument("--events-share", type=fraction(zero=True), default=0.3, help="fraction of requests that post events (default 0.3)")
    p.add_argument("--batch", type=at_least(1), default=20, help="events per /events request (default 20)")
    p.add_argument("--seed-events", type=at_least(0), default=3000, help="events posted and trained before the load (default 3000)")
    p.add_argument("--users", type=at_least(1), default=500, help="distinct users in the load (default 500)")
    p.add_argument("--items", type=at_least(1), default=300, help="distinct items in the load (default 300)")
    p.add_argument("--max-events", type=at_least(1), default=1_000_000, help="cap on events posted during the load (default 1e6)")
    p.add_argument("--drain-timeout", type=at_least(0, float), default=120.0, help="seconds to wait for training to catch up (default 120)")
    p.add_argument("--quiet", action="store_true", help="no progress bar during the load")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the load test; 0 when there were no errors and no lost events, else 1."""
    args = _parse(argv)
    plan = LoadPlan(
        seconds=args.seconds, clients=args.clients, events_share=args.events_share, batch=args.batch,
        num_users=args.users, num_items=args.items, max_events=args.max_events,
    )
    if args.seed_events < 0:
        raise SystemExit("bench.load: --seed-events must be >= 0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    import httpx
    import ray
    from ray import serve

    from serving import deploy

    work = Path(tempfile.mkdtemp(prefix="freshet-load-"))
    # The ingest log goes to <work>/ingest, shard state to <work>/ps, trainer WALs to <work>/trainers.
    cfg = bench_config(args.config, str(work), f"bench-load-{os.getpid()}")
    url = f"http://127.0.0.1:{cfg.serving.port}"
    # Short temp dir: Ray's unix socket paths must stay under 108 bytes.
    ray_dir = ray_temp_dir("frl")
    print(f"bench.load: {plan.clients} clients x {plan.seconds:g} s against {url} "
          f"({cfg.ps.num_shards} shards, {cfg.trainer.num_workers} trainer(s), ingest fsync={cfg.ingest.fsync}, "
          f"state in {work})", flush=True)
    load_start = loadavg_1m()
    t_setup = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=ray_dir,
             namespace=cfg.namespace, log_to_driver=False, _system_config=cfg.ray.system_config())
    try:
        # Keep ``dep``: a non-detached actor is collected once its last handle is gone.
        dep = deploy.start(cfg, autostart=True)
        setup_s = time.perf_counter() - t_setup
        auth = {"Authorization": f"Bearer {_TOKEN}"}
        with httpx.Client(base_url=url, timeout=60.0, headers=auth) as http:
            rng = random.Random(plan.seed)
            step = min(cfg.serving.max_events_per_request, 1000)
            seeded = 0
            while seeded < args.seed_events:
                n = min(step, args.seed_events - seeded)
                http.post("/events", json=_events_body(rng, plan, n)).raise_for_status()
                seeded += n
            drained, seed_wait, _ = _drain(http, args.drain_timeout)
            if not drained:
                print("bench.load: the pre-seeded events were not applied in time; measuring anyway", file=sys.stderr)
            print(f"bench.load: set up in {setup_s:.1f} s, {seeded:,} events pre-seeded and trained in "
                  f"{seed_wait:.1f} s; loading...", flush=True)

            before = _stats(http)
            samples, wall = asyncio.run(run_clients(url, plan, _TOKEN, progress=not args.quiet))
            summary = summarize(samples, wall)
            summary["load"]["timeline"] = _timeline(samples, plan.seconds)
            print("bench.load: load done; waiting for the trainers to apply every accepted event...", flush=True)
            drained, wait_s, after = _drain(http, args.drain_timeout)

        acked = summary["endpoints"].get("/events", {}).get("events_acked", 0)
        drain = {
            "drained": drained,
            "wait_s": wait_s,
            "timeout_s": args.drain_timeout,
            "preseeded": seeded,
            "events_accepted_before_load": before["events_accepted"],
            "events_acked_by_clients": acked,
            "events_accepted": after["events_accepted"],
            "events_applied": after["events_applied"],
            "applied_offset": after["applied_offset"],
            "quarantined": after["quarantined"],
            "lost": after["events_accepted"] - after["events_applied"],
            # > 0: appended by requests whose reply the client never got (timeouts).
            "unacked_accepted": after["events_accepted"] - before["events_accepted"] - acked,
            "freshness_ms": after["freshness_ms"],
            "trainer_errors": [t["error"] for t in after["trainers"] if t.get("error")],
            "trainers_down": after["trainers_down"],
        }
        met = summary["load"]["errors"] == 0 and drained and drain["lost"] == 0 and drain["unacked_accepted"] == 0
        report = {
            "bench": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "setup_s": setup_s, "ray_num_cpus": 2, "loadavg_1m_start": load_start},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine("ray", "httpx"),
            "config": {**cfg.model_dump(mode="json"), "serving": {**cfg.serving.model_dump(mode="json"), "auth_token": "<set>"}},
            "load": summary["load"],
            "endpoints": summary["endpoints"],
            "errors": summary["errors"],
            "drain": drain,
            "verdict": {"met": met, "zero_errors": summary["load"]["errors"] == 0,
                        "zero_lost": drained and drain["lost"] == 0},
        }
        del dep
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the log, WALs and snapshots (~1 GB): not needed after the run
    json_path, png_path = write_report(report, args.out)
    print()
    print(format_table(report))
    print(f"\nwrote {json_path} and {png_path}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
