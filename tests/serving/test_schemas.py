"""Request validation of the ranking service's bodies, in process (no Ray, no HTTP): each
refusal names the field at fault (``loc``, and the message for IDs), and the edge values
the contract allows are accepted.

The HTTP-level fuzzing of the same contract runs against a deployment in ``test_fuzz.py``;
these checks pin the schema itself, where a dropped bound would otherwise only show there.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.schemas import MAX_SCORE_ITEMS, EventsRequest, RankRequest, ScoreRequest

EV = {"user_id": 1, "item_id": "i"}


def _refusal(model, body) -> list[tuple[tuple, str]]:
    """``(loc, msg)`` of each error ``model`` raises for ``body`` (fails if it accepts it)."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return [(tuple(x["loc"]), x["msg"]) for x in e.value.errors()]


@pytest.mark.parametrize(
    "model, body, loc, says",
    [
        pytest.param(RankRequest, {"user_id": ""}, ("user_id",), "user_id: string ID must not be empty", id="rank-empty-user"),
        pytest.param(RankRequest, {"user_id": 2**63}, ("user_id",), "user_id: int ID", id="rank-user-above-int64"),
        pytest.param(RankRequest, {"user_id": -(2**63) - 1}, ("user_id",), "user_id: int ID", id="rank-user-below-int64"),
        pytest.param(ScoreRequest, {"user_id": 1, "item_ids": [1, "x" * 1025]}, ("item_ids", 1),
                     "item_ids: string ID longer than 1024 bytes", id="score-long-item"),
        pytest.param(ScoreRequest, {"user_id": "", "item_ids": [1]}, ("user_id",), "user_id:", id="score-empty-user"),
        pytest.param(EventsRequest, {"events": [EV, {**EV, "item_id": ""}]}, ("events", 1, "item_id"),
                     "item_id: string ID must not be empty", id="event-empty-item"),
        pytest.param(EventsRequest, {"events": [{**EV, "user_id": 2**64}]}, ("events", 0, "user_id"),
                     "user_id: int ID", id="event-user-above-int64"),
        pytest.param(EventsRequest, {"events": [{**EV, "item_id": "\udc80"}]}, ("events", 0, "item_id"),
                     "item_id: string ID must be valid Unicode", id="event-lone-surrogate"),
    ],
)
def test_an_invalid_id_is_refused_naming_its_field(model, body, loc, says):
    # The 422 lists loc and msg: a client must be told which ID was wrong, not "id".
    (got,) = _refusal(model, body)
    assert got[0] == loc
    assert says in got[1]


@pytest.mark.parametrize(
    "model, body, loc",
    [
        pytest.param(RankRequest, {"user_id": 1, "extra": 1}, ("extra",), id="rank-unknown-key"),
        pytest.param(EventsRequest, {"events": [{**EV, "rating": 5}]}, ("events", 0, "rating"), id="event-unknown-key"),
        pytest.param(RankRequest, {"user_id": 1, "k": 0}, ("k",), id="k-zero"),
        pytest.param(RankRequest, {"user_id": 1, "k": 100_001}, ("k",), id="k-above-absolute-max"),
        pytest.param(RankRequest, {"user_id": 1, "k": 5.0}, ("k",), id="k-float"),
        pytest.param(RankRequest, {"user_id": 1, "k": "5"}, ("k",), id="k-string"),
        pytest.param(RankRequest, {"user_id": 1, "exclude_seen": 1}, ("exclude_seen",), id="exclude-seen-int"),
        pytest.param(RankRequest, {"user_id": 1, "exclude_seen": "true"}, ("exclude_seen",), id="exclude-seen-str"),
        pytest.param(ScoreRequest, {"user_id": 1, "item_ids": []}, ("item_ids",), id="score-no-items"),
        pytest.param(ScoreRequest, {"user_id": 1, "item_ids": list(range(MAX_SCORE_ITEMS + 1))}, ("item_ids",),
                     id="score-too-many-items"),
        pytest.param(EventsRequest, {"events": []}, ("events",), id="no-events"),
        pytest.param(EventsRequest, {"events": [{**EV, "weight": float("nan")}]}, ("events", 0, "weight"), id="weight-nan"),
        pytest.param(EventsRequest, {"events": [{**EV, "weight": float("inf")}]}, ("events", 0, "weight"), id="weight-inf"),
        pytest.param(EventsRequest, {"events": [{**EV, "weight": 3.5e38}]}, ("events", 0, "weight"),
                     id="weight-beyond-float32"),
        pytest.param(EventsRequest, {"events": [{**EV, "weight": -3.5e38}]}, ("events", 0, "weight"),
                     id="weight-below-float32"),
        pytest.param(EventsRequest, {"events": [{**EV, "weight": "1"}]}, ("events", 0, "weight"), id="weight-string"),
        pytest.param(EventsRequest, {"events": [{**EV, "timestamp": -1.0}]}, ("events", 0, "timestamp"),
                     id="timestamp-negative"),
        pytest.param(EventsRequest, {"events": [{**EV, "timestamp": float("inf")}]}, ("events", 0, "timestamp"),
                     id="timestamp-inf"),
        pytest.param(EventsRequest, {"events": [{**EV, "event_type": ""}]}, ("events", 0, "event_type"),
                     id="event-type-empty"),
        pytest.param(EventsRequest, {"events": [{**EV, "event_type": "t" * 65}]}, ("events", 0, "event_type"),
                     id="event-type-too-long"),
        pytest.param(EventsRequest, {"events": [{**EV, "event_id": ""}]}, ("events", 0, "event_id"), id="event-id-empty"),
        pytest.param(EventsRequest, {"events": [{**EV, "event_id": "e" * 257}]}, ("events", 0, "event_id"),
                     id="event-id-too-long"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(model, body, loc):
    errors = _refusal(model, body)
    assert {e[0] for e in errors} == {loc}, errors


@pytest.mark.parametrize("bad", [True, False, 1.0, None, [1]], ids=["true", "false", "float", "null", "list"])
def test_values_that_are_not_ids_are_refused_for_every_id_field(bad):
    # true is an int to Python and 1.0 equals 1: neither may silently become ID 1.
    assert {e[0][0] for e in _refusal(RankRequest, {"user_id": bad})} == {"user_id"}
    assert {e[0][:2] for e in _refusal(ScoreRequest, {"user_id": 1, "item_ids": [2, bad]})} == {("item_ids", 1)}
    for field in ("user_id", "item_id"):
        errors = _refusal(EventsRequest, {"events": [{**EV, field: bad}]})
        assert {e[0][:3] for e in errors} == {("events", 0, field)}, errors


def test_the_edges_the_contract_allows_are_accepted_as_given():
    r = RankRequest.model_validate({"user_id": -(2**63), "k": 100_000, "exclude_seen": False})
    assert (r.user_id, r.k, r.exclude_seen) == (-(2**63), 100_000, False)
    assert RankRequest.model_validate({"user_id": "u"}).k == 10  # the defaults
    assert RankRequest.model_validate({"user_id": "u"}).exclude_seen is True
    s = ScoreRequest.model_validate({"user_id": "x" * 1024, "item_ids": [2**63 - 1, "5", 5]})
    assert s.item_ids == [2**63 - 1, "5", 5] and [type(x) for x in s.item_ids] == [int, str, int]  # "5" stays a str
    assert len(ScoreRequest.model_validate({"user_id": 1, "item_ids": list(range(MAX_SCORE_ITEMS))}).item_ids) == MAX_SCORE_ITEMS
    ev = EventsRequest.model_validate({"events": [
        {**EV, "timestamp": 0.0, "weight": -3.4e38, "event_type": "t" * 64, "event_id": "e" * 256},
        {**EV, "timestamp": None, "weight": 0},
    ]}).events
    assert (ev[0].timestamp, ev[0].weight, ev[0].event_type, ev[0].event_id) == (0.0, -3.4e38, "t" * 64, "e" * 256)
    assert (ev[1].timestamp, ev[1].weight, ev[1].event_type, ev[1].event_id) == (None, 0.0, None, None)
    assert EventsRequest.model_validate({"events": [EV]}).events[0].weight == 1.0
