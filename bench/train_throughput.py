"""Training throughput through the parameter server versus one in-process model and
outside peers, and ``/rank`` latency, side by side on this machine.

``python -m bench.train_throughput [--workload default|torchrec] [--events N] [--out DIR]``
runs, in one process:

0. With ``--workload torchrec`` only: the peers of :mod:`bench.peers` on the very same
   events (plain torch gather + ``index_add_`` with 1 and 2 threads, always; TorchRec CPU
   and raw FBGEMM TBE with 2 threads when the extra ``freshet[peers]`` is installed).
1. The in-process twin: the trainer's own class with its rows in one in-process shard
   (``ps.local.LocalClient``), no Ray.
2. The same stream through Ray: PS shard actors plus one trainer actor reading the
   stream itself, with ``trainer.prefetch`` off and on.
3. With the PS of (2) still up (default workload only): the ingest log and the Serve
   app, then sequential ``POST /rank`` for known and unknown users and ``GET /healthz``
   as the HTTP floor.

With ``--workload torchrec`` the same run also reports, so one JSON holds every training
figure of issues 11 and 12: the default model (``--default-events``, 30,000 synthetic
events: its twin before Ray starts, then through the PS with prefetch on) and issue 11's
table figures at ``--table-rows`` (1,000,000) rows (:func:`run_table_figures`: bytes per
row against the raw row + optimizer state, pull / push / evicting-push keys/s, and
``ps.index.KeyIndex`` against the dict index).

Workloads: ``default`` is the configured model (3 passes x 32 negatives, session
context, recent-popularity prior) on the synthetic stream; ``torchrec`` is the TorchRec
CPU job of issue 12 (1M-ID user and item tables, dim 64, row-wise Adagrad, BPR with 4
uniform negatives, batch 4096, one pass, no session context, no popularity prior):
Freshet reads the peers' events from a Parquet file (:func:`torchrec_config`).

It prints a table and writes ``<out>/train_throughput.json`` and
``<out>/train_throughput.png`` (``train_throughput_torchrec.*`` for that workload). See
``bench/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench import at_least, cpu_between, loadavg_1m, machine, tree_cpu_s
from ps.ids import ids_from_arrow
from ps.local import LocalClient
from serving.config import FreshetConfig, load_config
from serving.ray_head import free_port
from workers.config import StreamKind
from workers.trainer import Trainer

if TYPE_CHECKING:
    from serving.deploy import Deployment

__all__ = [
    "GOALS",
    "INDEX_GOAL",
    "RAW_ROW_BYTES_GOAL",
    "REPORT_KEYS",
    "RUN_KEYS",
    "WORKLOADS",
    "bench_config",
    "build_report",
    "format_table",
    "in_process_trainer",
    "main",
    "run_in_process",
    "run_peer_baselines",
    "run_table_figures",
    "torchrec_config",
    "torchrec_workload",
    "write_peer_stream",
    "write_report",
]

WORKLOADS = ("default", "torchrec")
"""``--workload`` choices: the configured model, or issue 12's TorchRec CPU job."""

GOALS = {"ps_vs_torchrec": 1.0, "twin_vs_plain": 0.8}
"""Issue 12's targets on the ``torchrec`` workload: PS events/s over TorchRec CPU's, and the
in-process twin's over the plain gather + ``index_add_`` baseline's (2 threads, as the issue
measured it); reported, never asserted by a test."""

REPORT_KEYS = ("bench", "date", "machine", "workload", "config", "in_process", "ps", "ratios", "peers",
               "peer_ratios", "goals", "rank_latency", "default_model", "table_figures")
"""Top-level keys of ``train_throughput.json``, in order (``default_model`` and
``table_figures`` are empty unless the ``torchrec`` workload ran them)."""

RAW_ROW_BYTES_GOAL = 1.3
"""Issue 11's target: a table's bytes per row at 1,000,000 rows within 1.3x its raw row +
optimizer state (reported, never asserted by a test)."""

INDEX_GOAL = 10.0
"""Issue 11's target: ``ps.index.KeyIndex`` keys/s at least 10x the dict index's, batches of
20,480 keys at 1,000,000 keys (reported, never asserted by a test)."""

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
    first/last tenth of batches, nats) and ``rows`` (rows per table). Torch uses
    ``trainer.torch_threads`` threads (1 by default), as a trainer actor does. Pass
    ``trainer`` to inspect it afterwards.
    """
    from tqdm import tqdm

    if cfg.stream.kind == StreamKind.INGEST:
        raise ValueError("stream.kind: the benchmark needs a replayable source, not 'ingest'")
    threads = torch.get_num_threads()  # before a Trainer sets its own count
    t = trainer if trainer is not None else in_process_trainer(cfg)
    torch.set_num_threads(t.cfg.trainer.torch_threads)  # a given trainer may predate another's count
    total = t.max_events if t.max_events is not None else next(iter(t.sources.values())).end_offset
    per_event: list[float] = []
    try:
        t0, c0, s0 = time.perf_counter(), time.process_time(), tree_cpu_s()
        with tqdm(total=total, unit="ev", desc="in-process", disable=not progress, dynamic_ncols=True) as bar:
            def on_batch(events: int, loss: float) -> None:
                if events:
                    per_event.append(loss / events)
                bar.update(t.events_read - bar.n)

            # One run: a batch read ahead (trainer.staleness) stays read ahead, as in the actor.
            t.run(on_batch=on_batch)
            bar.update(t.events_read - bar.n)
        wall, cpu, s1 = time.perf_counter() - t0, time.process_time() - c0, tree_cpu_s()
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
        "system_cpu_s": cpu_between(s0, s1),
        "loss_sum": float(t.metrics["loss_sum"]),
        "loss_first": float(np.mean(per_event[:tenth])) if per_event else None,
        "loss_last": float(np.mean(per_event[-tenth:])) if per_event else None,
        "rows": rows,
        "device": str(t.device),
    }


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most events/s, with every round's figure under ``all_events_per_s``
    (one run: itself, with that one figure), as the peers report theirs."""
    best = dict(max(runs, key=lambda r: r["events_per_s"]))
    best["all_events_per_s"] = [x for r in runs for x in r.get("all_events_per_s", [r["events_per_s"]])]
    return best


def merge_peer_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`run_peer_baselines` results of several rounds as one: each peer's fastest run."""
    labels = dict.fromkeys(label for r in rounds for label in r["runs"])
    runs = {label: fastest([r["runs"][label] for r in rounds if label in r["runs"]]) for label in labels}
    return {**rounds[-1], "repeat": sum(r["repeat"] for r in rounds), "runs": runs}


# --------------------------------------------------------------------------- through the PS


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
    """:func:`cpu_between` split by :func:`_process_role`, largest first (seconds)."""
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
    label = f"PS prefetch={'on' if cfg.trainer.prefetch else 'off'} staleness={cfg.trainer.staleness}"
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    ref = trainer.run.remote()
    with tqdm(total=total, unit="ev", desc=label, disable=not progress, dynamic_ncols=True) as bar:
        while not ray.wait([ref], timeout=0.5)[0]:
            bar.update(ray.get(trainer.stats.remote())["events_read"] - bar.n)
        stats = ray.get(ref)  # re-raises a trainer failure
        wall = time.perf_counter() - t0
        cpu1 = tree_cpu_s()
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
        "staleness": cfg.trainer.staleness,
        "trainer_events_per_s": stats["events_per_s"],
        "system_cpu_s": cpu_between(cpu0, cpu1),
        "system_cpu_by_process": _cpu_by_role(cpu0, cpu1),
        "rows": shard_rows,
        "device": stats.get("device"),
    }, dep


# --------------------------------------------------------------------------- /rank latency


def _latency(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "n": len(a),
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


# --------------------------------------------------------------------------- TorchRec-like workload


def torchrec_workload(events: int, *, num_ids: int = 1_000_000, seed: int = 0):
    """Issue 12's TorchRec CPU job as a :class:`bench.peers.PeerWorkload`: ``num_ids``-ID
    user and item tables, dim 64, batch 4096, 4 uniform negatives, row-wise Adagrad (lr
    0.2 users, 0.05 items, as Freshet's defaults), L2 1e-4, Freshet's initial rows."""
    from bench.peers import PeerWorkload

    return PeerWorkload(num_ids=num_ids, dim=64, batch=4096, negatives=4, events=events, seed=seed, init="freshet")


def write_peer_stream(data, path: str | Path) -> Path:
    """The peers' events (``data``: :class:`bench.peers.PeerData`) as a Parquet stream file
    (``user_id``, ``item_id`` int64 as the peers' row IDs, ``timestamp`` 1 s apart), so
    Freshet trains on the very same (user, item) pairs in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(data.users)
    pq.write_table(pa.table({"user_id": data.users, "item_id": data.items,
                             "timestamp": 1.7e9 + np.arange(n, dtype=np.float64)}), path)
    return path


def torchrec_config(workload, stream_path: str | Path, config_path: str | None = None) -> FreshetConfig:
    """Freshet's config for :func:`torchrec_workload`: the Parquet stream of
    :func:`write_peer_stream`, one trainer, batch ``workload.batch``, one pass,
    ``workload.negatives`` negatives drawn uniformly (from the catalogue of items seen
    so far: Freshet never samples IDs it has no row for), no session context, no
    recent-popularity prior, dim ``workload.dim``, row-wise Adagrad with the peers'
    lr, eps and L2, and without Freshet's ``accumulator_decay`` in any table (their rule
    keeps the whole sum). What stays Freshet's own: the dim-1 item bias and the popularity counts
    (part of every Freshet model), and tables that hold rows only for IDs seen.
    """
    w = workload
    opt = {"kind": "rowwise_adagrad", "eps": w.eps, "accumulator_decay": 1.0}  # the peers' (FBGEMM's) rule
    return load_config(config_path, {
        "stream": {"kind": StreamKind.PARQUET.value, "path": str(stream_path), "num_events": w.events},
        "trainer": {"num_workers": 1, "batch_size": w.batch, "passes": 1},
        "model": {"num_negatives": w.negatives, "popularity_negative_fraction": 0.0, "context_table": None,
                  "recent_table": None, "l2": w.l2},
        "ps": {"seed": w.seed, "optimizer": {"accumulator_decay": 1.0}, "tables": {
            "user": {"dim": w.dim, "init_scale": w.init_scale, "optimizer": {**opt, "lr": w.lr_user}},
            "item": {"dim": w.dim, "init_scale": w.init_scale, "optimizer": {**opt, "lr": w.lr_item}},
        }},
    })


def run_peer_baselines(workload, peers: list[str], *, repeat: int = 1, progress: bool = True,
                       data=None) -> dict[str, Any]:
    """The peers on ``workload``: plain torch with 1 and 2 threads (always), TorchRec and
    FBGEMM with 2 threads (those in ``peers`` that are installed), each the fastest of
    ``repeat`` rounds (``data``: :func:`bench.peers.prepare` of ``workload``, if done already).
    Returns ``{"runs": {label: run}, "skipped": {peer: why}, "workload"}``."""
    from dataclasses import asdict

    from tqdm import tqdm

    from bench import peers as pr

    data = pr.prepare(workload) if data is None else data
    plan = [("plain", 1), ("plain", 2)] + [(p, 2) for p in peers if p != "plain"]
    skipped = {p: why for p in dict.fromkeys(p for p, _ in plan) if (why := pr.peer_missing(p)) is not None}
    plan = [(p, t) for p, t in plan if p not in skipped]
    runners = {"plain": pr.run_plain_torch, "torchrec": pr.run_torchrec, "fbgemm": pr.run_fbgemm_tbe}
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tqdm(total=len(plan) * repeat, unit="run", desc="peers", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(repeat):
            for p, threads in plan:
                label = f"{p} {threads}t"
                bar.set_postfix_str(label)
                load = loadavg_1m()
                r = runners[p](workload, threads, data=data)
                r["loadavg_1m"] = load
                rounds.setdefault(label, []).append(r)
                bar.update(1)
    runs = {label: fastest(rs) for label, rs in rounds.items()}
    return {"workload": asdict(workload), "repeat": repeat, "runs": runs, "skipped": skipped}


def _peer_ratios(in_process: dict[str, Any], ps_runs: dict[str, dict[str, Any]], peers: dict[str, Any]) -> dict:
    """``{freshet run: {peer run: freshet events/s / peer events/s}}``."""
    runs = {"in-process": in_process, **{f"PS {n}": r for n, r in ps_runs.items()}}
    return {name: {label: r["events_per_s"] / p["events_per_s"] for label, p in peers.get("runs", {}).items()}
            for name, r in runs.items()}


def _goals(in_process: dict[str, Any], ps_runs: dict[str, dict[str, Any]], peers: dict[str, Any]) -> dict:
    """Issue 12's goals (:data:`GOALS`) as measured in this run: value, target, met (None
    where a run needed for it is missing)."""
    runs = peers.get("runs", {})
    out: dict[str, Any] = {}
    # TorchRec trains each batch on rows that reflect every earlier batch: so do the exact
    # PS runs. A run with trainer.staleness is a different computation, reported apart.
    best_ps = max((r["events_per_s"] for r in ps_runs.values() if not r.get("staleness")), default=None)
    tr = runs.get("torchrec 2t")
    value = best_ps / tr["events_per_s"] if best_ps is not None and tr else None
    out["ps_vs_torchrec"] = {"value": value, "target": GOALS["ps_vs_torchrec"],
                             "met": None if value is None else value >= GOALS["ps_vs_torchrec"],
                             "against": "fastest exact PS run (staleness 0) / TorchRec CPU 2 threads"}
    stale = [r["events_per_s"] for r in ps_runs.values() if r.get("staleness")]
    if stale and tr:
        out["ps_staleness_1_vs_torchrec"] = {
            "value": max(stale) / tr["events_per_s"],
            "against": "PS with trainer.staleness 1 (a batch's pull may miss the previous batch's push) / TorchRec CPU 2 threads"}
    pl = runs.get("plain 2t")
    two = in_process.get("two_threads")
    twin, threads = (two, 2) if two else (in_process, 1)
    value = twin["events_per_s"] / pl["events_per_s"] if pl else None
    out["twin_vs_plain"] = {"value": value, "target": GOALS["twin_vs_plain"],
                            "met": None if value is None else value >= GOALS["twin_vs_plain"],
                            "against": f"in-process twin ({threads} torch thread{'s' if threads > 1 else ''}) / "
                                       "plain gather + index_add_ 2 threads"}
    pl1 = runs.get("plain 1t")
    if pl1:
        out["twin_vs_plain_1_thread"] = {"value": in_process["events_per_s"] / pl1["events_per_s"],
                                         "against": "in-process twin / plain 1 thread (same thread count)"}
    return out


# --------------------------------------------------------------------------- 1M-row table figures


def run_table_figures(rows: int = 1_000_000, *, dim: int = 64, batch: int = 4096, fill_batch: int = 20_480,
                      probes: int = 40, index_rounds: int = 10, seed: int = 0) -> dict[str, Any]:
    """Issue 11's table figures at ``rows`` rows, in process: one :class:`ps.shard.PSShard`
    whose ``item`` table is ``dim`` floats with row-wise Adagrad and ``max_rows: rows``
    (LRU), as in ``bench.id_churn``.

    1. ``fill``: ``rows`` new keys pushed as real interactions in batches of
       ``fill_batch`` (keys/s through ``PSShard.push``: index insert, initial rows,
       Adagrad update).
    2. ``memory``: the table's ``stats()`` at ``rows`` rows, its bytes per row over the raw
       row + optimizer state (goal :data:`RAW_ROW_BYTES_GOAL`), and the RSS this process
       grew by per row.
    3. ``pull`` / ``push`` / ``evict``: ``probes`` batches of ``batch`` keys each (the
       trainer's batch size): pulls of stored keys, pushes to stored keys, and pushes of
       new keys into the full table (each evicts as many LRU rows); keys per second.
    4. ``index``: ``bench.id_churn.run_index`` (``ps.index.KeyIndex`` against the dict
       index at ``rows`` keys, batches of ``fill_batch``, keys per CPU second), ratios to
       the dict (goal :data:`INDEX_GOAL`).

    The torch thread count is 1 while it runs (a shard actor's), and restored after.
    """
    import gc

    from bench.id_churn import _shard_config, rss_bytes, run_index
    from ps.ids import id_keys
    from ps.plan import ShardingPlan
    from ps.shard import PSShard, PushId

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gc.collect()
        rss0 = rss_bytes()
        shard = PSShard(0, ShardingPlan.uniform(1, 1), _shard_config(dim, rows, "lru"))
        table = shard.tables["item"]
        rng = np.random.default_rng(seed)
        grads = (rng.standard_normal((max(batch, fill_batch), dim)) * 0.01).astype(np.float32)
        keys = id_keys(np.arange(rows, dtype=np.int64))
        seq = 0
        t0 = time.perf_counter()
        for a in range(0, rows, fill_batch):
            k = keys[a:a + fill_batch]
            shard.push(PushId("table", seq), {"item": (k, grads[: len(k)], None, None)})
            seq += 1
        fill_s = time.perf_counter() - t0
        stats = table.stats()
        rss_per_row = (rss_bytes() - rss0) / max(stats["rows"], 1)

        def timed(op) -> float:
            spent = 0.0
            for _ in range(probes):
                t = time.perf_counter()
                op()
                spent += time.perf_counter() - t
            return probes * batch / max(spent, 1e-9)

        def pull() -> None:
            shard.pull({"item": keys[rng.integers(0, rows, batch)]})

        def push() -> None:
            nonlocal seq
            k = np.unique(keys[rng.integers(0, rows, batch)])
            shard.push(PushId("table", seq), {"item": (k, grads[: len(k)], None, None)})
            seq += 1

        fresh = iter(range(rows, rows + probes * batch, batch))

        def evict() -> None:
            nonlocal seq
            a = next(fresh)
            shard.push(PushId("table", seq), {"item": (id_keys(np.arange(a, a + batch, dtype=np.int64)),
                                                        grads[:batch], None, None)})
            seq += 1
            shard.removed("item", shard.version, "bench")  # a reader in step: tombstones stay pruned

        speeds = {"pull": timed(pull), "push": timed(push), "evict": timed(evict)}
        rows_after = len(table)
        shard = table = None  # free the rows before the index comparison
        gc.collect()
        index = run_index(rows, min(fill_batch, max(1, rows // 2)), index_rounds)  # a batch is a sample of the keys
    finally:
        torch.set_num_threads(threads)
    return {
        "rows": rows, "dim": dim, "optimizer": "rowwise_adagrad", "batch": batch, "fill_batch": fill_batch,
        "probes": probes,
        "fill": {"keys": rows, "wall_s": fill_s, "keys_per_s": rows / max(fill_s, 1e-9)},
        "memory": {**stats, "bytes_per_row_ratio": stats["bytes_per_row"] / stats["row_bytes"],
                   "rss_bytes_per_row": rss_per_row, "rss_bytes_per_row_ratio": rss_per_row / stats["row_bytes"],
                   "goal": RAW_ROW_BYTES_GOAL, "met": stats["bytes_per_row"] / stats["row_bytes"] <= RAW_ROW_BYTES_GOAL},
        "keys_per_s": speeds,
        "rows_after_evict": rows_after,
        "index": {**index, "goal": INDEX_GOAL,
                  "met": {op: r >= INDEX_GOAL for op, r in index["ratio_to_dict"].items()}},
    }


def _default_model(in_process: dict[str, Any], ps_runs: dict[str, dict[str, Any]], cfg: FreshetConfig) -> dict[str, Any]:
    """The default model's figures for the ``torchrec`` run's report: its twin and PS runs,
    PS / twin ratios, and what the model is (passes, negatives, context)."""
    m = cfg.model
    return {
        "model": {"passes": cfg.trainer.passes, "num_negatives": m.num_negatives, "context_table": m.context_table,
                  "recent_table": m.recent_table, "batch_size": cfg.trainer.batch_size, "stream": cfg.stream.kind.value,
                  "events": in_process["events"], "dim": cfg.ps.table(m.user_table).dim},
        "in_process": in_process,
        "ps": ps_runs,
        "ratios": {name: {k: v for k, v in _ratios(r, in_process).items()
                          if k in ("events_per_s", "loss_sum_rel_diff", "loss_vs_exact")} for name, r in ps_runs.items()},
    }


# --------------------------------------------------------------------------- report


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _ratios(run: dict[str, Any], in_process: dict[str, Any]) -> dict[str, Any]:
    """A PS run against the twin (see :func:`build_report`). A run with ``staleness`` is
    checked against the twin run with the same staleness (``in_process["staleness_1"]``),
    and its loss is also compared with the exact twin's (``loss_vs_exact``: signed, relative)."""
    out = {
        "events_per_s": run["events_per_s"] / max(in_process["events_per_s"], 1e-9),
        "overhead_ms_per_batch": run["ms_per_batch"] - in_process["ms_per_batch"],
        "cpu_per_event": _cpu_ratio(run, in_process),
        "loss_sum_rel_diff": _rel(run["loss_sum"], in_process["loss_sum"]),
    }
    if run.get("staleness"):
        twin = in_process.get(f"staleness_{run['staleness']}")
        out["loss_sum_rel_diff"] = _rel(run["loss_sum"], twin["loss_sum"]) if twin else None
        out["loss_vs_exact"] = (run["loss_sum"] - in_process["loss_sum"]) / max(abs(in_process["loss_sum"]), 1e-12)
    return out


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
    workload: str = "default",
    peers: dict[str, Any] | None = None,
    default_model: dict[str, Any] | None = None,
    table_figures: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: :data:`REPORT_KEYS`, with ratios PS/in-process per PS run, and
    with ``peers`` (:func:`run_peer_baselines`) each Freshet run's ratio to each peer
    (``peer_ratios``) and issue 12's goals (``goals``, see :data:`GOALS`);
    ``default_model`` (:func:`_default_model`) and ``table_figures``
    (:func:`run_table_figures`) as given, ``{}`` when not run.

    ``ratios[run]`` has ``events_per_s`` (PS events/s over in-process events/s),
    ``overhead_ms_per_batch`` (PS ms per batch minus in-process ms per batch),
    ``cpu_per_event`` (CPU seconds per event of all the PS run's processes over those of
    the in-process run; None when not measured) and
    ``loss_sum_rel_diff`` (|PS loss sum - in-process loss sum| / |in-process loss sum|:
    0 when both trained exactly the same computation, which they should). A PS run with
    ``staleness`` is compared with ``in_process["staleness_1"]`` (the twin with the same
    setting; ``loss_sum_rel_diff`` None without it) and has ``loss_vs_exact`` too: its loss
    sum minus the exact twin's, over the exact twin's (what the delay costs in training loss).
    """
    ratios = {name: _ratios(run, in_process) for name, run in ps_runs.items()}
    peers = peers or {}
    report = {
        "bench": bench or {},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine("torch", "numpy", "ray"),
        "workload": workload,
        "config": cfg.model_dump(mode="json"),
        "in_process": in_process,
        "ps": ps_runs,
        "ratios": ratios,
        "peers": peers,
        "peer_ratios": _peer_ratios(in_process, ps_runs, peers) if peers.get("runs") else {},
        "goals": _goals(in_process, ps_runs, peers) if peers.get("runs") else {},
        "rank_latency": rank_latency,
        "default_model": default_model or {},
        "table_figures": table_figures or {},
    }
    assert tuple(report) == REPORT_KEYS
    return report


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = report["rank_latency"]
    has_lat = "skipped" not in lat and lat
    dm = report.get("default_model") or {}
    panels = 1 + bool(has_lat) + bool(dm)
    fig, axes = plt.subplots(1, panels, figsize=(7.5 + 4.5 * (panels - 1), 4.2), squeeze=False)
    ax = axes[0][0]
    peer_runs = (report.get("peers") or {}).get("runs") or {}
    if peer_runs:
        _peer_chart(ax, report)
    else:
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
        ax.set_title(f"Training throughput ({report.get('workload', 'default')}), {report['in_process']['events']:,} events")
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
    if dm:
        ax = axes[0][-1]
        names = ["Freshet twin"] + [f"Freshet PS\n{n}" for n in dm["ps"]]
        values = [dm["in_process"]["events_per_s"]] + [r["events_per_s"] for r in dm["ps"].values()]
        bars = ax.bar(names, values, color=["#4c72b0"] + ["#dd8452"] * len(dm["ps"]))
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:,.0f}\n{v / max(values[0], 1e-9):.2f}x", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9)
        ax.set_ylabel("training events/s")
        ax.set_ylim(0, max(values) * 1.35)
        m = dm["model"]
        ax.set_title(f"default model: {m['passes']} passes x {m['num_negatives']} negatives"
                     f"{' + context' if m['context_table'] else ''}, {m['events']:,} events", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _peer_chart(ax, report: dict[str, Any]) -> None:
    """Events/s of every peer and Freshet run, with each one's ratio to TorchRec (or plain)."""
    peer_runs = report["peers"]["runs"]
    twins = {"Freshet\ntwin": report["in_process"]}
    if report["in_process"].get("two_threads"):
        twins = {"Freshet\ntwin 1t": report["in_process"], "Freshet\ntwin 2t": report["in_process"]["two_threads"]}
    # Two-line labels: nine bars' one-line names run into each other.
    names = [n.replace(" ", "\n", 1) for n in peer_runs] + list(twins) + ["PS\n" + n.replace(" ", "\n") for n in report["ps"]]
    values = [r["events_per_s"] for r in peer_runs.values()] + [r["events_per_s"] for r in twins.values()]
    values += [r["events_per_s"] for r in report["ps"].values()]
    colors = ["#8c8c8c"] * len(peer_runs) + ["#4c72b0"] * len(twins) + ["#dd8452"] * len(report["ps"])
    bars = ax.bar(names, values, color=colors)
    base_name = "torchrec 2t" if "torchrec 2t" in peer_runs else "plain 2t"
    base = peer_runs[base_name]["events_per_s"]
    for bar, v in zip(bars, values):
        ax.annotate(f"{v / 1000:,.0f}k\n{v / base:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel("training events/s")
    ax.set_ylim(0, max(values) * 1.3)
    ax.tick_params(axis="x", labelsize=8)
    w = report["peers"].get("workload", {})
    shards = report.get("config", {}).get("ps", {}).get("num_shards")
    ax.set_title(f"{report.get('workload')} workload: {report['in_process']['events']:,} events, batch {w.get('batch')}, "
                 f"{w.get('negatives')} negatives, {shards} PS shard{'s' if shards != 1 else ''} "
                 f"(ratios to {base_name})", fontsize=9)


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train_throughput.json`` and ``train_throughput.png`` into ``out_dir``
    (``train_throughput_<workload>.*`` for a workload other than the default); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_throughput" if report.get("workload", "default") == "default" else f"train_throughput_{report['workload']}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    _chart(report, png_path)
    return json_path, png_path


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(wi) if i == 0 else c.rjust(wi) for i, (c, wi) in enumerate(zip(r, w))) for r in rows]
    out.insert(1, "-" * len(out[0]))
    return out


def _format_extras(report: dict[str, Any]) -> list[str]:
    """The default model's and the 1M-row table's lines (none when they were not run)."""
    lines: list[str] = []
    dm = report.get("default_model") or {}
    if dm:
        m = dm["model"]
        lines += ["", (f"default model ({m['passes']} passes x {m['num_negatives']} negatives, context "
                       f"{'on' if m['context_table'] else 'off'}, batch {m['batch_size']}, {m['stream']} stream, "
                       f"{m['events']:,} events)")]
        rows = [("run", "events/s", "ms/batch", "vs in-process", "loss sum")]
        ip = dm["in_process"]
        rows.append(("in-process (no Ray)", f"{ip['events_per_s']:,.0f}", f"{ip['ms_per_batch']:.2f}", "1.00x",
                     f"{ip['loss_sum']:,.1f}"))
        for name, r in dm["ps"].items():
            rows.append((f"PS, {name}", f"{r['events_per_s']:,.0f}", f"{r['ms_per_batch']:.2f}",
                         f"{dm['ratios'][name]['events_per_s']:.2f}x", f"{r['loss_sum']:,.1f}"))
        lines += _aligned(rows)
        for name, r in dm["ratios"].items():
            if "loss_vs_exact" in r:
                lines.append(f"PS, {name}: loss sum {r['loss_vs_exact']:+.2%} against the exact twin's")
    tf = report.get("table_figures") or {}
    if tf:
        mem, ix = tf["memory"], tf["index"]
        lines += ["", f"{tf['rows']:,}-row table (item, dim {tf['dim']}, row-wise Adagrad, one in-process shard)"]
        rows = [("figure", "value", "goal")]
        rows.append(("bytes/row (table arrays)", f"{mem['bytes_per_row']:.1f}", ""))
        rows.append(("  / raw row + state bytes", f"{mem['bytes_per_row_ratio']:.3f}x",
                     f"<= {mem['goal']}x: {'met' if mem['met'] else 'NOT met'}"))
        rows.append(("RSS growth / row", f"{mem['rss_bytes_per_row']:.1f}", f"{mem['rss_bytes_per_row_ratio']:.3f}x raw"))
        rows.append((f"fill: push new keys ({tf['fill_batch']:,}/push), keys/s", f"{tf['fill']['keys_per_s']:,.0f}", ""))
        for op, what in (("pull", "pull stored keys"), ("push", "push to stored keys"), ("evict", "push new keys, evicting")):
            rows.append((f"{what} ({tf['batch']:,}/call), keys/s", f"{tf['keys_per_s'][op]:,.0f}", ""))
        r, q = ix["keys_per_cpu_s"], ix["ratio_to_dict"]
        for op in ("lookup", "insert", "remove"):
            rows.append((f"KeyIndex {op} ({ix['batch']:,} keys), keys/CPU s", f"{r['KeyIndex'][op]:.3g}",
                         (f"{q[op]:.1f}x dict ({r['dict'][op]:.3g}); >= {ix['goal']:.0f}x: "
                          f"{'met' if ix['met'][op] else 'NOT met'}")))
        rows.append(("KeyIndex bytes/key", f"{r['KeyIndex']['bytes/key']:.1f}", f"dict {r['dict']['bytes/key']:.1f}"))
        lines += _aligned(rows)
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned plain text: throughput rows, then latency rows."""
    ip = report["in_process"]
    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [("run", "events/s", "ms/batch", "vs in-process", "overhead ms/batch", "system cpu s", "cpu/event",
             "train s", "loss sum")]
    rows.append(("in-process (no Ray)", f"{ip['events_per_s']:,.0f}", f"{ip['ms_per_batch']:.2f}", "1.00x", "-",
                 num(ip["system_cpu_s"], ".1f"), "1.00x", "-", f"{ip['loss_sum']:,.1f}"))
    if ip.get("two_threads"):
        two = ip["two_threads"]
        rows.append(("in-process, 2 torch threads", f"{two['events_per_s']:,.0f}", f"{two['ms_per_batch']:.2f}",
                     f"{two['events_per_s'] / max(ip['events_per_s'], 1e-9):.2f}x", "-", num(two["system_cpu_s"], ".1f"),
                     "-", "-", f"{two['loss_sum']:,.1f}"))
    for name, run in report["ps"].items():
        r = report["ratios"][name]
        rows.append((f"PS, {name}", f"{run['events_per_s']:,.0f}", f"{run['ms_per_batch']:.2f}",
                     f"{r['events_per_s']:.2f}x", f"{r['overhead_ms_per_batch']:+.2f}", num(run["system_cpu_s"], ".1f"),
                     num(r["cpu_per_event"], ".2f") + ("x" if r["cpu_per_event"] is not None else ""),
                     f"{run.get('train_s', 0.0):.1f}", f"{run['loss_sum']:,.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    rounds = {"in-process": ip, **({"in-process, 2 torch threads": ip["two_threads"]} if ip.get("two_threads") else {}),
              **{f"PS, {n}": r for n, r in report["ps"].items()}}
    if any(len(r.get("all_events_per_s", ())) > 1 for r in rounds.values()):
        lines.append("fastest of: " + "; ".join(f"{n} " + " / ".join(f"{x:,.0f}" for x in r["all_events_per_s"])
                                                for n, r in rounds.items() if r.get("all_events_per_s")))
    for name, r in report["ratios"].items():
        if "loss_vs_exact" in r:
            own = "n/a" if r["loss_sum_rel_diff"] is None else f"{r['loss_sum_rel_diff']:.1e}"
            lines.append(f"PS, {name}: loss sum {r['loss_vs_exact']:+.2%} against the exact twin's "
                         f"(relative difference from the twin with the same staleness: {own})")
    peer_runs = (report.get("peers") or {}).get("runs") or {}
    if peer_runs:
        prow = [("peer (same events)", "events/s", "ms/batch", "cpu s", "load 1m", "loss sum")]
        for label, r in peer_runs.items():
            load = r.get("loadavg_1m")
            prow.append((label, f"{r['events_per_s']:,.0f}", f"{1000.0 * r['wall_s'] / max(1, r['batches']):.2f}",
                         f"{r['cpu_s']:.1f}", "-" if load is None else f"{load:.2f}", f"{r['loss_sum']:,.1f}"))
        w = [max(len(r[i]) for r in prow) for i in range(len(prow[0]))]
        pl = ["  ".join(c.ljust(wi) if i == 0 else c.rjust(wi) for i, (c, wi) in enumerate(zip(r, w))) for r in prow]
        pl.insert(1, "-" * len(pl[0]))
        lines += [""] + pl
        for p, why in report["peers"].get("skipped", {}).items():
            lines.append(f"{p}: skipped ({why})")
        labels = list(peer_runs)
        rrow = [("freshet / peer", *labels)]
        for name, ratios in report["peer_ratios"].items():
            rrow.append((name, *(f"{ratios[lb]:.2f}x" for lb in labels)))
        w = [max(len(r[i]) for r in rrow) for i in range(len(rrow[0]))]
        rl = ["  ".join(c.ljust(wi) if i == 0 else c.rjust(wi) for i, (c, wi) in enumerate(zip(r, w))) for r in rrow]
        rl.insert(1, "-" * len(rl[0]))
        lines += [""] + rl
        for name, g in report.get("goals", {}).items():
            v = g.get("value")
            verdict = "not measured" if g.get("met") is None else "met" if g["met"] else "NOT met"
            target = f" (goal >= {g['target']:.2f}x: {verdict})" if "target" in g else ""
            lines.append(f"{name}: {'n/a' if v is None else f'{v:.2f}x'}{target}  [{g['against']}]")
    lines += _format_extras(report)
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


def _with_staleness(cfg: FreshetConfig, staleness: int) -> FreshetConfig:
    """``cfg`` with ``trainer.staleness`` set: 0 for the twin and every PS run but the stale
    one, whatever a ``--config`` says."""
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"staleness": staleness})})


def bench_config(events: int, config_path: str | None = None) -> FreshetConfig:
    """The benchmark's config: ``config_path`` (or defaults) with ``events`` events and one trainer."""
    if events < 1:
        raise ValueError(f"events: must be >= 1, got {events}")
    cfg = load_config(config_path, {"stream": {"num_events": events}, "trainer": {"num_workers": 1}})
    if cfg.stream.kind == StreamKind.INGEST:
        raise ValueError("stream.kind: the benchmark needs a replayable source (synthetic, movielens, parquet), not 'ingest'")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="default",
                   help="default: the configured model on the synthetic stream; torchrec: issue 12's TorchRec CPU job "
                        "beside the peers (bench.peers) on the same events")
    p.add_argument("--events", type=at_least(1), default=None,
                   help="stream events per run (default 30000; 200000 with --workload torchrec)")
    p.add_argument("--num-ids", type=at_least(1), default=1_000_000, help="torchrec workload: IDs per table (default 1e6)")
    p.add_argument("--peers", default="plain,torchrec,fbgemm",
                   help="torchrec workload: peers to run (plain always runs, with 1 and 2 threads)")
    p.add_argument("--peer-repeat", type=at_least(1), default=1, help="torchrec workload: rounds per peer, fastest kept")
    p.add_argument("--repeat", type=at_least(1), default=1,
                   help="rounds, each running the peers (--peer-repeat times), the twin and the PS in turn (fresh "
                        "Ray and shards), every run's fastest round kept: on a noisy machine a slow minute then "
                        "hurts every run alike")
    p.add_argument("--default-events", type=int, default=None,
                   help="torchrec workload: also run the default model (twin and PS, prefetch on) on this many "
                        "synthetic events (default 30000; 0 skips)")
    p.add_argument("--table-rows", type=int, default=None,
                   help="torchrec workload: also measure a table of this many rows (issue 11's figures; "
                        "default 1000000; 0 skips)")
    p.add_argument("--shards", type=at_least(1), default=None, help="PS shard actors (default: the config's ps.num_shards)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results/)")
    p.add_argument("--config", default=None, help="Freshet YAML config (default: built-in defaults, synthetic stream)")
    p.add_argument("--rank-requests", type=at_least(1), default=300, help="/rank requests for known users")
    p.add_argument("--unknown-requests", type=at_least(1), default=50, help="/rank requests for unknown users")
    p.add_argument("--healthz-requests", type=at_least(1), default=300, help="GET /healthz requests")
    p.add_argument("--no-serve", action="store_true", help="skip the /rank latency part")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    progress = not args.quiet
    torchrec = args.workload == "torchrec"
    if args.events is None:
        args.events = 200_000 if torchrec else 30_000
    if args.default_events is None:
        args.default_events = 30_000 if torchrec else 0
    if args.table_rows is None:
        args.table_rows = 1_000_000 if torchrec else 0
    if not torchrec:  # the default workload is the default model; table figures belong to the torchrec run
        args.default_events = args.table_rows = 0
    if args.default_events < 0 or args.table_rows < 0:
        print("train_throughput: --default-events and --table-rows must be >= 0", file=sys.stderr)
        return 2
    pid = os.getpid()
    ray_root = os.environ.get("RAY_TMPDIR", "/tmp")
    Path(ray_root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="frb", dir=ray_root))
    peers: dict[str, Any] = {}
    try:
        if torchrec:
            from bench import peers as peer_mod

            workload = torchrec_workload(args.events, num_ids=args.num_ids)
            t0 = time.perf_counter()
            data = peer_mod.prepare(workload)
            stream = write_peer_stream(data, work / "torchrec-events.parquet")
            print(f"train_throughput: prepared {args.events:,} events and 2 x {args.num_ids:,} x {workload.dim} rows "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
            cfg = _with_staleness(torchrec_config(workload, stream, args.config), 0)
            default_cfg = _with_staleness(bench_config(args.default_events, args.config), 0) if args.default_events else None
        else:
            cfg = _with_staleness(bench_config(args.events, args.config), 0)
        if args.shards is not None:
            cfg = cfg.model_copy(update={"ps": cfg.ps.model_copy(update={"num_shards": args.shards})})
            if torchrec and default_cfg is not None:
                default_cfg = default_cfg.model_copy(
                    update={"ps": default_cfg.ps.model_copy(update={"num_shards": args.shards})})
    except Exception as e:  # noqa: BLE001 - a bad config is a usage error, not a traceback
        print(f"train_throughput: {e}", file=sys.stderr)
        return 2
    bench = {k: getattr(args, k) for k in ("workload", "events", "shards", "rank_requests", "unknown_requests",
                                           "healthz_requests", "default_events", "table_rows", "repeat")}
    bench["ray_num_cpus"] = 2
    bench["loadavg_1m_start"] = loadavg_1m()
    bench["loadavg_1m"] = {"start": loadavg_1m()}
    print(f"train_throughput: {args.workload} workload, {cfg.stream.kind.value} stream, {args.events:,} events, "
          f"batch {cfg.trainer.batch_size}, {cfg.trainer.passes} pass(es) x {cfg.model.num_negatives} negatives, "
          f"dim {cfg.ps.table(cfg.model.user_table).dim}, context {'on' if cfg.model.context_table else 'off'}, "
          f"{cfg.ps.num_shards} shards, {os.cpu_count()} CPUs, load {bench['loadavg_1m_start'] or 0:.2f}", flush=True)

    import ray
    from ray import serve

    from serving import deploy

    if torchrec:
        wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
        two = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"torch_threads": 2})})
        args.no_serve = True  # /rank latency is the default workload's (and bench.serve_latency's) business
    peer_rounds: list[dict[str, Any]] = []
    twin_rounds: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    # The exact runs first and last; the last one stays up for serving.
    ps_plan = (("prefetch off", False, 0), ("staleness 1", True, 1), ("prefetch on", True, 0))
    ps_rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in ps_plan}
    stale_cfg = _with_staleness(cfg, 1)
    table_figures: dict[str, Any] = {}
    default_ip: dict[str, Any] | None = None
    default_ps: dict[str, dict[str, Any]] = {}
    latency: dict[str, Any] = {"skipped": "--no-serve" if not torchrec else "not run with --workload torchrec"} if args.no_serve else {}
    for r in range(args.repeat):
        last = r == args.repeat - 1
        # In each round the peers and the twin run first, while no Ray process competes for the CPUs.
        if torchrec:
            peer_rounds.append(run_peer_baselines(workload, wanted, repeat=args.peer_repeat, progress=progress, data=data))
            bench["loadavg_1m"]["after_peers"] = loadavg_1m()
        twin_rounds["1"].append(run_in_process(cfg, progress=progress))
        bench["loadavg_1m"]["after_in_process"] = loadavg_1m()
        if last:  # the loss the PS run with staleness 1 must match (deterministic: one run)
            stale_twin = run_in_process(stale_cfg, progress=progress)
        if torchrec:  # the twin at the plain baseline's and the peers' thread count too
            twin_rounds["2"].append(run_in_process(two, progress=progress))
            bench["loadavg_1m"]["after_in_process_2_threads"] = loadavg_1m()
        if last and torchrec and args.default_events:
            default_ip = run_in_process(default_cfg, progress=progress)
            bench["loadavg_1m"]["after_default_in_process"] = loadavg_1m()
            default_ip["staleness_1"] = run_in_process(_with_staleness(default_cfg, 1), progress=progress)
        if last and torchrec and args.table_rows:
            table_figures = run_table_figures(args.table_rows)
            bench["loadavg_1m"]["after_table_figures"] = loadavg_1m()

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(work / f"ray{r}"),
                 log_to_driver=False, configure_logging=False, _system_config=cfg.ray.system_config())
        try:
            dep = None
            for name, prefetch, staleness in ps_plan:
                tag = f"{'pf' if prefetch else 'nopf'}{staleness}"
                run_cfg = cfg.model_copy(update={
                    "namespace": f"frbench-{pid}-{tag}-{r}",
                    "trainer": cfg.trainer.model_copy(update={"prefetch": prefetch, "staleness": staleness}),
                    "ingest": cfg.ingest.model_copy(update={"dir": str(work / "data"), "state_dir": None}),
                    "serving": cfg.serving.model_copy(update={"host": "127.0.0.1", "port": free_port()}),
                })
                if dep is not None:
                    deploy.stop(dep.cfg, serving=False)
                run, dep = _run_ps(run_cfg, progress=progress)
                ps_rounds[name].append(run)
                bench["loadavg_1m"][f"after_ps_{tag}"] = loadavg_1m()
            if last and default_ip is not None:  # the default model through the PS, prefetch on (its default)
                for name, staleness in (("staleness 1", 1), ("prefetch on", 0)):
                    d_cfg = default_cfg.model_copy(update={
                        "namespace": f"frbench-{pid}-default{staleness}",
                        "trainer": default_cfg.trainer.model_copy(update={"prefetch": True, "staleness": staleness}),
                        "ingest": default_cfg.ingest.model_copy(update={"dir": str(work / f"data-default{staleness}"),
                                                                        "state_dir": None}),
                        "serving": default_cfg.serving.model_copy(update={"host": "127.0.0.1", "port": free_port()}),
                    })
                    deploy.stop(dep.cfg, serving=False)
                    default_ps[name], dep = _run_ps(d_cfg, progress=progress)
                    bench["loadavg_1m"][f"after_default_ps{staleness}"] = loadavg_1m()
            if last and not args.no_serve:
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
        bench["loadavg_1m"][f"round_{r}"] = loadavg_1m()

    peers = merge_peer_rounds(peer_rounds) if peer_rounds else {}
    in_process = fastest(twin_rounds["1"])
    if twin_rounds["2"]:
        in_process["two_threads"] = fastest(twin_rounds["2"])
    in_process["staleness_1"] = stale_twin
    ps_runs = {name: fastest(runs) for name, runs in ps_rounds.items()}
    bench["loadavg_1m"]["end"] = loadavg_1m()
    default_model = _default_model(default_ip, default_ps, default_cfg) if default_ip is not None else None
    report = build_report(cfg, in_process, ps_runs, latency, bench=bench, workload=args.workload, peers=peers,
                          default_model=default_model, table_figures=table_figures)
    json_path, png_path = write_report(report, args.out)
    print()
    print(format_table(report))
    diffs = [r["loss_sum_rel_diff"] for r in report["ratios"].values()]
    diffs += [r["loss_sum_rel_diff"] for r in (report["default_model"] or {}).get("ratios", {}).values()]
    if any(d is not None and d > 1e-4 for d in diffs):
        print("\nwarning: PS and in-process loss sums differ: the baseline no longer does the trainer's "
              "computation (negatives, init or update rule changed?)", file=sys.stderr)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
