"""End to end on the CPU: fine-tune a tiny model on the example data, then chat with the checkpoint.

The acceptance of `vlswift sft`: training loss below 0.05 on a multi-turn, multi-image dataset,
then greedy inference from the checkpoint reproduces every trained reply (history turns too),
for LoRA on the default targets, LoRA on ALL linear layers, and full fine-tuning; and the real
`vlswift infer --ckpt_dir CKPT --val_dataset TRAIN_FILE --do_sample false` does too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlswift.train.recipe import sft_main


def replies_from_checkpoint(ckpt_dir: str, data: Path) -> list[tuple[str, str]]:
    """(generated, expected) for every assistant turn of ``data``, history turns included, greedy."""
    from transformers import GenerationConfig

    from vlswift.api import get_template, inference
    from vlswift.checkpoint import load_ckpt_model
    from vlswift.train.data import load_dataset

    model, tokenizer, _ = load_ckpt_model(ckpt_dir)
    template = get_template("qwen", tokenizer)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=40)
    samples, _ = load_dataset([str(data)])
    pairs = []
    for sample in (s.resolved() for s in samples):
        turns = sample.history + [[sample.query, sample.response]]
        for i, (query, expected) in enumerate(turns):
            reply, _ = inference(model, template, query, turns[:i], sample.system, greedy)
            pairs.append((reply, expected))
    return pairs


def assert_memorised(result: dict, data: Path, log: list[dict]) -> None:
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.05, losses
    pairs = replies_from_checkpoint(result["checkpoint"], data)
    assert [got for got, _ in pairs] == [want for _, want in pairs]


@pytest.mark.slow
def test_lora_memorises_multi_turn_multi_image_replies(fast_ckpt, example_data, train_args, run_log, tmp_path):
    args = train_args(fast_ckpt, example_data, tmp_path / "output", max_steps=60, learning_rate=1e-2,
                      lora_rank=16, lora_alpha=64, lora_dropout_p=0.0, eval_steps=30)
    result = sft_main(args)
    assert_memorised(result, example_data, run_log(result["run_dir"]))

    # The command a user runs next: every row's final reply, generated greedily, is its label.
    infer_result = tmp_path / "infer.jsonl"
    proc = subprocess.run([sys.executable, "-m", "vlswift.cli", "infer", "--ckpt_dir", result["checkpoint"],
                           "--val_dataset", str(example_data), "--do_sample", "false", "--result_path", str(infer_result)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in infer_result.read_text().splitlines()]
    assert len(records) == 4 and [r["response"] for r in records] == [r["label"] for r in records]

    run = Path(result["run_dir"])
    assert run.parent == tmp_path / "output" / "qwen-vl-chat" and run.name.startswith("v0-")
    # sft_args.json: every option plus the resolved base folder, in the run and in each checkpoint.
    sft_args = json.loads((run / "sft_args.json").read_text())
    assert sft_args["model_id_or_path"] == str(fast_ckpt.absolute())
    assert sft_args["sft_type"] == "lora" and sft_args["lora_target_modules"] == ["DEFAULT"]
    assert sft_args["resolved_lora_target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert sft_args["dataset"] == [str(example_data)] and sft_args["gradient_accumulation_steps"] == 1
    # Checkpoints at 30 and 60; the last is the best (lowest eval loss); best/last point at them.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-60"]
    assert result["last_model_checkpoint"] == result["best_model_checkpoint"] == str(run / "checkpoint-60")
    assert (run / "last").resolve() == (run / "best").resolve() == run / "checkpoint-60"
    ckpt = run / "checkpoint-60"
    assert json.loads((ckpt / "sft_args.json").read_text()) == sft_args
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not list(run.glob(".*"))  # no temp folders left
    # logging.jsonl: step lines, eval lines and the final summary.
    log = run_log(run)
    steps, final = log[:-1], log[-1]
    assert [r["step"] for r in steps if "loss" in r] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_GiB"} <= set(steps[0])
    assert [r["step"] for r in steps if "eval_loss" in r] == [30, 60]
    assert final["global_step"] == 60 and final["train_loss"] < 0.05
    assert final["last_model_checkpoint"] == final["best_model_checkpoint"] == str(ckpt)
    assert (run / "images" / "train_loss.png").stat().st_size > 0 and (run / "images" / "eval_loss.png").is_file()
    assert list((run / "runs").glob("events.out.tfevents.*"))

    # The adapter is a plain peft adapter.
    from peft import PeftModel

    from vlswift.models.loading import load_pretrained

    model = PeftModel.from_pretrained(load_pretrained(fast_ckpt, torch.float32, "cpu"), str(ckpt))
    assert sum(1 for n, _ in model.named_parameters() if "lora_B" in n) == 2


@pytest.mark.slow
def test_lora_on_all_linear_layers_memorises(fast_ckpt, example_data, train_args, run_log, tmp_path):
    args = train_args(fast_ckpt, example_data, tmp_path / "output", max_steps=80, learning_rate=5e-3,
                      lora_rank=16, lora_alpha=64, lora_dropout_p=0.0, lora_target_modules=["ALL"],
                      gradient_checkpointing=False)
    result = sft_main(args)
    assert_memorised(result, example_data, run_log(result["run_dir"]))
    from safetensors.torch import load_file

    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.")
               for k in load_file(str(Path(result["checkpoint"]) / "adapter_model.safetensors"))}
    assert {"transformer.visual.transformer.resblocks.0.attn.in_proj",  # the vision tower
            "transformer.visual.attn_pool.kv_proj",  # the resampler
            "transformer.h.1.mlp.w2", "transformer.h.1.attn.c_proj"} <= adapted
    assert not any("lm_head" in name for name in adapted)


@pytest.mark.slow
def test_full_fine_tuning_memorises_and_saves_the_official_layout(fast_ckpt, example_data, train_args, run_log, tmp_path):
    args = train_args(fast_ckpt, example_data, tmp_path / "output", max_steps=50, learning_rate=1e-2,
                      sft_type="full", save_total_limit=1, eval_steps=25)
    result = sft_main(args)
    assert_memorised(result, example_data, run_log(result["run_dir"]))
    ckpt = Path(result["checkpoint"])
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "qwen.tiktoken", "sft_args.json", "training_state.pt"} <= names
    assert json.loads((ckpt / "config.json").read_text())["visual"]["patch_size"] == 28
    assert [p.name for p in Path(result["run_dir"]).glob("checkpoint-*")] == ["checkpoint-50"]
