"""Tests of ``bench.train_throughput`` without Ray: the in-process baseline does the
PS's math, learns, and the report writer produces the documented files and keys.

Speed targets are not asserted here; they live in ``bench/README.md``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from bench.train_throughput import (
    REPORT_KEYS,
    RUN_KEYS,
    bench_config,
    build_report,
    format_table,
    in_process_trainer,
    run_in_process,
    write_report,
)
from bench.train_throughput import _cpu_between, _tree_cpu_s
from ps.ids import ids_from_arrow, keyed
from workers.model import bpr_loss
from workers.streams import open_source


def _heldout_loss(trainer, users, items, negs) -> float:
    """Mean BPR loss (nats) of held-out (user, item, negatives) triples under the twin's rows."""
    m = trainer.cfg.model
    pull = trainer.client.pull_many
    u = torch.from_numpy(pull({m.user_table: keyed(users)}, initial=True)[m.user_table][0])
    i = pull({m.item_table: keyed(items), m.item_bias_table: keyed(items)}, initial=True)
    n = pull({m.item_table: keyed(negs), m.item_bias_table: keyed(negs)}, initial=True)
    k = len(negs) // len(users)
    loss = bpr_loss(u, torch.from_numpy(i[m.item_table][0]), torch.from_numpy(i[m.item_bias_table][0][:, 0]),
                    torch.from_numpy(n[m.item_table][0]).reshape(len(users), k, -1),
                    torch.from_numpy(n[m.item_bias_table][0][:, 0]).reshape(len(users), k))
    return float(loss) / len(users)


def test_twin_learns_and_counts_every_positive_once():
    cfg = bench_config(2000)
    # Events after the training prefix (same generator; both parts lie after the taste shift).
    held = open_source(bench_config(2512).stream).read(2000, 512)
    users, items = ids_from_arrow(held.column("user_id")), ids_from_arrow(held.column("item_id"))
    negs = np.random.default_rng(7).integers(0, cfg.stream.synthetic.num_items, size=len(users) * 4)

    untrained, trained = in_process_trainer(cfg), in_process_trainer(cfg)
    figures = run_in_process(cfg, trainer=trained, progress=False)
    before = _heldout_loss(untrained, users, items, negs)
    after = _heldout_loss(trained, users, items, negs)
    assert before == pytest.approx(np.log(2), rel=0.02)  # tiny init: every score ~0
    assert after < before - 0.05

    assert figures["events"] == 2000
    assert figures["batches"] == int(np.ceil(2000 / cfg.trainer.batch_size))
    assert figures["loss_last"] < figures["loss_first"]
    assert figures["events_per_s"] > 0 and figures["wall_s"] > 0
    trained_users = ids_from_arrow(open_source(cfg.stream).read(0, 2000).column("user_id"))
    assert figures["rows"][cfg.model.user_table] == len(np.unique(trained_users))
    # The popularity table counted every positive exactly once.
    shard = trained.client.shard
    assert float(shard.tables[cfg.model.popularity_table].matrix().sum()) == 2000.0


def test_twin_is_deterministic():
    cfg = bench_config(1200)
    a = run_in_process(cfg, progress=False)
    b = run_in_process(cfg, progress=False)
    assert a["loss_sum"] == b["loss_sum"] and a["rows"] == b["rows"]


def test_report_has_documented_keys_and_files(tmp_path):
    cfg = bench_config(600)
    in_process = run_in_process(cfg, progress=False)
    assert set(RUN_KEYS) <= set(in_process)
    # A stand-in PS run: half as fast, same loss.
    ps_run = {**in_process, "events_per_s": in_process["events_per_s"] / 2, "ms_per_batch": in_process["ms_per_batch"] * 2,
              "train_s": 0.1, "prefetch": True}
    lat = {"n": 3, "p50_ms": 2.0, "p99_ms": 3.0, "mean_ms": 2.1, "min_ms": 1.0, "max_ms": 3.0}
    latency = {"rank_known": {**lat, "fallback_popular": 0}, "rank_unknown": {**lat, "fallback_popular": 3}, "healthz": lat}
    report = build_report(cfg, in_process, {"prefetch on": ps_run}, latency, bench={"events": 600})
    json_path, png_path = write_report(report, tmp_path / "out")

    data = json.loads(json_path.read_text())
    assert tuple(data) == REPORT_KEYS
    assert data["ratios"]["prefetch on"]["events_per_s"] == pytest.approx(0.5)
    assert data["ratios"]["prefetch on"]["overhead_ms_per_batch"] == pytest.approx(in_process["ms_per_batch"])
    assert data["ratios"]["prefetch on"]["loss_sum_rel_diff"] == 0.0
    assert data["ratios"]["prefetch on"]["cpu_per_event"] == pytest.approx(1.0)
    assert {"cpu_count", "torch", "ray", "python"} <= set(data["machine"])
    assert data["config"]["trainer"]["batch_size"] == cfg.trainer.batch_size
    assert data["date"][:4].isdigit()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report)
    assert "in-process" in table and "0.50x" in table and "/healthz" in table

    skipped = build_report(cfg, in_process, {}, {"skipped": "serving.app is not importable"})
    json_path, _ = write_report(skipped, tmp_path / "skipped")
    assert json.loads(json_path.read_text())["rank_latency"] == {"skipped": "serving.app is not importable"}
    assert "skipped" in format_table(skipped)


def test_tree_cpu_counts_this_process():
    before = _tree_cpu_s()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU whatever the machine's load
        pass
    assert _cpu_between(before, _tree_cpu_s()) >= 0.25


def test_bench_config_rejects_bad_input():
    with pytest.raises(ValueError, match="events"):
        bench_config(0)
