"""``freshet ckpt save|list|restore``: named, cross-shard-consistent PS checkpoints.

``save`` pauses the trainers so every shard snapshots the same set of pushes, and
records each trainer's offset beside the shards' snapshots; ``restore`` starts a fresh
deployment (``freshet up --restore``) from one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from serving.cli._common import add_config_argument, load, ray_init
from serving.cli.service import cmd_up, read_state
from serving.config import FreshetConfig

__all__ = ["TRAINER_OFFSETS", "add_parser", "checkpoint_dir", "checkpoint_root", "cmd_ckpt", "restore_trainer_offsets"]


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
        raise FileNotFoundError(f"no complete checkpoint {name!r} under {checkpoint_root(cfg)}")
    return path


def restore_trainer_offsets(cfg: FreshetConfig, ckpt: Path) -> None:
    """Point each trainer's committed offset at the checkpoint, dropping pending pushes:
    the restored PS reflects exactly the events before those offsets."""
    import shutil

    from serving.deploy import state_dirs
    from workers.ingest_log import read_log_id
    from workers.trainer import trainer_actor_name
    from workers.wal import TrainerWAL

    saved = json.loads((ckpt / TRAINER_OFFSETS).read_text())
    log_id = read_log_id(cfg.ingest)
    current = "ingest:" + log_id if log_id is not None else None
    if len(saved["trainers"]) != cfg.trainer.num_workers:
        raise ValueError(
            f"checkpoint has {len(saved['trainers'])} trainers, config trainer.num_workers={cfg.trainer.num_workers}"
        )
    for i, t in enumerate(saved["trainers"]):
        root = state_dirs(cfg)["trainers"] / trainer_actor_name(i)
        shutil.rmtree(root, ignore_errors=True)
        # Same log: resume after the events the checkpoint covers. A fresh deployment
        # has a new log (new producer names), so its trainers start at its beginning.
        if t["source_id"] == current:
            TrainerWAL(root).commit(t["applied_offset"], t["events_applied"])


def cmd_ckpt(args) -> int:
    """``freshet ckpt save|list|restore``: named, cross-shard-consistent PS checkpoints."""
    import ray

    cfg = load(args)
    if args.action == "list":
        from ps.persist import list_checkpoints

        rows = [c for c in list_checkpoints(checkpoint_root(cfg)) if (Path(c["path"]) / TRAINER_OFFSETS).exists()]
        if not rows:
            print(f"no checkpoints under {checkpoint_root(cfg)}")
        for c in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created_at"])) if c.get("created_at") else "?"
            print(f"{c['name']:<24} {when}  versions {c.get('versions')}")
        return 0
    if args.action == "restore":
        if not args.name:
            print("freshet ckpt restore: name the checkpoint (see `freshet ckpt list`)", file=sys.stderr)
            return 2
        if read_state(cfg) is not None:
            print("freshet ckpt restore: a service is running here; `freshet down` first "
                  "(a checkpoint restores into a fresh deployment)", file=sys.stderr)
            return 1
        args.restore, args.address, args.keep_stream = args.name, None, False
        return cmd_up(args)
    # save: pause trainers so every shard snapshots the same set of pushes.
    from ps.client import PSClient
    from workers.trainer import trainer_actor_name

    state = read_state(cfg)
    if state is None:
        print("freshet ckpt save: no service started by `freshet up` here", file=sys.stderr)
        return 1
    name = args.name or time.strftime("ckpt-%Y%m%d-%H%M%S")
    ray_init(state["address"], state["namespace"])
    try:
        trainers = [ray.get_actor(trainer_actor_name(i), namespace=state["namespace"]) for i in range(cfg.trainer.num_workers)]
        stats = ray.get([t.stop.remote() for t in trainers])
        try:
            reports = PSClient.connect(state["namespace"]).snapshot(name)
            ckpt = checkpoint_root(cfg) / name
            offsets = [{"applied_offset": s["applied_offset"], "events_applied": s["events_applied"],
                        "source_id": s["source_id"]} for s in stats]
            (ckpt / TRAINER_OFFSETS).write_text(json.dumps({"trainers": offsets, "created_at": time.time()}))
        finally:
            ray.get([t.start.remote() for t in trainers])
    finally:
        ray.shutdown()
    print(f"checkpoint {name}: shard versions {[r['version'] for r in reports]}, "
          f"trainer offsets {[o['applied_offset'] for o in offsets]} -> {ckpt}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet ckpt``."""
    k = sub.add_parser("ckpt", help="save, list or restore named PS checkpoints")
    add_config_argument(k)
    k.add_argument("action", choices=["save", "list", "restore"])
    k.add_argument("name", nargs="?", help="checkpoint name (save: default ckpt-<time>; restore: required)")
    k.add_argument("--ray-port", type=int, default=6379, help="GCS port when restore starts Ray")
    k.set_defaults(fn=cmd_ckpt)
