"""``freshet ckpt save|list|restore``: named, cross-shard-consistent PS checkpoints.

``save`` pauses the trainers so every shard snapshots the same set of pushes, and
records each trainer's offset beside the shards' snapshots; ``restore`` starts a fresh
deployment (``freshet up --restore``) from one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from serving.cli._common import add_config_argument, load
from serving.cli.service import cmd_up, connect, read_state
from serving.config import FreshetConfig

__all__ = [
    "CHECKPOINT_PIN",
    "TRAINER_OFFSETS",
    "add_parser",
    "check_restorable",
    "checkpoint_dir",
    "checkpoint_root",
    "cmd_ckpt",
    "replace_dir",
    "restore_trainer_offsets",
]


CHECKPOINT_PIN = "latest-checkpoint"
"""Name of the ingest log pin that keeps the events after the latest checkpoint."""

TRAINER_OFFSETS = "trainers.json"
"""File in a checkpoint directory recording each trainer's applied offset at save time."""


def checkpoint_root(cfg: FreshetConfig) -> Path:
    """Where the deployment's shards write named checkpoints."""
    from serving.deploy import state_dirs

    return state_dirs(cfg)["ps"] / "checkpoints"


def checkpoint_dir(cfg: FreshetConfig, name: str) -> Path:
    """The directory of checkpoint ``name`` (a bare name under :func:`checkpoint_root`, or a path).

    Raises:
        ValueError: ``name`` is not a valid checkpoint name.
        FileNotFoundError: there is no complete checkpoint there.
    """
    from ps.persist import validate_checkpoint_name

    # A path names a checkpoint anywhere (e.g. another deployment's); a bare name one of ours.
    path = Path(name) if os.sep in name else checkpoint_root(cfg) / validate_checkpoint_name(name)
    if not (path / TRAINER_OFFSETS).exists():
        where = f"at {path.absolute()}" if os.sep in name else f"{name!r} under {checkpoint_root(cfg)}"
        raise FileNotFoundError(f"no complete checkpoint {where} (no {TRAINER_OFFSETS} there)")
    return path


# What reading a JSON record can raise when the file is missing, not JSON or not the shape
# expected (a JSON or Unicode decode error is a ValueError).
_UNREADABLE = (OSError, KeyError, TypeError, ValueError, AttributeError)


def _saved_trainers(cfg: FreshetConfig, ckpt: Path) -> list[dict]:
    try:
        saved = json.loads((ckpt / TRAINER_OFFSETS).read_text())
        trainers = saved["trainers"]
        for t in trainers:
            t["offsets"] = {int(p): int(o) for p, o in t.get("applied_offsets", {"0": t["applied_offset"]}).items()}
            t["source_id"], t["events_applied"] = str(t["source_id"]), int(t["events_applied"])
            t["clock_base"] = int(t.get("clock_base", 0))
    except _UNREADABLE as e:
        raise ValueError(f"{ckpt / TRAINER_OFFSETS}: not a readable checkpoint record ({type(e).__name__}: {e})") from None
    if len(trainers) != cfg.trainer.num_workers:
        raise ValueError(f"checkpoint has {len(trainers)} trainers, config trainer.num_workers={cfg.trainer.num_workers}")
    return trainers


def _same_log(cfg: FreshetConfig, source_id: str) -> bool:
    """Whether a trainer's stream (``ingest:<log id>``, ``/p<k>`` after it when its first
    partition is not 0) is the log at ``cfg.ingest.dir``."""
    from workers.ingest_log import read_log_id

    log_id = read_log_id(cfg.ingest)
    current = f"ingest:{log_id}"
    return log_id is not None and (source_id == current or source_id.startswith(current + "/p"))


def check_restorable(cfg: FreshetConfig, ckpt: Path) -> None:
    """Check everything a restore of ``ckpt`` will read, before anything is changed: the
    trainers' record, every shard's snapshot (its files' digests and Arrow framing, and that
    its tables fit the config: configured, the same shapes, within ``max_rows``), and, for the
    same ingest log, that retention kept the events after the trainers' offsets.

    Raises:
        ValueError, FileNotFoundError: naming the file, the field or the offsets at fault.
    """
    from ps.persist import verify_digests, verify_snapshot
    from ps.table import snapshot_problem
    from workers.config import StreamKind
    from workers.ingest_log import read_first_offsets
    from workers.trainer import check_saved_state, partitions_of, trainer_actor_name

    trainers = _saved_trainers(cfg, ckpt)
    for s in range(cfg.ps.num_shards):
        where = ckpt / f"shard-{s}"
        if not where.is_dir():
            raise FileNotFoundError(f"{where}: missing; the config has ps.num_shards={cfg.ps.num_shards}")
        meta = verify_snapshot(where)
        # A shard that finds its snapshot does not fit fails only after the restore has replaced
        # the trainers' state and its state dir's own: a lowered max_rows once left a deployment
        # half restored, and another ps.num_shards rewrote the trainers' offsets.
        if (problem := snapshot_problem(meta, cfg.ps, s)) is not None:
            raise ValueError(f"{where}: {problem}")
    # The trainers' saved catalogues and histories, by the digests the save recorded (a
    # checkpoint saved before they were recorded has none: its files' Arrow framing is still read).
    verify_digests(ckpt, _saved_digests(ckpt))
    first = read_first_offsets(cfg.ingest)
    for i, t in enumerate(trainers):
        if not _same_log(cfg, t["source_id"]):
            continue
        if cfg.stream.kind == StreamKind.INGEST and (extra := sorted(set(t["offsets"]) - set(partitions_of(i, cfg)))):
            raise ValueError(f"{ckpt / TRAINER_OFFSETS}: {trainer_actor_name(i)} has offsets for ingest partitions {extra}, "
                             f"which this config (ingest.partitions={cfg.ingest.partitions}, trainer.num_workers="
                             f"{cfg.trainer.num_workers}) does not give it")
        if bad := sorted(p for p, o in t["offsets"].items() if o < 0):
            raise ValueError(f"{ckpt / TRAINER_OFFSETS}: {trainer_actor_name(i)} has negative offsets for partitions {bad}")
        # A trainer replays its local state from its saved state's offsets (at or before the
        # checkpoint's), so the log must still hold the events from there on.
        need = dict(t["offsets"])
        saved_state = ckpt / trainer_actor_name(i)
        if not (saved_state / "meta.json").exists():
            need = dict.fromkeys(need, 0)  # no saved state: the trainer rebuilds it from the log's start
        else:
            check_saved_state(saved_state)
            state = json.loads((saved_state / "meta.json").read_text())["offsets"]
            for p, o in state.items():
                need[int(p)] = min(need.get(int(p), int(o)), int(o))
        for p, o in sorted(need.items()):
            if o < first.get(p, 0):
                raise ValueError(
                    f"checkpoint {ckpt.name}: {trainer_actor_name(i)} would read ingest partition {p} from offset {o}, "
                    f"but the log keeps offsets from {first[p]} on (retention deleted the rest; only the latest "
                    "checkpoint's events are kept). Restore a newer checkpoint")


def _saved_digests(ckpt: Path) -> dict[str, str]:
    """The digests ``trainers.json`` records for the trainers' saved state (relative path →
    BLAKE2b hex); empty for a checkpoint saved before they were recorded."""
    try:
        digests = json.loads((ckpt / TRAINER_OFFSETS).read_text()).get("digests", {})
        return {str(f): str(d) for f, d in digests.items()}
    except _UNREADABLE as e:
        raise ValueError(f"{ckpt / TRAINER_OFFSETS}: not a readable checkpoint record ({type(e).__name__}: {e})") from None


def restore_trainer_offsets(cfg: FreshetConfig, ckpt: Path) -> None:
    """Point each trainer's committed offset at the checkpoint, dropping pending pushes:
    the restored PS reflects exactly the events before those offsets. Call
    :func:`check_restorable` first: this changes the trainers' state."""
    from serving.deploy import state_dirs, trainer_state_dirs
    from workers.trainer import trainer_actor_name
    from workers.wal import TrainerWAL

    trainers = _saved_trainers(cfg, ckpt)
    # The old stream's position at the save: on the ingest log the trainers' partitions add up
    # (short of any backlog not yet applied); on a file stream each trainer read all of it.
    positions = [sum(t["offsets"].values()) for t in trainers]
    on_log = all(t["source_id"].startswith("ingest:") for t in trainers)
    fresh_base = max(t["clock_base"] for t in trainers) + (sum(positions) if on_log else max(positions))
    for i, d in trainer_state_dirs(cfg):  # no trainer of this deployment resumes from these
        if i >= len(trainers):
            shutil.rmtree(d, ignore_errors=True)
    for i, t in enumerate(trainers):
        root = state_dirs(cfg)["trainers"] / trainer_actor_name(i)
        shutil.rmtree(root, ignore_errors=True)
        # Same log: resume after the events the checkpoint covers, with the trainer's
        # catalogue and histories as they were then. A fresh deployment has a new log (new
        # producer names), so its trainers start at its beginning with empty local state.
        if _same_log(cfg, t["source_id"]):
            TrainerWAL(root).commit(t["offsets"], t["events_applied"], t["clock_base"])
            saved_state = ckpt / trainer_actor_name(i)
            if (saved_state / "meta.json").exists():
                shutil.copytree(saved_state, root / "state")
        else:
            # The new log's offsets start at 0, but the restored recent-popularity rows are
            # stamped with the old stream's position: carry on from there, or new events would
            # count as older than the checkpoint's and its items would never decay.
            TrainerWAL(root).commit({}, 0, fresh_base)


def cmd_ckpt(args) -> int:
    """``freshet ckpt save|list|restore``: named, cross-shard-consistent PS checkpoints."""
    import ray

    if args.address is not None and args.action != "restore":
        print(f"freshet ckpt {args.action}: --address is for restore (save finds the service's Ray in its "
              "state file)", file=sys.stderr)
        return 2
    cfg = load(args)
    if args.action == "list":
        from ps.persist import list_checkpoints

        found = [c for c in list_checkpoints(checkpoint_root(cfg)) if (Path(c["path"]) / TRAINER_OFFSETS).exists()]
        left = [c for c in found if _LEFTOVER.search(c["name"])]
        rows = [c for c in found if c not in left]
        if not rows:
            print(f"no checkpoints under {checkpoint_root(cfg)}")
        for c in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created_at"])) if c.get("created_at") else "?"
            print(f"{c['name']:<24} {when}  versions {c.get('versions')}")
        for c in left:
            print(f"(left by an interrupted save: {c['path']}; restore it by its path, or remove it)")
        return 0
    if args.action == "restore":
        if not args.name:
            print("freshet ckpt restore: name the checkpoint (see `freshet ckpt list`)", file=sys.stderr)
            return 2
        if read_state(cfg) is not None:
            print("freshet ckpt restore: a service is running here; `freshet down` first "
                  "(a checkpoint restores into a fresh deployment)", file=sys.stderr)
            return 1
        if args.overwrite:
            print("freshet ckpt restore: --overwrite is for save", file=sys.stderr)
            return 2
        args.restore, args.keep_stream = args.name, False
        return cmd_up(args)
    # save: pause trainers so every shard snapshots the same set of pushes.
    from ps.client import PSClient
    from ps.persist import file_digests, fsync_path, validate_checkpoint_name
    from serving.deploy import state_dirs
    from workers.ingest_log import INGEST_ACTOR
    from workers.trainer import trainer_actor_name

    name = args.name or time.strftime("ckpt-%Y%m%d-%H%M%S")
    # Checked here, before the trainers pause: the shards would refuse it only after.
    try:
        validate_checkpoint_name(name)
        if _LEFTOVER.search(name):
            raise ValueError(f"checkpoint name: {name!r} ends like a save's staging directory (.saving-/.old- and 8 hex digits)")
    except ValueError as e:
        print(f"freshet ckpt save: {e}", file=sys.stderr)
        return 2
    state = read_state(cfg)
    if state is None or state.get("phase", "up") != "up":
        print("freshet ckpt save: no service started by `freshet up` is up here", file=sys.stderr)
        return 1
    root = checkpoint_root(cfg)
    ckpt = root / name
    if ckpt.exists() and not args.overwrite:
        print(f"freshet ckpt save: checkpoint {name!r} already exists ({ckpt}); "
              "choose another name, or pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        connect(state)  # the head `up` started, with its token, or the cluster it joined
    except RuntimeError as e:
        print(f"freshet ckpt save: cannot reach the service's Ray: {e}", file=sys.stderr)
        return 1
    try:
        trainers = [ray.get_actor(trainer_actor_name(i), namespace=state["namespace"]) for i in range(cfg.trainer.num_workers)]
    except ValueError as e:
        ray.shutdown()
        print(f"freshet ckpt save: the service is gone ({e})", file=sys.stderr)
        return 1
    # Written under a staging name and renamed into place whole: a save that fails half-way
    # leaves no checkpoint of its name, and one replacing another (--overwrite) leaves the
    # old one as it was (a staging name is a checkpoint name too: the shards write it).
    stage = root / f"{name[:96]}.saving-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ingest = ray.get_actor(INGEST_ACTOR, namespace=state["namespace"])
    try:
        stats = ray.get([t.stop.remote() for t in trainers])
        try:
            # No deadline: a large shard takes as long as its rows take to write.
            reports = PSClient.connect(state["namespace"], timeout_s=None).snapshot(stage.name)
            for r in reports:  # where this command renames from: a state dir seen differently is no checkpoint
                want = stage / f"shard-{r['shard']}"
                if os.path.abspath(r["checkpoint"]) != os.path.abspath(want):
                    raise RuntimeError(
                        f"shard {r['shard']} wrote its checkpoint to {r['checkpoint']}, not {want}: this command "
                        "and the shards see different state dirs (run `freshet ckpt` with the config, and from the "
                        "directory, `up` was run with; on a cluster, ingest.state_dir must be shared)")
            offsets = [{"applied_offset": s["applied_offset"], "applied_offsets": s["applied_offsets"],
                        "events_applied": s["events_applied"], "source_id": s["source_id"],
                        "clock_base": s.get("clock_base", 0)} for s in stats]
            # Each trainer saved its catalogue and histories at these offsets when it stopped;
            # keep a copy (on a multi-node cluster it is on the trainer's node: then a restore
            # rebuilds it from the log's start, which retention must still hold).
            for i in range(cfg.trainer.num_workers):
                src = state_dirs(cfg)["trainers"] / trainer_actor_name(i) / "state"
                if (src / "meta.json").exists():
                    shutil.copytree(src, stage / trainer_actor_name(i), dirs_exist_ok=True)
            saved = sorted(f for f in stage.glob("trainer-*/*") if f.is_file())
            for f in saved:  # durable before trainers.json says the checkpoint is complete
                fsync_path(f)
            # Retention keeps the events after the latest checkpoint (one pin, replaced by
            # each save): restoring it into this deployment replays them. Until this one is in
            # place the pin covers the previous checkpoint's events too, so a save that fails
            # leaves that one restorable (it may be ahead of this one, after a restore).
            merged: dict[int, int] = {}
            for s in stats:
                for p, o in s["applied_offsets"].items():
                    merged[int(p)] = min(merged.get(int(p), o), o)
            previous = ray.get(ingest.stats.remote())["pins"].get(CHECKPOINT_PIN) or {}
            ray.get(ingest.pin.remote(CHECKPOINT_PIN, {p: min(o, int(previous.get(str(p), o))) for p, o in merged.items()}))
            record = {"trainers": offsets, "created_at": time.time(), "digests": file_digests(stage, saved)}
            _write_durably(stage / TRAINER_OFFSETS, json.dumps(record).encode())
        finally:
            ray.get([t.start.remote() for t in trainers])
        replace_dir(stage, ckpt)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    else:
        try:  # this checkpoint is in place: the pin keeps only its events from now on
            ray.get(ingest.pin.remote(CHECKPOINT_PIN, merged))
        except Exception as e:  # noqa: BLE001 - the checkpoint is whole; the pin only keeps more than it needs
            print(f"freshet ckpt save: warning: the retention pin still keeps the previous checkpoint's events too "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
    finally:
        ray.shutdown()
    print(f"checkpoint {name}: shard versions {[r['version'] for r in reports]}, "
          f"trainer offsets {[o['applied_offset'] for o in offsets]} -> {ckpt}")
    return 0


_LEFTOVER = re.compile(r"\.(saving|old)-[0-9a-f]{8}$")
"""The suffix of a save's staging directory and of the checkpoint it replaces while renaming."""


def replace_dir(stage: Path, ckpt: Path) -> None:
    """Rename directory ``stage`` to ``ckpt``, replacing a ``ckpt`` already there: whenever a
    directory has the name ``ckpt`` it is the old or the new one whole, and a failure between
    the two renames puts the old one back.

    Raises:
        OSError: a rename failed (``ckpt`` is then as it was).
    """
    from ps.persist import fsync_path

    old = ckpt.with_name(f"{ckpt.name[:96]}.old-{uuid.uuid4().hex[:8]}") if ckpt.exists() else None
    if old is not None:
        ckpt.rename(old)
    try:
        stage.rename(ckpt)
    except BaseException:
        if old is not None and not ckpt.exists():
            old.rename(ckpt)
        raise
    fsync_path(ckpt.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) beside itself, fsync, rename into place and sync the
    directory: ``trainers.json`` marks a checkpoint complete, so it is whole or absent."""
    from ps.persist import fsync_path

    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    fsync_path(path.parent)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet ckpt``."""
    k = sub.add_parser("ckpt", help="save, list or restore named PS checkpoints")
    add_config_argument(k)
    k.add_argument("action", choices=["save", "list", "restore"])
    k.add_argument("name", nargs="?", help="checkpoint name (save: default ckpt-<time>; restore: required)")
    k.add_argument("--overwrite", action="store_true", help="save: replace a checkpoint of the same name")
    k.add_argument("--address", type=str.strip, default=None,
                   help="restore: into this Ray cluster (e.g. 'auto', as `freshet up --address`) instead of a head "
                        "it starts; its own auth settings apply")
    k.add_argument("--ray-port", type=int, default=None,
                   help="GCS port of the head restore starts (default: ray.ports.gcs, else a free port)")
    k.set_defaults(fn=cmd_ckpt)
