"""The embedding table: an ID index, rows, optimizer state, growth, expiry, capture/restore.

One class for every place rows live: a PS shard's tables (:mod:`ps.shard`), the
in-process models of the evaluation's baselines (:mod:`workers.eval.strategies`) and
the benchmark's in-process twin of the trainer (:mod:`bench.train_throughput`). So a
row starts from the same deterministic value, and a push changes it by the same
``ps.optim`` rule, wherever it lives.

Rows sit in growable dense tensors addressed by *slot*; ``lookup`` maps IDs to slots.
Nothing here touches Ray; the owner serialises access (a shard actor runs one method
at a time).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ps import optim
from ps.config import InitKind, OptimizerConfig, TableConfig
from ps.ids import ID, as_id_array, id_keys, init_rows
from ps.persist import TableState

__all__ = ["EmbeddingTable", "table_seed"]


def table_seed(ps_seed: int, name: str) -> int:
    """The seed of table ``name``'s row initialisation under PS seed ``ps_seed``.

    Mixing in the table name gives two tables different initial rows for one ID.
    """
    return (ps_seed * 1_000_003 + int(id_keys([name])[0])) % (1 << 63)


class EmbeddingTable:
    """Rows of one table (``float32 [n, cfg.dim]``), their optimizer state and bookkeeping.

    Per slot it keeps the ID as given, the row, the optimizer state
    (``optim.state_shape(opt.kind, dim)`` floats), ``changed_at`` (the owner's version
    counter at the row's last change, for delta sync) and ``touched_at`` (unix seconds
    of the row's last push, for ``cfg.ttl_s``). IDs removed by expiry are kept as
    ``(version, id)`` tombstones in ``removed``, so readers syncing by version see them go.
    """

    def __init__(self, name: str, cfg: TableConfig, opt: OptimizerConfig, ps_seed: int, *, capacity: int = 1024):
        self.name, self.cfg, self.opt = name, cfg, opt
        self.seed = table_seed(ps_seed, name)
        self.ids: list[ID] = []
        self.index: dict[ID, int] = {}
        cap = max(1, int(capacity))
        self.rows = torch.zeros((cap, cfg.dim), dtype=torch.float32)
        self.state = torch.zeros((cap, *optim.state_shape(opt.kind, cfg.dim)), dtype=torch.float32)
        self.changed_at = np.zeros(cap, dtype=np.int64)
        self.touched_at = np.zeros(cap, dtype=np.float64)
        self.removed: list[tuple[int, ID]] = []

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Row width (floats)."""
        return self.cfg.dim

    def _grow(self, need: int) -> None:
        cap = self.rows.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        self.rows = torch.cat([self.rows, self.rows.new_zeros((new_cap - cap, self.rows.shape[1]))])
        self.state = torch.cat([self.state, self.state.new_zeros((new_cap - cap, *self.state.shape[1:]))])
        self.changed_at = np.concatenate([self.changed_at, np.zeros(new_cap - cap, np.int64)])
        self.touched_at = np.concatenate([self.touched_at, np.zeros(new_cap - cap, np.float64)])

    def initial_rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` start with (``float32 [n, dim]``): a deterministic function of
        (table seed, ID key), or zeros for ``init: zeros``."""
        if self.cfg.init == InitKind.UNIFORM and len(ids):
            return init_rows(id_keys(ids), seed=self.seed, dim=self.cfg.dim, scale=self.cfg.init_scale)
        return np.zeros((len(ids), self.cfg.dim), np.float32)

    def lookup(self, ids: np.ndarray, *, create: bool, version: int = 0) -> np.ndarray:
        """Slots (``int64 [n]``) of ``ids``; ``-1`` for absent ones unless ``create``.

        ``create`` adds absent IDs with their initial row; such a row counts as changed at
        ``version + 1`` (a reader syncing from ``version`` sees it).
        """
        get = self.index.get
        id_list = ids.tolist()
        slots = np.fromiter((get(x, -1) for x in id_list), dtype=np.int64, count=len(id_list))
        if not create:
            return slots
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            new_ids: list[ID] = []
            for j in missing.tolist():
                x = id_list[j]
                s = self.index.get(x)
                if s is None:  # the same new ID may appear twice in one request
                    s = len(self.ids)
                    self.index[x] = s
                    self.ids.append(x)
                    new_ids.append(x)
                slots[j] = s
            start = len(self.ids) - len(new_ids)
            self._grow(len(self.ids))
            if self.cfg.init == InitKind.UNIFORM:
                self.rows[start : len(self.ids)] = torch.from_numpy(self.initial_rows(as_id_array(new_ids)))
            self.changed_at[start : len(self.ids)] = version + 1
            self.touched_at[start : len(self.ids)] = time.time()
        return slots

    def pull(self, ids: np.ndarray, *, create: bool, version: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(rows float32 [n, dim], found bool [n])`` of ``ids`` in the order given.

        With ``create`` absent IDs get their initial row (and ``found`` is True); without
        it they read as zeros, ``found`` is False and nothing is stored.
        """
        slots = self.lookup(ids, create=create, version=version)
        found = slots >= 0
        rows = np.zeros((len(ids), self.cfg.dim), dtype=np.float32)
        if found.any():
            rows[found] = self.rows[torch.from_numpy(slots[found])].numpy()
        return rows, found

    def push(self, ids: np.ndarray, grads: torch.Tensor | np.ndarray, *, version: int = 0, now: float = 0.0) -> None:
        """One optimizer step on the rows of ``ids`` (created if absent), gradients ``float32 [n, dim]``.

        Pushed rows of a repeated ID are combined first (``optim.reduce_pushed``: summed,
        or merged at their latest clock for ``decayed_count``). The rows count as changed
        at ``version`` and touched at ``now`` (unix seconds).

        Raises:
            ValueError: ``grads`` is not ``[len(ids), dim]``.
        """
        grads = torch.as_tensor(grads, dtype=torch.float32)
        if tuple(grads.shape) != (len(ids), self.cfg.dim):
            raise ValueError(f"push to {self.name!r}: grads shape {tuple(grads.shape)} != ({len(ids)}, {self.cfg.dim})")
        if not len(ids):
            return
        slots = self.lookup(ids, create=True, version=version - 1)
        uniq, inverse = np.unique(slots, return_inverse=True)
        g = optim.reduce_pushed(self.opt.kind, grads, torch.from_numpy(inverse.reshape(-1)), len(uniq))
        self.apply_slots(uniq, g)
        self.changed_at[uniq] = version
        self.touched_at[uniq] = now

    def apply_slots(self, slots: np.ndarray, grads: torch.Tensor) -> None:
        """One optimizer step on the rows at distinct ``slots`` (``int64 [n]``) with ``grads [n, dim]``."""
        u = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        rows, state = optim.apply(self.opt, self.rows[u], grads, self.state[u])
        self.rows[u] = rows
        self.state[u] = state

    def matrix(self) -> np.ndarray:
        """The rows by slot, ``float32 [len(self), dim]`` (a view: read, do not keep across pushes)."""
        return self.rows[: len(self.ids)].numpy()

    def rows_at(self, slots: np.ndarray) -> torch.Tensor:
        """A copy of the rows at ``slots`` (``float32 [n, dim]``)."""
        return self.rows[torch.from_numpy(np.asarray(slots, dtype=np.int64))]

    def changed_since(self, since: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, rows, removed)``: IDs and rows changed after version ``since``, and IDs
        removed at or after it."""
        n = len(self.ids)
        sel = np.flatnonzero(self.changed_at[:n] > since)
        ids = as_id_array([self.ids[j] for j in sel.tolist()]) if sel.size else np.empty(0, np.int64)
        rows = self.rows[torch.from_numpy(sel)].numpy() if sel.size else np.empty((0, self.cfg.dim), np.float32)
        removed = as_id_array([x for v, x in self.removed if v >= since])
        return ids, rows, removed

    # -- expiry ------------------------------------------------------------------------
    def would_expire(self, now: float) -> bool:
        """True when :meth:`expire` at ``now`` (unix seconds) would remove at least one row."""
        if self.cfg.ttl_s is None or not self.ids:
            return False
        return bool((self.touched_at[: len(self.ids)] < now - self.cfg.ttl_s).any())

    def expire(self, now: float, version: int) -> int:
        """Drop rows not pushed for ``cfg.ttl_s`` seconds before ``now``; returns how many went."""
        if self.cfg.ttl_s is None or not self.ids:
            return 0
        n = len(self.ids)
        keep = self.touched_at[:n] >= now - self.cfg.ttl_s
        if keep.all():
            return 0
        gone = np.flatnonzero(~keep)
        self.removed.extend((version, self.ids[j]) for j in gone.tolist())
        kept = np.flatnonzero(keep)
        kept_t = torch.from_numpy(kept)
        self.ids = [self.ids[j] for j in kept.tolist()]
        self.index = {x: s for s, x in enumerate(self.ids)}
        m = len(kept)
        self.rows[:m] = self.rows[kept_t].clone()
        self.state[:m] = self.state[kept_t].clone()
        self.rows[m:n] = 0
        self.state[m:n] = 0
        self.changed_at[:m] = self.changed_at[kept]
        self.touched_at[:m] = self.touched_at[kept]
        return int(gone.size)

    # -- capture / restore -------------------------------------------------------------
    def capture(self) -> TableState:
        """The table's rows and bookkeeping as arrays (views: write them out before mutating)."""
        n = len(self.ids)
        return TableState(
            ids=as_id_array(self.ids),
            rows=self.rows[:n].numpy(),
            state=self.state[:n].numpy(),
            changed_at=self.changed_at[:n],
            touched_at=self.touched_at[:n],
            removed=list(self.removed),
        )

    def load(self, ts: TableState) -> None:
        """Replace the contents with ``ts`` (slot order kept).

        Raises:
            ValueError: the stored shapes do not fit this table's dim or optimizer, or the
                stored IDs are not unique.
        """
        n = len(ts.ids)
        want = (n, self.cfg.dim)
        if ts.rows.shape != want:
            raise ValueError(f"table {self.name!r}: stored rows have shape {ts.rows.shape}, config needs {want}")
        shape = (n, *self.state.shape[1:])
        if ts.state.shape != shape:
            raise ValueError(
                f"table {self.name!r}: stored optimizer state has shape {ts.state.shape}, "
                f"optimizer {self.opt.kind.value!r} needs {shape}"
            )
        self.ids = ts.ids.tolist()
        self.index = {x: s for s, x in enumerate(self.ids)}
        if len(self.index) != n:
            raise ValueError(f"table {self.name!r}: stored IDs are not unique")
        self._grow(n)
        self.rows.zero_()
        self.state.zero_()
        self.rows[:n] = torch.from_numpy(ts.rows)
        self.state[:n] = torch.from_numpy(ts.state)
        self.changed_at[:] = 0
        self.touched_at[:] = 0
        self.changed_at[:n] = ts.changed_at
        self.touched_at[:n] = ts.touched_at
        self.removed = list(ts.removed)

    def stats(self) -> dict[str, Any]:
        """``rows`` and ``tombstones`` counts."""
        return {"rows": len(self.ids), "tombstones": len(self.removed)}
