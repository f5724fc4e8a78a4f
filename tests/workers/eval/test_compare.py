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
