"""Settings of the workers layer: the model, the trainers, the stream they read and the
durable ingest log (with the deployment's local state directory).

Built on :class:`ps.config.ConfigModel` (unknown keys are errors; every field says its unit).
The root :class:`serving.config.FreshetConfig` composes these with the PS and serving settings.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ps.config import ConfigModel, check_ray_quantity

__all__ = [
    "RATING",
    "BelowThreshold",
    "IngestConfig",
    "LossKind",
    "ModelConfig",
    "NegativeFeedback",
    "RatingRule",
    "RetentionConfig",
    "StreamConfig",
    "StrategyKind",
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


class NegativeFeedback(str, enum.Enum):
    """What an event with weight < 0 (a dislike; with ``ratings.below: negative``, a low rating) does to the
    model. A weight of exactly 0 teaches nothing."""

    IGNORE = "ignore"  # nothing: never a positive, never counted as popular
    EXPLICIT = "explicit"  # also a negative for that user: its score is pushed down


class BelowThreshold(str, enum.Enum):
    """What a rating below ``ratings.positive_at`` is."""

    NEGATIVE = "negative"  # negative feedback (see NegativeFeedback)
    IGNORE = "ignore"  # not trained at all


class StrategyKind(str, enum.Enum):
    """An update strategy ``freshet eval`` compares (:mod:`workers.eval.strategies`), in report order.

    Here rather than beside the strategies so the command line can list them without
    importing torch.
    """

    INCREMENTAL = "incremental"  # the real PS and trainer, learning every chunk
    POPULARITY = "popularity"
    FROZEN = "frozen"
    RETRAIN = "retrain"
    FINETUNE = "finetune"
    ALS = "als"


RATING = "rating"
"""The event type whose weight is a rating (:class:`RatingRule` decides what it teaches)."""


class RatingRule(ConfigModel):
    """How an event of type ``rating`` (its weight is the rating) becomes a training signal.

    A rating at or above ``positive_at`` is a positive with confidence ``rating / scale``;
    a lower one is negative feedback with confidence ``(positive_at - rating) / scale``,
    or nothing (``below``).
    """

    # Ratings >= 4 of 5 as positives: the implicit view MovieLens work uses (BENCHMARKS.md).
    positive_at: float = Field(4.0, allow_inf_nan=False, description="lowest rating that counts as a positive (rating units)")
    scale: float = Field(
        5.0, gt=0,
        description="rating that means full confidence, and the largest rating accepted in size (rating units)",
    )
    below: BelowThreshold = Field(BelowThreshold.IGNORE, description="what a rating below positive_at is")

    @model_validator(mode="after")
    def _check(self) -> "RatingRule":
        # A rating beyond scale is refused, so none could ever reach positive_at.
        if self.positive_at > self.scale:
            raise ValueError(f"positive_at={self.positive_at:g} is above scale={self.scale:g}, the largest rating "
                             "accepted: no rating could be a positive")
        return self


def _rating_beyond_scale(rating: float, scale: float) -> bool:
    # numpy here, not at module level: loading a config (every CLI command) needs no numpy.
    import numpy as np

    return bool(abs(np.float32(rating)) > np.float32(scale))


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
    l2: float = Field(
        1e-4, ge=0, le=10,
        description="L2 penalty per trained event on the squared norms of its query (user row + mean context row), its "
        "item row and, with BPR, the mean of its negatives'; dislikes get none (per unit squared norm)",
    )
    recent_table: str | None = Field(
        "item_recent", description="decayed_count table of recent item popularity (dim 3, or 2); null disables the prior"
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
    # What an event's weight means (README "How it works", "What an event teaches"): a positive's
    # confidence scales its loss and its popularity count; weight < 0 is negative feedback, 0 teaches nothing.
    event_weights: dict[str, float] = Field(
        default_factory=dict,
        description="confidence multiplier per event_type (e.g. view: 0.2, purchase: 1.0); types not listed count 1.0",
    )
    ratings: RatingRule = Field(default_factory=RatingRule, description="how events of type 'rating' become signals")
    negative_feedback: NegativeFeedback = Field(
        NegativeFeedback.EXPLICIT, description="what an event with weight < 0 (a dislike) does; a weight of 0 teaches nothing"
    )
    # A confidence of 1e20 would overflow float32 gradients: events beyond this are refused at
    # the door (422) and quarantined in files.
    max_abs_weight: float = Field(1000.0, gt=0, le=1e6, description="largest |weight| accepted (weight units)")
    rating_range: tuple[float, float] | None = Field(
        None, description="with loss mse: the [min, max] a weight (rating) must lie in, else 422; null: any finite weight"
    )

    @field_validator("event_weights")
    @classmethod
    def _finite_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (0 < v <= 1000)}
        if bad:
            raise ValueError(f"event_weights must be in (0, 1000]: {bad}")
        return value

    @model_validator(mode="after")
    def _check_range(self) -> "ModelConfig":
        if self.rating_range is not None and not self.rating_range[0] < self.rating_range[1]:
            raise ValueError(f"rating_range {self.rating_range}: min must be below max")
        return self

    def weight_problem(self, weight: float, event_type: str | None = None) -> str | None:
        """Why ``weight`` (of an event of ``event_type``) cannot be trained by this model
        (``"weight: ..."``), or None."""
        if abs(weight) > self.max_abs_weight:
            return f"weight: |{weight}| exceeds model.max_abs_weight={self.max_abs_weight:g}"
        # A rating past the full-confidence one is a unit mistake (a 1-100 scale on a 5-star
        # model), and one such event would count as many full-confidence ones.
        # In float32, as the log stores the rating and as the trainers judge it: a rating equal to
        # a scale of 4.3 passes both, and one a float32 step above it fails both.
        if event_type == RATING and self.loss != LossKind.MSE and _rating_beyond_scale(weight, self.ratings.scale):
            return (f"weight: rating {weight} is beyond model.ratings.scale={self.ratings.scale:g} "
                    "(the full-confidence rating; a rating's size may not exceed it)")
        if self.loss == LossKind.MSE and self.rating_range is not None:
            lo, hi = self.rating_range
            if not lo <= weight <= hi:
                return f"weight: rating {weight} is outside model.rating_range [{lo:g}, {hi:g}]"
        return None

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
    prefetch: bool = Field(
        True, description="read the next batch and send its pull while the shards apply the current batch's push"
    )
    # 0 keeps one trainer's learning sequential: a batch's rows reflect every earlier push of
    # this trainer, so the in-process twin and the PS agree to the bit. 1 is the parameter
    # server's bounded delay (Li et al., "Scaling Distributed Machine Learning with the
    # Parameter Server", OSDI 2014, section 4): the next batch is pulled before this batch's
    # push, so the shards apply the push while the trainer computes (BENCHMARKS.md, section 7).
    staleness: int = Field(
        0, ge=0, le=1,
        description="pushes of this trainer a batch's pull may miss: 0 (exact) or 1 (the previous batch's; "
                    "the next batch is then read ahead whatever prefetch says)",
    )
    num_cpus: float = Field(0.5, ge=0, le=64, description="CPUs reserved per trainer actor")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs reserved per trainer actor")
    # One thread: a trainer's batches are small (256 x 64) and it shares the host with shards and
    # replicas; more only pays with a core of its own (reserve it in num_cpus).
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per trainer (threads)")
    # A caught-up trainer waits on the ingest log, which answers the moment an append is
    # durable: this bounds only how long an idle trainer goes without checking for stop and
    # lifecycle work, and how often it calls the log while idle (a read and a wait each time).
    poll_interval_s: float = Field(0.25, gt=0, le=60,
                                   description="longest wait for new events of an exhausted live stream, before looking again (seconds)")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead trainer actor; -1 is unlimited")
    # A batch takes ~0.1 s here; 30 s without progress while events wait is a stuck trainer.
    stall_s: float = Field(
        30.0, gt=0, description="/healthz reports a trainer stalled when events wait and its offset has not moved for this long (seconds)"
    )
    # Transient failures (a shard restarting) are retried; a failure that outlasts this many
    # retries restarts the actor, which resumes from its committed offset.
    max_retries: int = Field(
        8, ge=0, le=1000, description="retries of a failing batch after its first try, before the actor restarts itself"
    )
    retry_backoff_s: float = Field(0.5, gt=0, le=60, description="first wait between tries, doubling up to 30 s (seconds)")
    # Restart cost: replaying the stream since the last trainer snapshot; 500 batches of 256
    # events is ~10 s of replay here.
    snapshot_every_batches: int = Field(
        500, ge=1, description="persist the negative catalogue and users' histories every this many batches (batches)"
    )
    lifecycle_sync_s: float = Field(
        1.0, gt=0, description="how often a trainer learns which items were evicted or expired (seconds)"
    )
    # TTLs are hours to months: a minute late is nothing, and an idle service's shards then
    # scan their tables once a minute, not once a second.
    idle_expire_s: float = Field(
        60.0, gt=0, description="while no events arrive, how often trainer 0 has the shards run their TTL expiry "
        "(pushes run it at most once a second) (seconds)"
    )
    wal_fsync: bool = Field(False, description="fsync the trainer's write-ahead log per push (survives machine crashes)")

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _reservable(cls, value: float, info: ValidationInfo) -> float:
        return check_ray_quantity(f"trainer.{info.field_name}", value)


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


def expand_home(path: str | None) -> str | None:
    """``path`` with a leading ``~`` or ``~user`` replaced by that user's home directory, as a
    shell would; anything else unchanged (None too).

    A config file is not read by a shell: without this, ``ingest.dir: ~/freshet`` would be a
    directory literally named ``~`` under each process's working directory. It is expanded
    once, where the config is loaded, so every node is given the same absolute path.
    """
    return None if path is None else os.path.expanduser(path)


class StreamConfig(ConfigModel):
    """The interaction stream trainers consume."""

    kind: StreamKind = Field(StreamKind.SYNTHETIC, description="source type")
    path: str | None = Field(None, description="file or directory for movielens/parquet sources")
    num_events: int | None = Field(60_000, ge=1, description="stop after this many events (events); null for all")
    min_weight: float | None = Field(
        None, description="drop events with weight below this (implicit view of ratings); null keeps all"
    )
    quarantine_path: str | None = Field(None, description="Arrow file for rejected rows; null puts it under the local state dir (ingest.state_dir, else ingest.dir)")
    # A file that is mostly rejected is being read wrongly or is the wrong file: loading it
    # fails loudly instead of training on the scraps. 1.0 accepts any share (a file with no
    # valid rows still fails).
    max_quarantined_fraction: float = Field(
        0.5, ge=0, le=1, description="a movielens/parquet file with more of its rows quarantined fails to load (fraction)"
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="synthetic generator settings")

    @field_validator("path", "quarantine_path")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        return expand_home(value)

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        if self.kind in (StreamKind.MOVIELENS, StreamKind.PARQUET) and not self.path:
            raise ValueError(f"stream.path is required for kind={self.kind.value!r}")
        return self


class RetentionConfig(ConfigModel):
    """How much *consumed* ingest history to keep, per partition.

    Only whole closed segments are deleted, and only those whose every offset is below what
    every registered consumer has committed and every pin still needs (``IngestLog.commit`` /
    ``IngestLog.pin``); a partition with no consumer and no pin is never trimmed. Of the
    consumed segments, the newest ``keep_bytes`` and those younger than ``keep_age_s`` (or than
    ``ingest.dedup_max_age_s``, so the dedup window survives a restart) stay; a segment goes
    once it is beyond both.
    """

    # 1 GiB of consumed history per partition replays a few million events for debugging or a
    # new consumer, and is small next to the disks such a service runs on.
    keep_bytes: int | None = Field(
        1 << 30, ge=0, description="newest consumed history kept per partition (bytes); null keeps all of it"
    )
    # A week covers a weekend's incident plus the time to notice it.
    keep_age_s: float | None = Field(
        7 * 86_400.0, ge=0, description="consumed history younger than this is kept (seconds); null keeps all of it"
    )


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
        True,
        description="fsync appends before acknowledging them, concurrent appends sharing one fsync (local and "
        "file:// logs; an object store's PUT is durable)",
    )
    partitions: int = Field(
        1,
        ge=1,
        le=1024,
        description="partition logs in the one ingest actor; an event goes to partition user_key % partitions, "
        "offsets are dense per partition; fixed for a log's lifetime (a log refuses to start with another count)",
    )
    # Producers retry within seconds to minutes; a day also covers a producer replaying after an
    # outage. 100,000 entries (an idempotency key or an event_id each) cost about 15-20 MB per
    # partition and cover a retry under about 1,000 keyed requests or event IDs per second for
    # the ~100 s a client's retries take; whichever bound is hit first evicts the oldest.
    dedup_max_keys: int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description="idempotency keys and event_ids remembered per partition for deduplication (entries); "
        "the oldest are forgotten first",
    )
    dedup_max_age_s: float = Field(
        86_400.0,
        gt=0,
        description="an idempotency key or event_id older than this is forgotten (seconds); the window is "
        "rebuilt from the segments on restart, so retention keeps segments this young",
    )
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="how much consumed history to keep (see RetentionConfig)"
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

    @staticmethod
    def _check_filled(field: str, value: str) -> None:
        # A template's "<bucket>" left as it is would be a valid path or object key: the
        # deployment would run, on storage nobody meant (a local dir named "<bucket>").
        if (m := re.search(r"<[^<>]*>", value)) is not None:
            raise ValueError(f"{field} {value!r}: the placeholder {m.group(0)} is not filled in; "
                             "replace it with your storage's location")

    @field_validator("dir")
    @classmethod
    def _check_dir(cls, value: str) -> str:
        cls._check_filled("ingest.dir", value)
        scheme = cls._uri_scheme(value)
        if scheme is None:
            return expand_home(value)
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

    @field_validator("state_dir")
    @classmethod
    def _expand_state_dir(cls, value: str | None) -> str | None:
        return expand_home(value)

    @model_validator(mode="after")
    def _check_state_dir(self) -> "IngestConfig":
        if self.state_dir is not None:
            self._check_filled("ingest.state_dir", self.state_dir)
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
