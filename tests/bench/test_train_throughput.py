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

from bench import cpu_between, tree_cpu_s
from bench.train_throughput import (
    GOALS,
    REPORT_KEYS,
    RUN_KEYS,
    _run_ps,
    bench_config,
    build_report,
    fastest,
    merge_peer_rounds,
    format_table,
    in_process_trainer,
    run_in_process,
    run_peer_baselines,
    torchrec_config,
    torchrec_workload,
    write_peer_stream,
    write_report,
)
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
    assert "fastest of" not in table  # one round each: nothing to say

    # Rounds (--repeat): the fastest run is reported, every round's figure beside it.
    slow = {**ps_run, "events_per_s": ps_run["events_per_s"] / 3}
    best = fastest([slow, ps_run, slow])
    assert best["events_per_s"] == ps_run["events_per_s"]
    assert best["all_events_per_s"] == [slow["events_per_s"], ps_run["events_per_s"], slow["events_per_s"]]
    line = [x for x in format_table(build_report(cfg, in_process, {"prefetch on": best}, latency)).splitlines()
            if x.startswith("fastest of")]
    assert line and f"PS, prefetch on {slow['events_per_s']:,.0f} / {ps_run['events_per_s']:,.0f}" in line[0]
    # Peers' rounds merge the same way, keeping every figure of every round.
    a = {"repeat": 2, "skipped": {}, "runs": {"plain 1t": {"events_per_s": 5.0, "all_events_per_s": [4.0, 5.0]}}}
    b = {"repeat": 2, "skipped": {}, "runs": {"plain 1t": {"events_per_s": 6.0, "all_events_per_s": [6.0, 3.0]}}}
    merged = merge_peer_rounds([a, b])
    assert merged["repeat"] == 4 and merged["runs"]["plain 1t"]["events_per_s"] == 6.0
    assert merged["runs"]["plain 1t"]["all_events_per_s"] == [4.0, 5.0, 6.0, 3.0]

    skipped = build_report(cfg, in_process, {}, {"skipped": "serving.app is not importable"})
    json_path, _ = write_report(skipped, tmp_path / "skipped")
    assert json.loads(json_path.read_text())["rank_latency"] == {"skipped": "serving.app is not importable"}
    assert "skipped" in format_table(skipped)


def test_tree_cpu_counts_this_process():
    before = tree_cpu_s()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn 0.3 s of CPU whatever the machine's load
        pass
    assert cpu_between(before, tree_cpu_s()) >= 0.25


def test_bench_config_rejects_bad_input():
    with pytest.raises(ValueError, match="events"):
        bench_config(0)


# --------------------------------------------------------------------------- TorchRec-like workload

TINY_IDS, TINY_EVENTS = 2000, 3000


def _tiny_torchrec(tmp_path, events: int = TINY_EVENTS):
    """Issue 12's workload shape on 2,000 IDs and a few batches of 512."""
    import dataclasses

    from bench.peers import prepare

    w = dataclasses.replace(torchrec_workload(events, num_ids=TINY_IDS), batch=512)
    stream = write_peer_stream(prepare(w), tmp_path / "events.parquet")
    return w, torchrec_config(w, stream)


def test_torchrec_config_is_the_issue_workload(tmp_path):
    w = torchrec_workload(200_000)
    assert (w.num_ids, w.dim, w.batch, w.negatives) == (1_000_000, 64, 4096, 4)
    cfg = torchrec_config(w, tmp_path / "x.parquet")
    m, t = cfg.model, cfg.trainer
    assert (t.batch_size, t.passes, t.num_workers) == (4096, 1, 1)
    assert (m.num_negatives, m.context_table, m.recent_table, m.popularity_negative_fraction) == (4, None, None, 0.0)
    assert m.l2 == w.l2
    for table, lr in (("user", w.lr_user), ("item", w.lr_item)):
        opt = cfg.ps.optimizer_for(table)
        assert (cfg.ps.table(table).dim, opt.kind.value, opt.lr, opt.eps) == (64, "rowwise_adagrad", lr, w.eps)


def test_twin_trains_on_the_peers_events(tmp_path):
    from bench.peers import prepare

    w, cfg = _tiny_torchrec(tmp_path)
    data = prepare(w)
    held = in_process_trainer(cfg)
    got = held.sources[0].read(0, TINY_EVENTS)
    np.testing.assert_array_equal(ids_from_arrow(got.column("user_id")), data.users)  # the very same events
    np.testing.assert_array_equal(ids_from_arrow(got.column("item_id")), data.items)
    r = run_in_process(cfg, progress=False)
    assert r["events"] == TINY_EVENTS and r["batches"] == -(-TINY_EVENTS // 512)
    assert r["loss_last"] < r["loss_first"]
    assert r["rows"][cfg.model.user_table] == len(np.unique(data.users))
    # The peers' rows and Freshet's are one function of the ID: the first loss is ~log 2 for both.
    assert r["loss_first"] == pytest.approx(np.log(2), abs=0.01)


def test_peer_baselines_always_run_plain(tmp_path, monkeypatch):
    from bench import peers

    w, _ = _tiny_torchrec(tmp_path)
    monkeypatch.setattr(peers, "peer_missing", lambda p: None if p == "plain" else f"{p} absent")
    rep = run_peer_baselines(w, ["plain", "torchrec", "fbgemm"], progress=False)
    assert list(rep["runs"]) == ["plain 1t", "plain 2t"]
    assert rep["skipped"] == {"torchrec": "torchrec absent", "fbgemm": "fbgemm absent"}
    assert rep["runs"]["plain 2t"]["threads"] == 2 and rep["runs"]["plain 1t"]["events"] == TINY_EVENTS


def test_report_with_peers_has_ratios_and_goals(tmp_path):
    cfg = bench_config(600)
    ip = run_in_process(cfg, progress=False)
    ps_run = {**ip, "events_per_s": 300.0}
    ip = {**ip, "events_per_s": 240.0}
    peers = {"workload": {"batch": 4096, "negatives": 4}, "skipped": {},
             "runs": {"plain 1t": {**ip, "events_per_s": 200.0}, "plain 2t": {**ip, "events_per_s": 400.0},
                      "torchrec 2t": {**ip, "events_per_s": 250.0}}}
    report = build_report(cfg, ip, {"prefetch on": ps_run}, {"skipped": "x"}, workload="torchrec", peers=peers)
    assert tuple(report) == REPORT_KEYS
    assert report["peer_ratios"]["PS prefetch on"]["torchrec 2t"] == pytest.approx(1.2)
    assert report["peer_ratios"]["in-process"]["plain 2t"] == pytest.approx(0.6)
    g = report["goals"]
    assert g["ps_vs_torchrec"]["value"] == pytest.approx(1.2) and g["ps_vs_torchrec"]["met"] is True
    assert g["twin_vs_plain"]["value"] == pytest.approx(0.6) and g["twin_vs_plain"]["met"] is False
    assert g["twin_vs_plain"]["target"] == GOALS["twin_vs_plain"]
    assert g["twin_vs_plain_1_thread"]["value"] == pytest.approx(1.2)
    json_path, png_path = write_report(report, tmp_path)
    assert json_path.name == "train_throughput_torchrec.json" and png_path.read_bytes()[:4] == b"\x89PNG"
    table = format_table(report)
    assert "torchrec 2t" in table and "ps_vs_torchrec: 1.20x" in table and "NOT met" in table
    # A run with trainer.staleness is reported beside the goal, never as it: it is checked
    # against the twin with the same staleness, and its loss against the exact twin's.
    stale_ip = {**ip, "loss_sum": ip["loss_sum"] * 1.03}
    stale = {**stale_ip, "events_per_s": 400.0, "staleness": 1}
    r = build_report(cfg, {**ip, "staleness_1": stale_ip}, {"prefetch on": ps_run, "staleness 1": stale}, {},
                     workload="torchrec", peers=peers)
    assert r["goals"]["ps_vs_torchrec"]["value"] == pytest.approx(1.2)
    assert r["goals"]["ps_staleness_1_vs_torchrec"]["value"] == pytest.approx(1.6)
    assert r["ratios"]["staleness 1"]["loss_sum_rel_diff"] == 0.0
    assert r["ratios"]["staleness 1"]["loss_vs_exact"] == pytest.approx(0.03)
    assert "loss_vs_exact" not in r["ratios"]["prefetch on"]
    assert "PS, staleness 1: loss sum +3.00% against the exact twin's" in format_table(r)
    # Without TorchRec the PS goal is not measured, and says so.
    del peers["runs"]["torchrec 2t"]
    assert build_report(cfg, ip, {"prefetch on": ps_run}, {}, peers=peers)["goals"]["ps_vs_torchrec"]["met"] is None


@pytest.mark.parametrize("workload, staleness", [("default", 0), ("torchrec", 0), ("torchrec", 1)])
def test_twin_and_ps_agree_on_the_loss(ray_cluster, tmp_path, workload, staleness):
    """The twin and the trainer actor over shard actors compute the same batches, pulls
    and pushes: the same loss sum (the fast path and the pushes' routing are shared).
    With ``trainer.staleness: 1`` too: each shard answers a batch's pull before the
    previous batch's push, as the twin does."""
    import ray  # noqa: F401 - the fixture started it

    from serving import deploy

    if workload == "torchrec":
        _, cfg = _tiny_torchrec(tmp_path)
    else:
        cfg = bench_config(1500)
    cfg = cfg.model_copy(update={
        "namespace": f"agree-{workload}-{staleness}",
        "ingest": cfg.ingest.model_copy(update={"dir": str(tmp_path / "data"), "state_dir": None}),
        "trainer": cfg.trainer.model_copy(update={"staleness": staleness}),
    })
    twin = run_in_process(cfg, progress=False)
    ps, dep = _run_ps(cfg, progress=False)
    try:
        assert ps["events"] == twin["events"] and ps["batches"] == twin["batches"]
        assert ps["loss_sum"] == pytest.approx(twin["loss_sum"], rel=1e-6)
        assert ps["rows"] == twin["rows"]
        if staleness:  # and it is not the exact run's loss: the setting reached the actor
            exact = run_in_process(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"staleness": 0})}),
                                   progress=False)
            assert ps["loss_sum"] != pytest.approx(exact["loss_sum"], rel=1e-6)
    finally:
        deploy.stop(cfg, serving=False)
        del dep


# --------------------------------------------------------------------------- default model and 1M-row table figures


def test_table_figures_at_a_small_size():
    from bench.train_throughput import INDEX_GOAL, RAW_ROW_BYTES_GOAL, run_table_figures

    threads = torch.get_num_threads()
    tf = run_table_figures(20_000, dim=8, batch=512, fill_batch=2048, probes=3, index_rounds=2)
    assert torch.get_num_threads() == threads
    mem = tf["memory"]
    assert mem["rows"] == 20_000 and mem["row_bytes"] == 4 * (8 + 1)
    assert mem["bytes_per_row_ratio"] == pytest.approx(mem["bytes_per_row"] / 36)
    assert mem["goal"] == RAW_ROW_BYTES_GOAL and mem["met"] == (mem["bytes_per_row_ratio"] <= RAW_ROW_BYTES_GOAL)
    assert tf["rows_after_evict"] == 20_000  # new keys into the full table evict as many rows
    assert set(tf["keys_per_s"]) == {"pull", "push", "evict"} and min(tf["keys_per_s"].values()) > 0
    assert tf["fill"]["keys"] == 20_000 and tf["fill"]["keys_per_s"] > 0
    ix = tf["index"]
    assert ix["rows"] == 20_000 and ix["batch"] == 2048 and ix["goal"] == INDEX_GOAL
    assert set(ix["ratio_to_dict"]) == set(ix["met"]) == {"lookup", "insert", "remove"}


def test_report_carries_default_model_and_table_figures(tmp_path):
    from bench.train_throughput import _default_model

    cfg = bench_config(600)
    ip = run_in_process(cfg, progress=False)
    ps_run = {**ip, "events_per_s": ip["events_per_s"] / 4, "train_s": 0.1, "prefetch": True}
    dm = _default_model(ip, {"prefetch on": ps_run}, cfg)
    assert dm["model"]["passes"] == cfg.trainer.passes and dm["model"]["num_negatives"] == cfg.model.num_negatives
    assert dm["model"]["context_table"] == cfg.model.context_table and dm["model"]["events"] == 600
    assert dm["ratios"]["prefetch on"]["events_per_s"] == pytest.approx(0.25)
    assert dm["ratios"]["prefetch on"]["loss_sum_rel_diff"] == 0.0
    tf = {"rows": 1000, "dim": 8, "batch": 64, "fill_batch": 128,
          "fill": {"keys_per_s": 1e6}, "keys_per_s": {"pull": 2e6, "push": 1e6, "evict": 5e5},
          "memory": {"bytes_per_row": 45.0, "bytes_per_row_ratio": 1.25, "rss_bytes_per_row": 60.0,
                     "rss_bytes_per_row_ratio": 1.67, "goal": 1.3, "met": True},
          "index": {"rows": 1000, "batch": 128, "goal": 10.0, "ratio_to_dict": {"lookup": 12.0, "insert": 6.0, "remove": 7.0},
                    "met": {"lookup": True, "insert": False, "remove": False},
                    "keys_per_cpu_s": {"KeyIndex": {"lookup": 1.2e7, "insert": 6e6, "remove": 7e6, "bytes/key": 27.5},
                                       "dict": {"lookup": 1e6, "insert": 1e6, "remove": 1e6, "bytes/key": 110.0}}}}
    report = build_report(cfg, ip, {}, {"skipped": "x"}, workload="torchrec", default_model=dm, table_figures=tf)
    assert tuple(report) == REPORT_KEYS
    json_path, _ = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["default_model"]["ratios"]["prefetch on"]["events_per_s"] == pytest.approx(0.25)
    assert data["table_figures"]["memory"]["bytes_per_row_ratio"] == 1.25
    table = format_table(report)
    assert f"default model ({cfg.trainer.passes} passes x {cfg.model.num_negatives} negatives, context on" in table
    assert "0.25x" in table and "1.250x" in table and "<= 1.3x: met" in table
    assert "12.0x dict" in table and "6.0x dict" in table and "NOT met" in table
    # Not run: empty, and no lines for them.
    bare = build_report(cfg, ip, {}, {"skipped": "x"})
    assert bare["default_model"] == {} and bare["table_figures"] == {}
    assert "default model" not in format_table(bare)
