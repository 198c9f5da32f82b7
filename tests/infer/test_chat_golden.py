"""The chat loop on the golden checkpoint: printed replies equal the official model.chat replies."""

from __future__ import annotations

import io
import re

import pytest

from vlswift.infer.chat import SEPARATOR, Chat, terminal_reader


def case(cases: list[dict], name: str) -> dict:
    return next(c for c in cases if c["name"] == name)


@pytest.mark.parametrize("name,stream", [("one_image", True), ("one_image", False), ("history", True)])
def test_printed_reply_equals_golden(golden_model, golden_cases, infer_workdir, monkeypatch, name, stream):
    """The history case starts from the golden history (its replies are fixed text no live chat gives)."""
    model, template, gc = golden_model
    monkeypatch.chdir(infer_workdir)
    c = case(golden_cases, name)
    out, saved = io.StringIO(), []
    chat = Chat(model, template, gc, history=c["history"], stream=stream, out=out, info=lambda _: None,
                save=saved.append)
    history = chat.run(terminal_reader(io.StringIO(c["query"] + "#\n")))
    assert out.getvalue() == f"{c['chat_response']}\n{SEPARATOR}\n"
    assert history == c["history"] + [[c["query"], c["chat_response"]]]
    assert saved[0]["history"] == c["history"] and saved[0]["response"] == c["chat_response"]
    texts = [t for turn in c["history"] for t in turn] + [c["query"]]
    assert saved[0]["images"] == [str(infer_workdir / m) for t in texts for m in re.findall("<img>(.*?)</img>", t)]
