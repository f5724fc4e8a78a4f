"""The Ray Serve ranking application: ``/events``, ``/rank``, ``/score``, ``/healthz``, ``/stats``.

``FreshetAPI`` replicas attach to a running deployment's named actors (PS shards, the
``ingest-log`` and the ``trainer-{i}`` actors in ``cfg.namespace``); they start none
of them. A replica reads the user's row fresh from the PS on every request (read-only,
never creating rows; the ``/rank`` requests that arrive together share one call per shard)
and ranks against a local mirror of the item tables kept current by delta sync. Every PS
or actor call is bounded by ``serving.request_timeout_s``; a timeout or a dead actor answers
503 with ``Retry-After`` rather than 500 or a hang.

Run it with ``run_app(cfg)``, ``serve run serving.app:app`` (default config) or
``serve run serving.app:build_app config_path=freshet.yaml``.
"""

import asyncio
import concurrent.futures
import functools
import hmac
import json
import logging
import math
import sys
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pydantic
import pydantic_core
import ray
from fastapi import FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RaySystemError,
)

from ps.cache import Coverage, RowCache
from ps.client import PSClient, shard_actor_name
from ps.ids import keyed
from ps.shard import RankContext
from serving.config import WRITE_PATHS, FreshetConfig, load_config
from serving.schemas import (
    EventsRequest,
    EventsResponse,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
)
from workers.config import LossKind, StreamKind
from workers.ingest_log import INGEST_ACTOR
from workers.model import signals
from workers.ranking import Ranked, Ranker, RankingSnapshot
from workers.trainer import applied_position, trainer_actor_name

__all__ = ["AppArgs", "FreshetAPI", "app", "build_app", "run_app"]

logger = logging.getLogger("freshet.serving")

APP_NAME = "freshet"
"""Serve application name used by :func:`run_app`."""

_NO_ACCESS_LOG = {"enable_access_log": False}
# How long a /rank batch whose first shard has answered waits for the others' answers before
# ranking without them (seconds): the shards of one batch answer within about a millisecond of
# each other, so one product serves them all; a slow or hung shard delays the others by this.
_SHARD_GRACE_S = 0.002
# Failures that mean "a dependency is down or slow right now": the client should retry.
# A RayTaskError (a bug raised inside an actor) is deliberately not here.
_UNAVAILABLE = (TimeoutError, GetTimeoutError, RayActorError, ObjectLostError, NodeDiedError, RaySystemError)
_WRITE_PATHS = WRITE_PATHS  # endpoints that need the bearer token whenever one is configured
_BACKPRESSURE_RETRY_AFTER_S = 1.0  # Retry-After of Serve's 503 when max_queued_requests is exceeded (seconds)
# How often a stopping replica checks that its in-flight requests are done (seconds). Serve
# sleeps this long before the first check, so its default (2 s) made every stop, scale-down
# and `freshet down` wait 2 s even for an idle replica. Requests still get the whole
# graceful_shutdown_timeout_s (Serve's default, 20 s) to finish.
_DRAIN_CHECK_S = 0.2


class AppArgs(pydantic.BaseModel):
    """Typed arguments of :func:`build_app` (also a Serve YAML ``args:`` block)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    config_path: str | None = pydantic.Field(None, description="Freshet YAML config file; null uses the defaults")
    config: dict | None = pydantic.Field(None, description="nested overrides merged over the file's contents")


def _bearer_ok(expected: str | None, authorization: str | None) -> bool:
    """True when no token is configured, or ``authorization`` is ``Bearer <expected>`` (constant-time compare)."""
    if expected is None:
        return True
    if not authorization:
        return False
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credential.strip().encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _is_json(content_type: bytes) -> bool:
    """True for ``application/json`` and ``application/*+json``, with no ``charset`` parameter
    or ``charset=utf-8`` (JSON exchanged between systems is UTF-8: RFC 8259, section 8.1)."""
    media, *params = content_type.decode("latin-1").lower().split(";")
    media = media.strip()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


# Headers whose value decides how a request is read or whether it is allowed: sent twice with
# different values, the guard and FastAPI could each read a different one (a 401 check of one
# token, a body read with the other Content-Type). The same value twice is one value (RFC 9112,
# section 6.3, for Content-Length).
_SINGLE_HEADERS = (b"authorization", b"content-type", b"content-length", b"content-encoding", b"idempotency-key")


class _Guard:
    """ASGI middleware: bearer auth on the token paths, JSON-only bodies, then the body size limit.

    The token paths are ``/events`` and, when the app listens beyond loopback, ``/rank``, ``/score``,
    ``/stats`` and the API docs too (``ServingConfig.token_paths``), whatever the method.

    All run before FastAPI reads the body, so an unauthenticated or oversized request
    costs at most ``max_body_bytes`` of buffering. The limits live in class attributes
    set by the replica's constructor: the FastAPI app is frozen (pickled) when the
    deployment class is decorated, before any config exists, and each replica is its
    own process, so a class attribute is per replica.
    """

    max_body_bytes: int = 8 << 20
    auth_token: str | None = None
    token_paths: frozenset[str] = _WRITE_PATHS

    def __init__(self, app):
        self.app = app

    @classmethod
    def configure(cls, max_body_bytes: int, auth_token: str | None,
                  token_paths: frozenset[str] = _WRITE_PATHS) -> None:
        """Set this process's limits (called by each replica's constructor).

        Args:
            max_body_bytes: largest accepted request body (bytes).
            auth_token: bearer token the ``token_paths`` require; None: no check.
            token_paths: endpoints (without the route prefix) that need the token.
        """
        cls.max_body_bytes, cls.auth_token, cls.token_paths = max_body_bytes, auth_token, frozenset(token_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw_headers = scope.get("headers", [])
        headers = {k.lower(): v for k, v in raw_headers}
        if len(headers) < len(raw_headers):
            for name in _SINGLE_HEADERS:
                values = {v for k, v in raw_headers if k.lower() == name}
                if len(values) > 1:
                    title = name.decode().title()
                    return await JSONResponse({"detail": f"{title}: header sent {len(values)} times with different "
                                                         "values; send it once"},
                                              status_code=400)(scope, receive, send)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path.rstrip("/") in _Guard.token_paths:
            auth = headers.get(b"authorization")
            if not _bearer_ok(_Guard.auth_token, auth.decode("utf-8", "surrogateescape") if auth is not None else None):
                resp = JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer <serving.auth_token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await resp(scope, receive, send)
        ctype = headers.get(b"content-type")
        if ctype is not None and scope.get("method") in ("POST", "PUT", "PATCH") and not _is_json(ctype):
            resp = JSONResponse(
                {"detail": f"Content-Type must be application/json (charset utf-8, if any), "
                           f"got {ctype.decode('latin-1')[:100]!r}"},
                status_code=415,
            )
            return await resp(scope, receive, send)
        coding = headers.get(b"content-encoding")
        if coding is not None and coding.decode("latin-1").strip().lower() not in ("", "identity"):
            # The body would be read as if it were not encoded (RFC 9110, section 15.5.16: 415).
            resp = JSONResponse(
                {"detail": f"Content-Encoding {coding.decode('latin-1')[:100]!r} is not supported; send the body "
                           "unencoded"},
                status_code=415,
                headers={"Accept-Encoding": "identity"},
            )
            return await resp(scope, receive, send)
        limit = _Guard.max_body_bytes
        too_big = JSONResponse(
            {"detail": f"request body exceeds serving.max_body_bytes={limit} bytes"}, status_code=413
        )
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await JSONResponse({"detail": "Content-Length is not an integer"}, status_code=400)(
                    scope, receive, send
                )
            if n > limit:
                return await too_big(scope, receive, send)
            if b"transfer-encoding" not in headers:
                # The server frames the body by its Content-Length: it cannot exceed the limit.
                return await self.app(scope, receive, send)
        # Chunked bodies carry no length: buffer up to the limit and replay to the app.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


fastapi_app = FastAPI(
    title="Freshet",
    description="Online-trained recommendations: post interactions, rank items for users.",
    # A body without Content-Type is read as JSON (curl --data-binary); other types get 415 from _Guard.
    strict_content_type=False,
)
fastapi_app.add_middleware(_Guard)


class _ActorMissing(LookupError):
    """A named actor of the deployment does not exist (not started yet, or gone for good)."""


def _why_down(e: BaseException, timeout_s: float) -> str:
    """Why an actor did not answer, in words an operator reads in ``/healthz``, then the
    exception's class (what the logs name)."""
    if isinstance(e, _ActorMissing):
        why = "missing: no actor of that name"
    elif isinstance(e, ActorDiedError):
        why = "dead"
    elif isinstance(e, ActorUnavailableError):
        why = "restarting or unreachable"
    elif isinstance(e, (TimeoutError, GetTimeoutError)):
        why = f"no answer within {timeout_s:g} s (serving.request_timeout_s)"
    else:
        why = "unreachable"
    return f"{why} ({type(e).__name__})"


def _json_safe(value: Any, limit: int = 200) -> Any:
    """``value`` if it is short, strict JSON; else a truncated string of it (NaN, bytes, exceptions, huge bodies)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)[:limit]
    return value if len(text) <= limit else text[:limit] + "..."


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each bad field; echoed inputs are made JSON-safe (a NaN input must not turn this into a 500)."""
    detail = []
    for err in exc.errors():
        item = {"type": err.get("type"), "loc": list(err.get("loc", ())), "msg": err.get("msg")}
        if "input" in err:
            item["input"] = _json_safe(err["input"])
        if err.get("ctx"):
            item["ctx"] = {k: _json_safe(v) for k, v in err["ctx"].items()}
        detail.append(item)
    # ensure_ascii: an echoed lone surrogate must not make the error itself unencodable.
    return Response(json.dumps({"detail": detail}, ensure_ascii=True), status_code=422, media_type="application/json")


def _json_id(x: Any) -> int | str:
    """An ID as a plain JSON value (numpy ints from the cache become Python ints)."""
    return int(x) if isinstance(x, (int, np.integer)) else x


def _rank_response(user_id: int | str, ranked: Ranked, reason: str | None, model_version: int) -> Response:
    """The ``/rank`` reply (:class:`serving.schemas.RankResponse`), encoded once here: the
    values are ours, so FastAPI's validation of a model built from them, and its second
    encoding, would only cost time (~1 ms for 100 items). Non-finite scores become null, as
    pydantic writes them."""
    items = [{"item_id": _json_id(i), "score": s if math.isfinite(s) else None}
             for i, s in zip(ranked.item_ids, ranked.scores)]
    body = {"user_id": user_id, "items": items, "fallback": ranked.fallback, "fallback_reason": reason,
            "model_version": int(model_version)}
    # pydantic's own encoder, as FastAPI would use: UTF-8 (IDs are valid UTF-8: lone surrogates are
    # refused), compact; 16 us for 100 items where json.dumps took 85, ~7% of the replica's
    # samples at 32 clients (BENCHMARKS.md section 8).
    return Response(pydantic_core.to_json(body), media_type="application/json")


def _unavailable(what: str, err: BaseException) -> JSONResponse:
    """503 telling the client to retry after a second."""
    reason = type(err).__name__ if not str(err) else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return JSONResponse(
        {"detail": f"{what} unavailable ({reason}); retry"}, status_code=503, headers={"Retry-After": "1"}
    )


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: strict
    JSON, whatever a counter did."""
    if isinstance(value, float) or isinstance(value, np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _log_offsets(trainer: dict, ingest: dict | None) -> dict[str, int] | None:
    """A trainer's applied offsets (partition as str -> offset) in the ingest log ``ingest``
    describes (its ``stats()``), or None when it does not read that log (no log, or a stream
    of its own)."""
    if not ingest or "end_offsets" not in ingest:
        return None
    log = f"ingest:{ingest.get('log_id')}"
    sources = trainer.get("source_ids")
    offsets = trainer.get("applied_offsets", {})
    if sources is None:  # a trainer that does not say: taken as the log's reader
        return offsets
    return {p: o for p, o in offsets.items() if sources.get(p) in (log, f"{log}/p{p}")} or None


def _settle(answered: asyncio.Future, batch: asyncio.Future) -> None:
    """Done-callback of a ``/rank`` request's batch call: a request the batch did not answer
    gets the batch's error (or is cancelled with it); the error is retrieved either way."""
    error = None if batch.cancelled() else batch.exception()
    if answered.done():
        return
    if batch.cancelled():
        answered.cancel()
    else:
        answered.set_exception(error or RuntimeError("/rank batch ended without an answer"))


def _rank_requests(snap: RankingSnapshot, requests: list[RankRequest], contexts: list[RankContext],
                  behind: list[bool], *, threads: int = 1) -> list[tuple[Ranked, str | None, int] | BaseException]:
    """Rank each request against ``snap``: the model's query for a user with a row (with their
    session context), the session context alone for a user without one, else the popular
    fallback (``"new_user"``, or ``"mirror_behind"`` where ``behind``); the user's recent items
    are left out when the request says ``exclude_seen``.

    The queries are scored together (:meth:`RankingSnapshot.rank_queries`, bit for bit what each
    alone gets; ``threads`` as there); a request whose ranking raises gets its exception back in
    its place and the others their answers. Returns, per request,
    ``(ranked, fallback_reason, snap.model_version)`` or the exception.
    """
    out: list[tuple[Ranked, str | None, int] | BaseException | None] = [None] * len(requests)
    scored: list[int] = []
    queries: list[np.ndarray] = []
    for j, (req, ctx) in enumerate(zip(requests, contexts)):
        try:
            seen = ctx.recent if req.exclude_seen else None
            if behind[j]:
                q = None
            elif ctx.row is None:
                # Not trained yet, but their posted items are known (read-your-writes): the model's
                # session context alone ranks them; the popular fallback only without any.
                q = snap.context_query(ctx.recent)
            else:
                q = snap.query(ctx.row, ctx.recent)
            if q is None:
                out[j] = (snap.popular(seen, req.k), "mirror_behind" if behind[j] else "new_user", snap.model_version)
            else:
                scored.append(j)
                queries.append(q)
        except Exception as e:  # noqa: BLE001 - this request's own failure, raised in its handler
            out[j] = e
    if scored:
        seen = [contexts[j].recent if requests[j].exclude_seen else None for j in scored]
        try:
            ranked: list[Ranked | BaseException] = list(snap.rank_queries(
                np.stack(queries), [requests[j].k for j in scored], seen, threads=threads))
        except Exception:  # noqa: BLE001 - find whose request it was: each alone
            ranked = []
            for q, j, s in zip(queries, scored, seen):
                try:
                    ranked.append(snap.rank_queries(q[None, :], [requests[j].k], [s])[0])
                except Exception as e:  # noqa: BLE001 - raised in that request's own handler
                    ranked.append(e)
        for j, r in zip(scored, ranked):
            out[j] = r if isinstance(r, BaseException) else (r, None, snap.model_version)
    return out


@serve.deployment(logging_config=_NO_ACCESS_LOG)
@serve.ingress(fastapi_app)
class FreshetAPI:
    """One ranking replica of the deployment described by ``cfg``.

    Holds a PS client, a mirror of the item tables (:class:`ps.cache.RowCache`) kept current
    by a background delta sync every ``serving.cache_refresh_s``, and the
    :class:`workers.ranking.RankingSnapshot` built from it after each sync, swapped in by
    reference with what the mirror had synced then: a request reads the snapshot it finds and
    never waits on a sync, except when the snapshot does not yet cover the push behind the row
    of its user or of a user ranked with it (then they sync first; a user whose push even the
    fresh sync does not cover falls back to popularity and says so, and one whose sync failed
    gets 503). Handles of the ingest log and trainers are looked up lazily, so a replica can
    start before the trainers do.
    """

    def __init__(self, cfg: FreshetConfig):
        self.cfg = cfg
        s = cfg.serving
        _Guard.configure(s.max_body_bytes, s.auth_token, s.token_paths())
        self.timeout_s = s.request_timeout_s
        self.refresh_s = s.cache_refresh_s
        self.client = PSClient.connect(cfg.namespace, timeout_s=s.request_timeout_s)
        m = cfg.model
        self.mirror = RowCache(self.client, m.item_tables(), reader=f"{cfg.namespace}/serve-{uuid.uuid4().hex[:8]}")
        self.ranker = Ranker(self.mirror, m)
        # The snapshot and what its mirror had synced when it was built, swapped together: the
        # mirror itself moves on during a sync while requests still rank on the old snapshot.
        self.served: tuple[RankingSnapshot, Coverage] | None = None
        self._sync_lock: asyncio.Lock | None = None  # made on the replica's event loop
        self._syncer: asyncio.Task | None = None
        self.sync_error: str | None = None
        # Blocking calls (a sync, an actor lookup) run here so the event loop keeps serving.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="freshet-serve")
        self._actors: dict[str, Any] = {}
        self._ranking = 0  # /rank requests in flight on this replica
        try:
            self._refresh_now()  # warm the mirror; a failure here is retried by the background sync
        except _UNAVAILABLE as e:
            logger.warning("initial item-mirror sync failed (%s); the background sync retries it", e)

    # -- plumbing ----------------------------------------------------------------------
    async def _run(self, fn, *args, **kwargs):
        """Run a blocking call in the replica's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def _actor(self, name: str):
        """Handle of the named actor in the deployment's namespace (cached); ``_ActorMissing`` if absent."""
        handle = self._actors.get(name)
        if handle is None:
            try:
                handle = await self._run(ray.get_actor, name, namespace=self.cfg.namespace)
            except ValueError as e:  # Ray's "no such named actor"; distinct from errors raised *inside* a call
                raise _ActorMissing(str(e)) from None
            self._actors[name] = handle
        return handle

    async def _call(self, name: str, method: str, *args):
        """``await actor.method.remote(*args)`` bounded by ``request_timeout_s``."""
        handle = await self._actor(name)
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self.timeout_s)
        except ActorDiedError:
            # Dead for good (restarts exhausted or killed): look the name up again next
            # time, in case an operator has started a replacement.
            self._actors.pop(name, None)
            raise

    def _trainer_names(self) -> list[str]:
        return [trainer_actor_name(i) for i in range(self.cfg.trainer.num_workers)]

    # -- the item mirror and its ranking snapshot --------------------------------------
    def _refresh_now(self) -> None:
        """Sync the mirror and swap in a new snapshot (blocking; callers serialise it)."""
        self.mirror.sync()
        snap = self.ranker.snapshot()
        self.served = (snap, self.mirror.coverage())

    @property
    def snapshot(self) -> RankingSnapshot | None:
        """The ranking snapshot requests use now (None before the first sync)."""
        return self.served[0] if self.served is not None else None

    async def _refresh(self, needed=None) -> None:
        """:meth:`_refresh_now` in the pool, one at a time; skipped when ``needed()`` says the
        sync that ran while this caller waited for its turn already did what it needed.

        The caller waits at most ``request_timeout_s`` and may be cancelled (its client went
        away), but the sync goes on in its thread and keeps the turn until it ends: a second
        sync beside it would corrupt the mirror (``RowCache.sync`` is not re-entrant).

        Raises:
            TimeoutError: the sync took longer than ``request_timeout_s`` (it still finishes).
        """
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        lock = self._sync_lock
        await lock.acquire()
        try:
            # Without this check, requests that all found the mirror behind would each sync
            # again, one after another, behind the one sync that served them all.
            if needed is not None and not needed():
                lock.release()
                return
            sync = asyncio.get_running_loop().run_in_executor(self._pool, self._refresh_now)
        except BaseException:
            lock.release()
            raise

        def done(f: asyncio.Future) -> None:
            lock.release()
            if not f.cancelled():
                f.exception()  # retrieved here too: the caller may be gone

        sync.add_done_callback(done)
        await asyncio.wait_for(asyncio.shield(sync), self.timeout_s)

    def _start_syncer(self) -> bool:
        """Start the background sync on this event loop; True when it was not running."""
        if self._syncer is None or self._syncer.done():
            self._syncer = asyncio.get_running_loop().create_task(self._sync_forever())
            return True
        return False

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._refresh()
                self.sync_error = None
            except Exception as e:  # noqa: BLE001 - a shard restarting: the next round retries
                self.sync_error = f"{type(e).__name__}: {e}"

    def _stale(self) -> bool:
        """The background sync has not refreshed the mirror for a while (a broken sync)."""
        return time.monotonic() - self.mirror.synced_at > max(1.0, 5 * self.refresh_s)

    async def _snapshot_for(self, pushed_by: list) -> tuple[RankingSnapshot, list[bool], list[BaseException | None]]:
        """A snapshot no older than the pushes behind the users' rows (``pushed_by``, one per
        user; None for a user without a row or an unknown push): the current one, or one synced
        now. Returns it and, per user, whether even a fresh sync does not cover that user's push
        (the caller falls back to popularity and says ``mirror_behind``) and the error of a sync
        that user needed and that failed (the caller answers it; the users the snapshot already
        covers are ranked on it).

        Raises:
            Exception: the sync's own error when there is no snapshot to fall back on, or the
                mirror is stale (then everyone needed that sync).
        """
        # The first request starts the background sync (it needs the replica's event loop) and
        # syncs once itself; a mirror the background sync could not refresh for a while is
        # refreshed inline, so a broken sync shows as latency, not as stale answers.
        def needed() -> bool:
            served = self.served
            return self._stale() or served is None or not all(served[1].covers(p) for p in pushed_by)

        ok: list[BaseException | None] = [None] * len(pushed_by)
        started = self._start_syncer()
        if started or needed():
            try:
                await self._refresh(None if started else needed)
            except Exception as e:  # noqa: BLE001 - answered to the users who needed the sync
                if self.served is None or self._stale():
                    raise
                snap, coverage = self.served
                return snap, [False] * len(pushed_by), [None if coverage.covers(p) else e for p in pushed_by]
        snap, coverage = self.served
        return snap, [not coverage.covers(p) for p in pushed_by], ok

    async def _shard_contexts(self, shard: int, keys: np.ndarray) -> list[RankContext]:
        """The :class:`ps.shard.RankContext` of each user key on ``shard``: one call, bounded by
        ``request_timeout_s``."""
        call = self.client.shards[shard].rank_contexts.remote(self.cfg.model.user_table, keys, True)
        return (await asyncio.wait_for(call, self.timeout_s)).unpack()

    # No wait: a request is answered at once (a lone one does not even queue, see rank()), and
    # requests that arrive while batches run form the next ones. A 2 ms window only delayed
    # every request at ~150 req/s per replica, where a window holds ~0.3 requests
    # (bench.serve_latency, BENCHMARKS.md section 8). Four batches at once, so some wait on their
    # shard calls while one ranks: at 32 clients (high-throughput mode, 100,000 items, scoring
    # by matrix-vector products then) 1, 2 and 4 served 298, 507 and 534 req/s.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _rank_batch(self, items: list[tuple[RankRequest, asyncio.Future]]) -> list[None]:
        """:meth:`_rank_items` for the requests Serve's batch queue gathered."""
        return await self._rank_items(items)

    async def _rank_items(self, items: list[tuple[RankRequest, asyncio.Future]]) -> list[None]:
        """``/rank`` for several requests, each answered through its future: one call per shard
        for its users' contexts; the users of the shards that have answered (the first, and any
        within ``_SHARD_GRACE_S`` of it) get a snapshot covering their rows' pushes and are
        ranked together by :func:`_rank_requests` (the item matrix read once for them all);
        later shards' users the same way when theirs answer. A future gets ``(ranked,
        fallback_reason, model_version)`` or the exception that request alone failed with, so a
        slow or failed shard delays or fails only its own users."""
        requests = [r for r, _ in items]
        keys = keyed([r.user_id for r in requests], "user_id").keys  # IDs were validated by the schema
        shard_of = self.client.plan.shards_of_keys(keys)

        def answer(js: list[int], results: list) -> None:
            for j, res in zip(js, results):
                if not items[j][1].done():  # a client gone away cancelled its future
                    items[j][1].set_result(res)

        async def fetch(shard: int, js: list[int]) -> tuple[list[int], list[RankContext] | BaseException]:
            try:
                return js, await self._shard_contexts(shard, keys[js])
            except Exception as e:  # noqa: BLE001 - this shard's users get it; other shards' go on
                return js, e

        async def rank_parts(parts: list[tuple[list[int], list[RankContext] | BaseException]]) -> None:
            js, contexts = [], []
            for part_js, got in parts:
                if isinstance(got, BaseException):
                    answer(part_js, [got] * len(part_js))
                else:
                    js += part_js
                    contexts += got
            if not js:
                return
            try:
                snap, behind, failed = await self._snapshot_for(
                    [c.pushed_by if c.row is not None else None for c in contexts])
            except Exception as e:  # noqa: BLE001 - answered to these users
                answer(js, [e] * len(js))
                return
            # On the event loop, not in the pool: the ranking is a few ms of short numpy calls,
            # and a pool thread must win the GIL back from the loop after each one. In the pool,
            # a batch took 3-4x its CPU time at 32 clients and the replica served 337 req/s;
            # here, 507 (both scoring by matrix-vector products).
            # Users whose own sync failed get that error; only the others are ranked.
            ok = [i for i, f in enumerate(failed) if f is None]
            results: list = list(failed)
            # With no other /rank in flight on this replica, a lone request's product is split
            # over two threads (the same scores; BENCHMARKS.md section 8); under load, one.
            ranked = _rank_requests(snap, [requests[js[i]] for i in ok], [contexts[i] for i in ok],
                                    [behind[i] for i in ok], threads=2 if self._ranking <= 1 else 1)
            for i, r in zip(ok, ranked):
                results[i] = r
            answer(js, results)

        pending: set[asyncio.Future] = set()
        try:
            pending = {asyncio.ensure_future(fetch(s, np.flatnonzero(shard_of == s).tolist()))
                       for s in np.unique(shard_of).tolist()}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if pending:  # the other shards' answers are usually a moment behind: rank them together
                    more, pending = await asyncio.wait(pending, timeout=_SHARD_GRACE_S)
                    done |= more
                await rank_parts([t.result() for t in done])
        finally:  # whatever went wrong above, no request waits forever
            for t in pending:
                t.cancel()
            answer(list(range(len(items))), [RuntimeError("/rank batch ended without an answer")] * len(items))
        return [None] * len(items)

    def _check_k(self, k: int) -> None:
        max_k = self.cfg.serving.max_k
        if k > max_k:
            raise RequestValidationError(
                [
                    {
                        "type": "less_than_equal",
                        "loc": ("body", "k"),
                        "msg": f"Input should be less than or equal to {max_k} (serving.max_k)",
                        "input": k,
                        "ctx": {"le": max_k},
                    }
                ]
            )

    def _check_weights(self, events) -> None:
        """422 naming ``events.i.weight`` for a weight the model cannot train (too large, a
        rating beyond ``model.ratings.scale``, or outside an MSE model's rating range): refused
        at the door, not discovered in a trainer."""
        errors = []
        for i, e in enumerate(events):
            problem = self.cfg.model.weight_problem(e.weight, e.event_type)
            if problem is not None:
                errors.append({"type": "value_error", "loc": ("body", "events", i, "weight"), "msg": problem,
                               "input": e.weight})
        if errors:
            raise RequestValidationError(errors[:20])

    @staticmethod
    def _check_event_ids(events) -> None:
        """422 naming ``events.j.event_id`` when an event repeats an earlier event's ``event_id``
        in the batch but differs from it: where both land in one ingest partition the log would
        keep the first and drop the other as a duplicate (an event the client sent lost with a
        200), and elsewhere keep both, so the ID would name two events. An exact repeat is a
        duplicate, counted as such."""
        first: dict[str, int] = {}
        errors = []
        for j, e in enumerate(events):
            if e.event_id is None:
                continue
            i = first.setdefault(e.event_id, j)
            if i != j and e != events[i]:
                errors.append({"type": "value_error", "loc": ("body", "events", j, "event_id"),
                               "msg": f"event_id {e.event_id!r} also names events.{i}, a different event: "
                                      "an event_id names one event", "input": e.event_id})
        if errors:
            raise RequestValidationError(errors[:20])

    async def _record_recent(self, events, event_offsets: list[int]) -> None:
        """Put the posted positives (at their log offsets, ``AppendResult.event_offsets``) into
        their users' recent items on the shards, before ``/events`` answers (read-your-writes
        for exclusion and session context). Idempotent by offset: a retry of a request whose
        update failed, or a repost of an event the log has, records what is missing."""
        if not event_offsets:
            return
        off = np.asarray(event_offsets, np.int64)
        if self.cfg.model.loss == LossKind.MSE:
            positive = np.ones(len(events), bool)
        else:
            # As the log stores them (float32), so that a weight that rounds to 0 or across
            # ratings.positive_at is judged here as the trainers will judge it.
            positive = signals(np.asarray([e.weight for e in events], np.float32), [e.event_type for e in events],
                               self.cfg.model)[1]
        sel = np.flatnonzero(positive & (off >= 0))
        if not sel.size or self.cfg.ps.seen_per_user == 0:
            return
        users = keyed([events[j].user_id for j in sel.tolist()], "user_id").keys
        items = keyed([events[j].item_id for j in sel.tolist()], "item_id").keys
        shard_of = self.client.plan.shards_of_keys(users)
        calls = [self.client.shards[s].record_recent.remote(users[shard_of == s], items[shard_of == s], off[sel][shard_of == s])
                 for s in np.unique(shard_of).tolist()]
        await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)

    # -- endpoints ---------------------------------------------------------------------
    @fastapi_app.post("/events", response_model=EventsResponse)
    async def post_events(
        self,
        body: EventsRequest,
        idempotency_key: str | None = Header(
            None,
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=r"^[!-~]+$",
            description="1-255 visible ASCII characters naming this request, so a retry of it appends nothing twice",
        ),
    ):
        """Durably append a batch of interactions; 200 only once the ingest log has every part on disk.

        With an ``Idempotency-Key`` header, a retry of the request (after a 503, a timeout or
        a lost reply) either returns the original reply (it landed) or appends the events
        once (it did not), as long as the key is in the log's dedup window
        (``ingest.dedup_max_keys``, ``ingest.dedup_max_age_s``). An event whose ``event_id``
        its partition already has is counted in ``duplicates`` and not appended again; one that
        repeats an earlier event's ``event_id`` in the same request but differs from it gets 422.
        A bad key, or a key reused for other events (a retry repeats the same events in the same
        order), gets 422 naming ``Idempotency-Key``, and nothing is appended.
        """
        from workers.ingest_log import IdempotencyKeyReused, IngestWriteError

        n, limit = len(body.events), self.cfg.serving.max_events_per_request
        if n > limit:
            return JSONResponse(
                {"detail": f"events: {n} events exceed serving.max_events_per_request={limit}"}, status_code=413
            )
        ev = body.events
        self._check_weights(ev)
        self._check_event_ids(ev)
        types, ids = [e.event_type for e in ev], [e.event_id for e in ev]
        try:
            r = await self._call(
                INGEST_ACTOR,
                "append",
                [e.user_id for e in ev],
                [e.item_id for e in ev],
                [e.timestamp for e in ev],
                [e.weight for e in ev],
                types if any(t is not None for t in types) else None,
                ids if any(i is not None for i in ids) else None,
                idempotency_key,
            )
        except IdempotencyKeyReused as e:
            # Nothing was appended. Answering the first request's reply would acknowledge
            # events that were never written (IETF draft-ietf-httpapi-idempotency-key-header: 422).
            msg = str(getattr(e, "cause", None) or e).splitlines()[0]
            return JSONResponse({"detail": [{"type": "idempotency_key_reused", "loc": ["header", "Idempotency-Key"],
                                             "msg": msg}]}, status_code=422)
        except (_ActorMissing, IngestWriteError, *_UNAVAILABLE) as e:
            # A failed write acknowledged nothing of the failed parts: retrying (with the key) is safe.
            return _unavailable("ingest log", e)
        try:
            await self._record_recent(ev, r.event_offsets)
        except _UNAVAILABLE as e:
            # Durable, but the users' recent items may not show them yet: a retry with the key
            # appends nothing twice and records them then; the trainers deliver them anyway.
            return _unavailable("users' recent items", e)
        return EventsResponse(accepted=r.accepted, offset=r.offset, duplicates=r.duplicates, offsets=r.offsets)

    @fastapi_app.post("/rank", response_model=RankResponse)
    async def rank(self, body: RankRequest):
        """Top-``k`` items for the user; the popular fallback for a user without a trained row.

        503 (``Retry-After: 1``) when the PS, or a mirror sync the request waited on, fails
        with a Ray or timeout error.

        Raises:
            RequestValidationError: ``k`` above ``serving.max_k`` (answered 422).
            Exception: any other error of the ranking batch or of that sync (answered 500).
        """
        self._check_k(body.k)
        answered = asyncio.get_running_loop().create_future()
        # A request with no other /rank in flight on this replica skips Serve's batch queue,
        # which took ~0.28 ms of a lone request's ~4.6 in the replica (BENCHMARKS.md section 8);
        # requests that arrive while it is served form batches there. The batch may go on after
        # this request's answer (other shards' users); when it ends without one (Serve's
        # batching failed), its error becomes the answer. Cancelling a lone request's own work
        # leaves a mirror sync it started running to its end (_refresh).
        work = self._rank_items([(body, answered)]) if self._ranking == 0 else self._rank_batch((body, answered))
        batch = asyncio.ensure_future(work)
        batch.add_done_callback(functools.partial(_settle, answered))
        self._ranking += 1
        try:
            got = await answered
        except asyncio.CancelledError:  # the client went away: nobody waits for this answer
            batch.cancel()
            raise
        finally:
            self._ranking -= 1
        if isinstance(got, _UNAVAILABLE):
            return _unavailable("parameter server", got)
        if isinstance(got, BaseException):
            raise got
        ranked, reason, model_version = got
        return _rank_response(body.user_id, ranked, reason, model_version)

    @fastapi_app.post("/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest):
        """Scores of the given items for the user, in order (null for items the PS has no row for);
        only those items are scored. 503 (``Retry-After: 1``) when the PS does not answer.

        Raises:
            Exception: the error of the mirror sync this request waited on, when it is not a
                Ray or timeout error (answered 500).
        """
        keys = keyed([body.user_id], "user_id").keys
        try:
            (ctx,) = await self._shard_contexts(int(self.client.plan.shards_of_keys(keys)[0]), keys)
            snap, (behind,), (failed,) = await self._snapshot_for([ctx.pushed_by if ctx.row is not None else None])
            if failed is not None:
                raise failed
        except _UNAVAILABLE as e:
            return _unavailable("parameter server", e)
        behind = "mirror_behind" if behind else None
        row = None if behind else ctx.row
        if row is None and not behind and (cq := snap.context_query(ctx.recent)) is not None:
            row = np.zeros_like(cq)  # not trained yet: the session context alone, as /rank does
        scores, fallback = snap.score_items(row, body.item_ids, ctx.recent)
        reason = None if fallback is None else (behind or "new_user")
        return ScoreResponse(user_id=body.user_id, scores=scores, fallback=fallback, fallback_reason=reason)

    async def _trainer_states(self) -> tuple[dict[str, dict], dict[str, str]]:
        """Each trainer's ``stats()`` (those that answer) and why the others do not."""
        names = self._trainer_names()
        results = await asyncio.gather(*(self._call(n, "stats") for n in names), return_exceptions=True)
        ok = {n: r for n, r in zip(names, results) if not isinstance(r, BaseException)}
        down = {n: _why_down(r, self.timeout_s) for n, r in zip(names, results) if isinstance(r, BaseException)}
        return ok, down

    def _lags(self, trainers: dict[str, dict], ingest: dict | None,
              arrived: dict[tuple[int, int], float | None] | None = None) -> dict[str, dict]:
        """Per trainer: events not yet applied (``lag_events``) and the age of the oldest of
        them (``lag_s``, seconds: from ``arrived``, the log's arrival time of the event at each
        ``(partition, applied offset)``; else the trainer's own figure, which sees only events
        it has read); ``stalled`` when some wait and its offset has not moved for
        ``trainer.stall_s``."""
        ends = {str(p): o for p, o in enumerate(ingest.get("end_offsets", []))} if ingest else {}
        now = time.time()
        out = {}
        for name, t in trainers.items():
            offsets = _log_offsets(t, ingest)
            if offsets is None:  # it trains on a stream of its own (`up --keep-stream`): its own figures
                backlog, lag_s = None, t.get("lag_s")
            else:
                behind = {p: o for p, o in offsets.items() if ends.get(p, o) > o}
                backlog = sum(ends[p] - o for p, o in behind.items())
                ages = [now - ts for ts in ((arrived or {}).get((int(p), o)) for p, o in behind.items()) if ts is not None]
                lag_s = 0.0 if backlog == 0 else max(0.0, *ages) if ages else t.get("lag_s")
            stalled = bool(backlog) and t.get("last_progress_age_s", 0.0) > self.cfg.trainer.stall_s
            out[name] = {"lag_events": backlog, "lag_s": lag_s, "stalled": stalled, "state": t.get("state")}
        return out

    async def _arrivals(self, trainers: dict[str, dict], ingest: dict) -> dict[tuple[int, int], float | None]:
        """The log's arrival time of the event at each trainer's applied offset of each partition
        it is behind on (one call); empty when the log does not answer (``_lags`` falls back)."""
        ends = ingest.get("end_offsets", [])
        at = sorted({(int(p), o) for t in trainers.values() for p, o in (_log_offsets(t, ingest) or {}).items()
                     if int(p) < len(ends) and ends[int(p)] > o})
        if not at:
            return {}
        try:
            return dict(zip(at, await self._call(INGEST_ACTOR, "arrival_times", at)))
        except Exception:  # noqa: BLE001 - a figure of /stats: the trainers' own lag_s stands in
            return {}

    def namespace(self) -> str:
        """The Ray namespace of the deployment this app serves (a handle call, not a route):
        which deployment owns the one Freshet app on a cluster (``serving.deploy.app_namespace``)."""
        return self.cfg.namespace

    # HEAD too: load balancers and uptime checkers often probe with it (it was a 405).
    @fastapi_app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self):
        """200 when every PS shard and the ingest log answer and every trainer is running (not
        dead, restarting, failing or stalled); else 503 naming what is wrong."""
        self._start_syncer()  # a replica that has not ranked yet keeps its mirror current too
        names = [shard_actor_name(i) for i in range(self.client.num_shards)] + [INGEST_ACTOR]
        pings = await asyncio.gather(*(self._call(n, "ping") for n in names), return_exceptions=True)
        down = {n: _why_down(r, self.timeout_s) for n, r in zip(names, pings) if isinstance(r, BaseException)}
        ingest = None
        if INGEST_ACTOR not in down:
            try:
                ingest = await self._call(INGEST_ACTOR, "stats")
            except (_ActorMissing, *_UNAVAILABLE) as e:
                down[INGEST_ACTOR] = _why_down(e, self.timeout_s)
        trainers, trainers_down = await self._trainer_states()
        down.update(trainers_down)
        for name, lag in self._lags(trainers, ingest).items():
            if lag["state"] in ("failed", "retrying"):
                down[name] = f"{lag['state']}: {(trainers[name].get('error') or '').strip().splitlines()[-1:]}"
            elif lag["stalled"]:
                down[name] = f"stalled: {lag['lag_events']} events waiting, no progress for {self.cfg.trainer.stall_s:g} s"
        body = {
            "status": "ok" if not down else "unavailable",
            "shards": self.client.num_shards,
            "trainers": self.cfg.trainer.num_workers,
            "down": down,
        }
        if down:
            return JSONResponse(_finite(body), status_code=503, headers={"Retry-After": "1"})
        return _finite(body)

    @fastapi_app.get("/stats")
    async def stats(self):
        """Deployment counters: events accepted/applied, per-trainer lag, PS rows and memory per
        row, the ID lifecycle's counts per table, push rate, freshness, dead letters, the ingest log and the mirror; every figure
        finite JSON (null where undefined).

        503 when the PS or the ingest log does not answer; trainers that do not answer
        are listed in ``trainers_down`` and left out of the sums.
        """
        self._start_syncer()  # so that model_version and cached_items move on an idle replica too
        # One snapshot for both figures, taken before the shards are read: the mirror syncs while
        # this awaits, and read after them it could claim more pushes than ps_version counts.
        snap = self.snapshot
        shard_names = [shard_actor_name(i) for i in range(self.client.num_shards)]
        # The trainers first: events arrive and are applied while these calls run, so a log read
        # after them has accepted at least what they report applied (read before, it showed more
        # events applied than accepted, and a backlog as none).
        trainers, trainers_down = await self._trainer_states()
        try:
            ingest, *shards = await asyncio.gather(
                self._call(INGEST_ACTOR, "stats"), *(self._call(n, "stats") for n in shard_names)
            )
        except (_ActorMissing, *_UNAVAILABLE) as e:
            return _unavailable("parameter server or ingest log", e)
        rows: dict[str, dict[int, int]] = {}
        memory: dict[str, dict[int, dict]] = {}
        lifecycle: dict[str, dict[str, int]] = {}
        for st in shards:
            for table, t in st["tables"].items():
                rows.setdefault(table, {})[st["shard"]] = t["rows"]
                memory.setdefault(table, {})[st["shard"]] = {k: t[k] for k in ("bytes", "bytes_per_row", "row_bytes", "tombstones")}
                counts = lifecycle.setdefault(table, {})
                for k, v in t.get("lifecycle", {}).items():
                    counts[k] = counts.get(k, 0) + v

        def worst(q: str) -> float | None:
            vals = [t["freshness_ms"][q] for t in trainers.values() if t["freshness_ms"][q] is not None]
            return max(vals) if vals else None

        body = {
            "events_accepted": ingest["events_accepted"],
            "events_applied": sum(t["events_applied"] for t in trainers.values()),
            # On the ingest log, offsets count each partition apart: their sum is the log's
            # applied position, comparable with events_accepted. None while a trainer is down.
            "applied_offset": applied_position(list(trainers.values()), self.cfg) if trainers and not trainers_down else None,
            "applied_offsets": ({p: o for t in trainers.values() for p, o in t.get("applied_offsets", {}).items()}
                                if self.cfg.stream.kind == StreamKind.INGEST else None),
            "lag": self._lags(trainers, ingest, await self._arrivals(trainers, ingest)),
            "rows": rows,
            "memory": memory,
            # What the ID lifecycle did since each shard started, summed over shards: rows created,
            # absent IDs' pushes the admission bar refused, rows evicted (max_rows), expired (ttl_s),
            # removed for any reason (ps.table.EmbeddingTable.stats).
            "lifecycle": lifecycle,
            # Users' recent items (exclude_seen, session context), summed over shards.
            "recent_items": {"users": sum(st["users_with_recent"] for st in shards),
                             "entries": sum(st["recent_entries"] for st in shards),
                             "bytes": sum(st["recent_bytes"] for st in shards)},
            "push_rate": sum(st["push_rate"] for st in shards),
            "ps_version": sum(st["version"] for st in shards),
            "duplicate_pushes": sum(st["duplicate_pushes"] for st in shards),
            "quarantined": sum(t.get("quarantined", 0) for t in trainers.values()),
            "dead_lettered": sum(t.get("dead_lettered", 0) for t in trainers.values()),
            "freshness_ms": {"p50": worst("p50"), "p99": worst("p99")},
            "model_version": snap.model_version if snap is not None else 0,
            "cached_items": len(snap) if snap is not None else 0,
            "mirror": {"syncs": self.mirror.syncs, "full_resyncs": self.mirror.full_resyncs, "sync_error": self.sync_error},
            "ingest": {k: ingest.get(k) for k in ("partitions", "end_offsets", "first_offsets", "duplicates", "appends",
                                                  "fsyncs", "bytes_on_disk", "segments", "dedup_keys", "consumers", "pins")},
            "trainers": list(trainers.values()),
            "trainers_down": trainers_down,
        }
        return _finite(body)


def _deployment_options(cfg: FreshetConfig) -> dict[str, Any]:
    """``FreshetAPI.options(...)`` for ``cfg.serving``: replicas (fixed or autoscaled), concurrency,
    backpressure, and how often a stopping replica checks for in-flight requests."""
    from ray.serve.config import BackpressureConfig

    s = cfg.serving
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.replica_num_cpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=_BACKPRESSURE_RETRY_AFTER_S),
        "graceful_shutdown_wait_loop_s": _DRAIN_CHECK_S,
    }
    if s.autoscaling is not None:  # Serve refuses num_replicas together with autoscaling_config
        a = s.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def _bind(cfg: FreshetConfig) -> serve.Application:
    """The Serve application for ``cfg`` (nothing is started): ``serving.num_replicas`` or
    ``serving.autoscaling``, ``max_ongoing_requests``, and ``max_queued_requests`` (503 with
    ``Retry-After: 1`` beyond it)."""
    return FreshetAPI.options(**_deployment_options(cfg)).bind(cfg)


def build_app(args: dict | AppArgs) -> serve.Application:
    """Typed Serve application builder: validate ``args`` (see :class:`AppArgs`), load the config, bind.

    Needs no running Ray.

    Raises:
        pydantic.ValidationError: bad ``args`` (an unknown key, a wrong type).
        ps.config.ConfigError: the config file cannot be read or the config is invalid
            (naming the field path and the reason).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    return _bind(load_config(args.config_path, args.config))


app = build_app({})
"""The application with the default config (``serve run serving.app:app``)."""


def _warn_unauthenticated(s) -> None:
    """The loud warning for an app that listens beyond loopback without a token."""
    msg = (f"serving.host={s.host!r} is not loopback and serving.auth_token is not set "
           "(serving.allow_unauthenticated: true): anyone who can reach port "
           f"{s.port} can rank, score and post events")
    logger.warning(msg)
    print(f"\n{'*' * 78}\n* WARNING: {msg}\n{'*' * 78}\n", file=sys.stderr, flush=True)


def _high_throughput_controller_env(port: int) -> dict[str, str]:
    """Serve's high-throughput environment for the controller (``run_app``'s ``controller_options``),
    whose free ports leave ``port`` (the app's, bound later) alone.

    The same variables as this process's environment when it has them (``freshet up`` puts the
    head's into the CLI's, and a test sets them before Ray starts), so the controller agrees with
    the head; else a fresh :func:`serving.ray_head.high_throughput_env` in the cluster's
    :func:`serving.ray_head.serve_run_dir` (``serving.deploy.stop`` removes it once Serve is shut
    down), with HAProxy's stats and metrics on loopback only when the cluster has a single node
    (the wrapper that moves them is a file on this host).
    """
    import os

    from serving.ray_head import high_throughput_env, make_serve_run_dir

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    single_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    run_dir = make_serve_run_dir(ray.get_runtime_context().gcs_address)
    return high_throughput_env(run_dir, loopback=single_node, avoid=(port,))


def _app_messages(app) -> str:
    """Serve's own words on an application's state and its deployments' (why it waits: e.g.
    resources required and available)."""
    def word(status) -> str:
        return str(getattr(status, "value", status))

    parts = [f"{word(app.status)}{': ' + app.message if app.message else ''}"]
    parts += [f"{name} {word(d.status)}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "; ".join(parts)


def _drop_reconnect_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Connecting to existing Serve app")


def run_app(cfg: FreshetConfig, *, blocking: bool = False, ready_timeout_s: float = 120.0) -> None:
    """Start Serve on ``cfg.serving.host:port`` and deploy the app as ``"freshet"``; return once ``/healthz`` is 200.

    Needs a connected Ray driver and the deployment's actors already running.
    Access logs are off. ``blocking`` keeps serving until interrupted (then returns).
    ``ready_timeout_s`` is in seconds.

    With ``serving.high_throughput`` the Serve controller, when this call creates it, gets the
    high-throughput environment through ``controller_options`` (see
    :func:`serving.ray_head.high_throughput_env`); a controller that already runs keeps its
    mode. A non-loopback ``serving.host`` without ``serving.auth_token`` (allowed only by
    ``serving.allow_unauthenticated``) prints a warning.

    Raises:
        TimeoutError: the app is not running within ``ready_timeout_s`` seconds (no room for a
            replica, say; Serve's message is quoted), or then ``/healthz`` not 200 within as many
            more. The app is left for the caller to remove (``serving.deploy.stop``).
        RuntimeError: Serve reports the app's deployment failed (its message quoted).
        ValueError: a non-loopback host without a token that the config does not allow (a
            config built with ``model_construct``; ``load_config`` refuses it already).
    """
    s = cfg.serving
    if s.exposed_without_auth:
        if not s.allow_unauthenticated:
            raise ValueError(f"serving.host={s.host!r} is not loopback and serving.auth_token is not set; "
                             "set serving.auth_token or serving.allow_unauthenticated: true")
        _warn_unauthenticated(s)
    start_kwargs: dict[str, Any] = {}
    if s.high_throughput:
        start_kwargs["controller_options"] = {"runtime_env": {"env_vars": _high_throughput_controller_env(s.port)}}
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=_NO_ACCESS_LOG, **start_kwargs)
    # serve.run waits for the app to run with no time limit: on a cluster with no room for a
    # replica (and no autoscaler to add one) `freshet up` waited forever, saying nothing.
    # run_many connects to the Serve that serve.start just started or joined, and Serve notes
    # that "new http_options ... will not be applied": read as if serving.port were ignored.
    # serve.start above said so itself where it joined a running Serve.
    serve_logger = logging.getLogger("ray.serve")  # Serve's logger (ray.serve._private.constants)
    serve_logger.addFilter(_drop_reconnect_note)
    try:
        serve.run_many([serve.RunTarget(_bind(cfg), name=APP_NAME, route_prefix=s.route_prefix,
                                        logging_config=_NO_ACCESS_LOG)],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    finally:
        serve_logger.removeFilter(_drop_reconnect_note)
    deadline = time.monotonic() + ready_timeout_s
    while (app := serve.status().applications.get(APP_NAME)) is None or app.status != "RUNNING":
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the Serve app failed to deploy: {_app_messages(app)}")
        if time.monotonic() > deadline:
            free = ray.available_resources().get("CPU", 0.0)
            raise TimeoutError(
                f"the Serve app is not running after {ready_timeout_s} s (serving.replica_num_cpus: "
                f"{s.replica_num_cpus:g} a replica; CPUs free in the cluster: {free:g}): "
                f"{_app_messages(app) if app is not None else 'not deployed'}")
        time.sleep(0.2)
    deadline = time.monotonic() + ready_timeout_s
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}/healthz"
    last = "no answer"
    while True:
        try:
            r = httpx.get(url, timeout=max(1.0, s.request_timeout_s * 2))
            if r.status_code == 200:
                break
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy within {ready_timeout_s} s (last: {last})")
        time.sleep(0.2)
    logger.info("Freshet serving at http://%s:%s%s", host, s.port, s.route_prefix)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
