"""``PSClient``: routes pulls and pushes to the owning shards in parallel, and
``start_shards``: creates the shard actors a sharding plan describes.

The client is cheap to build and holds only actor handles and the plan, so trainers,
serving replicas and users' own scripts each make their own (``PSClient.connect``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import ray

from ps.config import PSConfig
from ps.ids import ID, Keyed, keyed
from ps.plan import ShardingPlan
from ps.shard import Delta, PSShard, PushId, TableUpdate

__all__ = ["IdsLike", "PSClient", "PendingPull", "shard_actor_name", "start_shards"]


def shard_actor_name(index: int) -> str:
    """Ray actor name of shard ``index`` (inside the deployment's namespace)."""
    return f"ps-shard-{index}"


IdsLike = Union[Keyed, Sequence[ID], np.ndarray]
"""IDs as given (validated and hashed by the client), or :class:`ps.ids.Keyed` (already hashed)."""


def _check_push_id(push_id: Any) -> None:
    """Here, not in the shards: there a bad one fails each shard's call with a Ray traceback."""
    if not (isinstance(push_id, PushId) and isinstance(push_id.producer, str)
            and isinstance(push_id.seq, (int, np.integer)) and not isinstance(push_id.seq, bool)):
        raise ValueError(f"push_id: expected ps.shard.PushId(producer: str, seq: int), got {push_id!r:.80}")


class _Route:
    """Where each of a request's IDs goes: per-shard positions into the caller's order."""

    __slots__ = ("keyed", "positions", "whole")

    def __init__(self, keyed_ids: Keyed, plan: ShardingPlan):
        self.keyed = keyed_ids
        n = len(keyed_ids.keys)
        shard_of = plan.shards_of_keys(keyed_ids.keys) if n else np.empty(0, np.int64)
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(plan.num_shards + 1))
        self.positions = [order[bounds[s] : bounds[s + 1]] for s in range(plan.num_shards)]
        # The shard that owns every ID (always so with one shard): its part is the caller's
        # arrays as they are, in the caller's order, with nothing to copy either way.
        full = [s for s, p in enumerate(self.positions) if n and len(p) == n]
        self.whole: int | None = full[0] if full else None

    def take(self, arr: np.ndarray, s: int) -> np.ndarray:
        """``arr``'s entries for shard ``s`` (``arr`` itself when ``s`` owns them all)."""
        return arr if self.whole == s else arr[self.positions[s]]


class PendingPull:
    """A pull in flight; :meth:`result` waits and reassembles rows in request order."""

    def __init__(
        self,
        client: "PSClient",
        routes: dict[str, _Route],
        refs: dict[int, ray.ObjectRef],
        dims: dict[str, int],
        parts: dict[int, dict[str, np.ndarray]],
        initial: bool,
        after: tuple[PushId, list[ray.ObjectRef]] | None = None,
    ):
        self._client, self._routes, self._refs, self._dims = client, routes, refs, dims
        self._parts, self._initial, self._after = parts, initial, after

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{table: (rows[n, dim] float32, found[n] bool)}`` in the caller's ID order.

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within the client's ``timeout_s``.
            RuntimeError: the push given as ``after`` was acknowledged but a shard has not applied it.
        """
        shard_ids = list(self._refs)
        replies = self._client._get([self._refs[s] for s in shard_ids])
        early = [i for i, r in enumerate(replies) if r is None]
        if early:
            # Some shard answered before applying the push this pull must follow (a
            # retried push after a restart): wait for that push, then read again.
            push_id, push_refs = self._after
            self._client._get(push_refs)
            again = self._client._get(
                [self._client.shards[shard_ids[i]].pull_after.remote(self._parts[shard_ids[i]], self._initial, push_id)
                 for i in early]
            )
            if any(r is None for r in again):
                raise RuntimeError(f"push {push_id} acknowledged but not applied on every shard")
            for i, r in zip(early, again):
                replies[i] = r
        out = {}
        for name, route in self._routes.items():
            n = len(route.keyed.keys)
            if route.whole is not None and name in replies[shard_ids.index(route.whole)]:
                out[name] = replies[shard_ids.index(route.whole)][name]  # one shard owns all: its order is the caller's
                continue
            rows = np.empty((n, self._dims[name]), dtype=np.float32)
            found = np.empty(n, dtype=bool)
            for s, reply in zip(shard_ids, replies):
                if name in reply:
                    r, f = reply[name]
                    rows[route.positions[s]] = r
                    found[route.positions[s]] = f
            out[name] = (rows, found)
        return out


def _recent_triple(users: IdsLike, items: IdsLike, offsets: Any) -> tuple[Keyed, Keyed, np.ndarray]:
    """``(users, items, offsets)`` of events for users' recent items, keyed and checked: one
    entry per event (they are split by the users' shards, so a longer ``items`` would lose
    entries silently and a shorter one fail inside the split).

    Raises:
        ValueError: an invalid ID, or the three of different lengths.
    """
    users, items = keyed(users, "user_id"), keyed(items, "item_id")
    offsets = np.asarray(offsets, np.int64).reshape(-1)
    if not len(users.keys) == len(items.keys) == len(offsets):
        raise ValueError(f"recent items: {len(users.keys)} users, {len(items.keys)} items and "
                         f"{len(offsets)} offsets; they must have one entry per event")
    return users, items, offsets


class PSClient:
    """Talks to a deployment's shards: ``pull``/``push`` by ID, results in caller order.

    IDs may be given as such (the client validates and hashes them) or as
    :class:`ps.ids.Keyed` (hashed once where they entered, e.g. carried by an event
    batch). ``timeout_s`` bounds every blocking call (seconds); ``None`` waits forever.
    ``dims`` is each table's row width (floats).

    Raises:
        ValueError: ``shards`` does not hold one handle per shard of ``plan``.
    """

    def __init__(self, shards: Sequence[Any], plan: ShardingPlan, dims: dict[str, int], *, timeout_s: float | None = None):
        if len(shards) != plan.num_shards:
            raise ValueError(f"{len(shards)} shard handles for a plan of {plan.num_shards} shards")
        self.shards = list(shards)
        self.plan = plan
        self.dims = dict(dims)
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, namespace: str = "freshet", *, timeout_s: float | None = 30.0) -> "PSClient":
        """Attach to a running deployment's named shard actors in Ray ``namespace``;
        ``timeout_s`` (seconds) as in the class.

        Raises:
            ValueError: no shard actor of that name in ``namespace`` (from ``ray.get_actor``).
            ray.exceptions.GetTimeoutError: shard 0 does not answer within ``timeout_s``.
        """
        first = ray.get_actor(shard_actor_name(0), namespace=namespace)
        plan, dims = ray.get([first.get_plan.remote(), first.table_dims.remote()], timeout=timeout_s)
        shards = [first] + [ray.get_actor(shard_actor_name(i), namespace=namespace) for i in range(1, plan.num_shards)]
        return cls(shards, plan, dims, timeout_s=timeout_s)

    @property
    def num_shards(self) -> int:
        """Number of shards in the plan."""
        return self.plan.num_shards

    def _get(self, refs):
        return ray.get(refs, timeout=self.timeout_s)

    def wait(self, refs: list[ray.ObjectRef]) -> list:
        """Wait for pushes sent with :meth:`push_async`; their ``(version, applied)`` replies.

        Raises:
            ray.exceptions.GetTimeoutError: not within ``timeout_s``.
            ValueError: a shard rejected the push (what :meth:`push_async` checks before
                sending, a shard checks again).
        """
        return self._get(refs)

    def done(self, refs: list[ray.ObjectRef]) -> bool:
        """Whether every push of ``refs`` (from :meth:`push_async`) has answered, without waiting."""
        return not refs or len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

    def _route(self, ids: IdsLike, field: str = "id") -> _Route:
        return _Route(keyed(ids, field), self.plan)

    def _routes(self, requests: dict[str, Any], *, entries: bool = False) -> dict[str, _Route]:
        """A route per table of ``{table: ids}`` (``entries``: ``{table: (ids, ...)}``); tables
        given the very same ``Keyed`` (or array) share one."""
        memo: dict[int, _Route] = {}
        out = {}
        for name, ids in requests.items():
            ids = ids[0] if entries else ids
            r = memo.get(id(ids)) if isinstance(ids, (Keyed, np.ndarray)) else None
            if r is None:
                r = self._route(ids)
                if isinstance(ids, (Keyed, np.ndarray)):
                    memo[id(ids)] = r
            out[name] = r
        return out

    def _dim(self, table: str) -> int:
        try:
            return self.dims[table]
        except KeyError:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(self.dims)}") from None

    def shard_of(self, ids: IdsLike) -> np.ndarray:
        """Owning shard index (``int64 [n]``) of each ID.

        Raises:
            ValueError: an invalid ID.
        """
        return self.plan.shards_of_keys(keyed(ids).keys)

    # -- reads -------------------------------------------------------------------------
    def pull_async(
        self,
        requests: dict[str, IdsLike],
        *,
        initial: bool = False,
        after: tuple[PushId, list[ray.ObjectRef]] | None = None,
        create: bool | None = None,
    ) -> PendingPull:
        """Start pulling ``{table: ids}``; one call per shard that owns any of the IDs.

        An ID without a row reads as zeros, or as the row a push would create it with
        (``initial``: what a trainer computes its first gradient from); either way ``found``
        is False and nothing is stored (rows are created by pushes, never by pulls).
        ``after=(push_id, push_refs)`` makes the result reflect that push (sent earlier by
        this caller, not yet awaited) on every shard, even if a shard restarted between.
        ``create`` is the old name of ``initial``, kept for one release. Rows are
        ``float32 [n, dim]``, ``found`` ``bool [n]`` (see :meth:`PendingPull.result`).

        Raises:
            KeyError: an unknown table (nothing is sent).
            ValueError: an invalid ID (nothing is sent).
        """
        if create is not None:
            initial = create
        routes, dims, parts = self._pull_parts(requests)
        refs = {}
        for s, part in parts.items():
            if after is None:
                refs[s] = self.shards[s].pull.remote(part, initial)
            else:
                refs[s] = self.shards[s].pull_after.remote(part, initial, after[0])
        return PendingPull(self, routes, refs, dims, parts, initial, after)

    def _pull_parts(self, requests: dict[str, IdsLike]
                    ) -> tuple[dict[str, _Route], dict[str, int], dict[int, dict[str, np.ndarray]]]:
        """``(routes, dims, {shard: {table: keys}})`` of a pull, shards without keys left out."""
        routes = self._routes(requests)
        dims = {name: self._dim(name) for name in requests}
        parts = {}
        for s in range(self.num_shards):
            # Tables asked for the same IDs (item and item_bias) share one array per shard,
            # which Ray then sends once.
            split: dict[int, np.ndarray] = {}
            part = {}
            for name, r in routes.items():
                if len(r.positions[s]):
                    keys = split.get(id(r))
                    if keys is None:
                        keys = split[id(r)] = r.take(r.keyed.keys, s)
                    part[name] = keys
            if part:
                parts[s] = part
        return routes, dims, parts

    def pull_many(self, requests: dict[str, IdsLike], *, initial: bool = False, create: bool | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{table: (rows float32 [n, dim], found bool [n])}`` of ``{table: ids}``, each in the
        order given (see :meth:`pull_async`).

        Raises:
            KeyError, ValueError: as :meth:`pull_async`.
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self.pull_async(requests, initial=initial, create=create).result()

    def pull(self, table: str, ids: IdsLike, *, initial: bool = False, create: bool | None = None) -> np.ndarray:
        """Rows (``float32 [n, dim]``) of ``ids`` in ``table``, in the order given; an ID
        without a row reads as zeros (or its initial row with ``initial``). Read-only.

        Raises:
            KeyError, ValueError: as :meth:`pull_async`.
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self.pull_many({table: ids}, initial=initial, create=create)[table][0]

    def present(self, table: str, ids: IdsLike) -> np.ndarray:
        """Which of ``ids`` have a row in ``table`` (``bool [n]``, the caller's order), without
        transferring the rows.

        Raises:
            KeyError: an unknown table (raised by the shards; only when ``ids`` is not empty).
            ValueError: an invalid ID.
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        route = self._route(ids)
        out = np.zeros(len(route.keyed.keys), bool)
        calls = [(p, self.shards[s].present.remote(table, route.keyed.keys[p])) for s, p in enumerate(route.positions) if len(p)]
        for (p, _), got in zip(calls, self._get([ref for _, ref in calls])):
            out[p] = got
        return out

    def rank_context(self, table: str, user_id: ID | Keyed, *, recent: bool = True, timeout_s: float | None = None):
        """The user's :class:`ps.shard.RankContext` (row, the push behind it, recent item keys)
        from the user's shard: one call. ``timeout_s`` (seconds) overrides the client's.

        Raises:
            ValueError: an invalid ID.
            KeyError: an unknown table (raised by the shard).
            ray.exceptions.GetTimeoutError: the shard does not answer in time.
        """
        k = keyed(user_id if isinstance(user_id, Keyed) else [user_id], "user_id")
        shard = int(self.plan.shards_of_keys(k.keys)[0])
        return ray.get(self.shards[shard].rank_context.remote(table, int(k.keys[0]), recent),
                       timeout=self.timeout_s if timeout_s is None else timeout_s)

    def recent_items(self, user_ids: IdsLike) -> list[np.ndarray]:
        """Each user's recent item keys (``uint64 [k]`` each, oldest first), in the order given.

        Raises:
            ValueError: an invalid ID.
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        route = self._route(user_ids, "user_id")
        out: list[np.ndarray] = [np.empty(0, np.uint64) for _ in range(len(route.keyed.keys))]
        calls = [(s, self.shards[s].recent_items.remote(route.keyed.keys[p])) for s, p in enumerate(route.positions) if len(p)]
        for (s, _), items in zip(calls, self._get([ref for _, ref in calls])):
            for pos, arr in zip(route.positions[s].tolist(), items):
                out[pos] = arr
        return out

    def seen(self, user_ids: IdsLike) -> list[list[int]]:
        """Each user's recent item keys as lists of ints (see :meth:`recent_items`).

        Raises:
            ValueError, ray.exceptions.GetTimeoutError: as :meth:`recent_items`.
        """
        return [a.tolist() for a in self.recent_items(user_ids)]

    def delta(self, tables: list[str], since: Sequence[int], reader: str | None = None,
              cursors: Sequence[tuple | None] | None = None) -> list[Delta]:
        """Per shard: the :class:`ps.shard.Delta` of ``tables`` after ``since[shard]`` (one
        version per shard); ``reader`` names the caller so shards keep the tombstones it still needs.
        ``cursors[shard]`` is the ``Delta.cursor`` that came with ``since[shard]`` (None: unknown),
        so a restarted shard answers in full and a caught-up one never needlessly does.

        Raises:
            KeyError: an unknown table (raised by the shards).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        cursors = list(cursors) if cursors is not None else [None] * len(self.shards)
        return self._get([sh.delta.remote(tables, int(v), reader, c) for sh, v, c in zip(self.shards, since, cursors)])

    def removed(self, table: str, since: Sequence[int], reader: str | None = None) -> list[tuple[int, np.ndarray, bool]]:
        """Per shard: ``(version, removed keys uint64 [k], full)`` of ``table`` (see ``PSShard.removed``).

        Raises:
            KeyError: an unknown table (raised by the shards).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.removed.remote(table, int(v), reader) for sh, v in zip(self.shards, since)])

    def live_keys(self, table: str) -> list[tuple[int, np.ndarray]]:
        """Per shard: ``(version, keys uint64 [k])`` of every row of ``table``.

        Raises:
            KeyError: an unknown table (raised by the shards).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.live_keys.remote(table) for sh in self.shards])

    # -- writes ------------------------------------------------------------------------
    def push_async(
        self,
        updates: dict[str, tuple],
        push_id: PushId,
        recent: tuple[IdsLike, IdsLike, np.ndarray] | None = None,
    ) -> list[ray.ObjectRef]:
        """Send ``{table: (ids, grads[, create])}`` to the owning shards; one ref per shard.

        ``grads`` is ``float32 [n, dim]`` (converted to float32), one row per ID. ``create`` (``bool [n]``, default all True) marks the real interactions: only they
        may create a row (admission permitting) and refresh its TTL and eviction score; a
        negative sample or a context item changes an existing row, never brings one back.
        ``recent`` is ``(users, items, offsets)`` of the events behind the push (IDs and
        ``int64 [m]`` stream offsets), for the users' recent items. Every shard receives the push id, even with no rows for it,
        so each shard's version counts the same pushes and a re-sent push is recognised
        everywhere.

        Raises:
            ValueError: a ``push_id`` that is not a ``PushId(producer: str, seq: int)``, wrong
                gradient shapes, non-finite gradients, invalid IDs or a ``recent`` whose three
                parts differ in length (nothing is sent).
            KeyError: an unknown table (nothing is sent).
        """
        _check_push_id(push_id)
        parts, rec_parts = self._push_parts(updates, recent)
        return [sh.push.remote(push_id, parts[s], rec_parts[s]) for s, sh in enumerate(self.shards)]

    def push_pull_async(
        self,
        updates: dict[str, tuple],
        push_id: PushId,
        recent: tuple[IdsLike, IdsLike, np.ndarray] | None,
        requests: dict[str, IdsLike],
        *,
        initial: bool = True,
    ) -> tuple[list[ray.ObjectRef], PendingPull]:
        """:meth:`push_async`, then pull ``requests`` (as :meth:`pull_async`) in the same call
        to each shard: ``(push refs, pending pull)``. The rows reflect the push on every
        shard: a trainer's next pass, one call per shard instead of two.

        Raises:
            ValueError, KeyError: as :meth:`push_async` or :meth:`pull_async` (nothing is sent).
        """
        _check_push_id(push_id)
        parts, rec_parts = self._push_parts(updates, recent)
        routes, dims, pull_parts = self._pull_parts(requests)
        push_refs, pull_refs = [], {}
        for s, sh in enumerate(self.shards):
            if s in pull_parts:
                done, rows = sh.push_pull.options(num_returns=2).remote(push_id, parts[s], rec_parts[s],
                                                                        pull_parts[s], initial)
                push_refs.append(done)
                pull_refs[s] = rows
            else:
                push_refs.append(sh.push.remote(push_id, parts[s], rec_parts[s]))
        return push_refs, PendingPull(self, routes, pull_refs, dims, pull_parts, initial)

    def _push_parts(self, updates: dict[str, tuple], recent) -> tuple[list[dict[str, TableUpdate]], list[Any]]:
        """Each shard's ``{table: TableUpdate}`` and recent-items part of a push (see :meth:`push_async`)."""
        parts: list[dict[str, TableUpdate]] = [{} for _ in range(self.num_shards)]
        routes = self._routes(updates, entries=True)
        # Arrays shared by several tables (item and item_bias: keys, IDs, create) are split
        # once per shard, so each shard's part refers to one array and Ray sends it once.
        split: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

        def piece(arr: np.ndarray | None, s: int, route: _Route) -> np.ndarray | None:
            if arr is None:
                return None
            got = split.get((id(arr), s))
            if got is None:  # the source is kept with its piece, so its id() is not reused meanwhile
                got = split[(id(arr), s)] = (arr, route.take(arr, s))
            return got[1]

        for name, entry in updates.items():
            grads = entry[1]
            create = entry[2] if len(entry) > 2 and entry[2] is not None else None
            if create is not None and (not isinstance(create, np.ndarray) or create.dtype != bool):
                create = np.asarray(create, bool)
            route = routes[name]
            k = route.keyed
            grads = np.asarray(grads, dtype=np.float32)
            if grads.shape != (len(k.keys), self._dim(name)):
                raise ValueError(f"push to {name!r}: grads shape {grads.shape} != ({len(k.keys)}, {self._dim(name)})")
            # Checked here as well as on the shards: a push rejected by only some shards
            # would leave them at different versions under one push id.
            if not np.isfinite(grads).all():
                raise ValueError(f"push to {name!r}: grads contain NaN or inf")
            if create is not None and create.shape != (len(k.keys),):
                raise ValueError(f"push to {name!r}: create shape {create.shape} != ({len(k.keys)},)")
            for s, p in enumerate(route.positions):
                if len(p):
                    parts[s][name] = TableUpdate(name, piece(k.keys, s, route), route.take(grads, s), piece(k.ids, s, route),
                                                 piece(create, s, route))
        rec_parts: list[Any] = [None] * self.num_shards
        if recent is not None:
            users, items, offsets = _recent_triple(recent[0], recent[1], recent[2])
            for s, p in enumerate(_Route(users, self.plan).positions):
                if len(p):
                    rec_parts[s] = (users.keys[p], items.keys[p], offsets[p])
        return parts, rec_parts

    def push_many(self, updates: dict[str, tuple], push_id: PushId, recent=None) -> list[tuple[int, bool]]:
        """Push and wait; returns ``(version, applied)`` per shard (see :meth:`push_async`).

        Raises:
            ValueError, KeyError: as :meth:`push_async` (nothing is sent).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get(self.push_async(updates, push_id, recent))

    def push(self, table: str, ids: IdsLike, grads: np.ndarray, push_id: PushId) -> list[tuple[int, bool]]:
        """Push gradients (``float32 [n, dim]``) of one table (every entry a real interaction);
        see :meth:`push_many`.

        Raises:
            ValueError, KeyError: as :meth:`push_async` (nothing is sent).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self.push_many({table: (ids, grads)}, push_id)

    def record_recent(self, users: IdsLike, items: IdsLike, offsets: np.ndarray, *, timeout_s: float | None = None) -> int:
        """Merge ``(users, items, offsets)`` into the users' recent items on their shards and
        wait (the ingest path of read-your-writes). ``offsets`` are ``int64 [n]`` stream
        offsets; ``timeout_s`` (seconds) overrides the client's. Returns entries added.

        Raises:
            ValueError: an invalid ID, or ``users``, ``items`` and ``offsets`` of different
                lengths (nothing is sent).
            ray.exceptions.GetTimeoutError: a shard does not answer in time.
        """
        users, items, offsets = _recent_triple(users, items, offsets)
        refs = [self.shards[s].record_recent.remote(users.keys[p], items.keys[p], offsets[p])
                for s, p in enumerate(_Route(users, self.plan).positions) if len(p)]
        return int(sum(ray.get(refs, timeout=self.timeout_s if timeout_s is None else timeout_s)))

    def expire(self) -> list[dict[str, int]]:
        """Run every shard's TTL expiry now (``PSShard.expire``); per shard, rows removed per table.

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.expire.remote() for sh in self.shards])

    def forget_items(self, items: IdsLike) -> int:
        """Drop ``items`` from every user's recent items on every shard; returns entries dropped.

        Raises:
            ValueError: an invalid ID.
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        keys = keyed(items, "item_id").keys
        return int(sum(self._get([sh.forget_items.remote(keys) for sh in self.shards])))

    # -- introspection -----------------------------------------------------------------
    def versions(self) -> list[int]:
        """Applied-push count of each shard.

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.get_version.remote() for sh in self.shards])

    def stats(self) -> list[dict[str, Any]]:
        """Each shard's ``stats()`` (see ``PSShard.stats``).

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.stats.remote() for sh in self.shards])

    def snapshot(self, name: str | None = None) -> list[dict[str, Any]]:
        """Snapshot every shard now (and as named checkpoint ``name``); one report per shard.

        Shards snapshot at their own versions: pause the trainers first for a checkpoint
        that is consistent across shards (``freshet ckpt save`` does).

        Raises:
            ValueError: a shard without a ``state_dir`` and no ``name``, or an invalid ``name``
                (raised by the shards).
            ray.exceptions.GetTimeoutError: a shard does not answer within ``timeout_s``.
        """
        return self._get([sh.snapshot.remote(name) for sh in self.shards])

    def ping(self) -> bool:
        """True when every shard answers within ``timeout_s``."""
        try:
            self._get([sh.ping.remote() for sh in self.shards])
            return True
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False


def start_shards(
    cfg: PSConfig,
    *,
    namespace: str,
    detached: bool = False,
    plan: ShardingPlan | None = None,
    timeout_s: float | None = 60.0,
    state_dir: str | Path | None = None,
    restore_from: str | Path | None = None,
) -> PSClient:
    """Create the shard actors for ``plan`` (default: uniform over ``cfg.num_shards``) and wait until they answer.

    Actors are named ``ps-shard-{i}`` in ``namespace`` so any process can ``PSClient.connect``;
    ``detached`` keeps them alive after the creating driver exits.

    ``state_dir`` makes the shards durable: shard ``i`` keeps snapshots and its push log
    in ``state_dir/shard-{i}`` and recovers them when started again, including Ray's
    restarts after a crash (``cfg.max_restarts``); named checkpoints go to
    ``state_dir/checkpoints``. ``restore_from`` (a named checkpoint directory holding
    ``shard-{i}/``) starts the shards from that checkpoint, replacing what ``state_dir``
    held.

    Raises:
        FileNotFoundError: ``restore_from`` has no checkpoint for some shard (named).
        TimeoutError: the shards do not answer within ``timeout_s`` seconds.
        ValueError: an actor named ``ps-shard-{i}`` already exists in ``namespace`` (Ray).
        ray.exceptions.RayActorError: a shard's constructor failed (its error in the message),
            e.g. saved state written with another plan, shard or table layout (see
            :class:`ps.shard.PSShard`); Ray reports it as ``ActorDiedError``, not ``ValueError``.
    """
    plan = plan or ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards)
    root = Path(state_dir).absolute() if state_dir is not None else None
    ckpt = Path(restore_from).absolute() if restore_from is not None else None
    if ckpt is not None:
        missing = [i for i in range(plan.num_shards) if not (ckpt / f"shard-{i}" / "meta.json").exists()]
        if missing:
            raise FileNotFoundError(f"restore_from: {ckpt} has no checkpoint for shards {missing}")
    # One token per start: Ray's restarts reuse it (and so keep their own later state),
    # while a new start_shards(restore_from=...) restores the checkpoint again.
    token = uuid.uuid4().hex if ckpt is not None else None
    actor_cls = ray.remote(PSShard)
    shards = []
    for i in range(plan.num_shards):
        opts: dict[str, Any] = dict(
            name=shard_actor_name(i),
            namespace=namespace,
            num_cpus=cfg.shard_num_cpus,
            max_restarts=cfg.max_restarts,
            # A push retried after a restart is either in the recovered log (and deduplicated
            # by its push id) or was never acknowledged, so retrying is safe.
            max_task_retries=-1 if cfg.max_restarts != 0 else 0,
        )
        if detached:
            opts["lifetime"] = "detached"
        shards.append(
            actor_cls.options(**opts).remote(
                i,
                plan,
                cfg,
                str(root / f"shard-{i}") if root is not None else None,
                restore_from=str(ckpt) if ckpt is not None else None,
                restore_token=token,
                checkpoint_root=str(root / "checkpoints") if root is not None else None,
            )
        )
    client = PSClient(shards, plan, {n: t.dim for n, t in cfg.tables.items()}, timeout_s=timeout_s)
    try:
        # ray.get surfaces an exception raised in a shard's __init__ (say, a plan that does
        # not match its saved state) instead of waiting out the timeout.
        ray.get([sh.ping.remote() for sh in shards], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"PS shards did not start within {timeout_s} s") from None
    return client
