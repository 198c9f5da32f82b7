"""A run killed with SIGKILL and resumed from its last checkpoint ends where an uninterrupted run ends.

Resuming restores the adapter, the optimizer, the scheduler, every RNG (LoRA dropout is on) and
the data position, which falls mid-epoch here (4 rows, batch size 1, a checkpoint every 3 steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlswift.train.recipe import sft_main


def start_run(args, folder: Path) -> subprocess.Popen:
    """``python -m vlswift.train.recipe ARGS.json``: the recipe in its own process (as torchrun runs it)."""
    args_file = folder / "args.json"
    args_file.write_text(json.dumps(dataclasses.asdict(args)))
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "vlswift.train.recipe", str(args_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after_first_checkpoint(proc: subprocess.Popen, output: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(output.glob("qwen-vl-chat/v*/checkpoint-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(fast_ckpt, example_data, train_args, run_log, tmp_path):
    def args(out: str, **extra):
        return train_args(fast_ckpt, example_data, tmp_path / out, val_dataset=[], batch_size=1, max_steps=24,
                          save_steps=3, save_total_limit=-1, learning_rate=1e-2, logging_steps=1, **extra)

    killed_out = tmp_path / "killed"
    proc = start_run(args("killed"), tmp_path)
    kill_after_first_checkpoint(proc, killed_out)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    (killed_run,) = killed_out.glob("qwen-vl-chat/v*")
    checkpoints = list(killed_run.glob("checkpoint-*"))
    assert checkpoints and all((c / "training_state.pt").is_file() and (c / "adapter_model.safetensors").is_file()
                               for c in checkpoints)  # only complete checkpoints carry the name

    # Resuming from the run folder picks its newest complete checkpoint.
    resumed = sft_main(args("resumed", resume_from_checkpoint=str(killed_run)))
    uninterrupted = sft_main(args("uninterrupted"))

    start = max(int(c.name.split("-")[1]) for c in killed_run.glob("checkpoint-*"))
    assert min(r["step"] for r in run_log(resumed["run_dir"]) if "loss" in r) == start + 1
    losses = {r["step"]: r["loss"] for r in run_log(uninterrupted["run_dir"]) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in run_log(resumed["run_dir"]) if "loss" in r}
    assert resumed_losses == pytest.approx({s: losses[s] for s in resumed_losses}, rel=1e-5)
    want = load_file(str(Path(uninterrupted["checkpoint"]) / "adapter_model.safetensors"))
    got = load_file(str(Path(resumed["checkpoint"]) / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
