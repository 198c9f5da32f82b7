"""What a run reports: ``logging.jsonl``, TensorBoard ``runs/``, loss plots and the progress bar.

Only rank 0 reports; other ranks get a :class:`RunLog` with ``enabled=False`` that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

SMOOTHING = 0.9


class RunLog:
    """One line per logging step / evaluation in ``logging.jsonl`` (also sent to TensorBoard),
    the loss history for the plots, and the Rich progress bar."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int, enabled: bool,
                 show_progress: bool = True, history: dict[str, list] | None = None):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.history: dict[str, list] = history or {"train_loss": [], "eval_loss": []}
        self.progress = None
        if not self.enabled:
            return
        from rich.console import Console
        from torch.utils.tensorboard import SummaryWriter

        self.console = Console(stderr=True, highlight=False)
        self.jsonl = open(run_dir / "logging.jsonl", "a", encoding="utf-8")
        self.tb = SummaryWriter(str(run_dir / "runs"))
        if show_progress:
            self.progress = TrainProgress(self.console, total_steps, start_step)

    def info(self, message: str) -> None:
        """Print a plain line (no Rich markup: it may hold paths with brackets)."""
        if self.enabled:
            (self.progress.progress.console if self.progress else self.console).print(message, markup=False)

    def log(self, record: dict[str, Any]) -> None:
        """Append a record (``step`` plus metrics) to logging.jsonl and TensorBoard."""
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (an fp16 step the GradScaler skipped has an infinite
        # grad norm) is written as null, which every JSON reader takes.
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.jsonl.write(json.dumps(finite, ensure_ascii=False, allow_nan=False) + "\n")
        self.jsonl.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                prefix = "eval" if key.startswith("eval_") else "train"
                self.tb.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, step)
        if "loss" in record:
            self.history["train_loss"].append((step, record["loss"]))
        if "eval_loss" in record:
            self.history["eval_loss"].append((step, record["eval_loss"]))
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()}
        self.info(" ".join(f"{k}={v}" for k, v in shown.items()))

    def advance(self, step: int, loss: float, lr: float, tokens_per_s: float | None) -> None:
        """Move the bar to ``step`` (tokens/s is measured at logging steps only: None keeps the last)."""
        if self.enabled and self.progress:
            self.progress.update(step, loss, lr, tokens_per_s)

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Write the final summary line (after training) and the loss plots; stop the bar.

        Called again after an error, it only closes what is still open.
        """
        if not self.enabled:
            return
        self.enabled = False
        if self.progress:
            self.progress.stop()
        if final is not None:
            self.jsonl.write(json.dumps(final, ensure_ascii=False) + "\n")
        self.jsonl.close()
        self.tb.close()
        plot_losses(self.history, self.run_dir / "images")


class TrainProgress:
    """A Rich bar: step / total, loss, learning rate, tokens/s, elapsed and ETA."""

    def __init__(self, console, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
        self.progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float | None) -> None:
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if tokens_per_s is not None:
            fields["tps"] = f"{tokens_per_s:.0f}"
        self.progress.update(self.task, completed=step, **fields)

    def stop(self) -> None:
        self.progress.stop()


class Throughput:
    """Tokens per second between two logging steps (every rank's tokens counted by the caller)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0.0
        return rate


def memory_gib(device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider (and swift's plots)."""
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_losses(history: dict[str, list], images_dir: Path) -> list[Path]:
    """``images/train_loss.png`` and ``images/eval_loss.png``: raw curve (faint) and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("train_loss", "eval_loss"):
        points = [(s, v) for s, v in history.get(key, []) if v is not None and math.isfinite(v)]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot(steps, values, color="#1f77b4", alpha=0.35, label="raw")
        ax.plot(steps, smooth(list(values)), color="#1f77b4", label=f"smoothed ({SMOOTHING})")
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
        path = images_dir / f"{key}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
