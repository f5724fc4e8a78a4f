"""Ranking is right from the first request, ``/score`` reads only the items it is given, and the
batched ranking path answers exactly what the single path answers (issue 12).

The first tests run on one module-scoped deployment (real Ray, 2 PS shards, the ingest log, one
running trainer, the Serve app over HTTP, default model at a small width), in file order:

* the issue's failing input on the fresh deployment: 240 events (40 users, 50 items) posted,
  then at once ``/score`` and ``/rank`` for ``bg1`` for about a second. Every answer is 200 and
  is either a ranking against a mirror that has synced (``k`` items, none of the user's posted
  items, ``model_version`` >= 1) or the popular fallback with its reason; never ``"items": []``
  with ``"fallback": null``. Once trained, the answers equal a ranking computed here with plain
  numpy from rows pulled from the PS;
* with the trainer stopped (nothing changes), many concurrent ``/rank`` requests (batched by
  ``@serve.batch``) answer byte for byte what the same requests answer one at a time.
* the replica that answered all of that never loaded torch (its shards and trainer did).

The rest need no Ray: ``/score`` counted through the snapshot (wrapped matrices that record
every row read, and refuse a product with the whole catalogue), the batched scoring path driven
directly (``FreshetAPI._rank_batch``, with stand-in contexts) against the single one, and a snapshot that stays what it was
when its catalogue view changes in place (what the replica's mirror does on every sync).
"""

from __future__ import annotations

import asyncio
import json
import concurrent.futures
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray

from ps.optim import row_clocks
from tests.conftest import _ray_start, free_port, wait_for

N_USERS, N_ITEMS, PER_USER = 40, 50, 6
K = 10
DIM = 16


def _history() -> list[dict]:
    """240 events: user ``bg{u}`` saw 6 distinct items ``it{i}`` (deterministic)."""
    events = []
    for u in range(N_USERS):
        for j in range(PER_USER):
            events.append({"user_id": f"bg{u}", "item_id": f"it{(u * 7 + j * 11) % N_ITEMS}",
                           "timestamp": 1.7e9 + u * 10 + j})
    return events


HISTORY = _history()
BG1_ITEMS = {e["item_id"] for e in HISTORY if e["user_id"] == "bg1"}
SCORED = ["it1", "it2", "it3"]


@pytest.fixture(scope="module")
def deployment():
    """``(http client, config, deploy.Deployment)`` of a fresh deployment with a running trainer."""
    from serving import deploy
    from serving.config import load_config

    tmp = tempfile.mkdtemp(prefix="freshet-ranking-")
    cfg = load_config(None, {
        "namespace": f"t-ranking-{uuid.uuid4().hex[:8]}",
        "ps": {"num_shards": 2, "num_buckets": 64,
               "tables": {"user": {"dim": DIM}, "item": {"dim": DIM}, "item_ctx": {"dim": DIM}}},
        "trainer": {"batch_size": 64, "device": "cpu"},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": free_port()},
    })
    with _ray_start():
        dep = deploy.start(cfg, durable=False, autostart=True)
        try:
            with httpx.Client(base_url=dep.url, timeout=30.0) as http:
                yield http, cfg, dep
        finally:
            deploy.stop(cfg)


def _stats(http) -> dict:
    r = http.get("/stats")
    assert r.status_code == 200, r.text
    return r.json()


def _check_rank(body: dict, posted: set[str]) -> str:
    """Assert ``body`` (a /rank answer for a user who posted ``posted``) is a ranking against a
    synced mirror or an explicit fallback; returns ``"model"`` or the fallback reason."""
    items = [it["item_id"] for it in body["items"]]
    scores = [it["score"] for it in body["items"]]
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True), body
    assert set(items) <= {f"it{i}" for i in range(N_ITEMS)} and len(set(items)) == len(items), body
    assert not set(items) & posted, body  # exclude_seen: never a posted item, from the first answer
    if body["fallback"] is None:
        assert body["fallback_reason"] is None, body
        # The failing answer of the issue was {"items": [], "fallback": null, "model_version": 0}.
        # Early on the mirror may hold only the items trained so far: fewer than K is right then.
        assert 1 <= len(items) <= K and body["model_version"] >= 1, body
        return "model"
    assert body["fallback"] == "popular" and body["fallback_reason"] in ("new_user", "mirror_behind"), body
    assert items or body["model_version"] == 0, body  # an empty popular list only before any sync
    return body["fallback_reason"]


def _check_score(body: dict) -> str:
    scores = body["scores"]
    assert len(scores) == len(SCORED), body
    if body["fallback"] is None:
        assert body["fallback_reason"] is None, body
        # null only for an item without a trained row yet; never all of them (the 500 was
        # an empty mirror indexed), since the user's row or context is in the same mirror.
        assert all(s is None or np.isfinite(s) for s in scores), body
        return "model"
    assert body["fallback"] == "popular" and body["fallback_reason"] in ("new_user", "mirror_behind"), body
    assert all(s is None or (np.isfinite(s) and s >= 0) for s in scores), body  # popularity counts
    return body["fallback_reason"]


def _expected(dep, cfg, user: str) -> tuple[list[str], dict[str, float]]:
    """``user``'s top ``K`` (posted items left out) and every item's score, computed with plain
    numpy (float64) from rows pulled from the PS: ``query · item + bias + recent_weight * log1p(recent)``,
    the query being the user's row (zero without one) plus the mean context row of their last
    ``context_items`` items."""
    from ps.ids import keyed

    m = cfg.model
    items = [f"it{i}" for i in range(N_ITEMS)]
    tables = [m.item_table, m.item_bias_table, m.recent_table, m.context_table]
    pulled = dep.ps.pull_many({t: items for t in tables})
    assert all(pulled[m.item_table][1]), "every item has a row once trained"
    ctx = dep.ps.rank_context(m.user_table, user)
    by_key = dict(zip(keyed(items).keys.tolist(), range(N_ITEMS)))
    recent = [by_key[k] for k in ctx.recent.tolist() if k in by_key]
    q = np.zeros(pulled[m.item_table][0].shape[1]) if ctx.row is None else ctx.row.astype(np.float64)
    if recent:
        q = q + pulled[m.context_table][0][recent[-m.context_items:]].astype(np.float64).mean(0)
    rc = pulled[m.recent_table][0].astype(np.float64)
    clocks = row_clocks(rc)
    scores = (pulled[m.item_table][0].astype(np.float64) @ q + pulled[m.item_bias_table][0][:, 0]
              + m.recent_weight * np.log1p(rc[:, 0] * np.exp2(clocks - clocks.max())))
    order = [i for i in np.argsort(-scores, kind="stable").tolist() if i not in set(recent)][:K]
    return [items[i] for i in order], {items[i]: float(scores[i]) for i in range(N_ITEMS)}


def test_first_requests_after_the_first_events_are_right(deployment):
    http, cfg, dep = deployment
    assert _stats(http)["events_accepted"] == 0  # fresh: nothing posted, the mirror holds nothing
    r = http.post("/events", json={"events": HISTORY})
    assert r.status_code == 200 and r.json()["accepted"] == len(HISTORY), r.text

    seen: dict[str, set] = {"rank": set(), "score": set()}
    versions = []
    t0 = time.monotonic()
    # At once, back to back, for about a second and at least 5 rounds (a loaded machine may
    # answer fewer in a second; the cap only bounds a hang).
    while (time.monotonic() < t0 + 1.0 or len(versions) < 5) and time.monotonic() < t0 + 60:
        s = http.post("/score", json={"user_id": "bg1", "item_ids": SCORED})
        assert s.status_code == 200, (s.status_code, s.text)
        seen["score"].add(_check_score(s.json()))
        rk = http.post("/rank", json={"user_id": "bg1", "k": K})
        assert rk.status_code == 200, (rk.status_code, rk.text)
        body = rk.json()
        seen["rank"].add(_check_rank(body, BG1_ITEMS))
        versions.append(body["model_version"])
    assert len(versions) >= 5, versions
    print(f"outcomes in the first second: /rank {sorted(seen['rank'])}, /score {sorted(seen['score'])}, "
          f"model_version {versions[0]}..{versions[-1]} over {len(versions)} rounds")
    assert versions == sorted(versions), versions  # one replica: its mirror only moves forward

    # Trained: every answer is the model's and equals the ranking computed from the PS rows.
    wait_for(lambda: _stats(http)["events_applied"] == len(HISTORY), 60,
             "the trainer to apply the 240 events")
    ray.get([t.stop.remote() for t in dep.trainers])  # nothing changes from here on
    want_items, want_scores = _expected(dep, cfg, "bg1")
    assert dep.ps.rank_context(cfg.model.user_table, "bg1").row is not None

    def synced():
        body = http.post("/rank", json={"user_id": "bg1", "k": K}).json()
        return body["model_version"] == _stats(http)["ps_version"] and body

    body = wait_for(synced, 10, "the replica's mirror to reflect every push")
    assert _check_rank(body, BG1_ITEMS) == "model"
    got = [it["item_id"] for it in body["items"]]
    np.testing.assert_allclose([it["score"] for it in body["items"]], [want_scores[i] for i in got],
                               rtol=1e-4, atol=1e-4)
    assert got == want_items or np.allclose([want_scores[i] for i in got], [want_scores[i] for i in want_items],
                                            atol=1e-4), (got, want_items)
    s = http.post("/score", json={"user_id": "bg1", "item_ids": SCORED}).json()
    assert _check_score(s) == "model"
    np.testing.assert_allclose(s["scores"], [want_scores[i] for i in SCORED], rtol=1e-4, atol=1e-4)


def test_concurrent_rank_answers_exactly_what_sequential_rank_answers(deployment):
    # Runs after the test above: trained, trainer stopped, the mirror synced: nothing changes.
    http, _, dep = deployment
    assert not any(st["running"] for st in ray.get([t.stats.remote() for t in dep.trainers]))
    users = [f"bg{u}" for u in range(N_USERS)] + ["nobody"]

    def rank(user: str) -> bytes:
        r = http.post("/rank", json={"user_id": user, "k": 20})
        assert r.status_code == 200, r.text
        return r.content

    sequential = [rank(u) for u in users]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            concurrent_ = list(pool.map(rank, users))
            assert concurrent_ == sequential
    assert b'"fallback":null' in sequential[0] and b'"fallback":"popular"' in sequential[-1]


def _workers_of_this_cluster() -> dict[str, list[int]]:
    """``{process title's class: [pid]}`` of the Ray workers this test's raylet started."""
    from ray._private import worker

    from serving.ray_head import _all_pids, _stat
    from tests.conftest import cmdline

    commands = {pid: c for pid in _all_pids() if (c := cmdline(pid))}
    # This cluster's raylet: the one of this driver's session (the driver may have joined a
    # head that another process started, so it has no handle of the raylet process).
    session = f"--session-name={worker._global_node.session_name}"
    (raylet,) = [pid for pid, c in commands.items() if c[0].endswith("/raylet") and session in c]
    found: dict[str, list[int]] = {}
    for pid, c in commands.items():
        st = _stat(pid)
        if st is not None and st[1] == raylet and c[0].startswith("ray::"):
            found.setdefault(c[0][5:].split(".")[0], []).append(pid)
    return found


def _loaded_torch(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def test_the_replica_answers_without_ever_loading_torch(deployment):
    # Runs after the tests above: this replica has answered /rank (alone and in batches), /score
    # and /stats, and holds handles of the shards and the trainer. torch would cost it ~1.4 s of
    # CPU at start and ~180 MiB for its whole life (ps.lazy).
    http, _, _ = deployment
    assert http.get("/stats").status_code == 200
    procs = _workers_of_this_cluster()
    (replica,) = [pid for title, pids in procs.items() if title.startswith("ServeReplica:freshet") for pid in pids]
    assert len(procs["PSShard"]) == 2 and all(_loaded_torch(p) for p in procs["PSShard"] + procs["Trainer"])
    assert not _loaded_torch(replica)


# ----------------------------------------------------------------------------- no Ray below


class _View:
    """A catalogue view over plain arrays, as :class:`ps.cache.RowCache` shows one: ``matrix``
    returns a view of storage that a later "sync" (:meth:`update`) writes in place."""

    def __init__(self, model, n: int, dim: int, seed: int = 0):
        from ps.ids import keyed

        rng = np.random.default_rng(seed)
        self.n = n
        self._ids = np.array([f"it{i}" for i in range(n)], dtype=object)
        self._keys = keyed(list(self._ids)).keys
        self._slot = {int(k): i for i, k in enumerate(self._keys.tolist())}
        self._valid = np.ones(n, bool)
        self._valid[n // 3] = False  # a removed item
        self.mats = {
            model.item_table: rng.normal(size=(n, dim)).astype(np.float32),
            model.item_bias_table: rng.normal(size=(n, 1)).astype(np.float32),
            model.popularity_table: rng.integers(1, 100, size=(n, 1)).astype(np.float32),
            model.recent_table: np.stack([rng.integers(1, 50, n), rng.integers(0, 3, n)], 1).astype(np.float32),
            model.context_table: rng.normal(size=(n, dim)).astype(np.float32),
        }

    def ids(self):
        return self._ids

    def keys(self):
        return self._keys

    def valid(self):
        return self._valid

    def matrix(self, table):
        return self.mats[table][: self.n]

    def slots_of_keys(self, keys):
        return np.array([self._slot.get(int(k), -1) for k in np.asarray(keys, np.uint64).tolist()], np.int64)

    def update(self, seed: int) -> None:
        """New rows for every item, written in place (what a mirror sync does)."""
        rng = np.random.default_rng(seed)
        for m in self.mats.values():
            m[:] = rng.normal(size=m.shape).astype(np.float32)


class _Counted:
    """Stands in for a per-item array of a snapshot: indexing works and is counted (rows read);
    anything else (a product with the whole catalogue, ``.T``, iteration) raises."""

    def __init__(self, arr: np.ndarray, reads: list[int]):
        self._arr, self._reads = arr, reads

    def __getitem__(self, index):
        out = self._arr[index]
        self._reads.append(1 if np.ndim(out) < self._arr.ndim else len(out))
        return out

    def __getattr__(self, name):
        raise AssertionError(f"a whole-catalogue array was used beyond indexing: .{name}")

    def __len__(self):
        raise AssertionError("a whole-catalogue array was used beyond indexing: len()")


def _model():
    from serving.config import load_config

    return load_config(None, {"ps": {"tables": {"user": {"dim": DIM}, "item": {"dim": DIM},
                                                "item_ctx": {"dim": DIM}}}}).model


@pytest.fixture()
def catalogue():
    from workers.ranking import RankingSnapshot

    model = _model()
    view = _View(model, 5000, DIM)
    return model, view, RankingSnapshot(view, model)


def _score_endpoint():
    """``FreshetAPI.score`` as written (the handler behind ``POST /score``), callable without Serve."""
    from serving.app import FreshetAPI

    return FreshetAPI.func_or_class.score


@pytest.mark.parametrize("trained", [True, False])
def test_score_reads_only_the_given_items(catalogue, trained):
    from ps.ids import keyed
    from ps.shard import RankContext
    from serving.schemas import ScoreRequest
    from workers.ranking import RankingSnapshot

    model, view, snap = catalogue
    full = RankingSnapshot(view, model)  # an unwrapped twin for the expected values
    reads = {"items": [], "bias": [], "ctx": [], "popularity": []}
    for name, log in reads.items():
        setattr(snap, name, _Counted(getattr(snap, name), log))
    rng = np.random.default_rng(3)
    row = rng.normal(size=DIM).astype(np.float32) if trained else None
    recent = keyed([f"it{i}" for i in (5, 17, 29)]).keys
    asked = ["it7", "it4242", "nope", f"it{view.n // 3}", "it7"]  # an unknown and a removed item

    class Replica:
        client = _OneShardClient()

        async def _shard_contexts(self, shard, keys):
            return [RankContext(row, None, 1, recent)]

        async def _snapshot_for(self, pushed_by):
            return snap, [False], [None]

    body = asyncio.run(_score_endpoint()(Replica(), ScoreRequest(user_id="u", item_ids=asked)))
    assert body.fallback is None and body.fallback_reason is None
    assert body.scores[2] is None and body.scores[3] is None  # unknown, removed
    q = (np.zeros(DIM, np.float32) if row is None else row) + view.mats[model.context_table][[5, 17, 29]].mean(0)
    for j in (0, 1, 4):
        s = int(asked[j][2:])
        want = float(view.mats[model.item_table][s] @ q + full.bias[s])
        assert body.scores[j] == pytest.approx(want, rel=1e-5, abs=1e-5)
    # Counted: the 3 requested items that exist, their biases, the 3 context rows; nothing else.
    assert sum(reads["items"]) == 3 and sum(reads["bias"]) == 3, reads
    assert sum(reads["ctx"]) <= 2 * len(recent), reads  # context_query and/or query, each once
    assert not reads["popularity"], reads


def test_score_of_a_user_without_row_or_context_reads_only_popularity_of_the_given_items(catalogue):
    from ps.shard import RankContext
    from serving.schemas import ScoreRequest

    _, _, snap = catalogue
    reads = {"items": [], "bias": [], "ctx": [], "popularity": []}
    for name, log in reads.items():
        setattr(snap, name, _Counted(getattr(snap, name), log))

    class Replica:
        client = _OneShardClient()

        async def _shard_contexts(self, shard, keys):
            return [RankContext(None, None, 1, np.zeros(0, np.uint64))]

        async def _snapshot_for(self, pushed_by):
            return snap, [False], [None]

    body = asyncio.run(_score_endpoint()(Replica(), ScoreRequest(user_id="u", item_ids=["it1", "it2"])))
    assert body.fallback == "popular" and body.fallback_reason == "new_user"
    assert sum(reads["popularity"]) == 2 and not reads["items"] and not reads["bias"] and not reads["ctx"], reads


class _OneShardClient:
    """A PS client stand-in whose plan puts every user on shard 0."""

    class plan:
        @staticmethod
        def shards_of_keys(keys):
            return np.zeros(len(keys), np.int64)


@pytest.fixture
def batched_ranking(monkeypatch):
    """A factory of stand-in replicas that answer ``POST /rank`` through the real handler,
    ``FreshetAPI._rank_items`` and, for requests that find another in flight,
    ``FreshetAPI._rank_batch`` (its ``@serve.batch`` path) outside Serve, with the users'
    contexts and the snapshot given by the test.

    Serve keeps the batch queue in the decorated function itself, bound to the event loop it
    first ran on; it is dropped afterwards, or the class could no longer be pickled into a
    deployment by a later test in this process."""
    from ray.serve import batching

    from serving.app import FreshetAPI

    # Outside a replica there is no replica context for Serve's max_ongoing_requests warning.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    lazy = FreshetAPI.func_or_class._rank_batch.set_max_batch_size.__self__

    def stand_in(snap, contexts, **kw):
        lazy._queue = None  # each test's asyncio.run is a new event loop
        return _stand_in(FreshetAPI, snap, contexts, **kw)

    try:
        yield stand_in
    finally:
        lazy._queue = None


def _stand_in(FreshetAPI, snap, contexts: dict, *, num_shards: int = 2, failing: dict | None = None,
              slow: dict | None = None, sync_fails: frozenset = frozenset()):
    """A replica with ``num_shards`` shards (the real sharding plan) whose users' contexts are
    ``contexts[user_id]``. Shard ``s`` in ``failing`` raises ``failing[s]``; one in ``slow``
    answers after ``slow[s]`` seconds; the snapshot's sync fails for users whose row's
    ``pushed_by`` is in ``sync_fails``. It records each shard call's users, in call order."""
    from ps.ids import keyed
    from ps.plan import ShardingPlan
    from serving.config import load_config

    user_of = {int(keyed([u]).keys[0]): u for u in contexts}

    class Client:
        plan = ShardingPlan.uniform(64, num_shards)

    class Replica:
        cfg = load_config(None, {"serving": {"max_k": 100}})
        client = Client()
        rank = FreshetAPI.func_or_class.rank
        _check_k = FreshetAPI.func_or_class._check_k
        _rank_batch = FreshetAPI.func_or_class._rank_batch
        _rank_items = FreshetAPI.func_or_class._rank_items
        calls: list[tuple[int, list]] = []
        _ranking = 0

        async def _shard_contexts(self, shard, keys):
            users = [user_of[k] for k in keys.tolist()]
            self.calls.append((shard, users))
            await asyncio.sleep((slow or {}).get(shard, 0.0))
            if shard in (failing or {}):
                raise failing[shard]
            return [contexts[u] for u in users]

        async def _snapshot_for(self, pushed_by):
            failed = [TimeoutError("the sync did not answer") if p in sync_fails else None for p in pushed_by]
            return snap, [False] * len(pushed_by), failed

    return Replica()


def _requests_and_contexts(rng, n_items: int, users: int = 24):
    """``users`` requests (mixed ``k`` and ``exclude_seen``) with users that have a row, only a
    session context, or neither; returns ``(requests, contexts by user, posted items by user)``."""
    from ps.ids import keyed
    from ps.shard import RankContext
    from serving.schemas import RankRequest

    contexts, requests, posted = {}, [], {}
    for u in range(users):
        posted[f"u{u}"] = {f"it{i}" for i in rng.integers(0, n_items, 5).tolist()}
        recent = keyed(sorted(posted[f"u{u}"])).keys
        row = rng.normal(size=DIM).astype(np.float32) if u % 4 else None
        contexts[f"u{u}"] = RankContext(row, None, 1, recent if u not in (3, 4) else np.zeros(0, np.uint64))
        requests.append(RankRequest(user_id=f"u{u}", k=10 + u % 2, exclude_seen=u % 5 != 0))
    return requests, contexts, posted


def test_batched_ranking_returns_exactly_what_single_ranking_returns(batched_ranking):
    from serving.app import _rank_requests
    from workers.ranking import _SCORE_BLOCK, RankingSnapshot

    model = _model()
    rng = np.random.default_rng(7)

    async def run(replica, requests):
        single = [await replica.rank(r) for r in requests]  # one at a time: each alone, not queued
        batched = await asyncio.gather(*(replica.rank(r) for r in requests))
        return single, batched

    # Below one scoring block, and over several blocks with a partial last one.
    for n_items in (50, 5000, 2 * _SCORE_BLOCK + 1234):
        snap = RankingSnapshot(_View(model, n_items, DIM, seed=n_items), model)
        requests, contexts, posted = _requests_and_contexts(rng, n_items)
        replica = batched_ranking(snap, contexts)
        # One event loop per replica: Serve's batch queue is bound to the loop it first ran on.
        single, batched = asyncio.run(run(replica, requests))
        calls = replica.calls[len(requests):]  # the concurrent round's shard calls
        assert {s for s, _ in calls} == {0, 1} and any(len(users) > 1 for _, users in calls), calls
        assert len(calls) < len(requests)  # users shared calls
        assert all(a.body == b.body and a.status_code == b.status_code == 200 for a, b in zip(single, batched))
        direct = _rank_requests(snap, requests, [contexts[r.user_id] for r in requests], [False] * len(requests))
        for j, (req, answer, (ranked, reason, version)) in enumerate(zip(requests, batched, direct)):
            body = json.loads(answer.body)
            assert [it["item_id"] for it in body["items"]] == ranked.item_ids, (n_items, j)
            assert [it["score"] for it in body["items"]] == ranked.scores, (n_items, j)
            assert body["fallback_reason"] == reason and body["model_version"] == version == snap.model_version
            assert len(ranked.item_ids) == req.k
            assert not req.exclude_seen or j in (3, 4) or not set(ranked.item_ids) & posted[req.user_id], (n_items, j)
            # ... and what the evaluation ranks with (RankingSnapshot.rank, Ranker.rank_many).
            ctx = contexts[req.user_id]
            seen = ctx.recent if req.exclude_seen else None
            want = snap.rank(ctx.row, seen, req.k, history=ctx.recent)
            if ctx.row is None and len(ctx.recent):
                want = snap.rank(snap.context_query(ctx.recent), seen, req.k, history=())
            assert ranked == want, (n_items, j)
            assert reason == (None if ranked.fallback is None else "new_user")
        assert direct[4][0].fallback == "popular" and direct[0][0].fallback is None and direct[1][0].fallback is None
        # The scores themselves, block by block for many queries against one product each.
        qs = rng.normal(size=(24, DIM)).astype(np.float32)
        many = snap.scores(qs)
        for j in range(len(qs)):
            one = snap.scores(qs[j])[0]
            assert one.dtype == many.dtype == np.float32 and np.array_equal(one, many[j]), j


def test_a_request_that_fails_in_a_batch_fails_alone(batched_ranking):
    from ps.ids import keyed
    from ps.plan import ShardingPlan
    from ps.shard import RankContext
    from serving.schemas import RankRequest
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 300, DIM, seed=3), model)
    rng = np.random.default_rng(5)
    it1 = keyed(["it1"]).keys
    users = [f"u{j}" for j in range(12)]
    contexts = {u: RankContext(rng.normal(size=DIM).astype(np.float32), None, 1, it1) for u in users}
    shard = dict(zip(users, ShardingPlan.uniform(64, 2).shards_of_keys(keyed(users).keys).tolist()))
    bad = next(u for u in users if shard[u] == 0)
    contexts[bad] = RankContext(rng.normal(size=DIM + 1).astype(np.float32), None, 1, it1)  # its query raises
    replica = batched_ranking(snap, contexts, failing={1: TimeoutError("shard 1 did not answer")})

    async def run():
        return await asyncio.gather(*(replica.rank(RankRequest(user_id=u, k=7)) for u in users),
                                    return_exceptions=True)

    got = dict(zip(users, asyncio.run(run())))
    assert any(len(u) > 1 for _, u in replica.calls), replica.calls
    assert isinstance(got[bad], ValueError), got[bad]
    for u in users:
        if shard[u] == 1:  # its shard failed: 503, retry
            assert got[u].status_code == 503 and got[u].headers["Retry-After"] == "1", u
        elif u != bad:
            ctx = contexts[u]
            want = snap.rank(ctx.row, ctx.recent, 7, history=ctx.recent)
            assert got[u].status_code == 200 and json.loads(got[u].body)["items"] == [
                {"item_id": i, "score": x} for i, x in zip(want.item_ids, want.scores)], u


def test_a_slow_shard_delays_only_its_own_users(batched_ranking):
    from ps.ids import keyed
    from ps.plan import ShardingPlan
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 300, DIM, seed=4), model)
    requests, contexts, _ = _requests_and_contexts(np.random.default_rng(6), 300, users=16)
    shard = dict(zip(contexts, ShardingPlan.uniform(64, 2).shards_of_keys(keyed(list(contexts)).keys).tolist()))
    replica = batched_ranking(snap, contexts, slow={1: 1.0})
    order: list[str] = []

    async def one(r):
        await replica.rank(r)
        order.append(r.user_id)

    async def run():
        await asyncio.gather(*(one(r) for r in requests))

    asyncio.run(run())
    assert any(len(u) > 1 for _, u in replica.calls), replica.calls
    # Every fast shard's user is answered before any slow shard's: no one waits for a shard
    # that is not theirs, though they shared a batch.
    on = [shard[u] for u in order]
    assert 0 in on and 1 in on and on == sorted(on), on


def test_users_whose_sync_failed_get_503_and_are_not_ranked(batched_ranking, monkeypatch):
    import serving.app as app_module
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 300, DIM, seed=3), model)
    requests, contexts, _ = _requests_and_contexts(np.random.default_rng(8), 300, users=16)
    failing = {f"u{u}" for u in (1, 2, 6)}  # users with a row whose push the failed sync was to bring
    contexts = {u: c._replace(pushed_by=("t", int(u[1:]))) if u in failing else c for u, c in contexts.items()}
    alone = batched_ranking(snap, contexts)

    async def singly():  # one event loop: Serve's batch queue is bound to the first it runs on
        return {r.user_id: await alone.rank(r) for r in requests}

    expected = asyncio.run(singly())

    ranked_users: list[str] = []
    real = app_module._rank_requests

    def counting(snap, reqs, ctxs, behind, **kw):
        ranked_users.extend(r.user_id for r in reqs)
        return real(snap, reqs, ctxs, behind, **kw)

    # Serve's ingress decorator rebuilt the class, so its methods read a copy of the module's globals.
    monkeypatch.setitem(app_module.FreshetAPI.func_or_class._rank_batch.__wrapped__.__globals__,
                        "_rank_requests", counting)
    replica = batched_ranking(snap, contexts, sync_fails=frozenset(("t", int(u[1:])) for u in failing))

    async def run():
        return await asyncio.gather(*(replica.rank(r) for r in requests))

    got = dict(zip((r.user_id for r in requests), asyncio.run(run())))
    assert any(len(u) > 1 for _, u in replica.calls), replica.calls  # they shared batches
    for u, resp in got.items():
        if u in failing:
            assert resp.status_code == 503, (u, resp.body)
        else:
            assert resp.status_code == 200 and resp.body == expected[u].body, u
    assert sorted(ranked_users) == sorted(set(got) - failing)  # no ranking thrown away


def test_a_lone_request_skips_the_batch_queue_and_concurrent_ones_share_batches(batched_ranking):
    # Serve's batch queue costs a lone request ~0.28 ms (BENCHMARKS.md section 8): a request with
    # no other /rank in flight on its replica is ranked at once, the others queue and batch.
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 300, DIM, seed=4), model)
    requests, contexts, _ = _requests_and_contexts(np.random.default_rng(4), 300, users=10)
    queued: list[str] = []  # users ranked through Serve's batch queue

    def spied():
        replica = batched_ranking(snap, contexts)
        rank_items = replica._rank_items

        def counting(items):
            if sys._getframe(1).f_code.co_name == "_rank_batch":
                queued.extend(r.user_id for r, _ in items)
            return rank_items(items)

        replica._rank_items = counting
        return replica

    replica = spied()

    async def one_by_one():
        return [await replica.rank(r) for r in requests]

    alone = asyncio.run(one_by_one())
    assert queued == [] and [len(u) for _, u in replica.calls] == [1] * len(requests)
    replica = spied()

    async def together():
        return await asyncio.gather(*(replica.rank(r) for r in requests))

    got = asyncio.run(together())
    assert sorted(queued) == sorted(r.user_id for r in requests[1:])  # the first found the replica idle
    assert any(len(u) > 1 for _, u in replica.calls), replica.calls  # the others shared batches
    assert [r.body for r in got] == [r.body for r in alone]


def test_a_mirror_sync_its_caller_stopped_waiting_for_keeps_its_turn_until_it_ends():
    # A caller stops waiting for the sync it started when its client goes away (cancelled) or
    # after request_timeout_s, but the sync goes on in its thread: a second one must not start
    # beside it (RowCache.sync is not re-entrant), only after it.
    import threading

    from serving.app import FreshetAPI

    class Replica:
        _refresh = FreshetAPI.func_or_class._refresh
        _run = FreshetAPI.func_or_class._run
        _sync_lock = None

        def __init__(self, timeout_s):
            self.timeout_s = timeout_s
            self._pool = concurrent.futures.ThreadPoolExecutor(4)
            self.go_on = threading.Event()
            self.lock = threading.Lock()
            self.running = self.most = self.done = 0

        def _refresh_now(self):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.go_on.wait(10)
            with self.lock:
                self.running -= 1
                self.done += 1

    async def timed_out(replica):
        with pytest.raises(TimeoutError):
            await replica._refresh()
        replica.timeout_s = 30.0  # for the next caller, under any load
        return await next_one(replica)

    async def cancelled(replica):
        first = asyncio.ensure_future(replica._refresh())
        await asyncio.sleep(0.1)  # its sync is running
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await next_one(replica)

    async def next_one(replica):
        second = asyncio.ensure_future(replica._refresh())
        await asyncio.sleep(0.2)
        before = replica.running, replica.done  # the first sync alone, still going
        replica.go_on.set()
        await second
        return before

    for scenario, timeout_s in ((timed_out, 0.05), (cancelled, 30.0)):
        replica = Replica(timeout_s)
        assert asyncio.run(scenario(replica)) == (1, 0), scenario.__name__
        assert (replica.most, replica.done) == (1, 2), scenario.__name__
        replica._pool.shutdown()


def test_only_a_lone_request_on_an_idle_replica_splits_its_product(batched_ranking, monkeypatch):
    # The second core helps a request only when no other /rank is in flight on the replica; a
    # replica under load keeps every product on one thread (BENCHMARKS.md section 8).
    import threading

    import serving.app as app_module
    import workers.ranking as ranking

    model = _model()
    n = ranking._SPLIT_MIN_BLOCKS * ranking._SCORE_BLOCK + 1  # large enough to split
    snap = ranking.RankingSnapshot(_View(model, n, DIM, seed=5), model)
    requests, contexts, _ = _requests_and_contexts(np.random.default_rng(9), n, users=12)
    calls: list[tuple[int, int]] = []  # (requests ranked, threads) per _rank_requests
    real = app_module._rank_requests
    helper_blocks = []
    score_blocks = ranking.RankingSnapshot._score_blocks

    def spy(self, q, out, starts):
        if threading.current_thread().name.startswith(ranking._SPLIT_THREAD):
            helper_blocks.append(len(starts))
        return score_blocks(self, q, out, starts)

    monkeypatch.setattr(ranking.RankingSnapshot, "_score_blocks", spy)

    def recording(snap, reqs, ctxs, behind, *, threads=1):
        calls.append((len(reqs), threads))
        return real(snap, reqs, ctxs, behind, threads=threads)

    monkeypatch.setitem(app_module.FreshetAPI.func_or_class._rank_batch.__wrapped__.__globals__,
                        "_rank_requests", recording)
    replica = batched_ranking(snap, contexts)

    async def one_by_one():
        return [await replica.rank(r) for r in requests[:3]]

    alone = asyncio.run(one_by_one())
    assert calls == [(1, 2)] * 3 and all(r.status_code == 200 for r in alone)
    assert len(helper_blocks) == 3  # each lone product was split
    calls.clear()
    helper_blocks.clear()
    replica = batched_ranking(snap, contexts)

    async def together():
        return await asyncio.gather(*(replica.rank(r) for r in requests))

    got = asyncio.run(together())
    assert all(r.status_code == 200 for r in got)
    assert calls[0][1] == 1 and sum(k for k, _ in calls) == len(requests), calls
    assert len(helper_blocks) == sum(1 for k, t in calls if k == 1 and t == 2)  # only lone ones split
    assert [r.body for r in got[:3]] == [r.body for r in alone]  # split or not, the same answers


def test_a_failed_sync_answers_only_the_users_who_needed_it():
    from ps.cache import Coverage
    from serving.app import FreshetAPI
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 50, DIM), model)

    class Mirror:
        synced_at = time.monotonic()

    class Replica:
        _snapshot_for = FreshetAPI.func_or_class._snapshot_for
        _stale = FreshetAPI.func_or_class._stale
        mirror, refresh_s = Mirror(), 1.0
        served = (snap, Coverage(({"t": 5}, {"t": 5}), True))

        def _start_syncer(self):
            return False

        async def _refresh(self, needed=None):
            raise TimeoutError("the sync did not answer")

    pushed = [("t", 1), ("t", 9), None, ("u", 0)]  # covered, behind, no row, another producer
    got, behind, failed = asyncio.run(Replica()._snapshot_for(pushed))
    assert got is snap and behind == [False] * 4
    assert [type(f).__name__ if f else None for f in failed] == [None, "TimeoutError", None, "TimeoutError"]
    # Covered by the snapshot: no sync at all.
    assert asyncio.run(Replica()._snapshot_for([("t", 5), None]))[1:] == ([False, False], [None, None])
    # A stale mirror: everyone needed that sync, so everyone gets its error.
    Mirror.synced_at = time.monotonic() - 60
    with pytest.raises(TimeoutError):
        asyncio.run(Replica()._snapshot_for([("t", 1)]))


def test_snapshot_is_not_changed_by_a_later_sync_of_its_view():
    from workers.ranking import RankingSnapshot

    model = _model()
    view = _View(model, 500, DIM)
    snap = RankingSnapshot(view, model)
    q = np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    before = snap.rank(q, None, 20, history=["it1", "it2"])
    view.update(seed=9)  # the mirror syncs while requests still rank on the old snapshot
    assert snap.rank(q, None, 20, history=["it1", "it2"]) == before


def test_a_rank_answer_with_a_non_finite_score_matches_its_own_schema():
    # /rank writes a score that is not finite (a NaN or inf row) as null; the published
    # RankResponse schema must admit what the endpoint sends, or a client checking it fails.
    from serving.app import _rank_response
    from serving.schemas import RankResponse
    from workers.ranking import RankingSnapshot

    model = _model()
    view = _View(model, 20, DIM)
    view.mats[model.item_table][3] = np.nan
    view.mats[model.item_bias_table][4] = np.inf
    snap = RankingSnapshot(view, model)
    ranked = snap.rank(np.ones(DIM, np.float32), None, 20)
    body = json.loads(_rank_response("u", ranked, None, snap.model_version).body)
    assert {"item_id": "it3", "score": None} in body["items"] and body["items"][0] == {"item_id": "it4", "score": None}
    assert RankResponse.model_validate(body).items[0].score is None
