"""ps.config: the base every settings model builds on (renamed keys), the shared helpers,
and the names that moved to the layers that own them."""

from __future__ import annotations

import warnings

import pytest

from ps.config import ConfigError, merge, read_yaml
from serving.config import ServingConfig, load_config


def test_a_renamed_duration_key_is_accepted_with_a_warning_naming_both():
    with pytest.warns(FutureWarning, match=r"serving\.cache_refresh_ms is deprecated.*serving\.cache_refresh_s"):
        cfg = load_config(overrides={"serving": {"cache_refresh_ms": 50}})
    assert cfg.serving.cache_refresh_s == pytest.approx(0.05)


def test_old_and_new_name_together_is_an_error():
    with pytest.raises(ConfigError, match="give only cache_refresh_s"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        load_config(overrides={"serving": {"cache_refresh_ms": 50, "cache_refresh_s": 0.1}})


def test_the_new_name_loads_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ServingConfig(cache_refresh_s=0.3).cache_refresh_s == 0.3


@pytest.mark.parametrize(
    "module, name, home",
    [("ps.config", "FreshetConfig", "serving.config"), ("ps.config", "load_config", "serving.config"),
     ("ps.config", "ModelConfig", "workers.config"), ("ps.config", "IngestConfig", "workers.config"),
     ("ps", "FreshetConfig", "serving.config")],
)
def test_moved_names_still_import_for_one_release_with_a_warning(module, name, home):
    import importlib

    with pytest.warns(FutureWarning, match=f"moved to {home}"):
        obj = getattr(importlib.import_module(module), name)
    assert obj is getattr(importlib.import_module(home), name)


def test_unknown_names_are_still_attribute_errors():
    import ps.config

    with pytest.raises(AttributeError):
        ps.config.NoSuchThing  # noqa: B018


def test_merge_is_recursive_and_pure():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    over = {"a": {"b": 10}, "e": 4}
    assert merge(base, over) == {"a": {"b": 10, "c": 2}, "d": 3, "e": 4}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_read_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        read_yaml(bad)
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("ps, field", [({"recent_follows": "usr"}, "recent_follows='usr'"),
                                       ({"tables": {"item_bias": {"follows": "itm"}}}, "tables.item_bias.follows='itm'")])
def test_a_table_reference_to_no_table_is_a_load_time_error(ps, field):
    from ps.config import ConfigError
    from serving.config import load_config

    with pytest.raises(ConfigError, match=f"{field} is not a table"):
        load_config(None, {"ps": ps})


@pytest.mark.parametrize("ps, table", [({"tables": {"item_recent": {"dim": 3}}}, "item_recent"),
                                       ({"tables": {"item": {"optimizer": {"kind": "decayed_count"}}}}, "item"),
                                       ({"optimizer": {"kind": "decayed_count"}}, "item")])
def test_a_decayed_count_table_of_another_dim_is_a_load_time_error(ps, table):
    # Accepted, such a table failed every push that reached it after the push was logged, so
    # the shard's restart replayed the same failure and never came up.
    from ps.config import ConfigError
    from serving.config import load_config

    with pytest.raises(ConfigError, match=rf"tables\.{table}\.dim=\d+: optimizer decayed_count .* dim must be 2"):
        load_config(None, {"ps": ps})
