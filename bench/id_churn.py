"""ID churn: one shard's memory and speed under an endless stream of new IDs, with a row cap.

``python -m bench.id_churn [--ids 10000000] [--max-rows 1000000] [--out DIR]`` runs, in order:

1. **Stream** (in process, no Ray): one :class:`ps.shard.PSShard` whose ``item`` table is
   ``--dim`` 64 floats with row-wise Adagrad (raw row + optimizer state: 64 x 4 + 4 = 260
   bytes) and ``max_rows: --max-rows`` with ``--eviction`` (LRU). Batches of ``--batch``
   keys are pushed as real interactions: ``--new-fraction`` of each batch are IDs never
   seen before, until ``--ids`` distinct IDs have been streamed; the rest re-occur with
   Zipf(``--zipf``) skew over the IDs seen so far (rank r is the r-th oldest ID, so the
   early IDs are the hot ones and stay). Each ID is hashed once to its 64-bit key
   (``ps.ids.id_keys``), as an event batch carries it. A reader (standing in for a Serve
   replica's mirror) asks for removals every ``--sync-every`` batches, so tombstones are
   pruned to its lag as in a deployment. Sampled over the stream: the process's RSS, the
   table's own bytes, rows and tombstones.
2. **Index** (in process): ``bench.index_compare.run``: ``ps.index.KeyIndex`` against the
   dict index a table used before, at ``--index-rows`` keys and batches of ``--batch``:
   lookup, insert and remove (evict) keys per CPU second.
3. **Through Ray** (``--ray-ids`` > 0): a shard actor capped at ``--ray-max-rows``, fed
   by ``PSClient.push_many`` in the same batches; the actor's RSS is read from
   ``/proc/<pid>/status`` between pushes.

It prints a table and writes ``<out>/churn.json`` and ``<out>/churn.png`` (RSS over the
stream). The machine's load average is recorded at the start and the end: on a shared
machine the speeds move with it; memory does not.

Goals (issue 11): RSS flat once the cap is reached; table bytes per row at the cap within
1.3x the raw row + optimizer state; KeyIndex at least 10x the dict's keys per second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import at_least, fraction, machine, ray_temp_dir
from ps.ids import Keyed, id_keys
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from serving.config import RayConfig, load_config

__all__ = ["REPORT_KEYS", "format_table", "main", "run_index", "run_ray", "run_stream", "stream_batches", "write_report"]

REPORT_KEYS = ("bench", "date", "machine", "config", "stream", "index", "ray")
"""Top-level keys of ``churn.json``, in order."""

RAW_ROW_BYTES_NOTE = "row floats x 4 + row-wise Adagrad state (1 float) x 4"
_MB = float(1 << 20)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` (bytes), from ``/proc/<pid>/status`` (Linux).

    Raises:
        OSError: the process (or ``/proc``) is not there.
    """
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/status has no VmRSS line")


def rss_parts(pid: int | str = "self") -> dict[str, int]:
    """``{"rss", "anon", "file", "shmem"}`` bytes of process ``pid`` from ``/proc/<pid>/status``
    (``shmem`` holds the pages of Ray's object store a Ray worker has mapped)."""
    names = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out = dict.fromkeys(names.values(), 0)
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key = names.get(line.split(":", 1)[0] + ":")
            if key is not None:
                out[key] = int(line.split()[1]) * 1024
    return out


def _trimmed_rss() -> int | None:
    """RSS (bytes) after asking glibc to give free heap memory back (``malloc_trim(0)``);
    None where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_bytes()


def stream_batches(ids: int, batch: int, new_fraction: float, zipf_a: float, seed: int = 0
                   ) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of ``uint64`` keys (``[batch]``, the last one shorter) until ``ids`` distinct
    IDs have appeared; yields ``(keys, distinct IDs so far)``.

    IDs are the integers ``0, 1, 2, ...`` in order of first appearance, keyed with
    ``ps.ids.id_keys``. Each batch holds ``round(batch * new_fraction)`` new IDs and, for
    the rest, re-occurrences of ID ``(r - 1) mod seen`` with ``r ~ Zipf(zipf_a)``.

    Raises:
        ValueError: ``new_fraction`` is not in (0, 1], or ``ids`` or ``batch`` is below 1.
    """
    if not 0 < new_fraction <= 1:
        raise ValueError(f"new_fraction must be in (0, 1], got {new_fraction}")
    if ids < 1 or batch < 1:
        raise ValueError(f"ids and batch must be >= 1, got {ids} and {batch}")
    rng = np.random.default_rng(seed)
    per = max(1, round(batch * new_fraction))
    seen = 0
    while seen < ids:
        n_new = min(per, ids - seen)
        n_again = 0 if seen == 0 else round(n_new * (1 - new_fraction) / new_fraction)
        new = np.arange(seen, seen + n_new, dtype=np.int64)
        again = (rng.zipf(zipf_a, n_again).astype(np.int64) - 1) % max(seen, 1)
        seen += n_new
        yield id_keys(np.concatenate([new, again])), seen


def _shard_config(dim: int, max_rows: int, eviction: str, num_buckets: int = 1):
    """One shard's config: ``item`` (``dim`` floats, row-wise Adagrad) capped at ``max_rows``."""
    return load_config(overrides={"ps": {
        "num_shards": 1, "num_buckets": num_buckets,
        # The other default tables stay empty; user rows must match the item width.
        "tables": {"item": {"dim": dim, "max_rows": max_rows, "eviction": eviction}, "user": {"dim": dim}},
        "optimizer": {"kind": "rowwise_adagrad"},
    }}).ps


def _breakdown(t) -> dict[str, float]:
    """Bytes per live row of each part of an ``EmbeddingTable`` (capacity slack included)."""
    n = max(len(t), 1)
    parts = {
        "rows": t.rows.nbytes, "optimizer_state": t.state.nbytes, "index": t.index.nbytes(),
        "keys": t.keys.nbytes, "ids": t.ids.nbytes, "changed_at": t.changed_at.nbytes,
        "touched_at": t.touched_at.nbytes, "score": t.score.nbytes, "live": t.live.nbytes,
        "free_list": t._free.nbytes, "tombstones": 16 * t.tombstones(),
        "admission": t.admission.counts.nbytes if t.admission is not None else 0,
    }
    return {k: v / n for k, v in parts.items()}


def _flatness(ids: np.ndarray, rss: np.ndarray, at: int) -> dict[str, float | None]:
    """RSS (MB) after sample ``at`` (the cap reached): its growth over the value at the cap,
    and the fitted slope over all samples after the cap and over their second half (a
    plateau reached late shows as a slope near 0 there)."""
    after_ids, after = ids[at:], rss[at:]
    if len(after) < 4:
        return {"rss_at_cap_mb": float(rss[at]) if len(rss) else None, "rss_max_after_cap_mb": None,
                "rss_end_mb": float(rss[-1]) if len(rss) else None, "growth_after_cap_pct": None,
                "slope_mb_per_million_ids": None, "slope_last_half_mb_per_million_ids": None}
    half = len(after) // 2
    return {
        "rss_at_cap_mb": float(after[0]),
        "rss_max_after_cap_mb": float(after.max()),
        "rss_end_mb": float(after[-1]),
        "growth_after_cap_pct": float(100.0 * (after.max() - after[0]) / after[0]),
        "slope_mb_per_million_ids": float(np.polyfit(after_ids / 1e6, after, 1)[0]),
        "slope_last_half_mb_per_million_ids": float(np.polyfit(after_ids[half:] / 1e6, after[half:], 1)[0]),
    }


def run_stream(ids: int, max_rows: int, *, batch: int = 20_480, dim: int = 64, new_fraction: float = 0.5,
               zipf_a: float = 1.1, eviction: str = "lru", sync_every: int = 1, samples: int = 400,
               seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Part 1: stream ``ids`` distinct IDs into one in-process shard capped at ``max_rows``.

    Returns a dict: ``samples`` (``ids``, ``rows``, ``rss_mb``, ``table_mb``,
    ``tombstones``, ``t_s`` lists, one entry per sample), the table's ``stats()``
    (``bytes_per_row`` at the end), ``bytes_per_row_ratio`` (÷ raw row + state bytes),
    ``rss_bytes_per_row`` (RSS above the pre-shard baseline ÷ rows), ``breakdown``
    (bytes per row by part), ``flat`` (see :func:`_flatness`), pushes, keys pushed,
    ``keys_per_s`` (push wall clock) and removals seen by the reader.
    """
    from tqdm import tqdm

    torch.set_num_threads(1)  # a shard actor computes on one thread
    baseline = rss_bytes()
    cfg = _shard_config(dim, max_rows, eviction)
    shard = PSShard(0, ShardingPlan.uniform(1, 1), cfg)
    table = shard.tables["item"]
    rng = np.random.default_rng(seed + 1)
    grads = (rng.standard_normal((batch, dim)) * 0.01).astype(np.float32)
    n_batches = -(-ids // max(1, round(batch * new_fraction)))
    every = max(1, n_batches // max(1, samples))
    series: dict[str, list] = {k: [] for k in ("ids", "rows", "rss_mb", "table_mb", "tombstones", "t_s")}
    since, removed_seen, pushed, push_s, cpu0 = 0, 0, 0, 0.0, time.process_time()
    t_start = time.perf_counter()
    bar = tqdm(total=ids, unit="id", unit_scale=True, desc="stream", disable=not progress, mininterval=1.0)
    b = 0
    for keys, seen in stream_batches(ids, batch, new_fraction, zipf_a, seed):
        g = grads[: len(keys)] if len(keys) <= batch else np.resize(grads, (len(keys), dim))
        t0 = time.perf_counter()
        shard.push(PushId("bench", b), {"item": (keys, g, None, None)})
        push_s += time.perf_counter() - t0
        pushed += len(keys)
        if sync_every and b % sync_every == 0:
            v, gone, _ = shard.removed("item", since, "mirror")
            since, removed_seen = v, removed_seen + len(gone)
        if b % every == 0 or seen == ids:
            series["ids"].append(seen)
            series["rows"].append(len(table))
            series["rss_mb"].append(rss_bytes() / _MB)
            series["table_mb"].append(table.nbytes() / _MB)
            series["tombstones"].append(table.tombstones())
            series["t_s"].append(time.perf_counter() - t_start)
        bar.update(seen - bar.n)
        b += 1
    bar.close()
    stats = table.stats()
    rows = np.asarray(series["rows"])
    capped = np.flatnonzero(rows >= max_rows)
    at = int(capped[0]) if capped.size else len(rows) - 1
    rss_end = rss_bytes()
    trimmed = _trimmed_rss()
    return {
        "samples": series,
        "table": stats,
        "raw_row_bytes": stats["row_bytes"],
        "bytes_per_row_ratio": (stats["bytes_per_row"] / stats["row_bytes"]) if stats["bytes_per_row"] else None,
        "rss_baseline_mb": baseline / _MB,
        "rss_bytes_per_row": (rss_end - baseline) / max(len(table), 1),
        "rss_bytes_per_row_ratio": (rss_end - baseline) / max(len(table), 1) / stats["row_bytes"],
        # What of that is free heap kept by the allocator (growth copies, push temporaries).
        "rss_trimmed_bytes_per_row": None if trimmed is None else (trimmed - baseline) / max(len(table), 1),
        "breakdown": _breakdown(table),
        "cap_reached_at_ids": int(series["ids"][at]) if capped.size else None,
        "flat": _flatness(np.asarray(series["ids"], float), np.asarray(series["rss_mb"]), at),
        "pushes": b,
        "keys_pushed": pushed,
        "push_wall_s": push_s,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu0,
        "keys_per_s": pushed / max(push_s, 1e-9),
        "removals_seen_by_reader": removed_seen,
    }


def run_index(rows: int, batch: int, rounds: int) -> dict[str, Any]:
    """Part 2: :func:`bench.index_compare.run`, with each KeyIndex figure's ratio to the dict's."""
    from bench.index_compare import run

    res = run(rows, batch, rounds)
    ratios = {op: res["KeyIndex"][op] / res["dict"][op] for op in ("lookup", "insert", "remove")}
    return {"rows": rows, "batch": batch, "rounds": rounds, "keys_per_cpu_s": res, "ratio_to_dict": ratios}


def run_ray(ids: int, max_rows: int, *, batch: int = 20_480, dim: int = 64, new_fraction: float = 0.5,
            zipf_a: float = 1.1, eviction: str = "lru", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Part 3: the same stream through a shard actor on a local Ray started here (2 CPUs,
    127.0.0.1, temp dir under ``$RAY_TMPDIR``) and shut down at the end. Returns the actor's
    RSS samples (``ids``, ``rows``, ``rss_mb``), ``flat``, ``keys_per_s`` (wall clock of
    the pushes, Ray transfer included) and the table's ``stats()``."""
    import ray
    from tqdm import tqdm

    from ps.client import start_shards

    tmp = ray_temp_dir("frch")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
             log_to_driver=False, configure_logging=False, _system_config=RayConfig().system_config())
    try:
        cfg = _shard_config(dim, max_rows, eviction, num_buckets=8)
        client = start_shards(cfg, namespace=f"bench-churn-{uuid.uuid4().hex[:6]}")
        shard = client.shards[0]
        pid = ray.get(shard.pid.remote())
        rng = np.random.default_rng(seed + 1)
        grads = (rng.standard_normal((batch, dim)) * 0.01).astype(np.float32)
        series: dict[str, list] = {"ids": [], "rows": [], "rss_mb": [], "anon_mb": [], "shmem_mb": []}
        n_batches = -(-ids // max(1, round(batch * new_fraction)))
        every = max(1, n_batches // 200)
        since, pushed, t_push = 0, 0, 0.0
        bar = tqdm(total=ids, unit="id", unit_scale=True, desc="ray", disable=not progress, mininterval=1.0)
        for b, (keys, seen) in enumerate(stream_batches(ids, batch, new_fraction, zipf_a, seed)):
            g = grads[: len(keys)] if len(keys) <= batch else np.resize(grads, (len(keys), dim))
            t0 = time.perf_counter()
            client.push_many({"item": (Keyed(keys), g)}, PushId("bench", b))
            t_push += time.perf_counter() - t0
            pushed += len(keys)
            since = client.removed("item", [since], "mirror")[0][0]
            if b % every == 0 or seen == ids:
                st = ray.get(shard.stats.remote())
                series["ids"].append(seen)
                series["rows"].append(st["rows"]["item"])
                mem = rss_parts(pid)
                series["rss_mb"].append(mem["rss"] / _MB)
                series["anon_mb"].append(mem["anon"] / _MB)
                series["shmem_mb"].append(mem["shmem"] / _MB)
            bar.update(seen - bar.n)
        bar.close()
        stats = ray.get(shard.stats.remote())["tables"]["item"]
        for h in client.shards:
            ray.kill(h)
    finally:
        ray.shutdown()
    rows = np.asarray(series["rows"])
    capped = np.flatnonzero(rows >= max_rows)
    at = int(capped[0]) if capped.size else len(rows) - 1
    return {
        "ids": ids, "max_rows": max_rows, "samples": series, "table": stats,
        "cap_reached_at_ids": int(series["ids"][at]) if capped.size else None,
        "flat": _flatness(np.asarray(series["ids"], float), np.asarray(series["rss_mb"]), at),
        "flat_anon": _flatness(np.asarray(series["ids"], float), np.asarray(series["anon_mb"]), at),
        "keys_pushed": pushed, "push_wall_s": t_push, "keys_per_s": pushed / max(t_push, 1e-9),
    }


# --------------------------------------------------------------------------- report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (one line per figure, with its goal where it has one)."""
    lines = []
    s, cfg = report.get("stream"), report["config"]
    m = report["machine"]
    lines.append(f"id_churn: {cfg['ids']:,} distinct IDs, max_rows {cfg['max_rows']:,}, batch {cfg['batch']:,}, "
                 f"dim {cfg['dim']}, {cfg['eviction']}; load avg {m['loadavg_start']} -> {m['loadavg_end']} "
                 f"on {m['usable_cpus']} CPUs")
    lines.append(f"{'figure':46s}{'value':>18s}  goal")

    def row(name: str, value: str, goal: str = "") -> None:
        lines.append(f"{name:46s}{value:>18s}  {goal}")

    if s:
        f = s["flat"]
        row("keys pushed (events)", f"{s['keys_pushed']:,}")
        row("rows at the end", f"{s['table']['rows']:,}")
        row("push throughput (keys/s, wall)", f"{s['keys_per_s']:,.0f}")
        row("table bytes/row at the cap", f"{s['table']['bytes_per_row']:.1f}")
        row("  / raw row + state bytes", f"{s['bytes_per_row_ratio']:.3f}x", "<= 1.3x")
        row("RSS above baseline / row", f"{s['rss_bytes_per_row']:.1f}")
        row("  / raw row + state bytes", f"{s['rss_bytes_per_row_ratio']:.3f}x")
        if s.get("rss_trimmed_bytes_per_row") is not None:
            row("RSS above baseline / row after malloc_trim", f"{s['rss_trimmed_bytes_per_row']:.1f}",
                f"{s['rss_trimmed_bytes_per_row'] / s['raw_row_bytes']:.3f}x raw")
        row("cap reached at (distinct IDs)", f"{s['cap_reached_at_ids'] or 0:,}")
        row("RSS at the cap (MB)", f"{f['rss_at_cap_mb']:.1f}" if f["rss_at_cap_mb"] is not None else "-")
        row("RSS max after the cap (MB)", f"{f['rss_max_after_cap_mb']:.1f}" if f["rss_max_after_cap_mb"] is not None else "-")
        row("RSS growth after the cap (%)", f"{f['growth_after_cap_pct']:.2f}" if f["growth_after_cap_pct"] is not None else "-", "flat")
        row("RSS slope after the cap (MB / 1M IDs)", f"{f['slope_mb_per_million_ids']:.3f}"
            if f["slope_mb_per_million_ids"] is not None else "-", "~0")
        row("  over its second half", f"{f['slope_last_half_mb_per_million_ids']:.3f}"
            if f["slope_last_half_mb_per_million_ids"] is not None else "-", "~0")
        row("tombstones at the end", f"{s['table']['tombstones']:,}")
        for part, v in s["breakdown"].items():
            if v:
                row(f"  bytes/row: {part}", f"{v:.2f}")
    ix = report.get("index")
    if ix:
        r, q = ix["keys_per_cpu_s"], ix["ratio_to_dict"]
        for op in ("lookup", "insert", "remove"):
            row(f"KeyIndex {op} at {ix['rows']:,} keys (keys/CPU s)",
                f"{r['KeyIndex'][op]:.3g}", f"{q[op]:.1f}x dict ({r['dict'][op]:.3g}); goal >= 10x")
        row("KeyIndex bytes/key (dict)", f"{r['KeyIndex']['bytes/key']:.1f}", f"dict {r['dict']['bytes/key']:.1f}")
    ray_part = report.get("ray")
    if ray_part and "flat" in ray_part:
        f = ray_part["flat"]
        row(f"Ray shard: keys/s ({ray_part['ids']:,} IDs, cap {ray_part['max_rows']:,})", f"{ray_part['keys_per_s']:,.0f}")
        a = ray_part["flat_anon"]
        if f["rss_max_after_cap_mb"] is not None:
            row("Ray shard: RSS at the cap -> max -> end (MB)",
                f"{f['rss_at_cap_mb']:.0f} -> {f['rss_max_after_cap_mb']:.0f} -> {f['rss_end_mb']:.0f}", "flat")
            row("  slope over the second half (MB / 1M IDs)", f"{f['slope_last_half_mb_per_million_ids']:.2f}", "~0")
            row("  anonymous memory: at the cap -> end (MB)", f"{a['rss_at_cap_mb']:.0f} -> {a['rss_end_mb']:.0f}")
        row("Ray shard: table bytes/row", f"{ray_part['table']['bytes_per_row']:.1f}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``churn.json`` and ``churn.png`` (RSS and table bytes over the stream; rows on a
    second axis; the Ray shard's RSS in a second panel when measured) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "churn.json", out / "churn.png"
    jpath.write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    panels = [("stream", "in process: one shard")] + ([("ray", "through Ray: shard actor")] if report.get("ray") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        part = report.get(key)
        if not part or "samples" not in part:
            continue
        smp = part["samples"]
        x = np.asarray(smp["ids"], float) / 1e6
        ax.plot(x, smp["rss_mb"], label="process RSS (MB)", color="tab:blue")
        if "table_mb" in smp:
            ax.plot(x, smp["table_mb"], label="table bytes (MB)", color="tab:green")
        if "anon_mb" in smp:
            ax.plot(x, smp["anon_mb"], label="anonymous RSS (MB)", color="tab:green")
            ax.plot(x, smp["shmem_mb"], label="object-store pages in RSS (MB)", color="tab:purple")
        if part.get("cap_reached_at_ids"):
            ax.axvline(part["cap_reached_at_ids"] / 1e6, color="grey", ls=":", label="max_rows reached")
        ax.set_xlabel("distinct IDs streamed (millions)")
        ax.set_ylabel("MB")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(x, np.asarray(smp["rows"]) / 1e6, color="tab:orange", ls="--", label="rows (millions)")
        ax2.set_ylabel("rows (millions)")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(ppath, dpi=110)
    plt.close(fig)
    return jpath, ppath


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.id_churn", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ids", type=at_least(1), default=10_000_000, help="distinct IDs to stream (IDs)")
    ap.add_argument("--max-rows", type=at_least(1), default=1_000_000, help="the item table's cap (rows per shard)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/id_churn"), help="directory for churn.json and churn.png")
    ap.add_argument("--batch", type=at_least(1), default=20_480, help="keys per push (keys)")
    ap.add_argument("--dim", type=at_least(1), default=64, help="row width (floats)")
    ap.add_argument("--new-fraction", type=fraction(zero=False), default=0.5, help="share of each batch that is new IDs")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of re-occurrences")
    ap.add_argument("--eviction", choices=("lru", "lfu"), default="lru")
    ap.add_argument("--sync-every", type=at_least(0), default=1, help="batches between the reader's removal syncs (0: no reader)")
    ap.add_argument("--index-rows", type=at_least(0), default=None, help="keys in the index comparison (default: --max-rows; 0 skips)")
    ap.add_argument("--index-rounds", type=at_least(1), default=20, help="churn rounds of the index comparison")
    ap.add_argument("--ray-ids", type=at_least(0), default=1_000_000, help="distinct IDs through a Ray shard actor (0 skips)")
    ap.add_argument("--ray-max-rows", type=at_least(1), default=100_000, help="the Ray shard's cap (rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    index_rows = args.max_rows if args.index_rows is None else args.index_rows
    host = machine("numpy", "torch", "ray")
    host["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    config = {k: getattr(args, k) for k in ("ids", "max_rows", "batch", "dim", "new_fraction", "zipf", "eviction",
                                            "sync_every", "index_rounds", "ray_ids", "ray_max_rows", "seed")}
    config["index_rows"] = index_rows
    t0 = time.perf_counter()
    stream = run_stream(args.ids, args.max_rows, batch=args.batch, dim=args.dim, new_fraction=args.new_fraction,
                        zipf_a=args.zipf, eviction=args.eviction, sync_every=args.sync_every, seed=args.seed,
                        progress=not args.quiet)
    index = run_index(index_rows, args.batch, args.index_rounds) if index_rows else None
    ray_part = None
    if args.ray_ids:
        ray_part = run_ray(args.ray_ids, args.ray_max_rows, batch=args.batch, dim=args.dim,
                           new_fraction=args.new_fraction, zipf_a=args.zipf, eviction=args.eviction, seed=args.seed,
                           progress=not args.quiet)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "bench": "id_churn",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "config": {**config, "raw_row_bytes_note": RAW_ROW_BYTES_NOTE, "wall_s": time.perf_counter() - t0},
        "stream": stream,
        "index": index,
        "ray": ray_part,
    }
    jpath, ppath = write_report(report, args.out)
    print(format_table(report))
    print(f"wrote {jpath} and {ppath}")
    return report


if __name__ == "__main__":
    main()
