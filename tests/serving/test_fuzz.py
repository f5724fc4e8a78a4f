"""Property-based fuzzing of every endpoint of a real deployment over real HTTP.

One module-scoped deployment (real Ray: 2 PS shards, the ingest log, one trainer, the
Serve app with a bearer token) is seeded with a few events, then ``hypothesis`` throws
malformed, hostile and borderline requests at ``POST /events``, ``/rank``, ``/score`` and
``GET /healthz``, ``/stats`` on 127.0.0.1.

Each request's expected outcome comes from an independent oracle of the HTTP contract
(``serving/_schemas.py`` plus the deployment's limits): a body the contract accepts must
get 200 (and a well-formed answer), any other body a 4xx, and nothing may ever get a
5xx. Tests that send only requests which must not write check afterwards that
``/stats`` (``events_accepted``, ``rows``) and a sample of PS rows are unchanged.
``test_valid_extreme_events_are_accepted_and_applied`` writes on purpose and runs last.

Generation is derandomized (same examples every run) and bounded (~60 examples per test).
"""

from __future__ import annotations

import json
import math
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.conftest import _ray_start, free_port, wait_for

TOKEN = "fuzz-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_HDR = {**AUTH, "Content-Type": "application/json"}
MAX_EVENTS = 20
MAX_BODY = 64 * 1024
MAX_K = 50
MAX_SCORE_ITEMS = 10_000  # serving.schemas.MAX_SCORE_ITEMS, restated: the oracle must not import the code under test
MAX_ID_BYTES = 1024
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
SEED_USERS = [f"fz-u{i}" for i in range(8)] + [7, -3]
SEED_ITEMS = list(range(12)) + ["fz-item-a", "fz-item-b"]

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- the deployment


@dataclass
class FuzzTarget:
    """The running system under test."""

    http: httpx.Client
    cfg: Any
    ps: Any  # ps.client.PSClient attached from the driver






def _stats(http: httpx.Client) -> dict:
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


def _settled(http: httpx.Client, timeout_s: float = 30.0) -> dict:
    """Stats once the trainer has applied every accepted event."""
    return wait_for(
        lambda: (s := _stats(http))["events_applied"] + s["dead_lettered"] == s["events_accepted"] and s,
        timeout_s,
        "the trainer to apply every accepted event",
    )


@pytest.fixture(scope="module")
def deployment():
    """A seeded deployment with token auth, small dims and tight limits."""
    from ps.client import PSClient
    from serving import deploy
    from serving.config import load_config

    cfg = load_config(
        None,
        {
            "namespace": f"t-fuzz-{uuid.uuid4().hex[:8]}",
            "ps": {"num_shards": 2, "num_buckets": 32, "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
            "trainer": {"num_workers": 1, "batch_size": 32, "device": "cpu"},
            "stream": {"kind": "ingest", "num_events": None},
            "ingest": {"dir": tempfile.mkdtemp(prefix="freshet-fuzz-"), "fsync": False},
            "serving": {
                "port": free_port(),
                "auth_token": TOKEN,
                "max_events_per_request": MAX_EVENTS,
                "max_body_bytes": MAX_BODY,
                "max_k": MAX_K,
                "cache_refresh_s": 0.05,
                "request_timeout_s": 5.0,
            },
        },
    )
    with _ray_start():
        dep = deploy.start(cfg, durable=False, autostart=True)  # noqa: F841 - keeps the actors alive
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{cfg.serving.port}", timeout=30.0) as http:
                seed = [
                    {"user_id": u, "item_id": SEED_ITEMS[(j * 5 + k) % len(SEED_ITEMS)], "timestamp": 1.7e9 + j}
                    for j, u in enumerate(SEED_USERS)
                    for k in range(4)
                ]
                for start in range(0, len(seed), MAX_EVENTS):
                    r = http.post("/events", json={"events": seed[start : start + MAX_EVENTS]}, headers=AUTH)
                    assert r.status_code == 200, r.text
                _settled(http, 60.0)
                yield FuzzTarget(http, cfg, PSClient.connect(cfg.namespace))
        finally:
            deploy.stop(cfg)


def _snapshot(dep: FuzzTarget) -> dict:
    """What must not change when only rejected or read-only requests were sent."""
    s = _stats(dep.http)
    m = dep.cfg.model
    pulled = dep.ps.pull_many(
        {m.user_table: SEED_USERS, m.item_table: SEED_ITEMS, m.item_bias_table: SEED_ITEMS, m.popularity_table: SEED_ITEMS},
        create=False,
    )
    return {
        "events_accepted": s["events_accepted"],
        "rows": s["rows"],
        "ps": {t: (rows.copy(), found.copy()) for t, (rows, found) in pulled.items()},
    }


@pytest.fixture
def unchanged(deployment):
    """Fails the test if it changed the accepted-event count, the row counts or the sampled PS rows."""
    before = _snapshot(deployment)
    assert all(found.all() for _, found in before["ps"].values()), "seed rows missing from the PS"
    yield deployment
    after = _snapshot(deployment)
    assert after["events_accepted"] == before["events_accepted"], "rejected requests appended events"
    assert after["rows"] == before["rows"], "rejected or read-only requests created PS rows"
    for table, (rows, found) in before["ps"].items():
        np.testing.assert_array_equal(after["ps"][table][1], found, err_msg=f"{table}: found-mask changed")
        np.testing.assert_array_equal(after["ps"][table][0], rows, err_msg=f"{table}: rows changed")


# --------------------------------------------------------------------------- the contract oracle


@dataclass(frozen=True)
class Verdict:
    """What the contract says about one request body."""

    valid: bool
    reason: str = ""
    field: str | None = None  # a field the 422 must name, when the problem is one field
    status: int | None = None  # the exact status the contract fixes, when it fixes one


OK = Verdict(True)


class _Bad(Exception):
    def __init__(self, field: str | None, reason: str, status: int | None = None):
        super().__init__(reason)
        self.field, self.reason, self.status = field, reason, status


def _id(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Bad(field, f"{field} is {type(value).__name__}, not an int or str ID")
    if isinstance(value, int) and not I64_MIN <= value <= I64_MAX:
        raise _Bad(field, f"{field} outside int64")
    if isinstance(value, str):
        if not value:
            raise _Bad(field, f"{field} is empty")
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Bad(field, f"{field} has a lone surrogate (not UTF-8)") from None
        if n > MAX_ID_BYTES:
            raise _Bad(field, f"{field} longer than {MAX_ID_BYTES} bytes")


def _number(value: Any, field: str, *, ge: float | None = None, le: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(field, f"{field} is {type(value).__name__}, not a number")
    try:
        f = float(value)
    except OverflowError:
        raise _Bad(field, f"{field} beyond float64") from None
    if not math.isfinite(f):
        raise _Bad(field, f"{field} not finite")
    if ge is not None and f < ge:
        raise _Bad(field, f"{field} below {ge}")
    if le is not None and f > le:
        raise _Bad(field, f"{field} above {le}")


F32_MAX = 3.4e38  # serving bounds weights to float32's range (the log stores float32)
MAX_ABS_WEIGHT = 1000.0  # model.max_abs_weight's default, restated: larger weights would overflow training


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _object(obj: Any, required: set[str], allowed: set[str]) -> dict:
    if not isinstance(obj, dict):
        raise _Bad(None, f"body is {type(obj).__name__}, not an object")
    for key in obj:
        if key not in allowed:
            # A key pydantic cannot even decode (a lone surrogate) is reported at the body.
            raise _Bad(key if _utf8(key) else "body", f"unknown field {key!r}")
    for key in sorted(required):
        if key not in obj:
            raise _Bad(key, f"missing {key}")
    return obj


def _rank(obj: Any) -> None:
    obj = _object(obj, {"user_id"}, {"user_id", "k", "exclude_seen"})
    _id(obj["user_id"], "user_id")
    k = obj.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100_000:
        raise _Bad("k", f"k={k!r} is not an int in [1, 100000]")
    if not isinstance(obj.get("exclude_seen", True), bool):
        raise _Bad("exclude_seen", "exclude_seen is not a bool")
    if k > MAX_K:  # the deployment's limit, checked after the schema
        raise _Bad("k", f"k={k} > serving.max_k={MAX_K}", 422)


def _score(obj: Any) -> None:
    obj = _object(obj, {"user_id", "item_ids"}, {"user_id", "item_ids"})
    _id(obj["user_id"], "user_id")
    items = obj["item_ids"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_SCORE_ITEMS:
        raise _Bad("item_ids", f"item_ids is not a list of 1..{MAX_SCORE_ITEMS} IDs")
    for x in items:
        _id(x, "item_ids")


def _events(obj: Any) -> None:
    obj = _object(obj, {"events"}, {"events"})
    events = obj["events"]
    if not isinstance(events, list) or not events:
        raise _Bad("events", "events is not a non-empty list")
    for e in events:
        e = _object(e, {"user_id", "item_id"}, {"user_id", "item_id", "timestamp", "weight", "event_type", "event_id"})
        _id(e["user_id"], "user_id")
        _id(e["item_id"], "item_id")
        if e.get("timestamp") is not None:
            _number(e["timestamp"], "timestamp", ge=0)
        _number(e.get("weight", 1.0), "weight", ge=-F32_MAX, le=F32_MAX)
        for key, most in (("event_type", 64), ("event_id", 256)):
            v = e.get(key)
            if v is not None and (not isinstance(v, str) or not 1 <= len(v) <= most):
                raise _Bad(key, f"{key} is not a string of 1..{most} characters")
    if len(events) > MAX_EVENTS:
        raise _Bad("events", f"{len(events)} events > serving.max_events_per_request", 413)
    # The deployment's own limit, checked after the schema and the size.
    for e in events:
        if abs(float(e.get("weight", 1.0))) > MAX_ABS_WEIGHT:
            raise _Bad("weight", f"|weight| > model.max_abs_weight={MAX_ABS_WEIGHT}", 422)


_SCHEMA = {"/rank": _rank, "/score": _score, "/events": _events}


def verdict(path: str, raw: bytes) -> Verdict:
    """The contract's verdict on POSTing ``raw`` (sent with a JSON content type and the token) to ``path``."""
    if len(raw) > MAX_BODY:
        return Verdict(False, f"body of {len(raw)} bytes > serving.max_body_bytes", None, 413)
    if not raw:
        return Verdict(False, "empty body")
    try:
        obj = json.loads(raw)  # what Starlette does: RFC 8259 plus NaN/Infinity, UTF-8/16/32 detection
    except (ValueError, RecursionError) as e:
        return Verdict(False, f"not JSON ({type(e).__name__})")
    try:
        _SCHEMA[path](obj)
    except _Bad as bad:
        return Verdict(False, bad.reason, bad.field, bad.status)
    return OK


# --------------------------------------------------------------------------- request helpers


def _post(http: httpx.Client, path: str, raw: bytes, headers: dict | None = None) -> httpx.Response:
    return http.post(path, content=raw, headers=JSON_HDR if headers is None else headers)


def _fields_named(resp: httpx.Response) -> set:
    """Every loc element of a 422's detail (plus the detail text of other errors)."""
    try:
        detail = resp.json()["detail"]
    except (ValueError, KeyError, TypeError):
        return set()
    if isinstance(detail, str):
        return {detail}
    return {str(x) for err in detail for x in err.get("loc", [])}


def _check(path: str, raw: bytes, resp: httpx.Response, v: Verdict) -> None:
    """Assert ``resp`` is what the contract says ``raw`` deserves; message names the request."""
    sent = f"POST {path} {raw[:300]!r}{'...' if len(raw) > 300 else ''} ({len(raw)} bytes)"
    got = f"{resp.status_code} {resp.text[:300]}"
    assert resp.status_code < 500, f"server error for {sent}: {got}"
    if not v.valid:
        assert 400 <= resp.status_code < 500, f"{sent} is invalid ({v.reason}) but got {got}"
        if v.status is not None:
            assert resp.status_code == v.status, f"{sent} ({v.reason}) wants {v.status}, got {got}"
        if resp.status_code == 422 and v.field is not None:
            named = _fields_named(resp)
            assert v.field in named or any(v.field in n for n in named), f"{sent}: 422 does not name {v.field!r}: {got}"
        else:
            assert "detail" in resp.json(), f"{sent}: error without a detail: {got}"
        return
    assert resp.status_code == 200, f"{sent} is valid but got {got}"
    body, req = resp.json(), json.loads(raw)
    if path == "/rank":
        assert body["user_id"] == req["user_id"] and body["fallback"] in (None, "popular"), got
        scores = [it["score"] for it in body["items"]]
        assert len(scores) <= req.get("k", 10) and all(math.isfinite(s) for s in scores), got
        assert scores == sorted(scores, reverse=True), got
    elif path == "/score":
        assert body["user_id"] == req["user_id"] and len(body["scores"]) == len(req["item_ids"]), got
        assert all(s is None or math.isfinite(s) for s in body["scores"]), got


# --------------------------------------------------------------------------- strategies

_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
)
"""Any JSON value, NaN and ±Infinity included (sent as the bare tokens)."""

_special_ids = st.sampled_from(
    [
        "", "x" * (MAX_ID_BYTES + 1), "é" * (MAX_ID_BYTES // 2 + 1), "é" * (MAX_ID_BYTES // 2), "x" * MAX_ID_BYTES,
        I64_MAX, I64_MIN, I64_MAX + 1, I64_MIN - 1, 1 << 64, True, False, None, 1.0, 1.5, -0.0,
        float("nan"), float("inf"), "1", "null", [], [1], {}, {"id": 1}, "\x00", "💥", "a\nb", " ",
    ]
)
_known_ids = st.sampled_from(SEED_USERS + SEED_ITEMS)  # IDs with rows: the personal (non-fallback) paths
ids = st.one_of(
    st.integers(I64_MIN, I64_MAX), st.integers(-5, 20), st.text(min_size=1, max_size=24), _known_ids, _special_ids,
    json_values,
)
"""User/item IDs: valid ints and strings, every edge of the ID rules, and arbitrary JSON."""

_valid_ids = st.one_of(st.integers(-5, 20), st.integers(I64_MIN, I64_MAX), st.text(min_size=1, max_size=16))
_extra_keys = st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2)
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from([0, -1, -1e-300, 1e308, -1e308, 10**309, -(10**309), 5e-324]),
    json_values,
)


def _with_extras(base: st.SearchStrategy) -> st.SearchStrategy:
    """``base`` dicts, now and then with unknown keys merged in."""
    return st.one_of(base, base, st.builds(lambda b, x: {**x, **b}, base, _extra_keys))


_plausible_ids = st.one_of(_known_ids, _known_ids, st.integers(I64_MIN, I64_MAX), _special_ids)
_edgy_rank = st.fixed_dictionaries(
    {"user_id": _plausible_ids},
    optional={"k": st.sampled_from([1, 2, MAX_K - 1, MAX_K, MAX_K + 1, 0]), "exclude_seen": st.booleans()},
)
rank_bodies = st.one_of(
    _edgy_rank,  # mostly well-formed, at the edges: the 200 path gets exercised too
    _edgy_rank,
    _with_extras(
        st.fixed_dictionaries(
            {},
            optional={
                "user_id": ids,
                "k": st.one_of(
                    st.integers(1, MAX_K), st.integers(), st.sampled_from([0, -1, MAX_K + 1, 100_000, 100_001, 1 << 63, 10.0]),
                    json_values,
                ),
                "exclude_seen": st.one_of(st.booleans(), json_values),
            },
        )
    ),
    json_values,
)
score_bodies = st.one_of(
    st.fixed_dictionaries({"user_id": _plausible_ids, "item_ids": st.lists(_plausible_ids, min_size=1, max_size=8)}),
    _with_extras(
        st.fixed_dictionaries(
            {},
            optional={
                "user_id": ids,
                "item_ids": st.one_of(st.lists(ids, max_size=6), st.lists(_valid_ids, min_size=1, max_size=6), json_values),
            },
        )
    ),
    json_values,
)
_any_event = _with_extras(
    st.fixed_dictionaries({}, optional={"user_id": ids, "item_id": ids, "timestamp": _numbers, "weight": _numbers})
)
_valid_event = st.fixed_dictionaries(
    {"user_id": _valid_ids, "item_id": _valid_ids},
    optional={
        "timestamp": st.one_of(st.none(), st.floats(0, 2e9), st.integers(0, 2**40)),
        "weight": st.floats(-1e6, 1e6) | st.integers(-5, 5),
    },
)
_defects = st.one_of(
    st.tuples(st.just("user_id"), st.sampled_from(["", True, None, 1.5, I64_MAX + 1, [], "x" * 1025])),
    st.tuples(st.just("item_id"), st.sampled_from(["", False, None, -2.5, I64_MIN - 1, {}, "é" * 513])),
    st.tuples(st.just("timestamp"), st.sampled_from([-1, -1e-9, float("nan"), float("inf"), "1700000000", True, 10**309])),
    st.tuples(st.just("weight"), st.sampled_from([float("nan"), float("-inf"), "1.0", None, False, [1.0], 10**309])),
    st.tuples(st.just("extra"), st.sampled_from(["color", "userId", "ts", ""])),
    st.tuples(st.just("drop"), st.sampled_from(["user_id", "item_id"])),
)


@st.composite
def _batch_with_one_defect(draw) -> dict:
    """A valid batch with exactly one bad event: the whole batch must be refused."""
    batch = draw(st.lists(_valid_event, min_size=1, max_size=MAX_EVENTS))
    i = draw(st.integers(0, len(batch) - 1))
    kind, value = draw(_defects)
    ev = dict(batch[i])
    if kind == "drop":
        ev.pop(value)
    elif kind == "extra":
        ev[value] = 1
    else:
        ev[kind] = value
    batch[i] = ev
    return {"events": batch}


events_bodies = st.one_of(
    _batch_with_one_defect(),
    _with_extras(
        st.fixed_dictionaries(
            {}, optional={"events": st.one_of(st.lists(_any_event, max_size=MAX_EVENTS + 3), json_values)}
        )
    ),
    json_values,
)
"""``/events`` bodies; the test keeps only those the oracle rejects (a valid one would write)."""


def _encode(body: Any, ascii_only: bool) -> bytes:
    # allow_nan: NaN and ±Infinity go out as bare tokens, which Python's parser (and Starlette's) accepts.
    return json.dumps(body, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8")


# --------------------------------------------------------------------------- structured fuzzing


@FUZZ
@given(body=rank_bodies, ascii_only=st.booleans())
@example(body={"user_id": "fz-u1", "k": MAX_K}, ascii_only=True)
@example(body={"user_id": "fz-u1", "k": MAX_K + 1}, ascii_only=True)
@example(body={"user_id": "fz-u1", "k": 10**30}, ascii_only=True)
@example(body={"user_id": "fz-u1", "k": -(10**30)}, ascii_only=True)
@example(body={"user_id": "fz-u1", "k": float("nan")}, ascii_only=True)
@example(body={"user_id": float("inf")}, ascii_only=True)
@example(body={"user_id": I64_MIN, "k": 1, "exclude_seen": False}, ascii_only=True)
@example(body={"user_id": "never-seen", "zz": 1}, ascii_only=True)
def test_rank_answers_exactly_what_the_contract_allows(unchanged, body, ascii_only):
    raw = _encode(body, ascii_only)
    _check("/rank", raw, _post(unchanged.http, "/rank", raw), verdict("/rank", raw))


@FUZZ
@given(body=score_bodies, ascii_only=st.booleans())
@example(body={"user_id": "fz-u2", "item_ids": [0, "fz-item-a", "nope", I64_MIN]}, ascii_only=True)
@example(body={"user_id": "fz-u2", "item_ids": []}, ascii_only=True)
@example(body={"user_id": "fz-u2", "item_ids": list(range(MAX_SCORE_ITEMS))}, ascii_only=True)
@example(body={"user_id": "fz-u2", "item_ids": list(range(MAX_SCORE_ITEMS + 1))}, ascii_only=True)
@example(body={"user_id": "fz-u2", "item_ids": [1, float("nan")]}, ascii_only=True)
@example(body={"user_id": "fz-u2"}, ascii_only=True)
def test_score_answers_exactly_what_the_contract_allows(unchanged, body, ascii_only):
    raw = _encode(body, ascii_only)
    _check("/score", raw, _post(unchanged.http, "/score", raw), verdict("/score", raw))


@FUZZ
@given(body=events_bodies, ascii_only=st.booleans())
@example(body={"events": []}, ascii_only=True)
@example(body={"events": [{"user_id": "a", "item_id": 1, "weight": float("nan")}]}, ascii_only=True)
@example(body={"events": [{"user_id": "a", "item_id": 1, "timestamp": float("inf")}]}, ascii_only=True)
@example(body={"events": [{"user_id": "a", "item_id": 1}] * (MAX_EVENTS + 1)}, ascii_only=True)
@example(body={"events": [{"user_id": "a", "item_id": 1}], "extra": None}, ascii_only=True)
@example(body={"events": {"user_id": "a", "item_id": 1}}, ascii_only=True)
def test_invalid_event_batches_are_refused_whole(unchanged, body, ascii_only):
    raw = _encode(body, ascii_only)
    v = verdict("/events", raw)
    assume(not v.valid)  # a valid batch would be appended: this test only sends what must be refused
    _check("/events", raw, _post(unchanged.http, "/events", raw), v)


# --------------------------------------------------------------------------- raw bytes

_VALID_TEXTS = {
    "/rank": b'{"user_id": "fz-u3", "k": 5, "exclude_seen": true}',
    "/score": b'{"user_id": "fz-u3", "item_ids": [1, 2, "fz-item-b"]}',
    "/events": b'{"events": [{"user_id": "fz-u3", "item_id": 4, "timestamp": 1700000000.5, "weight": 2.0}]}',
}
_DEEP = 10_000


@st.composite
def _mutated(draw, path: str) -> bytes:
    """A valid body for ``path`` with one byte-level mutation."""
    raw = bytearray(_VALID_TEXTS[path])
    kind = draw(st.sampled_from(["truncate", "insert", "replace", "delete", "prefix", "suffix", "utf16", "latin1"]))
    i = draw(st.integers(0, len(raw) - 1))
    junk = draw(st.binary(min_size=1, max_size=4))
    if kind == "truncate":
        return bytes(raw[:i])
    if kind == "insert":
        return bytes(raw[:i] + junk + raw[i:])
    if kind == "replace":
        return bytes(raw[:i] + junk + raw[i + 1 :])
    if kind == "delete":
        return bytes(raw[:i] + raw[i + 1 :])
    if kind == "prefix":
        return bytes(junk + raw)
    if kind == "suffix":
        return bytes(raw + junk)
    text = raw.decode().replace("fz-u3", "fz-\u00fc3")
    return text.encode("utf-16" if kind == "utf16" else "latin-1")


_raw_requests = st.one_of(
    st.tuples(st.sampled_from(sorted(_VALID_TEXTS)), st.binary(max_size=300)),
    st.sampled_from(sorted(_VALID_TEXTS)).flatmap(lambda p: st.tuples(st.just(p), _mutated(p))),
)


@FUZZ
@given(req=_raw_requests)
@example(req=("/rank", b"[" * _DEEP + b"]" * _DEEP))
@example(req=("/rank", b'{"user_id": ' + b"[" * _DEEP + b"]" * _DEEP + b"}"))
@example(req=("/events", b'{"events": ' + b"[" * _DEEP + b"]" * _DEEP + b"}"))
@example(req=("/score", b'{"user_id": "a", "item_ids": [' + b'{"a":' * _DEEP + b"1" + b"}" * _DEEP + b"]}"))
@example(req=("/rank", b'{"user_id": "a", "x": ' + b"[" * 900 + b"]" * 900 + b"}"))  # deep but parseable
@example(req=("/rank", b'{"user_id": 1' + b"0" * 5000 + b"}"))  # beyond Python's int-parsing digit limit
@example(req=("/events", b'{"events": [{"user_id": "a", "item_id": 1, "weight": 1' + b"0" * 400 + b"}]}"))
@example(req=("/rank", b"\xff\xfe\x00\x01garbage"))
@example(req=("/rank", b'{"user_id": "\xc3\x28"}'))
@example(req=("/rank", b""))
@example(req=("/rank", b"null"))
@example(req=("/rank", b'{"user_id": "a", "user_id": "b"}'))  # duplicate keys: the last wins, as in json.loads
@example(req=("/rank", b'{"user_id": "a", "k": 3.0}'))
@example(req=("/rank", b'{"user_id": "a", "k": NaN}'))
@example(req=("/rank", b'{"user_id": "a", "k": -Infinity}'))
@example(req=("/rank", b'{"user_id": "a", "k": 1e999}'))
@example(req=("/rank", b'{"user_id": "a"' + b" " * MAX_BODY + b"}"))  # valid JSON, but over the body limit
def test_raw_bytes_never_cause_a_server_error(unchanged, req):
    path, raw = req
    v = verdict(path, raw)
    assume(path != "/events" or not v.valid)
    _check(path, raw, _post(unchanged.http, path, raw), v)


# --------------------------------------------------------------------------- sizes


@settings(FUZZ, max_examples=12)
@given(n=st.integers(MAX_EVENTS + 1, 40 * MAX_EVENTS), chunked=st.booleans(), path=st.sampled_from(["/events", "/rank"]))
@example(n=MAX_EVENTS + 1, chunked=False, path="/events")
@example(n=4000, chunked=True, path="/events")
def test_oversized_batches_and_bodies_are_413(unchanged, n, chunked, path):
    if path == "/events":
        raw = _encode({"events": [{"user_id": f"big-{i}", "item_id": i} for i in range(n)]}, True)
    else:  # a valid /rank body padded past the limit with insignificant whitespace
        raw = b'{"user_id": "fz-u1",' + b" " * (MAX_BODY + n) + b'"k": 3}'
    v = verdict(path, raw)
    assert not v.valid and v.status == 413, v
    content = iter([raw[i : i + 8192] for i in range(0, len(raw), 8192)]) if chunked else raw
    r = unchanged.http.post(path, content=content, headers=JSON_HDR)
    assert r.status_code == 413, f"{path} {len(raw)} bytes, {n} events, chunked={chunked}: {r.status_code} {r.text[:200]}"
    assert "max_body_bytes" in r.text or "max_events_per_request" in r.text, r.text


# --------------------------------------------------------------------------- headers: auth and content type


def _is_json_type(ctype: str) -> bool:
    media, *params = ctype.lower().split(";")
    charsets = [v.strip().strip('"') for k, _, v in (p.partition("=") for p in params) if k.strip() == "charset"]
    media = media.strip()
    return ((media == "application/json" or (media.startswith("application/") and media.endswith("+json")))
            and all(c in ("utf-8", "utf8") for c in charsets))


_content_types = st.one_of(
    st.sampled_from(
        [
            "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json",
            'application/json; charset="UTF-8"', "application/json; charset=latin-1", "application/json;charset=utf-16",
            "application/problem+json", "text/plain", "text/json", "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x", "application/xml", "application/octet-stream", "json", "", "*/*",
            "application/jsonx", "application", "application/",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40).map(str.strip),
)


@FUZZ
@given(ctype=_content_types, path=st.sampled_from(["/rank", "/score", "/events"]))
def test_only_json_content_types_reach_the_handlers(unchanged, ctype, path):
    # /events gets a body that is refused even when parsed, so nothing is ever appended.
    raw = _VALID_TEXTS[path] if path != "/events" else b'{"events": []}'
    r = unchanged.http.post(path, content=raw, headers={**AUTH, "Content-Type": ctype.encode("latin-1")})
    got = f"Content-Type {ctype!r} on {path}: {r.status_code} {r.text[:200]}"
    assert r.status_code < 500, got
    if not _is_json_type(ctype):
        assert r.status_code == 415 and "application/json" in r.text, got
    elif path == "/events":
        assert r.status_code == 422 and "events" in r.text, got
    else:
        assert r.status_code == 200, got


_auth_headers = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "", "Bearer", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN.upper()}", f"Token {TOKEN}", f"Bearer\t{TOKEN}", f"Bearer  {TOKEN} extra", "Bearer é",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60).map(str.strip),
    st.builds(lambda s: f"Bearer {s}", st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)),
)


def _token_ok(header: str | None) -> bool:
    """The contract: ``Bearer <token>``, scheme case-insensitive, surrounding whitespace ignored."""
    if header is None:
        return False
    scheme, _, cred = header.strip().partition(" ")
    return scheme.lower() == "bearer" and cred.strip() == TOKEN


@FUZZ
@given(header=_auth_headers)
@example(header=None)
def test_writes_without_the_right_token_are_401_and_append_nothing(unchanged, header):
    assume(not _token_ok(header))
    raw = _VALID_TEXTS["/events"]
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Authorization"] = header.encode("latin-1")
    r = unchanged.http.post("/events", content=raw, headers=headers)
    assert r.status_code == 401, f"Authorization {header!r}: {r.status_code} {r.text[:200]}"
    assert r.headers.get("www-authenticate") == "Bearer"


# --------------------------------------------------------------------------- GET endpoints, methods, paths

_query = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=16), max_size=3)
_junk_headers = st.dictionaries(
    st.sampled_from(["Accept", "Content-Type", "Authorization", "X-Forwarded-For", "Accept-Encoding", "Cookie"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip),
    max_size=3,
)


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(["/healthz", "/stats"]), params=_query, headers=_junk_headers, body=st.binary(max_size=64))
def test_healthz_and_stats_answer_200_whatever_the_noise(unchanged, path, params, headers, body):
    r = unchanged.http.request("GET", path, params=params, headers=headers, content=body or None)
    assert r.status_code == 200, f"GET {path} params={params!r} headers={headers!r} body={body!r}: {r.status_code} {r.text[:200]}"
    got = r.json()
    if path == "/healthz":
        assert got["status"] == "ok" and got["down"] == {}, got
    else:
        assert got["events_applied"] == got["events_accepted"] and got["trainers_down"] == {}, got


_ENDPOINTS = {"/events": "POST", "/rank": "POST", "/score": "POST", "/healthz": "GET", "/stats": "GET"}
_FRAMEWORK_PATHS = {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


_PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
    path=st.one_of(
        st.sampled_from(sorted(_ENDPOINTS)),
        st.builds(lambda p, s: p + s, st.sampled_from(sorted(_ENDPOINTS)), st.text(_PRINTABLE, max_size=10)),
        st.text(_PRINTABLE, max_size=20).map(lambda s: "/" + s),
    ),
)
def test_wrong_methods_and_unknown_paths_are_4xx(unchanged, method, path):
    quoted = urllib.parse.quote(path, safe="/")
    norm = httpx.URL(quoted).path  # what the server will route on (httpx also drops dot segments)
    # GET /healthz and /stats are the probes' routes, and HEAD /healthz answers like GET.
    assume(not (method == "GET" and norm in ("/healthz", "/stats")) and not (method == "HEAD" and norm == "/healthz")
           and norm not in _FRAMEWORK_PATHS)
    r = unchanged.http.request(method, quoted, content=b'{"events": []}', headers=JSON_HDR)
    got = f"{method} {norm!r}: {r.status_code} {r.text[:200]}"
    assert r.status_code < 500, got
    if r.status_code == 307:  # FastAPI's trailing-slash redirect to an existing route
        assert norm.rstrip("/") in _ENDPOINTS and norm != norm.rstrip("/"), got
    else:
        assert 400 <= r.status_code < 500, got


# --------------------------------------------------------------------------- lone surrogates

# JSON text may escape a lone UTF-16 surrogate ("\ud800") or carry one as raw bytes (json.loads
# decodes bytes with "surrogatepass"); either way Python's parser makes a str with no UTF-8
# encoding. The contract's IDs are UTF-8 strings, so such a body is invalid: it must get a
# 4xx, never a 5xx, a "503, retry" (a retry can never succeed) or, for /events, a write.
_SURROGATE_CASES = [
    ("/rank", b'{"user_id": "\\ud800", "k": 3}'),
    ("/rank", b'{"user_id": "fz-\\udfff"}'),
    ("/score", b'{"user_id": "\\ud800", "item_ids": [1]}'),
    ("/score", b'{"user_id": "fz-u1", "item_ids": [1, "\\ud800"]}'),
    ("/rank", b'{"user_id": ["\\ud800"]}'),  # invalid anyway: the 422 must still render
    ("/rank", b'{"user_id": "a", "bad\\ud800key": 1}'),
    ("/events", b'{"events": [{"user_id": "\\ud800", "item_id": 1}]}'),
    ("/events", b'{"events": [{"user_id": "fz-u1", "item_id": "\\udbff"}]}'),
    ("/events", b'{"events": [{"user_id": "\xed\xa0\x80", "item_id": 1}]}'),  # surrogate as raw (CESU-8) bytes
]


@pytest.mark.parametrize("path,raw", _SURROGATE_CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(_SURROGATE_CASES)])
def test_lone_surrogates_are_rejected_not_500(unchanged, path, raw):
    v = verdict(path, raw)
    assert not v.valid
    _check(path, raw, _post(unchanged.http, path, raw), v)


# --------------------------------------------------------------------------- valid extremes (writes; keep last)

_extreme_ids = st.one_of(
    st.sampled_from([I64_MAX, I64_MIN, 0, -1, "x" * MAX_ID_BYTES, "é" * (MAX_ID_BYTES // 2), "\x00", "💥", " ", "1"]),
    st.text(min_size=1, max_size=16),
    st.integers(I64_MIN, I64_MAX),
)
_extreme_events = st.lists(
    st.fixed_dictionaries(
        {"user_id": _extreme_ids, "item_id": _extreme_ids},
        optional={
            "timestamp": st.one_of(st.none(), st.sampled_from([0, 0.0, 5e-324, 1e300, 1.7976931348623157e308, 2**62])),
            "weight": st.one_of(st.sampled_from([0.0, -0.0, 5e-324, MAX_ABS_WEIGHT, -MAX_ABS_WEIGHT, -1000]),
                                st.floats(-MAX_ABS_WEIGHT, MAX_ABS_WEIGHT)),
        },
    ),
    min_size=1,
    max_size=MAX_EVENTS,
)


@settings(FUZZ, max_examples=15)
@given(batch=_extreme_events)
@example(batch=[{"user_id": "fz-x1", "item_id": I64_MAX, "timestamp": 1.7976931348623157e308, "weight": MAX_ABS_WEIGHT}])
@example(batch=[{"user_id": I64_MIN, "item_id": "é" * (MAX_ID_BYTES // 2), "timestamp": 0, "weight": -MAX_ABS_WEIGHT}])
def test_valid_extreme_events_are_accepted_and_applied(deployment, batch):
    """Every valid batch is acknowledged and then applied; the model stays finite and servable."""
    http = deployment.http
    raw = _encode({"events": batch}, False)
    assert verdict("/events", raw).valid
    before = _stats(http)["events_accepted"]
    r = _post(http, "/events", raw)
    assert r.status_code == 200, f"valid batch refused: {raw[:300]!r}: {r.status_code} {r.text[:300]}"
    assert r.json()["accepted"] == len(batch)
    s = _settled(http)
    assert s["events_accepted"] == before + len(batch)
    assert s["quarantined"] == 0 and s["dead_lettered"] == 0 and s["trainers_down"] == {}, s
    assert all(t["error"] is None for t in s["trainers"]), s["trainers"]
    for user in {e["user_id"] for e in batch}:
        body = _encode({"user_id": user, "k": 5, "exclude_seen": False}, False)
        _check("/rank", body, _post(http, "/rank", body), OK)
    body = _encode({"user_id": batch[0]["user_id"], "item_ids": [e["item_id"] for e in batch]}, False)
    _check("/score", body, _post(http, "/score", body), OK)
