"""CUDA-graphed training steps (models/train_graphs.py) against the eager steps.

The graphs replay the same kernels on the same inputs, so losses and trained weights must
follow the eager run's; gradient accumulation over micro-batches and ``zero_grad`` (either
way) must not let the graph's static gradient buffers leak into ``.grad``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vlswift.models.train_graphs import blocks_use_rng

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def test_blocks_use_rng_sees_lora_and_attention_dropout():
    class Attn(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.dropout = p

    assert not blocks_use_rng(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0), Attn(0.0)))
    assert blocks_use_rng(nn.Sequential(nn.Dropout(0.05)))
    assert blocks_use_rng(nn.Sequential(Attn(0.1)))
    assert not blocks_use_rng(nn.Sequential(nn.Dropout(0.05)).eval())


@pytest.mark.parametrize("dropout, layers, refused", [(0.1, 1, True), (0.1, None, True), (0.0, 1, False),
                                                     (0.1, 0, False)])
def test_refusal_where_dropout_meets_recomputation(tiny_ckpt, dropout, layers, refused):
    from peft import LoraConfig, get_peft_model

    from vlswift.models.loading import load_pretrained

    base = load_pretrained(tiny_ckpt, torch.float32, "cpu")
    base.gradient_checkpointing_enable({"layers": layers})
    base.enable_training_graphs()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=dropout))
    model.train()
    reason = base.transformer.training_graphs.refusal()
    assert (reason is not None) == refused
    if refused:
        assert "dropout" in reason and "recompute" in reason
    model.eval()  # no dropout in eval mode
    assert base.transformer.training_graphs.refusal() is None


def lora_model(folder, graphs: bool, dropout: float = 0.0, layers: int | None = 1):
    from peft import LoraConfig, get_peft_model

    from vlswift.models.loading import load_pretrained

    base = load_pretrained(folder, torch.bfloat16, "cuda")
    base.gradient_checkpointing_enable({"layers": layers})
    if graphs:
        base.enable_training_graphs()
    torch.manual_seed(1)  # the same adapters in every run (peft draws lora_A from the global RNG)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn"], lora_dropout=dropout),
                           autocast_adapter_dtype=False)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    model.train()
    return base, model


def micro_batches(folder, n=4, rows=2):
    start = json.loads((folder / "config.json").read_text())["visual"]["image_start_id"]
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.tensor([[1, 2, start] + [start + 2] * 256 + [start + 1] + torch.randint(3, 200, (30,), generator=gen).tolist()
                            for _ in range(rows)])
        labels = ids.clone()
        labels[:, :262] = -100
        out.append({"input_ids": ids.cuda(), "labels": labels.cuda(),
                    "images": torch.randn(rows, 3, 448, 448, generator=gen).cuda()})
    return out


def train(model, batches, set_to_none: bool):
    """Two optimizer steps of two micro-batches each; returns losses and the trained adapters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(2):
        for batch in batches[2 * step:2 * step + 2]:
            loss = model(**batch).loss
            (loss / 2).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return losses, {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@needs_cuda
@pytest.mark.parametrize("set_to_none", [True, False])
def test_graphed_lora_steps_follow_the_eager_steps(tmp_path, set_to_none):
    from vlswift.models.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny", hidden_size=256, heads=2, layers=3)
    batches = micro_batches(folder)
    _, eager_model = lora_model(folder, graphs=False)
    eager_losses, eager_weights = train(eager_model, batches, set_to_none)
    base, graph_model = lora_model(folder, graphs=True)
    graph_losses, graph_weights = train(graph_model, batches, set_to_none)
    graphs = base.transformer.training_graphs
    assert graphs.captures == 1 and graphs.replays == 4
    print("losses eager", eager_losses, "graphed", graph_losses,
          "bit-identical weights:", all(torch.equal(eager_weights[n], graph_weights[n]) for n in eager_weights))
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for name, w in eager_weights.items():
        assert torch.allclose(graph_weights[name], w, rtol=1e-3, atol=1e-5), name


@needs_cuda
def test_graphs_stay_off_where_dropout_meets_recomputation_and_replay_dropout_without_it(tmp_path):
    from vlswift.models.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny", hidden_size=256, heads=2)
    batch = micro_batches(folder, n=1)[0]
    base, model = lora_model(folder, graphs=True, dropout=0.1, layers=1)
    model(**batch).loss.backward()
    assert base.transformer.training_graphs.captures == 0
    base, model = lora_model(folder, graphs=True, dropout=0.1, layers=0)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert base.transformer.training_graphs.captures == 1
    assert len(set(losses)) == 3 and all(torch.isfinite(torch.tensor(losses)))  # new masks each replay
