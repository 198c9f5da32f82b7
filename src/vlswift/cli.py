"""The ``vlswift`` command: a thin Typer shell over the Python API.

Each command's options are the fields of its arguments dataclass (``InferArguments``,
``SftArguments``, ``ExportArguments``), so the CLI and ``xxx_main(XxxArguments(...))`` can
never drift apart. Flag names and value styles follow swift (``--model_type``,
``--merge_lora true``, ``--dataset a.jsonl b.jsonl``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from typing import Annotated, Any, Callable

import typer

app = typer.Typer(
    name="vlswift",
    help="Chat with, fine-tune and export Qwen-VL-Chat (swift-style flags).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def debug_enabled() -> bool:
    return os.environ.get("VLSWIFT_DEBUG", "0") not in ("", "0", "false")


def run_main(fn: Callable[[], Any]) -> Any:
    """Run a command body; expected errors become one red line (traceback with VLSWIFT_DEBUG=1)."""
    try:
        return fn()
    except KeyboardInterrupt:
        print_error("interrupted")
        raise typer.Exit(130)
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        if debug_enabled():
            raise
        print_error(str(e) or type(e).__name__)
        raise typer.Exit(1)


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # Escaped: a message quoting a path or a format ("[query, response]") is not Rich markup.
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}", markup=True,
                                                soft_wrap=True)


TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


def parse_bool(value: Any) -> bool:
    """swift's ``true|false`` values (also yes/no, 1/0, on/off, any case).

    Raises typer's own ``BadParameter`` (the one it turns into a usage error: a standalone
    ``click`` is neither a dependency nor the click typer runs on); typer names the flag.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise typer.BadParameter(f"{value!r} is not true or false")


def _list_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is list}


def add_dataclass_command(name: str, cls: type, main: Callable[[Any], Any], help: str) -> None:
    """Register ``vlswift NAME`` whose options are ``cls``'s fields (help from field metadata)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        base = typ
        if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            base = next(a for a in typing.get_args(typ) if a is not type(None))
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "show_default": default not in (None, [])}
        if base is bool:
            # swift style `--flag true|false` rather than a bare flag.
            kwargs["parser"] = parse_bool
            kwargs["metavar"] = "true|false"
        if typing.get_origin(base) is list:
            base = list[str]
        opt = typer.Option(f"--{f.name}", **kwargs)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[base if base is not bool else Any, opt]))

    def command(**kwargs: Any) -> None:
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
        run_main(lambda: main(cls(**args)))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name
    command.__doc__ = help
    app.command(name, help=help, context_settings={"help_option_names": ["-h", "--help"]})(command)


def expand_nargs(argv: list[str], list_options: set[str]) -> list[str]:
    """Turn swift's ``--dataset a b`` into ``--dataset a --dataset b`` for list options."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            current = name if name in list_options and "=" not in arg else None
            out.append(arg)
            continue
        if current is not None and out and not out[-1].startswith("--"):
            out.append(f"--{current}")
        out.append(arg)
    return out


COMMANDS: dict[str, tuple[str, str, str, str]] = {
    # name: (args module, args class, main module, main function)
    "infer": ("vlswift.infer.args", "InferArguments", "vlswift.infer.main", "infer_main"),
    "sft": ("vlswift.train.args", "SftArguments", "vlswift.train.recipe", "sft_main"),
    "export": ("vlswift.export", "ExportArguments", "vlswift.export", "export_main"),
}
HELP = {
    "infer": "Chat with Qwen-VL-Chat (images as Picture N:<img>PATH_OR_URL</img>), or infer a dataset to jsonl.",
    "sft": "Fine-tune (LoRA or full) on json/jsonl conversations; NPROC_PER_NODE=N runs under torchrun.",
    "export": "Merge a LoRA checkpoint into a standalone model in the official Qwen-VL-Chat layout.",
}


def _register(name: str) -> set[str]:
    import importlib

    args_mod, args_cls, main_mod, main_fn = COMMANDS[name]
    cls = getattr(importlib.import_module(args_mod), args_cls)

    def main(args: Any) -> Any:
        return getattr(importlib.import_module(main_mod), main_fn)(args)

    add_dataclass_command(name, cls, main, HELP[name])
    return _list_fields(cls)


@app.command("demo")
def demo(
    query: Annotated[str, typer.Option("--query", help="What to ask about the example image.")] = "What is in this picture?",
    folder: Annotated[str, typer.Option("--folder", help="Where to put the tiny checkpoint and image.")] = "",
) -> None:
    """Offline demo: build a tiny random Qwen-VL checkpoint, draw an image, and chat about it."""
    from .demo import run_demo

    run_main(lambda: run_demo(query=query, folder=folder or None))


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["VLSWIFT_DEBUG"] = "1"
    list_options: set[str] = set()
    wanted = [a for a in argv if a in COMMANDS]
    for name in COMMANDS:
        # Import only the arguments module of the command being run (or all for --help).
        if not wanted or name == wanted[0]:
            try:
                list_options |= _register(name)
            except ImportError:
                continue
    app(args=expand_nargs(argv, list_options), prog_name="vlswift")


if __name__ == "__main__":
    main()
