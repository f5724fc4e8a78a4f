"""``POST /events`` exactly once at the door, through the real Serve app over real HTTP:
``Idempotency-Key`` retries, ``event_id`` duplicates, validation naming the field, and a
retry after a 503 appending once. Real Ray, shards, ingest log and trainer.

The tests share one deployment and run in file order; the last one stops the ingest
actor's process for a while on purpose.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid

import httpx
import pytest

from tests.conftest import _ray_start, free_port, wait_for

TOKEN = "ingest-http-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def deployment():
    """``(http client on the app, the deployment)``."""
    from serving import deploy
    from serving.config import load_config

    cfg = load_config(
        None,
        {
            "namespace": f"t-ingest-http-{uuid.uuid4().hex[:8]}",
            "ps": {"num_shards": 1, "num_buckets": 16, "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
            "trainer": {"num_workers": 1, "batch_size": 64, "device": "cpu"},
            "stream": {"kind": "ingest", "num_events": None},
            "ingest": {"dir": tempfile.mkdtemp(prefix="freshet-ingest-http-"), "fsync": True},
            "serving": {"port": free_port(), "auth_token": TOKEN, "max_events_per_request": 20, "request_timeout_s": 5.0},
        },
    )
    with _ray_start():
        dep = deploy.start(cfg, durable=False, autostart=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{cfg.serving.port}", timeout=30.0) as http:
                yield http, dep
        finally:
            deploy.stop(cfg)


def _post(http, events, key=None, **headers):
    hdrs = {**AUTH, **({"Idempotency-Key": key} if key is not None else {}), **headers}
    return http.post("/events", json={"events": events}, headers=hdrs)


def _accepted(http) -> int:
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()["events_accepted"]


def _events(tag: str, n: int) -> list[dict]:
    return [{"user_id": f"{tag}-u{i}", "item_id": i, "weight": 1.0} for i in range(n)]


def test_a_retry_with_the_same_key_returns_the_original_reply_and_appends_nothing(deployment):
    http, _ = deployment
    before = _accepted(http)
    first = _post(http, _events("a", 3), key="order-17:attempt")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body == {"accepted": 3, "offset": before + 2, "duplicates": 0, "offsets": {"0": before + 2}}
    for _ in range(2):
        again = _post(http, _events("a", 3), key="order-17:attempt")
        assert again.status_code == 200 and again.json() == body
    assert _accepted(http) == before + 3
    other = _post(http, _events("a", 3), key="order-18")
    assert other.json()["offset"] == before + 5
    assert _accepted(http) == before + 6


def test_a_key_reused_for_other_events_is_422_naming_it_and_appends_nothing(deployment):
    # The first request's reply would say "accepted" for events that were never written.
    http, _ = deployment
    first = _post(http, _events("reuse", 2), key="batch-0001")
    assert first.status_code == 200, first.text
    before = _accepted(http)
    r = _post(http, _events("reuse-other", 3), key="batch-0001")
    assert r.status_code == 422, r.text
    (d,) = r.json()["detail"]
    assert d["loc"] == ["header", "Idempotency-Key"] and d["type"] == "idempotency_key_reused", d
    assert d["msg"].startswith("Idempotency-Key: 'batch-0001' was used for other events"), d
    assert _accepted(http) == before
    again = _post(http, _events("reuse", 2), key="batch-0001")  # the real retry still gets its reply
    assert again.status_code == 200 and again.json() == first.json()


def test_events_already_in_the_log_are_counted_as_duplicates(deployment):
    http, _ = deployment
    before = _accepted(http)
    events = [{"user_id": "d-u", "item_id": i, "event_id": f"evt-{i}", "event_type": "click"} for i in range(4)]
    r = _post(http, events[:2])
    assert r.json() == {"accepted": 2, "offset": before + 1, "duplicates": 0, "offsets": {"0": before + 1}}
    r = _post(http, events)  # a producer re-sending the first two with two new ones
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 2, "offset": before + 3, "duplicates": 2, "offsets": {"0": before + 3}}
    assert _accepted(http) == before + 4


@pytest.mark.parametrize(
    "key",
    ["", "has space", "k" * 256, "caf\u00e9"],
    ids=["empty", "space", "too-long", "non-ascii"],
)
def test_a_bad_idempotency_key_is_422_naming_it(deployment, key):
    http, _ = deployment
    before = _accepted(http)
    r = http.post("/events", json={"events": _events("bad", 1)},
                  headers={**AUTH, "Idempotency-Key": key.encode("utf-8")})
    assert r.status_code == 422, r.text
    assert any(d["loc"] == ["header", "Idempotency-Key"] for d in r.json()["detail"]), r.text
    assert _accepted(http) == before


@pytest.mark.parametrize(
    "field, value",
    [("event_id", ""), ("event_id", "x" * 257), ("event_type", "t" * 65), ("event_type", 3)],
)
def test_a_bad_event_field_is_422_naming_it(deployment, field, value):
    http, _ = deployment
    before = _accepted(http)
    r = _post(http, [{"user_id": "u", "item_id": 1, field: value}], key="never-used")
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text
    assert _accepted(http) == before


def test_the_token_is_still_checked_before_anything_else(deployment):
    http, _ = deployment
    before = _accepted(http)
    r = http.post("/events", json={"events": _events("t", 1)}, headers={"Idempotency-Key": "no-token"})
    assert r.status_code == 401
    assert _accepted(http) == before


def test_a_retry_after_a_503_appends_the_request_once(deployment):
    import ray

    http, dep = deployment
    before = _accepted(http)
    events = _events("late", 4)
    pid = ray.get(dep.ingest.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGSTOP)  # the log is slow: the request times out, its append is still queued
    try:
        r = _post(http, events, key="retry-me")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "retry" in r.json()["detail"]
    finally:
        os.kill(pid, signal.SIGCONT)
    # The client retries with the same key until it gets an answer: the original landed
    # once the log resumed, so the retry reports it and appends nothing.
    r = wait_for(lambda: (x := _post(http, events, key="retry-me")).status_code == 200 and x, 30, "a 200 for the retry")
    assert r.json() == {"accepted": 4, "offset": before + 3, "duplicates": 0, "offsets": {"0": before + 3}}
    assert _accepted(http) == before + 4
    assert _post(http, events, key="retry-me").json() == r.json()
    assert _accepted(http) == before + 4
