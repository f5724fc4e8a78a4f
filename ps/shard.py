"""One parameter-server shard: the rows of the buckets it owns, their optimizer state,
per-user history for ``exclude_seen``, a version counter and exactly-once pushes.

``PSShard`` is a plain class; ``ps.client.start_shards`` wraps it with ``ray.remote``.
Ray runs an actor's methods one at a time, so no locking is needed here.

With a ``state_dir`` the shard is crash-consistent: every applied push is appended to
a push log before ``push`` returns, snapshots are written every
``cfg.snapshot_every_pushes`` pushes, and a new shard on the same directory (a Ray
restart re-runs ``__init__``) loads the newest snapshot and replays the log, arriving
at bitwise the state it had acknowledged. The file formats live in ``ps.persist``.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ps.config import PSConfig
from ps.ids import ID, as_id_array, validate_id
from ps.persist import (
    LogRecord,
    ShardState,
    ShardStore,
    checkpoint_shard_dir,
    read_snapshot,
    write_snapshot_dir,
)
from ps.plan import ShardingPlan
from ps.table import EmbeddingTable

__all__ = ["PSShard", "PushId", "TableDelta"]

_log = logging.getLogger(__name__)


class PushId(NamedTuple):
    """Identity of a push: ``seq`` increases per ``producer`` (a trainer incarnation-free name).

    A shard applies a push only if ``seq`` is above the highest it has applied from that
    producer, so a re-sent push (after a trainer restart or a retried call) is a no-op.
    """

    producer: str
    seq: int


class TableDelta(NamedTuple):
    """Rows of one table changed after a version, and IDs removed (expired) after it."""

    ids: np.ndarray
    rows: np.ndarray
    removed: np.ndarray


def _checked_ids(ids, field: str) -> np.ndarray:
    """IDs as an array, ValueError naming ``field`` for any that is not an int64 or str ID."""
    arr = as_id_array(ids)
    if arr.dtype == object:
        for x in arr.tolist():
            validate_id(x, field)
    return arr


class PSShard:
    """Holds the rows of the buckets ``plan`` assigns to ``shard_index``.

    Methods take and return numpy arrays (rows ``float32``); IDs are int64 or object
    arrays as produced by ``ps.ids.as_id_array``.

    ``state_dir`` (a local directory) makes the shard durable: it recovers whatever
    the directory holds, logs every push before acknowledging it and snapshots every
    ``cfg.snapshot_every_pushes`` pushes. Without it the shard lives in memory only.

    ``restore_from`` is a named checkpoint directory (``<root>/<name>``, holding
    ``shard-{i}/``) to start from. With a ``state_dir`` the checkpoint replaces the
    directory's state once per ``restore_token``: a Ray restart re-runs ``__init__``
    with the same token and then recovers its own later state instead of going back
    to the checkpoint. ``restore_token`` defaults to the checkpoint path.

    ``checkpoint_root`` is where ``snapshot(name)`` writes named checkpoints; it
    defaults to ``<parent of state_dir>/checkpoints``.

    Rows that a pull created but no push ever touched are not logged: after a
    recovery they are absent until pulled again, when they get the same
    deterministic initial row.
    """

    def __init__(
        self,
        shard_index: int,
        plan: ShardingPlan,
        cfg: PSConfig,
        state_dir: str | Path | None = None,
        *,
        restore_from: str | Path | None = None,
        restore_token: str | None = None,
        checkpoint_root: str | Path | None = None,
    ):
        if not 0 <= shard_index < plan.num_shards:
            raise ValueError(f"shard_index {shard_index} outside plan of {plan.num_shards} shards")
        self.shard_index, self.plan, self.cfg = shard_index, plan, cfg
        self.version = 0
        self.tables = {name: EmbeddingTable(name, t, cfg.optimizer_for(name), cfg.seed) for name, t in cfg.tables.items()}
        self.high_water: dict[str, int] = {}
        self.seen: dict[ID, collections.deque] = {}
        self.push_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.duplicates = 0
        self._last_expire = time.time()
        self._lsn = 0  # logged state changes so far (pushes and row-removing expiries)
        self._since_snapshot = 0  # pushes applied since the last snapshot
        self._store: ShardStore | None = None
        self.snapshot_error: str | None = None  # why the last automatic snapshot failed, if it did
        self.recovery: dict[str, Any] = {"snapshot_lsn": None, "replayed": 0, "restored_from": None, "seconds": 0.0}
        if checkpoint_root is None and state_dir is not None:
            checkpoint_root = Path(state_dir).absolute().parent / "checkpoints"
        self.checkpoint_root = Path(checkpoint_root) if checkpoint_root is not None else None
        t0 = time.perf_counter()
        ckpt = Path(restore_from) / f"shard-{shard_index}" if restore_from is not None else None
        if ckpt is not None and not (ckpt / "meta.json").exists():
            raise FileNotFoundError(f"restore_from: {restore_from} has no checkpoint for shard {shard_index} ({ckpt})")
        if state_dir is not None:
            self._store = ShardStore(state_dir, fsync=cfg.fsync)
            token = restore_token or (str(Path(restore_from).absolute()) if restore_from is not None else None)
            if ckpt is not None and self._store.restored_token() != token:
                seed = read_snapshot(ckpt)
                self._check_plan(seed.plan, ckpt)  # before the directory's own state is replaced
                self._store.reset_from(seed, ckpt, token)
                self.recovery["restored_from"] = str(ckpt)
            self._recover()
        elif ckpt is not None:
            self._load(read_snapshot(ckpt), ckpt)
            self.recovery["restored_from"] = str(ckpt)
        self.recovery["seconds"] = time.perf_counter() - t0

    # -- persistence -------------------------------------------------------------------
    def _check_plan(self, plan_json: dict, where: Path) -> None:
        if ShardingPlan.model_validate(plan_json) != self.plan:
            raise ValueError(
                f"{where}: saved with a different sharding plan ({plan_json.get('num_shards')} shards over "
                f"{len(plan_json.get('assignment', ()))} buckets) than this shard's ({self.plan.num_shards} shards "
                f"over {self.plan.num_buckets} buckets); rows would sit on the wrong shards"
            )

    def _load(self, st: ShardState, where: Path) -> None:
        self._check_plan(st.plan, where)
        if st.shard_index != self.shard_index:
            raise ValueError(f"{where}: snapshot of shard {st.shard_index}, this is shard {self.shard_index}")
        for name, ts in st.tables.items():
            if name not in self.tables:
                raise ValueError(f"{where}: table {name!r} is not configured (ps.tables: {sorted(self.tables)})")
            self.tables[name].load(ts)
        self.version, self._lsn = st.version, st.lsn
        self.high_water = dict(st.high_water)
        self.seen = {}
        self._record_history(st.seen_users, st.seen_items)

    def _recover(self) -> None:
        store = self._store
        st = store.latest_snapshot()
        if st is not None:
            self._load(st, store.root)
            self.recovery["snapshot_lsn"] = st.lsn
        for rec in store.records_after(self._lsn):
            self._replay(rec)
        if st is None:
            # A first snapshot right away records the plan, so a later start with another
            # plan is refused before any log is replayed into the wrong shards.
            store.snapshot(self._capture())
        else:
            store.start_segment(self._lsn)

    def _replay(self, rec: LogRecord) -> None:
        if rec.kind == "expire":
            self._expire(rec.now)
            self._lsn += 1
        elif rec.kind == "push":
            if rec.version != self.version + 1:
                raise RuntimeError(f"push log record {rec.lsn}: version {rec.version} does not follow {self.version}")
            prepared = [(self._table(name), ids, grads) for name, ids, grads in rec.updates]
            self._apply_push(rec.producer, rec.seq, prepared, rec.history, rec.now, rec.expire_at)
            self._since_snapshot += 1
        else:
            raise RuntimeError(f"push log record {rec.lsn}: unknown kind {rec.kind!r}")
        self.recovery["replayed"] += 1

    def _capture(self) -> ShardState:
        users: list[ID] = []
        items: list[ID] = []
        for u, d in self.seen.items():
            users.extend([u] * len(d))
            items.extend(d)
        return ShardState(
            shard_index=self.shard_index,
            version=self.version,
            lsn=self._lsn,
            high_water=dict(self.high_water),
            plan=self.plan.model_dump(mode="json"),
            tables={name: t.capture() for name, t in self.tables.items()},
            seen_users=as_id_array(users),
            seen_items=as_id_array(items),
            created_at=time.time(),
        )

    def snapshot(self, name: str | None = None) -> dict[str, Any]:
        """Write a snapshot now; with ``name`` also the named checkpoint
        ``<checkpoint_root>/<name>/shard-{i}/`` (replacing one of that name).

        Returns ``{"shard", "version", "lsn", "path", "checkpoint", "seconds"}`` (paths
        are None where nothing was written; seconds is the wall time taken). Raises
        ``ValueError`` when there is nowhere to write.
        """
        if self._store is None and name is None:
            raise ValueError("snapshot: this shard has no state_dir; pass a checkpoint name to write one")
        if name is not None and self.checkpoint_root is None:
            raise ValueError("snapshot: a named checkpoint needs a state_dir or checkpoint_root on the shard")
        t0 = time.perf_counter()
        state = self._capture()
        out: dict[str, Any] = {
            "shard": self.shard_index, "version": self.version, "lsn": self._lsn, "path": None, "checkpoint": None,
        }
        if name is not None:
            target = checkpoint_shard_dir(self.checkpoint_root, name, self.shard_index)  # validates the name first
        if self._store is not None:
            out["path"] = str(self._store.snapshot(state))
            self._since_snapshot = 0
        if name is not None:
            out["checkpoint"] = str(write_snapshot_dir(state, target))
        out["seconds"] = time.perf_counter() - t0
        return out

    # -- reads -------------------------------------------------------------------------
    def _table(self, name: str) -> EmbeddingTable:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; tables: {sorted(self.tables)}") from None

    def pull(self, requests: dict[str, np.ndarray], create: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rows of each requested table's IDs, as ``(rows[n, dim], found[n])``.

        With ``create`` absent IDs get their deterministic initial row (and ``found`` is
        True); without it they read as zeros with ``found`` False and nothing is stored.
        """
        out = {}
        for name, ids in requests.items():
            t = self._table(name)
            out[name] = t.pull(_checked_ids(ids, f"pull from {name!r}: id"), create=create, version=self.version)
        return out

    def pull_after(
        self, requests: dict[str, np.ndarray], create: bool, after: PushId
    ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """:meth:`pull`, but only once push ``after`` (or a later one from its producer) is
        applied; None, changing nothing, if it is not yet.

        Ray normally runs one caller's calls in order, but a push retried after a shard
        restart can arrive behind a pull sent after it: this lets the caller notice.
        """
        producer, seq = PushId(*after)
        if self.high_water.get(producer, -1) < seq:
            return None
        return self.pull(requests, create)

    def seen_items(self, user_ids: np.ndarray) -> list[list[ID]]:
        """The most recent items each user interacted with (oldest first)."""
        return [list(self.seen.get(u, ())) for u in as_id_array(user_ids).tolist()]

    def delta(self, tables: list[str], since: int) -> tuple[int, dict[str, TableDelta]]:
        """``(version, {table: TableDelta})``: rows changed and IDs removed after ``since``."""
        out = {}
        for name in tables:
            out[name] = TableDelta(*self._table(name).changed_since(since))
        return self.version, out

    # -- writes ------------------------------------------------------------------------
    def push(
        self,
        push_id: PushId,
        updates: dict[str, tuple[np.ndarray, np.ndarray]],
        history: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[int, bool]:
        """Apply gradients ``{table: (ids, grads[n, dim])}`` once per ``push_id``.

        ``history`` is ``(user_ids, item_ids)`` of the interactions behind the push, kept
        per user for ``exclude_seen``. Duplicate IDs in one push have their gradients
        summed. Returns ``(version, applied)``; ``applied`` is False for a duplicate.
        """
        producer, seq = PushId(*push_id)
        if seq <= self.high_water.get(producer, -1):
            self.duplicates += 1
            return self.version, False
        # Validate everything before touching state, so a bad push changes nothing.
        prepared = []
        for name, (ids, grads) in updates.items():
            t = self._table(name)
            ids = _checked_ids(ids, f"push to {name!r}: id")
            grads = np.array(grads, dtype=np.float32)  # ray.get arrays are read-only; torch needs writable
            if grads.shape != (len(ids), t.cfg.dim):
                raise ValueError(f"push to {name!r}: grads shape {grads.shape} != ({len(ids)}, {t.cfg.dim})")
            if not np.isfinite(grads).all():
                raise ValueError(f"push to {name!r}: grads contain NaN or inf")
            prepared.append((t, ids, grads))
        now = time.time()
        expire_at = now if now - self._last_expire > 1.0 else None
        hist = None
        if history is not None and self.cfg.seen_per_user > 0:
            hist = (_checked_ids(history[0], "history user_id"), _checked_ids(history[1], "history item_id"))
            if len(hist[0]) != len(hist[1]):
                raise ValueError(f"history: {len(hist[0])} user ids but {len(hist[1])} item ids")
        if self._store is not None:
            # Logged before applying: a crash after this line replays the push, and the
            # caller's retry is then recognised as a duplicate.
            self._store.append(
                LogRecord(
                    lsn=self._lsn + 1, kind="push", version=self.version + 1, now=now, producer=producer, seq=int(seq),
                    expire_at=expire_at, updates=[(t.name, ids, grads) for t, ids, grads in prepared], history=hist,
                )
            )
        self._apply_push(producer, seq, prepared, hist, now, expire_at)
        self.push_times.append(now)
        if self._store is not None:
            self._since_snapshot += 1
            if self._since_snapshot >= self.cfg.snapshot_every_pushes:
                self._since_snapshot = 0
                try:
                    self._store.snapshot(self._capture())
                    self.snapshot_error = None
                except OSError as e:
                    # The push is logged and applied: failing it now would make the caller
                    # retry a push that is already durable. The log keeps growing instead.
                    self.snapshot_error = f"{type(e).__name__}: {e}"
                    _log.warning("shard %d: snapshot failed (%s); the push log still covers every push",
                                 self.shard_index, self.snapshot_error)
        return self.version, True

    def _apply_push(
        self,
        producer: str,
        seq: int,
        prepared: list[tuple[EmbeddingTable, np.ndarray, np.ndarray]],
        history: tuple[np.ndarray, np.ndarray] | None,
        now: float,
        expire_at: float | None,
    ) -> None:
        """The state change of one validated push; shared by ``push`` and log replay."""
        new_version = self.version + 1
        for t, ids, grads in prepared:
            t.push(ids, torch.from_numpy(grads), version=new_version, now=now)
        if history is not None:
            self._record_history(*history)
        self.version = new_version
        self.high_water[producer] = seq
        self._lsn += 1
        if expire_at is not None:
            self._expire(expire_at)

    def _record_history(self, users: np.ndarray, items: np.ndarray) -> None:
        if self.cfg.seen_per_user <= 0:
            return
        for user, item in zip(as_id_array(users).tolist(), as_id_array(items).tolist()):
            d = self.seen.get(user)
            if d is None:
                d = self.seen[user] = collections.deque(maxlen=self.cfg.seen_per_user)
            d.append(item)

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Remove rows whose table TTL has passed; returns removed counts per table."""
        now = time.time() if now is None else now
        if self._store is not None and any(t.would_expire(now) for t in self.tables.values()):
            self._store.append(LogRecord(lsn=self._lsn + 1, kind="expire", version=self.version, now=now))
            self._lsn += 1
        return self._expire(now)

    def _expire(self, now: float) -> dict[str, int]:
        self._last_expire = now
        return {name: t.expire(now, self.version) for name, t in self.tables.items()}

    # -- introspection -----------------------------------------------------------------
    def get_plan(self) -> ShardingPlan:
        """The sharding plan this shard was started with."""
        return self.plan

    def table_dims(self) -> dict[str, int]:
        """Row width of each table (floats)."""
        return {name: t.cfg.dim for name, t in self.tables.items()}

    def get_version(self) -> int:
        """Number of pushes applied so far."""
        return self.version

    def high_water_marks(self) -> dict[str, int]:
        """Highest applied push ``seq`` per producer."""
        return dict(self.high_water)

    def stats(self) -> dict[str, Any]:
        """Row counts per table, version, duplicate pushes and recent push rate (pushes/s)."""
        now = time.time()
        recent = [t for t in self.push_times if now - t <= 10.0]
        rate = len(recent) / max(1e-9, min(10.0, now - recent[0])) if len(recent) > 1 else 0.0
        return {
            "shard": self.shard_index,
            "version": self.version,
            "rows": {name: len(t) for name, t in self.tables.items()},
            "duplicate_pushes": self.duplicates,
            "push_rate": rate,
            "users_with_history": len(self.seen),
        }

    def persistence(self) -> dict[str, Any]:
        """Durability status: ``state_dir`` (None when in memory only), log position ``lsn``,
        pushes since the last snapshot, the last automatic snapshot's error (or None), and
        what the last start recovered (``recovery``: snapshot LSN, records replayed,
        checkpoint restored from, seconds taken)."""
        return {
            "state_dir": str(self._store.root) if self._store is not None else None,
            "lsn": self._lsn,
            "pushes_since_snapshot": self._since_snapshot,
            "snapshot_error": self.snapshot_error,
            "recovery": dict(self.recovery),
        }

    def cpu_seconds(self) -> float:
        """CPU time (user + system, seconds) this shard's process has used so far."""
        return time.process_time()

    def pid(self) -> int:
        """Operating-system process ID of the shard (for fault-injection tests)."""
        return os.getpid()

    def ping(self) -> int:
        """Liveness probe; returns the shard index."""
        return self.shard_index
