"""``freshet eval``: the prequential comparison of update strategies (:mod:`workers.eval`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.config import load_config
from workers.eval.compare import run_eval
from workers.eval.strategies import STRATEGIES

__all__ = ["add_parser", "cmd_eval"]

DEFAULT_STRATEGIES = ",".join(STRATEGIES)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet eval``."""
    parser = sub.add_parser("eval", help="prequential comparison of update strategies; writes a report")
    parser.add_argument("--config", help="Freshet YAML config (default: built-in defaults)")
    parser.add_argument("--data", required=True, help="'synthetic' or a MovieLens ratings.csv/u.data or Parquet path")
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES,
        help="comma-separated specs NAME[:key=value;...], e.g. 'incremental,popularity,retrain:every=1000' "
        f"(known: {DEFAULT_STRATEGIES}; settings inside one spec are separated by ';')",
    )
    parser.add_argument("--report", required=True, help="directory for report.md, report.json and the PNG plots")
    parser.add_argument("--chunk-size", type=int, default=20, help="events ranked then learned at a time (default 20)")
    parser.add_argument("--min-weight", default="auto", help="drop ratings below this; 'auto' = 4 for file data with BPR, 'none' keeps all")
    parser.add_argument("--events", type=int, help="stop after N events")
    parser.add_argument("--window", type=int, default=2000, help="window of the windowed recall plot (events)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(fn=cmd_eval)


def _split_specs(text: str) -> list[str]:
    # ',' separates strategies; inside a spec ';' separates settings (',' in parse_strategy_spec).
    return [s.strip().replace(";", ",") for s in text.split(",") if s.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    """``freshet eval``: run the comparison and print the report table; returns the exit status."""
    try:
        mw = args.min_weight
        min_weight: float | None | str = "auto" if mw == "auto" else None if str(mw).lower() == "none" else float(mw)
    except ValueError:
        print(f"--min-weight: must be a number, 'auto' or 'none', got {args.min_weight!r}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        report = run_eval(
            cfg, data=args.data, strategies=_split_specs(args.strategies), report_dir=args.report,
            chunk_size=args.chunk_size, min_weight=min_weight, max_events=args.events, window=args.window,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"freshet eval: {e}", file=sys.stderr)
        return 2
    md = (Path(args.report) / "report.md").read_text(encoding="utf-8")
    print(md.split("\n## Settings")[0])
    return 0 if report["strategies"] else 1
