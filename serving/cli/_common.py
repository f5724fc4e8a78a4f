"""What every ``freshet`` command shares: loading the config with command-line overrides,
connecting to Ray, and printing a two-column table."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ps.config import merge
from serving.config import FreshetConfig, load_config
from workers.config import StreamKind

__all__ = ["add_config_argument", "add_data_arguments", "data_overrides", "load", "positive_int", "print_table",
           "ray_init"]


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1, so that ``--events 0`` is refused as the flag
    the user typed, not as the config field it becomes.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a whole number >= 1.
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``."""
    parser.add_argument("--config", help="Freshet YAML config (default: built-in defaults)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--events``: the stream to read instead of the config's."""
    parser.add_argument("--data", help="'synthetic' (default), a MovieLens ratings.csv/u.data, or Parquet file/dir")
    parser.add_argument("--events", type=positive_int, help="stop after N events")


def data_overrides(data: str | None, events: int | None) -> dict[str, Any]:
    """Config overrides selecting the stream ``--data`` names, capped at ``--events``.

    Raises:
        ValueError: an empty ``--data`` (it would be ignored, and the config's stream run).
    """
    stream: dict[str, Any] = {}
    if data is not None and not data.strip():
        raise ValueError("--data: empty; give 'synthetic', a ratings file or a directory")
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
    # A deprecated key's FutureWarning would print with the pydantic source line it was raised
    # in; a command's user needs only what to change in their file.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        cfg = load_config(args.config, overrides)
    for w in caught:
        if issubclass(w.category, FutureWarning):
            print(f"freshet: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cfg


def ray_init(address: str | None, namespace: str, *, head=None, system_config: dict | None = None,
             num_cpus: int | None = None):
    """Connect this process to Ray; nothing here turns Ray's authentication off.

    * ``head`` (a :class:`serving.ray_head.HeadInfo`, e.g. from ``freshet up``'s state file):
      its client environment (token file, loopback switch, the head's extra settings) is applied
      first, then ``ray.init(address=head.address)``.
    * ``address`` (``--address``): join that cluster with its own settings; the token, if the
      cluster uses one, comes from the operator's environment (``RAY_AUTH_MODE``,
      ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``).
    * Neither: start a throwaway local cluster (``freshet run``) whose listeners stay on
      loopback, with token auth and a fresh private token
      (:func:`serving.ray_head.local_cluster_env`), unless ``RAY_AUTH_MODE`` is set explicitly,
      and Ray's ``system_config`` (:meth:`serving.config.RayConfig.system_config`); ``num_cpus``
      CPUs (default: every core).

    Raises:
        RuntimeError: this process is already connected (with ``head``), or Ray fails to start
            or connect.
    """
    from serving import ray_head

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if head is not None:
        ray_head.apply_client_env(head)
        address = head.address
    elif not address:
        import atexit
        import shutil
        import tempfile

        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        if "RAY_AUTH_MODE" not in os.environ:
            token_dir = tempfile.mkdtemp(prefix="freshet-ray-")
            env = ray_head.local_cluster_env(token_dir)
            # The cluster lives as long as this process: so does its token (a dir was left per run).
            atexit.register(shutil.rmtree, token_dir, True)
        elif os.environ["RAY_AUTH_MODE"].strip().lower() == "disabled":
            # Inherited from the shell, not chosen in a config: say so, as `ray.auth: disabled` does.
            print("freshet: WARNING: RAY_AUTH_MODE=disabled in the environment: this run's Ray cluster has no "
                  "token authentication, so any local user can connect to it and run code as you while it runs",
                  file=sys.stderr, flush=True)
        ray_head.apply_env(env)
    import ray

    if address:
        return ray.init(address=address, namespace=namespace, log_to_driver=False)
    # "local": a new cluster even when RAY_ADDRESS is set or `ray start` left a current-cluster
    # file; Ray would otherwise join that cluster (someone else's, perhaps).
    return ray.init(address="local", namespace=namespace, include_dashboard=False, _node_ip_address="127.0.0.1",
                    log_to_driver=False, _system_config=system_config, num_cpus=num_cpus)


def print_table(rows: list[tuple[str, str]]) -> None:
    """Print ``(name, value)`` rows aligned, between two rules."""
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(line)
