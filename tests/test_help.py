"""The command line explains itself: grouped help with defaults, examples that parse, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from conftest import run_cli
from transferkit.cli import build_parser
from transferkit.config import TrainConfig

GROUPS = ["data", "model and weights", "training", "augmentation and evaluation", "speed and memory",
          "run folder and resume", "distributed"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    return build_parser().commands


def test_every_train_setting_has_a_flag_with_one_line_of_help_in_a_group():
    train = _commands()["train"]
    grouped = {a.dest: g.title for g in train._action_groups for a in g._group_actions}
    for f in dataclasses.fields(TrainConfig):
        assert grouped.get(f.name) in GROUPS, f"--{f.name.replace('_', '-')} is in no group ({grouped.get(f.name)})"
    text = run_cli("train", "--help").stdout
    assert [g for g in GROUPS if f"\n{g}:\n" in text] == GROUPS  # every heading, in this order


def test_every_flag_of_every_command_says_what_it_does_and_its_default_once():
    for name, parser in _commands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"transferkit {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help) > 10, f"{what} has no help"
            assert action.help.count("default") <= 1, f"{what} states its default twice: {action.help}"


def test_train_help_ends_with_three_example_commands_that_parse():
    text = run_cli("train", "--help").stdout
    examples = [line.split("#")[0].strip() for line in text.split("examples:")[1].strip().splitlines()]
    assert len(examples) == 3
    for line in examples:
        words = shlex.split(line)
        assert words[:2] == ["transferkit", "train"]
        _, extra = build_parser().parse_known_args(words[1:])
        assert not extra, line


def test_a_mistyped_flag_prints_one_line_that_says_what_to_do():
    proc = run_cli("train", "--wieghts", "none", "--data", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "transferkit train: error: unrecognized arguments: --wieghts none — did you mean '--weights'? "
        "('transferkit train --help' lists the options)"]
    proc = run_cli("train", "--epochs", "x")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--epochs: invalid int value: 'x'" in proc.stderr and "usage:" not in proc.stderr


def test_help_and_argument_errors_answer_before_torch_is_imported():
    """`--help` and a mistyped argument took 3 s on an idle machine: torch was imported before parsing."""
    import subprocess
    import sys

    probe = ("import sys\nfrom transferkit.cli import main\ntry:\n    print('exit', main(sys.argv[1:]))\n"
             "except SystemExit as e:\n    print('exit', e.code)\nprint('torch loaded:', 'torch' in sys.modules)")
    for argv in (["--help"], ["train", "--help"], ["lr-find", "--help"], ["eval", "--help"],
                 ["train", "--epochs", "x"], ["train", "--wieghts", "none"], ["predict"], ["--version"],
                 ["train", "--epochs", "3"], ["train", "--data", "x", "--epochs", "0"],
                 ["lr-find", "--data", "x", "--lr", "-1"], ["eval", "run", "--batch-size", "0"]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert lines[-2] in ("exit 0", "exit 2") and lines[-1] == "torch loaded: False", (argv, proc.stdout)
