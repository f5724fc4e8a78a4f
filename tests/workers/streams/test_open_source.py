"""``open_source``: the configured stream, of every kind."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.workers.streams.helpers import ML_LINES, _write
from workers.config import StreamConfig, StreamKind
from workers.streams import MovieLensSource, ParquetSource, SyntheticSource, open_source, read_quarantine

def test_open_source_kinds(tmp_path):
    syn = open_source(StreamConfig(num_events=123))
    assert isinstance(syn, SyntheticSource) and syn.end_offset == 123
    f = _write(tmp_path / "ratings.csv", ML_LINES + ["x,1,1,1"])
    q = tmp_path / "q.arrow"
    ml = open_source(StreamConfig(kind=StreamKind.MOVIELENS, path=str(f), min_weight=4.0, num_events=None), quarantine_path=q)
    assert isinstance(ml, MovieLensSource) and ml.end_offset == 3 and ml.quarantined == 1
    assert read_quarantine(q).num_rows == 1
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": [3.0]}), tmp_path / "e.parquet")
    pqs = open_source(StreamConfig(kind=StreamKind.PARQUET, path=str(tmp_path / "e.parquet")))
    assert isinstance(pqs, ParquetSource) and pqs.end_offset == 1
    with pytest.raises(ValueError, match="ingest"):
        open_source(StreamConfig(kind=StreamKind.INGEST))
