"""What every ``freshet`` command shares: loading the config with command-line overrides,
connecting to Ray, and printing a two-column table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ps.config import merge
from serving.config import FreshetConfig, load_config
from workers.config import StreamKind

__all__ = ["add_config_argument", "add_data_arguments", "data_overrides", "load", "print_table", "ray_init"]


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``."""
    parser.add_argument("--config", help="Freshet YAML config (default: built-in defaults)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--events``: the stream to read instead of the config's."""
    parser.add_argument("--data", help="'synthetic' (default), a MovieLens ratings.csv/u.data, or Parquet file/dir")
    parser.add_argument("--events", type=int, help="stop after N events")


def data_overrides(data: str | None, events: int | None) -> dict[str, Any]:
    """Config overrides selecting the stream ``--data`` names, capped at ``--events``."""
    stream: dict[str, Any] = {}
    if data:
        p = Path(data)
        if data == "synthetic":
            stream["kind"] = StreamKind.SYNTHETIC.value
        elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
            stream.update(kind=StreamKind.PARQUET.value, path=str(p))
        else:
            stream.update(kind=StreamKind.MOVIELENS.value, path=str(p))
            stream.setdefault("num_events", None)
    if events is not None:
        stream["num_events"] = events
    return {"stream": stream} if stream else {}


def load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> FreshetConfig:
    """The config of ``--config``, with ``--data``/``--events`` and ``extra`` merged over it.

    Raises:
        ps.config.ConfigError: naming the field and the reason.
    """
    overrides = data_overrides(getattr(args, "data", None), getattr(args, "events", None))
    if extra:
        overrides = merge(overrides, extra)
    return load_config(args.config, overrides)


def ray_init(address: str | None, namespace: str):
    """Connect to Ray at ``address``, or start a local one on 127.0.0.1 when None."""
    import ray

    # Local-first defaults; an operator's explicit environment wins.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        return ray.init(address=address, namespace=namespace, log_to_driver=False)
    return ray.init(namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


def print_table(rows: list[tuple[str, str]]) -> None:
    """Print ``(name, value)`` rows aligned, between two rules."""
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(line)
