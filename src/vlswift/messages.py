"""Error text for people: one line, cut between words."""

from __future__ import annotations


def one_line(text: str, limit: int) -> str:
    """``text`` (whitespace runs and line breaks made single spaces) in at most ``limit`` characters.

    A longer text keeps its start (what failed) and its end (a chained error's root cause, e.g.
    requests' "... (Caused by ...: [Errno 111] Connection refused)"), each cut between words,
    joined by " … ".
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head_len = limit // 3
    tail_len = limit - head_len - len(" … ")
    head, tail = text[:head_len], text[-tail_len:]
    if text[head_len] != " " and " " in head:
        head = head.rsplit(" ", 1)[0]  # drop the word the cut falls in
    if text[-tail_len - 1] != " " and " " in tail:
        tail = tail.split(" ", 1)[1]
    return f"{head.rstrip()} … {tail.lstrip()}"
