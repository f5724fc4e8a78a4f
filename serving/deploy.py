"""The one start/stop sequence of a Freshet deployment on a connected Ray.

``start`` brings up, in order, the PS shard actors, the durable ingest log, the trainer
actors and the Serve app, each waited for before the next (trainers connect to the
shards and the log by name; the app connects to all of them). ``stop`` removes
whatever of a deployment exists, by the actors' names, so it also cleans up after a
start that failed half-way. The ``freshet`` CLI (``run``, ``up``, ``down``, ``ckpt
restore``), the benchmarks and the fault tests all go through here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ps.client import PSClient, shard_actor_name, start_shards
from serving.config import FreshetConfig
from workers.ingest_log import INGEST_ACTOR, start_ingest
from workers.trainer import start_trainers, trainer_actor_name

__all__ = ["Deployment", "actor_names", "log_consumed", "start", "stop", "with_absolute_paths"]


@dataclass
class Deployment:
    """Handles of a started deployment. A non-detached actor lives only as long as a
    handle to it does, so keep this object for as long as the deployment should run."""

    cfg: FreshetConfig
    ps: PSClient | None = None
    ingest: Any = None
    trainers: list[Any] = field(default_factory=list)
    url: str | None = None  # the Serve app's base URL, once it is up

    def start_ingest(self, *, detached: bool = False, expect_log: bool = False) -> Any:
        """Start the ingest log actor (if not yet started) and wait until it has recovered;
        ``expect_log``: refuse to create a new log (:func:`workers.ingest_log.start_ingest`).

        Raises:
            ray.exceptions.RayActorError: the log failed to open.
            ray.exceptions.GetTimeoutError: recovery took over 120 s.
        """
        if self.ingest is None:
            self.ingest = start_ingest(self.cfg.ingest, namespace=self.cfg.namespace, detached=detached,
                                       expect_log=expect_log)
        return self.ingest

    def start_serving(self, *, ready_timeout_s: float = 120.0) -> str:
        """Deploy the Serve app on ``cfg.serving.host:port`` and wait for ``/healthz`` (up to
        ``ready_timeout_s`` seconds, twice: see :func:`serving.app.run_app`); returns its URL.

        Raises:
            TimeoutError, RuntimeError, ValueError: as :func:`serving.app.run_app`.
        """
        from serving.app import run_app

        run_app(self.cfg, ready_timeout_s=ready_timeout_s)
        s = self.cfg.serving
        self.url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
        return self.url

    def start_training(self) -> None:
        """Start every trainer's background loop (those not started with ``autostart``).

        Raises:
            ray.exceptions.RayActorError: a trainer actor failed to start or died.
        """
        ray.get([t.start.remote() for t in self.trainers])


def with_absolute_paths(cfg: FreshetConfig) -> FreshetConfig:
    """``cfg`` with its local state paths (``ingest.dir`` unless a URI, ``ingest.state_dir``,
    ``stream.quarantine_path``) made absolute against this process's working directory.

    An actor resolves a relative path against its Ray worker's working directory, which is
    where ``ray start`` ran on its node, not where ``freshet up`` runs: the shards, the log
    and the trainers of one deployment would keep their state in different places.
    ``stream.path`` is left as written: the trainers name a file stream by a digest of its
    settings, and a new name would make them resend pushes the shards already applied.
    """
    ingest, stream = cfg.ingest, cfg.stream
    ingest_update: dict[str, str] = {}
    if not ingest.dir_is_uri():
        ingest_update["dir"] = str(Path(ingest.dir).absolute())
    if ingest.state_dir is not None:
        ingest_update["state_dir"] = str(Path(ingest.state_dir).absolute())
    update: dict[str, Any] = {"ingest": ingest.model_copy(update=ingest_update)}
    if stream.quarantine_path is not None:
        update["stream"] = stream.model_copy(update={"quarantine_path": str(Path(stream.quarantine_path).absolute())})
    return cfg.model_copy(update=update)


def log_consumed(cfg: FreshetConfig) -> bool:
    """Whether a durable deployment of ``cfg`` has trainers that committed offsets of the ingest
    log (its trainer WALs under :func:`state_dirs`): that log must exist, a new one may not
    take its place.

    Raises:
        OSError: a trainer WAL cannot be read.
        ValueError: a trainer WAL is not of this release's format.
    """
    from workers.config import StreamKind
    from workers.wal import read_committed

    if cfg.stream.kind != StreamKind.INGEST:
        return False
    return any(o > 0 for _, d in trainer_state_dirs(cfg) for o in read_committed(d).offsets.values())


def state_dirs(cfg: FreshetConfig) -> dict[str, Path]:
    """Where a durable deployment keeps shard state and trainer WALs: ``ps`` and
    ``trainers`` under ``ingest.local_state_dir()``."""
    root = cfg.ingest.local_state_dir()
    return {"ps": root / "ps", "trainers": root / "trainers"}


def trainer_state_dirs(cfg: FreshetConfig) -> list[tuple[int, Path]]:
    """``(index, directory)`` of every trainer's durable state under ``cfg``'s state dir
    (``trainers/trainer-<i>``), by index; those of trainers the config no longer has included."""
    root = state_dirs(cfg)["trainers"]
    if not root.is_dir():
        return []
    found = [(int(d.name.removeprefix("trainer-")), d) for d in root.glob("trainer-*")
             if d.name.removeprefix("trainer-").isdigit() and d.is_dir()]
    return sorted(found)


def check_shard_state(cfg: FreshetConfig) -> None:
    """Refuse shard state that the config cannot hold (another ``ps.num_shards`` or
    ``ps.num_buckets``, a lowered ``max_rows``, another ``dim`` or optimizer, a table no longer
    configured): each shard would fail to load it only after starting, and ``up`` would report
    a dead actor. Reads each shard's current snapshot's ``meta.json`` only
    (:func:`ps.table.snapshot_problem`).

    Raises:
        ValueError: naming the snapshot, the table and the field at fault.
    """
    from ps.persist import current_snapshot, snapshot_meta
    from ps.table import snapshot_problem

    root = state_dirs(cfg)["ps"]
    for s in range(cfg.ps.num_shards):
        snap = current_snapshot(root / f"shard-{s}")
        if snap is None or not (snap / "meta.json").is_file():
            continue  # the shard's own recovery reports a broken pointer with its context
        try:
            problem = snapshot_problem(snapshot_meta(snap), cfg.ps, s)
        except ValueError as e:
            raise ValueError(f"{snap / 'meta.json'}: {e}") from None
        if problem is not None:
            raise ValueError(f"{snap}: {problem}; change the config back, or start from a fresh ingest.dir "
                             "(and ingest.state_dir, where set)")


def check_trainer_state(cfg: FreshetConfig) -> None:
    """Refuse durable trainer state written for another ``trainer.num_workers``: each trainer
    resumes the partitions its write-ahead log committed offsets for, and a trainer given
    other partitions would read them again from 0 under a new name, applying them twice.

    Raises:
        ValueError: naming the trainer, the partitions its state holds and those the config
            gives it.
    """
    from workers.config import StreamKind
    from workers.trainer import partitions_of, trainer_actor_name
    from workers.wal import read_committed

    root = state_dirs(cfg)["trainers"]
    n = cfg.trainer.num_workers
    for i, d in trainer_state_dirs(cfg):
        committed = read_committed(d)
        held = sorted(committed.offsets)
        if not held:
            continue
        want = [] if i >= n else partitions_of(i, cfg) if cfg.stream.kind == StreamKind.INGEST else [0]
        # Recorded since this release; before it, the partitions a trainer holds tell (for the
        # ingest log: a file stream's trainers all hold partition 0, split by user instead).
        written = committed.num_workers
        if (written is not None and written != n) or held != sorted(want):
            was = f"{written} trainers" if written is not None else "another number of trainers"
            raise ValueError(
                f"trainer.num_workers={n}: the trainer state in {root} was written by {was} "
                f"({trainer_actor_name(i)} holds offsets for partitions {held}, this config gives it {sorted(want) or 'none'}); "
                "its events would be applied twice or skipped. Keep the number of trainers the state was written with, "
                "or start from a fresh ingest.dir (and ingest.state_dir, where set)")


def start(
    cfg: FreshetConfig,
    *,
    detached: bool = False,
    durable: bool = True,
    restore_from: str | Path | None = None,
    ingest: bool = True,
    trainers: bool = True,
    serving: bool = True,
    evaluate: bool = False,
    max_events: int | None = None,
    autostart: bool = False,
    shard_timeout_s: float = 60.0,
    require_fit: bool = False,
) -> Deployment:
    """Start a deployment of ``cfg`` on the connected Ray, in dependency order.

    ``durable`` keeps shard state and trainer WALs under :func:`state_dirs` (so Ray's
    restarts recover them); ``detached`` lets the actors outlive this driver;
    ``restore_from`` seeds the shards from a named checkpoint directory. ``ingest``,
    ``trainers`` and ``serving`` choose the parts (a direct-stream run needs no ingest log
    or app). ``evaluate``, ``max_events`` and ``autostart`` are passed to the trainers
    (:class:`workers.trainer.Trainer`).

    With ``require_fit`` (a cluster that cannot grow, e.g. a Ray this process started), the
    CPUs and GPUs the actors reserve are checked against what the cluster has first: Ray
    would otherwise wait for them forever.

    Local state paths are made absolute here, against this process's working directory
    (:func:`with_absolute_paths`), before any actor gets the config; the returned
    :class:`Deployment`'s ``cfg`` is that config. A durable deployment whose trainers have
    consumed an ingest log refuses to start a new, empty one in its place.

    If any step fails, everything this call started is removed before the error propagates.

    Raises:
        ValueError: with ``require_fit``, the deployment reserves more than the cluster has;
            durable trainer state written for another ``trainer.num_workers`` or a trainer WAL
            of another format; durable shard state the config's tables or sharding plan cannot
            hold (:func:`check_shard_state`); an actor of the deployment's names already in the
            namespace.
        OSError: a trainer WAL cannot be read (``durable``).
        FileNotFoundError: ``restore_from`` lacks a shard's checkpoint.
        TimeoutError: the shards or the app did not come up in time.
        RuntimeError: Serve reports the app's deployment failed (:func:`serving.app.run_app`).
        ray.exceptions.RayActorError: an actor failed to start (e.g. a shard's saved state
            does not fit ``cfg``, or the ingest log the trainers consumed is gone:
            :class:`workers.ingest_log.LogMissingError`).
    """
    cfg = with_absolute_paths(cfg)
    if require_fit:
        check_fits(cfg, ray.cluster_resources(), trainers=trainers, serving=serving)
    if durable and trainers:
        check_trainer_state(cfg)
    if durable and restore_from is None:  # a restore replaces the shards' state; it is checked against cfg as it loads
        check_shard_state(cfg)
    dirs = state_dirs(cfg) if durable else {"ps": None, "trainers": None}
    dep = Deployment(cfg)
    try:
        dep.ps = start_shards(cfg.ps, namespace=cfg.namespace, detached=detached, state_dir=dirs["ps"],
                              restore_from=restore_from, timeout_s=shard_timeout_s)
        if ingest:
            dep.start_ingest(detached=detached, expect_log=durable and log_consumed(cfg))
        if trainers:
            dep.trainers = start_trainers(cfg, detached=detached, evaluate=evaluate, max_events=max_events,
                                          state_dir=dirs["trainers"], autostart=autostart)
            # A trainer's __init__ connects to the shards and the stream; surface its errors here.
            ray.get([t.ping.remote() for t in dep.trainers])
        if serving:
            dep.start_serving()
    except BaseException:
        stop(cfg)
        raise
    return dep


def check_fits(cfg: FreshetConfig, resources: dict[str, float], *, trainers: bool = True, serving: bool = True) -> None:
    """Raise ``ValueError`` naming the settings when a deployment of ``cfg`` reserves more CPUs
    or GPUs than ``resources`` (``ray.cluster_resources()``) hold; Ray would wait for them
    forever. The ingest log and Serve's own actors reserve none.

    Raises:
        ValueError: too many CPUs or GPUs reserved.
    """
    from workers.trainer import gpus_per_trainer

    t, s = cfg.trainer, cfg.serving
    replicas = (s.autoscaling.min_replicas if s.autoscaling is not None else s.num_replicas or 1) if serving else 0
    parts = [(f"ps.shard_num_cpus {cfg.ps.shard_num_cpus:g} x ps.num_shards {cfg.ps.num_shards}",
              cfg.ps.shard_num_cpus * cfg.ps.num_shards)]
    if trainers:
        parts.append((f"trainer.num_cpus {t.num_cpus:g} x trainer.num_workers {t.num_workers}", t.num_cpus * t.num_workers))
    if replicas:
        parts.append((f"serving.replica_num_cpus {s.replica_num_cpus:g} x {replicas} replica(s)", s.replica_num_cpus * replicas))
    cpus, have = sum(n for _, n in parts), resources.get("CPU", 0.0)
    if cpus > have + 1e-9:
        raise ValueError(f"the deployment reserves {cpus:g} CPUs ({' + '.join(w for w, _ in parts)}), more than the "
                         f"{have:g} this Ray cluster has; lower them (or give the cluster more: ray.num_cpus)")
    have_gpus = resources.get("GPU", 0.0)
    gpus = gpus_per_trainer(cfg, have_gpus) * t.num_workers if trainers else 0.0
    if gpus > have_gpus + 1e-9:
        raise ValueError(f"trainer.num_gpus {t.num_gpus:g} x trainer.num_workers {t.num_workers} reserves {gpus:g} GPUs, "
                         f"more than the {have_gpus:g} this Ray cluster has")


def serves_freshet() -> bool:
    """Whether the connected Ray cluster already runs a Freshet app. One Ray cluster serves one
    Freshet app (Serve has one HTTP port and the app one name): deploying another there would
    replace a service someone else runs."""
    from ray import serve

    from serving.app import APP_NAME

    return APP_NAME in serve.status().applications


def app_namespace(timeout_s: float = 10.0) -> str | None:
    """The namespace of the deployment whose Freshet app runs on the connected cluster, as its
    replicas answer (a handle call); ``""`` when it cannot be told (the app is not running, no
    replica answers within ``timeout_s`` seconds, an app of an older release); None when no
    Freshet app is there."""
    from ray import serve

    from serving.app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return None
    if app.status != "RUNNING":  # no replica to ask: a call would wait out the timeout
        return ""
    response = None
    try:
        response = serve.get_app_handle(APP_NAME).namespace.remote()
        return str(response.result(timeout_s=timeout_s))
    except Exception:  # noqa: BLE001 - cannot tell
        if response is not None:
            with contextlib.suppress(Exception):
                response.cancel()
        return ""


def actor_names(cfg: FreshetConfig) -> list[str]:
    """Names of every actor a deployment of ``cfg`` runs (shards, ingest log, trainers)."""
    return (
        [shard_actor_name(i) for i in range(cfg.ps.num_shards)]
        + [INGEST_ACTOR]
        + [trainer_actor_name(i) for i in range(cfg.trainer.num_workers)]
    )


def stop(cfg: FreshetConfig, *, serving: bool = True) -> list[str]:
    """Remove whatever exists of the deployment of ``cfg``: Serve (``serving``: the app, its
    HTTP proxy and HAProxy's dir when ``run_app`` made one) and every named actor, without
    restarts. The app goes when this namespace has actors (the deployment is there), or its
    replicas say it is this namespace's (:func:`app_namespace`): a leftover of a deployment
    that is gone never removes another namespace's app. Returns the names of the actors it
    killed."""
    killed = []
    if serving:
        from ray import serve

        from serving.app import APP_NAME
        from serving.ray_head import remove_serve_run_dir

        with contextlib.suppress(Exception):  # Serve may never have started
            named = {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}
            ours = any((cfg.namespace, n) in named for n in actor_names(cfg))
            if ours or app_namespace() == cfg.namespace:
                serve.delete(APP_NAME)
            # Serve itself (controller, proxies) goes too unless another app still uses it.
            if not serve.status().applications:
                serve.shutdown()
                # HAProxy's dir, when run_app made it (high-throughput mode turned on by the app).
                remove_serve_run_dir(ray.get_runtime_context().gcs_address)
    for name in actor_names(cfg):
        try:
            handle = ray.get_actor(name, namespace=cfg.namespace)
        except ValueError:  # not started, or already gone
            continue
        ray.kill(handle, no_restart=True)
        killed.append(name)
    return killed
