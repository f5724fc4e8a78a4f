"""A small asyncio HTTP load generator for Freshet's benchmarks (echo floor, ``/rank``, ...).

``N`` concurrent clients, each its own ``httpx.AsyncClient`` (one keep-alive connection,
like ``N`` independent users), send requests back to back (closed loop: a client sends
its next request as soon as the previous answer is read) until a time bound
(``duration_s``) or a request bound (``max_requests``, all clients together) is reached.
Requests come from a *request factory* callback; each answer can be checked by a
*body check* callback. Every request is recorded (start time, latency, status, error),
and :func:`summarize` turns the records into req/s, latency percentiles and error counts.

Units: times are seconds (``*_s``) unless the name ends in ``_ms`` (milliseconds);
throughput is requests per second of wall-clock time.

By default only loopback URLs (``127.0.0.1``, ``::1``, ``localhost``) are accepted, so a
mistyped URL cannot load a remote service; pass ``allow_remote=True`` to lift that.

Library use::

    from bench.http_load import RequestSpec, run_load, format_summary

    def factory(client: int, seq: int) -> RequestSpec:
        return RequestSpec("POST", "http://127.0.0.1:8123/rank", json={"user_id": f"u{seq % 100}", "k": 10}, tag="/rank")

    def check(spec, response):  # None (or True) = body OK; a string (or False) = why not
        return None if len(response.json()["items"]) == 10 else "wrong number of items"

    result = run_load(factory, clients=32, duration_s=10.0, check=check)
    print(format_summary(result.summary))

Demo: ``python -m bench.http_load http://127.0.0.1:8000/healthz --clients 1,8,32 --seconds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = [
    "BodyCheck",
    "LoadResult",
    "RequestFactory",
    "RequestSpec",
    "Sample",
    "Summary",
    "format_summary",
    "format_table",
    "main",
    "percentile",
    "run_load",
    "run_load_async",
    "summarize",
]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send.

    ``json`` and ``content`` are mutually exclusive (``json`` is encoded by httpx and
    sets ``Content-Type: application/json``). ``tag`` groups samples in the summary
    (e.g. the endpoint name); it defaults to the URL path.
    """

    method: str
    url: str
    headers: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | str | None = None
    tag: str = ""

    def label(self) -> str:
        """The tag, or the URL's path when no tag was given."""
        return self.tag or urlsplit(self.url).path or "/"


RequestFactory = Callable[[int, int], RequestSpec]
"""``factory(client_index, seq) -> RequestSpec``: the next request of client ``client_index``
(0-based); ``seq`` counts that client's requests (0-based, warm-up requests included).
Called in the event loop thread, so it may keep unsynchronised state."""

BodyCheck = Callable[[RequestSpec, httpx.Response], "str | bool | None | Awaitable[str | bool | None]"]
"""``check(spec, response)`` -> ``None``/``True`` when the answer is right, ``False`` or a
short reason string when not (may be ``async``). Runs outside the latency clock. An
exception it raises counts as a failed check (its repr is the reason)."""


@dataclass(frozen=True)
class Sample:
    """One finished request."""

    tag: str  # RequestSpec.label()
    client: int  # client index
    start_s: float  # seconds from the start of the measured run to sending the request
    latency_s: float  # seconds from sending the request to having read the whole response
    status: int  # HTTP status; 0 when no response came back (transport error or timeout)
    error: str | None = None  # exception class name when status == 0
    check_failure: str | None = None  # reason from the body check; None when it passed or was not run


@dataclass
class Summary:
    """Throughput, latency and outcomes of a set of samples.

    Latency fields cover every request that got an HTTP response (any status); requests
    with no response (``transport_errors``) are counted but not timed. ``ok`` counts
    responses whose status is in the run's ``ok_status`` and that passed the body check.
    """

    requests: int  # samples recorded (responses + transport errors)
    duration_s: float  # wall seconds of the measured run
    req_per_s: float  # requests / duration_s
    ok: int  # ok status and body check passed
    ok_per_s: float  # ok / duration_s
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    status_counts: dict[int, int] = field(default_factory=dict)  # every HTTP status seen -> count
    error_statuses: dict[int, int] = field(default_factory=dict)  # statuses not in ok_status -> count
    transport_errors: dict[str, int] = field(default_factory=dict)  # exception class -> count (no response)
    check_failures: dict[str, int] = field(default_factory=dict)  # body-check reason -> count (first 200 chars)
    clients: int | None = None  # concurrent clients of the run (None when summarizing arbitrary samples)
    by_tag: dict[str, Summary] = field(default_factory=dict)  # per RequestSpec.label(); empty inside a by_tag entry

    @property
    def errors(self) -> int:
        """Requests that were not ``ok``: bad status, no response, or failed body check."""
        return self.requests - self.ok

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (status codes become string keys)."""
        d = asdict(self)
        for key in ("status_counts", "error_statuses"):
            d[key] = {str(k): v for k, v in d[key].items()}
        d["errors"] = self.errors
        d["by_tag"] = {k: v.to_dict() for k, v in self.by_tag.items()}
        return d


@dataclass
class LoadResult:
    """What :func:`run_load` returns: every sample and their summary."""

    samples: list[Sample]
    summary: Summary


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of already-sorted values, linear interpolation; None if empty."""
    if not sorted_values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _default_ok(status: int) -> bool:
    return 200 <= status < 300


def _ok_predicate(ok_status: Collection[int] | Callable[[int], bool] | None) -> Callable[[int], bool]:
    if ok_status is None:
        return _default_ok
    if callable(ok_status):
        return ok_status
    allowed = frozenset(ok_status)
    return allowed.__contains__


def summarize(
    samples: list[Sample],
    duration_s: float,
    *,
    ok_status: Collection[int] | Callable[[int], bool] | None = None,
    clients: int | None = None,
    _by_tag: bool = True,
) -> Summary:
    """Summarize ``samples`` taken over ``duration_s`` wall seconds.

    ``ok_status``: statuses that count as success (a collection, or a predicate);
    default 2xx. Percentiles use linear interpolation over responded requests.
    """
    is_ok = _ok_predicate(ok_status)
    responded = sorted(s.latency_s * 1000.0 for s in samples if s.status)
    status_counts = Counter(s.status for s in samples if s.status)
    transport = Counter(s.error or "unknown" for s in samples if not s.status)
    checks = Counter((s.check_failure or "")[:200] for s in samples if s.check_failure is not None)
    ok = sum(1 for s in samples if s.status and is_ok(s.status) and s.check_failure is None)
    dur = max(duration_s, 1e-9)
    by_tag: dict[str, Summary] = {}
    if _by_tag:
        tags: dict[str, list[Sample]] = {}
        for s in samples:
            tags.setdefault(s.tag, []).append(s)
        by_tag = {
            t: summarize(ss, duration_s, ok_status=ok_status, clients=clients, _by_tag=False)
            for t, ss in sorted(tags.items())
        }
    return Summary(
        requests=len(samples),
        duration_s=duration_s,
        req_per_s=len(samples) / dur,
        ok=ok,
        ok_per_s=ok / dur,
        p50_ms=percentile(responded, 50),
        p90_ms=percentile(responded, 90),
        p99_ms=percentile(responded, 99),
        mean_ms=(sum(responded) / len(responded)) if responded else None,
        max_ms=responded[-1] if responded else None,
        status_counts=dict(sorted(status_counts.items())),
        error_statuses={k: v for k, v in sorted(status_counts.items()) if not is_ok(k)},
        transport_errors=dict(transport),
        check_failures=dict(checks),
        clients=clients,
        by_tag=by_tag,
    )


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host.lower() in _LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing non-loopback URL {url!r} (pass allow_remote=True to load a remote host)")


async def _run_check(check: BodyCheck, spec: RequestSpec, resp: httpx.Response) -> str | None:
    try:
        verdict = check(spec, resp)
        if asyncio.iscoroutine(verdict) or isinstance(verdict, asyncio.Future):
            verdict = await verdict
    except Exception as e:  # noqa: BLE001 -- a crashing check is a failed check, not a crashed run
        return f"check raised {e!r}"
    if verdict is None or verdict is True:
        return None
    if verdict is False:
        return "check failed"
    return str(verdict)


async def run_load_async(
    factory: RequestFactory,
    *,
    clients: int = 8,
    duration_s: float = 10.0,
    max_requests: int | None = None,
    warmup_s: float = 0.0,
    check: BodyCheck | None = None,
    ok_status: Collection[int] | Callable[[int], bool] | None = None,
    timeout_s: float = 30.0,
    headers: Mapping[str, str] | None = None,
    allow_remote: bool = False,
    http2: bool = False,
) -> LoadResult:
    """Run ``clients`` concurrent closed-loop clients; return every sample and the summary.

    Args:
        factory: builds each request (see :data:`RequestFactory`).
        clients: concurrent clients (>= 1); each owns one ``httpx.AsyncClient``.
        duration_s: measured wall-clock bound in seconds (> 0): no request starts after
            it; requests in flight then are still awaited (each bounded by ``timeout_s``).
        max_requests: optional bound on measured requests, all clients together.
        warmup_s: seconds of unrecorded requests on the same connections first (0 = none).
        check: optional body check (see :data:`BodyCheck`), run on every measured response.
        ok_status: statuses that count as success; default 2xx.
        timeout_s: per-request timeout in seconds (connect, read, write and pool).
        headers: headers added to every request (the spec's headers win on conflicts).
        allow_remote: allow URLs whose host is not loopback.
        http2: negotiate HTTP/2 (needs the ``h2`` package); default HTTP/1.1.

    ``summary.duration_s`` runs from the start of the measured phase until the last
    client has finished (in-flight requests included), so req/s is completed requests
    per wall second.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1 or None, got {max_requests}")
    if warmup_s < 0:
        raise ValueError(f"warmup_s must be >= 0, got {warmup_s}")

    samples: list[Sample] = []
    seqs = [0] * clients
    budget = [max_requests if max_requests is not None else -1]  # shared counter; single event loop, no lock
    checked_urls: set[str] = set()

    def next_spec(i: int) -> RequestSpec:
        spec = factory(i, seqs[i])
        seqs[i] += 1
        if not allow_remote:
            base = spec.url.split("?", 1)[0]
            if base not in checked_urls:
                _check_loopback(spec.url)
                checked_urls.add(base)
        return spec

    async def send(http: httpx.AsyncClient, spec: RequestSpec) -> tuple[httpx.Response | None, str | None, float]:
        t = time.perf_counter()
        try:
            resp = await http.request(spec.method, spec.url, headers=spec.headers, json=spec.json, content=spec.content)
            return resp, None, time.perf_counter() - t  # httpx reads the whole body before returning
        except httpx.HTTPError as e:
            return None, type(e).__name__, time.perf_counter() - t

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(timeout_s)
    https = [httpx.AsyncClient(headers=dict(headers or {}), timeout=timeout, limits=limits, http2=http2) for _ in range(clients)]
    try:
        if warmup_s > 0:
            w_end = time.perf_counter() + warmup_s

            async def warm(i: int) -> None:
                while time.perf_counter() < w_end:
                    await send(https[i], next_spec(i))

            await asyncio.gather(*(warm(i) for i in range(clients)))

        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client(i: int) -> None:
            http = https[i]
            while time.perf_counter() < deadline:
                if budget[0] == 0:
                    return
                if budget[0] > 0:
                    budget[0] -= 1
                spec = next_spec(i)
                start = time.perf_counter()
                resp, err, lat = await send(http, spec)
                failure = None
                if resp is not None and check is not None:
                    failure = await _run_check(check, spec, resp)
                samples.append(
                    Sample(
                        tag=spec.label(),
                        client=i,
                        start_s=start - t0,
                        latency_s=lat,
                        status=resp.status_code if resp is not None else 0,
                        error=err,
                        check_failure=failure,
                    )
                )

        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(h.aclose() for h in https), return_exceptions=True)
    samples.sort(key=lambda s: s.start_s)
    return LoadResult(samples, summarize(samples, wall, ok_status=ok_status, clients=clients))


def run_load(factory: RequestFactory, **kwargs: Any) -> LoadResult:
    """Synchronous wrapper of :func:`run_load_async` (starts its own event loop; same arguments)."""
    return asyncio.run(run_load_async(factory, **kwargs))


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_summary(s: Summary, title: str = "") -> str:
    """A few human-readable lines describing ``s`` (per-tag lines when there are several tags)."""
    head = f"{title}: " if title else ""
    who = f"{s.clients} clients, " if s.clients is not None else ""
    lines = [
        (
            f"{head}{who}{s.requests} requests in {s.duration_s:.2f} s = {s.req_per_s:.1f} req/s "
            f"(ok {s.ok_per_s:.1f}/s); latency ms p50 {_fmt_ms(s.p50_ms)} p90 {_fmt_ms(s.p90_ms)} "
            f"p99 {_fmt_ms(s.p99_ms)} max {_fmt_ms(s.max_ms)}"
        ),
        f"  statuses {s.status_counts}; errors {s.errors}"
        + (f"; bad statuses {s.error_statuses}" if s.error_statuses else "")
        + (f"; no response {s.transport_errors}" if s.transport_errors else "")
        + (f"; check failures {s.check_failures}" if s.check_failures else ""),
    ]
    if len(s.by_tag) > 1:
        for tag, t in s.by_tag.items():
            lines.append(
                f"  {tag}: {t.requests} req, {t.req_per_s:.1f} req/s, p50 {_fmt_ms(t.p50_ms)} "
                f"p99 {_fmt_ms(t.p99_ms)} ms, errors {t.errors}"
            )
    return "\n".join(lines)


def format_table(rows: list[tuple[str, Summary]]) -> str:
    """A fixed-width table, one line per ``(label, summary)``."""
    out = [f"{'run':<28} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for label, s in rows:
        out.append(
            f"{label:<28} {s.clients if s.clients is not None else '-':>7} {s.req_per_s:>9.1f} "
            f"{_fmt_ms(s.p50_ms):>8} {_fmt_ms(s.p90_ms):>8} {_fmt_ms(s.p99_ms):>8} {s.errors:>7}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI demo: load one URL at one or more client counts and print a table (exit 1 on any error)."""
    p = argparse.ArgumentParser(prog="python -m bench.http_load", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="target URL (loopback only unless --allow-remote)")
    p.add_argument("--clients", default="8", help="concurrent clients, or a comma list to sweep (default 8)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    p.add_argument("--requests", type=int, default=None, help="max measured requests per run (default: no bound)")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured warm-up seconds per run (default 0.5)")
    p.add_argument("--method", default="GET")
    p.add_argument("--json", dest="json_body", default=None, help="JSON request body (sets POST if --method is GET)")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--expect-status", type=int, action="append", default=None, help="ok status (repeatable; default 2xx)")
    p.add_argument("--expect-body", default=None, help="substring every response body must contain")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--allow-remote", action="store_true")
    p.add_argument("--json-out", action="store_true", help="also print the summaries as JSON")
    a = p.parse_args(argv)
    if not a.allow_remote:
        try:
            _check_loopback(a.url)
        except ValueError as e:
            p.error(str(e))

    headers = {}
    for h in a.header:
        name, sep, value = h.partition(":")
        if not sep:
            p.error(f"bad header {h!r}: want 'Name: value'")
        headers[name.strip()] = value.strip()
    body = json.loads(a.json_body) if a.json_body is not None else None
    method = "POST" if body is not None and a.method.upper() == "GET" else a.method.upper()
    spec = RequestSpec(method, a.url, json=body)
    check = None
    if a.expect_body is not None:
        want = a.expect_body

        def check(_spec: RequestSpec, r: httpx.Response) -> str | None:
            return None if want in r.text else f"body lacks {want!r}"

    try:
        counts = [int(c) for c in a.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients: want integers, got {a.clients!r}")
    rows = []
    for c in counts:
        res = run_load(
            lambda _i, _n: spec,
            clients=c,
            duration_s=a.seconds,
            max_requests=a.requests,
            warmup_s=a.warmup,
            check=check,
            ok_status=a.expect_status,
            timeout_s=a.timeout,
            headers=headers,
            allow_remote=a.allow_remote,
        )
        print(format_summary(res.summary, f"{method} {a.url}"), flush=True)
        if a.json_out:
            print(json.dumps(res.summary.to_dict()), flush=True)
        rows.append((f"{method} {urlsplit(a.url).path}"[:28], res.summary))
    print(format_table(rows))
    return 0 if all(s.errors == 0 for _, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
