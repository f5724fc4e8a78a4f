"""Ranking latency and concurrency: Freshet's ``/rank`` against an echo floor in the same Serve instance.

``python -m bench.serve_latency [--items 9000,100000] [--dim 64] [--k 100] [--seconds 8]
[--clients 1,8,32,64] [--modes default,high_throughput] [--client auto|wrk|python] [--out DIR]``

For each mode (Serve's default proxy, and its high-throughput mode: HAProxy ingress with
``RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, the environment ``freshet up``
gives the head for ``serving.high_throughput``) a child process starts a fresh local Ray on
127.0.0.1 and, in it, one Serve instance with two applications:

* ``echo`` at ``/echo``: a one-line deployment that answers a POST with its body (the floor:
  what Serve itself costs per request), with the same ``max_ongoing_requests`` as Freshet's;
* Freshet (``serving.deploy.start``: 2 PS shards, the ingest log, one idle trainer, the app).

The PS is seeded directly through the PS client (pushes of random gradients that create the
item rows of every item table, and the users' rows with their recent items), the smallest
catalogue of ``--items`` first, then grown to the next size. Before any load, the answers of
``/rank`` for a few users are checked against a ranking computed here with plain numpy from
rows pulled from the PS (same items, seen items left out, scores equal). Then, per client
count: a closed-loop run against the echo, then against ``/rank`` (``k``, ``exclude_seen``,
users in rotation), each after a one-second warm-up. Every answer is verified by the load
client: echo bodies must equal what was sent; ``/rank`` bodies must be 200 with exactly ``k``
items and ``"fallback":null``.

The client is ``wrk`` when it is installed (C, one thread; the body checks run in its Lua
hooks), else ``bench.http_load`` (Python asyncio). Before Ray starts, the client is run
against a raw asyncio socket server that answers a fixed response (no HTTP framework): its
req/s there bounds what the client itself can measure on this machine.

It prints a table and writes ``<out>/serve_latency.json`` and ``<out>/serve_latency.png``; the
load average (``os.getloadavg``) is recorded at the start and end of the whole run and of
each mode. The goals of issue 12 are evaluated in ``goals`` (see ``GOALS``); the exit status
is 0 when every run had zero errors (goals are reported, not enforced).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine, ray_temp_dir
from serving.ray_head import free_port  # imports no Ray: the mode's environment is set first

__all__ = ["DEFAULT_OUT", "GOALS", "evaluate_goals", "format_table", "main", "write_report"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
"""Default output directory (git-ignored)."""

GOALS = {
    "no_collapse": "/rank req/s at 32 and at 64 clients >= req/s at 8 clients, 0 errors (each mode, each catalogue)",
    "sequential_p50": "largest catalogue: sequential /rank p50 <= echo p50 + 2 ms (each mode)",
    "concurrent_default": "largest catalogue, default mode: /rank req/s at 32 clients >= 0.5 x echo req/s at 32",
    "concurrent_high_throughput": "largest catalogue, high-throughput mode: /rank req/s at 32 clients >= 500",
}
"""The serving goals of issue 12 that this benchmark measures."""

ECHO_BODY = '{"ping":1}'
_SEED_PRODUCER = "bench-seed"
_USER_PREFIX = "bu"




# --------------------------------------------------------------------------- load clients


_WRK_LUA = r"""
local kind, path, k, nusers, prefix, echo_body = "%(kind)s", "%(path)s", %(k)d, %(nusers)d, "%(prefix)s", '%(echo)s'
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
counter = 0
bad = 0
function request()
  counter = counter + 1
  local body = echo_body
  if kind == "rank" then
    local u = (counter * 7919 + tid * 104729) %% nusers
    body = string.format('{"user_id":"%%s%%d","k":%%d,"exclude_seen":true}', prefix, u, k)
  end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
statuses = ""
function response(status, headers, body)
  if status ~= 200 then  -- wrk counts non-2xx itself; the first few are kept by status and body
    if #statuses < 600 then statuses = statuses .. status .. " " .. string.sub(body, 1, 80) .. "\n" end
    return
  end
  if kind == "rank" then
    local _, n = string.gsub(body, '"item_id":', "")
    if n ~= k or not string.find(body, '"fallback":null', 1, true) then bad = bad + 1 end
  elseif body ~= echo_body then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad")
    local st = t:get("statuses")
    if st ~= "" then io.write("WRKSTATUS " .. string.gsub(st, "\n", "\nWRKSTATUS ") .. "\n") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,' ..
    '"mean_us":%%.1f,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,"bad_bodies":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout, b))
end
"""


def _wrk_run(base_url: str, kind: str, clients: int, seconds: float, k: int, users: int, tmpdir: str) -> dict[str, Any]:
    """One closed-loop ``wrk`` run (one thread, ``clients`` connections); a result row."""
    path = "/rank" if kind == "rank" else "/echo"
    script = Path(tmpdir) / f"wrk-{kind}.lua"
    script.write_text(_WRK_LUA % {"kind": kind, "path": path, "k": k, "nusers": max(users, 1),
                                  "prefix": _USER_PREFIX, "echo": ECHO_BODY})
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
           base_url + path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    w = json.loads(m.group(1))
    refused = [line[len("WRKSTATUS "):] for line in out.stdout.splitlines() if line.startswith("WRKSTATUS ") and line[10:].strip()]
    dur = w["duration_us"] / 1e6
    transport = {k2: w[k2] for k2 in ("connect", "read", "write", "timeout") if w[k2]}
    return {
        "requests": w["requests"], "duration_s": dur, "req_per_s": w["requests"] / dur,
        "p50_ms": w["p50_us"] / 1e3, "p90_ms": w["p90_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3,
        "max_ms": w["max_us"] / 1e3, "mean_ms": w["mean_us"] / 1e3,
        "bad_status": w["status"], "bad_status_samples": refused[:5], "bad_bodies": w["bad_bodies"],
        "transport_errors": transport,
        "errors": w["status"] + w["bad_bodies"] + sum(transport.values()),
    }


def _python_run(base_url: str, kind: str, clients: int, seconds: float, k: int, users: int,
                warmup_s: float = 0.0) -> dict[str, Any]:
    """One closed-loop run of ``bench.http_load`` (asyncio, httpx); a result row."""
    from bench.http_load import RequestSpec, run_load

    url = base_url + ("/rank" if kind == "rank" else "/echo")
    echo = json.loads(ECHO_BODY)

    def factory(client: int, seq: int) -> RequestSpec:
        if kind == "rank":
            u = (seq * 7919 + client * 104729) % max(users, 1)
            return RequestSpec("POST", url, json={"user_id": f"{_USER_PREFIX}{u}", "k": k, "exclude_seen": True})
        return RequestSpec("POST", url, json=echo)

    def check(_spec, r) -> str | None:
        if kind != "rank":
            return None if r.json() == echo else "echo body differs"
        body = r.json()
        return None if len(body["items"]) == k and body["fallback"] is None else "wrong /rank body"

    s = run_load(factory, clients=clients, duration_s=seconds, warmup_s=warmup_s, check=check, timeout_s=10.0).summary
    bad_status = sum(s.error_statuses.values())
    return {
        "requests": s.requests, "duration_s": s.duration_s, "req_per_s": s.req_per_s,
        "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms, "mean_ms": s.mean_ms,
        "bad_status": bad_status, "bad_bodies": sum(s.check_failures.values()),
        "transport_errors": dict(s.transport_errors), "errors": s.errors,
    }


def _load(client: str, base_url: str, kind: str, clients: int, seconds: float, k: int, users: int,
          tmpdir: str, warmup_s: float = 1.0) -> dict[str, Any]:
    """A warm-up (unrecorded) then the measured run, with ``client`` (``wrk`` or ``python``); the
    row has ``cpu_ms_per_request``, what each kind of process on this host spent per request
    (CPU ms, :func:`_cpu_ms_per_request`; with the python client it includes the warm-up)."""
    if client == "wrk":
        if warmup_s > 0:
            _wrk_run(base_url, kind, clients, warmup_s, k, users, tmpdir)
        cpu0 = _cpu_seconds()
        res = _wrk_run(base_url, kind, clients, seconds, k, users, tmpdir)
    else:
        cpu0 = _cpu_seconds()
        res = _python_run(base_url, kind, clients, seconds, k, users, warmup_s=warmup_s)
    res["cpu_ms_per_request"] = _cpu_ms_per_request(cpu0, _cpu_seconds(), res["requests"])
    return res


# --------------------------------------------------------------------------- the client's own ceiling


class _FixedResponse(asyncio.Protocol):
    """Answers every HTTP/1.1 request on the connection with the echo body (no parsing beyond framing)."""

    reply = (f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(ECHO_BODY)}\r\n\r\n"
             f"{ECHO_BODY}").encode()

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            n = int(m.group(1)) if m else 0
            if len(rest) < n:
                return
            self.buf = rest[n:]
            self.transport.write(self.reply)


def _raw_server(port: int) -> None:
    """Serve :class:`_FixedResponse` on 127.0.0.1:``port`` until killed (uvloop when installed)."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_FixedResponse, "127.0.0.1", port))
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(server.serve_forever())


def _client_ceiling(client: str, clients: list[int], seconds: float, tmpdir: str) -> list[dict[str, Any]]:
    """The load client's req/s against the raw fixed-response server (its own ceiling, at most)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_latency", "--_raw-server", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        rows = []
        for c in sorted({1, max(clients)}):
            r = _load(client, f"http://127.0.0.1:{port}", "echo", c, seconds, 0, 0, tmpdir, warmup_s=0.5)
            rows.append({"target": "raw", "clients": c, **r})
            print(f"  client ceiling ({client}, {c} clients): {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                  f"errors {r['errors']}", flush=True)
        return rows
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- one mode, in a child process


def _bench_config(mode: str, dim: int, k: int, tmp: str, port: int):
    from serving.config import load_config

    return load_config(None, {
        "namespace": f"bench-serve-{mode}-{os.getpid()}",
        "ps": {"num_shards": 2, "tables": {"user": {"dim": dim}, "item": {"dim": dim}, "item_ctx": {"dim": dim}}},
        "trainer": {"num_workers": 1, "device": "cpu"},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": port, "high_throughput": mode == "high_throughput", "max_k": max(k, 100)},
    })


def _seed_items(client, cfg, start: int, stop: int, seq: int, rng, chunk: int = 25_000) -> int:
    """Create item rows ``start..stop-1`` in every item table with one push per chunk; returns the next seq."""
    from ps.optim import decayed_rows
    from ps.shard import PushId

    m, dim = cfg.model, cfg.ps.tables[cfg.model.item_table].dim
    for lo in range(start, stop, chunk):
        ids = np.arange(lo, min(stop, lo + chunk), dtype=np.int64)
        n = len(ids)
        updates = {
            m.item_table: (ids, rng.normal(size=(n, dim)).astype(np.float32)),
            m.item_bias_table: (ids, rng.normal(size=(n, 1)).astype(np.float32)),
            m.popularity_table: (ids, rng.zipf(1.5, size=(n, 1)).clip(1, 10_000).astype(np.float32)),
        }
        if m.recent_table is not None:
            counts = rng.zipf(1.5, size=n).clip(1, 1000).astype(np.float32)
            updates[m.recent_table] = (ids, decayed_rows(counts, 0.0, cfg.ps.table(m.recent_table).dim))
        if m.context_table is not None:
            updates[m.context_table] = (ids, rng.normal(size=(n, dim)).astype(np.float32))
        client.push_many(updates, PushId(_SEED_PRODUCER, seq))
        seq += 1
    return seq


def _seed_users(client, cfg, users: int, items: int, seen: int, seq: int, rng) -> int:
    """Rows for ``users`` users, each with ``seen`` recent items among the first ``items``."""
    from ps.shard import PushId

    uids = [f"{_USER_PREFIX}{u}" for u in range(users)]
    dim = cfg.ps.tables[cfg.model.user_table].dim
    rec_users = [u for u in uids for _ in range(seen)]
    rec_items = rng.integers(0, items, size=len(rec_users)).astype(np.int64)
    offsets = np.arange(len(rec_users), dtype=np.int64)
    client.push_many({cfg.model.user_table: (uids, rng.normal(size=(users, dim)).astype(np.float32))},
                     PushId(_SEED_PRODUCER, seq), recent=(rec_users, rec_items, offsets))
    return seq + 1


def _expected_rank(client, cfg, user: str, n_items: int, k: int) -> tuple[list[int], np.ndarray, set[int]]:
    """Top ``k`` of ``user`` computed here with plain numpy from rows pulled from the PS:
    ``(item ids, every item's score, seen items)``."""
    from ps.ids import keyed
    from ps.optim import row_clocks

    m = cfg.model
    ids = np.arange(n_items, dtype=np.int64)
    tables = [m.item_table, m.item_bias_table] + [t for t in (m.recent_table, m.context_table) if t is not None]
    pulled = client.pull_many({t: ids for t in tables})
    items, bias = pulled[m.item_table][0], pulled[m.item_bias_table][0][:, 0].astype(np.float64)
    ctx = client.rank_context(m.user_table, user)
    key_to_item = dict(zip(keyed(ids).keys.tolist(), ids.tolist()))
    recent = [key_to_item[x] for x in ctx.recent.tolist() if x in key_to_item]
    q = ctx.row.astype(np.float64)
    if m.context_table is not None and recent:
        tail = recent[-m.context_items:]
        q = q + pulled[m.context_table][0][tail].astype(np.float64).mean(0)
    scores = items.astype(np.float64) @ q + bias
    if m.recent_table is not None and m.recent_weight:
        rc = pulled[m.recent_table][0].astype(np.float64)
        clocks = row_clocks(rc)
        scores += m.recent_weight * np.log1p(rc[:, 0] * np.exp2(clocks - clocks.max()))
    seen = set(recent)
    order = [i for i in np.argsort(-scores, kind="stable").tolist() if i not in seen][:k]
    return order, scores, seen


def _verify_rank(http, client, cfg, users: int, n_items: int, k: int, probes: int = 4) -> dict[str, Any]:
    """``/rank`` answers for ``probes`` users equal the numpy ranking: k items, none seen, the
    expected scores, best first. Raises AssertionError naming the first difference."""
    tol = 1e-3
    for u in np.linspace(0, users - 1, probes).astype(int).tolist():
        user = f"{_USER_PREFIX}{u}"
        r = http.post("/rank", json={"user_id": user, "k": k, "exclude_seen": True})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["fallback"] is None and got["fallback_reason"] is None, got
        want, scores, seen = _expected_rank(client, cfg, user, n_items, k)
        ids = [it["item_id"] for it in got["items"]]
        s = np.array([it["score"] for it in got["items"]])
        assert len(ids) == k and not set(ids) & seen, (user, len(ids), set(ids) & seen)
        assert np.all(np.diff(s) <= 0), f"{user}: scores not best first"
        np.testing.assert_allclose(s, scores[ids], atol=tol, err_msg=f"{user}: scores differ from the PS rows'")
        assert s[-1] >= scores[want[-1]] - tol, f"{user}: a better item than #{k} was left out"
        mismatched = sum(a != b for a, b in zip(ids, want))
        assert mismatched == 0 or np.allclose(s, scores[want], atol=tol), (user, mismatched)
    return {"probes": probes, "ok": True}


def _wait_for_catalogue(http, n_items: int, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        # A replica's background sync starts with its first ranking request.
        http.post("/rank", json={"user_id": f"{_USER_PREFIX}0", "k": 1})
        st = http.get("/stats").json()
        if st.get("cached_items") == n_items:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replica's mirror holds {st.get('cached_items')} items, not {n_items}")
        time.sleep(0.2)


def _replica_pid(app_name: str) -> int | None:
    """PID of a running replica of Serve application ``app_name`` (from Serve's own details)."""
    from ray import serve

    details = serve.context._get_global_client().get_serve_details()
    for dep in details["applications"][app_name]["deployments"].values():
        for r in dep["replicas"]:
            if r["state"] == "RUNNING" and r.get("pid"):
                return int(r["pid"])
    return None


def _profile(pid: int | None, seconds: float, path: Path) -> subprocess.Popen | None:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` (speedscope JSON at ``path``), when available."""
    spy = shutil.which("py-spy")
    if spy is None or pid is None:
        return None
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250",
                             "-f", "raw", "-o", str(path), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every process on this host, by PID, with a short name:
    Ray's process title (``ray::ShardActor``, ``ray::ServeReplica:freshet:FreshetAPI``) or the
    command (``haproxy``, ``wrk``, ``raylet``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = args[0].decode(errors="replace") if args and args[0] else stat[stat.index("(") + 1:stat.rindex(")")]
        # Ray titles a worker after the method it is running ("ray::PSShard.rank_contexts").
        name = name.split()[0].split(".")[0] if name.startswith("ray::") else Path(name).name
        if name.startswith("python") and len(args) > 1:
            name = next((Path(x.decode(errors="replace")).name for x in args[1:] if x.endswith(b".py")), name)
        out[int(d.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                        requests: int) -> dict[str, float]:
    """CPU milliseconds per request spent by each kind of process between two :func:`_cpu_seconds`."""
    by: dict[str, float] = {}
    for pid, (name, t) in after.items():
        used = t - before.get(pid, (name, 0.0))[1]
        if used > 0:
            by[name] = by.get(name, 0.0) + used
    total = sum(by.values())
    top = dict(sorted(((k, 1e3 * v / max(requests, 1)) for k, v in by.items()), key=lambda kv: -kv[1])[:8])
    return {"total": 1e3 * total / max(requests, 1), **top}


def _run_mode(a: argparse.Namespace) -> dict[str, Any]:
    """Everything for one mode (runs in a child process whose environment already has the mode's)."""
    import httpx
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from serving import deploy

    mode = a._child
    load_start = os.getloadavg()
    tmp = ray_temp_dir("frsl")
    port = free_port()
    cfg = _bench_config(mode, a.dim, a.k, tmp, port)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=tmp,
             log_to_driver=False, configure_logging=False, _system_config=cfg.ray.system_config())
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"mode": mode, "loadavg_start": load_start, "verified": {}, "rows": rows}
    try:
        t0 = time.monotonic()
        dep = deploy.start(cfg, durable=False, autostart=True)

        @serve.deployment(logging_config={"enable_access_log": False})
        class Echo:
            async def __call__(self, request: Request) -> Response:
                return Response(await request.body(), media_type="application/json")

        s = cfg.serving
        serve.run(Echo.options(max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
                               ray_actor_options={"num_cpus": s.replica_num_cpus}).bind(),
                  name="echo", route_prefix="/echo", logging_config={"enable_access_log": False})
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, timeout=30.0)
        r = http.post("/echo", content=ECHO_BODY, headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.text == ECHO_BODY, (r.status_code, r.text)
        out["startup_s"] = time.monotonic() - t0
        print(f"[{mode}] Ray, Freshet and the echo up in {out['startup_s']:.1f} s", flush=True)

        rng = np.random.default_rng(a.seed)
        sizes = sorted(set(a.items))
        seq = _seed_users(dep.ps, cfg, a.users, min(sizes), a.seen, 0, rng)
        have = 0
        total_runs = len(sizes) * len(a.clients) * 2
        done = 0
        for n_items in sizes:
            t1 = time.monotonic()
            seq = _seed_items(dep.ps, cfg, have, n_items, seq, rng)
            have = n_items
            st = _wait_for_catalogue(http, n_items)
            print(f"[{mode}] catalogue of {n_items} items (dim {a.dim}) seeded and mirrored in "
                  f"{time.monotonic() - t1:.1f} s (model_version {st['model_version']})", flush=True)
            out["verified"][str(n_items)] = _verify_rank(http, dep.ps, cfg, a.users, n_items, a.k)
            for c in a.clients:
                for target in ("echo", "rank"):
                    done += 1
                    print(f"[{mode}] [{done}/{total_runs}] {n_items} items, {target}, {c} clients, "
                          f"{a.seconds:g} s ...", end=" ", flush=True)
                    spies = []
                    if a.profile and target == "rank" and c == max(a.clients) and n_items == max(sizes):
                        shards = [pid for pid, (name, _) in _cpu_seconds().items() if name == "ray::PSShard"]
                        for tag, pid in [("replica", _replica_pid("freshet"))] + [(f"shard{j}", p) for j, p in enumerate(shards)]:
                            spies.append(_profile(pid, a.seconds, Path(a.out) / f"profile-{mode}-{tag}.txt"))
                    res = _load(a.client, base, target, c, a.seconds, a.k, a.users, tmp)
                    for spy in spies:
                        if spy is not None:
                            spy.wait(timeout=60)
                    rows.append({"mode": mode, "items": n_items, "target": target, "clients": c, **res})
                    cpu = res["cpu_ms_per_request"]
                    print(f"{res['req_per_s']:.0f} req/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                          f"errors {res['errors']}; CPU ms/request {cpu['total']:.2f} ("
                          + ", ".join(f"{k2} {v:.2f}" for k2, v in cpu.items() if k2 != "total") + ")", flush=True)
                    for sample in res.get("bad_status_samples", []):
                        print(f"[{mode}]   refused: {sample}", flush=True)
        st = http.get("/stats").json()
        out["final_stats"] = {k2: st.get(k2) for k2 in ("model_version", "cached_items", "events_applied", "mirror")}
        http.close()
        deploy.stop(cfg)
        del dep
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------- report


def _row(rows, mode, items, target, clients):
    for r in rows:
        if (r["mode"], r["items"], r["target"], r["clients"]) == (mode, items, target, clients):
            return r
    return None


def evaluate_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal of :data:`GOALS` per mode: ``{"met": bool | None, "detail": str}`` (None: not measured)."""
    out: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in rows}):
        mine = [r for r in rows if r["mode"] == mode]
        sizes = sorted({r["items"] for r in mine})
        big = max(sizes)
        g: dict[str, Any] = {}
        parts, ok = [], True
        for n in sizes:
            r8, r32, r64 = (_row(mine, mode, n, "rank", c) for c in (8, 32, 64))
            errs = sum(r["errors"] for r in mine if r["items"] == n)
            if r8 is None or (r32 is None and r64 is None):
                continue
            at = [r for r in (r32, r64) if r is not None]
            good = all(r["req_per_s"] >= r8["req_per_s"] for r in at) and errs == 0
            ok &= good
            parts.append(f"{n} items: 8={r8['req_per_s']:.0f}, " + ", ".join(
                f"{r['clients']}={r['req_per_s']:.0f}" for r in at) + f" req/s, errors {errs}")
        g["no_collapse"] = {"met": ok if parts else None, "detail": "; ".join(parts)}
        e1, r1 = _row(mine, mode, big, "echo", 1), _row(mine, mode, big, "rank", 1)
        if e1 and r1:
            g["sequential_p50"] = {"met": r1["p50_ms"] <= e1["p50_ms"] + 2.0,
                                   "detail": f"/rank p50 {r1['p50_ms']:.2f} ms vs echo {e1['p50_ms']:.2f} + 2 ms"}
        e32, r32 = _row(mine, mode, big, "echo", 32), _row(mine, mode, big, "rank", 32)
        if r32 is not None and mode == "default" and e32 is not None:
            g["concurrent_default"] = {"met": r32["req_per_s"] >= 0.5 * e32["req_per_s"],
                                       "detail": f"/rank {r32['req_per_s']:.0f} req/s = "
                                                 f"{r32['req_per_s'] / e32['req_per_s']:.2f} x echo {e32['req_per_s']:.0f}"}
        if r32 is not None and mode == "high_throughput":
            g["concurrent_high_throughput"] = {"met": r32["req_per_s"] >= 500,
                                               "detail": f"/rank {r32['req_per_s']:.0f} req/s at 32 clients"}
        out[mode] = g
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (mode, catalogue, client count): echo and /rank side by side."""
    head = (f"{'mode':<16} {'items':>7} {'clients':>7} | {'echo req/s':>10} {'p50':>6} {'p99':>7} | "
            f"{'/rank req/s':>11} {'p50':>6} {'p99':>7} {'x echo':>6} | {'errors':>6}")
    lines = [head, "-" * len(head)]
    keys = sorted({(r["mode"], r["items"], r["clients"]) for r in rows}, key=lambda t: (t[0] != "default", t[0], t[1], t[2]))
    for mode, items, c in keys:
        e, r = _row(rows, mode, items, "echo", c), _row(rows, mode, items, "rank", c)

        def cols(x, w):
            return (f"{x['req_per_s']:>{w}.0f} {x['p50_ms']:>6.2f} {x['p99_ms']:>7.2f}" if x else f"{'-':>{w}} {'-':>6} {'-':>7}")

        ratio = f"{r['req_per_s'] / e['req_per_s']:>6.2f}" if e and r and e["req_per_s"] else f"{'-':>6}"
        errs = sum(x["errors"] for x in (e, r) if x)
        lines.append(f"{mode:<16} {items:>7} {c:>7} | {cols(e, 10)} | {cols(r, 11)} {ratio} | {errs:>6}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``serve_latency.json`` and ``serve_latency.png`` under ``out``; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "serve_latency.json", out / "serve_latency.png"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    rows = report["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = sorted({(r["mode"], r["target"], r["items"] if r["target"] == "rank" else None) for r in rows},
                    key=lambda t: (t[0], t[1], t[2] or 0))
    for mode, target, items in series:
        pts = {}
        for r in rows:
            if (r["mode"], r["target"]) == (mode, target) and (items is None or r["items"] == items):
                pts.setdefault(r["clients"], []).append(r)
        cs = sorted(pts)
        label = f"{mode}: " + ("echo" if target == "echo" else f"/rank {items // 1000}k items")
        style = "--" if target == "echo" else "-"
        ax1.plot(cs, [np.mean([r["req_per_s"] for r in pts[c]]) for c in cs], style, marker="o", label=label)
        ax2.plot(cs, [np.mean([r["p50_ms"] for r in pts[c]]) for c in cs], style, marker="o", label=label)
    for ax, what in ((ax1, "requests per second"), (ax2, "p50 latency (ms, client side)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["bench"]["clients"], [str(c) for c in report["bench"]["clients"]])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.set_title(f"throughput (k={report['bench']['k']}, dim {report['bench']['dim']}, {report['bench']['client']})")
    ax2.set_title("latency")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path


# --------------------------------------------------------------------------- CLI


def _wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    return subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0] if wrk else None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=_ints, default=[9000, 100_000],
                   help="catalogue sizes, a comma list run smallest first in one deployment (default 9000,100000)")
    p.add_argument("--dim", type=int, default=64, help="embedding width (floats, default 64)")
    p.add_argument("--k", type=int, default=100, help="items per /rank (default 100)")
    p.add_argument("--users", type=int, default=1000, help="users with rows, in rotation (default 1000)")
    p.add_argument("--seen", type=int, default=20, help="recent items per user, excluded from /rank (default 20)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run (default 8)")
    p.add_argument("--clients", type=_ints, default=[1, 8, 32, 64], help="client counts (default 1,8,32,64)")
    p.add_argument("--modes", default="default,high_throughput", help="Serve modes (default both)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                   help="load client: wrk when installed (auto), or the asyncio library")
    p.add_argument("--ceiling-seconds", type=float, default=3.0,
                   help="seconds per client-ceiling run against the raw server (0 skips it; default 3)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the Freshet replica and the PS shards during the largest /rank run (raw stacks in --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/results/)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_child-out", dest="child_out", help=argparse.SUPPRESS)
    p.add_argument("--_raw-server", dest="raw_server", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if set(a.modes) - {"default", "high_throughput"}:
        p.error(f"--modes: unknown {sorted(set(a.modes) - {'default', 'high_throughput'})}")
    if a.client == "auto":
        a.client = "wrk" if shutil.which("wrk") else "python"
    if a.client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed")
    # Refused here, not after Ray and Serve have started (a k beyond the catalogue failed a
    # check of the answers 15 s in; --clients 0 ended in wrk's usage text).
    for flag, v in (("--dim", a.dim), ("--k", a.k), ("--users", a.users)):
        if v < 1:
            p.error(f"{flag}: must be >= 1, got {v}")
    if not a.items or min(a.items) < 1:
        p.error(f"--items: catalogue sizes must be >= 1, got {a.items}")
    if not a.clients or min(a.clients) < 1:
        p.error(f"--clients: client counts must be >= 1, got {a.clients}")
    if a.seconds <= 0 or a.ceiling_seconds < 0:
        p.error("--seconds must be > 0 and --ceiling-seconds >= 0 (0 skips the ceiling run)")
    if not 0 <= a.seen < min(a.items):
        p.error("--seen must be >= 0 and below the smallest catalogue")
    if a.k > min(a.items) - a.seen:
        p.error(f"--k {a.k}: every /rank must fill k items from the smallest catalogue ({min(a.items)}) less the "
                f"--seen items it excludes ({a.seen}); lower --k or raise --items")
    return a


def _child_argv(a: argparse.Namespace, mode: str, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "bench.serve_latency", "--items", ",".join(map(str, a.items)), "--dim", str(a.dim),
            "--k", str(a.k), "--users", str(a.users), "--seen", str(a.seen), "--seconds", str(a.seconds),
            "--clients", ",".join(map(str, a.clients)), "--client", a.client, "--seed", str(a.seed),
            "--out", str(a.out), "--_child", mode, "--_child-out", str(out)]
    return argv + (["--profile"] if a.profile else [])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    a = _parse(argv)
    if a.raw_server is not None:
        _raw_server(a.raw_server)
        return 0
    if a._child:
        Path(a.child_out).write_text(json.dumps(_run_mode(a), default=str))
        return 0

    from serving.ray_head import high_throughput_run

    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "bench": {"items": a.items, "dim": a.dim, "k": a.k, "users": a.users, "seen": a.seen, "seconds": a.seconds,
                  "clients": a.clients, "modes": a.modes, "client": a.client,
                  "command": "python -m bench.serve_latency " + " ".join(argv if argv is not None else sys.argv[1:])},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine("ray", "numpy", processor=platform.processor() or platform.machine(), wrk=_wrk_version()),
        "loadavg_start": os.getloadavg(),
    }
    print(f"serve_latency: modes {a.modes}, catalogues {a.items}, clients {a.clients}, {a.seconds:g} s per run, "
          f"client {a.client}; load average {report['loadavg_start'][0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="frsl") as tmp:
        report["client_ceiling"] = (_client_ceiling(a.client, a.clients, a.ceiling_seconds, tmp)
                                    if a.ceiling_seconds > 0 else [])
        rows: list[dict[str, Any]] = []
        report["modes"] = {}
        failed = []
        for mode in a.modes:
            env = dict(os.environ)
            child_out = Path(tmp) / f"{mode}.json"
            # The child's Ray, HAProxy with it, has stopped when the with block ends.
            with high_throughput_run("frsh") if mode == "high_throughput" else contextlib.nullcontext({}) as ht:
                env.update(ht)
                proc = subprocess.run(_child_argv(a, mode, child_out), env=env, check=False)
            if proc.returncode != 0 or not child_out.exists():
                failed.append(mode)
                print(f"[{mode}] FAILED (exit {proc.returncode})", flush=True)
                continue
            res = json.loads(child_out.read_text())
            rows.extend(res.pop("rows"))
            report["modes"][mode] = res
    report["rows"] = rows
    report["loadavg_end"] = os.getloadavg()
    report["goals"] = evaluate_goals(rows)
    report["failed_modes"] = failed
    json_path, png_path = write_report(report, a.out)
    print()
    print(format_table(rows))
    print(f"\nload average (1/5/15 min): start {' '.join(f'{x:.2f}' for x in report['loadavg_start'])}, "
          f"end {' '.join(f'{x:.2f}' for x in report['loadavg_end'])}")
    if report["client_ceiling"]:
        print("client ceiling (raw fixed-response server): " + ", ".join(
            f"{r['clients']} clients {r['req_per_s']:.0f} req/s" for r in report["client_ceiling"]))
    for mode, goals in report["goals"].items():
        for name, g in goals.items():
            verdict = "met" if g["met"] else ("not met" if g["met"] is not None else "not measured")
            print(f"goal {mode}/{name}: {verdict} ({g['detail']})")
    print(f"wrote {json_path} and {png_path}")
    return 0 if not failed and all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
