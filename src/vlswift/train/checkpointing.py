"""The run folder and its checkpoints: naming, atomic writes, rotation, best/last, training state.

A checkpoint is written into ``.checkpoint-<step>.tmp`` beside its target, flushed to disk and
renamed into place when complete, so neither a crash nor a power loss leaves a half-written (or
complete-looking but empty) ``checkpoint-<step>``. Resuming needs the weights (adapter or full
model) plus ``training_state.pt``: optimizer, scheduler, grad scaler, every rank's RNG, the step
and the data position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINING_STATE = "training_state.pt"
SHARDED_OPTIMIZER = "optimizer"  # folder of torch.distributed.checkpoint shards (FSDP runs)


def new_run_dir(output_dir: str | Path, model_type: str) -> Path:
    """Create ``OUTPUT_DIR/<model_type>/v<N>-<YYYYmmdd-HHMMSS>`` (N = the highest existing + 1, as swift)."""
    parent = Path(output_dir).expanduser().absolute() / model_type
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(m.group(1)) for p in parent.iterdir() if (m := re.match(r"v(\d+)-", p.name))]
        run_dir = parent / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another run started in the same second
            time.sleep(0.01)


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file through a temp file and a rename (readers never see half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder under it and itself (bottom up).

    Call it before renaming a freshly written folder into place: a rename can reach the disk
    before the files' data does, so a power loss could otherwise leave a complete-looking folder
    of empty files. Symlinks are skipped (their targets are not ours to flush).
    """
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


def fsync_path(path: str | Path) -> None:
    """fsync one file, or one folder's entries (a no-op for folders on Windows, which cannot open them)."""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT.fullmatch(path.name)
    return int(m.group(1)) if m else None


class Checkpoints:
    """Writes ``checkpoint-<step>`` folders of one run, keeps the best and last, rotates the rest.

    Every rank calls :meth:`save` (FSDP ranks write their optimizer shards); rank 0 renames and
    rotates. Best = lowest eval loss seen at save time; without validation data the best is
    unknown (None) and only the newest checkpoints are kept.
    """

    def __init__(self, run_dir: Path, save_total_limit: int, is_main: bool):
        self.run_dir = run_dir
        self.limit = save_total_limit
        self.is_main = is_main
        self.best: Path | None = None
        self.best_metric: float | None = None
        self.last: Path | None = None

    def save(self, step: int, write: Callable[[Path], None], eval_loss: float | None) -> Path:
        """Create the checkpoint of ``step`` with ``write(tmp_folder)`` (called on every rank)."""
        final = self.run_dir / f"checkpoint-{step}"
        tmp = self.run_dir / f".checkpoint-{step}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        try:
            write(tmp)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier()
        if eval_loss is not None and (self.best_metric is None or eval_loss < self.best_metric):
            self.best, self.best_metric = final, eval_loss
        self.last = final
        if self.is_main:
            sync_tree(tmp)  # FSDP ranks' shards too: the barrier above waited for their writes
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.run_dir)  # the rename itself, before rotation deletes older checkpoints
            self._mark("last", final)
            if self.best is not None:
                self._mark("best", self.best)
            self._rotate()
        distributed.barrier()
        return final

    def _mark(self, name: str, target: Path) -> None:
        """``best``/``last``: relative symlinks to the checkpoint folder, replaced atomically.

        After a resume the best checkpoint may still be the earlier run's (``../v0-.../checkpoint-N``).
        """
        link = self.run_dir / name
        tmp = self.run_dir / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(target, self.run_dir), target_is_directory=True)
        os.replace(tmp, link)

    def _rotate(self) -> None:
        if self.limit < 0:
            return
        existing = sorted((p for p in self.run_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir()
                           and not p.is_symlink()), key=checkpoint_step, reverse=True)
        keep = {p for p in (self.last, self.best) if p is not None}
        for path in existing:
            if len(keep) >= self.limit:
                break
            keep.add(path)
        for path in existing:
            if path not in keep:
                doomed = path.with_name(f".{path.name}.deleting")
                os.replace(path, doomed)  # gone from view at once, even if the delete is interrupted
                shutil.rmtree(doomed)

    def state(self) -> dict[str, Any]:
        return {"best_checkpoint": str(self.best) if self.best else None, "best_metric": self.best_metric}

    def load_state(self, state: dict[str, Any]) -> None:
        """Carry the best metric over a resume (the best folder itself stays in the old run)."""
        self.best_metric = state.get("best_metric")
        self.best = Path(state["best_checkpoint"]) if state.get("best_checkpoint") else None


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds


def save_lora_adapter(model, folder: Path) -> None:
    """peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it)."""
    model.save_pretrained(str(folder), safe_serialization=True)


def save_full_model(state: dict[str, torch.Tensor], config, folder: Path, dtype: torch.dtype, base_dir: Path) -> None:
    """The official layout: safetensors shards (+ index), official ``config.json``, tokenizer and
    generation files copied from the base model."""
    from ..models.config import official_config_dict
    from ..models.loading import DTYPE_NAMES, copy_aux_files, write_sharded_safetensors

    write_sharded_safetensors(state, folder, dtype)
    write_json(folder / "config.json", official_config_dict(config, DTYPE_NAMES[dtype]))
    copy_aux_files(base_dir, folder)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no {TRAINING_STATE} "
                                "(pass a checkpoint-<step> folder written by vlswift sft)")
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder to resume from: the given one, or the newest complete one of a run folder.

    The newest by step, not the ``last`` link: a run killed between renaming a checkpoint into
    place and updating ``last`` leaves the link one checkpoint behind (or absent).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such folder")
    if not (folder / TRAINING_STATE).is_file():
        complete = [p for p in folder.glob("checkpoint-*")  # not checkpoint-N-merged exports
                    if checkpoint_step(p) is not None and not p.is_symlink() and (p / TRAINING_STATE).is_file()]
        if complete:
            folder = max(complete, key=checkpoint_step)
    return folder.resolve()
