"""Request and response bodies of the ranking service (pydantic models).

Requests are strict: unknown keys are rejected, IDs follow ``ps.ids.validate_id``
(a signed 64-bit int or a non-empty string of at most 1024 UTF-8 bytes; ``true`` and
``1.0`` are not IDs), and numbers must be finite JSON numbers (no strings, no NaN).
Limits that depend on the deployment's config (``serving.max_k``,
``serving.max_events_per_request``) are checked by the handlers; the bounds here are
the absolute ones.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationInfo

from ps.ids import validate_id

__all__ = [
    "EntityId",
    "Event",
    "EventsRequest",
    "EventsResponse",
    "MAX_SCORE_ITEMS",
    "RankRequest",
    "RankResponse",
    "RankedItem",
    "ScoreRequest",
    "ScoreResponse",
]

MAX_SCORE_ITEMS = 10_000
"""Most item IDs one ``/score`` request may name (items)."""

_ABS_MAX_K = 100_000  # ServingConfig.max_k's own upper bound; the handler applies the configured one.


def _check_id(value: int | str, info: ValidationInfo) -> int | str:
    return validate_id(value, info.field_name or "id")


EntityId = Annotated[StrictInt | StrictStr, AfterValidator(_check_id)]
"""A user or item ID in a request: int in the signed 64-bit range or a non-empty str (≤1024 bytes)."""

_FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Request):
    """One interaction: ``user_id`` interacted with ``item_id``."""

    user_id: EntityId
    item_id: EntityId
    timestamp: Annotated[_FiniteFloat, Field(ge=0)] | None = Field(
        None, description="when it happened (unix seconds); null or absent uses the server's time"
    )
    # Bounded to float32's range: the log stores weights as float32, and inf would be an MSE target.
    weight: _FiniteFloat = Field(
        1.0,
        ge=-3.4e38,
        le=3.4e38,
        description="the event's strength: above 0 a positive with that confidence, below 0 negative feedback, 0 nothing; "
        "for event_type 'rating' the rating (model.ratings decides; at most model.ratings.scale in size); at most "
        "model.max_abs_weight in size; stored as float32 (a weight that rounds to 0 there is 0)",
    )
    event_type: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = Field(
        None, description="kind of interaction, e.g. view, click, purchase, rating (1-64 characters); stored with the event"
    )
    event_id: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = Field(
        None,
        description="the producer's ID of this event (1-256 characters): an event whose ID its partition of the "
        "ingest log has seen within the dedup window is not appended again",
    )


class EventsRequest(_Request):
    """Body of ``POST /events``: a non-empty batch. Each partition's part is appended whole;
    send an ``Idempotency-Key`` header so that a retry completes the request exactly once."""

    events: list[Event] = Field(min_length=1, description="the batch (at most serving.max_events_per_request)")


class EventsResponse(BaseModel):
    """Reply of ``POST /events``: what was durably appended and where.

    A retry with the same ``Idempotency-Key`` (the same events, in the same order) gets the
    original reply; the key reused for other events gets 422 and appends nothing.
    """

    accepted: int = Field(description="events appended (events)")
    offset: int = Field(
        description="the largest offset of the batch's events in the ingest-log partition of its last event "
        "(with one partition: the batch's last offset)"
    )
    duplicates: int = Field(
        0, description="events not appended because the log already had them (their event_id was seen) (events)"
    )
    offsets: dict[int, int] = Field(
        default_factory=dict, description="ingest-log partition -> the largest offset of the batch's events in it"
    )


class RankRequest(_Request):
    """Body of ``POST /rank``."""

    user_id: EntityId
    k: StrictInt = Field(10, ge=1, le=_ABS_MAX_K, description="items to return (at most serving.max_k)")
    exclude_seen: StrictBool = Field(True, description="leave out items the user recently interacted with")


class RankedItem(BaseModel):
    """One ranked item and its score: the model's logit, or under the popular fallback the item's recency-decayed
    interaction count (its all-time count when ``model.recent_table`` is null)."""

    item_id: int | str
    # /rank writes a score that is not finite (a NaN or inf row) as null, as pydantic would.
    score: float | None = Field(description="the item's score; null when it is not finite")


class RankResponse(BaseModel):
    """Reply of ``POST /rank``: best first."""

    user_id: int | str = Field(description="the user ID as given")
    items: list[RankedItem]
    fallback: Literal["popular"] | None = Field(description="'popular' when popularity ranked instead of the model")
    fallback_reason: Literal["new_user", "mirror_behind"] | None = Field(
        None,
        description="why: 'new_user' (no trained row yet), or 'mirror_behind' (this replica's item mirror could not "
        "catch up with the push behind the user's row in time)",
    )
    model_version: int = Field(description="pushes applied to the item tables this ranking reflects")


class ScoreRequest(_Request):
    """Body of ``POST /score``."""

    user_id: EntityId
    item_ids: list[EntityId] = Field(min_length=1, max_length=MAX_SCORE_ITEMS, description="items to score, in order")


class ScoreResponse(BaseModel):
    """Reply of ``POST /score``: one score per requested item, in order; null for items the PS has no row for."""

    user_id: int | str
    scores: list[float | None]
    fallback: Literal["popular"] | None
    fallback_reason: Literal["new_user", "mirror_behind"] | None = Field(None, description="as in RankResponse")
