"""``freshet config``: print the effective configuration."""

from __future__ import annotations

import argparse

from serving.cli._common import add_config_argument, add_data_arguments, load

__all__ = ["add_parser", "cmd_config"]


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration as YAML."""
    print(load(args).to_yaml(), end="")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet config``."""
    c = sub.add_parser("config", help="print the effective config as YAML")
    add_config_argument(c)
    add_data_arguments(c)
    c.set_defaults(fn=cmd_config)
