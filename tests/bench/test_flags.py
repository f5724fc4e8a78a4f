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
    ("bench.soak", ["--rate", "-1"], "argument --rate: must be at least 0, got -1"),
    ("bench.soak", ["--kill-at", "0.5,x"], "argument --kill-at: want comma-separated fractions of --events, got '0.5,x'"),
    ("bench.soak", ["--kill-at", "0.5,0.5"], "argument --kill-at: a kill point is given twice"),
    ("bench.soak", ["--kill-at", "0"], "argument --kill-at: each fraction must be in (0, 1.01]"),
    ("bench.soak", ["--kill-at", "nan"], "argument --kill-at: each fraction must be in (0, 1.01]"),
    # Past --events + --tail the feeder stops before the kill point: it would never happen.
    ("bench.soak", ["--events", "1000", "--tail", "0", "--kill-at", "0.5,1.5"],
     "argument --kill-at: each fraction must be in (0, 1] (1 + --tail / --events), got 1.5"),
    ("bench.soak", ["--events", "3", "--kill-at", "0.5,0.6"], "the kill points fall at events [2, 2] of --events 3"),
    ("bench.soak", ["--events", "3", "--kill-at", "0.1"], "the kill points fall at events [0] of --events 3"),
    ("bench.soak", ["--max-backlog", "0"], "argument --max-backlog: must be at least 1, got 0"),
    ("bench.soak", ["--sample-s", "0"], "argument --sample-s: must be at least 0.001, got 0"),
    ("bench.soak", ["--tail", "-1"], "argument --tail: must be at least 0, got -1"),
    ("bench.soak", ["--users", "0"], "argument --users: must be at least 1, got 0"),
    ("bench.soak", ["--items", "0"], "argument --items: must be at least 1, got 0"),
    ("bench.soak", ["--warmup", "-0.1"], "argument --warmup: must be in [0, 1], got -0.1"),
    ("bench.soak", ["--calibrate-s", "0"], "argument --calibrate-s: must be at least 0.001, got 0"),
    ("bench.soak", ["--restart-timeout", "-5"], "argument --restart-timeout: must be at least 0.001, got -5"),
    ("bench.tune_defaults", ["--data", "x", "--chunk-size", "0"], "argument --chunk-size: must be at least 1, got 0"),
    ("bench.tune_defaults", ["--data", "x", "--synthetic-events", "0"], "argument --synthetic-events: must be at least 1, got 0"),
    ("bench.tune_defaults", ["--data", "x", "--max-combos", "0"], "argument --max-combos: must be at least 1, got 0"),
    ("bench.tune_defaults", ["--data", "x", "--max-minutes", "-1"], "argument --max-minutes: must be at least 0, got -1"),
    ("bench.tune_defaults", ["--data", "x", "--seeds", "1"], "argument --seeds: must be at least 2, got 1"),
    ("bench.tune_defaults", ["--data", "x", "--cut", "soon"], "argument --cut: want 'median' or a unix time in seconds"),
    # --grid is checked against the config before the data is read or Ray starts.
    ("bench.tune_defaults", ["--data", "/no/such.csv", "--grid", '{"dim": [0]}'], "argument --grid: dim=0 is refused by the config"),
    ("bench.tune_defaults", ["--data", "/no/such.csv", "--grid", '{"dim": [2.5]}'], "argument --grid: dim: 2.5 is not an integer"),
    ("bench.tune_defaults", ["--data", "/no/such.csv", "--grid", '{"passes": "2"}'], "argument --grid: passes: want a non-empty list"),
    ("bench.tune_defaults", ["--data", "/no/such.csv", "--grid", '{"seed": [1]}'], "argument --grid: unknown or reserved knob(s) ['seed']"),
    ("bench.call_cost", ["--sizes", "nan"], "argument --sizes: each size must be a number within 0-8 MB"),
    ("bench.call_cost", ["--sizes", "0.1,inf"], "argument --sizes: each size must be a number within 0-8 MB"),
    ("bench.call_cost", ["--sizes", "0.1,1,0.1"], "argument --sizes: a size is given twice"),
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


def test_a_kill_point_up_to_the_tail_is_taken():
    from bench.soak import _parse

    args = _parse(["--events", "1000", "--tail", "500", "--kill-at", "0.25,1.5"])
    assert args.kill_at == [0.25, 1.5] and args.tail == 500
    assert _parse(["--warmup", "0"]).warmup == 0.0  # fit from the first sample: allowed
