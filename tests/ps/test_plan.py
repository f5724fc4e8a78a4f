"""ps.plan.ShardingPlan: uniform construction, routing, balance, JSON and validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from ps.ids import id_keys
from ps.plan import ShardingPlan


@pytest.mark.parametrize(
    ("num_buckets", "num_shards"),
    [(1, 1), (4, 4), (1024, 1), (1024, 2), (1024, 3), (1024, 7), (10, 3), (1000, 999), (1 << 20, 100)],
)
def test_uniform_covers_all_buckets_and_balances(num_buckets, num_shards):
    plan = ShardingPlan.uniform(num_buckets, num_shards)
    assert plan.num_shards == num_shards
    assert plan.num_buckets == len(plan.assignment) == num_buckets
    counts = plan.buckets_per_shard()
    assert len(counts) == num_shards and sum(counts) == num_buckets
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    # Contiguous ranges, shard 0 first.
    assert plan.assignment[0] == 0 and plan.assignment[-1] == num_shards - 1
    assert all(a <= b for a, b in zip(plan.assignment, plan.assignment[1:]))


def test_uniform_rejects_fewer_buckets_than_shards():
    with pytest.raises(ValueError, match="num_buckets"):
        ShardingPlan.uniform(3, 4)


@pytest.fixture
def ids():
    return list(range(-500, 500)) + [f"user-{i}" for i in range(1000)] + ["5", 5]


def test_buckets_of_is_key_mod_num_buckets(ids):
    plan = ShardingPlan.uniform(97, 5)
    buckets = plan.buckets_of(ids)
    assert buckets.dtype == np.int64 and buckets.shape == (len(ids),)
    assert buckets.min() >= 0 and buckets.max() < 97
    np.testing.assert_array_equal(buckets, [int(k) % 97 for k in id_keys(ids)])


def test_shards_of_follows_assignment(ids):
    plan = ShardingPlan.uniform(64, 3)
    buckets, shards = plan.buckets_of(ids), plan.shards_of(ids)
    assert shards.dtype == np.int64
    np.testing.assert_array_equal(shards, [plan.assignment[b] for b in buckets])
    # Routing is per ID: asking one at a time gives the same answer.
    assert [int(plan.shards_of([i])[0]) for i in ids[:50]] == shards[:50].tolist()


def test_shards_of_uses_a_non_uniform_assignment(ids):
    assignment = (2, 0, 1, 1, 0, 2, 2, 1)
    plan = ShardingPlan(num_shards=3, assignment=assignment)
    np.testing.assert_array_equal(plan.shards_of(ids), np.asarray(assignment)[plan.buckets_of(ids)])
    assert plan.buckets_per_shard() == [2, 3, 3]


@pytest.mark.parametrize("num_shards", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["int", "str"])
def test_ids_spread_evenly_over_shards(num_shards, kind):
    ids = list(range(10_000)) if kind == "int" else [f"item:{i}" for i in range(10_000)]
    plan = ShardingPlan.uniform(1024, num_shards)
    counts = np.bincount(plan.shards_of(ids), minlength=num_shards)
    share = np.asarray(plan.buckets_per_shard()) / plan.num_buckets * len(ids)
    assert np.all(np.abs(counts - share) <= 0.10 * share), (counts, share)


def test_json_round_trip():
    for plan in (ShardingPlan.uniform(1024, 3), ShardingPlan(num_shards=2, assignment=(1, 0, 1))):
        text = plan.model_dump_json()
        back = ShardingPlan.model_validate_json(text)
        assert back == plan
        assert back.assignment == plan.assignment and back.num_shards == plan.num_shards


def test_plan_is_frozen():
    plan = ShardingPlan.uniform(8, 2)
    with pytest.raises(ValidationError):
        plan.num_shards = 3


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_shards": 2, "assignment": (0, 1, 2)}, "outside 0..1"),
        ({"num_shards": 2, "assignment": (0, -1, 1)}, "outside 0..1"),
        ({"num_shards": 3, "assignment": (0, 0, 2, 2)}, "shards [1] own no bucket"),
        ({"num_shards": 1, "assignment": ()}, "at least one bucket"),
        ({"num_shards": 0, "assignment": (0,)}, "num_shards"),
        ({"num_shards": 2, "assignment": (0, 1), "extra": 1}, "extra"),
    ],
)
def test_invalid_plans_raise_naming_the_problem(kwargs, fragment):
    with pytest.raises(ValidationError) as info:
        ShardingPlan(**kwargs)
    assert fragment in str(info.value)


def test_invalid_json_plan_raises():
    with pytest.raises(ValidationError, match="own no bucket"):
        ShardingPlan.model_validate_json('{"num_shards": 2, "assignment": [0, 0, 0]}')


def test_describe_lists_every_shard():
    text = ShardingPlan.uniform(10, 3).describe()
    lines = text.splitlines()
    assert lines == ["shard 0: 4 buckets (40.0%)", "shard 1: 3 buckets (30.0%)", "shard 2: 3 buckets (30.0%)"]


def test_saved_plan_problem_refuses_any_other_assignment():
    # Rows saved under another assignment sit on shards that no longer own their buckets, even
    # when the shard and bucket counts match.
    plan = ShardingPlan.uniform(8, 2)
    assert plan.saved_plan_problem(json.loads(plan.model_dump_json())) is None
    swapped = ShardingPlan(num_shards=2, assignment=(1, 1, 1, 1, 0, 0, 0, 0))
    problem = plan.saved_plan_problem(json.loads(swapped.model_dump_json()))
    assert problem is not None and "different sharding plan" in problem
    more = plan.saved_plan_problem(ShardingPlan.uniform(16, 2).model_dump())
    assert more is not None and "2 shards over 16 buckets" in more and "ps.num_buckets=8" in more
    bad = plan.saved_plan_problem({"num_shards": 2, "assignment": [0, 0]})
    assert bad is not None and bad.startswith("its sharding plan is not readable")


def test_an_unreadable_saved_plan_says_why():
    # A snapshot whose plan is invalid is refused with "its sharding plan is not readable (...)":
    # it kept only pydantic's first line ("1 validation error for ShardingPlan"), not the reason.
    bad = ShardingPlan.uniform(8, 2).saved_plan_problem({"num_shards": 2, "assignment": [0, 0]})
    assert "own no bucket" in bad
    typo = ShardingPlan.uniform(8, 2).saved_plan_problem({"num_shards": "two", "assignment": [0, 1]})
    assert "num_shards: Input should be a valid integer" in typo
