"""workers.config: the ingest settings (log location and the local state dir), loaded
through the root config so errors name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import config_error, write_yaml
from serving.config import FreshetConfig, load_config




# --- ingest.dir / ingest.state_dir -------------------------------------------------------


@pytest.mark.parametrize(
    "ingest, state",
    [
        ({}, "freshet-data"),  # default: everything under the local ingest.dir
        ({"dir": "/data/log"}, "/data/log"),
        ({"dir": "run:3/log"}, "run:3/log"),  # a ':' in a local path is not a URI
        ({"dir": "/data/log", "state_dir": "/data/state"}, "/data/state"),
        ({"dir": "file:///data/log", "state_dir": "/data/state"}, "/data/state"),
        ({"dir": "s3://bucket/prefix", "state_dir": "/mnt/shared/freshet"}, "/mnt/shared/freshet"),
        ({"dir": "gs://bucket", "state_dir": "state"}, "state"),
        ({"dir": "hdfs://namenode:8020/freshet", "state_dir": "/s"}, "/s"),
        ({"dir": "abfss://container@account.dfs.core.windows.net/x", "state_dir": "/s"}, "/s"),
    ],
)
def test_ingest_dir_and_local_state_dir(tmp_path, ingest, state):
    cfg = load_config(write_yaml(tmp_path, {"ingest": ingest})).ingest
    assert cfg.local_state_dir() == Path(state)
    assert cfg.dir_is_uri() == ("://" in cfg.dir)
    assert load_config(write_yaml(tmp_path, FreshetConfig(ingest=cfg).to_yaml())).ingest == cfg  # YAML round trip


def test_home_in_local_paths_is_expanded_where_the_config_is_loaded(tmp_path, monkeypatch):
    # A config file is not read by a shell: "~/x" used to be a directory named "~" under each
    # Ray worker's working directory.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    cfg = load_config(write_yaml(tmp_path, {
        "ingest": {"dir": "~/log", "state_dir": "~/state"},
        "stream": {"kind": "parquet", "path": "~/events.parquet", "quarantine_path": "~/bad.arrow"},
    }))
    assert (cfg.ingest.dir, cfg.ingest.state_dir) == (str(home / "log"), str(home / "state"))
    assert cfg.ingest.local_state_dir() == home / "state"
    assert (cfg.stream.path, cfg.stream.quarantine_path) == (str(home / "events.parquet"), str(home / "bad.arrow"))
    # Only a leading ~ is the home directory; a URI and a ~ inside a name are left as written.
    cfg = load_config(write_yaml(tmp_path, {"ingest": {"dir": "s3://b/~x", "state_dir": "data/~x"}}))
    assert (cfg.ingest.dir, cfg.ingest.state_dir) == ("s3://b/~x", "data/~x")


@pytest.mark.parametrize(
    "ingest, dotted, reason",
    [
        ({"dir": "s3://bucket/prefix"}, "ingest:", "ingest.state_dir is required when ingest.dir is a URI"),
        ({"dir": "file:///data/log"}, "ingest:", "ingest.state_dir is required when ingest.dir is a URI"),
        ({"dir": "/data", "state_dir": "s3://bucket/state"}, "ingest:", "ingest.state_dir 's3://bucket/state' must be a local directory"),
        ({"dir": "/data", "state_dir": "file:///data/state"}, "ingest:", "must be a local directory"),
        ({"dir": "/data", "state_dir": ""}, "ingest.state_dir:", "at least 1 character"),
        ({"dir": "ftp://host/x", "state_dir": "/s"}, "ingest.dir:", "unknown URI scheme 'ftp'"),
        ({"dir": "file:/data/log", "state_dir": "/s"}, "ingest.dir:", "a URI must be written file://"),
        ({"dir": "file://data/log", "state_dir": "/s"}, "ingest.dir:", "a file URI needs an absolute path"),
        ({"dir": "s3://", "state_dir": "/s"}, "ingest.dir:", "nothing after s3://"),
    ],
)
def test_bad_ingest_dirs_name_the_field_and_reason(tmp_path, ingest, dotted, reason):
    msg = config_error(tmp_path, {"ingest": ingest})
    assert dotted in msg and reason in msg


# --- model and trainer -------------------------------------------------------------------


def test_a_positive_threshold_above_the_scale_is_a_load_time_error(tmp_path):
    # Ratings beyond ratings.scale are refused, so with positive_at above it no rating could
    # ever be a positive: the model would learn from dislikes only, or nothing.
    msg = config_error(tmp_path, {"model": {"ratings": {"positive_at": 6.0, "scale": 5.0}}})
    assert "model.ratings:" in msg and "positive_at=6 is above scale=5" in msg, msg
    assert load_config(write_yaml(tmp_path, {"model": {"ratings": {"positive_at": 5.0}}})).model.ratings.positive_at == 5.0


@pytest.mark.parametrize("field", ["num_cpus", "num_gpus"])
def test_a_trainer_resource_ray_cannot_reserve_is_a_load_time_error(tmp_path, field):
    msg = config_error(tmp_path, {"trainer": {field: 0.00001}})
    assert f"trainer.{field}:" in msg and "0.0001" in msg, msg
