"""Shared test harness: one ``_ray_start`` context manager behind thin fixtures.

Ray runs on 127.0.0.1 with a private temp dir, no dashboard, token auth off (these are local
tests) and usage stats off. Each test process keeps one Ray head (``ray start``) that its test
modules join in turn, each as a job of its own; a module that changes Ray's environment gets
a fresh local cluster instead. Only what a test process started is stopped, by PID
(``stop_head``, ``ray.shutdown()``), never with a host-wide ``ray stop``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from serving.config import RayConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")
# Single-node mode: the test clusters' GCS and raylet listen on loopback only (they run with
# auth off; Ray's default is every interface). Set before Ray is imported, which caches it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# What the code under test leaves in temp dirs it makes itself (a `freshet run`'s ingest log,
# a service's state, quarantine files; hundreds of dirs a run of the suite) goes into one dir
# per test process, removed when it exits, so runs of the suite do not pile up in /tmp. The
# child processes tests start (`freshet` commands) inherit it through TMPDIR; Ray keeps its own
# RAY_TMPDIR, and `freshet up` its /tmp/frup* (short socket paths).
_TMP = tempfile.mkdtemp(prefix="freshet-tests-")
tempfile.tempdir = _TMP
os.environ["TMPDIR"] = _TMP
atexit.register(shutil.rmtree, _TMP, True)

REPO = Path(__file__).resolve().parents[1]
MOVIELENS = REPO.parent / "shared" / "data" / "ml-latest-small"


# The files that hold a test worker longest, longest first (seconds of one worker in a run of
# the whole suite, 3 test processes sharing 2 cores, 2026-12-02): they start first, so the short
# files fill the gaps at the end instead of one worker running test_service.py alone for its last
# minutes (longest processing time first). A file not listed keeps its place after these.
_LONGEST_FIRST = (
    "tests/serving/cli/test_service.py",  # 232
    "tests/test_faults.py",  # 220
    "tests/serving/cli/test_service_long_running.py",  # 162
    "tests/serving/cli/test_service_joined.py",  # 149
    "tests/serving/cli/test_run_data.py",  # 146
    "tests/workers/test_trainer_recovery.py",  # 99
    "tests/serving/test_serving_modes.py",  # 89
    "tests/bench/test_call_cost.py",  # 82
    "tests/serving/test_id_lifecycle.py",  # 74
    "tests/bench/test_tune_defaults.py",  # 72
    "tests/workers/test_trainer.py",  # 67
    "tests/serving/cli/test_eval_live.py",  # 61
    "tests/bench/test_soak.py",  # 57
    "tests/workers/test_trainer_supervision.py",  # 52
    "tests/serving/test_fuzz.py",  # 51
    "tests/serving/test_ray_head.py",  # 50
    "tests/serving/cli/test_eval.py",  # 48
    "tests/serving/cli/test_eval_live_own.py",  # 46
    "tests/bench/test_train_throughput.py",  # 41
    "tests/serving/test_app.py",  # 40
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the files of :data:`_LONGEST_FIRST` first, in that order (a stable sort: tests keep
    their order within a file). ``--dist loadfile --no-loadscope-reorder`` (pyproject.toml) hands
    files to the workers in this order."""
    rank = {f: i for i, f in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, from 30000-32767 (see
    :func:`serving.ray_head.free_port`: below Linux's ephemeral range, where a port bound to 0
    by Ray or any other program could take it between this check and Serve binding it, and
    apart from the ports heads pick, which could take it the same way; CI showed each once as
    "Failed to bind to address")."""
    from serving.ray_head import free_port as _free_port

    return _free_port()


def leased_to(pid: int) -> set[int]:
    """Ports the host-wide leases (:mod:`serving.port_leases`) hold for process ``pid``."""
    from serving import port_leases

    with port_leases.leasing() as leases:
        return {p for e in leases.entries() if e["pid"] == pid for lo, hi in e["ports"] for p in range(lo, hi + 1)}


def wait_for(fn, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``fn`` until it returns a truthy value; fail naming ``what`` after ``timeout_s`` seconds."""
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def write_yaml(tmp_path: Path, data: object, name: str = "freshet.yaml") -> Path:
    """Write ``data`` (a YAML string, or anything ``yaml.safe_dump`` takes) to ``tmp_path/name``."""
    import yaml

    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(tmp_path: Path, data: object) -> str:
    """The message of the ``ConfigError`` that loading ``data`` as a config file raises."""
    from ps.config import ConfigError
    from serving.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    return str(info.value)


class FakeClock:
    """Stands in for the ``time`` module inside a module under test, so ages are exact:
    ``time()`` returns ``now``; everything else is the real ``time``."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        """The fake current time (unix seconds)."""
        return self.now

    def __getattr__(self, name):
        import time

        return getattr(time, name)


@pytest.fixture(autouse=True, scope="module")
def _forget_serve_client():
    """Drop Serve's cached controller handle before each test module.

    Serve caches it per process and trusts it while the job id matches, and every new local
    cluster's first driver gets the same job id: a module that starts its own Ray after an
    earlier module used Serve in this process would otherwise call a controller of a cluster
    that is gone ("Can't find actor ... from a different cluster"). Serve rediscovers the
    controller by name on the next call.
    """
    if "ray.serve" in sys.modules:
        from ray.serve import context

        context._disconnect()
    yield


def _ray_env() -> dict[str, str]:
    """The ``RAY_*`` environment: what a Ray cluster's processes take from the process that starts
    it (less ``RAY_CLIENT_MODE``, which ``import ray`` sets in every process)."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAY_") and k != "RAY_CLIENT_MODE"}


# Ray's environment as this conftest set it: a module that runs with another one (Serve's
# high-throughput mode, say) needs Ray's processes started with it, so it gets its own cluster.
_BASE_RAY_ENV = _ray_env()
# This test process's shared Ray head and the guard process that stops it should this process
# die without stopping it (pytest killed, say): (HeadInfo, guard Popen) once started.
_HEAD: tuple | None = None


def _stop_shared_head() -> None:
    """Stop this process's shared Ray head (by its PIDs) and its guard; remove its temp dir."""
    global _HEAD
    if _HEAD is None:
        return
    from serving.ray_head import stop_head

    info, guard = _HEAD
    _HEAD = None
    with contextlib.suppress(Exception):
        stop_head(info)
    if guard is not None:
        guard.kill()
        guard.wait()
        guard.stdin.close()
    shutil.rmtree(info.temp_dir, ignore_errors=True)


def cmdline(pid: int) -> list[str]:
    """The command line of process ``pid`` (``[]`` once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _head_alive(info) -> bool:
    """Whether the head's GCS and raylet are running (``ray start --block`` outlives a GCS or
    raylet that exits with status 0 or on SIGTERM, and a driver would then wait minutes)."""
    from serving.ray_head import head_pids

    names = {c[0].rsplit("/", 1)[-1] for pid in head_pids(info) if (c := cmdline(pid))}
    return {"gcs_server", "raylet"} <= names


def _shared_head():
    """This test process's Ray head (2 CPUs, the product's Ray settings): started on first use,
    started again once its GCS or raylet is gone, stopped when the process's session ends.

    Starting and stopping a local Ray takes ~5 s; joining a running head as a new job ~0.3 s,
    and Ray kills the job's actors when its driver disconnects. Six Ray modules run alone
    (``-n 0``) took 62 s against 72-79 s with a cluster each, and ~5% less CPU (2026-12-01).
    The head keeps the environment and working directory of the test that started it: a
    module that needs Ray's processes to see another ``RAY_*`` environment gets a cluster of
    its own (:func:`_ray_start`).
    """
    global _HEAD
    from serving.ray_head import start_head

    if _HEAD is not None and not _head_alive(_HEAD[0]):
        _stop_shared_head()
    if _HEAD is None:
        tmp = tempfile.mkdtemp(prefix="frh", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
        # start_head warns loudly that auth is off: these tests run with it off on purpose.
        # Worker ports: kernel-chosen (above 32767), away from the 30000-32767 that free_port()
        # hands to the tests' Serve apps.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            info = start_head(tmp, auth=False, num_cpus=2, ports={"min_worker": 0, "max_worker": 0},
                              system_config=RayConfig().system_config())
        # The guard waits on a pipe whose only writer is this process: when it ends, however it
        # ends, the guard stops every process of the head (they share the session of its root).
        guard = None
        if shutil.which("pkill"):
            guard = subprocess.Popen(
                ["sh", "-c", f"read _; pkill -TERM -s {info.root_pid}; sleep 5; pkill -KILL -s {info.root_pid}"],
                start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _HEAD = (info, guard)
    return _HEAD[0]


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop the shared Ray head at the end of this (worker) process's session."""
    _stop_shared_head()


atexit.register(_stop_shared_head)


def _clean(ray) -> bool:
    """Whether the connected cluster holds nothing of an earlier job: no named actor, every CPU free."""
    return (not ray.util.list_named_actors(all_namespaces=True)
            and ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", -1))


def _leave_shared_head_clean() -> bool:
    """Before a module's driver leaves the shared head, stop what would outlive its job there:
    Serve (a detached controller and proxies) and any named actor. False when Serve did not
    shut down: its controller killed mid-way would leave a shutdown mark in the GCS that makes
    the next module's Serve stop itself, so the head must go instead."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    if any(a["namespace"] == "serve" for a in named):
        from ray import serve

        serve.shutdown()
        named = ray.util.list_named_actors(all_namespaces=True)
        if any(a["namespace"] == "serve" for a in named):
            return False
    for a in named:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    return True


def _join_shared_head():
    """``ray.init`` on the shared head once it is clean (the last job's actors gone, which Ray
    does shortly after its driver leaves); a head still unclean after 10 s is replaced."""
    import time

    import ray

    info = ray.init(address=_shared_head().address, log_to_driver=False, configure_logging=False)
    deadline = time.monotonic() + 10.0
    while not _clean(ray):
        if time.monotonic() > deadline:
            ray.shutdown()
            _stop_shared_head()
            return ray.init(address=_shared_head().address, log_to_driver=False, configure_logging=False)
        time.sleep(0.05)
    return info


@contextlib.contextmanager
def _ray_start(*, own: bool = False, **kwargs):
    """Connect to Ray (2 CPUs, 127.0.0.1) for the duration of the block.

    By default, in the environment this conftest set, it joins this process's shared head
    (:func:`_shared_head`) as a new job. With ``own`` (a test that leaves the cluster in a state
    no other module should meet), ``kwargs`` (``ray.init`` arguments over the defaults) or
    another ``RAY_*`` environment, it starts a local Ray with a private temp dir and shuts it
    down after.
    """
    import ray

    if not own and not kwargs and _ray_env() == _BASE_RAY_ENV:
        info = _join_shared_head()
        clean = False
        try:
            yield info
        finally:
            try:
                clean = ray.is_initialized() and _leave_shared_head_clean()
            finally:
                if "ray.serve" in sys.modules:  # the cached controller handle is this job's
                    from ray.serve import context

                    context._disconnect()
                ray.shutdown()
                if not clean:  # what is left there is not known to be gone: the next module gets a new head
                    _stop_shared_head()
        return
    tmp = tempfile.mkdtemp(prefix="frt", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
    # Freshet's own Ray settings, so the tests exercise the transport the product runs on;
    # "local": a new cluster even if RAY_ADDRESS names another one.
    opts = dict(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
                log_to_driver=False, configure_logging=False, _system_config=RayConfig().system_config())
    opts.update(kwargs)
    info = ray.init(**opts)
    try:
        yield info
    finally:
        if "ray.serve" in sys.modules:  # the cached controller handle dies with this cluster
            from ray.serve import context

            context._disconnect()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray for one test module (a job on this process's shared head; see :func:`_ray_start`)."""
    with _ray_start() as info:
        yield info


@pytest.fixture
def movielens_ratings() -> Path:
    """Path of the shared MovieLens ratings.csv; skips the test when it is absent."""
    path = MOVIELENS / "ratings.csv"
    if not path.exists():
        pytest.skip(f"MovieLens data not found at {path}")
    return path
