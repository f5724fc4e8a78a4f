"""The ``freshet`` command line as a user runs it: real subprocesses, a real Ray head started by
``freshet up`` and stopped by ``freshet down`` (by its processes, never a host-wide ``ray stop``),
real HTTP on 127.0.0.1.

* Secure by default: ``freshet up`` with no ``ray:`` settings starts its head with token auth;
  every socket its processes listen on is on loopback or refuses a client without the token.
  It coexists with a plain ``ray.init()`` cluster on the host and ``down`` leaves that running.
* All-or-nothing: a failed ``up`` (a trainer that cannot start) removes what it started (on a
  joined cluster: ``test_service_joined.py``), and the next ``up`` works; ``down`` after an ``up``
  that was killed half-way removes the head from the partial state file.
* Config refusals: a non-loopback ``serving.host`` without ``serving.auth_token`` never starts;
  ``ray.auth: disabled`` warns.
* Checkpoints: save, restore into a fresh deployment that ranks exactly as at save time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from serving import ray_head
from serving.ray_head import HeadInfo, client_env, head_pids, listening_sockets
from tests.conftest import free_port, leased_to
from tests.serving.cli.helpers import REPO, cli_env, freshet, freshet_popen
from tests.serving.test_ray_head import RAY_DEFAULT_PORTS, held_by_another, refuses_without_token

TOKEN = "cli-test-token-93e1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(tmp_path: Path, name: str = "freshet.yaml", **sections) -> Path:
    conf = {
        "namespace": f"clitest-{uuid.uuid4().hex[:6]}",
        "ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"batch_size": 32},
        "ingest": {"dir": str(tmp_path / "data")},
        "serving": {"port": free_port()},
    }
    for key, value in sections.items():
        conf[key] = {**conf.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(conf))
    return path


def _state(cfg: Path) -> dict | None:
    conf = yaml.safe_load(cfg.read_text())
    ingest = conf["ingest"]
    p = Path(ingest.get("state_dir") or ingest["dir"]) / "freshet-up.json"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads(p.read_text())
    return None


def _wait_applied(url: str, accepted: int, timeout_s: float = 90.0) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stats = httpx.get(url + "/stats", timeout=10).json()
        if stats["events_applied"] >= accepted:
            return stats
        time.sleep(0.3)
    raise AssertionError(f"events not applied in time: {stats}")


def _rankings(url: str, users) -> list:
    return [httpx.post(url + "/rank", json={"user_id": u, "k": 5}, timeout=10).json()["items"] for u in users]


def _named_actors(head: HeadInfo, namespace: str) -> list[str]:
    """Named actors of ``namespace`` on ``head``, listed by a driver with the head's token."""
    script = (f"import json, ray; ray.init(address={head.address!r}, namespace={namespace!r}, log_to_driver=False); "
              "print(json.dumps(sorted(ray.util.list_named_actors())))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=cli_env(client_env(head)), cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_gone(head: HeadInfo, seen: set[int]) -> None:
    assert head_pids(head) == [], f"processes of the head still alive: {head_pids(head)}"
    alive = [p for p in seen if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")]
    assert not alive, f"still alive: {alive}"


def _haproxy_argvs(head: HeadInfo) -> dict[int, list[str]]:
    """Command lines of the HAProxy processes of ``head`` (Serve's high-throughput mode), by pid."""
    found = {}
    for pid in head_pids(head):
        with contextlib.suppress(OSError):
            argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            if Path(argv[0]).name == "haproxy":
                found[pid] = argv
    return found


def _haproxy_listeners(head: HeadInfo) -> list:
    """Listening sockets of the HAProxy processes of ``head``."""
    return listening_sockets(list(_haproxy_argvs(head)))


def _assert_secure(head: HeadInfo) -> None:
    """Token auth on, private token file, ports of its own, and every socket beyond loopback refusing
    a client without the token (connecting through 127.0.0.1 only)."""
    assert head.auth and head.token_path
    assert Path(head.token_path).stat().st_mode & 0o077 == 0, "the token file must be private"
    named = {k: p for k, p in head.ports.items() if k not in ("min_worker", "max_worker")}
    assert not set(named.values()) & RAY_DEFAULT_PORTS, named
    token = Path(head.token_path).read_text().strip()
    listeners = listening_sockets(head_pids(head))
    assert set(named.values()) <= {s.port for s in listeners}
    exposed = [s for s in listeners if not s.is_loopback]
    failures = []
    for s in exposed:
        ok, why = refuses_without_token(s.port, token)
        print(f"beyond loopback: {s} -> {why}")  # Ray 2.60: each Serve replica's gRPC server on [::]
        if not ok:
            failures.append(f"{s}: {why}")
    assert not failures, "listeners beyond loopback that accept a client without the token:\n" + "\n".join(failures)
    ok, why = refuses_without_token(head.ports["gcs"], token)  # the check itself detects auth
    assert ok, why


@pytest.fixture
def plain_ray():
    """Another Ray on the host: a plain ``ray.init()`` cluster (Ray's default ports) kept alive by a
    driver subprocess that runs a task per line it reads; yields a function that asks for one."""
    script = textwrap.dedent("""
        import sys, ray
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)
        print("ready", flush=True)
        inc = ray.remote(lambda x: x + 1)
        for line in sys.stdin:
            print(ray.get(inc.remote(int(line))), flush=True)
    """)
    tmp = tempfile.mkdtemp(prefix="frpl", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-c", script, tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=cli_env({"RAY_AUTH_MODE": "disabled"}))
    try:
        assert proc.stdout.readline().strip() == "ready"

        def task(x: int) -> int:
            proc.stdin.write(f"{x}\n")
            proc.stdin.flush()
            return int(proc.stdout.readline())

        assert task(1) == 2
        yield task
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)  # ray.init's cluster goes with its driver
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)  # that cluster's session files and logs


def test_up_secure_by_default_ckpt_down_restore(tmp_path, plain_ray):
    # The first deployment keeps its ingest log behind a file:// URI (the object-per-append
    # layout a shared store gets) and its state in a separate local state_dir; the
    # restored one uses a plain local ingest.dir for both.
    log = tmp_path / "log"
    state = tmp_path / "data"
    cfg = _config(tmp_path, ingest={"dir": log.as_uri(), "state_dir": str(state)}, ray={"max_inline_bytes": 500_000})
    port = yaml.safe_load(cfg.read_text())["serving"]["port"]
    url = f"http://127.0.0.1:{port}"
    up = freshet("up", "--config", str(cfg))
    assert up.returncode == 0, up.stdout + up.stderr
    recorded = _state(cfg)
    try:
        assert recorded["phase"] == "up" and recorded["started_ray"] and recorded["url"] == url, recorded
        head = HeadInfo.model_validate(recorded["head"])
        # Ray makes its temp dir world-writable; the private root above it keeps other users out.
        root = Path(recorded["ray_root"])
        assert Path(head.temp_dir).parent == root and stat.S_IMODE(root.stat().st_mode) == 0o700
        assert Path(head.token_path).is_relative_to(root)
        assert "Ray token auth on" in up.stdout
        # Serve's note that "new http_options ... will not be applied" read as if serving.port were ignored.
        assert "Connecting to existing Serve app" not in up.stdout + up.stderr
        _assert_secure(head)
        # Held against /tmp's age-based cleaning while the head runs (Ray's dir and HAProxy's are in it).
        assert held_by_another(root)
        # The deployment's own state is not: `up` warns when it lives where hosts age files out.
        aged = os.path.realpath(state).startswith(("/tmp/", "/var/tmp/"))
        assert ("ingest.state_dir" in up.stderr and "is under /tmp or /var/tmp" in up.stderr) == aged, up.stderr
        # ray.max_inline_bytes reaches the head as Ray's system config (drivers and workers get it there).
        argv = Path(f"/proc/{head.root_pid}/cmdline").read_bytes().decode().split("\0")
        assert [json.loads(a.split("=", 1)[1]) for a in argv if a.startswith("--system-config=")] == [
            {"max_direct_call_object_size": 500_000}], argv
        assert plain_ray(41) == 42  # the other cluster is unaffected

        users = [f"u{i}" for i in range(6)]
        events = [{"user_id": u, "item_id": (i * 7 + j) % 23, "timestamp": 1.7e9 + i * 10 + j}
                  for i, u in enumerate(users) for j in range(8)]
        r = httpx.post(url + "/events", json={"events": events}, timeout=30)
        assert r.status_code == 200 and r.json()["accepted"] == len(events)
        _wait_applied(url, len(events))
        assert sorted(os.listdir(log)) == ["ingest"]  # state stays out of the log's store
        assert sorted(os.listdir(log / "ingest")) == ["LOG_ID", f"segment-{0:020d}.arrows"]
        assert {"freshet-up.json", "ps", "trainers"} <= set(os.listdir(state))
        assert stat.S_IMODE(state.stat().st_mode) == 0o700  # users' behaviour: `up` made it this user's only
        status = freshet("status", "--config", str(cfg))
        assert status.returncode == 0 and "healthz 200" in status.stdout
        before = _rankings(url, users)
        assert all(items for items in before)

        # ckpt connects to the head with the token recorded in the state file.
        save = freshet("ckpt", "--config", str(cfg), "save", "first")
        assert save.returncode == 0, save.stderr
        # A bad name is refused before the trainers pause, and a name in use is not overwritten.
        bad = freshet("ckpt", "--config", str(cfg), "save", "a/b")
        assert bad.returncode == 2 and "checkpoint name: 'a/b' must be" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and "pause" not in bad.stdout
        again = freshet("ckpt", "--config", str(cfg), "save", "first")
        assert again.returncode == 1 and "checkpoint 'first' already exists" in again.stderr, again.stderr
        # Nothing trained since: the replaced checkpoint holds what the first did.
        first = state / "ps" / "checkpoints" / "first"
        (first / "stray").write_text("from the old save")
        made = json.loads((first / "trainers.json").read_text())["created_at"]
        over = freshet("ckpt", "--config", str(cfg), "save", "first", "--overwrite")
        assert over.returncode == 0, over.stderr
        assert json.loads((first / "trainers.json").read_text())["created_at"] > made
        assert not (first / "stray").exists()  # replaced whole, not merged
        # Written under a staging name and renamed into place: nothing else is left beside it.
        assert sorted(os.listdir(first.parent)) == ["first"]
        record = first / "trainers.json"  # marks the checkpoint complete; the digests of the trainer's saved state
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert {"trainer-0/catalogue.arrow", "trainer-0/histories.arrow"} <= set(json.loads(record.read_text())["digests"])
        listed = freshet("ckpt", "--config", str(cfg), "list")
        assert "first" in listed.stdout

        # Train more after the checkpoint: the live rankings move on.
        more = [{"user_id": u, "item_id": 100 + j} for u in users for j in range(5)]
        assert httpx.post(url + "/events", json={"events": more}, timeout=30).status_code == 200
        _wait_applied(url, len(events) + len(more))
        # META.json: the checkpoint pinned the events after it against retention.
        assert sorted(os.listdir(log / "ingest")) == [
            "LOG_ID", "META.json", f"segment-{0:020d}.arrows", f"segment-{len(events):020d}.arrows"]
        pins = httpx.get(url + "/stats", timeout=30).json()["ingest"]["pins"]
        assert pins == {"latest-checkpoint": {"0": len(events)}}, pins
        assert _rankings(url, users) != before
        seen = set(head_pids(head))
    finally:
        down = freshet("down", "--config", str(cfg))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Ray head" in down.stdout and _state(cfg) is None
    _assert_gone(head, seen)
    assert not root.exists() and f"its directory {root}" in down.stdout  # no /tmp/frup* left behind
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=3)
    assert plain_ray(1) == 2, "down must leave the other Ray cluster running"

    # A fresh deployment (new data dir, empty ingest log) restored from the checkpoint
    # ranks exactly as the service did when the checkpoint was saved, here in Serve's
    # high-throughput mode: `up` gives the head HAProxy's environment.
    conf = yaml.safe_load(cfg.read_text())
    conf["ingest"] = {"dir": str(tmp_path / "fresh-data")}
    conf["serving"]["high_throughput"] = True
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(conf))
    ckpt = state / "ps" / "checkpoints" / "first"
    saved = json.loads((ckpt / "trainers.json").read_text())["trainers"]
    assert saved[0]["source_id"] == "ingest:" + (log / "ingest" / "LOG_ID").read_text().strip()
    gcs = free_port()
    restore = freshet("ckpt", "--config", str(fresh), "restore", str(ckpt), "--ray-port", str(gcs))
    assert restore.returncode == 0, restore.stdout + restore.stderr
    try:
        assert _state(fresh)["address"] == f"127.0.0.1:{gcs}"
        fresh_head = HeadInfo.model_validate(_state(fresh)["head"])
        # `up` has exited; the head's ports and HAProxy's (the replicas' blocks bind one port
        # per replica start) stay leased to the head, so no other Freshet process picks them.
        held = ray_head._port_set(fresh_head.ports) | ray_head._serve_ht_ports(fresh_head.env)
        assert len(ray_head._serve_ht_ports(fresh_head.env)) == 4 + 64 + 16 and leased_to(fresh_head.root_pid) == held
        hap = _haproxy_listeners(fresh_head)
        assert port in {s.port for s in hap} and all(s.is_loopback for s in hap), hap
        assert _rankings(url, users) == before
        # The fresh log's events train normally (its producer ids differ from the old log's).
        new = [{"user_id": "u0", "item_id": 500 + j} for j in range(6)]
        assert httpx.post(url + "/events", json={"events": new}, timeout=30).status_code == 200
        stats = _wait_applied(url, len(new))
        assert stats["events_accepted"] == stats["events_applied"] == len(new)
        assert _rankings(url, ["u0"]) != before[:1]
        seen = set(head_pids(fresh_head))
    finally:
        assert freshet("down", "--config", str(fresh)).returncode == 0
    _assert_gone(fresh_head, seen)  # HAProxy included
    assert leased_to(fresh_head.root_pid) == set()
    assert plain_ray(2) == 3


def _up_watching(cfg: Path, *args: str, until_phase: str | None = None) -> tuple[subprocess.Popen, dict, set]:
    """Run ``freshet up --config CFG ARGS`` while reading its state file: ``(process, last state seen
    with a head, every pid of that head seen)``. With ``until_phase``, return as soon as the state
    reaches it (the process still running); else once the process has exited."""
    proc = freshet_popen("up", "--config", str(cfg), *args)
    last: dict = {}
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st = _state(cfg)
        if st and st.get("head"):
            last = st
            seen |= set(head_pids(HeadInfo.model_validate(st["head"])))
            if until_phase and st.get("phase") == until_phase:
                return proc, last, seen
        if proc.poll() is not None:
            return proc, last, seen
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("freshet up did not finish in time")


def test_failed_or_killed_up_leaves_nothing_behind(tmp_path):
    # 1. An `up` killed half-way (its deployment starting) leaves a partial state file; `down` removes
    #    the head it names, and everything on it.
    cfg = _config(tmp_path)
    proc, partial, seen = _up_watching(cfg, until_phase="deploying")
    assert proc.poll() is None and partial["phase"] == "deploying", partial
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    head = HeadInfo.model_validate(partial["head"])
    assert head_pids(head), "the head outlives the killed `up`"
    down = freshet("down", "--config", str(cfg))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Ray head" in down.stdout and _state(cfg) is None
    _assert_gone(head, seen)
    assert not Path(partial["ray_root"]).exists()

    # 2. A trainer that cannot start: `up` fails naming the step and the cause, removes its head, and
    #    says so. With `ray.auth: disabled` it warns first.
    bad = _config(tmp_path, "bad.yaml", ray={"auth": "disabled"},
                  stream={"kind": "movielens", "path": str(tmp_path / "no-such-ratings.csv")})
    proc, partial, seen = _up_watching(bad, "--keep-stream")  # --keep-stream: train on the configured stream
    out = proc.stdout.read()
    assert proc.returncode == 1, out
    assert "token authentication is OFF" in out and "ray.auth: disabled" in out
    assert "failed while starting the deployment" in out and "no-such-ratings.csv" in out, out
    assert "nothing it started is left running" in out
    assert partial and not partial["head"]["auth"], "the head with auth disabled was recorded before deploying"
    _assert_gone(HeadInfo.model_validate(partial["head"]), seen)
    # Its logs explain the failure: kept, and named.
    root = Path(partial["ray_root"])
    assert _state(bad) is None and (root / "ray").is_dir() and f"(remove {root} when done)" in out, out
    shutil.rmtree(root)


def test_up_on_a_port_in_use_fails_at_once_and_starts_nothing(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = _config(tmp_path, serving={"port": port})
        up = freshet("up", "--config", str(cfg))
        assert up.returncode == 1, up.stdout + up.stderr
        assert f"serving.port: 127.0.0.1:{port} is in use" in up.stderr, up.stderr
        # Refused before a head started (Serve used to find out ~20 s into starting everything).
        assert "Ray head" not in up.stdout + up.stderr and _state(cfg) is None


def test_a_bad_ray_port_is_refused_before_anything_starts(tmp_path):
    # Checked as the config's own ports are; before, `up` found out when the head refused to start.
    cfg = _config(tmp_path, ray={"include_dashboard": True, "ports": {"dashboard": 28411}})
    port = yaml.safe_load(cfg.read_text())["serving"]["port"]
    for args, why in (
        (("up", "--ray-port", str(port)), f"--ray-port {port} is serving.port; give them different ports"),
        (("up", "--ray-port", "70000"), "--ray-port 70000 (in place of ray.ports.gcs): ray.ports.gcs=70000 is not a port"),
        (("up", "--ray-port", "28411"), "ray.ports.dashboard and ray.ports.gcs share port 28411"),
        (("up", "--ray-port", "28412", "--address", "127.0.0.1:28412"), "`--address` joins a running cluster"),
        (("ckpt", "restore", "c1", "--ray-port", str(port)), f"--ray-port {port} is serving.port"),
    ):
        out = freshet(args[0], "--config", str(cfg), *args[1:])
        assert out.returncode == 2 and why in out.stderr, (args, out.stdout + out.stderr)
        assert "Traceback" not in out.stderr and _state(cfg) is None and not (tmp_path / "data").exists(), args


def test_non_loopback_host_without_token_never_starts(tmp_path):
    cfg = _config(tmp_path, serving={"host": "0.0.0.0"})
    t0 = time.monotonic()
    up = freshet("up", "--config", str(cfg))
    assert up.returncode == 2, up.stdout + up.stderr
    for field in ("serving.host", "serving.auth_token", "serving.allow_unauthenticated"):
        assert field in up.stderr, up.stderr
    assert _state(cfg) is None and not (tmp_path / "data").exists()
    assert time.monotonic() - t0 < 30  # refused at config load, before any Ray


def test_down_removes_a_head_recorded_by_an_older_freshet_up(tmp_path):
    # An older `up` wrote no version, phase or head, only the temp dir of a `ray start` that did not
    # block; `down` finds that Ray's processes by the temp dir on their command lines. A stand-in
    # process plays the Ray (no address: there is nothing to connect to).
    ray_dir = tempfile.mkdtemp(prefix="frup", dir="/tmp")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"--temp-dir={ray_dir}"])
    try:
        cfg = _config(tmp_path)
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "freshet-up.json").write_text(json.dumps(
            {"namespace": "old", "config": str(cfg), "started_ray": True, "ray_dir": ray_dir, "address": None}))
        down = freshet("down", "--config", str(cfg))
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"Ray head in {ray_dir} (1 process)" in down.stdout
        assert not Path(ray_dir).exists()  # made by that `up` (its prefix): removed with the head
        assert stand_in.wait(timeout=30) is not None and _state(cfg) is None
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
