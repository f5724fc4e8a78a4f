"""Event weights, negative feedback, event types and rating rules through the running service
(issue 13): real Ray, shards, ingest log, trainer and Serve over HTTP.

What an event teaches is ``workers.model.signals``: weight > 0 is a positive whose weight is
its confidence (it scales the BPR term and the popularity count), weight <= 0 is negative
feedback (never a positive, never popular; with ``model.negative_feedback: explicit`` the
item's score for that user is pushed down), ``event_weights`` multiply per ``event_type``, and
``rating`` events follow ``model.ratings``. One module-scoped deployment; each test uses its
own users and items.
"""

from __future__ import annotations

import tempfile
import uuid

import httpx
import numpy as np
import pytest

from tests.conftest import _ray_start, free_port, wait_for

EVENT_WEIGHTS = {"purchase": 5.0, "view": 0.5}


@pytest.fixture(scope="module")
def deployment():
    """``(http client, config, deploy.Deployment)`` with a background history trained."""
    from serving import deploy
    from serving.config import load_config

    tmp = tempfile.mkdtemp(prefix="freshet-weights-")
    cfg = load_config(None, {
        "namespace": f"t-weights-{uuid.uuid4().hex[:8]}",
        "ps": {"num_shards": 2, "num_buckets": 64,
               "tables": {"user": {"dim": 16}, "item": {"dim": 16}, "item_ctx": {"dim": 16}}},
        "model": {"event_weights": EVENT_WEIGHTS, "negative_feedback": "explicit",
                  "ratings": {"positive_at": 4.0, "scale": 5.0, "below": "negative"}},
        "trainer": {"batch_size": 128, "device": "cpu"},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": free_port(), "cache_refresh_s": 0.05, "request_timeout_s": 2.0},
    })
    with _ray_start():
        dep = deploy.start(cfg, durable=False, autostart=True)
        try:
            with httpx.Client(base_url=dep.url, timeout=30.0) as http:
                # Background: 30 users over items 0..39, so warm users and a catalogue exist.
                history = [{"user_id": f"h{u}", "item_id": i} for u in range(30) for i in range(40) if (u * 7 + i) % 4 == 0]
                _post(http, history)
                _settled(http)
                yield http, cfg, dep
        finally:
            deploy.stop(cfg)


def _post(http, events: list[dict]) -> None:
    for s in range(0, len(events), 200):
        r = http.post("/events", json={"events": events[s:s + 200]})
        assert r.status_code == 200, r.text


def _settled(http) -> dict:
    def done():
        s = http.get("/stats").json()
        return s if s["events_applied"] == s["events_accepted"] else None
    return wait_for(done, 60, "the trainer to apply every accepted event")


def _score(http, user, items) -> dict:
    r = http.post("/score", json={"user_id": user, "item_ids": items})
    assert r.status_code == 200, r.text
    return r.json()


def _fresh_score(http, user, items, version: int) -> dict:
    """``/score`` once the replica's item mirror has synced past ``version`` (ps_version after settling)."""
    def fresh():
        r = http.post("/rank", json={"user_id": user, "k": 1})
        return r.status_code == 200 and r.json()["model_version"] >= version
    wait_for(fresh, 30, f"the item mirror to reach version {version}")
    return _score(http, user, items)


def _pop(dep, items) -> tuple[np.ndarray, np.ndarray]:
    """``(all-time popularity counts, has an item row)`` of ``items`` straight from the PS."""
    m = dep.cfg.model
    got = dep.ps.pull_many({m.popularity_table: items, m.item_table: items})
    return got[m.popularity_table][0][:, 0], got[m.item_table][1]


def test_weight_is_confidence_and_weight_at_or_below_zero_is_never_popular(deployment):
    # The input: 40 users each post L with weight 1.0, D with -1.0 and Z with 0.0.
    http, _, dep = deployment
    tag = uuid.uuid4().hex[:6]
    L, D, Z = f"L-{tag}", f"D-{tag}", f"Z-{tag}"
    _post(http, [{"user_id": f"w{tag}-{u}", "item_id": item, "weight": w}
                 for u in range(40) for item, w in ((L, 1.0), (D, -1.0), (Z, 0.0))])
    s = _settled(http)
    counts, found = _pop(dep, [L, D, Z])
    assert counts[0] == pytest.approx(40.0)  # 40 positives of confidence 1.0
    assert counts[1] == 0.0 and counts[2] == 0.0  # D and Z counted nowhere
    assert found.tolist() == [True, True, False]  # D is a (disliked) interaction; Z taught nothing
    cold = _fresh_score(http, f"cold-{tag}", [L, D, Z], s["ps_version"])
    assert cold["fallback"] == "popular"
    sl, sd, sz = (v if v is not None else 0.0 for v in cold["scores"])
    # L > Z >= D: only L is popular (the old model answered [40, 40, 40]).
    assert sl > 30.0 and sl > sz >= sd and sd == 0.0, cold["scores"]
    ranked = http.post("/rank", json={"user_id": f"cold-{tag}", "k": 50}).json()["items"]
    order = [it["item_id"] for it in ranked]
    assert L in order and (D not in order or order.index(L) < order.index(D)) and Z not in order


def test_negative_weight_lowers_the_users_score_and_positive_raises_it(deployment):
    # The input: a user posting (probe, -5) four times used to see the score rise
    # 2.60 -> 9.03, as much as one posting +5. Now it must not rise; +5 must.
    http, _, dep = deployment
    tag = uuid.uuid4().hex[:6]
    neg, pos, probe = f"neg-{tag}", f"pos-{tag}", 37
    _post(http, [{"user_id": u, "item_id": i} for u in (neg, pos) for i in range(0, 12, 2)])
    s = _settled(http)
    n0 = _fresh_score(http, neg, [probe], s["ps_version"])
    p0 = _score(http, pos, [probe])
    assert n0["fallback"] is None and p0["fallback"] is None
    pop0 = _pop(dep, [probe])[0][0]

    _post(http, [{"user_id": neg, "item_id": probe, "weight": -5.0}] * 4)
    s = _settled(http)
    n1 = _fresh_score(http, neg, [probe], s["ps_version"])
    assert n1["scores"][0] < n0["scores"][0], (n0, n1)
    assert _pop(dep, [probe])[0][0] == pop0  # a dislike is never counted as popular

    _post(http, [{"user_id": pos, "item_id": probe, "weight": 5.0}] * 4)
    s = _settled(http)
    p1 = _fresh_score(http, pos, [probe], s["ps_version"])
    assert p1["scores"][0] > p0["scores"][0] + 0.5, (p0, p1)
    assert _pop(dep, [probe])[0][0] == pytest.approx(pop0 + 20.0)  # 4 positives of confidence 5
    assert p1["scores"][0] > n1["scores"][0]


def test_event_types_scale_confidence_by_the_configured_weights(deployment):
    http, _, dep = deployment
    tag = uuid.uuid4().hex[:6]
    bought, viewed, clicked = f"buy-{tag}", f"view-{tag}", f"click-{tag}"
    events = []
    for u in range(4):
        events += [{"user_id": f"t{tag}-{u}", "item_id": bought, "event_type": "purchase"},
                   {"user_id": f"t{tag}-{u}", "item_id": viewed, "event_type": "view"},
                   {"user_id": f"t{tag}-{u}", "item_id": clicked, "event_type": "click", "weight": 2.0}]
    _post(http, events)
    s = _settled(http)
    counts, found = _pop(dep, [bought, viewed, clicked])
    # purchase x5, view x0.5, an unlisted type x1 (times the event's own weight, 2.0).
    assert found.all() and counts.tolist() == pytest.approx([4 * 5.0, 4 * 0.5, 4 * 2.0])
    cold = _fresh_score(http, f"cold-{tag}", [bought, viewed, clicked], s["ps_version"])
    b, v, c = cold["scores"]
    assert cold["fallback"] == "popular" and b > c > v > 0


def test_rating_events_follow_the_rating_rule(deployment):
    # ratings: positive_at 4 of scale 5, below: negative (this deployment's config).
    http, cfg, dep = deployment
    tag = uuid.uuid4().hex[:6]
    r5, r4, r3 = f"r5-{tag}", f"r4-{tag}", f"r3-{tag}"
    users = [f"r{tag}-{u}" for u in range(5)]
    _post(http, [{"user_id": u, "item_id": item, "weight": w, "event_type": "rating"}
                 for u in users for item, w in ((r5, 5.0), (r4, 4.0), (r3, 3.0))])
    s = _settled(http)
    counts, found = _pop(dep, [r5, r4, r3])
    # >= 4: positives of confidence rating/5; 3 < 4: negative feedback (a row, never popular).
    assert found.all() and counts.tolist() == pytest.approx([5 * 1.0, 5 * 0.8, 0.0])
    # Only positives are the users' recent items (exclude_seen and the session context).
    from ps.ids import keyed

    want = set(keyed([r5, r4]).keys.tolist())
    assert all(set(r.tolist()) == want for r in dep.ps.recent_items(users))
    cold = _fresh_score(http, f"cold-{tag}", [r5, r4, r3], s["ps_version"])
    assert cold["scores"][0] > cold["scores"][1] > (cold["scores"][2] or 0.0)
    # A rating outside what the model takes is refused at the door, naming the field.
    bad = http.post("/events", json={"events": [{"user_id": users[0], "item_id": r5, "weight": 5000.0, "event_type": "rating"}]})
    assert bad.status_code == 422 and "max_abs_weight" in bad.text
    # So is one past the full-confidence rating (5): it would count as 200 five-star ratings.
    # The batch is refused whole, its legal first event too.
    before = http.get("/stats").json()["events_accepted"]
    bad = http.post("/events", json={"events": [{"user_id": users[0], "item_id": r4, "weight": 4.0, "event_type": "rating"},
                                                {"user_id": users[0], "item_id": r5, "weight": 1000.0, "event_type": "rating"}]})
    assert bad.status_code == 422, bad.text
    (err,) = bad.json()["detail"]
    assert err["loc"] == ["body", "events", 1, "weight"] and "model.ratings.scale=5" in err["msg"], err
    assert http.get("/stats").json()["events_accepted"] == before
    # The same weight on another event type is a confidence, within model.max_abs_weight.
    assert http.post("/events", json={"events": [{"user_id": users[0], "item_id": r3, "weight": 6.0}]}).status_code == 200


def test_a_weight_that_rounds_to_zero_in_float32_teaches_nothing_at_the_door_either(deployment):
    # The log stores float32 weights: 1e-46 is 0 there, so the trainer learns nothing from it.
    # /events must not take it for a positive either (a seen item, excluded from /rank).
    http, _, dep = deployment
    tag = uuid.uuid4().hex[:6]
    user, tiny, real = f"tiny-{tag}", f"tiny-i-{tag}", f"real-i-{tag}"
    r = http.post("/events", json={"events": [{"user_id": user, "item_id": tiny, "weight": 1e-46},
                                              {"user_id": user, "item_id": real, "weight": 1e-40}]})
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    from ps.ids import keyed

    (recent,) = dep.ps.recent_items([user])
    assert recent.tolist() == keyed([real]).keys.tolist()  # 1e-40 is a (subnormal) float32 positive
    _settled(http)
    counts, found = _pop(dep, [tiny, real])
    assert found.tolist() == [False, True] and counts[0] == 0.0
