"""Choose model defaults by a method that cannot overfit one file (issue 13).

```bash
. .venv/bin/activate
export RAY_TMPDIR=/tmp/frt RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
python -m bench.tune_defaults --data ../shared/data/ml-latest-small/ratings.csv \\
    --out bench/results/tune_defaults --max-minutes 12      # rerun the same line until it says "complete"
```

**The split.** Every rating of the file (all of them, before any ratings filter) is
ordered by timestamp; the cut is the upper median timestamp (``--cut median``: the
``n // 2``-th smallest of the ``n`` timestamps, 0-based) or a unix time given with
``--cut``. The *tuning half* is every rating with ``timestamp < cut``, the *held-out half*
every rating with ``timestamp >= cut``: disjoint, and nothing after the cut is ever read
while tuning. Both halves are then reduced to positives as ``freshet eval`` does for a
BPR model (ratings >= ``--min-weight``, default 4 of 5), in timestamp order (stable).

**The protocol** is ``freshet eval``'s (:func:`workers.eval.protocol.prequential`):
chunks of ``--chunk-size`` (20) events in timestamp order; every event of a user seen in
an earlier chunk is ranked (top-20, the user's earlier items excluded) with the model as it
is, then the chunk is learned. The model is the ``incremental`` strategy
(:func:`workers.eval.strategies.make_strategy`): the real PS shard actors and the trainer's
own code. The baseline is ``popularity`` (all-time interaction counts, incremental).

- **tune** (the search): the tuning half alone, from a fresh model, every event scored.
- **heldout** (the report): the whole positive stream from a fresh model; the tuning half
  is *learned* prequentially in the same chunks (so the model, the popularity counts, the
  users' seen items and session contexts hold everything before the cut) but nothing in
  it is ranked or scored (``prequential(score_from=...)``); scoring starts with the first
  event at or after the cut. Popularity is warmed up the same way.
- **synthetic** (the check): the built-in synthetic stream (``stream.synthetic`` settings,
  ``--synthetic-events`` events, default 60,000), every event scored, as ``freshet eval
  --data synthetic`` does.

**The search** (only tuning-half figures choose; the held-out half only reports):

1. the current defaults at seeds 0 .. ``--seeds``-1 (``ps.seed``: row initialisation and
   negative sampling): the baseline mean and the seed noise ``sigma`` (sample std);
2. one knob at a time (:data:`AXES`), each value away from the default, at seed 0;
   ``gain`` = its recall@10 minus the defaults' at seed 0 (same seed: paired);
3. a knob *improves* when its best value's gain exceeds ``sigma``; the improving knobs,
   sorted by gain, are combined cumulatively (top 2, top 3, ... at most ``--max-combos``
   combinations) at seed 0;
4. the *candidate* is the best of the improving single changes and combinations at seed 0;
   it is re-run at the other seeds and *passes tuning* when its seed mean beats the
   defaults' by more than twice the standard error of the difference
   (``2 * sqrt(s_c^2 / S + s_d^2 / S)``);
5. held-out and synthetic runs of the defaults and the candidate (seed 0). The
   recommendation is to adopt the candidate only when it passes tuning, is not below the
   defaults on the held-out half, and is not more than 3% below them on the synthetic stream.

Every run is cached in ``OUT/results.json`` under its resolved settings, so an interrupted
or ``--max-minutes``-limited invocation resumes where it stopped (keep each hold of the
shared machine's lock short). The invocation that completes the plan prints the tables
(also ``OUT/tables.md``), writes ``OUT/summary.json`` and ``OUT/tune_defaults.png``.
Exit status: 0 complete, 3 incomplete (rerun to continue), 2 bad arguments or data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench import at_least, ray_temp_dir

__all__ = [
    "AXES",
    "DEFAULT_OUT",
    "KNOBS",
    "TINY_AXES",
    "Split",
    "apply_settings",
    "file_fingerprint",
    "knob_values",
    "main",
    "median_cut",
    "parse_grid",
    "plan_size",
    "split_ratings",
]

# --------------------------------------------------------------------------- knobs

KNOBS: dict[str, str] = {
    "lr_item": "ps.optimizer.lr: row-wise Adagrad learning rate of item vectors and item biases (parameter units per gradient unit)",
    "lr_user": "ps.tables.<user_table>.optimizer.lr: learning rate of user vectors (parameter units per gradient unit)",
    "dim": "ps.tables.<user, item, context tables>.dim: embedding width (floats)",
    "num_negatives": "model.num_negatives: sampled negatives per positive (count)",
    "popularity_negative_fraction": "model.popularity_negative_fraction: share of negatives drawn by popularity (fraction)",
    "l2": "model.l2: L2 penalty on touched rows (per unit squared norm)",
    "recent_weight": "model.recent_weight: weight of log1p(recent count) in the score (logits per log-count)",
    "recent_halflife_events": "model.recent_halflife_events: half-life of the recent-popularity counts (events)",
    "context_items": "model.context_items: last items of a user whose context rows join the query (items)",
    "passes": "trainer.passes: pull-compute-push rounds per mini-batch (count)",
    "seed": "ps.seed: row initialisation and negative sampling seed",
}
"""Every setting the search may change, with where it lives in the config and its unit."""

AXES: dict[str, list[float]] = {
    "lr_item": [0.025, 0.1],
    "lr_user": [0.1, 0.4],
    "dim": [32],
    "num_negatives": [16, 64],
    "popularity_negative_fraction": [0.1],
    "l2": [0.0, 1e-3],
    "recent_weight": [1.0, 2.0],
    "recent_halflife_events": [1000.0, 4000.0],
    "context_items": [5, 20],
    "passes": [2, 4],
}
"""The one-knob-at-a-time grid (``--grid default``): about half and twice each default
(items 0.05, users 0.2, 32 negatives, prior weight 1.5, half-life 2,000 events, 10
context items, 3 passes), dim 64 -> 32, l2 1e-4 -> 0 and 1e-3, and a small share of
popularity negatives (0.25 lost on the whole file, BENCHMARKS.md section 3). A value equal
to the current default is skipped."""

TINY_AXES: dict[str, list[float]] = {"num_negatives": [4], "recent_weight": [0.5]}
"""``--grid tiny``: two cheap changes, for the smoke test."""

_INT_KNOBS = {"dim", "num_negatives", "context_items", "passes", "seed"}

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tune_defaults"
"""Default ``--out`` (git-ignored), wherever the command is run from."""


def _table_names(cfg) -> dict[str, list[str]]:
    m = cfg.model
    vec_tables = [m.user_table, m.item_table] + ([m.context_table] if m.context_table else [])
    return {"lr_user": [m.user_table], "dim": vec_tables}


def knob_values(cfg) -> dict[str, float | int]:
    """The value of every :data:`KNOBS` entry in ``cfg`` (a ``FreshetConfig``)."""
    m, ps = cfg.model, cfg.ps
    return {
        "lr_item": ps.optimizer_for(m.item_table).lr,
        "lr_user": ps.optimizer_for(m.user_table).lr,
        "dim": ps.tables[m.item_table].dim,
        "num_negatives": m.num_negatives,
        "popularity_negative_fraction": m.popularity_negative_fraction,
        "l2": m.l2,
        "recent_weight": m.recent_weight,
        "recent_halflife_events": m.recent_halflife_events,
        "context_items": m.context_items,
        "passes": cfg.trainer.passes,
        "seed": ps.seed,
    }


def apply_settings(cfg, overrides: dict[str, float | int]):
    """``cfg`` with the :data:`KNOBS` in ``overrides`` set (a new, validated ``FreshetConfig``)."""
    from serving.config import FreshetConfig

    unknown = sorted(set(overrides) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown}; known: {', '.join(KNOBS)}")
    d = cfg.model_dump(mode="json")
    tables = _table_names(cfg)
    for knob, value in overrides.items():
        value = int(value) if knob in _INT_KNOBS else float(value)
        if knob == "lr_item":
            d["ps"]["optimizer"]["lr"] = value
            item = d["ps"]["tables"][cfg.model.item_table]
            if item.get("optimizer"):
                item["optimizer"]["lr"] = value
        elif knob == "lr_user":
            t = d["ps"]["tables"][tables["lr_user"][0]]
            t["optimizer"] = {**(t.get("optimizer") or d["ps"]["optimizer"]), "lr": value}
        elif knob == "dim":
            for name in tables["dim"]:
                d["ps"]["tables"][name]["dim"] = value
        elif knob == "passes":
            d["trainer"]["passes"] = value
        elif knob == "seed":
            d["ps"]["seed"] = value
        else:
            d["model"][knob] = value
    return FreshetConfig.model_validate(d)


# --------------------------------------------------------------------------- the split


def median_cut(stamps: np.ndarray) -> float:
    """The upper median of ``stamps`` (unix seconds): the ``n // 2``-th smallest (0-based).

    Ratings strictly before it form the first half; with no tie at the cut that is exactly
    ``n // 2`` of them.
    """
    if not len(stamps):
        raise ValueError("median_cut: no timestamps")
    return float(np.partition(np.asarray(stamps, np.float64), len(stamps) // 2)[len(stamps) // 2])


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Split:
    """Where a ratings file was cut in time, and what each side holds (counts of rows)."""

    data: str
    cut: float  # unix seconds; first half: timestamp < cut
    cut_utc: str
    cut_rule: str  # "median" or "given"
    min_weight: float | None  # ratings kept as positives: >= this
    ratings: int  # valid rows of the file (all ratings)
    ratings_first: int
    ratings_second: int
    positives: int  # events of the positive stream
    positives_first: int  # = the stream offset where the held-out half starts
    positives_second: int
    first_from_utc: str
    first_to_utc: str
    second_from_utc: str
    second_to_utc: str
    users_first: int  # distinct users with a positive in each half
    users_second: int
    users_both: int
    items_first: int
    items_second: int
    items_both: int


def split_ratings(data: str | Path, *, cut: float | None = None, min_weight: float | None = 4.0, model=None, quarantine_dir: str | None = None):
    """``(positive stream, Split)`` for the ratings file ``data``.

    ``cut`` None splits at :func:`median_cut` of every valid rating's timestamp; the stream
    is the file's ratings >= ``min_weight`` in timestamp order (``MovieLensSource``), whose
    offsets ``[0, split.positives_first)`` are the first half (timestamps < cut) and the
    rest the second. ``model`` (a ``ModelConfig``) quarantines rows it cannot train, as
    ``freshet eval`` does. Raises ``ValueError`` when either half is empty.
    """
    from workers.streams import MovieLensSource

    qdir = quarantine_dir or tempfile.mkdtemp(prefix="freshet-tune-q-")
    everything = MovieLensSource(data, quarantine_path=os.path.join(qdir, "all.arrow"), model=model)
    all_ts = everything.read(0, everything.end_offset).column("timestamp").to_numpy().astype(np.float64)
    everything.close()
    rule = "median" if cut is None else "given"
    cut = median_cut(all_ts) if cut is None else float(cut)
    source = MovieLensSource(data, min_weight=min_weight, quarantine_path=os.path.join(qdir, "positives.arrow"), model=model)
    batch = source.read(0, source.end_offset)
    ts = batch.column("timestamp").to_numpy().astype(np.float64)
    if np.any(np.diff(ts) < 0):
        raise AssertionError("split_ratings: the stream is not in timestamp order")
    k = int(np.searchsorted(ts, cut, side="left"))
    if k == 0 or k == len(ts):
        raise ValueError(f"cut {cut:.0f} ({_utc(cut)}) leaves a half of {data} without positives ({k} of {len(ts)} before it)")
    users = batch.column("user_id").to_numpy(zero_copy_only=False)
    items = batch.column("item_id").to_numpy(zero_copy_only=False)
    u1, u2 = set(users[:k].tolist()), set(users[k:].tolist())
    i1, i2 = set(items[:k].tolist()), set(items[k:].tolist())
    split = Split(
        data=str(data), cut=cut, cut_utc=_utc(cut), cut_rule=rule, min_weight=min_weight,
        ratings=len(all_ts), ratings_first=int((all_ts < cut).sum()), ratings_second=int((all_ts >= cut).sum()),
        positives=len(ts), positives_first=k, positives_second=len(ts) - k,
        first_from_utc=_utc(ts[0]), first_to_utc=_utc(ts[k - 1]), second_from_utc=_utc(ts[k]), second_to_utc=_utc(ts[-1]),
        users_first=len(u1), users_second=len(u2), users_both=len(u1 & u2),
        items_first=len(i1), items_second=len(i2), items_both=len(i1 & i2),
    )
    return source, split


# --------------------------------------------------------------------------- runs


def code_fingerprint() -> str:
    """A short SHA-1 of the model's code as this process loaded it (every ``.py`` under
    ``ps/`` and ``workers/``), so runs made on different code can be told apart."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for f in sorted([*root.glob("ps/**/*.py"), *root.glob("workers/**/*.py")]):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]



def _name(overrides: dict[str, Any]) -> str:
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(overrides.items()) if k != "seed"]
    return " + ".join(parts) or "defaults"


def _key(part: str, spec: str, values: dict[str, Any], chunk: int, events: int, score_from: int,
         source: dict[str, Any]) -> str:
    """A run's cache key: everything its result depends on. ``source``: :meth:`Runner.source_id`
    (the ratings file and the cut, or the synthetic stream's settings)."""
    return json.dumps([part, spec, chunk, events, score_from, source, sorted(values.items())], sort_keys=True)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """The ratings file a run read, as its cache key holds it: resolved path, size and
    modification time (hashing a 25M-rating file on every invocation would cost more than
    it saves; an edited or replaced file changes its size or mtime).

    Raises:
        OSError: the file cannot be found or read.
    """
    p = Path(path).resolve()
    st = p.stat()
    return {"file": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Planned:
    """One evaluation: ``part`` (tune / heldout / synthetic), a strategy, knob overrides."""

    part: str
    spec: str  # strategy spec: "incremental", "popularity", ...
    overrides: dict[str, Any]
    role: str  # why it runs: "defaults", "axis", "combo", "candidate", "baseline"


class Runner:
    """Runs planned evaluations once each, caching results in ``OUT/results.json``."""

    def __init__(self, args, base_cfg, split: Split | None, source, synthetic_source):
        self.args, self.base, self.split = args, base_cfg, split
        self.source, self.synthetic_source = source, synthetic_source
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.json"
        self.cache: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.runs: dict[str, Any] = self.cache.setdefault("runs", {})
        self.started = time.monotonic()
        self.new_runs = 0
        self.missing: list[str] = []
        self._ray = False
        self.code = code_fingerprint()
        self.data = file_fingerprint(source.path) if split is not None and source is not None else None
        self.bar = None  # the overall progress bar (tqdm), set by main() around search()

    def source_id(self, part: str) -> dict[str, Any]:
        """What a run of ``part`` read: the synthetic stream's settings, or the ratings file,
        the cut and the positives threshold (either half depends on all three)."""
        if part == "synthetic":
            return {"synthetic": self.base.stream.synthetic.model_dump(mode="json")}
        return {"data": self.data, "cut": self.split.cut, "min_weight": self.split.min_weight}

    def current(self, rec: dict[str, Any]) -> bool:
        """True when a cached run read what this invocation reads, in the same chunks."""
        return rec.get("source") == self.source_id(rec["part"]) and rec.get("chunk_size") == self.args.chunk_size

    def _extent(self, part: str) -> tuple[int, int]:
        """``(events, score_from)`` of a run of ``part``."""
        if part == "synthetic":
            return self.args.synthetic_events, 0
        if part == "tune":
            return self.split.positives_first, 0
        return self.split.positives, self.split.positives_first

    # The key holds every resolved knob value, so a later change of the defaults never
    # reuses a run of the old ones.
    def _resolved(self, p: Planned) -> tuple[Any, dict[str, Any], str]:
        cfg = apply_settings(self.base, p.overrides)
        values = knob_values(cfg)
        events, score_from = self._extent(p.part)
        return cfg, values, _key(p.part, p.spec, values if p.spec == "incremental" else {}, self.args.chunk_size, events,
                                 score_from, self.source_id(p.part))

    def get(self, p: Planned) -> dict[str, Any] | None:
        """The cached result of ``p``, running it first when time is left; None when skipped."""
        cfg, values, key = self._resolved(p)
        if key in self.runs:
            if self.bar is not None:  # free: out of the bar's count, so its rate and ETA are of real runs
                self.bar.total -= 1
                self.bar.refresh()
            return self.runs[key]
        limit = self.args.max_minutes
        if limit is not None and time.monotonic() - self.started > 60 * limit:
            self.missing.append(f"{p.part}: {p.spec} {_name(p.overrides)} seed {values['seed']}")
            return None
        rec = self._run(p, cfg, values)
        rec.update(source=self.source_id(p.part), chunk_size=self.args.chunk_size)
        self.runs[key] = rec
        self.new_runs += 1
        self._save()
        if self.bar is not None:
            self.bar.update(1)
        return rec

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache, indent=1))
        tmp.replace(self.path)

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized() or self._ray:
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        tmp = ray_temp_dir("frtune")
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
                 log_to_driver=False, configure_logging=False, _system_config=self.base.ray.system_config())
        self._ray = True

    def close(self) -> None:
        if self._ray:
            import ray

            ray.shutdown()
            self._ray = False

    def _run(self, p: Planned, cfg, values: dict[str, Any]) -> dict[str, Any]:
        import torch
        from tqdm import tqdm

        from workers.eval.protocol import prequential
        from workers.eval.strategies import make_strategy

        source = self.synthetic_source if p.part == "synthetic" else self.source
        total, score_from = self._extent(p.part)
        if p.spec == "incremental":
            self._init_ray()
        label = f"[{p.part}] {p.spec} {_name(p.overrides)} seed {values['seed']}"
        left = f" of at most {self.bar.total}" if self.bar is not None else ""
        tqdm.write(f"{time.strftime('%H:%M:%S')} run {self.new_runs + 1}{left}: {label} ({total:,} events"
                   + (f", scored from offset {score_from:,}" if score_from else "") + ")", file=sys.stderr)
        load0 = os.getloadavg()[0]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as run_eval: CPU seconds measure work, not idle spinning
        t0 = time.time()
        strategy = make_strategy(p.spec, cfg, total_events=total)
        try:
            res = prequential(source, strategy, chunk_size=self.args.chunk_size, max_events=total,
                              progress=not self.args.no_progress, score_from=score_from)
        finally:
            strategy.close()
            torch.set_num_threads(threads)
        s = res.summary()
        rec = {
            "part": p.part, "spec": p.spec, "name": _name(p.overrides), "overrides": p.overrides, "values": values,
            "role": p.role, "events": res.events, "score_from": score_from, "evaluated": s["evaluated"],
            "recall@10": s["recall@10"], "recall@20": s["recall@20"], "ndcg@10": s["ndcg@10"],
            "coverage": s["coverage"], "cold_events": s["cold_events"], "cold_recall@10": s["cold_recall@10"],
            "cpu_s": round(s["cpu_s"], 2), "wall_s": round(res.wall_s, 1), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
            "code": self.code,
        }
        tqdm.write(f"{time.strftime('%H:%M:%S')}   recall@10 {rec['recall@10']:.4f} over {rec['evaluated']:,} events, "
                   f"{rec['wall_s']:.0f} s, load {load0:.1f} -> {rec['load_after']:.1f}", file=sys.stderr)
        return rec


# --------------------------------------------------------------------------- the plan


def _r(rec: dict[str, Any] | None) -> float | None:
    return None if rec is None else rec["recall@10"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _singles(axes: dict[str, list[float]], base: dict[str, Any]) -> list[tuple[str, Any]]:
    """Step 2's changes: every ``(knob, value)`` of ``axes`` that differs from the default."""
    out = []
    for knob, values in axes.items():
        for v in values:
            if knob in _INT_KNOBS and int(v) == int(base[knob]):
                continue
            if knob not in _INT_KNOBS and math.isclose(float(v), float(base[knob]), rel_tol=1e-9):
                continue
            out.append((knob, v))
    return out


def plan_size(runner: Runner, axes: dict[str, list[float]], seeds: int, max_combos: int) -> int:
    """The most runs :func:`search` can make (cached ones included): the combinations and the
    candidate depend on results, so this counts every one that could be needed."""
    singles = _singles(axes, knob_values(runner.base))
    combos = max(0, min(len({k for k, _ in singles}), max_combos + 1) - 1)
    # popularity + defaults x seeds + singles + combos + candidate x seeds + 2 parts x (2 popularity + defaults + candidate)
    return 1 + seeds + len(singles) + combos + seeds + 2 * 4


def search(runner: Runner, axes: dict[str, list[float]], seeds: int, max_combos: int) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns what was decided (None parts: not run yet)."""
    base = knob_values(runner.base)
    s0 = base["seed"]
    seed_list = [s0 + j for j in range(seeds)]
    out: dict[str, Any] = {"defaults": {k: v for k, v in base.items() if k != "seed"}, "seeds": seed_list, "complete": False}
    pop_tune = runner.get(Planned("tune", "popularity", {}, "baseline"))
    out["popularity_tune"] = _r(pop_tune)
    # 1. the defaults at every seed
    d_runs = [runner.get(Planned("tune", "incremental", {"seed": s}, "defaults")) for s in seed_list]
    # 2. one knob at a time, seed 0
    singles = [(knob, v, runner.get(Planned("tune", "incremental", {knob: v}, "axis"))) for knob, v in _singles(axes, base)]
    if any(r is None for r in d_runs):
        return out
    d0 = d_runs[0]["recall@10"]
    d_mean, d_std = _mean_std([r["recall@10"] for r in d_runs])
    out.update(defaults_tune_mean=d_mean, defaults_tune_std=d_std, defaults_tune_seed0=d0)
    if any(r is None for _, _, r in singles) or pop_tune is None:
        return out
    best: dict[str, tuple[Any, float]] = {}
    for knob, v, rec in singles:
        gain = rec["recall@10"] - d0
        if knob not in best or gain > best[knob][1]:
            best[knob] = (v, gain)
    improving = sorted(((k, v, g) for k, (v, g) in best.items() if g > d_std), key=lambda t: -t[2])
    out["improving"] = [{"knob": k, "value": v, "gain": g} for k, v, g in improving]
    # 3. cumulative combinations of the improving knobs
    combos: list[tuple[dict, dict | None]] = []
    for n in range(2, min(len(improving), max_combos + 1) + 1):
        ov = {k: v for k, v, _ in improving[:n]}
        combos.append((ov, runner.get(Planned("tune", "incremental", ov, "combo"))))
    if any(r is None for _, r in combos):
        return out
    # 4. the candidate and its seeds
    pool = [({k: v}, g + d0) for k, v, g in improving] + [(ov, r["recall@10"]) for ov, r in combos]
    cand = max(pool, key=lambda t: t[1])[0] if pool else None
    out["candidate"] = cand
    c_runs = []
    if cand is not None:
        c_runs = [runner.get(Planned("tune", "incremental", {**cand, "seed": s}, "candidate")) for s in seed_list]
        if any(r is None for r in c_runs):
            return out
        c_mean, c_std = _mean_std([r["recall@10"] for r in c_runs])
        se = math.sqrt(c_std**2 / seeds + d_std**2 / seeds)
        out.update(candidate_tune_mean=c_mean, candidate_tune_std=c_std, tune_se=se,
                   passes_tuning=bool(c_mean - d_mean > 2 * se))
    # 5. held-out and synthetic: popularity, the defaults, the candidate
    final = {"defaults": {}} if cand is None else {"defaults": {}, "candidate": cand}
    for part in ("heldout", "synthetic"):
        got = {"popularity": runner.get(Planned(part, "popularity", {}, "baseline")),
               "popularity:halflife=2000": runner.get(Planned(part, "popularity:halflife=2000", {}, "baseline"))}
        for role, ov in final.items():
            got[role] = runner.get(Planned(part, "incremental", ov, role))
        out[part] = got
    if any(r is None for part in ("heldout", "synthetic") for r in out[part].values()):
        return out
    if cand is None:
        out["recommend"] = "keep the defaults: no knob beat them on the tuning half by more than the seed noise"
    else:
        h_ok = out["heldout"]["candidate"]["recall@10"] >= out["heldout"]["defaults"]["recall@10"]
        s_ok = out["synthetic"]["candidate"]["recall@10"] >= 0.97 * out["synthetic"]["defaults"]["recall@10"]
        out.update(heldout_not_worse=h_ok, synthetic_within_3pct=s_ok)
        if out["passes_tuning"] and h_ok and s_ok:
            out["recommend"] = f"adopt {_name(cand)}"
        else:
            why = [w for w, ok in (("it does not beat the defaults by 2 SE over seeds on the tuning half", out["passes_tuning"]),
                                    ("it is below the defaults on the held-out half", h_ok),
                                    ("it loses more than 3% on the synthetic stream", s_ok)) if not ok]
            out["recommend"] = f"keep the defaults: candidate {_name(cand)} fails: " + "; ".join(why)
    out["complete"] = True
    return out


# --------------------------------------------------------------------------- report


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def tables(runner: Runner, res: dict[str, Any]) -> str:
    """The report as Markdown: the split, the tuning runs, held-out and synthetic tables."""
    sp = runner.split
    lines: list[str] = []
    if sp is not None:
        lines += [
            "### Split", "",
            f"`{sp.data}`: {sp.ratings:,} ratings; cut at {sp.cut:.0f} ({sp.cut_utc}, rule: {sp.cut_rule}).",
            "", "| half | ratings | positives (rating >= %g) | from | to | users | items |" % (sp.min_weight or 0),
            "|---|---:|---:|---|---|---:|---:|",
            f"| tuning (timestamp < cut) | {sp.ratings_first:,} | {sp.positives_first:,} | {sp.first_from_utc} | {sp.first_to_utc} | {sp.users_first:,} | {sp.items_first:,} |",
            f"| held-out (timestamp >= cut) | {sp.ratings_second:,} | {sp.positives_second:,} | {sp.second_from_utc} | {sp.second_to_utc} | {sp.users_second:,} | {sp.items_second:,} |",
            "", f"Users with positives in both halves: {sp.users_both:,}; items in both: {sp.items_both:,}.", "",
        ]
    pop = res.get("popularity_tune")
    tune = sorted((r for r in runner.runs.values() if r["part"] == "tune" and r["spec"] == "incremental"
                   and runner.current(r) and _matches_base(r, runner)), key=lambda r: (r["role"] != "defaults", r["started"]))
    if tune:
        d0 = res.get("defaults_tune_seed0")
        lines += ["### Tuning half (every setting tried)", "",
                  f"popularity recall@10 on the tuning half: {_f(pop)}" + (f"; defaults over seeds {res['seeds']}: "
                  f"{_f(res.get('defaults_tune_mean'))} ± {_f(res.get('defaults_tune_std'))} (sample std = the noise sigma)"
                  if res.get("defaults_tune_mean") is not None else ""), "",
                  "| setting | seed | role | recall@10 | × popularity | gain vs defaults (seed 0) | recall@20 | NDCG@10 | coverage | wall s | load |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in tune:
            gain = r["recall@10"] - d0 if d0 is not None and r["values"]["seed"] == res["seeds"][0] else None
            lines.append(
                f"| {r['name']} | {r['values']['seed']} | {r['role']} | {_f(r['recall@10'])} | "
                f"{_f(r['recall@10'] / pop if pop else None, 3)} | {'–' if gain is None else f'{gain:+.4f}'} | "
                f"{_f(r['recall@20'])} | {_f(r['ndcg@10'])} | {_f(r['coverage'], 3)} | {r['wall_s']:.0f} | "
                f"{r['load_before']:.1f}→{r['load_after']:.1f} |")
        lines.append("")
    if res.get("improving") is not None:
        imp = ", ".join(f"{d['knob']}={d['value']:g} ({d['gain']:+.4f})" for d in res["improving"]) or "none"
        lines += [f"Knobs whose best value beat the defaults by more than sigma: {imp}.", ""]
    if res.get("candidate") is not None and res.get("candidate_tune_mean") is not None:
        lines += [f"Candidate {_name(res['candidate'])}: tuning-half recall@10 {_f(res['candidate_tune_mean'])} ± "
                  f"{_f(res['candidate_tune_std'])} over seeds vs defaults {_f(res['defaults_tune_mean'])}; "
                  f"difference {res['candidate_tune_mean'] - res['defaults_tune_mean']:+.4f}, 2 SE = {2 * res['tune_se']:.4f}: "
                  f"{'passes' if res['passes_tuning'] else 'does not pass'}.", ""]
    for part, title in (("heldout", "Held-out half (learned the tuning half first, scored from the cut)"),
                        ("synthetic", f"Synthetic stream ({runner.args.synthetic_events:,} events)")):
        got = res.get(part)
        if not got or any(v is None for v in got.values()):
            continue
        p = got["popularity"]["recall@10"]
        lines += [f"### {title}", "",
                  "| strategy | recall@10 | × popularity | recall@20 | NDCG@10 | coverage | evaluated | cold | wall s | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for role, r in got.items():
            label = {"defaults": "incremental, defaults", "candidate": f"incremental, {r['name']}"}.get(role, role)
            lines.append(f"| {label} | {_f(r['recall@10'])} | {_f(r['recall@10'] / p if p else None, 3)} | "
                         f"{_f(r['recall@20'])} | {_f(r['ndcg@10'])} | {_f(r['coverage'], 3)} | {r['evaluated']:,} | "
                         f"{r['cold_events']:,} | {r['wall_s']:.0f} | {r['load_before']:.1f}→{r['load_after']:.1f} |")
        lines.append("")
    if res.get("recommend"):
        lines += [f"**Recommendation:** {res['recommend']}.", ""]
    return "\n".join(lines)


def _matches_base(rec: dict[str, Any], runner: Runner) -> bool:
    """True when a cached tuning run was made around the current defaults (its knobs differ
    from them only where it overrode them)."""
    base = knob_values(runner.base)
    return all(rec["values"].get(k) == v for k, v in base.items() if k not in rec["overrides"] and k != "seed")


def plot(runner: Runner, res: dict[str, Any], path: Path) -> None:
    """``path``: tuning-half recall@10 per setting (seed band of the defaults), held-out and synthetic bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tune = [r for r in runner.runs.values() if r["part"] == "tune" and r["spec"] == "incremental" and runner.current(r)
            and _matches_base(r, runner) and r["values"]["seed"] == res["seeds"][0]]
    tune.sort(key=lambda r: r["recall@10"])
    fig, axes = plt.subplots(1, 3, figsize=(17, max(4.5, 0.32 * len(tune) + 1.5)), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    names = [r["name"] for r in tune]
    ax.barh(range(len(tune)), [r["recall@10"] for r in tune],
            color=["tab:orange" if r["role"] == "defaults" else "tab:green" if r["role"] in ("combo", "candidate") else "tab:blue" for r in tune])
    ax.set_yticks(range(len(tune)), names, fontsize=8)
    if res.get("defaults_tune_mean") is not None:
        m, s = res["defaults_tune_mean"], res["defaults_tune_std"]
        ax.axvspan(m - s, m + s, color="tab:orange", alpha=0.2, label="defaults, mean ± sigma over seeds")
    if res.get("popularity_tune"):
        ax.axvline(res["popularity_tune"], color="k", ls=":", label="popularity")
        ax.axvline(1.4 * res["popularity_tune"], color="r", ls="--", label="1.4 × popularity")
    lo = min([r["recall@10"] for r in tune] + [res.get("popularity_tune") or 1.0])
    ax.set_xlim(0.9 * lo, None)
    ax.set_xlabel("recall@10, tuning half (seed 0)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("search: one knob at a time, then combinations")
    for ax, part, title in ((axes[1], "heldout", "held-out half"), (axes[2], "synthetic", "synthetic stream")):
        got = res.get(part) or {}
        got = {k: v for k, v in got.items() if v is not None}
        ax.bar(range(len(got)), [v["recall@10"] for v in got.values()], color="tab:gray")
        ax.set_xticks(range(len(got)), [k if k != "candidate" else "candidate" for k in got], rotation=30, ha="right", fontsize=8)
        if "popularity" in got:
            ax.axhline(1.4 * got["popularity"]["recall@10"], color="r", ls="--", label="1.4 × popularity")
            ax.legend(fontsize=7)
        ax.set_ylabel("recall@10")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_grid(text: str, cfg) -> dict[str, list[float]]:
    """``--grid``: ``default`` (:data:`AXES`), ``tiny`` (:data:`TINY_AXES`) or a JSON object
    ``{knob: [values]}``, each value checked against ``cfg`` (the defaults tuned around) as the
    run would set it, so a bad one is refused before any run rather than failing hours in.

    Raises:
        ValueError: naming the knob and value at fault.
    """
    if text in ("default", "tiny"):
        axes = AXES if text == "default" else TINY_AXES
    else:
        try:
            axes = json.loads(text)
        except ValueError:
            axes = None
        if not isinstance(axes, dict):
            raise ValueError(f"want 'default', 'tiny' or a JSON object {{knob: [values]}}, got {text!r}")
    bad = sorted(set(axes) - set(KNOBS) | ({"seed"} & set(axes)))
    if bad:
        raise ValueError(f"unknown or reserved knob(s) {bad}; known: {', '.join(k for k in KNOBS if k != 'seed')}")
    for knob, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{knob}: want a non-empty list of numbers, got {values!r}")
        for v in values:
            # bool is an int to Python, and apply_settings would quietly truncate 2.5 to 2.
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{knob}: {v!r} is not a finite number")
            if knob in _INT_KNOBS and not float(v).is_integer():
                raise ValueError(f"{knob}: {v!r} is not an integer")
            try:
                apply_settings(cfg, {knob: v})
            except ValueError as e:
                why = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                raise ValueError(f"{knob}={v!r} is refused by the config: {why}") from None
    return {k: list(v) for k, v in axes.items()}


def _cut(text: str) -> str | float:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"want 'median' or a unix time in seconds, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tune_defaults", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MovieLens ratings file (ratings.csv, ratings.dat, u.data) or its directory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for results.json (the run cache), summary.json, tables.md and the PNG (default {DEFAULT_OUT})")
    p.add_argument("--config", help="Freshet YAML whose settings are the defaults to tune around (default: built-in defaults)")
    p.add_argument("--cut", type=_cut, default="median", help="'median' (default) or a unix time in seconds: the first half is timestamp < cut")
    p.add_argument("--min-weight", type=float, default=4.0, help="ratings >= this are the positives (default 4, as freshet eval)")
    p.add_argument("--chunk-size", type=at_least(1), default=20, help="events ranked, then learned, at a time (default 20)")
    p.add_argument("--grid", default="default", help="'default' (AXES), 'tiny' (TINY_AXES) or a JSON object {knob: [values]}")
    p.add_argument("--seeds", type=at_least(2), default=3,
                   help="seeds of the defaults and the candidate on the tuning half, at least 2: the seed noise needs two runs (default 3)")
    p.add_argument("--max-combos", type=at_least(1), default=2, help="most cumulative combinations of improving knobs (default 2)")
    p.add_argument("--synthetic-events", type=at_least(1), default=60_000, help="events of the synthetic check (default 60,000)")
    p.add_argument("--max-minutes", type=at_least(0, float),
                   help="start no new run after this many minutes; rerun to continue (exit 3); 0: no new run, report what is cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the search; print the tables when it is complete. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    from serving.config import load_config
    from workers.config import StreamConfig, StreamKind
    from workers.streams import open_source

    try:
        cfg = load_config(args.config)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"argument --config: {e}")
    try:
        axes = parse_grid(args.grid, cfg)
    except ValueError as e:
        parser.error(f"argument --grid: {e}")
    try:
        cut = None if args.cut == "median" else args.cut
        source, split = split_ratings(args.data, cut=cut, min_weight=args.min_weight, model=cfg.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"tune_defaults: {e}", file=sys.stderr)
        return 2
    syn = open_source(StreamConfig(kind=StreamKind.SYNTHETIC, num_events=args.synthetic_events, synthetic=cfg.stream.synthetic))
    runner = Runner(args, cfg, split, source, syn)
    runner.cache["split"] = asdict(split)
    print(f"split: cut {split.cut:.0f} ({split.cut_utc}); tuning half {split.ratings_first:,} ratings / "
          f"{split.positives_first:,} positives, held-out half {split.ratings_second:,} / {split.positives_second:,}",
          file=sys.stderr, flush=True)
    from tqdm import tqdm

    # Cached runs leave the bar's total as they are found (they cost nothing), so its rate and
    # ETA are the average of the runs made here; smoothing 0: runs differ too much for a moving one.
    try:
        with tqdm(total=plan_size(runner, axes, args.seeds, args.max_combos), desc="runs (at most)", unit="run",
                  smoothing=0, disable=args.no_progress, file=sys.stderr) as runner.bar:
            res = search(runner, axes, args.seeds, args.max_combos)
            if res["complete"]:
                runner.bar.total = runner.bar.n  # the plan is settled: no candidate or fewer combinations
                runner.bar.refresh()
    finally:
        runner.bar = None
        runner.close()
        runner._save()
    out = Path(args.out)
    summary = {"split": asdict(split), "axes": axes, "knobs": KNOBS, "command": " ".join(sys.argv), **res}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    md = tables(runner, res)
    (out / "tables.md").write_text(md + "\n")
    try:
        plot(runner, res, out / "tune_defaults.png")
    except Exception as e:  # the figures matter, the picture is a convenience
        print(f"plot skipped: {e}", file=sys.stderr)
    print(md)
    if not res["complete"]:
        left = len(runner.missing)
        print(f"incomplete: {runner.new_runs} run(s) done in this invocation; {left} known run(s) left "
              f"(later steps depend on them). Rerun the same command to continue.", file=sys.stderr)
        return 3
    print(f"complete: {len(runner.runs)} runs cached in {runner.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
