"""Soak: millions of events through a running deployment over HTTP, at bounded memory, with
trainers and shards killed along the way.

``python -m bench.soak [--events 2000000] [--rate R] [--out DIR]`` starts what ``freshet up``
starts (PS shards, the durable ingest log with fsync and retention, a trainer on the unbounded
ingest stream with its write-ahead log and snapshots, the Serve app on 127.0.0.1) on a private
Ray head started the way ``freshet up`` starts one (:func:`serving.ray_head.start_head`:
``ray start --head`` with 2 CPUs, listeners on loopback, free ports so it coexists with other
Ray clusters on the host, token auth with its own token; stopped by its session at the end,
never ``ray stop``), and feeds ``POST /events`` batches (each with an ``Idempotency-Key``, so
a retried batch lands once) at a steady rate the trainer can hold: ``--rate`` events/s, or,
when it is 0, 85% of the rate measured in a first minute of feeding as fast as the backlog
bound allows. The feeder never lets more than ``--max-backlog`` accepted events wait for the
trainer.

Every ``--sample-s`` seconds it samples ``/stats`` and the resident memory (``VmRSS``,
``RssAnon`` and ``RssFile`` of ``/proc/<pid>/status``) of every process of its local Ray, each
labelled from Ray's actor table (:func:`classify_processes`) with a role: ``deployment``
(Freshet's actors: ``ps-shard-<i>``, ``trainer-<i>``, ``ingest-log``, ``serve-replica``),
``serve`` (Ray Serve's controller and HTTP proxy) or ``ray`` (Ray's daemons: GCS, raylet,
dashboard and runtime-env agents). Only ``deployment`` processes decide the memory goal; the
others are reported apart. Each shard's sample also records its ``recent_entries`` (the per-user
recent items kept for ``exclude_seen``: state beside the PS rows, bounded by
``ps.seen_per_user`` per user, not subtracted).

When the events posted reach each ``--kill-at`` fraction of ``--events`` (default 0.5 and 1.0:
at 1M and 2M of 2M), feeding pauses; it kills the trainer (SIGKILL of its process) and times
its restart: until the actor answers again, and until ``/healthz`` is 200 and events are being
applied again (``events_applied`` beyond its value at the kill, or caught up); then the same
for shard 0; then feeding resumes at the steady rate. So both restarts of a kill point happen
at the same history (events posted == the kill point), one at a time, and the kill points
differ only by history. ``--tail`` more events follow the last kill point. Then it drains.

Reported (table on stdout, ``<out>/soak.json``, ``<out>/soak.png``: RSS per process over events
applied, and restart times):

* memory growth per million events, per process incarnation, by a least-squares line through
  its samples taken after warm-up (``--warmup`` of ``--events``, and 10% of ``--events`` after
  the process started) when they span at least 15% of ``--events``; for a shard the bytes of
  its PS rows (``/stats`` ``memory``) are subtracted first. Goal: <= 50 MB per million events
  for every ``deployment`` process, and the ingest log flat (<= 10 MB per million events);
* ``events_accepted == events_applied + dead_lettered`` at the end, and accepted == posted;
* restart times of the trainer and the shard at each kill point (goal: not growing with
  history; "the same within noise" is taken as last <= 1.5 x first + 2 s), with what each
  restart cost in counts, not wall time: events the ingest log returned to the restarted
  trainer until it applied again (its replay from its snapshot plus the small backlog at the
  kill) and push-log records the restarted shard replayed after its snapshot;
* the machine's load average at start, at each kill and at the end.

Exit status 0 when exactly-once held, every killed actor recovered, the memory goal was met
and the ingest log was flat; else 1. Ctrl-C stops the Ray head and removes the state
directory, keeps what was sampled in ``<out>/soak-interrupted.json`` and exits 130.

The trainer runs a cheap configuration (1 pass, 4 negatives, batches of 1,024, dim 16, see
:func:`soak_config`): it applied about 7,000 events/s on 2 shared cores (load average ~15), so
2M events at ``--rate 4000`` take about 9 minutes; the figures are about memory and restarts,
not model quality.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import at_least, fraction, machine, ray_temp_dir, sigint_deferred

__all__ = [
    "DEFAULT_OUT",
    "GOAL_MB_PER_M",
    "INGEST_FLAT_MB_PER_M",
    "REPORT_KEYS",
    "RESTART_NOISE",
    "ROLES",
    "analyse",
    "classify_processes",
    "format_table",
    "growth",
    "main",
    "proc_memory",
    "soak_config",
    "write_report",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
"""Default output directory (git-ignored)."""

GOAL_MB_PER_M = 50.0
"""Goal: memory growth per million events after warm-up, excluding PS rows (MB)."""

INGEST_FLAT_MB_PER_M = 10.0
"""The ingest log counts as flat when it grows at most this much per million events (MB):
under 1% of its resident memory per million events, RSS noise (allocator, page cache)."""

RESTART_NOISE = (1.5, 2.0)
"""A restart time at the last kill point is "the same within noise" as at the first when
``last <= 1.5 * first + 2 s``."""

REPORT_KEYS = ("bench", "date", "machine", "config", "feed", "samples", "kills", "growth", "final", "verdict")
"""Top-level keys of ``soak.json``, in order."""

CHEAP = ("trainer.passes=1, model.num_negatives=4, trainer.batch_size=1024, context_items=5, dim 16: "
         "cheap: the trainer applied ~7,000 events/s on 2 shared cores")
"""What :func:`soak_config` changes from the defaults, as the output says it."""


def soak_config(work: str, namespace: str, port: int, *, partitions: int = 1):
    """The soak's deployment config: defaults, with a cheap trainer and bounded state.

    Overrides: private ``namespace``, ``ingest.dir`` = ``work``; the trainer reads the ingest
    stream (no end) with 1 pass, 4 negatives, batches of 1,024 and a local-state snapshot every
    50 batches (a restart replays at most ~51k events); shards snapshot every 200 pushes (a
    restart replays at most 200 pushes); retention keeps 32 MB / 60 s of consumed history and
    a 60 s dedup window (retention also keeps every segment younger than the dedup window, so a
    longer window would keep all of a short soak on disk), so the log's disk use is bounded
    during the soak (~32 MB plus the open segment); Serve on 127.0.0.1:``port``.
    """
    from serving.config import load_config
    from workers.config import StreamKind

    return load_config(None, {
        "namespace": namespace,
        "ps": {"num_shards": 2, "snapshot_every_pushes": 200,
               "tables": {"user": {"dim": 16}, "item": {"dim": 16}}},
        "model": {"num_negatives": 4, "context_items": 5},
        "trainer": {"passes": 1, "batch_size": 1024, "snapshot_every_batches": 50, "device": "cpu"},
        "stream": {"kind": StreamKind.INGEST.value, "num_events": None},
        "ingest": {"dir": work, "state_dir": None, "partitions": partitions, "dedup_max_age_s": 60.0,
                   "retention": {"keep_bytes": 32 << 20, "keep_age_s": 60.0}},
        "serving": {"host": "127.0.0.1", "port": port},
    })


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return []


def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


ROLES = {
    "deployment": "Freshet deployment actors (PS shards, trainers, ingest log, Serve replicas): they decide the goal",
    "serve": "Ray Serve's own actors (controller, HTTP proxy): reported, not part of the goal",
    "ray": "Ray's daemons (GCS, raylet, dashboard and runtime-env agents): reported, not part of the goal",
}
"""What each ``role`` of a sampled process means (the report's ``roles``)."""

_RAY_DAEMONS = {"gcs_server": "gcs_server", "raylet": "raylet", "ray::DashboardAgent": "dashboard-agent",
                "ray::RuntimeEnvAgent": "runtime-env-agent"}


def _actor_label(name: str, class_name: str) -> tuple[str, str]:
    """``(label, role)`` of a live Ray actor from its name and class."""
    if class_name == "ServeController":
        return "serve-controller", "serve"
    if class_name == "ProxyActor":
        return "serve-proxy", "serve"
    if class_name.startswith("ServeReplica") or name.startswith("SERVE_REPLICA"):
        return "serve-replica", "deployment"
    return (name or class_name), "deployment"  # ps-shard-<i>, trainer-<i>, ingest-log, any other actor of ours


def classify_processes(root_pid: int, actors: list[dict]) -> dict[int, tuple[str, str]]:
    """``{pid: (label, role)}`` of the processes of the local Ray started by ``root_pid`` (its
    descendants: GCS, raylet and everything the raylet runs).

    ``actors``: Ray's actor table (``ray._private.state.actors().values()``: ``Name``,
    ``ActorClassName``, ``State``, ``Pid``); only ``ALIVE`` actors are labelled (by actor name,
    e.g. ``ps-shard-0``, ``trainer-0``, ``ingest-log``, ``serve-replica``), with role
    ``"deployment"`` or, for Serve's controller and proxy, ``"serve"``. Ray's daemons (GCS,
    raylet, dashboard and runtime-env agents) get role ``"ray"``. Idle pooled workers and a
    restarted actor's process not yet ALIVE in the table are left out, so a process is never
    sampled under the wrong name.
    """
    parents = _ppids()
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    alive = {int(a["Pid"]): _actor_label(a.get("Name") or "", a.get("ActorClassName") or "")
             for a in actors if a.get("State") == "ALIVE" and a.get("Pid")}
    out: dict[int, tuple[str, str]] = {}
    todo = [root_pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child)
            if child in alive:
                out[child] = alive[child]
                continue
            c = _cmdline(child)
            if not c:
                continue
            title = c[0].strip()
            daemon = _RAY_DAEMONS.get(title) or _RAY_DAEMONS.get(Path(title).name)
            if daemon:
                out[child] = (daemon, "ray")
    return out


def proc_memory(pid: int) -> dict[str, float] | None:
    """``{"rss_mb", "anon_mb", "file_mb"}`` of ``pid`` from ``/proc/<pid>/status`` (MB =
    2**20 bytes); None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            kb[name] = int(rest.split()[0])
    if "VmRSS" not in kb:
        return None
    return {"rss_mb": kb["VmRSS"] / 1024, "anon_mb": kb.get("RssAnon", 0) / 1024, "file_mb": kb.get("RssFile", 0) / 1024}




# --------------------------------------------------------------------------- growth


def growth(samples: list[dict], *, warmup_events: float, restart_warmup_events: float, min_span_events: float,
           metric: str = "rss_mb") -> dict[str, list[dict]]:
    """Memory growth per actor incarnation, by a least-squares line over events applied.

    ``samples``: dicts with ``applied`` (events) and ``procs``: ``{label: {"pid", metric, ...,
    "rows_mb"?}}``; ``rows_mb`` (a shard's PS rows) is subtracted. An incarnation (label, pid)
    is fitted over its samples at or after ``warmup_events`` and at least
    ``restart_warmup_events`` after its first sample (a restarted process warms up again),
    when they span at least ``min_span_events``.

    Returns:
        ``{label: [{"pid", "role", "from_events", "to_events", "samples", "start_mb", "end_mb",
        "mb_per_m_events"}]}`` (MB per million events; None when too short to fit; ``role``
        from the samples, ``"deployment"`` when they carry none).
    """
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    roles: dict[str, str] = {}
    for s in samples:
        for label, p in s["procs"].items():
            if p.get(metric) is None:
                continue
            roles.setdefault(label, p.get("role", "deployment"))
            series.setdefault((label, p["pid"]), []).append((float(s["applied"]), p[metric] - p.get("rows_mb", 0.0)))
    out: dict[str, list[dict]] = {}
    for (label, pid), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[1][0][0])):
        first = pts[0][0]
        use = [(x, y) for x, y in pts if x >= warmup_events and x >= first + restart_warmup_events]
        slope = None
        if len(use) >= 3 and use[-1][0] - use[0][0] >= min_span_events:
            xs, ys = np.asarray([x for x, _ in use]) / 1e6, np.asarray([y for _, y in use])
            slope = float(np.polyfit(xs, ys, 1)[0])
        out.setdefault(label, []).append({
            "pid": pid, "role": roles[label], "from_events": int(use[0][0]) if use else None,
            "to_events": int(use[-1][0]) if use else None,
            "samples": len(use), "start_mb": pts[0][1], "end_mb": pts[-1][1], "mb_per_m_events": slope,
        })
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class _Feed:
    """The feeder's counters (events) and timings (seconds)."""

    posted: int = 0
    requests: int = 0
    retries: int = 0  # 503s and transport errors retried with the same Idempotency-Key
    # Only at the steady rate: calibration feeds as fast as the bound allows, so being held
    # there says nothing about whether the trainer keeps up with --rate.
    backlog_wait_s: float = 0.0
    rate: float | None = None  # steady events/s
    calibrated_rate: float | None = None  # events/s applied while calibrating
    steady_from: int = 0  # events posted when the steady rate began
    errors: list[str] = field(default_factory=list)


class _Soak:
    """One soak run: the deployment's handles, the feeder, the sampler and the kills."""

    def __init__(self, args: argparse.Namespace, cfg, url: str, ray_dir: str, dep):
        import httpx

        self.args, self.cfg, self.url, self.ray_dir, self.dep = args, cfg, url, ray_dir, dep
        self.http = httpx.Client(base_url=url, timeout=60.0)
        self.feed = _Feed()
        self.rng = np.random.default_rng(args.seed)
        p = 1.0 / np.arange(1, args.items + 1) ** 1.05  # Zipf-like item popularity
        self.item_p = p / p.sum()
        self.samples: list[dict] = []
        self.kills: list[dict] = []
        self.latest: dict | None = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._sampler_thread: threading.Thread | None = None
        self._applied_hwm = 0

    # -- HTTP ------------------------------------------------------------------------
    def stats(self, http=None) -> dict | None:
        """``/stats``, or None when it does not answer 200 (a shard restarting)."""
        import httpx

        try:
            r = (http or self.http).get("/stats")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def healthy(self, http) -> bool:
        import httpx

        try:
            return http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def post_batch(self, n: int) -> None:
        """POST ``n`` events with an Idempotency-Key; retried (same key) until acknowledged."""
        import httpx

        users = self.rng.integers(0, self.args.users, n)
        items = self.rng.choice(self.args.items, n, p=self.item_p)
        body = {"events": [{"user_id": int(u), "item_id": int(i)} for u, i in zip(users.tolist(), items.tolist())]}
        key = f"soak-{self.feed.posted}"
        for attempt in range(600):
            try:
                r = self.http.post("/events", json=body, headers={"Idempotency-Key": key})
                if r.status_code == 200:
                    assert r.json()["accepted"] + r.json()["duplicates"] == n, r.text
                    break
                if r.status_code != 503:
                    raise RuntimeError(f"POST /events answered {r.status_code}: {r.text[:300]}")
                why = r.text[:200]
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            self.feed.retries += 1
            if len(self.feed.errors) < 50:
                self.feed.errors.append(f"{time.monotonic() - self.t0:.1f}s: {why}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"POST /events not acknowledged after 600 tries: {why}")
        self.feed.posted += n
        self.feed.requests += 1

    # -- sampling --------------------------------------------------------------------
    def sample(self, http) -> dict | None:
        """One sample: ``/stats`` figures and the memory of every process of the local Ray,
        labelled by actor name and role (see :func:`classify_processes`)."""
        import ray
        from ray._private import (
            state as ray_state,  # the GCS actor table; ray.util.state needs the dashboard
        )

        st = self.stats(http)
        if st is None:
            return None
        try:
            actors = list(ray_state.actors().values())
        except Exception:  # noqa: BLE001 - GCS busy: skip this sample
            return None
        rows_mb: dict[int, float] = {}
        for table in st["memory"].values():
            for shard, m in table.items():
                rows_mb[int(shard)] = rows_mb.get(int(shard), 0.0) + (m.get("bytes") or 0) / 2**20
        procs = {}
        for pid, (label, role) in sorted(classify_processes(os.getpid(), actors).items()):
            mem = proc_memory(pid)
            if mem is None:
                continue
            if label in procs:  # two processes of one label (e.g. a second replica)
                label = f"{label}-{pid}"
            entry = {"pid": pid, "role": role, **mem}
            if label.startswith("ps-shard-"):
                index = int(label.split("-")[2])
                entry["rows_mb"] = rows_mb.get(index, 0.0)
                if index < len(self.dep.ps.shards):  # state beside the rows: per-user recent items
                    with contextlib.suppress(Exception):
                        entry["recent_entries"] = ray.get(self.dep.ps.shards[index].stats.remote(), timeout=2)["recent_entries"]
            procs[label] = entry
        ingest = st["ingest"]
        self._applied_hwm = max(self._applied_hwm, st["events_applied"])
        return {
            "t": time.monotonic() - self.t0,
            "posted": self.feed.posted,
            "accepted": st["events_accepted"],
            # /stats leaves a restarting trainer out of its sums: events applied so far is the
            # high-water mark, so the x axis of the fits never steps back to 0 at a kill.
            "applied": self._applied_hwm,
            "applied_raw": st["events_applied"],
            "dead_lettered": st["dead_lettered"],
            "rows": {t: sum(v.values()) for t, v in st["rows"].items()},
            "ingest_bytes_on_disk": ingest["bytes_on_disk"],
            "ingest_segments": ingest["segments"],
            "loadavg_1m": os.getloadavg()[0],
            "procs": procs,
        }

    def _sampler(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60.0) as http:
            while not self._stop.is_set():
                s = self.sample(http)
                if s is not None:
                    self.samples.append(s)
                    self.latest = s
                self._stop.wait(self.args.sample_s)

    # -- kills -----------------------------------------------------------------------
    def _watch(self, kind: str, actor, pid: int, applied0: int, rec: dict) -> None:
        """Time a killed actor's restart: answering again, then healthy and applying."""
        import httpx
        import ray

        t_kill = rec["t_kill"]
        with httpx.Client(base_url=self.url, timeout=30.0) as http:
            while time.monotonic() - t_kill < self.args.restart_timeout:
                if rec.get("actor_back_s") is None:
                    with contextlib.suppress(Exception):
                        if ray.get(actor.pid.remote(), timeout=1) != pid:
                            rec["actor_back_s"] = time.monotonic() - t_kill
                if rec.get("actor_back_s") is not None and self.healthy(http):
                    st = self.stats(http)
                    if st is not None and (st["events_applied"] > applied0
                                           or st["events_applied"] + st["dead_lettered"] >= st["events_accepted"]):
                        rec["restart_s"] = time.monotonic() - t_kill
                        rec["applied_after"] = st["events_applied"]
                        rec["recovery"] = self._recovery(kind, actor, st, rec)
                        return
                time.sleep(0.1)
        rec["restart_s"] = None  # did not recover within --restart-timeout

    def _log_events_read(self) -> int | None:
        """Events the ingest log has returned to readers since it started (None if it does not answer)."""
        import ray

        with contextlib.suppress(Exception):
            return int(ray.get(self.dep.ingest.stats.remote(), timeout=10)["events_read"])
        return None

    def _recovery(self, kind: str, actor, st: dict, rec: dict) -> dict | None:
        """What the restart cost in counts, not wall time. Trainer: ``log_events_read``, the
        events the ingest log returned between the kill and "applying again" (the restarted
        trainer's replay from its local-state snapshot plus the backlog at the kill, which is
        small: feeding is paused), and its ``recovered_pushes`` (WAL pushes re-sent). Shard:
        its ``persistence()["recovery"]`` (push-log records replayed after its snapshot,
        seconds)."""
        import ray

        with contextlib.suppress(Exception):
            if kind == "trainer":
                t = (st.get("trainers") or [{}])[0]
                now, then = self._log_events_read(), rec.get("log_events_read_at_kill")
                return {"log_events_read": None if now is None or then is None else now - then,
                        "backlog_at_kill": rec["accepted_at_kill"] - rec["applied_at_kill"],
                        "recovered_pushes": t.get("recovered_pushes")}
            return dict(ray.get(actor.persistence.remote(), timeout=10)["recovery"])
        return None

    def kill(self, kind: str, at_fraction: float) -> dict:
        """SIGKILL the trainer (``kind="trainer"``) or shard 0 (``"shard"``) and start timing its
        restart in a thread; returns the record (filled in as it recovers)."""
        import ray

        actor = self.dep.trainers[0] if kind == "trainer" else self.dep.ps.shards[0]
        pid = ray.get(actor.pid.remote(), timeout=60)
        st, deadline = self.stats(), time.monotonic() + self.args.restart_timeout
        while st is None:  # a shard still restarting from the last kill: /stats answers 503
            if time.monotonic() > deadline:
                raise RuntimeError(f"/stats did not answer within --restart-timeout {self.args.restart_timeout:g} s "
                                   f"before killing the {kind}")
            time.sleep(0.5)
            st = self.stats()
        rec = {"kind": kind, "at_fraction": at_fraction, "posted": self.feed.posted, "applied_at_kill": st["events_applied"],
               "accepted_at_kill": st["events_accepted"], "pid": pid, "loadavg_1m": os.getloadavg()[0],
               "t": time.monotonic() - self.t0, "actor_back_s": None, "restart_s": None}
        if kind == "trainer":
            rec["log_events_read_at_kill"] = self._log_events_read()
        rec["t_kill"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rec["thread"] = threading.Thread(target=self._watch, args=(kind, actor, pid, st["events_applied"], rec), daemon=True)
        rec["thread"].start()
        self.kills.append(rec)
        return rec

    # -- feeding ---------------------------------------------------------------------
    def _backlog(self) -> int:
        s = self.latest
        return self.feed.posted - s["applied"] - s["dead_lettered"] if s else 0

    def _wait_backlog(self, *, steady: bool) -> None:
        """Hold the feeder while more than --max-backlog events wait for the trainer; the time
        held counts in ``backlog_wait_s`` when ``steady``."""
        t = time.monotonic()
        while self._backlog() > self.args.max_backlog:
            st = self.stats()
            if st is not None and self.latest is not None:
                self._applied_hwm = max(self._applied_hwm, st["events_applied"])
                self.latest = {**self.latest, "applied": self._applied_hwm, "dead_lettered": st["dead_lettered"]}
            time.sleep(0.5)
        if steady:
            self.feed.backlog_wait_s += time.monotonic() - t

    def run(self, progress) -> None:
        """Feed ``--events`` + ``--tail`` events; at each kill point stop feeding, kill the
        trainer and wait until its restart is timed, then the same for shard 0, then resume."""
        a = self.args
        total = a.events + a.tail
        pending = sorted(round(f * a.events) for f in a.kill_at)
        self._sampler_thread = threading.Thread(target=self._sampler, daemon=True)
        self._sampler_thread.start()
        while self.latest is None:
            time.sleep(0.1)

        def next_batch() -> int:
            n = min(a.batch, total - self.feed.posted)
            if pending and self.feed.posted < pending[0]:  # stop exactly at a kill point
                n = min(n, pending[0] - self.feed.posted)
            return n

        # Calibration: as fast as the backlog bound allows, then 85% of what was applied.
        if not a.rate:
            t_cal, a0 = time.monotonic(), self.latest["applied"]
            while (time.monotonic() - t_cal < a.calibrate_s and self.feed.posted < total
                   and not (pending and self.feed.posted >= pending[0])):
                self._wait_backlog(steady=False)
                n = next_batch()
                self.post_batch(n)
                progress.update(n)
            st = self.stats() or {"events_applied": self.latest["applied"]}
            self.feed.calibrated_rate = (st["events_applied"] - a0) / (time.monotonic() - t_cal)
            self.feed.rate = max(100.0, 0.85 * self.feed.calibrated_rate)
        else:
            self.feed.rate = float(a.rate)
        progress.set_postfix_str(f"{self.feed.rate:,.0f} ev/s")
        self.feed.steady_from = self.feed.posted
        t_ref, posted_ref = time.monotonic(), self.feed.posted
        while True:
            if pending and self.feed.posted >= pending[0]:
                # Feeding pauses here: each restart is timed alone, at the same history.
                at = pending.pop(0) / a.events
                for kind in ("trainer", "shard"):
                    self.kill(kind, at)["thread"].join()
                t_ref, posted_ref = time.monotonic(), self.feed.posted  # steady again from here, no burst
                continue
            if self.feed.posted >= total:
                break
            if self._backlog() > a.max_backlog:
                self._wait_backlog(steady=True)
                t_ref, posted_ref = time.monotonic(), self.feed.posted
            delay = t_ref + (self.feed.posted - posted_ref) / self.feed.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            n = next_batch()
            self.post_batch(n)
            progress.update(n)

    def drain(self) -> tuple[bool, dict]:
        deadline = time.monotonic() + self.args.drain_timeout
        while time.monotonic() < deadline:
            st = self.stats()
            if st is not None and st["events_applied"] + st["dead_lettered"] >= st["events_accepted"]:
                return True, st
            time.sleep(0.5)
        return False, self.stats() or {}

    def close(self) -> None:
        self._stop.set()
        # Ray is shut down next: the sampler must not be inside a Ray call when it goes.
        if self._sampler_thread is not None and self._sampler_thread is not threading.current_thread():
            self._sampler_thread.join(timeout=30)
        self.http.close()


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _restart(x: float | None, unit: str = "") -> str:
    """A restart time; None is an actor that did not recover within --restart-timeout, which
    must not read like a missing figure or a fast restart."""
    return "not recovered" if x is None else f"{x:.1f}{unit}"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report."""
    b, feed, fin, v = report["bench"], report["feed"], report["final"], report["verdict"]
    lines = [
        f"soak: {fin['posted']:,} events posted over HTTP in {fin['wall_s'] / 60:.1f} min "
        f"(steady {_fmt(feed['rate'], ',.0f')} events/s"
        + (f", 85% of the {feed['calibrated_rate']:,.0f} events/s measured first" if feed["calibrated_rate"] else "")
        + f"; {feed['retries']} retried requests, {feed['backlog_wait_s']:.0f} s held by the backlog bound at the steady rate)",
        f"config: {CHEAP}",
        "load average (1 min): " + ", ".join(
            [f"start {_fmt(b['loadavg_start'], '.2f')}"]
            + [f"kill {k['kind']} @{k['posted']:,} {_fmt(k['loadavg_1m'], '.2f')}" for k in report["kills"]]
            + [f"end {_fmt(fin['loadavg_end'], '.2f')}"]),
        "",
    ]
    head = f"{'process':<22} {'pid':>7} {'events from':>12} {'to':>10} {'first MB':>9} {'last MB':>8} {'MB / M events':>14}"
    for role, title in ROLES.items():
        incs = [(label, g) for label, gs in report["growth"]["rss"].items() for g in gs if g.get("role", "deployment") == role]
        if not incs:
            continue
        lines += [title, head, "-" * len(head)]
        for label, g in incs:
            lines.append(f"{label:<22} {g['pid']:>7} {_fmt(g['from_events'], ',d'):>12} {_fmt(g['to_events'], ',d'):>10} "
                         f"{g['start_mb']:>9.1f} {g['end_mb']:>8.1f} {_fmt(g['mb_per_m_events'], '+.1f'):>14}")
        lines += ["-" * len(head), ""]
    lines.append("(RSS; a shard's PS rows (/stats memory bytes) subtracted; growth = least-squares slope over events "
                 "applied after warm-up, per process incarnation; '-' = too short a span to fit)")
    lines.append(f"ingest log on disk: {fin['ingest_bytes_on_disk'] / 2**20:.1f} MB in {fin['ingest_segments']} segments "
                 f"at the end (max {report['growth']['ingest_disk_max_mb']:.1f} MB during the run); "
                 f"PS rows: {fin['rows']}")
    lines.append("")
    head = f"{'kill':<8} {'at events':>10} {'actor back s':>13} {'applying again s':>17} {'re-read / replayed':>19}"
    lines += [head, "-" * len(head)]
    for k in report["kills"]:
        r = k.get("recovery") or {}
        redo = r.get("log_events_read") if k["kind"] == "trainer" else r.get("replayed")
        lines.append(f"{k['kind']:<8} {k['posted']:>10,} {'never' if k['actor_back_s'] is None else format(k['actor_back_s'], '.1f'):>13} {_restart(k['restart_s']):>17} "
                     f"{_fmt(redo, ',d'):>19}")
    lines.append("-" * len(head))
    if any(k["restart_s"] is None for k in report["kills"]):
        lines.append(f"(not recovered: not applying again within --restart-timeout {report['bench'].get('restart_timeout', 0):g} s; "
                     "never: the actor did not answer again)")
    lines.append("(re-read: events the ingest log returned to the restarted trainer until it applied again, i.e. its "
                 "replay from its snapshot plus the backlog at the kill; replayed: push-log records the restarted "
                 "shard replayed after its snapshot)")
    lines.append(f"accepted {fin['events_accepted']:,} == applied {fin['events_applied']:,} + dead-lettered "
                 f"{fin['dead_lettered']:,}: {'yes' if v['exactly_once'] else 'NO'} (posted {fin['posted']:,}; drained: {fin['drained']})")
    lines.append(f"worst growth of a deployment actor after warm-up: {_fmt(v['worst_mb_per_m'], '+.1f')} MB per million "
                 f"events ({v['worst_label']}); goal <= {GOAL_MB_PER_M:g}: {'MET' if v['memory_met'] else 'MISSED'}")
    lines.append(f"ingest log growth: {', '.join(_fmt(x, '+.1f') for x in v['ingest_mb_per_m']) or '-'} MB per million events; "
                 f"flat (<= {INGEST_FLAT_MB_PER_M:g}): {'yes' if v['ingest_flat'] else 'NO'}")
    lines.append("restart times (applying again), last kill point vs first: " + ", ".join(
        f"{kind} {_restart(r.get('first'), ' s')} -> {_restart(r.get('last'), ' s')} "
        f"({'same within noise' if r.get('flat') else 'GROWING' if r.get('flat') is False else '-'})"
        for kind, r in v["restarts"].items())
        + f"  [noise allowance: last <= {RESTART_NOISE[0]:g} x first + {RESTART_NOISE[1]:g} s]")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``soak.json`` and ``soak.png`` (RSS per actor over events; restart times) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "soak.json", out / "soak.png"
    json_path.write_text(json.dumps(report, indent=1, default=str))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    roles = {label: p.get("role", "deployment") for s in report["samples"] for label, p in s["procs"].items()}
    style = {"deployment": {"ls": "-", "lw": 1.2, "alpha": 1.0}, "serve": {"ls": "--", "lw": 0.9, "alpha": 0.8},
             "ray": {"ls": ":", "lw": 0.9, "alpha": 0.7}}
    suffix = {"deployment": "", "serve": " [Serve system]", "ray": " [Ray daemon]"}
    for label in sorted(roles, key=lambda x: (list(ROLES).index(roles[x]) if roles[x] in ROLES else 9, x)):
        pts = [(s["applied"] / 1e6, s["procs"][label]["rss_mb"] - s["procs"][label].get("rows_mb", 0.0))
               for s in report["samples"] if label in s["procs"]]
        if pts:
            ax1.plot(*zip(*pts), marker=".", ms=2, **style.get(roles[label], style["ray"]),
                     label=label + (" (minus PS rows)" if label.startswith("ps-shard") else "") + suffix.get(roles[label], ""))
    disk = [(s["applied"] / 1e6, s["ingest_bytes_on_disk"] / 2**20) for s in report["samples"]]
    if disk:
        ax1.plot(*zip(*disk), ":", color="gray", label="ingest log on disk (MB)")
    for k in report["kills"]:
        ax1.axvline(k["applied_at_kill"] / 1e6, color="red" if k["kind"] == "trainer" else "purple", lw=0.8, alpha=0.6)
    ax1.set_xlabel("events applied (millions); red/purple lines: trainer/shard killed")
    ax1.set_ylabel("resident memory (MB)")
    ax1.set_title(f"RSS per process (solid: Freshet actors, the goal's; load avg {report['bench']['loadavg_start']:.1f} at start)",
                  fontsize=10)
    ax1.legend(fontsize=7, loc="center right", ncol=2)
    kinds = ["trainer", "shard"]
    points = sorted({k["at_fraction"] for k in report["kills"]})
    width = 0.8 / max(1, len(points))
    # An actor that never recovered gets a hatched bar as tall as the time it was given (its
    # restart took longer than that): a 0 s bar would read as the fastest restart.
    given = report["bench"].get("restart_timeout") or max((k["restart_s"] or 0.0 for k in report["kills"]), default=1.0)
    failed_any = False
    for j, f in enumerate(points):
        recs = [next((k for k in report["kills"] if k["kind"] == kind and k["at_fraction"] == f), None) for kind in kinds]
        failed = [r is not None and r["restart_s"] is None for r in recs]
        failed_any |= any(failed)
        heights = [given if bad else (r["restart_s"] if r is not None else 0.0) for r, bad in zip(recs, failed)]
        posted = next((k["posted"] for k in report["kills"] if k["at_fraction"] == f), 0)
        color = f"C{j}"
        bars = ax2.bar(np.arange(len(kinds)) + (j - (len(points) - 1) / 2) * width, heights, width, color=color,
                       label=f"at {posted / 1e6:.2f}M events")
        for patch, bad in zip(bars, failed):
            if bad:
                patch.set_facecolor("none")
                patch.set_edgecolor(color)
                patch.set_hatch("//")
        ax2.bar_label(bars, labels=["" if r is None else f"not recovered\n(> {given:g} s)" if bad else f"{r['restart_s']:.1f}"
                                    for r, bad in zip(recs, failed)], fontsize=8)
    if failed_any:
        ax2.set_ylim(top=ax2.get_ylim()[1] * 1.15)  # room for the two-line "not recovered" label
    ax2.set_xticks(np.arange(len(kinds)), kinds)
    ax2.set_ylabel("seconds until applying again")
    ax2.set_title("restart time after SIGKILL" + ("\n(hatched: not recovered within --restart-timeout)" if failed_any else ""),
                  fontsize=10 if failed_any else None)
    if points:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Goals met or missed. Only role ``"deployment"`` processes decide the memory goal."""
    fin = report["final"]
    rss = report["growth"]["rss"]
    slopes = [(g["mb_per_m_events"], label) for label, incs in rss.items() for g in incs
              if g["mb_per_m_events"] is not None and g.get("role", "deployment") == "deployment"]
    worst = max(slopes) if slopes else (None, None)
    ingest = [g["mb_per_m_events"] for g in rss.get("ingest-log", []) if g["mb_per_m_events"] is not None]
    restarts: dict[str, dict] = {}
    for kind in ("trainer", "shard"):
        ks = [k for k in report["kills"] if k["kind"] == kind]
        if ks:
            first, last = ks[0]["restart_s"], ks[-1]["restart_s"]
            flat = None
            if len(ks) > 1 and first is not None and last is not None:
                flat = last <= RESTART_NOISE[0] * first + RESTART_NOISE[1]
            restarts[kind] = {"first": first, "last": last, "at": [k["posted"] for k in ks],
                              "all": [k["restart_s"] for k in ks], "flat": flat}
    return {
        "exactly_once": bool(fin["drained"]) and fin["events_accepted"] == fin["events_applied"] + fin["dead_lettered"]
        and fin["events_accepted"] == fin["posted"],
        "worst_mb_per_m": worst[0],
        "worst_label": worst[1],
        "memory_met": worst[0] is not None and worst[0] <= GOAL_MB_PER_M,
        "ingest_mb_per_m": ingest,
        "ingest_flat": bool(ingest) and all(x <= INGEST_FLAT_MB_PER_M for x in ingest),
        "restarts": restarts,
        "all_recovered": all(k["restart_s"] is not None for k in report["kills"]),
    }


# --------------------------------------------------------------------------- CLI


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``growth`` and ``verdict`` of ``report`` from its ``samples``, ``kills``,
    ``final`` and ``growth["fit"]`` (in place; returned). Used by a run and by ``--reanalyse``.

    Samples written before ``applied_raw`` was recorded get the same x axis as a run now has:
    the high-water mark of ``applied`` (``/stats`` leaves a restarting trainer out of its sums).
    """
    hwm = 0
    for s in report["samples"]:
        if "applied_raw" not in s:
            s["applied_raw"] = s["applied"]
            hwm = max(hwm, s["applied"])
            s["applied"] = hwm
    fit = report["growth"]["fit"]
    report["growth"] = {
        "rss": growth(report["samples"], **fit), "anon": growth(report["samples"], metric="anon_mb", **fit),
        "fit": fit, "roles": ROLES,
        "ingest_disk_max_mb": max((s["ingest_bytes_on_disk"] for s in report["samples"]), default=0) / 2**20,
    }
    report["verdict"] = _verdict(report)
    return report


def _fractions(text: str) -> list[float]:
    """``--kill-at``: comma-separated numbers; their range depends on --events and --tail, so
    :func:`_parse` checks it once both are known."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated fractions of --events, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a kill point is given twice: {text}")
    return values


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    seconds = at_least(0.001, float)  # 0 would spin (--sample-s) or give up at once (timeouts)
    p.add_argument("--events", type=at_least(1), default=2_000_000, help="events to post before the last kill (default 2,000,000)")
    p.add_argument("--rate", type=at_least(0, float), default=0.0,
                   help="steady feed rate (events/s); 0 (default): 85%% of the rate measured while calibrating")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/results/)")
    p.add_argument("--batch", type=at_least(1), default=1000, help="events per POST /events (default 1000)")
    # Below 1 the feeder waits for a backlog that can never be reached: it would hang.
    p.add_argument("--max-backlog", type=at_least(1), default=30_000,
                   help="most accepted events waiting for the trainer (default 30,000)")
    p.add_argument("--calibrate-s", type=seconds, default=60.0, help="seconds of calibration when --rate is 0 (default 60)")
    p.add_argument("--kill-at", type=_fractions, default=[0.5, 1.0],
                   help="fractions of --events at which the trainer, then shard 0, are killed, each in "
                        "(0, 1 + tail/events] (default 0.5,1.0)")
    p.add_argument("--tail", type=at_least(0), default=None, help="events posted after the last kill point (default 1%% of --events, >= 2000)")
    p.add_argument("--users", type=at_least(1), default=20_000, help="distinct users (default 20,000)")
    p.add_argument("--items", type=at_least(1), default=5_000, help="distinct items, Zipf popularity (default 5,000)")
    p.add_argument("--sample-s", type=seconds, default=5.0, help="seconds between memory samples (default 5)")
    p.add_argument("--warmup", type=fraction(zero=True), default=0.2,
                   help="share of --events before growth is fitted, in [0, 1] (default 0.2)")
    p.add_argument("--restart-timeout", type=seconds, default=300.0, help="seconds a killed actor has to recover (default 300)")
    p.add_argument("--drain-timeout", type=seconds, default=600.0, help="seconds to wait for the final drain (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reanalyse", type=Path, default=None, metavar="SOAK_JSON",
                   help="run nothing: recompute growth and verdicts of a saved soak.json, write soak.json/soak.png to --out")
    args = p.parse_args(argv)
    if args.reanalyse is not None and not args.reanalyse.is_file():
        p.error(f"--reanalyse: {args.reanalyse} is not a file")
    if args.tail is None:
        args.tail = max(2000, args.events // 100)
    # A kill point past --events + --tail is never reached (the feeder stops first), and one
    # at 0 kills before anything was fed.
    top = 1 + args.tail / args.events
    bad = [f for f in args.kill_at if not (math.isfinite(f) and 0 < f <= top)]
    if bad:
        p.error(f"argument --kill-at: each fraction must be in (0, {top:g}] (1 + --tail / --events), "
                f"got {', '.join(format(f, 'g') for f in bad)}")
    # The kills trigger at round(fraction x --events) events: fractions that round to the same
    # count would kill twice there, and one that rounds to 0 before anything was fed.
    at = [round(f * args.events) for f in args.kill_at]
    if min(at) < 1 or len(set(at)) < len(at):
        p.error(f"argument --kill-at: the kill points fall at events {at} of --events {args.events}: each must be "
                "at a different event, after the first")
    return args


def _write_interrupted(args: argparse.Namespace, soak: _Soak | None, load_start: float, t_start: float) -> Path | None:
    """After Ctrl-C: what was measured so far, in ``<out>/soak-interrupted.json`` (apart from
    ``soak.json``, so a partial run never replaces a complete one); None when there was nothing."""
    if soak is None or not soak.samples:
        return None
    path = args.out / "soak-interrupted.json"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "bench": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "loadavg_start": load_start},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "interrupted_after_s": time.monotonic() - t_start,
        "feed": dict(vars(soak.feed)),
        "samples": soak.samples,
        "kills": [{k: v for k, v in r.items() if k not in ("thread", "t_kill")} for r in soak.kills],
    }, indent=1, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when exactly-once held, every killed actor recovered, the deployment's
    memory met the goal and the ingest log was flat."""
    args = _parse(argv)
    if args.reanalyse is not None:
        report = analyse(json.loads(args.reanalyse.read_text()))
        json_path, png_path = write_report(report, args.out)
        print(format_table(report))
        print(f"\nwrote {json_path} and {png_path}")
        v = report["verdict"]
        return 0 if v["exactly_once"] and v["all_recovered"] and v["memory_met"] and v["ingest_flat"] else 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    from tqdm import tqdm

    from serving import deploy, ray_head

    work = Path(tempfile.mkdtemp(prefix="freshet-soak-"))
    port = ray_head.free_port()
    cfg = soak_config(str(work), f"bench-soak-{os.getpid()}", port)
    url = f"http://127.0.0.1:{port}"
    ray_dir = ray_temp_dir("frs")  # short: socket paths
    load_start = os.getloadavg()[0]
    print(f"bench.soak: {args.events:,} events (+{args.tail:,} after the last kill) against {url}; {CHEAP}; "
          f"state in {work}; load average {load_start:.2f}", flush=True)
    t_start = time.monotonic()
    # A head as `freshet up` starts one: `ray start --head` on loopback, free ports (so it does
    # not collide with another Ray on the host), token auth with its own token file.
    try:
        head = ray_head.start_head(ray_dir, num_cpus=2, system_config=cfg.ray.system_config(), avoid=(port,))
    except KeyboardInterrupt:  # start_head stopped the head it was waiting for
        shutil.rmtree(work, ignore_errors=True)
        print(f"\ninterrupted while starting the Ray head: stopped it, removed {work}; "
              f"nothing kept but Ray's logs in {ray_dir}", file=sys.stderr)
        return 130
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in ray_head.client_env(head)}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    soak = None
    interrupted = False
    try:
        ray_head.apply_client_env(head)
        ray.init(address=head.address, namespace=cfg.namespace, log_to_driver=False)
        dep = deploy.start(cfg, autostart=True)  # durable: WALs, snapshots, shard logs under work/
        soak = _Soak(args, cfg, url, ray_dir, dep)
        with tqdm(total=args.events + args.tail, unit="ev", unit_scale=True, desc="soak", mininterval=2.0) as bar:
            soak.run(bar)
        drained, st = soak.drain()
        last = soak.sample(soak.http)
        if last is not None:
            soak.samples.append(last)
        soak.close()
        final = {
            "posted": soak.feed.posted, "drained": drained, "wall_s": time.monotonic() - t_start,
            "events_accepted": st.get("events_accepted"), "events_applied": st.get("events_applied"),
            "dead_lettered": st.get("dead_lettered"), "duplicates": st.get("ingest", {}).get("duplicates"),
            "rows": st.get("rows"), "ingest_bytes_on_disk": st.get("ingest", {}).get("bytes_on_disk", 0),
            "ingest_segments": st.get("ingest", {}).get("segments", 0), "loadavg_end": os.getloadavg()[0],
            "trainer_errors": [t.get("error") for t in st.get("trainers", []) if t.get("error")][:3],
        }
        del dep
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with sigint_deferred():
            if interrupted:
                print("\ninterrupted: stopping the Ray head and removing the soak's state ...", file=sys.stderr, flush=True)
            try:
                if soak is not None:
                    soak.close()
                # No serve.shutdown(): this Ray is private to the run, and its shutdown ends Serve's
                # actors with it (a graceful Serve shutdown only adds seconds).
                ray.shutdown()
            finally:
                ray_head.stop_head(head)  # exactly this head's processes (its session), never `ray stop`
                for k, v in saved_env.items():  # leave the caller's environment (a test's process) as it was
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                ray_head.apply_env({k: v for k, v in saved_env.items() if v is not None})
                ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
                shutil.rmtree(work, ignore_errors=True)  # the log, WALs and snapshots: not needed after the run
    if interrupted:
        kept = _write_interrupted(args, soak, load_start, t_start)
        print(f"interrupted after {soak.feed.posted if soak else 0:,} events posted: stopped the Ray head and removed "
              f"{work}; kept " + (f"{kept} (the samples and kills so far; no fit, no verdict) and " if kept else "")
              + f"Ray's logs in {head.temp_dir}", file=sys.stderr)
        return 130
    fit = {"warmup_events": args.warmup * args.events, "restart_warmup_events": 0.1 * args.events,
           "min_span_events": 0.15 * args.events}
    kills = [{k: v for k, v in r.items() if k not in ("thread", "t_kill")} for r in soak.kills]
    report = {
        "bench": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "loadavg_start": load_start, "ray_num_cpus": 2, "cheap_config": CHEAP},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine("ray"),
        "config": cfg.model_dump(mode="json"),
        "feed": {k: v for k, v in vars(soak.feed).items()},
        "samples": soak.samples,
        "kills": kills,
        "growth": {"fit": fit},
        "final": final,
    }
    analyse(report)
    json_path, png_path = write_report(report, args.out)
    print()
    print(format_table(report))
    print(f"\nwrote {json_path} and {png_path}")
    v = report["verdict"]
    return 0 if v["exactly_once"] and v["all_recovered"] and v["memory_met"] and v["ingest_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
