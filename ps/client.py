"""``PSClient``: routes pulls and pushes to the owning shards in parallel, and
``start_shards``: creates the shard actors a sharding plan describes.

The client is cheap to build and holds only actor handles and the plan, so trainers,
serving replicas and users' own scripts each make their own (``PSClient.connect``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ps.config import PSConfig
from ps.ids import ID, as_id_array, validate_id
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId, TableDelta

__all__ = ["PSClient", "PendingPull", "shard_actor_name", "start_shards"]


def shard_actor_name(index: int) -> str:
    """Ray actor name of shard ``index`` (inside the deployment's namespace)."""
    return f"ps-shard-{index}"


class _Route:
    """Where each of a request's IDs goes: per-shard positions into the caller's order."""

    __slots__ = ("ids", "positions")

    def __init__(self, ids: np.ndarray, shard_of: np.ndarray, num_shards: int):
        self.ids = ids
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(num_shards + 1))
        self.positions = [order[bounds[s] : bounds[s + 1]] for s in range(num_shards)]


class PendingPull:
    """A pull in flight; :meth:`result` waits and reassembles rows in request order."""

    def __init__(
        self,
        client: "PSClient",
        routes: dict[str, _Route],
        refs: dict[int, ray.ObjectRef],
        dims: dict[str, int],
        parts: dict[int, dict[str, np.ndarray]],
        create: bool,
        after: tuple[PushId, list[ray.ObjectRef]] | None = None,
    ):
        self._client, self._routes, self._refs, self._dims = client, routes, refs, dims
        self._parts, self._create, self._after = parts, create, after

    def result(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{table: (rows[n, dim] float32, found[n] bool)}`` in the caller's ID order."""
        shard_ids = list(self._refs)
        replies = self._client._get([self._refs[s] for s in shard_ids])
        early = [i for i, r in enumerate(replies) if r is None]
        if early:
            # Some shard answered before applying the push this pull must follow (a
            # retried push after a restart): wait for that push, then read again.
            push_id, push_refs = self._after
            self._client._get(push_refs)
            again = self._client._get(
                [self._client.shards[shard_ids[i]].pull_after.remote(self._parts[shard_ids[i]], self._create, push_id)
                 for i in early]
            )
            if any(r is None for r in again):
                raise RuntimeError(f"push {push_id} acknowledged but not applied on every shard")
            for i, r in zip(early, again):
                replies[i] = r
        out = {}
        for name, route in self._routes.items():
            n = len(route.ids)
            rows = np.empty((n, self._dims[name]), dtype=np.float32)
            found = np.empty(n, dtype=bool)
            for s, reply in zip(shard_ids, replies):
                if name in reply:
                    r, f = reply[name]
                    rows[route.positions[s]] = r
                    found[route.positions[s]] = f
            out[name] = (rows, found)
        return out


class PSClient:
    """Talks to a deployment's shards: ``pull``/``push`` by ID, results in caller order.

    ``timeout_s`` bounds every blocking call (seconds); ``None`` waits forever.
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
        """Attach to a running deployment's named shard actors in Ray ``namespace``."""
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

    def _route(self, ids: Sequence[ID] | np.ndarray) -> _Route:
        arr = as_id_array(ids)
        if arr.dtype == object:
            for x in arr.tolist():
                validate_id(x)
        return _Route(arr, self.plan.shards_of(arr) if len(arr) else np.empty(0, np.int64), self.num_shards)

    def _dim(self, table: str) -> int:
        try:
            return self.dims[table]
        except KeyError:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(self.dims)}") from None

    # -- reads -------------------------------------------------------------------------
    def pull_async(
        self,
        requests: dict[str, Sequence[ID] | np.ndarray],
        *,
        create: bool = True,
        after: tuple[PushId, list[ray.ObjectRef]] | None = None,
    ) -> PendingPull:
        """Start pulling ``{table: ids}``; one call per shard that owns any of the IDs.

        ``after=(push_id, push_refs)`` makes the result reflect that push (sent earlier by
        this caller, not yet awaited) on every shard, even if a shard restarted between.
        """
        routes = {name: self._route(ids) for name, ids in requests.items()}
        dims = {name: self._dim(name) for name in requests}
        refs, parts = {}, {}
        for s in range(self.num_shards):
            part = {name: r.ids[r.positions[s]] for name, r in routes.items() if len(r.positions[s])}
            if part:
                parts[s] = part
                if after is None:
                    refs[s] = self.shards[s].pull.remote(part, create)
                else:
                    refs[s] = self.shards[s].pull_after.remote(part, create, after[0])
        return PendingPull(self, routes, refs, dims, parts, create, after)

    def pull_many(self, requests: dict[str, Sequence[ID] | np.ndarray], *, create: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rows and found-masks of ``{table: ids}``, each in the order given."""
        return self.pull_async(requests, create=create).result()

    def pull(self, table: str, ids: Sequence[ID] | np.ndarray, *, create: bool = True) -> np.ndarray:
        """Rows (``float32 [n, dim]``) of ``ids`` in ``table``, in the order given.

        ``create=False`` is a read-only lookup: absent IDs read as zeros and nothing is stored.
        """
        return self.pull_many({table: ids}, create=create)[table][0]

    def seen(self, user_ids: Sequence[ID] | np.ndarray) -> list[list[ID]]:
        """Recent items of each user (as remembered by the user's shard), in the order given."""
        route = self._route(user_ids)
        out: list[list[ID]] = [[] for _ in range(len(route.ids))]
        calls = [(s, self.shards[s].seen_items.remote(route.ids[p])) for s, p in enumerate(route.positions) if len(p)]
        for (s, _), items in zip(calls, self._get([ref for _, ref in calls])):
            for pos, lst in zip(route.positions[s].tolist(), items):
                out[pos] = lst
        return out

    def delta(self, tables: list[str], since: Sequence[int]) -> list[tuple[int, dict[str, TableDelta]]]:
        """Per shard: ``(version, {table: TableDelta})`` of changes after ``since[shard]``."""
        return self._get([sh.delta.remote(tables, int(v)) for sh, v in zip(self.shards, since)])

    # -- writes ------------------------------------------------------------------------
    def push_async(
        self,
        updates: dict[str, tuple[Sequence[ID] | np.ndarray, np.ndarray]],
        push_id: PushId,
        history: tuple[Sequence[ID] | np.ndarray, Sequence[ID] | np.ndarray] | None = None,
    ) -> list[ray.ObjectRef]:
        """Send ``{table: (ids, grads)}`` to the owning shards; returns one ref per shard.

        Every shard receives the push id, even with no rows for it, so each shard's
        version counts the same pushes and a re-sent push is recognised everywhere.
        """
        parts: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(self.num_shards)]
        for name, (ids, grads) in updates.items():
            route = self._route(ids)
            grads = np.asarray(grads, dtype=np.float32)
            if grads.shape != (len(route.ids), self._dim(name)):
                raise ValueError(f"push to {name!r}: grads shape {grads.shape} != ({len(route.ids)}, {self._dim(name)})")
            # Checked here as well as on the shards: a push rejected by only some shards
            # would leave them at different versions under one push id.
            if not np.isfinite(grads).all():
                raise ValueError(f"push to {name!r}: grads contain NaN or inf")
            for s, p in enumerate(route.positions):
                if len(p):
                    parts[s][name] = (route.ids[p], grads[p])
        hist_parts: list[Any] = [None] * self.num_shards
        if history is not None:
            users, items = as_id_array(history[0]), as_id_array(history[1])
            route = self._route(users)
            hist_parts = [(users[p], items[p]) if len(p) else None for p in route.positions]
        return [sh.push.remote(push_id, parts[s], hist_parts[s]) for s, sh in enumerate(self.shards)]

    def push_many(self, updates, push_id: PushId, history=None) -> list[tuple[int, bool]]:
        """Push and wait; returns ``(version, applied)`` per shard."""
        return self._get(self.push_async(updates, push_id, history))

    def push(self, table: str, ids: Sequence[ID] | np.ndarray, grads: np.ndarray, push_id: PushId) -> list[tuple[int, bool]]:
        """Push gradients of one table; see :meth:`push_many`."""
        return self.push_many({table: (ids, grads)}, push_id)

    # -- introspection -----------------------------------------------------------------
    def versions(self) -> list[int]:
        """Applied-push count of each shard."""
        return self._get([sh.get_version.remote() for sh in self.shards])

    def stats(self) -> list[dict[str, Any]]:
        """Each shard's ``stats()``."""
        return self._get([sh.stats.remote() for sh in self.shards])

    def snapshot(self, name: str | None = None) -> list[dict[str, Any]]:
        """Snapshot every shard now (and as named checkpoint ``name``); one report per shard.

        Shards snapshot at their own versions: pause the trainers first for a checkpoint
        that is consistent across shards (``freshet ckpt save`` does).
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
    held. Raises ``FileNotFoundError`` naming a missing shard checkpoint, and
    ``TimeoutError`` if the shards do not answer within ``timeout_s`` seconds.
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
