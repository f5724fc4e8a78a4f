"""``freshet run`` on MovieLens files, as a user runs it (a real subprocess, issue 13): a
``::`` ratings.dat is read (4 lines give 4 events), and a stream that would train nothing, or
mostly quarantined rows, is an error naming the file, the layout and the counts (non-zero
exit, before anything is started), never "events trained 0"."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.serving.cli.helpers import freshet

ML_1M = ["1::1193::5::978300760", "1::661::3::978302109", "1::914::3::978301968", "1::3408::4::978300275"]


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "lines, expect",
    [
        ([], ["no data rows", "detected nothing"]),
        (["1;1193;5;978300760", "1;661;3;978302109", "1;914;3;978301968", "1;3408;4;978300275"],
         ["detected no separator in the first line '1;1193;5;978300760'"]),
        ([*ML_1M[:1], "1;661;3;1", "1;914;3;2", "1;3408;4;3"],
         ["3 of 4 rows quarantined, more than 50% (1 valid;", "expected ratings.dat (ML-1M/10M"]),
    ],
    ids=["empty", "no-separator", "mostly-quarantined"],
)
def test_run_refuses_a_stream_that_would_train_nothing(tmp_path, lines, expect):
    f = _write(tmp_path / "ml-1m" / "ratings.dat", lines)
    r = freshet("run", "--data", str(f), timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert str(f) in r.stderr, r.stderr
    for text in expect:
        assert text in r.stderr, r.stderr
    assert "events trained" not in r.stdout
    # The rejected rows are in a quarantine file the message names (kept with the run's dir);
    # a refusal that wrote nothing leaves no dir behind.
    named = re.search(r"see (\S+quarantine\.arrow)", r.stderr)
    if named:
        qfile = Path(named.group(1))
        assert qfile.exists() and f"kept in {qfile.parent}" in r.stderr, r.stderr
        shutil.rmtree(qfile.parent)
    else:
        assert "kept in" not in r.stderr, r.stderr
    assert (named is not None) == bool(lines), r.stderr  # only an empty file has no rows to set aside


def test_run_trains_every_line_of_a_ratings_dat(tmp_path):
    # The report: these 4 lines used to give "events trained 0" and exit 0. By the default
    # rating rule (positive at >= 4 of 5), 2 of them are positives; all 4 are events.
    d = _write(tmp_path / "ml-1m" / "ratings.dat", ML_1M).parent
    r = freshet("run", "--data", str(d), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "movielens stream, 4 events" in r.stdout
    assert re.search(r"^events trained\s+4$", r.stdout, re.M), r.stdout[-2000:]
    assert re.search(r"^quarantined rows\s+0$", r.stdout, re.M), r.stdout[-2000:]
    # A clean run ends without Ray's error lines (serve.shutdown() before ray.shutdown() left
    # "(raylet) Task ServeController.graceful_shutdown failed ..." at the end of every run).
    out = r.stdout + r.stderr
    assert "(raylet)" not in out and "graceful_shutdown" not in out, out[-3000:]
    # A throwaway run leaves nothing behind in /tmp (its ingest log and state, ~24 MB a run).
    work = re.search(r"ingest log in (\S+)", r.stdout).group(1)
    assert not Path(work).exists(), work



def test_run_on_a_joined_cluster_removes_its_own_app_and_leaves_others(tmp_path, ray_cluster):
    # On someone's cluster (--address) the run removes what it deployed (its app, its actors)
    # and nothing else: another app in the same Serve instance keeps serving. (It used to shut
    # Serve down, every app with it.)
    import httpx
    import ray
    import yaml
    from ray import serve

    from serving.app import APP_NAME
    from tests.conftest import free_port

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def bystander(request) -> str:
        return "still here"

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(bystander.bind(), name="bystander", route_prefix="/bystander")
        config = tmp_path / "freshet.yaml"
        config.write_text(yaml.safe_dump({"ps": {"tables": {"user": {"dim": 8}, "item": {"dim": 8}, "item_ctx": {"dim": 8}}},
                                          "trainer": {"batch_size": 64}, "serving": {"port": port}}))
        r = freshet("run", "--address", ray_cluster.address_info["gcs_address"], "--config", str(config),
                    "--events", "150", "--keep", timeout=300, extra_env={"RAY_AUTH_MODE": "disabled"})  # auth off here
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        assert re.search(r"^events trained\s+150$", r.stdout, re.M), r.stdout[-2000:]
        work = Path(re.search(r"ingest log in (\S+)", r.stdout).group(1))
        assert f"kept the run's ingest log and state in {work}" in r.stdout and (work / "ingest").is_dir()
        shutil.rmtree(work)
        apps = serve.status().applications
        assert "bystander" in apps and APP_NAME not in apps, apps
        assert httpx.get(f"http://127.0.0.1:{port}/bystander", timeout=30).text == "still here"
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if "-run-" in a["namespace"]]
        assert left == [], left
    finally:
        serve.shutdown()


@pytest.mark.parametrize("where", ["dir", "missing-parent"])
def test_run_refuses_a_json_path_it_could_not_write_before_running(tmp_path, where):
    # It used to train the whole stream, print the summary, then fail writing the JSON.
    target = tmp_path if where == "dir" else tmp_path / "no" / "such" / "out.json"
    r = freshet("run", "--json", str(target), "--events", "100", timeout=120)
    assert r.returncode == 2 and f"--json: {target} is a directory or its directory does not exist" in r.stderr, r.stderr
    assert "events trained" not in r.stdout and "kept" not in r.stderr


def test_run_that_reserves_more_cpus_than_its_ray_has_is_refused_not_left_waiting(tmp_path):
    # Ray would wait forever for a trainer it has no room for (4 trainers at 0.5 CPUs on this
    # 2-core machine hung until killed); 4 x 64 CPUs are more than any test machine has.
    config = tmp_path / "freshet.yaml"
    config.write_text("trainer: {num_workers: 4, num_cpus: 64}\ningest: {partitions: 4}\n")
    r = freshet("run", "--config", str(config), "--events", "100", timeout=180)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert re.search(r"the deployment reserves 256\.75 CPUs .* more than the \d+ this Ray cluster has", r.stderr), r.stderr


def test_run_refuses_an_empty_data_flag():
    # It was ignored, and the config's stream (the synthetic default) ran instead.
    r = freshet("run", "--data", "", timeout=120)
    assert r.returncode == 2 and "--data: empty" in r.stderr, r.stderr
