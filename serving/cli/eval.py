"""``freshet eval``: the prequential comparison of update strategies (:mod:`workers.eval`), and
with ``--live --rate R`` the same protocol through a running service over HTTP
(:mod:`serving.live_eval`) beside the offline one."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from serving.cli._common import positive_int, ray_init
from serving.config import load_config
from workers.config import StrategyKind

__all__ = ["add_parser", "cmd_eval"]

DEFAULT_STRATEGIES = ",".join(k.value for k in StrategyKind)


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
    parser.add_argument("--chunk-size", type=positive_int, default=20, help="events ranked then learned at a time (default 20)")
    parser.add_argument("--min-weight", default="auto", help="drop events whose weight is below this; 'auto' = 4 for a MovieLens ratings file with BPR "
                             "(a Parquet file is kept whole: give a number for one of ratings), 'none' keeps all")
    parser.add_argument("--events", type=positive_int, help="stop after N events")
    parser.add_argument("--window", type=positive_int, default=2000, help="window of the windowed recall plot (events)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    live = parser.add_argument_group(
        "live evaluation", "--live replays the stream through a service over HTTP at --rate events/s: for each chunk, "
        "one POST /rank (k=20, exclude_seen) per distinct user seen in an earlier chunk, then POST /events with the "
        "chunk; then the offline protocol (incremental, popularity) on the same events. Writes live.json, live.md, live.png.")
    live.add_argument("--live", action="store_true",
                      help="evaluate a service over HTTP (see above): by default a fresh one started from --config "
                           "and removed afterwards; with --url, the running one there")
    live.add_argument("--rate", type=float, help="with --live: events per second to replay at (required; finite, > 0)")
    live.add_argument("--url", help="with --live: base URL of a running service (default: start a fresh one from --config)")
    live.add_argument("--token", help="with --url (refused without it): the service's serving.auth_token (default: "
                                      "$FRESHET_TOKEN, else the config's)")
    live.add_argument("--offline-report", metavar="PATH",
                      help="with --live: reuse the offline side of an earlier --live run instead of running it again: "
                           "<report>/offline.json of a run with the same --score-from > 0, else "
                           "<report>/offline/report.json; it must be of the same data, events, chunk size and "
                           "min-weight (checked before anything starts)")
    live.add_argument("--no-offline", action="store_true", help="with --live: skip the offline protocol")
    live.add_argument("--score-from", type=int, default=0, metavar="OFFSET",
                      help="with --live: a warm-up; the events before this stream offset are posted unranked as fast as "
                           "the service takes them and applied before the timed, scored replay starts (the offline "
                           "side learns them chunk by chunk, scoring from the same offset)")
    parser.set_defaults(fn=cmd_eval)


def _split_specs(text: str) -> list[str]:
    # ',' separates strategies; inside a spec ';' separates settings (',' in parse_strategy_spec).
    return [s.strip().replace(";", ",") for s in text.split(",") if s.strip()]


def _ray_starter(cfg):
    """How the evaluation starts Ray when it needs one: a throwaway local cluster like
    ``freshet run``'s (loopback listeners, token auth with a fresh private token unless
    ``RAY_AUTH_MODE`` is set, the config's Ray settings), sized for one deployment."""
    # 2 CPUs hold the shards, trainer and app an evaluation starts, and Ray then pre-starts
    # 2 idle workers rather than one per core of a large host.
    return lambda: ray_init(None, cfg.namespace, system_config=cfg.ray.system_config(), num_cpus=2)


def _snapshot(report_dir: Path) -> dict[str, int] | None:
    """``{relative path: mtime_ns}`` of the files under ``report_dir``, or None when it does not exist."""
    if not report_dir.is_dir():
        return None
    return {str(f.relative_to(report_dir)): f.stat().st_mtime_ns for f in report_dir.rglob("*") if f.is_file()}


def _report_left(report_dir: Path, before: dict[str, int] | None) -> str:
    """What an interrupted run left in ``report_dir`` (``before``: its :func:`_snapshot`). A
    directory the run made and wrote no file to is removed: it would read as a report."""
    now = _snapshot(report_dir)
    if now is None:
        return "no report written"
    written = sorted(k for k, t in now.items() if before is None or before.get(k) != t)
    if written:
        return f"kept the partial report in {report_dir}: {', '.join(written)}"
    if before is None:
        shutil.rmtree(report_dir, ignore_errors=True)  # holds no file (only, maybe, empty dirs)
        return f"no report written; removed the empty {report_dir} it made"
    return f"no report written; {report_dir} left as it was"


def cmd_eval(args: argparse.Namespace) -> int:
    """``freshet eval``: run the comparison and print the report table; returns the exit status."""
    try:
        mw = args.min_weight
        min_weight: float | None | str = "auto" if mw == "auto" else None if str(mw).lower() == "none" else float(mw)
    except ValueError:
        print(f"--min-weight: must be a number, 'auto' or 'none', got {args.min_weight!r}", file=sys.stderr)
        return 2
    report_dir = Path(args.report)
    if report_dir.exists() and not report_dir.is_dir():
        print(f"freshet eval: --report: {args.report} exists and is not a directory", file=sys.stderr)
        return 2
    if args.live:
        return _cmd_live(args, min_weight)
    if args.rate is not None or args.url or args.token or args.offline_report or args.no_offline or args.score_from:
        print("--rate, --url, --token, --offline-report, --no-offline and --score-from need --live", file=sys.stderr)
        return 2
    from workers.eval.compare import run_eval  # the evaluation's modules: only for the command that needs them

    before = _snapshot(report_dir)
    try:
        cfg = load_config(args.config)
        report = run_eval(
            cfg, data=args.data, strategies=_split_specs(args.strategies), report_dir=args.report,
            chunk_size=args.chunk_size, min_weight=min_weight, max_events=args.events, window=args.window,
            progress=not args.no_progress, start_ray=_ray_starter(cfg),
        )
    except (ValueError, OSError) as e:  # OSError: a report dir that cannot be made, say
        print(f"freshet eval: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # run_eval's own cleanup has run by now (the Ray it started is shut down); say what is left.
        print("freshet eval: interrupted; the Ray it started (if any) was shut down and its temp files removed; "
              f"{_report_left(report_dir, before)}", file=sys.stderr)
        return 130
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    print(md.split("\n## Settings")[0])
    return 0 if report["strategies"] else 1


def _cmd_live(args: argparse.Namespace, min_weight) -> int:
    """``freshet eval --live``: the live replay and the offline protocol; prints the table."""
    import os

    import httpx

    from serving.live_eval import run_live

    if args.rate is None:
        print("freshet eval --live: --rate R (events per second, > 0) is required", file=sys.stderr)
        return 2
    if not (args.rate > 0 and math.isfinite(args.rate)):
        print(f"freshet eval --live: --rate: must be a finite number > 0 (events per second), got {args.rate:g}",
              file=sys.stderr)
        return 2
    if args.token and not args.url:
        # The service this run starts makes its own token: a --token would be silently ignored.
        print("freshet eval --live: --token needs --url (the service this run starts makes its own token)",
              file=sys.stderr)
        return 2
    if args.token:
        # Any local user reads a process's arguments (ps, /proc/<pid>/cmdline) for as long as it runs.
        print("freshet eval --live: WARNING: --token puts the bearer token on the command line, where every user of "
              "this host can read it while the replay runs; set FRESHET_TOKEN (or serving.auth_token in --config) "
              "instead", file=sys.stderr)
    if args.offline_report and args.no_offline:
        print("freshet eval --live: give --offline-report or --no-offline, not both", file=sys.stderr)
        return 2
    before = _snapshot(Path(args.report))
    try:
        cfg = load_config(args.config)
        token = args.token or os.environ.get("FRESHET_TOKEN") or cfg.serving.auth_token
        offline = False if args.no_offline else (args.offline_report or True)
        report = run_live(
            cfg, data=args.data, rate=args.rate, report_dir=args.report, url=args.url, token=token if args.url else None,
            chunk_size=args.chunk_size, min_weight=min_weight, max_events=args.events, offline=offline,
            window=args.window, progress=not args.no_progress, score_from=args.score_from,
            start_ray=_ray_starter(cfg),
        )
    except (ValueError, OSError, RuntimeError, httpx.HTTPError) as e:  # HTTPError: a --url that does not answer
        where = f"cannot reach {args.url}: {type(e).__name__}: " if isinstance(e, httpx.HTTPError) else ""
        print(f"freshet eval --live: {where}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # run_live's own cleanup has run by now: the service it started stopped, its Ray shut down.
        started = (f"the service at {args.url} keeps the events already posted; the Ray it started (if any) was "
                   "shut down" if args.url else
                   "the service and Ray it started (if any) were stopped and its temp dirs removed")
        print(f"freshet eval --live: interrupted; {started}; {_report_left(Path(args.report), before)}",
              file=sys.stderr)
        return 130
    md = (Path(args.report) / "live.md").read_text(encoding="utf-8")
    print(md.split("\n## Diagnostics")[0])
    return 0 if report["live"]["evaluated"] else 1
