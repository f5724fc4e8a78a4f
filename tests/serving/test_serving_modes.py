"""Serving options and modes on a real deployment: real Ray, real Serve, real HTTP on 127.0.0.1.

The same deployment (2 PS shards, the ingest log, one trainer, the Serve app with a bearer
token) runs twice, once in Serve's default mode and once in its high-throughput mode (HAProxy
ingress, ``serving.high_throughput``). In each mode:

* the ``serving`` options reach the Serve deployment, read back from Serve's own details API
  (what its REST API and ``serve status`` show): ``max_ongoing_requests``,
  ``max_queued_requests``, the backpressure answer, and ``num_replicas`` or the autoscaling bounds;
* the app's HTTP contract answers the same: 401/413/415/422 with their exact bodies,
  ``/events`` 200, ``/rank`` and ``/score`` 200 with the right keys, ``/healthz``, ``/stats``.
  The second mode to run compares its transcript with the first's, request by request.

Where the modes differ (``test_ingress_of_each_mode``): in default mode Serve's proxy sheds load
beyond ``max_queued_requests`` with 503 and ``Retry-After``; in high-throughput mode HAProxy
really serves the port and every extra listener it brings is on loopback, on a port of its own
(not Ray's fixed defaults). For that mode Serve's variables are in the environment before Ray
starts (Ray's workers inherit it); ``run_app`` hands the same ones to the Serve controller. There
HAProxy's first start is made to take 16 s, longer than the three 5 s readiness checks Serve's
controller gives a proxy by default: the deployment must still come up.

The config validation and ``_bind`` tests at the end need no Ray.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import _ray_start, free_port, wait_for

TOKEN = "modes-token-51c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EVENTS = 20
MAX_BODY = 16 * 1024
MAX_K = 40

# Per mode: options that differ from the defaults, so reading them back proves they were passed.
MODES = {
    "default": {"max_ongoing_requests": 2, "max_queued_requests": 2,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1.0}},
    "high_throughput": {"high_throughput": True, "max_ongoing_requests": 48, "max_queued_requests": 300,
                        "num_replicas": 1},
}
# Ray Serve's fixed default ports for the high-throughput mode's extra listeners.
SERVE_DEFAULT_PORTS = {8404, 9101, 8500, 9500}

_transcripts: dict[str, list] = {}


def _config(mode: str, tmp: str):
    from serving.config import load_config

    return load_config(None, {
        "namespace": f"t-modes-{mode}-{uuid.uuid4().hex[:6]}",
        "ps": {"num_shards": 2, "num_buckets": 64, "tables": {"user": {"dim": 8}, "item": {"dim": 8}}},
        "trainer": {"num_workers": 1, "batch_size": 16, "device": "cpu"},
        "stream": {"kind": "ingest", "num_events": None},
        "ingest": {"dir": tmp, "fsync": False},
        "serving": {"port": free_port(), "auth_token": TOKEN, "max_events_per_request": MAX_EVENTS,
                    "max_body_bytes": MAX_BODY, "max_k": MAX_K, "cache_refresh_s": 0.05, **MODES[mode]},
    })


# HAProxy's first start in the high-throughput deployment waits this long, as on a loaded host
# (the CI run where Serve's controller, after three 5 s readiness checks, killed it mid-start).
SLOW_HAPROXY_START_S = 16


def _slow_first_haproxy_start(wrapper: Path) -> None:
    """Make the first run of the HAProxy wrapper (``high_throughput_env``'s) sleep
    :data:`SLOW_HAPROXY_START_S` before HAProxy starts; later runs (Serve's reloads) do not."""
    marker = wrapper.with_name("slow-once")
    marker.touch()
    shebang, rest = wrapper.read_text().split("\n", 1)
    wrapper.write_text(f"{shebang}\nif rm {marker} 2>/dev/null; then sleep {SLOW_HAPROXY_START_S}; fi\n{rest}")


@pytest.fixture(scope="module", params=list(MODES))
def deployment(request):
    """``(mode, http client, config, Serve's details of the app's deployment, extra env)`` for each mode."""
    from ray import serve

    from serving import deploy
    from serving.app import APP_NAME
    from serving.ray_head import high_throughput_run

    mode = request.param
    tmp = tempfile.mkdtemp(prefix="freshet-modes-")
    cfg = _config(mode, tmp)
    ht = high_throughput_run("frm") if cfg.serving.high_throughput else contextlib.nullcontext({})
    with pytest.MonkeyPatch.context() as mp, ht as env:  # HAProxy's dir and ports: until this Ray has stopped
        for k, v in env.items():  # before Ray starts: its processes inherit this environment
            mp.setenv(k, v)
        if env:
            _slow_first_haproxy_start(Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]))
        with _ray_start():
            dep = deploy.start(cfg, durable=False, autostart=True)
            try:
                details = serve.context._get_global_client().get_serve_details()
                app = details["applications"][APP_NAME]
                with httpx.Client(base_url=f"http://127.0.0.1:{cfg.serving.port}", timeout=30.0) as http:
                    yield mode, http, cfg, app, env
            finally:
                deploy.stop(cfg)
                del dep


def test_serving_options_reach_the_deployment(deployment):
    from serving.app import _DRAIN_CHECK_S

    _, _, cfg, app, _ = deployment
    assert app["status"] == "RUNNING", app
    (name,) = app["deployments"]
    dep = app["deployments"][name]
    dc = dep["deployment_config"]
    s = cfg.serving
    assert dc["max_ongoing_requests"] == s.max_ongoing_requests
    assert dc["max_queued_requests"] == s.max_queued_requests
    assert dc["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}
    assert dc["graceful_shutdown_wait_loop_s"] == _DRAIN_CHECK_S < 2.0  # Serve's default would make every stop wait 2 s
    assert dc["ray_actor_options"]["num_cpus"] == s.replica_num_cpus
    if s.autoscaling is not None:
        auto = dc["autoscaling_config"]
        assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (
            s.autoscaling.min_replicas, s.autoscaling.max_replicas, s.autoscaling.target_ongoing_requests)
        assert dc.get("num_replicas") in (None, "auto") or dc["num_replicas"] == s.autoscaling.min_replicas
    else:
        assert dc["num_replicas"] == s.num_replicas
        assert not dc.get("autoscaling_config")
    assert dep["target_num_replicas"] == (s.num_replicas or s.autoscaling.min_replicas)
    running = [r for r in dep["replicas"] if r["state"] == "RUNNING"]
    assert len(running) == dep["target_num_replicas"], dep["replicas"]


def _events(n: int, user: str = "m-user") -> dict:
    return {"events": [{"user_id": user, "item_id": i % 7, "timestamp": 1.7e9 + i} for i in range(n)]}


def _entry(what: str, r: httpx.Response, keep_body: bool) -> tuple:
    """What must be equal across modes: status, the headers a client acts on, and the body (or its keys)."""
    body = r.json()
    headers = {h: r.headers.get(h) for h in ("content-type", "www-authenticate", "retry-after")}
    return what, r.status_code, headers, body if keep_body else sorted(body)


def test_http_contract_is_the_same_in_both_modes(deployment):
    mode, http, _, _, _ = deployment
    log: list[tuple] = []
    json_hdr = {**AUTH, "Content-Type": "application/json"}

    r = http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "shards": 2, "trainers": 1, "down": {}}, r.text
    log.append(_entry("healthz", r, True))
    head = http.head("/healthz")
    assert head.status_code == 200 and head.content == b"", (head.status_code, head.content)

    # 401: no token, a wrong token, a token without the scheme; checked before the body is read.
    for what, headers in (("401-none", {}), ("401-wrong", {"Authorization": "Bearer nope"}),
                          ("401-scheme", {"Authorization": TOKEN})):
        r = http.post("/events", json=_events(1), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (what, r.text)
        log.append(_entry(what, r, True))
    r = http.post("/events", content=b"garbage", headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text
    log.append(_entry("401-garbage", r, True))

    # 413: too many events, too many bytes (declared and chunked).
    r = http.post("/events", json=_events(MAX_EVENTS + 1), headers=AUTH)
    assert r.status_code == 413 and "max_events_per_request" in r.text, r.text
    log.append(_entry("413-events", r, True))
    big = b'{"events": [' + b",".join([b'{"user_id": "a", "item_id": 1}'] * 700) + b"]}"
    assert len(big) > MAX_BODY
    r = http.post("/events", content=big, headers=json_hdr)
    assert r.status_code == 413 and "max_body_bytes" in r.text, r.text
    log.append(_entry("413-bytes", r, True))
    r = http.post("/events", content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]), headers=json_hdr)
    assert r.status_code == 413 and "max_body_bytes" in r.text, r.text
    log.append(_entry("413-chunked", r, True))

    # 415: not JSON.
    r = http.post("/events", content=b'{"events": []}', headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.text, r.text
    log.append(_entry("415", r, True))
    r = http.post("/events", content=b'{"events": []}', headers={**AUTH, "Content-Type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and "charset utf-8" in r.text, r.text
    log.append(_entry("415-charset", r, True))
    r = http.post("/events", content=b'{"events": []}', headers={**json_hdr, "Content-Encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding" in r.text and r.headers["accept-encoding"] == "identity", r.text
    log.append(_entry("415-encoding", r, True))

    # 400: a header that decides how the request is read, sent twice (each reader could take another).
    for what, name, values in (("400-two-types", "Content-Type", ("text/plain", "application/json")),
                               ("400-two-keys", "Idempotency-Key", ("k-1", "k-2"))):
        headers = [(k, v) for k, v in json_hdr.items() if k != name] + [(name, v) for v in values]
        r = http.post("/events", content=b'{"events": [{"user_id": "a", "item_id": 1}]}', headers=headers)
        assert r.status_code == 400 and f"{name}: header sent 2 times with different values" in r.text, (what, r.text)
        log.append(_entry(what, r, True))

    # 422 naming the field.
    for what, path, body, field in (
        ("422-rank-k", "/rank", {"user_id": "a", "k": MAX_K + 1}, "k"),
        ("422-rank-user", "/rank", {"k": 3}, "user_id"),
        ("422-score-items", "/score", {"user_id": "a", "item_ids": []}, "item_ids"),
        ("422-events-weight", "/events", {"events": [{"user_id": "a", "item_id": 1, "weight": "x"}]}, "weight"),
        ("422-events-extra", "/events", {"events": [{"user_id": "a", "item_id": 1, "color": "red"}]}, "color"),
        ("422-events-event-id", "/events", {"events": [{"user_id": "a", "item_id": 1, "event_id": "e"},
                                                       {"user_id": "a", "item_id": 2, "event_id": "e"}]}, "event_id"),
    ):
        r = http.post(path, json=body, headers=AUTH)
        assert r.status_code == 422 and field in str(r.json()["detail"]), (what, r.text)
        log.append(_entry(what, r, True))
    r = http.post("/events", content=b'{"events": [{"user_id": "a", "item_id": 1, "weight": NaN}]}', headers=json_hdr)
    assert r.status_code == 422 and "weight" in r.text, r.text
    log.append(_entry("422-nan", r, True))

    # 200s. A fresh ingest log: offsets are the same in both modes.
    r = http.post("/events", json=_events(12), headers=AUTH)
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["offset"]) == (12, 11), r.text
    log.append(_entry("events", r, True))
    wait_for(lambda: http.get("/stats").json()["events_applied"] >= 12, 30, "the trainer to apply the events")
    r = http.post("/rank", json={"user_id": "m-user", "k": 3, "exclude_seen": False})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["user_id"] == "m-user" and len(got["items"]) == 3
    assert all(set(it) == {"item_id", "score"} for it in got["items"])
    log.append(_entry("rank", r, False))
    r = http.post("/rank", json={"user_id": "nobody", "k": 2})  # reads need no token on loopback
    assert r.status_code == 200 and r.json()["fallback"] == "popular", r.text
    log.append(_entry("rank-unknown", r, False))
    r = http.post("/score", json={"user_id": "m-user", "item_ids": [1, "no-such-item"]})
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == "m-user" and len(r.json()["scores"]) == 2 and r.json()["scores"][1] is None
    log.append(_entry("score", r, False))
    r = http.get("/stats")
    assert r.status_code == 200 and r.json()["events_accepted"] == 12, r.text
    log.append(_entry("stats", r, False))
    r = http.get("/no-such-path")
    assert r.status_code == 404, r.text
    log.append(_entry("404", r, True))

    _transcripts[mode] = log
    others = [m for m in _transcripts if m != mode]
    for other in others:  # whichever mode runs second compares
        for mine, theirs in zip(log, _transcripts[other], strict=True):
            assert mine == theirs, f"{mode} vs {other}"


def _backpressure_is_503_with_retry_after(cfg) -> None:
    # max_ongoing_requests=2, max_queued_requests=2: a burst of /stats (each waits on every actor)
    # overflows. Up to 5 bursts: on a loaded host the client's 32 threads may not keep more than
    # 4 requests in flight at once (a CI run saw a burst of 64 all answered 200).
    url = f"http://127.0.0.1:{cfg.serving.port}/stats"
    rs: list = []
    with ThreadPoolExecutor(32) as pool:
        for _ in range(5):
            rs += pool.map(lambda _: httpx.get(url, timeout=30), range(64))
            if any(r.status_code == 503 for r in rs):
                break
    codes = sorted({r.status_code for r in rs})
    rejected = [r for r in rs if r.status_code == 503]
    assert set(codes) <= {200, 503} and rejected and any(r.status_code == 200 for r in rs), codes
    assert all(r.headers.get("retry-after") == "1" and "backpressure" in r.text for r in rejected), rejected[0].text


def _pids_with(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _haproxy_listeners_are_loopback_on_ports_of_their_own(cfg, env) -> None:
    from serving.ray_head import listening_sockets

    hap_dir = str(Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent)
    haproxy = _pids_with(hap_dir)  # HAProxy runs with -f <its config under our dir>
    socks = listening_sockets(haproxy)
    ports = {s.port for s in socks}
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert {cfg.serving.port, stats, metrics} <= ports, socks  # HAProxy, not Serve's proxy, has the app's port
    assert all(s.is_loopback for s in socks), f"HAProxy listens beyond loopback: {socks}"
    assert not ports & SERVE_DEFAULT_PORTS, socks
    # HAProxy's Prometheus exporter answers, on loopback.
    assert httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).status_code == 200
    # The replica's own HTTP server (direct ingress) is in the reserved block, on serving.host.
    lo, hi = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    mine = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    direct = [s for s in listening_sockets(mine) if lo <= s.port <= hi]
    assert direct and all(s.is_loopback for s in direct), direct
    # Its files are under our dir, not /tmp/haproxy-serve (shared by every cluster on the host).
    assert any(Path(hap_dir).rglob("haproxy.cfg"))


def test_ingress_of_each_mode(deployment):
    """Default mode: Serve's proxy sheds load beyond max_queued_requests with 503 + Retry-After.
    High-throughput mode: HAProxy owns the app's port and all its listeners are on loopback, on
    ports of their own (its requests go straight to the replicas, bypassing Serve's proxy queue)."""
    _, _, cfg, _, env = deployment
    if cfg.serving.high_throughput:
        _haproxy_listeners_are_loopback_on_ports_of_their_own(cfg, env)
    else:
        _backpressure_is_503_with_retry_after(cfg)


# --------------------------------------------------------------------------- config and binding, no Ray


def test_bind_passes_the_serving_options():
    from serving.app import _bind
    from serving.config import load_config

    fixed = _bind(load_config(None, {"serving": {"num_replicas": 3, "max_ongoing_requests": 7,
                                                 "max_queued_requests": 11}}))
    dc = fixed._bound_deployment._deployment_config
    assert (dc.num_replicas, dc.max_ongoing_requests, dc.max_queued_requests) == (3, 7, 11)
    assert dc.autoscaling_config is None
    assert (dc.backpressure_config.status_code, dc.backpressure_config.retry_after_s) == (503, 1.0)
    auto = _bind(load_config(None, {"serving": {"autoscaling": {"min_replicas": 2, "max_replicas": 5,
                                                                "target_ongoing_requests": 16}}}))
    a = auto._bound_deployment._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (2, 5, 16)
    defaults = _bind(load_config())._bound_deployment._deployment_config
    assert defaults.max_ongoing_requests == 64 and defaults.num_replicas == 1  # 64 clients do not collapse


@pytest.mark.parametrize("serving,fields", [
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, ["serving.num_replicas", "serving.autoscaling"]),
    ({"num_replicas": None}, ["serving.num_replicas", "serving.autoscaling"]),
    ({"autoscaling": {"min_replicas": 4, "max_replicas": 2}}, ["min_replicas", "max_replicas"]),
    ({"autoscaling": {"target_ongoing_requests": 100}, "max_ongoing_requests": 64},
     ["target_ongoing_requests", "serving.max_ongoing_requests"]),
    ({"max_ongoing_requests": 0}, ["serving.max_ongoing_requests"]),
    ({"max_queued_requests": -2}, ["serving.max_queued_requests"]),
    ({"host": "0.0.0.0"}, ["serving.host", "serving.auth_token", "serving.allow_unauthenticated"]),
    ({"host": "10.1.2.3", "auth_token": "  "}, ["serving.auth_token"]),
    ({"host": "myhost.example"}, ["serving.host", "serving.auth_token"]),
])
def test_bad_serving_configs_name_the_fields(tmp_path, serving, fields):
    from tests.conftest import config_error

    msg = config_error(tmp_path, {"serving": serving})
    for f in fields:
        assert f in msg, msg


def test_config_round_trips_with_autoscaling_and_new_sections(tmp_path):
    from serving.config import FreshetConfig, load_config
    from tests.conftest import write_yaml

    cfg = load_config(None, {"serving": {"autoscaling": {"max_replicas": 3}, "high_throughput": True,
                                         "host": "0.0.0.0", "auth_token": "t"},
                             "ray": {"auth": "disabled", "ports": {"gcs": 25001, "haproxy_stats": 25002}}})
    assert cfg.serving.num_replicas is None and cfg.serving.autoscaling.max_replicas == 3
    assert load_config(write_yaml(tmp_path, cfg.to_yaml())) == cfg
    assert cfg.ray.head_ports() == {"gcs": 25001} and cfg.ray.serve_ports() == {"haproxy_stats": 25002}
    assert FreshetConfig().ray.auth.value == "token"  # secure by default


def test_token_paths_guard_reads_only_off_loopback():
    from serving.config import load_config

    def paths(**serving):
        return load_config(None, {"serving": serving}).serving.token_paths()

    assert paths() == frozenset()
    assert paths(auth_token="t") == {"/events"}
    assert paths(auth_token="t", host="localhost") == {"/events"}
    assert paths(auth_token="t", host="::1") == {"/events"}
    # Off loopback everything but the probe: the answers, the counters and the API description.
    assert paths(auth_token="t", host="0.0.0.0") == {"/events", "/rank", "/score", "/stats", "/docs",
                                                     "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    assert paths(host="0.0.0.0", allow_unauthenticated=True) == frozenset()


def test_run_app_warns_loudly_when_serving_unauthenticated_beyond_loopback(monkeypatch, capsys):
    from serving import app as app_module
    from serving.config import load_config

    class Stop(Exception):
        pass

    def no_serve(**kwargs):
        raise Stop

    monkeypatch.setattr(app_module.serve, "start", no_serve)
    cfg = load_config(None, {"serving": {"host": "0.0.0.0", "allow_unauthenticated": True}})
    with pytest.raises(Stop):
        app_module.run_app(cfg)
    err = capsys.readouterr().err
    assert "WARNING" in err and "serving.auth_token is not set" in err and "0.0.0.0" in err
    # A config that bypassed validation is refused before Serve starts.
    raw = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"allow_unauthenticated": False})})
    with pytest.raises(ValueError, match="serving.auth_token"):
        app_module.run_app(raw)
