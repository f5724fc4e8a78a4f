"""Serving settings and the root :class:`FreshetConfig`, which composes every layer's
settings into one YAML file, with :func:`load_config`.

Unknown keys and bad values fail at load time with the field path and the offending
value (:class:`ps.config.ConfigError`), rather than deep inside a running actor.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ps.config import (
    ConfigError,
    ConfigModel,
    OptimizerKind,
    PSConfig,
    check_ray_quantity,
    format_validation_error,
    merge,
    read_yaml,
)
from workers.config import (
    IngestConfig,
    LossKind,
    ModelConfig,
    NegativeFeedback,
    RatingRule,
    StreamConfig,
    StreamKind,
    TrainerConfig,
)

__all__ = [
    "AutoscalingConfig",
    "ConfigError",
    "FreshetConfig",
    "RayAuth",
    "RayConfig",
    "ServingConfig",
    "is_loopback_host",
    "load_config",
]

READ_PATHS = frozenset({"/rank", "/score", "/stats", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Endpoints that also need ``serving.auth_token`` when the app listens beyond loopback: the
answers, the service's counters and its API description. ``/healthz`` stays open for probes."""
WRITE_PATHS = frozenset({"/events"})
"""Endpoints that always need ``serving.auth_token`` when one is set."""


def is_loopback_host(host: str) -> bool:
    """True when only this machine can reach ``host``: ``localhost``, 127.0.0.0/8 or ``::1``.

    Anything else, including ``0.0.0.0``, ``::``, ``""`` and any other name, is not loopback.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class AutoscalingConfig(ConfigModel):
    """Serve autoscaling bounds for the ranking replicas (instead of a fixed ``num_replicas``)."""

    _section: ClassVar[str] = "serving.autoscaling"

    min_replicas: int = Field(1, ge=1, le=1024, description="fewest ranking replicas (replicas; >= 1: the app always answers)")
    max_replicas: int = Field(4, ge=1, le=1024, description="most ranking replicas (replicas)")
    target_ongoing_requests: float = Field(
        32.0, gt=0, le=100_000,
        description="in-flight requests per replica the autoscaler aims for (requests); <= serving.max_ongoing_requests",
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serving.autoscaling.min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        return self


class ServingConfig(ConfigModel):
    """The Ray Serve ranking application."""

    _section: ClassVar[str] = "serving"
    _renamed: ClassVar[dict[str, tuple[str, float]]] = {"cache_refresh_ms": ("cache_refresh_s", 0.001)}

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    route_prefix: str = Field("/", description="HTTP route prefix of the app")
    num_replicas: int | None = Field(
        1, ge=1, le=1024,
        description="fixed number of ranking replicas (replicas); null (the default when autoscaling is given) with autoscaling",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Serve autoscaling bounds instead of a fixed num_replicas (give one or the other); null: fixed"
    )
    max_ongoing_requests: int = Field(
        64, ge=1, le=100_000,
        description="requests one replica works on at once (requests); Serve's own default, 5, collapses at 32+ "
                    "concurrent clients",
    )
    max_queued_requests: int = Field(
        1024, ge=-1, le=1_000_000,
        description="requests each caller (the HTTP proxy) queues for busy replicas (requests); beyond it: 503 with "
                    "Retry-After; -1: unbounded",
    )
    high_throughput: bool = Field(
        False,
        description="Serve's high-throughput mode: HAProxy ingress straight to the replicas (one node, many clients, "
                    "cheap requests); proxy-side errors become 500, see README",
    )
    replica_num_cpus: float = Field(0.25, ge=0, le=64, description="CPUs reserved per replica")
    cache_refresh_s: float = Field(0.2, ge=0, le=600, description="max age of the replica's item mirror (seconds)")
    request_timeout_s: float = Field(5.0, gt=0, le=600, description="PS call budget per request before 503 (seconds)")
    max_events_per_request: int = Field(10_000, ge=1, description="largest accepted /events batch (events); 413 above")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest accepted request body (bytes); 413 above")
    max_k: int = Field(1000, ge=1, le=100_000, description="largest k for /rank (items)")
    auth_token: str | None = Field(
        None,
        description="bearer token required by POST /events, and by everything but /healthz (/rank, /score, /stats, "
                    "the API docs) when host is not loopback; null: none",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="allow a non-loopback host without auth_token (anyone who reaches it can rank and post events); "
                    "warns loudly",
    )

    @model_validator(mode="before")
    @classmethod
    def _autoscaling_replaces_num_replicas(cls, data: Any) -> Any:
        # num_replicas defaults to 1; with autoscaling it defaults to null, so a config that gives
        # only autoscaling (or the YAML `freshet config` prints for it) loads.
        if isinstance(data, dict) and data.get("autoscaling") is not None and "num_replicas" not in data:
            data = {**data, "num_replicas": None}
        return data

    @field_validator("route_prefix")
    @classmethod
    def _serve_route_prefix(cls, v: str) -> str:
        # Serve's own rules (ray.serve._private.utils.validate_route_prefix), which it applies
        # only when `freshet up` deploys the app, after the PS and trainers have started. Restated
        # rather than imported: importing Serve would cost every CLI command seconds at config load.
        if not v.startswith("/"):
            raise ValueError(f"serving.route_prefix {v!r} must start with '/'")
        if v != "/" and v.endswith("/"):
            raise ValueError(f"serving.route_prefix {v!r} must not end with '/' (except the root '/')")
        if "{" in v or "}" in v:
            raise ValueError(f"serving.route_prefix {v!r} may not contain '{{' or '}}'")
        return v

    @field_validator("replica_num_cpus")
    @classmethod
    def _reservable(cls, v: float) -> float:
        return check_ray_quantity("serving.replica_num_cpus", v)

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("serving.auth_token must not be empty or blank; use null for no token")
        return v

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError(
                f"give serving.num_replicas ({self.num_replicas}) or serving.autoscaling, not both "
                "(leave num_replicas out or set it to null when autoscaling)"
            )
        if self.autoscaling is None and self.num_replicas is None:
            raise ValueError("serving.num_replicas is null but serving.autoscaling is not given; set one of them")
        if self.autoscaling is not None and self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"serving.autoscaling.target_ongoing_requests={self.autoscaling.target_ongoing_requests:g} exceeds "
                f"serving.max_ongoing_requests={self.max_ongoing_requests}: replicas could never reach the target"
            )
        if not self.is_loopback and self.auth_token is None and not self.allow_unauthenticated:
            raise ValueError(
                f"serving.host={self.host!r} is not a loopback address and serving.auth_token is not set: anyone who "
                "can reach this host could rank, score and post events. Set serving.auth_token (then required on "
                "everything but /healthz), or set serving.allow_unauthenticated: true to serve without "
                "authentication anyway"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        """Whether the app listens on a loopback address only (see :func:`is_loopback_host`)."""
        return is_loopback_host(self.host)

    def token_paths(self) -> frozenset[str]:
        """Endpoints that require ``auth_token`` (empty without a token): ``/events``; plus ``/rank``,
        ``/score``, ``/stats`` and the API docs when :attr:`host` is not loopback."""
        if self.auth_token is None:
            return frozenset()
        return WRITE_PATHS if self.is_loopback else WRITE_PATHS | READ_PATHS

    @property
    def exposed_without_auth(self) -> bool:
        """True when the app listens beyond loopback with no token (``allow_unauthenticated``)."""
        return not self.is_loopback and self.auth_token is None


class RayAuth(str, enum.Enum):
    """Ray's own authentication for the head ``freshet up`` starts."""

    TOKEN = "token"
    DISABLED = "disabled"


class RayConfig(ConfigModel):
    """The Ray clusters Freshet starts: the head ``freshet up`` starts
    (``serving.ray_head.start_head``), and, for ``max_inline_bytes`` only, the throwaway local
    clusters of ``freshet run`` and ``freshet eval``. Not used when joining a cluster
    (``--address``): that cluster's own settings apply."""

    _section: ClassVar[str] = "ray"

    auth: RayAuth = Field(
        RayAuth.TOKEN,
        description="token: Ray token authentication with a fresh 256-bit token (file mode 0600); disabled: none, "
                    "any local user can run code in the cluster (prints a warning)",
    )
    token_path: str | None = Field(
        None, description="token file to use, created 0600 if missing; refused when it is a link, another user's or "
                          "readable by other users; null: a new token per head in its temp dir"
    )
    ports: dict[str, int] = Field(
        default_factory=dict,
        description="fixed ports by name (gcs, node_manager, object_manager, min_worker/max_worker, ... as in "
                    "serving.ray_head.PORT_FLAGS/PORT_ENV, and haproxy_stats, haproxy_metrics, fallback_http, "
                    "fallback_grpc, direct_http_min/max, direct_grpc_min/max for serving.high_throughput); "
                    "unset: free ports from 20000-29999, never serving.port",
    )
    num_cpus: int | None = Field(None, ge=1, le=4096, description="CPUs the head advertises (CPUs); null: Ray counts them")
    include_dashboard: bool = Field(False, description="start Ray's dashboard on 127.0.0.1 (ports.dashboard or a free port)")
    worker_ports: int = Field(
        200, ge=16, le=10_000,
        description="consecutive ports for worker processes, one per live worker or actor (ports); used when ports "
                    "gives no min_worker/max_worker",
    )
    start_timeout_s: float = Field(90.0, gt=0, le=3600, description="how long the head may take to come up (seconds)")
    # Measured here (`python -m bench.call_cost`, BENCHMARKS.md section 2): a call whose argument
    # goes through the shared-memory object store costs 1-3 ms more CPU (all processes) than one
    # that carries it inline, up to ~0.75 MB; at 1 MB they cost the same CPU and inline is slower.
    # Against Ray's own default, 100 KB, this trains the default model ~30% faster through the PS.
    max_inline_bytes: int = Field(
        512 << 10, ge=0, le=8 << 20,  # Ray inlines at most 10 MB per call in all (task_rpc_inlined_bytes_limit)
        description="call arguments and results up to this size travel inside the call instead of through "
                    "Ray's object store (bytes; Ray's max_direct_call_object_size, set for the whole cluster)",
    )

    def system_config(self) -> dict[str, int]:
        """Ray system settings for a cluster Freshet starts (``ray start --system-config``,
        ``ray.init(_system_config=...)``): ``max_direct_call_object_size`` is
        ``max_inline_bytes``."""
        return {"max_direct_call_object_size": int(self.max_inline_bytes)}

    @field_validator("ports")
    @classmethod
    def _known_ports(cls, v: dict[str, int]) -> dict[str, int]:
        from serving.ray_head import PORT_ENV, PORT_FLAGS, SERVE_HT_PORT_ENV

        head = set(PORT_FLAGS) | set(PORT_ENV)
        serve = set(SERVE_HT_PORT_ENV) | {f"direct_{p}_{e}" for p in ("http", "grpc") for e in ("min", "max")}
        unknown = set(v) - head - serve
        if unknown:
            raise ValueError(f"unknown ports {sorted(unknown)}; known: {sorted(head | serve)}")
        for k, p in v.items():
            if not 1 <= p <= 65535 and not (p == 0 and k in head and k not in ("gcs", "ray_client_server", *PORT_ENV)):
                raise ValueError(f"ray.ports.{k}={p} is not a port (1-65535)")
        for pair in (("min_worker", "max_worker"), ("direct_http_min", "direct_http_max"),
                     ("direct_grpc_min", "direct_grpc_max")):
            if (pair[0] in v) != (pair[1] in v):
                raise ValueError(f"give both ray.ports.{pair[0]} and ray.ports.{pair[1]} or neither")
            if pair[0] in v and v[pair[0]] > v[pair[1]]:
                raise ValueError(f"ray.ports.{pair[0]}={v[pair[0]]} exceeds ray.ports.{pair[1]}={v[pair[1]]}")
        # Ray's own rules for the workers' block (ray/_private/parameter.py), which `ray start`
        # would apply only once `up` is under way.
        lo, hi = v.get("min_worker", 0), v.get("max_worker", 0)
        for k, p in (("min_worker", lo), ("max_worker", hi)):
            if p and not 1024 <= p <= 65535:
                raise ValueError(f"ray.ports.{k}={p}: Ray takes 0 (it picks) or 1024-65535")
        if hi and not lo:
            raise ValueError(f"ray.ports.min_worker=0 lets Ray pick the workers' ports: set ray.ports.max_worker "
                             f"to 0 too, not {hi}")
        if hi and hi == lo:
            raise ValueError(f"ray.ports.max_worker={hi} must exceed ray.ports.min_worker={lo}")
        return v

    def ports_in_use(self, high_throughput: bool) -> dict[str, range]:
        """The ports each entry of ``ports`` takes when a head starts (``serving.ray_head.port_spans``):
        ``dashboard`` only with :attr:`include_dashboard`, Serve's high-throughput entries only
        when ``high_throughput`` (``serving.high_throughput``)."""
        from serving.ray_head import port_spans

        used = self.head_ports()
        if not self.include_dashboard:
            used.pop("dashboard", None)
        if high_throughput:
            used.update(self.serve_ports())
        return port_spans(used)

    def head_ports(self) -> dict[str, int]:
        """The ``ports`` that ``start_head`` takes."""
        from serving.ray_head import PORT_ENV, PORT_FLAGS

        return {k: p for k, p in self.ports.items() if k in PORT_FLAGS or k in PORT_ENV}

    def serve_ports(self) -> dict[str, int]:
        """The ``ports`` of Serve's high-throughput mode (``serving.ray_head.high_throughput_env``)."""
        head = self.head_ports()
        return {k: p for k, p in self.ports.items() if k not in head}



def check_ports(ray: RayConfig, serving: ServingConfig) -> None:
    """The ports a head and the app take must all differ: no two entries of ``ray.ports`` in use
    (:meth:`RayConfig.ports_in_use`) share a port, and ``serving.port`` is none of them.
    ``freshet up`` would otherwise find out ~15 s in, when Ray or Serve cannot bind.

    Raises:
        ValueError: naming the entries and the port.
    """
    spans = ray.ports_in_use(serving.high_throughput)
    ordered = sorted((r.start, r.stop, name) for name, r in spans.items())
    for (_, end, a), (start, _, b) in zip(ordered, ordered[1:]):
        if start < end:
            raise ValueError(f"ray.ports.{a} and ray.ports.{b} share port {start}; give each its own port")
    for name, r in spans.items():
        if serving.port in r:
            where = f"is also ray.ports.{name}" if len(r) == 1 else f"is inside ray.ports.{name} ({r.start}-{r.stop - 1})"
            raise ValueError(f"serving.port {serving.port} {where}; give them different ports")


class FreshetConfig(ConfigModel):
    """The whole deployment: one file configures PS, trainers, stream, ingest and serving.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) a bad value or a check across sections
            (say ``serving.port`` equal to a Ray port, or a ``model`` table role that is not
            in ``ps.tables``); :func:`load_config` reports it as a ``ConfigError``.
    """

    namespace: str = Field("freshet", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Ray namespace of named actors")
    ps: PSConfig = Field(default_factory=PSConfig, description="parameter server")
    model: ModelConfig = Field(default_factory=ModelConfig, description="model")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="trainers")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="interaction stream")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="durable ingest log")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="ranking service")
    ray: RayConfig = Field(
        default_factory=RayConfig,
        description="the local Ray head `freshet up` starts (max_inline_bytes also the local clusters of `freshet run` "
                    "and `freshet eval`)",
    )

    @model_validator(mode="after")
    def _check(self) -> FreshetConfig:
        m = self.model
        check_ports(self.ray, self.serving)
        for field in ("user_table", "item_table", "item_bias_table", "popularity_table"):
            name = getattr(m, field)
            if name not in self.ps.tables:
                raise ValueError(f"model.{field}={name!r} is not in ps.tables {sorted(self.ps.tables)}")
        # One table, one role: two roles would push two kinds of update into the same rows (a
        # popularity count into the item biases, say) and train without a complaint.
        roles: dict[str, str] = {}
        for field in ("user_table", "item_table", "item_bias_table", "popularity_table", "recent_table", "context_table"):
            name = getattr(m, field)
            if name is not None and name in roles:
                raise ValueError(f"model.{field}={name!r} is also model.{roles[name]}: each role needs a table of its own")
            roles.setdefault(name, field)
        # A table no role uses is trained by nothing: most likely a misspelt name (ps.tables.usr
        # meant to bound the user table, which then stays unbounded). The defaults may stay unused.
        used = set(roles) | {self.ps.tables[n].follows for n in roles if n in self.ps.tables} | {self.ps.recent_follows}
        for name in sorted(set(self.ps.tables) - used - set(PSConfig().tables)):
            close = difflib.get_close_matches(name, sorted(n for n in roles if n is not None), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"ps.tables.{name}: no model role uses this table (the roles: "
                             + ", ".join(f"model.{f}={n!r}" for n, f in roles.items() if n is not None) + f"){hint}")
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
            if t.dim not in (2, 3) or kind != OptimizerKind.DECAYED_COUNT:
                raise ValueError(
                    f"ps.tables.{m.recent_table} (model.recent_table) must have dim 3 (or 2) and optimizer kind "
                    f"'decayed_count', got dim {t.dim} and kind {kind.value!r}"
                )
        # Each role's rows take one kind of update: counts add up, gradients are descended. The
        # other kind (a rowwise_adagrad popularity table, an accumulate user table) trained
        # nonsense without a complaint.
        gradient_kinds = (OptimizerKind.SGD, OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD)
        for field in ("user_table", "item_table", "item_bias_table", "context_table"):
            name = getattr(m, field)
            if name is not None and self.ps.optimizer_for(name).kind not in gradient_kinds:
                raise ValueError(
                    f"ps.tables.{name} (model.{field}) is trained by gradients: its optimizer kind must be one of "
                    f"{[k.value for k in gradient_kinds]}, got {self.ps.optimizer_for(name).kind.value!r}"
                )
        kind = self.ps.optimizer_for(m.popularity_table).kind
        if kind != OptimizerKind.ACCUMULATE:
            raise ValueError(f"ps.tables.{m.popularity_table} (model.popularity_table) counts interactions: its "
                             f"optimizer kind must be 'accumulate', got {kind.value!r}")
        self._check_loss_settings()
        # Serving builds a user's session context from the recent items the shards keep; a
        # trainer from its own history of context_items. Fewer kept, the two queries differ.
        if m.context_table is not None and self.ps.seen_per_user < m.context_items:
            raise ValueError(
                f"ps.seen_per_user={self.ps.seen_per_user} is below model.context_items={m.context_items}: serving "
                "would build shorter session contexts than the trainers do; raise ps.seen_per_user, lower "
                "model.context_items, or set model.context_table to null"
            )
        rf = self.ps.recent_follows
        if rf is not None:
            leader, users = self.ps.leader_of(rf), self.ps.leader_of(m.user_table)
            # Only matters when rows can go: a user's recent items must go with the user's row,
            # not with the row of another table's ID that happens to be equal.
            if leader != users and (self.ps.table(leader).has_lifecycle or self.ps.table(users).has_lifecycle):
                raise ValueError(
                    f"ps.recent_follows={rf!r} is not model.user_table={m.user_table!r} or a table that follows it: "
                    "users' recent items would be dropped with the wrong rows"
                )
        if self.stream.kind == StreamKind.INGEST and self.ingest.partitions < self.trainer.num_workers:
            # A partition is consumed by one trainer, whole: a trainer without one would idle.
            raise ValueError(
                f"ingest.partitions={self.ingest.partitions} is less than trainer.num_workers="
                f"{self.trainer.num_workers}: each trainer consumes whole partitions of the ingest log"
            )
        return self

    def _check_loss_settings(self) -> None:
        """Refuse settings the model's loss ignores (the trainers, ``/events`` and the file
        sources read them only for the other loss): an MSE model trains every event as a
        rating, with no negatives; a BPR model never checks ``rating_range``. Here rather than
        on :class:`ModelConfig`, whose users (the stream tests) build one of each loss freely."""
        m = self.model
        defaults = ModelConfig.model_fields
        if m.loss == LossKind.MSE:
            ignored = [(f, getattr(m, f)) for f in ("num_negatives", "popularity_negative_fraction")
                       if getattr(m, f) != defaults[f].default]
            if m.event_weights:
                ignored.append(("event_weights", m.event_weights))
            if m.ratings != RatingRule():
                ignored.append(("ratings", m.ratings.model_dump(mode="json")))
            if m.negative_feedback != NegativeFeedback.EXPLICIT:
                ignored.append(("negative_feedback", m.negative_feedback.value))
        else:
            ignored = [("rating_range", m.rating_range)] if m.rating_range is not None else []
        if ignored:
            raise ValueError(", ".join(f"model.{f}={v!r}" for f, v in ignored)
                             + f": not used with model.loss={m.loss.value!r}")

    def to_yaml(self) -> str:
        """The effective config as YAML (enums as their string values)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FreshetConfig:
    """Load a config from a YAML file (or the defaults when ``path`` is None).

    ``overrides`` is a nested dict merged over the file's contents.

    Raises:
        ConfigError: naming the field path and reason of every problem.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if overrides:
        data = merge(data, overrides)
    try:
        return FreshetConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path) if path is not None else "defaults")) from None
