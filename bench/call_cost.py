"""What one actor call costs by how its argument travels: inline or through the object store.

``python -m bench.call_cost [--sizes 0,0.1,0.25,0.5,1,2,4] [--calls 300] [--out DIR]``

On a fresh local Ray (2 CPUs, 127.0.0.1) one actor receives a ``uint8`` array of each size
(MB), ``--calls`` times per path, and answers its sum (so every byte is read):

- **inline**: the array itself, carried inside the call (the cluster's
  ``max_direct_call_object_size`` is set above the largest size for this run);
- **object store**: a ``ray.put`` reference to it, so the actor reads it from shared
  memory; the put is part of the call's cost, as when Ray puts a large argument itself.

Per call: wall time, and CPU time summed over this process and every process it started,
i.e. the whole local Ray: GCS, raylet, agents, the actor (:func:`bench.tree_cpu_s`, in clock
ticks of 10 ms: keep ``--calls`` in the hundreds), which is what a CPU-bound deployment pays. This is the measurement
behind ``ray.max_inline_bytes`` (:class:`serving.config.RayConfig`): the size below which
inline is the cheaper path. Prints a table; writes ``<out>/call_cost.json`` and
``<out>/call_cost.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import cpu_between, machine, ray_temp_dir, tree_cpu_s

__all__ = ["REPORT_KEYS", "format_table", "main", "measure", "write_report"]

REPORT_KEYS = ("bench", "date", "machine", "calls", "rows", "break_even_mb")
"""Top-level keys of ``call_cost.json``, in order."""

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PATHS = ("inline", "object store")
_MB = 1 << 20


def measure(sizes_mb: list[float], calls: int, *, progress: bool = True) -> list[dict[str, Any]]:
    """Start Ray, time ``calls`` calls per size and path, stop Ray. Returns one row per
    (size, path): ``size_mb``, ``path``, ``wall_ms`` and ``cpu_ms`` per call (median wall,
    mean CPU over all calls).

    Raises:
        RuntimeError: the actor answered a wrong sum (a byte was lost or changed).
    """
    import ray

    temp = ray_temp_dir("frc")
    biggest = int(max(sizes_mb) * _MB) + _MB
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False, configure_logging=False,
             # Every size travels inline unless a reference is passed (Ray inlines at most 10 MB per call).
             _system_config={"max_direct_call_object_size": biggest, "task_rpc_inlined_bytes_limit": 2 * biggest})
    rows: list[dict[str, Any]] = []
    try:
        @ray.remote(num_cpus=0)
        class Sink:
            def total(self, a: np.ndarray) -> int:
                return int(a.sum(dtype=np.uint64))

            def ready(self) -> bool:
                return True

        sink = Sink.remote()
        ray.get(sink.ready.remote())  # the actor is up before anything is timed
        rng = np.random.default_rng(0)
        warm = max(3, calls // 10)
        for mb in sizes_mb:
            a = rng.integers(0, 256, max(1, int(mb * _MB)), dtype=np.uint8)
            want = int(a.sum(dtype=np.uint64))
            for path in PATHS:
                inline = path == "inline"
                for _ in range(warm):
                    ray.get(sink.total.remote(a if inline else ray.put(a)))
                walls = []
                cpu0 = tree_cpu_s()
                for _ in range(calls):
                    t = time.perf_counter()
                    got = ray.get(sink.total.remote(a if inline else ray.put(a)))
                    walls.append(time.perf_counter() - t)
                    if got != want:
                        raise RuntimeError(f"{path} call of {mb} MB: sum {got} != {want}")
                cpu = cpu_between(cpu0, tree_cpu_s()) or 0.0
                rows.append({"size_mb": mb, "path": path, "wall_ms": float(np.median(walls)) * 1e3,
                             "cpu_ms": cpu / calls * 1e3})
                if progress:
                    r = rows[-1]
                    print(f"call_cost: {mb:g} MB {path}: {r['wall_ms']:.2f} ms wall, {r['cpu_ms']:.2f} ms CPU",
                          flush=True)
    finally:
        ray.shutdown()
    return rows


def break_even_mb(rows: list[dict[str, Any]]) -> float | None:
    """The smallest measured size at which the object store costs less CPU than inline;
    None when inline is cheaper at every size measured."""
    by = {(r["size_mb"], r["path"]): r["cpu_ms"] for r in rows}
    for mb in sorted({r["size_mb"] for r in rows}):
        if by[(mb, "object store")] < by[(mb, "inline")]:
            return mb
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table: one line per size, both paths side by side."""
    by = {(r["size_mb"], r["path"]): r for r in rows}
    head = f"{'MB':>6}  {'inline wall ms':>14}  {'inline CPU ms':>13}  {'store wall ms':>13}  {'store CPU ms':>12}"
    lines = [head, "-" * len(head)]
    for mb in sorted({r["size_mb"] for r in rows}):
        i, s = by[(mb, "inline")], by[(mb, "object store")]
        lines.append(f"{mb:>6g}  {i['wall_ms']:>14.2f}  {i['cpu_ms']:>13.2f}  {s['wall_ms']:>13.2f}  {s['cpu_ms']:>12.2f}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``call_cost.json`` and ``call_cost.png`` (CPU per call against size, per path)
    under ``out``; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "call_cost.json", out / "call_cost.png"
    js.write_text(json.dumps(report, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path, marker in zip(PATHS, ("o", "s")):
        pts = sorted((r["size_mb"], r["cpu_ms"]) for r in report["rows"] if r["path"] == path)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=path)
    from serving.config import RayConfig

    ax.axvline(RayConfig().max_inline_bytes / _MB, color="grey", ls="--", lw=1, label="ray.max_inline_bytes (default)")
    ax.set_xlabel("argument size (MB)")
    ax.set_ylabel("CPU per call, all processes (ms)")
    ax.set_title(f"One actor call by argument path, {report['calls']} calls each "
                 f"(load {report['machine']['loadavg_1m']:.1f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return js, png


def _sizes(text: str) -> list[float]:
    try:
        v = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a comma-separated list of MB") from None
    if not v or any(x < 0 or x > 8 for x in v):
        raise argparse.ArgumentTypeError(f"--sizes: each size must be within 0-8 MB (got {text!r})")
    return v


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.call_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, default=_sizes("0,0.1,0.25,0.5,1,2,4"), help="argument sizes (MB)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per size and path")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results/)")
    p.add_argument("--quiet", action="store_true", help="no per-size lines")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = measure(args.sizes, args.calls, progress=not args.quiet)
    report = {"bench": "call_cost", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine("ray", "numpy"), "calls": args.calls, "rows": rows,
              "break_even_mb": break_even_mb(rows)}
    print(format_table(rows))
    be = report["break_even_mb"]
    print(f"object store cheaper in CPU from: {'never, up to ' + format(max(args.sizes), 'g') + ' MB' if be is None else format(be, 'g') + ' MB'}")
    js, png = write_report(report, Path(args.out))
    print(f"wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
