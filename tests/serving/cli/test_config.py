"""``freshet config``."""

from __future__ import annotations

import yaml

from tests.serving.cli.helpers import freshet


def test_config_prints_yaml_and_rejects_bad_values(tmp_path):
    out = freshet("config")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["ps"]["num_shards"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("ps:\n  num_shards: 0\nserving:\n  prot: 80\n")
    out = freshet("config", "--config", str(bad))
    assert out.returncode == 2
    assert "ps.num_shards" in out.stderr and "serving.prot" in out.stderr
