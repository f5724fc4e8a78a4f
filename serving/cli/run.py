"""``freshet run``: the main job. It starts the whole system, replays a stream through
``POST /events`` (the closed loop: HTTP → durable ingest log → trainers → PS → /rank)
with a progress bar, and prints a summary of throughput, prequential quality,
freshness and ranking latency.

Prequential quality is measured by the trainers (``evaluate=True``) as ``freshet eval`` and
``freshet eval --live`` measure it (:func:`workers.eval.protocol.progressive_ranks`): every
positive ``freshet eval`` would rank (its user had a positive in an earlier chunk of 20
positives, :class:`workers.eval.protocol.WarmChunks`) is ranked (top-20, the user's earlier
positives excluded, their latest ones as session context) with the model as of before its mini-batch,
the seen items and context updated event by event within the batch as read-your-writes gives
a live client; recall@10, recall@20 and NDCG@10 of the model and of the all-time popularity
baseline (the PS's interaction counts, each positive counted with its confidence) over the
same events."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from serving.cli._common import add_config_argument, add_data_arguments, load, print_table, ray_init
from serving.config import FreshetConfig
from workers.config import StreamKind

__all__ = ["add_parser", "cmd_run"]


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

        from workers.trainer import applied_position

        return applied_position(ray.get([t.stats.remote() for t in self.trainers]), self.cfg)

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
                    types = batch.column("event_type").to_pylist() if "event_type" in batch.schema.names else [None] * len(ws)
                    eids = batch.column("event_id").to_pylist() if "event_id" in batch.schema.names else [None] * len(ws)
                    body = {"events": [
                        {k: v for k, v in {"user_id": u, "item_id": i, "timestamp": t, "weight": w, "event_type": et, "event_id": ei}.items()
                         if v is not None}
                        for u, i, t, w, et, ei in zip(users, items, ts, ws, types, eids)
                    ]}
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


def _summary_rows(
    stats: list[dict],
    feeder_ms: list[float],
    after_ms: list[float],
    wall_s: float,
    *,
    quarantined: int,
    quarantine_file: str | Path | None,
    http: bool = True,
) -> list[tuple[str, str]]:
    """The summary table's (label, value) rows: trainer ``stats``, /rank latencies (ms)
    sampled while feeding and after training, the wall time (seconds), and the rows the
    stream's file source rejected (``quarantined``, written to ``quarantine_file``);
    ``http``: the events went through ``POST /events`` (not ``--direct``)."""
    m: dict[str, float] = {}
    for s in stats:
        for k, v in s["metrics"].items():
            m[k] = m.get(k, 0) + v
    applied = sum(s["events_applied"] for s in stats)
    n_ev = int(m.get("eval_events", 0))
    ev = max(1, n_ev)
    q = {who: {k: m.get(f"{who}_{k}", 0) / ev for k in ("hits@10", "hits@20", "ndcg@10")} for who in ("model", "popular")}
    model_r, pop_r = q["model"]["hits@10"], q["popular"]["hits@10"]
    fr50 = max((s["freshness_ms"]["p50"] or 0) for s in stats)
    fr99 = max((s["freshness_ms"]["p99"] or 0) for s in stats)
    lat = np.asarray(feeder_ms + after_ms) if (feeder_ms or after_ms) else np.asarray([np.nan])
    if not quarantined:
        rejected = "0"
    elif quarantine_file is not None:
        rejected = f"{quarantined:,} (see {quarantine_file})"
    else:
        rejected = f"{quarantined:,} (no quarantine file was written)"
    return [
        ("events trained", f"{applied:,}"),
        ("quarantined rows", rejected),
        ("throughput", f"{applied / max(wall_s, 1e-9):,.0f} events/s (wall{', incl. HTTP ingest' if http else ''})"),
        ("trainer device", ", ".join(sorted({s['device'] for s in stats}))),
        ("prequential model recall@10 / @20 / NDCG@10",
         f"{model_r:.4f} / {q['model']['hits@20']:.4f} / {q['model']['ndcg@10']:.4f}  over {n_ev:,} warm positives "
         f"({int(m.get('cold_events', 0)):,} cold)"),
        ("prequential popularity (all-time counts)", f"{pop_r:.4f} / {q['popular']['hits@20']:.4f} / {q['popular']['ndcg@10']:.4f}"),
        ("model / popularity (recall@10)", f"{model_r / pop_r:.2f}x" if pop_r else "n/a"),
        ("freshness ack->applied p50 / p99", f"{fr50:.0f} / {fr99:.0f} ms"),
        ("/rank latency p50 / p99", f"{np.nanpercentile(lat, 50):.1f} / {np.nanpercentile(lat, 99):.1f} ms over {len(lat)} requests"),
    ]


def cmd_run(args) -> int:
    """The main job: run the whole loop on a stream and print the summary table. Its ingest
    log and PS state live in a temp dir, removed after a run that succeeded (unless ``--keep``
    or the run's quarantine file is in it) and kept, and named, after one that failed."""
    import shutil

    if args.json:  # checked now, not after the whole run
        out = Path(args.json)
        if out.is_dir() or not out.absolute().parent.is_dir():
            print(f"freshet run: --json: {args.json} is a directory or its directory does not exist", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="freshet-run-"))
    keep = [bool(args.keep)]
    try:
        rc = _run(args, work, keep)
    except BaseException:
        if any(work.iterdir()):
            print(f"freshet run: its ingest log and state are kept in {work}", file=sys.stderr)
        else:  # refused before anything was written (a bad config, file or flag)
            shutil.rmtree(work, ignore_errors=True)
        raise
    if rc == 0 and keep[0]:
        print(f"kept the run's ingest log and state in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rc


def _run(args, work: Path, keep: list[bool]) -> int:
    """:func:`cmd_run` in ``work``; sets ``keep[0]`` when a file the summary names is in it."""
    import httpx
    import ray
    from tqdm import tqdm

    from serving import deploy
    from workers.streams import open_source
    from workers.trainer import applied_position

    base = load(args)
    ns = f"{base.namespace}-run-{os.getpid()}"
    stream_overrides = {} if args.direct else {"kind": StreamKind.INGEST.value}
    # A throwaway run keeps its log and state together in a local temp dir, whatever the config says.
    cfg = load(args, {"namespace": ns, "ingest": {"dir": str(work), "state_dir": None}, "stream": stream_overrides})
    # Rows the model cannot train (e.g. an MSE rating outside model.rating_range) are quarantined
    # here, where the file is read, rather than refused one HTTP batch at a time.
    source = open_source(base.stream, quarantine_path=base.stream.quarantine_path or work / "quarantine.arrow",
                         model=base.model)
    total = base.stream.num_events if base.stream.num_events is not None else source.end_offset
    if total is None:
        print("freshet run: the stream is unbounded; pass --events N", file=sys.stderr)
        return 2
    total = min(total, source.end_offset or total)
    print(f"freshet run: {base.stream.kind.value} stream, {total:,} events, "
          f"{cfg.ps.num_shards} shards, {cfg.trainer.num_workers} trainer(s), ingest log in {work}")
    ray_init(args.address, ns, system_config=cfg.ray.system_config())
    if args.address and deploy.serves_freshet():
        from serving.app import APP_NAME

        ray.shutdown()
        print(f"freshet run: a Freshet app ({APP_NAME!r}) already runs on the Ray cluster at {args.address}; "
              "run without --address (a local Ray of its own) or where no Freshet service runs", file=sys.stderr)
        return 2
    try:
        # Keep ``dep``: a non-detached actor is collected once its last handle is gone.
        dep = deploy.start(cfg, evaluate=True, max_events=total, require_fit=not args.address)
        url, trainers = dep.url, dep.trainers
        t_start = time.time()
        dep.start_training()
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
                read = applied_position(stats, cfg)
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
        if args.direct:
            # Every trainer loads the whole file and rejects the same rows: one count, not the
            # sum, and trainer 0's quarantine file holds them all.
            quarantined = max((s.get("quarantined", 0) for s in stats), default=0)
            qfile = cfg.stream.quarantine_path or str(cfg.ingest.local_state_dir() / "quarantine-0.arrow")
        else:
            # The trainers read the ingest log, which holds only valid events; the file was read here.
            quarantined, qfile = source.quarantined, source.quarantine_file
        if quarantined and qfile is not None and Path(qfile).absolute().is_relative_to(work.absolute()):
            keep[0] = True  # the summary points at it
        rows = _summary_rows(
            stats, feeder.rank_ms if feeder else [], after_ms, wall, quarantined=quarantined, quarantine_file=qfile,
            http=not args.direct,
        )
        # `dep` is kept until ray.shutdown() below: dropping it first ended the shards while the
        # replica's mirror sync still called them (a "(raylet) Task PSShard.delta failed" line).
        print()
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": dict(rows), "trainers": stats}, indent=2, default=str))
        return 0
    finally:
        if args.address:
            # Someone else's cluster: remove this run's app and actors, and Serve only when no
            # other app uses it.
            with contextlib.suppress(Exception):
                deploy.stop(cfg)
        # A Ray of our own goes whole with ray.shutdown(), Serve included. serve.shutdown()
        # first would add nothing but a raylet error line at the end of every run: its
        # graceful_shutdown call waits for the controller to kill itself, and fails when it does.
        ray.shutdown()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet run``."""
    r = sub.add_parser("run", help="run the whole loop on a stream and print a summary")
    add_config_argument(r)
    add_data_arguments(r)
    r.add_argument("--address", type=str.strip, help="join this Ray cluster instead of starting a local one")
    r.add_argument("--direct", action="store_true", help="trainers read the stream directly instead of via POST /events")
    r.add_argument("--json", help="also write the summary as JSON to this file")
    r.add_argument("--keep", action="store_true",
                   help="keep the run's ingest log and PS state (a temp dir, named at the start) after it succeeds")
    r.set_defaults(fn=cmd_run)
