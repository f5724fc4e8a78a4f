"""Prequential (test-then-train) evaluation of update strategies: ``freshet eval``.

The stream is read in timestamp order in chunks (default 20 events). For each chunk,
every event whose user appeared in an *earlier* chunk is ranked first with the model
as it is now (top-20, the user's earlier items excluded, through
:class:`workers.ranking.Ranker`, the ``/rank`` code), its item's rank recorded; then the
strategy learns from the chunk. Events of users not seen before are *cold*: they are
scored separately, by what the popular fallback would have served them.

Reported per strategy: recall@10, recall@20 and NDCG@10 over evaluated events,
catalogue coverage (distinct items in the served top-10 lists / distinct items in the
stream), the cold users' fallback recall, learning CPU-seconds, model staleness at
evaluation time (events and stream-seconds since the newest event the served model
learned from), windowed recall@10 along the stream and, when the stream has a taste
shift, how long recall takes to return to its pre-shift level. For MSE models an
explicit view adds prequential RMSE and MAE of the predicted rating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ps.config import FreshetConfig, LossKind, StreamConfig, StreamKind, load_config
from ps.ids import ID, as_id_array
from workers.ranking import Ranked
from workers.strategies import STRATEGIES, Chunk, Strategy, StrategyUnavailable, make_strategy, parse_strategy_spec

__all__ = [
    "EvalResult",
    "add_eval_arguments",
    "cmd_eval",
    "hit_rank",
    "prequential",
    "recovery_events",
    "run_eval",
    "windowed_recall",
    "write_report",
]

DEPTH = 20  # longest list ranked: recall@20
DEFAULT_STRATEGIES = ",".join(STRATEGIES)


def hit_rank(ranked: Ranked, item: ID) -> int:
    """0-based position of ``item`` in ``ranked``, or -1 when absent or its score is NaN/±inf."""
    for pos, (x, s) in enumerate(zip(ranked.item_ids, ranked.scores)):
        if x == item:
            return pos if math.isfinite(s) else -1
    return -1


@dataclass
class EvalResult:
    """What one strategy scored on one stream; :meth:`summary` is the report row."""

    name: str
    settings: dict[str, Any]
    events: int = 0
    eval_offsets: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # offsets of evaluated events
    eval_ranks: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # -1 = miss in the top-20
    cold_ranks: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    staleness_events: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))  # per evaluated event
    staleness_s: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))  # NaN before any learning
    recommended: int = 0  # distinct items in served top-10 lists
    catalogue: int = 0  # distinct items in the stream
    cpu_s: float = 0.0
    wall_s: float = 0.0
    sq_err: float = 0.0
    abs_err: float = 0.0
    predicted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def recall(self, k: int, since: int = 0) -> float | None:
        """Share of evaluated events (at offsets >= ``since``) whose item ranked in the top ``k``."""
        r = self.eval_ranks[self.eval_offsets >= since]
        return float(((r >= 0) & (r < k)).mean()) if len(r) else None

    def ndcg(self, k: int) -> float | None:
        """Mean NDCG@k with one relevant item per event: ``1/log2(rank+2)`` when ranked in the top ``k``."""
        r = self.eval_ranks
        if not len(r):
            return None
        gain = np.where((r >= 0) & (r < k), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
        return float(gain.mean())

    def summary(self, warmup_offset: int = 0) -> dict[str, Any]:
        """Scalar metrics (JSON-ready); ``recall@10_after_warmup`` counts offsets >= ``warmup_offset`` only."""
        cold = self.cold_ranks
        stale_s = self.staleness_s[np.isfinite(self.staleness_s)]
        out = {
            "strategy": self.name,
            "events": self.events,
            "evaluated": int(len(self.eval_ranks)),
            "recall@10": self.recall(10),
            "recall@20": self.recall(20),
            "ndcg@10": self.ndcg(10),
            "recall@10_after_warmup": self.recall(10, warmup_offset),
            "coverage": self.recommended / self.catalogue if self.catalogue else None,
            "cold_events": int(len(cold)),
            "cold_recall@10": float(((cold >= 0) & (cold < 10)).mean()) if len(cold) else None,
            "cold_recall@20": float(((cold >= 0) & (cold < 20)).mean()) if len(cold) else None,
            "cpu_s": self.cpu_s,
            "staleness_events_mean": float(self.staleness_events.mean()) if len(self.staleness_events) else None,
            "staleness_s_median": float(np.median(stale_s)) if len(stale_s) else None,
            "wall_s": self.wall_s,
            "events_per_s": self.events / self.wall_s if self.wall_s > 0 else None,
            "settings": self.settings,
            **self.extra,
        }
        if self.predicted:
            out["rmse"] = math.sqrt(self.sq_err / self.predicted)
            out["mae"] = self.abs_err / self.predicted
            out["predicted_events"] = self.predicted
        return out


def prequential(
    source,
    strategy: Strategy,
    *,
    chunk_size: int = 20,
    max_events: int | None = None,
    explicit: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Run the test-then-train protocol of ``strategy`` over ``source`` (a ``workers.streams`` source).

    ``chunk_size`` events are ranked, then learned, at a time; ``max_events`` caps the
    stream. ``explicit`` also scores each evaluated event's predicted rating (the model
    score) against its weight for RMSE/MAE. Deterministic for a deterministic strategy.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 events, got {chunk_size}")
    total = source.end_offset
    if max_events is not None:
        total = max_events if total is None else min(total, max_events)
    if total is None:
        raise ValueError("max_events: required for an unbounded stream")
    known: set = set()
    seen: dict[ID, dict[ID, None]] = {}  # insertion-ordered sets of each user's items
    catalogue: set = set()
    recommended: set = set()
    offs: list[int] = []
    ranks: list[int] = []
    cold_ranks: list[int] = []
    st_ev: list[float] = []
    st_s: list[float] = []
    res = EvalResult(strategy.name, strategy.describe())
    bar = _progress(total, strategy.name, progress)
    t_start = time.perf_counter()
    offset = 0
    try:
        while offset < total:
            raw = source.read(offset, min(chunk_size, total - offset))
            if raw.num_rows == 0:
                break
            chunk = Chunk.from_batch(raw)
            users, items = chunk.users.tolist(), chunk.items.tolist()
            warm = [j for j, u in enumerate(users) if u in known]
            cold = [j for j, u in enumerate(users) if u not in known]
            ranker = strategy.ranker()
            if warm:
                wu = list(dict.fromkeys(users[j] for j in warm))
                vecs, found = strategy.user_vectors(as_id_array(wu))
                ranked = ranker.rank_many(vecs, found, [list(seen[u]) for u in wu], DEPTH)
                by_user = dict(zip(wu, ranked))
                secs, evs = strategy.staleness(float(chunk.timestamps[0]), int(chunk.offsets[0]))
                for r in ranked:
                    recommended.update(r.item_ids[:10])
                for j in warm:
                    offs.append(int(chunk.offsets[j]))
                    ranks.append(hit_rank(by_user[users[j]], items[j]))
                    st_ev.append(evs)
                    st_s.append(np.nan if secs is None else secs)
                if explicit:
                    vec_of = {u: (v, f) for u, v, f in zip(wu, vecs, found)}
                    for j in warm:
                        v, f = vec_of[users[j]]
                        if not f:
                            continue
                        pred = ranker.score_items(v, [items[j]], list(seen[users[j]]))[0][0]
                        if pred is not None and math.isfinite(pred):
                            err = pred - float(chunk.weights[j])
                            res.sq_err += err * err
                            res.abs_err += abs(err)
                            res.predicted += 1
            if cold:
                # A cold user has no items before this chunk, so one popular list serves all of them.
                pop = ranker.popular([], DEPTH)
                cold_ranks.extend(hit_rank(pop, items[j]) for j in cold)
            strategy.learn(chunk)
            for u, i in zip(users, items):
                known.add(u)
                seen.setdefault(u, {})[i] = None
                catalogue.add(i)
            offset = int(chunk.offsets[-1]) + 1
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    res.wall_s = time.perf_counter() - t_start
    res.events = offset
    res.eval_offsets = np.asarray(offs, np.int64)
    res.eval_ranks = np.asarray(ranks, np.int64)
    res.cold_ranks = np.asarray(cold_ranks, np.int64)
    res.staleness_events = np.asarray(st_ev, np.float64)
    res.staleness_s = np.asarray(st_s, np.float64)
    res.recommended, res.catalogue = len(recommended & catalogue), len(catalogue)
    res.cpu_s = strategy.cpu_seconds()
    res.settings = strategy.describe()
    return res


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:>12}", unit="ev", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def windowed_recall(
    offsets: np.ndarray, ranks: np.ndarray, *, window: int, k: int = 10, points: int = 200, end: int | None = None, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, recall)``: recall@k over evaluated events with offsets in ``(x - window, x]``, at ``points`` x's.

    Offsets below ``start`` never count (so a curve can be restricted to after a shift);
    NaN where the window holds no evaluated event.
    """
    if window < 1:
        raise ValueError(f"window: must be >= 1 events, got {window}")
    end = int(offsets.max()) + 1 if end is None and len(offsets) else (end or 0)
    xs = np.unique(np.linspace(start, end, num=max(2, points)).astype(np.int64))
    keep = offsets >= start
    o, hit = offsets[keep], ((ranks[keep] >= 0) & (ranks[keep] < k)).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(hit)])
    hi = np.searchsorted(o, xs, side="right")
    lo = np.searchsorted(o, xs - window, side="right")
    n = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)
    return xs, y


def recovery_events(
    offsets: np.ndarray, ranks: np.ndarray, shift: int, *, window: int = 1000, pre_window: int = 5000, k: int = 10,
    fraction: float = 1.0, min_events: int = 100, step: int = 50,
) -> dict[str, Any]:
    """How many events after ``shift`` recall@k over a full trailing ``window`` of post-shift
    events first reaches ``fraction`` of the recall over the ``pre_window`` events before
    the shift. ``events`` is None when it never does.
    """
    hit = (ranks >= 0) & (ranks < k)
    pre_sel = (offsets >= shift - pre_window) & (offsets < shift)
    pre = float(hit[pre_sel].mean()) if pre_sel.any() else None
    out: dict[str, Any] = {"shift_offset": int(shift), "pre_recall@10": pre, "window": window, "fraction": fraction, "events": None}
    if pre is None:
        return out
    post = offsets >= shift
    o, h = offsets[post], hit[post].astype(np.float64)
    if not len(o):
        return out
    csum = np.concatenate([[0.0], np.cumsum(h)])
    # Only full post-shift windows: a short window right after the shift is mostly noise.
    xs = np.arange(shift + window, int(o.max()) + 2, step)
    hi = np.searchsorted(o, xs, side="left")
    lo = np.searchsorted(o, xs - window, side="left")
    n = hi - lo
    y = np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)
    ok = (n >= min_events) & (y >= fraction * pre)
    out["min_recall@10"] = float(np.nanmin(np.where(n >= min_events, y, np.nan))) if (n >= min_events).any() else None
    if ok.any():
        out["events"] = int(xs[np.argmax(ok)] - shift)
    return out


# --------------------------------------------------------------------------- driver


def _open_source(cfg: FreshetConfig, data: str, min_weight: float | None, max_events: int | None):
    from workers.streams import open_source

    if data == "synthetic":
        stream = StreamConfig(kind=StreamKind.SYNTHETIC, num_events=max_events or cfg.stream.num_events, synthetic=cfg.stream.synthetic)
    else:
        p = Path(data)
        if not p.exists():
            raise FileNotFoundError(f"data: {data} does not exist (give 'synthetic' or a ratings/Parquet path)")
        kind = StreamKind.PARQUET if p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))) else StreamKind.MOVIELENS
        stream = StreamConfig(kind=kind, path=str(p), num_events=max_events, min_weight=min_weight)
    # Rejected rows go to a private temp file: the evaluation reports on quality, not on data hygiene.
    qdir = tempfile.mkdtemp(prefix="freshet-eval-q-")
    return open_source(stream, quarantine_path=os.path.join(qdir, "quarantine.arrow")), stream


def _init_ray(ray_dir: str | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = ray_dir or tempfile.mkdtemp(prefix="fre", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
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
) -> dict[str, Any]:
    """Evaluate each strategy spec prequentially on the same stream and write the report to ``report_dir``.

    ``data`` is ``"synthetic"`` or a MovieLens/Parquet path; ``min_weight`` ``"auto"`` keeps
    ratings >= 4 (implicit view) for file data with a BPR model and everything otherwise.
    Returns the report as a dict (also written as ``report.json``).
    """
    if not strategies:
        raise ValueError("strategies: give at least one strategy")
    if min_weight == "auto":
        min_weight = 4.0 if data != "synthetic" and cfg.model.loss == LossKind.BPR else None
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
            started_ray = _init_ray(ray_dir)
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


def _targets(rows: dict[str, dict[str, Any]], results: list[EvalResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The issue's benchmark targets, computed from what was measured."""
    out: dict[str, Any] = {}
    inc = next((r for r in rows.values() if r["strategy"].split(":")[0] == "incremental"), None)
    pop = next((r for r in rows.values() if r["strategy"].split(":")[0] == "popularity"), None)
    retrains = [r for r in rows.values() if r["strategy"].split(":")[0] == "retrain"]
    if inc and pop and pop["recall@10"]:
        ratio = inc["recall@10"] / pop["recall@10"]
        out["incremental_over_popularity"] = {"ratio": ratio, "target": 1.4, "met": ratio >= 1.4}
    if inc and retrains:
        best = max(retrains, key=lambda r: r["recall@10"] or 0.0)
        out["incremental_vs_best_retrain"] = {
            "retrain": best["strategy"], "retrain_recall@10": best["recall@10"], "incremental_recall@10": inc["recall@10"],
            "met": (inc["recall@10"] or 0) >= (best["recall@10"] or 0),
        }
        per = best.get("cpu_s_per_event_epoch")
        if per:
            # Keeping incremental's staleness (it learns every chunk) means a from-scratch fit after every chunk.
            m = math.ceil(meta["events"] / meta["chunk_size"])
            epochs = best["settings"].get("epochs", 1)
            needed = per * epochs * meta["chunk_size"] * m * (m + 1) / 2
            out["cpu_vs_retrain_at_same_staleness"] = {
                "incremental_cpu_s": inc["cpu_s"], "retrain_every_chunk_cpu_s_extrapolated": needed,
                "ratio": inc["cpu_s"] / needed, "target": 0.1, "met": inc["cpu_s"] <= 0.1 * needed,
                "how": f"extrapolated from {best['strategy']}'s measured {per:.3g} CPU-s per event-epoch x {epochs} epochs "
                f"x sum of history sizes over {m} chunk-by-chunk retrains (not run)",
            }
    if meta.get("drift_offset") is not None:
        out["recovery_events"] = {r["strategy"]: r.get("recovery", {}).get("events") for r in rows.values()}
        if inc and "recovery" in inc:
            ev = inc["recovery"]["events"]
            out["incremental_recovery"] = {"events": ev, "target": 2000, "met": ev is not None and ev <= 2000}
    return out


def write_report(
    results: list[EvalResult], report_dir: str | Path, meta: dict[str, Any], *, skipped: dict[str, str] | None = None,
    window: int = 2000, recovery_window: int = 1000,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md``, ``windowed_recall.png`` and ``quality_vs_cpu.png``; return the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    warm = meta.get("warmup_offset", 0)
    rows: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, list]] = {}
    for r in results:
        row = r.summary(warm)
        x, y = windowed_recall(r.eval_offsets, r.eval_ranks, window=window, end=r.events)
        curves[r.name] = {"offset": x.tolist(), "recall@10": [None if not np.isfinite(v) else float(v) for v in y]}
        if meta.get("drift_offset") is not None:
            row["recovery"] = recovery_events(r.eval_offsets, r.eval_ranks, meta["drift_offset"], window=recovery_window)
        rows[r.name] = row
    report = {"meta": meta, "strategies": rows, "skipped": skipped or {}, "windowed_recall": curves}
    report["targets"] = _targets(rows, results, meta)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    (report_dir / "report.md").write_text(_markdown(report), encoding="utf-8")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, c in curves.items():
        ax.plot(c["offset"], [np.nan if v is None else v for v in c["recall@10"]], label=name)
    if meta.get("drift_offset") is not None:
        ax.axvline(meta["drift_offset"], color="k", linestyle="--", linewidth=1, label="taste shift")
    ax.set_xlabel("stream offset (events)")
    ax.set_ylabel(f"recall@10 over last {window} events")
    ax.set_title(f"Prequential windowed recall@10 — {meta.get('data')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / "windowed_recall.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, row in rows.items():
        cpu = max(row["cpu_s"], 1e-3)
        ax.scatter([cpu], [row["recall@10"] or 0.0])
        ax.annotate(name, (cpu, row["recall@10"] or 0.0), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("learning CPU-seconds (log)")
    ax.set_ylabel("recall@10")
    ax.set_title("Quality against learning cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / "quality_vs_cpu.png", dpi=110)
    plt.close(fig)
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


_TABLE_HEADER = "| strategy | recall@10 | recall@20 | NDCG@10 | coverage | CPU-s | staleness (events) | staleness (s, median) |"


def _markdown(report: dict[str, Any]) -> str:
    meta, rows = report["meta"], report["strategies"]
    warm = meta.get("warmup_offset", 0)
    lines = [
        f"# Freshet prequential evaluation — {meta['data']}",
        "",
        f"{meta['events']} events, chunks of {meta['chunk_size']} (rank each event of a user seen in an earlier chunk, "
        f"then learn the chunk), min_weight={meta['min_weight']}, loss={meta['loss']}. Created {meta['created']}.",
        "",
        _TABLE_HEADER,
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_fmt(r['recall@10'])} | {_fmt(r['recall@20'])} | {_fmt(r['ndcg@10'])} | {_fmt(r['coverage'], 3)} "
            f"| {_fmt(r['cpu_s'], 1)} | {_fmt(r['staleness_events_mean'], 0)} | {_fmt(r['staleness_s_median'], 0)} |"
        )
    lines += [
        "",
        f"| strategy | evaluated | recall@10 after offset {warm} | cold events | cold (popular fallback) recall@10 | events/s | RMSE | MAE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['evaluated']} | {_fmt(r.get('recall@10_after_warmup'))} | {r['cold_events']} "
            f"| {_fmt(r['cold_recall@10'])} | {_fmt(r['events_per_s'], 0)} | {_fmt(r.get('rmse'))} | {_fmt(r.get('mae'))} |"
        )
    lines += ["", "## Targets", ""]
    t = report["targets"]
    if "incremental_over_popularity" in t:
        x = t["incremental_over_popularity"]
        lines.append(f"- incremental / popularity recall@10 = {x['ratio']:.3f} (target ≥ 1.4): {'met' if x['met'] else 'NOT met'}")
    if "incremental_vs_best_retrain" in t:
        x = t["incremental_vs_best_retrain"]
        lines.append(
            f"- incremental recall@10 {_fmt(x['incremental_recall@10'])} vs best retrain ({x['retrain']}) "
            f"{_fmt(x['retrain_recall@10'])}: {'met' if x['met'] else 'NOT met'}"
        )
    if "cpu_vs_retrain_at_same_staleness" in t:
        x = t["cpu_vs_retrain_at_same_staleness"]
        lines.append(
            f"- learning CPU-s: incremental {x['incremental_cpu_s']:.1f} vs {x['retrain_every_chunk_cpu_s_extrapolated']:,.0f} "
            f"for retraining at the same staleness, ratio {x['ratio']:.2g} (target ≤ 0.1): {'met' if x['met'] else 'NOT met'}; "
            f"{x['how']}"
        )
    if "recovery_events" in t:
        lines.append(f"- events after the taste shift (offset {meta['drift_offset']}) until windowed recall@10 is back at its "
                     "pre-shift level (None: never within the stream):")
        for name, ev in t["recovery_events"].items():
            rec = rows[name].get("recovery", {})
            lines.append(f"  - {name}: {ev} (pre-shift {_fmt(rec.get('pre_recall@10'))}, post-shift low {_fmt(rec.get('min_recall@10'))})")
    if "incremental_recovery" in t:
        x = t["incremental_recovery"]
        lines.append(f"- incremental recovery ≤ 2000 events: {'met' if x['met'] else 'NOT met'}")
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    lines += ["", "## Settings", ""] + [f"- {name}: `{json.dumps(r['settings'], default=str)}`" for name, r in rows.items()]
    lines += ["", "![windowed recall](windowed_recall.png)", "", "![quality vs CPU](quality_vs_cpu.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``freshet eval``'s options (including ``--config`` and ``--data``) to ``parser``."""
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
