"""Live evaluation: the prequential protocol through a running service over HTTP
(``freshet eval --live --rate R``), beside the offline protocol on the same stream.

The stream is the one ``freshet eval`` reads (same source, same ``min_weight`` filter, same
cap on events), replayed in chunks of ``chunk_size`` events at ``rate`` events/s. For each
chunk, as a client of the service would see it:

1. every event whose user appeared in an *earlier* chunk is ranked first: one
   ``POST /rank`` (``k=20``, ``exclude_seen``) per distinct such user, all of the chunk's
   requests in flight at once; the event's item's position is its hit rank (recall@10,
   recall@20, NDCG@10 as in :mod:`workers.eval.protocol`). Ranking happens *before* the
   chunk is posted and *after* the previous chunk's ``POST /events`` answered 200, so the
   service is measured on exactly what a user would get: nothing waits for the trainers.
2. the popularity baseline ranks the same events in the same loop: all-time interaction
   counts of the events posted so far, kept by this client, the user's earlier items
   excluded -- the offline ``popularity`` strategy's own code (:class:`PopularityStrategy`),
   so its figures equal the offline harness's exactly on the same stream;
3. the chunk is posted (``POST /events``, one request, with an ``Idempotency-Key`` so a
   retry after a 503 appends nothing twice);
4. the loop waits until the chunk's scheduled time (``offset / rate`` seconds after the
   start); a client that falls behind the schedule goes on at once, and the report gives
   the rate achieved.

The offline side is :func:`workers.eval.compare.run_eval` with ``incremental`` and
``popularity`` on the same stream (rank, then learn, synchronously), run after the live
replay so the two never compete for CPU. The report (``live.json``, ``live.md``,
``live.png``) puts both side by side with the issue's target (live recall@10 >= 0.98x
offline at 50 events/s, >= 0.95x at 500) and the live run's diagnostics: popular
fallbacks served to warm users (and why), the trainers' lag sampled from ``/stats``,
request latencies and the machine's load.

Against a service this function starts itself (``url=None``: :func:`serving.deploy.start`
on the connected or a new local Ray, torn down afterwards), both sides start from nothing.
Against ``url`` (a service someone else runs, with its ``token``), the live side starts from
whatever that service already learned; the comparison is apples to apples only for a fresh
service with the same config.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ps.ids import ID, ids_from_arrow
from serving.ray_head import free_port
from workers.config import StreamKind
from workers.eval.protocol import DEPTH, EvalResult, hit_rank, windowed_recall
from workers.eval.strategies import Chunk, PopularityStrategy
from workers.ranking import Ranked

if TYPE_CHECKING:
    from serving.config import FreshetConfig

__all__ = ["LIVE_TARGETS", "load_offline_report", "run_live", "target_for"]

LIVE_TARGETS = ((500.0, 0.95), (50.0, 0.98))
"""``(rate events/s, live/offline recall@10 goal)``: the goal for a rate is that of the largest
listed rate at or below it (0.98 up to 500 events/s, 0.95 from 500 on)."""

_RETRIES = 8  # tries of a request answered 503 (Retry-After) or not answered at all


def target_for(rate: float) -> float:
    """The live/offline recall@10 goal at ``rate`` events/s (see :data:`LIVE_TARGETS`)."""
    for r, goal in LIVE_TARGETS:
        if rate >= r:
            return goal
    return LIVE_TARGETS[-1][1]




def _event_json(u, i, t, w, et, ei) -> dict[str, Any]:
    ev = {"user_id": u, "item_id": i, "timestamp": t, "weight": w}
    if et is not None:
        ev["event_type"] = et
    if ei is not None:
        ev["event_id"] = ei
    return ev


def _ranked(body: dict) -> Ranked:
    return Ranked([it["item_id"] for it in body["items"]], [it["score"] for it in body["items"]], body["fallback"])


class _Replay:
    """One live replay: the client state of the protocol (module docstring)."""

    def __init__(self, cfg: FreshetConfig, source, total: int, *, url: str, token: str | None, rate: float,
                 chunk_size: int, progress: bool, stats_every_s: float = 1.0, score_from: int = 0):
        self.cfg, self.source, self.total = cfg, source, total
        self.score_from = score_from
        self.warmup_s: float | None = None  # seconds to post the warm-up and let the trainers apply it
        self.url, self.token, self.rate, self.chunk_size = url.rstrip("/"), token, rate, chunk_size
        self.progress, self.stats_every_s = progress, stats_every_s
        self.live = EvalResult("live", {"url": self.url, "rate": rate})
        self.pop = PopularityStrategy(cfg)
        self.fallbacks: dict[str, int] = {}
        self.rank_ms: list[float] = []
        self.events_ms: list[float] = []
        self.retries = 0
        self.lag: list[tuple[float, float | None, float | None]] = []  # (t s, backlog events, lag s)
        self.behind_s = 0.0  # largest delay behind the schedule (seconds)
        self.scored_chunks = 0  # chunks of the timed replay (warm-up chunks are never ranked)

    async def _request(self, http, path: str, body: dict, headers: dict | None = None) -> dict:
        import httpx

        last = None
        for attempt in range(_RETRIES):
            try:
                r = await http.post(path, json=body, headers=headers)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code != 503:
                    raise RuntimeError(f"POST {self.url}{path}: {r.status_code} {r.text[:300]}")
                last = f"503 {r.text[:200]}"
            self.retries += 1
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
        raise RuntimeError(f"POST {self.url}{path}: no answer after {_RETRIES} tries (last: {last})")

    async def _rank(self, http, user: ID) -> tuple[Ranked, dict]:
        t0 = time.perf_counter()
        body = await self._request(http, "/rank", {"user_id": user, "k": DEPTH, "exclude_seen": True})
        self.rank_ms.append((time.perf_counter() - t0) * 1000.0)
        return _ranked(body), body

    async def _sample_stats(self, http, t_start: float) -> None:
        while True:
            try:
                r = await http.get("/stats")
                if r.status_code == 200:
                    s = r.json()
                    lags = list(s.get("lag", {}).values())
                    backlog = sum(x["lag_events"] or 0 for x in lags) if lags else None
                    lag_s = max((x["lag_s"] or 0.0 for x in lags), default=None)
                    self.lag.append((time.monotonic() - t_start, backlog, lag_s))
            except Exception:  # noqa: BLE001 - diagnostics only: a missed sample is not an error
                pass
            await asyncio.sleep(self.stats_every_s)

    async def _backlog(self, http) -> int | None:
        """Events the service accepted that its trainers have not applied yet (None: unknown)."""
        r = await http.get("/stats")
        if r.status_code != 200:
            return None
        lags = list(r.json().get("lag", {}).values())
        return sum(x["lag_events"] or 0 for x in lags) if lags else None

    async def _warm_up(self, http, known: set, seen: dict, catalogue: set) -> int:
        """Post the events before ``score_from`` as fast as the service takes them (nothing is
        ranked), then wait until the trainers have applied them; returns the next offset."""
        t0 = time.monotonic()
        offset = 0
        while offset < self.score_from:
            raw = self.source.read(offset, min(self.chunk_size, self.score_from - offset))
            if raw.num_rows == 0:
                break
            chunk = Chunk.from_batch(raw)
            await self._request(http, "/events", {"events": self._events(raw)}, {"Idempotency-Key": f"live-{uuid.uuid4().hex}"})
            self.pop.learn(chunk)
            for u, i in zip(chunk.users.tolist(), chunk.items.tolist()):
                known.add(u)
                seen.setdefault(u, {})[i] = None
                catalogue.add(i)
            offset = int(chunk.offsets[-1]) + 1
        deadline = time.monotonic() + 600.0
        while time.monotonic() < deadline:
            if await self._backlog(http) == 0:
                break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"warm-up: the trainers did not apply the {offset:,} warm-up events within 600 s")
        self.warmup_s = time.monotonic() - t0
        return offset

    @staticmethod
    def _events(raw) -> list[dict[str, Any]]:
        return [
            _event_json(u, i, t, w, et, ei)
            for u, i, t, w, et, ei in zip(
                ids_from_arrow(raw.column("user_id")).tolist(), ids_from_arrow(raw.column("item_id")).tolist(),
                raw.column("timestamp").to_pylist(), raw.column("weight").to_pylist(),
                raw.column("event_type").to_pylist(), raw.column("event_id").to_pylist())
        ]

    async def run(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        known: set = set()
        seen: dict[ID, dict[ID, None]] = {}
        catalogue: set = set()
        recommended: set = set()
        offs: list[int] = []
        ranks: list[int] = []
        pop_ranks: list[int] = []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc=f"live @{self.rate:g}/s", unit="ev", unit_scale=True, file=sys.stderr,
                       dynamic_ncols=True)
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60.0, limits=limits) as http:
            r = await http.get("/healthz")
            if r.status_code not in (200, 503):
                raise RuntimeError(f"GET {self.url}/healthz: {r.status_code} {r.text[:300]}")
            offset = await self._warm_up(http, known, seen, catalogue) if self.score_from else 0
            start = offset
            if bar is not None:
                bar.update(offset)
            t_start = time.monotonic()
            sampler = asyncio.get_running_loop().create_task(self._sample_stats(http, t_start))
            try:
                while offset < self.total:
                    due = t_start + (offset - start) / self.rate
                    now = time.monotonic()
                    if now < due:
                        await asyncio.sleep(due - now)
                    else:
                        self.behind_s = max(self.behind_s, now - due)
                    raw = self.source.read(offset, min(self.chunk_size, self.total - offset))
                    if raw.num_rows == 0:
                        break
                    chunk = Chunk.from_batch(raw)
                    users, items = chunk.users.tolist(), chunk.items.tolist()
                    warm = [j for j, u in enumerate(users) if u in known]
                    if warm:
                        wu = list(dict.fromkeys(users[j] for j in warm))
                        got = await asyncio.gather(*(self._rank(http, u) for u in wu))
                        by_user = {u: rk for u, (rk, _) in zip(wu, got)}
                        for u, (_, body) in zip(wu, got):
                            if body["fallback"] is not None:
                                why = body.get("fallback_reason") or "popular"
                                self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
                            recommended.update(by_user[u].item_ids[:10])
                        popular = self.pop.ranker().rank_many(np.zeros((len(wu), 1), np.float32), np.zeros(len(wu), bool),
                                                              [list(seen[u]) for u in wu], DEPTH)
                        pop_by_user = dict(zip(wu, popular))
                        for j in warm:
                            offs.append(int(chunk.offsets[j]))
                            ranks.append(hit_rank(by_user[users[j]], items[j]))
                            pop_ranks.append(hit_rank(pop_by_user[users[j]], items[j]))
                    body = {"events": self._events(raw)}
                    t0 = time.perf_counter()
                    await self._request(http, "/events", body, {"Idempotency-Key": f"live-{uuid.uuid4().hex}"})
                    self.events_ms.append((time.perf_counter() - t0) * 1000.0)
                    self.pop.learn(chunk)
                    for u, i in zip(users, items):
                        known.add(u)
                        seen.setdefault(u, {})[i] = None
                        catalogue.add(i)
                    offset = int(chunk.offsets[-1]) + 1
                    self.scored_chunks += 1
                    if bar is not None:
                        bar.update(len(chunk))
                        if len(ranks) and bar.n % (self.chunk_size * 25) < self.chunk_size:
                            r_arr = np.asarray(ranks)
                            bar.set_postfix(recall10=f"{((r_arr >= 0) & (r_arr < 10)).mean():.4f}",
                                            lag=self.lag[-1][1] if self.lag else None, refresh=False)
            finally:
                sampler.cancel()
                if bar is not None:
                    bar.close()
            self.live.wall_s = time.monotonic() - t_start
        self.live.events = offset
        self.scored_events = offset - start
        self.live.eval_offsets = np.asarray(offs, np.int64)
        self.live.eval_ranks = np.asarray(ranks, np.int64)
        self.live.recommended, self.live.catalogue = len(recommended & catalogue), len(catalogue)
        self.popularity = EvalResult("popularity", self.pop.describe(), events=offset,
                                     eval_offsets=np.asarray(offs, np.int64), eval_ranks=np.asarray(pop_ranks, np.int64))


# --------------------------------------------------------------------------- the service


def _start_service(cfg: FreshetConfig, own_ray: bool):
    """A fresh deployment of ``cfg`` on this process's Ray (``own_ray``: one this run started),
    reading its own ingest log: ``(deployment, url, token, work dir)``."""
    from serving import deploy

    if not own_ray and deploy.serves_freshet():
        from serving.app import APP_NAME

        raise RuntimeError(f"a Freshet app ({APP_NAME!r}) already runs on this Ray cluster; evaluate it with "
                           "--url (and --token), or run --live without --url where no Freshet service runs")
    work = tempfile.mkdtemp(prefix="freshet-live-")
    try:
        token = secrets.token_urlsafe(24)
        live_cfg = cfg.model_copy(update={
            "namespace": f"{cfg.namespace}-live-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            "stream": cfg.stream.model_copy(update={"kind": StreamKind.INGEST, "num_events": None, "path": None}),
            "ingest": cfg.ingest.model_copy(update={"dir": work, "state_dir": None}),
            "serving": cfg.serving.model_copy(update={"host": "127.0.0.1", "port": free_port(), "auth_token": token}),
        })
        dep = deploy.start(live_cfg, durable=False, autostart=True)
    except BaseException:
        # The caller only learns the dir from our return value: a start that fails or is
        # interrupted (Ctrl-C) must remove it here. deploy.start removes what it started.
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dep, dep.url, token, work


def load_offline_report(path: str | Path, *, data: str, events: int, chunk_size: int, min_weight: float | None,
                        score_from: int = 0) -> dict[str, Any]:
    """The offline report at ``path`` (``offline.json`` of a ``--score-from`` run, else
    ``offline/report.json``), checked to be of this run's stream: same data, events, chunk
    size, min_weight and (when either side has one) warm-up offset, with an ``incremental``
    row to compare with.

    Raises:
        ValueError: the file cannot be read, is not such a report, or is of another stream
            (the message names the path and what differs).
    """
    where = f"offline report {path}"
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{where}: cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("meta"), dict) \
            or not isinstance(report.get("strategies"), dict):
        raise ValueError(f"{where}: not a `freshet eval` report (no 'meta' and 'strategies'); pass "
                         "<report>/offline.json of a --score-from run, else <report>/offline/report.json")
    m = report["meta"]
    mine = {"data": data, "events": events, "chunk_size": chunk_size, "min_weight": min_weight}
    if score_from or m.get("score_from"):
        mine["score_from"] = score_from
    theirs = {k: m.get(k) for k in mine}
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs[k]!r} (this run: {mine[k]!r})" for k in mine if theirs[k] != mine[k])
        raise ValueError(f"{where}: made for another stream: {diff}")
    if not any(n.split(":")[0] == "incremental" for n in report["strategies"]):
        raise ValueError(f"{where}: has no 'incremental' row to compare the live run with")
    return report


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# --------------------------------------------------------------------------- the run


def run_live(
    cfg: FreshetConfig,
    *,
    data: str,
    rate: float,
    report_dir: str | Path,
    url: str | None = None,
    token: str | None = None,
    chunk_size: int = 20,
    min_weight: float | None | str = "auto",
    max_events: int | None = None,
    offline: bool | str | Path = True,
    window: int = 2000,
    progress: bool = True,
    score_from: int = 0,
    start_ray: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Replay ``data`` through the service at ``rate`` events/s, then (``offline``) run the
    offline protocol on the same events; write ``live.json``, ``live.md`` and ``live.png`` to
    ``report_dir`` and return the report.

    ``url``/``token``: a running service (its base URL and ``serving.auth_token``); None
    starts a fresh deployment of ``cfg`` for the replay and stops it afterwards. ``offline``:
    True runs ``freshet eval``'s ``incremental`` and ``popularity`` on the same stream into
    ``report_dir/offline``; a path reuses such a run's ``report.json`` (``offline.json`` with
    ``score_from``), checked by :func:`load_offline_report` before anything starts; False skips
    it. ``data``, ``chunk_size``, ``min_weight`` and ``max_events`` mean what they mean for
    :func:`workers.eval.compare.run_eval`.

    ``score_from`` (a stream offset, events) is a warm-up, as in
    :func:`workers.eval.protocol.prequential`: the events before it are posted as fast as the
    service takes them (chunks of ``chunk_size``, nothing ranked; the trainers learn them in
    their own mini-batches), the replay waits until the trainers have applied them, and only
    then does the timed replay at ``rate`` start, scoring from ``score_from``. The offline side
    (``offline`` True) is then :func:`prequential` with the same ``score_from`` (the warm-up
    learned chunk by chunk) for ``incremental`` and ``popularity``, written to
    ``report_dir/offline.json`` (reusable as ``offline``).

    ``start_ray`` starts Ray when the run needs it and this process is not connected (see
    :func:`workers.eval.compare.run_eval`); it is shut down at the end.

    Raises:
        ValueError: a bad rate or chunk size, or an offline report that is unreadable or of another stream.
        RuntimeError: the service refused a request or stopped answering.
    """
    import ray

    from workers.eval.compare import _init_ray, _open_source, auto_min_weight, run_eval

    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate: must be a finite number > 0 events/s, got {rate}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 events, got {chunk_size}")
    if score_from < 0:
        raise ValueError(f"score_from: must be >= 0 (a stream offset), got {score_from}")
    if min_weight == "auto":
        min_weight = auto_min_weight(cfg, data)
    source, _ = _open_source(cfg, data, min_weight, max_events)
    total = source.end_offset if max_events is None else min(source.end_offset or max_events, max_events)
    if total is None:
        raise ValueError("events: required for an unbounded stream")
    if score_from >= total:
        raise ValueError(f"score_from: {score_from:,} leaves nothing to score in {total:,} events")
    reused = None
    if offline is not True and offline:
        # Checked before anything starts: a report of another stream would otherwise be
        # refused only after the whole live replay.
        reused = load_offline_report(offline, data=data, events=total, chunk_size=chunk_size, min_weight=min_weight,
                                     score_from=score_from)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    load_before = _machine()
    dep = work = None
    started_ray = False
    started_service = url is None
    try:  # whatever happens, a Ray this run started is shut down at the end
        try:
            if started_service:
                started_ray = _init_ray(None, cfg, start_ray)
                dep, url, token, work = _start_service(cfg, own_ray=started_ray)
            replay = _Replay(cfg, source, total, url=url, token=token, rate=rate, chunk_size=chunk_size,
                             progress=progress, score_from=score_from)
            asyncio.run(replay.run())
        finally:
            if dep is not None:
                from serving import deploy

                deploy.stop(dep.cfg)
                del dep
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        load_after = _machine()

        offline_report = None
        if offline is True and score_from:
            offline_report = _offline_from(cfg, source, total, chunk_size, score_from, window, progress, start_ray)
            offline_report["meta"].update(data=data, min_weight=min_weight)
            (report_dir / "offline.json").write_text(json.dumps(offline_report, indent=2, default=_json_default),
                                                     encoding="utf-8")
        elif offline is True:
            offline_report = run_eval(cfg, data=data, strategies=["incremental", "popularity"], report_dir=report_dir / "offline",
                                      chunk_size=chunk_size, min_weight=min_weight, max_events=total, window=window,
                                      progress=progress, start_ray=start_ray)
        else:
            offline_report = reused
    finally:
        if started_ray:
            ray.shutdown()
    meta = {
        "data": data, "events": total, "chunk_size": chunk_size, "min_weight": min_weight, "k": DEPTH,
        "rate_target": rate, "rate_achieved": replay.scored_events / replay.live.wall_s if replay.live.wall_s else None,
        "score_from": score_from, "warmup_s": replay.warmup_s,
        "behind_schedule_max_s": replay.behind_s, "url": url, "started_service": started_service,
        "loss": cfg.model.loss.value, "window": window, "machine_before": load_before, "machine_after": load_after,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return _write(report_dir, meta, replay, offline_report, window)


def _offline_from(cfg: FreshetConfig, source, total: int, chunk_size: int, score_from: int, window: int,
                  progress: bool, start_ray: Callable[[], object] | None = None) -> dict[str, Any]:
    """The offline side of a warm-up run: :func:`prequential` with ``score_from`` for
    ``incremental`` and ``popularity``, as a report of :func:`run_eval`'s shape (the parts
    :func:`_write` reads)."""
    import torch

    from workers.eval.compare import _init_ray
    from workers.eval.protocol import prequential
    from workers.eval.strategies import make_strategy

    rows: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = False
    try:
        started = _init_ray(None, cfg, start_ray)
        for spec in ("incremental", "popularity"):
            strategy = make_strategy(spec, cfg, total_events=total)
            try:
                res = prequential(source, strategy, chunk_size=chunk_size, max_events=total, progress=progress,
                                  score_from=score_from)
            finally:
                strategy.close()
            rows[spec] = {**res.summary(), "strategy": spec}
            x, y = windowed_recall(res.eval_offsets, res.eval_ranks, window=window, end=total)
            curves[spec] = {"offset": x.tolist(), "recall@10": [None if not np.isfinite(v) else float(v) for v in y]}
    finally:
        torch.set_num_threads(threads)
        if started:
            import ray

            ray.shutdown()
    return {"meta": {"events": total, "chunk_size": chunk_size, "score_from": score_from}, "strategies": rows,
            "windowed_recall": curves}


def _row(res: EvalResult) -> dict[str, Any]:
    s = res.summary()
    keep = ("strategy", "events", "evaluated", "recall@10", "recall@20", "ndcg@10", "coverage", "wall_s", "events_per_s")
    return {k: s[k] for k in keep}


def _write(report_dir: Path, meta: dict[str, Any], replay: _Replay, offline: dict | None, window: int) -> dict[str, Any]:
    live, pop = _row(replay.live), _row(replay.popularity)
    live["popularity_recall@10"] = pop["recall@10"]
    live["over_popularity"] = live["recall@10"] / pop["recall@10"] if live["recall@10"] is not None and pop["recall@10"] else None
    lag_events = [b for _, b, _ in replay.lag if b is not None]
    lag_s = [s for _, _, s in replay.lag if s is not None]
    diagnostics = {
        "warm_users_ranked": len(replay.rank_ms),
        "popular_fallbacks": dict(replay.fallbacks),
        "popular_fallback_share": sum(replay.fallbacks.values()) / max(1, len(replay.rank_ms)),
        "rank_ms": {"p50": _pct(replay.rank_ms, 50), "p99": _pct(replay.rank_ms, 99)},
        "events_ms": {"p50": _pct(replay.events_ms, 50), "p99": _pct(replay.events_ms, 99)},
        "retries": replay.retries,
        "trainer_backlog_events": {"mean": float(np.mean(lag_events)) if lag_events else None,
                                   "p90": _pct(lag_events, 90), "max": max(lag_events) if lag_events else None},
        "trainer_lag_s": {"mean": float(np.mean(lag_s)) if lag_s else None, "max": max(lag_s) if lag_s else None},
        "stats_samples": len(replay.lag),
        # Per chunk of the timed replay: warm-up chunks are posted unranked, so counting them
        # would understate how many warm events each scored chunk ranked.
        "evaluated_per_chunk": live["evaluated"] / replay.scored_chunks if replay.scored_chunks else None,
    }
    report: dict[str, Any] = {"meta": meta, "live": live, "popularity": pop, "diagnostics": diagnostics}
    curves = {}
    x, y = windowed_recall(replay.live.eval_offsets, replay.live.eval_ranks, window=window, end=meta["events"])
    curves["live"] = {"offset": x.tolist(), "recall@10": [None if not np.isfinite(v) else float(v) for v in y]}
    x, y = windowed_recall(replay.popularity.eval_offsets, replay.popularity.eval_ranks, window=window, end=meta["events"])
    curves["popularity (client)"] = {"offset": x.tolist(), "recall@10": [None if not np.isfinite(v) else float(v) for v in y]}
    if offline is not None:
        rows = offline["strategies"]
        inc = next((r for n, r in rows.items() if n.split(":")[0] == "incremental"), None)
        opop = next((r for n, r in rows.items() if n.split(":")[0] == "popularity"), None)
        keep = ("strategy", "events", "evaluated", "recall@10", "recall@20", "ndcg@10", "coverage", "wall_s", "events_per_s")
        report["offline"] = {"incremental": {k: inc.get(k) for k in keep} if inc else None,
                             "popularity": {k: opop.get(k) for k in keep} if opop else None}
        if inc and opop and opop["recall@10"]:
            report["offline"]["incremental"]["over_popularity"] = inc["recall@10"] / opop["recall@10"]
        if inc and inc["recall@10"]:
            # The rate the events arrived at sets the goal: a client that fell behind its
            # schedule gave the trainers an easier stream than the one it asked for.
            achieved = meta.get("rate_achieved")
            # Within 5% of the target counts as the target: a 500 events/s run at 499.9 keeps its goal.
            rate = meta["rate_target"] if achieved is None or achieved >= 0.95 * meta["rate_target"] else achieved
            goal = target_for(rate)
            ratio = live["recall@10"] / inc["recall@10"] if live["recall@10"] is not None else None
            report["comparison"] = {
                "live_over_offline_recall@10": ratio,
                "live_over_offline_recall@20": (live["recall@20"] / inc["recall@20"])
                if inc.get("recall@20") and live["recall@20"] is not None else None,
                "live_over_offline_ndcg@10": (live["ndcg@10"] / inc["ndcg@10"])
                if inc.get("ndcg@10") and live["ndcg@10"] is not None else None,
                "target": goal, "target_rate": rate, "met": ratio is not None and ratio >= goal,
                "same_events": inc["evaluated"] == live["evaluated"],
                "same_popularity": opop is not None and opop["recall@10"] == pop["recall@10"],
            }
        for name, c in offline.get("windowed_recall", {}).items():
            curves[f"offline {name}"] = c
    report["windowed_recall"] = curves
    (report_dir / "live.json").write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    (report_dir / "live.md").write_text(_markdown(report), encoding="utf-8")
    _plot(report, report_dir / "live.png", window)
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _goal_basis(goal_rate: float, target: float, achieved: float | None) -> str:
    """Which rate the goal was taken at, with both the targeted and the achieved rate."""
    got = "not measured" if achieved is None else f"{achieved:.1f} events/s achieved"
    if goal_rate == target:
        within = "" if achieved is None else ", at least 95% of it"
        return f"the goal at the {target:g} events/s targeted; {got}{within}"
    return f"the goal at the {goal_rate:.1f} events/s achieved, below the {target:g} events/s targeted"


def _markdown(report: dict[str, Any]) -> str:
    m, live, pop, d = report["meta"], report["live"], report["popularity"], report["diagnostics"]
    lines = [
        f"# Freshet live evaluation — {m['data']}",
        "",
        f"{m['events']:,} events (min_weight={m['min_weight']}), chunks of {m['chunk_size']}: each event of a user seen in "
        f"an earlier chunk ranked with `POST /rank` (k={m['k']}, exclude_seen) before the chunk is posted with "
        f"`POST /events`. Target {m['rate_target']:g} events/s, achieved {_f(m['rate_achieved'], 1)} events/s. "
        + (f"Warm-up: offsets below {m['score_from']:,} posted unranked first and applied by the trainers "
           f"({_f(m['warmup_s'], 0)} s); scored from there (offline: the same warm-up, learned chunk by chunk). "
           if m.get("score_from") else "") +
        f"Service: {'started for this run' if m['started_service'] else m['url']}. Created {m['created']}.",
        "",
        "| protocol | evaluated | recall@10 | recall@20 | NDCG@10 | popularity recall@10 | × popularity |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| live @ {m['rate_target']:g} ev/s (HTTP) | {live['evaluated']} | {_f(live['recall@10'])} | {_f(live['recall@20'])} "
        f"| {_f(live['ndcg@10'])} | {_f(pop['recall@10'])} | {_f(live['over_popularity'], 2)} |",
    ]
    off = report.get("offline")
    if off and off.get("incremental"):
        inc, opop = off["incremental"], off.get("popularity") or {}
        lines.append(
            f"| offline `freshet eval` incremental | {inc['evaluated']} | {_f(inc['recall@10'])} | {_f(inc['recall@20'])} "
            f"| {_f(inc['ndcg@10'])} | {_f(opop.get('recall@10'))} | {_f(inc.get('over_popularity'), 2)} |"
        )
    c = report.get("comparison")
    if c:
        lines += ["", f"- live / offline recall@10 = {_f(c['live_over_offline_recall@10'], 3)} (goal ≥ {c['target']:g}, "
                      f"{_goal_basis(c.get('target_rate', m['rate_target']), m['rate_target'], m['rate_achieved'])}): "
                      f"**{'met' if c['met'] else 'NOT met'}**; recall@20 "
                      f"{_f(c['live_over_offline_recall@20'], 3)}, NDCG@10 {_f(c['live_over_offline_ndcg@10'], 3)}",
                  f"- same evaluated events in both harnesses: {c['same_events']}; same popularity figures: {c['same_popularity']}"]
    lines += [
        "",
        "Popularity: all-time interaction counts of the events posted so far, kept by the client, each user's earlier "
        "items excluded (the offline `popularity` strategy's code).",
        "",
        "## Diagnostics (live)",
        "",
        f"- warm users ranked: {d['warm_users_ranked']:,}; popular fallbacks served to them: {d['popular_fallbacks'] or 0} "
        f"({100 * d['popular_fallback_share']:.2f}%)",
        f"- trainer backlog (events accepted, not yet applied; sampled from /stats every second): mean "
        f"{_f(d['trainer_backlog_events']['mean'], 1)}, p90 {_f(d['trainer_backlog_events']['p90'], 1)}, "
        f"max {d['trainer_backlog_events']['max']}",
        f"- /rank latency p50 / p99: {_f(d['rank_ms']['p50'], 1)} / {_f(d['rank_ms']['p99'], 1)} ms; /events: "
        f"{_f(d['events_ms']['p50'], 1)} / {_f(d['events_ms']['p99'], 1)} ms; retried requests: {d['retries']}",
        f"- behind schedule at most {m['behind_schedule_max_s']:.2f} s",
        f"- machine: {m['machine_before']['cpus']} CPUs, load average (1/5/15 min) before "
        f"{', '.join(f'{x:.2f}' for x in m['machine_before']['loadavg'])}, after "
        f"{', '.join(f'{x:.2f}' for x in m['machine_after']['loadavg'])}",
        "",
        "![live vs offline](live.png)",
        "",
    ]
    return "\n".join(lines)


_COLOURS = {"live": "tab:blue", "offline": "tab:orange", "popularity": "tab:green"}


def _colour(name: str) -> str:
    """One colour per series, the same in both panels (the curves' and the bars' names differ)."""
    if "popularity" in name:
        return _COLOURS["popularity"]
    return _COLOURS["offline"] if name.startswith("offline") else _COLOURS["live"]


def _figure(report: dict[str, Any], window: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["meta"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for name, c in report["windowed_recall"].items():
        if name == "offline popularity":
            continue  # equal to the client's popularity by construction
        ax.plot(c["offset"], [np.nan if v is None else v for v in c["recall@10"]], label=name,
                linestyle="--" if "popularity" in name else "-", color=_colour(name))
    ax.set_xlabel("stream offset (events)")
    ax.set_ylabel(f"recall@10 over the last {window} events")
    ax.set_title(f"Live @ {m['rate_target']:g} ev/s vs offline — {Path(str(m['data'])).name}, {m['events']:,} events")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bars = {"live": report["live"], "popularity": report["popularity"]}
    off = report.get("offline") or {}
    if off.get("incremental"):
        bars = {"offline incremental": off["incremental"], **bars}
    metrics = ("recall@10", "recall@20", "ndcg@10")
    width = 0.8 / len(bars)
    for j, (name, row) in enumerate(bars.items()):
        vals = [row.get(k) or 0.0 for k in metrics]
        bx.bar(np.arange(len(metrics)) + j * width, vals, width, label=name, color=_colour(name))
    bx.set_xticks(np.arange(len(metrics)) + width * (len(bars) - 1) / 2, metrics)
    c = report.get("comparison")
    bx.set_title(f"live/offline recall@10 = {_f(c['live_over_offline_recall@10'], 3)} (goal {c['target']:g})" if c else "live")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot(report: dict[str, Any], path: Path, window: int) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(report, window)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
