"""Fixtures of the training tests: a fast tiny checkpoint, the example data, quick run options.

Tests are imported with ``--import-mode=importlib``, so shared helpers reach them as fixtures.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Callable

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "make_examples.py"


def make_fast_checkpoint(folder: Path, head_std: float = 0.5, patch_size: int = 28) -> Path:
    """``make_tiny_checkpoint`` with the two settings that keep CPU training short (28-pixel
    patches, a wider output head; its docstring says why), as examples/make_examples.py tells users."""
    from vlswift.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(folder, patch_size=patch_size, head_std=head_std)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread: these tiny ops gain little from two, and when another process shares
    the cores OpenMP's spin-waiting makes two threads several times slower (torchrun's ranks get
    OMP_NUM_THREADS=1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fast_ckpt(tmp_path_factory) -> Path:
    return make_fast_checkpoint(tmp_path_factory.mktemp("fast-ckpt"))


@pytest.fixture(scope="session")
def examples() -> dict:
    """The functions of ``examples/make_examples.py`` (``make_examples``, ``make_colour_task``, ...)."""
    return runpy.run_path(str(EXAMPLES), run_name="make_examples")


@pytest.fixture(scope="session")
def example_data(examples, tmp_path_factory) -> Path:
    """``train.jsonl`` of the examples (multi-turn, multi-image, a text-only row), in a temp folder."""
    return examples["make_examples"](tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def train_args() -> Callable:
    """``train_args(ckpt, data, out, **overrides)``: options for a quick CPU run (all rows in one
    batch, no held-out split, evaluated on the training file)."""

    def build(ckpt: Path, data: Path, out: Path, **overrides):
        from vlswift.train.args import SftArguments

        options = dict(
            model_id_or_path=str(ckpt), dataset=[str(data)], val_dataset=[str(data)], dataset_test_ratio=0.0,
            output_dir=str(out), batch_size=4, gradient_accumulation_steps=1, warmup_ratio=0.0,
            eval_steps=1000, logging_steps=5, dataloader_num_workers=0, disable_tqdm=True,
        )
        options.update(overrides)
        return SftArguments(**options)

    return build


@pytest.fixture(scope="session")
def run_log() -> Callable[[str | Path], list[dict]]:
    """``run_log(run_dir)``: the records of a run's logging.jsonl."""
    return lambda run_dir: read_jsonl(Path(run_dir) / "logging.jsonl")
