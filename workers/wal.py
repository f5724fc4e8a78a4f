"""A trainer's write-ahead record of pushes not yet acknowledged by every shard, and
its committed offset, as Arrow IPC files and a small JSON file (never pickle).

A push is written here before it is sent and deleted once every shard has acknowledged
it. After a crash the restarted trainer re-sends what is left: shards that already
applied a push drop it by push id, the others apply the very same gradients.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ps.ids import ids_from_arrow, ids_to_arrow

__all__ = ["PushRecord", "TrainerWAL"]


@dataclass(frozen=True)
class PushRecord:
    """Where a push sits in the stream: its seq, its batch's offsets and its pass."""

    seq: int
    start: int  # first stream offset of the batch
    end: int  # one past the batch's last offset
    pass_index: int


class TrainerWAL:
    """Pending pushes under ``root/push-<seq>/`` and the committed offset in ``root/offset.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, seq: int) -> Path:
        return self.root / f"push-{seq:020d}"

    def write(self, rec: PushRecord, updates: dict[str, tuple[np.ndarray, np.ndarray]], history) -> None:
        """Record a push before it is sent (atomic: a torn write leaves no record)."""
        tmp = self.root / f".tmp-{rec.seq}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, (ids, grads) in updates.items():
            grads = np.ascontiguousarray(grads, dtype=np.float32)
            table = pa.table({
                "id": ids_to_arrow(ids),
                "grad": pa.FixedSizeListArray.from_arrays(pa.array(grads.reshape(-1)), grads.shape[1]),
            })
            with pa.OSFile(str(tmp / f"table-{name}.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
        if history is not None:
            table = pa.table({"user_id": ids_to_arrow(history[0]), "item_id": ids_to_arrow(history[1])})
            with pa.OSFile(str(tmp / "history.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
        (tmp / "meta.json").write_text(json.dumps(asdict(rec)))
        os.replace(tmp, self._dir(rec.seq))

    def pending(self) -> list[tuple[PushRecord, dict, tuple | None]]:
        """Recorded pushes in seq order, as ``(record, updates, history)``."""
        out = []
        for d in sorted(self.root.glob("push-*")):
            rec = PushRecord(**json.loads((d / "meta.json").read_text()))
            updates = {}
            for f in sorted(d.glob("table-*.arrow")):
                t = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
                grad = t.column("grad").combine_chunks()
                dim = grad.type.list_size
                grads = grad.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy()
                updates[f.stem[len("table-"):]] = (ids_from_arrow(t.column("id")), grads)
            history = None
            if (d / "history.arrow").exists():
                t = pa.ipc.open_file(pa.memory_map(str(d / "history.arrow"))).read_all()
                history = (ids_from_arrow(t.column("user_id")), ids_from_arrow(t.column("item_id")))
            out.append((rec, updates, history))
        return out

    def acknowledged(self, seq: int) -> None:
        """Forget a push every shard has acknowledged."""
        shutil.rmtree(self._dir(seq), ignore_errors=True)

    def commit(self, offset: int, events_applied: int) -> None:
        """Persist the offset up to which the stream is fully applied (atomic replace)."""
        tmp = self.root / ".offset.json.tmp"
        tmp.write_text(json.dumps({"offset": offset, "events_applied": events_applied}))
        os.replace(tmp, self.root / "offset.json")

    def committed(self) -> tuple[int, int]:
        """``(offset, events_applied)`` last committed, or ``(0, 0)``."""
        p = self.root / "offset.json"
        if not p.exists():
            return 0, 0
        d = json.loads(p.read_text())
        return int(d["offset"]), int(d["events_applied"])
