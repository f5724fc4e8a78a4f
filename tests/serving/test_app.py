"""End-to-end tests of the Serve app: real Ray, real shards/ingest/trainer, real HTTP.

One module-scoped deployment (token auth on) is shared by the tests, which run in
file order; the last ones stop actors on purpose and must stay last.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid

import httpx
import pytest

from tests.conftest import _ray_start, free_port, wait_for

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EVENTS = 50
MAX_BODY = 32 * 1024
MAX_K = 50






@pytest.fixture(scope="module")
def deployment():
    """A running deployment: ``(http client on the app, config, {"shards", "ingest", "trainers"})``."""
    from serving import deploy
    from serving.config import load_config

    tmp = tempfile.mkdtemp(prefix="freshet-serving-")
    cfg = load_config(
        None,
        {
            "namespace": f"t-serving-{uuid.uuid4().hex[:8]}",
            "ps": {
                "num_shards": 2,
                "num_buckets": 64,
                "tables": {
                    "user": {"dim": 16},
                    "item": {"dim": 16},
                    "item_bias": {"dim": 1, "init": "zeros"},
                    "item_pop": {"dim": 1, "init": "zeros", "optimizer": {"kind": "accumulate", "lr": 1.0}},
                },
            },
            "trainer": {"num_workers": 1, "batch_size": 64, "device": "cpu"},
            "stream": {"kind": "ingest", "num_events": None},
            "ingest": {"dir": tmp, "fsync": False},
            "serving": {
                "port": free_port(),
                "auth_token": TOKEN,
                "max_events_per_request": MAX_EVENTS,
                "max_body_bytes": MAX_BODY,
                "max_k": MAX_K,
                "cache_refresh_s": 0.05,
                "request_timeout_s": 2.0,
            },
        },
    )
    with _ray_start():
        dep = deploy.start(cfg, durable=False, autostart=True)
        actors = {"shards": dep.ps.shards, "ingest": dep.ingest, "trainers": dep.trainers}
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{cfg.serving.port}", timeout=30.0) as http:
                yield http, cfg, actors
        finally:
            deploy.stop(cfg)


def _stats(http) -> dict:
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


def _settled(http) -> dict:
    """Wait until the trainer has applied every accepted event; returns the stats."""
    return wait_for(
        lambda: (s := _stats(http))["events_applied"] == s["events_accepted"] and s,
        15, "trainers to apply every accepted event",
    )


def _post_events(http, events, **kw):
    return http.post("/events", json={"events": events}, headers=AUTH, **kw)


def _history():
    """Other users' interactions: 20 users, items 0..29, popularity falling with the item number."""
    return [
        {"user_id": f"u{u}", "item_id": i, "timestamp": 1.7e9 + u * 100 + i, "weight": 1.0}
        for u in range(20)
        for i in range(30)
        if (u + i) % 3 == 0 or i < 5
    ]


def test_healthz_is_ok(deployment):
    http, cfg, _ = deployment
    r = http.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert r.json()["down"] == {}
    head = http.head("/healthz")
    assert head.status_code == 200 and head.content == b""


def test_new_user_gets_personal_ranking_after_posting_events(deployment):
    http, cfg, _ = deployment
    history = _history()
    for start in range(0, len(history), MAX_EVENTS):
        r = _post_events(http, history[start : start + MAX_EVENTS])
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(history[start : start + MAX_EVENTS])
    assert r.json()["offset"] == len(history) - 1  # offsets are dense from 0 in a fresh log
    _settled(http)

    user = "new-user-xyz"
    r = http.post("/rank", json={"user_id": user, "k": 5})
    assert r.status_code == 200, r.text
    before = r.json()
    assert before["fallback"] == "popular" and before["user_id"] == user
    assert len(before["items"]) == 5
    counts = [it["score"] for it in before["items"]]
    # Recency-decayed counts (model.recent_table) of items 0..4, which every user had: 20+ raw.
    assert counts == sorted(counts, reverse=True) and counts[0] >= 15

    seen = [0, 1, 2]  # the three most popular items: ranked first unless excluded
    r = _post_events(http, [{"user_id": user, "item_id": i} for i in seen])  # timestamps default to server time
    assert r.status_code == 200, r.text

    def personal():
        got = http.post("/rank", json={"user_id": user, "k": 10}).json()
        # The trainer's pull creates the row a moment before its push (with the history) lands,
        # and the replica's item mirror (whose version /rank reports) syncs up to
        # cache_refresh_ms after the user's row and history are read fresh.
        fresh = got["fallback"] is None and got["model_version"] > before["model_version"]
        return got if fresh and not {it["item_id"] for it in got["items"]} & set(seen) else None

    after = wait_for(personal, 15, "a newer model's personal ranking without the new user's seen items")
    assert after["user_id"] == user
    assert len(after["items"]) == 10
    assert after["model_version"] > before["model_version"]
    scores = [it["score"] for it in after["items"]]
    assert scores == sorted(scores, reverse=True)
    with_seen = http.post("/rank", json={"user_id": user, "k": 30, "exclude_seen": False}).json()
    assert set(seen) <= {it["item_id"] for it in with_seen["items"]}
    s = _settled(http)
    final = http.post("/rank", json={"user_id": user, "k": 10}).json()
    assert final["fallback"] is None and not {it["item_id"] for it in final["items"]} & set(seen)
    assert s["events_accepted"] == len(history) + len(seen)
    assert s["applied_offset"] == s["events_accepted"] == sum(s["applied_offsets"].values())
    assert s["freshness_ms"]["p50"] is not None and s["freshness_ms"]["p99"] >= s["freshness_ms"]["p50"]
    assert len(s["trainers"]) == cfg.trainer.num_workers and s["trainers_down"] == {}
    assert s["quarantined"] == 0 and sum(s["rows"]["item"].values()) == 30
    # Every user's positives are their recent items; their memory is reported.
    users = {e["user_id"] for e in history} | {user}
    assert s["recent_items"]["users"] == len(users) and s["recent_items"]["entries"] == len(history) + len(seen)
    assert s["recent_items"]["bytes"] >= 16 * s["recent_items"]["entries"]


def test_unknown_users_and_items_never_create_rows(deployment):
    http, _, _ = deployment
    before = _settled(http)
    assert before["rows"]["user"]  # the history created user rows on some shard
    for i in range(15):
        uid = f"ghost-{i}" if i % 2 else 10**12 + i
        r = http.post("/rank", json={"user_id": uid, "k": 3})
        assert r.status_code == 200 and r.json()["fallback"] == "popular", r.text
        r = http.post("/score", json={"user_id": uid, "item_ids": [0, f"ghost-item-{i}", -i - 1]})
        assert r.status_code == 200 and r.json()["scores"][1:] == [None, None], r.text
    after = _stats(http)
    assert after["rows"] == before["rows"]
    assert after["events_accepted"] == before["events_accepted"]


def test_score_matches_rank_in_the_given_order(deployment):
    http, _, _ = deployment
    _settled(http)  # no training in flight: both calls see the same model
    ranked = http.post("/rank", json={"user_id": "u3", "k": 6, "exclude_seen": False}).json()
    assert ranked["fallback"] is None
    ids = [it["item_id"] for it in ranked["items"]][::-1]
    want = [it["score"] for it in ranked["items"]][::-1]
    asked = ids[:3] + ["no-such-item"] + ids[3:] + [123456789]
    r = http.post("/score", json={"user_id": "u3", "item_ids": asked})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["fallback"] is None and got["user_id"] == "u3"
    assert got["scores"][3] is None and got["scores"][-1] is None
    assert got["scores"][:3] + got["scores"][4:-1] == pytest.approx(want, rel=1e-5, abs=1e-6)

    # Without a user row, /score and /rank agree on the popularity fallback.
    pop = http.post("/rank", json={"user_id": "nobody", "k": 3}).json()
    r = http.post("/score", json={"user_id": "nobody", "item_ids": [it["item_id"] for it in pop["items"]]}).json()
    assert r["fallback"] == "popular"
    assert r["scores"] == pytest.approx([it["score"] for it in pop["items"]])


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/rank", {"k": 3}, "user_id"),
        ("/rank", {"user_id": "a", "k": 0}, "k"),
        ("/rank", {"user_id": "a", "k": 10**9}, "k"),
        ("/rank", {"user_id": "a", "k": MAX_K + 1}, "k"),  # under the schema's bound, over serving.max_k
        ("/rank", {"user_id": "a", "k": "5"}, "k"),
        ("/rank", {"user_id": True}, "user_id"),
        ("/rank", {"user_id": ""}, "user_id"),
        ("/rank", {"user_id": 1 << 63}, "user_id"),
        ("/rank", {"user_id": 1.5}, "user_id"),
        ("/rank", {"user_id": "a", "exclude_seen": "yes"}, "exclude_seen"),
        ("/rank", {"user_id": "a", "bogus": 1}, "bogus"),
        ("/score", {"user_id": "a", "item_ids": []}, "item_ids"),
        ("/score", {"user_id": "a", "item_ids": [False]}, "item_ids"),
        ("/events", {"events": []}, "events"),
        ("/events", {"events": [{"user_id": "a", "item_id": 1, "weight": "abc"}]}, "weight"),
        ("/events", {"events": [{"user_id": "a", "item_id": 1, "timestamp": -1}]}, "timestamp"),
        ("/events", {"events": [{"user_id": "a"}]}, "item_id"),
        ("/events", {"events": [{"user_id": "a", "item_id": 1, "color": "red"}]}, "color"),
        ("/events", {"evnts": [{"user_id": "a", "item_id": 1}]}, "events"),
        # One bad event sinks the whole batch: nothing is half-applied.
        ("/events", {"events": [{"user_id": "a", "item_id": i} for i in range(5)] + [{"user_id": None, "item_id": 1}]},
         "user_id"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(deployment, path, body, field):
    http, _, _ = deployment
    before = _stats(http)["events_accepted"]
    r = http.post(path, json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert field in r.text
    assert _stats(http)["events_accepted"] == before


def test_malformed_and_oversized_requests_are_rejected_without_side_effects(deployment):
    http, _, _ = deployment
    before = _stats(http)["events_accepted"]
    json_hdr = {**AUTH, "Content-Type": "application/json"}

    def post(content, headers=json_hdr, path="/events"):
        return http.post(path, content=content, headers=headers)

    r = post(b'{"events": [{"user_id": "a", "item_id": 1, "weight": NaN}]}')
    assert r.status_code == 422 and "weight" in r.text, r.text
    r = post(b'{"events": [{"user_id": "a", "item_id": 1, "timestamp": Infinity}]}')
    assert r.status_code == 422 and "timestamp" in r.text, r.text
    for raw in (b"not json", b'{"events": [', b"\xff\xfe\x00\x01garbage", b'{"events": [{"user_id": "\xff\xfe", "item_id": 1}]}'):
        r = post(raw)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = post(b'{"events": [{"user_id": "a", "item_id": 1}]}', headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == 415 and "application/json" in r.text, r.text
    r = post(b'{"user_id": "a", "k": 2}', headers={}, path="/rank")  # no Content-Type: read as JSON
    assert r.status_code == 200, r.text

    too_many = [{"user_id": "a", "item_id": i} for i in range(MAX_EVENTS + 1)]
    r = _post_events(http, too_many)
    assert r.status_code == 413 and "max_events_per_request" in r.text, r.text

    big = b'{"events": [' + b",".join([b'{"user_id": "a", "item_id": 1}'] * 2000) + b"]}"
    assert len(big) > MAX_BODY
    r = post(big)
    assert r.status_code == 413 and "max_body_bytes" in r.text, r.text
    r = post(iter([big[i : i + 4096] for i in range(0, len(big), 4096)]))  # chunked: no Content-Length
    assert r.status_code == 413 and "max_body_bytes" in r.text, r.text

    assert _stats(http)["events_accepted"] == before


def test_writes_need_the_bearer_token(deployment):
    from serving.app import _bearer_ok

    http, _, _ = deployment
    before = _stats(http)["events_accepted"]
    event = {"events": [{"user_id": "auth-user", "item_id": 1}]}
    assert http.post("/events", json=event).status_code == 401
    r = http.post("/events", json=event, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert http.post("/events", json=event, headers={"Authorization": TOKEN}).status_code == 401
    # Auth is checked before the body is even parsed.
    assert http.post("/events", content=b"garbage", headers={"Content-Type": "application/json"}).status_code == 401
    assert _stats(http)["events_accepted"] == before
    # Reads stay open.
    assert http.post("/rank", json={"user_id": "auth-user"}).status_code == 200
    r = http.post("/events", json=event, headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert _stats(http)["events_accepted"] == before + 1

    assert _bearer_ok(None, None) and _bearer_ok(None, "anything")
    assert _bearer_ok("t", "Bearer t") and _bearer_ok("t", "BEARER  t ")
    assert not _bearer_ok("t", None) and not _bearer_ok("t", "") and not _bearer_ok("t", "Basic t")
    assert not _bearer_ok("t", "Bearer tt") and not _bearer_ok("t", "Bearer ")


# -- failure modes: these stop actors, so they come last -------------------------------------


def test_stalled_shard_gives_503_within_the_timeout(deployment):
    import ray

    http, cfg, actors = deployment
    shard = actors["shards"][0]
    pid = ray.get(shard.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = http.post("/rank", json={"user_id": "u1", "k": 3})
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert elapsed < 3 * cfg.serving.request_timeout_s + 2
        r = http.get("/healthz")
        assert r.status_code == 503 and "ps-shard-0" in r.json()["down"], r.text
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: http.get("/healthz").status_code == 200, 15, "health after resuming the shard")
    assert http.post("/rank", json={"user_id": "u1", "k": 3}).status_code == 200


def test_dead_ingest_log_gives_503_and_nothing_is_acknowledged(deployment):
    import ray

    http, _, actors = deployment
    ray.kill(actors["ingest"], no_restart=True)
    r = _post_events(http, [{"user_id": "late", "item_id": 1}])
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    r = http.get("/healthz")
    assert r.status_code == 503 and "ingest-log" in r.json()["down"], r.text
    assert http.get("/stats").status_code == 503
    assert http.post("/rank", json={"user_id": "u1", "k": 3}).status_code == 200  # ranking does not need ingest


def test_lag_comes_from_the_log_only_for_trainers_that_read_it():
    # A trainer on a stream of its own (`freshet up --keep-stream`) counts offsets in that
    # stream: the log's ends and arrival times say nothing about it (review: /stats forced its
    # lag_s to 0.0 beside an empty log, or aged it by an unrelated event).
    from serving.app import _log_offsets

    ingest = {"log_id": "abc", "end_offsets": [7, 3]}
    reader = {"source_ids": {"0": "ingest:abc", "1": "ingest:abc/p1"}, "applied_offsets": {"0": 5, "1": 3}}
    assert _log_offsets(reader, ingest) == {"0": 5, "1": 3}
    own = {"source_ids": {"0": "parquet:/data/events.parquet"}, "applied_offsets": {"0": 5}}
    assert _log_offsets(own, ingest) is None
    other_log = {"source_ids": {"0": "ingest:old"}, "applied_offsets": {"0": 5}}
    assert _log_offsets(other_log, ingest) is None
    assert _log_offsets(reader, None) is None


def test_stats_never_shows_more_events_applied_than_accepted_while_events_flow():
    # /stats reads the ingest log, the shards and the trainers one call after another while
    # events keep arriving and a caught-up trainer keeps applying them. At every instant applied
    # <= accepted, so the page must not say otherwise: the trainers' figures are read before the
    # log's, never after (review: a trainer read last reported events the log, read first, had
    # not yet accepted, and lag_events hid the backlog).
    import asyncio

    from serving.app import FreshetAPI
    from serving.config import load_config
    from workers.ingest_log import INGEST_ACTOR

    api = FreshetAPI.func_or_class
    world = {"accepted": 0}

    class Mirror:
        syncs = full_resyncs = 0

    class Client:
        num_shards = 2

    class Replica:
        cfg = load_config(None, {"stream": {"kind": "ingest"}, "trainer": {"num_workers": 1}})
        client, mirror, snapshot, sync_error, timeout_s = Client(), Mirror(), None, None, 1.0
        stats, _trainer_states, _lags, _arrivals, _trainer_names = (
            api.stats, api._trainer_states, api._lags, api._arrivals, api._trainer_names)

        def _start_syncer(self):
            return False

        async def _call(self, name, method, *args):
            world["accepted"] += 10  # events arrive between any two calls, and the trainer keeps up
            n = world["accepted"]
            if name == INGEST_ACTOR:
                if method == "arrival_times":
                    return [None] * len(args[0])
                return {"events_accepted": n, "end_offsets": [n], "log_id": "L"}
            if name.startswith("trainer"):
                return {"events_applied": n, "applied_offset": n, "applied_offsets": {"0": n},
                        "source_ids": {"0": "ingest:L"}, "freshness_ms": {"p50": 1.0, "p99": 2.0},
                        "state": "running", "last_progress_age_s": 0.0, "lag_s": 0.0}
            return {"shard": int(name.rsplit("-", 1)[-1]), "tables": {}, "users_with_recent": 0,
                    "recent_entries": 0, "recent_bytes": 0, "push_rate": 0.0, "version": n,
                    "duplicate_pushes": 0}

    body = asyncio.run(Replica().stats())
    assert body["events_applied"] <= body["events_accepted"], body
    assert body["applied_offset"] <= body["events_accepted"], body
    assert body["applied_offsets"]["0"] <= body["ingest"]["end_offsets"][0], body


def test_stats_never_shows_the_mirror_ahead_of_the_ps_it_mirrors():
    # The mirror syncs in the background while /stats awaits the shards: model_version (pushes
    # the replica's snapshot reflects) read after the shards' versions could exceed ps_version
    # (pushes the shards have applied), and model_version and cached_items could come from two
    # different snapshots. Both must describe one snapshot, taken before the shards are read.
    import asyncio

    from serving.app import FreshetAPI
    from serving.config import load_config
    from workers.ingest_log import INGEST_ACTOR

    api = FreshetAPI.func_or_class
    world = {"version": 0}

    class Snap:
        def __init__(self, version):
            self.model_version, self.items = version, version // 2

        def __len__(self):
            return self.items

    class Mirror:
        syncs = full_resyncs = 0

    class Client:
        num_shards = 2

    class Replica:
        cfg = load_config(None, {"trainer": {"num_workers": 1}})
        client, mirror, sync_error, timeout_s = Client(), Mirror(), None, 1.0
        served = (Snap(0), None)
        stats, _trainer_states, _lags, _arrivals, _trainer_names = (
            api.stats, api._trainer_states, api._lags, api._arrivals, api._trainer_names)
        snapshot = api.snapshot

        def _start_syncer(self):
            return False

        async def _call(self, name, method, *args):
            world["version"] += 2  # a push reaches both shards between any two calls
            v = world["version"]
            if name == INGEST_ACTOR:
                return {"events_accepted": 0, "end_offsets": [0], "log_id": "L"}
            if name.startswith("trainer"):
                return {"events_applied": 0, "applied_offset": 0, "applied_offsets": {"0": 0},
                        "freshness_ms": {"p50": None, "p99": None}, "state": "running",
                        "last_progress_age_s": 0.0, "lag_s": 0.0}
            out = {"shard": int(name.rsplit("-", 1)[-1]), "tables": {}, "users_with_recent": 0,
                   "recent_entries": 0, "recent_bytes": 0, "push_rate": 0.0, "version": v // 2,
                   "duplicate_pushes": 0}
            # ... and the background sync catches the mirror up at once.
            await asyncio.sleep(0)
            self.served = (Snap(v), None)
            return out

    body = asyncio.run(Replica().stats())
    assert body["model_version"] <= body["ps_version"], body
    assert body["cached_items"] == body["model_version"] // 2, body
