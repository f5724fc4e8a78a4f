"""Freshet's configuration: one pydantic model tree, loadable from YAML.

Every package imports its settings from here (``ps`` is the bottom layer, so the
whole tree lives in it to keep imports acyclic). Every model forbids unknown keys
and every field says its unit, so a typo or a bad value fails at load time with the
field path and the offending value rather than deep inside a running actor.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "FreshetConfig",
    "IngestConfig",
    "InitKind",
    "LossKind",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerKind",
    "PSConfig",
    "ServingConfig",
    "StreamConfig",
    "StreamKind",
    "SyntheticConfig",
    "TableConfig",
    "TrainerConfig",
    "load_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


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


class LossKind(str, enum.Enum):
    """Training objective: BPR for implicit feedback, MSE for explicit ratings."""

    BPR = "bpr"
    MSE = "mse"


class StreamKind(str, enum.Enum):
    """Where trainers read interactions from."""

    SYNTHETIC = "synthetic"
    MOVIELENS = "movielens"
    PARQUET = "parquet"
    INGEST = "ingest"


class OptimizerConfig(_Model):
    """Optimizer hyper-parameters applied on the shards."""

    kind: OptimizerKind = Field(OptimizerKind.ROWWISE_ADAGRAD, description="update rule")
    # 0.05 for items: measured on MovieLens against 0.1 (BENCHMARKS.md, section 3).
    lr: float = Field(0.05, gt=0, le=100, description="learning rate (parameter units per gradient unit)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum coefficient (dimensionless); 0 disables")
    eps: float = Field(1e-8, gt=0, le=1, description="Adagrad denominator epsilon (dimensionless)")


class TableConfig(_Model):
    """One embedding table: its width, initialisation, optimizer and expiry."""

    dim: int = Field(64, ge=1, le=4096, description="row width (floats)")
    init: InitKind = Field(InitKind.UNIFORM, description="initialisation of a new row")
    # Small init matters for online MF: large random rows drown the first few updates.
    init_scale: float = Field(0.01, ge=0, le=10, description="half-width of the uniform init (parameter units)")
    optimizer: OptimizerConfig | None = Field(None, description="per-table optimizer; null uses ps.optimizer")
    ttl_s: float | None = Field(
        None, gt=0, description="expire rows not pushed for this long (seconds); null keeps rows forever"
    )


def _default_tables() -> dict[str, TableConfig]:
    return {
        # Users learn 4x faster than items: a user's taste is learnt from few events (BENCHMARKS.md).
        "user": TableConfig(optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2)),
        "item": TableConfig(),
        "item_bias": TableConfig(dim=1, init=InitKind.ZEROS),
        # Interaction counts per item: the popular fallback and the popularity negatives.
        "item_pop": TableConfig(dim=1, init=InitKind.ZEROS, optimizer=OptimizerConfig(kind=OptimizerKind.ACCUMULATE, lr=1.0)),
        # Recency-decayed interaction counts per item, (count, clock in half-lives): the
        # recent-popularity prior in the score and the popular fallback.
        "item_recent": TableConfig(dim=2, init=InitKind.ZEROS, optimizer=OptimizerConfig(kind=OptimizerKind.DECAYED_COUNT)),
        # Item context vectors: a user's query is their row plus the mean of their recent
        # items' context rows. Zero init: the context starts neutral. lr 0.2 as for users,
        # measured on MovieLens (BENCHMARKS.md).
        "item_ctx": TableConfig(init=InitKind.ZEROS, optimizer=OptimizerConfig(kind=OptimizerKind.ROWWISE_ADAGRAD, lr=0.2)),
    }


class PSConfig(_Model):
    """Parameter-server deployment: tables, sharding and actor resources."""

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
        1000, ge=0, le=100_000, description="most recent items remembered per user for exclude_seen (items)"
    )
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead shard actor; -1 is unlimited")
    # A snapshot costs a full write of the shard; 2000 pushes bounds replay on restart to seconds.
    snapshot_every_pushes: int = Field(
        2000, ge=1, description="write a shard snapshot after this many applied pushes (pushes)"
    )
    fsync: bool = Field(
        False, description="fsync the push log before acknowledging a push (survives machine crashes, costs ~ms per push)"
    )

    @field_validator("tables", mode="before")
    @classmethod
    def _extend_default_tables(cls, value: Any) -> Any:
        # Setting one table (say user.dim) must not silently drop the others.
        if isinstance(value, dict):
            merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_tables().items()}
            for k, v in value.items():
                merged[k] = _merge(merged[k], v) if isinstance(v, dict) and k in merged else v
            # Context rows live in item space: the default context table follows the item dim.
            ctx, item = merged.get("item_ctx"), merged.get("item")
            given = value.get("item_ctx")
            if isinstance(ctx, dict) and not (isinstance(given, dict) and "dim" in given) and not isinstance(given, TableConfig):
                dim = item.get("dim") if isinstance(item, dict) else getattr(item, "dim", None)
                if dim is not None:
                    merged["item_ctx"] = {**ctx, "dim": dim}
            return merged
        return value

    @model_validator(mode="after")
    def _check(self) -> "PSConfig":
        if self.num_buckets < self.num_shards:
            raise ValueError(
                f"num_buckets ({self.num_buckets}) must be >= num_shards ({self.num_shards}): every shard needs a bucket"
            )
        return self

    def table(self, name: str) -> TableConfig:
        """The config of table ``name``; KeyError naming the known tables if absent."""
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"unknown table {name!r}; configured tables: {sorted(self.tables)}") from None

    def optimizer_for(self, name: str) -> OptimizerConfig:
        """The optimizer that applies to table ``name``."""
        return self.table(name).optimizer or self.optimizer


class ModelConfig(_Model):
    """Matrix factorisation with an item bias (two-tower dot product), a session context and a
    recent-popularity prior.

    score(user, item) = (user row + mean of the context rows of the user's last
    ``context_items`` items) · item row + item bias + ``recent_weight`` * log1p(recent count).
    """

    user_table: str = Field("user", description="table of user vectors")
    item_table: str = Field("item", description="table of item vectors")
    item_bias_table: str = Field("item_bias", description="table of item biases (dim 1)")
    popularity_table: str = Field("item_pop", description="counter table of item interaction counts (dim 1)")
    loss: LossKind = Field(LossKind.BPR, description="training objective")
    # 32 over 8 and 16: +0.0003-0.0017 recall@10 on MovieLens (BENCHMARKS.md).
    num_negatives: int = Field(32, ge=1, le=1024, description="sampled negatives per positive (BPR)")
    # Popularity-proportional negatives teach the item bias to fight popularity: 0.86x vs 1.12x
    # popularity at 0.5 on the first synthetic stream, 0.0493 vs 0.0543 recall@10 at 0.25 on
    # MovieLens (BENCHMARKS.md).
    popularity_negative_fraction: float = Field(
        0.0, ge=0, le=1, description="share of negatives drawn by popularity; the rest uniformly (fraction)"
    )
    l2: float = Field(1e-4, ge=0, le=10, description="L2 penalty on touched rows (per unit squared norm)")
    recent_table: str | None = Field(
        "item_recent", description="decayed_count table of recent item popularity (dim 2); null disables the prior"
    )
    # Measured on MovieLens (BENCHMARKS.md): 2,000 events beats 500-1,000 and 3,000-4,000.
    recent_halflife_events: float = Field(
        2000.0, gt=0, description="events after which a recent-popularity count has halved (events); fixed for a deployment"
    )
    # 1.5 over 1.0 on MovieLens through the PS (0.0556 vs 0.0548 recall@10) and over 2.0 in the
    # in-process replica (BENCHMARKS.md, section 3).
    recent_weight: float = Field(
        1.5, ge=0, le=100, description="weight of log1p(recent count) added to every score (logits per log-count)"
    )

    context_table: str | None = Field(
        "item_ctx", description="table of item context vectors (item dim); null turns the session context off"
    )
    # Measured on MovieLens (BENCHMARKS.md): 10 beats 5 and 20.
    context_items: int = Field(
        10, ge=1, le=1000, description="a user's most recent items whose context rows join their query (items)"
    )

    def item_tables(self) -> list[str]:
        """The item-keyed tables a ranking cache mirrors: vectors, biases, counts, recent
        counts and context vectors (those configured)."""
        tables = [self.item_table, self.item_bias_table, self.popularity_table]
        return tables + [t for t in (self.recent_table, self.context_table) if t]


class TrainerConfig(_Model):
    """Trainer actors: batching, passes, device and resources."""

    num_workers: int = Field(1, ge=1, le=1024, description="trainer actors; the stream is partitioned by user")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="events per mini-batch")
    # Three rounds learn a session before the user's next events: better than 1, 2, 4 or 5 on MovieLens.
    passes: int = Field(3, ge=1, le=100, description="pull-compute-push rounds per mini-batch")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="torch device; auto picks cuda when present")
    prefetch: bool = Field(True, description="pull the next batch's rows while computing the current one")
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs reserved per trainer actor")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs reserved per trainer actor")
    poll_interval_s: float = Field(0.05, gt=0, le=60, description="wait between polls of an exhausted live stream (seconds)")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead trainer actor; -1 is unlimited")


class SyntheticConfig(_Model):
    """The built-in stream: Zipf popularity, taste clusters and a preference shift."""

    num_users: int = Field(2000, ge=1, le=100_000_000, description="distinct users")
    num_items: int = Field(1000, ge=2, le=100_000_000, description="distinct items")
    num_clusters: int = Field(8, ge=1, le=10_000, description="user taste clusters")
    zipf_a: float = Field(1.1, gt=0, le=5, description="Zipf exponent of item popularity")
    # 5 nats: tastes explain most of a user's events (an oracle knowing every user's cluster
    # scores 2.8x popularity, 1.5x at 3), so the taste shift is visible (BENCHMARKS.md, section 3).
    affinity: float = Field(5.0, ge=0, le=50, description="log-odds boost of in-taste items (nats)")
    session_mean: float = Field(5.0, ge=1, le=1000, description="mean events per user session (events)")
    drift_at: float | None = Field(
        0.5, gt=0, lt=1, description="fraction of the stream after which every cluster's taste shifts; null for none"
    )
    seed: int = Field(0, ge=0, description="generator seed")


class StreamConfig(_Model):
    """The interaction stream trainers consume."""

    kind: StreamKind = Field(StreamKind.SYNTHETIC, description="source type")
    path: str | None = Field(None, description="file or directory for movielens/parquet sources")
    num_events: int | None = Field(60_000, ge=1, description="stop after this many events (events); null for all")
    min_weight: float | None = Field(
        None, description="drop events with weight below this (implicit view of ratings); null keeps all"
    )
    quarantine_path: str | None = Field(None, description="Arrow file for rejected rows; null puts it under the local state dir (ingest.state_dir, else ingest.dir)")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="synthetic generator settings")

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        if self.kind in (StreamKind.MOVIELENS, StreamKind.PARQUET) and not self.path:
            raise ValueError(f"stream.path is required for kind={self.kind.value!r}")
        return self


class IngestConfig(_Model):
    """The durable log behind ``POST /events``, and where the deployment's local state lives."""

    dir: str = Field(
        "freshet-data",
        description="where the ingest log lives: a local directory, or a pyarrow.fs URI (file:///abs/path, "
        "s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path, abfs://...) for shared storage",
    )
    state_dir: str | None = Field(
        None,
        min_length=1,
        description="local (or shared-mounted) directory for shard state, trainer WALs, checkpoints, the "
        "`freshet up` state file and the default quarantine file; null uses dir, which must then be a local path",
    )
    segment_events: int = Field(
        100_000, ge=1, description="events per log segment file (events); a URI log writes one object per append instead"
    )
    fsync: bool = Field(
        True, description="fsync each append before acknowledging it (local and file:// logs; an object store's PUT is durable)"
    )

    @staticmethod
    def _known_schemes() -> tuple[str, ...]:
        # The schemes pyarrow.fs.FileSystem.from_uri resolves. Only the syntax is checked at
        # load time: resolving a URI may contact the store, which config loading must not do.
        return ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")

    @staticmethod
    def _uri_scheme(value: str) -> str | None:
        """The lower-case scheme when ``value`` is written as a URI, else None (a local path)."""
        import re

        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", value)
        if m is None:
            return None
        scheme = m.group(1).lower()
        # "run:3/x" is a legal local path; "file:/x" and "foo://x" are meant as URIs.
        if scheme in IngestConfig._known_schemes() or value[m.end():].startswith("//"):
            return scheme
        return None

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, value: str) -> str:
        scheme = cls._uri_scheme(value)
        if scheme is None:
            return value
        if scheme not in cls._known_schemes():
            raise ValueError(
                f"ingest.dir {value!r}: unknown URI scheme {scheme!r}; pyarrow.fs understands "
                f"{', '.join(s + '://' for s in cls._known_schemes())}"
            )
        rest = value[len(scheme) + 1:]
        if not rest.startswith("//"):
            raise ValueError(f"ingest.dir {value!r}: a URI must be written {scheme}://...")
        rest = rest[2:]
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError(f"ingest.dir {value!r}: a file URI needs an absolute path with no host, e.g. file:///data/freshet")
        if not rest.strip("/"):
            raise ValueError(f"ingest.dir {value!r}: nothing after {scheme}:// (expected a bucket, host or path)")
        return value

    @model_validator(mode="after")
    def _check_state_dir(self) -> "IngestConfig":
        if self.state_dir is not None and self._uri_scheme(self.state_dir) is not None:
            raise ValueError(
                f"ingest.state_dir {self.state_dir!r} must be a local directory (or shared storage mounted at the "
                f"same path on every node), not a URI"
            )
        if self.state_dir is None and self.dir_is_uri():
            raise ValueError(
                f"ingest.state_dir is required when ingest.dir is a URI ({self.dir!r}): shard state, trainer WALs "
                f"and checkpoints need a local (or shared-mounted) directory"
            )
        return self

    def dir_is_uri(self) -> bool:
        """True when ``dir`` is a pyarrow.fs URI rather than a local path."""
        return self._uri_scheme(self.dir) is not None

    def local_state_dir(self) -> Path:
        """The local directory for shard state, trainer WALs, checkpoints, ``freshet up``'s
        state file and the default quarantine file: ``state_dir``, or ``dir`` when unset."""
        return Path(self.state_dir if self.state_dir is not None else self.dir)


class ServingConfig(_Model):
    """The Ray Serve ranking application."""

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    route_prefix: str = Field("/", description="HTTP route prefix of the app")
    num_replicas: int = Field(1, ge=1, le=1024, description="ranking replicas")
    replica_num_cpus: float = Field(0.25, ge=0, le=64, description="CPUs reserved per replica")
    cache_refresh_ms: float = Field(200.0, ge=0, le=600_000, description="max age of the replica's item matrix (ms)")
    request_timeout_s: float = Field(5.0, gt=0, le=600, description="PS call budget per request before 503 (seconds)")
    max_events_per_request: int = Field(10_000, ge=1, description="largest accepted /events batch (events); 413 above")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest accepted request body (bytes); 413 above")
    max_k: int = Field(1000, ge=1, le=100_000, description="largest k for /rank (items)")
    auth_token: str | None = Field(None, description="bearer token required by write endpoints; null disables")


class FreshetConfig(_Model):
    """The whole deployment: one file configures PS, trainers, stream, ingest and serving."""

    namespace: str = Field("freshet", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Ray namespace of named actors")
    ps: PSConfig = Field(default_factory=PSConfig, description="parameter server")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="trainers")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="interaction stream")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="durable ingest log")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="ranking service")

    @model_validator(mode="after")
    def _check(self) -> "FreshetConfig":
        m = self.model
        for field in ("user_table", "item_table", "item_bias_table", "popularity_table"):
            name = getattr(m, field)
            if name not in self.ps.tables:
                raise ValueError(f"model.{field}={name!r} is not in ps.tables {sorted(self.ps.tables)}")
        u, i = self.ps.tables[m.user_table].dim, self.ps.tables[m.item_table].dim
        if u != i:
            raise ValueError(
                f"user and item tables must have equal dim: ps.tables.{m.user_table}.dim={u}, "
                f"ps.tables.{m.item_table}.dim={i}"
            )
        for field in ("item_bias_table", "popularity_table"):
            dim = self.ps.tables[getattr(m, field)].dim
            if dim != 1:
                raise ValueError(f"ps.tables.{getattr(m, field)}.dim (model.{field}) must be 1, got {dim}")
        if m.context_table is not None:
            t = self.ps.tables.get(m.context_table)
            if t is None:
                raise ValueError(f"model.context_table={m.context_table!r} is not in ps.tables {sorted(self.ps.tables)}")
            if t.dim != i:
                raise ValueError(
                    f"ps.tables.{m.context_table}.dim (model.context_table) must equal the item dim {i}, got {t.dim}"
                )
        if m.recent_table is not None:
            t = self.ps.tables.get(m.recent_table)
            if t is None:
                raise ValueError(f"model.recent_table={m.recent_table!r} is not in ps.tables {sorted(self.ps.tables)}")
            kind = self.ps.optimizer_for(m.recent_table).kind
            if t.dim != 2 or kind != OptimizerKind.DECAYED_COUNT:
                raise ValueError(
                    f"ps.tables.{m.recent_table} (model.recent_table) must have dim 2 and optimizer kind "
                    f"'decayed_count', got dim {t.dim} and kind {kind.value!r}"
                )
        return self

    def to_yaml(self) -> str:
        """The effective config as YAML (enums as their string values)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file that cannot be loaded: message names the field path and reason."""


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid Freshet config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FreshetConfig:
    """Load a config from a YAML file (or defaults when ``path`` is None).

    ``overrides`` is a nested dict merged over the file's contents. Raises
    :class:`ConfigError` naming the field path and reason on any problem.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {source}: {e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {source} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {source}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = _merge(data, overrides)
    try:
        return FreshetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
