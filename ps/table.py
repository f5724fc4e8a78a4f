"""The embedding table: a keyed index, rows, optimizer state, and the ID lifecycle
(admission, eviction within ``max_rows``, TTL expiry, tombstones for readers).

One class for every place rows live: a PS shard's tables (:mod:`ps.shard`), the
in-process models of the evaluation's baselines (:mod:`workers.eval.strategies`) and
the benchmark's in-process twin of the trainer (:mod:`bench.train_throughput`). So a
row starts from the same deterministic value, and a push changes it by the same
``ps.optim`` rule, wherever it lives.

Rows are addressed by the IDs' 64-bit keys (``ps.ids.id_keys``) through a vectorised
hash index (:class:`ps.index.KeyIndex`), and sit in dense arrays by *slot*; a removed
row's slot is reused. The ID as given is kept per row for readers that must answer
with it (``/rank`` returns item IDs). Every lifecycle decision is a function of the
table's state and the push alone (scores are versions or counts, ties go to the lower
key), so a shard replaying its log arrives at the same rows. Nothing here touches Ray;
the owner serialises access (a shard actor runs one method at a time).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

from ps import optim
from ps.admission import Admission
from ps.config import EvictionPolicy, InitKind, OptimizerConfig, OptimizerKind, PSConfig, TableConfig
from ps.ids import as_id_array, id_keys, init_rows
from ps.index import KeyIndex, unique_keys
from ps.lazy import torch
from ps.persist import TableState

__all__ = ["LIFECYCLE_COUNTS", "EmbeddingTable", "PushOutcome", "snapshot_problem", "stored_table_problem", "table_seed"]


def table_seed(ps_seed: int, name: str) -> int:
    """The seed of table ``name``'s row initialisation under PS seed ``ps_seed``.

    Mixing in the table name gives two tables different initial rows for one ID.
    """
    return (ps_seed * 1_000_003 + int(id_keys([name])[0])) % (1 << 63)


class PushOutcome(NamedTuple):
    """What a push did to the table's set of IDs."""

    created: np.ndarray  # uint64 keys that got a row
    removed: np.ndarray  # uint64 keys evicted to make room
    dropped: int  # distinct keys whose gradients were dropped: no row, and none created
    present: np.ndarray | None = None  # bool [n]: each pushed key has a row after the push
    unique: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # unique_keys(keys) of the push


def _as_keys(keys: np.ndarray | Any) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.uint64)


LIFECYCLE_COUNTS = ("created", "not_admitted", "evicted", "expired", "removed")
"""The counts of ``EmbeddingTable.stats()["lifecycle"]``."""


def stored_table_problem(name: str, cfg: TableConfig, opt: OptimizerConfig, *, rows: int, dim: int,
                         state_shape: tuple[int, ...], admission_shape: tuple[int, ...] | None = None,
                         optimizer: str | None = None) -> str | None:
    """Why ``rows`` stored rows of table ``name`` (width ``dim``, optimizer state of
    ``state_shape`` per row kept by optimizer kind ``optimizer`` when recorded, an admission
    sketch of ``admission_shape``) cannot be loaded into a table of ``cfg`` and ``opt``, or
    None. One rule for :meth:`EmbeddingTable.load` and for the checks a restore makes from a
    snapshot's metadata before it changes anything."""
    if dim != cfg.dim:
        return f"table {name!r}: stored rows have dim {dim}, ps.tables.{name}.dim is {cfg.dim}"
    want = optim.state_shape(opt.kind, cfg.dim)
    if tuple(state_shape) != tuple(want):
        return (f"table {name!r}: stored optimizer state has shape {tuple(state_shape)} a row, "
                f"optimizer {opt.kind.value!r} needs {tuple(want)}")
    if optimizer is not None and optimizer != opt.kind.value:
        # SGD's momentum and Adagrad's sums have one shape: read as the other's, they are wrong
        # numbers (a negative momentum as a sum of squares turns rows NaN).
        field = f"ps.tables.{name}.optimizer.kind" if cfg.optimizer is not None else "ps.optimizer.kind"
        return (f"table {name!r}: stored optimizer state is {optimizer!r}'s, {field} is {opt.kind.value!r}; "
                "its state cannot be read as another optimizer's")
    if cfg.max_rows is not None and rows > cfg.max_rows:
        return (f"table {name!r}: {rows} stored rows on a shard exceed ps.tables.{name}.max_rows={cfg.max_rows}; "
                "raise it to at least that")
    if cfg.admission is not None and admission_shape is not None:
        sketch = (cfg.admission.sketch_depth, cfg.admission.sketch_width)
        if tuple(admission_shape) != sketch:
            return (f"table {name!r}: stored admission sketch has shape {tuple(admission_shape)}, "
                    f"ps.tables.{name}.admission needs {sketch}")
    return None


def snapshot_problem(meta: dict, cfg: PSConfig, shard_index: int) -> str | None:
    """Why shard ``shard_index`` of a PS configured by ``cfg`` cannot load the shard snapshot
    whose ``meta.json`` is ``meta``: another shard's snapshot, another sharding plan
    (``ps.num_shards``, ``ps.num_buckets``), a table not configured, or
    :func:`stored_table_problem`; None when it loads. Reads no rows.

    Raises:
        ValueError: ``meta`` lacks a field a snapshot's metadata has (a damaged file).
    """
    from ps.plan import ShardingPlan

    try:
        saved_index, plan, tables = int(meta["shard_index"]), meta["plan"], meta["tables"]
        if not isinstance(tables, dict):
            raise TypeError(f"tables is {type(tables).__name__}, not an object")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"incomplete metadata ({type(e).__name__}: {e})") from None
    if saved_index != shard_index:
        return f"a snapshot of shard {saved_index}, where shard {shard_index}'s belongs"
    if (problem := ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards).saved_plan_problem(plan)) is not None:
        return problem
    for name, tm in tables.items():
        if name not in cfg.tables:
            return f"table {name!r} is not configured (ps.tables: {sorted(cfg.tables)})"
        try:
            problem = stored_table_problem(name, cfg.tables[name], cfg.optimizer_for(name), rows=int(tm["rows"]),
                                           dim=int(tm["dim"]), state_shape=tuple(tm["state_shape"]),
                                           admission_shape=tm.get("admission_shape"), optimizer=tm.get("optimizer"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"table {name!r}: incomplete metadata ({type(e).__name__}: {e})") from None
        if problem is not None:
            return problem
    return None


class EmbeddingTable:
    """Rows of one table (``float32 [n, cfg.dim]``), their optimizer state and lifecycle.

    Per live slot it keeps the key, the ID as given, the row, the optimizer state
    (``optim.state_shape(opt.kind, dim)`` floats), ``changed_at`` (the owner's version
    counter at the row's last change, for delta sync), ``touched_at`` (unix seconds of
    the ID's last real interaction, for ``cfg.ttl_s``) and ``score`` (the version of the
    last real interaction for LRU, the number of real interactions for LFU). Keys removed
    by expiry or eviction are kept as ``(version, key)`` tombstones until every reader has
    synced past them (:meth:`prune_tombstones`).

    ``capacity`` is the initial number of slots; the table grows by doubling, but never
    beyond ``cfg.max_rows`` when that is set.
    """

    def __init__(self, name: str, cfg: TableConfig, opt: OptimizerConfig, ps_seed: int, *, capacity: int = 1024):
        self.name, self.cfg, self.opt = name, cfg, opt
        self.seed = table_seed(ps_seed, name)
        self.admission = Admission(cfg.admission, self.seed) if cfg.admission is not None else None
        # What the ID lifecycle did, for operators (a memory budget set too small shows as
        # evictions, an admission bar too high as refusals); counts, not state: never persisted.
        self.reset_lifecycle()
        # The initial rows a pull last computed for keys without a row (sorted keys, rows):
        # the push that follows creates most of those rows, and takes them from here
        # instead of hashing them again (rows are a pure function of table seed and key).
        self._initial: tuple[np.ndarray, np.ndarray] | None = None
        # The last pull's (keys, slots, layout): a trainer pushes the very keys it pulled, so
        # while no row was created or removed in between (``_layout`` unchanged), the push
        # takes their slots from here instead of looking every key up again.
        self._pulled: tuple[np.ndarray, np.ndarray, int] | None = None
        self._layout = 0  # bumped whenever a key gains or loses its slot
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        self._layout += 1
        cfg = self.cfg
        cap = max(1, int(capacity if cfg.max_rows is None else min(capacity, cfg.max_rows)))
        self.index = KeyIndex(cap)
        self.keys = np.zeros(cap, np.uint64)
        self.ids = np.zeros(cap, np.int64)  # becomes an object array once a str ID arrives
        self.rows = torch.zeros((cap, cfg.dim), dtype=torch.float32)
        self.state = torch.zeros((cap, *optim.state_shape(self.opt.kind, cfg.dim)), dtype=torch.float32)
        self.changed_at = np.zeros(cap, np.int64)
        self.touched_at = np.zeros(cap, np.float64)
        self.score = np.zeros(cap, np.float64)
        self.live = np.zeros(cap, bool)
        self._free = np.zeros(0, np.int64)  # slots freed by removals, reused lowest first
        self._top = 0  # slots below this have been used
        self._n = 0
        self._tomb_versions: list[np.ndarray] = []
        self._tomb_keys: list[np.ndarray] = []
        self._tomb_n = 0  # len of the tombstones, kept so the push path can check it cheaply
        self.pruned_below = 0  # tombstones of versions below this are gone
        self.pruned_count = 0  # tombstones pruned so far: unchanged, none a reader had coming went
        self._id_objects_bytes = 0  # the ID objects an object ``ids`` array points at

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        """Row width (floats)."""
        return self.cfg.dim

    # -- reads -------------------------------------------------------------------------
    def initial_rows(self, keys: np.ndarray) -> np.ndarray:
        """The rows ``keys`` start with (``float32 [n, dim]``): a deterministic function of
        (table seed, key), or zeros for ``init: zeros``."""
        keys = _as_keys(keys)
        if self.cfg.init == InitKind.UNIFORM and len(keys):
            known = self._initial
            if known is None:
                return init_rows(keys, seed=self.seed, dim=self.cfg.dim, scale=self.cfg.init_scale)
            ck, cr = known
            pos = np.minimum(np.searchsorted(ck, keys), len(ck) - 1)
            hit = ck[pos] == keys
            if hit.all():
                return cr[pos]
            out = np.empty((len(keys), self.cfg.dim), np.float32)
            out[hit] = cr[pos[hit]]
            out[~hit] = init_rows(keys[~hit], seed=self.seed, dim=self.cfg.dim, scale=self.cfg.init_scale)
            return out
        return np.zeros((len(keys), self.cfg.dim), np.float32)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slots (``int64 [n]``) of ``keys`` (``uint64``); ``-1`` for keys without a row."""
        return self.index.lookup(_as_keys(keys))

    def pull(self, keys: np.ndarray, *, initial: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(rows float32 [n, dim], found bool [n])`` of ``keys`` in the order given.

        A key without a row reads as its initial row (``initial``: what a push would
        create; the table's default row) or as zeros, with ``found`` False. Nothing is stored.
        """
        keys = _as_keys(keys)
        slots = self.lookup(keys)
        self._pulled = (keys, slots, self._layout)
        found = slots >= 0
        if not len(keys):
            return np.empty((0, self.cfg.dim), np.float32), found
        if found.any():
            # One gather of every position (the missing ones read slot 0 and are overwritten
            # below): a third of the cost of gathering the found ones and scattering them.
            rows = self.rows.index_select(0, torch.from_numpy(np.maximum(slots, 0))).numpy()
            if found.all():
                return rows, found
        else:
            rows = np.empty((len(keys), self.cfg.dim), dtype=np.float32)
        missing = ~found
        if initial and self.cfg.init == InitKind.UNIFORM:
            mk = keys[missing]
            mr = init_rows(mk, seed=self.seed, dim=self.cfg.dim, scale=self.cfg.init_scale)
            rows[missing] = mr
            srt = np.argsort(mk, kind="stable")
            self._initial = (mk[srt], mr[srt])
        else:
            rows[missing] = self.initial_rows(keys[missing]) if initial else 0.0
        return rows, found

    def matrix(self) -> np.ndarray:
        """The rows of live slots, in slot order (``float32 [len(self), dim]``; a copy when
        slots were freed)."""
        rows = self.rows[: self._top].numpy()
        return rows if self._n == self._top else rows[self.live[: self._top]]

    def live_slots(self) -> np.ndarray:
        """Slots holding a row, ascending (``int64 [rows]``)."""
        return np.flatnonzero(self.live[: self._top])

    def ids_at(self, slots: np.ndarray) -> np.ndarray:
        """The IDs (as given) at ``slots`` (``int64 [n]``): ``int64 [n]``, or ``object [n]`` once a
        str ID was stored."""
        return self.ids[slots]

    def rows_at(self, slots: np.ndarray) -> torch.Tensor:
        """A copy of the rows at ``slots`` (``float32 [n, dim]``)."""
        return self.rows[torch.from_numpy(np.asarray(slots, dtype=np.int64))]

    def changed_since(self, since: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, ids, rows, removed)``: live rows changed after version ``since`` (``uint64
        [m]`` keys, ``int64``/``object [m]`` IDs, ``float32 [m, dim]`` rows) and the keys
        (``uint64 [r]``) removed at or after it (as far as tombstones reach: see
        :attr:`pruned_below`)."""
        sel = np.flatnonzero(self.live[: self._top] & (self.changed_at[: self._top] > since))
        rows = self.rows[torch.from_numpy(sel)].numpy() if sel.size else np.empty((0, self.cfg.dim), np.float32)
        return self.keys[sel], self.ids[sel], rows, self.removed_since(since)

    def removed_since(self, since: int) -> np.ndarray:
        """Keys (``uint64 [r]``) removed at or after version ``since``, as far as tombstones reach."""
        if not self._tomb_versions:
            return np.empty(0, np.uint64)
        v, k = np.concatenate(self._tomb_versions), np.concatenate(self._tomb_keys)
        return k[v >= since]

    # -- writes ------------------------------------------------------------------------
    def push(
        self,
        keys: np.ndarray,
        grads: torch.Tensor | np.ndarray,
        *,
        ids: np.ndarray | None = None,
        create: np.ndarray | None = None,
        version: int = 0,
        now: float = 0.0,
        allowed: np.ndarray | None = None,
        unique: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        leader: EmbeddingTable | None = None,
    ) -> PushOutcome:
        """One optimizer step on the rows of ``keys`` with ``grads`` (``float32 [n, dim]``).

        ``create`` (``bool [n]``, default all True) marks the entries that are real
        interactions: only they may create their ID's row (subject to admission and
        ``max_rows``), and only they count as a touch for TTL and the eviction score. A
        key without a row whose entries may not create it has its gradient dropped: a
        negative sample or a context item never brings a removed row back. ``ids`` are the
        IDs as given, stored for the rows created, each taken from an entry that may create
        it (default: the keys' bits as int64, for callers that never read IDs back); a push
        log keeps only those entries' IDs, so a replay stores the same ones.
        ``allowed`` (``bool [n]``) overrides who may create, bypassing admission: a table
        that follows another creates exactly the rows its leader has. Rows of a repeated
        key are combined first (``optim.reduce_pushed``). Changed rows count as changed at
        ``version``; touched ones at ``now`` (unix seconds). ``unique`` is
        ``ps.index.unique_keys(keys)`` when the caller has it already (a follower pushed
        with its leader's very keys: the leader's outcome carries it). ``leader`` is the table
        this one follows: the rows ``allowed`` creates take the IDs its rows hold.

        Raises:
            ValueError: ``grads`` is not ``[len(keys), dim]``, or ``ids``/``create`` do not
                have ``len(keys)`` entries (nor ``allowed``).
        """
        keys = _as_keys(keys)
        n = len(keys)
        grads = torch.as_tensor(grads, dtype=torch.float32)
        if tuple(grads.shape) != (n, self.cfg.dim):
            raise ValueError(f"push to {self.name!r}: grads shape {tuple(grads.shape)} != ({n}, {self.cfg.dim})")
        for what, arr in (("ids", ids), ("create", create), ("allowed", allowed)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"push to {self.name!r}: {what} has {len(arr)} entries for {n} keys")
        empty = PushOutcome(np.empty(0, np.uint64), np.empty(0, np.uint64), 0)
        if not n:
            return empty
        uniq, first, inverse = unique_keys(keys) if unique is None else unique
        real = np.ones(len(uniq), bool) if create is None else np.zeros(len(uniq), bool)
        if create is not None:
            real[inverse[np.asarray(create, bool)]] = True
        occurrences = np.bincount(inverse[np.asarray(create, bool)] if create is not None else inverse,
                                  minlength=len(uniq))
        pulled = self._pulled
        if (pulled is not None and pulled[2] == self._layout and len(pulled[0]) == n
                and (pulled[0] is keys or np.array_equal(pulled[0], keys))):
            slots = pulled[1][first]  # the keys this table just answered a pull for: their slots then
        else:
            slots = self.lookup(uniq)
        absent = slots < 0
        created = removed = np.empty(0, np.uint64)
        if allowed is not None:
            may = np.zeros(len(uniq), bool)
            may[inverse[np.asarray(allowed, bool)]] = True
            want = np.flatnonzero(absent & may)
        else:
            want = np.flatnonzero(absent & real)
            if want.size and self.admission is not None:
                admitted = self.admission.admit(uniq[want], occurrences[want])
                self.lifecycle["not_admitted"] += int(len(admitted) - admitted.sum())
                want = want[admitted]
        if want.size:
            new_ids = self._new_ids(uniq[want], want, ids, create, first, inverse, leader)
            # Only this push's real interactions keep their rows: a row pushed here as a
            # negative or context item may be the lowest-scoring one, and shielding it
            # would refuse a real interaction its row (with a small cap, a trainer's
            # negatives cover every row). An evicted negative's gradient is dropped below.
            slots[want], removed = self._create(uniq[want], new_ids, version, keep=slots[~absent & real])
            created = uniq[want][slots[want] >= 0]
            self.lifecycle["created"] += len(created)
            self.lifecycle["evicted"] += len(removed)
            if removed.size:
                slots[np.isin(uniq, removed)] = -1
        ok = slots >= 0
        dropped = int((~ok).sum())
        if len(uniq) == n:  # distinct keys (a trainer's push): nothing to combine, only to reorder
            g = grads.index_select(0, torch.from_numpy(first))
        else:
            g = optim.reduce_pushed(self.opt.kind, grads, torch.from_numpy(inverse), len(uniq))
        if not ok.all():
            g = g[torch.from_numpy(ok)]
        s = slots[ok]
        self.apply_slots(s, g)
        self.changed_at[s] = version
        touch = s[real[ok]]
        self.touched_at[touch] = now
        if self.cfg.eviction is EvictionPolicy.LFU:
            self.score[touch] += occurrences[ok][real[ok]]
        else:
            self.score[touch] = version
        return PushOutcome(created, removed, dropped, ok[inverse], (uniq, first, inverse))

    def _new_ids(self, keys: np.ndarray, want: np.ndarray, ids: np.ndarray | None, create: np.ndarray | None,
                 first: np.ndarray, inverse: np.ndarray, leader: EmbeddingTable | None) -> np.ndarray:
        """IDs for the rows of ``keys`` (unique positions ``want``) that a push creates."""
        if leader is not None:
            return leader.ids_at(leader.lookup(keys))  # a follower creates only rows its leader holds
        if ids is None:
            return keys.view(np.int64)
        src = first
        if create is not None and len(inverse) > len(first):
            # A repeated key's first entry may be one that cannot create (a negative sample):
            # the log has no ID for it, so take the first entry that can.
            at = np.flatnonzero(np.asarray(create, bool))
            src = np.full(len(first), len(inverse), np.int64)
            np.minimum.at(src, inverse[at], at)
            src = np.where(src < len(inverse), src, first)  # none can (``allowed`` creates it)
        return as_id_array(ids)[src[want]]

    def apply_slots(self, slots: np.ndarray, grads: torch.Tensor) -> None:
        """One optimizer step on the rows at distinct ``slots`` (``int64 [n]``) with ``grads``
        (``float32 [n, dim]`` tensor); the caller checks the shapes."""
        u = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        if self.opt.kind is OptimizerKind.ROWWISE_ADAGRAD and grads.dtype == torch.float32 and len(u):
            # optim.rowwise_adagrad in place: a gather and a scatter of the state and of the
            # rows. The slots are distinct, so a copy back equals a scatter-add, and
            # index_add_ with an alpha took 2-3x as long here (20k rows of a 1M-row table,
            # 1 or 2 threads); add_ with the same alpha gives the same bits.
            n = len(u)
            state = self.state.index_select(0, u).reshape(n)
            if self.opt.accumulator_decay != 1.0:
                state.mul_(self.opt.accumulator_decay)
            state.add_(grads.mul(grads).mean(dim=1))
            self.state.index_copy_(0, u, state.reshape(n, 1))
            std = state.sqrt_().add_(self.opt.eps)
            rows = self.rows.index_select(0, u).add_(grads / std.unsqueeze(1), alpha=-self.opt.lr)
            self.rows.index_copy_(0, u, rows)
            return
        rows, state = optim.apply(self.opt, self.rows[u], grads, self.state[u])
        self.rows[u] = rows
        self.state[u] = state

    def add(self, keys: np.ndarray, ids: np.ndarray, *, version: int = 0) -> np.ndarray:
        """Slots of ``keys`` (``uint64 [n]``), giving the absent ones their initial row now, in
        order of first appearance, outside admission and eviction (for in-process models
        that address rows by slot: new keys get the next free slots in the order given).
        ``ids`` are the IDs as given (``[n]``); returns slots ``int64 [n]``.

        Raises:
            ValueError: the new rows would exceed ``max_rows``.
        """
        keys = _as_keys(keys)
        uniq, first, inverse = unique_keys(keys)
        slots = self.lookup(uniq)
        new = np.flatnonzero(slots < 0)
        new = new[np.argsort(first[new], kind="stable")]
        if new.size:
            if self.cfg.max_rows is not None and self._n + new.size > self.cfg.max_rows:
                raise ValueError(f"add to {self.name!r}: {new.size} new rows exceed max_rows={self.cfg.max_rows}")
            slots[new], _ = self._create(uniq[new], as_id_array(ids)[first[new]], version, keep=np.empty(0, np.int64))
        return slots[inverse.reshape(-1)]

    def _create(self, keys: np.ndarray, ids: np.ndarray, version: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Give distinct absent ``keys`` rows; returns their slots (``-1`` for keys that do
        not fit: the push holds more new IDs than ``max_rows`` leaves room for, the higher
        keys miss out) and the keys evicted to make room (never from ``keep``)."""
        self._layout += 1
        removed = np.empty(0, np.uint64)
        cap = self.cfg.max_rows
        out = np.full(len(keys), -1, np.int64)
        if cap is not None and self._n + len(keys) > cap:
            removed = self._evict(self._n + len(keys) - cap, keep, version)
            room = cap - self._n
            if room < len(keys):
                fit = self._create(keys[:room], ids[:room], version, keep)[0] if room > 0 else np.empty(0, np.int64)
                out[:room] = fit
                return out, removed
        reuse = self._free[: len(keys)]
        self._free = self._free[len(reuse):]
        fresh = np.arange(self._top, self._top + len(keys) - len(reuse), dtype=np.int64)
        self._top += len(fresh)
        self._grow(self._top)
        slots = np.concatenate([reuse, fresh])
        if ids.dtype != np.int64 and self.ids.dtype == np.int64:
            self.ids = self.ids.astype(object)
            self._id_objects_bytes = _objects_bytes(self.ids[: self._top])
        if self.ids.dtype == object:
            # A reused slot still holds its removed ID until now.
            self._id_objects_bytes += _objects_bytes(ids) - _objects_bytes(self.ids[reuse])
        self.keys[slots] = keys
        self.ids[slots] = ids
        st = torch.from_numpy(slots)
        self.rows[st] = torch.from_numpy(self.initial_rows(keys))
        self.state[st] = 0.0
        self.changed_at[slots] = version
        self.touched_at[slots] = 0.0
        self.score[slots] = 0.0
        self.live[slots] = True
        self._n += len(keys)
        self.index.insert(keys, slots, absent=True)  # distinct, and just looked up: none has a row
        out[:] = slots
        return out, removed

    def _grow(self, need: int) -> None:
        cap = len(self.keys)
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        if self.cfg.max_rows is not None:
            new_cap = max(need, min(new_cap, self.cfg.max_rows))
        extra = new_cap - cap
        self.keys = np.concatenate([self.keys, np.zeros(extra, np.uint64)])
        self.ids = np.concatenate([self.ids, np.zeros(extra, self.ids.dtype)])
        # Rows and state past the used slots are never read (a slot gets its initial row and
        # a zero state when it is first used), so the new part is left uninitialised: its
        # pages are touched when slots are used, not all at once here.
        rows = self.rows.new_empty((new_cap, self.rows.shape[1]))
        rows[:cap] = self.rows
        state = self.state.new_empty((new_cap, *self.state.shape[1:]))
        state[:cap] = self.state
        self.rows, self.state = rows, state
        self.changed_at = np.concatenate([self.changed_at, np.zeros(extra, np.int64)])
        self.touched_at = np.concatenate([self.touched_at, np.zeros(extra, np.float64)])
        self.score = np.concatenate([self.score, np.zeros(extra, np.float64)])
        self.live = np.concatenate([self.live, np.zeros(extra, bool)])

    def _evict(self, k: int, keep: np.ndarray, version: int) -> np.ndarray:
        """Remove the ``k`` lowest-scoring live rows not in ``keep`` (ties: lower key first)."""
        cand = self.live_slots()
        if keep.size:
            cand = cand[~np.isin(cand, keep)]
        if not cand.size:
            return np.empty(0, np.uint64)
        k = min(k, cand.size)
        score = self.score[cand]
        if k < cand.size:
            kth = np.partition(score, k - 1)[k - 1]
            cand, score = cand[score <= kth], score[score <= kth]
        order = np.lexsort((self.keys[cand], score))[:k]
        gone = self.keys[cand[order]]
        self.remove(gone, version)
        return gone

    def remove(self, keys: np.ndarray, version: int) -> np.ndarray:
        """Drop the rows of ``keys`` (``uint64 [n]``; those present), with their optimizer state;
        record tombstones at ``version``. Returns the keys removed (``uint64 [r]``)."""
        keys = _as_keys(keys)
        if not len(keys):
            return keys
        slots = self.index.remove(np.unique(keys))
        present = slots >= 0
        slots = slots[present]
        if not slots.size:
            return np.empty(0, np.uint64)
        gone = self.keys[slots].copy()
        self.lifecycle["removed"] += len(gone)
        self._layout += 1
        self.live[slots] = False
        st = torch.from_numpy(slots)
        self.rows[st] = 0.0
        self.state[st] = 0.0
        self._free = np.sort(np.concatenate([self._free, slots]))
        self._n -= len(slots)
        self._tomb_versions.append(np.full(len(gone), version, np.int64))
        self._tomb_keys.append(gone)
        self._tomb_n += len(gone)
        return gone

    def expire(self, now: float, version: int) -> np.ndarray:
        """Remove the IDs without a real interaction for ``cfg.ttl_s`` seconds before ``now``
        (unix seconds); returns their keys (``uint64 [r]``)."""
        if self.cfg.ttl_s is None or not self._n:
            return np.empty(0, np.uint64)
        top = self._top
        old = np.flatnonzero(self.live[:top] & (self.touched_at[:top] < now - self.cfg.ttl_s))
        gone = self.remove(self.keys[old], version) if old.size else np.empty(0, np.uint64)
        self.lifecycle["expired"] += len(gone)
        return gone

    def would_expire(self, now: float) -> bool:
        """True when :meth:`expire` at ``now`` (unix seconds) would remove at least one row."""
        if self.cfg.ttl_s is None or not self._n:
            return False
        top = self._top
        return bool((self.live[:top] & (self.touched_at[:top] < now - self.cfg.ttl_s)).any())

    # -- tombstones --------------------------------------------------------------------
    def tombstones(self) -> int:
        """Number of tombstones kept."""
        return self._tomb_n

    def prune_tombstones(self, below: int, max_kept: int | None = None) -> int:
        """Forget tombstones of versions below ``below`` (every reader has synced past them)
        and, beyond ``max_kept``, the oldest ones; returns how many went. A reader asking
        for changes since a version below :attr:`pruned_below` (one past the newest
        forgotten tombstone) must resync fully."""
        if not self._tomb_versions:
            return 0
        v, k = np.concatenate(self._tomb_versions), np.concatenate(self._tomb_keys)
        keep = v >= below
        if max_kept is not None and keep.sum() > max_kept:
            keep[: len(v) - max_kept] = False  # tombstones are in version order: the oldest go
        gone = int((~keep).sum())
        if gone:
            self.pruned_below = max(self.pruned_below, int(v[~keep].max()) + 1)
            self.pruned_count += gone
            self._tomb_versions, self._tomb_keys = ([v[keep]], [k[keep]]) if keep.any() else ([], [])
            self._tomb_n = int(keep.sum())
        return gone

    # -- capture / restore -------------------------------------------------------------
    def capture(self) -> TableState:
        """The table as arrays, live slots in slot order (copies where slots were freed)."""
        live = self.live_slots()
        tv = np.concatenate(self._tomb_versions) if self._tomb_versions else np.empty(0, np.int64)
        tk = np.concatenate(self._tomb_keys) if self._tomb_keys else np.empty(0, np.uint64)
        sketch = self.admission.capture() if self.admission is not None else None
        return TableState(
            keys=self.keys[live],
            ids=self.ids[live],
            rows=self.rows[torch.from_numpy(live)].numpy(),
            state=self.state[torch.from_numpy(live)].numpy(),
            changed_at=self.changed_at[live],
            touched_at=self.touched_at[live],
            score=self.score[live],
            tomb_versions=tv,
            tomb_keys=tk,
            pruned_below=self.pruned_below,
            admission=sketch[0] if sketch is not None else None,
            admission_added=sketch[1] if sketch is not None else 0,
            optimizer=self.opt.kind.value,
        )

    def load_problem(self, ts: TableState) -> str | None:
        """Why :meth:`load` would refuse ``ts`` for its shapes or size (:func:`stored_table_problem`), or None."""
        n = len(ts.keys)
        if ts.rows.ndim != 2 or len(ts.rows) != n or len(ts.state) != n:
            return (f"table {self.name!r}: stored rows {ts.rows.shape} and state {ts.state.shape} do not match "
                    f"its {n} keys")
        return stored_table_problem(self.name, self.cfg, self.opt, rows=n, dim=ts.rows.shape[1],
                                    state_shape=ts.state.shape[1:],
                                    admission_shape=ts.admission.shape if ts.admission is not None else None,
                                    optimizer=ts.optimizer)

    def load(self, ts: TableState) -> None:
        """Replace the contents with ``ts`` (rows in slots ``0..n-1``).

        Raises:
            ValueError: the stored shapes do not fit this table's dim, optimizer or
                admission sketch, the stored keys are not unique, or they exceed ``max_rows``.
        """
        problem = self.load_problem(ts)
        if problem is not None:
            raise ValueError(problem)
        n = len(ts.keys)
        keys = _as_keys(ts.keys)
        if len(np.unique(keys)) != n:
            raise ValueError(f"table {self.name!r}: stored IDs are not unique")
        self._reset(max(n, 1))
        slots = np.arange(n, dtype=np.int64)
        self._top = self._n = n
        self.keys[:n] = keys
        ids = np.asarray(ts.ids)
        if ids.dtype != np.int64:
            self.ids = self.ids.astype(object)
        self.ids[:n] = ids
        if self.ids.dtype == object:
            self._id_objects_bytes = _objects_bytes(self.ids[:n])
        self.rows[:n] = torch.from_numpy(np.asarray(ts.rows, np.float32))
        self.state[:n] = torch.from_numpy(np.asarray(ts.state, np.float32))
        self.changed_at[:n] = ts.changed_at
        self.touched_at[:n] = ts.touched_at
        self.score[:n] = ts.score
        self.live[:n] = True
        self.index.insert(keys, slots)
        self._tomb_versions = [np.asarray(ts.tomb_versions, np.int64)] if len(ts.tomb_versions) else []
        self._tomb_keys = [_as_keys(ts.tomb_keys)] if len(ts.tomb_keys) else []
        self._tomb_n = len(ts.tomb_keys)
        self.pruned_below = int(ts.pruned_below)
        if self.admission is not None and ts.admission is not None:
            self.admission.load(ts.admission, ts.admission_added)

    # -- introspection -----------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the table holds: rows, state, per-slot bookkeeping, the index, the admission
        sketch and, once a string ID has arrived, the ID objects (``sys.getsizeof``: a string's
        characters and header). Tables that follow another can share their leader's ID
        objects (until a restart loads each table's own), so a sum over tables is an upper
        bound."""
        arrays = (self.keys, self.ids, self.changed_at, self.touched_at, self.score, self.live, self._free)
        total = sum(a.nbytes for a in arrays) + self.rows.nbytes + self.state.nbytes + self.index.nbytes()
        total += self._id_objects_bytes
        total += sum(v.nbytes + k.nbytes for v, k in zip(self._tomb_versions, self._tomb_keys))
        if self.admission is not None:
            total += self.admission.counts.nbytes
        return int(total)

    def stats(self) -> dict[str, Any]:
        """``rows``, ``capacity`` (slots), ``tombstones``, ``bytes`` and ``bytes_per_row``
        (``None`` for an empty table), the raw row size ``row_bytes`` (row + state), and
        ``lifecycle``: rows ``created``, IDs ``not_admitted`` (pushes of absent IDs the
        admission bar refused, counted once per push), rows ``evicted`` to stay within
        ``max_rows``, ``expired`` by ``ttl_s``, and ``removed`` for any reason (those two,
        forgotten items, a leader's rows gone), counted since :meth:`reset_lifecycle`."""
        b = self.nbytes()
        row_bytes = 4 * (self.cfg.dim + int(np.prod(self.state.shape[1:])))
        return {
            "rows": self._n,
            "capacity": len(self.keys),
            "tombstones": self.tombstones(),
            "bytes": b,
            "bytes_per_row": b / self._n if self._n else None,
            "row_bytes": row_bytes,
            "lifecycle": dict(self.lifecycle),
        }

    def reset_lifecycle(self) -> None:
        """Zero the ``lifecycle`` counts of :meth:`stats` (a shard does after replaying its log,
        which would count its rows' history again)."""
        self.lifecycle = dict.fromkeys(LIFECYCLE_COUNTS, 0)


def _objects_bytes(objs: np.ndarray) -> int:
    """``sys.getsizeof`` summed over an object array's elements (bytes)."""
    return sum(map(sys.getsizeof, objs.tolist()))
