"""Configuration shared by every layer, and the parameter server's own settings.

``ConfigModel`` (every Freshet settings model forbids unknown keys, and each field
says its unit), the YAML/merge helpers and :class:`ConfigError` live here, in the
bottom layer, so every package can build its settings on them. The PS's settings
(tables, optimizers, sharding, shard resources) live here too. The trainer, model,
stream and ingest settings are in :mod:`workers.config`; the serving settings and the
root :class:`serving.config.FreshetConfig` that composes them all, with
``load_config``, are in :mod:`serving.config`.
"""

from __future__ import annotations

import enum
import importlib
import warnings
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AdmissionConfig",
    "ConfigError",
    "ConfigModel",
    "EvictionPolicy",
    "InitKind",
    "OptimizerConfig",
    "OptimizerKind",
    "PSConfig",
    "TableConfig",
    "check_ray_quantity",
    "format_validation_error",
    "merge",
    "read_yaml",
]


# Ray keeps resource quantities in units of 1/10,000 and refuses a finer non-zero share only
# when the actor is created (ray._common.ray_option_utils).
_RAY_RESOURCE_UNIT = 1e-4


def check_ray_quantity(field: str, value: float) -> float:
    """``value`` unchanged when Ray can reserve it: 0 or at least 0.0001.

    Raises:
        ValueError: naming ``field``.
    """
    if 0 < value < _RAY_RESOURCE_UNIT:
        raise ValueError(f"{field}={value:g}: Ray reserves 0 or at least 0.0001 of a resource")
    return value


class ConfigModel(BaseModel):
    """Base of every Freshet config model: unknown keys are errors, instances are frozen.

    A subclass may list ``_renamed = {"old_key": ("new_key", factor)}``: the old key is
    still accepted for one release, converted (value × factor) with a ``FutureWarning``
    naming both, so an old config file keeps loading while its author is told what to change.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    _renamed: ClassVar[dict[str, tuple[str, float]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed(cls, data: Any) -> Any:
        if not cls._renamed or not isinstance(data, dict):
            return data
        data = dict(data)
        for old, (new, factor) in cls._renamed.items():
            if old not in data:
                continue
            value = data.pop(old)
            if new in data:
                raise ValueError(f"{old} is the deprecated name of {new}; give only {new}")
            warnings.warn(
                f"config key {cls._section}.{old} is deprecated and will be removed in the next release; "
                f"use {cls._section}.{new}" + (f" (= {old} x {factor:g})" if factor != 1 else ""),
                FutureWarning,
                stacklevel=2,
            )
            data[new] = value * factor if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        return data

    _section: ClassVar[str] = ""


class OptimizerKind(str, enum.Enum):
    """Update rule a shard applies to pushed gradients (see ``ps.optim``)."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    # rows += values: for counter tables such as item popularity.
    ACCUMULATE = "accumulate"
    # (count, clock) rows that halve every clock unit: recent popularity (ps.optim.decayed_count).
    DECAYED_COUNT = "decayed_count"


class InitKind(str, enum.Enum):
    """How a row is initialised the first time its ID is seen."""

    UNIFORM = "uniform"  # U(-init_scale, init_scale), derived from (table seed, id)
    ZEROS = "zeros"


class EvictionPolicy(str, enum.Enum):
    """Which rows go when a table is at ``max_rows`` (HierarchicalKV's score-based eviction)."""

    LRU = "lru"  # least recently interacted with
    LFU = "lfu"  # fewest interactions


class AdmissionConfig(ConfigModel):
    """When a new ID gets a row: after ``min_count`` pushes and/or with ``probability``.

    Pushes are counted in a count-min sketch (Cormode & Muthukrishnan, 2005) of
    ``sketch_depth x sketch_width`` int32 counters: ``4 * depth * width`` bytes per table
    and shard (see :mod:`ps.admission`).
    """

    min_count: int = Field(
        1, ge=1, le=1_000_000,
        description="pushes that may create an ID's row before it gets one (pushes: a trainer sends one per mini-batch "
                    "with an interaction of the ID, whatever its passes); 1 admits on first sight",
    )
    probability: float = Field(
        1.0, gt=0, le=1, description="chance that the push which would create a row does (fraction); deterministic per (ID, count)"
    )
    # 4 x 2^18 int32 counters = 4 MiB per table and shard; with 1M distinct absent IDs per
    # shard an estimate is off by more than 4 with probability < 2% (count-min bounds).
    sketch_width: int = Field(1 << 18, ge=64, le=1 << 26, description="counters per sketch row (counters)")
    sketch_depth: int = Field(4, ge=1, le=16, description="sketch rows, each with its own hash (rows)")
    # Without aging the sketch fills with the counts of every ID ever seen: with the default
    # sketch and min_count 2, a brand-new ID found all its counters taken, and was admitted on
    # first sight, half the time after 0.5M one-off IDs on a shard and always after 4M. Halving
    # every counter after a sample of pushes is TinyLFU's reset (Einziger, Friedman & Manes,
    # 2017, "TinyLFU: A Highly Efficient Cache Admission Policy", section 3.3). A sample of
    # sketch_width / 4 leaves at most ~1/4 of a count per counter of one-off pushes, so a new
    # ID finds all of 4 counters taken with probability (1 - e^-0.25)^4 ~ 0.24%.
    halve_every: int | None = Field(
        None, ge=1, le=1 << 62,
        description="pushes counted in the sketch after which every counter is halved (pushes per table and shard), "
                    "so an ID is admitted only if its min_count pushes come within about that many pushes of absent "
                    "IDs; null: sketch_width / 4",
    )

    @model_validator(mode="after")
    def _check_halving(self) -> "AdmissionConfig":
        if self.halve_every is not None and self.halve_every < self.min_count:
            raise ValueError(f"halve_every={self.halve_every} is below min_count={self.min_count}: an ID's count "
                             "would be halved before it could reach min_count")
        if self.halve_every is None and self.sketch_width // 4 < self.min_count:
            raise ValueError(f"min_count={self.min_count} is above sketch_width / 4 = {self.sketch_width // 4}, "
                             "the pushes after which counters are halved; raise sketch_width or set halve_every")
        return self

    def pushes_per_halving(self) -> int:
        """Pushes counted between two halvings of the sketch: ``halve_every``, or ``sketch_width // 4``."""
        return self.halve_every if self.halve_every is not None else self.sketch_width // 4


class OptimizerConfig(ConfigModel):
    """Optimizer hyper-parameters applied on the shards."""

    kind: OptimizerKind = Field(OptimizerKind.ROWWISE_ADAGRAD, description="update rule")
    # 0.05 for items: measured on MovieLens against 0.1 (BENCHMARKS.md, section 3).
    lr: float = Field(0.05, gt=0, le=100, description="learning rate (parameter units per gradient unit)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum coefficient (dimensionless); 0 disables")
    eps: float = Field(1e-8, gt=0, le=1, description="Adagrad denominator epsilon (dimensionless)")
    # 1 is plain Adagrad, whose step shrinks as 1/sqrt(a row's pushes) for as long as the
    # service runs: after a million pushes a popular item moves 1/1000 as far as at first.
    # 0.999 caps the shrink near the ~1,000th push (the sum levels off at ~1,000 pushes'
    # squares): MovieLens recall@10 the same, the synthetic stream +4%, all of it after its
    # taste shift; 0.99 lost 3% on MovieLens (BENCHMARKS.md, section 3).
    accumulator_decay: float = Field(
        0.999, gt=0, le=1,
        description="Adagrad: factor on a row's sum of squared gradients at each push to it, before the "
                    "push's square is added (dimensionless); 1 keeps the whole sum (plain Adagrad)",
    )

    # Checked where the config is loaded (PSConfig), not here: ps.optim's tests drive every
    # kind with every setting.
    _USED_BY: ClassVar[dict[str, frozenset[OptimizerKind]]] = {
        "lr": frozenset(OptimizerKind) - {OptimizerKind.DECAYED_COUNT},
        "momentum": frozenset({OptimizerKind.SGD}),
        "eps": frozenset({OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD}),
        "accumulator_decay": frozenset({OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD}),
    }

    def unused_settings(self) -> list[str]:
        """``"field=value"`` for each setting other than its default that ``kind`` ignores."""
        return [f"{f}={getattr(self, f)!r}" for f, kinds in self._USED_BY.items()
                if self.kind not in kinds and getattr(self, f) != type(self).model_fields[f].default]


class TableConfig(ConfigModel):
    """One embedding table: its width, initialisation, optimizer and ID lifecycle.

    A table that ``follows`` another (say ``item_bias`` follows ``item``) holds rows for the
    same IDs: a row exists there only while the followed table has the ID, so one
    lifecycle (admission, ``max_rows`` eviction, ``ttl_s`` expiry) governs them all.
    """

    dim: int = Field(64, ge=1, le=4096, description="row width (floats)")
    init: InitKind = Field(InitKind.UNIFORM, description="initialisation of a new row")
    # Small init matters for online MF: large random rows drown the first few updates.
    init_scale: float = Field(0.01, ge=0, le=10, description="half-width of the uniform init (parameter units)")
    optimizer: OptimizerConfig | None = Field(None, description="per-table optimizer; null uses ps.optimizer")
    follows: str | None = Field(
        None, description="table whose IDs this one's rows live and die with; null: the table has its own lifecycle"
    )
    ttl_s: float | None = Field(
        None, gt=0, description="expire IDs without a real interaction for this long (seconds); null keeps them forever"
    )
    max_rows: int | None = Field(
        None, ge=1, le=1 << 31, description="most IDs per shard (rows); the lowest-scoring go when it is full; null: unbounded"
    )
    eviction: EvictionPolicy = Field(EvictionPolicy.LRU, description="which IDs go at max_rows")
    admission: AdmissionConfig | None = Field(None, description="when a new ID gets a row; null admits on first sight")

    @model_validator(mode="after")
    def _lifecycle_on_leaders_only(self) -> "TableConfig":
        if self.follows is not None:
            own = [f for f in ("ttl_s", "max_rows", "admission") if getattr(self, f) is not None]
            if self.eviction is not EvictionPolicy.LRU:
                own.append("eviction")
            if own:
                raise ValueError(f"{', '.join(own)}: a table that follows {self.follows!r} takes its lifecycle from it")
        # Unchecked, these were silently ignored.
        if self.max_rows is None and self.eviction is not EvictionPolicy.LRU:
            raise ValueError(f"eviction={self.eviction.value!r} is only used with max_rows, which is null")
        if self.init is not InitKind.UNIFORM and self.init_scale != type(self).model_fields["init_scale"].default:
            raise ValueError(f"init_scale={self.init_scale:g} is only used with init uniform (init is {self.init.value})")
        return self

    @property
    def has_lifecycle(self) -> bool:
        """True when rows can go (expiry or eviction) or be refused (admission)."""
        return self.ttl_s is not None or self.max_rows is not None or self.admission is not None


def _default_tables() -> dict[str, TableConfig]:
    return {
        # Users learn 4x faster than items: a user's taste is learnt from few events (BENCHMARKS.md).
        "user": TableConfig(optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2)),
        "item": TableConfig(),
        "item_bias": TableConfig(dim=1, init=InitKind.ZEROS, follows="item"),
        # Interaction counts per item: the popular fallback and the popularity negatives.
        "item_pop": TableConfig(
            dim=1, init=InitKind.ZEROS, follows="item", optimizer=OptimizerConfig(kind=OptimizerKind.ACCUMULATE, lr=1.0)
        ),
        # Recency-decayed interaction counts per item, (count, clock in half-lives as a high
        # and a low part, so it stays precise for years: ps.optim.CLOCK_STEP): the
        # recent-popularity prior in the score and the popular fallback.
        "item_recent": TableConfig(
            dim=3, init=InitKind.ZEROS, follows="item", optimizer=OptimizerConfig(kind=OptimizerKind.DECAYED_COUNT)
        ),
        # Item context vectors: a user's query is their row plus the mean of their recent
        # items' context rows. Zero init: the context starts neutral. lr 0.2 as for users,
        # measured on MovieLens (BENCHMARKS.md).
        "item_ctx": TableConfig(
            init=InitKind.ZEROS, follows="item", optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2)
        ),
    }


class PSConfig(ConfigModel):
    """Parameter-server deployment: tables, sharding and actor resources.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) an unknown key, a value out of range,
            ``num_buckets < num_shards``, a ``follows`` or ``recent_follows`` that names no
            table, a table that follows a follower, a ``decayed_count`` table whose dim is not 2 or 3, or an
            optimizer setting that its kind does not use (``momentum`` outside ``sgd``, say).
    """

    num_shards: int = Field(2, ge=1, le=1024, description="number of shard actors")
    # 1024 buckets: enough to rebalance up to ~100 shards at ~1% granularity.
    num_buckets: int = Field(1024, ge=1, le=1 << 20, description="virtual buckets that IDs hash into")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seed mixed into every table's row initialisation")
    tables: dict[str, TableConfig] = Field(
        default_factory=_default_tables, description="tables by name; entries given extend/override the defaults"
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="default optimizer for tables")
    # Four fractional actors fit on 2 CPUs beside the trainer and Serve.
    shard_num_cpus: float = Field(0.25, ge=0, le=64, description="CPUs reserved per shard actor")
    seen_per_user: int = Field(
        1000, ge=0, le=100_000, description="most recent items remembered per user for exclude_seen and the session context (items)"
    )
    recent_follows: str | None = Field(
        "user", description="table whose removal of a user (expiry, eviction) also drops that user's recent items"
    )
    # A user's events are recorded when posted, before a trainer's push gives them a row; a
    # minute covers a trainer's usual lag, and a trainer's push records its events again.
    recent_without_row_s: float = Field(
        60.0, gt=0, description="a user without a row in recent_follows (not admitted, or no room) keeps their recent "
        "items this long after their last recorded event, up to twice it, when that table has a lifecycle (seconds)"
    )
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead shard actor; -1 is unlimited")
    # A snapshot costs a full write of the shard; 2000 records bounds replay on restart to seconds.
    snapshot_every_pushes: int = Field(
        2000, ge=1, description="write a shard snapshot after this many log records: pushes, and the recent items "
                                "/events records while no push comes (records)"
    )
    fsync: bool = Field(
        False, description="fsync the push log before acknowledging a push (survives machine crashes, costs ~ms per push)"
    )
    # A Serve replica syncs every cache_refresh_s (0.2 s): 10 minutes of silence means it is gone.
    reader_timeout_s: float = Field(
        600.0, gt=0, description="a delta-sync reader not heard from for this long no longer holds back tombstone pruning (seconds)"
    )
    # 1M tombstones (16 bytes each) bound a shard's removal record even if a reader stalls.
    max_tombstones: int = Field(
        1_000_000, ge=1, description="removed IDs a table keeps for readers that lag (IDs); a reader further behind resyncs fully"
    )

    @field_validator("tables", mode="before")
    @classmethod
    def _extend_default_tables(cls, value: Any) -> Any:
        # Setting one table (say user.dim) must not silently drop the others.
        if isinstance(value, dict):
            merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_tables().items()}
            for k, v in value.items():
                merged[k] = merge(merged[k], v) if isinstance(v, dict) and k in merged else v
            # Context rows live in item space: the default context table follows the item dim.
            ctx, item = merged.get("item_ctx"), merged.get("item")
            given = value.get("item_ctx")
            if isinstance(ctx, dict) and not (isinstance(given, dict) and "dim" in given) and not isinstance(given, TableConfig):
                dim = item.get("dim") if isinstance(item, dict) else getattr(item, "dim", None)
                if dim is not None:
                    merged["item_ctx"] = {**ctx, "dim": dim}
            return merged
        return value

    @field_validator("shard_num_cpus")
    @classmethod
    def _reservable(cls, value: float) -> float:
        return check_ray_quantity("ps.shard_num_cpus", value)

    @model_validator(mode="after")
    def _check(self) -> "PSConfig":
        if self.num_buckets < self.num_shards:
            raise ValueError(
                f"num_buckets ({self.num_buckets}) must be >= num_shards ({self.num_shards}): every shard needs a bucket"
            )
        for name, t in self.tables.items():
            if t.follows is None:
                continue
            leader = self.tables.get(t.follows)
            if leader is None:
                raise ValueError(f"tables.{name}.follows={t.follows!r} is not a table ({sorted(self.tables)})")
            if leader.follows is not None:
                raise ValueError(
                    f"tables.{name}.follows={t.follows!r}, which follows {leader.follows!r} itself; follow the leader directly"
                )
        for name, t in self.tables.items():
            # Caught here, such a table would fail each push that reaches it only once the push
            # is logged, and a restart would replay that failure forever.
            if self.optimizer_for(name).kind is OptimizerKind.DECAYED_COUNT and t.dim not in (2, 3):
                raise ValueError(f"tables.{name}.dim={t.dim}: optimizer decayed_count keeps (count, clock) rows, "
                                 "so dim must be 3 (the clock in two parts) or 2 (in one, coarse after ~1e10 events)")
        if self.recent_follows is not None and self.recent_follows not in self.tables:
            # Unchecked, a typo meant users' recent items were never dropped with their rows.
            raise ValueError(f"recent_follows={self.recent_follows!r} is not a table ({sorted(self.tables)})")
        # ps.optim would silently ignore these (momentum outside sgd, say).
        for where, opt in [("optimizer", self.optimizer),
                           *((f"tables.{n}.optimizer", t.optimizer) for n, t in self.tables.items() if t.optimizer)]:
            unused = opt.unused_settings()
            if unused:
                raise ValueError(", ".join(f"{where}.{u}" for u in unused)
                                 + f": not used by optimizer kind {opt.kind.value!r}")
        return self

    def leader_of(self, name: str) -> str:
        """The table whose lifecycle table ``name`` follows (itself for a leader).

        Raises:
            KeyError: an unknown table (naming the configured ones).
        """
        return self.table(name).follows or name

    def table(self, name: str) -> TableConfig:
        """The config of table ``name``.

        Raises:
            KeyError: an unknown table (naming the configured ones).
        """
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; configured tables: {sorted(self.tables)}") from None

    def optimizer_for(self, name: str) -> OptimizerConfig:
        """The optimizer that applies to table ``name``.

        Raises:
            KeyError: an unknown table (naming the configured ones).
        """
        return self.table(name).optimizer or self.optimizer


class ConfigError(ValueError):
    """A config that cannot be loaded: the message names the field path and the reason."""


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem of ``err``: ``path.to.field: reason (got value)``, under a header naming ``source``."""
    lines = [f"invalid Freshet config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = repr(e.get("input"))
        # A check across fields gets the whole section as its input: its message names the fields.
        lines.append(f"  {path}: {e['msg']}" + (f" (got {got})" if len(got) <= 200 else ""))
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so one of the two settings would be dropped without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice (first {seen[key]})", key_node.start_mark)
            seen[key] = f"line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (an empty file is ``{}``).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or its top level is not a mapping.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {source}: {e}") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {source}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in recursively (``over`` wins; neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# Names that lived here before the config tree was split by package: importable from here
# for one more release, with a warning naming their new home.
_MOVED = {
    **dict.fromkeys(
        ("LossKind", "StreamKind", "ModelConfig", "TrainerConfig", "SyntheticConfig", "StreamConfig", "IngestConfig"),
        "workers.config",
    ),
    **dict.fromkeys(("ServingConfig", "FreshetConfig", "load_config"), "serving.config"),
}


def __getattr__(name: str) -> Any:
    # Lazy: importing ps must never import workers or serving (ps is the bottom layer).
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'ps.config' has no attribute {name!r}")
    warnings.warn(f"ps.config.{name} moved to {home}.{name}; the old name goes in the next release",
                  FutureWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
