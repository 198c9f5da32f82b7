"""Images reach the loss: a colour that is only in the picture is learned, and not without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlswift.train.recipe import sft_main


def accuracy(ckpt_dir: str, data: Path) -> float:
    """Share of rows whose greedy reply is exactly the expected colour."""
    from transformers import GenerationConfig

    from vlswift.api import get_template, inference
    from vlswift.checkpoint import load_ckpt_model
    from vlswift.train.data import load_dataset

    model, tokenizer, _ = load_ckpt_model(ckpt_dir)
    template = get_template("qwen", tokenizer)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=8)
    samples, _ = load_dataset([str(data)])
    right = sum(inference(model, template, s.resolved().query, [], None, greedy)[0] == s.response for s in samples)
    return right / len(samples)


@pytest.mark.slow
def test_colour_of_unseen_pictures_is_learned_only_when_the_pictures_are_there(
        fast_ckpt, examples, train_args, tmp_path):
    """Full fine-tuning (vision tower trainable) on "What colour is the shape?" with shapes of
    random kind, size and place: held-out pictures are answered far above chance (1 in 4). The
    same run on blank pictures, asked about the same held-out real pictures, stays near chance:
    what it learned without seeing the colours does not name them, so the first run's answers
    came through the images (and not from the questions, the reply format or the test rows)."""
    real_train, real_test = examples["make_colour_task"](tmp_path / "data", n_train=32, n_test=16)
    blank_train, _ = examples["make_colour_task"](tmp_path / "data", n_train=32, n_test=16, blank=True)
    scores = {}
    for blank, train in ((False, real_train), (True, blank_train)):
        args = train_args(fast_ckpt, train, tmp_path / "output", val_dataset=[], sft_type="full",
                          freeze_vit=False, batch_size=8, max_steps=25, learning_rate=3e-3,
                          gradient_checkpointing=False, logging_steps=25)
        scores[blank] = accuracy(sft_main(args)["checkpoint"], real_test)
    assert scores[False] >= 0.9, scores
    assert scores[True] <= 0.5, scores
