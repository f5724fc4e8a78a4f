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
