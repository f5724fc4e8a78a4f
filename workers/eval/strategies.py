"""Update strategies compared by the prequential evaluation (:mod:`workers.eval.protocol`).

A strategy learns from chunks of the stream and exposes what it would serve: user
vectors and an item view. Every strategy is ranked by the same code as ``/rank``
(:class:`workers.ranking.Ranker` over the item view, so :func:`workers.model.top_k`
breaks ties and drops NaN and seen items the same way); only how it learns differs.

- ``incremental``: Freshet itself. Real PS shard actors, the trainer's own
  prepare/train/commit code (an in-process :class:`workers.trainer.Trainer`), and a
  delta-synced :class:`ps.cache.RowCache` for ranking. Needs Ray.
- ``popularity``: incremental interaction counts, optionally recency-decayed.
- ``frozen``: popularity until ``fraction`` of the stream, then one MF fit on that
  prefix, never updated again.
- ``retrain``: every ``every`` events a from-scratch MF fit on all history so far.
- ``finetune``: every ``every`` events, continue from the current MF on the last
  ``every`` events only.
- ``als``: ``retrain`` with ``implicit``'s ALS, when that package is installed.

The in-process MF of frozen/retrain/finetune uses the same loss
(:func:`workers.model.bpr_loss`), the shards' table (:class:`ps.table.EmbeddingTable`:
the same deterministic row initialisation and each table's configured ``ps.optim``
rule) and the same negative mix (:mod:`workers.negatives`) as the trainer.
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ps.ids import ID, as_id_array, id_keys, ids_from_arrow, keyed
from ps.lazy import torch
from ps.optim import decayed_rows
from ps.table import EmbeddingTable
from workers.config import LossKind, StrategyKind
from workers.model import bpr_loss, context_index, mse_loss, signals, user_queries
from workers.negatives import negative_slots
from workers.ranking import Ranker

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = [
    "STRATEGIES",
    "Chunk",
    "ItemView",
    "Strategy",
    "StrategyUnavailable",
    "check_strategy_spec",
    "make_strategy",
    "parse_strategy_spec",
]


class StrategyUnavailable(RuntimeError):
    """A strategy that cannot run here (e.g. an optional package is missing); the report says why."""


@dataclass
class Chunk:
    """A run of consecutive stream events, as numpy columns plus the raw Arrow batch."""

    offsets: np.ndarray  # int64 stream offsets
    users: np.ndarray  # int64 or object IDs
    items: np.ndarray
    timestamps: np.ndarray  # float64 unix seconds
    weights: np.ndarray  # float32 rating / strength
    raw: pa.RecordBatch

    @classmethod
    def from_batch(cls, batch: pa.RecordBatch) -> "Chunk":
        """Split an event batch (``workers.events`` schema) into columns."""
        return cls(
            batch.column("offset").to_numpy(zero_copy_only=False).astype(np.int64),
            ids_from_arrow(batch.column("user_id")),
            ids_from_arrow(batch.column("item_id")),
            batch.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64),
            batch.column("weight").to_numpy(zero_copy_only=False).astype(np.float32),
            batch,
        )

    def __len__(self) -> int:
        return len(self.offsets)


class ItemView:
    """An in-memory item catalogue with the read interface ranking uses on a ``RowCache``
    (:class:`workers.ranking.CatalogueView`).

    ``ids`` are item IDs by slot; ``mats`` maps table name to ``[slots, dim]`` float32
    rows (item vectors, biases, popularity counts). Arrays are used as given (not copied),
    so a strategy can keep appending and hand out fresh views cheaply. ``keys`` are the
    IDs' keys when the caller has them (computed otherwise).
    """

    def __init__(self, ids: Sequence[ID] | np.ndarray, mats: dict[str, np.ndarray], keys: np.ndarray | None = None):
        self._ids = as_id_array(ids)
        n = len(self._ids)
        for name, m in mats.items():
            if m.shape[0] != n:
                raise ValueError(f"mats[{name!r}]: {m.shape[0]} rows for {n} item ids")
        self._mats = mats
        self._keys = id_keys(self._ids) if keys is None else np.asarray(keys, np.uint64)[:n]
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """Item IDs by slot."""
        return self._ids

    def keys(self) -> np.ndarray:
        """Item keys by slot (``uint64``)."""
        return self._keys

    def valid(self) -> np.ndarray:
        """All slots are live rows."""
        return np.ones(len(self._ids), dtype=bool)

    def matrix(self, table: str) -> np.ndarray:
        """Rows of ``table`` by slot ``[slots, dim]``; a missing table reads zeros."""
        m = self._mats.get(table)
        return m if m is not None else np.zeros((len(self._ids), 1), np.float32)

    def slots_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key (``uint64``), ``-1`` when absent."""
        if self._order is None:
            self._order = np.argsort(self._keys, kind="stable")
        keys = np.asarray(keys, np.uint64)
        if not len(self._keys):
            return np.full(len(keys), -1, np.int64)
        sorted_keys = self._keys[self._order]
        pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return np.where(sorted_keys[pos] == keys, self._order[pos], -1).astype(np.int64)

    def slots_of(self, ids: Sequence[ID] | np.ndarray) -> np.ndarray:
        """Slot of each ID, ``-1`` when absent."""
        return self.slots_of_keys(keyed(ids).keys)


class Strategy(abc.ABC):
    """How a model keeps up with the stream. The protocol calls, per chunk:
    :meth:`ranker` and :meth:`user_vectors` (serve), then :meth:`learn` (update).
    """

    name: str = "strategy"
    needs_ray: bool = False

    def __init__(self) -> None:
        self.learn_cpu_s = 0.0
        self.learned_ts: float | None = None  # newest event timestamp the served model learned from
        self.learned_end: int = 0  # one past the newest offset the served model learned from
        self.retrains = 0

    @abc.abstractmethod
    def ranker(self) -> Ranker:
        """A ranker over the catalogue the strategy serves right now."""

    @abc.abstractmethod
    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, dim] float32, found [n] bool)``; unfound users get the popular fallback."""

    @abc.abstractmethod
    def _learn(self, chunk: Chunk) -> None:
        """Learn from ``chunk`` (called by :meth:`learn`, which measures CPU time)."""

    def learn(self, chunk: Chunk) -> None:
        """Update from ``chunk``; adds this process's CPU time to :meth:`cpu_seconds`."""
        t0 = time.process_time()
        self._learn(chunk)
        self.learn_cpu_s += time.process_time() - t0

    def cpu_seconds(self) -> float:
        """CPU seconds spent learning so far (all processes involved that can be measured)."""
        return self.learn_cpu_s

    def staleness(self, now_ts: float, now_offset: int) -> tuple[float | None, int]:
        """``(seconds, events)`` between ``now`` and the newest event the served model learned from.

        Seconds are in stream time (None before anything was learned); events count the
        stream events before ``now_offset`` the served model has not learned from.
        """
        secs = None if self.learned_ts is None else max(0.0, now_ts - self.learned_ts)
        return secs, max(0, now_offset - self.learned_end)

    def describe(self) -> dict[str, Any]:
        """Settings worth printing in the report."""
        return {}

    def close(self) -> None:
        """Release actors and temp files."""


# --------------------------------------------------------------------------- popularity


class _Counts:
    """Incremental item counts in first-seen slot order, optionally decayed per event."""

    def __init__(self, halflife_events: float | None = None):
        self.index: dict[ID, int] = {}
        self.ids: list[ID] = []
        self.counts = np.zeros(1024, np.float32)
        self.scale = 1.0  # counts are stored divided by the running decay, renormalised now and then
        self.decay = None if not halflife_events else 0.5 ** (1.0 / halflife_events)

    def add(self, items: np.ndarray) -> None:
        for x in items.tolist():
            j = self.index.get(x)
            if j is None:
                j = self.index[x] = len(self.ids)
                self.ids.append(x)
                if j >= len(self.counts):
                    self.counts = np.concatenate([self.counts, np.zeros(len(self.counts), np.float32)])
            if self.decay is not None:
                self.scale *= self.decay
                if self.scale < 1e-20:  # rescale before float32 overflow
                    self.counts *= self.scale
                    self.scale = 1.0
            self.counts[j] += 1.0 / self.scale

    def view(self, table: str) -> ItemView:
        n = len(self.ids)
        return ItemView(self.ids, {table: (self.counts[:n] * self.scale)[:, None]})


class PopularityStrategy(Strategy):
    """Rank by item interaction counts learned incrementally (recency-decayed if ``halflife`` events is set)."""

    name = "popularity"

    def __init__(self, cfg: FreshetConfig, halflife: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.halflife = halflife
        self.counts = _Counts(halflife)

    def ranker(self) -> Ranker:
        return Ranker(self.counts.view(self.cfg.model.popularity_table), _counts_only(self.cfg))

    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(users), 1), np.float32), np.zeros(len(users), bool)

    def _learn(self, chunk: Chunk) -> None:
        self.counts.add(chunk.items)
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1

    def describe(self) -> dict[str, Any]:
        return {"halflife_events": self.halflife}


def _confidence(chunk: Chunk, cfg: FreshetConfig) -> np.ndarray:
    """Each event's confidence as the trainer weighs it (``workers.model.signals``; 0 for an
    event that is no positive), ``float32 [len(chunk)]``."""
    types = chunk.raw.column("event_type")
    conf, positive, _ = signals(chunk.weights, None if types.null_count == len(types) else types.to_pylist(), cfg.model)
    return np.where(positive, conf, 0.0).astype(np.float32)


def _counts_only(cfg: FreshetConfig):
    """``cfg.model`` ranking by the popularity table alone (no recent popularity, no context)."""
    return cfg.model.model_copy(update={"recent_table": None, "context_table": None})


class _Recent:
    """Recency-decayed item counts in process: the shards' ``decayed_count`` table and the
    trainer's clock (a chunk's counts are valid at its end offset, in half-lives)."""

    def __init__(self, cfg: FreshetConfig):
        m = cfg.model
        self.halflife = m.recent_halflife_events
        self.table = _table(cfg, m.recent_table)

    def add(self, items: np.ndarray, end: int, confidence: np.ndarray) -> None:
        """Count ``items`` (``confidence`` each, as the trainer counts) at stream offset ``end``."""
        k = keyed(items)
        self.table.push(k.keys, torch.from_numpy(decayed_rows(confidence, end / self.halflife, self.table.dim)), ids=k.ids)

    def rows_for(self, ids: Sequence[ID] | np.ndarray) -> np.ndarray:
        """``[len(ids), dim]`` (count, clock) rows (``ps.optim.decayed_count``); zeros for items never counted."""
        return self.table.pull(keyed(ids).keys, initial=False)[0]


# --------------------------------------------------------------------------- in-process MF


def _table(cfg: FreshetConfig, name: str) -> EmbeddingTable:
    """Table ``name`` as the shards would hold it (same init seed, optimizer and rule)."""
    return EmbeddingTable(name, cfg.ps.table(name), cfg.ps.optimizer_for(name), cfg.ps.seed)


class _LocalMF:
    """MF with item bias trained in this process, with the trainer's loss, optimizers and negatives."""

    def __init__(self, cfg: FreshetConfig, seed: int):
        m = cfg.model
        self.cfg, self.model = cfg, m
        self.user_index: dict[ID, int] = {}
        self.item_index: dict[ID, int] = {}
        self.item_ids: list[ID] = []
        self.users = _table(cfg, m.user_table)
        self.items = _table(cfg, m.item_table)
        self.bias = _table(cfg, m.item_bias_table)
        # Context rows share the item index (a context item is an item).
        self.ctx = _table(cfg, m.context_table) if m.context_table is not None else None
        self.counts = np.zeros(0, np.float64)
        self.rng = np.random.default_rng([cfg.ps.seed, seed])

    def _index(self, ids: np.ndarray, index: dict[ID, int], tables: list[EmbeddingTable], keep: list | None) -> np.ndarray:
        out = np.empty(len(ids), np.int64)
        new: list[ID] = []
        for j, x in enumerate(ids.tolist()):
            s = index.get(x)
            if s is None:
                s = index[x] = len(index)
                new.append(x)
            out[j] = s
        if new:
            # Each table appends the new IDs in this order, so its slots match ``index``.
            k = keyed(new)
            for t in tables:
                t.add(k.keys, k.ids)
            if keep is not None:
                keep.extend(new)
        return out

    def fit(
        self,
        users: np.ndarray,
        items: np.ndarray,
        weights: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        contexts: Sequence[Sequence[ID]] | None = None,
        confidence: np.ndarray | None = None,
    ) -> None:
        """``epochs`` shuffled passes of mini-batch updates over the given events.

        ``contexts`` holds, per event, its user's latest items before it (the session context);
        ``confidence`` (``float32 [n]``, default 1) scales each event's BPR term and its
        popularity count, as the trainer's (``workers.model.signals``).
        """
        conf = np.ones(len(users), np.float32) if confidence is None else np.asarray(confidence, np.float32)
        u = self._index(users, self.user_index, [self.users], None)
        item_tables = [self.items, self.bias] + ([self.ctx] if self.ctx is not None else [])
        i = self._index(items, self.item_index, item_tables, self.item_ids)
        cx = np.full((len(u), 0), -1, np.int64)
        if self.ctx is not None and contexts is not None:
            uniq, cx = context_index(contexts, self.model.context_items)
            if len(uniq):
                # Positions into ``uniq`` become this model's item slots (context items are items).
                slots = self._index(uniq, self.item_index, item_tables, self.item_ids)
                cx = np.where(cx >= 0, slots[np.maximum(cx, 0)], -1)
        if len(self.counts) < len(self.item_ids):
            self.counts = np.concatenate([self.counts, np.zeros(len(self.item_ids) - len(self.counts))])
        self.counts += np.bincount(i, weights=conf, minlength=len(self.counts))
        for _ in range(epochs):
            order = self.rng.permutation(len(u))
            for s in range(0, len(order), batch_size):
                sel = order[s : s + batch_size]
                self._step(u[sel], i[sel], weights[sel], cx[sel], conf[sel])

    def _negatives(self, b: int) -> np.ndarray:
        m = self.model
        return negative_slots(self.counts[: len(self.item_ids)], b, m.num_negatives, m.popularity_negative_fraction, self.rng)

    def _step(self, u: np.ndarray, i: np.ndarray, w: np.ndarray, cx: np.ndarray, conf: np.ndarray) -> None:
        m = self.model
        uu, ui = np.unique(u, return_inverse=True)
        bpr = m.loss == LossKind.BPR
        neg = self._negatives(len(u)) if bpr else np.empty((len(u), 0), np.int64)
        iu, ii = np.unique(np.concatenate([i, neg.reshape(-1)]), return_inverse=True)
        ut, it = torch.from_numpy(uu), torch.from_numpy(iu)
        U = self.users.rows[ut].clone().requires_grad_()
        I = self.items.rows[it].clone().requires_grad_()
        B = self.bias.rows[it][:, 0].clone().requires_grad_()
        ui_t = torch.from_numpy(ui.reshape(-1))
        Q = U[ui_t]
        C = None
        if self.ctx is not None and (cx >= 0).any():
            cu, cinv = np.unique(cx[cx >= 0], return_inverse=True)
            idx = np.full(cx.shape, -1, np.int64)
            idx[cx >= 0] = cinv
            ct = torch.from_numpy(cu)
            C = self.ctx.rows[ct].clone().requires_grad_()
            Q = user_queries(Q, C, torch.from_numpy(idx))
        pi = torch.from_numpy(ii[: len(i)].reshape(-1))
        if bpr:
            ni = torch.from_numpy(ii[len(i) :].reshape(len(i), -1))
            loss = bpr_loss(Q, I[pi], B[pi], I[ni], B[ni], torch.from_numpy(conf), l2=m.l2)
        else:
            loss = mse_loss(Q, I[pi], B[pi], torch.from_numpy(w), l2=m.l2)
        loss.backward()
        with torch.no_grad():
            self.users.apply_slots(uu, U.grad)
            self.items.apply_slots(iu, I.grad)
            self.bias.apply_slots(iu, B.grad[:, None])
            if C is not None:
                self.ctx.apply_slots(cu, C.grad)

    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        get = self.user_index.get
        slots = np.fromiter((get(x, -1) for x in users.tolist()), dtype=np.int64, count=len(users))
        found = slots >= 0
        vecs = np.zeros((len(users), self.users.dim), np.float32)
        if found.any():
            vecs[found] = self.users.rows[torch.from_numpy(slots[found])].numpy()
        return vecs, found

    def view(self, recent: np.ndarray | None = None) -> ItemView:
        """The served catalogue; ``recent`` adds ``(count, clock)`` rows (``ps.optim.decayed_count``) for the recent-popularity prior."""
        m = self.model
        mats = {
            m.item_table: self.items.matrix(),
            m.item_bias_table: self.bias.matrix(),
            m.popularity_table: self.counts.astype(np.float32)[:, None],
        }
        if self.ctx is not None:
            mats[m.context_table] = self.ctx.matrix()
        if recent is not None and m.recent_table is not None:
            mats[m.recent_table] = recent
        return ItemView(self.item_ids, mats)


class _History:
    """Every event seen so far, as growing columns (what a retrain trains on)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.contexts: list[list[ID]] = []  # per event: its user's latest items before its chunk
        self.n = 0

    def add(self, chunk: Chunk, contexts: list[list[ID]] | None = None, confidence: np.ndarray | None = None) -> None:
        conf = np.ones(len(chunk), np.float32) if confidence is None else confidence
        self.parts.append((chunk.users, chunk.items, chunk.weights, conf))
        self.contexts.extend(contexts if contexts is not None else [[] for _ in range(len(chunk))])
        self.n += len(chunk)

    def columns(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(users, items, weights, confidence)`` of every event (or the ``last`` ones)."""
        def cat(k: int) -> np.ndarray:
            arrs = [p[k] for p in self.parts]
            if k < 2 and any(a.dtype == object for a in arrs):
                return as_id_array(np.concatenate([a.astype(object) for a in arrs]))
            return np.concatenate(arrs)

        cols = ((cat(0), cat(1), cat(2), cat(3)) if self.parts
                else (np.empty(0, np.int64),) * 2 + (np.empty(0, np.float32),) * 2)
        if last is not None:
            cols = tuple(c[-last:] for c in cols)
        return cols


class _PeriodicMF(Strategy):
    """Shared machinery of frozen / retrain / finetune: serve a model, refit it at chosen offsets."""

    def __init__(self, cfg: FreshetConfig, *, epochs: int, batch_size: int, seed: int = 0):
        super().__init__()
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.cfg, self.epochs, self.batch_size, self.seed = cfg, int(epochs), int(batch_size), seed
        self.history = _History()
        self.mf: _LocalMF | None = None
        self.pop = _Counts()  # served while no model exists yet
        # Same model family as incremental: the served model carries the recent-popularity
        # prior too, as a snapshot taken when it was fitted (as stale as the model).
        m = cfg.model
        self.recent = _Recent(cfg) if m.recent_table is not None else None
        self.served_recent: np.ndarray | None = None
        self.user_items: dict[ID, list[ID]] = {}  # each user's latest items: the session context
        self._contexts: list[list[ID]] | None = None  # of the chunk being learned
        self._confidence: np.ndarray | None = None  # of the chunk being learned
        self.events_trained = 0  # sum over fits of events x epochs
        self.fit_cpu_s = 0.0

    def learn(self, chunk: Chunk) -> None:
        self._confidence = _confidence(chunk, self.cfg)
        if self.recent is not None:
            self.recent.add(chunk.items, int(chunk.offsets[-1]) + 1, self._confidence)
        n = self.cfg.model.context_items
        self._contexts = [list(self.user_items.get(u, ())) for u in chunk.users.tolist()]
        for u, i in zip(chunk.users.tolist(), chunk.items.tolist()):
            h = self.user_items.setdefault(u, [])
            h.append(i)
            del h[:-n]
        super().learn(chunk)

    def _remember(self, chunk: Chunk) -> None:
        """Keep ``chunk`` (with its events' contexts) for the next fit; until the first fit,
        popularity serves and counts the chunk."""
        self.history.add(chunk, self._contexts, self._confidence)
        if self.mf is None:
            self.pop.add(chunk.items)
            self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1

    def _refit_every(self, every: int) -> None:
        """Refit after every ``every`` events (from ``every`` on)."""
        if every < 1:
            raise ValueError(f"every: must be >= 1 events, got {every}")
        self.every = int(every)
        self.next_at = self.every

    def ranker(self) -> Ranker:
        if self.mf is None:
            return Ranker(self.pop.view(self.cfg.model.popularity_table), _counts_only(self.cfg))
        return Ranker(self.mf.view(self.served_recent), self.cfg.model)

    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.mf is None:
            return np.zeros((len(users), 1), np.float32), np.zeros(len(users), bool)
        return self.mf.user_vectors(users)

    def _fit(self, mf: _LocalMF, last: int | None, chunk: Chunk) -> _LocalMF:
        t0 = time.process_time()
        users, items, weights, conf = self.history.columns(last)
        contexts = self.history.contexts[-last:] if last is not None else self.history.contexts
        mf.fit(users, items, weights, epochs=self.epochs, batch_size=self.batch_size, contexts=contexts, confidence=conf)
        if self.recent is not None:
            self.served_recent = self.recent.rows_for(mf.item_ids)
        self.fit_cpu_s += time.process_time() - t0
        self.events_trained += len(users) * self.epochs
        self.retrains += 1
        # The refit model serves from the next chunk on; it knows everything up to this chunk.
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1
        return mf

    def cpu_per_event_epoch(self) -> float | None:
        """Measured fit CPU seconds per (event x epoch), for extrapolating retrain cost."""
        return self.fit_cpu_s / self.events_trained if self.events_trained else None

    def describe(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "fits": self.retrains}


class FrozenStrategy(_PeriodicMF):
    """Popularity until ``fraction`` of the stream, then one MF fit on that prefix; never updated after."""

    name = "frozen"

    def __init__(self, cfg: FreshetConfig, *, total_events: int, fraction: float = 0.2, epochs: int = 20, batch_size: int = 256):
        super().__init__(cfg, epochs=epochs, batch_size=batch_size)
        if not 0 < fraction < 1:
            raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
        self.fraction = fraction
        self.cutoff = max(1, int(fraction * total_events))

    def _learn(self, chunk: Chunk) -> None:
        if self.mf is not None:
            return
        self._remember(chunk)
        if self.history.n >= self.cutoff:
            self.mf = self._fit(_LocalMF(self.cfg, self.seed), None, chunk)
            self.history = _History()  # never needed again

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fraction": self.fraction, "cutoff_events": self.cutoff}


class RetrainStrategy(_PeriodicMF):
    """Every ``every`` events: a new MF trained from scratch on all history, served from the next chunk.

    The refit runs synchronously between chunks, so the replaced model is served
    until the new one exists and the stream waits for it: training latency itself
    is not charged as staleness (flattering retraining).
    """

    name = "retrain"

    def __init__(self, cfg: FreshetConfig, *, every: int = 2000, epochs: int = 20, batch_size: int = 256):
        super().__init__(cfg, epochs=epochs, batch_size=batch_size)
        self._refit_every(every)

    def _learn(self, chunk: Chunk) -> None:
        self._remember(chunk)
        if self.history.n >= self.next_at:
            self.next_at += self.every
            self.mf = self._fit(_LocalMF(self.cfg, self.seed + self.retrains), None, chunk)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "every_events": self.every}


class FinetuneStrategy(_PeriodicMF):
    """Every ``every`` events: continue the current MF on the last ``every`` events only."""

    name = "finetune"

    def __init__(self, cfg: FreshetConfig, *, every: int = 2000, epochs: int = 5, batch_size: int = 256, first_epochs: int = 20):
        super().__init__(cfg, epochs=epochs, batch_size=batch_size)
        self._refit_every(every)
        self.first_epochs = int(first_epochs)

    def _learn(self, chunk: Chunk) -> None:
        self._remember(chunk)
        # The history holds only the events since the last fit: fit on all of them once
        # there are ``every`` (a chunk can overshoot it by a few).
        if self.history.n >= self.every:
            window = self.history.n
            if self.mf is None:  # the first fit has nothing to continue from
                epochs, self.epochs = self.epochs, self.first_epochs
                self.mf = self._fit(_LocalMF(self.cfg, self.seed), window, chunk)
                self.epochs = epochs
            else:
                self._fit(self.mf, window, chunk)
            self.history = _History()  # only the current window is ever needed

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "every_events": self.every, "first_epochs": self.first_epochs}


class ALSRetrainStrategy(_PeriodicMF):
    """``retrain`` with ``implicit``'s ALS (optional; raises :class:`StrategyUnavailable` without it)."""

    name = "als"

    def __init__(self, cfg: FreshetConfig, *, every: int = 2000, factors: int = 64, iterations: int = 15, regularization: float = 0.05):
        try:
            import implicit  # noqa: F401
        except ImportError:
            raise StrategyUnavailable("the optional package 'implicit' is not installed (pip install freshet[baselines])") from None
        super().__init__(cfg, epochs=iterations, batch_size=1)
        self._refit_every(every)
        self.factors, self.regularization = int(factors), float(regularization)
        self._users: dict[ID, int] = {}
        self._vecs = np.zeros((0, factors), np.float32)
        self._view: ItemView | None = None

    def ranker(self) -> Ranker:
        if self._view is None:
            return Ranker(self.pop.view(self.cfg.model.popularity_table), _counts_only(self.cfg))
        return Ranker(self._view, self.cfg.model.model_copy(update={"context_table": None}))

    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        get = self._users.get
        slots = np.fromiter((get(x, -1) for x in users.tolist()), dtype=np.int64, count=len(users))
        found = slots >= 0
        vecs = np.zeros((len(users), max(1, self._vecs.shape[1])), np.float32)
        vecs[found] = self._vecs[slots[found]]
        return vecs, found

    def _learn(self, chunk: Chunk) -> None:
        import scipy.sparse as sp
        from implicit.als import AlternatingLeastSquares

        self.history.add(chunk)
        self.pop.add(chunk.items)
        if self._view is None:
            self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1
        if self.history.n < self.next_at:
            return
        self.next_at += self.every
        t0 = time.process_time()
        users, items, _, _ = self.history.columns()
        uid: dict[ID, int] = {}
        u = np.fromiter((uid.setdefault(x, len(uid)) for x in users.tolist()), np.int64, len(users))
        iid = {x: s for s, x in enumerate(self.pop.ids)}
        i = np.fromiter((iid[x] for x in items.tolist()), np.int64, len(items))
        mat = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(len(uid), len(iid)))
        model = AlternatingLeastSquares(
            factors=self.factors, regularization=self.regularization, iterations=self.epochs, random_state=self.cfg.ps.seed
        )
        model.fit(mat, show_progress=False)
        uf, itf = (np.asarray(getattr(model, a).to_numpy() if hasattr(getattr(model, a), "to_numpy") else getattr(model, a)) for a in ("user_factors", "item_factors"))
        m = self.cfg.model
        n = len(iid)
        self._users, self._vecs = uid, uf.astype(np.float32)
        mats = {m.item_table: itf[:n].astype(np.float32), m.item_bias_table: np.zeros((n, 1), np.float32),
                m.popularity_table: self.pop.view(m.popularity_table).matrix(m.popularity_table)[:n].copy()}
        if self.recent is not None:
            mats[m.recent_table] = self.recent.rows_for(list(iid))
        self._view = ItemView(list(iid), mats)
        self.fit_cpu_s += time.process_time() - t0
        self.events_trained += len(users) * self.epochs
        self.retrains += 1
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), int(chunk.offsets[-1]) + 1

    def describe(self) -> dict[str, Any]:
        return {"every_events": self.every, "factors": self.factors, "iterations": self.epochs, "fits": self.retrains}


# --------------------------------------------------------------------------- incremental (the real PS)


def _process_time(_actor: Any) -> float:
    return time.process_time()


class IncrementalStrategy(Strategy):
    """Freshet's continuous updates through real PS shard actors.

    Learning is the trainer's own code (``Trainer.learn`` on an in-process
    :class:`workers.trainer.Trainer`), pushing to shard actors started
    with :func:`ps.client.start_shards`; serving is a delta-synced ``RowCache`` and the
    ``/rank`` :class:`Ranker`. CPU seconds are this process's plus the shards' process
    time measured around each ``learn`` (shard CPU spent serving ranking is excluded).
    """

    name = "incremental"
    needs_ray = True

    def __init__(self, cfg: FreshetConfig):
        super().__init__()
        import ray

        from ps.cache import RowCache
        from ps.client import start_shards
        from workers.trainer import Trainer

        if not ray.is_initialized():
            raise RuntimeError("incremental: Ray must be initialised first (run_eval does it)")
        self._tmp = tempfile.mkdtemp(prefix="freshet-eval-")
        namespace = f"{cfg.namespace}-eval-{os.getpid()}-{int(time.time() * 1000) % 10**9}"
        self.cfg = cfg.model_copy(
            update={
                "namespace": namespace,
                "trainer": cfg.trainer.model_copy(update={"num_workers": 1, "device": "cpu"}),
                "ingest": cfg.ingest.model_copy(update={"dir": self._tmp, "state_dir": None}),
                "stream": cfg.stream.model_copy(update={"quarantine_path": os.path.join(self._tmp, "quarantine.arrow")}),
            }
        )
        m = self.cfg.model
        self.client = start_shards(self.cfg.ps, namespace=namespace)
        self.trainer = Trainer(0, self.cfg)
        self.cache = RowCache(self.client, m.item_tables())
        self.shard_cpu_s = 0.0
        self.driver_cpu_s = 0.0

    def _shard_times(self) -> list[float]:
        return self.client._get([sh.__ray_call__.remote(_process_time) for sh in self.client.shards])

    def ranker(self) -> Ranker:
        self.cache.sync()
        return Ranker(self.cache, self.cfg.model)

    def user_vectors(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.client.pull_many({self.cfg.model.user_table: users})[self.cfg.model.user_table]

    def learn(self, chunk: Chunk) -> None:
        before = self._shard_times()
        t0 = time.process_time()
        self._learn(chunk)
        self.driver_cpu_s += time.process_time() - t0
        after = self._shard_times()
        self.shard_cpu_s += sum(a - b for a, b in zip(after, before))
        self.learn_cpu_s = self.driver_cpu_s + self.shard_cpu_s

    def _learn(self, chunk: Chunk) -> None:
        end = int(chunk.offsets[-1]) + 1
        self.trainer.learn(chunk.raw, end)
        self.learned_ts, self.learned_end = float(chunk.timestamps.max()), end

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "shards": c.ps.num_shards,
            "passes": c.trainer.passes,
            "dim": c.ps.table(c.model.item_table).dim,
            "lr": c.ps.optimizer.lr,
            "accumulator_decay": c.ps.optimizer_for(c.model.item_table).accumulator_decay,
            "recent_weight": c.model.recent_weight if c.model.recent_table else 0.0,
            "recent_halflife_events": c.model.recent_halflife_events,
            "driver_cpu_s": round(self.driver_cpu_s, 3),
            "shard_cpu_s": round(self.shard_cpu_s, 3),
        }

    def close(self) -> None:
        import ray

        try:
            for source in self.trainer.sources.values():
                source.close()
        finally:
            for sh in self.client.shards:
                ray.kill(sh, no_restart=True)
            shutil.rmtree(self._tmp, ignore_errors=True)


# --------------------------------------------------------------------------- registry

STRATEGIES = tuple(k.value for k in StrategyKind)
"""Strategy names ``make_strategy`` knows, in report order."""

_CLASSES = {
    StrategyKind.INCREMENTAL.value: IncrementalStrategy,
    StrategyKind.POPULARITY.value: PopularityStrategy,
    StrategyKind.FROZEN.value: FrozenStrategy,
    StrategyKind.RETRAIN.value: RetrainStrategy,
    StrategyKind.FINETUNE.value: FinetuneStrategy,
    StrategyKind.ALS.value: ALSRetrainStrategy,
}


def parse_strategy_spec(spec: str) -> tuple[str, dict[str, float | int | None]]:
    """``"retrain:every=1000,epochs=5"`` → ``("retrain", {"every": 1000, "epochs": 5})``.

    Values parse as int, then float; ``none`` means None.

    Raises:
        ValueError: an unknown strategy name or a malformed part (named).
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in _CLASSES:
        raise ValueError(f"strategies: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    kwargs: dict[str, float | int | None] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"strategies: {spec!r}: expected key=value, got {part!r}")
        v = value.strip()
        if v.lower() == "none":
            kwargs[key.strip()] = None
            continue
        try:
            kwargs[key.strip()] = int(v)
        except ValueError:
            try:
                kwargs[key.strip()] = float(v)
            except ValueError:
                raise ValueError(f"strategies: {spec!r}: {key.strip()} must be a number, got {v!r}") from None
    return name, kwargs


def check_strategy_spec(spec: str) -> tuple[str, dict[str, float | int | None]]:
    """:func:`parse_strategy_spec`, and every setting one the strategy has: what can be checked
    of a spec without building the strategy (so before anything is started or written).

    Raises:
        ValueError: an unknown strategy, a malformed spec or a setting the strategy does not have.
    """
    import inspect

    name, kwargs = parse_strategy_spec(spec)
    params = inspect.signature(_CLASSES[name].__init__).parameters
    allowed = sorted(p for p in params if p not in ("self", "cfg", "total_events"))
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"strategies: {name} has no setting {key!r}; settings: {', '.join(allowed) or 'none'}")
    return name, kwargs


def make_strategy(spec: str, cfg: FreshetConfig, *, total_events: int) -> Strategy:
    """Build the strategy a spec names (see :func:`parse_strategy_spec`) for a stream of ``total_events``.

    Raises:
        ValueError: an unknown strategy, a malformed spec, a setting the strategy does not
            have, or a value it refuses (e.g. ``frozen:fraction`` outside (0, 1)).
        TypeError: a setting of the wrong type for the strategy's constructor.
        StrategyUnavailable: (a ``RuntimeError``) the strategy cannot run here (``als``
            without the ``implicit`` package).
        RuntimeError: ``incremental`` without Ray initialised.
    """
    import inspect

    name, kwargs = check_strategy_spec(spec)
    cls = _CLASSES[name]
    params = inspect.signature(cls.__init__).parameters
    custom = bool(kwargs)
    if "total_events" in params:
        kwargs["total_events"] = total_events
    strategy = cls(cfg, **kwargs)
    strategy.name = spec.strip() if custom else name
    return strategy
