"""Smoke test of ``bench.tune_defaults``: the split is by time and disjoint, settings reach
the config, and a tiny grid on a tiny ratings file runs end to end (tuning half, held-out
half with warm-up, synthetic check) and resumes from its cache.

Nothing here is timed; the figures live in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from bench.tune_defaults import AXES, KNOBS, Planned, Runner, apply_settings, knob_values, main, median_cut, split_ratings
from serving.config import FreshetConfig


def _ratings_csv(path, n_users: int = 12, n_items: int = 25, per_user: int = 30, seed: int = 0):
    """A ratings.csv (CRLF, header) whose rows are NOT in time order, with a tie at the median."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for i in rng.choice(np.arange(1, n_items + 1), per_user if per_user <= n_items else n_items, replace=False):
            rating = float(rng.choice([2.0, 3.5, 4.0, 4.5, 5.0], p=[0.1, 0.1, 0.3, 0.2, 0.3]))
            rows.append((u, int(i), rating, int(1_000_000 + rng.integers(0, 10_000))))
    rng.shuffle(rows)
    stamps = sorted(r[3] for r in rows)
    mid = stamps[len(stamps) // 2]
    rows.append((1, 1, 5.0, mid))  # a second rating at the cut: ties go to the second half together
    text = "userId,movieId,rating,timestamp\r\n" + "".join(f"{u},{i},{r},{t}\r\n" for u, i, r, t in rows)
    path.write_bytes(text.encode())
    return rows


def test_split_is_by_time_and_disjoint(tmp_path):
    f = tmp_path / "ratings.csv"
    rows = _ratings_csv(f, per_user=25)
    source, split = split_ratings(f, min_weight=4.0)
    stamps = np.array([r[3] for r in rows], np.float64)
    assert split.cut == median_cut(stamps) == float(np.sort(stamps)[len(stamps) // 2])
    assert split.ratings == len(rows)
    assert split.ratings_first == int((stamps < split.cut).sum()) and split.ratings_first + split.ratings_second == len(rows)
    batch = source.read(0, source.end_offset)
    ts = batch.column("timestamp").to_numpy()
    k = split.positives_first
    # By time: everything before the held-out offset is strictly before the cut, the rest at or after it.
    assert ts[:k].max() < split.cut <= ts[k:].min()
    assert np.all(np.diff(ts) >= 0)
    # Disjoint and complete: the two halves partition the positives of the file.
    ev = list(zip(batch.column("user_id").to_pylist(), batch.column("item_id").to_pylist(), ts.tolist()))
    first, second = set(ev[:k]), set(ev[k:])
    assert not first & second
    positives = {(u, i, float(t)) for u, i, r, t in rows if r >= 4.0}
    assert first | second == positives and len(ev) == len(positives) == split.positives
    assert split.positives_first + split.positives_second == split.positives
    # A given cut is used as is.
    _, given = split_ratings(f, cut=float(np.sort(stamps)[10]), min_weight=4.0)
    assert given.cut_rule == "given" and given.ratings_first == 10


def test_settings_reach_the_config():
    base = FreshetConfig()
    cfg = apply_settings(base, {"lr_item": 0.1, "lr_user": 0.4, "dim": 32, "num_negatives": 8, "passes": 2,
                                "recent_weight": 2.0, "context_items": 5, "l2": 0.0, "seed": 3})
    v = knob_values(cfg)
    assert (v["lr_item"], v["lr_user"], v["dim"], v["num_negatives"], v["passes"]) == (0.1, 0.4, 32, 8, 2)
    assert (v["recent_weight"], v["context_items"], v["l2"], v["seed"]) == (2.0, 5, 0.0, 3)
    assert cfg.ps.tables[cfg.model.context_table].dim == 32 and cfg.ps.optimizer_for("item_bias").lr == 0.1
    assert knob_values(apply_settings(base, {})) == knob_values(base)
    assert set(AXES) <= set(KNOBS)
    with pytest.raises(ValueError, match="unknown knob"):
        apply_settings(base, {"nope": 1})


def test_tiny_grid_runs_end_to_end_and_resumes(tmp_path, ray_cluster, capsys):
    f = tmp_path / "ratings.csv"
    _ratings_csv(f, n_users=10, n_items=20, per_user=16)
    out = tmp_path / "out"
    argv = ["--data", str(f), "--out", str(out), "--grid", "tiny", "--seeds", "2", "--synthetic-events", "200",
            "--chunk-size", "10", "--no-progress"]
    # Stops before its first run, then resumes to the end.
    assert main(argv + ["--max-minutes", "0"]) == 3
    assert main(argv) == 0
    text = capsys.readouterr().out
    for heading in ("### Split", "### Tuning half", "### Held-out half", "### Synthetic stream", "**Recommendation:**"):
        assert heading in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["recommend"]
    sp = summary["split"]
    runs = json.loads((out / "results.json").read_text())["runs"].values()
    tune = [r for r in runs if r["part"] == "tune"]
    held = [r for r in runs if r["part"] == "heldout"]
    # Tuning runs read the first half only; held-out runs learn it and score only after it.
    assert tune and all(r["events"] == sp["positives_first"] and r["score_from"] == 0 for r in tune)
    assert held and all(r["events"] == sp["positives"] and r["score_from"] == sp["positives_first"] for r in held)
    assert {r["name"] for r in tune if r["spec"] == "incremental"} >= {"defaults", "num_negatives=4", "recent_weight=0.5"}
    assert (out / "tune_defaults.png").stat().st_size > 0
    n = len(list(runs))
    assert main(argv) == 0  # everything cached: no new run
    assert len(json.loads((out / "results.json").read_text())["runs"]) == n


def test_the_cache_key_changes_with_the_cut_the_file_and_the_synthetic_stream(tmp_path):
    f = tmp_path / "ratings.csv"
    stamps = sorted(r[3] for r in _ratings_csv(f))
    args = argparse.Namespace(out=tmp_path / "out", chunk_size=20, synthetic_events=100, max_minutes=None, no_progress=True)

    def runner(cut, cfg=None):
        source, split = split_ratings(f, cut=float(cut), min_weight=4.0)
        return Runner(args, cfg or FreshetConfig(), split, source, None)

    def key(r, part="heldout"):
        return r._resolved(Planned(part, "incremental", {}, "defaults"))[2]

    early, late = runner(stamps[len(stamps) // 3]), runner(stamps[len(stamps) // 2])
    # A held-out run reads the whole stream either way: only where scoring starts differs.
    assert early.split.positives == late.split.positives and key(early) != key(late)
    assert key(runner(stamps[len(stamps) // 2])) == key(late)  # same inputs: the cached run is reused
    rec = {"part": "heldout", "source": early.source_id("heldout"), "chunk_size": 20}
    assert early.current(rec) and not late.current(rec)  # the tables list only runs of this cut
    f.write_bytes(f.read_bytes() + b"1,2,5.0,1000001\r\n")  # the file changed under the cache
    assert key(runner(stamps[len(stamps) // 2]), "tune") != key(late, "tune")
    other = FreshetConfig.model_validate({"stream": {"synthetic": {"seed": 1}}})
    assert key(runner(stamps[len(stamps) // 2], other), "synthetic") != key(late, "synthetic")
