"""The `saelib` console script: subcommands dispatch to the modules' own mains, argv passed through."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from saelib import cli
from saelib.book import build as book

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(book.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(*args: str, exe: tuple[str, ...] = (sys.executable, "-m", "saelib")) -> subprocess.CompletedProcess:
    return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=book.ROOT, env=ENV)


@pytest.mark.parametrize("command, option", [("book", "--profile"), ("train", "--help-config"),
                                             ("student-copy", "--out"), ("browse", "--tokens")])
def test_subcommand_help_is_the_modules_own(command, option):
    result = run(command, "--help")
    assert result.returncode == 0 and option in result.stdout, result.stderr


def test_overview_and_unknown_command():
    overview = run("--help")
    assert overview.returncode == 0 and all(c in overview.stdout for c in cli.COMMANDS)
    unknown = run("bok")
    assert unknown.returncode == 2 and "unknown command 'bok'" in unknown.stderr
    assert run().returncode == 2


def test_arguments_pass_through(tmp_path, capsys):
    assert cli.main(["student-copy", str(book.ROOT / "notebooks"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == sorted(p.name for p in book.chapters())
    assert cli.main(["book", "--list"]) == 0
    assert "00_synthetic" in capsys.readouterr().out


def test_python_dash_m_forms():
    assert "student-copy" in run("--help", exe=(sys.executable, "-m", "saelib")).stdout
    assert run("student-copy", "--help", exe=(sys.executable, "-m", "saelib")).returncode == 0
    assert "--only" in run("--help", exe=(sys.executable, "-m", "saelib.book")).stdout
    assert "--out" in run("--help", exe=(sys.executable, "-m", "saelib.book.exercises")).stdout  # book/teaching.md's


def test_console_script_is_declared():
    scripts = tomllib.loads((book.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"saelib": "saelib.cli:main"}


def test_installed_console_script():
    """The script pip writes for `pip install -e .` (scripts/setup.sh does that)."""
    script = Path(sys.executable).with_name("saelib")
    if not script.exists():
        pytest.skip(f"no {script}: run `pip install -e .` (scripts/setup.sh does) to install the command")
    result = run("book", "--help", exe=(str(script),))
    assert result.returncode == 0 and "--profile" in result.stdout, result.stderr
