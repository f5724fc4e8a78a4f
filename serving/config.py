"""Serving settings and the root :class:`FreshetConfig`, which composes every layer's
settings into one YAML file, with :func:`load_config`.

Unknown keys and bad values fail at load time with the field path and the offending
value (:class:`ps.config.ConfigError`), rather than deep inside a running actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, ValidationError, model_validator

from ps.config import ConfigError, ConfigModel, OptimizerKind, PSConfig, format_validation_error, merge, read_yaml
from workers.config import IngestConfig, ModelConfig, StreamConfig, TrainerConfig

__all__ = ["ConfigError", "FreshetConfig", "ServingConfig", "load_config"]


class ServingConfig(ConfigModel):
    """The Ray Serve ranking application."""

    _section: ClassVar[str] = "serving"
    _renamed: ClassVar[dict[str, tuple[str, float]]] = {"cache_refresh_ms": ("cache_refresh_s", 0.001)}

    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    route_prefix: str = Field("/", description="HTTP route prefix of the app")
    num_replicas: int = Field(1, ge=1, le=1024, description="ranking replicas")
    replica_num_cpus: float = Field(0.25, ge=0, le=64, description="CPUs reserved per replica")
    cache_refresh_s: float = Field(0.2, ge=0, le=600, description="max age of the replica's item mirror (seconds)")
    request_timeout_s: float = Field(5.0, gt=0, le=600, description="PS call budget per request before 503 (seconds)")
    max_events_per_request: int = Field(10_000, ge=1, description="largest accepted /events batch (events); 413 above")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest accepted request body (bytes); 413 above")
    max_k: int = Field(1000, ge=1, le=100_000, description="largest k for /rank (items)")
    auth_token: str | None = Field(None, description="bearer token required by write endpoints; null disables")



class FreshetConfig(ConfigModel):
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
