"""Checks ``cluster.yaml`` the way ``ray up`` would, without touching AWS.

``ray up`` runs ``prepare_config`` (merge Ray's AWS defaults, merge setup commands,
fill per-type worker limits) and then ``validate_config`` (Ray's JSON schema plus
cross-field checks) before it calls the cloud; the tests do the same two steps, then
check what the schema cannot: that every node type ends up with Freshet installed in
the same venv the start commands use, and that every key carries a comment.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# Command lists Ray's AWS defaults.yaml fills in when absent; its versions use the system
# Python and a Ray dev wheel, so the file must set every one of them itself.
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def raw() -> dict:
    """cluster.yaml as loaded from disk."""
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    """cluster.yaml after Ray's own preparation, as ``ray up`` sees it before validation."""
    return prepare_config(copy.deepcopy(raw))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    """The project's pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _setup_per_node_type(prepared: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs, resolved as the launcher does."""
    out = {}
    for name, node_type in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            out[name] = prepared["head_setup_commands"]
        else:
            # A node type's own worker_setup_commands replace the merged global lists.
            out[name] = node_type.get("worker_setup_commands", prepared["worker_setup_commands"])
    return out


def _index(commands: list[str], pattern: str) -> int:
    """Position of the first command matching ``pattern``; fails the test when none does."""
    for i, cmd in enumerate(commands):
        if re.search(pattern, cmd):
            return i
    pytest.fail(f"no command matches {pattern!r} in {commands}")


# --- Ray's own validation -----------------------------------------------------------


def test_ray_launcher_accepts_the_config(prepared: dict) -> None:
    validate_config(prepared)


def test_prepare_adds_nothing_but_an_empty_docker_section(raw: dict, prepared: dict) -> None:
    # Any other key coming from Ray's defaults would be behaviour the file does not show.
    assert set(prepared) - set(raw) <= {"docker"}
    assert prepared.get("docker", {}) == {}
    for key in COMMAND_KEYS:
        assert key in raw, f"{key} missing: Ray's AWS default would run instead"
    every_command = [c for key in COMMAND_KEYS for c in prepared[key]]
    every_command += [c for t in prepared["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    assert not [c for c in every_command if "anaconda" in c or "ray-wheels" in c]


def _broken(raw: dict, edit) -> dict:
    config = copy.deepcopy(raw)
    edit(config)
    return prepare_config(config)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda c: c.update(frobnicate=1), jsonschema.ValidationError, r"'frobnicate' was unexpected"),
        (lambda c: c.update(max_workers="six"), jsonschema.ValidationError, r"'six' is not of type 'integer'"),
        (
            lambda c: c["available_node_types"]["worker_cpu"]["resources"].update(CPU=0.5),
            jsonschema.ValidationError,
            r"0.5 is not of type 'integer'",
        ),
        (
            lambda c: c["available_node_types"]["worker_cpu"].pop("resources"),
            jsonschema.ValidationError,
            r"'resources' is a required property",
        ),
        (lambda c: c.update(head_node_type="nope"), ValueError, r"head_node_type"),
        (lambda c: c.update(max_workers=0), ValueError, r"min_workers"),
    ],
    ids=["unknown-key", "wrong-type", "fractional-cpu", "missing-resources", "bad-head-type", "max-below-min"],
)
def test_ray_launcher_rejects_broken_copies(raw: dict, edit, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        validate_config(_broken(raw, edit))


# --- What the schema cannot see ---------------------------------------------------------


def test_every_node_type_installs_torch_then_freshet_into_one_venv(prepared: dict, pyproject: dict) -> None:
    (mount,) = [remote for remote, local in prepared["file_mounts"].items() if local == "."]
    torch_spec = next(r for r in pyproject["project"]["dependencies"] if re.match(r"torch\b", r))
    torch_range = SpecifierSet(torch_spec.removeprefix("torch"))

    for name, commands in _setup_per_node_type(prepared).items():
        venv = _index(commands, r"python3\.11 -m venv ~/venv\b")
        torch = _index(commands, r"~/venv/bin/pip install torch==")
        freshet = _index(commands, rf"~/venv/bin/pip install {re.escape(mount)}(\s|$)")
        # torch first, so installing freshet finds its torch requirement met and pulls no other build.
        assert venv < torch < freshet, name
        pin = Version(re.search(r"torch==(\S+)", commands[torch]).group(1))
        assert pin in torch_range, f"{name} installs torch {pin}, outside pyproject's {torch_range}"
        wants_gpu = prepared["available_node_types"][name]["resources"].get("GPU", 0) > 0
        # The CPU index serves CPU-only builds; GPU nodes need PyPI's CUDA build.
        assert ("download.pytorch.org/whl/cpu" in commands[torch]) is not wants_gpu, name

    head = prepared["head_node_type"]
    _index(_setup_per_node_type(prepared)[head], r"~/venv/bin/pip install 'boto3")


def test_head_starts_ray_then_freshet_up_from_the_venv(prepared: dict, pyproject: dict) -> None:
    commands = prepared["head_start_ray_commands"]
    stop = _index(commands, r"ray stop$")
    start = _index(commands, r"~/venv/bin/ray start --head\b")
    up = _index(commands, r"~/venv/bin/freshet up\b")
    assert stop < start < up
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in commands[start]
    # The head runs with Freshet's Ray settings, as a head `freshet up` starts does.
    from serving.config import RayConfig

    flags = [a for a in shlex.split(commands[start].split("~/venv/bin/ray", 1)[1]) if a.startswith("--system-config=")]
    assert [json.loads(f.split("=", 1)[1]) for f in flags] == [RayConfig().system_config()], flags

    # The command parses with the CLI the console script points at, as `up` joining the running Ray.
    from serving import cli
    from serving.cli.service import cmd_up

    assert pyproject["project"]["scripts"]["freshet"] == "serving.cli:main"
    argv = shlex.split(commands[up].split("~/venv/bin/freshet", 1)[1])
    args = cli._parser().parse_args(argv)
    assert args.fn is cmd_up
    assert args.address == "auto"


def _freshet_args(commands: list[str], sub: str):
    """The parsed ``freshet <sub>`` of the head's start commands."""
    from serving import cli

    cmd = commands[_index(commands, rf"~/venv/bin/freshet {sub}\b")]
    return cli._parser().parse_args(shlex.split(cmd.split("~/venv/bin/freshet", 1)[1].split("||")[0]))


def _local_path(prepared: dict, remote: str) -> Path:
    """The file on the machine running ``ray up`` that file_mounts puts at ``remote`` on the nodes."""
    for mount, local in prepared["file_mounts"].items():
        if remote == mount or remote.startswith(mount.rstrip("/") + "/"):
            return (REPO if local == "." else Path(local).expanduser()) / remote[len(mount):].lstrip("/")
    pytest.fail(f"{remote} is not under any file_mounts entry {sorted(prepared['file_mounts'])}")


def test_up_and_down_share_a_config_with_shared_storage_to_fill_in(prepared: dict, tmp_path: Path) -> None:
    # Both ran with no --config: the single-node default (a local freshet-data) was deployed onto
    # a cluster with worker nodes, and `down` looked for a state file `up` never wrote there.
    from ps.config import ConfigError
    from serving.config import load_config

    commands = prepared["head_start_ray_commands"]
    up, down = _freshet_args(commands, "up"), _freshet_args(commands, "down")
    assert up.config and up.config == down.config
    path = _local_path(prepared, up.config)
    assert path.is_file(), path
    # Shipped unfilled, it fails at load time naming the field, never running on a placeholder path.
    with pytest.raises(ConfigError, match=r"ingest\.dir 's3://<bucket>/freshet': the placeholder <bucket> is not filled in"):
        load_config(path)
    text = path.read_text(encoding="utf-8")
    filled = re.sub(r"<shared mount[^>]*>", "/mnt/freshet", text.replace("<bucket>", "my-bucket"))
    assert filled != text
    (tmp_path / "filled.yaml").write_text(filled, encoding="utf-8")
    cfg = load_config(tmp_path / "filled.yaml")
    assert cfg.ingest.dir == "s3://my-bucket/freshet" and cfg.ingest.state_dir == "/mnt/freshet"
    only_dir = text.replace("<bucket>", "my-bucket")
    (tmp_path / "half.yaml").write_text(only_dir, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ingest\.state_dir '<shared mount.*': the placeholder .* is not filled in"):
        load_config(tmp_path / "half.yaml")


def test_workers_join_the_head_port(prepared: dict) -> None:
    head_port = re.search(r"--port=(\d+)", " ".join(prepared["head_start_ray_commands"])).group(1)
    worker = prepared["worker_start_ray_commands"]
    assert worker[0].endswith("ray stop")
    _index(worker, rf"ray start --address=\$RAY_HEAD_IP:{head_port}(\s|$)")


# --- Comments ------------------------------------------------------------------------------


def uncommented_keys(text: str) -> list[str]:
    """``line: key`` for each mapping key with no comment on its line or the line directly above."""
    lines = text.splitlines()
    missing = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                row = key.start_mark.line
                # After the value when it ends on the key's line, else after the key: a '#'
                # inside a quoted value or a shell command is not a comment.
                col = value.end_mark.column if value.end_mark.line == row else key.end_mark.column
                rest = lines[row][col:].strip().lstrip(":").strip()
                above = lines[row - 1].strip() if row > 0 else ""
                if not rest.startswith("#") and not above.startswith("#"):
                    missing.append(f"{row + 1}: {key.value}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text))
    return missing


def test_every_key_is_commented() -> None:
    assert uncommented_keys(CLUSTER_YAML.read_text(encoding="utf-8")) == []


def test_comment_check_finds_bare_keys() -> None:
    text = "# top\na: 1\nb:\n  # c's comment\n  c: '# not a comment'\n  d: [1, 2]\ne: x  # inline\n"
    assert uncommented_keys(text) == ["3: b", "6: d"]


def test_multi_node_storage_is_documented() -> None:
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert "ingest.dir" in text and "s3://" in text and "ingest.state_dir" in text
