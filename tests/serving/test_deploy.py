"""serving.deploy.check_fits: a deployment that reserves more than a cluster that cannot grow has
is refused naming the settings (Ray would wait for the actors forever)."""

from __future__ import annotations

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
