"""The ``freshet`` command line, one module per command group:

- ``run`` (:mod:`serving.cli.run`): the main job, the whole loop on a stream with a summary;
- ``up``, ``status``, ``down`` (:mod:`serving.cli.service`): the long-running service;
- ``ckpt save|list|restore`` (:mod:`serving.cli.ckpt`): named checkpoints;
- ``eval`` (:mod:`serving.cli.eval`): the prequential comparison of update strategies;
- ``config`` (:mod:`serving.cli.config`): the effective configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from ps.config import ConfigError
from serving.cli import ckpt, config, run, service
from serving.cli import eval as eval_command

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshet", description="Incremental recommender training on a Ray parameter server.")
    sub = p.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    service.add_parsers(sub)
    ckpt.add_parser(sub)
    eval_command.add_parser(sub)
    config.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``freshet`` console script; returns the exit status.

    A ``ConfigError``, ``ValueError`` or ``FileNotFoundError`` from the command is printed
    and returns 2. Output to a reader that has gone (``freshet status | head``) ends the
    command quietly with 1.

    Raises:
        SystemExit: bad command-line arguments, or ``--help`` (argparse exits).
    """
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"freshet {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Python's own recipe (signal module docs, "Note on SIGPIPE"): stdout goes to /dev/null
        # so that the flush at exit does not raise the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

