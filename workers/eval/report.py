"""The comparison's report: ``report.json``, ``report.md`` and the plots, with the issue's
targets computed from what was measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from workers.eval.protocol import EvalResult, recovery_events, windowed_recall

__all__ = ["write_report"]


def _targets(rows: dict[str, dict[str, Any]], results: list[EvalResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The issue's benchmark targets, computed from what was measured."""
    out: dict[str, Any] = {}
    def kind(r: dict[str, Any]) -> str:
        return r["strategy"].split(":")[0]

    inc = next((r for r in rows.values() if kind(r) == "incremental"), None)
    pops = [r for r in rows.values() if kind(r) == "popularity"]
    # The baseline is all-time popularity, whatever order the specs were given in.
    pop = next((r for r in pops if r.get("settings", {}).get("halflife_events") is None), pops[0] if pops else None)
    full = [r for r in rows.values() if kind(r) in ("retrain", "als")]  # every full retrain, ALS included
    retrains = [r for r in full if kind(r) == "retrain"]
    if inc and pop and pop["recall@10"]:
        ratio = inc["recall@10"] / pop["recall@10"]
        out["incremental_over_popularity"] = {"popularity": pop["strategy"], "ratio": ratio, "target": 1.4, "met": ratio >= 1.4}
    if inc and full:
        top = max(full, key=lambda r: r["recall@10"] or 0.0)
        out["incremental_vs_best_retrain"] = {
            "retrain": top["strategy"], "retrain_recall@10": top["recall@10"], "incremental_recall@10": inc["recall@10"],
            "met": (inc["recall@10"] or 0) >= (top["recall@10"] or 0),
        }
    if inc and retrains:
        best = max(retrains, key=lambda r: r["recall@10"] or 0.0)
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
        f"{meta['events']} events" + (f" ({meta['quarantined']} rows of the data quarantined: not valid events)"
                                      if meta.get("quarantined") else "")
        + f", chunks of {meta['chunk_size']} (rank each event of a user seen in an earlier chunk, "
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
    t = report["targets"]
    if t:  # none applies without the strategies they compare (e.g. popularity alone)
        lines += ["", "## Targets", ""]
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
