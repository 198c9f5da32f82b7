"""The Typer shell: swift-style true|false values and one-line errors, through the real command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlswift.cli import parse_bool, print_error


def run_vlswift(*argv: str) -> subprocess.CompletedProcess:
    """``vlswift ARGV`` in a fresh interpreter, 80 columns wide as in a default terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH", "VLSWIFT_DEBUG")}
    return subprocess.run([sys.executable, "-m", "vlswift.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("argv,flag,value", [
    (["infer", "--stream", "maybe"], "--stream", "maybe"),
    (["infer", "--draw_boxes", "2"], "--draw_boxes", "2"),
    (["sft", "--gradient_checkpointing", "nope"], "--gradient_checkpointing", "nope"),
    (["export", "--merge_lora", "yes please"], "--merge_lora", "yes please"),
])
def test_bad_true_false_value_is_a_usage_error(argv, flag, value):
    result = run_vlswift(*argv)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out and "BadParameter" not in out
    assert f"Usage: vlswift {argv[0]} [OPTIONS]" in out
    # The whole reason on one line, naming the flag and the value.
    assert any(f"Invalid value for '{flag}': '{value}' is not true or false" in line for line in out.splitlines()), out


@pytest.mark.parametrize("word,value", [
    ("true", True), ("True", True), ("YES", True), ("1", True), ("on", True),
    ("false", False), ("No", False), ("0", False), ("OFF", False), (True, True), (False, False),
])
def test_true_false_words(word, value):
    assert parse_bool(word) is value


def test_cli_does_not_need_the_standalone_click():
    # typer runs on its own copy of click; the standalone package is no dependency of ours.
    code = "import sys, vlswift.cli; sys.exit('click' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_error_messages_are_not_rich_markup(capsys):
    print_error("--history h.json: expected a JSON list of [query, response] pairs ([bold]x[/bold])")
    assert capsys.readouterr().err.strip() == \
        "error: --history h.json: expected a JSON list of [query, response] pairs ([bold]x[/bold])"
