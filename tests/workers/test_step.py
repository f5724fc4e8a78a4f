"""What one training step (:mod:`workers.step`) sends to the PS, pinned in-process (no Ray):
which rows a batch pulls and pushes and which may create rows, the session context each
user's query reads, the negatives each pass draws, the loss terms of the general path (mixed
positives and dislikes, MSE), and the popularity and recent-item updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ps.ids import id_keys
from ps.local import LocalClient
from ps.optim import decayed_rows
from serving.config import load_config
from workers.events import make_events
from workers.negatives import Catalogue
from workers.step import DeviceTransfer, Histories, TrainStep


def _cfg(**model):
    return load_config(None, {"model": model} if model else {})


def _raw(start, users, items, weights, types=None):
    n = len(users)
    return make_events(list(range(start, start + n)), users, items, [1.0] * n, weights, 0.0, event_types=types)


def _key(x) -> int:
    return int(id_keys([x])[0])


def _keys(xs) -> list[int]:
    return id_keys(list(xs)).tolist()


def _prepare(step, raw, catalogue=None, histories=None, **kw):
    catalogue = Catalogue() if catalogue is None else catalogue
    histories = Histories(step.model.context_items) if histories is None else histories
    return step.prepare(raw, int(raw.column("offset")[-1].as_py()) + 1, catalogue, histories, **kw)


def _warm_catalogue(n_items=50, first=1000):
    """A catalogue of ``n_items`` items (IDs ``first..``), each seen once."""
    cat = Catalogue()
    cat.add(id_keys(list(range(first, first + n_items))))
    return cat


# -- preparing ---------------------------------------------------------------------------


def test_histories_keep_only_each_users_latest_width_items():
    h = Histories(width=2)
    h.remember(np.asarray([1, 1, 1, 2], np.uint64), np.asarray([10, 11, 12, 20], np.uint64))
    assert h.of(1) == (11, 12) and h.of(2) == (20,)
    users, items = h.capture()
    assert users.tolist() == [1, 1, 2] and items.tolist() == [11, 12, 20]


def test_user_ids_stay_with_their_keys_when_untaught_events_come_first():
    # The PS stores the ID of each row it creates from the push's (keys, ids): an ID paired
    # with another user's key would name the wrong user in every later answer.
    step = TrainStep(_cfg())
    raw = _raw(0, ["u0", "u1", "u2", "u1"], ["a", "b", "c", "d"], [0.0, 1.0, 1.0, 2.0])  # u0's event teaches nothing
    batch = _prepare(step, raw)
    assert batch.users.keys.tolist() == _keys(["u1", "u2"])
    assert batch.users.ids.tolist() == ["u1", "u2"]
    assert batch.user_inv.tolist() == [-1, 0, 1, 0]
    assert batch.items.ids[batch.item_inv].tolist() == ["a", "b", "c", "d"]
    assert batch.items.keys[batch.item_inv].tolist() == _keys("abcd")


def test_context_is_the_users_newest_items_from_before_the_batch():
    step = TrainStep(_cfg(context_items=2))
    cat, hist = Catalogue(), Histories(4)  # wider than the context: the context is the newest end
    first = _prepare(step, _raw(0, ["u", "u", "u"], ["a", "b", "c"], [1.0, 1.0, 1.0]), cat, hist)
    # The first batch has no context: its own items are not the history it is ranked against.
    assert len(first.ctx) == 0 and (first.ctx_inv == -1).all()
    second = _prepare(step, _raw(3, ["u", "v"], ["d", "a"], [1.0, 1.0]), cat, hist)
    assert second.users.ids.tolist() == ["u", "v"]
    # u's two newest items before this batch, oldest first; v has none (padding).
    assert second.ctx[second.ctx_inv[0]].tolist() == _keys(["b", "c"])
    assert second.ctx_inv[1].tolist() == [-1, -1]
    assert hist.of(_key("u")) == tuple(_keys("abcd"))


def test_only_positives_enter_the_history():
    step = TrainStep(_cfg())
    hist = Histories(step.model.context_items)
    batch = _prepare(step, _raw(0, ["u", "u", "u"], ["a", "b", "c"], [1.0, -1.0, 0.0]), histories=hist)
    assert batch.dislike.tolist() == [False, True, False]
    assert hist.of(_key("u")) == (_key("a"),)


def test_event_types_follow_the_events_this_trainer_keeps():
    # mine drops the first event; the purchase (x5) must stay with the third event, not slide onto the second.
    step = TrainStep(_cfg(event_weights={"purchase": 5.0}))
    raw = _raw(0, ["u", "v", "w"], ["a", "b", "c"], [1.0, 1.0, 1.0], types=["view", "view", "purchase"])
    batch = _prepare(step, raw, mine=np.asarray([False, True, True]))
    assert batch.event_types == ["view", "purchase"]
    assert batch.confidence.tolist() == [1.0, 5.0]
    assert batch.offsets.tolist() == [1, 2] and batch.items.ids[batch.item_inv].tolist() == ["b", "c"]


def test_each_pass_draws_fresh_negatives_and_each_batch_its_own():
    cfg = _cfg()
    step = TrainStep(cfg)
    assert step.passes >= 2
    raw = _raw(0, ["u", "v"], [1000, 1001], [1.0, 1.0])
    batch = _prepare(step, raw, _warm_catalogue(200))
    negs = [batch.items.keys[batch.neg_inv[p]] for p in range(step.passes)]
    assert negs[0].shape == (2, cfg.model.num_negatives)
    assert not np.array_equal(negs[0], negs[1])
    # The same events at another position of the stream draw other negatives; at the same
    # position, from the same catalogue, the same ones (a restart redoes the same pushes).
    moved = _prepare(step, _raw(500, ["u", "v"], [1000, 1001], [1.0, 1.0]), _warm_catalogue(200))
    again = _prepare(step, raw, _warm_catalogue(200))
    assert not np.array_equal(batch.items.keys[batch.neg_inv[0]], moved.items.keys[moved.neg_inv[0]])
    np.testing.assert_array_equal(batch.items.keys[batch.neg_inv], again.items.keys[again.neg_inv])


def test_a_dislike_gives_its_item_a_row_but_no_popularity():
    step = TrainStep(_cfg())
    cat = Catalogue()
    batch = _prepare(step, _raw(0, ["u", "v"], ["a", "b"], [1.0, -3.0]), cat)
    assert set(batch.new_items.tolist()) == set(_keys("ab"))
    counts = dict(zip(cat.keys().tolist(), cat.counts().tolist()))
    assert counts == {_key("a"): 1.0, _key("b"): 0.0}  # never drawn as a popular negative


# -- pushing -----------------------------------------------------------------------------


def _push(step, batch, p, client=None):
    client = LocalClient(step.cfg.ps) if client is None else client
    pulled = client.pull_many(step.pull_requests(batch), initial=True)
    updates, loss, bad = step.gradients(batch, pulled, p)
    assert not len(bad)
    return updates, loss, pulled


def test_only_taught_items_of_the_first_pass_create_rows():
    # Item 1000 is in the catalogue (an earlier batch) and here only in an event that teaches
    # nothing: drawn as a negative its gradient is pushed, but it must not count as an
    # interaction (admission counts creating pushes).
    step = TrainStep(_cfg())
    m = step.model
    batch = _prepare(step, _raw(0, ["u", "v", "w"], ["a", 1000, "c"], [1.0, 0.0, -1.0]), _warm_catalogue(3))
    assert batch.trained.tolist() == [True, False, True]
    updates, _, _ = _push(step, batch, 0)
    keys, _, create = updates[m.item_table]
    made = dict(zip(keys.keys.tolist(), create.tolist()))
    assert _key(1000) in made, "the untaught item was drawn as a negative"
    assert made[_key(1000)] is False or made[_key(1000)] == 0
    assert {k for k, c in made.items() if c} == set(_keys(["a", "c"]))
    np.testing.assert_array_equal(updates[m.item_bias_table][2], create)
    users, _, user_create = updates[m.user_table]
    assert users.ids.tolist() == ["u", "w"] and user_create.all()
    # Later passes train the same events again: they create nothing.
    for p in range(1, step.passes):
        later, _, _ = _push(step, batch, p)
        for table in (m.user_table, m.item_table, m.item_bias_table):
            assert not later[table][2].any(), (p, table)


def test_context_rows_get_gradients_but_are_never_created():
    step = TrainStep(_cfg())
    m = step.model
    cat, hist = Catalogue(), Histories(m.context_items)
    client = LocalClient(step.cfg.ps)
    first = _prepare(step, _raw(0, ["u", "u"], ["a", "b"], [1.0, 1.0]), cat, hist)
    client.push_async(_push(step, first, 0, client)[0], ("t", 0))
    batch = _prepare(step, _raw(2, ["u"], ["c"], [1.0]), cat, hist)
    updates, _, _ = _push(step, batch, 0, client)
    keys, grads, create = updates[m.context_table]
    assert sorted(keys.keys.tolist()) == sorted(_keys("ab"))
    assert np.abs(grads).sum() > 0 and not create.any()


def test_a_later_pass_pushes_its_own_negatives_rows():
    step = TrainStep(_cfg())
    m = step.model
    batch = _prepare(step, _raw(0, ["u", "v"], [1000, 1001], [1.0, 1.0]), _warm_catalogue(500))
    for p in range(step.passes):
        updates, _, _ = _push(step, batch, p)
        keys, grads, _ = updates[m.item_table]
        read = set(batch.items.keys[batch.item_inv].tolist()) | set(batch.items.keys[batch.neg_inv[p]].reshape(-1).tolist())
        assert set(keys.keys.tolist()) == read, p
        assert (np.abs(grads).sum(1) > 0).all(), p  # every row pushed was read by this pass


def test_poison_events_leave_no_rows_counts_or_recent_items():
    step = TrainStep(_cfg())
    m = step.model
    batch = _prepare(step, _raw(0, ["u", "x", "v"], ["a", "z", "b"], [1.0, 1.0, 1.0]), _warm_catalogue(5))
    batch.active[1] = False  # set aside as poison (its own user and item)
    updates, _, _ = _push(step, batch, 0)
    assert _key("x") not in updates[m.user_table][0].keys.tolist()
    assert updates[m.user_table][0].ids.tolist() == ["u", "v"]
    # The poison event's item is pushed only where this pass drew it as another event's negative.
    live = np.flatnonzero(batch.active)
    read = batch.items.keys[np.concatenate([batch.item_inv[live], batch.neg_inv[0][live].reshape(-1)])]
    assert sorted(updates[m.item_table][0].keys.tolist()) == sorted(set(read.tolist()))
    counts = step.counts(batch)
    assert counts[m.popularity_table][0].keys.tolist() == _keys("ab")
    users, items, offsets = step.recent(batch)
    assert users.keys.tolist() == _keys("uv") and items.keys.tolist() == _keys("ab") and offsets.tolist() == [0, 2]


# -- loss terms --------------------------------------------------------------------------


def _np(pulled, table):
    return np.asarray(pulled[table][0], np.float64)


def test_general_path_terms_weigh_by_confidence_with_l2():
    # Positives beside a dislike take the general (autograd) path: each positive's term must be
    # the same as when it trains alone (confidence and l2 included), and the dislike's term is
    # confidence * softplus(score).
    cfg = _cfg(event_weights={"purchase": 3.0}, l2=0.05, context_table=None)
    step = TrainStep(cfg)
    m = cfg.model
    raw = _raw(0, ["u", "v", "w"], ["a", "b", "c"], [1.0, -2.0, 0.5], types=["purchase", None, None])
    batch = _prepare(step, raw, _warm_catalogue(20))
    assert batch.positive.tolist() == [True, False, True] and batch.confidence.tolist() == [3.0, 2.0, 0.5]
    client = LocalClient(cfg.ps)
    pulled = client.pull_many(step.pull_requests(batch), initial=True)
    events = np.flatnonzero(batch.trained)
    mixed = step.losses(batch, pulled, 0, events)[0].detach().numpy().astype(np.float64)
    pos = np.flatnonzero(batch.positive)
    alone = step.losses(batch, pulled, 0, pos)[0].detach().numpy()
    np.testing.assert_allclose(mixed[pos], alone, rtol=1e-5)
    U, I, B = _np(pulled, m.user_table), _np(pulled, m.item_table), _np(pulled, m.item_bias_table).reshape(-1)
    for e in pos:  # by hand
        q, i, n = U[batch.user_inv[e]], batch.item_inv[e], batch.neg_inv[0][e]
        diff = (q @ I[i] + B[i]) - (I[n] @ q + B[n])
        want = batch.confidence[e] * np.mean(np.logaddexp(0, -diff))
        want += m.l2 * (q @ q + I[i] @ I[i] + np.mean((I[n] ** 2).sum(1)))
        assert mixed[e] == pytest.approx(want, rel=1e-4)
    x = U[batch.user_inv[1]] @ I[batch.item_inv[1]] + B[batch.item_inv[1]]
    assert mixed[1] == pytest.approx(2.0 * np.logaddexp(0, x), rel=1e-4)


def test_mse_fits_the_events_weights_and_pushes_only_their_rows():
    cfg = _cfg(loss="mse", context_table=None, l2=0.0)
    step = TrainStep(cfg)
    m = cfg.model
    raw = _raw(0, ["u", "v", "w"], ["a", "b", "a"], [4.0, 2.0, 5.0], types=["rating"] * 3)
    batch = _prepare(step, raw, _warm_catalogue(20))
    assert batch.neg_inv.shape[2] == 0
    pulled = LocalClient(cfg.ps).pull_many(step.pull_requests(batch), initial=True)
    pulled = {t: (np.zeros_like(r), f) for t, (r, f) in pulled.items()}  # every prediction 0
    updates, loss, bad = step.gradients(batch, pulled, 0)
    assert not len(bad)
    assert loss == pytest.approx(16 + 4 + 25)  # sum of (0 - rating)^2: the target is the rating itself
    keys, gb, create = updates[m.item_bias_table]
    got = dict(zip(keys.keys.tolist(), gb[:, 0].tolist()))
    assert got == pytest.approx({_key("a"): -2 * (4 + 5), _key("b"): -2 * 2})
    assert create.all()
    batch.active[1] = False  # b's only event set aside: b's row is not pushed
    updates, loss, _ = step.gradients(batch, pulled, 0)
    assert updates[m.item_table][0].keys.tolist() == [_key("a")] and loss == pytest.approx(41)


# -- popularity and recent items ---------------------------------------------------------


def test_popularity_counts_keep_each_item_with_its_id():
    step = TrainStep(_cfg())
    raw = _raw(0, ["u", "v", "w", "x"], ["a", "a", "q", "b"], [1.0, 2.0, 0.0, 1.0])
    batch = _prepare(step, raw)
    k, rows = step.counts(batch)[step.model.popularity_table]
    assert k.keys.tolist() == _keys("ab") and k.ids.tolist() == ["a", "b"]
    assert rows[:, 0].tolist() == [3.0, 1.0]


@pytest.mark.parametrize("clock,base", [(None, 0), (None, 700), (9000, 0), (9000, 700)])
def test_recent_counts_are_stamped_with_the_streams_clock(clock, base):
    cfg = _cfg()
    step = TrainStep(cfg)
    step.clock_base = base
    m = cfg.model
    batch = _prepare(step, _raw(100, ["u", "v"], ["a", "a"], [1.0, 1.0]))
    assert batch.end == 102
    batch.clock = clock
    k, rows = step.counts(batch)[m.recent_table]
    end = (102 if clock is None else clock) + base
    want = decayed_rows(np.asarray([2.0]), end / m.recent_halflife_events, cfg.ps.table(m.recent_table).dim)
    np.testing.assert_array_equal(rows, want)


# -- transfer ----------------------------------------------------------------------------


def test_read_only_inputs_are_copied_before_torch_sees_them():
    # Rows from Ray's object store are read-only: a tensor over them must never write into them.
    rows = np.ones((3, 2), np.float32)
    rows.flags.writeable = False
    t = DeviceTransfer(torch.device("cpu"))
    out = t.to_device({"rows": rows}, {})
    out["rows"].add_(1.0)
    assert (rows == 1.0).all()
