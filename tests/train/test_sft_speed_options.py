"""The sft options for speed: `--cuda_graphs` (on CUDA the same losses as the eager run;
elsewhere a note), `--gradient_checkpointing_layers`, `--group_by_length`.

Also the collator's padding to a multiple (which keeps the graphs' shapes few) and that a
right-padded training batch goes to the model without its mask (so attention runs unmasked
flash kernels), while evaluation keeps it.
"""

from __future__ import annotations

import pytest
import torch

from vlswift.train.recipe import sft_main


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)


def test_collate_pads_to_a_multiple():
    from vlswift.train.data import collate

    items = [{"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.full((n,), 2), "images": None} for n in (5, 40)]
    batch = collate(items, pad_id=0, pad_to_multiple_of=32)
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].sum(1).tolist() == [5, 40]
    assert (batch["labels"][:, 40:] == -100).all()
    assert collate(items, pad_id=0)["input_ids"].shape == (2, 40)


def test_training_batches_drop_a_right_padding_mask_only():
    from vlswift.train.recipe import SftRecipe

    recipe = SftRecipe.__new__(SftRecipe)
    recipe.device = torch.device("cpu")
    right = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "images": None, "source": "x"}
    assert "attention_mask" not in recipe.to_device(right, training=True)
    assert "attention_mask" in recipe.to_device(right)  # evaluation: NTK scaling reads the lengths
    left = dict(right, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(recipe.to_device(left, training=True)["attention_mask"], left["attention_mask"])


def test_cuda_graphs_on_the_cpu_is_a_note_and_trains(fast_ckpt, example_data, train_args, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the note is for machines without CUDA")
    result = sft_main(train_args(fast_ckpt, example_data, tmp_path, max_steps=1, cuda_graphs=True))
    assert "--cuda_graphs true not used: it needs a CUDA device" in capsys.readouterr().err
    assert result["checkpoint"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_train_the_eager_losses(fast_ckpt, example_data, train_args, run_log, tmp_path, capsys):
    runs = {}
    for graphs in (False, True):
        result = sft_main(train_args(fast_ckpt, example_data, tmp_path / str(graphs), dtype="bf16", max_steps=4,
                                     learning_rate=1e-2, lora_dropout_p=0.0, logging_steps=1, batch_size=2,
                                     gradient_accumulation_steps=2, cuda_graphs=graphs))
        runs[graphs] = [r["loss"] for r in run_log(result["run_dir"]) if "loss" in r]
        if graphs:  # 4 steps x 2 micro-batches, each replayed (the example rows pad to few shapes)
            assert result["cuda_graph_replays"] == 8 and 1 <= result["cuda_graph_shapes"] <= 8, result
    print("eager", runs[False], "graphed", runs[True])
    # The graphed run pads lengths to a multiple of 32; the padding is causal-invisible, so the
    # losses agree to bf16 rounding (the kernels see other shapes).
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)
    assert runs[True][-1] < runs[True][0]
    assert "cuda graphs: 8 micro-batches replayed" in capsys.readouterr().err


def test_gradient_checkpointing_layers_reaches_the_model(fast_ckpt, example_data, train_args, tmp_path, monkeypatch):
    from vlswift.models.qwen import QWenLMHeadModel
    from vlswift.train.args import SftArguments

    seen = []
    real = QWenLMHeadModel.gradient_checkpointing_enable
    monkeypatch.setattr(QWenLMHeadModel, "gradient_checkpointing_enable",
                        lambda self, kwargs=None, **kw: (seen.append(kwargs), real(self, kwargs))[1])
    sft_main(train_args(fast_ckpt, example_data, tmp_path / "one", max_steps=1, gradient_checkpointing_layers=1))
    sft_main(train_args(fast_ckpt, example_data, tmp_path / "all", max_steps=1))
    assert seen == [{"layers": 1}, {"layers": None}]
    with pytest.raises(ValueError, match="--gradient_checkpointing_layers must be -1"):
        SftArguments(dataset=["x.jsonl"], gradient_checkpointing_layers=-2)


def test_group_by_length_sorts_groups_and_keeps_the_shuffle_and_shards():
    from vlswift.train.distributed import ShardSampler

    n, lengths = 103, [(i * 37) % 101 for i in range(103)]
    plain = [ShardSampler(n, r, 2, seed=3, epoch=1).indices for r in range(2)]
    grouped = [ShardSampler(n, r, 2, seed=3, epoch=1, lengths=lengths, group_size=20).indices for r in range(2)]
    assert sorted(plain[0] + plain[1]) == sorted(grouped[0] + grouped[1])  # the same samples (and repeat)
    # interleave the ranks back into the global order: runs of 20 sorted longest first, the
    # run with the longest sample first
    order = [i for pair in zip(*grouped) for i in pair]
    runs = [order[i:i + 20] for i in range(0, len(order), 20)]
    assert all([lengths[i] for i in run] == sorted((lengths[i] for i in run), reverse=True) for run in runs)
    assert lengths[order[0]] == max(lengths)
    assert order != sorted(order, key=lambda i: -lengths[i])  # grouped, not globally sorted
    # deterministic, and a resume skips exactly what was consumed
    again = ShardSampler(n, 0, 2, seed=3, epoch=1, lengths=lengths, group_size=20, skip=7).indices
    assert again == grouped[0][7:]


def test_group_by_length_trains(fast_ckpt, example_data, train_args, run_log, tmp_path):
    result = sft_main(train_args(fast_ckpt, example_data, tmp_path, max_steps=2, batch_size=2, group_by_length=True,
                                 logging_steps=1))
    assert len([r for r in run_log(result["run_dir"]) if "loss" in r]) == 2
