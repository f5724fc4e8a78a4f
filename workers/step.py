"""One training step's math: turn a batch of events into the rows to pull and, per pass,
the sparse gradients to push. Shared by the trainer actor (:mod:`workers.trainer`, rows
on the PS shards) and by in-process runs (the benchmark's twin and fast evaluation,
rows in a ``ps.local.LocalClient``), so both compute exactly the same pushes.

What an event teaches is the model's rule (:func:`workers.model.signals`): a positive
(with a confidence that scales its BPR term and its popularity count) is ranked above
fresh uniform negatives in every pass; a dislike, with ``model.negative_feedback:
explicit``, pushes that item's score down for the user. Only real interactions may
create rows (``create``), in a batch's first pass only (admission counts each batch with
an interaction once, whatever the passes); negatives and context items change existing
rows only.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ps.ids import Keyed, ids_from_arrow
from ps.index import unique_keys
from ps.lazy import torch
from ps.optim import decayed_rows
from workers.config import LossKind, NegativeFeedback
from workers.model import bpr_loss, dislike_loss, mse_loss, signals, user_queries
from workers.negatives import Catalogue

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = ["Batch", "DeviceTransfer", "Histories", "TrainStep", "first_seen"]


def first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique, inverse)`` of ``keys`` (``uint64``) with the unique ones in first-seen order."""
    uniq, inverse, _ = _first_seen(keys)
    return uniq, inverse


def _first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`first_seen` plus each unique key's first position (``int64``, ascending)."""
    if not len(keys):
        return keys, np.empty(0, np.int64), np.empty(0, np.int64)
    uniq, first, inverse = unique_keys(keys)
    # The first positions are distinct in [0, n): their ranks come from one pass over a
    # mark array, not a sort.
    mark = np.zeros(len(keys), bool)
    mark[first] = True
    rank = np.cumsum(mark)[first] - 1
    order = np.empty_like(rank)
    order[rank] = np.arange(len(rank))
    return uniq[order], rank[inverse.reshape(-1)], first[order]


def _distinct(idx: np.ndarray, n: int) -> np.ndarray:
    """``np.unique`` of indices ``idx`` in ``[0, n)`` (``int64``), in O(n) instead of a sort."""
    mark = np.zeros(n, bool)
    mark[idx] = True
    return np.flatnonzero(mark)


class Histories:
    """Each user's latest ``width`` positive items (keys): the session context of their next
    events. Bounded per user, and to ``max_users`` users (the least recently active go
    first); users are dropped with :meth:`forget_users`."""

    def __init__(self, width: int, max_users: int | None = None):
        self.width = width
        self.max_users = max_users
        # Least recently active first; an OrderedDict, because evicting from a dict's front one
        # user at a time leaves holes every later next(iter()) walks past (a cost growing with the cap).
        self._users: collections.OrderedDict[int, collections.deque] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._users)

    def users(self) -> np.ndarray:
        """The users with a history (``uint64`` keys)."""
        return np.fromiter(self._users, np.uint64, len(self._users))

    def forget_users(self, users: np.ndarray) -> None:
        """Drop the histories of ``users`` (keys; removed from the PS)."""
        for u in np.asarray(users, np.uint64).tolist():
            self._users.pop(u, None)

    def of(self, user: int) -> tuple[int, ...]:
        """The user's items, oldest first."""
        d = self._users.get(user)
        return tuple(d) if d is not None else ()

    def remember(self, users: np.ndarray, items: np.ndarray) -> None:
        """Append ``items`` to their ``users``' histories, in order."""
        cap = self.max_users
        for u, i in zip(users.tolist(), items.tolist()):
            d = self._users.get(u)
            if d is None:
                d = self._users[u] = collections.deque(maxlen=self.width)
                # Dropped as each new user comes, not once per call: the same events leave the
                # same histories however they are split into calls (a restart replays them in
                # larger reads than the batches that trained them).
                if cap is not None and len(self._users) > cap:
                    self._users.popitem(last=False)
            else:
                self._users.move_to_end(u)  # the most recently active
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
        self._users = collections.OrderedDict()
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
    new_items: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # new to the catalogue here
    clock: int | None = None  # the stream's position at the batch's end, across partitions (default: end)

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
        self.transfer = DeviceTransfer(self.device)
        self.clock_base = 0  # events before the stream's offset 0 (workers.wal.Committed.clock_base)

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
        new_items = [catalogue.add(item_keys[positive], confidence[positive]),
                     catalogue.add(item_keys[dislike], np.zeros(int(dislike.sum())))]  # a row, never popular
        n_neg = m.num_negatives if m.loss == LossKind.BPR else 0
        # An empty catalogue (a first batch that teaches nothing) has nothing to draw: no event
        # here needs negatives then, and the rng is untouched as sample() would leave it.
        negs = ([catalogue.sample(b, n_neg, m.popularity_negative_fraction, rng) for _ in range(self.passes)]
                if n_neg and b and len(catalogue) else [])
        uniq_users, user_inv, first_pos = _first_seen(user_keys[taught])
        inv = np.full(b, -1, np.int64)
        inv[taught] = user_inv
        first_of = np.flatnonzero(taught)[first_pos] if taught.any() else np.empty(0, np.int64)
        users = Keyed(uniq_users, user_ids[first_of] if len(first_of) else user_ids[:0])
        ctx, ctx_inv = self._contexts(uniq_users, histories)
        if m.context_table is not None:  # histories are only ever read as session context
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
            ctx, ctx_inv, np.ones(b, bool), new_items=np.concatenate(new_items),
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
        m = self.model
        ctx = m.context_table is not None and len(batch.ctx)
        whole = len(events) == len(batch.offsets)  # every event: no selection copies

        def sel(a: np.ndarray) -> np.ndarray:
            return a if whole else a[events]

        positive = sel(batch.positive)
        bpr = m.loss != LossKind.MSE
        all_pos = bpr and bool(positive.all())
        floats = {
            "U": pulled[m.user_table][0],
            "I": pulled[m.item_table][0],
            "B": pulled[m.item_bias_table][0].reshape(-1),
            "conf": sel(batch.confidence),
        }
        ints = {"ui": sel(batch.user_inv), "ii": sel(batch.item_inv)}
        if ctx:
            floats["C"] = pulled[m.context_table][0]
            ints["ctx"] = batch.ctx_inv
        if m.loss == LossKind.MSE:
            floats["target"] = sel(batch.weights)
        elif all_pos:
            ints["ni"] = sel(batch.neg_inv[p])
        else:
            ints["pos"] = positive.astype(np.int64)
            ints["ni"] = sel(batch.neg_inv[p])
        t = self.transfer.to_device(floats, ints)
        U, I, B = t["U"].requires_grad_(), t["I"].requires_grad_(), t["B"].requires_grad_()
        C, Q = None, U
        if ctx:
            C = t["C"].requires_grad_()
            Q = user_queries(U, C, t["ctx"])
        ui, ii, conf = t["ui"], t["ii"], t["conf"]
        if m.loss == LossKind.MSE:
            terms = mse_loss(Q[ui], I[ii], B[ii], t["target"], l2=m.l2, reduction="none")
        elif all_pos:  # the usual batch: positives only, no selections to scatter back
            ni = t["ni"]
            terms = bpr_loss(Q[ui], I[ii], B[ii], I[ni], B[ni], conf, l2=m.l2, reduction="none")
        else:
            pos = t["pos"].bool()
            terms = torch.zeros(len(events), dtype=torch.float32, device=self.device)
            if bool(positive.any()):
                pe = torch.nonzero(pos).reshape(-1)
                ni = t["ni"][pe]
                terms = terms.index_add(0, pe, bpr_loss(Q[ui[pe]], I[ii[pe]], B[ii[pe]], I[ni], B[ni], conf[pe], l2=m.l2,
                                                        reduction="none"))
            if not bool(positive.all()):
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
        fast = self._bpr_fast(batch, pulled, p)
        while fast is None:
            events = np.flatnonzero(batch.trained)
            if not len(events):
                return {}, 0.0, np.asarray(bad, np.int64)
            terms, leaves = self.losses(batch, pulled, p, events)
            loss = terms.sum()
            # A sum of finite terms is finite unless it overflows: one reduction checks them
            # all, and only a non-finite sum needs the per-event look.
            finite = None if bool(torch.isfinite(loss)) else torch.isfinite(terms).cpu().numpy()
            if finite is not None and not finite.all():
                culprits = events[~finite]
            else:
                loss.backward()
                grads = [x.grad for x in leaves if x is not None]
                if _all_finite(grads):
                    break
                culprits = self._bisect(batch, pulled, p, events)
            batch.active[culprits] = False
            bad.extend(culprits.tolist())
        if fast is not None:
            events, loss, grad_tensors = fast
        else:
            grad_tensors = [x.grad if x is not None else None for x in leaves]
        gU, gI, gB, gC = grad_tensors
        n_items, n_users = len(batch.items.keys), len(batch.users.keys)
        if m.loss == LossKind.MSE:
            used = _distinct(batch.item_inv[events], n_items)
        else:
            pos = events[batch.positive[events]]
            used = _distinct(np.concatenate([batch.item_inv[events], batch.neg_inv[p][pos].reshape(-1)]), n_items)
        user_rows = _distinct(batch.user_inv[events], n_users)
        host = self.transfer.to_host([gU, gI, gB] + ([gC] if gC is not None else []))
        gu, gi, gb = host[0], host[1], host[2].reshape(-1, 1)
        all_items, all_users = len(used) == n_items, len(user_rows) == n_users
        item_keys = batch.items if all_items else Keyed(batch.items.keys[used], batch.items.ids[used])
        # Only the first pass's push counts as the interaction: admission counts the pushes
        # that may create a row, and the later passes are the same events again.
        first = p == 0
        create = (batch.item_real if all_items else batch.item_real[used]) & first
        out = {
            m.user_table: (batch.users if all_users else batch.users.take(user_rows), gu if all_users else gu[user_rows],
                           np.full(len(user_rows), first)),
            m.item_table: (item_keys, gi if all_items else gi[used], create),
            m.item_bias_table: (item_keys, gb if all_items else gb[used], create),
        }
        if gC is not None:
            out[m.context_table] = (Keyed(batch.ctx), host[3], np.zeros(len(batch.ctx), bool))
        return out, float(loss.detach()), np.asarray(bad, np.int64)

    def _bpr_fast(self, batch: Batch, pulled, p: int):
        """The usual BPR step without autograd: every event of the batch a trained positive.

        The same loss terms as :func:`workers.model.bpr_loss` (the sum is the same number),
        with the gradients written out by hand: one gather of all item rows a pass reads
        and one scatter-add per table, where autograd takes several of each. Returns
        ``(events, loss, [gU, gI, gB, gC])``, or None when the batch needs the general path
        (dislikes, MSE, events not trained) or anything is not finite (the general path
        then finds the culprits).
        """
        m = self.model
        b = len(batch.offsets)
        if m.loss == LossKind.MSE or not b or not bool((batch.trained & batch.positive).all()):
            return None
        ctx = m.context_table is not None and len(batch.ctx)
        floats = {
            "U": pulled[m.user_table][0],
            "I": pulled[m.item_table][0],
            "B": pulled[m.item_bias_table][0].reshape(-1),
            "conf": batch.confidence,
        }
        ints = {"ui": batch.user_inv, "ii": batch.item_inv, "ni": batch.neg_inv[p]}
        if ctx:
            floats["C"] = pulled[m.context_table][0]
            ints["ctx"] = batch.ctx_inv
        t = self.transfer.to_device(floats, ints)
        U, I, B, conf = t["U"], t["I"], t["B"], t["conf"]
        ui, ii, ni = t["ui"], t["ii"], t["ni"]
        k = ni.shape[1]
        d = I.shape[1]
        Q = U
        if ctx:
            C, cidx = t["C"], t["ctx"]
            mask = (cidx >= 0).to(U.dtype)
            count = mask.sum(1, keepdim=True).clamp(min=1.0)
            Q = user_queries(U, C, cidx)
        idx = torch.cat([ii, ni.reshape(-1)])
        rows = I.index_select(0, idx)
        bias = B.index_select(0, idx)
        q = Q.index_select(0, ui)
        pos, neg = rows[:b], rows[b:].view(b, k, d)
        x_pos = (q * pos).sum(-1) + bias[:b]
        x_neg = torch.einsum("bd,bmd->bm", q, neg) + bias[b:].view(b, k)
        diff = x_pos.unsqueeze(1) - x_neg
        per_event = -torch.nn.functional.logsigmoid(diff).mean(1) * conf
        l2 = m.l2
        terms = per_event + l2 * (q.square().sum(-1) + pos.square().sum(-1) + neg.square().sum(-1).mean(1)) if l2 else per_event
        loss = terms.sum()
        # d term / d diff = -conf / k * sigmoid(-diff)
        g = torch.sigmoid(-diff).mul_((conf / -k).unsqueeze(1))
        g_pos = g.sum(1)
        gq = g_pos.unsqueeze(1) * pos - torch.bmm(g.unsqueeze(1), neg).squeeze(1)
        gp = g_pos.unsqueeze(1) * q
        gn = g.unsqueeze(2) * q.unsqueeze(1)
        gn = gn.neg_()
        if l2:
            gq.add_(q, alpha=2 * l2)
            gp.add_(pos, alpha=2 * l2)
            gn.add_(neg, alpha=2 * l2 / k)
        flat_ni = ni.reshape(-1)
        gI = torch.zeros_like(I).index_add_(0, ii, gp).index_add_(0, flat_ni, gn.reshape(-1, d))
        gB = torch.zeros_like(B).index_add_(0, ii, g_pos).index_add_(0, flat_ni, g.reshape(-1), alpha=-1).reshape(-1)
        gU = torch.zeros_like(U).index_add_(0, ui, gq)
        gC = None
        if ctx:
            # Q = U + mean of the valid context rows: each valid entry gets its user's share.
            share = (gU / count).unsqueeze(1) * mask.unsqueeze(2)
            gC = torch.zeros_like(C).index_add_(0, cidx.clamp(min=0).reshape(-1), share.reshape(-1, d))
        if not bool(torch.isfinite(loss)) or not _all_finite([x for x in (gU, gI, gB, gC) if x is not None]):
            return None
        return np.arange(b), loss, [gU, gI, gB, gC]

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
        keys, inv, first = _first_seen(batch.item_keys[pos])
        if not len(keys):
            return {}
        counts = np.bincount(inv, weights=batch.confidence[pos], minlength=len(keys)).astype(np.float32)
        ids = batch.item_ids[pos][first]
        k = Keyed(keys, ids)
        out = {m.popularity_table: (k, counts[:, None])}
        if m.recent_table is not None:
            # The batch's counts, valid at its end; the clock is in half-lives. With several
            # ingest partitions the end is the log's global position: offsets count each
            # partition apart, and a partition behind another would have its counts decayed.
            end = (batch.end if batch.clock is None else batch.clock) + self.clock_base
            out[m.recent_table] = (k, decayed_rows(counts, end / m.recent_halflife_events,
                                                   self.cfg.ps.table(m.recent_table).dim))
        return out

    def recent(self, batch: Batch) -> tuple[Keyed, Keyed, np.ndarray] | None:
        """``(users, items, offsets)`` of the batch's positives, for the users' recent items."""
        pos = batch.active & batch.positive
        return (Keyed(batch.user_keys[pos]), Keyed(batch.item_keys[pos]), batch.offsets[pos]) if pos.any() else None


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: one sum each (a sum of finite floats
    can still overflow, so a non-finite sum is checked element by element)."""
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


class DeviceTransfer:
    """Moves a step's inputs to the trainer's device and its gradients back.

    On the CPU nothing is copied: tensors share the numpy arrays' memory. On CUDA the
    float inputs and the index inputs are each packed into one pinned host buffer (kept
    and grown across steps) and sent with one asynchronous copy apiece, and the gradients
    come back packed in one device-to-host copy into pinned memory.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._pinned: dict[torch.dtype, torch.Tensor] = {}
        self._event = None  # CUDA event after the last copy out of the pinned buffers

    def _buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._pinned.get(dtype)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1 << 16, 0 if buf is None else 2 * buf.numel()), dtype=dtype, pin_memory=True)
            self._pinned[dtype] = buf
        return buf

    def to_device(self, floats: dict[str, np.ndarray], ints: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``float32`` and ``int64`` arrays as tensors on the device (by the same names)."""
        if not self.cuda:
            out = {k: torch.from_numpy(_writable(v, np.float32)) for k, v in floats.items()}
            out.update({k: torch.from_numpy(_writable(v, np.int64)) for k, v in ints.items()})
            return out
        if self._event is not None:  # the buffers are about to be overwritten: the last copies must be done
            self._event.synchronize()
        out = {}
        for group, dtype, np_dtype in ((floats, torch.float32, np.float32), (ints, torch.int64, np.int64)):
            if not group:
                continue
            sizes = [int(np.size(v)) for v in group.values()]
            buf = self._buffer(dtype, sum(sizes))
            host = buf.numpy()
            at = 0
            for v, n in zip(group.values(), sizes):
                host[at : at + n] = np.asarray(v, np_dtype).reshape(-1)
                at += n
            dev = buf[:at].to(self.device, non_blocking=True)
            at = 0
            for (k, v), n in zip(group.items(), sizes):
                out[k] = dev[at : at + n].view(np.shape(v))
                at += n
        self._event = torch.cuda.Event()
        self._event.record()
        return out

    def to_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """``tensors`` as numpy arrays (float32, same shapes): views on the CPU, one packed
        device-to-host copy on CUDA."""
        if not self.cuda:
            return [t.numpy() for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        host = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
        host.copy_(flat)  # synchronous: the gradients are needed now
        out, at = [], 0
        for t in tensors:
            out.append(host[at : at + t.numel()].numpy().reshape(tuple(t.shape)))
            at += t.numel()
        return out


def _mask(mine: np.ndarray | None, n: int) -> Any:
    return mine.tolist() if mine is not None else [True] * n


def _writable(a: np.ndarray, dtype: type) -> np.ndarray:
    """``a`` as a contiguous ``dtype`` array torch may own: a read-only one (rows from
    ``ray.get``, which live in Ray's shared object store) is copied first, so no tensor op
    can ever write into the store."""
    out = np.ascontiguousarray(a, dtype)
    return out if out.flags.writeable else out.copy()
