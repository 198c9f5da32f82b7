"""``SftArguments`` (swift's flags and defaults) and the ``vlswift sft`` command built from it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from vlswift.train.args import SftArguments, default_gradient_accumulation_steps


def test_defaults_follow_swift():
    args = SftArguments(dataset=["train.jsonl"])
    assert (args.sft_type, args.lora_target_modules, args.lora_rank, args.lora_alpha, args.lora_dropout_p) == (
        "lora", ["DEFAULT"], 8, 32, 0.05)
    assert (args.dtype, args.max_length, args.truncation_strategy, args.check_dataset_strategy) == (
        "AUTO", 2048, "delete", "none")
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type, args.warmup_ratio) == (1e-4, 0.1, "linear", 0.05)
    assert (args.eval_steps, args.save_steps, args.save_total_limit, args.logging_steps) == (50, 50, 2, 5)
    assert (args.seed, args.dataset_seed, args.dataset_test_ratio, args.output_dir) == (42, 42, 0.01, "output")
    assert args.gradient_checkpointing and args.gradient_accumulation_steps is None and args.eval_batch_size == 1
    assert SftArguments(dataset=["d.jsonl"], sft_type="full").learning_rate == 1e-5
    assert SftArguments(dataset=["d.jsonl"], eval_steps=7).save_steps == 7


@pytest.mark.parametrize("batch_size, world_size, expected", [(1, 1, 16), (2, 2, 4), (3, 1, 6), (32, 1, 1), (1, 3, 6)])
def test_gradient_accumulation_default_is_swifts(batch_size, world_size, expected):
    assert default_gradient_accumulation_steps(batch_size, world_size) == expected


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": []}, "--dataset: no training data given"),
    ({"sft_type": "qlora"}, "unknown --sft_type 'qlora': expected one of lora, full"),
    ({"dtype": "fp8"}, "unknown --dtype 'fp8'"),
    ({"lr_scheduler_type": "step"}, "unknown --lr_scheduler_type 'step': expected one of linear, cosine, constant"),
    ({"fsdp": True}, "--fsdp true shards a full fine-tune"),
    ({"fsdp": True, "sft_type": "full", "dtype": "fp16"}, "--fsdp true with --dtype fp16"),
    ({"batch_size": 0}, "--batch_size must be at least 1"),
    ({"save_total_limit": 0}, "--save_total_limit must be -1"),
    ({"ddp_backend": "mpi"}, "unknown --ddp_backend 'mpi'"),
])
def test_bad_options_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        SftArguments(**{"dataset": ["d.jsonl"], **overrides})


def test_every_option_has_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(SftArguments))


def test_args_module_imports_only_the_standard_library():
    heavy = ("torch", "rich", "typer", "transformers", "PIL", "peft")
    code = f"import sys, vlswift.train.args; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def run_cli(argv: list[str], monkeypatch) -> list:
    """``vlswift ARGV`` in-process with ``sft_main`` replaced by a recorder."""
    import vlswift.train.recipe as recipe
    from vlswift import cli

    seen = []
    monkeypatch.setattr(recipe, "sft_main", lambda args: seen.append(args))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code in (0, None)
    return seen


def test_cli_flags_are_the_dataclass_fields(monkeypatch):
    (args,) = run_cli(["sft", "--dataset", "a.jsonl", "b.jsonl", "--sft_type", "full", "--freeze_vit", "true",
                       "--gradient_checkpointing", "false", "--lora_target_modules", "c_attn", "w1",
                       "--max_steps", "3", "--learning_rate", "2e-5"], monkeypatch)
    assert args.dataset == ["a.jsonl", "b.jsonl"] and args.lora_target_modules == ["c_attn", "w1"]
    assert (args.sft_type, args.freeze_vit, args.gradient_checkpointing, args.max_steps, args.learning_rate) == (
        "full", True, False, 3, 2e-5)


def test_cli_bad_option_is_one_red_line(capsys):
    from vlswift import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--dataset", "a.jsonl", "--sft_type", "qlora"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: unknown --sft_type 'qlora': expected one of lora, full"
