"""``freshet up``, ``freshet status`` and ``freshet down``: the long-running service.

``up`` starts a local Ray head with :func:`serving.ray_head.start_head` (token auth, every
listener on loopback where Ray allows, free ports), or joins a cluster (``--address``), then
runs :func:`serving.deploy.start` with detached actors. It is all-or-nothing: what it is about
to start is written to ``<state dir>/freshet-up.json`` first (the head's details as soon as it
is up), and if any step fails, everything it started is removed again and the error names the
step. ``down`` reads that file, even a partial one, and removes every named actor of the
namespace and the head ``up`` started (by its processes, never a host-wide ``ray stop``).
``ckpt`` connects through the same file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, NamedTuple

from serving.cli._common import add_config_argument, load, ray_init
from serving.config import FreshetConfig, RayAuth
from workers.config import StreamKind

__all__ = ["STATE_FILE", "add_parsers", "aged_state_warning", "cmd_down", "cmd_status", "cmd_up", "connect",
           "local_state_warning", "read_state", "state_path"]

STATE_FILE = "freshet-up.json"
"""Name of the file, in the local state dir, where ``freshet up`` records what it started."""

STATE_VERSION = 2
"""Layout of the state file (see :func:`cmd_up`)."""


def state_path(cfg: FreshetConfig) -> Path:
    """Where ``freshet up`` records what it started for ``cfg``."""
    return cfg.ingest.local_state_dir() / STATE_FILE


def _check_state_dir(cfg: FreshetConfig) -> None:
    """Refuse a state dir (or state file) that another user could have written: the state file
    names the head's address, its token file and the environment every command applies before
    it connects, so a swapped one would have ``down`` or ``ckpt`` send this user's Ray token to
    another user's listener. A missing dir passes (``up`` makes it, 0700).

    Raises:
        ValueError: naming the field (``ingest.state_dir``, else ``ingest.dir``), the path and
            the reason.
    """
    d = cfg.ingest.local_state_dir()
    field = "ingest.state_dir" if cfg.ingest.state_dir is not None else "ingest.dir"
    for path, what in ((d, f"{field} {d}"), (d / STATE_FILE, f"{d / STATE_FILE} (the state dir, {field})")):
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return
        if st.st_uid != os.getuid():
            raise ValueError(f"{what} belongs to another user (uid {st.st_uid}), who could rewrite freshet up's "
                             "state file; use a directory of your own")
        writable = st.st_mode & 0o002 or (st.st_mode & 0o020 and _others_in_group(st.st_gid))
        if path == d and writable:
            raise ValueError(f"{what} is writable by other users (mode {oct(stat.S_IMODE(st.st_mode))}), who could "
                             f"rewrite freshet up's state file; chmod go-w {d}, or use a directory of your own")


def _others_in_group(gid: int) -> bool:
    """Whether a user other than this one belongs to group ``gid``. A group-writable directory
    of one's own private group (umask 002, the default where each user has a group of their
    own) is writable by nobody else."""
    import grp
    import pwd

    me = os.getuid()
    try:
        name = pwd.getpwuid(me).pw_name
    except KeyError:  # a uid without a passwd entry (a container's --user): no member name is this user's
        name = None
    try:
        members = set(grp.getgrgid(gid).gr_mem) - {name}
    except KeyError:
        return True  # a group the system cannot name: assume the worst
    return bool(members) or any(p.pw_gid == gid and p.pw_uid != me for p in pwd.getpwall())


def read_state(cfg: FreshetConfig) -> dict[str, Any] | None:
    """What ``freshet up`` recorded for ``cfg``, or None when it did not start anything here.

    Raises:
        ValueError: the file exists but is not a JSON object (named in the message), or the
            state dir or file could have been written by another user (:func:`_check_state_dir`).
    """
    _check_state_dir(cfg)
    p = state_path(cfg)
    if not p.exists():
        return None
    try:
        state = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {p}: {e}; remove it once nothing it describes is running") from None
    if not isinstance(state, dict):
        raise ValueError(f"{p} is not a JSON object; remove it once nothing it describes is running")  # noqa: TRY004
    return state


def _write_state(cfg: FreshetConfig, state: dict[str, Any]) -> None:
    """Replace the state file atomically (a crash leaves the old or the new content, never half),
    private to this user.

    Raises:
        ValueError: the state dir could have been written by another user (:func:`_check_state_dir`).
    """
    _check_state_dir(cfg)
    p = state_path(cfg)
    # A new name of its own (O_EXCL, 0600): a fixed one could be a link planted to a file of
    # this user's, which the write would overwrite.
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2))
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _head(state: dict[str, Any]):
    """The recorded :class:`serving.ray_head.HeadInfo`, or None."""
    from serving.ray_head import HeadInfo

    return HeadInfo.model_validate(state["head"]) if state.get("head") else None


def connect(state: dict[str, Any]):
    """Connect this process to the Ray of a ``freshet up`` state: the recorded head (with its
    token and settings) or the joined cluster's address.

    Raises:
        RuntimeError: Ray cannot be reached (within seconds when a TCP connection to a
            ``host:port`` address fails: ``ray.init`` would wait minutes).
    """
    if (probe := _probe_gcs(_gcs_address(state))) is not None:
        raise RuntimeError(probe.why)
    return ray_init(_gcs_address(state), state["namespace"], head=_head(state))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st not in ("Z", "X")


def _up_in_progress(state: dict[str, Any]) -> bool:
    """Whether the ``freshet up`` that wrote ``state`` is still running (so it is not a leftover)."""
    pid = state.get("pid")
    if state.get("phase") == "up" or pid == os.getpid() or not _pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"serving.cli" in cmd or b"freshet" in cmd


def _legacy_pids(ray_dir: str) -> list[int]:
    """Processes whose command line names ``ray_dir``: how a head from a state file without
    ``version`` (an older ``freshet up``, plain ``ray start`` without ``--block``) is found."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if ray_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


def _head_alive(state: dict[str, Any]) -> bool:
    from serving.ray_head import head_pids

    head = _head(state)
    if head is None and "version" not in state and state.get("ray_dir"):
        return bool(_legacy_pids(state["ray_dir"]))
    return head is not None and bool(head_pids(head))


class _Probe(NamedTuple):
    """What a TCP connection to a Ray address found: ``refused`` (nothing listens there, twice a
    second apart: the cluster is gone) or another ``error`` (a timeout, an unknown host: it
    cannot be told), each with ``why``."""

    refused: bool
    why: str


def _probe_gcs(address: str | None, timeout_s: float = 3.0) -> _Probe | None:
    """Try a TCP connection to the Ray address ``address`` (``host:port``); None when one opens
    or the address is not ``host:port`` (``auto``, ``ray://...``, which Ray resolves itself).
    ``ray.init`` against an address where nothing listens waits minutes before it fails; this
    takes at most about ``2 * timeout_s + 1`` seconds."""
    import socket

    if not address or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    for attempt in range(2):
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
            return None
        except ConnectionRefusedError as e:
            refused = _Probe(True, f"nothing listens at {address}: {e.strerror or e}")
        except socket.gaierror as e:
            return _Probe(False, f"cannot resolve the host of {address}: {e.strerror or e}")
        except OSError as e:
            return _Probe(False, f"cannot reach {address}: {e.strerror or e}")
        if attempt == 0:
            time.sleep(1.0)  # a GCS that restarts refuses for a moment
    return refused


def _gcs_address(state: dict[str, Any]) -> str | None:
    """The address to reach the Ray of ``state`` at: the GCS address ``up`` resolved when it
    joined with ``auto`` (recorded as ``gcs_address``), else the address it was given."""
    address = state.get("gcs_address") or state.get("address")
    return str(address).strip() or None if address else None


def local_state_warning(cfg: FreshetConfig, alive_nodes: int) -> str | None:
    """The warning ``up`` prints on joining a cluster of ``alive_nodes`` nodes when ``cfg``'s
    ingest log is a local path (and so, unless ``ingest.state_dir`` says otherwise, its state):
    None on one node, or with ``ingest.dir`` a URI. Only a warning: a local path may be shared
    storage mounted at the same place on every node, which cannot be told from here."""
    if alive_nodes <= 1 or (cfg.ingest.dir_is_uri() and not cfg.ingest.dir.lower().startswith("file:")):
        return None  # a file:// URI is a path on each node's own disk too
    fields = f"ingest.dir {cfg.ingest.dir!r}" + (
        " and ingest.state_dir (unset: the state is kept under ingest.dir)" if cfg.ingest.state_dir is None
        else f" (ingest.state_dir {cfg.ingest.state_dir!r} too must be shared)")
    return (f"the Ray cluster has {alive_nodes} nodes and {fields} is a local path: unless it is mounted at the "
            "same path on every node, an actor Ray places or restarts on another node keeps the ingest log or "
            "the state on that node's disk, where the rest of the deployment never sees it (events acknowledged "
            "there go untrained, a restart starts empty). Set ingest.dir to shared storage (s3://...) and "
            "ingest.state_dir to a shared mount (README, Multi-node)")


_AGED_DIRS = ("/tmp", "/var/tmp")
"""Directories many distributions age out (systemd-tmpfiles: RHEL removes what is untouched for
10 days in /tmp and 30 in /var/tmp)."""


def aged_state_warning(cfg: FreshetConfig) -> str | None:
    """The warning ``up`` prints when ``cfg`` keeps its durable state, or a local ingest log,
    under a directory the host may age out (:data:`_AGED_DIRS`); None elsewhere. Only a
    warning: many hosts never clean these, and a short-lived deployment may live there."""
    local = {"ingest.state_dir" if cfg.ingest.state_dir is not None else "ingest.dir": cfg.ingest.local_state_dir()}
    if cfg.ingest.state_dir is not None:
        if not cfg.ingest.dir_is_uri():
            local["ingest.dir"] = Path(cfg.ingest.dir)
        elif cfg.ingest.dir.lower().startswith("file:"):
            local["ingest.dir"] = Path(urllib.parse.urlparse(cfg.ingest.dir).path)
    aged = {field: str(path) for field, path in local.items()
            if any(Path(os.path.realpath(path)).is_relative_to(d) for d in _AGED_DIRS)}
    if not aged:
        return None
    where = " and ".join(f"{field} {path!r}" for field, path in aged.items())
    return (f"{where} is under /tmp or /var/tmp, which many hosts age out (systemd-tmpfiles: after 10 days in "
            "/tmp on RHEL): shard snapshots, trainer logs, checkpoints and the ingest log left untouched that "
            "long would be deleted. Use a directory outside them for a deployment that is meant to last")


def _service_gone(state: dict[str, Any]) -> str | None:
    """Why the service that a finished ``up`` recorded in ``state`` no longer runs, or None when
    it may still. A head of its own: its processes are gone. A joined cluster: nothing listens at
    its address, or the cluster answers and has neither an actor in the recorded namespace nor
    any Freshet app (restarted, or the deployment removed without ``freshet down``). Whatever
    cannot be told (a timeout, an unknown host, no token, no address) counts as running."""
    if state.get("started_ray") or ("version" not in state and state.get("ray_dir")):
        return None if _head_alive(state) else "its Ray head has stopped"
    address = _gcs_address(state)
    if not address:
        return None
    if (probe := _probe_gcs(address)) is not None:
        return probe.why if probe.refused else None
    import ray

    from serving import deploy

    try:
        connect(state)
        # Another namespace's app (or one that cannot say whose it is) may be this one's: asking
        # would take a handle call; `down` finds out, and removes only what is this namespace's.
        if ray.util.list_named_actors() or deploy.serves_freshet():
            return None
    except Exception:  # noqa: BLE001 - cannot tell: keep refusing, as for a running service
        return None
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    return f"the Ray cluster at {address} has no actors in namespace {state.get('namespace')} and no Freshet app"


def _stop_legacy(ray_dir: str, timeout_s: float = 20.0) -> list[int]:
    """SIGTERM, then SIGKILL, the processes :func:`_legacy_pids` finds; returns them.

    Raises:
        RuntimeError: some are still alive after ``timeout_s`` seconds.
    """
    import signal

    pids = _legacy_pids(ray_dir)
    left, deadline, sig = list(pids), time.monotonic() + timeout_s, signal.SIGTERM
    while left:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {left} of the Ray in {ray_dir} are still alive")
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        time.sleep(1.0)
        left, sig = [p for p in left if _pid_alive(p)], signal.SIGKILL
    return pids


def _kill_namespace(namespace: str) -> list[str]:
    """Kill every named actor of ``namespace`` on the connected Ray (no restarts); returns the names."""
    import ray

    killed = []
    for name in ray.util.list_named_actors():
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            killed.append(name)
    return sorted(killed)


def _orphan_head(ray_dir: str):
    """A :class:`HeadInfo` for a head started in ``ray_dir`` whose details were never recorded
    (``up`` was killed while the head started): its ``ray start`` process is found by its
    ``--temp-dir``; None if there is none."""
    from serving.ray_head import HeadInfo

    marker = f"--temp-dir={ray_dir}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if marker in cmd and b"--head" in cmd:
                    pid = int(d.name)
                    return HeadInfo(address="", ports={}, temp_dir=ray_dir, auth=False, token_path=None,
                                    root_pid=pid, pids=[pid], log_path="")
    return None


_RAY_ROOT_PREFIX = "frup"


def _new_ray_dir() -> tuple[str, str]:
    """``(root, Ray's temp dir)`` for a head ``up`` starts: a new private root (0700) in
    ``/tmp`` and Ray's temp dir inside it. Ray makes its temp dir world-writable (0777, no
    sticky bit), so the root keeps the host's other users away from the token file and the
    sockets; ``down`` removes the root. Always ``/tmp``, not ``$RAY_TMPDIR``: HAProxy's socket
    paths under ``<root>/hap`` leave 27 characters for it (Ray's own, 40 for its temp dir)."""
    root = tempfile.mkdtemp(prefix=_RAY_ROOT_PREFIX, dir="/tmp")
    return root, os.path.join(root, "ray")


def _remove_ray_dir(state: dict[str, Any]) -> str | None:
    """Remove the private root of a head ``up`` started (Ray's logs and session files with it),
    once the head is stopped; the root, or None when nothing was removed. Only what ``up``
    makes is removed: a real directory (not a link) ``/tmp/frup*`` of this user (an older
    ``up`` recorded only Ray's temp dir, made the same way)."""
    from serving.ray_head import remove_own_dir

    root = state.get("ray_root") or state.get("ray_dir")
    if not root:
        return None
    path = Path(root)
    if path.parent != Path("/tmp") or not path.name.startswith(_RAY_ROOT_PREFIX):
        return None
    return root if remove_own_dir(path) is not None else None


def _port_in_use(host: str, port: int) -> str | None:
    """Why nothing can listen on ``host:port`` now (the OS error), or None when it can. With
    ``SO_REUSEADDR``, as servers bind: a port left in TIME_WAIT by a stopped service is free."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((host, port), family=family).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


class _ClusterRefused(RuntimeError):
    """The cluster ``up`` joins cannot take this deployment (nothing answers there, the namespace
    has actors, or another Freshet app runs there): nothing there is this ``up``'s to remove."""


def _teardown(cfg: FreshetConfig, state: dict[str, Any], *, actors: bool = True, keep_dir: bool = False) -> list[str]:
    """Remove whatever exists of what ``state`` describes; returns a line per thing removed.

    With ``actors``, every named actor of the namespace (and Serve) when Ray is reachable; then
    the head ``up`` started, if any (recorded, or found by its temp dir when ``up`` died before
    recording it), and its directory unless ``keep_dir`` (its logs explain a failed ``up``).

    Raises:
        RuntimeError: a process of the head would not stop.
    """
    import ray

    from serving import deploy
    from serving.ray_head import stop_head

    done: list[str] = []
    ns = state.get("namespace", cfg.namespace)
    if state.get("started_ray"):
        reachable = bool(state.get("address")) and _head_alive(state)
    elif actors and (probe := _probe_gcs(_gcs_address(state))) is not None:
        if not probe.refused:  # its actors may be alive: keep the state file for another try
            raise RuntimeError(f"cannot tell whether the actors of namespace {ns} are gone ({probe.why})")
        # A joined cluster that is gone took the actors with it (and connecting would wait minutes).
        reachable = False
        done.append(f"nothing of namespace {ns} ({probe.why}: its actors went with that cluster)")
    else:
        reachable = bool(state.get("address"))
    if actors and reachable:
        try:
            if not ray.is_initialized():  # a failing `up` is connected already
                connect(state)
            killed = deploy.stop(cfg.model_copy(update={"namespace": ns}))
            killed += [n for n in _kill_namespace(ns) if n not in killed]
            if killed:
                done.append(f"actors of namespace {ns}: {', '.join(sorted(killed))}")
        except Exception as e:  # noqa: BLE001 - a head of ours is stopped below anyway; a gone cluster took them along
            done.append(f"(could not reach Ray at {state.get('address')} to remove actors: {type(e).__name__}: {e})")
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
    if state.get("started_ray"):
        head = _head(state) or (_orphan_head(state["ray_dir"]) if state.get("ray_dir") else None)
        pids = stop_head(head) if head is not None else []
        if head is None and "version" not in state and state.get("ray_dir"):
            pids = _stop_legacy(state["ray_dir"])
        if pids:
            done.append(f"Ray head in {state.get('ray_dir') or head.temp_dir} "
                        f"({len(pids)} process{'es' if len(pids) != 1 else ''})")
        if not keep_dir and (root := _remove_ray_dir(state)) is not None:
            done.append(f"its directory {root} (Ray's logs too)")
    return done


def check_ray_port(cfg: FreshetConfig, port: int, *, joining: bool = False) -> None:
    """Check ``--ray-port`` (the GCS port of the head ``up`` or ``ckpt restore`` starts, in
    place of ``ray.ports.gcs``) as a config's own ports are checked, before anything starts.

    Raises:
        ValueError: ``joining`` (``--address``: no head is started), a port outside 1-65535,
            one that another ``ray.ports`` entry takes, or ``serving.port``.
    """
    from pydantic import ValidationError

    from serving.config import RayConfig, check_ports

    if joining:
        raise ValueError(f"--ray-port {port}: `--address` joins a running cluster, so no head is started "
                         "to give that port; drop one of the two")
    if port == cfg.serving.port:
        raise ValueError(f"--ray-port {port} is serving.port; give them different ports")
    try:
        ray_cfg = RayConfig.model_validate({**cfg.ray.model_dump(), "ports": {**cfg.ray.ports, "gcs": port}})
        check_ports(ray_cfg, cfg.serving)
    except (ValidationError, ValueError) as e:
        why = e.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(e, ValidationError) else str(e)
        raise ValueError(f"--ray-port {port} (in place of ray.ports.gcs): {why}") from None


def _step(state: dict[str, Any], cfg: FreshetConfig, phase: str, **fields: Any) -> None:
    state.update(phase=phase, **fields)
    _write_state(cfg, state)


def cmd_up(args: argparse.Namespace) -> int:
    """Start (or join) Ray and deploy PS, ingest, trainers and Serve as detached services.

    The state file (``<state dir>/freshet-up.json``, JSON) holds ``version``, ``namespace``,
    ``config``, ``pid`` (of this ``up``), ``phase`` (``starting`` → ``head-up`` → ``deploying``
    → ``up``), ``started_ray``, ``ray_root`` (the private directory of the head's files) and
    ``ray_dir`` (the head's temp dir inside it), both written before the head starts, ``head``
    (:class:`serving.ray_head.HeadInfo`: address, ports, token file, PIDs, extra environment;
    never the token itself), ``address``, ``gcs_address`` (what a joined ``--address`` such as
    ``auto`` resolved to), ``url`` and ``restored_from``.

    Returns:
        0 once everything answers; 1 if something failed (everything started is removed, the
        message names the step, Ray's logs are kept and named) or a service is already up
        here, or ``serving.port`` is in use.
    """
    from serving import deploy
    from serving.cli.ckpt import check_restorable, checkpoint_dir, restore_trainer_offsets

    cfg = load(args, {"stream": {"kind": StreamKind.INGEST.value}} if not args.keep_stream else None)
    if args.ray_port is not None:
        check_ray_port(cfg, args.ray_port, joining=args.address is not None)
    # 0700 when `up` creates it: the state (and, by default, the ingest log) is users' behaviour.
    cfg.ingest.local_state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    previous = read_state(cfg)
    if previous is not None:
        if _up_in_progress(previous):
            print(f"freshet up: another `freshet up` (pid {previous['pid']}) is starting this service "
                  f"({state_path(cfg)}); wait for it, or stop it and run `freshet down`", file=sys.stderr)
            return 1
        # A state file without a phase comes from an older `up`, which wrote it only once up.
        finished = previous.get("phase", "up") == "up"
        gone = _service_gone(previous) if finished else None
        if finished and gone is None:
            print(f"freshet up: already up at {previous.get('url')} (recorded in {state_path(cfg)}); "
                  "`freshet down` first", file=sys.stderr)
            return 1
        if gone is not None:
            print(f"freshet up: the service recorded in {state_path(cfg)} is gone ({gone})", file=sys.stderr)
        print(f"freshet up: removing what an earlier `freshet up` left behind ({state_path(cfg)})", file=sys.stderr)
        # A gone service on a joined cluster has nothing left there; another deployment may have
        # taken its place since, so nothing there is touched.
        joined_gone = gone is not None and not previous.get("started_ray")
        for line in _teardown(cfg, previous, actors=not joined_gone):
            print(f"  removed {line}", file=sys.stderr)
        state_path(cfg).unlink(missing_ok=True)

    # A checkpoint that does not exist, or that a restore could not read whole, fails here,
    # before anything starts or changes.
    restore_from = checkpoint_dir(cfg, args.restore) if getattr(args, "restore", None) else None
    try:
        if restore_from is not None:
            check_restorable(cfg, restore_from)
        else:  # a restore rewrites the trainers' and shards' state; otherwise it must fit this config
            deploy.check_trainer_state(cfg)
            deploy.check_shard_state(cfg)
    except (OSError, RuntimeError) as e:  # ValueError and FileNotFoundError: main() names them the same way
        print(f"freshet up: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    state: dict[str, Any] = {"version": STATE_VERSION, "namespace": cfg.namespace,
                             "config": str(Path(args.config).absolute()) if args.config else None,
                             "pid": os.getpid(), "phase": "starting", "started_ray": False, "ray_root": None,
                             "ray_dir": None,
                             "head": None, "address": args.address, "url": None, "restored_from": None}
    if args.address is None and (busy := _port_in_use(cfg.serving.host, cfg.serving.port)):
        # Before the head starts: Serve would find out only after ~20 s of starting everything.
        print(f"freshet up: serving.port: {cfg.serving.host}:{cfg.serving.port} is in use ({busy}); "
              "stop what listens there or choose another port", file=sys.stderr)
        return 1
    step = "writing the state file"
    try:
        _write_state(cfg, state)
        if args.address is None:
            step = "starting the Ray head"
            from serving.ray_head import high_throughput_env, start_head

            r = cfg.ray
            ray_root, ray_dir = _new_ray_dir()
            _step(state, cfg, "starting", started_ray=True, ray_root=ray_root, ray_dir=ray_dir)
            ports = r.head_ports()
            if args.ray_port is not None:
                ports["gcs"] = args.ray_port
            serve_env = (high_throughput_env(ray_root, ports=r.serve_ports(), head_ports=ports,
                                             avoid=(cfg.serving.port,))
                         if cfg.serving.high_throughput else {})
            head = start_head(ray_dir, ports=ports, auth=r.auth is RayAuth.TOKEN, num_cpus=r.num_cpus,
                              token_path=r.token_path, include_dashboard=r.include_dashboard,
                              worker_ports=r.worker_ports, env=serve_env, system_config=r.system_config(),
                              avoid=(cfg.serving.port,), keep=(ray_root,), timeout_s=r.start_timeout_s)
            _step(state, cfg, "head-up", head=head.model_dump(mode="json"), address=head.address)
        step = f"connecting to Ray at {state['address']}"
        if args.address is not None and (probe := _probe_gcs(args.address)) is not None:
            raise _ClusterRefused(probe.why)  # nothing of ours there to remove
        connect(state)
        import ray

        if args.address is not None and "://" not in args.address:
            # What `auto` resolved to now: `down` and `ckpt` reach this cluster, not the one
            # `auto` names by then.
            state["gcs_address"] = ray.get_runtime_context().gcs_address
        if args.address is not None:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if (warning := local_state_warning(cfg, alive)) is not None:
                print(f"freshet up: WARNING: {warning}", file=sys.stderr)
        if (warning := aged_state_warning(cfg)) is not None:
            print(f"freshet up: WARNING: {warning}", file=sys.stderr)

        step = f"checking that namespace {cfg.namespace} is free"
        taken = sorted(ray.util.list_named_actors())
        if taken:  # someone else's deployment: never start over it, nor remove it
            raise _ClusterRefused(f"namespace {cfg.namespace} already has actors {taken}; stop that deployment "
                                  "(`freshet down` with its config) or choose another namespace")
        if args.address is not None and deploy.serves_freshet():
            # One Serve app per cluster: deploying would replace another namespace's service.
            raise _ClusterRefused("the Ray cluster already runs a Freshet app (another namespace's); "
                                  "stop it with `freshet down` and its config, or use another cluster")
        if restore_from is not None:
            step = f"restoring checkpoint {args.restore}"
            restore_trainer_offsets(cfg, restore_from)
            state["restored_from"] = args.restore
        step = "starting the deployment (PS shards, ingest log, trainers, Serve app)"
        _step(state, cfg, "deploying")
        # autostart: a trainer restarted by Ray resumes training from its committed offset.
        # A head of our own cannot grow: an actor it has no room for would wait forever.
        dep = deploy.start(cfg, detached=True, restore_from=restore_from, autostart=True,
                           require_fit=args.address is None)
        _step(state, cfg, "up", url=dep.url)
    except BaseException as e:
        why = str(e) if isinstance(e, _ClusterRefused) else f"{type(e).__name__}: {e}"
        print(f"freshet up: failed while {step}: {why}", file=sys.stderr)
        try:
            # On a joined cluster nothing is this `up`'s before it starts deploying: removing the
            # app then would remove another namespace's (Serve's app name is the same for all).
            ours = state.get("started_ray") or state.get("phase") in ("deploying", "up")
            removed = _teardown(cfg, state, actors=bool(ours) and not isinstance(e, _ClusterRefused), keep_dir=True)
        except Exception as cleanup:  # noqa: BLE001 - keep the state file: `freshet down` can try again
            print(f"freshet up: could not remove everything it started ({cleanup}); "
                  f"run `freshet down` (state in {state_path(cfg)})", file=sys.stderr)
            return 1
        state_path(cfg).unlink(missing_ok=True)
        for line in removed:
            print(f"freshet up: removed {line}", file=sys.stderr)
        print("freshet up: nothing it started is left running", file=sys.stderr)
        if state.get("ray_dir") and Path(state["ray_dir"]).is_dir():
            print(f"freshet up: Ray's logs are kept in {state['ray_dir']}/session_latest/logs "
                  f"(remove {state.get('ray_root') or state['ray_dir']} when done)", file=sys.stderr)
        if isinstance(e, KeyboardInterrupt):
            return 130
        if not isinstance(e, Exception):
            raise
        return 1
    auth = ("Ray token auth on" if state["head"] and state["head"]["auth"]
            else "Ray token auth OFF" if state["head"] else "joined cluster's own auth")
    print(f"Freshet is up: {dep.url} (Ray at {_gcs_address(state)}, {auth}, namespace {cfg.namespace}). "
          "Stop it with `freshet down`.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running service's /stats (and whether /healthz is OK)."""
    import httpx

    cfg = load(args)
    state = read_state(cfg)
    url = (state or {}).get("url") or f"http://{cfg.serving.host}:{cfg.serving.port}"
    # Beyond loopback /stats needs the token (ServingConfig.token_paths); on loopback it is ignored.
    auth = {"Authorization": f"Bearer {cfg.serving.auth_token}"} if cfg.serving.auth_token else {}
    try:
        health = httpx.get(url + "/healthz", timeout=5)
        stats = httpx.get(url + "/stats", headers=auth, timeout=10)
    except httpx.HTTPError as e:
        where = (f"the state file {state_path(cfg)} names it" if state is not None
                 else f"no state file in {cfg.ingest.local_state_dir()}: "
                      + ("is the service's config the one given?" if args.config else "give the service's --config"))
        print(f"freshet status: no service at {url} ({e}); {where}", file=sys.stderr)
        return 1
    if stats.status_code != 200:  # a 401: the service's token is not this config's
        print(f"freshet status: GET {url}/stats answered {stats.status_code}: {stats.text[:300]}", file=sys.stderr)
        return 1
    print(f"{url}: healthz {health.status_code}")
    print(json.dumps(stats.json(), indent=2, default=str))
    return 0 if health.status_code == 200 else 1


def cmd_down(args: argparse.Namespace) -> int:
    """Remove the Serve app and every named actor of the namespace; stop the Ray head ``up`` started.

    Works from a partial state file (an ``up`` that failed or was killed half-way).

    Returns:
        0 once nothing is left (the state file is removed), 1 without a state file or when
        some process would not stop (the state file is kept for another try).
    """
    cfg = load(args)
    state = read_state(cfg)
    if state is None:
        print(f"freshet down: no {STATE_FILE} under {cfg.ingest.local_state_dir()}; nothing started by `freshet up` here",
              file=sys.stderr)
        return 1
    if _up_in_progress(state):
        print(f"freshet down: `freshet up` (pid {state['pid']}) is still starting; wait for it or stop it first",
              file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        removed = _teardown(cfg, state)
    except RuntimeError as e:
        print(f"freshet down: {e}; state kept in {state_path(cfg)} (try again, or remove that file "
              "yourself once what it names is gone for good)", file=sys.stderr)
        return 1
    state_path(cfg).unlink(missing_ok=True)
    for line in removed:
        print(f"removed {line}")
    print(f"Freshet is down ({time.monotonic() - t0:.1f} s).")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``freshet up``, ``status`` and ``down``."""
    u = sub.add_parser("up", help="start the long-running service")
    add_config_argument(u)
    u.add_argument("--address", type=str.strip, help="join this Ray cluster (e.g. 'auto') instead of starting one; "
                                     "its own auth settings apply")
    u.add_argument("--ray-port", type=int, default=None,
                   help="GCS port of the head `up` starts (default: ray.ports.gcs, else a free port)")
    u.add_argument("--keep-stream", action="store_true", help="train on the configured stream instead of /events")
    u.add_argument("--restore", metavar="NAME", help="start from named checkpoint NAME (see `freshet ckpt`)")
    u.set_defaults(fn=cmd_up)

    s = sub.add_parser("status", help="show the running service's health and stats")
    add_config_argument(s)
    s.set_defaults(fn=cmd_status)

    d = sub.add_parser("down", help="stop the service started by `freshet up`")
    add_config_argument(d)
    d.set_defaults(fn=cmd_down)
