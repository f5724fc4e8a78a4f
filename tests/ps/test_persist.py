"""Crash-consistent shard state: push log + snapshots recover bitwise the acknowledged
state, duplicates stay rejected, torn log tails are dropped, named checkpoints restore,
files are Arrow/JSON only; and real Ray kills (ray.kill, SIGKILL) lose nothing."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ps.config import PSConfig
from serving.config import load_config
from ps.persist import list_checkpoints, read_log, read_snapshot
from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from tests.conftest import FakeClock
from tests.ps.test_shard import K, pull, push

DIM = 4


def _cfg(**over) -> PSConfig:
    ps = {
        "num_shards": 1,
        "num_buckets": 8,
        "shard_num_cpus": 0.1,
        "snapshot_every_pushes": 1000,
        "tables": {
            "user": {"dim": DIM, "optimizer": {"kind": "adagrad", "lr": 0.3}},
            "item": {"dim": DIM, "optimizer": {"kind": "sgd", "lr": 0.2, "momentum": 0.9}},
        },
    }
    for k, v in over.items():
        ps[k] = {**ps[k], **v} if k == "tables" else v
    return load_config(overrides={"ps": ps}).ps


def _shard(cfg: PSConfig, state_dir=None, **kw) -> PSShard:
    return PSShard(0, ShardingPlan.uniform(cfg.num_buckets, cfg.num_shards), cfg, state_dir, **kw)


def _pushes(n: int, seed: int = 0, producer: str = "t0") -> list[tuple]:
    """Deterministic pushes: mixed int/str IDs with repeats, four tables, users' recent items."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        users = [int(x) for x in rng.integers(0, 6, 3)] + [f"u{x}" for x in rng.integers(0, 4, 2)]
        items = [f"i{x}" for x in rng.integers(0, 8, 4)] + [int(x) for x in rng.integers(-(2**40), -(2**40) + 5, 3)]
        if k % 3 == 0:
            items = [int(x) for x in rng.integers(100, 110, 5)]  # an all-int push: int64 arrays in the log
        upd = {
            "user": (users, rng.normal(size=(len(users), DIM)).astype(np.float32)),
            "item": (items, rng.normal(size=(len(items), DIM)).astype(np.float32)),
            "item_bias": (items, rng.normal(size=(len(items), 1)).astype(np.float32)),
            "item_pop": (items[:2], np.ones((2, 1), np.float32)),
        }
        out.append((PushId(producer, 10 * k + 1), upd, (users[:2], items[:2], np.array([2 * k, 2 * k + 1]))))
    return out


def _recent(hist):
    return None if hist is None else (K(hist[0]), K(hist[1]), np.asarray(hist[2]))


def _apply(shard: PSShard, pushes) -> None:
    for pid, upd, hist in pushes:
        assert push(shard, pid, upd, _recent(hist))[1], pid


def _dump(shard: PSShard) -> dict:
    """The shard's whole persisted state, exactly, by key (slots may differ after a restore)."""
    users, offsets, items = shard.recent.capture()
    out = {
        "version": shard.version,
        "lsn": shard._lsn,
        "hw": dict(shard.high_water),
        "seen": (users.tolist(), offsets.tolist(), items.tolist()),
    }
    for name, t in shard.tables.items():
        st = t.capture()
        order = np.argsort(st.keys)
        out[name] = (
            [st.ids[j] for j in order], torch.from_numpy(st.rows[order]), torch.from_numpy(st.state[order]),
            # Tombstones are readers' bookkeeping, pruned as readers sync (not logged), so a
            # replay may keep more of them: compared apart (see test_ttl_expiry_...).
            st.changed_at[order], st.touched_at[order], st.score[order].tolist(),
        )
    return out


def _assert_identical(a: dict, b: dict, *, times: bool = True) -> None:
    """Equal state; ``times=False`` skips push wall-clock times (for shards fed separately)."""
    assert a.keys() == b.keys()
    for k in ("version", "lsn", "hw", "seen"):
        assert a[k] == b[k], k
    for k in a.keys() - {"version", "lsn", "hw", "seen"}:
        ids_a, rows_a, st_a, ch_a, to_a, rm_a = a[k]
        ids_b, rows_b, st_b, ch_b, to_b, rm_b = b[k]
        assert ids_a == ids_b and [type(x) for x in ids_a] == [type(x) for x in ids_b], k
        assert torch.equal(rows_a, rows_b), f"{k}: rows differ"
        assert torch.equal(st_a, st_b), f"{k}: optimizer state differs"
        np.testing.assert_array_equal(ch_a, ch_b, err_msg=k)
        if times:
            np.testing.assert_array_equal(to_a, to_b, err_msg=k)
        assert rm_a == rm_b, k


def _segments(d: Path) -> list[Path]:
    return sorted(d.glob("log-*.arrow"))


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("every", [1000, 3], ids=["log-only", "auto-snapshots"])
def test_restart_recovers_bitwise_identical_state(tmp_path, every):
    cfg = _cfg(snapshot_every_pushes=every)
    pushes = _pushes(19)
    a = _shard(cfg, tmp_path / "s")
    ref = _shard(cfg)  # in memory only: what the pushes must produce
    _apply(a, pushes[:8])
    snap = a.snapshot()
    assert snap["version"] == 8 and Path(snap["path"]).is_dir()
    _apply(a, pushes[8:])
    _apply(ref, pushes)
    _assert_identical(_dump(a), _dump(ref), times=False)
    a.wait_for_snapshots()

    b = _shard(cfg, tmp_path / "s")
    _assert_identical(_dump(b), _dump(a))
    rec = b.persistence()["recovery"]
    if every == 1000:
        assert rec == {**rec, "snapshot_lsn": 8, "replayed": 11}
    else:  # the manual snapshot restarts the count: automatic ones after pushes 11, 14 and 17
        assert rec == {**rec, "snapshot_lsn": 17, "replayed": 2}
        assert sorted(p.name for p in (tmp_path / "s").glob("snap-*")) == ["snap-000000000014", "snap-000000000017"]
    # Pulls read the same rows, and the recovered shard keeps training identically.
    ids = ["u1", 3, 5, "u0"]
    np.testing.assert_array_equal(pull(b, {"user": ids}, False)["user"][0], pull(a, {"user": ids}, False)["user"][0])
    more = _pushes(5, seed=1, producer="t1")
    _apply(b, more)
    _apply(ref, more)
    _assert_identical(_dump(b), _dump(ref), times=False)
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), _dump(b))


def _rotated(tmp_path) -> tuple[PSConfig, Path, PSShard]:
    """A durable shard after 20 pushes, snapshotting every 3: snapshots at LSN 15 and 18."""
    cfg = _cfg(snapshot_every_pushes=3)
    d = tmp_path / "s"
    a = _shard(cfg, d)
    _apply(a, _pushes(20))
    a.wait_for_snapshots()
    return cfg, d, a


def test_snapshots_rotate_and_old_files_are_deleted(tmp_path):
    cfg, d, a = _rotated(tmp_path)
    snaps = sorted(p.name for p in d.glob("snap-*"))
    assert snaps == ["snap-000000000015", "snap-000000000018"]
    assert (d / "CURRENT").read_text().strip() == "snap-000000000018"
    assert [p.name for p in _segments(d)] == ["log-000000000015.arrow", "log-000000000018.arrow"]
    assert [r.lsn for r in read_log(d / "log-000000000018.arrow")] == [19, 20]
    assert not list(d.glob(".tmp-*"))
    # A CURRENT that cannot be read falls back to the older snapshot plus the log.
    (d / "snap-000000000018" / "table-0.arrow").write_bytes(b"not arrow")
    b = _shard(cfg, d)
    assert b.persistence()["recovery"]["snapshot_lsn"] == 15
    _assert_identical(_dump(b), _dump(a))


def test_recent_items_alone_snapshot_too_so_the_log_and_the_replay_stay_bounded(tmp_path):
    # /events records users' recent items on the shards whether or not a trainer pushes: with the
    # trainers stopped for a day, only pushes counting toward a snapshot left the log growing.
    cfg = _cfg(snapshot_every_pushes=4)
    d = tmp_path / "s"
    a = _shard(cfg, d)
    for k in range(30):
        a.record_recent(np.array([k % 5], np.uint64), np.array([100 + k], np.uint64), np.array([k], np.int64))
    a.wait_for_snapshots()
    assert a.persistence()["lsn"] == 30 and a.persistence()["records_since_snapshot"] < 4
    assert len(_segments(d)) <= 2 and (d / "CURRENT").exists()
    b = _shard(cfg, d)
    assert b.persistence()["recovery"]["replayed"] < 4  # not the 30 records
    assert b.persistence()["recovery"]["snapshot_lsn"] >= 27
    _assert_identical(_dump(b), _dump(a))


def test_a_snapshot_with_a_damaged_file_is_refused_naming_it_and_the_older_one_used(tmp_path):
    cfg, d, a = _rotated(tmp_path)
    table = d / "snap-000000000018" / "table-0.arrow"
    data = bytearray(table.read_bytes())
    for j in range(len(data) // 2, len(data) // 2 + 64, 7):  # still Arrow: only the digest tells
        data[j] ^= 0x7F
    table.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{table}: its bytes do not match the digest"):
        read_snapshot(table.parent)
    b = _shard(cfg, d)
    assert b.persistence()["recovery"]["snapshot_lsn"] == 15
    _assert_identical(_dump(b), _dump(a))


def test_duplicate_push_after_recovery_is_rejected_and_not_logged(tmp_path):
    cfg = _cfg()
    pushes = _pushes(6)
    a = _shard(cfg, tmp_path / "s")
    _apply(a, pushes)
    b = _shard(cfg, tmp_path / "s")
    before = _dump(b)
    seg = _segments(tmp_path / "s")[-1]
    size = seg.stat().st_size
    for pid, upd, hist in (pushes[-1], pushes[2]):  # the last one, and an older one
        assert push(b, pid, upd, _recent(hist)) == (6, False)
    _assert_identical(_dump(b), before)
    assert seg.stat().st_size == size
    assert b.stats()["duplicate_pushes"] == 2
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), before)


@pytest.mark.parametrize("cut", ["one-byte", "half-record", "torn-segment-schema"])
def test_torn_log_tail_is_ignored(tmp_path, cut):
    cfg = _cfg()
    d = tmp_path / "s"
    pushes = _pushes(8)
    a = _shard(cfg, d)
    _apply(a, pushes[:7])
    if cut == "torn-segment-schema":
        a.snapshot()  # a fresh segment whose very schema message is then torn
    seg = _segments(d)[-1]
    size_before = seg.stat().st_size
    _apply(a, pushes[7:])
    size_after = seg.stat().st_size
    del a  # the "crash": the last push's record is only partly on disk
    keep = {"one-byte": size_after - 1, "half-record": (size_before + size_after) // 2, "torn-segment-schema": 8}[cut]
    assert keep < size_after
    with open(seg, "r+b") as f:
        f.truncate(keep)
    ref = _shard(cfg)
    _apply(ref, pushes[:7])
    b = _shard(cfg, d)
    _assert_identical(_dump(b), _dump(ref), times=False)
    # The torn push was never acknowledged: its re-send applies, and later restarts see it.
    more = pushes[7:] + _pushes(2, seed=3, producer="t9")
    _apply(b, more)
    _apply(ref, more)
    _assert_identical(_dump(b), _dump(ref), times=False)
    _assert_identical(_dump(_shard(cfg, d)), _dump(b))


def test_rejected_pushes_change_nothing_and_are_not_logged(tmp_path):
    cfg = _cfg()
    a = _shard(cfg, tmp_path / "s")
    _apply(a, _pushes(3))
    before = _dump(a)
    good = ([1], np.ones((1, DIM), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        push(a, PushId("x", 0), {"user": good, "item": ([2], np.full((1, DIM), np.nan, np.float32))})
    # With a log, an ID that could not be replayed is refused before anything changes.
    for bad in (1.5, None, True):
        ids = np.empty(2, object)
        ids[:] = [2, bad]
        with pytest.raises(ValueError, match="id"):
            a.push(PushId("x", 0), {"user": (K([1]), good[1], np.array([1]), None),
                                    "item": (np.array([5, 6], np.uint64), np.ones((2, DIM), np.float32), ids, None)})
    with pytest.raises(ValueError, match="recent"):
        push(a, PushId("x", 0), {"user": good}, recent=(K([1]), K([2, 3]), np.array([0])))
    _assert_identical(_dump(a), before)
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), before)
    assert push(a, PushId("x", 0), {"user": good}) == (4, True)  # the push id was not consumed




def test_ttl_expiry_is_replayed_with_its_tombstones(tmp_path, monkeypatch):
    import ps.shard as shard_mod

    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(shard_mod, "time", clock)
    cfg = _cfg(tables={"item": {"dim": DIM, "ttl_s": 10.0}})
    a = _shard(cfg, tmp_path / "s")
    g = np.ones((3, DIM), np.float32)
    push(a, PushId("p", 0), {"item": ([1, "a", 2], g)})
    clock.now += 5
    push(a, PushId("p", 1), {"item": ([2, 3, "b"], g)})
    clock.now += 7  # 1 and "a" are 12 s old: this push also expires them
    push(a, PushId("p", 2), {"item": ([1, 4, 5], g)})  # 1 is re-created from its initial row
    clock.now += 6
    assert a.expire()["item"] == 3  # 2, 3, "b": an explicit expiry, logged as its own record
    assert a.expire()["item"] == 0  # nothing to remove: not logged
    assert a.persistence()["lsn"] == 4 and a.get_version() == 3
    assert sorted(a.delta(["item"], since=0).tables["item"].removed.tolist()) == sorted(K(["a", 2, 3, "b"]).tolist())
    b = _shard(cfg, tmp_path / "s")
    _assert_identical(_dump(b), _dump(a))
    assert b.persistence()["recovery"]["replayed"] == 4
    # The replay recorded the removals again; a reader from version 0 is told all of them.
    assert sorted(b.delta(["item"], since=0).tables["item"].removed.tolist()) == sorted(K(["a", 2, 3, "b"]).tolist())


# --------------------------------------------------------------------------- files and checkpoints


def test_state_files_are_arrow_and_json_only(tmp_path):
    cfg = _cfg(snapshot_every_pushes=4)
    a = _shard(cfg, tmp_path / "ps" / "shard-0")
    _apply(a, _pushes(10))
    a.snapshot("nightly")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = set()
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{p} looks like a pickle"
        if p.suffix == ".arrow" and p.name.startswith("log-"):
            schema = pa.ipc.open_stream(pa.memory_map(str(p))).schema
            kinds.add("ipc-stream")
        elif p.suffix == ".arrow":
            schema = pa.ipc.open_file(pa.memory_map(str(p))).schema
            kinds.add("ipc-file")
        elif p.name == "meta.json":
            json.loads(p.read_text())
            kinds.add("json")
            continue
        elif p.name == "LOCK":
            assert p.stat().st_size == 0
            continue
        elif p.name == "CURRENT":
            assert p.read_text().strip().startswith("snap-")
            continue
        else:
            pytest.fail(f"unexpected file {p}")
        for f in schema:  # extension types could carry pickled Python objects
            assert not isinstance(f.type, pa.BaseExtensionType), (p, f)
    assert kinds == {"ipc-stream", "ipc-file", "json"}
    # Mixed int/str ID columns are stored as Arrow unions, not as strings.
    tab = pa.ipc.open_file(pa.memory_map(str(tmp_path / "ps" / "checkpoints" / "nightly" / "shard-0" / "table-0.arrow"))).read_all()
    assert pa.types.is_union(tab.schema.field("id").type)


def test_named_checkpoint_lists_and_restores(tmp_path):
    cfg = _cfg()
    pushes = _pushes(12)
    a = _shard(cfg, tmp_path / "ps" / "shard-0")
    _apply(a, pushes[:5])
    out = a.snapshot("before-deploy")
    assert out["checkpoint"] == str(tmp_path / "ps" / "checkpoints" / "before-deploy" / "shard-0")
    _apply(a, pushes[5:])
    at_ckpt = _shard(cfg)
    _apply(at_ckpt, pushes[:5])

    root = tmp_path / "ps" / "checkpoints"
    (ck,) = list_checkpoints(root)
    assert ck["name"] == "before-deploy" and ck["versions"] == {0: 5} and ck["complete"] and ck["num_shards"] == 1
    assert ck["created_at"] == pytest.approx(time.time(), abs=60)
    assert list_checkpoints(tmp_path / "nope") == []

    # In memory from the checkpoint, and into a fresh state dir.
    _assert_identical(_dump(_shard(cfg, restore_from=root / "before-deploy")), _dump(at_ckpt), times=False)
    d2 = tmp_path / "other" / "shard-0"
    b = _shard(cfg, d2, restore_from=root / "before-deploy", restore_token="start-1")
    _assert_identical(_dump(b), _dump(at_ckpt), times=False)
    _apply(b, pushes[5:8])
    _apply(at_ckpt, pushes[5:8])
    # A Ray restart re-runs __init__ with the same arguments: it keeps its later pushes.
    _assert_identical(_dump(_shard(cfg, d2, restore_from=root / "before-deploy", restore_token="start-1")), _dump(at_ckpt), times=False)
    # A new start with a new token goes back to the checkpoint.
    c = _shard(cfg, d2, restore_from=root / "before-deploy", restore_token="start-2")
    assert c.get_version() == 5 and c.high_water_marks() == {"t0": 41}
    # Replacing a checkpoint of the same name.
    a.snapshot("before-deploy")
    assert [x["versions"] for x in list_checkpoints(root)] == [{0: 12}]
    assert read_snapshot(root / "before-deploy" / "shard-0").version == 12


def test_restore_and_snapshot_errors(tmp_path):
    cfg = _cfg()
    a = _shard(cfg, tmp_path / "ps" / "shard-0")
    _apply(a, _pushes(2))
    a.snapshot("ck")
    ck = tmp_path / "ps" / "checkpoints" / "ck"
    other = _cfg(num_buckets=16)
    with pytest.raises(ValueError, match="sharding plan"):
        _shard(other, tmp_path / "x", restore_from=ck)
    with pytest.raises(ValueError, match="sharding plan"):
        _shard(other, tmp_path / "ps" / "shard-0")  # its own state, but a changed plan
    young = _shard(cfg, tmp_path / "young")
    _apply(young, _pushes(2))  # fewer pushes than snapshot_every_pushes: the plan is still on disk
    with pytest.raises(ValueError, match="sharding plan"):
        _shard(other, tmp_path / "young")
    with pytest.raises(FileNotFoundError, match="shard 1"):
        PSShard(1, ShardingPlan.uniform(8, 2), _cfg(num_shards=2), restore_from=ck)
    # Another optimizer needs another state shape: refuse rather than guess.
    rowwise = _cfg(tables={"user": {"dim": DIM, "optimizer": {"kind": "rowwise_adagrad"}}})
    with pytest.raises(ValueError, match="'user'.*rowwise_adagrad"):
        _shard(rowwise, tmp_path / "ps" / "shard-0")
    with pytest.raises(ValueError, match="state_dir"):
        _shard(cfg).snapshot()
    with pytest.raises(ValueError, match="checkpoint"):
        _shard(cfg).snapshot("n")
    for bad in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="checkpoint name"):
            a.snapshot(bad)
    with pytest.raises(ValueError, match="local directory"):
        _shard(cfg, "s3://bucket/ps")


def test_failed_automatic_snapshot_does_not_fail_the_logged_push(tmp_path, monkeypatch):
    cfg = _cfg(snapshot_every_pushes=2)
    pushes = _pushes(5)
    a = _shard(cfg, tmp_path / "s")

    def broken(state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(a._store, "publish", broken)  # automatic snapshots are written in the background
    _apply(a, pushes)  # pushes 2 and 4 try to snapshot, and still succeed
    assert "No space left" in a.wait_for_snapshots()
    assert "No space left" in a.persistence()["snapshot_error"]
    monkeypatch.undo()
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), _dump(a))


def test_a_second_process_waits_for_the_lock_then_gives_up(tmp_path):
    import subprocess
    import sys

    held = _shard(_cfg(), tmp_path / "s")  # this process now holds the directory's lock
    code = (
        "import sys; from ps.persist import ShardStore\n"
        "try:\n    ShardStore(sys.argv[1], fsync=False, lock_timeout_s=0.3)\n"
        "except RuntimeError as e:\n    print(e); sys.exit(3)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, cwd=repo, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "LOCK" in r.stdout
    del held


def test_cpu_seconds_and_pid():
    s = _shard(_cfg())
    assert s.pid() == os.getpid()
    t0 = s.cpu_seconds()
    sum(i * i for i in range(200_000))
    assert s.cpu_seconds() > t0


# --------------------------------------------------------------------------- real Ray kills


def _ray_cfg(**over) -> PSConfig:
    return _cfg(num_shards=2, num_buckets=16, snapshot_every_pushes=4, max_restarts=-1, **over)


def _expected(pushes) -> dict:
    """What shards that never die hold: one in-process shard owning every bucket.

    Every shard sees every push id and the client keeps each shard's IDs in caller
    order, so rows, versions, high-water marks and history match bitwise.
    """
    cfg = _cfg(num_buckets=16)
    local = _shard(cfg)
    _apply(local, pushes)
    users, items, popular = _pushed_ids(pushes)
    pulled = pull(local, {"user": users, "item": items, "item_bias": items, "item_pop": popular}, initial=False)
    return {
        "rows": {name: rows for name, (rows, _) in pulled.items()},
        "versions": [local.get_version()] * 2,
        "hw": [local.high_water_marks()] * 2,
        "seen": [a.tolist() for a in local.recent_items(K(users))],
    }


def _pushed_ids(pushes) -> tuple[list, list, list]:
    def ids(table):
        return sorted({x for _, upd, _ in pushes for x in upd[table][0]}, key=lambda x: (type(x).__name__, x))

    return ids("user"), ids("item"), ids("item_pop")


def _final_state(client, pushes) -> dict:
    import ray

    users, items, popular = _pushed_ids(pushes)
    pulled = client.pull_many({"user": users, "item": items, "item_bias": items, "item_pop": popular})
    for name, (_, found) in pulled.items():
        assert found.all(), name
    return {
        "rows": {name: rows for name, (rows, _) in pulled.items()},
        "versions": client.versions(),
        "hw": ray.get([sh.high_water_marks.remote() for sh in client.shards]),
        "seen": client.seen(users),
    }


def _assert_same_final(a: dict, b: dict) -> None:
    assert a["versions"] == b["versions"]
    assert a["hw"] == b["hw"]
    assert a["seen"] == b["seen"]
    for name in a["rows"]:
        np.testing.assert_array_equal(a["rows"][name], b["rows"][name], err_msg=name)


@pytest.fixture(scope="module")
def killed_run(ray_cluster, tmp_path_factory):
    """Durable shards pushed through ``PSClient`` while being killed three times:
    ``ray.kill`` of shard 1 between pushes, then SIGKILL of shard 0 and of shard 1
    with a push in flight. Yields ``(client, state_dir, pushes, pids)``."""
    import ray

    from ps.client import start_shards

    state_dir = tmp_path_factory.mktemp("ps")
    pushes = _pushes(24, seed=7)
    client = start_shards(_ray_cfg(fsync=True), namespace=f"t-persist-{uuid.uuid4().hex[:8]}", state_dir=state_dir)
    pids = [ray.get([sh.pid.remote() for sh in client.shards])]
    try:
        for k, (pid, upd, hist) in enumerate(pushes):
            if k == 10:
                ray.kill(client.shards[1], no_restart=False)
                # The very next call succeeds: Ray restarts the shard and retries the push.
                replies = client.push_many(upd, pid, hist)
            elif k in (15, 20):
                victim = 0 if k == 15 else 1
                victim_pid = pids[-1][victim]
                refs = client.push_async(upd, pid, hist)
                os.kill(victim_pid, signal.SIGKILL)
                # The push may or may not have reached the log; either way it counts once.
                replies = ray.get(refs, timeout=120)
            else:
                replies = client.push_many(upd, pid, hist)
            assert [v for v, _ in replies] == [k + 1, k + 1], k
            if k in (10, 15, 20):
                pids.append(ray.get([sh.pid.remote() for sh in client.shards]))
        yield client, state_dir, pushes, pids
    finally:
        for h in client.shards:
            ray.kill(h)


def test_killed_shards_restart_with_exactly_the_acknowledged_state(killed_run):
    import ray

    client, state_dir, pushes, pids = killed_run
    # Each kill really replaced the process of the shard it targeted, and only that one.
    assert [p[0] for p in pids] == [pids[0][0]] * 2 + [pids[2][0]] * 2 and pids[2][0] != pids[0][0]
    assert pids[0][1] != pids[1][1] == pids[2][1] != pids[3][1]
    recovered = ray.get([sh.persistence.remote() for sh in client.shards])
    # Each restart recovered exactly what its shard had acknowledged: a snapshot (written in
    # the background, so perhaps an older one than the last started) plus the log after it;
    # the push in flight at the kill is in the log if it got there, else the retry applied it.
    for shard, acked in ((1, 20), (0, 15)):
        rec = recovered[shard]["recovery"]
        assert rec["snapshot_lsn"] + rec["replayed"] in (acked, acked + 1), (shard, rec)
    _assert_same_final(_final_state(client, pushes), _expected(pushes))
    for i in range(2):
        assert (state_dir / f"shard-{i}" / "CURRENT").exists()


def test_start_shards_restores_a_named_checkpoint(killed_run, tmp_path):
    import ray

    from ps.client import start_shards

    client, state_dir, pushes, _ = killed_run
    ray.get([sh.snapshot.remote("all") for sh in client.shards])
    ck = state_dir / "checkpoints" / "all"
    assert [(c["name"], c["versions"], c["complete"]) for c in list_checkpoints(ck.parent)] == [
        ("all", {0: len(pushes), 1: len(pushes)}, True)
    ]
    with pytest.raises(FileNotFoundError, match="shards \\[2\\]"):
        start_shards(_cfg(num_shards=3, num_buckets=16), namespace="t-persist-missing", state_dir=tmp_path, restore_from=ck)
    restored = start_shards(_ray_cfg(), namespace=f"t-persist-ck-{uuid.uuid4().hex[:8]}", state_dir=tmp_path, restore_from=ck)
    try:
        _assert_same_final(_final_state(restored, pushes), _expected(pushes))
        assert [r["recovery"]["restored_from"] for r in ray.get([sh.persistence.remote() for sh in restored.shards])] == [
            str(ck / "shard-0"), str(ck / "shard-1")
        ]
    finally:
        for h in restored.shards:
            ray.kill(h)


def test_a_numpy_int_push_seq_is_snapshotted_and_recovered(tmp_path):
    # A numpy seq kept as such in high_water made every snapshot's meta.json fail to encode:
    # snapshots stopped for good and the pushes after the first one raised once applied.
    cfg = _cfg(snapshot_every_pushes=1)
    a = _shard(cfg, tmp_path / "s")
    g = np.ones((1, DIM), np.float32)
    for seq in range(3):
        assert push(a, PushId("t0", np.int64(seq)), {"user": ([seq], g)}) == (seq + 1, True)
    assert a.wait_for_snapshots() is None
    assert a.high_water_marks() == {"t0": 2} and type(a.high_water_marks()["t0"]) is int
    with pytest.raises(ValueError, match="push_id: seq must be an int, got float"):
        push(a, PushId("t0", 3.5), {"user": ([9], g)})
    assert a.get_version() == 3
    b = _shard(cfg, tmp_path / "s")
    assert b.persistence()["recovery"]["snapshot_lsn"] == 3
    _assert_identical(_dump(b), _dump(a))


def test_a_replay_gives_new_rows_the_ids_they_got_live(tmp_path):
    # The log keeps the IDs of creating entries only; a row created live from another entry's
    # ID (a key's first entry not a real interaction, or a follower's row made from a
    # non-creating entry) came back from the log under its key's bits instead.
    cfg = _cfg()
    a = _shard(cfg, tmp_path / "s")
    g = np.ones((2, DIM), np.float32)
    ids = np.array(["a", "a"], object)
    a.push(PushId("t0", 1), {"item": (K(["a", "a"]), g, ids, np.array([False, True]))})
    a.push(PushId("t0", 2), {"item": (K(["b"]), g[:1], np.array(["b"], object), np.array([True]))})
    a.push(PushId("t0", 3), {"item_bias": (K(["b"]), np.ones((1, 1), np.float32), np.array(["b"], object),
                                           np.array([False]))})
    assert sorted(a.tables["item"].ids_at(a.tables["item"].live_slots()).tolist()) == ["a", "b"]
    assert a.tables["item_bias"].ids_at(a.tables["item_bias"].live_slots()).tolist() == ["b"]
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), _dump(a))


def test_a_snapshot_is_refused_under_another_optimizer_with_the_same_state_shape(tmp_path):
    # SGD's momentum buffer and Adagrad's sum of squares are both (dim,) a row: loaded as the
    # other's, a negative momentum became a negative sum of squares and rows turned NaN.
    from ps.persist import snapshot_meta
    from ps.table import snapshot_problem

    cfg = _cfg()  # item: sgd with momentum
    a = _shard(cfg, tmp_path / "s")
    _apply(a, _pushes(3))
    snap = Path(a.snapshot()["path"])
    other = _cfg(tables={"item": {"dim": DIM, "optimizer": {"kind": "adagrad", "lr": 0.2}}})
    want = "table 'item': stored optimizer state is 'sgd''s, ps.tables.item.optimizer.kind is 'adagrad'"
    assert snapshot_problem(snapshot_meta(snap), other, 0).startswith(want)
    assert snapshot_problem(snapshot_meta(snap), cfg, 0) is None
    with pytest.raises(ValueError, match=want):
        _shard(other, tmp_path / "s")
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), _dump(a))


def test_the_admission_sketch_halves_at_the_same_push_after_a_restart(tmp_path):
    # The pushes counted since the sketch was last halved are state: a restart from a snapshot
    # that lost them would halve at other pushes and admit other IDs than the live shard did.
    admission = {"min_count": 2, "sketch_width": 64, "halve_every": 7}
    cfg = _cfg(tables={"user": {"dim": DIM, "optimizer": {"kind": "adagrad", "lr": 0.3}, "admission": admission}})
    pushes = _pushes(40)
    a = _shard(cfg, tmp_path / "s")
    _apply(a, pushes[:15])
    a.snapshot()
    a.wait_for_snapshots()
    sketch = a.tables["user"].admission
    assert 0 < sketch.added < 7  # mid-sample: what a snapshot must keep
    b = _shard(cfg, tmp_path / "s")
    assert b.tables["user"].admission.added == sketch.added
    assert torch.equal(b.tables["user"].admission.counts, sketch.counts)
    ref = _shard(cfg)
    _apply(ref, pushes)
    _apply(b, pushes[15:])
    _assert_identical(_dump(b), _dump(ref), times=False)
    assert torch.equal(b.tables["user"].admission.counts, ref.tables["user"].admission.counts)


def test_lifecycle_counts_start_again_with_the_shard_and_skip_its_log_replay(tmp_path):
    cfg = _cfg(tables={"user": {"dim": DIM, "optimizer": {"kind": "adagrad", "lr": 0.3}, "max_rows": 3}})
    a = _shard(cfg, tmp_path / "s")
    _apply(a, _pushes(6))
    life = a.stats()["tables"]["user"]["lifecycle"]
    assert life["created"] > 3 and life["evicted"] > 0
    b = _shard(cfg, tmp_path / "s")
    assert b.persistence()["recovery"]["replayed"] == 6
    assert set(b.stats()["tables"]["user"]["lifecycle"].values()) == {0}


# --------------------------------------------------------------------------- log edge cases


@pytest.mark.parametrize("snapshot_between", [False, True], ids=["log-only", "after-a-snapshot"])
def test_forgotten_items_stay_forgotten_after_a_restart(tmp_path, snapshot_between):
    # forget_items drops removed items from users' recent items (so /rank's exclude_seen and the
    # trainers' contexts stop naming them); a restart that brought them back would undo it.
    cfg = _cfg()
    a = _shard(cfg, tmp_path / "s")
    _apply(a, _pushes(4))
    users = K(["r1", "r2"])  # users the pushes gave no recent items
    a.record_recent(users[[0, 0, 1]], K(["gone", "kept", "gone"]), np.array([100, 101, 102]))
    if snapshot_between:
        a.snapshot()
    assert a.forget_items(K(["gone"])) == 2
    assert [x.tolist() for x in a.recent_items(users)] == [K(["kept"]).tolist(), []]
    b = _shard(cfg, tmp_path / "s")
    assert b.persistence()["recovery"]["replayed"] >= 1  # the forget came from the log
    assert [x.tolist() for x in b.recent_items(users)] == [K(["kept"]).tolist(), []]
    _assert_identical(_dump(b), _dump(a))


def test_an_append_that_fails_part_way_does_not_hide_the_records_after_it(tmp_path, monkeypatch):
    # A write error (a full disk) can leave part of a record in the segment. Records appended
    # after it in that segment would sit behind a torn message that recovery stops at: those
    # pushes were acknowledged, so they must go to a fresh segment.
    cfg = _cfg()
    d = tmp_path / "s"
    pushes = _pushes(8)
    a = _shard(cfg, d)
    _apply(a, pushes[:3])
    log = a._store._log

    def torn(data: bytes) -> None:
        log._file.write(data[: len(data) // 2])
        log._file.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log, "_write", torn)
    pid, upd, hist = pushes[3]
    with pytest.raises(OSError, match="No space left"):
        push(a, pid, upd, _recent(hist))
    monkeypatch.undo()
    assert a.get_version() == 3  # not applied, not acknowledged: the producer re-sends it
    _apply(a, pushes[3:])
    ref = _shard(cfg)
    _apply(ref, pushes)
    _assert_identical(_dump(a), _dump(ref), times=False)
    b = _shard(cfg, d)
    assert b.get_version() == 8
    _assert_identical(_dump(b), _dump(a))


def test_a_missing_log_segment_stops_start_up_naming_the_gap(tmp_path):
    # Replaying around a lost segment would start with acknowledged pushes silently missing.
    cfg, d, a = _rotated(tmp_path)  # snapshots 15 and 18, segments log-15 and log-18
    (d / "snap-000000000018" / "table-0.arrow").write_bytes(b"not arrow")  # falls back to snapshot 15...
    (d / "log-000000000015.arrow").unlink()  # ...whose records 16-18 are gone
    with pytest.raises(RuntimeError, match="push log gap, expected record 16 but found 19"):
        _shard(cfg, d)


def test_falling_back_to_the_previous_snapshot_replays_the_segment_it_started(tmp_path):
    # Snapshots one record apart: the segment started at the older one holds exactly the one
    # record between them, and recovery from the older snapshot must not skip it.
    cfg = _cfg(snapshot_every_pushes=1)
    d = tmp_path / "s"
    a = _shard(cfg, d)
    _apply(a, _pushes(6))
    assert a.wait_for_snapshots() is None
    assert sorted(p.name for p in d.glob("snap-*")) == ["snap-000000000005", "snap-000000000006"]
    (d / "snap-000000000006" / "table-0.arrow").write_bytes(b"not arrow")
    b = _shard(cfg, d)
    assert b.persistence()["recovery"] == {**b.persistence()["recovery"], "snapshot_lsn": 5, "replayed": 1}
    _assert_identical(_dump(b), _dump(a))


def test_restoring_a_checkpoint_into_its_own_directory_leaves_none_of_the_later_log(tmp_path):
    # `freshet ckpt restore` puts a shard back to a checkpoint in place: the segments its
    # directory logged after the checkpoint must go, or the next start replays them onto it
    # (or stops at the gap they leave).
    cfg = _cfg(snapshot_every_pushes=3)
    d = tmp_path / "ps" / "shard-0"
    pushes = _pushes(14)
    a = _shard(cfg, d)
    _apply(a, pushes[:4])
    a.snapshot("ck")
    _apply(a, pushes[4:12])  # automatic snapshots and segments after the checkpoint
    a.wait_for_snapshots()
    assert any(start > 4 for start in (int(p.name[4:16]) for p in _segments(d)))
    del a
    at_ckpt = _shard(cfg)
    _apply(at_ckpt, pushes[:4])
    ck = tmp_path / "ps" / "checkpoints" / "ck"
    b = _shard(cfg, d, restore_from=ck, restore_token="restore-1")
    _assert_identical(_dump(b), _dump(at_ckpt), times=False)
    assert [p.name for p in _segments(d)] == ["log-000000000004.arrow"]
    _apply(b, pushes[12:])
    _apply(at_ckpt, pushes[12:])
    del b
    # The restarted process (same token) recovers the checkpoint plus its own later pushes only.
    c = _shard(cfg, d, restore_from=ck, restore_token="restore-1")
    _assert_identical(_dump(c), _dump(at_ckpt), times=False)


def test_snapshot_problem_names_each_reason_a_snapshot_cannot_load_before_anything_changes(tmp_path):
    # `freshet up` and `freshet ckpt restore` check a snapshot's meta.json with this before they
    # replace any state: a problem missed here is found only after the old state is gone.
    from ps.persist import snapshot_meta
    from ps.table import snapshot_problem

    cfg = _cfg()
    a = _shard(cfg, tmp_path / "s")
    _apply(a, _pushes(3))
    meta = snapshot_meta(a.snapshot()["path"])
    rows = meta["tables"]["user"]["rows"]
    assert rows > 2
    assert snapshot_problem(meta, cfg, 0) is None
    assert snapshot_problem(meta, cfg, 1) == "a snapshot of shard 0, where shard 1's belongs"
    assert "plan" in snapshot_problem(meta, _cfg(num_buckets=16), 0)
    unknown = {**meta, "tables": {**meta["tables"], "gone": meta["tables"]["user"]}}  # a table since dropped
    assert snapshot_problem(unknown, cfg, 0).startswith("table 'gone' is not configured")
    wider = _cfg(tables={"user": {"dim": DIM + 1, "optimizer": {"kind": "adagrad", "lr": 0.3}},
                         "item": {"dim": DIM + 1, "optimizer": {"kind": "sgd", "lr": 0.2, "momentum": 0.9}}})
    problem = snapshot_problem(meta, wider, 0)
    assert problem.startswith("table '") and ": stored rows have dim 4, ps.tables." in problem and problem.endswith("dim is 5")
    small = _cfg(tables={"user": {"dim": DIM, "optimizer": {"kind": "adagrad", "lr": 0.3}, "max_rows": 2}})
    assert snapshot_problem(meta, small, 0).startswith(f"table 'user': {rows} stored rows on a shard exceed")
    with pytest.raises(ValueError, match="incomplete metadata"):
        snapshot_problem({k: v for k, v in meta.items() if k != "tables"}, cfg, 0)
    # PSShard refuses the same, leaving the directory as it was.
    with pytest.raises(ValueError, match="max_rows"):
        _shard(small, tmp_path / "s")
    _assert_identical(_dump(_shard(cfg, tmp_path / "s")), _dump(a))
