"""``freshet eval --live`` and ``freshet eval``: what is refused before anything starts, what an
interrupted run leaves, and the live report's figures, without a service (no Ray)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.colors as mcolors
import numpy as np
import pytest

from serving import live_eval
from serving.cli import main
from tests.serving.cli.helpers import REPO, cli_env
from workers.eval.protocol import EvalResult

LIVE = ["eval", "--live", "--rate", "50", "--data", "synthetic", "--events", "100", "--no-progress"]


@pytest.fixture
def nothing_starts(monkeypatch):
    """Records (and stops at) any start of Ray or of a service: ``[what, ...]``."""
    from workers.eval import compare

    started: list[str] = []

    def no_ray(*a, **k):
        started.append("ray")
        return False

    def no_service(cfg, own_ray):
        started.append("service")
        raise RuntimeError("stub: the service would start here")

    monkeypatch.setattr(compare, "_init_ray", no_ray)
    monkeypatch.setattr(live_eval, "_start_service", no_service)
    return started


def _offline(path, **meta) -> str:
    m = {"data": "synthetic", "events": 100, "chunk_size": 20, "min_weight": None, **meta}
    row = {"strategy": "incremental", "evaluated": 10, "recall@10": 0.5}
    path.write_text(json.dumps({"meta": m, "strategies": {"incremental": row, "popularity": {**row, "strategy": "popularity"}}}))
    return str(path)


def test_a_bad_offline_report_is_refused_before_anything_starts(tmp_path, capsys, nothing_starts):
    # A mismatched or missing --offline-report was refused only after the whole live replay.
    report = tmp_path / "r"
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{")
    noinc = tmp_path / "noinc.json"
    noinc.write_text(json.dumps({"meta": {"data": "synthetic", "events": 100, "chunk_size": 20, "min_weight": None},
                                 "strategies": {"popularity": {}}}))
    cases = [
        (str(tmp_path / "absent.json"), "cannot read it: No such file or directory"),
        (str(notjson), "not a JSON report"),
        (_offline(tmp_path / "other.json", events=5000), "made for another stream: events 5000 (this run: 100)"),
        (_offline(tmp_path / "warm.json", score_from=40), "made for another stream: score_from 40 (this run: 0)"),
        (str(noinc), "has no 'incremental' row"),
    ]
    for path, why in cases:
        assert main([*LIVE, "--report", str(report), "--offline-report", path]) == 2
        err = capsys.readouterr().err
        assert f"freshet eval --live: offline report {path}: {why}" in err, err
        assert nothing_starts == [] and not report.exists()
    # A report of this stream passes the check: the run goes on to start its service.
    assert main([*LIVE, "--report", str(report), "--offline-report", _offline(tmp_path / "good.json")]) == 2
    assert "stub: the service would start here" in capsys.readouterr().err
    assert nothing_starts == ["ray", "service"]


def test_live_flags_that_would_be_ignored_or_are_not_a_rate_are_refused(tmp_path, capsys, nothing_starts):
    base = ["eval", "--data", "synthetic", "--report", str(tmp_path / "r")]
    assert main([*base, "--live", "--rate", "50", "--token", "t"]) == 2
    assert "freshet eval --live: --token needs --url" in capsys.readouterr().err
    for rate in ("inf", "-inf", "nan"):
        assert main([*base, "--live", f"--rate={rate}"]) == 2
        assert "--rate: must be a finite number > 0" in capsys.readouterr().err
    assert main([*base, "--token", "t"]) == 2
    assert "need --live" in capsys.readouterr().err
    assert nothing_starts == [] and not (tmp_path / "r").exists()


def test_start_service_removes_its_dir_when_start_up_fails(tmp_path, monkeypatch):
    # Ctrl-C during deploy.start left a /tmp/freshet-live-* dir: only the return value names it.
    import tempfile

    from serving import deploy
    from serving.config import FreshetConfig

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dirs = []

    def interrupted(cfg, **kw):
        dirs.append(cfg.ingest.dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        live_eval._start_service(FreshetConfig(), own_ray=True)
    assert len(dirs) == 1 and dirs[0].startswith(str(tmp_path))
    assert list(tmp_path.glob("freshet-live-*")) == []


def test_ctrl_c_says_what_was_kept_and_removed(tmp_path, monkeypatch, capsys):
    from workers.eval import compare

    def live_interrupted(cfg, *, report_dir, **kw):
        (Path(report_dir) / "offline").mkdir(parents=True)  # made, nothing written yet
        raise KeyboardInterrupt

    monkeypatch.setattr(live_eval, "run_live", live_interrupted)
    report = tmp_path / "live"
    assert main([*LIVE, "--report", str(report)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("freshet eval --live: interrupted; the service and Ray it started (if any) were stopped and its "
                    f"temp dirs removed; no report written; removed the empty {report} it made")]
    assert not report.exists()
    assert main([*LIVE, "--report", str(report), "--url", "http://127.0.0.1:9", "--no-offline"]) == 130
    assert "interrupted; the service at http://127.0.0.1:9 keeps the events already posted" in capsys.readouterr().err

    def plain_interrupted(cfg, *, report_dir, **kw):
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "report.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_eval", plain_interrupted)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("mine")
    rc = main(["eval", "--data", "synthetic", "--strategies", "popularity", "--report", str(kept), "--no-progress"])
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith("freshet eval: interrupted;") and err.rstrip().endswith(
        f"kept the partial report in {kept}: report.json")
    assert (kept / "old.txt").read_text() == "mine"


def test_sigint_on_eval_exits_130_with_one_line_and_no_traceback(tmp_path):
    # Ctrl-C printed a raw KeyboardInterrupt traceback.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    report = tmp_path / "r"
    err_path = tmp_path / "err.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            # `python -m serving.cli` with Ctrl-C's default action, as from a terminal: a suite run
            # in the background (`&` in a script, nohup) starts with SIGINT ignored, every child
            # inherits that, and Python then leaves it ignored (two CI runs replayed on after it).
            [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "runpy.run_module('serving.cli', run_name='__main__', alter_sys=True)",
             "eval", "--data", "synthetic", "--events", "3000000", "--strategies", "popularity", "--report", str(report)],
            # PYTHONFAULTHANDLER: a SIGABRT makes it print every thread's stack (see below).
            stdout=subprocess.DEVNULL, stderr=err, env=cli_env({"TMPDIR": str(tmp), "PYTHONFAULTHANDLER": "1"}),
            cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while "ev/s" not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)  # the progress bar shows the replay has started
            assert proc.poll() is None, err_path.read_text()[-2000:]
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                # Say where it is: its threads' stacks, before it goes.
                proc.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                pytest.fail(f"freshet eval still running 120 s after SIGINT; its stderr ends:\n"
                            f"{err_path.read_text()[-6000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err_path.read_text()
    assert rc == 130, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
    assert f"freshet eval: interrupted; the Ray it started (if any) was shut down and its temp files removed; no report " \
           f"written; removed the empty {report} it made" in text
    assert not report.exists() and list(tmp.glob("freshet-eval-q-*")) == []


# --------------------------------------------------------------------------- the live report


def _result(name: str, n: int, start: int = 100) -> EvalResult:
    offs = np.arange(start, start + n, dtype=np.int64)
    return EvalResult(name, {}, events=200, eval_offsets=offs, eval_ranks=offs % 30 - 10, wall_s=2.0)


def _meta(**kw) -> dict:
    m = {"data": "synthetic", "events": 200, "chunk_size": 20, "min_weight": None, "k": 20, "rate_target": 50.0,
         "rate_achieved": 49.0, "score_from": 100, "warmup_s": 1.0, "behind_schedule_max_s": 0.0, "url": "http://x",
         "started_service": True, "loss": "bpr", "window": 20, "machine_before": {"cpus": 2, "loadavg": [0.0] * 3},
         "machine_after": {"cpus": 2, "loadavg": [0.0] * 3}, "created": "now"}
    return {**m, **kw}


def _replay(evaluated: int, scored_chunks: int) -> SimpleNamespace:
    return SimpleNamespace(live=_result("live", evaluated), popularity=_result("popularity", evaluated), fallbacks={},
                           rank_ms=[1.0, 2.0], events_ms=[3.0], retries=0, lag=[(0.0, 0, 0.0)],
                           scored_chunks=scored_chunks, behind_s=0.0, warmup_s=1.0)


def _offline_side() -> dict:
    row = {"strategy": "incremental", "events": 200, "evaluated": 40, "recall@10": 0.5, "recall@20": 0.6,
           "ndcg@10": 0.3, "coverage": None, "wall_s": 1.0, "events_per_s": 200.0}
    curve = {"offset": [120, 160, 200], "recall@10": [0.4, 0.5, None]}
    return {"strategies": {"incremental": row, "popularity": {**row, "strategy": "popularity", "recall@10": 0.3}},
            "windowed_recall": {"incremental": curve, "popularity": curve}}


def test_the_live_report_counts_scored_chunks_and_names_both_rates(tmp_path):
    # 40 events evaluated in the 5 scored chunks of 10 (the first 5 a warm-up, never ranked).
    report = live_eval._write(tmp_path, _meta(), _replay(40, 5), _offline_side(), 20)
    assert report["diagnostics"]["evaluated_per_chunk"] == 8.0
    md = (tmp_path / "live.md").read_text()
    assert "the goal at the 50 events/s targeted; 49.0 events/s achieved, at least 95% of it" in md
    assert "the rate achieved" not in md
    # A run that fell behind is held to the goal of the rate it achieved, and says both.
    live_eval._write(tmp_path, _meta(rate_achieved=30.0), _replay(40, 5), _offline_side(), 20)
    assert "the goal at the 30.0 events/s achieved, below the 50 events/s targeted" in (tmp_path / "live.md").read_text()
    # Nothing scored: 0 evaluated and no chunk to divide by; not 1 event in 10 chunks.
    report = live_eval._write(tmp_path, _meta(), _replay(0, 0), _offline_side(), 20)
    assert report["live"]["evaluated"] == 0 and report["diagnostics"]["evaluated_per_chunk"] is None


def test_the_live_plot_gives_each_series_one_colour_in_both_panels(tmp_path):
    import matplotlib.pyplot as plt

    report = live_eval._write(tmp_path, _meta(), _replay(40, 5), _offline_side(), 20)
    fig = live_eval._figure(report, 20)
    try:
        curves, bars = fig.axes[:2]
        line = {ln.get_label(): mcolors.to_rgba(ln.get_color()) for ln in curves.get_lines()}
        bar = {c.get_label(): c.patches[0].get_facecolor() for c in bars.containers}
    finally:
        plt.close(fig)
    pairs = {"live": "live", "offline incremental": "offline incremental", "popularity (client)": "popularity"}
    for curve_name, bar_name in pairs.items():
        assert line[curve_name] == bar[bar_name], (curve_name, line, bar)
    assert len({line[n] for n in pairs}) == 3
