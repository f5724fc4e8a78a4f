"""``serving.port_leases``: ports one process picked are skipped by every other Freshet process
of the user on the host until the owner releases them or exits.

Real processes and a real lease directory (a private one per test, so the suite's own heads and
Serve apps, which use the host-wide default, are not touched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving import port_leases, ray_head

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lease_dir(tmp_path, monkeypatch):
    d = tmp_path / "leases"
    monkeypatch.setattr(port_leases, "default_dir", lambda: d)
    return d


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _python(script: str, lease_dir: Path) -> list[str]:
    """The command line running ``script`` in a new Python process whose leases live in ``lease_dir``."""
    prelude = textwrap.dedent(f"""
        from pathlib import Path
        from serving import port_leases, ray_head
        port_leases.default_dir = lambda: Path({str(lease_dir)!r})
    """)
    return [sys.executable, "-c", prelude + textwrap.dedent(script)]


def _run(script: str, lease_dir: Path) -> str:
    """Run ``script`` (:func:`_python`) to its end; its stdout."""
    run = subprocess.run(_python(script, lease_dir), capture_output=True, text=True,
                         timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_a_live_owners_lease_is_seen_by_another_process_and_ends_when_the_owner_exits(lease_dir):
    owner = _sleeper()
    try:
        with port_leases.leasing() as leases:
            leases.add([25001, 25002, 25003, 25010], pid=owner.pid)
        seen = _run("""
            with port_leases.leasing() as leases:
                print(sorted(leases.taken()))
        """, lease_dir)
        assert json.loads(seen) == [25001, 25002, 25003, 25010]
        (entry,) = json.loads((lease_dir / "leases.json").read_text())["leases"]
        assert entry["pid"] == owner.pid and entry["ports"] == [[25001, 25003], [25010, 25010]]
    finally:
        owner.kill()
        owner.wait()
    with port_leases.leasing() as leases:
        assert leases.taken() == set()
        assert leases.changed  # the dead owner's lease is dropped from the file
    assert json.loads((lease_dir / "leases.json").read_text())["leases"] == []


def test_a_lease_ends_at_its_expiry_and_a_reused_pid_does_not_keep_it(lease_dir):
    with port_leases.leasing() as leases:
        leases.add([26001], ttl_s=0.2)
        leases.add([26002])
        leases.add([26003], ttl_s=0)  # over at once (it once divided by zero)
    with port_leases.leasing() as leases:
        # Seen before the owner check below could hide it: the ttl_s=0 lease is over, not held.
        taken = leases.taken()
        assert 26002 in taken and 26003 not in taken
    data = json.loads((lease_dir / "leases.json").read_text())
    data["leases"][1]["start"] -= 1  # as if this pid had been another process's, now exited
    (lease_dir / "leases.json").write_text(json.dumps(data))
    with port_leases.leasing() as leases:
        assert leases.taken() == {26001}
    time.sleep(0.3)
    with port_leases.leasing() as leases:
        assert leases.taken() == set()


def test_many_picks_of_one_process_share_a_few_entries(lease_dir):
    # free_port leases each pick for 5 minutes; a test process picks hundreds of times. One
    # entry per pick would grow the file, and every reader's /proc checks, without bound.
    for port in range(27000, 27200):
        with port_leases.leasing() as leases:
            leases.add([port], ttl_s=300)
            leases.add([port + 1000])
    entries = json.loads((lease_dir / "leases.json").read_text())["leases"]
    assert len(entries) <= 3  # the held ones, and the timed ones in at most two expiry grains
    assert [e["ports"] for e in entries if e["until"] is None] == [[[28000, 28199]]]
    untils = [e["until"] for e in entries if e["until"] is not None]
    assert 1 <= len(untils) <= 2
    assert all(290 <= u - time.time() <= 300 * 1.2 for u in untils)
    with port_leases.leasing() as leases:
        assert leases.taken() == set(range(27000, 27200)) | set(range(28000, 28200))


def test_drop_and_share_touch_only_the_given_ports_of_this_process(lease_dir):
    other = _sleeper()
    head = _sleeper()
    try:
        with port_leases.leasing() as leases:
            leases.add(range(27000, 27010))
            leases.add([27000, 27100], pid=other.pid)  # someone else's lease on a port of ours is kept
        with port_leases.leasing() as leases:
            leases.drop([27000, 27005])
            leases.share([27001, 27002, 27100], head.pid)
        by_pid = {}
        for e in json.loads((lease_dir / "leases.json").read_text())["leases"]:
            by_pid.setdefault(e["pid"], []).extend(e["ports"])
        assert by_pid[os.getpid()] == [[27001, 27004], [27006, 27009]]  # kept: shared, not moved
        assert by_pid[head.pid] == [[27001, 27002]]  # 27100 was not ours to share
        assert by_pid[other.pid] == [[27000, 27000], [27100, 27100]]
        head.kill()
        head.wait()
        with port_leases.leasing() as leases:
            leases.drop(range(27001, 27010))
            assert leases.taken() == {27000, 27100}  # the head's share lapsed with it
            leases.share([27000], head.pid)  # a dead pid gets nothing
            assert leases.taken() == {27000, 27100}
            with pytest.raises(ValueError, match="not alive"):
                leases.add([27200], pid=2**22 + 1)  # above Linux's pid_max default
    finally:
        for p in (other, head):
            p.kill()
            p.wait()


def test_malformed_leases_are_dropped_not_trusted(lease_dir):
    lease_dir.mkdir(mode=0o700)
    me = port_leases._start_time(os.getpid())
    good = {"pid": os.getpid(), "start": me, "until": None, "ports": [[28100, 28101]]}
    bad = [{"pid": "x", "start": None, "until": None, "ports": [[28200, 28200]]},
           {**good, "until": "soon"}, {**good, "ports": [[28300]]}, {**good, "ports": [[28401, 28400]]},
           {**good, "pid": True}, "not a lease"]
    (lease_dir / "leases.json").write_text(json.dumps({"version": 1, "leases": [good, *bad]}))
    with port_leases.leasing() as leases:
        assert leases.taken() == {28100, 28101}


def test_a_lock_held_too_long_or_no_directory_skips_leasing_with_a_warning(tmp_path, monkeypatch, capsys):
    import fcntl

    d = tmp_path / "leases"
    monkeypatch.setattr(port_leases, "_warned", set())
    with port_leases.leasing(d) as leases:
        leases.add([28600])
    holder = os.open(d / "lock", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: as another process stopped mid-pick
        t0 = time.monotonic()
        with port_leases.leasing(d, timeout_s=0.3) as leases:
            assert leases.taken() == set()
            leases.add([28601])  # not saved
        assert 0.3 <= time.monotonic() - t0 < 5
    finally:
        os.close(holder)
    assert "lock was held for over 0.3 s" in capsys.readouterr().err
    with port_leases.leasing(d) as leases:
        assert leases.taken() == {28600}
    with port_leases.leasing(tmp_path / "no-such-dir" / "leases") as leases:  # mkdir fails: no error
        leases.add([28602])
    assert "not a writable directory" in capsys.readouterr().err


def test_a_broken_file_counts_as_no_leases_and_is_rewritten(lease_dir):
    lease_dir.mkdir(mode=0o700)
    (lease_dir / "leases.json").write_text("{not json")
    with port_leases.leasing() as leases:
        assert leases.taken() == set()
        leases.add([28001])
    assert json.loads((lease_dir / "leases.json").read_text())["leases"][0]["ports"] == [[28001, 28001]]


def test_an_unusable_directory_is_skipped_with_one_warning(tmp_path, monkeypatch, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "leases"
    link.symlink_to(target)  # e.g. planted by another user in /tmp: never followed
    monkeypatch.setattr(port_leases, "default_dir", lambda: link)
    monkeypatch.setattr(port_leases, "_warned", set())
    for _ in range(2):
        with port_leases.leasing() as leases:
            leases.add([28500])
    assert capsys.readouterr().err.count("are not used") == 1
    assert not list(target.iterdir())


def test_processes_picking_at_once_from_a_narrow_range_never_share_a_port(lease_dir):
    # Four processes each reserve 5 ports from a 40-port window, all at about the same time, and
    # hold them until every one has picked; nothing binds them and every port counts as
    # bindable, so only the leases keep the picks apart.
    n, each = 4, 5
    script = f"""
        import json, sys, time
        ray_head._PORT_LO, ray_head._PORT_HI = 24100, 24139
        ray_head._bindable = lambda port: True
        time.sleep(max(0.0, {time.time() + 3.0} - time.time()))  # start together
        got = ray_head.reserve_ports([f"p{{i}}" for i in range({each})])
        print(json.dumps(sorted(got.values())), flush=True)
        sys.stdin.read()  # held (this process lives) until the test has every answer
    """
    procs = [subprocess.Popen(_python(script, lease_dir), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(n)]
    try:
        lines = [p.stdout.readline() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
        errs = [p.stderr.read() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errs]
    picks = [json.loads(line) for line in lines]
    flat = [p for ports in picks for p in ports]
    assert len(flat) == n * each and len(set(flat)) == n * each, picks
    assert all(24100 <= p <= 24139 for p in flat)
    with port_leases.leasing() as leases:
        assert leases.taken() == set()  # every owner has exited


def test_ray_head_picks_skip_ports_another_process_leased(lease_dir, monkeypatch):
    # Every port counts as bindable and none of this process's own picks is held, so only the
    # other process's leases decide.
    monkeypatch.setattr(ray_head, "_bindable", lambda port: True)
    monkeypatch.setattr(ray_head, "_reserved", set())
    monkeypatch.setattr(ray_head, "_handed_out", ray_head.collections.deque(maxlen=64))
    owner = _sleeper()
    try:
        monkeypatch.setattr(ray_head, "_FREE_LO", 31000)
        monkeypatch.setattr(ray_head, "_FREE_HI", 31003)
        monkeypatch.setattr(ray_head, "_PORT_LO", 24200)
        monkeypatch.setattr(ray_head, "_PORT_HI", 24209)
        with port_leases.leasing() as leases:
            leases.add([31000, 31001, 31002], pid=owner.pid)
            leases.add([p for p in range(24200, 24210) if p != 24207], pid=owner.pid)
        assert ray_head.free_port() == 31003
        r = ray_head.reserve_ports(["x"])
        assert r == {"x": 24207}
        ray_head.release_ports(r)
        with pytest.raises(RuntimeError, match="no 2 consecutive free ports"):
            ray_head.reserve_ports(blocks={"b": 2})
        with port_leases.leasing() as leases:  # ours: free_port's for a while, reserve_ports's until released
            mine = {p for e in leases.entries() if e["pid"] == os.getpid() for lo, hi in e["ports"]
                    for p in range(lo, hi + 1)}
        assert mine == {31003}
    finally:
        owner.kill()
        owner.wait()
    r = ray_head.reserve_ports(["y"], avoid=[24207])
    ray_head.release_ports(r)
    assert r["y"] in set(range(24200, 24210)) - {24207}  # the owner has exited: its ports are free again
