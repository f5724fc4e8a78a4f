"""serving.deploy.check_fits: a deployment that reserves more than a cluster that cannot grow has
is refused naming the settings (Ray would wait for the actors forever)."""

from __future__ import annotations

import time

import pytest

from serving.config import load_config
from serving.deploy import check_fits


def test_a_deployment_that_fits_passes():
    check_fits(load_config(None, {}), {"CPU": 2.0})  # 2 x 0.25 + 0.5 + 0.25 = 1.25 CPUs


def test_too_many_cpus_names_every_part():
    cfg = load_config(None, {"trainer": {"num_workers": 4}, "ingest": {"partitions": 4}})
    with pytest.raises(ValueError, match=r"reserves 2\.75 CPUs \(ps\.shard_num_cpus 0\.25 x ps\.num_shards 2 \+ "
                                         r"trainer\.num_cpus 0\.5 x trainer\.num_workers 4 \+ serving\.replica_num_cpus "
                                         r"0\.25 x 1 replica\(s\)\), more than the 2 this Ray cluster has"):
        check_fits(cfg, {"CPU": 2.0})
    check_fits(cfg, {"CPU": 2.0}, trainers=False)  # the parts not started are not counted
    autoscaled = load_config(None, {"serving": {"autoscaling": {"min_replicas": 5, "max_replicas": 8}}})
    with pytest.raises(ValueError, match=r"serving\.replica_num_cpus 0\.25 x 5 replica\(s\)"):
        check_fits(autoscaled, {"CPU": 2.0})


def test_gpus_the_cluster_does_not_have_are_refused():
    cfg = load_config(None, {"trainer": {"num_gpus": 1}})
    with pytest.raises(ValueError, match=r"trainer\.num_gpus 1 x trainer\.num_workers 1 reserves 1 GPUs, more than the 0"):
        check_fits(cfg, {"CPU": 16.0})
    check_fits(cfg, {"CPU": 16.0, "GPU": 1.0})


def test_trainer_state_of_another_number_of_trainers_is_refused(tmp_path):
    # 4 partitions written by 2 trainers, started with 1: trainer-0 read partitions 1 and 3
    # again from 0 under a new name, and /stats said nothing (item_pop 2,318 for 1,604 events).
    from serving.config import load_config
    from serving.deploy import check_trainer_state, state_dirs
    from workers.wal import TrainerWAL

    def cfg(workers: int):
        return load_config(None, {"trainer": {"num_workers": workers}, "stream": {"kind": "ingest", "num_events": None},
                                  "ingest": {"dir": str(tmp_path), "partitions": 4}})

    root = state_dirs(cfg(2))["trainers"]
    TrainerWAL(root / "trainer-0").commit({0: 10, 2: 12}, 22)
    TrainerWAL(root / "trainer-1").commit({1: 7, 3: 9}, 16)
    check_trainer_state(cfg(2))  # the number it was written with
    with pytest.raises(ValueError, match=r"trainer-0 holds offsets for partitions \[0, 2\], this config gives it \[0, 1, 2, 3\]"):
        check_trainer_state(cfg(1))
    with pytest.raises(ValueError, match=r"trainer.num_workers=4"):
        check_trainer_state(cfg(4))


def test_a_file_streams_trainer_state_records_how_many_trainers_wrote_it(tmp_path):
    # File-stream trainers all hold partition 0 (they split the stream by user), so only the
    # recorded number tells that 1 trainer wrote what 2 would now resume.
    from serving.config import load_config
    from serving.deploy import check_trainer_state, state_dirs
    from workers.wal import TrainerWAL

    def cfg(workers: int):
        return load_config(None, {"trainer": {"num_workers": workers}, "ingest": {"dir": str(tmp_path)}})

    TrainerWAL(state_dirs(cfg(1))["trainers"] / "trainer-0").commit({0: 500}, 500, num_workers=1)
    check_trainer_state(cfg(1))
    with pytest.raises(ValueError, match=r"written by 1 trainers"):
        check_trainer_state(cfg(2))


def test_the_applied_position_adds_partitions_up_and_takes_the_slowest_file_reader():
    # freshet run with 2 trainers waited for min(each trainer's sum of its partitions), about
    # half of what was posted, and never finished.
    from serving.config import load_config
    from workers.trainer import applied_position

    stats = [{"applied_offset": 300}, {"applied_offset": 250}]
    assert applied_position(stats, load_config(None, {"stream": {"kind": "ingest", "num_events": None}})) == 550
    assert applied_position(stats, load_config(None)) == 250
    assert applied_position([], load_config(None)) == 0


def test_an_app_with_no_room_for_its_replica_times_out_instead_of_waiting_forever():
    # serve.run waits for the app to run with no limit: a replica the cluster has no room for
    # (and no autoscaler to add) held `freshet up` forever. The replica needs no other actor to
    # be placed, so none is started; the cluster is this test's own (``own``) and goes with it
    # (removing the stuck app first would wait out Serve's 20 s graceful shutdown of a replica
    # never placed, and the test counts the cluster's free CPUs).
    from serving.app import run_app
    from serving.config import load_config
    from tests.conftest import _ray_start, free_port

    cfg = load_config(None, {"namespace": "t-no-room", "serving": {"port": free_port(), "replica_num_cpus": 8}})
    with _ray_start(own=True):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not running after 5 s \(serving.replica_num_cpus: 8 a replica; "
                           r"CPUs free in the cluster: 2\): DEPLOYING"):
            run_app(cfg, ready_timeout_s=5)
        assert time.monotonic() - t0 < 60  # not forever: the limit, plus Serve's own start


def test_local_state_paths_become_absolute_and_uris_stay_as_written(tmp_path, monkeypatch):
    # Actors resolve a relative path in their Ray worker's cwd (where `ray start` ran), not in
    # the deploying process's: the shards, the log and the trainers kept state in two places.
    from serving.deploy import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, {"ingest": {"dir": "data", "state_dir": "state"},
                                                 "stream": {"quarantine_path": "q/rejects.arrow"}}))
    assert (cfg.ingest.dir, cfg.ingest.state_dir, cfg.stream.quarantine_path) == (
        str(tmp_path / "data"), str(tmp_path / "state"), str(tmp_path / "q" / "rejects.arrow"))
    assert with_absolute_paths(cfg) == cfg
    shared = with_absolute_paths(load_config(None, {"ingest": {"dir": "s3://bucket/freshet", "state_dir": "/mnt/f"}}))
    assert (shared.ingest.dir, shared.ingest.state_dir, shared.stream.quarantine_path) == (
        "s3://bucket/freshet", "/mnt/f", None)


def test_only_trainer_offsets_of_the_ingest_log_make_it_expected(tmp_path):
    from serving.deploy import log_consumed, state_dirs
    from workers.wal import TrainerWAL

    live = load_config(None, {"stream": {"kind": "ingest", "num_events": None}, "ingest": {"dir": str(tmp_path)}})
    assert not log_consumed(live)  # a first start: the log is created
    TrainerWAL(state_dirs(live)["trainers"] / "trainer-0").commit({}, 0, 500)  # a restore into a fresh log
    assert not log_consumed(live)
    TrainerWAL(state_dirs(live)["trainers"] / "trainer-0").commit({0: 12}, 12)
    assert log_consumed(live)
    assert not log_consumed(load_config(None, {"ingest": {"dir": str(tmp_path)}}))  # a file stream's offsets


def test_joining_several_nodes_with_a_local_ingest_dir_warns_naming_the_fields():
    from serving.cli.service import local_state_warning

    local = load_config(None, {})
    assert local_state_warning(local, 1) is None
    warning = local_state_warning(local, 3)
    assert "3 nodes and ingest.dir 'freshet-data' and ingest.state_dir (unset" in warning
    assert "is a local path" in warning
    assert "ingest.state_dir '/mnt/f' too must be shared" in local_state_warning(
        load_config(None, {"ingest": {"state_dir": "/mnt/f"}}), 2)
    assert local_state_warning(load_config(None, {"ingest": {"dir": "s3://b/f", "state_dir": "/mnt/f"}}), 5) is None
    # A file:// URI names each node's own disk as much as a plain path does.
    assert "is a local path" in local_state_warning(load_config(None, {"ingest": {"dir": "file:///data/f", "state_dir": "/data/s"}}), 2)


def test_state_under_a_directory_the_host_ages_out_warns_naming_the_fields(tmp_path):
    # systemd-tmpfiles removes what is untouched for 10 days in /tmp (RHEL): an idle deployment's
    # snapshots and checkpoints there would go.
    from serving.cli.service import aged_state_warning

    assert aged_state_warning(load_config(None, {"ingest": {"dir": "/srv/freshet-data"}})) is None
    warning = aged_state_warning(load_config(None, {"ingest": {"dir": "/tmp/f"}}))
    assert warning.startswith("ingest.dir '/tmp/f' is under /tmp or /var/tmp") and "10 days" in warning
    both = aged_state_warning(load_config(None, {"ingest": {"dir": "file:///var/tmp/log", "state_dir": "/tmp/s"}}))
    assert "ingest.state_dir '/tmp/s' and ingest.dir '/var/tmp/log'" in both
    assert aged_state_warning(load_config(None, {"ingest": {"dir": "s3://b/f", "state_dir": "/srv/f"}})) is None
    # Through a link too: where the files end up is what is cleaned.
    (tmp_path / "link").symlink_to("/tmp")
    assert "ingest.dir" in aged_state_warning(load_config(None, {"ingest": {"dir": str(tmp_path / "link" / "x")}}))
