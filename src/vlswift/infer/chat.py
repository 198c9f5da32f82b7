"""The interactive chat of ``vlswift infer``: swift's prompts and commands, images in any turn.

Input rules (the same for a terminal and for piped stdin):
- multi-line mode (the default, prompt ``<<<[M] ``): a query ends with a line ending in ``#``;
  single-line mode (``<<< ``): every line is a query. ``[S]``/``[MS]``: reading a system prompt.
- A command is a whole line, with or without a trailing ``#``, in either mode: ``exit``,
  ``quit``, ``clear``, ``reset-system``, ``single-line``, ``multi-line``. (In swift's multi-line
  mode a bare ``clear`` silently became part of the next query.)
- End of input (Ctrl-D, or the end of piped stdin) answers an unfinished query, then exits;
  Ctrl-C at the prompt exits; Ctrl-C during a reply stops that reply and keeps the session.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

COMMANDS = ("exit", "quit", "clear", "reset-system", "single-line", "multi-line")
SEPARATOR = "-" * 50
ReadLine = Callable[[str], str]  # input()-like: prints the prompt, returns a line, EOFError at the end


def parse_command(line: str) -> str | None:
    """The command a whole input line is (``clear``, ``clear#``, `` EXIT ``), else None."""
    text = line.strip()
    if text.endswith("#"):
        text = text[:-1].rstrip()
    text = text.lower()
    return text if text in COMMANDS else None


def prompt_for(multi_line: bool, reading_system: bool) -> str:
    """swift's prompts: ``<<< ``, ``<<<[M] ``, ``<<<[S] ``, ``<<<[MS] ``."""
    tag = ("M" if multi_line else "") + ("S" if reading_system else "")
    return f"<<<[{tag}] " if tag else "<<< "


@dataclass
class UserInput:
    text: str = ""
    command: str | None = None
    dropped_lines: int = 0  # unfinished multi-line input discarded by a command
    at_end: bool = False  # the input ended right after this query


def read_input(read_line: ReadLine, multi_line: bool, reading_system: bool = False) -> UserInput:
    """Read one query or command; raises EOFError when the input ends with nothing pending."""
    lines: list[str] = []
    while True:
        try:
            # Continuation lines get no prompt, as in swift.
            line = read_line(prompt_for(multi_line, reading_system) if not lines else "")
        except EOFError:
            if lines:
                return UserInput("\n".join(lines), at_end=True)
            raise
        command = parse_command(line)
        if command is not None:
            return UserInput(command=command, dropped_lines=len(lines))
        if not multi_line:
            return UserInput(line)
        if line.rstrip().endswith("#"):
            lines.append(line.rstrip()[:-1])
            return UserInput("\n".join(lines))
        lines.append(line)


def terminal_reader(stdin: TextIO | None = None) -> ReadLine:
    """``input`` (with line editing) on a terminal; for piped stdin a reader that prints no prompts."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        try:
            import readline  # noqa: F401 - gives input() line editing and history
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


@contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """While inside, Ctrl-C sets the returned event (stop this reply); a second Ctrl-C interrupts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class StreamPrinter:
    """Prints a growing reply by its new parts; trailing whitespace waits until text follows it
    (the final reply is stripped)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.shown = ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def update(self, text: str) -> None:
        visible = text.rstrip()
        if len(visible) > len(self.shown) and visible.startswith(self.shown):
            self._write(visible[len(self.shown):])
            self.shown = visible

    def finish(self, response: str) -> None:
        if response.startswith(self.shown):
            self._write(response[len(self.shown):] + "\n")
        else:  # the final text is not what was streamed (should not happen): show it whole
            self._write("\n" + response + "\n")

    def abort(self) -> None:
        if self.shown:
            self._write("\n")


def conversation_images(history: list[list[str]], query: str) -> list[str]:
    """Image sources (``<img>...</img>``) of a conversation in prompt order; paths made absolute."""
    from ..media import resolve_source
    from ..tokenizer import to_list_format

    texts = [text for turn in history for text in turn] + [query]
    return [resolve_source(item["image"]) for text in texts for item in to_list_format(text) if "image" in item]


class HistoryFileError(ValueError):
    """A ``--history`` file that holds no conversation, with what was expected in one line."""


HISTORY_EXPECTED = ("expected a JSON list of [query, response] pairs, or a result jsonl written by "
                    "`vlswift infer` (infer_result/*.jsonl)")


def load_history(path: str | Path) -> tuple[list[list[str]], str | None]:
    """The conversation a ``--history`` file holds, and its system prompt when it names one.

    The file is a JSON list of ``[query, response]`` pairs, or a result jsonl of ``vlswift infer``:
    the chat then goes on after its last line (that line's ``history`` + ``[query, response]``,
    with its ``system``).
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HistoryFileError(f"--history {path}: no such file; {HISTORY_EXPECTED}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HistoryFileError(f"--history {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None

    def bad(why: str) -> HistoryFileError:
        return HistoryFileError(f"--history {path}: {why}; {HISTORY_EXPECTED}")

    def pairs(value: Any, where: str) -> list[list[str]]:
        if not isinstance(value, list):
            raise bad(f"{where} is not a list")
        for i, turn in enumerate(value, 1):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise bad(f"item {i} of {where} is not a [query, response] pair of strings")
        return [list(turn) for turn in value]

    try:
        whole = json.loads(text)  # the list form, or a jsonl of one line
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise bad(f"line {e.lineno} is not valid JSON ({e.msg})") from None
        whole = None
    if isinstance(whole, list):
        return pairs(whole, "the list"), None
    if whole is not None:
        record, where = whole, "the file"
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise bad("the file is empty")
        number, line = lines[-1]
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise bad(f"{where} (the last) is not valid JSON ({e.msg})") from None
    if not (isinstance(record, dict) and isinstance(record.get("query"), str)
            and isinstance(record.get("response"), str)):
        raise bad(f"{where} has no \"query\" and \"response\" strings")
    history = pairs(record.get("history") or [], f"the history of {where}")
    system = record.get("system")
    return history + [[record["query"], record["response"]]], system if isinstance(system, str) else None


def info(message: str) -> None:
    """One plain line on stderr (help, status): stdout keeps only the replies."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)


HELP_LINES = (
    "Input `exit` or `quit` to exit the conversation.",
    "Input `reset-system` to reset the system and clear the history.",
    "Input `clear` to clear the history.",
    "Add images anywhere in a query as `Picture 1:<img>PATH_OR_URL</img>`.",
)
MULTI_LINE_HELP = ("End multi-line input with `#`.", "Input `single-line` to switch to single-line input mode.")
SINGLE_LINE_HELP = ("Input `multi-line` to switch to multi-line input mode.",)


class Chat:
    """A chat session: history, system prompt and input mode, driven by :meth:`run`.

    ``save(record)`` receives every turn (``system``, ``query``, ``response``, ``history`` before
    the turn, ``images``); with ``boxes_prefix``, grounding boxes in a reply are drawn on the
    conversation's latest image, saved as ``{boxes_prefix}-boxes-{turn}.png``.
    """

    def __init__(self, model, template, generation_config=None, *, system: str | None = None,
                 history: list[list[str]] | None = None, stream: bool = True, multi_line: bool = True,
                 multi_round: bool = True, save: Callable[[dict[str, Any]], None] | None = None,
                 boxes_prefix: str | Path | None = None, out: TextIO | None = None,
                 info: Callable[[str], None] = info):
        self.model = model
        self.template = template
        self.generation_config = generation_config
        self.system = system  # None: the template's default system
        self.history = [list(turn) for turn in history or []]
        self.stream = stream
        self.multi_line = multi_line
        self.multi_round = multi_round  # False: every query starts a new conversation (base qwen-vl)
        self.save = save
        self.boxes_prefix = boxes_prefix
        self.out = out or sys.stdout
        self.info = info
        self.turns = 0

    @property
    def effective_system(self) -> str:
        return self.template.default_system if self.system is None else self.system

    def run(self, read_line: ReadLine | None = None) -> list[list[str]]:
        """Chat until ``exit``/``quit``, end of input or Ctrl-C at the prompt; returns the history."""
        read_line = read_line or terminal_reader()
        for line in HELP_LINES[:1] + (MULTI_LINE_HELP if self.multi_line else SINGLE_LINE_HELP) + HELP_LINES[1:]:
            self.info(line)
        if not self.multi_round:
            self.info("The current template only supports single-round dialogues.")
        reading_system = False
        while True:
            try:
                user = read_input(read_line, self.multi_line, reading_system)
            except (EOFError, KeyboardInterrupt):
                if self.out.isatty():  # end the prompt's line
                    self.out.write("\n")
                break
            if user.dropped_lines:
                self.info(f"(dropped the unfinished query of {user.dropped_lines} line(s))")
            if user.command in ("exit", "quit"):
                break
            if user.command is not None:
                reading_system = self.command(user.command) or reading_system
            elif reading_system:
                self.set_system(user.text)
                reading_system = False
            elif user.text.strip():
                self.ask(user.text)
            if user.at_end:
                break
        return self.history

    def command(self, name: str) -> bool:
        """Run a command other than exit; True when the next input is a system prompt."""
        if name == "clear":
            self.history = []
            self.info("History cleared.")
        elif name == "reset-system":
            self.info("Input the new system prompt (empty: the default system).")
            return True
        elif name == "single-line":
            self.multi_line = False
            for line in SINGLE_LINE_HELP:
                self.info(line)
        elif name == "multi-line":
            self.multi_line = True
            for line in MULTI_LINE_HELP:
                self.info(line)
        return False

    def set_system(self, text: str) -> None:
        self.system = text.strip() or None
        self.history = []
        self.info(f"System: {self.effective_system!r} (history cleared).")

    def ask(self, query: str) -> str | None:
        """Answer ``query`` (printed as it streams); None when it could not be answered."""
        from ..api import inference_stream
        from ..cli import print_error
        from ..template import SampleTooLongError

        if not self.multi_round:
            self.history = []
        printer = StreamPrinter(self.out)
        response = ""
        try:
            with ctrl_c_stops() as stop:
                for response, _ in inference_stream(self.model, self.template, query, self.history,
                                                    self.effective_system, self.generation_config,
                                                    should_stop=stop.is_set):
                    if self.stream:
                        printer.update(response)
        except SampleTooLongError as e:
            printer.abort()
            print_error(f"the conversation has {e.length} tokens, more than --max_length {e.max_length}: "
                        "input `clear` to start over, or raise --max_length")
            return None
        except ValueError as e:  # an image that cannot be loaded, an unclosed <img>, ...
            printer.abort()
            print_error(str(e))
            return None
        printer.finish(response)
        if stop.is_set():
            self.info("(reply stopped)")
        self.turns += 1
        record = {"system": self.effective_system, "query": query, "response": response,
                  "history": self.history, "images": conversation_images(self.history, query)}
        if self.boxes_prefix is not None:
            self.draw_boxes(record)
        self.out.write(SEPARATOR + "\n")
        self.out.flush()
        self.history = self.history + [[query, response]]
        if self.save is not None:
            self.save(record)
        return response

    def draw_boxes(self, record: dict[str, Any]) -> None:
        """Draw the reply's grounding boxes on the conversation's latest image and print the file."""
        from ..cli import print_error
        from ..media import ImageLoadError
        from ..tokenizer import extract_boxes
        from .grounding import save_boxes_image

        boxes = extract_boxes(record["response"])
        if not boxes:
            return
        if not record["images"]:
            self.info("(the reply has boxes, but the conversation has no image to draw them on)")
            return
        try:
            path = save_boxes_image(record["images"][-1], boxes, f"{self.boxes_prefix}-boxes-{self.turns}.png")
        except (ImageLoadError, OSError) as e:
            print_error(f"cannot draw the boxes: {e}")
            return
        self.out.write(f"[boxes] {path}\n")
