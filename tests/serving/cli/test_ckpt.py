"""``freshet ckpt restore``'s checks and trainer offsets, without Ray: a checkpoint written by
real shards (in process), the trainers' record as ``ckpt save`` writes it, and an ingest
log directory's ``LOG_ID`` and ``META.json``. The whole restore through ``freshet up`` is in
``test_service.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ps.plan import ShardingPlan
from ps.shard import PSShard, PushId
from serving.cli.ckpt import TRAINER_OFFSETS, check_restorable, restore_trainer_offsets
from serving.config import load_config
from serving.deploy import state_dirs
from workers.trainer import trainer_actor_name
from workers.wal import TrainerWAL

LOG_ID = "0123456789abcdef"


def _setup(tmp_path, first_offsets=(0, 0)):
    """A deployment dir with a 2-partition ingest log, 2 trainers, and checkpoint "c1" of
    2 shards whose trainers stopped at offsets {0: 40}, {1: 30}."""
    cfg = load_config(None, {"ps": {"num_shards": 2, "tables": {"user": {"dim": 4}, "item": {"dim": 4}}},
                             "trainer": {"num_workers": 2}, "stream": {"kind": "ingest", "num_events": None},
                             "ingest": {"dir": str(tmp_path / "dep"), "partitions": 2}})
    log = tmp_path / "dep" / "ingest"
    log.mkdir(parents=True)
    (log / "LOG_ID").write_text(LOG_ID)
    (log / "META.json").write_text(json.dumps({"format": "freshet-ingest-meta", "version": 1, "partitions": 2,
                                               "first_offsets": list(first_offsets), "consumers": {}, "pins": {}}))
    ckpt = tmp_path / "ckpts"
    plan = ShardingPlan.uniform(cfg.ps.num_buckets, 2)
    for s in range(2):
        sh = PSShard(s, plan, cfg.ps, checkpoint_root=ckpt)
        keys = np.arange(1, 200, dtype=np.uint64)[plan.shards_of_keys(np.arange(1, 200, dtype=np.uint64)) == s]
        sh.push(PushId("t", 0), {"item": (keys, np.ones((len(keys), 4), np.float32), keys.view(np.int64), None)})
        sh.snapshot("c1")
    trainers = [{"applied_offset": 40, "applied_offsets": {"0": 40}, "events_applied": 40, "source_id": f"ingest:{LOG_ID}"},
                {"applied_offset": 30, "applied_offsets": {"1": 30}, "events_applied": 30,
                 "source_id": f"ingest:{LOG_ID}/p1"}]
    (ckpt / "c1" / TRAINER_OFFSETS).write_text(json.dumps({"trainers": trainers, "created_at": 0.0}))
    return cfg, ckpt / "c1"


def _save_trainer_state(ckpt, i: int, offsets: dict, events: int = 0):
    """A trainer's saved catalogue and histories in checkpoint ``ckpt``, as ``ckpt save`` copies them."""
    import pyarrow as pa

    from workers.trainer import _CATALOGUE_SCHEMA, _HISTORY_SCHEMA

    state = ckpt / trainer_actor_name(i)
    state.mkdir()
    for f, schema in (("catalogue.arrow", _CATALOGUE_SCHEMA), ("histories.arrow", _HISTORY_SCHEMA)):
        with pa.OSFile(str(state / f), "wb") as out, pa.ipc.new_file(out, schema) as w:
            w.write_table(schema.empty_table())
    (state / "meta.json").write_text(json.dumps({"offsets": offsets, "events_applied": events,
                                                 "source_ids": {p: f"ingest:{LOG_ID}" for p in offsets}}))
    return state


def _trainer_dirs(cfg):
    return [state_dirs(cfg)["trainers"] / trainer_actor_name(i) for i in range(2)]


def test_each_trainer_resumes_at_its_checkpoint_offset_whatever_its_first_partition(tmp_path):
    # A trainer whose first partition is not 0 names its stream "ingest:<log>/p1": it was not
    # recognised as the same log, so it restarted from offset 0 with empty state.
    cfg, ckpt = _setup(tmp_path)
    check_restorable(cfg, ckpt)
    restore_trainer_offsets(cfg, ckpt)
    assert [TrainerWAL(d).committed().offsets for d in _trainer_dirs(cfg)] == [{0: 40}, {1: 30}]


def _flip(path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    for j in range(int(len(data) * at), int(len(data) * at) + 64, 7):
        data[j] ^= 0x7F
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "meta"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_before_anything_changes(tmp_path, damage):
    cfg, ckpt = _setup(tmp_path)
    for d in _trainer_dirs(cfg):  # what the deployment had before the restore
        TrainerWAL(d).commit({0: 99}, 99)
    table = ckpt / "shard-1" / "table-0.arrow"
    if damage == "flipped":  # loaded as wrong rows before: scores in the thousands
        _flip(table)
    elif damage == "truncated":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    else:
        (ckpt / "shard-1" / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=str(ckpt / "shard-1")):
        check_restorable(cfg, ckpt)
    assert [TrainerWAL(d).committed().offsets for d in _trainer_dirs(cfg)] == [{0: 99}, {0: 99}]


def test_a_missing_shard_or_a_bad_trainer_record_is_refused(tmp_path):
    cfg, ckpt = _setup(tmp_path)
    (ckpt / TRAINER_OFFSETS).write_text('{"trainers": [{"applied_offset": 1}]}')
    with pytest.raises(ValueError, match=TRAINER_OFFSETS):
        check_restorable(cfg, ckpt)
    cfg, ckpt = _setup(tmp_path / "again")
    for f in (ckpt / "shard-1").iterdir():
        f.unlink()
    (ckpt / "shard-1").rmdir()
    with pytest.raises(FileNotFoundError, match="shard-1"):
        check_restorable(cfg, ckpt)


def test_offsets_retention_deleted_are_refused_naming_them(tmp_path):
    # Only the latest checkpoint's events are pinned: an older one's trainers would fail to
    # read their first batch forever (TrimmedOffsetError) after the restore had changed state.
    cfg, ckpt = _setup(tmp_path, first_offsets=(0, 35))
    for i, offsets in ((0, {"0": 40}), (1, {"1": 30})):  # their saved state, at the checkpoint's offsets
        _save_trainer_state(ckpt, i, offsets)
    with pytest.raises(ValueError, match=r"partition 1 from offset 30, but the log keeps offsets from 35 on"):
        check_restorable(cfg, ckpt)


def test_the_offsets_a_trainer_replays_its_saved_state_from_are_checked_too(tmp_path):
    # A trainer rebuilds its catalogue from its saved state's offsets, which can be older
    # than the checkpoint's: those events must still be in the log.
    cfg, ckpt = _setup(tmp_path, first_offsets=(25, 0))
    _save_trainer_state(ckpt, 0, {"0": 20}, 20)
    with pytest.raises(ValueError, match=r"partition 0 from offset 20, but the log keeps offsets from 25 on"):
        check_restorable(cfg, ckpt)


def test_a_restore_into_a_fresh_log_carries_the_recent_popularity_clock_on(tmp_path):
    # The new log's offsets restart at 0 while the restored item_recent rows are stamped with
    # the old stream's position: new events counted as 1,000 events older than the
    # checkpoint's, and the checkpoint's items never decayed.
    from ps.local import LocalClient
    from ps.optim import row_clocks
    from workers.trainer import Trainer

    cfg, ckpt = _setup(tmp_path)
    (tmp_path / "dep" / "ingest" / "LOG_ID").write_text("another-log")  # restored into a new log
    restore_trainer_offsets(cfg, ckpt)
    assert [(TrainerWAL(d).committed().offsets, TrainerWAL(d).committed().clock_base) for d in _trainer_dirs(cfg)] == \
        [({}, 70), ({}, 70)]  # 40 + 30 events before the new log's offset 0

    # A trainer resumes with that base: its recent-popularity clock goes on from 70 events.
    synth = load_config(None, {"stream": {"num_events": 256}, "trainer": {"batch_size": 256}, "ps": {"num_shards": 1}})
    client = LocalClient(synth.ps)
    trainer = Trainer(0, synth, client=client, state_dir=state_dirs(cfg)["trainers"])
    assert trainer.stats()["clock_base"] == 70
    trainer.run()
    clocks = row_clocks(client.shard.tables[synth.model.recent_table].pull(client.shard.live_keys(synth.model.recent_table)[1])[0])
    assert clocks.max() * synth.model.recent_halflife_events == pytest.approx(70 + 256)


def test_a_trainer_without_saved_state_needs_the_log_from_its_start(tmp_path):
    # Without its saved state (on a multi-node cluster it stays on the trainer's node) a
    # trainer rebuilds its catalogue from offset 0, which retention may have deleted.
    cfg, ckpt = _setup(tmp_path, first_offsets=(25, 0))
    with pytest.raises(ValueError, match=r"partition 0 from offset 0, but the log keeps offsets from 25 on"):
        check_restorable(cfg, ckpt)


def test_the_clock_base_of_a_file_stream_is_the_furthest_trainer_not_their_sum(tmp_path):
    # Each trainer of a file stream reads the whole file: two at offset 1,000 stood at 1,000.
    cfg, ckpt = _setup(tmp_path)
    trainers = [{"applied_offset": 1000, "applied_offsets": {"0": 1000}, "events_applied": 500,
                 "source_id": "synthetic:abc"} for _ in range(2)]
    (ckpt / TRAINER_OFFSETS).write_text(json.dumps({"trainers": trainers, "created_at": 0.0}))
    restore_trainer_offsets(cfg, ckpt)
    assert [TrainerWAL(d).committed().clock_base for d in _trainer_dirs(cfg)] == [1000, 1000]


def _cfg_like(cfg, **tables):
    """``cfg`` with its tables changed as ``tables`` says (the deployment dir kept)."""
    return load_config(None, {"ps": {"num_shards": 2, "tables": {"user": {"dim": 4}, "item": {"dim": 4}, **tables}},
                              "trainer": {"num_workers": 2}, "stream": {"kind": "ingest", "num_events": None},
                              "ingest": {"dir": cfg.ingest.dir, "partitions": 2}})


@pytest.mark.parametrize(("tables", "says"), [
    ({"item": {"dim": 4, "max_rows": 20}}, "stored rows on a shard exceed ps.tables.item.max_rows=20"),
    ({"item": {"dim": 4, "optimizer": {"kind": "sgd"}}}, "optimizer 'sgd' needs (4,)"),
    ({"item": {"dim": 4, "admission": {"min_count": 2}}}, None),  # no sketch stored: it starts empty
])
def test_a_checkpoint_the_configs_tables_cannot_hold_is_refused_before_anything_changes(tmp_path, tables, says):
    # A lowered max_rows was found only by the shards, after the restore had replaced the state
    # dir's own state: the deployment was left half restored, and the next `up` served it.
    cfg, ckpt = _setup(tmp_path)
    other = _cfg_like(cfg, **tables)
    if says is None:
        check_restorable(other, ckpt)
        return
    with pytest.raises(ValueError) as e:
        check_restorable(other, ckpt)
    assert str(ckpt / "shard-0") in str(e.value) and "table 'item'" in str(e.value) and says in str(e.value)


def test_a_shard_restoring_a_checkpoint_that_does_not_fit_leaves_its_state_dir_as_it_was(tmp_path):
    from ps.persist import ShardStore

    cfg, ckpt = _setup(tmp_path)
    plan = ShardingPlan.uniform(cfg.ps.num_buckets, 2)
    state = tmp_path / "state" / "shard-0"
    own = PSShard(0, plan, cfg.ps, state_dir=state)
    own.push(PushId("own", 0), {"user": (np.array([7], np.uint64), np.ones((1, 4), np.float32), np.array([7]), None)})
    own.snapshot()
    before = sorted(p.name for p in state.iterdir()), (state / "CURRENT").read_text()
    small = _cfg_like(cfg, item={"dim": 4, "max_rows": 20})
    with pytest.raises(ValueError, match="max_rows=20"):
        PSShard(0, plan, small.ps, state_dir=state, restore_from=ckpt)
    assert (sorted(p.name for p in state.iterdir()), (state / "CURRENT").read_text()) == before
    assert ShardStore(state, fsync=False).restored_token() is None


def test_up_refuses_shard_state_the_configs_tables_cannot_hold(tmp_path):
    from serving.deploy import check_shard_state

    cfg, ckpt = _setup(tmp_path)
    plan = ShardingPlan.uniform(cfg.ps.num_buckets, 2)
    sh = PSShard(0, plan, cfg.ps, state_dir=state_dirs(cfg)["ps"] / "shard-0")
    keys = np.arange(1, 200, dtype=np.uint64)
    sh.push(PushId("t", 0), {"item": (keys, np.ones((len(keys), 4), np.float32), keys.view(np.int64), None)})
    sh.snapshot()
    check_shard_state(cfg)
    with pytest.raises(ValueError, match=r"table 'item': 199 stored rows on a shard exceed ps.tables.item.max_rows=20"):
        check_shard_state(_cfg_like(cfg, item={"dim": 4, "max_rows": 20}))
    with pytest.raises(ValueError, match=r"table 'item': stored rows have dim 4, ps.tables.item.dim is 8"):
        check_shard_state(_cfg_like(cfg, user={"dim": 8}, item={"dim": 8}, item_ctx={"dim": 8}))
    # A deployment started from Python (not `freshet up`) is refused the same way, before any actor starts
    # (no Ray is connected here: reaching start_shards would fail otherwise).
    from serving import deploy

    with pytest.raises(ValueError, match=r"199 stored rows on a shard exceed ps.tables.item.max_rows=20"):
        deploy.start(_cfg_like(cfg, item={"dim": 4, "max_rows": 20}), trainers=False)


def test_checkpoints_and_snapshots_are_this_users_only_even_in_an_open_state_dir(tmp_path):
    # An operator's pre-made state dir keeps its mode (0755 here): what Freshet writes inside
    # (users' recent items, the model's rows) must not be readable by other users through it.
    import stat
    from pathlib import Path

    cfg, ckpt = _setup(tmp_path)
    for d in (ckpt, ckpt / "shard-0", ckpt / "shard-1"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    own = tmp_path / "open"
    own.mkdir()
    own.chmod(0o755)
    sh = PSShard(0, ShardingPlan.uniform(cfg.ps.num_buckets, 2), cfg.ps, state_dir=own / "shard-0")
    snap = Path(sh.snapshot()["path"])
    assert stat.S_IMODE((own / "shard-0").stat().st_mode) == stat.S_IMODE(snap.stat().st_mode) == 0o700


@pytest.mark.parametrize(("ps", "says"), [
    ({"num_shards": 1}, "ps.num_shards=1, ps.num_buckets=1024"),
    ({"num_buckets": 512}, "2 shards over 1024 buckets) than the config's (ps.num_shards=2, ps.num_buckets=512)"),
])
def test_a_checkpoint_or_shard_state_of_another_sharding_plan_is_refused_before_anything_changes(tmp_path, ps, says):
    # Found only by the shards, after the restore had rewritten the trainers' offsets: a
    # checkpoint of 2 shards restored with ps.num_shards 1 left the trainers at its offsets.
    from serving.deploy import check_shard_state

    cfg, ckpt = _setup(tmp_path)
    for d in _trainer_dirs(cfg):
        TrainerWAL(d).commit({0: 99}, 99)
    other = load_config(None, {"ps": {"num_shards": 2, "tables": {"user": {"dim": 4}, "item": {"dim": 4}}, **ps},
                               "trainer": {"num_workers": 2}, "stream": {"kind": "ingest", "num_events": None},
                               "ingest": {"dir": cfg.ingest.dir, "partitions": 2}})
    with pytest.raises(ValueError, match=f"{ckpt / 'shard-0'}: saved with a different sharding plan") as e:
        check_restorable(other, ckpt)
    assert says in str(e.value)
    assert [TrainerWAL(d).committed().offsets for d in _trainer_dirs(cfg)] == [{0: 99}, {0: 99}]
    # `up` on the deployment's own shard state: the same rule, from its snapshots' meta.json.
    PSShard(0, ShardingPlan.uniform(cfg.ps.num_buckets, 2), cfg.ps, state_dir=state_dirs(cfg)["ps"] / "shard-0").snapshot()
    check_shard_state(cfg)
    with pytest.raises(ValueError, match="saved with a different sharding plan"):
        check_shard_state(other)


def test_a_shard_snapshot_under_another_shards_name_is_refused(tmp_path):
    cfg, ckpt = _setup(tmp_path)
    (ckpt / "shard-0").rename(ckpt / "tmp")
    (ckpt / "shard-1").rename(ckpt / "shard-0")
    (ckpt / "tmp").rename(ckpt / "shard-1")
    with pytest.raises(ValueError, match=f"{ckpt / 'shard-0'}: a snapshot of shard 1, where shard 0's belongs"):
        check_restorable(cfg, ckpt)


@pytest.mark.parametrize("digests", [True, False])
@pytest.mark.parametrize("damage", ["catalogue.arrow", "histories.arrow", "meta.json"])
def test_a_damaged_trainer_state_in_a_checkpoint_is_refused_naming_the_file(tmp_path, digests, damage):
    # A truncated catalogue was copied into the trainer's state dir after the shards had been
    # reset to the checkpoint; the trainer then died reading it, and so would every later `up`.
    from ps.persist import file_digests

    cfg, ckpt = _setup(tmp_path)
    states = [_save_trainer_state(ckpt, 0, {"0": 40}, 40), _save_trainer_state(ckpt, 1, {"1": 30}, 30)]
    if digests:  # as `ckpt save` records them; older checkpoints have none
        record = json.loads((ckpt / TRAINER_OFFSETS).read_text())
        record["digests"] = file_digests(ckpt, sorted(f for s in states for f in s.iterdir()))
        (ckpt / TRAINER_OFFSETS).write_text(json.dumps(record))
    check_restorable(cfg, ckpt)
    target = states[1] / damage
    if damage == "meta.json":
        target.write_text(json.dumps({"offsets": {"1": 30}}))  # JSON, without events_applied
    else:
        target.write_bytes(target.read_bytes()[:10])
    with pytest.raises(ValueError, match=str(target)):
        check_restorable(cfg, ckpt)


def test_offsets_for_partitions_the_config_does_not_give_a_trainer_are_refused(tmp_path):
    cfg, ckpt = _setup(tmp_path)
    record = json.loads((ckpt / TRAINER_OFFSETS).read_text())
    record["trainers"][0]["applied_offsets"] = {"0": 40, "7": 3}
    (ckpt / TRAINER_OFFSETS).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"trainer-0 has offsets for ingest partitions \[7\]"):
        check_restorable(cfg, ckpt)


@pytest.mark.parametrize("field", ["version", "high_water", "plan", "shard_index"])
def test_a_shard_meta_json_missing_a_field_is_refused_and_not_listed(tmp_path, field):
    # Without its digests (an older snapshot's form) nothing else checked these fields: a
    # restore would have failed in the shard, after the trainers' state was rewritten.
    from ps.persist import list_checkpoints

    cfg, ckpt = _setup(tmp_path)
    meta_path = ckpt / "shard-1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["digests"], meta[field]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{meta_path}: incomplete"):
        check_restorable(cfg, ckpt)
    # `ckpt list` leaves a shard it cannot describe out (it raised KeyError before): the checkpoint shows incomplete.
    (listed,) = list_checkpoints(ckpt.parent)
    assert listed["complete"] == (field == "high_water") and listed["versions"] == ({0: 1, 1: 1} if field == "high_water" else {0: 1})


def test_ckpt_flags_belong_to_their_action_and_a_path_name_is_reported_as_a_path(tmp_path, capsys):
    from serving.cli import main

    cfg, ckpt = _setup(tmp_path)
    conf = tmp_path / "c.yaml"
    conf.write_text(json.dumps({"ingest": {"dir": cfg.ingest.dir}}))  # JSON is YAML
    assert main(["ckpt", "--config", str(conf), "save", "x", "--address", "auto"]) == 2
    assert "--address is for restore" in capsys.readouterr().err
    assert main(["ckpt", "--config", str(conf), "restore", "x", "--overwrite"]) == 2
    assert "--overwrite is for save" in capsys.readouterr().err
    # A name with a slash is a path (to another deployment's checkpoint), not a name under ours.
    assert main(["ckpt", "--config", str(conf), "restore", str(tmp_path / "nowhere" / "c1")]) == 2
    assert f"no complete checkpoint at {tmp_path / 'nowhere' / 'c1'}" in capsys.readouterr().err


def test_replacing_a_checkpoint_keeps_the_old_one_under_its_name_when_the_new_cannot_take_it(tmp_path):
    # `ckpt save --overwrite` renames the old checkpoint aside, then the staged one into its
    # place: a failure between the two left the old one only under its ".old-" name.
    import os

    from serving.cli.ckpt import replace_dir

    root = tmp_path / "checkpoints"
    old = root / "c1"
    old.mkdir(parents=True)
    (old / TRAINER_OFFSETS).write_text("old")
    with pytest.raises(OSError):
        replace_dir(root / "c1.saving-0123abcd", old)  # nothing staged: its rename fails
    assert (old / TRAINER_OFFSETS).read_text() == "old" and os.listdir(root) == ["c1"]
    stage = root / "c1.saving-0123abcd"
    stage.mkdir()
    (stage / TRAINER_OFFSETS).write_text("new")
    replace_dir(stage, old)
    assert (old / TRAINER_OFFSETS).read_text() == "new" and os.listdir(root) == ["c1"]


def test_ckpt_list_names_what_an_interrupted_save_left_apart_from_the_checkpoints(tmp_path, capsys):
    import shutil

    from serving.cli import main
    from serving.cli.ckpt import checkpoint_root

    cfg, ckpt = _setup(tmp_path)
    root = checkpoint_root(cfg)
    root.mkdir(parents=True)
    shutil.copytree(ckpt, root / "c1")
    shutil.copytree(ckpt, root / "c1.old-0123abcd")
    conf = tmp_path / "c.yaml"
    conf.write_text(json.dumps({"ingest": {"dir": cfg.ingest.dir}}))
    assert main(["ckpt", "--config", str(conf), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["c1", "(left"], out
    assert str(root / "c1.old-0123abcd") in out[1]
    # Such a name is refused for a save (before anything is reached).
    assert main(["ckpt", "--config", str(conf), "save", "c1.old-0123abcd"]) == 2
    assert "ends like a save's staging directory" in capsys.readouterr().err
