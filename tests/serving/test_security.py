"""Local attacks on the files Freshet trusts: the Ray token file, ``freshet up``'s state file,
and Ray's auth switch for the throwaway clusters. No Ray is started.

Another user on the host is simulated by a file or directory handed to ``nobody`` (needs root)
or left writable by everyone, as another user's pre-created path under /tmp would be.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from serving import ray_head
from serving.cli import _common, service
from serving.config import load_config

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")


# --------------------------------------------------------------------------- the Ray token file


def test_a_fresh_token_file_is_private(tmp_path):
    tok = tmp_path / "auth_token"
    ray_head._ensure_token(tok)
    assert stat.S_IMODE(tok.stat().st_mode) == 0o600 and len(tok.read_text()) == 64


def test_the_token_is_never_written_through_a_link(tmp_path):
    # Another user's empty file, linked from where the token goes (a token_path under /tmp):
    # the fresh token would land in a file they can read.
    theirs = tmp_path / "theirs"
    theirs.write_text("")
    theirs.chmod(0o666)
    tok = tmp_path / "auth_token"
    tok.symlink_to(theirs)
    with pytest.raises(ValueError, match="auth_token.*link"):
        ray_head._ensure_token(tok)
    assert theirs.read_text() == ""


def test_a_token_file_others_can_read_is_refused(tmp_path):
    # What `ray get-auth-token --generate` leaves under umask 022 (Ray opens it with the default
    # mode): ray.token_path: ~/.ray/auth_token would run the cluster on a token any user reads.
    tok = tmp_path / "auth_token"
    tok.write_text("a" * 64)
    tok.chmod(0o644)
    with pytest.raises(ValueError, match=r"auth_token.*0o?644.*chmod 600"):
        ray_head._ensure_token(tok)
    # An empty one too: the fresh token written into it would be as readable.
    empty = tmp_path / "empty"
    empty.write_text("")
    empty.chmod(0o644)
    with pytest.raises(ValueError, match="empty.*other users"):
        ray_head._ensure_token(empty)
    assert empty.read_text() == ""


@as_root
def test_a_token_file_of_another_user_is_refused(tmp_path):
    tok = tmp_path / "auth_token"
    tok.write_text("")
    tok.chmod(0o600)
    os.chown(tok, NOBODY, NOBODY)  # they made it, and can read what goes into it
    with pytest.raises(ValueError, match="auth_token.*another user"):
        ray_head._ensure_token(tok)
    assert tok.read_text() == ""


def test_a_token_file_on_a_read_only_mount_is_used_as_it_is(tmp_path, monkeypatch):
    # A token is only read: a file of one's own on a read-only mount (or made 0400) serves as it
    # is. Opening it for writing first refused it (EROFS, EACCES) though nothing was to be written.
    import errno

    tok = tmp_path / "auth_token"
    tok.write_text("b" * 64)
    tok.chmod(0o400)
    real_open = os.open

    def read_only_mount(path, flags, *args):
        if str(path) == str(tok) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(ray_head.os, "open", read_only_mount)
    ray_head._ensure_token(tok)
    assert tok.read_text() == "b" * 64
    tok.chmod(0o600)
    tok.write_text("")  # empty: a fresh token must be written, and the mount refuses it, by name
    with pytest.raises(ValueError, match=r"auth_token: cannot use it \(Read-only file system\)"):
        ray_head._ensure_token(tok)


# --------------------------------------------------------------------------- freshet up's state file


def _cfg(state_dir: Path):
    return load_config(None, {"ingest": {"dir": str(state_dir)}})


def test_the_state_file_is_never_written_through_a_planted_link(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (data / (service.STATE_FILE + ".tmp")).symlink_to(victim)
    cfg = _cfg(data)
    service._write_state(cfg, {"namespace": "n"})
    assert victim.read_text() == "precious"
    p = service.state_path(cfg)
    assert not p.is_symlink() and json.loads(p.read_text()) == {"namespace": "n"}
    assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0  # pids, paths, the token file's name


def test_a_state_dir_other_users_can_write_is_refused(tmp_path):
    # Such a dir lets them swap in a state file whose head names their address and this user's
    # token file: `freshet down` would then send the token to them (and apply their env).
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    cfg = _cfg(data)
    (data / service.STATE_FILE).write_text(json.dumps({"namespace": "n"}))
    with pytest.raises(ValueError, match=r"ingest\.dir.*writable by other users"):
        service.read_state(cfg)
    with pytest.raises(ValueError, match=r"ingest\.dir.*writable by other users"):
        service._write_state(cfg, {"namespace": "n"})
    # ingest.state_dir is named when it is the state dir.
    cfg2 = load_config(None, {"ingest": {"dir": str(tmp_path / "log"), "state_dir": str(data)}})
    with pytest.raises(ValueError, match=r"ingest\.state_dir"):
        service.read_state(cfg2)
    data.chmod(0o755)  # readable is the user's choice; writable is not
    assert service.read_state(cfg) == {"namespace": "n"}


def test_a_group_writable_state_dir_is_refused_only_when_the_group_has_others(tmp_path, monkeypatch):
    # umask 002 makes every new dir group-writable where each user has a private group: refusing
    # those would refuse most users' own directories for no one's benefit.
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o775)
    cfg = _cfg(data)
    (data / service.STATE_FILE).write_text(json.dumps({"namespace": "n"}))
    groups = []
    monkeypatch.setattr(service, "_others_in_group", lambda gid: groups.append(gid) or False)
    assert service.read_state(cfg) == {"namespace": "n"}
    assert groups == [data.stat().st_gid]
    monkeypatch.setattr(service, "_others_in_group", lambda gid: True)
    with pytest.raises(ValueError, match=r"ingest\.dir.*writable by other users \(mode 0o775\)"):
        service.read_state(cfg)


def test_others_in_group_reads_the_group_and_the_users_primary_groups(monkeypatch):
    import grp
    import pwd
    from types import SimpleNamespace as NS

    me = os.getuid()
    users = [NS(pw_name="me", pw_uid=me, pw_gid=100), NS(pw_name="bob", pw_uid=me + 1, pw_gid=200)]
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: next(u for u in users if u.pw_uid == uid))
    monkeypatch.setattr(pwd, "getpwall", lambda: users)
    monkeypatch.setattr(grp, "getgrgid", lambda gid: NS(gr_mem={100: [], 200: [], 300: ["me", "bob"], 400: ["me"]}[gid]))
    assert not service._others_in_group(100)  # my private group
    assert service._others_in_group(200)  # bob's primary group
    assert service._others_in_group(300)  # bob is a member
    assert not service._others_in_group(400)  # only me


@as_root
def test_a_state_dir_or_file_of_another_user_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    cfg = _cfg(data)
    (data / service.STATE_FILE).write_text(json.dumps({"namespace": "n"}))
    os.chown(data / service.STATE_FILE, NOBODY, NOBODY)
    with pytest.raises(ValueError, match="another user"):
        service.read_state(cfg)
    os.chown(data / service.STATE_FILE, 0, 0)
    os.chown(data, NOBODY, NOBODY)  # e.g. /tmp/freshet-data made first by someone else
    with pytest.raises(ValueError, match=r"ingest\.dir.*another user"):
        service.read_state(cfg)


# --------------------------------------------------------------------------- throwaway clusters


def test_auth_off_from_the_environment_is_loud(monkeypatch, capsys):
    # `freshet run` and `freshet eval` keep a RAY_AUTH_MODE they inherit; "disabled" there turns
    # the cluster's only defence against other local users off, which must not pass in silence.
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_head, "apply_env", lambda env: None)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _common.ray_init(None, "ns")
    assert calls and calls[0]["address"] == "local"
    err = capsys.readouterr().err
    assert "WARNING" in err and "RAY_AUTH_MODE=disabled" in err
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _common.ray_init(None, "ns")
    assert "WARNING" not in capsys.readouterr().err


# --------------------------------------------------------------------------- command lines


def test_a_token_given_on_the_command_line_is_warned_about(tmp_path, monkeypatch, capsys):
    # Every local user reads argv (ps, /proc/<pid>/cmdline) while the replay runs: minutes, with
    # the bearer token that lets them post events.
    from serving import live_eval
    from serving.cli import main

    def stub(*args, **kwargs):
        raise ValueError("stub: the replay would start here")

    monkeypatch.setattr(live_eval, "run_live", stub)
    base = ["eval", "--data", "synthetic", "--report", str(tmp_path / "r"), "--live", "--rate", "50",
            "--url", "http://127.0.0.1:9"]
    assert main([*base, "--token", "s3cret"]) == 2
    err = capsys.readouterr().err
    assert "stub" in err and "--token" in err and "FRESHET_TOKEN" in err and "s3cret" not in err, err
    monkeypatch.setenv("FRESHET_TOKEN", "s3cret")
    assert main(base) == 2
    assert "FRESHET_TOKEN" not in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
