"""`vlswift infer` end to end with piped stdin (a script, not a terminal) on the golden checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlswift.infer.chat import SEPARATOR


def case(cases: list[dict], name: str) -> dict:
    return next(c for c in cases if c["name"] == name)


def vlswift_infer(workdir, stdin: str, *argv: str) -> subprocess.CompletedProcess:
    """The real ``vlswift infer`` in a fresh interpreter, from ``workdir`` (where images/ is)."""
    env = dict(os.environ, NO_COLOR="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("VLSWIFT_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "vlswift.cli", "infer", "--model_id_or_path", str(workdir), *argv],
                            input=stdin, capture_output=True, text=True, cwd=str(workdir), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_piped_query_prints_only_the_reply(infer_workdir, golden_cases, greedy, read_jsonl, tmp_path):
    one_image = case(golden_cases, "one_image")
    assert one_image["query"] == "Picture 1:<img>images/a.png</img>\nWhat is in this picture?"
    result_path = tmp_path / "piped.jsonl"
    result = vlswift_infer(infer_workdir, one_image["query"] + "#\n", "--result_path", str(result_path), *greedy)
    # stdout is the reply and the separator, nothing else (no prompts, no help: those go to stderr).
    assert result.stdout == f"{one_image['chat_response']}\n{SEPARATOR}\n"
    assert "Generation: max_new_tokens=12, greedy" in result.stderr and "<<<" not in result.stderr
    (row,) = read_jsonl(result_path)
    assert (row["query"], row["response"], row["history"]) == (one_image["query"], one_image["chat_response"], [])


@pytest.mark.slow
def test_history_file_continues_a_conversation(infer_workdir, golden_cases, golden_model, greedy, read_jsonl,
                                               tmp_path, monkeypatch):
    from vlswift.api import inference

    history_case = case(golden_cases, "history")
    saved = tmp_path / "history.json"
    saved.write_text(json.dumps(history_case["history"], ensure_ascii=False), encoding="utf-8")
    result_path = tmp_path / "infer_result" / "first.jsonl"
    result = vlswift_infer(infer_workdir, history_case["query"] + "#\n", "--history", str(saved),
                           "--result_path", str(result_path), *greedy)
    assert f"History: 2 turn(s) from {saved}" in result.stderr
    assert result.stdout == f"{history_case['chat_response']}\n{SEPARATOR}\n"

    # A result jsonl continues the chat after its last turn ...
    model, template, gc = golden_model
    monkeypatch.chdir(infer_workdir)
    history = history_case["history"] + [[history_case["query"], history_case["chat_response"]]]
    pirate = "You are a pirate."
    second_path = tmp_path / "infer_result" / "second.jsonl"
    second = vlswift_infer(infer_workdir, "And then?#\n", "--history", str(result_path), "--system", pirate,
                           "--result_path", str(second_path), *greedy)
    assert f"History: 3 turn(s) from {result_path}" in second.stderr and f"System: {pirate!r}" in second.stderr
    expected, history = inference(model, template, "And then?", history, pirate, gc)
    assert second.stdout == f"{expected}\n{SEPARATOR}\n"
    # ... with its system prompt when --system is not given.
    third = vlswift_infer(infer_workdir, "Why?#\n", "--history", str(second_path), "--save_result", "false", *greedy)
    assert "History: 4 turn(s)" in third.stderr and f"System: {pirate!r}" in third.stderr
    expected, _ = inference(model, template, "Why?", history, pirate, gc)
    assert third.stdout == f"{expected}\n{SEPARATOR}\n"
