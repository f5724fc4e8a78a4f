"""workers.eval.compare: the evaluation's private quarantine file goes with its source."""

from __future__ import annotations

import gc
from pathlib import Path

from serving.config import load_config
from workers.eval.compare import _open_source


def test_the_quarantine_dir_goes_when_the_source_does(tmp_path):
    # `freshet eval` left one temp dir per call (hundreds after a few days of runs).
    bad = tmp_path / "ratings.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,2,5.0,100\n1,3,not-a-rating,101\n2,2,4.0,102\n")
    source, _ = _open_source(load_config(None, {}), str(bad), None, None)
    source.read(0, 10)
    qfile = Path(source.quarantine_file)
    assert source.quarantined == 1 and qfile.exists()
    del source
    gc.collect()
    assert not qfile.parent.exists()


def test_the_report_says_how_many_rows_were_quarantined(tmp_path):
    # 1,000 of 2,600 rows quarantined used to leave no trace in report.md, report.json or stdout.
    import json

    from workers.eval.compare import run_eval

    data = tmp_path / "ratings.csv"
    good = [f"{u},{i},4.0,{100 + u * 40 + i}" for u in range(40) for i in range(40)]
    data.write_text("\n".join(["userId,movieId,rating,timestamp", *good, *["1,2,4.0,-5"] * 1000]) + "\n")
    run_eval(load_config(None, {}), data=str(data), strategies=["popularity"], report_dir=tmp_path / "r",
             min_weight=None, progress=False)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["meta"]["quarantined"] == 1000
    assert "1600 events (1000 rows of the data quarantined: not valid events)" in (tmp_path / "r" / "report.md").read_text()


def _q_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("freshet-eval-q-*"))


def test_a_data_file_that_fails_to_open_leaves_no_temp_dir(tmp_path, monkeypatch):
    # Every refused file left a /tmp/freshet-eval-q-* dir: open_source raised before the
    # cleanup of the source was registered.
    import tempfile

    import pytest

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    cfg = load_config(None, {})
    for name, text in (("empty.csv", ""), ("header.csv", "userId,movieId,rating,timestamp\n")):
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ValueError, match="no events"):
            _open_source(cfg, str(f), None, None)
        assert _q_dirs(tmp) == [], name
    # A refusal that points to the quarantine file it wrote keeps it: the reasons are there.
    bad = tmp_path / "bad.csv"
    bad.write_text("userId,movieId,rating,timestamp\n" + "1,x,4.0,100\n" * 5)
    with pytest.raises(ValueError, match="rows valid") as refused:
        _open_source(cfg, str(bad), None, None)
    (kept,) = _q_dirs(tmp)
    assert str(kept / "quarantine.arrow") in str(refused.value) and (kept / "quarantine.arrow").is_file()


def test_a_bad_strategy_spec_changes_nothing(tmp_path, monkeypatch):
    # `--strategies bogus` left an empty --report dir: it was made before the specs were checked.
    import tempfile

    import pytest

    from workers.eval.compare import run_eval

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for specs, why in ((["popularity", "bogus"], "unknown strategy 'bogus'"),
                       (["retrain:bogus=1"], "retrain has no setting 'bogus'")):
        with pytest.raises(ValueError, match=why):
            run_eval(load_config(None, {}), data="synthetic", strategies=specs, report_dir=tmp_path / "r",
                     max_events=100, progress=False)
        assert not (tmp_path / "r").exists() and _q_dirs(tmp) == []


def test_auto_min_weight_keeps_a_parquet_event_log_whole(tmp_path):
    # "auto" was 4 for any file under BPR: a Parquet log of clicks (weight 1.0 when absent) lost
    # every row and the evaluation refused to run.
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.eval.compare import auto_min_weight, run_eval

    rng = np.random.default_rng(0)
    n = 2000
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.table({"user_id": rng.integers(0, 50, n), "item_id": rng.integers(0, 100, n),
                             "timestamp": np.arange(n)}), path)
    cfg = load_config(None, {})
    assert auto_min_weight(cfg, str(path)) is None
    assert auto_min_weight(cfg, str(tmp_path / "ratings.csv")) == 4.0  # a MovieLens file: ratings
    assert auto_min_weight(cfg, "synthetic") is None
    assert auto_min_weight(load_config(None, {"model": {"loss": "mse"}}), str(tmp_path / "ratings.csv")) is None
    run_eval(cfg, data=str(path), strategies=["popularity"], report_dir=tmp_path / "r", progress=False)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["meta"]["min_weight"] is None and report["meta"]["events"] == n


def test_a_parquet_log_is_evaluated_in_timestamp_order(tmp_path):
    # A Parquet source keeps file order (a log's arrival order); the protocol ranks in time
    # order, so an export out of order (here: by user) was learned from the future.
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    n = 400
    ts = rng.permutation(n).astype(np.int64)
    users = rng.integers(0, 20, n)
    order = np.lexsort((ts, users))  # grouped by user, each user's events in time order
    path = tmp_path / "by-user.parquet"
    pq.write_table(pa.table({"user_id": users[order], "item_id": rng.integers(0, 50, n)[order], "timestamp": ts[order]}),
                   path)
    source, _ = _open_source(load_config(None, {}), str(path), None, None)
    stamps = source.read(0, n).column("timestamp").to_numpy()
    assert len(stamps) == n and np.all(np.diff(stamps) >= 0)
