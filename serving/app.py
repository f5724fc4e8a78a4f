"""The Ray Serve ranking application: ``/events``, ``/rank``, ``/score``, ``/healthz``, ``/stats``.

``FreshetAPI`` replicas attach to a running deployment's named actors (PS shards, the
``ingest-log`` and the ``trainer-{i}`` actors in ``cfg.namespace``); they start none
of them. A replica reads the user's row fresh from the PS on every request (read-only,
never creating rows) and ranks against a local mirror of the item tables kept current
by delta sync. Every PS or actor call is bounded by ``serving.request_timeout_s``; a
timeout or a dead actor answers 503 with ``Retry-After`` rather than 500 or a hang.

Run it with ``run_app(cfg)``, ``serve run serving.app:app`` (default config) or
``serve run serving.app:build_app config_path=freshet.yaml``.
"""

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
from typing import Any

import httpx
import numpy as np
import pydantic
import ray
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, GetTimeoutError, NodeDiedError, ObjectLostError, RayActorError, RaySystemError

from ps.cache import RowCache
from ps.client import PSClient, shard_actor_name
from serving.config import FreshetConfig, load_config
from serving.schemas import (
    EventsRequest,
    EventsResponse,
    RankedItem,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
)
from workers.ingest_log import INGEST_ACTOR
from workers.ranking import Ranker
from workers.trainer import trainer_actor_name

__all__ = ["AppArgs", "FreshetAPI", "app", "build_app", "run_app"]

logger = logging.getLogger("freshet.serving")

APP_NAME = "freshet"
"""Serve application name used by :func:`run_app`."""

_NO_ACCESS_LOG = {"enable_access_log": False}
# Failures that mean "a dependency is down or slow right now": the client should retry.
# A RayTaskError (a bug raised inside an actor) is deliberately not here.
_UNAVAILABLE = (TimeoutError, GetTimeoutError, RayActorError, ObjectLostError, NodeDiedError, RaySystemError)
_WRITE_PATHS = frozenset({"/events"})  # endpoints that need the bearer token when one is configured


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
    """True for ``application/json`` and ``application/*+json`` (parameters such as charset ignored)."""
    media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _Guard:
    """ASGI middleware: bearer auth on write endpoints, JSON-only bodies, then the body size limit.

    All run before FastAPI reads the body, so an unauthenticated or oversized request
    costs at most ``max_body_bytes`` of buffering. The limits live in class attributes
    set by the replica's constructor: the FastAPI app is frozen (pickled) when the
    deployment class is decorated, before any config exists, and each replica is its
    own process, so a class attribute is per replica.
    """

    max_body_bytes: int = 8 << 20
    auth_token: str | None = None

    def __init__(self, app):
        self.app = app

    @classmethod
    def configure(cls, max_body_bytes: int, auth_token: str | None) -> None:
        """Set this process's limits (called by each replica's constructor)."""
        cls.max_body_bytes, cls.auth_token = max_body_bytes, auth_token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if scope.get("method") == "POST" and path.rstrip("/") in _WRITE_PATHS:
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
                {"detail": f"Content-Type must be application/json, got {ctype.decode('latin-1')[:100]!r}"},
                status_code=415,
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


def _unavailable(what: str, err: BaseException) -> JSONResponse:
    """503 telling the client to retry after a second."""
    reason = type(err).__name__ if not str(err) else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return JSONResponse(
        {"detail": f"{what} unavailable ({reason}); retry"}, status_code=503, headers={"Retry-After": "1"}
    )


@serve.deployment(logging_config=_NO_ACCESS_LOG)
@serve.ingress(fastapi_app)
class FreshetAPI:
    """One ranking replica of the deployment described by ``cfg``.

    Holds a PS client, an item-table mirror (:class:`ps.cache.RowCache`) and handles
    of the ingest log and trainers (looked up lazily, so a replica can start before
    the trainers do; ``/healthz`` reports what is missing).
    """

    def __init__(self, cfg: FreshetConfig):
        self.cfg = cfg
        s = cfg.serving
        _Guard.configure(s.max_body_bytes, s.auth_token)
        self.timeout_s = s.request_timeout_s
        self.refresh_s = s.cache_refresh_s
        self.client = PSClient.connect(cfg.namespace, timeout_s=s.request_timeout_s)
        m = cfg.model
        self.cache = RowCache(self.client, m.item_tables())
        self.ranker = Ranker(self.cache, m)
        # RowCache is not thread-safe: sync and ranking hold this lock; PS reads of user rows do not.
        self._cache_lock = asyncio.Lock()
        # Blocking PSClient calls run here so the replica's event loop keeps serving other requests.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="freshet-ps")
        self._actors: dict[str, Any] = {}
        try:
            self.cache.sync()  # warm the mirror; a failure here is retried by the first request
        except _UNAVAILABLE as e:
            logger.warning("initial item-cache sync failed (%s); the first request retries it", e)

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

    async def _sync(self) -> None:
        """Bring the item mirror up to date if it is older than ``serving.cache_refresh_s``."""
        async with self._cache_lock:
            await self._run(self.cache.sync_if_older, self.refresh_s)

    async def _user(self, user_id, with_seen: bool):
        """``(row or None, seen items)`` of one user, read fresh and read-only, with the mirror synced meanwhile."""
        table = self.cfg.model.user_table
        pulled, seen, _ = await asyncio.gather(
            self._run(self.client.pull_many, {table: [user_id]}, create=False),
            self._run(self.client.seen, [user_id]) if with_seen else asyncio.sleep(0, [[]]),
            self._sync(),
        )
        rows, found = pulled[table]
        return (rows[0] if found[0] else None), seen[0]

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

    # -- endpoints ---------------------------------------------------------------------
    @fastapi_app.post("/events", response_model=EventsResponse)
    async def post_events(self, body: EventsRequest):
        """Durably append a batch of interactions; 200 only once the ingest log has it on disk."""
        n, limit = len(body.events), self.cfg.serving.max_events_per_request
        if n > limit:
            return JSONResponse(
                {"detail": f"events: {n} events exceed serving.max_events_per_request={limit}"}, status_code=413
            )
        ev = body.events
        try:
            _, last = await self._call(
                INGEST_ACTOR,
                "append",
                [e.user_id for e in ev],
                [e.item_id for e in ev],
                [e.timestamp for e in ev],
                [e.weight for e in ev],
            )
        except (_ActorMissing, *_UNAVAILABLE) as e:
            return _unavailable("ingest log", e)
        return EventsResponse(accepted=n, offset=last)

    @fastapi_app.post("/rank", response_model=RankResponse)
    async def rank(self, body: RankRequest):
        """Top-``k`` items for the user; the popular fallback for a user without a trained row."""
        self._check_k(body.k)
        context = self.cfg.model.context_table is not None
        try:
            # The user's items serve twice: excluded from the list, and their latest as session context.
            row, seen = await self._user(body.user_id, body.exclude_seen or context)
        except _UNAVAILABLE as e:
            return _unavailable("parameter server", e)
        dim = self.client.dims[self.cfg.model.user_table]
        vecs = (row if row is not None else np.zeros(dim, np.float32))[None, :]
        found = np.array([row is not None])
        exclude = [seen if body.exclude_seen else []]
        async with self._cache_lock:
            ranked = (await self._run(self.ranker.rank_many, vecs, found, exclude, body.k, [seen]))[0]
            version = self.cache.model_version
        items = [RankedItem(item_id=_json_id(i), score=s) for i, s in zip(ranked.item_ids, ranked.scores)]
        return RankResponse(user_id=body.user_id, items=items, fallback=ranked.fallback, model_version=version)

    @fastapi_app.post("/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest):
        """Scores of the given items for the user, in order (null for items the PS has no row for)."""
        try:
            row, seen = await self._user(body.user_id, self.cfg.model.context_table is not None)
        except _UNAVAILABLE as e:
            return _unavailable("parameter server", e)
        async with self._cache_lock:
            scores, fallback = await self._run(self.ranker.score_items, row, body.item_ids, seen)
        return ScoreResponse(user_id=body.user_id, scores=scores, fallback=fallback)

    @fastapi_app.get("/healthz")
    async def healthz(self):
        """200 when every PS shard, the ingest log and every trainer answers a ping in time; else 503 naming what is down."""
        names = [shard_actor_name(i) for i in range(self.client.num_shards)] + [INGEST_ACTOR] + self._trainer_names()
        results = await asyncio.gather(*(self._call(n, "ping") for n in names), return_exceptions=True)
        down = {n: type(r).__name__ for n, r in zip(names, results) if isinstance(r, BaseException)}
        body = {
            "status": "ok" if not down else "unavailable",
            "shards": self.client.num_shards,
            "trainers": self.cfg.trainer.num_workers,
            "down": down,
        }
        if down:
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        return body

    @fastapi_app.get("/stats")
    async def stats(self):
        """Deployment counters: events accepted/applied, offsets, PS rows, push rate, freshness, trainers.

        503 when the PS or the ingest log does not answer; trainers that do not answer
        are listed in ``trainers_down`` and left out of the sums.
        """
        shard_names = [shard_actor_name(i) for i in range(self.client.num_shards)]
        trainer_names = self._trainer_names()
        try:
            _, ingest, *shards = await asyncio.gather(
                self._sync(), self._call(INGEST_ACTOR, "stats"), *(self._call(n, "stats") for n in shard_names)
            )
        except (_ActorMissing, *_UNAVAILABLE) as e:
            return _unavailable("parameter server or ingest log", e)
        trainer_results = await asyncio.gather(*(self._call(n, "stats") for n in trainer_names), return_exceptions=True)
        trainers = [r for r in trainer_results if not isinstance(r, BaseException)]
        trainers_down = {n: type(r).__name__ for n, r in zip(trainer_names, trainer_results) if isinstance(r, BaseException)}

        rows: dict[str, dict[int, int]] = {}
        for st in shards:
            for table, count in st["rows"].items():
                rows.setdefault(table, {})[st["shard"]] = count

        def worst(q: str) -> float | None:
            vals = [t["freshness_ms"][q] for t in trainers if t["freshness_ms"][q] is not None]
            return max(vals) if vals else None

        return {
            "events_accepted": ingest["events_accepted"],
            "events_applied": sum(t["events_applied"] for t in trainers),
            "applied_offset": min((t["applied_offset"] for t in trainers), default=None),
            "rows": rows,
            "push_rate": sum(st["push_rate"] for st in shards),
            "ps_version": sum(st["version"] for st in shards),
            "duplicate_pushes": sum(st["duplicate_pushes"] for st in shards),
            "quarantined": sum(t.get("quarantined", 0) for t in trainers),
            "freshness_ms": {"p50": worst("p50"), "p99": worst("p99")},
            "model_version": self.cache.model_version,
            "cached_items": len(self.cache),
            "trainers": trainers,
            "trainers_down": trainers_down,
        }


def _bind(cfg: FreshetConfig) -> serve.Application:
    """The Serve application for ``cfg`` (nothing is started)."""
    return FreshetAPI.options(
        num_replicas=cfg.serving.num_replicas,
        ray_actor_options={"num_cpus": cfg.serving.replica_num_cpus},
    ).bind(cfg)


def build_app(args: dict | AppArgs) -> serve.Application:
    """Typed Serve application builder: validate ``args`` (see :class:`AppArgs`), load the config, bind.

    Raises ``pydantic.ValidationError`` for bad ``args`` and ``ps.config.ConfigError``
    naming the field for a bad config. Needs no running Ray.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    return _bind(load_config(args.config_path, args.config))


app = build_app({})
"""The application with the default config (``serve run serving.app:app``)."""


def run_app(cfg: FreshetConfig, *, blocking: bool = False, ready_timeout_s: float = 120.0) -> None:
    """Start Serve on ``cfg.serving.host:port`` and deploy the app as ``"freshet"``; return once ``/healthz`` is 200.

    Needs a connected Ray driver and the deployment's actors already running.
    Access logs are off. ``blocking`` keeps serving until interrupted.
    Raises ``TimeoutError`` if ``/healthz`` is not 200 within ``ready_timeout_s`` seconds.
    """
    s = cfg.serving
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=_NO_ACCESS_LOG)
    serve.run(_bind(cfg), name=APP_NAME, route_prefix=s.route_prefix, logging_config=_NO_ACCESS_LOG)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}/healthz"
    deadline = time.monotonic() + ready_timeout_s
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
