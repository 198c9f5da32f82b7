"""InferArguments and its CLI: swift's flag names and value styles, checks, a fast import."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from vlswift.infer.args import InferArguments


def test_generation_options_default_to_the_checkpoint():
    args = InferArguments()
    for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams"):
        assert getattr(args, name) is None, name
    assert args.eval_human is True and args.stream is True and args.save_result is True
    assert args.show_dataset_sample == 10 and args.max_length == -1
    assert InferArguments(val_dataset=["a.jsonl"]).eval_human is False


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(InferArguments))


@pytest.mark.parametrize("kwargs,message", [
    ({"load_dataset_config": True}, "--load_dataset_config true needs --ckpt_dir"),
    ({"merge_lora": True}, "--merge_lora true needs --ckpt_dir"),
    ({"batch_size": 0}, "--batch_size must be at least 1"),
    ({"max_new_tokens": 0}, "--max_new_tokens must be at least 1"),
    ({"history": "chat.jsonl", "val_dataset": ["a.jsonl"]}, "--history is for the chat"),
])
def test_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferArguments(**kwargs)


def test_cli_flags(monkeypatch, run_cli):
    seen = []
    monkeypatch.setattr("vlswift.infer.main.infer_main", seen.append)
    code = run_cli(["infer", "--model_type", "qwen-vl-chat", "--stream", "false", "--do_sample", "false",
                    "--val_dataset", "a.jsonl", "b.jsonl", "--top_k", "5", "--temperature", "0.5",
                    "--batch_size", "4", "--draw_boxes", "true"])
    assert code == 0
    code = run_cli(["infer", "--history", "infer_result/20260101-000000.jsonl"])
    assert code == 0
    args, chat_args = seen
    assert args.history is None
    assert args.stream is False and args.do_sample is False and args.draw_boxes is True
    assert args.val_dataset == ["a.jsonl", "b.jsonl"] and args.eval_human is False
    assert args.top_k == 5 and args.temperature == 0.5 and args.batch_size == 4
    assert args.max_new_tokens is None and args.top_p is None
    assert chat_args.history == "infer_result/20260101-000000.jsonl" and chat_args.eval_human is True


def test_cli_refuses_a_bad_combination_in_one_line(run_cli, capsys):
    assert run_cli(["infer", "--load_dataset_config", "true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: --load_dataset_config true needs --ckpt_dir "
                   "(the checkpoint whose training run's validation split to infer)")


def test_args_module_imports_only_the_standard_library():
    heavy = ("torch", "rich", "typer", "transformers", "PIL")
    code = f"import sys, vlswift.infer.args; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
