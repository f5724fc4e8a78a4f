"""The event schema helpers (:mod:`workers.events`): the columns every source yields, and the
per-row validation a file row shares with ``POST /events``."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ps.ids import id_keys
from workers.events import EVENT_COLUMNS, MAX_EVENT_ID_CHARS, MAX_EVENT_TYPE_CHARS, is_rating, make_events, row_problem


def test_make_events_has_the_schemas_columns_and_keys_of_its_own_ids():
    ev = make_events([0, 1], ["u", 7], [5, "i"], [1.0, 2.0], [1.5, -2.0], 3.0,
                     event_types=pa.array(["rating", None], pa.large_string()))
    assert ev.schema.names == list(EVENT_COLUMNS)
    assert ev.schema.field("weight").type == pa.float32() and ev.schema.field("offset").type == pa.int64()
    assert ev.schema.field("event_type").type == pa.string() and ev.schema.field("event_id").type == pa.string()
    assert ev.column("user_key").to_numpy().tolist() == id_keys(["u", 7]).tolist()
    assert ev.column("item_key").to_numpy().tolist() == id_keys([5, "i"]).tolist()
    assert ev.column("ingest_ts").to_pylist() == [3.0, 3.0]
    assert ev.column("event_id").null_count == 2


def test_is_rating_counts_only_the_rating_type():
    types = pa.array(["rating", None, "click", "Rating"], pa.string())
    assert is_rating(types).tolist() == [True, False, False, False]


@pytest.mark.parametrize("row,problem", [
    (("u", "i", 0.0, 1.0), None),  # the epoch is a valid time
    (("u", "i", 1.7e9, 0.0), None),
    ((None, "i", 1.0, 1.0), "user_id: missing"),
    (("u", None, 1.0, 1.0), "item_id: missing"),
    (("u", "i", None, 1.0), "timestamp: missing"),
    (("u", "i", 1.0, None), "weight: missing"),
    (("", "i", 1.0, 1.0), "user_id: string ID must not be empty"),
    (("u", True, 1.0, 1.0), "item_id: must be an int or str ID"),
    (("u", "i", 1.0, True), "weight: must be a number"),
    (("u", "i", "1", 1.0), "timestamp: must be a number"),
    (("u", "i", 1.0, float("nan")), "weight: must be finite"),
    (("u", "i", float("inf"), 1.0), "timestamp: must be finite"),
    (("u", "i", -1.0, 1.0), "timestamp: must be >= 0"),
])
def test_row_problem_names_the_first_bad_field(row, problem):
    got = row_problem(*row)
    assert got == problem if problem is None else got.startswith(problem), got


def test_event_type_and_id_bounds_are_those_of_post_events():
    from pydantic import ValidationError

    from serving.schemas import Event

    Event(user_id="u", item_id="i", event_type="t" * MAX_EVENT_TYPE_CHARS, event_id="e" * MAX_EVENT_ID_CHARS)
    with pytest.raises(ValidationError):
        Event(user_id="u", item_id="i", event_type="t" * (MAX_EVENT_TYPE_CHARS + 1))
    with pytest.raises(ValidationError):
        Event(user_id="u", item_id="i", event_id="e" * (MAX_EVENT_ID_CHARS + 1))
