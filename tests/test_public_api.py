"""The public names of each package are pinned: a change here is an API change."""

import importlib

import pytest

PUBLIC = {
    "ps": ["ConfigError", "EmbeddingTable", "PSClient", "PSConfig", "PSShard", "PushId", "RowCache", "ShardingPlan",
           "start_shards"],
    "workers": ["IngestLog", "MovieLensSource", "ParquetSource", "Ranker", "StreamSource", "SyntheticSource",
                "Trainer", "open_source", "start_ingest", "start_trainers"],
    "serving": ["build_app", "run_app"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_pinned_and_every_name_resolves_with_a_docstring(package):
    mod = importlib.import_module(package)
    assert sorted(mod.__all__) == sorted(PUBLIC[package])
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert (obj.__doc__ or "").strip(), f"{package}.{name} has no docstring"


def test_ps_does_not_import_workers_or_serving():
    import subprocess
    import sys

    code = "import sys, ps, ps.cache, ps.client, ps.config, ps.persist, ps.table; print(sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'serving')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workers_do_not_import_serving():
    import subprocess
    import sys

    code = ("import sys, workers, workers.config, workers.eval, workers.streams, workers.negatives; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'serving'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_configs_and_the_command_line_load_without_torch_or_ray():
    # `freshet --help`, `config`, `status` and `down`, and every actor that only reads a config,
    # would otherwise pay ~1.5 s of CPU for torch at each start.
    import subprocess
    import sys

    code = ("import sys, ps.config, workers.config, serving.config, serving.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_replicas_and_the_command_line_import_loads_no_torch():
    # A Serve replica imports serving.app and, to build the shards' and trainers' handles, the
    # modules of their classes; `freshet up`, `down` and `ckpt` import the deployment's modules.
    import subprocess
    import sys

    code = ("import sys, serving.app, serving.deploy, serving.cli.service, serving.cli.ckpt, serving.cli.run, "
            "ps.client, ps.shard, ps.cache, workers.trainer, workers.eval; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
