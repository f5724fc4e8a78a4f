"""What one actor call costs by how its argument travels: inline, object store or compiled graph.

``python -m bench.call_cost [--sizes 0,0.1,0.25,0.5,1,2,4] [--calls 300] [--idle-s 2] [--pipeline-rounds 2]
[--pipeline-batches 49] [--out DIR]``

On a fresh local Ray (2 CPUs, 127.0.0.1) one actor receives a ``uint8`` array of each size
(MB), ``--calls`` times per path, and answers its sum (so every byte is read):

- **inline**: the array itself, carried inside the call (the cluster's
  ``max_direct_call_object_size`` is set above the largest size for this run);
- **object store**: a ``ray.put`` reference to it, so the actor reads it from shared
  memory; the put is part of the call's cost, as when Ray puts a large argument itself;
- **compiled graph**: the same method bound in a Ray Compiled Graph
  (``experimental_compile``; shared-memory channels instead of a task per call), the
  transport Ray offers for calls repeated in a fixed pattern. Its actor waits for the next
  input by polling, so the cores the whole process tree keeps busy over ``--idle-s``
  seconds without calls are measured with the graph compiled
  (``compiled_graph_idle_cores``) and, as the baseline, before it is
  (``plain_idle_cores``).

Then, since a cheaper call is worth only what it saves a whole pipeline, a **model of the PS
training pipeline** (``--pipeline-rounds``, 0 to skip), on a fresh Ray with Freshet's own
transport settings (:meth:`serving.config.RayConfig.system_config`, so a 3 MB argument goes
through the object store as in the PS): a trainer actor and two shard actors, one push +
pull call per shard per batch carrying that shard's own ``PIPELINE_MB`` each way, each shard
working ``PIPELINE_SHARD_MS`` of CPU per call and the trainer ``PIPELINE_TRAINER_MS`` per
batch, as on BENCHMARKS.md section 7's TorchRec-like workload. Each round runs it four ways
and reports the wall seconds of each: plain actor calls or the same calls in a compiled
graph, and each of those **serial** (the trainer waits for its call, then computes) or
**overlapped** (the next call is in flight while the trainer computes, as with
``trainer.prefetch``). It also measures the cores busy with the two-shard graph compiled
and no call made, against the same actors without it.

Per call: wall time, and CPU time summed over this process and every process it started,
i.e. the whole local Ray: GCS, raylet, agents, the actor (:func:`bench.tree_cpu_s`, in clock
ticks of 10 ms: keep ``--calls`` in the hundreds), which is what a CPU-bound deployment pays. This is the measurement
behind ``ray.max_inline_bytes`` (:class:`serving.config.RayConfig`): the size below which
inline is the cheaper path; and behind keeping the PS on plain actor calls (BENCHMARKS.md
section 7). Prints a table; writes ``<out>/call_cost.json`` and
``<out>/call_cost.png``. Exit status 0; 1 when the pipeline model failed (the per-call
results are written all the same, ``pipeline`` holding the reason); 130 on Ctrl-C, which
stops the Ray it started and keeps the per-call results if that part was finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import cpu_between, loadavg_1m, machine, ray_temp_dir, sigint_deferred, tree_cpu_s

__all__ = ["PIPELINE_MB", "PIPELINE_SHARD_MS", "PIPELINE_TRAINER_MS", "PIPELINE_WAYS", "REPORT_KEYS", "break_even_mb",
           "format_table", "main", "measure", "run_pipeline", "write_report"]

REPORT_KEYS = ("bench", "date", "machine", "calls", "idle_s", "rows", "break_even_mb", "plain_idle_cores",
               "compiled_graph_idle_cores", "pipeline")
"""Top-level keys of ``call_cost.json``, in order."""

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PATHS = ("inline", "object store", "compiled graph")
_MB = 1 << 20
# The pipeline model's figures, from section 7's profile of the TorchRec-like workload
# (200,000 events = 49 batches of 4,096): the trainer's 1.9 s of CPU is ~39 ms a batch; the
# shards' table code, 1.5 s over 2 shards, is ~15 ms a shard a batch; a shard's half of a
# push or pull is ~3 MB.
PIPELINE_TRAINER_MS = 39.0
PIPELINE_SHARD_MS = 15.0
PIPELINE_MB = 3.0
PIPELINE_WAYS = ("plain_s", "graph_s", "plain_overlap_s", "graph_overlap_s")
"""Keys of a pipeline round: plain calls or a compiled graph, serial or overlapped."""
# Ray's default wait for a compiled graph's execute or result is 10 s. The first execution sets
# up the channels, and its actors wait by polling: on a loaded 2-core host (a CI run beside
# other tests) that first one took longer than 10 s, and the run failed. A hang still ends.
GRAPH_TIMEOUT_S = 300


def _burn(ms: float) -> None:
    """Spend ``ms`` of this thread's CPU time (not wall time: a busy machine stretches it,
    as it would stretch real work)."""
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        pass


def measure(sizes_mb: list[float], calls: int, *, idle_s: float = 2.0, pipeline_rounds: int = 2,
            pipeline_batches: int = 49, progress: bool = True, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start Ray, time ``calls`` calls per size and path, stop Ray; then run the pipeline
    model on a fresh Ray with Freshet's transport settings.

    Returns ``rows``: one per (size, path), ``size_mb``, ``path``, ``wall_ms`` and ``cpu_ms``
    per call (median wall, mean CPU over all calls); ``plain_idle_cores`` and
    ``compiled_graph_idle_cores``: the cores the whole process tree used over ``idle_s``
    seconds with no call made, before and after the actor joined a compiled graph (None
    without ``/proc``); ``pipeline``: see :func:`run_pipeline` (None when ``pipeline_rounds``
    is 0; ``{"failed": reason}`` when it raised: the per-call figures stand on their own, so
    they are returned all the same); ``per_call_done``: True once the per-call part is
    complete. ``into``: the dict to fill (returned), so that a caller interrupted by Ctrl-C
    still has what was measured.

    Raises:
        RuntimeError: the actor answered a wrong sum (a byte was lost or changed).
    """
    import ray
    from ray.dag import InputNode

    got = into if into is not None else {}
    got.update(rows=[], plain_idle_cores=None, compiled_graph_idle_cores=None, pipeline=None, per_call_done=False)
    rows: list[dict[str, Any]] = got["rows"]
    biggest = int(max(sizes_mb) * _MB) + _MB
    try:
        # Every size travels inline unless a reference is passed (Ray inlines at most 10 MB per call).
        _ray_init({"max_direct_call_object_size": biggest, "task_rpc_inlined_bytes_limit": 2 * biggest})

        @ray.remote(num_cpus=0)
        class Sink:
            def total(self, a: np.ndarray) -> int:
                return int(a.sum(dtype=np.uint64))

            def ready(self) -> bool:
                return True

        sink = Sink.remote()
        ray.get(sink.ready.remote())  # the actor is up before anything is timed
        with InputNode() as inp:
            dag = sink.total.bind(inp)
        plain_idle = got["plain_idle_cores"] = _idle_cores(idle_s)
        rng = np.random.default_rng(0)
        warm = max(3, calls // 10)
        arrays = [rng.integers(0, 256, max(1, int(mb * _MB)), dtype=np.uint8) for mb in sizes_mb]
        for path in PATHS:
            if path == "compiled graph":
                # Sized for the largest argument so no call pays for growing the channel.
                graph = dag.experimental_compile(_buffer_size_bytes=biggest, _submit_timeout=GRAPH_TIMEOUT_S)
                call = lambda a: ray.get(graph.execute(a), timeout=GRAPH_TIMEOUT_S)  # noqa: E731
            elif path == "inline":
                call = lambda a: ray.get(sink.total.remote(a))  # noqa: E731
            else:
                call = lambda a: ray.get(sink.total.remote(ray.put(a)))  # noqa: E731
            for mb, a in zip(sizes_mb, arrays):
                want = int(a.sum(dtype=np.uint64))
                for _ in range(warm):
                    call(a)
                walls = []
                cpu0 = tree_cpu_s()
                for _ in range(calls):
                    t = time.perf_counter()
                    answer = call(a)
                    walls.append(time.perf_counter() - t)
                    if answer != want:
                        raise RuntimeError(f"{path} call of {mb} MB: sum {answer} != {want}")
                cpu = cpu_between(cpu0, tree_cpu_s()) or 0.0
                rows.append({"size_mb": mb, "path": path, "wall_ms": float(np.median(walls)) * 1e3,
                             "cpu_ms": cpu / calls * 1e3})
                if progress:
                    r = rows[-1]
                    print(f"call_cost: {mb:g} MB {path}: {r['wall_ms']:.2f} ms wall, {r['cpu_ms']:.2f} ms CPU",
                          flush=True)
        graph_idle = got["compiled_graph_idle_cores"] = _idle_cores(idle_s)
        if progress and graph_idle is not None:
            print(f"call_cost: no calls for {idle_s:g} s: {plain_idle:.2f} cores busy, {graph_idle:.2f} with the "
                  "compiled graph", flush=True)
        graph.teardown()
        got["per_call_done"] = True
    finally:
        with sigint_deferred():  # a second Ctrl-C must not leave this Ray running
            ray.shutdown()
    if pipeline_rounds:
        from serving.config import RayConfig

        transport = RayConfig()
        try:
            try:
                _ray_init(transport.system_config())
                pipeline = run_pipeline(pipeline_rounds, pipeline_batches, idle_s=idle_s, progress=progress)
            finally:
                with sigint_deferred():
                    ray.shutdown()
        except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit status, not raised
            got["pipeline"] = {"failed": f"{type(e).__name__}: {e}"}
        else:
            got["pipeline"] = {**pipeline, "max_inline_bytes": transport.max_inline_bytes}
    return got


def _ray_init(system_config: dict[str, int]) -> None:
    """A fresh local Ray for one part of the run: 2 CPUs, loopback, its own temp dir."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=ray_temp_dir("frc"), log_to_driver=False, configure_logging=False,
             _system_config=system_config)


def _idle_cores(seconds: float) -> float | None:
    """Cores this process tree kept busy over ``seconds`` of sleep (None without ``/proc``)."""
    cpu0 = tree_cpu_s()
    time.sleep(seconds)
    used = cpu_between(cpu0, tree_cpu_s())
    return None if used is None else used / seconds


def run_pipeline(rounds: int, batches: int, *, idle_s: float = 2.0, progress: bool = True) -> dict[str, Any]:
    """The pipeline model (module docstring) on the running Ray: ``rounds`` rounds of
    ``batches`` batches each of the four ways (:data:`PIPELINE_WAYS`, in that order).

    Returns the model's figures (``trainer_ms``, ``shard_ms``, ``mb``, ``batches``), the
    wall time of its CPU work alone, with no transport: ``floor_s`` when serial (batches x
    (trainer + shard) ms) and ``overlap_floor_s`` (batches x the larger of the two);
    ``rounds``: each a dict of wall seconds by way; and ``plain_idle_cores`` /
    ``graph_idle_cores``: the cores this process tree kept busy over ``idle_s`` seconds with
    no call made, without and with the two-shard graph compiled (None without ``/proc``).
    Its actors are gone when it returns or raises.

    Raises:
        RuntimeError: a shard answered rows of the wrong size.
    """
    import ray
    from ray.dag import InputNode, MultiOutputNode

    n = int(PIPELINE_MB * _MB) // 4

    # Actors at Ray's own niceness like Freshet's shards and trainer, which is what decides
    # who gets a core while a compiled graph's actors wait for input by polling.
    @ray.remote(num_cpus=0)
    class Shard:
        def __init__(self):
            self.rows = np.ones(n, np.float32)

        def push_pull(self, grads: np.ndarray) -> np.ndarray:
            _burn(PIPELINE_SHARD_MS)
            return self.rows

    @ray.remote(num_cpus=0)
    class Trainer:
        def __init__(self, shards):
            self.shards = shards
            # Each shard gets its own part of a push, as in the PS (not one array for both).
            self.grads = [np.full(n, i, np.float32) for i in range(len(shards))]
            self.graph = None

        def compile(self) -> None:
            with InputNode() as inp:
                self.graph = MultiOutputNode([s.push_pull.bind(inp[i]) for i, s in enumerate(self.shards)]
                                             ).experimental_compile(_buffer_size_bytes=2 * n * 4,
                                                                    _submit_timeout=GRAPH_TIMEOUT_S)

        def teardown(self) -> None:
            if self.graph is not None:
                self.graph.teardown()
                self.graph = None

        def run(self, graph: bool, overlap: bool) -> float:
            if graph:
                self.compile()
                start = lambda: self.graph.execute(*self.grads)  # noqa: E731
            else:
                start = lambda: [s.push_pull.remote(g) for s, g in zip(self.shards, self.grads)]  # noqa: E731

            def finish(ref) -> None:
                if any(r.shape != (n,) for r in ray.get(ref, timeout=GRAPH_TIMEOUT_S)):
                    raise RuntimeError("pipeline: a shard answered rows of the wrong size")

            try:
                finish(start())  # warm: the graph's channels are set up, the actors' first calls done
                t = time.perf_counter()
                ref = start() if overlap else None
                for i in range(batches):  # one call per shard per batch either way
                    if overlap:  # this batch's rows arrived while the last one was computed
                        finish(ref)
                        if i + 1 < batches:
                            ref = start()
                    else:
                        finish(start())
                    _burn(PIPELINE_TRAINER_MS)
                return time.perf_counter() - t
            finally:
                self.teardown()

    shards = [Shard.remote() for _ in range(2)]
    trainer = Trainer.remote(shards)
    out: dict[str, Any] = {"trainer_ms": PIPELINE_TRAINER_MS, "shard_ms": PIPELINE_SHARD_MS, "mb": PIPELINE_MB,
                           "batches": batches, "floor_s": batches * (PIPELINE_TRAINER_MS + PIPELINE_SHARD_MS) / 1e3,
                           "overlap_floor_s": batches * max(PIPELINE_TRAINER_MS, PIPELINE_SHARD_MS) / 1e3,
                           "rounds": []}
    try:
        for i in range(rounds):
            got = {way: ray.get(trainer.run.remote(way.startswith("graph"), "overlap" in way)) for way in PIPELINE_WAYS}
            out["rounds"].append(got)
            if progress:
                print(f"call_cost: pipeline round {i + 1}/{rounds}: "
                      + ", ".join(f"{w} {v:.2f} s" for w, v in got.items()), flush=True)
        out["plain_idle_cores"] = _idle_cores(idle_s)
        ray.get(trainer.compile.remote())
        try:
            out["graph_idle_cores"] = _idle_cores(idle_s)
        finally:
            ray.get(trainer.teardown.remote())
        if progress and out["graph_idle_cores"] is not None:
            print(f"call_cost: pipeline actors, no calls for {idle_s:g} s: {out['plain_idle_cores']:.2f} cores busy, "
                  f"{out['graph_idle_cores']:.2f} with the two-shard graph compiled", flush=True)
    finally:
        for a in (trainer, *shards):
            ray.kill(a)
    return out


def break_even_mb(rows: list[dict[str, Any]]) -> float | None:
    """The smallest measured size at which the object store costs less CPU than inline;
    None when inline is cheaper at every size measured."""
    by = {(r["size_mb"], r["path"]): r["cpu_ms"] for r in rows}
    for mb in sorted({r["size_mb"] for r in rows}):
        if by[(mb, "object store")] < by[(mb, "inline")]:
            return mb
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table: one line per size, every measured path side by side."""
    by = {(r["size_mb"], r["path"]): r for r in rows}
    names = {"inline": "inline", "object store": "store", "compiled graph": "graph"}
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    head = f"{'MB':>6}" + "".join(f"  {names[p] + ' wall ms':>14}  {names[p] + ' CPU ms':>13}" for p in paths)
    lines = [head, "-" * len(head)]
    for mb in sorted({r["size_mb"] for r in rows}):
        lines.append(f"{mb:>6g}" + "".join(f"  {by[(mb, p)]['wall_ms']:>14.2f}  {by[(mb, p)]['cpu_ms']:>13.2f}"
                                           for p in paths))
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
    for path, marker in zip(PATHS, ("o", "s", "^")):
        pts = sorted((r["size_mb"], r["cpu_ms"]) for r in report["rows"] if r["path"] == path)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=path)
    from serving.config import RayConfig

    ax.axvline(RayConfig().max_inline_bytes / _MB, color="grey", ls="--", lw=1, label="ray.max_inline_bytes (default)")
    idle, base = report.get("compiled_graph_idle_cores"), report.get("plain_idle_cores")
    if idle is not None and base is not None:
        ax.text(0.02, 0.97, f"no calls: {base:.2f} cores busy; {idle:.2f} with the compiled graph", transform=ax.transAxes,
                va="top")
    pipe = report.get("pipeline")
    if pipe and "failed" in pipe:
        ax.text(0.02, 0.89, f"PS pipeline model FAILED: {pipe['failed'][:80]}", transform=ax.transAxes, va="top",
                fontsize=8, color="red")
    elif pipe:
        best = {w: min(r[w] for r in pipe["rounds"]) for w in PIPELINE_WAYS}
        ax.text(0.02, 0.89, f"PS pipeline model, {pipe['batches']} batches, fastest round (s):\n"
                f"serial: plain calls {best['plain_s']:.2f}, compiled graph {best['graph_s']:.2f}, "
                f"work alone {pipe['floor_s']:.2f}\n"
                f"overlapped: plain calls {best['plain_overlap_s']:.2f}, compiled graph "
                f"{best['graph_overlap_s']:.2f}, work alone {pipe['overlap_floor_s']:.2f}\n"
                f"no calls: {pipe['plain_idle_cores'] or 0:.2f} cores busy; "
                f"{pipe['graph_idle_cores'] or 0:.2f} with the two-shard graph",
                transform=ax.transAxes, va="top", fontsize=8)
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
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of MB") from None
    # Written as "not within" so that nan (every comparison False) is refused too.
    if not v or not all(math.isfinite(x) and 0 <= x <= 8 for x in v):
        raise argparse.ArgumentTypeError(f"each size must be a number within 0-8 MB (got {text!r})")
    if len(set(v)) != len(v):
        raise argparse.ArgumentTypeError(f"a size is given twice (got {text!r}): its rows would be measured twice and "
                                         "the table would show one of them")
    return v


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.call_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, default=_sizes("0,0.1,0.25,0.5,1,2,4"), help="argument sizes (MB)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per size and path")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default bench/results/)")
    p.add_argument("--idle-s", type=float, default=2.0,
                   help="seconds the compiled graph is left without calls to measure what its waiting costs")
    p.add_argument("--pipeline-rounds", type=int, default=2,
                   help="rounds of the PS pipeline model, plain calls against a compiled graph (0 skips it)")
    p.add_argument("--pipeline-batches", type=int, default=49, help="batches per pipeline round (49: 200,000 events)")
    p.add_argument("--quiet", action="store_true", help="no per-size lines")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be at least 1")
    if not 0.1 <= args.idle_s <= 60:
        p.error("--idle-s must be within 0.1-60 seconds")
    if not 0 <= args.pipeline_rounds <= 20:
        p.error("--pipeline-rounds must be within 0-20")
    if not 1 <= args.pipeline_batches <= 10_000:
        p.error("--pipeline-batches must be within 1-10000")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_start = loadavg_1m()
    got: dict[str, Any] = {}
    try:
        measure(args.sizes, args.calls, idle_s=args.idle_s, pipeline_rounds=args.pipeline_rounds,
                pipeline_batches=args.pipeline_batches, progress=not args.quiet, into=got)
    except KeyboardInterrupt:
        # measure() has shut its Ray down on the way out (its finally blocks).
        if not got.get("per_call_done"):
            print("\ninterrupted: stopped its Ray; nothing kept (the per-call part was not finished)", file=sys.stderr)
            return 130
        got["pipeline"] = {"failed": "interrupted (Ctrl-C)"}
        interrupted = True
    else:
        interrupted = False
    rows, idle_cores, pipe = got["rows"], got["compiled_graph_idle_cores"], got["pipeline"]
    report = {"bench": "call_cost", "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "machine": machine("ray", "numpy", loadavg_start=load_start,
                                 loadavg_end=loadavg_1m()),
              "calls": args.calls, "idle_s": args.idle_s, "rows": rows,
              "break_even_mb": break_even_mb(rows), "plain_idle_cores": got["plain_idle_cores"],
              "compiled_graph_idle_cores": idle_cores, "pipeline": pipe}
    if interrupted:
        js, png = write_report(report, Path(args.out))
        print(f"\ninterrupted in the pipeline model: stopped its Ray; kept the per-call results in {js} and {png} "
              "(pipeline marked as interrupted)", file=sys.stderr)
        return 130
    print(format_table(rows))
    be = report["break_even_mb"]
    print(f"object store cheaper in CPU from: {'never, up to ' + format(max(args.sizes), 'g') + ' MB' if be is None else format(be, 'g') + ' MB'}")
    if idle_cores is not None:
        print(f"no calls for {args.idle_s:g} s, all processes: {report['plain_idle_cores']:.2f} cores busy with a plain "
              f"actor, {idle_cores:.2f} with it in a compiled graph")
    if pipe and "failed" in pipe:
        print(f"PS pipeline model: FAILED: {pipe['failed']}")
    elif pipe:
        print(f"PS pipeline model, {pipe['batches']} batches ({pipe['trainer_ms']:g} ms trainer + {pipe['shard_ms']:g} ms "
              f"a shard, {pipe['mb']:g} MB a shard each way, ray.max_inline_bytes {pipe['max_inline_bytes']:,}; work "
              f"alone {pipe['floor_s']:.2f} s serial, {pipe['overlap_floor_s']:.2f} s overlapped):")
        for i, r in enumerate(pipe["rounds"], 1):
            print(f"  round {i}: serial: plain calls {r['plain_s']:.2f} s, compiled graph {r['graph_s']:.2f} s "
                  f"({r['graph_s'] / r['plain_s']:.2f}x); overlapped: plain calls {r['plain_overlap_s']:.2f} s, "
                  f"compiled graph {r['graph_overlap_s']:.2f} s ({r['graph_overlap_s'] / r['plain_overlap_s']:.2f}x)")
        if pipe["graph_idle_cores"] is not None:
            print(f"  no calls for {args.idle_s:g} s: {pipe['plain_idle_cores']:.2f} cores busy, "
                  f"{pipe['graph_idle_cores']:.2f} with the two-shard graph compiled")
    js, png = write_report(report, Path(args.out))
    print(f"wrote {js} and {png}")
    return 1 if pipe and "failed" in pipe else 0


if __name__ == "__main__":
    raise SystemExit(main())
