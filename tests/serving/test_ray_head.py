"""``serving.ray_head``: a real local Ray head on loopback with token auth, on ports of its own.

Two heads start at once (one with auth, one without) and must not collide. On the auth head a
driver with the token runs a task and a Serve app; then every listening socket of the head's
processes (workers included) is either on loopback or, connected to through 127.0.0.1 only,
refuses a client without the token. ``stop_head`` must leave none of a head's processes alive.
A running head's directories outlast systemd-tmpfiles' age-based cleaning of ``/tmp``.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import io
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serving import port_leases
from serving.ray_head import (
    HeadInfo,
    Listener,
    client_env,
    head_pids,
    listening_sockets,
    start_head,
    stop_head,
)
from tests.conftest import cmdline, free_port, leased_to

grpc = pytest.importorskip("grpc")

REPO = Path(__file__).resolve().parents[2]

# Ray's fixed default ports: a head that used any of them would collide with another Ray.
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 44217, 44227, 8076, 8077}

# A real RPC of each kind of Ray gRPC server. Ray's C++ servers check the token per method
# (an unknown method answers UNIMPLEMENTED before any check), so a probe needs real names.
PROBE_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetClusterId",  # GCS
    "/ray.rpc.NodeManagerService/GetResourceLoad",  # raylet
    "/ray.rpc.ObjectManagerService/Pull",  # raylet's object manager
    "/ray.rpc.CoreWorkerService/NumPendingTasks",  # every worker and driver
    "/ray.rpc.ReporterService/HealthCheck",  # dashboard agent (gRPC)
    "/ray.rpc.LogService/ListLogs",  # dashboard agent (gRPC)
    "/ray.rpc.RayletDriver/ClusterInfo",  # Ray Client server
    "/ray.serve.ASGIService/HandleRequest",  # Serve replica, inter-deployment gRPC on [::]
)


def _grpc_codes(port: int, token: str | None) -> dict[str, str]:
    """Status code name of each probe method called on 127.0.0.1:``port`` (empty request)."""
    md = (("authorization", f"Bearer {token}"),) if token else None
    out = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for m in PROBE_METHODS:
            try:
                ch.unary_unary(m)(b"", timeout=5, metadata=md)
                out[m] = "OK"
            except grpc.RpcError as e:
                out[m] = e.code().name
    return out


def _http_status(port: int) -> int | None:
    """HTTP status of ``GET /`` on 127.0.0.1:``port`` without a token, None if not HTTP."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):  # not an HTTP server (gRPC closes the connection)
        return None


def refuses_without_token(port: int, token: str) -> tuple[bool, str]:
    """Whether 127.0.0.1:``port`` refuses a client without the token, and the evidence.

    Refused: some real RPC answers UNAUTHENTICATED (or HTTP 401/403) without the token, nothing
    answers OK/200 without it, and the same RPC gets past the check with the token.
    """
    plain = _grpc_codes(port, None)
    denied = [m for m, c in plain.items() if c == "UNAUTHENTICATED"]
    status = _http_status(port)
    if any(c == "OK" for c in plain.values()) or status == 200:
        return False, f"answered without the token: {plain}, HTTP {status}"
    if status in (401, 403):
        return True, f"HTTP {status} without the token"
    if not denied:
        return False, f"no probe was refused for want of a token: {plain}, HTTP {status}"
    with_token = _grpc_codes(port, token)
    if with_token[denied[0]] == "UNAUTHENTICATED":
        return False, f"{denied[0]} refuses even with the token"
    return True, f"{denied[0]}: UNAUTHENTICATED without the token, {with_token[denied[0]]} with it"


def held_by_another(directory: str | os.PathLike) -> bool:
    """Whether another process holds a BSD lock on ``directory``: systemd-tmpfiles tries an
    exclusive one (without waiting) before it ages a directory's contents, and skips it, with
    everything below it, when that fails (tmpfiles.d(5), "Age")."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was had
    return False


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has exited


# Not Freshet's default, so the check below sees the argument and not a default.
_SYSTEM_CONFIG = {"max_direct_call_object_size": 777_777}


@pytest.fixture(scope="module")
def heads():
    """Two heads started concurrently: (token auth, 1 CPU) and (auth off, 1 CPU), plus its stderr.
    The first one's Ray temp dir is ``ray`` in a directory of its own, as ``freshet up``'s is."""
    dirs = [tempfile.mkdtemp(prefix="rh.", dir="/tmp") for _ in range(2)]
    err = io.StringIO()
    started: list[HeadInfo] = []
    try:
        with contextlib.redirect_stderr(err), ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(start_head, f"{dirs[0]}/ray", num_cpus=1, timeout_s=60, system_config=_SYSTEM_CONFIG),
                    pool.submit(start_head, dirs[1], num_cpus=1, auth=False, timeout_s=60)]
            for f in futs:  # keep what did start, so it is stopped even if the other failed
                with contextlib.suppress(Exception):
                    started.append(f.result())
            a, b = (f.result() for f in futs)
        yield a, b, err.getvalue()
    finally:
        for info in started:
            with contextlib.suppress(Exception):
                stop_head(info)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def serve_on_auth_head(heads):
    """Run a driver with the token against the auth head: a task, then a Serve app left running."""
    a = heads[0]
    http_port = free_port()  # never in a head's range (worker block included)
    script = textwrap.dedent(f"""
        import urllib.request
        import ray
        from ray import serve
        ray.init(address={a.address!r}, log_to_driver=False)
        print("task", ray.get(ray.remote(lambda x: x + 1).remote(41)), flush=True)
        print("system_config", ray._private.state.state.get_system_config()["max_direct_call_object_size"], flush=True)
        serve.start(http_options={{"host": "127.0.0.1", "port": {http_port}}})

        @serve.deployment(ray_actor_options={{"num_cpus": 0}})
        def hello(request):
            return "hi"

        serve.run(hello.bind(), name="hello", route_prefix="/")
        # No Ray token here: Serve's HTTP proxy is the public app, outside Ray's token auth.
        print("http", urllib.request.urlopen("http://127.0.0.1:{http_port}/", timeout=10).read().decode(), flush=True)
    """)
    env = {**os.environ, **client_env(a), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout, http_port


def test_heads_start_concurrently_on_distinct_free_ports(heads):
    a, b, err = heads
    used = []
    for info in (a, b):
        named = {k: p for k, p in info.ports.items() if k not in ("min_worker", "max_worker")}
        block = range(info.ports["min_worker"], info.ports["max_worker"] + 1)
        used.append(set(named.values()) | set(block))
        assert info.address == f"127.0.0.1:{info.ports['gcs']}"
        assert all(20000 <= p <= 29999 for p in used[-1]), info.ports
        assert not used[-1] & RAY_DEFAULT_PORTS
        assert len(named) == len(set(named.values())) and not set(named.values()) & set(block)
    assert not used[0] & used[1], "two heads share a port"
    # Leased to each head's `ray start` process, so other processes skip its worker block (bound
    # one port at a time, as workers start) after the starting process has exited.
    assert leased_to(a.root_pid) == used[0] and leased_to(b.root_pid) == used[1]
    assert a.auth and Path(a.token_path).stat().st_mode & 0o077 == 0, "token file must be private"
    assert not b.auth and b.token_path is None
    assert "token authentication is OFF" in err
    # No log monitor (it would poll every log file 10 times a second for drivers that never read it).
    for info in (a, b):
        scripts = {Path(arg).name for pid in head_pids(info) for arg in cmdline(pid)[1:3]}
        assert "monitor.py" in scripts and "log_monitor.py" not in scripts, scripts


def test_every_listener_is_loopback_or_refuses_without_token(heads, serve_on_auth_head):
    a = heads[0]
    token = Path(a.token_path).read_text().strip()
    listeners = listening_sockets(head_pids(a))
    ports = {s.port for s in listeners}
    # the head's own ports are all there (workers and Serve add more)
    assert {p for k, p in a.ports.items() if k not in ("min_worker", "max_worker")} <= ports
    assert serve_on_auth_head[1] in ports
    exposed = [s for s in listeners if not s.is_loopback]
    failures = []
    for s in exposed:
        ok, why = refuses_without_token(s.port, token)
        print(f"beyond loopback: {s} -> {why}")  # with Ray 2.60: each Serve replica's gRPC server on [::]
        if not ok:
            failures.append(f"{s}: {why}")
    assert not failures, "listeners beyond loopback that accept a client without the token:\n" + "\n".join(failures)
    # The check itself works: the GCS refuses a token-less client and lets the token through.
    ok, why = refuses_without_token(a.ports["gcs"], token)
    assert ok, why


def test_driver_with_token_runs_task_and_serve(serve_on_auth_head):
    out, _ = serve_on_auth_head
    assert "task 42" in out and "http hi" in out, out
    # start_head(system_config=...) reached the cluster, so drivers and workers use it.
    assert f"system_config {_SYSTEM_CONFIG['max_direct_call_object_size']}" in out, out


def test_a_running_head_holds_its_directories_against_tmp_cleaning(heads):
    # Distributions age /tmp out (RHEL: after 10 days): a head meant to run for months would lose
    # its sockets, token file and logs, and its port leases, which keep other Freshet processes
    # off its worker ports.
    for info in heads[:2]:
        assert held_by_another(info.temp_dir)
    assert held_by_another(port_leases.default_dir())


def test_holding_skips_a_directory_it_cannot_open_and_lets_go_when_closed(tmp_path):
    # The lock only protects: a directory gone (a port leases dir never made, say) must not
    # keep a head from starting.
    from serving.ray_head import _hold_open

    fds = _hold_open([tmp_path / "gone", tmp_path, tmp_path])
    try:
        assert len(fds) == 1 and held_by_another(tmp_path)
    finally:
        for fd in fds:
            os.close(fd)
    assert not held_by_another(tmp_path)


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles")
def test_tmp_cleaning_leaves_a_running_heads_files_and_takes_the_rest(heads, tmp_path):
    a = heads[0]
    temp = Path(a.temp_dir)
    parent = temp.parent  # the head's own directory, standing in for /tmp
    long_ago = time.time() - 30 * 86_400
    (temp / "aged").write_text("x")
    (parent / "loose").mkdir()
    (parent / "loose" / "aged").write_text("x")
    for p in (temp / "aged", Path(a.token_path), parent / "loose" / "aged", parent / "loose"):
        os.utime(p, (long_ago, long_ago))
    conf = tmp_path / "clean.conf"
    conf.write_text(f"e {parent} - - - mM:10d\n")  # aged by modification time, as /tmp is after 10 days
    run = subprocess.run(["systemd-tmpfiles", "--clean", str(conf)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert not (parent / "loose").exists(), "the cleaning did not run"
    assert (temp / "aged").exists() and Path(a.token_path).exists()


def test_head_without_auth_answers_without_token(heads):
    b = heads[1]
    assert _grpc_codes(b.ports["gcs"], None)["/ray.rpc.NodeInfoGcsService/GetClusterId"] == "OK"
    assert all(s.is_loopback for s in listening_sockets(head_pids(b))), listening_sockets(head_pids(b))


def test_stop_head_leaves_no_process(heads):
    b = heads[1]
    seen = set(head_pids(b)) | set(b.pids)
    stopped = stop_head(b)
    assert b.root_pid in stopped
    assert head_pids(b) == []
    assert leased_to(b.root_pid) == set()
    alive = [p for p in seen if not _gone(p)]
    assert not alive, f"still alive after stop_head: {alive}"
    assert not [s for s in listening_sockets(seen)], "a stopped head still listens"
    assert not held_by_another(b.temp_dir), "a stopped head still holds its directory"
    assert heads[0].root_pid not in stopped and head_pids(heads[0]), "stopping one head touched the other"


def test_a_start_interrupted_while_waiting_stops_its_head(monkeypatch):
    # The head runs in a session of its own, so a Ctrl-C in the caller does not reach it, and
    # start_head never returned its HeadInfo: a bench interrupted here left the whole head running.
    from serving import ray_head

    launched: list[HeadInfo] = []

    def interrupted(proc, info, log_path, deadline):  # `ray start` is running: Ctrl-C as the wait begins
        assert proc.poll() is None and head_pids(info)
        launched.append(info)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_head, "_wait_ready", interrupted)
    d = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    try:
        with pytest.raises(KeyboardInterrupt):
            start_head(d, auth=False, num_cpus=1)
        (info,) = launched
        assert head_pids(info) == [] and _gone(info.root_pid)
        assert leased_to(info.root_pid) == set()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_bad_ports_are_rejected_before_anything_starts(tmp_path):
    d = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    with pytest.raises(ValueError, match="unknown ports"):
        start_head(d, ports={"gcs": 25000, "bogus": 1})
    with pytest.raises(ValueError, match="min_worker"):
        start_head(d, ports={"min_worker": 25000})
    with pytest.raises(ValueError, match="longer than"):
        start_head(tmp_path / ("x" * 60))
    assert not list(Path(d).iterdir()), "nothing may be written for a rejected call"
    os.rmdir(d)


def test_listener_loopback_classification():
    assert Listener(1, "127.0.0.1", 1).is_loopback
    assert Listener(1, "::1", 1).is_loopback
    assert Listener(1, "::ffff:127.0.0.1", 1).is_loopback
    assert not Listener(1, "0.0.0.0", 1).is_loopback
    assert not Listener(1, "::", 1).is_loopback
    assert not Listener(1, "192.0.2.2", 1).is_loopback


def test_reserved_ports_are_free_distinct_and_never_handed_out_twice():
    from serving import ray_head

    def span(r: dict) -> set[int]:
        return {p for k, p in r.items() if not k.startswith("blk")} | set(range(r["blk_min"], r["blk_max"] + 1))

    a = ray_head.reserve_ports(["x", "y"], {"blk": 20})
    b = ray_head.reserve_ports(["x"], {"blk": 20})
    try:
        assert a["blk_max"] - a["blk_min"] == 19 and len(span(a)) == 22
        assert not span(a) & span(b), "a held port was handed out again"
        assert all(20000 <= p <= 29999 for p in span(a) | span(b))
        assert not (span(a) | span(b)) & RAY_DEFAULT_PORTS
    finally:
        ray_head.release_ports(a)
        ray_head.release_ports(b)
    assert not (set(a.values()) | set(b.values())) & ray_head._reserved
    with pytest.raises(ValueError):
        ray_head.reserve_ports([], {"blk": 0})


def test_reserved_ports_never_land_on_ports_to_avoid():
    from serving import ray_head

    # A given port (HAProxy's stats port, say) inside a free block picked beside it would make a
    # replica fail to bind. 2,000 ports to avoid meet a random 64-port block in ~1 of 6 picks.
    avoid = set(range(24000, 26000))
    for _ in range(100):
        r = ray_head.reserve_ports(["x"], {"blk": 64}, avoid=avoid)
        try:
            assert r["x"] not in avoid and not set(range(r["blk_min"], r["blk_max"] + 1)) & avoid, r
        finally:
            ray_head.release_ports(r)


def test_free_ports_and_a_heads_ports_come_from_apart_ranges():
    # A Serve app's port from free_port() is bound ~20 s later; a head starting meanwhile saw it
    # free and took it for a listener or its worker block (a CI run: "Failed to bind to address").
    from serving import ray_head

    picks = {ray_head.free_port() for _ in range(50)}
    assert all(30000 <= p <= 32767 for p in picks), sorted(picks)
    with ray_head._lock:
        head = ray_head._resolve_ports(None, include_dashboard=True, worker_ports=200, rng=random.Random(0))
    assert all(20000 <= p <= 29999 for p in ray_head._port_set(head)), head


def test_a_head_and_the_high_throughput_ports_never_land_on_ports_to_avoid():
    # `freshet up` gives the Serve app's port, not bound until the head is up: 2,000 ports to
    # avoid meet a random choice of a head's ~10 listeners and 200-port worker block in ~9 of 10.
    from serving import ray_head

    avoid = set(range(24000, 26000))
    for i in range(50):
        with ray_head._lock:
            head = ray_head._resolve_ports(None, include_dashboard=False, worker_ports=200, rng=random.Random(i),
                                           avoid=avoid)
        assert not ray_head._port_set(head) & avoid, head
    run_dir = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    try:
        for _ in range(20):
            env = ray_head.high_throughput_env(run_dir, avoid=avoid)
            picked = {int(env[v]) for v in ray_head.SERVE_HT_PORT_ENV.values()}
            for kind in ("HTTP", "GRPC"):
                lo, hi = (int(env[f"RAY_SERVE_DIRECT_INGRESS_{e}_{kind}_PORT"]) for e in ("MIN", "MAX"))
                picked |= set(range(lo, hi + 1))
            assert not picked & avoid, sorted(picked & avoid)[:5]
            ray_head.release_ports({str(p): p for p in picked})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_port_set_expands_blocks_and_skips_ports_ray_picks():
    from serving.ray_head import _port_set

    head = {"gcs": 6400, "dashboard": 0, "min_worker": 30000, "max_worker": 30002}
    assert _port_set(head) == {6400, 30000, 30001, 30002}
    # min_worker 0: Ray picks the workers' ports and ignores max_worker, so nothing is held for them.
    assert _port_set({"gcs": 6400, "min_worker": 0, "max_worker": 65535}) == {6400}
    reserved = {"x": 7000, "blk_min": 8000, "blk_max": 8001, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 9000, "half_min": 9100}
    assert _port_set(reserved) == {7000, 8000, 8001, 9000}


def test_high_throughput_env_picks_around_given_and_head_ports():
    from serving import ray_head

    head = {"gcs": 23500, "min_worker": 24000, "max_worker": 25999}  # 2,000 ports: a random block meets them often
    run_dir = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    try:
        for _ in range(20):
            env = ray_head.high_throughput_env(run_dir, ports={"haproxy_stats": 26500}, head_ports=head)
            picked = {int(env[v]) for v in ray_head.SERVE_HT_PORT_ENV.values()}
            for kind in ("HTTP", "GRPC"):
                lo, hi = (int(env[f"RAY_SERVE_DIRECT_INGRESS_{e}_{kind}_PORT"]) for e in ("MIN", "MAX"))
                picked |= set(range(lo, hi + 1))
            free = picked - {26500}
            assert not free & (set(range(24000, 26000)) | {23500, 26500}), sorted(free)[:5]
            ray_head.release_ports({str(p): p for p in free})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_high_throughput_env_moves_every_listener_and_file(tmp_path):
    from serving import ray_head

    run_dir = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    try:
        env = ray_head.high_throughput_env(run_dir, ports={"haproxy_stats": 25123})
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
        # a proxy gets at least as long to be ready as Serve gives HAProxy to start inside it
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S
        assert float(env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) >= RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S
        assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "25123"  # a given port is used as is
        ports = [int(env[v]) for v in ray_head.SERVE_HT_PORT_ENV.values()]
        assert len(set(ports)) == 4 and not set(ports) & {8404, 9101, 8500, 9500}
        for kind in ("HTTP", "GRPC"):
            lo, hi = (int(env[f"RAY_SERVE_DIRECT_INGRESS_{e}_{kind}_PORT"]) for e in ("MIN", "MAX"))
            assert 20000 <= lo < hi <= 29999 and not set(range(lo, hi + 1)) & set(ports)
        files = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
        assert len(files) == 6 and all(f.startswith(run_dir + "/hap") for f in files), files
        wrapper = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
        assert os.access(wrapper, os.X_OK) and "25123" in wrapper.read_text()
        # The wrapper moves exactly the stats and metrics binds to loopback, then runs HAProxy.
        metrics = env["RAY_SERVE_HAPROXY_METRICS_PORT"]
        cfg = wrapper.parent / "t.cfg"
        cfg.write_text(f"frontend prometheus\n    bind :{metrics}\n    mode http\nfrontend http_frontend\n"
                       f"    bind *:8000\n    mode http\nlisten stats\n  bind *:25123\n  mode http\n")
        run = subprocess.run([str(wrapper), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30,
                             check=False)
        assert run.returncode == 0, run.stderr
        text = cfg.read_text()
        assert f"bind 127.0.0.1:{metrics}\n" in text and "bind 127.0.0.1:25123\n" in text
        assert "bind *:8000\n" in text  # the app's own bind is serving.host's business
        assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in ray_head.high_throughput_env(run_dir, loopback=False)
        with pytest.raises(ValueError, match="unknown ports"):
            ray_head.high_throughput_env(run_dir, ports={"bogus": 1})
        with pytest.raises(ValueError, match="longer than"):
            ray_head.high_throughput_env("/tmp/" + "x" * 40)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_high_throughput_run_hands_back_every_port_and_removes_its_dir():
    from serving import ray_head

    with ray_head.high_throughput_run("rh.") as env:
        run_dir = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]).parent
        assert run_dir.parent == Path("/tmp") and (run_dir / "hap" / "haproxy").exists()
        held = {int(env[v]) for v in ray_head.SERVE_HT_PORT_ENV.values()}
        for kind in ("HTTP", "GRPC"):
            lo, hi = (int(env[f"RAY_SERVE_DIRECT_INGRESS_{e}_{kind}_PORT"]) for e in ("MIN", "MAX"))
            held |= set(range(lo, hi + 1))
        assert len(held) == 4 + 64 + 16 and held <= ray_head._reserved and held <= leased_to(os.getpid())
    # The whole blocks, not only their ends: the replicas' ports are free for the next run.
    assert not held & ray_head._reserved and not held & leased_to(os.getpid())
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="longer than"), ray_head.high_throughput_run("x" * 40):
        pass
    assert not list(Path("/tmp").glob("x" * 40 + "*"))


def test_start_head_refuses_auth_settings_in_env():
    d = tempfile.mkdtemp(prefix="rh.", dir="/tmp")
    with pytest.raises(ValueError, match="RAY_AUTH_MODE"):
        start_head(d, env={"RAY_AUTH_MODE": "disabled"})
    assert not list(Path(d).iterdir())
    os.rmdir(d)


def test_serve_run_dir_is_the_clusters_and_never_follows_a_link(tmp_path):
    # The dir run_app gives HAProxy is named after the cluster, so deploy.stop in another process
    # (freshet down) finds it; a link planted at that name is neither used nor followed.
    from serving import ray_head

    address = f"127.0.0.1:{free_port()}"
    path = ray_head.serve_run_dir(address)
    assert path.parent == Path("/tmp") and len(str(path / "hap")) <= 27
    assert ray_head.serve_run_dir(address) == path != ray_head.serve_run_dir("127.0.0.1:1")
    try:
        made = ray_head.make_serve_run_dir(address)
        assert made == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o700
        (path / "hap").mkdir()
        assert ray_head.make_serve_run_dir(address) == made and (path / "hap").is_dir()  # in use: kept
        assert ray_head.remove_serve_run_dir(address) == made and not path.exists()
        assert ray_head.remove_serve_run_dir(address) is None

        target = tmp_path / "theirs"
        target.mkdir()
        (target / "keep").write_text("x")
        path.symlink_to(target)
        other = ray_head.make_serve_run_dir(address)
        try:
            assert other != str(path) and Path(other).name.startswith("frht") and Path(other).is_dir()
        finally:
            shutil.rmtree(other, ignore_errors=True)
        assert ray_head.remove_serve_run_dir(address) is None and (target / "keep").exists()
    finally:
        if path.is_symlink():
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)


def test_free_port_does_not_repeat_its_latest_answers_and_start_head_refuses_a_given_port_to_avoid():
    # Two ports taken in a row and bound later (a Serve port, then a GCS port) must differ:
    # drawn from 2,768 ports, 60 picks repeat one with a chance of ~1 in 2.
    from serving import ray_head

    picks = [ray_head.free_port() for _ in range(60)]
    assert len(set(picks)) == len(picks)
    temp = Path(f"/tmp/rh.avoid.{os.getpid()}")
    with pytest.raises(ValueError, match=r"ports \[26000\] are given to the head and also to avoid"):
        ray_head.start_head(temp, ports={"gcs": 26000}, avoid=(26000,))
    assert not temp.exists()  # refused before anything was written


def test_no_free_port_names_the_function_that_was_asked(monkeypatch):
    from serving import ray_head

    monkeypatch.setattr(ray_head, "_usable", lambda port: False)  # every port taken
    with pytest.raises(RuntimeError, match=r"^free_port: no free port for port in 30000-32767$"):
        ray_head.free_port()
    with pytest.raises(RuntimeError, match=r"^reserve_ports: no free port for x in 20000-29999$"):
        ray_head.reserve_ports(["x"])
    with pytest.raises(RuntimeError, match=r"^reserve_ports: no 4 consecutive free ports in 20000-29999$"):
        ray_head.reserve_ports(blocks={"b": 4})
    with pytest.raises(RuntimeError, match=r"^start_head: no 200 consecutive free ports in 20000-29999$"):
        ray_head._resolve_ports(None, include_dashboard=False, worker_ports=200, rng=ray_head.random.Random())
