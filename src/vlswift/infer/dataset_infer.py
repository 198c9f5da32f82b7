"""Dataset inference: ``--val_dataset`` files or a training run's validation split -> result jsonl.

Rows are generated ``batch_size`` at a time (left padding, one ``generate_stream`` call per
batch); each row's record is handed to ``save`` as soon as its batch is done, so an
interrupted run keeps what it did.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..train.data import DatasetError, DatasetReport, Sample, encode_sample, load_dataset, sample_rows, split_dataset
from .chat import SEPARATOR

VERBOSE_BELOW = 100  # print every row when the dataset has fewer rows than this (as swift does)


def training_validation_split(sft_args: dict[str, Any], ckpt_dir: Path) -> tuple[list[Sample], DatasetReport]:
    """The validation rows of the training run that wrote ``sft_args``, as ``vlswift sft`` built them:
    the ``dataset_test_ratio`` share of its ``dataset`` (shuffled with ``dataset_seed``), then the
    rows of its ``val_dataset`` files.

    (Training also dropped rows longer than its ``max_length`` with their reply; here only the
    prompt is encoded, so such rows are inferred.)
    """
    if not sft_args:
        raise DatasetError(f"--load_dataset_config: no sft_args.json in {ckpt_dir} or its run folder, so its "
                           "validation split is unknown; pass --val_dataset FILE instead", "file")
    if not sft_args.get("dataset"):
        raise DatasetError(f"--load_dataset_config: the sft_args.json of {ckpt_dir} names no dataset; "
                           "pass --val_dataset FILE instead", "file")
    seed = int(sft_args.get("dataset_seed", 42))
    # Bad rows were skipped in training (or it stopped), so skipping them silently gives the same rows.
    samples, report = load_dataset(sft_args["dataset"], "none", seed, option="dataset (from sft_args.json)")
    ratio = float(sft_args.get("dataset_test_ratio", 0.01))
    _, val = split_dataset(samples, ratio, seed)
    if sft_args.get("val_dataset"):
        val += load_dataset(sft_args["val_dataset"], "none", seed, option="val_dataset (from sft_args.json)")[0]
    if not val:
        raise DatasetError(f"--load_dataset_config: the training run of {ckpt_dir} had no validation rows "
                           f"(dataset_test_ratio {ratio}, no val_dataset); pass --val_dataset FILE instead",
                           "empty dataset")
    return val, report


def load_infer_samples(val_dataset: Sequence[str], load_dataset_config: bool, sft_args: dict[str, Any],
                       ckpt_dir: Path | None, show_dataset_sample: int, dataset_seed: int,
                       check_dataset_strategy: str) -> tuple[list[Sample], DatasetReport]:
    """The rows to infer: ``--val_dataset`` files (all their rows) or the training run's validation
    split, then ``show_dataset_sample`` of them drawn with ``dataset_seed`` (-1: all)."""
    if val_dataset:
        samples, report = load_dataset(val_dataset, check_dataset_strategy, dataset_seed, require_response=False,
                                       option="--val_dataset")
    elif load_dataset_config:
        samples, report = training_validation_split(sft_args, ckpt_dir or Path("."))
    else:
        raise ValueError("nothing to infer: pass --val_dataset FILE or --load_dataset_config true with --ckpt_dir "
                         "(or drop --eval_human false to chat)")
    if 0 <= show_dataset_sample < len(samples):
        samples = sample_rows(samples, show_dataset_sample, dataset_seed)
    return samples, report


def generate_batch(model, encoded: Sequence[dict[str, Any]], cfg, pad_id: int) -> list[list[int]]:
    """Generated ids of each encoded prompt (one left-padded batch)."""
    import torch

    from .engine import generate_stream

    images = [enc["images"] for enc in encoded if enc["images"] is not None]
    rows: list[list[int]] = [[] for _ in encoded]
    for rows in generate_stream(model, [enc["input_ids"] for enc in encoded], torch.cat(images) if images else None,
                                cfg, pad_id=pad_id):
        pass
    return rows


def warn(message: str, console=None) -> None:
    """``warning: MESSAGE`` on stderr (or on ``console``, e.g. a live progress bar's)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def infer_samples(
    model,
    template,
    samples: Sequence[Sample],
    generation_config,
    batch_size: int = 1,
    report: DatasetReport | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    verbose: bool | None = None,
) -> list[dict[str, Any]]:
    """Infer every sample; returns one record per answered row.

    A record has ``query``, ``history``, ``response``, ``label`` (the row's reference reply or
    None), ``images`` (absolute paths / URLs) and ``system``. A row that cannot be encoded (an
    unloadable image, over ``--max_length``) is handled by ``report``'s strategy: raised
    (``error``), warned about and skipped (``warning``) or skipped (``none``).
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from .engine import SamplingConfig

    report = report or DatasetReport("error")
    verbose = len(samples) < VERBOSE_BELOW if verbose is None else verbose
    cfg = SamplingConfig.from_generation_config(generation_config, template.stop_token_ids)
    pad_id = template.tokenizer.pad_token_id
    records: list[dict[str, Any]] = []
    # The bar is drawn on stderr; rows printed on a terminal's stdout go above it (Rich redirects
    # them), rows printed to a file or pipe stay on stdout.
    console = Console(stderr=True)
    progress = Progress(TextColumn("inferring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
                        redirect_stdout=sys.stdout.isatty())
    with progress:
        task = progress.add_task("infer", total=len(samples))
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            encoded = []
            for sample in batch:
                try:
                    encoded.append((sample, encode_sample(template, sample, with_response=False)))
                except DatasetError as e:
                    report.skip(e)
                    if report.strategy == "warning":
                        warn(str(e), progress.console)
            rows = generate_batch(model, [enc for _, enc in encoded], cfg, pad_id) if encoded else []
            for (sample, enc), ids in zip(encoded, rows):
                record = {
                    "system": template.default_system if sample.system is None else sample.system,
                    "query": sample.query,
                    "history": sample.history,
                    "response": template.decode_response(ids),
                    "label": sample.response,
                    "images": sample.images(),
                }
                if save is not None:
                    save(record)
                records.append(record)
                if verbose:
                    sys.stdout.write(f"[PROMPT]{enc['raw_text']}[OUTPUT]{record['response']}\n"
                                     f"[LABELS]{record['label']}\n{SEPARATOR}\n")
                    sys.stdout.flush()
            progress.advance(task, len(batch))
    return records
