"""`vlswift infer` end to end: a chat driven through a pseudo-terminal on the golden checkpoint."""

from __future__ import annotations

import json
import os
import sys

import pytest

from vlswift.infer.chat import SEPARATOR

pexpect = pytest.importorskip("pexpect")


def case(cases: list[dict], name: str) -> dict:
    return next(c for c in cases if c["name"] == name)


def spawn(workdir, *argv: str, term: str = "dumb"):
    """The real ``vlswift infer --model_id_or_path WORKDIR ARGV`` on a pseudo-terminal, from ``workdir``
    (``term``: the terminal type; a dumb one gets no progress bar, which needs cursor moves)."""
    env = dict(os.environ, NO_COLOR="1", TERM=term, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("VLSWIFT_DEBUG", None)
    return pexpect.spawn(sys.executable, ["-m", "vlswift.cli", "infer", "--model_id_or_path", str(workdir), *argv],
                         cwd=str(workdir), env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))


def ask(child, lines: list[str]) -> str:
    """Send a query's lines; return the reply printed before the separator."""
    for line in lines:
        child.sendline(line)
    child.expect_exact(lines[-1] + "\r\n")  # the terminal's echo of the last line
    child.expect_exact(SEPARATOR + "\r\n")
    reply = child.before
    assert reply.endswith("\r\n")
    return reply[:-2].replace("\r\n", "\n")


@pytest.mark.slow
def test_chat_session(infer_workdir, golden_cases, golden_model, greedy, read_jsonl, monkeypatch, tmp_path):
    from vlswift.api import inference

    model, template, gc = golden_model
    monkeypatch.chdir(infer_workdir)
    result = tmp_path / "chat.jsonl"
    child = spawn(infer_workdir, "--result_path", str(result), *greedy)
    try:
        child.expect_exact("<<<[M] ")
        startup = child.before
        assert f"Model: qwen-vl-chat from {infer_workdir} (float32 on cpu)" in startup
        assert "Adapter: none" in startup and "Generation: max_new_tokens=12, greedy" in startup
        for line in ("Input `exit` or `quit` to exit the conversation.", "End multi-line input with `#`.",
                     "Input `single-line` to switch to single-line input mode.", "Input `clear` to clear the history.",
                     "Input `reset-system` to reset the system and clear the history."):
            assert line in startup

        one_image = case(golden_cases, "one_image")
        assert ask(child, one_image["query"].split("\n")[:-1] + [one_image["query"].split("\n")[-1] + "#"]) \
            == one_image["chat_response"]

        # A second turn about the same image: the history carries over.
        second = "And what colour is it?"
        expected, _ = inference(model, template, second, [[one_image["query"], one_image["chat_response"]]],
                                generation_config=gc)
        assert ask(child, [second + "#"]) == expected

        child.expect_exact("<<<[M] ")
        child.sendline("clear")
        child.expect_exact("History cleared.")
        child.expect_exact("<<<[M] ")
        child.sendline("single-line#")
        child.expect_exact("<<< ")
        text_en = case(golden_cases, "text_en")  # the golden reply has no history: `clear` forgot it
        assert ask(child, [text_en["query"]]) == text_en["chat_response"]

        child.expect_exact("<<< ")
        child.sendline("reset-system")
        child.expect_exact("<<<[S] ")
        child.sendline("You are a pirate.")
        child.expect_exact("System: 'You are a pirate.' (history cleared).")
        expected, _ = inference(model, template, text_en["query"], system="You are a pirate.", generation_config=gc)
        child.expect_exact("<<< ")
        assert ask(child, [text_en["query"]]) == expected

        child.expect_exact("<<< ")
        child.sendline("multi-line")
        child.expect_exact("<<<[M] ")
        child.sendline("Picture 1:<img>images/missing.png</img>")
        child.sendline("What is it?#")
        child.expect_exact("error: cannot load image images/missing.png: file not found")
        child.expect_exact("<<<[M] ")  # the session goes on
        child.sendline("exit#")
        child.expect_exact(f"Results: {result}")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    rows = read_jsonl(result)
    assert [r["query"] for r in rows] == [one_image["query"], second, text_en["query"], text_en["query"]]
    assert [r["system"] for r in rows] == ["You are a helpful assistant."] * 3 + ["You are a pirate."]
    assert rows[1]["history"] == [[one_image["query"], one_image["chat_response"]]]
    assert rows[1]["images"] == [str(infer_workdir / "images" / "a.png")]


@pytest.mark.slow
def test_history_file_then_quit(infer_workdir, golden_cases, greedy, tmp_path):
    history_case = case(golden_cases, "history")  # its history's replies are not the model's own
    saved = tmp_path / "history.json"
    saved.write_text(json.dumps(history_case["history"], ensure_ascii=False), encoding="utf-8")
    child = spawn(infer_workdir, "--history", str(saved), "--save_result", "false", *greedy, term="xterm")
    try:
        child.expect_exact("<<<[M] ")
        startup = child.before
        assert f"History: 2 turn(s) from {saved}" in startup
        # The weights were loaded under a progress bar (erased at the end) over their bytes.
        size_mb = (infer_workdir / "model.safetensors").stat().st_size / 1e6
        assert f"{size_mb:.1f}/{size_mb:.1f} MB" in startup
        lines = history_case["query"].split("\n")
        assert ask(child, lines[:-1] + [lines[-1] + "#"]) == history_case["chat_response"]
        child.expect_exact("<<<[M] ")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def interrupt_reply(child, query: str) -> None:
    """Send ``query``, wait until its reply streams, press Ctrl-C: the reply stops, the prompt returns."""
    child.sendline(query)
    child.expect_exact(query + "\r\n")
    child.expect(r"\S")  # the reply has started (a long one: it runs for many seconds)
    child.sendintr()
    child.expect_exact("(reply stopped)")
    child.expect_exact(SEPARATOR + "\r\n")
    child.expect_exact("<<<[M] ")


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_ctrl_d_exits(infer_workdir, read_jsonl, tmp_path):
    result = tmp_path / "chat.jsonl"
    # Greedy replies of up to 3000 tokens: the golden model's run for tens of seconds on a CPU.
    child = spawn(infer_workdir, "--result_path", str(result), "--do_sample", "false", "--max_new_tokens", "3000")
    try:
        child.expect_exact("<<<[M] ")
        interrupt_reply(child, "Hello! Who are you?#")
        interrupt_reply(child, "Tell me more.#")  # the session goes on, and so does its history
        child.sendeof()  # Ctrl-D at the prompt
        child.expect_exact(f"Results: {result}")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    first, second = read_jsonl(result)
    assert first["response"] and second["history"] == [["Hello! Who are you?", first["response"]]]
