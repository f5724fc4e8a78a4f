"""``freshet eval`` as the command line parses and runs it."""

from __future__ import annotations

import argparse
import json

from serving.cli.eval import add_parser, cmd_eval


def test_cli_runs_on_synthetic_and_rejects_bad_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--data", "synthetic", "--events", "1200", "--strategies", "popularity,frozen:fraction=0.5;epochs=2",
                              "--report", str(tmp_path), "--no-progress"])
    assert cmd_eval(args) == 0
    out = capsys.readouterr().out
    assert "| popularity |" in out and "| frozen:fraction=0.5,epochs=2 |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["drift_offset"] == 600 and "recovery" in report["strategies"]["popularity"]
    bad = parser.parse_args(["eval", "--data", "synthetic", "--strategies", "nope", "--report", str(tmp_path)])
    assert cmd_eval(bad) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    missing = parser.parse_args(["eval", "--data", str(tmp_path / "absent.csv"), "--report", str(tmp_path)])
    assert cmd_eval(missing) == 2
