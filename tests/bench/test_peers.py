"""``bench.peers`` does the workload's math: plain torch learns and applies ``ps.optim``'s
row-wise Adagrad, and TorchRec / FBGEMM (skipped when not installed) train the same
model from the same rows. No timing assertions: figures live in BENCHMARKS.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.peers import (
    RUN_KEYS,
    PeerWorkload,
    bpr_loss,
    peer_missing,
    prepare,
    rowwise_adagrad_,
    run_fbgemm_tbe,
    run_peers,
    run_plain_torch,
    run_torchrec,
)
from ps import optim
from ps.ids import id_keys, init_rows
from workers.model import bpr_loss as freshet_bpr_loss

TINY = PeerWorkload(num_ids=1000, dim=8, batch=64, events=2000, seed=3)
ONE_BATCH = PeerWorkload(num_ids=1000, dim=8, batch=64, events=64, seed=5)

needs_torchrec = pytest.mark.skipif(peer_missing("torchrec") is not None, reason=str(peer_missing("torchrec")))
needs_fbgemm = pytest.mark.skipif(peer_missing("fbgemm") is not None, reason=str(peer_missing("fbgemm")))


def test_workload_is_deterministic_and_shaped():
    a, b = prepare(TINY), prepare(dataclasses.replace(TINY))
    assert a is b  # equal workloads share one preparation
    c = prepare(PeerWorkload(num_ids=1000, dim=8, batch=64, events=2000, seed=3, init="torch"))
    np.testing.assert_array_equal(a.users, c.users)  # the stream does not depend on the init
    assert len(c.batches) == TINY.num_batches == 32 and c.batches[-1][0].shape == (2000 - 31 * 64,)
    assert c.negatives.shape == (2000, 4) and c.users.min() >= 0 and c.items.max() < 1000
    # Zipf: the most frequent item is far above the uniform 2 hits per item.
    assert np.bincount(c.items).max() > 20
    # Rows are Freshet's: ID i's row equals init_rows of integer ID i under the PS seed.
    d = prepare(TINY)
    seed = (3 * 1_000_003 + int(id_keys(["item"])[0])) % (1 << 63)
    np.testing.assert_array_equal(
        d.item_rows[[0, 17, 999]].numpy(), init_rows(id_keys([0, 17, 999]), seed=seed, dim=8, scale=0.01)
    )
    assert float(d.user_rows.abs().max()) <= 0.01


def test_bpr_loss_equals_freshets_without_bias():
    g = torch.Generator().manual_seed(0)
    u, pos, neg = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    for l2 in (0.0, 1e-4):
        want = freshet_bpr_loss(u, pos, torch.zeros(5), neg, torch.zeros(5, 4), l2=l2)
        torch.testing.assert_close(bpr_loss(u, pos, neg, l2=l2), want, rtol=1e-6, atol=0)


def test_rowwise_adagrad_in_place_equals_ps_optim():
    g = torch.Generator().manual_seed(1)
    table, state = torch.randn(20, 6, generator=g), torch.rand(20, generator=g)
    idx, grads = torch.tensor([2, 3, 11, 19]), torch.randn(4, 6, generator=g)
    want_rows, want_state = optim.rowwise_adagrad(table[idx], grads, state[idx], lr=0.3, eps=1e-8)
    t2, s2 = table.clone(), state.clone()
    rowwise_adagrad_(t2, s2, idx, grads, lr=0.3, eps=1e-8)
    torch.testing.assert_close(t2[idx], want_rows, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2[idx], want_state, rtol=1e-6, atol=0)
    rest = torch.ones(20, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(t2[rest], table[rest]) and torch.equal(s2[rest], state[rest])


def _freshet_one_step(w: PeerWorkload) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One batch the way a Freshet trainer + shard does it: per-occurrence rows, Freshet's
    ``bpr_loss`` (zero bias), gradients summed per ID by ``optim.reduce_pushed``, then
    ``optim.rowwise_adagrad`` from zero state on each unique row."""
    data = prepare(w)
    ((u, pos, neg),) = data.batches
    b, m, d = len(u), w.negatives, w.dim
    ur = data.user_rows[u].clone().requires_grad_()
    pr = data.item_rows[pos].clone().requires_grad_()
    nr = data.item_rows[neg].clone().requires_grad_()
    loss = freshet_bpr_loss(ur, pr, torch.zeros(b), nr, torch.zeros(b, m), l2=w.l2)
    loss.backward()
    users, items = data.user_rows.clone(), data.item_rows.clone()
    for table, ids, grads, lr in (
        (users, u, ur.grad, w.lr_user),
        (items, torch.cat([pos, neg.reshape(-1)]), torch.cat([pr.grad, nr.grad.reshape(-1, d)]), w.lr_item),
    ):
        uniq, inv = torch.unique(ids, return_inverse=True)
        summed = optim.reduce_pushed(optim.OptimizerKind.ROWWISE_ADAGRAD, grads, inv, len(uniq))
        new_rows, _ = optim.rowwise_adagrad(table[uniq], summed, torch.zeros(len(uniq)), lr=lr, eps=w.eps)
        table[uniq] = new_rows
    return users, items, float(loss.detach())


def test_plain_torch_one_step_equals_ps_optim():
    users, items, loss = _freshet_one_step(ONE_BATCH)
    r = run_plain_torch(ONE_BATCH, threads=1, detail=True)
    assert r["batches"] == 1 and r["loss_first_batch"] == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(r["user_rows"], users, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r["item_rows"], items, rtol=1e-5, atol=1e-7)
    assert not torch.equal(r["item_rows"], prepare(ONE_BATCH).item_rows)  # it did move


def test_plain_torch_learns_and_reports():
    r = run_plain_torch(TINY, threads=2, detail=True)
    assert set(RUN_KEYS) <= set(r) and r["events"] == 2000 and r["batches"] == 32 and r["threads"] == 2
    per_event = np.array(r["batch_losses"][:-1]) / 64  # the short last batch left out
    assert per_event[0] == pytest.approx(np.log(2), abs=1e-3)  # rows near 0: sigmoid(0)
    assert per_event[-8:].mean() < per_event[:4].mean() - 0.1
    assert r["loss_sum"] == pytest.approx(sum(r["batch_losses"]), rel=1e-5)


def test_threads_restored():
    before = torch.get_num_threads()
    run_plain_torch(ONE_BATCH, threads=1)
    assert torch.get_num_threads() == before


def _assert_same_training(r: dict, ref: dict) -> None:
    # Same rows, same batches: the first loss is the same forward pass (float rounding only).
    assert r["loss_first_batch"] == pytest.approx(ref["loss_first_batch"], rel=1e-6)
    # Same optimizer (FBGEMM's EXACT_ROWWISE_ADAGRAD == ps.optim.rowwise_adagrad): the
    # whole pass tracks plain torch up to float rounding in the summation orders.
    np.testing.assert_allclose(r["batch_losses"], ref["batch_losses"], rtol=1e-4)
    torch.testing.assert_close(r["user_rows"], ref["user_rows"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(r["item_rows"], ref["item_rows"], rtol=1e-3, atol=1e-5)


@needs_torchrec
def test_torchrec_trains_like_plain_torch():
    ref = run_plain_torch(TINY, threads=2, detail=True)
    r = run_torchrec(TINY, threads=2, detail=True)
    assert r is not None and set(RUN_KEYS) <= set(r) and r["batches"] == 32
    assert set(r["plan"].values()) == {"table_wise/fused"}
    _assert_same_training(r, ref)
    one = run_torchrec(ONE_BATCH, threads=1, detail=True)
    users, items, loss = _freshet_one_step(ONE_BATCH)
    assert one["loss_first_batch"] == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(one["user_rows"], users, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one["item_rows"], items, rtol=1e-5, atol=1e-7)
    import torch.distributed as dist

    assert not dist.is_initialized()  # its one-rank gloo group is gone


@needs_fbgemm
def test_fbgemm_tbe_trains_like_plain_torch():
    ref = run_plain_torch(TINY, threads=2, detail=True)
    r = run_fbgemm_tbe(TINY, threads=2, detail=True)
    assert r is not None and set(RUN_KEYS) <= set(r)
    _assert_same_training(r, ref)


def test_missing_peer_is_skipped_with_reason(monkeypatch):
    from bench import peers

    monkeypatch.setattr(peers, "peer_missing", lambda p: None if p == "plain" else f"{p} absent")
    assert peers.run_torchrec(ONE_BATCH) is None and peers.run_fbgemm_tbe(ONE_BATCH) is None
    rep = peers.run_peers(ONE_BATCH, threads=1, repeat=2)
    assert (
        set(rep["runs"]) == {"plain"}
        and len(rep["all_events_per_s"]["plain"]) == 2
        and rep["skipped"] == {"torchrec": "torchrec absent", "fbgemm": "fbgemm absent"}
    )
    assert rep["ratios"] == {"plain": 1.0}
    assert "skipped: torchrec absent" in peers.format_table(rep)


def test_unknown_peer_rejected():
    with pytest.raises(ValueError):
        run_peers(ONE_BATCH, peers=["nope"])
    with pytest.raises(ValueError):
        run_peers(ONE_BATCH, repeat=0)
    with pytest.raises(ValueError):
        PeerWorkload(events=0)
