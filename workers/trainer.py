"""Trainer actors: read their share of the stream in mini-batches, pull only the rows a
batch touches, compute gradients with torch (:mod:`workers.step`), push sparse per-row
gradients; supervised, exactly once, and restartable in time proportional to the work
since their last snapshot.

A trainer consumes whole partitions of the ingest log (partition ``p`` goes to trainer
``p % trainer.num_workers``), or, for a file or synthetic stream, the events whose user
key falls to it. Pushes are named by ``(producer, seq)`` with one producer per
partition and ``seq = batch start offset * 128 + pass``; a write-ahead log
(:mod:`workers.wal`) records each push before it is sent and the offsets once a batch
is applied, so a restarted trainer re-sends exactly the pushes some shard may have
missed (the others drop them by push id) and recomputes the rest identically.

Pipelining: the rows of a batch's next pass come back with the push of the pass
before, in the same call to each shard (``PSClient.push_pull_async``), so they always
reflect it. The next batch's pull is submitted right after the batch's last push,
without waiting for it, relying on Ray's per-caller ordering of actor calls. Ray can
break that order when it retries the push after a shard restart, so that pull names
the push it must follow (``PSClient.pull_async(after=...)``) and is read again if a
shard answered before applying it: the trainer never trains on rows older than its
own updates.

A failing batch is retried with backoff, each try starting from the last committed
state (as a restart would); after ``trainer.max_retries`` retries an actor exits so Ray
restarts it. Events whose gradients are not finite are set aside to a dead-letter
Arrow file and training goes on.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import ray

from ps.cache import RowCache
from ps.client import PSClient
from ps.ids import ID_UNION, Keyed, ids_from_arrow, ids_to_arrow
from ps.lazy import torch
from ps.persist import TableUpdate, fsync_path, intact_batches
from ps.recent import RowlessSweep
from ps.shard import PushId
from workers.config import StreamKind
from workers.eval.protocol import WarmChunks
from workers.events import is_rating
from workers.negatives import Catalogue
from workers.ranking import Ranker
from workers.step import Batch, Histories, TrainStep
from workers.streams.base import weight_out_of_bounds
from workers.wal import PushRecord, TrainerWAL

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = ["Trainer", "check_saved_state", "gpus_per_trainer", "resolve_device", "start_trainers", "trainer_actor_name"]

_log = logging.getLogger(__name__)

_SEQ_PER_BATCH = 128  # push seq = batch start offset * 128 + pass; passes are capped at 100
_MAX_BACKOFF_S = 30.0
_DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("partition", pa.int32()),
    pa.field("offset", pa.int64()),
    pa.field("user_id", ID_UNION),
    pa.field("item_id", ID_UNION),
    pa.field("weight", pa.float32()),
    pa.field("event_type", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("at", pa.float64()),  # unix seconds it was set aside
])


def trainer_actor_name(index: int) -> str:
    """Ray actor name of trainer ``index``."""
    return f"trainer-{index}"


def resolve_device(setting: str) -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; otherwise the named device.

    Raises:
        RuntimeError: a CUDA device is named but torch sees none, or ``setting`` is not a
            device string torch parses.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={setting!r} but torch sees no CUDA device")
    return dev


def _stream_id(cfg: "FreshetConfig") -> str:
    """A stable identity of a file or synthetic stream: a digest of its settings."""
    text = cfg.stream.model_dump_json(exclude={"num_events", "quarantine_path"})
    return f"{cfg.stream.kind.value}:{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def applied_position(stats: list[dict[str, Any]], cfg: "FreshetConfig") -> int:
    """How far the trainers (their ``stats()``) have applied the stream, in events from its
    start: on the ingest log each trainer holds its own partitions, so their positions add
    up; on a file stream each reads it all and keeps its users' events, so the slowest one
    says."""
    if not stats:
        return 0
    if cfg.stream.kind == StreamKind.INGEST:
        return sum(int(s["applied_offset"]) for s in stats)
    return min(int(s["applied_offset"]) for s in stats)


def partitions_of(index: int, cfg: "FreshetConfig") -> list[int]:
    """The ingest partitions trainer ``index`` consumes."""
    n = getattr(cfg.ingest, "partitions", 1)
    return [p for p in range(n) if p % cfg.trainer.num_workers == index]


class _DeadLetters:
    """Events set aside (a weight the model refuses, or gradients that are not finite): an Arrow IPC stream file
    (one batch per set-aside group, flushed), and the ``(partition, offset)`` already there,
    so a redo after a restart does not write them twice."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seen: set[tuple[int, int]] = set()
        self.last: dict[int, int] = {}  # partition -> its highest offset set aside
        self._file = self._writer = None
        if path is not None and path.exists():
            good = 0
            with pa.memory_map(str(path), "r") as src:
                try:
                    reader = pa.ipc.open_stream(src)
                    good = src.tell()
                except (pa.ArrowInvalid, OSError):  # torn inside its schema: nothing was set aside
                    reader = None
                for b in intact_batches(reader) if reader is not None else ():
                    good = src.tell()
                    self.seen.update(zip(b.column("partition").to_pylist(), b.column("offset").to_pylist()))
            for q, o in self.seen:
                self.last[q] = max(o, self.last.get(q, -1))
            if good and good < path.stat().st_size:
                # A torn tail (a crash mid-append): cut it off, or what is appended next would
                # follow it and never be read back.
                with open(path, "r+b") as f:
                    f.truncate(good)

    def __len__(self) -> int:
        return len(self.seen)

    def add(self, batch: Batch, events: np.ndarray, reason: str) -> None:
        """Set aside ``events`` (indices into ``batch``), all for ``reason``."""
        types = [batch.event_types[j] for j in events.tolist()] if batch.event_types else None
        self.add_rows(batch.partition, batch.offsets[events], batch.user_ids[events], batch.item_ids[events],
                      batch.weights[events], types, [reason] * len(events))

    def add_rows(self, partition: int, offsets: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray,
                 weights: np.ndarray, event_types: list | None, reasons: list[str]) -> None:
        """Set aside events given column by column (``[n]`` each), one reason per event; those
        already set aside are skipped."""
        new = [j for j, o in enumerate(offsets.tolist()) if (partition, int(o)) not in self.seen]
        if not new:
            return
        keys = {(partition, int(offsets[j])) for j in new}
        self.seen.update(keys)
        self.last[partition] = max(self.last.get(partition, -1), *(o for _, o in keys))
        _log.warning("set aside %d events of partition %d (%s) to %s", len(new), partition, reasons[new[0]], self.path)
        if self.path is None:
            return
        sel = np.asarray(new)
        table = pa.record_batch([
            pa.array(np.full(len(sel), partition, np.int32)),
            pa.array(np.asarray(offsets, np.int64)[sel]),
            ids_to_arrow(user_ids[sel], union=True),
            ids_to_arrow(item_ids[sel], union=True),
            pa.array(np.asarray(weights, np.float32)[sel]),
            pa.array([event_types[j] for j in new] if event_types else [None] * len(new), pa.string()),
            pa.array([reasons[j] for j in new], pa.string()),
            pa.array(np.full(len(sel), time.time())),
        ], schema=_DEAD_LETTER_SCHEMA)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or not self.seen - keys
            if fresh:
                self._file = open(self.path, "wb")
                self._writer = pa.ipc.new_stream(self._file, _DEAD_LETTER_SCHEMA)
            else:  # append after the file's own schema: reopen as a stream continuation
                self._file = open(self.path, "ab")
                self._writer = _Continuation(self._file)
        self._writer.write_batch(table)
        self._file.flush()
        os.fsync(self._file.fileno())


class _Continuation:
    """Writes record batch messages onto an existing IPC stream file (its schema is there)."""

    def __init__(self, f):
        self._f = f

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._f.write(batch.serialize().to_pybytes())


class Trainer:
    """One trainer: trainer ``index`` of ``cfg.trainer.num_workers``.

    ``evaluate`` turns on prequential measurement: before training each batch, rank for
    every event whose user this trainer has seen before and count hits@k for the model
    and for incremental popularity. ``max_events`` caps a finite stream (by default
    ``stream.num_events``; the ingest stream never ends). ``state_dir`` makes the trainer
    durable (write-ahead log, local-state snapshots, dead letters under
    ``state_dir/trainer-{index}``). ``client`` is where the rows live: the deployment's
    shards by default, or a ``ps.local.LocalClient`` for an in-process run.

    ``eval_k`` is the k of hits@k (items).

    Raises:
        RuntimeError: ``trainer.device`` names a CUDA device torch cannot see.
        ValueError: without ``client``, no shard actors in ``cfg.namespace`` (``PSClient.connect``);
            a trainer WAL under ``state_dir`` written in another format.
        FileNotFoundError, workers.streams.StreamDataError: the configured file stream is
            missing, empty or mostly quarantined (see :func:`workers.streams.open_source`).
    """

    def __init__(
        self,
        index: int,
        cfg: "FreshetConfig",
        *,
        evaluate: bool = False,
        eval_k: int = 10,
        max_events: int | None = None,
        state_dir: str | Path | None = None,
        autostart: bool = False,
        client: Any = None,
    ):
        torch.set_num_threads(cfg.trainer.torch_threads)
        self.index, self.cfg = index, cfg
        self.num_workers = cfg.trainer.num_workers
        self.device = resolve_device(cfg.trainer.device)
        self.client = client if client is not None else PSClient.connect(cfg.namespace)
        self.step = TrainStep(cfg, trainer_index=index, device=self.device)
        self.live = cfg.stream.kind == StreamKind.INGEST
        self.sources = self._open_sources()
        self.max_events = None if self.live else (max_events if max_events is not None else cfg.stream.num_events)
        self.source_ids = {p: getattr(s, "source_id", None) or _stream_id(cfg) for p, s in self.sources.items()}
        # Push seqs are stream offsets, so a producer names the stream and partition too: a
        # new stream (say, a fresh ingest log) never collides with an earlier one's seqs.
        self.producers = {p: f"{cfg.namespace}/{trainer_actor_name(index)}/{sid}" for p, sid in self.source_ids.items()}
        self.evaluate, self.eval_k = evaluate, eval_k
        self.cache = RowCache(self.client, cfg.model.item_tables(), reader=f"{cfg.namespace}/eval-{index}") if evaluate else None
        self._eval_rankers: tuple[Ranker, Ranker] | None = None  # the model's and all-time popularity's
        self.metrics: collections.Counter = collections.Counter()
        self.freshness_ms: collections.deque[float] = collections.deque(maxlen=20_000)
        self.cpu_s0 = time.process_time()
        self.started_at = time.time()
        self.root = Path(state_dir) / trainer_actor_name(index) if state_dir is not None else None
        self.wal = TrainerWAL(self.root, fsync=cfg.trainer.wal_fsync, keep_history=True) if self.root is not None else None
        self.dead = _DeadLetters(self.root / "dead-letter.arrows" if self.root is not None else None)
        self.done = False
        self.state = "idle"
        self.error: str | None = None
        self.retries = 0
        self.recovered_pushes = 0
        # A failed try left local state past the committed offsets (a batch read, prepared,
        # maybe half pushed): the next try must recover first, even one a stop() and a later
        # start() begin, or it would carry on past the failed batch and commit over it.
        self._must_recover = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lifecycle = {t: cfg.ps.table(t).has_lifecycle for t in (cfg.model.item_table, cfg.model.user_table)}
        self._ttl = any(t.ttl_s is not None for t in cfg.ps.tables.values())
        # Recent popularity's clock is the log's position across partitions where there are several.
        self._global_clock = self.live and cfg.ingest.partitions > 1 and cfg.model.recent_table is not None
        items = cfg.ps.table(cfg.model.item_table)
        # Where a push may give an item no row, the catalogue's new items are checked once
        # their batch is applied: negatives without a row train users against noise.
        self._may_refuse = items.admission is not None or items.max_rows is not None
        self._reset_local_state()
        if self.wal is not None:
            self._recover()
        if autostart:  # also after a Ray restart, which re-runs only __init__
            self.start()

    # -- state -------------------------------------------------------------------------
    def _reset_local_state(self) -> None:
        """Empty local state at offset 0 (what :meth:`_recover` rebuilds from)."""
        self.catalogue = Catalogue()
        users = self.cfg.ps.table(self.cfg.model.user_table)
        # No more users than the user table can hold on all shards: the users without a row
        # (not admitted yet, or turned away by a full table) cannot grow it without bound.
        cap = users.max_rows * self.cfg.ps.num_shards if users.max_rows is not None else None
        self.histories = Histories(self.cfg.model.context_items, max_users=cap)
        self.offsets = dict.fromkeys(self.sources, 0)  # applied (committed) per partition
        self.read_pos = dict(self.offsets)  # next offset to read per partition
        self.events_applied = self.events_read = self.batches = 0
        self.train_s = 0.0
        self.seen: dict[int, set] = collections.defaultdict(set)
        self.warm_chunks = WarmChunks()  # which positives freshet eval would rank (evaluation)
        self._removed_since = [0] * getattr(self.client, "num_shards", 1)
        self._lifecycle_at = self._expired_at = 0.0
        self._unchecked: list[np.ndarray] = []  # catalogue items of applied batches, row not yet confirmed
        # Removed IDs kept by a sync because a batch not yet pushed brings them back: the next
        # sync removes them in full if that push gave them no row (their tombstones are consumed).
        self._held: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        # The histories can hold users the user table turns away for good, with no bound on their
        # number, when admission refuses them and no max_rows caps Histories (_sweep_rowless_users).
        self._rowless_sweep = (RowlessSweep(self.cfg.ps.recent_without_row_s, time.monotonic())
                               if users.admission is not None and users.max_rows is None
                               and self.cfg.model.context_table is not None else None)
        self._since_snapshot = 0
        # Where local state (catalogue, histories) stands per partition: past the committed
        # offsets while a batch read ahead is prepared. A snapshot must hold the state at the
        # offsets it names, so one due while a batch is read ahead is taken from a copy made
        # before that batch was prepared (_capture: (offsets, state)).
        self._prepared_to = dict(self.offsets)
        self._capture: tuple[dict[int, int], tuple] | None = None
        self._rr = 0
        self._last_progress = time.time()
        # The oldest event time (ingest_ts) of each batch read and not yet committed, by
        # (partition, start): with read-ahead two or three batches are in flight at once.
        self._unapplied: dict[tuple[int, int], float] = {}

    def _open_sources(self) -> dict[int, Any]:
        from workers.streams import open_source

        if self.live:
            from workers.streams.ingest import IngestSource

            parts = partitions_of(self.index, self.cfg)
            return {p: IngestSource(self.cfg.namespace, p) for p in parts}
        quarantine = self.cfg.stream.quarantine_path or str(self.cfg.ingest.local_state_dir() / f"quarantine-{self.index}.arrow")
        return {0: open_source(self.cfg.stream, quarantine_path=quarantine, model=self.cfg.model)}

    # -- exactly-once restart ----------------------------------------------------------
    def _snapshot_dir(self) -> Path:
        return self.root / "state"

    def _local_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A copy of the catalogue and the histories: ``(item keys, counts, users, items)``."""
        return (self.catalogue.keys().copy(), self.catalogue.counts().copy(), *self.histories.capture())

    def _snapshot_is_due(self) -> bool:
        """``trainer.snapshot_every_batches`` commits since the last snapshot (it may come later,
        see :meth:`_snapshot_at_commit`)."""
        return self._since_snapshot >= self.cfg.trainer.snapshot_every_batches

    def _snapshot_at_commit(self) -> None:
        """Persist local state at the offsets just committed if it is known there: the live
        state when nothing is prepared past them, else a copy made before the batch read ahead
        was prepared (:meth:`_prepare`); otherwise a later commit takes the snapshot."""
        if self._prepared_to == self.offsets:
            self._save_local_state()
        elif self._capture is not None and self._capture[0] == self.offsets:
            self._save_local_state(self._capture[1])
        elif self._capture is not None and any(self.offsets.get(q, 0) > o for q, o in self._capture[0].items()):
            self._capture = None  # passed without a commit there: the next read-ahead copies again

    def _save_local_state(self, state: tuple | None = None) -> None:
        """Persist the catalogue and the users' histories at the committed offsets (Arrow
        IPC + JSON, written beside and renamed into place), so a restart replays only the
        events after them; then tell the ingest log it may drop what came before. ``state``:
        :meth:`_local_state` as of those offsets (default: the live state, which must not
        hold a batch prepared past them)."""
        if self.root is None:
            return
        keys, counts, users, items = state if state is not None else self._local_state()
        tmp = self.root / ".state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700, parents=True)  # users' histories: this user's only
        with pa.OSFile(str(tmp / "catalogue.arrow"), "wb") as f, pa.ipc.new_file(f, _CATALOGUE_SCHEMA) as w:
            w.write_table(pa.table({"key": keys, "count": counts}, schema=_CATALOGUE_SCHEMA))
        with pa.OSFile(str(tmp / "histories.arrow"), "wb") as f, pa.ipc.new_file(f, _HISTORY_SCHEMA) as w:
            w.write_table(pa.table({"user": users, "item": items}, schema=_HISTORY_SCHEMA))
        meta = {"offsets": {str(p): o for p, o in self.offsets.items()}, "events_applied": self.events_applied,
                "source_ids": {str(p): s for p, s in self.source_ids.items()}, "at": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in ("catalogue.arrow", "histories.arrow", "meta.json"):
            fsync_path(tmp / name)
        fsync_path(tmp)
        old = self._old_snapshot_dir()
        self._restore_old_snapshot()  # an earlier save that died between its renames left it
        shutil.rmtree(old, ignore_errors=True)
        if self._snapshot_dir().exists():
            self._snapshot_dir().rename(old)
        tmp.rename(self._snapshot_dir())
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)
        self._since_snapshot = 0
        self._capture = None
        if self.wal is not None:  # a restart replays from here on: the commits before are not needed
            self.wal.forget(self.offsets)
        if self.live:  # the ingest log may now drop the events before these offsets
            for p, src in self.sources.items():
                src.commit(trainer_actor_name(self.index), self.offsets[p])

    def _old_snapshot_dir(self) -> Path:
        return self.root / ".state.old"

    def _restore_old_snapshot(self) -> None:
        """Put the previous snapshot back when a save died between moving it aside and moving
        the new one in: it is whole, and the ingest log still keeps the events after it (the
        log is told it may drop them only once the new one is in place). Replaying from 0
        instead would fail once retention has trimmed the log."""
        current, old = self._snapshot_dir(), self._old_snapshot_dir()
        if not (current / "meta.json").exists() and (old / "meta.json").exists():
            shutil.rmtree(current, ignore_errors=True)
            old.rename(current)
            fsync_path(self.root)

    def _load_local_state(self) -> tuple[dict[int, int], int]:
        """Load the persisted catalogue and histories; returns their offsets (empty when none)
        and the events applied up to them."""
        if self.root is not None:
            self._restore_old_snapshot()
        d = self._snapshot_dir()
        if self.evaluate or not (d / "meta.json").exists():
            return {}, 0  # an evaluating run rebuilds its evaluation state from offset 0 instead
        meta = json.loads((d / "meta.json").read_text())
        if {int(p): s for p, s in meta["source_ids"].items()} != self.source_ids:
            return {}, 0  # another stream (a fresh log after a checkpoint restore): start over
        cat = pa.ipc.open_file(pa.memory_map(str(d / "catalogue.arrow"))).read_all()
        self.catalogue.load(cat.column("key").to_numpy(), cat.column("count").to_numpy())
        hist = pa.ipc.open_file(pa.memory_map(str(d / "histories.arrow"))).read_all()
        self.histories.load(hist.column("user").to_numpy(), hist.column("item").to_numpy())
        return {int(p): int(o) for p, o in meta["offsets"].items()}, int(meta["events_applied"])

    def _recover(self) -> None:
        """Resume after a crash (or a failed batch): re-send unacknowledged pushes, rebuild
        local state up to the committed offsets (from the last snapshot on), and finish a
        batch whose later passes never ran."""
        committed = self.wal.committed()
        self.step.clock_base = committed.clock_base
        pending = self.wal.pending()
        for rec, updates, recent in pending:
            # Shards that applied it drop it by push id; the rest apply the same gradients.
            parts = {name: (u.keys, u.grads, u.ids, u.create) for name, u in updates.items()}
            if recent is not None:
                # Read back from the file these are key arrays; still in memory (a retry in
                # the same process) they are the Keyed the push was built with.
                recent = (_keyed(getattr(recent[0], "keys", recent[0])), _keyed(getattr(recent[1], "keys", recent[1])),
                          recent[2])
            # Acknowledged before the next is sent, and before the commit below clears the
            # records: a resend lost on the way fails this recovery (the supervisor tries
            # again), and none can land behind a later seq, which a shard would drop.
            self.client.wait(self._push_raw(parts, PushId(self.producers[rec.partition], rec.seq), recent))
            self.recovered_pushes += 1
        resume = {p: committed.offsets.get(p, 0) for p in self.sources}
        redo: dict[int, PushRecord] = {}
        for rec, _, _ in pending:  # the last pending push of each partition decides its resume point
            if rec.pass_index == self.cfg.trainer.passes - 1:
                resume[rec.partition] = max(resume[rec.partition], rec.end)
                redo.pop(rec.partition, None)
            else:
                redo[rec.partition] = rec
        for p, rec in redo.items():
            resume[p] = rec.start
        # Counted apart: until the recovered position is whole, stats() shows the one before.
        base, applied = self._load_local_state()
        # Batch by batch in the order they were committed, then what is left up to resume:
        # the partitions share the catalogue, whose order the negatives are drawn by.
        pos = {p: base.get(p, 0) for p in self.sources}
        segments: list[list[int]] = []  # [partition, start, end]; a partition's consecutive batches in one
        for upto in [*self.wal.history(), resume]:
            for p in self.sources:
                end = min(upto.get(p, 0), resume[p])
                if end > pos[p]:
                    if segments and segments[-1][0] == p:
                        segments[-1][2] = end
                    else:
                        segments.append([p, pos[p], end])
                    pos[p] = end
        for p, start, end in segments:
            applied += self._replay(p, start, end)
        if self._may_refuse:
            # Replayed (and saved) catalogue items were never checked for a row here.
            self._unchecked = [self.catalogue.keys().copy()]
        self.offsets = dict(resume)
        self.events_applied = applied
        # Read as far as applied: a restart must not show fewer events read than applied.
        self.events_read = sum(resume.values())
        self.read_pos = dict(resume)
        self._prepared_to = dict(resume)
        for p, rec in redo.items():
            raw = self.sources[p].read(rec.start, rec.end - rec.start)
            batch = self._prepare(p, raw, rec.end)
            self.read_pos[p] = rec.end
            refs = self._train(batch, self._pull(batch), first_pass=rec.pass_index + 1)
            self._commit(batch, refs)
        self.wal.commit(self.offsets, self.events_applied, self.step.clock_base, self.num_workers)

    def _replay(self, p: int, start: int, upto: int) -> int:
        """Advance local state (catalogue, histories, evaluation history) over partition
        ``p``'s events ``[start, upto)``, as preparing them did; returns how many of them
        their batches applied (not set aside)."""
        applied, pos = 0, start
        while pos < upto:
            raw = self.sources[p].read(pos, min(8192, upto - pos))
            if raw.num_rows == 0:
                break
            end = int(raw.column("offset")[-1].as_py()) + 1
            batch = self.step.prepare(raw, end, self.catalogue, self.histories, partition=p, mine=self._admitted(p, raw))
            if self.evaluate:
                self.warm_chunks.mark(batch.user_keys, batch.positive)
                for u, i in zip(batch.user_keys[batch.positive].tolist(), batch.item_keys[batch.positive].tolist()):
                    self.seen[u].add(i)
            dead = sum((p, o) in self.dead.seen for o in batch.offsets.tolist()) if len(self.dead) else 0
            applied += len(batch.offsets) - dead
            pos = end
        return applied

    # -- stream ------------------------------------------------------------------------
    def _mine(self, raw: pa.RecordBatch) -> np.ndarray | None:
        """Which events of a file stream's batch are this trainer's (by user key); None: all."""
        if self.live or self.num_workers == 1:
            return None
        keys = raw.column("user_key").to_numpy(zero_copy_only=False)
        return (keys % np.uint64(self.num_workers)).astype(np.int64) == self.index

    def _read_next(self) -> tuple[int, pa.RecordBatch, int] | None:
        """The next batch to train: from the partitions in turn, the first with events at its read position."""
        parts = list(self.sources)
        for k in range(len(parts)):
            p = parts[(self._rr + k) % len(parts)]
            n = self.cfg.trainer.batch_size
            if self.max_events is not None:
                n = min(n, self.max_events - self.read_pos[p])
                if n <= 0:
                    continue
            raw = self.sources[p].read(self.read_pos[p], n)
            if raw.num_rows:
                self._rr = (self._rr + k + 1) % len(parts)
                end = int(raw.column("offset")[-1].as_py()) + 1
                self.read_pos[p] = end
                return p, raw, end
        return None

    def _exhausted(self) -> bool:
        if self.live:
            return False
        p, src = next(iter(self.sources.items()))
        if self.max_events is not None and self.read_pos[p] >= self.max_events:
            return True
        return src.end_offset is not None and self.read_pos[p] >= src.end_offset

    def _admitted(self, p: int, raw: pa.RecordBatch) -> np.ndarray | None:
        """Which events of partition ``p``'s ``raw`` this trainer prepares (None: all): its own
        (:meth:`_mine`) whose weight the model accepts. An event with a weight the model
        refuses (``model.weight_problem``, what ``POST /events`` answers 422 for) can still
        reach the log behind the door (a direct append); it is set aside to the dead letters
        and leaves no trace in local state or on a shard: a finite but huge confidence (1e20)
        gives finite gradients whose squares overflow the shards' float32 Adagrad state, which
        would freeze every row the event touched (and its negatives) for good."""
        mine = self._mine(raw)
        m = self.cfg.model
        w = raw.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
        types = raw.column("event_type")
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(w) | weight_out_of_bounds(w, m, is_rating(types))
        if mine is not None:
            bad &= mine
        if not bad.any():
            return mine
        idx = np.flatnonzero(bad)
        bad_types = [types[j].as_py() for j in idx.tolist()]
        self.dead.add_rows(p, raw.column("offset").to_numpy(zero_copy_only=False)[idx],
                           ids_from_arrow(raw.column("user_id"))[idx], ids_from_arrow(raw.column("item_id"))[idx],
                           w[idx], bad_types,
                           [m.weight_problem(float(f"{x:.7g}"), t) or f"weight: {x:.7g} is refused by the model"
                            for x, t in zip(w[idx].tolist(), bad_types)])
        return ~bad if mine is None else mine & ~bad

    def _prepare(self, p: int, raw: pa.RecordBatch, end: int) -> Batch:
        if self._snapshot_is_due() and self._capture is None and self._prepared_to != self.offsets:
            # Read ahead: the snapshot due at the commit of the batches already prepared
            # needs the state before this one.
            self._capture = (dict(self._prepared_to), self._local_state())
        batch = self.step.prepare(raw, end, self.catalogue, self.histories, partition=p, mine=self._admitted(p, raw))
        self._note_history_users(batch)
        if len(batch.offsets) and batch.offsets[0] <= self.dead.last.get(p, -1):
            # Set aside by an earlier try of this batch (a pass before a crash, or before a
            # failure retried): left out of every pass as in a run without the crash, and
            # counted once, as a dead letter (as _replay counts it). Only a batch redone can
            # hold one: the others start past every event set aside.
            seen = self.dead.seen
            batch.active &= np.fromiter(((p, o) not in seen for o in batch.offsets.tolist()), bool, len(batch.offsets))
        self._prepared_to[p] = end
        if self._global_clock and raw.num_rows:
            batch.clock = self.sources[p].clock(end - 1)
        if len(batch.ingest_ts):
            self._unapplied[(p, batch.start)] = float(batch.ingest_ts.min())
        return batch

    # -- evaluation --------------------------------------------------------------------
    def _evaluate(self, batch: Batch) -> None:
        """Rank before training (:func:`workers.eval.protocol.progressive_ranks`): the positives
        ``freshet eval`` would rank (a user's positives after their first chunk of 20 positives,
        :class:`workers.eval.protocol.WarmChunks`) are ranked with the model as of before this
        batch, the user's seen items and session context updated event by event within it (as
        read-your-writes gives a live client); hits@10/20 and NDCG@10 of the model and of the
        all-time popularity baseline, over the same events."""
        from workers.eval.protocol import RankTally, progressive_ranks

        users, items, positive = batch.user_keys, batch.item_keys, batch.positive
        warm = self.warm_chunks.mark(users, positive)
        if warm.any():
            if self._eval_rankers is None:
                m = self.cfg.model
                self._eval_rankers = (Ranker(self.cache, m),
                                      Ranker(self.cache, m.model_copy(update={"recent_table": None, "context_table": None})))
            self.cache.sync()
            uniq = np.unique(users[positive])
            got, found = self.client.pull_many({self.cfg.model.user_table: _keyed(uniq)})[self.cfg.model.user_table]
            rows = {u: (got[r] if found[r] else None) for r, u in enumerate(uniq.tolist())}
            row_of = {u: r for r, u in enumerate(batch.users.keys.tolist())}
            ctx = {u: batch.ctx[[j for j in batch.ctx_inv[row_of[u]].tolist() if j >= 0]] for u in uniq.tolist() if u in row_of}
            seen = {u: np.fromiter(self.seen[u], np.uint64) for u in uniq.tolist() if u in self.seen}
            model_r, pop_r, fallbacks = progressive_ranks(*self._eval_rankers, users, items, positive, rows, seen, ctx,
                                                          warm=warm, depth=max(20, self.eval_k))
            RankTally.add(self.metrics, model_r, "model_")
            RankTally.add(self.metrics, pop_r, "popular_")
            self.metrics["eval_events"] += int(warm.sum())
            self.metrics["model_hits"] += int(((model_r >= 0) & (model_r < self.eval_k)).sum())
            self.metrics["popular_hits"] += int(((pop_r >= 0) & (pop_r < self.eval_k)).sum())
            self.metrics["model_fallbacks"] += fallbacks
        self.metrics["cold_events"] += int((positive & ~warm).sum())
        for u, i in zip(users[positive].tolist(), items[positive].tolist()):
            self.seen[u].add(i)

    # -- training ----------------------------------------------------------------------
    def _pull(self, batch: Batch, after: tuple[PushId, list] | None = None):
        """Pull a batch's rows (absent ones as their initial rows); ``after`` = the
        not-yet-awaited push they must reflect."""
        return self.client.pull_async(self.step.pull_requests(batch), initial=True, after=after)

    def _push_raw(self, parts: dict[str, tuple], push_id: PushId, recent) -> list:
        updates = {name: (Keyed(k, ids), g, c) for name, (k, g, ids, c) in parts.items()}
        return self.client.push_async(updates, push_id, recent)

    def _train(self, batch: Batch, pending, first_pass: int = 0, settle: tuple[Batch, list] | None = None) -> list:
        """Passes ``first_pass..`` over ``batch``; returns the pushes' refs (not yet awaited).
        Each pass but the last brings the next pass's rows back with its push. ``settle``
        (the previous batch and its push refs) is committed once the first gradients are
        computed, before anything of this batch is written or sent."""
        refs: list = []
        last_pass: list = []  # the refs of this batch's previous pass's push
        producer = self.producers[batch.partition]
        passes = self.cfg.trainer.passes
        for p in range(first_pass, passes):
            pulled = pending.result()
            updates, loss, bad = self.step.gradients(batch, pulled, p)
            if settle is not None:
                # A producer's pushes must reach the shards in order and be acknowledged one
                # at a time: a shard drops a push whose seq is below one it has applied (a
                # retried earlier push would be lost), and the WAL's pending records must be
                # exactly the unacknowledged pushes. The gradients above ran while the shards
                # applied the previous push.
                self._commit(*settle)
                settle = None
            if len(bad):
                self.dead.add(batch, bad, "non-finite loss or gradients")
            self.metrics["loss_sum"] += loss
            recent = None
            if p == 0:
                updates.update(self.step.counts(batch))
                recent = self.step.recent(batch)
            seq = batch.start * _SEQ_PER_BATCH + p
            if last_pass:
                # The rows of this pass acknowledge the last pass's push only on the shards
                # that sent rows; a shard holding none of them got a push alone, which must
                # be acknowledged too before this one follows it (as ``settle`` above).
                self.client.wait(last_pass)
            if self.wal is not None:
                self.wal.write(PushRecord(seq, batch.start, batch.end, p, batch.partition), _table_updates(updates), recent)
            if p + 1 < passes:  # one call per shard instead of a push and a pull
                push_refs, pending = self.client.push_pull_async(updates, PushId(producer, seq), recent,
                                                                 self.step.pull_requests(batch), initial=True)
            else:
                push_refs = self.client.push_async(updates, PushId(producer, seq), recent)
            refs += push_refs
            last_pass = push_refs
            batch.seqs.append(seq)
        return refs

    def _commit(self, batch: Batch, refs: list) -> None:
        self.client.wait(refs)
        now = time.time()
        trained = batch.trained
        self.freshness_ms.extend(((now - batch.ingest_ts[trained]) * 1000.0).tolist())
        # Applied = processed for good: trained, or teaching nothing by the model's rules (a
        # weight of 0, an ignored low rating). Dead letters are counted apart, so that after
        # a drain accepted == applied + dead_lettered.
        self.events_applied += int(batch.active.sum())
        self.events_read += batch.end - batch.start
        self.offsets[batch.partition] = batch.end
        self.batches += 1
        self.retries = 0
        self._last_progress = now
        # This batch and any of its partition before it (left by a failed run, if nothing
        # reset the local state since).
        for key in [k for k in self._unapplied if k[0] == batch.partition and k[1] <= batch.start]:
            del self._unapplied[key]
        if self._may_refuse and len(batch.new_items):
            self._unchecked.append(batch.new_items)
        if self.wal is not None:
            self.wal.commit(self.offsets, self.events_applied, self.step.clock_base, self.num_workers)
            self._since_snapshot += 1
            if self._snapshot_is_due():
                self._snapshot_at_commit()

    def learn(self, raw: pa.RecordBatch, end: int, partition: int = 0) -> None:
        """Train one batch of events now (prepare, every pass, wait): for in-process drivers
        such as the evaluation's incremental strategy. ``raw`` is an event batch in the
        schema of :mod:`workers.events` from ``partition``; ``end`` is the stream offset one
        past its last event.

        Raises:
            ray.exceptions.GetTimeoutError: a shard does not answer within the client's
                ``timeout_s`` (the batch is not committed).
        """
        batch = self._prepare(partition, raw, end)
        self.read_pos[partition] = end
        refs = self._train(batch, self._pull(batch)) if batch.trained.any() else []
        self._commit(batch, refs)

    def _sync_lifecycle(self, unpushed: tuple[Batch | None, ...] = ()) -> None:
        """Drop items the PS removed (expiry, eviction) or never gave a row (admission, a full
        table) from the catalogue and histories, so they are never sampled as negatives or
        used as context; trainer 0 also drops them from every user's recent items on the
        shards. Drop users the PS removed from the histories, so a user who comes back
        starts a fresh session context, and users it never gave a row once they go quiet
        (:meth:`_sweep_rowless_users`).

        ``unpushed``: batches prepared (the catalogue and histories advanced past them) whose
        pushes are not yet acknowledged. Their IDs are kept, since the shards may not have
        their rows yet and the push on its way gives them one, and checked again at the next
        sync (removed in full then if they still have no row)."""
        now = time.monotonic()
        if not any(self._lifecycle.values()) or now - self._lifecycle_at < self.cfg.trainer.lifecycle_sync_s:
            return
        self._lifecycle_at = now
        reader = f"{self.cfg.namespace}/{trainer_actor_name(self.index)}"
        since = list(self._removed_since)
        held, self._held = self._held, collections.defaultdict(list)
        coming = [b for b in unpushed if b is not None]
        # The events whose items prepare() added to the catalogue and whose users' and items'
        # rows the batch's push creates.
        taught = [b.positive | b.dislike for b in coming]
        none = [np.empty(0, np.uint64)]
        keep = {self.cfg.model.item_table: np.concatenate([b.item_keys[t] for b, t in zip(coming, taught)] or none),
                self.cfg.model.user_table: np.concatenate([b.user_keys[t] for b, t in zip(coming, taught)] or none)}

        def without_coming(keys: np.ndarray, table: str, later: list) -> np.ndarray:
            """``keys`` less those an unpushed batch brings back, which go to ``later``."""
            back = np.isin(keys, keep[table])
            if back.any():
                later.append(keys[back])
            return keys[~back]

        versions = None
        for table, known in ((self.cfg.model.item_table, self.catalogue.keys),
                             (self.cfg.model.user_table, self.histories.users)):
            if not self._lifecycle[table]:
                continue
            replies = self.client.removed(table, since, reader)
            got = [v for v, _, _ in replies]
            versions = got if versions is None else [min(a, b) for a, b in zip(versions, got)]
            gone = [k for _, k, _ in replies if len(k)] + held[table]
            if any(full for _, _, full in replies):
                live = np.concatenate([k for _, k in self.client.live_keys(table)])
                have = known()
                gone.append(have[~np.isin(have, live)])
            keys = np.unique(np.concatenate(gone)) if gone else np.empty(0, np.uint64)
            if not len(keys):
                continue
            # A tombstone outlives its removal: the ID may have a row again by now (a new
            # interaction), and forgetting it then would drop that interaction: from its
            # user's recent items (a just-seen item ranked back to them), or the history a
            # returning user has started again.
            keys = without_coming(keys[~self.client.present(table, _keyed(keys))], table, self._held[table])
            if table == self.cfg.model.user_table:
                self.histories.forget_users(keys)
                continue
            if len(keys):
                self.catalogue.remove(keys)
                self.histories.forget_items(keys)
                if self.index == 0:
                    self.client.forget_items(_keyed(keys))
        if versions is not None:
            self._removed_since = versions
        self._sweep_rowless_users(keep[self.cfg.model.user_table])
        if self._unchecked:
            # Never had a row, so in no one's recent items or histories as a live item: only
            # the catalogue must lose them (an item admitted later comes back with its next event).
            fresh = np.unique(np.concatenate(self._unchecked))
            self._unchecked = []
            fresh = without_coming(fresh, self.cfg.model.item_table, self._unchecked)
            self.catalogue.remove(fresh[~self.client.present(self.cfg.model.item_table, _keyed(fresh))])

    def _note_history_users(self, batch: Batch) -> None:
        if self._rowless_sweep is not None:
            self._rowless_sweep.note(batch.user_keys[batch.positive])

    def _sweep_rowless_users(self, coming: np.ndarray) -> None:
        """Drop the histories of users without a row in the user table and without a positive
        prepared since the previous sweep (``ps.recent_without_row_s`` apart), as the shards drop
        such users' recent items. Their rows never come (not admitted), so no tombstone ever
        names them, and one-off users would otherwise fill the histories without bound.
        ``coming``: users of batches not yet pushed, kept (their push may admit them)."""
        if self._rowless_sweep is None:
            return
        table = self.cfg.model.user_table
        drop = self._rowless_sweep.sweep(time.monotonic(), self.histories.users,
                                         lambda users: ~self.client.present(table, _keyed(users)), keep=coming)
        if drop is not None:
            self.histories.forget_users(drop)

    def _expire_idle(self) -> None:
        """Trainer 0, while it waits for events: run the shards' TTL expiry, which otherwise
        runs only with a push, so an idle service still lets IDs expire."""
        now = time.monotonic()
        if self.index != 0 or not self._ttl or now - self._expired_at < self.cfg.trainer.idle_expire_s:
            return
        self._expired_at = now
        self.client.expire()

    def _train_batch(self, batch: Batch, pending, on_batch: Callable[[int, float], None] | None,
                     settle: tuple[Batch, list] | None = None) -> list:
        """:meth:`_train` for a batch with something to train (``settle`` is committed either
        way), then ``on_batch``; returns the pushes' refs."""
        loss0 = self.metrics["loss_sum"]
        if batch.trained.any():
            refs = self._train(batch, pending, settle=settle)
        else:
            if settle is not None:
                self._commit(*settle)
            refs = []
        if on_batch is not None:
            on_batch(int(batch.active.sum()), float(self.metrics["loss_sum"] - loss0))
        return refs

    def _read_ahead(self, pushed: tuple[Batch, list] | None) -> tuple[Batch, Any] | None:
        """Read and prepare the next batch and send its pull, ordered on every shard after
        ``pushed`` (a batch and its push refs, not yet awaited; None: nothing in flight).
        Returns ``(batch, pending pull)``, or None when no events are there now."""
        got = self._read_next()
        if got is None:
            return None
        nb = self._prepare(*got)
        after = None
        if pushed is not None and pushed[0].seqs:
            after = (PushId(self.producers[pushed[0].partition], pushed[0].seqs[-1]), pushed[1])
        return nb, self._pull(nb, after=after)

    def run(self, max_batches: int | None = None, *, on_batch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
        """Train until the stream is exhausted (finite sources), ``stop()`` or ``max_batches``.

        A live source with nothing new is waited on (``StreamSource.wait``) for up to
        ``trainer.poll_interval_s`` seconds at a time: the ingest log answers as soon as
        events arrive. ``on_batch(events, loss)`` is called once each batch's pushes are
        sent, with the events it applies and its loss sum (nats): for in-process drivers
        that show progress. ``max_batches`` batches are trained, none read ahead past them;
        a batch read ahead when ``stop()`` came is trained before this returns. Returns
        :meth:`stats`.

        Raises:
            Exception: what a failing batch raised; :meth:`start` retries it.
        """
        stale = self.cfg.trainer.staleness > 0
        inflight: tuple[Batch, list] | None = None
        nxt = None  # (batch, pending pull) read ahead while the shards apply a push
        unevaluated = False  # nxt was read ahead before the push its evaluation must see
        done_batches = 0
        self.state = "running"
        while not self._stop.is_set() and (max_batches is None or done_batches < max_batches):
            self._sync_lifecycle((inflight[0] if inflight else None, nxt[0] if nxt else None))
            if nxt is None:
                got = self._read_next()
                if got is None:
                    if inflight:
                        self._commit(*inflight)
                        inflight = None
                    if self._exhausted():
                        break
                    self._last_progress = time.time()  # idle, not stalled
                    self._expire_idle()
                    # Only partitions below max_events can bring work: waiting on one at its
                    # limit would return at once, forever.
                    waiting = {p: pos for p, pos in self.read_pos.items()
                               if self.max_events is None or pos < self.max_events}
                    if waiting:
                        next(iter(self.sources.values())).wait(waiting, self.cfg.trainer.poll_interval_s)
                    else:
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
            if unevaluated:
                # Ranked with the model as of every earlier push, though trained on rows
                # pulled before the last of them.
                if inflight:
                    self._commit(*inflight)
                    inflight = None
                self._evaluate(batch)
                unevaluated = False
            if inflight and self.client.done(inflight[1]):
                # Applied already: commit now, so freshness and offsets say when it landed,
                # not after this batch's first gradients (the settle below).
                self._commit(*inflight)
                inflight = None
            last = self._stop.is_set() or (max_batches is not None and done_batches + 1 >= max_batches)
            settle = None
            if stale and not last:
                # Bounded delay 1: the next batch's rows are pulled now, before this batch's
                # push, so the shards answer that pull while the trainer computes and apply
                # this push while it computes the next. The pull still follows every earlier
                # push (``inflight``), even one Ray retries after a shard restart.
                nxt = self._read_ahead(inflight)
                unevaluated = nxt is not None and self.evaluate
            if inflight:
                # Read ahead (staleness 1, or prefetch while the shards applied it): committed by
                # _train after this batch's first gradients and before its first push, so each
                # shard gets this trainer's pushes acknowledged one at a time, in order, even
                # a shard this batch pulled nothing from (its pull waits only on the shards it
                # reads), and one that restarts meanwhile (Ray may retry two unacknowledged
                # pushes out of order, and a shard drops a seq below one it has applied).
                settle, inflight = inflight, None
            t0 = time.perf_counter()
            refs = self._train_batch(batch, pending, on_batch, settle)
            self.train_s += time.perf_counter() - t0
            inflight = (batch, refs)
            done_batches += 1
            if stale or last:
                pass  # the next batch is on its way already, or there is none to read now
            elif self.cfg.trainer.prefetch and not self.evaluate:
                # Read and pull the next batch while the shards apply this push; the pull is
                # ordered after the push on every shard.
                nxt = self._read_ahead(inflight)
            else:
                self._commit(*inflight)
                inflight = None
        if inflight:
            self._commit(*inflight)
        if nxt is not None:  # read ahead (and prepared): train it, so local state and offsets agree
            batch, pending = nxt
            if unevaluated:
                self._evaluate(batch)
            self._commit(batch, self._train_batch(batch, pending, on_batch))
        done = self.done or self._exhausted()
        self.state = "done" if done else "stopped"
        self.done = done  # last, after every commit: stats() reads it first (see there)
        return self.stats()

    def start(self) -> bool:
        """Run :meth:`run` in a supervised background thread (for ``stats()`` while it trains)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._supervised, name="freshet-trainer", daemon=True)
            self._thread.start()
        return True

    def _supervised(self) -> None:
        """:meth:`run`, retried with backoff from the last committed state when a batch fails;
        an actor that keeps failing exits, so Ray restarts it."""
        while not self._stop.is_set():
            try:
                if self._must_recover:
                    # Each try starts from the last committed state, as a restart would. A
                    # recovery that fails is a failed try too: training on half-recovered
                    # state would skip the unfinished batch (or re-read from offset 0 in other
                    # batch boundaries, re-applying pushes under new ids).
                    shown = dict(self.offsets), self.events_applied, self.events_read
                    self._reset_local_state()
                    if self.wal is not None:
                        # The committed position stays what stats() (and the stop() of a
                        # checkpoint save, which records it) report while the state is
                        # rebuilt, and if rebuilding it fails.
                        self.offsets, self.events_applied, self.events_read = shown
                        self._recover()
                    self._must_recover = False
                self.run()
                return
            except Exception:  # noqa: BLE001 - every failure is retried or escalated, never swallowed
                self._must_recover = True
                self.error = traceback.format_exc()
                self.retries += 1
                _log.error("trainer %d: batch failed (try %d of %d):\n%s", self.index, self.retries,
                           self.cfg.trainer.max_retries + 1, self.error)  # the first try and max_retries more
                if self.retries > self.cfg.trainer.max_retries:
                    self.state = "failed"
                    if _in_actor():
                        os._exit(1)  # Ray restarts the actor, which resumes from its committed offset
                    return
                self.state = "retrying"
                # Backoff doubles per consecutive failure (a committed batch resets retries), so
                # a transient fault months later waits retry_backoff_s again, not the cap.
                self._stop.wait(min(self.cfg.trainer.retry_backoff_s * 2 ** (self.retries - 1), _MAX_BACKOFF_S))

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the background loop after the current batch, waiting up to ``timeout_s``
        seconds for it; returns :meth:`stats`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.wal is not None and self.batches and self._prepared_to == self.offsets and not self._must_recover:
            self._save_local_state()  # not while a batch is still prepared past them (join timed out)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Counters: events read/applied, offsets per partition, throughput, freshness (ms),
        state, lag (the age of the oldest event read but not yet applied, seconds), dead
        letters and evaluation metrics; every figure finite JSON or null.

        Called while the training thread runs, and read without a lock: ``done`` is read
        first, and :meth:`run` sets it after its last commit, so a snapshot that says done
        counts every event (read later, ``done`` could be True beside the counters of a
        batch before: 5,900 of 6,000 events applied, in a fault test under load)."""
        done = self.done
        fr = np.asarray(self.freshness_ms, dtype=np.float64)
        now = time.time()
        # One C-level pass over the values (the training thread may add a batch meanwhile).
        oldest = min(tuple(self._unapplied.values()), default=None)
        elapsed = max(1e-9, now - self.started_at)
        running = self._thread is not None and self._thread.is_alive()
        return {
            "trainer": self.index,
            "source_id": self.source_ids.get(0, next(iter(self.source_ids.values()))),
            "source_ids": {str(p): s for p, s in self.source_ids.items()},
            "device": str(self.device),
            "state": self.state,
            "applied_offset": int(sum(self.offsets.values())),
            "applied_offsets": {str(p): o for p, o in self.offsets.items()},
            "clock_base": self.step.clock_base,
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
            "lag_s": (now - oldest) if oldest is not None else 0.0,
            "last_progress_age_s": now - self._last_progress,
            "metrics": {k: (float(v) if np.isfinite(v) else None) for k, v in self.metrics.items()},
            "done": done,
            "running": running,
            "error": self.error,
            "retries": self.retries,
            "dead_lettered": len(self.dead),
            "end_offset": None if self.live else next(iter(self.sources.values())).end_offset,
            "quarantined": int(sum(s.quarantined for s in self.sources.values())),
            "recovered_pushes": self.recovered_pushes,
            "catalogue": len(self.catalogue),
        }

    def ping(self) -> int:
        """Liveness probe; returns the trainer index."""
        return self.index

    def pid(self) -> int:
        """OS process id of this trainer (for operators and fault tests)."""
        return os.getpid()


_CATALOGUE_SCHEMA = pa.schema([pa.field("key", pa.uint64()), pa.field("count", pa.float64())])
_HISTORY_SCHEMA = pa.schema([pa.field("user", pa.uint64()), pa.field("item", pa.uint64())])


def check_saved_state(d: Path) -> None:
    """Read the local state a trainer saved in ``d`` (:meth:`Trainer._save_local_state`: its
    ``meta.json`` fields and both Arrow files) whole, as a trainer resuming from it will; for
    a copy about to be restored (``freshet ckpt restore``), which must not be found damaged
    only by the trainer, after the restore has replaced what it restores into.

    Raises:
        FileNotFoundError, ValueError: naming the file at fault.
    """
    from ps.persist import read_ipc_file

    try:
        meta = json.loads((d / "meta.json").read_text())
        _ = ({int(p): int(o) for p, o in meta["offsets"].items()}, int(meta["events_applied"]),
             {int(p): str(s) for p, s in meta["source_ids"].items()})
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{d / 'meta.json'}: not a readable trainer state ({type(e).__name__}: {e})") from None
    for name, schema in (("catalogue.arrow", _CATALOGUE_SCHEMA), ("histories.arrow", _HISTORY_SCHEMA)):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name}: missing")
        if missing := set(schema.names) - set(read_ipc_file(d / name).column_names):
            raise ValueError(f"{d / name}: no column {sorted(missing)} (not a trainer's saved state)")


def _keyed(keys: np.ndarray) -> Keyed:
    return Keyed(np.asarray(keys, np.uint64))


def _table_updates(updates: dict[str, tuple]) -> dict:
    """``{table: (Keyed, grads, create)}`` as the WAL records them."""
    out = {}
    for name, entry in updates.items():
        k, grads, create = entry[0], entry[1], entry[2] if len(entry) > 2 else None
        out[name] = TableUpdate(name, k.keys, np.asarray(grads, np.float32), k.ids, create)
    return out


def _in_actor() -> bool:
    try:
        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - outside Ray there is no actor to restart
        return False


def gpus_per_trainer(cfg: "FreshetConfig", cluster_gpus: float) -> float:
    """GPUs each trainer actor reserves: ``trainer.num_gpus`` when set; else, for
    ``trainer.device`` auto or cuda on a cluster with GPUs, a share of them (at most one
    each). Ray hides every GPU from an actor that reserves none, so without a reservation
    ``auto`` could never pick CUDA inside the actor."""
    if cfg.trainer.num_gpus > 0 or cfg.trainer.device == "cpu" or cluster_gpus < 1:
        return cfg.trainer.num_gpus
    return min(1.0, float(int(cluster_gpus)) / cfg.trainer.num_workers)


def start_trainers(
    cfg: "FreshetConfig",
    *,
    detached: bool = False,
    evaluate: bool = False,
    max_events: int | None = None,
    state_dir: str | Path | None = None,
    autostart: bool = False,
) -> list:
    """Create ``cfg.trainer.num_workers`` named trainer actors (not yet started).

    With ``state_dir`` each trainer keeps its write-ahead pushes, committed offsets and
    local-state snapshots there, so a restarted trainer (Ray ``max_restarts``) resumes
    exactly once; ``autostart`` starts training in ``__init__`` (so a restarted trainer
    carries on). Returns the actor handles; a trainer's constructor errors (see
    :class:`Trainer`) surface on the first call to it, as ``ray.exceptions.RayActorError``.

    Raises:
        ValueError: an actor named ``trainer-{i}`` already exists in ``cfg.namespace`` (Ray).
    """
    actor_cls = ray.remote(Trainer)
    handles = []
    num_gpus = gpus_per_trainer(cfg, ray.cluster_resources().get("GPU", 0.0))
    for i in range(cfg.trainer.num_workers):
        opts: dict[str, Any] = dict(
            name=trainer_actor_name(i),
            namespace=cfg.namespace,
            num_cpus=cfg.trainer.num_cpus,
            num_gpus=num_gpus,
            max_restarts=cfg.trainer.max_restarts,
            max_concurrency=4,  # the training thread plus stats()/stop() calls
        )
        if detached:
            opts["lifetime"] = "detached"
        handles.append(
            actor_cls.options(**opts).remote(i, cfg, evaluate=evaluate, max_events=max_events, state_dir=state_dir, autostart=autostart)
        )
    return handles
