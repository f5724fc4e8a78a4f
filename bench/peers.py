"""Outside peers for ``bench.train_throughput``: the same embedding training job in plain
torch, in TorchRec (CPU) and in raw FBGEMM, so Freshet's events/s have a yardstick.

``python -m bench.peers [--events N] [--threads T] [--repeat R] [--peers plain,torchrec,fbgemm]``
prints events/s per peer (the fastest of ``R`` rounds) and its ratio to plain torch;
``--json PATH`` writes the results.

The workload (:class:`PeerWorkload`) is the issue's TorchRec CPU job, identical in every peer:

* two tables, ``user`` and ``item``, ``num_ids`` rows each (1,000,000), ``dim`` 64, float32,
  no item bias (Freshet's model has a dim-1 item bias table; no peer has one);
* rows start as Freshet's :func:`ps.ids.init_rows` (``U(-0.01, 0.01)``, the row of ID ``i``
  equals Freshet's row of integer ID ``i`` with PS seed ``seed``);
* a synthetic stream of ``events`` (user, item) pairs, Zipf-skewed (users ``p ∝ rank^-0.8``,
  items ``p ∝ rank^-1.1``, ranks shuffled over IDs, as ``workers.streams``), plus
  ``negatives`` (4) uniform negative items per event, all drawn once up front from a seeded
  numpy generator, outside the timed region, and cut into batches of ``batch`` (4096);
* one pass, BPR as ``workers.model.bpr_loss`` without bias: per event the mean over its
  negatives of ``-log sigmoid(u·pos - u·neg)``, plus ``l2`` (1e-4, Freshet's default) times
  ``|u|² + |pos|² + mean |neg|²``, summed over the batch;
* row-wise Adagrad as ``ps.optim.rowwise_adagrad`` (FBGEMM's EXACT_ROWWISE_ADAGRAD): per
  unique row ``state += mean(g²)``, ``row -= lr·g/(sqrt(state)+eps)`` with ``g`` the row's
  gradient summed over the batch; lr 0.2 for users and 0.05 for items (Freshet's defaults),
  eps 1e-8, state starting at 0.

The clock runs around the training loop only (inputs, tables and, for TorchRec, the sharded
model are built before it starts). Every run returns a dict with :data:`RUN_KEYS`.

TorchRec and FBGEMM are the optional extra ``freshet[peers]``. These commands install them
beside the CPU torch 2.13 without touching it (``--no-deps``: torchrec's metadata asks for
the CUDA ``fbgemm-gpu``; the second line is what torchrec 1.8 and tensordict then still
import)::

    pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 \\
        torchmetrics==1.0.3 pyvers
    pip install pyre-extensions typing-inspect iopath cloudpickle lightning-utilities

This module imports neither at import time: :func:`run_torchrec` and :func:`run_fbgemm_tbe`
return ``None`` when they are missing and :func:`peer_missing` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import json
import logging
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench import at_least

__all__ = [
    "PEERS",
    "RUN_KEYS",
    "PeerData",
    "PeerWorkload",
    "bpr_loss",
    "format_table",
    "main",
    "peer_missing",
    "prepare",
    "rowwise_adagrad_",
    "run_fbgemm_tbe",
    "run_peers",
    "run_plain_torch",
    "run_torchrec",
]

RUN_KEYS = (
    "peer",
    "events",
    "batches",
    "wall_s",
    "events_per_s",
    "first_batch_s",
    "steady_events_per_s",
    "cpu_s",
    "events_per_cpu_s",
    "loss_sum",
    "loss_first_batch",
    "threads",
)
"""Keys of every run's dict. ``steady_events_per_s`` leaves out the first batch (warm-up);
``cpu_s`` is process CPU time over the loop (all threads, spinning included), and
``events_per_cpu_s`` is less sensitive than ``events_per_s`` to other load on a shared
machine; losses are in nats."""

PEERS = ("plain", "torchrec", "fbgemm")

_USER_ZIPF_A = 0.8  # as workers.streams: heavy users exist but do not dominate
_ITEM_ZIPF_A = 1.1  # workers.config.SyntheticConfig.zipf_a default


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class PeerWorkload:
    """The job every peer runs; see the module docstring. Units: ``lr_*`` parameter units
    per gradient unit, ``eps`` gradient units, ``l2`` per unit squared norm."""

    num_ids: int = 1_000_000
    """Rows per table (users and items alike)."""
    dim: int = 64
    batch: int = 4096
    negatives: int = 4
    events: int = 200_000
    """Events in the one pass; the last batch may be short."""
    lr_user: float = 0.2
    lr_item: float = 0.05
    eps: float = 1e-8
    l2: float = 1e-4
    init_scale: float = 0.01
    user_zipf_a: float = _USER_ZIPF_A
    item_zipf_a: float = _ITEM_ZIPF_A
    seed: int = 0
    init: str = "freshet"
    """``"freshet"``: :func:`ps.ids.init_rows` (Freshet's exact rows; a few seconds for two
    1M x 64 tables); ``"torch"``: ``U(-init_scale, init_scale)`` from a seeded torch
    generator (faster, other values, same distribution)."""

    def __post_init__(self) -> None:
        for name in ("num_ids", "dim", "batch", "negatives", "events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.init not in ("freshet", "torch"):
            raise ValueError(f"init: 'freshet' or 'torch', got {self.init!r}")

    @property
    def num_batches(self) -> int:
        return -(-self.events // self.batch)


@dataclass(frozen=True)
class PeerData:
    """What :func:`prepare` builds once and every peer shares (read-only)."""

    workload: PeerWorkload
    users: np.ndarray
    """``[events]`` int64 user IDs."""
    items: np.ndarray
    """``[events]`` int64 positive item IDs."""
    negatives: np.ndarray
    """``[events, negatives]`` int64 uniform negative item IDs."""
    user_rows: torch.Tensor
    """``[num_ids, dim]`` float32 initial user table."""
    item_rows: torch.Tensor
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(repr=False)
    """``(users [b], pos [b], neg [b, m])`` int64 tensors per batch."""


def _zipf_ids(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """``size`` IDs in ``[0, n)`` with ``p ∝ rank^-a``, ranks shuffled over IDs."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    rank = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n - 1)
    return rng.permutation(n)[rank].astype(np.int64)


def _table_seed(seed: int, name: str) -> int:
    from ps.ids import id_keys  # lazy: ``ps`` pulls in Ray

    # Same formula as ps.shard / bench.train_throughput, so a row equals Freshet's.
    return (seed * 1_000_003 + int(id_keys([name])[0])) % (1 << 63)


def _init_table(w: PeerWorkload, name: str) -> torch.Tensor:
    if w.init == "torch":
        g = torch.Generator().manual_seed(w.seed * 2 + (name == "item"))
        return torch.rand(w.num_ids, w.dim, generator=g).mul_(2 * w.init_scale).sub_(w.init_scale)
    from ps.ids import id_keys, init_rows

    seed = _table_seed(w.seed, name)
    out = torch.empty(w.num_ids, w.dim)
    step = 1 << 17  # bounded temporaries (init_rows makes several uint64 copies)
    for lo in range(0, w.num_ids, step):
        hi = min(lo + step, w.num_ids)
        keys = id_keys(np.arange(lo, hi, dtype=np.int64))
        out[lo:hi] = torch.from_numpy(init_rows(keys, seed=seed, dim=w.dim, scale=w.init_scale))
    return out


@functools.lru_cache(maxsize=1)
def prepare(workload: PeerWorkload) -> PeerData:
    """The event stream and initial tables of ``workload`` (cached: the last one is kept)."""
    w = workload
    rng = np.random.default_rng(w.seed)
    users = _zipf_ids(rng, w.num_ids, w.user_zipf_a, w.events)
    items = _zipf_ids(rng, w.num_ids, w.item_zipf_a, w.events)
    negs = rng.integers(0, w.num_ids, size=(w.events, w.negatives), dtype=np.int64)
    tu, ti, tn = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(negs)
    batches = [
        (tu[lo : lo + w.batch], ti[lo : lo + w.batch], tn[lo : lo + w.batch]) for lo in range(0, w.events, w.batch)
    ]
    return PeerData(w, users, items, negs, _init_table(w, "user"), _init_table(w, "item"), batches)


# --------------------------------------------------------------------------- shared math


def bpr_loss(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, *, l2: float) -> torch.Tensor:
    """``workers.model.bpr_loss`` with zero item bias: ``u``, ``pos`` ``[b, d]``, ``neg``
    ``[b, m, d]``; summed over events (nats)."""
    x_pos = (u * pos).sum(-1)
    x_neg = torch.einsum("bd,bmd->bm", u, neg)
    per_event = -F.logsigmoid(x_pos.unsqueeze(1) - x_neg).mean(1)
    if not l2:
        return per_event.sum()
    reg = u.square().sum(-1) + pos.square().sum(-1) + neg.square().sum(-1).mean(1)
    return (per_event + l2 * reg).sum()


def rowwise_adagrad_(
    table: torch.Tensor, state: torch.Tensor, idx: torch.Tensor, grads: torch.Tensor, *, lr: float, eps: float
) -> None:
    """In place on ``table`` ``[N, d]`` and ``state`` ``[N]``: ``ps.optim.rowwise_adagrad`` on
    the unique rows ``idx`` with their summed ``grads`` ``[len(idx), d]``."""
    s = state.index_select(0, idx).add_(grads.square().mean(1))
    state.index_copy_(0, idx, s)
    table.index_add_(0, idx, grads / s.sqrt().add_(eps).unsqueeze(1), alpha=-lr)


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _timed_loop(
    peer: str,
    data: PeerData,
    threads: int,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    detail: bool,
) -> dict[str, Any]:
    """Run ``step`` over every batch; ``step`` returns the batch loss (a detached scalar)."""
    w = data.workload
    losses: list[torch.Tensor] = []
    first = 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    for k, (u, pos, neg) in enumerate(data.batches):
        losses.append(step(u, pos, neg))
        if k == 0:
            first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    n0 = len(data.batches[0][0])
    rest = wall - first
    out = {
        "peer": peer,
        "events": w.events,
        "batches": len(data.batches),
        "wall_s": wall,
        "events_per_s": w.events / wall,
        "first_batch_s": first,
        "steady_events_per_s": (w.events - n0) / rest if len(data.batches) > 1 and rest > 0 else None,
        "cpu_s": cpu,
        "events_per_cpu_s": w.events / cpu if cpu > 0 else None,
        "loss_sum": float(torch.stack(losses).sum()),
        "loss_first_batch": float(losses[0]),
        "threads": threads,
    }
    if detail:
        out["batch_losses"] = [float(x) for x in losses]
    return out


# --------------------------------------------------------------------------- plain torch


def run_plain_torch(
    workload: PeerWorkload, threads: int = 2, *, data: PeerData | None = None, detail: bool = False
) -> dict[str, Any]:
    """Plain torch: dense ``[num_ids, dim]`` tables plus a ``[num_ids]`` row-wise state each.

    Per batch: ``torch.unique`` of the users and of the items (positives and negatives
    together), the unique rows gathered into leaf tensors, BPR on those rows re-indexed by
    the inverse (autograd sums duplicate occurrences into the unique rows), then
    :func:`rowwise_adagrad_` (``index_select``/``index_copy_`` on the state,
    ``index_add_`` on the table) on the unique rows. ``detail`` adds ``batch_losses`` and
    the final ``user_rows``/``item_rows`` (every runner takes it).
    """
    data = data or prepare(workload)
    w = data.workload
    m, d = w.negatives, w.dim
    users, items = data.user_rows.clone(), data.item_rows.clone()
    user_state, item_state = torch.zeros(w.num_ids), torch.zeros(w.num_ids)

    def step(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        b = u.shape[0]
        uu, uinv = torch.unique(u, return_inverse=True)
        iu, iinv = torch.unique(torch.cat([pos, neg.reshape(-1)]), return_inverse=True)
        ur = users.index_select(0, uu).requires_grad_()
        ir = items.index_select(0, iu).requires_grad_()
        it = ir[iinv]
        loss = bpr_loss(ur[uinv], it[:b], it[b:].view(b, m, d), l2=w.l2)
        gu, gi = torch.autograd.grad(loss, [ur, ir])
        rowwise_adagrad_(users, user_state, uu, gu, lr=w.lr_user, eps=w.eps)
        rowwise_adagrad_(items, item_state, iu, gi, lr=w.lr_item, eps=w.eps)
        return loss.detach()

    with _threads(threads):
        out = _timed_loop("plain", data, threads, step, detail)
    out["impl"] = "torch unique + index_select gather, autograd, index_add_ row-wise Adagrad"
    out["torch"] = torch.__version__
    if detail:
        out["user_rows"], out["item_rows"] = users, items
    return out


# --------------------------------------------------------------------------- optional peers


def peer_missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here (``None`` if it can): the import error of its packages."""
    if peer == "plain":
        return None
    mods = {"torchrec": ("fbgemm_gpu", "torchrec"), "fbgemm": ("fbgemm_gpu",)}.get(peer)
    if mods is None:
        raise ValueError(f"peer: one of {PEERS}, got {peer!r}")
    return _import_error(mods)


@functools.cache
def _import_error(mods: tuple[str, ...]) -> str | None:
    for mod in mods:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - ImportError, or an ABI mismatch (OSError/RuntimeError)
            return f"{mod} not importable ({type(e).__name__}: {e}); install the extra freshet[peers]"
    return None


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _single_rank_gloo() -> Iterator[Any]:
    """A one-rank gloo process group on 127.0.0.1 (the existing default group if one is up)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"run_torchrec: needs a 1-rank job, the default process group has {dist.get_world_size()}"
            )
        yield dist.GroupMember.WORLD
        return
    for attempt in range(3):  # the free port can be taken before the store binds it
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            break
        except (RuntimeError, OSError):
            if attempt == 2:
                raise
    try:
        yield dist.GroupMember.WORLD
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _quiet_torchrec() -> Iterator[None]:
    names = ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def run_torchrec(
    workload: PeerWorkload, threads: int = 2, *, data: PeerData | None = None, detail: bool = False
) -> dict[str, Any] | None:
    """TorchRec's CPU training path; ``None`` when torchrec/fbgemm are not importable
    (:func:`peer_missing` ``("torchrec")`` says why).

    An ``EmbeddingCollection`` of two tables (``t_user`` for feature ``user``, ``t_item``
    for feature ``item``) built on the meta device; ``torchrec.optim.RowWiseAdagrad``
    attached per table with ``apply_optimizer_in_backward`` (lr per table, eps), which
    TorchRec fuses into FBGEMM's EXACT_ROWWISE_ADAGRAD; ``DistributedModelParallel`` on CPU
    over a one-rank gloo group, planned by ``EmbeddingShardingPlanner`` with the
    ``table_wise`` / ``fused`` constraint. The initial rows are copied into the sharded
    tables before the clock starts. Each batch is one ``KeyedJaggedTensor`` (per event one
    ``user`` ID and ``1 + negatives`` ``item`` IDs: the positive then the negatives), built
    up front; the loop is ``dmp(kjt)`` -> :func:`bpr_loss` -> ``backward()`` (which updates
    the tables inside FBGEMM).
    """
    if peer_missing("torchrec") is not None:
        return None
    data = data or prepare(workload)
    w = data.workload
    with _quiet_torchrec():
        from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
        from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingEnv
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    m, d = w.negatives, w.dim
    tables = {"t_user": ("user", w.lr_user, data.user_rows), "t_item": ("item", w.lr_item, data.item_rows)}

    with _threads(threads), _quiet_torchrec(), _single_rank_gloo() as pg:
        # Inputs first, outside the clock, like the other peers' pre-cut batches.
        kjts = []
        for u, pos, neg in data.batches:
            b = u.shape[0]
            item_ids = torch.cat([pos.unsqueeze(1), neg], dim=1).reshape(-1)  # [b*(1+m)]: pos, negs per event
            lengths = torch.cat([torch.ones(b, dtype=torch.int64), torch.full((b,), 1 + m, dtype=torch.int64)])
            kjts.append(
                KeyedJaggedTensor.from_lengths_sync(
                    keys=["user", "item"], values=torch.cat([u, item_ids]), lengths=lengths
                )
            )
        ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=t, embedding_dim=d, num_embeddings=w.num_ids, feature_names=[f])
                for t, (f, _, _) in tables.items()
            ],
            device=torch.device("meta"),
        )
        for t, (_, lr, _) in tables.items():
            apply_optimizer_in_backward(RowWiseAdagrad, [ec.embeddings[t].weight], {"lr": lr, "eps": w.eps})
        sharders = [EmbeddingCollectionSharder()]
        constraints = {
            t: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for t in tables
        }
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
        )
        plan = planner.collective_plan(ec, sharders, pg)
        dmp = DistributedModelParallel(
            ec, env=ShardingEnv.from_process_group(pg), device=torch.device("cpu"), plan=plan, sharders=sharders
        )
        shards = {t: dmp.state_dict()[f"embeddings.{t}.weight"].local_shards()[0].tensor for t in tables}
        with torch.no_grad():
            for t, (_, _, rows) in tables.items():
                shards[t].copy_(rows)

        batch_kjts = iter(kjts)

        def step(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            b = u.shape[0]
            out = dmp(next(batch_kjts))
            loss = bpr_loss(out["user"].values(), *_split_items(out["item"].values().view(b, 1 + m, d)), l2=w.l2)
            loss.backward()
            return loss.detach()

        res = _timed_loop("torchrec", data, threads, step, detail)
        res["impl"] = (
            "EmbeddingCollection + apply_optimizer_in_backward(RowWiseAdagrad) -> DistributedModelParallel "
            "(CPU, 1-rank gloo, table_wise, fused FBGEMM EXACT_ROWWISE_ADAGRAD)"
        )
        res["plan"] = {
            t: str(plan.plan[""][t].sharding_type) + "/" + str(plan.plan[""][t].compute_kernel) for t in tables
        }
        res["torchrec"], res["fbgemm_gpu"] = _version("torchrec"), _version("fbgemm-gpu-cpu")
        if detail:
            sd = dmp.state_dict()
            res["user_rows"] = sd["embeddings.t_user.weight"].local_shards()[0].tensor.detach().clone()
            res["item_rows"] = sd["embeddings.t_item.weight"].local_shards()[0].tensor.detach().clone()
    return res


def _split_items(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, 1+m, d]`` -> ``(pos [b, d], neg [b, m, d])``."""
    return items[:, 0], items[:, 1:]


def run_fbgemm_tbe(
    workload: PeerWorkload, threads: int = 2, *, data: PeerData | None = None, detail: bool = False
) -> dict[str, Any] | None:
    """Raw FBGEMM: one CPU ``SplitTableBatchedEmbeddingBagsCodegen`` per table (a TBE has one
    lr, and the tables' lr differ; TorchRec groups them the same way), ``PoolingMode.NONE``
    (one row per ID, as TorchRec's ``EmbeddingCollection`` kernel), EXACT_ROWWISE_ADAGRAD
    with the table's lr and eps. ``None`` when fbgemm_gpu is not importable."""
    if peer_missing("fbgemm") is not None:
        return None
    data = data or prepare(workload)
    w = data.workload
    with _quiet_torchrec():
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

    m, d = w.negatives, w.dim

    def tbe(rows: torch.Tensor, lr: float) -> Any:
        mod = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(w.num_ids, d, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=lr,
            eps=w.eps,
            pooling_mode=PoolingMode.NONE,
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            mod.split_embedding_weights()[0].copy_(rows)
        return mod

    with _threads(threads), _quiet_torchrec():
        user_tbe, item_tbe = tbe(data.user_rows, w.lr_user), tbe(data.item_rows, w.lr_item)
        inputs = []
        for u, pos, neg in data.batches:
            b = u.shape[0]
            item_ids = torch.cat([pos.unsqueeze(1), neg], dim=1).reshape(-1)
            inputs.append((u, torch.arange(b + 1), item_ids, torch.arange(b * (1 + m) + 1)))

        batch_inputs = iter(inputs)

        def step(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            b = u.shape[0]
            ui, uo, ii, io = next(batch_inputs)
            ur = user_tbe(ui, uo)
            it = item_tbe(ii, io).view(b, 1 + m, d)
            loss = bpr_loss(ur, *_split_items(it), l2=w.l2)
            loss.backward()
            return loss.detach()

        res = _timed_loop("fbgemm", data, threads, step, detail)
        res["impl"] = "SplitTableBatchedEmbeddingBagsCodegen x2 (CPU, PoolingMode.NONE, EXACT_ROWWISE_ADAGRAD)"
        res["fbgemm_gpu"] = _version("fbgemm-gpu-cpu")
        if detail:
            res["user_rows"] = user_tbe.split_embedding_weights()[0].detach().clone()
            res["item_rows"] = item_tbe.split_embedding_weights()[0].detach().clone()
    return res


_RUNNERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "plain": run_plain_torch,
    "torchrec": run_torchrec,
    "fbgemm": run_fbgemm_tbe,
}


def run_peers(
    workload: PeerWorkload,
    threads: int = 2,
    peers: Sequence[str] = PEERS,
    *,
    repeat: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``peers`` on one shared :func:`prepare` of ``workload``, ``repeat`` rounds
    (each peer once per round, in order; every run starts from the initial rows).

    Returns ``{"workload": ..., "threads", "repeat", "runs": {peer: its fastest run},
    "all_events_per_s": {peer: [every run's]}, "skipped": {peer: reason},
    "ratios": {peer: events_per_s / plain's}}`` (ratios only when plain ran). Best-of-N
    because on a shared machine other load only ever slows a run down.
    """
    unknown = [p for p in peers if p not in _RUNNERS]
    if unknown:
        raise ValueError(f"peers: unknown {unknown}; known {list(_RUNNERS)}")
    if repeat < 1:
        raise ValueError(f"repeat: must be >= 1, got {repeat}")
    say = log or (lambda _msg: None)
    t = time.perf_counter()
    data = prepare(workload)
    say(
        f"prepared {workload.events} events, 2 x {workload.num_ids} x {workload.dim} rows in {time.perf_counter() - t:.1f}s"
    )
    runs: dict[str, Any] = {}
    every: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for p in peers:
        reason = peer_missing(p)
        if reason is not None:
            skipped[p] = reason
            say(f"{p}: skipped ({reason})")
    for _ in range(repeat):
        for p in peers:
            if p in skipped:
                continue
            res = _RUNNERS[p](workload, threads, data=data)
            assert res is not None
            every.setdefault(p, []).append(res["events_per_s"])
            if p not in runs or res["events_per_s"] > runs[p]["events_per_s"]:
                runs[p] = res
            say(f"{p}: {res['events_per_s']:,.0f} events/s ({res['wall_s']:.2f}s wall, {res['cpu_s']:.2f}s cpu)")
    base = runs.get("plain", {}).get("events_per_s")
    ratios = {p: r["events_per_s"] / base for p, r in runs.items()} if base else {}
    return {
        "workload": asdict(workload),
        "threads": threads,
        "repeat": repeat,
        "runs": runs,
        "all_events_per_s": every,
        "skipped": skipped,
        "ratios": ratios,
    }


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table of a :func:`run_peers` report."""
    lines = [
        (
            f"{'peer':<10} {'events/s':>10} {'x plain':>8} {'steady/s':>10} {'ev/cpu-s':>9} {'wall s':>7} "
            f"{'cpu s':>7} {'loss sum':>11}"
        )
    ]
    for p, r in report["runs"].items():
        ratio = report["ratios"].get(p)
        steady, per_cpu = r["steady_events_per_s"], r["events_per_cpu_s"]
        lines.append(
            f"{p:<10} {r['events_per_s']:>10,.0f} {(f'{ratio:.2f}' if ratio is not None else '-'):>8} "
            f"{(f'{steady:,.0f}' if steady else '-'):>10} {(f'{per_cpu:,.0f}' if per_cpu else '-'):>9} "
            f"{r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} {r['loss_sum']:>11.1f}"
        )
    for p, why in report["skipped"].items():
        lines.append(f"{p:<10} skipped: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    d = PeerWorkload()
    ap.add_argument("--events", type=at_least(1), default=d.events)
    ap.add_argument("--num-ids", type=at_least(1), default=d.num_ids)
    ap.add_argument("--dim", type=at_least(1), default=d.dim)
    ap.add_argument("--batch", type=at_least(1), default=d.batch)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--repeat", type=at_least(1), default=1, help="rounds; each peer's fastest run is reported")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--init", choices=("freshet", "torch"), default=d.init)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    w = PeerWorkload(
        num_ids=args.num_ids, dim=args.dim, batch=args.batch, events=args.events, seed=args.seed, init=args.init
    )
    peers = [p for p in args.peers.split(",") if p]
    report = run_peers(w, args.threads, peers, repeat=args.repeat, log=lambda s: print(s, file=sys.stderr))
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
