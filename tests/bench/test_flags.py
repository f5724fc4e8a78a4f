"""Every benchmark refuses a bad flag naming it (argparse's exit 2), before it starts anything:
``bench.at_least`` (a helper found zero or negative sizes ending in tracebacks, or a
ZeroDivisionError)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module, argv, message", [
    ("bench.load", ["--clients", "0"], "argument --clients: must be at least 1, got 0"),
    ("bench.load", ["--seconds", "-1"], "argument --seconds: must be at least 0.001, got -1"),
    ("bench.load", ["--clients", "x"], "argument --clients: want an integer, got 'x'"),
    ("bench.id_churn", ["--ids", "-1"], "python -m bench.id_churn: error: argument --ids: must be at least 1, got -1"),
    ("bench.peers", ["--events", "0"], "argument --events: must be at least 1, got 0"),
    ("bench.index_compare", ["--rows", "0"], "argument --rows: must be at least 1, got 0"),
    ("bench.soak", ["--reanalyse", "/no/such/soak.json"], "--reanalyse: /no/such/soak.json is not a file"),
])
def test_a_bad_flag_is_refused_naming_it(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_at_least_takes_what_it_allows():
    from bench import at_least

    assert at_least(1)("3") == 3 and at_least(0, float)("0.5") == 0.5
    with pytest.raises(Exception, match="must be at least 0"):
        at_least(0, float)("nan")
