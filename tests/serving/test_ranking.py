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

The rest need no Ray: ``/score`` counted through the snapshot (wrapped matrices that record
every row read, and refuse a product with the whole catalogue), the batched scoring path driven
directly (``FreshetAPI._rank_batch``, with stand-in contexts) against the single one, and a snapshot that stays what it was
when its catalogue view changes in place (what the replica's mirror does on every sync).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import time
import uuid

import httpx
import numpy as np
import pytest
import ray

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
    scores = (pulled[m.item_table][0].astype(np.float64) @ q + pulled[m.item_bias_table][0][:, 0]
              + m.recent_weight * np.log1p(rc[:, 0] * np.exp2(rc[:, 1] - rc[:, 1].max())))
    order = [i for i in np.argsort(-scores, kind="stable").tolist() if i not in set(recent)][:K]
    return [items[i] for i in order], {items[i]: float(scores[i]) for i in range(N_ITEMS)}


def test_first_requests_after_the_first_events_are_right(deployment):
    http, cfg, dep = deployment
    assert _stats(http)["events_accepted"] == 0  # fresh: nothing posted, the mirror holds nothing
    r = http.post("/events", json={"events": HISTORY})
    assert r.status_code == 200 and r.json()["accepted"] == len(HISTORY), r.text

    seen: dict[str, set] = {"rank": set(), "score": set()}
    versions = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # at once, back to back, for about a second
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
        async def _contexts(self, user_ids):
            return [RankContext(row, None, 1, recent)]

        async def _snapshot_for(self, pushed_by):
            return snap, [False]

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
        async def _contexts(self, user_ids):
            return [RankContext(None, None, 1, np.zeros(0, np.uint64))]

        async def _snapshot_for(self, pushed_by):
            return snap, [False]

    body = asyncio.run(_score_endpoint()(Replica(), ScoreRequest(user_id="u", item_ids=["it1", "it2"])))
    assert body.fallback == "popular" and body.fallback_reason == "new_user"
    assert sum(reads["popularity"]) == 2 and not reads["items"] and not reads["bias"] and not reads["ctx"], reads


@pytest.fixture
def batched_ranking(monkeypatch):
    """A factory of stand-in replicas that run ``FreshetAPI._rank_batch`` (the ``@serve.batch``
    path of ``/rank``) outside Serve, with contexts and a snapshot given by the test.

    Serve keeps the batch queue in the decorated function itself, bound to the event loop it
    first ran on; it is dropped afterwards, or the class could no longer be pickled into a
    deployment by a later test in this process."""
    from ray.serve import batching

    from serving.app import FreshetAPI

    # Outside a replica there is no replica context for Serve's max_ongoing_requests warning.
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    lazy = FreshetAPI.func_or_class._rank_batch.set_max_batch_size.__self__

    def stand_in(snap, contexts):
        lazy._queue = None  # each test's asyncio.run is a new event loop
        return _stand_in(FreshetAPI, snap, contexts)

    try:
        yield stand_in
    finally:
        lazy._queue = None


def _stand_in(FreshetAPI, snap, contexts: dict):
    """A replica whose users' contexts are ``contexts[user_id]`` (a RankContext, or an exception
    raised by that user's shard) and whose snapshot is ``snap``; it records each batch's users."""

    class Replica:
        _rank_batch = FreshetAPI.func_or_class._rank_batch
        batches: list[list] = []

        async def _contexts(self, user_ids):
            self.batches.append(list(user_ids))
            return [contexts[u] for u in user_ids]

        async def _snapshot_for(self, pushed_by):
            return snap, [False] * len(pushed_by)

    return Replica()


def test_batched_ranking_returns_exactly_what_single_ranking_returns(batched_ranking):
    from ps.ids import keyed
    from ps.shard import RankContext
    from serving.app import _rank_requests
    from serving.schemas import RankRequest
    from workers.ranking import _SCORE_BLOCK, RankingSnapshot

    model = _model()
    rng = np.random.default_rng(7)

    async def run(replica, requests):
        single = [await replica._rank_batch(r) for r in requests]  # one at a time: batches of one
        batched = await asyncio.gather(*(replica._rank_batch(r) for r in requests))
        return single, batched

    # Below one scoring block, and over several blocks with a partial last one.
    for n_items in (50, 5000, 2 * _SCORE_BLOCK + 1234):
        snap = RankingSnapshot(_View(model, n_items, DIM, seed=n_items), model)
        contexts, requests, posted = {}, [], {}
        for u in range(24):
            posted[f"u{u}"] = {f"it{i}" for i in rng.integers(0, n_items, 5).tolist()}
            recent = keyed(sorted(posted[f"u{u}"])).keys
            # Users with a row, users with only a session context, and one with neither.
            row = rng.normal(size=DIM).astype(np.float32) if u % 4 else None
            contexts[f"u{u}"] = RankContext(row, None, 1, recent if u not in (3, 4) else np.zeros(0, np.uint64))
            requests.append(RankRequest(user_id=f"u{u}", k=10 + u % 2, exclude_seen=u % 5 != 0))
        replica = batched_ranking(snap, contexts)
        # One event loop per replica: Serve's batch queue is bound to the loop it first ran on.
        single, batched = asyncio.run(run(replica, requests))
        assert any(len(b) > 1 for b in replica.batches), replica.batches  # batches really formed
        assert len(replica.batches) < 2 * len(requests)
        direct = _rank_requests(snap, requests, [contexts[r.user_id] for r in requests], [False] * len(requests))
        for j, (req, a, b, c) in enumerate(zip(requests, single, batched, direct)):
            u = j
            assert a == b == c, (n_items, j)
            ranked, reason, version = b
            ctx = contexts[req.user_id]
            assert len(ranked.item_ids) == req.k
            assert not req.exclude_seen or u in (3, 4) or not set(ranked.item_ids) & posted[req.user_id], (n_items, j)
            # ... and what the evaluation ranks with (RankingSnapshot.rank, Ranker.rank_many).
            want = snap.rank(ctx.row, ctx.recent if req.exclude_seen else None, req.k, history=ctx.recent)
            if ctx.row is None and len(ctx.recent):
                want = snap.rank(snap.context_query(ctx.recent), ctx.recent if req.exclude_seen else None, req.k,
                                 history=())
            assert ranked == want, (n_items, j)
            assert reason == (None if ranked.fallback is None else "new_user") and version == snap.model_version
        assert direct[4][0].fallback == "popular" and direct[0][0].fallback is None and direct[1][0].fallback is None
        # The scores themselves, block by block for many queries against one product each.
        qs = rng.normal(size=(24, DIM)).astype(np.float32)
        many = snap.scores(qs)
        for j in range(len(qs)):
            one = snap.scores(qs[j])[0]
            assert one.dtype == many.dtype == np.float32 and np.array_equal(one, many[j]), j


def test_a_request_that_fails_in_a_batch_fails_alone(batched_ranking):
    from ps.ids import keyed
    from ps.shard import RankContext
    from serving.schemas import RankRequest
    from workers.ranking import RankingSnapshot

    model = _model()
    snap = RankingSnapshot(_View(model, 300, DIM, seed=3), model)
    rng = np.random.default_rng(5)
    it1 = keyed(["it1"]).keys
    contexts = {f"u{j}": RankContext(rng.normal(size=DIM).astype(np.float32), None, 1, it1) for j in range(6)}
    contexts["u2"] = RankContext(rng.normal(size=DIM + 1).astype(np.float32), None, 1, it1)  # its query raises
    contexts["u4"] = TimeoutError("shard 1 did not answer")  # its shard failed
    replica = batched_ranking(snap, contexts)

    async def run():
        return await asyncio.gather(*(replica._rank_batch(RankRequest(user_id=u, k=7)) for u in contexts))

    got = dict(zip(contexts, asyncio.run(run())))
    assert any(len(b) > 1 for b in replica.batches), replica.batches
    assert isinstance(got["u2"], ValueError), got["u2"]
    assert isinstance(got["u4"], TimeoutError), got["u4"]
    for u in ("u0", "u1", "u3", "u5"):
        ctx = contexts[u]
        assert got[u] == (snap.rank(ctx.row, ctx.recent, 7, history=ctx.recent), None, snap.model_version), u


def test_snapshot_is_not_changed_by_a_later_sync_of_its_view():
    from workers.ranking import RankingSnapshot

    model = _model()
    view = _View(model, 500, DIM)
    snap = RankingSnapshot(view, model)
    q = np.random.default_rng(1).normal(size=DIM).astype(np.float32)
    before = snap.rank(q, None, 20, history=["it1", "it2"])
    view.update(seed=9)  # the mirror syncs while requests still rank on the old snapshot
    assert snap.rank(q, None, 20, history=["it1", "it2"]) == before
