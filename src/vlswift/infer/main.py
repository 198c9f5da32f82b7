"""``vlswift infer``: load a model (base, LoRA, full or merged checkpoint), then chat or infer a dataset."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .args import InferArguments
from .chat import info

GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                      "num_beams")


@contextmanager
def long_step(description: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while a slow step of unknown length (merging) runs."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        progress.add_task(description, total=None)
        yield


@contextmanager
def loading_bar(description: str, console=None) -> Iterator[None]:
    """A progress bar over the bytes of weights loaded, on stderr while a model loads (terminals only).

    Until the first tensor arrives (hub download, tokenizer) the bar pulses; it is erased at the end.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models.loading import load_progress

    console = console or Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=None)
        with load_progress(lambda done, total: progress.update(task, completed=done, total=total)):
            yield


class ResultWriter:
    """Appends one JSON line per record to ``path`` and flushes it at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1


def default_result_path(folder: str | Path) -> Path:
    """``<folder>/infer_result/<YYYYmmdd-HHMMSS>.jsonl`` (folder: the checkpoint or the model folder)."""
    return Path(folder) / "infer_result" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def generation_config_for(model, args: InferArguments):
    """The checkpoint's generation config with the options given on the command line applied."""
    gc = copy.deepcopy(model.generation_config)
    for name in GENERATION_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(gc, name, value)
    return gc


@dataclass
class Loaded:
    model: Any
    template: Any
    generation_config: Any
    model_type: str
    model_dir: Path  # the base weights' folder
    ckpt: Any  # checkpoint.CkptInfo or None
    result_folder: Path  # where infer_result/ goes: the checkpoint, else the model folder


def resolve_checkpoint(args: InferArguments):
    """``CkptInfo`` of ``--ckpt_dir`` (merged first with ``--merge_lora true``), or None."""
    from ..checkpoint import CheckpointDirError, inspect_ckpt_dir

    if not args.ckpt_dir:
        return None
    ckpt = inspect_ckpt_dir(args.ckpt_dir, args.model_type)
    if not args.merge_lora:
        return ckpt
    if ckpt.kind != "lora":
        raise CheckpointDirError(f"--merge_lora true: {ckpt.path} is a full checkpoint, not a LoRA one; "
                                 "drop --merge_lora")
    from ..export import default_output_dir, merge_lora_checkpoint

    merged = default_output_dir(ckpt.path)
    if (merged / "config.json").is_file():
        # A merged folder only appears once complete (written aside, then renamed), and a
        # checkpoint never changes after it is saved: reuse it rather than replace the user's files,
        # but only if it merged this checkpoint into this base.
        check_existing_merge(merged, ckpt, args.model_id_or_path)
        info(f"Using the existing merge {merged}")
    else:
        with long_step(f"Merging the LoRA checkpoint {ckpt.path} into its base model"):
            merged = merge_lora_checkpoint(ckpt.path, base_dir=args.model_id_or_path)
        info(f"Merged into {merged} (next time, `--ckpt_dir {merged}` skips the merge)")
    return inspect_ckpt_dir(merged, ckpt.model_type)


def check_existing_merge(merged: Path, ckpt, base_dir: str | None) -> None:
    """Refuse to reuse ``merged`` unless its ``sft_args.json`` says it merged ``ckpt`` into the base
    that would be merged now (``base_dir``, else the one the checkpoint names)."""
    from ..checkpoint import CheckpointDirError, read_sft_args
    from ..export import find_base_dir, read_adapter_config

    base = find_base_dir(ckpt.path, ckpt.sft_args, read_adapter_config(ckpt.path), ckpt.model_type, base_dir)
    source = read_sft_args(merged).get("merged_from") or {}
    wanted = {"ckpt_dir": ckpt.path.resolve(), "model_id_or_path": base}
    if all(source.get(key) and Path(source[key]).resolve() == path for key, path in wanted.items()):
        return
    what = (f"holds {source.get('ckpt_dir')} merged into {source.get('model_id_or_path')}"
            if source else "does not say what it was merged from (no merged_from in its sft_args.json)")
    raise CheckpointDirError(
        f"--merge_lora true: {merged} {what}, not {wanted['ckpt_dir']} merged into {base}: remove it to merge "
        f"again, or run `vlswift export --ckpt_dir {wanted['ckpt_dir']} --model_id_or_path {base} --output_dir DIR` "
        "and infer with --ckpt_dir DIR")


def load_model_template(args: InferArguments, ckpt=None) -> Loaded:
    """Load the model and tokenizer and build the template that ``args`` and ``ckpt`` describe."""
    from ..api import get_default_template_type, get_model_tokenizer, get_template
    from ..checkpoint import load_ckpt_model

    model_type = ckpt.model_type if ckpt is not None else args.model_type or "qwen-vl-chat"
    what = ckpt.path if ckpt is not None else args.model_id_or_path or model_type
    with loading_bar(f"Loading {what}"):
        if ckpt is not None:
            model, tokenizer, ckpt = load_ckpt_model(ckpt.path, args.dtype, model_id_or_path=args.model_id_or_path,
                                                     model_type=model_type)
        else:
            model, tokenizer = get_model_tokenizer(model_type, args.dtype, model_id_or_path=args.model_id_or_path)
    system = args.system
    if system is None and ckpt is not None:
        system = ckpt.sft_args.get("system")  # what the checkpoint was trained with
    template = get_template(get_default_template_type(model_type), tokenizer, default_system=system,
                            max_length=args.max_length)
    model_dir = Path(model.model_dir).resolve()
    return Loaded(model, template, generation_config_for(model, args), model_type, model_dir, ckpt,
                  ckpt.path if ckpt is not None else model_dir)


def describe(loaded: Loaded) -> list[str]:
    """Startup lines: what was loaded, where, and how it will generate."""
    from ..models.loading import DTYPE_NAMES
    from .engine import SamplingConfig, model_device

    model = loaded.model
    dtype = next(model.parameters()).dtype
    lines = [f"Model: {loaded.model_type} from {loaded.model_dir} "
             f"({DTYPE_NAMES.get(dtype, str(dtype))} on {model_device(model)})"]
    ckpt = loaded.ckpt
    if ckpt is None:
        lines.append("Adapter: none")
    elif ckpt.kind == "lora":
        lines.append(f"Adapter: LoRA {ckpt.path}")
    else:
        lines.append(f"Adapter: none (full checkpoint {ckpt.path})")
    cfg = SamplingConfig.from_generation_config(loaded.generation_config)
    how = (f"sampling (temperature={cfg.temperature}, top_k={cfg.top_k}, top_p={cfg.top_p})" if cfg.do_sample
           else "greedy")
    if cfg.num_beams > 1:
        how += f", {cfg.num_beams} beams"
    if cfg.repetition_penalty != 1.0:
        how += f", repetition_penalty={cfg.repetition_penalty}"
    lines.append(f"Generation: max_new_tokens={cfg.max_new_tokens}, {how}")
    lines.append(f"System: {loaded.template.default_system!r}")
    return lines


def infer_main(args: InferArguments) -> dict[str, Any]:
    """Run ``vlswift infer``: the chat (``eval_human``) or dataset inference.

    Returns ``{"result": [records], "result_path": path or None}`` (the chat's records are its turns).
    """
    from ..api import check_model_type, seed_everything

    if args.model_type is not None:
        check_model_type(args.model_type)
    history: list[list[str]] = []
    if args.history:
        # Read before the (slow) model load, so a bad file fails at once.
        from .chat import load_history

        history, saved_system = load_history(args.history)
        if args.system is None and saved_system is not None:
            args = dataclasses.replace(args, system=saved_system)  # the saved chat goes on as it was
    ckpt = resolve_checkpoint(args)
    samples = report = None
    if not args.eval_human:
        # Read the rows before the (slow) model load, so a bad file fails at once.
        from .dataset_infer import load_infer_samples, warn

        samples, report = load_infer_samples(
            args.val_dataset, args.load_dataset_config, ckpt.sft_args if ckpt is not None else {},
            ckpt.path if ckpt is not None else None, args.show_dataset_sample, args.dataset_seed,
            args.check_dataset_strategy)
        for message in report.messages:  # rows skipped with --check_dataset_strategy warning
            warn(message)
    loaded = load_model_template(args, ckpt)
    for line in describe(loaded):
        info(line)
    seed_everything(args.seed)
    result_path = Path(args.result_path or default_result_path(loaded.result_folder)).resolve()
    writer = None
    if args.save_result:
        try:
            writer = ResultWriter(result_path)
        except OSError as e:
            if not args.eval_human:
                raise
            info(f"Not saving the chat: cannot create {result_path.parent} ({e.strerror or e}); "
                 "pass --result_path FILE or --save_result false")
    records: list[dict[str, Any]] = []

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        if writer is not None:
            writer(record)

    try:
        if args.eval_human:
            from .chat import Chat

            if writer is not None:
                info(f"Turns are appended to {writer.path}")
            if args.history:
                info(f"History: {len(history)} turn(s) from {args.history}")
            chat = Chat(loaded.model, loaded.template, loaded.generation_config, history=history,
                        stream=args.stream, save=save,
                        multi_round=loaded.template.template_type != "default-generation",
                        boxes_prefix=result_path.with_suffix("") if args.draw_boxes else None)
            chat.run()
        else:
            from .dataset_infer import infer_samples

            info(f"Inferring {len(samples)} row(s), batch size {args.batch_size}")
            infer_samples(loaded.model, loaded.template, samples, loaded.generation_config, args.batch_size,
                          report, save, args.verbose)
            if report.n_skipped:
                info(report.summary())
            if args.show_dataset_sample == len(samples) == 10:
                info("You can set `--show_dataset_sample -1` to infer the whole dataset.")
    finally:
        if writer is not None and writer.count:
            info(f"Results: {writer.path}")
    return {"result": records, "result_path": str(writer.path) if writer is not None and writer.count else None}
