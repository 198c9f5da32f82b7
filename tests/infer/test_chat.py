"""The chat loop without a model: input rules, commands, history, system, streaming, Ctrl-C, errors."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest

from vlswift.infer.chat import (SEPARATOR, Chat, HistoryFileError, StreamPrinter, load_history, parse_command,
                                prompt_for, read_input, terminal_reader)


def script(lines: list[str]):
    """An input()-like reader over ``lines`` that records the prompts it was given."""
    lines = list(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not lines:
            raise EOFError
        return lines.pop(0)

    read.prompts = prompts
    read.left = lines
    return read


@pytest.mark.parametrize("line,command", [
    ("clear", "clear"), ("clear#", "clear"), ("  EXIT  ", "exit"), ("quit #", "quit"),
    ("single-line#", "single-line"), ("multi-line", "multi-line"), ("reset-system#", "reset-system"),
    ("clear the table", None), ("#", None), ("", None), ("exit now#", None),
])
def test_parse_command(line, command):
    assert parse_command(line) == command


def test_prompts():
    assert prompt_for(True, False) == "<<<[M] "
    assert prompt_for(False, False) == "<<< "
    assert prompt_for(False, True) == "<<<[S] "
    assert prompt_for(True, True) == "<<<[MS] "


def test_read_multi_line_query():
    read = script(["Picture 1:<img>a.png</img>", "What is it?#", "next"])
    user = read_input(read, multi_line=True)
    assert user.text == "Picture 1:<img>a.png</img>\nWhat is it?" and user.command is None
    assert read.prompts == ["<<<[M] ", ""]  # continuation lines get no prompt, as in swift


def test_read_single_line_keeps_hash():
    assert read_input(script(["a#b#"]), multi_line=False).text == "a#b#"


def test_command_in_the_middle_of_a_query_wins():
    user = read_input(script(["half a query", "clear"]), multi_line=True)
    assert user.command == "clear" and user.dropped_lines == 1


def test_end_of_input():
    user = read_input(script(["unfinished", "query"]), multi_line=True)
    assert user.text == "unfinished\nquery" and user.at_end
    with pytest.raises(EOFError):
        read_input(script([]), multi_line=True)


class FakeTemplate:
    default_system = "You are a helpful assistant."
    template_type = "qwen"


@pytest.fixture
def fake_inference(monkeypatch):
    """Replace the model: the reply to a query is ``reply to <query> #<n>``, streamed in 3 parts
    (with trailing whitespace, which the final reply does not have)."""
    calls = []

    def inference_stream(model, template, query, history=None, system=None, generation_config=None,
                         should_stop=None):
        calls.append({"query": query, "history": [list(t) for t in history or []], "system": system})
        if "<img>missing.png</img>" in query:
            from vlswift.media import ImageLoadError

            raise ImageLoadError("missing.png", "file not found (/x/missing.png)")
        reply = getattr(inference_stream, "reply", None) or f"reply to {query} #{len(calls)}"
        for i in (1, 2, 3):
            yield reply[: len(reply) * i // 3] + " \n", None
        yield reply, None

    monkeypatch.setattr("vlswift.api.inference_stream", inference_stream)
    inference_stream.calls = calls
    return inference_stream


def make_chat(**kwargs):
    out, infos, saved = io.StringIO(), [], []
    chat = Chat(None, FakeTemplate(), out=out, info=infos.append, save=saved.append, **kwargs)
    return chat, out, infos, saved


def test_history_carries_over_and_clear_forgets_it(fake_inference):
    chat, out, infos, saved = make_chat()
    history = chat.run(script(["first#", "second#", "clear#", "third#", "exit", "never read#"]))
    calls = fake_inference.calls
    assert [c["query"] for c in calls] == ["first", "second", "third"]
    assert calls[1]["history"] == [["first", "reply to first #1"]]
    assert calls[2]["history"] == []
    assert history == [["third", "reply to third #3"]]
    assert "History cleared." in infos
    assert out.getvalue() == "".join(f"reply to {q} #{i}\n{SEPARATOR}\n" for i, q in
                                     enumerate(["first", "second", "third"], 1))
    assert saved[1] == {"system": FakeTemplate.default_system, "query": "second", "response": "reply to second #2",
                        "history": [["first", "reply to first #1"]], "images": []}


def test_modes_and_prompts(fake_inference):
    chat, out, infos, _ = make_chat()
    read = script(["single-line#", "one line", "multi-line", "two", "lines#", "", "   #", "quit"])
    chat.run(read)
    assert [c["query"] for c in fake_inference.calls] == ["one line", "two\nlines"]
    assert read.prompts == ["<<<[M] ", "<<< ", "<<< ", "<<<[M] ", "", "<<<[M] ", "", "<<<[M] "]
    assert "Input `multi-line` to switch to multi-line input mode." in infos
    assert infos.count("End multi-line input with `#`.") == 2  # at start and after `multi-line`


def test_reset_system(fake_inference):
    chat, _, _, saved = make_chat()
    read = script(["hi#", "reset-system", "You are a cat.#", "  meow?#", "reset-system#", "#", "hello#"])
    chat.run(read)
    calls = fake_inference.calls
    assert [c["system"] for c in calls] == [FakeTemplate.default_system, "You are a cat.", FakeTemplate.default_system]
    assert calls[1]["history"] == [] and calls[1]["query"] == "  meow?"
    assert read.prompts[:4] == ["<<<[M] ", "<<<[M] ", "<<<[MS] ", "<<<[M] "]
    assert saved[1]["system"] == "You are a cat."


def test_no_stream_prints_the_reply_once(fake_inference):
    chat, out, _, _ = make_chat(stream=False)
    chat.run(script(["q#"]))
    assert out.getvalue() == f"reply to q #1\n{SEPARATOR}\n"


def test_stream_printer_holds_back_trailing_space():
    out = io.StringIO()
    printer = StreamPrinter(out)
    for part in ["He", "Hello ", "Hello\n", "Hello wor"]:
        printer.update(part)
    assert out.getvalue() == "Hello wor"
    printer.finish("Hello world")
    assert out.getvalue() == "Hello world\n"


def test_image_error_keeps_the_session(fake_inference, capsys):
    chat, out, _, saved = make_chat()
    chat.run(script(["Picture 1:<img>missing.png</img>\nWhat?#", "next#"]))
    err = capsys.readouterr().err
    assert "error: cannot load image missing.png: file not found" in err and len(err.strip().splitlines()) == 1
    assert [s["query"] for s in saved] == ["next"]
    assert chat.history == [["next", "reply to next #2"]]


def test_too_long_prompt_is_refused(monkeypatch, capsys):
    from vlswift.template import SampleTooLongError

    def inference_stream(*args, **kwargs):
        raise SampleTooLongError(300, 200)
        yield

    monkeypatch.setattr("vlswift.api.inference_stream", inference_stream)
    chat, out, _, saved = make_chat()
    chat.run(script(["long#"]))
    assert "the conversation has 300 tokens, more than --max_length 200" in capsys.readouterr().err
    assert saved == [] and out.getvalue() == ""


def test_ctrl_c_stops_the_reply_and_keeps_the_session(monkeypatch):
    stops = []

    def inference_stream(model, template, query, history=None, system=None, generation_config=None,
                         should_stop=None):
        yield "partial", None
        if query == "long":
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal does
            for _ in range(1000):
                if should_stop():
                    break
                yield "partial", None
            stops.append(should_stop())
        yield "partial", None

    monkeypatch.setattr("vlswift.api.inference_stream", inference_stream)
    chat, out, infos, saved = make_chat()
    chat.run(script(["long#", "again#"]))
    assert stops == [True]
    assert "(reply stopped)" in infos
    assert [s["query"] for s in saved] == ["long", "again"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_piped_stdin_prints_no_prompts(fake_inference):
    stdin = io.StringIO("Picture 1:<img>a.png</img>\nWhat is it?#\nsecond, unterminated\n")
    chat, out, _, saved = make_chat()
    chat.run(terminal_reader(stdin))
    assert [c["query"] for c in fake_inference.calls] == ["Picture 1:<img>a.png</img>\nWhat is it?",
                                                         "second, unterminated"]
    assert "<<<" not in out.getvalue()
    assert saved[0]["images"] == [os.path.abspath("a.png")]


def test_base_model_template_is_single_round(fake_inference):
    chat, _, infos, _ = make_chat(multi_round=False)
    chat.run(script(["one#", "two#"]))
    assert fake_inference.calls[1]["history"] == []
    assert "The current template only supports single-round dialogues." in infos


def test_draw_boxes(fake_inference, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (200, 100), "white").save("pic.png")
    fake_inference.reply = "<ref>the square</ref><box>(100,200),(500,600)</box>"
    chat, out, infos, _ = make_chat(boxes_prefix=tmp_path / "res")
    chat.run(script(["Picture 1:<img>pic.png</img>\nwhere?#", "no image here#"]))
    path = tmp_path / "res-boxes-1.png"
    lines = out.getvalue().splitlines()
    assert lines[1] == f"[boxes] {path}" and lines[2] == SEPARATOR
    img = Image.open(path)
    assert img.size == (200, 100)
    # 0..1000 coordinates: the box spans x 20..100, y 20..60 of the 200x100 image.
    assert img.getpixel((20, 40)) != (255, 255, 255) and img.getpixel((100, 40)) != (255, 255, 255)
    assert img.getpixel((60, 40)) == (255, 255, 255) and img.getpixel((150, 90)) == (255, 255, 255)
    # The second turn still has the first turn's image in its history: drawn on it again.
    assert (tmp_path / "res-boxes-2.png").is_file()


HISTORY = [["Picture 1:<img>images/b.jpg</img>\nWhat colour?", "Mostly blue."], ["And the shapes?", "Circles."]]


def test_history_from_a_json_list(tmp_path):
    path = tmp_path / "history.json"
    path.write_text(json.dumps(HISTORY, indent=2, ensure_ascii=False), encoding="utf-8")
    assert load_history(path) == (HISTORY, None)


def test_history_from_a_result_jsonl_goes_on_after_its_last_line(tmp_path):
    path = tmp_path / "infer_result" / "20260101-000000.jsonl"
    path.parent.mkdir()
    rows = [{"system": "You are a pirate.", "query": q, "response": r, "history": HISTORY[:i], "images": []}
            for i, (q, r) in enumerate(HISTORY)]
    rows.append({"system": "You are a pirate.", "query": "Why?", "response": "Because.", "history": HISTORY,
                 "images": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    assert load_history(path) == (HISTORY + [["Why?", "Because."]], "You are a pirate.")
    # A dataset inference result (no system) of one line.
    path.write_text(json.dumps({"query": "q", "response": "r", "history": [], "label": "l"}) + "\n")
    assert load_history(path) == ([["q", "r"]], None)


@pytest.mark.parametrize("text,why", [
    (None, "no such file"),
    ("", "the file is empty"),
    ('[["a", "b"],\n', "line 2 is not valid JSON (Expecting value)"),
    ('[["a", "b"], ["c"]]', "item 2 of the list is not a [query, response] pair of strings"),
    ('{"query": "q", "response": "r"}\n{"query": "q", "response": 1}\n',
     'line 2 has no "query" and "response" strings'),
    ('{"query": "q", "response": "r"}\nnot json\n', "line 2 (the last) is not valid JSON (Expecting value)"),
    ('{"query": "q", "response": "r", "history": [["x", 2]]}', "item 1 of the history of the file is not a "
                                                                "[query, response] pair of strings"),
    ('{"model_type": "qwen"}', 'the file has no "query" and "response" strings'),
])
def test_bad_history_files_are_one_line(tmp_path, text, why):
    path = tmp_path / "h.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(HistoryFileError) as err:
        load_history(path)
    assert str(err.value) == (f"--history {path}: {why}; expected a JSON list of [query, response] pairs, "
                              "or a result jsonl written by `vlswift infer` (infer_result/*.jsonl)")
