"""Two CPU processes (torchrun, gloo) train exactly like one process with the same global batch.

``NPROC_PER_NODE=2`` makes ``sft_main`` re-launch itself under torchrun; each rank reads half of
every global batch: 2 micro-batches of 1 row per rank and step (gradient sync on the last only),
against 4 micro-batches of 1 row in one process. The loss of a step is the token mean over the
whole global batch, so the two runs agree to float rounding, step by step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlswift.train.recipe import sft_main


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(args, monkeypatch, nproc: int) -> dict:
    if nproc > 1:
        monkeypatch.setenv("NPROC_PER_NODE", str(nproc))
        monkeypatch.setenv("MASTER_PORT", free_port())
    else:
        monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    return sft_main(args)


def curves(log: list[dict]) -> tuple[list[float], list[float]]:
    steps = [r for r in log if "step" in r]
    return [r["loss"] for r in steps if "loss" in r], [r["eval_loss"] for r in steps if "eval_loss" in r]


def assert_same_training(single: dict, multi: dict, run_log) -> None:
    train_1, eval_1 = curves(run_log(single["run_dir"]))
    train_2, eval_2 = curves(run_log(multi["run_dir"]))
    assert len(train_1) == len(train_2) == 6 and len(eval_1) == len(eval_2) == 2
    assert train_2 == pytest.approx(train_1, rel=1e-4)
    assert eval_2 == pytest.approx(eval_1, rel=1e-4)
    assert train_1[-1] < train_1[0]


def options(**overrides) -> dict:
    """Six steps of a global batch of 4 rows (the 4 example rows, reshuffled each epoch), logged every step."""
    return dict(max_steps=6, eval_steps=3, logging_steps=1, learning_rate=5e-3, lora_dropout_p=0.0, batch_size=1,
                **overrides)


@pytest.mark.slow
def test_ddp_matches_one_process(fast_ckpt, example_data, train_args, run_log, tmp_path, monkeypatch):
    """LoRA on ALL layers (the vision tower trains too): a rank whose row has no picture still
    runs the vision tower, so DDP's gradient all-reduce lines up."""
    opts = options(lora_target_modules=["ALL"])
    single = run(train_args(fast_ckpt, example_data, tmp_path / "one", **opts, gradient_accumulation_steps=4),
                 monkeypatch, 1)
    multi = run(train_args(fast_ckpt, example_data, tmp_path / "two", **opts, gradient_accumulation_steps=2),
                monkeypatch, 2)
    assert_same_training(single, multi, run_log)

    run_dir = Path(multi["run_dir"])
    assert len(list((tmp_path / "two" / "qwen-vl-chat").iterdir())) == 1  # one run folder, written by rank 0
    assert len(list((run_dir / "runs").glob("events.*"))) == 1
    assert json.loads((run_dir / "sft_args.json").read_text())["world_size"] == 2
    a = load_file(str(Path(single["checkpoint"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(multi["checkpoint"]) / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(fast_ckpt, example_data, train_args, run_log, tmp_path, monkeypatch):
    """Full fine-tuning sharded with FSDP2 over 2 ranks: the same curve as one process; the
    checkpoint holds the gathered model (official layout) and each rank's optimizer shard, and
    resuming from the step-3 checkpoint ends with the weights of the uninterrupted run."""
    opts = options(sft_type="full", fsdp=True, save_total_limit=-1, gradient_accumulation_steps=2)
    single = run(train_args(fast_ckpt, example_data, tmp_path / "one", **{**opts, "fsdp": False,
                                                                          "gradient_accumulation_steps": 4}),
                 monkeypatch, 1)
    multi = run(train_args(fast_ckpt, example_data, tmp_path / "two", **opts), monkeypatch, 2)
    assert_same_training(single, multi, run_log)

    ckpt3 = Path(multi["run_dir"]) / "checkpoint-3"
    assert {"model.safetensors", "config.json", "qwen.tiktoken", "training_state.pt"} <= {p.name for p in ckpt3.iterdir()}
    assert sorted(p.name for p in (ckpt3 / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    resumed = run(train_args(fast_ckpt, example_data, tmp_path / "resumed", resume_from_checkpoint=str(ckpt3), **opts),
                  monkeypatch, 2)
    assert [r["step"] for r in run_log(resumed["run_dir"]) if "loss" in r] == [4, 5, 6]
    want = load_file(str(Path(multi["checkpoint"]) / "model.safetensors"))
    got = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["invalid JSON", "missing image"])
def test_a_bad_dataset_under_torchrun_is_one_error_line(fast_ckpt, tmp_path, broken):
    """Only rank 0 reads the data. When it fails, rank 1 stops too (no gloo "connection reset"
    traceback) and the launcher shows rank 0's error alone (no torchrun failure report): one
    line naming the file and line, status 1. Either while reading the file or while checking
    its rows with the template (after every rank has loaded the tokenizer)."""
    data = tmp_path / "data.jsonl"
    if broken == "invalid JSON":
        data.write_text('{"query": "Hi", "response": "Hello."}\n{"query": "Hi", "response"\n')
        expected = f"error: {data}:2: invalid JSON: Expecting ':' delimiter at column 27"
    else:
        data.write_text('{"query": "Picture 1:<img>gone.png</img>\\nHi", "response": "Hello."}\n')
        expected = (f"error: {data}:1: cannot load image gone.png: file not found ({tmp_path / 'gone.png'})")
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "COLUMNS": "1000"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlswift.cli", "sft", "--model_id_or_path", str(fast_ckpt), "--dataset", str(data),
         "--check_dataset_strategy", "error", "--output_dir", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [expected], proc.stderr
    assert not (tmp_path / "out").exists()

