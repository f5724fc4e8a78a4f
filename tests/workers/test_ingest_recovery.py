"""IngestLog recovery of a local log (a real log on real files, no Ray) never destroys what
it cannot read: a segment it cannot open, or an earlier segment that ends before the next
one begins, stops start-up naming the segment and leaves the files as they were, so the
log starts whole once the fault is gone."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pytest

from tests.workers.test_ingest_log import SyncLog
from workers import ingest_log
from workers.config import IngestConfig
from workers.ingest_log import read_first_offsets


def _cfg(tmp_path: Path) -> IngestConfig:
    return IngestConfig(dir=str(tmp_path), fsync=True, segment_events=4)


def _fill(log: SyncLog) -> None:
    for i in range(4):  # two appends of two events per segment: segments from 0 and 4
        log.append([2 * i, 2 * i + 1], [1, 2], [1.0, 2.0], [1.0, 1.0])


def _segments(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ingest").glob("segment-*"))


def test_a_segment_that_cannot_be_opened_stops_start_up_and_is_kept(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _fill(SyncLog(cfg))
    last = _segments(tmp_path)[-1]
    real_map = pa.memory_map

    def no_map(path, *a, **k):
        if Path(path) == last:  # e.g. too many open files, or a mount that cannot map files
            raise OSError(errno.EMFILE, f"Too many open files: {path}")
        return real_map(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(ingest_log.pa, "memory_map", no_map)
        with pytest.raises(RuntimeError, match=rf"ingest log {tmp_path / 'ingest'}: segment {last.name} cannot be opened"):
            SyncLog(cfg)
    assert last.exists()
    again = SyncLog(cfg)
    assert again.read(0, 100).column("offset").to_pylist() == list(range(8))


def test_an_earlier_segment_ending_short_of_the_next_stops_start_up_and_is_not_cut(tmp_path):
    cfg = _cfg(tmp_path)
    log = SyncLog(cfg)
    _fill(log)
    first = _segments(tmp_path)[0]
    second_batch = log.log._parts[0].segments[0].positions[1]
    data = first.read_bytes()
    # Damage the second batch of a complete, acknowledged segment (not the log's tail).
    first.write_bytes(data[:second_batch] + b"\x00" * 8 + data[second_batch + 8 :])
    with pytest.raises(RuntimeError, match=rf"segment {first.name} ends at offset 2 where the next segment begins at 4"):
        SyncLog(cfg)
    assert first.stat().st_size == len(data)  # nothing cut: the damage can still be repaired
    first.write_bytes(data)
    assert SyncLog(cfg).read(0, 100).column("offset").to_pylist() == list(range(8))


@pytest.mark.parametrize("text", ['{"format": "freshet-ingest-meta", "partit', "[1, 2]"])
def test_a_damaged_meta_file_stops_start_up_naming_it(tmp_path, text):
    cfg = _cfg(tmp_path)
    log = SyncLog(cfg)
    _fill(log)
    log.commit("c", {0: 4})
    (tmp_path / "ingest" / "META.json").write_text(text)
    where = rf"ingest log {tmp_path / 'ingest'}: META\.json is not"
    with pytest.raises(RuntimeError, match=where):
        SyncLog(cfg)
    with pytest.raises(RuntimeError, match=where):
        read_first_offsets(cfg)
