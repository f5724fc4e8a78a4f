"""The sharding plan: plain data mapping virtual buckets to shards.

``bucket = id_key(id) % num_buckets``; ``shard = plan.assignment[bucket]``. The plan
is computed here, printed, serialised and handed to the shard actors that carry it
out; nothing in this module touches Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ps.ids import ID, id_keys

__all__ = ["ShardingPlan"]


class ShardingPlan(BaseModel):
    """Which shard owns each virtual bucket. Immutable; build with :meth:`uniform`.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) no buckets, a bucket assigned to a shard
            outside ``0..num_shards-1``, or a shard that owns no bucket.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_shards: int = Field(ge=1, description="number of shard actors")
    assignment: tuple[int, ...] = Field(description="shard index of each bucket; its length is num_buckets")

    @model_validator(mode="after")
    def _check(self) -> "ShardingPlan":
        if not self.assignment:
            raise ValueError("assignment must have at least one bucket")
        bad = [s for s in self.assignment if not 0 <= s < self.num_shards]
        if bad:
            raise ValueError(f"assignment names shards {sorted(set(bad))[:5]} outside 0..{self.num_shards - 1}")
        empty = set(range(self.num_shards)) - set(self.assignment)
        if empty:
            raise ValueError(f"shards {sorted(empty)[:5]} own no bucket")
        return self

    @property
    def num_buckets(self) -> int:
        """Number of virtual buckets."""
        return len(self.assignment)

    @classmethod
    def uniform(cls, num_buckets: int, num_shards: int) -> "ShardingPlan":
        """Contiguous, near-equal bucket ranges per shard (shard 0 owns the first range).

        Raises:
            ValueError: ``num_buckets < num_shards``.
        """
        if num_buckets < num_shards:
            raise ValueError(f"num_buckets ({num_buckets}) must be >= num_shards ({num_shards})")
        assignment = (np.arange(num_buckets) * num_shards // num_buckets).tolist()
        return cls(num_shards=num_shards, assignment=tuple(assignment))

    def buckets_of(self, ids: Sequence[ID] | np.ndarray) -> np.ndarray:
        """Bucket index (``int64 [n]``) of each ID.

        Raises:
            ValueError: a single ID where a sequence is expected, an array that is not 1-D,
                or an int ID outside the signed 64-bit range.
        """
        return (id_keys(ids) % np.uint64(self.num_buckets)).astype(np.int64)

    def shards_of(self, ids: Sequence[ID] | np.ndarray) -> np.ndarray:
        """Owning shard index (``int64 [n]``) of each ID.

        Raises:
            ValueError: as :meth:`buckets_of`.
        """
        return self.shards_of_keys(id_keys(ids))

    def shards_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Owning shard index (``int64 [n]``) of each key (``uint64 [n]``, see ``ps.ids.id_keys``)."""
        buckets = (np.asarray(keys, np.uint64) % np.uint64(self.num_buckets)).astype(np.int64)
        return np.asarray(self.assignment, dtype=np.int64)[buckets]

    def buckets_per_shard(self) -> list[int]:
        """How many buckets each shard owns."""
        return np.bincount(np.asarray(self.assignment), minlength=self.num_shards).tolist()

    def saved_plan_problem(self, saved: object) -> str | None:
        """Why rows saved under ``saved`` (a plan as JSON, e.g. a snapshot's ``meta.json``
        ``"plan"``) cannot be loaded under this plan, or None when it is this plan. Another plan
        would leave rows on shards that no longer own their buckets."""
        try:
            other = ShardingPlan.model_validate(saved)
        except ValidationError as e:  # its first line is only a count of the errors: say what each is
            why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'plan'}: {err['msg']}" for err in e.errors())
            return f"its sharding plan is not readable ({why})"
        if other == self:
            return None
        return (f"saved with a different sharding plan ({other.num_shards} shards over {other.num_buckets} buckets) "
                f"than the config's (ps.num_shards={self.num_shards}, ps.num_buckets={self.num_buckets}); "
                "rows would sit on the wrong shards")

    def describe(self) -> str:
        """One human-readable line per shard: its bucket count and share."""
        counts = self.buckets_per_shard()
        return "\n".join(
            f"shard {s}: {c} buckets ({100.0 * c / self.num_buckets:.1f}%)" for s, c in enumerate(counts)
        )
