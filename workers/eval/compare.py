"""``run_eval``: every strategy through the prequential protocol on one stream, then the report."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ps.lazy import torch
from workers.config import LossKind, StreamConfig, StreamKind
from workers.eval.protocol import EvalResult, prequential
from workers.eval.report import write_report
from workers.eval.strategies import StrategyUnavailable, check_strategy_spec, make_strategy, parse_strategy_spec

if TYPE_CHECKING:  # the root config composes every layer's settings; workers only read it
    from serving.config import FreshetConfig

__all__ = ["auto_min_weight", "run_eval"]


def _data_kind(data: str) -> StreamKind:
    """The stream kind of ``--data``: ``synthetic``, a Parquet file or directory, else a MovieLens file."""
    if data == "synthetic":
        return StreamKind.SYNTHETIC
    p = Path(data)
    if p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return StreamKind.PARQUET
    return StreamKind.MOVIELENS


def auto_min_weight(cfg: FreshetConfig, data: str) -> float | None:
    """``--min-weight auto``: 4 for a MovieLens ratings file under a BPR model, so that only
    ratings of 4 and up are events to rank and learn (the implicit view); None (every event)
    otherwise. The protocol ranks every event as a positive: a Parquet file is an event log
    (clicks, purchases; weight 1.0 when absent), kept whole, and a Parquet file of ratings
    needs an explicit ``min_weight``."""
    if cfg.model.loss == LossKind.BPR and _data_kind(data) == StreamKind.MOVIELENS:
        return 4.0
    return None


def _open_source(cfg: FreshetConfig, data: str, min_weight: float | None, max_events: int | None):
    from workers.streams import open_source

    kind = _data_kind(data)
    if kind == StreamKind.SYNTHETIC:
        stream = StreamConfig(kind=kind, num_events=max_events or cfg.stream.num_events, synthetic=cfg.stream.synthetic)
    else:
        p = Path(data)
        if not p.exists():
            raise FileNotFoundError(f"data: {data} does not exist (give 'synthetic' or a ratings/Parquet path)")
        stream = StreamConfig(kind=kind, path=str(p), num_events=max_events, min_weight=min_weight)
    # Rejected rows go to a private temp file: the evaluation reports on quality, not on data
    # hygiene. It goes when the source does (a run of `freshet eval` left one dir per call).
    qdir = tempfile.mkdtemp(prefix="freshet-eval-q-")
    qfile = os.path.join(qdir, "quarantine.arrow")
    try:
        # The protocol is in timestamp order; a Parquet log keeps its files' order, which an
        # export (by user, by day and shard) need not be: learned out of order, a later event
        # would teach the model before an earlier one is ranked.
        source = open_source(stream, quarantine_path=qfile, model=cfg.model, time_order=True)
    except BaseException as e:
        # No source, so no finalizer: remove the dir now, unless the refusal points the user
        # to the quarantine file it wrote (too many rows quarantined: the reasons are there).
        if not (os.path.exists(qfile) and qfile in str(e)):
            shutil.rmtree(qdir, ignore_errors=True)
        raise
    weakref.finalize(source, shutil.rmtree, qdir, True)
    return source, stream


def _init_ray(ray_dir: str | None, cfg: FreshetConfig | None = None, start_ray: Callable[[], object] | None = None) -> bool:
    """Start Ray for the evaluation unless this process is connected already; returns whether
    it started one. ``start_ray`` starts it (``freshet eval`` passes the command line's
    starter: loopback, token auth); without it, a throwaway local cluster on loopback, with
    Ray's auth off unless ``RAY_AUTH_MODE`` says otherwise, under ``cfg``'s Ray settings
    (``cfg.ray.system_config()``)."""
    import ray

    if ray.is_initialized():
        return False
    if start_ray is not None:
        start_ray()
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = ray_dir or tempfile.mkdtemp(prefix="fre", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    # "local": a new cluster even when RAY_ADDRESS or a current-cluster file names another.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
             log_to_driver=False, configure_logging=False,
             _system_config=cfg.ray.system_config() if cfg is not None else None)
    return True


def run_eval(
    cfg: FreshetConfig,
    *,
    data: str,
    strategies: list[str],
    report_dir: str | Path,
    chunk_size: int = 20,
    min_weight: float | None | str = "auto",
    max_events: int | None = None,
    window: int = 2000,
    recovery_window: int = 1000,
    progress: bool = True,
    ray_dir: str | None = None,
    start_ray: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Evaluate each strategy spec prequentially on the same stream and write the report to ``report_dir``.

    ``data`` is ``"synthetic"`` or a MovieLens/Parquet path; ``min_weight`` ``"auto"`` is
    :func:`auto_min_weight` (ratings >= 4 of a MovieLens file with a BPR model, else everything).
    ``start_ray`` starts Ray when a strategy needs it (``incremental``) and this process is not
    connected; it is shut down at the end (default: a throwaway local cluster, see ``_init_ray``).
    ``chunk_size``, ``max_events``, ``window`` and ``recovery_window`` are in events. A strategy
    that cannot run here (:class:`workers.eval.strategies.StrategyUnavailable`) is skipped and
    named in the report. Returns the report as a dict (also written as ``report.json``).

    Raises:
        ValueError: no ``strategies``, a strategy spec :func:`make_strategy` rejects (or whose
            settings the strategy cannot take), or ``chunk_size`` < 1.
        FileNotFoundError: ``data`` is a path that does not exist.
        workers.streams.StreamDataError: (a ``ValueError``) the file data is unusable.
    """
    if not strategies:
        raise ValueError("strategies: give at least one strategy")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 events, got {chunk_size}")
    for spec in strategies:  # before anything is opened or made: a bad spec changes nothing
        check_strategy_spec(spec)
    if min_weight == "auto":
        min_weight = auto_min_weight(cfg, data)
    explicit = cfg.model.loss == LossKind.MSE
    source, stream = _open_source(cfg, data, min_weight, max_events)
    total = source.end_offset if max_events is None else min(source.end_offset or max_events, max_events)
    cfg = cfg.model_copy(update={"stream": stream})
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    started_ray = False
    results: list[EvalResult] = []
    skipped: dict[str, str] = {}
    # One torch thread for every strategy (the trainer uses one too): CPU-seconds then compare
    # work done, not spinning of idle intra-op threads on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if any(parse_strategy_spec(s)[0] == "incremental" for s in strategies):
            started_ray = _init_ray(ray_dir, cfg, start_ray)
        for spec in strategies:
            try:
                strategy = make_strategy(spec, cfg, total_events=total)
            except StrategyUnavailable as e:
                skipped[spec] = str(e)
                continue
            except TypeError as e:
                raise ValueError(f"strategies: {spec!r}: {e}") from None
            try:
                res = prequential(source, strategy, chunk_size=chunk_size, max_events=total, explicit=explicit, progress=progress)
            finally:
                strategy.close()
            if hasattr(strategy, "cpu_per_event_epoch"):
                res.extra["cpu_s_per_event_epoch"] = strategy.cpu_per_event_epoch()
            results.append(res)
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            import ray

            ray.shutdown()
    meta = {
        "data": data,
        "events": total,
        # Rows of the data that are not valid events (their reasons go with the temp quarantine
        # file): the report says how many, so a mostly broken file is not read as a small one.
        "quarantined": getattr(source, "quarantined", 0),
        "chunk_size": chunk_size,
        "min_weight": min_weight,
        "loss": cfg.model.loss.value,
        "window": window,
        "drift_offset": getattr(source, "drift_offset", None),
        "warmup_offset": _warmup_offset(strategies, total),
        "config": cfg.model_dump(mode="json"),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return write_report(results, report_dir, meta, skipped=skipped, window=window, recovery_window=recovery_window)


def _warmup_offset(strategies: list[str], total: int) -> int:
    for spec in strategies:
        name, kw = parse_strategy_spec(spec)
        if name == "frozen":
            return int(float(kw.get("fraction") or 0.2) * total)
    return int(0.2 * total)
