"""Trainer actors: read a partition of the stream in mini-batches, pull only the rows a
batch touches, compute gradients with torch, push sparse per-row gradients.

Pipelining uses Ray's per-caller ordering of actor calls: the pull of the next pass
or batch is submitted right after the current push, without waiting for it. Ray can
break that order when it retries the push after a shard restart, so such a pull names
the push it must follow (``PSClient.pull_async(after=...)``) and is read again if a
shard answered before applying it: the trainer never trains on rows older than its
own updates.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import torch

from ps.cache import RowCache
from ps.client import PSClient
from ps.ids import ID, as_id_array, id_keys, ids_from_arrow
from ps.shard import PushId
from workers.config import LossKind
from workers.model import bpr_loss, context_index, mse_loss, user_queries
from workers.negatives import Catalogue
from workers.ranking import Ranker
from workers.wal import PushRecord, TrainerWAL

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = ["Trainer", "resolve_device", "start_trainers", "trainer_actor_name"]

_SEQ_PER_BATCH = 128  # push seq = batch start offset * 128 + pass; passes are capped at 100


def trainer_actor_name(index: int) -> str:
    """Ray actor name of trainer ``index``."""
    return f"trainer-{index}"


def resolve_device(setting: str) -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; otherwise the named device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={setting!r} but torch sees no CUDA device")
    return dev


def _stream_id(cfg: FreshetConfig) -> str:
    """A stable identity of a file or synthetic stream: a digest of its settings."""
    import hashlib

    text = cfg.stream.model_dump_json(exclude={"num_events", "quarantine_path"})
    return f"{cfg.stream.kind.value}:{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def _factorize(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique, inverse)`` preserving first-seen order; works for mixed int/str IDs."""
    if ids.dtype == np.int64:
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return uniq[order], rank[inverse.reshape(-1)]
    seen: dict[ID, int] = {}
    inverse = np.fromiter((seen.setdefault(x, len(seen)) for x in ids.tolist()), dtype=np.int64, count=len(ids))
    return as_id_array(list(seen)), inverse


@dataclass
class _Batch:
    start: int  # first offset read
    end: int  # one past the last offset read
    users: np.ndarray
    items: np.ndarray
    weights: np.ndarray
    ingest_ts: np.ndarray
    uniq_users: np.ndarray
    user_inv: np.ndarray
    uniq_items: np.ndarray  # positives then every pass's negatives
    pos_inv: np.ndarray
    neg_inv: np.ndarray  # [passes, b, m]: fresh negatives for every pass
    uniq_ctx: np.ndarray  # context items of the batch's users
    ctx_inv: np.ndarray  # [len(uniq_users), context_items] into uniq_ctx; -1 pads
    seqs: list[int] = field(default_factory=list)  # push seqs sent for this batch


class Trainer:
    """One trainer: partition ``index`` of ``cfg.trainer.num_workers``, by user ID.

    ``evaluate`` turns on prequential measurement: before training each batch, rank
    for every event whose user this trainer has seen before and count hits@k for the
    model and for incremental popularity.
    """

    def __init__(
        self,
        index: int,
        cfg: FreshetConfig,
        *,
        evaluate: bool = False,
        eval_k: int = 10,
        max_events: int | None = None,
        state_dir: str | Path | None = None,
        autostart: bool = False,
    ):
        torch.set_num_threads(1)
        self.index, self.cfg = index, cfg
        self.num_workers = cfg.trainer.num_workers
        self.device = resolve_device(cfg.trainer.device)
        self.client = PSClient.connect(cfg.namespace)
        self.source = self._open_source()
        self.offset = 0
        self.max_events = max_events if max_events is not None else cfg.stream.num_events
        # Push seqs are stream offsets, so the producer names the stream too: a new
        # stream (say, a fresh ingest log) never collides with an earlier one's seqs.
        self.source_id = getattr(self.source, "source_id", None) or _stream_id(cfg)
        self.producer = f"{cfg.namespace}/{trainer_actor_name(index)}/{self.source_id}"
        m = cfg.model
        self.catalogue = Catalogue()  # rebuilt in stream order on restart
        # Each user's latest items, the session context of the next batch (rebuilt on restart too).
        self.history: dict[ID, collections.deque] = {}
        self.evaluate, self.eval_k = evaluate, eval_k
        self.cache = RowCache(self.client, m.item_tables()) if evaluate else None
        self.seen: dict[ID, set] = collections.defaultdict(set)
        self.metrics = collections.Counter()
        self.freshness_ms: collections.deque[float] = collections.deque(maxlen=20_000)
        self.events_read = self.events_applied = self.batches = 0
        self.train_s = 0.0
        self.cpu_s0 = time.process_time()
        self.started_at = time.time()
        self.done = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wal = TrainerWAL(Path(state_dir) / trainer_actor_name(index)) if state_dir is not None else None
        self.recovered_pushes = 0
        if self.wal is not None:
            self._recover()
        if autostart:  # also after a Ray restart, which re-runs only __init__
            self.start()

    # -- exactly-once restart ----------------------------------------------------------
    def _recover(self) -> None:
        """Resume after a crash: re-send unacknowledged pushes, rebuild local state up to
        the resume offset, and finish a batch whose later passes never ran."""
        offset, _ = self.wal.committed()
        pending = self.wal.pending()
        redo = None
        for rec, updates, history in pending:
            # Shards that applied it drop it by push id; the rest apply the same gradients.
            self.client.push_many(updates, PushId(self.producer, rec.seq), history)
            self.recovered_pushes += 1
        if pending:
            last = pending[-1][0]
            if last.pass_index == self.cfg.trainer.passes - 1:
                offset = max(offset, last.end)
            else:
                redo, offset = last, last.start
        self._replay_local_state(offset)
        if redo is not None:
            batch = self._prepare(self.source.read(redo.start, redo.end - redo.start), redo.end)
            refs = self._train(batch, self._pull(batch), first_pass=redo.pass_index + 1)
            self._commit(batch, refs)
        for rec, _, _ in pending:
            self.wal.acknowledged(rec.seq)
        self.wal.commit(self.offset, self.events_applied)

    def _replay_local_state(self, upto: int) -> None:
        """Rebuild the catalogue, user histories (and eval history) from the stream's first ``upto`` events."""
        pos = 0
        while pos < upto:
            raw = self.source.read(pos, min(8192, upto - pos))
            if raw.num_rows == 0:
                break
            users, items, _, _ = self._mine(raw)
            self.catalogue.add(items)
            self._remember(users, items)
            if self.evaluate:
                for u, i in zip(users.tolist(), items.tolist()):
                    self.seen[u].add(i)
            self.events_applied += len(users)
            pos = int(raw.column("offset")[-1].as_py()) + 1
        self.offset = upto

    # -- stream ------------------------------------------------------------------------
    def _open_source(self):
        from workers.streams import open_source

        quarantine = self.cfg.stream.quarantine_path or str(self.cfg.ingest.local_state_dir() / f"quarantine-{self.index}.arrow")
        return open_source(self.cfg.stream, quarantine_path=quarantine, namespace=self.cfg.namespace)

    def _read_after(self, offset: int) -> tuple[pa.RecordBatch, int] | None:
        """Raw events from ``offset`` and the offset after them, or None if there are none yet."""
        n = self.cfg.trainer.batch_size
        if self.max_events is not None:
            n = min(n, self.max_events - offset)
            if n <= 0:
                return None
        batch = self.source.read(offset, n)
        if batch.num_rows == 0:
            return None
        end = int(batch.column("offset")[-1].as_py()) + 1
        return batch, end

    def _exhausted(self) -> bool:
        if self.max_events is not None and self.offset >= self.max_events:
            return True
        end = self.source.end_offset
        return end is not None and self.offset >= end

    def _mine(self, raw: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(users, items, weights, ingest_ts)`` of the events in this trainer's partition."""
        users = ids_from_arrow(raw.column("user_id"))
        mine = np.ones(len(users), dtype=bool)
        if self.num_workers > 1:
            mine = (id_keys(users) % np.uint64(self.num_workers)).astype(np.int64) == self.index
        items = ids_from_arrow(raw.column("item_id"))[mine]
        weights = raw.column("weight").to_numpy(zero_copy_only=False)[mine].astype(np.float32)
        ingest_ts = raw.column("ingest_ts").to_numpy(zero_copy_only=False)[mine]
        return users[mine], items, weights, ingest_ts

    def _remember(self, users: np.ndarray, items: np.ndarray) -> None:
        """Append events to their users' histories (the last ``model.context_items`` items)."""
        if self.cfg.model.context_table is None:
            return
        n = self.cfg.model.context_items
        for u, i in zip(users.tolist(), items.tolist()):
            h = self.history.get(u)
            if h is None:
                h = self.history[u] = collections.deque(maxlen=n)
            h.append(i)

    def _contexts(self, uniq_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(uniq_ctx, ctx_inv)``: the users' history items before this batch, as indices."""
        mc = self.cfg.model
        if mc.context_table is None:
            return as_id_array([]), np.full((len(uniq_users), 0), -1, np.int64)
        return context_index([self.history.get(u, ()) for u in uniq_users.tolist()], mc.context_items)

    def _prepare(self, raw: pa.RecordBatch, end: int) -> _Batch:
        users, items, weights, ingest_ts = self._mine(raw)
        start = int(raw.column("offset")[0].as_py())
        # Negatives depend only on (seed, trainer, batch start) and the catalogue, so a
        # restarted trainer recomputes exactly the pushes it lost.
        rng = np.random.default_rng([self.cfg.ps.seed, self.index, start])
        if len(items):
            self.catalogue.add(items)
        mc = self.cfg.model
        b, m, passes = len(users), mc.num_negatives, self.cfg.trainer.passes
        # Fresh negatives for every pass (measured: better than one set reused; BENCHMARKS.md).
        negs = (
            np.concatenate([self.catalogue.sample(b, m, mc.popularity_negative_fraction, rng) for _ in range(passes)])
            if b and mc.loss == LossKind.BPR
            else as_id_array([])
        )
        uniq_users, user_inv = _factorize(users) if b else (as_id_array([]), np.empty(0, np.int64))
        uniq_ctx, ctx_inv = self._contexts(uniq_users)
        self._remember(users, items)
        if items.dtype == negs.dtype == np.int64 or not len(negs):
            all_items = np.concatenate([items, negs]) if len(negs) else items
        else:
            all_items = as_id_array(np.concatenate([items.astype(object), negs.astype(object)]))
        uniq_items, item_inv = _factorize(all_items) if b else (as_id_array([]), np.empty(0, np.int64))
        return _Batch(
            start, end, users, items, weights, ingest_ts, uniq_users, user_inv, uniq_items,
            item_inv[:b], item_inv[b:].reshape(passes, b, m) if len(negs) else np.empty((passes, b, 0), np.int64),
            uniq_ctx, ctx_inv,
        )

    # -- evaluation --------------------------------------------------------------------
    def _evaluate(self, batch: _Batch) -> None:
        """Rank before training: hits@k of the model and of popularity for known users."""
        known = np.fromiter((u in self.seen for u in batch.users.tolist()), dtype=bool, count=len(batch.users))
        self.metrics["cold_events"] += int((~known).sum())
        if known.any():
            self.cache.sync()
            ranker = Ranker(self.cache, self.cfg.model)
            users = batch.users[known]
            uniq, inv = _factorize(users)
            rows = self.client.pull_many({self.cfg.model.user_table: uniq}, create=False)[self.cfg.model.user_table]
            seen = [list(self.seen[u]) for u in uniq.tolist()]  # exclusion is a set: order is irrelevant
            # Session context as before this batch (the batch's own items would leak the answers).
            row_of = {u: r for r, u in enumerate(batch.uniq_users.tolist())}
            ctx = [[batch.uniq_ctx[j] for j in batch.ctx_inv[row_of[u]].tolist() if j >= 0] for u in uniq.tolist()]
            ranked = ranker.rank_many(rows[0], rows[1], seen, self.eval_k, history=ctx)
            popular = [ranker.popular(s, self.eval_k) for s in seen]
            for u, item in zip(inv.tolist(), batch.items[known].tolist()):
                self.metrics["eval_events"] += 1
                self.metrics["model_hits"] += item in ranked[u].item_ids
                self.metrics["popular_hits"] += item in popular[u].item_ids
        for u, i in zip(batch.users.tolist(), batch.items.tolist()):
            self.seen[u].add(i)

    # -- training ----------------------------------------------------------------------
    def _pull(self, batch: _Batch, after: tuple[PushId, list] | None = None):
        """Pull a batch's rows; ``after`` = the not-yet-awaited push they must reflect."""
        m = self.cfg.model
        tables = {m.user_table: batch.uniq_users, m.item_table: batch.uniq_items, m.item_bias_table: batch.uniq_items}
        if m.context_table is not None:
            tables[m.context_table] = batch.uniq_ctx
        return self.client.pull_async(tables, after=after)

    def _gradients(self, batch: _Batch, pulled, p: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Loss gradients of pass ``p`` for the rows it touched (pass ``p``'s negatives only)."""
        m, dev = self.cfg.model, self.device
        U = torch.from_numpy(pulled[m.user_table][0]).to(dev).requires_grad_()
        I = torch.from_numpy(pulled[m.item_table][0]).to(dev).requires_grad_()
        B = torch.from_numpy(pulled[m.item_bias_table][0][:, 0].copy()).to(dev).requires_grad_()
        C = None
        Q = U
        if m.context_table is not None and len(batch.uniq_ctx):
            C = torch.from_numpy(pulled[m.context_table][0]).to(dev).requires_grad_()
            Q = user_queries(U, C, torch.from_numpy(batch.ctx_inv).to(dev))
        ui = torch.from_numpy(batch.user_inv).to(dev)
        pi = torch.from_numpy(batch.pos_inv).to(dev)
        if m.loss == LossKind.BPR:
            ni = torch.from_numpy(batch.neg_inv[p]).to(dev)
            loss = bpr_loss(Q[ui], I[pi], B[pi], I[ni], B[ni], l2=m.l2)
            used = np.unique(np.concatenate([batch.pos_inv, batch.neg_inv[p].reshape(-1)]))
        else:
            target = torch.from_numpy(batch.weights).to(dev)
            loss = mse_loss(Q[ui], I[pi], B[pi], target, l2=m.l2)
            used = np.unique(batch.pos_inv)
        loss.backward()
        self.metrics["loss_sum"] += float(loss.detach())
        item_grad, bias_grad = I.grad.cpu().numpy()[used], B.grad.cpu().numpy()[used, None]
        out = {
            m.user_table: (batch.uniq_users, U.grad.cpu().numpy()),
            m.item_table: (batch.uniq_items[used], item_grad),
            m.item_bias_table: (batch.uniq_items[used], bias_grad),
        }
        if C is not None:
            out[m.context_table] = (batch.uniq_ctx, C.grad.cpu().numpy())
        return out

    def _train(self, batch: _Batch, pending, first_pass: int = 0) -> list:
        """Passes ``first_pass..`` over ``batch``; returns the pushes' refs (not yet awaited)."""
        m = self.cfg.model
        refs: list = []
        last: tuple[PushId, list] | None = None
        for p in range(first_pass, self.cfg.trainer.passes):
            pulled = (pending if p == first_pass else self._pull(batch, after=last)).result()
            updates = self._gradients(batch, pulled, p)
            history = None
            if p == 0:
                pos_ids, pos_inv = _factorize(batch.items)
                counts = np.bincount(pos_inv, minlength=len(pos_ids)).astype(np.float32)
                updates[m.popularity_table] = (pos_ids, counts[:, None])
                if m.recent_table is not None:
                    # The batch's counts, valid at its end offset; the clock is in half-lives.
                    clock = np.full(len(pos_ids), batch.end / m.recent_halflife_events, np.float32)
                    updates[m.recent_table] = (pos_ids, np.stack([counts, clock], axis=1))
                history = (batch.users, batch.items)
            seq = batch.start * _SEQ_PER_BATCH + p
            if self.wal is not None:
                self.wal.write(PushRecord(seq, batch.start, batch.end, p), updates, history)
            push_refs = self.client.push_async(updates, PushId(self.producer, seq), history)
            refs += push_refs
            last = (PushId(self.producer, seq), push_refs)
            batch.seqs.append(seq)
        return refs

    def _commit(self, batch: _Batch, refs: list) -> None:
        self.client._get(refs)
        now = time.time()
        self.freshness_ms.extend(((now - batch.ingest_ts) * 1000.0).tolist())
        self.events_applied += len(batch.users)
        self.events_read += batch.end - batch.start
        self.offset = batch.end
        self.batches += 1
        if self.wal is not None:
            for seq in batch.seqs:
                self.wal.acknowledged(seq)
            self.wal.commit(self.offset, self.events_applied)

    def run(self, max_batches: int | None = None) -> dict[str, Any]:
        """Train until the stream is exhausted (finite sources), ``stop()`` or ``max_batches``.

        A live source with nothing new is polled every ``trainer.poll_interval_s``.
        Returns :meth:`stats`.
        """
        inflight: tuple[_Batch, list] | None = None
        nxt = None  # (batch, pending pull) read ahead while the shards apply a push
        done_batches = 0
        try:
            while not self._stop.is_set() and (max_batches is None or done_batches < max_batches):
                if nxt is None:
                    got = self._read_after(inflight[0].end if inflight else self.offset)
                    if got is None:
                        if inflight:
                            self._commit(*inflight)
                            inflight = None
                        if self._exhausted():
                            break
                        time.sleep(self.cfg.trainer.poll_interval_s)
                        continue
                    batch = self._prepare(*got)
                    if inflight:  # evaluation must see the previous batch applied
                        self._commit(*inflight)
                        inflight = None
                    if self.evaluate:
                        self._evaluate(batch)
                    nxt = (batch, self._pull(batch))
                batch, pending = nxt
                nxt = None
                t0 = time.perf_counter()
                refs = self._train(batch, pending) if len(batch.users) else []
                self.train_s += time.perf_counter() - t0
                if inflight:
                    self._commit(*inflight)
                inflight = (batch, refs)
                done_batches += 1
                if self.cfg.trainer.prefetch and not self.evaluate:
                    # Read and pull the next batch while the shards apply this push;
                    # the pull is ordered after the push on every shard.
                    got = self._read_after(batch.end)
                    if got is not None and batch.seqs:
                        nb = self._prepare(*got)
                        nxt = (nb, self._pull(nb, after=(PushId(self.producer, batch.seqs[-1]), refs)))
                    elif got is not None:
                        nb = self._prepare(*got)
                        nxt = (nb, self._pull(nb))
                else:
                    self._commit(*inflight)
                    inflight = None
            if inflight:
                self._commit(*inflight)
            if nxt is None and self._exhausted():
                self.done = True
        except Exception:  # noqa: BLE001 - surfaced through stats() and re-raised
            self.error = traceback.format_exc()
            raise
        return self.stats()

    def start(self) -> bool:
        """Run :meth:`run` in a background thread (for ``stats()`` while it trains)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run_quietly, name="freshet-trainer", daemon=True)
            self._thread.start()
        return True

    def _run_quietly(self) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - recorded in self.error
            pass

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the background loop after the current batch; returns :meth:`stats`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Counters: events read/applied, offset, throughput, freshness and eval metrics."""
        fr = np.asarray(self.freshness_ms, dtype=np.float64)
        elapsed = max(1e-9, time.time() - self.started_at)
        return {
            "trainer": self.index,
            "source_id": self.source_id,
            "device": str(self.device),
            "applied_offset": self.offset,
            "events_read": self.events_read,
            "events_applied": self.events_applied,
            "batches": self.batches,
            "events_per_s": self.events_applied / elapsed,
            "train_s": self.train_s,
            "cpu_s": time.process_time() - self.cpu_s0,
            "freshness_ms": {
                "p50": float(np.percentile(fr, 50)) if len(fr) else None,
                "p99": float(np.percentile(fr, 99)) if len(fr) else None,
            },
            "metrics": dict(self.metrics),
            "done": self.done,
            "running": self._thread is not None and self._thread.is_alive(),
            "error": self.error,
            "end_offset": self.source.end_offset,
            "quarantined": self.source.quarantined,
            "recovered_pushes": self.recovered_pushes,
        }

    def ping(self) -> int:
        """Liveness probe; returns the trainer index."""
        return self.index

    def pid(self) -> int:
        """OS process id of this trainer (for operators and fault tests)."""
        import os

        return os.getpid()


def start_trainers(
    cfg: FreshetConfig,
    *,
    detached: bool = False,
    evaluate: bool = False,
    max_events: int | None = None,
    state_dir: str | Path | None = None,
    autostart: bool = False,
) -> list:
    """Create ``cfg.trainer.num_workers`` named trainer actors (not yet started).

    With ``state_dir`` each trainer keeps its write-ahead pushes and committed offset
    there, so a restarted trainer (Ray ``max_restarts``) resumes exactly once;
    ``autostart`` starts training in ``__init__`` (so a restarted trainer carries on).
    """
    actor_cls = ray.remote(Trainer)
    handles = []
    for i in range(cfg.trainer.num_workers):
        opts: dict[str, Any] = dict(
            name=trainer_actor_name(i),
            namespace=cfg.namespace,
            num_cpus=cfg.trainer.num_cpus,
            num_gpus=cfg.trainer.num_gpus,
            max_restarts=cfg.trainer.max_restarts,
            max_concurrency=4,  # the training thread plus stats()/stop() calls
        )
        if detached:
            opts["lifetime"] = "detached"
        handles.append(
            actor_cls.options(**opts).remote(i, cfg, evaluate=evaluate, max_events=max_events, state_dir=state_dir, autostart=autostart)
        )
    return handles
