"""Settings of the workers layer: the model, the trainers, the stream they read and the
durable ingest log (with the deployment's local state directory).

Built on :class:`ps.config.ConfigModel` (unknown keys are errors; every field says its unit).
The root :class:`serving.config.FreshetConfig` composes these with the PS and serving settings.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ps.config import ConfigModel

__all__ = [
    "IngestConfig",
    "LossKind",
    "ModelConfig",
    "StreamConfig",
    "StreamKind",
    "SyntheticConfig",
    "TrainerConfig",
]


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


class ModelConfig(ConfigModel):
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


class TrainerConfig(ConfigModel):
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


class SyntheticConfig(ConfigModel):
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


class StreamConfig(ConfigModel):
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


class IngestConfig(ConfigModel):
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
