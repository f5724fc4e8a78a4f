"""Training throughput through the parameter server versus one in-process model, and
``/rank`` latency, side by side on this machine.

``python -m bench.train_throughput [--events N] [--out DIR]`` runs, in one process:

1. The in-process twin: the trainer's own class with its rows in one in-process shard
   (``ps.local.LocalClient``), no Ray.
2. The same stream through Ray: PS shard actors plus one trainer actor reading the
   stream itself, with ``trainer.prefetch`` off and on.
3. With the PS of (2) still up: the ingest log and the Serve app, then sequential
   ``POST /rank`` for known and unknown users and ``GET /healthz`` as the HTTP floor.

It prints a table and writes ``<out>/train_throughput.json`` and
``<out>/train_throughput.png``. See ``bench/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ps.ids import ids_from_arrow
from ps.local import LocalClient
from serving.config import FreshetConfig, load_config
from workers.config import StreamKind
from workers.trainer import Trainer

if TYPE_CHECKING:
    from serving.deploy import Deployment

__all__ = [
    "REPORT_KEYS",
    "RUN_KEYS",
    "in_process_trainer",
    "bench_config",
    "build_report",
    "format_table",
    "main",
    "run_in_process",
    "write_report",
]

REPORT_KEYS = ("bench", "date", "machine", "config", "in_process", "ps", "ratios", "rank_latency")
"""Top-level keys of ``train_throughput.json``, in order."""

RUN_KEYS = ("events", "batches", "wall_s", "events_per_s", "ms_per_batch", "cpu_s", "system_cpu_s", "loss_sum")
"""Keys every throughput run (in-process and each PS run) has in the JSON."""

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
"""Default output directory (git-ignored)."""

_LAT_KEYS = ("n", "p50_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")


# --------------------------------------------------------------------------- in-process twin


def _event_total(cfg: FreshetConfig, source) -> int:
    total = cfg.stream.num_events if cfg.stream.num_events is not None else source.end_offset
    if total is None:
        raise ValueError("stream.num_events: the stream is unbounded; set a number of events")
    return min(total, source.end_offset) if source.end_offset is not None else total


def in_process_trainer(cfg: FreshetConfig) -> Trainer:
    """The twin: the trainer's own class, its rows in one in-process shard (``ps.local.LocalClient``)."""
    return Trainer(0, cfg, client=LocalClient(cfg.ps))


def run_in_process(cfg: FreshetConfig, *, trainer: Trainer | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the in-process twin on ``cfg.stream``; returns the figures.

    The twin is :class:`workers.trainer.Trainer` itself (the same batches, negatives,
    losses, pushes and shard-side update rules) with its rows in one in-process shard
    instead of shard actors: what is left between it and the PS run is Ray. Keys:
    :data:`RUN_KEYS` plus ``loss_first``/``loss_last`` (mean per-event loss of the
    first/last tenth of batches, nats) and ``rows`` (rows per table). Torch uses one
    thread, as a trainer actor does. Pass ``trainer`` to inspect it afterwards.
    """
    from tqdm import tqdm

    if cfg.stream.kind == StreamKind.INGEST:
        raise ValueError("stream.kind: the benchmark needs a replayable source, not 'ingest'")
    t = trainer if trainer is not None else in_process_trainer(cfg)
    total = t.max_events if t.max_events is not None else next(iter(t.sources.values())).end_offset
    threads = torch.get_num_threads()
    per_event: list[float] = []
    try:
        t0, c0, s0 = time.perf_counter(), time.process_time(), _tree_cpu_s()
        with tqdm(total=total, unit="ev", desc="in-process", disable=not progress, dynamic_ncols=True) as bar:
            while not t.done:
                loss0, events0, batches0 = t.metrics["loss_sum"], t.events_applied, t.batches
                t.run(max_batches=1)
                if t.batches > batches0 and t.events_applied > events0:
                    per_event.append((t.metrics["loss_sum"] - loss0) / (t.events_applied - events0))
                bar.update(t.events_read - bar.n)
        wall, cpu, s1 = time.perf_counter() - t0, time.process_time() - c0, _tree_cpu_s()
    finally:
        torch.set_num_threads(threads)
    tenth = max(1, len(per_event) // 10)
    rows = t.client.shard.stats()["rows"]
    return {
        "events": t.events_applied,
        "batches": t.batches,
        "wall_s": wall,
        "events_per_s": t.events_applied / max(wall, 1e-9),
        "ms_per_batch": 1000.0 * wall / max(1, t.batches),
        "cpu_s": cpu,
        "system_cpu_s": _cpu_between(s0, s1),
        "loss_sum": float(t.metrics["loss_sum"]),
        "loss_first": float(np.mean(per_event[:tenth])) if per_event else None,
        "loss_last": float(np.mean(per_event[-tenth:])) if per_event else None,
        "rows": rows,
    }


# --------------------------------------------------------------------------- through the PS


def _tree_cpu_s() -> dict[int, float] | None:
    """CPU seconds (user + system) used so far by this process and each live descendant, by PID.

    With a driver-started local Ray that is every Ray process of this benchmark (GCS,
    raylet, workers, actors); see :func:`_cpu_between`. None where ``/proc`` is absent.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            # Fields after the ")" that ends the command name: state ppid ... utime(12) stime(13).
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        out[pid] = cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return out


def _cpu_between(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    """CPU seconds the process tree used between two :func:`_tree_cpu_s` snapshots.

    Only processes alive at the end count (a process that exited took its counter with
    it); one started in between counts in full. The machine's other load hardly changes
    this figure, unlike wall time.
    """
    if before is None or after is None:
        return None
    return sum(max(0.0, c - before.get(pid, 0.0)) for pid, c in after.items())


def _process_role(pid: int) -> str:
    """A short label of a process: ``driver``, ``ray::PSShard``, ``raylet``, ``gcs_server``..."""
    if pid == os.getpid():
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "exited"
    first = argv[0].decode("utf-8", "replace").split()[0] if argv and argv[0] else "?"
    if first.startswith("ray::"):
        return first.split(".")[0]  # ray::PSShard.push -> ray::PSShard (the title follows the running method)
    name = os.path.basename(first)
    if name.startswith("python") and len(argv) > 1 and argv[1]:
        name = os.path.basename(argv[1].decode("utf-8", "replace"))
    return name


def _cpu_by_role(before: dict[int, float] | None, after: dict[int, float] | None) -> dict[str, float]:
    """:func:`_cpu_between` split by :func:`_process_role`, largest first (seconds)."""
    if before is None or after is None:
        return {}
    out: dict[str, float] = {}
    for pid, c in after.items():
        used = max(0.0, c - before.get(pid, 0.0))
        if used > 0:
            role = _process_role(pid)
            out[role] = out.get(role, 0.0) + used
    return dict(sorted(((k, round(v, 3)) for k, v in out.items()), key=lambda kv: -kv[1]))


def _run_ps(cfg: FreshetConfig, *, progress: bool = True) -> tuple[dict[str, Any], Deployment]:
    """Shards plus one trainer reading ``cfg.stream`` directly; figures from the trainer's ``stats()``.

    ``wall_s`` is measured around ``Trainer.run`` only (actors are started and ready
    before the clock starts). The deployment is left running for the caller.
    """
    import ray
    from tqdm import tqdm

    from serving import deploy
    from workers.streams import open_source

    total = _event_total(cfg, open_source(cfg.stream))
    dep = deploy.start(cfg, durable=False, ingest=False, serving=False, max_events=total)
    client, (trainer,) = dep.ps, dep.trainers
    label = f"PS prefetch={'on' if cfg.trainer.prefetch else 'off'}"
    cpu0, t0 = _tree_cpu_s(), time.perf_counter()
    ref = trainer.run.remote()
    with tqdm(total=total, unit="ev", desc=label, disable=not progress, dynamic_ncols=True) as bar:
        while not ray.wait([ref], timeout=0.5)[0]:
            bar.update(ray.get(trainer.stats.remote())["events_read"] - bar.n)
        stats = ray.get(ref)  # re-raises a trainer failure
        wall = time.perf_counter() - t0
        cpu1 = _tree_cpu_s()
        bar.update(stats["events_read"] - bar.n)
    shard_rows: dict[str, int] = {}
    for s in client.stats():
        for name, n in s["rows"].items():
            shard_rows[name] = shard_rows.get(name, 0) + n
    applied = stats["events_applied"]
    return {
        "events": applied,
        "batches": stats["batches"],
        "wall_s": wall,
        "events_per_s": applied / max(wall, 1e-9),
        "ms_per_batch": 1000.0 * wall / max(1, stats["batches"]),
        "cpu_s": stats["cpu_s"],
        "loss_sum": stats["metrics"].get("loss_sum", 0.0),
        "train_s": stats["train_s"],
        "prefetch": cfg.trainer.prefetch,
        "trainer_events_per_s": stats["events_per_s"],
        "system_cpu_s": _cpu_between(cpu0, cpu1),
        "system_cpu_by_process": _cpu_by_role(cpu0, cpu1),
        "rows": shard_rows,
    }, dep


# --------------------------------------------------------------------------- /rank latency


def _latency(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "n": int(len(a)),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def _measure_latency(
    dep: Deployment, known_users: np.ndarray, *, n_known: int, n_unknown: int, n_healthz: int, progress: bool
) -> dict[str, Any]:
    """Start ingest and Serve beside ``dep``'s PS; time sequential requests from one client (ms)."""
    try:
        import serving.app  # noqa: F401 - only to report a missing Serve cleanly
    except ImportError as e:
        return {"skipped": f"serving.app is not importable ({type(e).__name__}: {e})"}
    import httpx
    from tqdm import tqdm

    cfg = dep.cfg
    dep.start_ingest()
    t0 = time.perf_counter()
    dep.start_serving()
    startup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    known = rng.choice(known_users, size=n_known).tolist()
    # Far outside the synthetic ID range: never trained, so the app must fall back to popularity.
    unknown = [10**15 + i for i in range(n_unknown)]
    out: dict[str, Any] = {"serve_startup_s": startup_s, "request": {"k": 10, "exclude_seen": True}}
    url = f"http://127.0.0.1:{cfg.serving.port}{cfg.serving.route_prefix.rstrip('/')}"
    with httpx.Client(base_url=url, timeout=30.0) as http:

        def rank(user) -> tuple[float, Any]:
            t = time.perf_counter()
            r = http.post("/rank", json={"user_id": user, "k": 10})
            ms = (time.perf_counter() - t) * 1000.0
            if r.status_code != 200:
                raise RuntimeError(f"/rank for user {user!r} answered {r.status_code}: {r.text[:300]}")
            return ms, r.json()["fallback"]

        for u in known[:20]:  # warm-up: connection, replica caches; not measured
            rank(u)
        for label, users in (("rank_known", known), ("rank_unknown", unknown)):
            ms, fallbacks = [], 0
            for u in tqdm(users, desc=f"/rank {label[5:]}", unit="req", disable=not progress, dynamic_ncols=True):
                t, fb = rank(u)
                ms.append(t)
                fallbacks += fb == "popular"
            out[label] = {**_latency(ms), "fallback_popular": fallbacks}
        ms = []
        for _ in tqdm(range(n_healthz), desc="/healthz", unit="req", disable=not progress, dynamic_ncols=True):
            t = time.perf_counter()
            r = http.get("/healthz")
            ms.append((time.perf_counter() - t) * 1000.0)
            if r.status_code != 200:
                raise RuntimeError(f"/healthz answered {r.status_code}: {r.text[:300]}")
        out["healthz"] = _latency(ms)
    return out


# --------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ray": version("ray"),
    }


def _cpu_ratio(run: dict[str, Any], base: dict[str, Any]) -> float | None:
    a, b = run.get("system_cpu_s"), base.get("system_cpu_s")
    if a is None or not b or not run["events"] or not base["events"]:
        return None
    return (a / run["events"]) / (b / base["events"])


def build_report(
    cfg: FreshetConfig,
    in_process: dict[str, Any],
    ps_runs: dict[str, dict[str, Any]],
    rank_latency: dict[str, Any],
    *,
    bench: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: :data:`REPORT_KEYS`, with ratios PS/in-process per PS run.

    ``ratios[run]`` has ``events_per_s`` (PS events/s over in-process events/s),
    ``overhead_ms_per_batch`` (PS ms per batch minus in-process ms per batch),
    ``cpu_per_event`` (CPU seconds per event of all the PS run's processes over those of
    the in-process run; None when not measured) and
    ``loss_sum_rel_diff`` (|PS loss sum - in-process loss sum| / |in-process loss sum|:
    0 when both trained exactly the same computation, which they should).
    """
    ratios = {
        name: {
            "events_per_s": run["events_per_s"] / max(in_process["events_per_s"], 1e-9),
            "overhead_ms_per_batch": run["ms_per_batch"] - in_process["ms_per_batch"],
            "cpu_per_event": _cpu_ratio(run, in_process),
            "loss_sum_rel_diff": abs(run["loss_sum"] - in_process["loss_sum"]) / max(abs(in_process["loss_sum"]), 1e-12),
        }
        for name, run in ps_runs.items()
    }
    report = {
        "bench": bench or {},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": cfg.model_dump(mode="json"),
        "in_process": in_process,
        "ps": ps_runs,
        "ratios": ratios,
        "rank_latency": rank_latency,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = report["rank_latency"]
    has_lat = "skipped" not in lat and lat
    fig, axes = plt.subplots(1, 2 if has_lat else 1, figsize=(11 if has_lat else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    names = ["in-process"] + [f"PS {n}" for n in report["ps"]]
    values = [report["in_process"]["events_per_s"]] + [r["events_per_s"] for r in report["ps"].values()]
    bars = ax.bar(names, values, color=["#4c72b0"] + ["#dd8452"] * len(report["ps"]))
    def label(r: dict[str, Any]) -> str:
        cpu = r.get("cpu_per_event")
        return f"{r['events_per_s']:.2f}x" + ("" if cpu is None else f"\nCPU/event {cpu:.1f}x")

    labels = ["1.00x"] + [label(report["ratios"][n]) for n in report["ps"]]
    for bar, text, v in zip(bars, labels, values):
        ax.annotate(f"{v:,.0f}\n{text}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training events/s")
    ax.set_ylim(0, max(values) * 1.35)
    ax.set_title(f"Training throughput, {report['in_process']['events']:,} events")
    if has_lat:
        ax = axes[0][1]
        groups = [("rank_known", "/rank known"), ("rank_unknown", "/rank unknown"), ("healthz", "/healthz")]
        groups = [(k, n) for k, n in groups if k in lat]
        x = np.arange(len(groups))
        for off, q, color in ((-0.2, "p50_ms", "#55a868"), (0.2, "p99_ms", "#c44e52")):
            ax.bar(x + off, [lat[k][q] for k, _ in groups], width=0.4, label=q.replace("_ms", ""), color=color)
        ax.set_xticks(x, [n for _, n in groups])
        ax.set_ylabel("latency (ms), sequential requests")
        ax.set_title("HTTP latency")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train_throughput.json`` and ``train_throughput.png`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "train_throughput.json", out / "train_throughput.png"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    _chart(report, png_path)
    return json_path, png_path


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned plain text: throughput rows, then latency rows."""
    ip = report["in_process"]
    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [("run", "events/s", "ms/batch", "vs in-process", "overhead ms/batch", "system cpu s", "cpu/event",
             "train s", "loss sum")]
    rows.append(("in-process (no Ray)", f"{ip['events_per_s']:,.0f}", f"{ip['ms_per_batch']:.2f}", "1.00x", "-",
                 num(ip["system_cpu_s"], ".1f"), "1.00x", "-", f"{ip['loss_sum']:,.1f}"))
    for name, run in report["ps"].items():
        r = report["ratios"][name]
        rows.append((f"PS, {name}", f"{run['events_per_s']:,.0f}", f"{run['ms_per_batch']:.2f}",
                     f"{r['events_per_s']:.2f}x", f"{r['overhead_ms_per_batch']:+.2f}", num(run["system_cpu_s"], ".1f"),
                     num(r["cpu_per_event"], ".2f") + ("x" if r["cpu_per_event"] is not None else ""),
                     f"{run.get('train_s', 0.0):.1f}", f"{run['loss_sum']:,.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lat = report["rank_latency"]
    lines.append("")
    if "skipped" in lat:
        lines.append(f"/rank latency: skipped: {lat['skipped']}")
    elif lat:
        lrows = [("request (sequential)", "n", "p50 ms", "p99 ms", "mean ms", "popular fallback")]
        for key, name in (("rank_known", "POST /rank known user"), ("rank_unknown", "POST /rank unknown user"),
                          ("healthz", "GET /healthz (HTTP floor)")):
            if key in lat:
                x = lat[key]
                fb = str(x["fallback_popular"]) if "fallback_popular" in x else "-"
                lrows.append((name, str(x["n"]), f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}", f"{x['mean_ms']:.2f}", fb))
        w = [max(len(r[i]) for r in lrows) for i in range(len(lrows[0]))]
        ll = ["  ".join(c.ljust(wi) if i == 0 else c.rjust(wi) for i, (c, wi) in enumerate(zip(r, w))) for r in lrows]
        ll.insert(1, "-" * len(ll[0]))
        lines += ll
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def bench_config(events: int, config_path: str | None = None) -> FreshetConfig:
    """The benchmark's config: ``config_path`` (or defaults) with ``events`` events and one trainer."""
    if events < 1:
        raise ValueError(f"events: must be >= 1, got {events}")
    cfg = load_config(config_path, {"stream": {"num_events": events}, "trainer": {"num_workers": 1}})
    if cfg.stream.kind == StreamKind.INGEST:
        raise ValueError("stream.kind: the benchmark needs a replayable source (synthetic, movielens, parquet), not 'ingest'")
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=_positive, default=30_000, help="stream events per run (default 30000)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results/)")
    p.add_argument("--config", default=None, help="Freshet YAML config (default: built-in defaults, synthetic stream)")
    p.add_argument("--rank-requests", type=_positive, default=300, help="/rank requests for known users")
    p.add_argument("--unknown-requests", type=_positive, default=50, help="/rank requests for unknown users")
    p.add_argument("--healthz-requests", type=_positive, default=300, help="GET /healthz requests")
    p.add_argument("--no-serve", action="store_true", help="skip the /rank latency part")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    progress = not args.quiet
    try:
        cfg = bench_config(args.events, args.config)
    except Exception as e:  # noqa: BLE001 - a bad config is a usage error, not a traceback
        print(f"train_throughput: {e}", file=sys.stderr)
        return 2
    bench = {k: getattr(args, k) for k in ("events", "rank_requests", "unknown_requests", "healthz_requests")}
    bench["ray_num_cpus"] = 2
    bench["loadavg_1m_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"train_throughput: {cfg.stream.kind.value} stream, {args.events:,} events, batch {cfg.trainer.batch_size}, "
          f"{cfg.model.num_negatives} negatives, dim {cfg.ps.table(cfg.model.user_table).dim}, "
          f"{cfg.ps.num_shards} shards, {os.cpu_count()} CPUs")

    # In-process first, while no Ray processes compete for the CPUs.
    in_process = run_in_process(cfg, progress=progress)

    import ray
    from ray import serve

    from serving import deploy

    pid = os.getpid()
    ray_root = os.environ.get("RAY_TMPDIR", "/tmp")
    Path(ray_root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="frb", dir=ray_root))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(work / "ray"),
             log_to_driver=False, configure_logging=False)
    ps_runs: dict[str, dict[str, Any]] = {}
    latency: dict[str, Any] = {"skipped": "--no-serve"} if args.no_serve else {}
    try:
        dep = None
        for prefetch in (False, True):  # the last one stays up for serving
            name = f"prefetch {'on' if prefetch else 'off'}"
            run_cfg = cfg.model_copy(update={
                "namespace": f"frbench-{pid}-{'pf' if prefetch else 'nopf'}",
                "trainer": cfg.trainer.model_copy(update={"prefetch": prefetch}),
                "ingest": cfg.ingest.model_copy(update={"dir": str(work / "data"), "state_dir": None}),
                "serving": cfg.serving.model_copy(update={"host": "127.0.0.1", "port": _free_port()}),
            })
            if dep is not None:
                deploy.stop(dep.cfg, serving=False)
            ps_runs[name], dep = _run_ps(run_cfg, progress=progress)
        if not args.no_serve:
            from workers.streams import open_source

            src = open_source(cfg.stream)
            users = np.unique(ids_from_arrow(src.read(0, args.events).column("user_id")))
            latency = _measure_latency(dep, users, n_known=args.rank_requests, n_unknown=args.unknown_requests,
                                       n_healthz=args.healthz_requests, progress=progress)
            if "skipped" in latency:
                print(f"train_throughput: /rank latency skipped: {latency['skipped']}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()

    report = build_report(cfg, in_process, ps_runs, latency, bench=bench)
    json_path, png_path = write_report(report, args.out)
    print()
    print(format_table(report))
    diffs = [r["loss_sum_rel_diff"] for r in report["ratios"].values()]
    if any(d > 1e-4 for d in diffs):
        print("\nwarning: PS and in-process loss sums differ: the baseline no longer does the trainer's "
              "computation (negatives, init or update rule changed?)", file=sys.stderr)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
