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


@pytest.mark.parametrize("ps, table", [({"tables": {"item_recent": {"dim": 4}}}, "item_recent"),
                                       ({"tables": {"item_recent": {"dim": 1}}}, "item_recent"),
                                       ({"tables": {"item": {"optimizer": {"kind": "decayed_count"}}}}, "item"),
                                       ({"optimizer": {"kind": "decayed_count"}}, "item")])
def test_a_decayed_count_table_of_another_dim_is_a_load_time_error(ps, table):
    # Accepted, such a table failed every push that reached it after the push was logged, so
    # the shard's restart replayed the same failure and never came up.
    from ps.config import ConfigError
    from serving.config import load_config

    with pytest.raises(ConfigError, match=rf"tables\.{table}\.dim=\d+: optimizer decayed_count .* dim must be 3 .* or 2"):
        load_config(None, {"ps": ps})


@pytest.mark.parametrize("ps, dotted", [
    ({"optimizer": {"kind": "adagrad", "momentum": 0.9}}, "optimizer.momentum=0.9"),
    ({"tables": {"user": {"optimizer": {"kind": "rowwise_adagrad", "momentum": 0.5}}}}, "tables.user.optimizer.momentum=0.5"),
    ({"optimizer": {"kind": "sgd", "eps": 1e-6}}, "optimizer.eps=1e-06"),
    ({"tables": {"item_pop": {"optimizer": {"eps": 0.001}}}}, "tables.item_pop.optimizer.eps=0.001"),
    ({"tables": {"item_recent": {"optimizer": {"lr": 0.5}}}}, "tables.item_recent.optimizer.lr=0.5"),
    ({"tables": {"item_pop": {"optimizer": {"accumulator_decay": 0.99}}}}, "tables.item_pop.optimizer.accumulator_decay=0.99"),
    ({"optimizer": {"kind": "sgd", "accumulator_decay": 0.9}}, "optimizer.accumulator_decay=0.9"),
])
def test_an_optimizer_setting_its_kind_does_not_use_is_a_load_time_error(ps, dotted):
    # Accepted, such a setting was silently ignored (ps.optim uses momentum for sgd only, eps
    # for the Adagrads only, and no lr for decayed_count).
    with pytest.raises(ConfigError, match=rf"ps: .*{dotted}: .*not used by optimizer kind"):
        load_config(None, {"ps": ps})


def test_optimizer_settings_their_kind_uses_still_load():
    cfg = load_config(None, {"ps": {"optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9},
                                    "tables": {"user": {"optimizer": {"kind": "adagrad", "eps": 1e-6,
                                                                      "accumulator_decay": 0.99}}}}})
    assert cfg.ps.optimizer.momentum == 0.9 and cfg.ps.optimizer_for("user").eps == 1e-6
    assert cfg.ps.optimizer_for("user").accumulator_decay == 0.99


@pytest.mark.parametrize("decay", [0, -0.1, 1.5])
def test_an_accumulator_decay_outside_0_1_is_a_load_time_error(decay):
    with pytest.raises(ConfigError, match=r"accumulator_decay"):
        load_config(None, {"ps": {"tables": {"item": {"optimizer": {"accumulator_decay": decay}}}}})


@pytest.mark.parametrize("table, dotted, why", [
    ({"init": "zeros", "init_scale": 0.1}, "init_scale", "only used with init uniform"),
    ({"eviction": "lfu"}, "eviction", "only used with max_rows"),
])
def test_a_table_setting_that_would_be_ignored_is_a_load_time_error(table, dotted, why):
    with pytest.raises(ConfigError, match=rf"ps\.tables\.item: .*{dotted}.*{why}"):
        load_config(None, {"ps": {"tables": {"item": table}}})
    # A follower takes max_rows from its leader: its own eviction would be ignored too.
    if dotted == "eviction":
        with pytest.raises(ConfigError, match=r"ps\.tables\.item_bias: .*eviction"):
            load_config(None, {"ps": {"tables": {"item": {"max_rows": 10}, "item_bias": table}}})
        assert load_config(None, {"ps": {"tables": {"item": {"max_rows": 10, **table}}}}).ps.tables["item"].eviction.value == "lfu"


def test_a_cpu_share_ray_cannot_reserve_is_a_load_time_error():
    # Ray refuses a fractional resource finer than 0.0001 only when the actor is created.
    with pytest.raises(ConfigError, match=r"ps\.shard_num_cpus: .*0\.0001"):
        load_config(None, {"ps": {"shard_num_cpus": 0.00005}})
    assert load_config(None, {"ps": {"shard_num_cpus": 0}}).ps.shard_num_cpus == 0
