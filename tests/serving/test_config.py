"""serving.config: the whole config tree's defaults, YAML round trip, overrides and field-naming errors."""

from __future__ import annotations


import pytest
from pydantic import ValidationError

from ps.config import ConfigError, InitKind, OptimizerConfig, OptimizerKind, TableConfig
from tests.conftest import config_error, write_yaml
from serving.config import FreshetConfig, load_config
from workers.config import StreamKind


def _tables(user_dim: int = 64, item_dim: int = 64, bias_dim: int = 1) -> dict:
    """A complete ps.tables mapping: a YAML ``tables`` key replaces the default set."""
    return {
        "user": {"dim": user_dim},
        "item": {"dim": item_dim},
        "item_bias": {"dim": bias_dim, "init": "zeros"},
        "item_pop": {"dim": 1, "init": "zeros", "optimizer": {"kind": "accumulate", "lr": 1.0}},
    }




# --- defaults and round trip ---------------------------------------------------------------


def test_defaults_are_valid_and_consistent():
    cfg = load_config()
    assert cfg == FreshetConfig()
    assert set(cfg.ps.tables) >= {cfg.model.user_table, cfg.model.item_table}
    assert cfg.ps.table("user").dim == cfg.ps.table("item").dim
    assert cfg.ps.optimizer_for("item_pop").kind is OptimizerKind.ACCUMULATE
    assert cfg.ps.optimizer_for("item") == cfg.ps.optimizer
    assert cfg.ps.optimizer_for("user").lr == 4 * cfg.ps.optimizer.lr  # users learn faster (BENCHMARKS.md)
    assert cfg.ps.optimizer_for("item_recent").kind is OptimizerKind.DECAYED_COUNT
    assert cfg.ps.table("item_ctx").dim == cfg.ps.table("item").dim
    assert cfg.stream.kind is StreamKind.SYNTHETIC


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == FreshetConfig()
    assert load_config(write_yaml(tmp_path, "# only a comment\n")) == FreshetConfig()


def test_yaml_round_trip_defaults(tmp_path):
    cfg = FreshetConfig()
    assert load_config(write_yaml(tmp_path, cfg.to_yaml())) == cfg


def test_yaml_round_trip_non_defaults(tmp_path):
    cfg = FreshetConfig.model_validate(
        {
            "namespace": "exp-1",
            "ps": {
                "num_shards": 4,
                "num_buckets": 256,
                "seed": 9,
                "tables": {
                    **_tables(32, 32),
                    "user": {"dim": 32, "init_scale": 0.05, "ttl_s": 3600.0,
                             "optimizer": {"kind": "sgd", "lr": 0.5, "momentum": 0.9}},
                },
                "optimizer": {"kind": "adagrad", "eps": 1e-6},
            },
            "model": {"loss": "mse", "rating_range": [1.0, 5.0]},
            "trainer": {"device": "cuda:1", "batch_size": 64, "prefetch": False},
            "stream": {"kind": "movielens", "path": "/data/ratings.csv", "num_events": None, "min_weight": 3.5},
            "serving": {"port": 9000, "auth_token": "s3cret"},
        }
    )
    text = cfg.to_yaml()
    assert "OptimizerKind" not in text and "kind: sgd" in text and "kind: adagrad" in text  # enums as plain strings
    back = load_config(write_yaml(tmp_path, text))
    assert back == cfg
    assert back.ps.table("user").optimizer == OptimizerConfig(kind=OptimizerKind.SGD, lr=0.5, momentum=0.9)
    assert back.stream.num_events is None and back.trainer.device == "cuda:1"


def test_config_is_frozen():
    cfg = FreshetConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.ps.num_shards = 8  # type: ignore[misc]


# --- overrides ---------------------------------------------------------------------------


def test_overrides_merge_over_file(tmp_path):
    path = write_yaml(tmp_path, {"ps": {"num_shards": 4, "seed": 3}, "trainer": {"batch_size": 128, "passes": 2}})
    cfg = load_config(path, overrides={"trainer": {"batch_size": 64}, "serving": {"port": 8100}})
    assert cfg.ps.num_shards == 4 and cfg.ps.seed == 3  # untouched sections survive
    assert cfg.trainer.batch_size == 64 and cfg.trainer.passes == 2  # siblings in a touched section survive
    assert cfg.serving.port == 8100
    assert load_config(path).trainer.batch_size == 128  # the file itself is not changed


def test_overrides_without_file():
    cfg = load_config(overrides={"ps": {"num_shards": 3}, "stream": {"synthetic": {"num_users": 10}}})
    assert cfg.ps.num_shards == 3 and cfg.stream.synthetic.num_users == 10
    assert cfg.stream.synthetic.num_items == FreshetConfig().stream.synthetic.num_items


def test_override_replaces_non_mapping_values(tmp_path):
    path = write_yaml(tmp_path, {"stream": {"kind": "movielens", "path": "a.csv"}})
    cfg = load_config(path, overrides={"stream": {"kind": "synthetic", "path": None}})
    assert cfg.stream.kind is StreamKind.SYNTHETIC and cfg.stream.path is None


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match=r"trainer\.batch_size.*got 0"):
        load_config(overrides={"trainer": {"batch_size": 0}})


# --- errors ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "ps:\n  num_shards: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "not valid YAML" in msg


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("just a string\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    msg = config_error(tmp_path, text)
    assert "top level must be a mapping" in msg and kind in msg


@pytest.mark.parametrize(
    "data, dotted",
    [
        ({"bogus_key": "zzz"}, "bogus_key"),
        ({"ps": {"bogus_key": "zzz"}}, "ps.bogus_key"),
        ({"ps": {"tables": {**_tables(), "user": {"dim": 64, "bogus_key": "zzz"}}}}, "ps.tables.user.bogus_key"),
        ({"ps": {"optimizer": {"bogus_key": "zzz"}}}, "ps.optimizer.bogus_key"),
        ({"model": {"bogus_key": "zzz"}}, "model.bogus_key"),
        ({"trainer": {"bogus_key": "zzz"}}, "trainer.bogus_key"),
        ({"stream": {"synthetic": {"bogus_key": "zzz"}}}, "stream.synthetic.bogus_key"),
        ({"ingest": {"bogus_key": "zzz"}}, "ingest.bogus_key"),
        ({"serving": {"bogus_key": "zzz"}}, "serving.bogus_key"),
    ],
)
def test_unknown_keys_are_rejected_everywhere(tmp_path, data, dotted):
    msg = config_error(tmp_path, data)
    assert f"{dotted}: Extra inputs are not permitted" in msg
    assert "'zzz'" in msg


@pytest.mark.parametrize(
    "data, dotted, value",
    [
        ({"ps": {"tables": {**_tables(), "user": {"dim": -3}}}}, "ps.tables.user.dim", "-3"),
        ({"ps": {"tables": {**_tables(), "item": {"dim": 0}}}}, "ps.tables.item.dim", "0"),
        ({"ps": {"num_shards": -1}}, "ps.num_shards", "-1"),
        ({"ps": {"optimizer": {"lr": -0.5}}}, "ps.optimizer.lr", "-0.5"),
        ({"ps": {"optimizer": {"kind": "adam"}}}, "ps.optimizer.kind", "'adam'"),
        ({"ps": {"tables": {**_tables(), "user": {"dim": 64, "init": "normal"}}}}, "ps.tables.user.init", "'normal'"),
        ({"trainer": {"device": "gpu"}}, "trainer.device", "'gpu'"),
        ({"stream": {"synthetic": {"num_items": 1}}}, "stream.synthetic.num_items", "1"),
        ({"serving": {"port": 70000}}, "serving.port", "70000"),
        ({"namespace": "has space"}, "namespace", "'has space'"),
        ({"ray": {"max_inline_bytes": 64 << 20}}, "ray.max_inline_bytes", str(64 << 20)),
    ],
)
def test_bad_values_name_the_field_and_value(tmp_path, data, dotted, value):
    msg = config_error(tmp_path, data)
    assert f"{dotted}:" in msg
    assert f"(got {value})" in msg


def test_several_errors_are_all_reported(tmp_path):
    msg = config_error(tmp_path, {"ps": {"num_shards": 0}, "serving": {"port": 0}})
    assert "ps.num_shards:" in msg and "serving.port:" in msg


def test_movielens_stream_needs_a_path(tmp_path):
    msg = config_error(tmp_path, {"stream": {"kind": "movielens"}})
    assert "stream.path" in msg and "'movielens'" in msg
    assert load_config(write_yaml(tmp_path, {"stream": {"kind": "movielens", "path": "r.csv"}})).stream.path == "r.csv"


def test_parquet_stream_needs_a_path(tmp_path):
    msg = config_error(tmp_path, {"stream": {"kind": "parquet", "path": ""}})
    assert "stream.path" in msg and "'parquet'" in msg


def test_more_shards_than_buckets(tmp_path):
    msg = config_error(tmp_path, {"ps": {"num_shards": 8, "num_buckets": 4}})
    assert "ps:" in msg and "num_buckets (4)" in msg and "num_shards (8)" in msg


@pytest.mark.parametrize("field", ["user_table", "item_table", "item_bias_table", "popularity_table"])
def test_model_tables_must_exist(tmp_path, field):
    msg = config_error(tmp_path, {"model": {field: "nope"}})
    assert f"model.{field}='nope'" in msg and "ps.tables" in msg


@pytest.mark.parametrize("model, msg", [
    ({"item_bias_table": "item_pop"}, "model.popularity_table='item_pop' is also model.item_bias_table"),
    ({"user_table": "item"}, "model.item_table='item' is also model.user_table"),
    ({"context_table": "user"}, "model.context_table='user' is also model.user_table"),
])
def test_each_model_role_needs_a_table_of_its_own(tmp_path, model, msg):
    # These loaded, and the first trained popularity counts into the item biases without a word.
    assert msg in config_error(tmp_path, {"model": model})


def test_a_table_no_model_role_uses_is_refused_with_the_name_it_was_meant_for(tmp_path):
    # ps.tables.usr loaded as a new, unused table and left the user table unbounded.
    msg = config_error(tmp_path, {"ps": {"tables": {"usr": {"max_rows": 1000}}}})
    assert "ps.tables.usr: no model role uses this table" in msg and "did you mean 'user'?" in msg, msg
    assert "did you mean" not in config_error(tmp_path, {"ps": {"tables": {"towers": {"dim": 4}}}})
    # A table given a role is used; the default tables may stay unused.
    cfg = load_config(write_yaml(tmp_path, {"model": {"user_table": "users", "context_table": None},
                                            "ps": {"tables": {"users": {"dim": 64}}}}))
    assert {"users", "user", "item_ctx"} <= set(cfg.ps.tables)


def test_a_positive_threshold_must_be_a_number(tmp_path):
    msg = config_error(tmp_path, {"model": {"ratings": {"positive_at": float("nan")}}})
    assert "model.ratings.positive_at" in msg and "finite" in msg, msg


def test_partial_tables_extend_the_defaults(tmp_path):
    # Setting one table's field keeps the other default tables and that table's other fields.
    cfg = load_config(write_yaml(tmp_path, {"ps": {"tables": {"user": {"dim": 16}, "item": {"dim": 16}}}}))
    assert cfg.ps.tables["user"].dim == 16 and cfg.ps.tables["item"].dim == 16
    assert cfg.ps.tables["user"].init_scale == FreshetConfig().ps.tables["user"].init_scale
    assert {"item_bias", "item_pop"} <= set(cfg.ps.tables)


def test_mismatched_user_item_dims_name_the_values(tmp_path):
    msg = config_error(tmp_path, {"ps": {"tables": _tables(user_dim=32, item_dim=48)}})
    assert "32" in msg and "48" in msg and "equal dim" in msg


def test_mismatched_user_item_dims_name_the_field_path(tmp_path):
    msg = config_error(tmp_path, {"ps": {"tables": _tables(user_dim=32, item_dim=48)}})
    assert "ps.tables.user.dim" in msg and "ps.tables.item.dim" in msg


def test_bias_table_must_have_dim_1(tmp_path):
    msg = config_error(tmp_path, {"ps": {"tables": _tables(bias_dim=3)}})
    assert "model.item_bias_table" in msg and "got 3" in msg


def test_config_error_is_a_valueconfig_error():
    assert issubclass(ConfigError, ValueError)


def test_table_lookup_names_known_tables():
    ps = FreshetConfig().ps
    # The item-keyed side tables follow the item table's lifecycle by default.
    assert ps.table("item_bias") == TableConfig(dim=1, init=InitKind.ZEROS, follows="item")
    with pytest.raises(KeyError, match=r"unknown table 'nope'.*item_pop"):
        ps.table("nope")


def test_serving_port_and_a_ray_port_must_differ(tmp_path):
    # `freshet up` found out ~15 s in, when Ray or Serve could not bind.
    msg = config_error(tmp_path, {"serving": {"port": 28123}, "ray": {"ports": {"gcs": 28123}}})
    assert "serving.port 28123 is also ray.ports.gcs" in msg
    # Inside a block of ports (the head's workers, the replicas' direct ingress) too: `up` used to
    # find out only when the head refused to start.
    msg = config_error(tmp_path, {"serving": {"port": 28150}, "ray": {"ports": {"min_worker": 28100, "max_worker": 28299}}})
    assert "serving.port 28150 is inside ray.ports.min_worker..max_worker (28100-28299)" in msg, msg
    direct = {"ray": {"ports": {"direct_http_min": 28140, "direct_http_max": 28150}}}
    msg = config_error(tmp_path, {"serving": {"port": 28150, "high_throughput": True}, **direct})
    assert "serving.port 28150 is inside ray.ports.direct_http_min..direct_http_max (28140-28150)" in msg, msg
    # The block's bounds are inclusive, and a port just past it is fine.
    ok = {"serving": {"port": 28300}, "ray": {"ports": {"min_worker": 28100, "max_worker": 28299}}}
    assert load_config(write_yaml(tmp_path, ok)).ray.ports["max_worker"] == 28299
    # Only ports in use count: the direct-ingress block without high-throughput mode is unused.
    assert load_config(write_yaml(tmp_path, {"serving": {"port": 28150}, **direct})).serving.port == 28150


def test_ray_ports_in_use_must_not_share_a_port(tmp_path):
    both = {"ray": {"include_dashboard": True, "ports": {"gcs": 28123, "dashboard": 28123}}}
    msg = config_error(tmp_path, both)
    assert "ray.ports.dashboard and ray.ports.gcs share port 28123" in msg, msg
    # Without the dashboard its port is never bound: no clash.
    both["ray"]["include_dashboard"] = False
    assert load_config(write_yaml(tmp_path, both)).ray.ports["dashboard"] == 28123
    # A listener inside the workers' block, and two blocks that overlap.
    msg = config_error(tmp_path, {"ray": {"ports": {"node_manager": 28150, "min_worker": 28100, "max_worker": 28299}}})
    assert "ray.ports.min_worker..max_worker and ray.ports.node_manager share port 28150" in msg, msg
    msg = config_error(tmp_path, {"serving": {"high_throughput": True},
                                  "ray": {"ports": {"min_worker": 28100, "max_worker": 28299,
                                                    "direct_http_min": 28299, "direct_http_max": 28310}}})
    assert "share port 28299" in msg, msg
    # 0 lets Ray pick: never a clash, however many.
    cfg = load_config(write_yaml(tmp_path, {"ray": {"ports": {"dashboard": 0, "metrics_export": 0, "gcs": 28123}}}))
    assert cfg.ray.ports["gcs"] == 28123


@pytest.mark.parametrize("ports, why", [
    ({"min_worker": 0, "max_worker": 28299}, "ray.ports.min_worker=0 lets Ray pick the workers' ports"),
    ({"min_worker": 28100, "max_worker": 28100}, "ray.ports.max_worker=28100 must exceed ray.ports.min_worker=28100"),
    ({"min_worker": 1000, "max_worker": 28100}, "ray.ports.min_worker=1000: Ray takes 0 (it picks) or 1024-65535"),
])
def test_the_workers_block_follows_rays_own_rules(tmp_path, ports, why):
    # `ray start` refuses these (or, for min_worker 0, holds ports 0..max_worker and clashes) once `up` is under way.
    assert why in config_error(tmp_path, {"ray": {"ports": ports}})


def test_a_check_across_fields_does_not_echo_the_whole_config(tmp_path):
    # Its input is the whole section: the message names the fields; a long echo only buries it.
    big = {"model": {"item_bias_table": "item_pop"}, "ps": {"tables": {f"t{i}": {"dim": 4} for i in range(40)}}}
    msg = config_error(tmp_path, big)
    assert "model.popularity_table='item_pop' is also model.item_bias_table" in msg and "(got" not in msg, msg


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    # PyYAML keeps the last one: one of the two settings would be dropped without a word.
    path = tmp_path / "freshet.yaml"
    path.write_text("serving:\n  port: 8001\n  port: 8002\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'port' is given twice \(first line 2\)[\s\S]*line 3"):
        load_config(path)


# --- settings that would be ignored or fail only later ------------------------------------


@pytest.mark.parametrize("prefix, why", [("api", "must start with '/'"), ("/api/", "must not end with '/'"),
                                         ("/{x}", "may not contain '{' or '}'")])
def test_a_route_prefix_serve_refuses_is_a_load_time_error(tmp_path, prefix, why):
    # Serve refused it only when `freshet up` deployed the app, after the PS and trainers started.
    msg = config_error(tmp_path, {"serving": {"route_prefix": prefix}})
    assert "serving.route_prefix:" in msg and why in msg, msg
    assert load_config(write_yaml(tmp_path, {"serving": {"route_prefix": "/api"}})).serving.route_prefix == "/api"


def test_a_replica_cpu_share_ray_cannot_reserve_is_a_load_time_error(tmp_path):
    msg = config_error(tmp_path, {"serving": {"replica_num_cpus": 0.00009}})
    assert "serving.replica_num_cpus:" in msg and "0.0001" in msg, msg


@pytest.mark.parametrize("model, field", [
    ({"loss": "mse", "num_negatives": 3}, "model.num_negatives"),
    ({"loss": "mse", "popularity_negative_fraction": 0.5}, "model.popularity_negative_fraction"),
    ({"loss": "mse", "event_weights": {"view": 0.2}}, "model.event_weights"),
    ({"loss": "mse", "ratings": {"positive_at": 3.0}}, "model.ratings"),
    ({"loss": "mse", "negative_feedback": "ignore"}, "model.negative_feedback"),
    ({"loss": "bpr", "rating_range": [1.0, 5.0]}, "model.rating_range"),
])
def test_a_model_setting_its_loss_does_not_use_is_a_load_time_error(tmp_path, model, field):
    # Accepted, each was silently ignored: an MSE model trains every event as a rating with no
    # negatives, and a BPR model never checks rating_range.
    msg = config_error(tmp_path, {"model": model})
    assert f"{field}=" in msg and f"not used with model.loss={model['loss']!r}" in msg, msg


@pytest.mark.parametrize("tables, model, msg", [
    ({"item_pop": {"optimizer": {"kind": "rowwise_adagrad"}}}, {},
     "ps.tables.item_pop (model.popularity_table) counts interactions: its optimizer kind must be 'accumulate', got 'rowwise_adagrad'"),
    ({"item_bias": {"optimizer": {"kind": "accumulate"}}}, {},
     "ps.tables.item_bias (model.item_bias_table) is trained by gradients: its optimizer kind must be one of"),
    ({}, {"user_table": "counts", "context_table": None},
     "ps.tables.counts (model.user_table) is trained by gradients"),
])
def test_a_model_role_on_a_table_with_the_wrong_update_rule_is_a_load_time_error(tmp_path, tables, model, msg):
    # Accepted, a popularity table with a gradient rule went negative (counts were followed as
    # gradients), and a trained table with accumulate climbed its gradients.
    tables = {**tables, "counts": {"dim": 64, "optimizer": {"kind": "accumulate", "lr": 1.0}}} if "user_table" in model else tables
    assert msg in config_error(tmp_path, {"ps": {"tables": tables}, "model": model})


def test_recent_follows_must_name_the_user_table_when_rows_can_go(tmp_path):
    # recent_follows: item dropped user 7's recent items whenever item 7 was evicted.
    msg = config_error(tmp_path, {"ps": {"recent_follows": "item", "tables": {"item": {"max_rows": 100}}}})
    assert "ps.recent_follows='item'" in msg and "model.user_table='user'" in msg, msg
    msg = config_error(tmp_path, {"ps": {"recent_follows": "item", "tables": {"user": {"ttl_s": 60}}}})
    assert "ps.recent_follows='item'" in msg, msg
    # With no lifecycle on either table nothing is ever dropped, so the name does not matter.
    assert load_config(write_yaml(tmp_path, {"ps": {"recent_follows": "item"}})).ps.recent_follows == "item"
    assert load_config(write_yaml(tmp_path, {"ps": {"recent_follows": None, "tables": {"user": {"ttl_s": 60}}}}))


@pytest.mark.parametrize("seen", [0, 5])
def test_fewer_recent_items_than_the_session_context_is_a_load_time_error(tmp_path, seen):
    # Serving builds a user's context from the recent items the shards keep (seen_per_user of
    # them); trainers from their own history of context_items: the two queries differed.
    msg = config_error(tmp_path, {"ps": {"seen_per_user": seen}})
    assert f"ps.seen_per_user={seen} is below model.context_items=10" in msg, msg
    assert load_config(write_yaml(tmp_path, {"ps": {"seen_per_user": 0}, "model": {"context_table": None}}))
    assert load_config(write_yaml(tmp_path, {"ps": {"seen_per_user": 5}, "model": {"context_items": 5}}))
