"""One training step's math: turn a batch of events into the rows to pull and, per pass,
the sparse gradients to push. Shared by the trainer actor (:mod:`workers.trainer`, rows
on the PS shards) and by in-process runs (the benchmark's twin and fast evaluation,
rows in a ``ps.local.LocalClient``), so both compute exactly the same pushes.

What an event teaches is the model's rule (:func:`workers.model.signals`): a positive
(with a confidence that scales its BPR term and its popularity count) is ranked above
fresh uniform negatives in every pass; a dislike, with ``model.negative_feedback:
explicit``, pushes that item's score down for the user. Only real interactions may
create rows (``create``); negatives and context items change existing rows only.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from ps.ids import Keyed, ids_from_arrow
from workers.config import LossKind, NegativeFeedback
from workers.model import bpr_loss, dislike_loss, mse_loss, signals, user_queries
from workers.negatives import Catalogue

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = ["Batch", "Histories", "TrainStep", "first_seen"]


def first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique, inverse)`` of ``keys`` (``uint64``) with the unique ones in first-seen order."""
    if not len(keys):
        return keys, np.empty(0, np.int64)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)]


class Histories:
    """Each user's latest ``width`` positive items (keys): the session context of their next
    events. Bounded per user; users are dropped with :meth:`forget_users`."""

    def __init__(self, width: int):
        self.width = width
        self._users: dict[int, collections.deque] = {}

    def __len__(self) -> int:
        return len(self._users)

    def of(self, user: int) -> tuple[int, ...]:
        """The user's items, oldest first."""
        d = self._users.get(user)
        return tuple(d) if d is not None else ()

    def remember(self, users: np.ndarray, items: np.ndarray) -> None:
        """Append ``items`` to their ``users``' histories, in order."""
        for u, i in zip(users.tolist(), items.tolist()):
            d = self._users.get(u)
            if d is None:
                d = self._users[u] = collections.deque(maxlen=self.width)
            d.append(i)

    def forget_items(self, items: np.ndarray) -> None:
        """Drop ``items`` from every history (removed from the PS)."""
        gone = set(np.asarray(items, np.uint64).tolist())
        for u, d in list(self._users.items()):
            if any(i in gone for i in d):
                self._users[u] = collections.deque((i for i in d if i not in gone), maxlen=self.width)

    def capture(self) -> tuple[np.ndarray, np.ndarray]:
        """``(users, items)`` flat, oldest first per user."""
        users = [u for u, d in self._users.items() for _ in d]
        items = [i for d in self._users.values() for i in d]
        return np.asarray(users, np.uint64), np.asarray(items, np.uint64)

    def load(self, users: np.ndarray, items: np.ndarray) -> None:
        """Replace everything with what :meth:`capture` gave."""
        self._users = {}
        self.remember(np.asarray(users, np.uint64), np.asarray(items, np.uint64))


@dataclass
class Batch:
    """One mini-batch of this trainer's events, prepared for every pass."""

    partition: int
    start: int  # first offset read
    end: int  # one past the last offset read
    offsets: np.ndarray  # int64 [b]
    user_keys: np.ndarray  # uint64 [b]
    user_ids: np.ndarray  # [b] as given
    item_keys: np.ndarray  # uint64 [b]
    item_ids: np.ndarray  # [b] as given
    weights: np.ndarray  # float32 [b]
    event_types: list | None
    ingest_ts: np.ndarray  # float64 [b]
    confidence: np.ndarray  # float32 [b]
    positive: np.ndarray  # bool [b]: trained as a positive
    dislike: np.ndarray  # bool [b]: trained as an explicit dislike
    users: Keyed  # distinct users of trained events, first-seen order
    user_inv: np.ndarray  # int64 [b] into users (-1 for events not trained)
    items: Keyed  # distinct items: the events' items, then every pass's negatives
    item_real: np.ndarray  # bool [len(items)]: a real interaction may create its row
    item_inv: np.ndarray  # int64 [b] into items
    neg_inv: np.ndarray  # int64 [passes, b, m] into items (rows of non-positive events unused)
    ctx: np.ndarray  # uint64 context item keys of the batch's users
    ctx_inv: np.ndarray  # int64 [len(users), context_items] into ctx; -1 pads
    active: np.ndarray  # bool [b]: not set aside as poison
    seqs: list[int] = field(default_factory=list)  # push seqs sent for this batch

    @property
    def trained(self) -> np.ndarray:
        """Events that teach something and are not poison (``bool [b]``)."""
        return self.active & (self.positive | self.dislike)


class TrainStep:
    """The math of a training step for trainer ``trainer_index`` of ``cfg`` on ``device``."""

    def __init__(self, cfg: "FreshetConfig", *, trainer_index: int = 0, device: torch.device | None = None):
        self.cfg, self.model, self.trainer_index = cfg, cfg.model, trainer_index
        self.device = device or torch.device("cpu")
        self.passes = cfg.trainer.passes

    # -- preparing -----------------------------------------------------------------------
    def prepare(
        self,
        raw: pa.RecordBatch,
        end: int,
        catalogue: Catalogue,
        histories: Histories,
        *,
        partition: int = 0,
        mine: np.ndarray | None = None,
    ) -> Batch:
        """Prepare the events of ``raw`` (those with ``mine`` True) and advance ``catalogue``
        and ``histories`` past them: in stream order, so a restart that prepares the same
        batch from the same state draws the same negatives."""
        m = self.model
        start = int(raw.column("offset")[0].as_py()) if raw.num_rows else end
        sel = slice(None) if mine is None else mine
        offsets = raw.column("offset").to_numpy(zero_copy_only=False)[sel]
        user_keys = raw.column("user_key").to_numpy(zero_copy_only=False)[sel]
        item_keys = raw.column("item_key").to_numpy(zero_copy_only=False)[sel]
        user_ids = ids_from_arrow(raw.column("user_id"))[sel]
        item_ids = ids_from_arrow(raw.column("item_id"))[sel]
        weights = raw.column("weight").to_numpy(zero_copy_only=False)[sel].astype(np.float32)
        types = raw.column("event_type")
        event_types = None if types.null_count == len(types) else [t for t, k in zip(types.to_pylist(), _mask(mine, len(types))) if k]
        ingest_ts = raw.column("ingest_ts").to_numpy(zero_copy_only=False)[sel]
        b = len(offsets)
        if m.loss == LossKind.MSE:
            confidence, positive, dislike = np.ones(b, np.float32), np.ones(b, bool), np.zeros(b, bool)
        else:
            confidence, positive, dislike = signals(weights, event_types, m)
            if m.negative_feedback == NegativeFeedback.IGNORE:
                dislike = np.zeros(b, bool)
        # Negatives depend only on (seed, trainer, partition, batch start) and the catalogue,
        # so a restarted trainer recomputes exactly the pushes it lost.
        rng = np.random.default_rng([self.cfg.ps.seed, self.trainer_index, partition, start])
        taught = positive | dislike
        catalogue.add(item_keys[positive], confidence[positive])
        catalogue.add(item_keys[dislike], np.zeros(int(dislike.sum())))  # a row, never popular
        n_neg = m.num_negatives if m.loss == LossKind.BPR else 0
        negs = [catalogue.sample(b, n_neg, m.popularity_negative_fraction, rng) for _ in range(self.passes)] if n_neg and b else []
        uniq_users, user_inv = first_seen(user_keys[taught])
        inv = np.full(b, -1, np.int64)
        inv[taught] = user_inv
        first_of = np.flatnonzero(taught)[np.unique(user_inv, return_index=True)[1]] if taught.any() else np.empty(0, np.int64)
        users = Keyed(uniq_users, user_ids[first_of] if len(first_of) else user_ids[:0])
        ctx, ctx_inv = self._contexts(uniq_users, histories)
        histories.remember(user_keys[positive], item_keys[positive])
        all_items = np.concatenate([item_keys, *negs]) if negs else item_keys
        uniq_items, item_inv_all = first_seen(all_items)
        item_real = np.zeros(len(uniq_items), bool)
        item_real[item_inv_all[:b][taught]] = True
        ids_u = np.zeros(len(uniq_items), np.int64) if item_ids.dtype == np.int64 else np.zeros(len(uniq_items), object)
        ids_u[item_inv_all[:b]] = item_ids
        neg_inv = item_inv_all[b:].reshape(self.passes, b, n_neg) if negs else np.empty((self.passes, b, 0), np.int64)
        return Batch(
            partition, start, end, offsets, user_keys, user_ids, item_keys, item_ids, weights, event_types, ingest_ts,
            confidence, positive, dislike, users, inv, Keyed(uniq_items, ids_u), item_real, item_inv_all[:b], neg_inv,
            ctx, ctx_inv, np.ones(b, bool),
        )

    def _contexts(self, uniq_users: np.ndarray, histories: Histories) -> tuple[np.ndarray, np.ndarray]:
        """``(ctx, ctx_inv)``: the users' history items before this batch, as indices."""
        m = self.model
        if m.context_table is None:
            return np.empty(0, np.uint64), np.full((len(uniq_users), 0), -1, np.int64)
        index: dict[int, int] = {}
        idx = np.full((len(uniq_users), m.context_items), -1, np.int64)
        for r, u in enumerate(uniq_users.tolist()):
            for c, x in enumerate(histories.of(u)[-m.context_items:]):
                idx[r, c] = index.setdefault(x, len(index))
        return np.fromiter(index, np.uint64, len(index)), idx

    def pull_requests(self, batch: Batch) -> dict[str, Keyed]:
        """``{table: keys}`` of every row the batch's passes read."""
        m = self.model
        items = Keyed(batch.items.keys)
        out = {m.user_table: Keyed(batch.users.keys), m.item_table: items, m.item_bias_table: items}
        if m.context_table is not None and len(batch.ctx):
            out[m.context_table] = Keyed(batch.ctx)
        return out

    # -- computing -----------------------------------------------------------------------
    def losses(self, batch: Batch, pulled: dict[str, tuple[np.ndarray, np.ndarray]], p: int, events: np.ndarray):
        """Per-event loss terms (``[len(events)]``, nats) of pass ``p`` over ``events`` (indices
        of trained events), with the leaf tensors they depend on: ``(terms, leaves)``."""
        m, dev = self.model, self.device
        U = torch.from_numpy(pulled[m.user_table][0]).to(dev).requires_grad_()
        I = torch.from_numpy(pulled[m.item_table][0]).to(dev).requires_grad_()
        B = torch.from_numpy(np.ascontiguousarray(pulled[m.item_bias_table][0][:, 0])).to(dev).requires_grad_()
        C, Q = None, U
        if m.context_table is not None and len(batch.ctx):
            C = torch.from_numpy(pulled[m.context_table][0]).to(dev).requires_grad_()
            Q = user_queries(U, C, torch.from_numpy(batch.ctx_inv).to(dev))
        ui = torch.from_numpy(batch.user_inv[events]).to(dev)
        ii = torch.from_numpy(batch.item_inv[events]).to(dev)
        conf = torch.from_numpy(batch.confidence[events]).to(dev)
        if m.loss == LossKind.MSE:
            target = torch.from_numpy(batch.weights[events]).to(dev)
            terms = mse_loss(Q[ui], I[ii], B[ii], target, l2=m.l2, reduction="none")
        else:
            pos = torch.from_numpy(batch.positive[events]).to(dev)
            terms = torch.zeros(len(events), dtype=torch.float32, device=dev)
            if bool(pos.any()):
                pe = torch.nonzero(pos).reshape(-1)
                ni = torch.from_numpy(batch.neg_inv[p][events]).to(dev)[pe]
                terms = terms.index_add(0, pe, bpr_loss(Q[ui[pe]], I[ii[pe]], B[ii[pe]], I[ni], B[ni], conf[pe], l2=m.l2,
                                                        reduction="none"))
            if bool((~pos).any()):
                de = torch.nonzero(~pos).reshape(-1)
                terms = terms.index_add(0, de, dislike_loss(Q[ui[de]], I[ii[de]], B[ii[de]], conf[de], reduction="none"))
        return terms, (U, I, B, C)

    def gradients(
        self, batch: Batch, pulled: dict[str, tuple[np.ndarray, np.ndarray]], p: int
    ) -> tuple[dict[str, tuple], float, np.ndarray]:
        """Pass ``p``'s gradients for the rows it touched, as push updates
        ``{table: (Keyed, grads, create)}``, the summed loss (nats), and the events found to
        be poison (``int64`` indices whose terms or gradients are not finite; they are set
        inactive in ``batch`` and the rest recomputed without them)."""
        m = self.model
        bad: list[int] = []
        while True:
            events = np.flatnonzero(batch.trained)
            if not len(events):
                return {}, 0.0, np.asarray(bad, np.int64)
            terms, leaves = self.losses(batch, pulled, p, events)
            finite = torch.isfinite(terms).cpu().numpy()
            if not finite.all():
                culprits = events[~finite]
            else:
                loss = terms.sum()
                loss.backward()
                grads = [x.grad for x in leaves if x is not None]
                if all(bool(torch.isfinite(g).all()) for g in grads):
                    break
                culprits = self._bisect(batch, pulled, p, events)
            batch.active[culprits] = False
            bad.extend(culprits.tolist())
        U, I, B, C = leaves
        used = np.unique(batch.item_inv[events]) if m.loss == LossKind.MSE or not len(events) else np.unique(
            np.concatenate([batch.item_inv[events], batch.neg_inv[p][events][batch.positive[events]].reshape(-1)]))
        user_rows = np.unique(batch.user_inv[events])
        item_keys = Keyed(batch.items.keys[used], batch.items.ids[used])
        create = batch.item_real[used]
        out = {
            m.user_table: (batch.users.take(user_rows), U.grad.cpu().numpy()[user_rows], np.ones(len(user_rows), bool)),
            m.item_table: (item_keys, I.grad.cpu().numpy()[used], create),
            m.item_bias_table: (item_keys, B.grad.cpu().numpy()[used, None], create),
        }
        if C is not None:
            out[m.context_table] = (Keyed(batch.ctx), C.grad.cpu().numpy(), np.zeros(len(batch.ctx), bool))
        return out, float(loss.detach()), np.asarray(bad, np.int64)

    def _bisect(self, batch: Batch, pulled, p: int, events: np.ndarray) -> np.ndarray:
        """The events whose gradients alone are not finite (halving the suspects), or all of
        ``events`` when no smaller group explains it."""
        def ok(sub: np.ndarray) -> bool:
            terms, leaves = self.losses(batch, pulled, p, sub)
            if not bool(torch.isfinite(terms).all()):
                return False
            terms.sum().backward()
            return all(bool(torch.isfinite(x.grad).all()) for x in leaves if x is not None)

        bad, todo = [], [events]
        while todo:
            sub = todo.pop()
            if ok(sub):
                continue
            if len(sub) == 1:
                bad.append(int(sub[0]))
            else:
                todo += [sub[: len(sub) // 2], sub[len(sub) // 2 :]]
        return np.asarray(bad, np.int64) if bad else events

    def counts(self, batch: Batch) -> dict[str, tuple]:
        """The first pass's popularity updates: each positive item's confidence-weighted count
        in the batch, into the popularity and recent-popularity tables."""
        m = self.model
        pos = batch.active & batch.positive
        keys, inv = first_seen(batch.item_keys[pos])
        if not len(keys):
            return {}
        counts = np.bincount(inv, weights=batch.confidence[pos], minlength=len(keys)).astype(np.float32)
        ids = batch.item_ids[pos][np.unique(inv, return_index=True)[1]]
        k = Keyed(keys, ids)
        out = {m.popularity_table: (k, counts[:, None])}
        if m.recent_table is not None:
            # The batch's counts, valid at its end offset; the clock is in half-lives.
            clock = np.full(len(keys), batch.end / m.recent_halflife_events, np.float32)
            out[m.recent_table] = (k, np.stack([counts, clock], axis=1))
        return out

    def recent(self, batch: Batch) -> tuple[Keyed, Keyed, np.ndarray] | None:
        """``(users, items, offsets)`` of the batch's positives, for the users' recent items."""
        pos = batch.active & batch.positive
        return (Keyed(batch.user_keys[pos]), Keyed(batch.item_keys[pos]), batch.offsets[pos]) if pos.any() else None


def _mask(mine: np.ndarray | None, n: int) -> Any:
    return mine.tolist() if mine is not None else [True] * n
