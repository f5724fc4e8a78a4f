"""``freshet config``."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.serving.cli.helpers import REPO, cli_env, freshet


def test_config_prints_yaml_and_rejects_bad_values(tmp_path):
    out = freshet("config")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["ps"]["num_shards"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("ps:\n  num_shards: 0\nserving:\n  prot: 80\n")
    out = freshet("config", "--config", str(bad))
    assert out.returncode == 2
    assert "ps.num_shards" in out.stderr and "serving.prot" in out.stderr


def test_a_count_flag_below_one_is_refused_as_the_flag_typed():
    # It used to reach the config and come back as "stream.num_events: ... >= 1", a field the
    # user never typed; argparse now names the flag, before anything starts.
    for args, flag in ((("run", "--events", "0"), "--events"), (("eval", "--window", "-3"), "--window"),
                       (("eval", "--chunk-size", "x"), "--chunk-size")):
        out = freshet(*args)
        assert out.returncode == 2 and f"argument {flag}: must be a whole number >= 1" in out.stderr, out.stderr


def test_a_deprecated_key_is_a_plain_warning_naming_what_to_change(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("serving:\n  cache_refresh_ms: 50\n")
    out = freshet("config", "--config", str(old))
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["serving"]["cache_refresh_s"] == 0.05
    assert out.stderr.startswith("freshet: warning: config key serving.cache_refresh_ms is deprecated"), out.stderr
    assert "pydantic" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr


def test_output_to_a_reader_that_has_gone_ends_quietly():
    # `freshet status | head` printed a BrokenPipeError traceback once head had read enough.
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        out = subprocess.run([sys.executable, "-m", "serving.cli", "config"], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120, env=cli_env(), cwd=REPO, check=False)
    finally:
        os.close(write)
    assert out.returncode == 1 and out.stderr == "", out.stderr
