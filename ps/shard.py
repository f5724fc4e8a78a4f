"""One parameter-server shard: the rows of the buckets it owns, their optimizer state and
lifecycle, users' recent items, a version counter and exactly-once pushes.

``PSShard`` is a plain class; ``ps.client.start_shards`` wraps it with ``ray.remote``.
Ray runs an actor's methods one at a time, so no locking is needed here (the one
background thread writes snapshot files from a captured copy and touches nothing else).

IDs arrive as their 64-bit keys (``ps.ids.id_keys``); a push also carries the IDs as
given for the rows it may create. Tables that ``follow`` another (``item_bias`` follows
``item``) hold rows for exactly the IDs their leader holds: the leader's admission,
``max_rows`` eviction and TTL decide for all of them.

With a ``state_dir`` the shard is crash-consistent: every applied push (and every other
state change) is appended to a log before it returns, snapshots are written every
``cfg.snapshot_every_pushes`` pushes off the push path, and a new shard on the same
directory (a Ray restart re-runs ``__init__``) loads the newest snapshot and replays
the log, arriving at bitwise the state it had acknowledged. The file formats live in
``ps.persist``.

Readers that mirror tables (Serve replicas, trainers' negative catalogues) sync with
:meth:`PSShard.delta` under a name; a removed ID's tombstone is kept until every reader
heard from within ``cfg.reader_timeout_s`` has synced past it (and at most
``cfg.max_tombstones``), and a reader further behind gets a full resync, as does one that
synced from an earlier process of the shard (``Delta.cursor``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import operator
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ps.config import PSConfig
from ps.ids import as_id_array, validate_id
from ps.lazy import torch
from ps.persist import (
    LogRecord,
    ShardState,
    ShardStore,
    TableUpdate,
    checkpoint_shard_dir,
    read_snapshot,
    write_snapshot_dir,
)
from ps.plan import ShardingPlan
from ps.recent import RecentItems, RowlessSweep
from ps.table import EmbeddingTable, PushOutcome

__all__ = ["Delta", "PSShard", "PushId", "RankContext", "RankContexts", "TableDelta", "TableUpdate"]

_log = logging.getLogger(__name__)

_PUSH_RING = 65_536  # recent pushes whose (producer, seq) a row's version can be traced to


class PushId(NamedTuple):
    """Identity of a push: ``seq`` increases per ``producer`` (a trainer incarnation-free name).

    A shard applies a push only if ``seq`` is above the highest it has applied from that
    producer, so a re-sent push (after a trainer restart or a retried call) is a no-op.
    """

    producer: str
    seq: int


class TableDelta(NamedTuple):
    """Rows of one table changed after a version, and keys removed (expired, evicted) after it."""

    keys: np.ndarray  # uint64 [n]
    ids: np.ndarray  # [n] IDs as given
    rows: np.ndarray  # float32 [n, dim]
    removed: np.ndarray  # uint64 keys


class Delta(NamedTuple):
    """What a reader needs to bring its mirror of some tables up to ``version``."""

    version: int
    tables: dict[str, TableDelta]
    full: bool  # the reader was too far behind: drop everything and take these rows as the whole table
    high_water: dict[str, int]  # highest seq applied per producer, at ``version``
    # Where this answer leaves its reader in the shard's history: (shard process, tombstones
    # pruned so far per table); pass it back with ``version`` as the next ``since`` (PSShard.delta).
    cursor: tuple[str, tuple[tuple[str, int], ...]] | None = None


class RankContext(NamedTuple):
    """What ranking needs from a user's shard, in one call."""

    row: np.ndarray | None  # float32 [dim], None for a user without a row
    # (producer, seq) of the push that last changed the row, if still known; after a restart,
    # for a row loaded from the snapshot, ((producer, seq), ...): every push the snapshot held
    pushed_by: tuple[str, int] | tuple[tuple[str, int], ...] | None
    version: int  # the shard's version when read
    recent: np.ndarray  # uint64 item keys of the user's recent items, oldest first


class RankContexts(NamedTuple):
    """Several users' :class:`RankContext` in a few arrays (what crosses Ray for a batch)."""

    rows: np.ndarray  # float32 [n, dim]: each user's row, zeros where ``found`` is False
    found: np.ndarray  # bool [n]: the user has a row
    pushed_by: list[tuple[str, int] | tuple[tuple[str, int], ...] | None]  # per user, as in RankContext
    version: int  # the shard's version when read
    recent: np.ndarray  # uint64 [m]: every user's recent item keys, one user after another, oldest first
    recent_ends: np.ndarray  # int64 [n]: user j's are ``recent[recent_ends[j-1]:recent_ends[j]]``

    def unpack(self) -> list[RankContext]:
        """One :class:`RankContext` per user, in order (rows and recent items are views, no copies)."""
        starts = np.concatenate([[0], self.recent_ends[:-1]]).tolist()
        return [RankContext(self.rows[j] if ok else None, p, self.version, self.recent[a:b])
                for j, (ok, p, a, b) in enumerate(zip(self.found.tolist(), self.pushed_by, starts,
                                                      self.recent_ends.tolist()))]


def _keys(values: Any, field: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype != np.uint64:
        raise ValueError(f"{field}: keys must be a uint64 array, got {arr.dtype}")
    return arr.reshape(-1)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor without a copy. A ``ray.get`` array is read-only; the push path
    only reads gradients, so torch's warning about that does not apply."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _checked_ids(ids: Any, field: str) -> np.ndarray:
    """IDs as an array, ValueError naming ``field`` for any that is not an int64 or str ID."""
    arr = as_id_array(ids)
    if arr.dtype == object:
        for x in arr.tolist():
            validate_id(x, field)
    return arr


class PSShard:
    """Holds the rows of the buckets ``plan`` assigns to ``shard_index``.

    Methods take and return numpy arrays: keys ``uint64``, rows ``float32``, IDs int64
    or object arrays as produced by ``ps.ids.as_id_array``.

    ``state_dir`` (a local directory) makes the shard durable: it recovers whatever
    the directory holds, logs every state change before acknowledging it and snapshots
    every ``cfg.snapshot_every_pushes`` pushes. Without it the shard lives in memory only.

    ``restore_from`` is a named checkpoint directory (``<root>/<name>``, holding
    ``shard-{i}/``) to start from. With a ``state_dir`` the checkpoint replaces the
    directory's state once per ``restore_token``: a Ray restart re-runs ``__init__``
    with the same token and then recovers its own later state instead of going back
    to the checkpoint. ``restore_token`` defaults to the checkpoint path.

    ``checkpoint_root`` is where ``snapshot(name)`` writes named checkpoints; it
    defaults to ``<parent of state_dir>/checkpoints``.

    Raises:
        ValueError: ``shard_index`` is outside the plan, ``state_dir`` is a URI, or the state
            found (or restored) was written with another plan, shard or table layout, or is
            damaged (``ps.persist``).
        FileNotFoundError: ``restore_from`` has no checkpoint of this shard.
        RuntimeError: another process holds ``state_dir``'s lock for 30 s, snapshots exist
            but none can be read, or the push log has a gap or a record out of order.
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
        self.followers: dict[str, list[str]] = collections.defaultdict(list)
        for name in cfg.tables:
            if cfg.leader_of(name) != name:
                self.followers[cfg.leader_of(name)].append(name)
        self.recent = RecentItems(cfg.seen_per_user)
        self.high_water: dict[str, int] = {}
        self.readers: dict[str, tuple[int, float]] = {}  # reader name -> (since it last asked from, unix s)
        # Versions only mean something within one process's history: a restart (empty, or from
        # an older snapshot or checkpoint) may reuse them for other states, so readers resync fully.
        self.epoch = uuid.uuid4().hex
        # (version, pushes) of the state loaded at start: its rows' pushes are not traced, so a
        # row changed at or before that version is attributed to every push the state held.
        self._untraced: tuple[int, tuple[tuple[str, int], ...]] | None = None
        self._push_versions: collections.deque[int] = collections.deque()
        self._push_at: dict[int, tuple[str, int]] = {}
        self.push_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.duplicates = 0
        self._last_expire = time.time()
        # Only a user table with a lifecycle can turn users away for good (see _sweep_recent).
        self._sweep = (RowlessSweep(cfg.recent_without_row_s, self._last_expire)
                       if cfg.recent_follows is not None and cfg.table(cfg.recent_follows).has_lifecycle else None)
        self._lsn = 0  # logged state changes so far
        self._since_snapshot = 0  # log records (pushes, recent items, ...) since the last snapshot
        self._store: ShardStore | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writing: concurrent.futures.Future | None = None
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
                self._check_fits(seed, ckpt)  # before the directory's own state is replaced
                self._store.reset_from(seed, ckpt, token)
                self.recovery["restored_from"] = str(ckpt)
            self._recover()
        elif ckpt is not None:
            self._load(read_snapshot(ckpt), ckpt)
            self.recovery["restored_from"] = str(ckpt)
        for t in self.tables.values():
            t.reset_lifecycle()  # the replay's creations and evictions happened before the restart
        self.recovery["seconds"] = time.perf_counter() - t0

    # -- persistence -------------------------------------------------------------------
    def _check_plan(self, plan_json: dict, where: Path) -> None:
        if (problem := self.plan.saved_plan_problem(plan_json)) is not None:
            raise ValueError(f"{where}: {problem}")

    def _check_fits(self, st: ShardState, where: Path) -> None:
        """Raise ``ValueError`` (naming ``where``) unless ``st`` loads into this shard whole: its
        plan and index, and every table configured with room and shapes for its rows. Checked
        before anything is loaded or replaced, so a misfit leaves the shard's state as it was."""
        self._check_plan(st.plan, where)
        if st.shard_index != self.shard_index:
            raise ValueError(f"{where}: snapshot of shard {st.shard_index}, this is shard {self.shard_index}")
        for name, ts in st.tables.items():
            if name not in self.tables:
                raise ValueError(f"{where}: table {name!r} is not configured (ps.tables: {sorted(self.tables)})")
            if (problem := self.tables[name].load_problem(ts)) is not None:
                raise ValueError(f"{where}: {problem}")

    def _load(self, st: ShardState, where: Path) -> None:
        self._check_fits(st, where)
        for name, ts in st.tables.items():
            self.tables[name].load(ts)
        self.version, self._lsn = st.version, st.lsn
        self.high_water = dict(st.high_water)
        self._untraced = (self.version, tuple(sorted(self.high_water.items())))
        self.recent.load(*st.recent)

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
        elif rec.kind == "recent":
            self.recent.record(*rec.recent)
        elif rec.kind == "forget":
            self.recent.forget_items(rec.forget)
        elif rec.kind == "forget_users":
            self.recent.forget_users(rec.forget)
        elif rec.kind == "push":
            if rec.version != self.version + 1:
                raise RuntimeError(f"push log record {rec.lsn}: version {rec.version} does not follow {self.version}")
            self._apply_push(rec.producer, rec.seq, rec.updates, rec.recent, rec.now, rec.expire_at)
        else:
            raise RuntimeError(f"push log record {rec.lsn}: unknown kind {rec.kind!r}")
        self._since_snapshot += 1
        self._lsn += 1
        self.recovery["replayed"] += 1

    def _log(self, rec: LogRecord) -> None:
        """Append ``rec`` (taking the next LSN) before the change it describes is applied:
        a crash after this replays it, and the caller's retry is then a duplicate."""
        if self._store is not None:
            self._store.append(rec)
            self._since_snapshot += 1

    def _logged(self) -> None:
        """After a logged call has applied its records: start a snapshot once
        ``snapshot_every_pushes`` records have been logged since the last one. Every kind
        counts, not only pushes: with the trainers stopped, ``/events`` still logs users'
        recent items, and the log (and a restart's replay) grew without bound."""
        if self._store is None:
            return
        if self._writing is not None and self._writing.done():
            self._collect_writer()
        if self._since_snapshot >= self.cfg.snapshot_every_pushes:
            self._snapshot_in_background()

    def _capture(self) -> ShardState:
        return ShardState(
            shard_index=self.shard_index,
            version=self.version,
            lsn=self._lsn,
            high_water=dict(self.high_water),
            plan=self.plan.model_dump(mode="json"),
            tables={name: t.capture() for name, t in self.tables.items()},
            recent=self.recent.capture(),
            created_at=time.time(),
        )

    def _wait_for_writer(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    def _snapshot_in_background(self) -> None:
        """Capture now (copies), roll the log to a new segment, and write the snapshot
        files in a thread so the pushes after this one are not held up by the write."""
        if self._writing is not None:  # one at a time; a write slower than the interval holds pushes back
            self._collect_writer()
        state = self._capture()
        self._store.start_segment(state.lsn)
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"shard-{self.shard_index}-snap")
        self._writing = self._writer.submit(self._store.publish, state)
        self._since_snapshot = 0

    def _collect_writer(self) -> None:
        try:
            self._writing.result()
            self.snapshot_error = None
        except OSError as e:
            # The pushes are logged and applied: the log keeps covering them until a snapshot works.
            self.snapshot_error = f"{type(e).__name__}: {e}"
            _log.warning("shard %d: snapshot failed (%s); the push log still covers every push",
                         self.shard_index, self.snapshot_error)
        self._writing = None

    def wait_for_snapshots(self) -> str | None:
        """Wait until a snapshot being written in the background is done; returns the last
        automatic snapshot's error (None when it worked)."""
        if self._writing is not None:
            self._collect_writer()
        return self.snapshot_error

    def snapshot(self, name: str | None = None) -> dict[str, Any]:
        """Write a snapshot now; with ``name`` also the named checkpoint
        ``<checkpoint_root>/<name>/shard-{i}/`` (replacing one of that name).

        Returns ``{"shard", "version", "lsn", "path", "checkpoint", "seconds"}`` (paths
        are None where nothing was written; seconds is the wall time taken).

        Raises:
            ValueError: there is nowhere to write, or ``name`` is not a valid checkpoint name.
        """
        if self._store is None and name is None:
            raise ValueError("snapshot: this shard has no state_dir; pass a checkpoint name to write one")
        if name is not None and self.checkpoint_root is None:
            raise ValueError("snapshot: a named checkpoint needs a state_dir or checkpoint_root on the shard")
        t0 = time.perf_counter()
        if name is not None:
            target = checkpoint_shard_dir(self.checkpoint_root, name, self.shard_index)  # validates the name first
        if self._writing is not None:
            self._collect_writer()
        state = self._capture()
        out: dict[str, Any] = {
            "shard": self.shard_index, "version": self.version, "lsn": self._lsn, "path": None, "checkpoint": None,
        }
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

    def pull(self, requests: dict[str, np.ndarray], initial: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Rows of each requested table's keys, as ``(rows float32 [n, dim], found bool [n])``.

        A key without a row reads as the row a push would create (``initial``: the
        deterministic initial row) or as zeros; ``found`` is False and nothing is stored.

        Raises:
            KeyError: an unknown table.
            ValueError: keys that are not ``uint64``.
        """
        return {name: self._table(name).pull(_keys(keys, f"pull from {name!r}"), initial=initial)
                for name, keys in requests.items()}

    def present(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` (``uint64 [n]``) have a row in ``table`` (``bool [n]``): a pull's
        ``found`` without the rows.

        Raises:
            KeyError: an unknown table.
            ValueError: keys that are not ``uint64``.
        """
        return self._table(table).lookup(_keys(keys, f"present in {table!r}")) >= 0

    def pull_after(
        self, requests: dict[str, np.ndarray], initial: bool, after: PushId
    ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """:meth:`pull`, but only once push ``after`` (or a later one from its producer) is
        applied; None, changing nothing, if it is not yet.

        Ray normally runs one caller's calls in order, but a push retried after a shard
        restart can arrive behind a pull sent after it: this lets the caller notice.

        Raises:
            KeyError, ValueError: as :meth:`pull` (only once ``after`` is applied).
        """
        producer, seq = PushId(*after)
        if self.high_water.get(producer, -1) < seq:
            return None
        return self.pull(requests, initial)

    def rank_context(self, table: str, user_key: int, recent: bool = True) -> RankContext:
        """The user's row in ``table`` (``float32 [dim]``, None without one), the push that last
        changed it (when it is among the last 65,536), and the user's recent item keys
        (``uint64``, with ``recent``).

        Raises:
            KeyError: an unknown table.
        """
        return self.rank_contexts(table, np.asarray([user_key], np.uint64), recent).unpack()[0]

    def rank_contexts(self, table: str, user_keys: np.ndarray, recent: bool = True) -> RankContexts:
        """:meth:`rank_context` of several users (``uint64 [n]`` keys), in the order given, packed
        into a few arrays: one call for a batch of ``/rank`` requests (an actor call costs ~1 ms;
        a context ~10 us, and each array sent costs more than that).

        Raises:
            KeyError: an unknown table.
            ValueError: keys that are not ``uint64``.
        """
        t = self._table(table)
        keys = _keys(user_keys, "user_keys")
        slots = t.lookup(keys)
        found = slots >= 0
        rows = np.zeros((len(keys), t.cfg.dim), np.float32)
        pushed_by: list[tuple[str, int] | None] = [None] * len(keys)
        if found.any():
            rows[found] = t.rows[torch.from_numpy(slots[found])].numpy()
            for j, version in zip(np.flatnonzero(found).tolist(), t.changed_at[slots[found]].tolist()):
                pushed_by[j] = self._pushed_by(version)
        lists = self.recent.lists(keys) if recent else []
        flat = np.concatenate(lists) if lists else np.empty(0, np.uint64)
        ends = np.cumsum([len(x) for x in lists], dtype=np.int64) if lists else np.zeros(len(keys), np.int64)
        return RankContexts(rows, found, pushed_by, self.version, flat.astype(np.uint64, copy=False), ends)

    def _pushed_by(self, version: int) -> tuple[str, int] | tuple[tuple[str, int], ...] | None:
        """The push that made ``version``, or None when it is older than the ring (long synced)."""
        got = self._push_at.get(version)
        if got is None and self._untraced is not None and self.version - _PUSH_RING < version <= self._untraced[0]:
            # Recent, but applied before this process started: None would pass for long synced.
            return self._untraced[1]
        return got

    def recent_items(self, user_keys: np.ndarray) -> list[np.ndarray]:
        """Each user's recent item keys (``uint64 [k]`` each, oldest first) for ``user_keys``
        (``uint64 [n]``), in the order given."""
        return self.recent.lists(np.asarray(user_keys, np.uint64))

    def _register(self, reader: str | None, since: int) -> None:
        now = time.time()
        if reader is not None:
            self.readers[reader] = (int(since), now)
        alive = [s for s, seen in self.readers.values() if seen >= now - self.cfg.reader_timeout_s]
        self.readers = {r: v for r, v in self.readers.items() if v[1] >= now - self.cfg.reader_timeout_s}
        below = min(alive) if alive else self.version + 1
        for t in self.tables.values():
            t.prune_tombstones(below, self.cfg.max_tombstones)

    def _must_resync(self, t: EmbeddingTable, since: int, cursor: tuple | None) -> bool:
        """Whether a reader at ``since`` (with the ``Delta.cursor`` that came with it, if known)
        cannot be brought up to date from tombstones: it synced from another process of this
        shard (a restart), this shard has not reached ``since`` (it went back), or tombstones
        after ``since`` were pruned since its answer."""
        if (cursor is not None and cursor[0] != self.epoch) or since > self.version:
            return True
        if since <= 0 or since >= t.pruned_below:
            return False
        # Nothing pruned since the reader's answer at ``since``: it had every removal then and
        # every later one is kept, even if tombstones of ``since`` itself went before that
        # answer (else after a burst beyond max_tombstones an idle shard resyncs it every time).
        return cursor is None or dict(cursor[1]).get(t.name) != t.pruned_count

    def delta(self, tables: list[str], since: int, reader: str | None = None, cursor: tuple | None = None) -> Delta:
        """What changed in ``tables`` after version ``since``: changed rows and removed keys,
        or every live row (``full``) when tombstones the reader needs were already pruned.

        ``reader`` names the caller, so tombstones it has not seen yet are kept for it (for
        ``cfg.reader_timeout_s`` seconds after its last call). ``cursor`` is the
        ``Delta.cursor`` that came with ``since`` (None: unknown): from another process of this
        shard (restarted, restored), ``since`` names no state of it and the answer is full.

        Raises:
            KeyError: an unknown table.
        """
        ts = [self._table(name) for name in tables]
        full = any(self._must_resync(t, since, cursor) for t in ts)
        out = {}
        for t in ts:
            keys, ids, rows, removed = t.changed_since(-1 if full else since)
            out[t.name] = TableDelta(keys, ids, rows, np.empty(0, np.uint64) if full else removed)
        self._register(reader, since)  # its pruning takes only tombstones below since or just sent
        return Delta(self.version, out, full, dict(self.high_water),
                     (self.epoch, tuple((t.name, t.pruned_count) for t in ts)))

    def removed(self, table: str, since: int, reader: str | None = None) -> tuple[int, np.ndarray, bool]:
        """``(version, removed keys, full)``: keys (``uint64 [k]``) of ``table`` removed at or
        after ``since``; ``full`` when tombstones the reader needs were already pruned, or
        ``since`` is past this shard's version (it restarted behind the reader; then use
        :meth:`live_keys`).

        Raises:
            KeyError: an unknown table.
        """
        t = self._table(table)
        full = self._must_resync(t, since, None)
        out = (self.version, np.empty(0, np.uint64) if full else t.removed_since(since), full)
        self._register(reader, since)
        return out

    def live_keys(self, table: str) -> tuple[int, np.ndarray]:
        """``(version, keys uint64 [k])`` of every row of ``table``.

        Raises:
            KeyError: an unknown table.
        """
        t = self._table(table)
        return self.version, t.keys[t.live_slots()]

    # -- writes ------------------------------------------------------------------------
    def _prepare(self, updates: dict[str, Any]) -> list[TableUpdate]:
        """Validate a push's updates before anything changes (a bad push changes nothing);
        leaders first, so their followers see which IDs they now hold."""
        prepared = []
        for name, u in updates.items():
            u = u if isinstance(u, TableUpdate) else TableUpdate(name, *u)
            t = self._table(name)
            keys = _keys(u.keys, f"push to {name!r}")
            grads = np.asarray(u.grads, dtype=np.float32)  # only read: a read-only ray.get array is fine
            if grads.shape != (len(keys), t.dim):
                raise ValueError(f"push to {name!r}: grads shape {grads.shape} != ({len(keys)}, {t.dim})")
            if not np.isfinite(grads).all():
                raise ValueError(f"push to {name!r}: grads contain NaN or inf")
            ids = _checked_ids(u.ids, f"push to {name!r}: id") if u.ids is not None else None
            create = np.asarray(u.create, bool) if u.create is not None else None
            for what, arr in (("ids", ids), ("create", create)):
                if arr is not None and len(arr) != len(keys):
                    raise ValueError(f"push to {name!r}: {len(arr)} {what} for {len(keys)} keys")
            prepared.append(TableUpdate(name, keys, grads, ids, create))
        return sorted(prepared, key=lambda u: self.cfg.leader_of(u.table) != u.table)

    def push(
        self,
        push_id: PushId,
        updates: dict[str, TableUpdate | tuple],
        recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[int, bool]:
        """Apply ``updates`` (``{table: TableUpdate}``, or ``(keys, grads, ids, create)``
        tuples) once per ``push_id``.

        ``keys`` are ``uint64 [n]``, ``grads`` ``float32 [n, dim]``, ``create`` ``bool [n]``.
        ``recent`` is ``(user keys uint64 [m], item keys uint64 [m], offsets int64 [m])`` of
        the interactions behind the push, merged into the users' recent items (idempotent by offset). Returns
        ``(version, applied)``; ``applied`` is False for a duplicate.

        Raises:
            ValueError, KeyError: a malformed push (a ``seq`` that is not an int, unknown table,
                wrong shapes, non-finite gradients, keys not ``uint64``, invalid IDs, ``recent``
                arrays of different lengths); nothing changes.
        """
        producer, seq = PushId(*push_id)
        try:
            seq = operator.index(seq)  # a numpy int kept in high_water would fail every snapshot's JSON
        except TypeError:
            raise ValueError(f"push_id: seq must be an int, got {type(seq).__name__} {seq!r:.40}") from None
        if seq <= self.high_water.get(producer, -1):
            self.duplicates += 1
            return self.version, False
        prepared = self._prepare(updates)
        rec = None
        if recent is not None:
            rec = tuple(np.asarray(a, t) for a, t in zip(recent, (np.uint64, np.uint64, np.int64)))
            if not len(rec[0]) == len(rec[1]) == len(rec[2]):
                raise ValueError(f"recent: {len(rec[0])} users, {len(rec[1])} items, {len(rec[2])} offsets")
        now = time.time()
        expire_at = now if now - self._last_expire > 1.0 else None
        self._log(LogRecord(lsn=self._lsn + 1, kind="push", version=self.version + 1, now=now, producer=producer,
                            seq=int(seq), expire_at=expire_at, updates=prepared, recent=rec))
        self._apply_push(producer, seq, prepared, rec, now, expire_at)
        self._lsn += 1
        if rec is not None:
            self._note_recorded(rec[0])
        self._sweep_recent(now)
        self.push_times.append(now)
        self._logged()
        return self.version, True

    def push_pull(
        self,
        push_id: PushId,
        updates: dict[str, TableUpdate | tuple],
        recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        requests: dict[str, np.ndarray],
        initial: bool = True,
    ) -> tuple[tuple[int, bool], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """:meth:`push`, then :meth:`pull` of ``requests``: ``((version, applied), rows)``.

        One call where a trainer would otherwise push and then pull the rows of its next
        pass (an actor call costs ~1 ms of each side's CPU). The rows reflect the push even
        when Ray retries the call after a restart (the push is then a recognised duplicate).

        Raises:
            ValueError, KeyError: as :meth:`push` (nothing changes) or :meth:`pull`.
        """
        return self.push(push_id, updates, recent), self.pull(requests, initial)

    def _apply_push(
        self,
        producer: str,
        seq: int,
        updates: list[TableUpdate],
        recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        now: float,
        expire_at: float | None,
    ) -> None:
        """The state change of one validated push; shared by ``push`` and log replay."""
        new_version = self.version + 1
        present: dict[str, tuple[np.ndarray, PushOutcome]] = {}  # leader -> (keys pushed, its outcome)
        for u in updates:
            t = self.tables[u.table]
            leader = self.cfg.leader_of(u.table)
            if leader != u.table:
                # A follower pushed with its leader's very keys (item_bias with item) learns
                # from the leader's push which have rows, and its keys' unique order: no
                # second lookup or sort.
                done = present.get(leader)
                unique = None
                if done is not None and (done[0] is u.keys or np.array_equal(done[0], u.keys)):
                    allowed, unique = done[1].present, done[1].unique
                else:
                    allowed = self.tables[leader].lookup(u.keys) >= 0
                t.push(u.keys, _tensor(u.grads), ids=u.ids, create=u.create, version=new_version, now=now,
                       allowed=allowed, unique=unique, leader=self.tables[leader])
                continue
            outcome = t.push(u.keys, _tensor(u.grads), ids=u.ids, create=u.create, version=new_version, now=now)
            if outcome.present is not None:
                present[u.table] = (u.keys, outcome)
            if len(outcome.removed):
                self._removed(u.table, outcome.removed, new_version)
        if recent is not None:
            self.recent.record(recent[0], recent[1], recent[2])
        self.version = new_version
        self.high_water[producer] = seq
        self._push_versions.append(new_version)
        self._push_at[new_version] = (producer, int(seq))
        if len(self._push_versions) > _PUSH_RING:
            del self._push_at[self._push_versions.popleft()]
        if expire_at is not None:
            self._expire(expire_at)
        self._bound_tombstones()

    def _bound_tombstones(self) -> None:
        """Hold each table to ``cfg.max_tombstones`` as removals happen, not only when a
        reader calls: a shard nobody syncs from would otherwise keep every removal. A
        function of the tables alone, so a log replay prunes the same."""
        cap = self.cfg.max_tombstones
        for t in self.tables.values():
            if t.tombstones() > cap:
                t.prune_tombstones(0, cap)

    def _removed(self, leader: str, keys: np.ndarray, version: int) -> None:
        """A leader table removed ``keys``: so do its followers, and the users' recent items."""
        for f in self.followers.get(leader, ()):
            self.tables[f].remove(keys, version)
        if leader == self.cfg.recent_follows:
            self.recent.forget_users(keys)

    def record_recent(self, users: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> int:
        """Merge ``(user keys, item keys, offsets)`` (``uint64 [n]``, ``uint64 [n]``, ``int64 [n]``)
        into the users' recent items (the ingest path: right after the events are durable). Idempotent by offset; logged, so it
        survives a restart. Returns the entries added.

        Raises:
            ValueError: the arrays differ in length.
        """
        users, items = np.asarray(users, np.uint64), np.asarray(items, np.uint64)
        offsets = np.asarray(offsets, np.int64)
        if not len(users) == len(items) == len(offsets):
            raise ValueError(f"record_recent: {len(users)} users, {len(items)} items, {len(offsets)} offsets")
        if not len(users):
            return 0
        now = time.time()
        self._log(LogRecord(lsn=self._lsn + 1, kind="recent", version=self.version, now=now,
                            recent=(users, items, offsets)))
        self._lsn += 1
        added = self.recent.record(users, items, offsets)
        self._note_recorded(users)
        self._sweep_recent(now)
        self._logged()
        return added

    def _note_recorded(self, users: np.ndarray) -> None:
        if self._sweep is not None:
            self._sweep.note(users)

    def _sweep_recent(self, now: float) -> None:
        """Drop the recent items of users who have no row in ``recent_follows`` and had no event
        recorded since the previous sweep (``recent_without_row_s`` apart); logged.

        Removing a user's row drops their recent items, but a user who never gets one (not
        admitted, or turned away by a full table) would keep them forever (:class:`RowlessSweep`).
        """
        if self._sweep is None:
            return
        table = self.tables[self.cfg.recent_follows]
        drop = self._sweep.sweep(now, self.recent.users, lambda users: table.lookup(users) < 0)
        if drop is not None and len(drop):
            self._log(LogRecord(lsn=self._lsn + 1, kind="forget_users", version=self.version, now=now, forget=drop))
            self._lsn += 1
            self.recent.forget_users(drop)

    def forget_items(self, items: np.ndarray) -> int:
        """Drop the item keys ``items`` (``uint64 [n]``; removed from their tables) from every user's recent
        items on this shard; logged. Returns the entries dropped."""
        items = np.asarray(items, np.uint64)
        if not len(items):
            return 0
        self._log(LogRecord(lsn=self._lsn + 1, kind="forget", version=self.version, now=time.time(), forget=items))
        self._lsn += 1
        dropped = self.recent.forget_items(items)
        self._logged()
        return dropped

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Remove IDs whose table TTL has passed at ``now`` (unix seconds; default the current
        time), with their followers' rows; returns removed counts per table."""
        now = time.time() if now is None else now
        if any(t.would_expire(now) for t in self.tables.values()):
            self._log(LogRecord(lsn=self._lsn + 1, kind="expire", version=self.version, now=now))
            self._lsn += 1
        counts = self._expire(now)
        self._sweep_recent(now)
        self._logged()
        return counts

    def _expire(self, now: float) -> dict[str, int]:
        self._last_expire = now
        counts = dict.fromkeys(self.tables, 0)
        for name, t in self.tables.items():
            if self.cfg.leader_of(name) != name:
                continue
            gone = t.expire(now, self.version)
            if len(gone):
                counts[name] = len(gone)
                for f in self.followers.get(name, ()):
                    counts[f] = len(self.tables[f].remove(gone, self.version))
                if name == self.cfg.recent_follows:
                    self.recent.forget_users(gone)
        self._bound_tombstones()
        return counts

    # -- introspection -----------------------------------------------------------------
    def get_plan(self) -> ShardingPlan:
        """The sharding plan this shard was started with."""
        return self.plan

    def table_dims(self) -> dict[str, int]:
        """Row width of each table (floats)."""
        return {name: t.dim for name, t in self.tables.items()}

    def get_version(self) -> int:
        """Number of pushes applied so far."""
        return self.version

    def high_water_marks(self) -> dict[str, int]:
        """Highest applied push ``seq`` per producer."""
        return dict(self.high_water)

    def stats(self) -> dict[str, Any]:
        """Per table ``rows``, ``tombstones``, ``bytes``, ``bytes_per_row`` and the ID
        lifecycle's counts since this shard started (``lifecycle``; ``EmbeddingTable.stats``) (``tables``),
        row counts (``rows``), version, duplicate pushes, recent push rate (pushes/s),
        users with recent items, their entries and bytes, and the readers holding tombstones."""
        now = time.time()
        recent = [t for t in self.push_times if now - t <= 10.0]
        rate = len(recent) / max(1e-9, min(10.0, now - recent[0])) if len(recent) > 1 else 0.0
        tables = {name: t.stats() for name, t in self.tables.items()}
        return {
            "shard": self.shard_index,
            "version": self.version,
            "rows": {name: s["rows"] for name, s in tables.items()},
            "tables": tables,
            "duplicate_pushes": self.duplicates,
            "push_rate": rate,
            "users_with_recent": len(self.recent),
            "recent_entries": self.recent.entries(),
            "recent_bytes": self.recent.nbytes(),
            "readers": {r: {"since": s, "age_s": now - t} for r, (s, t) in self.readers.items()},
        }

    def persistence(self) -> dict[str, Any]:
        """Durability status: ``state_dir`` (None when in memory only), log position ``lsn``,
        log records since the last snapshot, the last automatic snapshot's error (or None), and
        what the last start recovered (``recovery``: snapshot LSN, records replayed,
        checkpoint restored from, seconds taken)."""
        if self._writing is not None and self._writing.done():
            self._collect_writer()
        return {
            "state_dir": str(self._store.root) if self._store is not None else None,
            "lsn": self._lsn,
            "records_since_snapshot": self._since_snapshot,
            "snapshot_in_flight": self._writing is not None,
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
