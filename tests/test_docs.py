"""The documentation: the site builds with --strict, every transferkit command it shows parses, the
README stays a first page, and the cheap documented commands run."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _have_mobilenet_weights, run_cli
from transferkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
SETUP_COMMANDS = [  # the README's first lines, verbatim
    "bash scripts/setup.sh && .venv/bin/transferkit demo        "
    "# set up, then the offline default job",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q     # set up, then the tests",
]


def bash_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in the ```bash blocks of a page, with `\\`
    continuations joined (numbered by their first line)."""
    out, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def transferkit_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after the program when a simple command runs transferkit, else None:
    `transferkit ...`, `.venv/bin/transferkit ...`, `python -m transferkit ...` and
    `torchrun [its options] -m transferkit ...`."""
    while tokens and re.fullmatch(r"\w+=\S*", tokens[0]):  # VAR=value before the program
        tokens = tokens[1:]
    if not tokens:
        return None
    program = tokens[0].rsplit("/", 1)[-1]
    if program == "transferkit":
        return tokens[1:]
    if re.fullmatch(r"python[\d.]*|torchrun", program):
        for i in range(1, len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "transferkit":
                return tokens[i + 2:]
    return None


def variants(line: str) -> list[str]:
    """A line with optional parts in brackets (`[--json]`, `[--csv FILE]`) as written out in full
    and with them left out: both must parse."""
    full = re.sub(r"\[(-[^\]]*)\]", r"\1", line)
    bare = re.sub(r"\s*\[-[^\]]*\]", "", line)
    return list(dict.fromkeys([full, bare]))


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every transferkit command in a ```bash block of the README, docs/ and
    benchmarks/RESULTS.md; `# comments` dropped, `&&`/`;`/`|` chains split."""
    found = []
    for page in filter(Path.exists, PAGES):  # a missing page fails the site build, by name
        for number, line in bash_lines(page.read_text()):
            for text in variants(line):
                tokens = shlex.split(text, comments=True)
                command: list[str] = []
                for token in [*tokens, ";"]:
                    if token not in ("&&", "||", ";", "|"):
                        command.append(token)
                        continue
                    argv = transferkit_argv(command)
                    if argv is not None:
                        found.append((f"{page.relative_to(ROOT)}:{number}", argv))
                    command = []
    return found


COMMANDS = documented_commands()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses(where: str, argv: list[str]) -> None:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if argv[-1:] in (["--help"], ["--version"]) and e.code == 0:
            return
        pytest.fail(f"{where}: `transferkit {shlex.join(argv)}` no longer parses: "
                    f"{stderr.getvalue().strip()}")


def test_every_command_of_the_cli_has_a_documented_example() -> None:
    shown = {argv[0] for _, argv in COMMANDS if argv}
    missing = sorted(set(subcommands()) - shown)
    assert not missing, f"no ```bash example in README.md or docs/ runs: {missing}"


def test_the_readme_is_a_first_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move the detail into docs/"
    first_block = lines[lines.index("```bash") + 1:]
    assert lines.index("```bash") < 5 and first_block[:3] == [*SETUP_COMMANDS, "```"], \
        "README.md must open with the two set-up commands"
    own_folder = next(i for i, line in enumerate(lines, 1) if "--data path/" in line)
    assert own_folder <= 40, f"the first command for one's own images is on line {own_folder}"


def test_ci_runs_the_readmes_test_command() -> None:
    command = SETUP_COMMANDS[1].split("#")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_the_readme_command_table_names_every_command_of_the_cli() -> None:
    shown = run_cli("--help")
    assert shown.returncode == 0
    listed = set(re.findall(r"^ {4}(\S+) ", shown.stdout, re.M))
    table = set(re.findall(r"^\| `transferkit ([\w-]+)` \|", README.read_text(), re.M))
    assert listed == set(subcommands())
    assert table == listed, f"README's table: {sorted(table)}; transferkit --help: {sorted(listed)}"


def test_the_python_examples_use_names_the_package_exports() -> None:
    import transferkit

    for page in filter(Path.exists, PAGES):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            if "--8<--" in block:
                continue  # a file pulled in at build time (examples/onnx_classify.py)
            compile(block, str(page), "exec")
            for names in re.findall(r"^from transferkit import (.+)$", block, re.M):
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(transferkit, name), f"{page.name}: transferkit.{name}"


def test_the_documented_models_commands_run_and_list_what_they_search() -> None:
    runs = [argv for _, argv in COMMANDS if argv[:1] == ["models"]]
    assert runs, "no `transferkit models` example in the docs"
    for argv in runs:
        listing = run_cli(*argv)
        assert listing.returncode == 0, listing.stderr
        rows = listing.stdout.splitlines()[1:]
        assert rows, f"`transferkit {shlex.join(argv)}` listed no model"
        if "--search" in argv:
            pattern = argv[argv.index("--search") + 1].strip("*")
            assert all(pattern in row.split()[0] for row in rows), rows
        elif _have_mobilenet_weights():  # the offline weights set-up installs are listed as here
            assert any(row.split()[:2] == ["mobilenet_v2", "IMAGENET1K_V1"] for row in rows), rows


def test_the_docs_site_builds_strict_with_the_generated_references(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (scripts/setup.sh does)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"

    cli = (site / "cli" / "index.html").read_text()
    for name, command in subcommands().items():
        assert f'<h2 id="transferkit-{name}">' in cli, f"the CLI reference lacks a {name} section"
        for action in command._actions:
            if action.help != argparse.SUPPRESS:
                for option in action.option_strings:
                    assert f"<code>{option}</code>" in cli, f"the CLI reference lacks {option}"
    api = (site / "python-api" / "index.html").read_text()
    for documented in ("backbone_lr_mult", "from_run", "predict_files", "measured_on",
                       "evaluate_run"):
        assert documented in api, f"the API reference does not show {documented}"
    assert "94.12 ± 0.07%" in (site / "results" / "index.html").read_text()
