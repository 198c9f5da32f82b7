"""Training's fused kernels (models/fused.py, autograd on CUDA) against the plain ops, and the
frozen vision tower running without autograd in training.

Forward: the same results as the plain ops (to float32 rounding). Backward: each gradient is
compared with a float64 reference and must be no further from it than the plain bf16 ops'
gradient is (plus a small margin), so a wrong formula fails while rounding noise does not.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
BF16 = torch.bfloat16


def grads(fn, inputs, grad_out, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs], [g.to(o.dtype) for g, o in zip(grad_out, outs)])
    return [o.detach() for o in outs], [t.grad for t in leaves]


def no_worse_than_plain(fused_grads, plain_grads, ref_grads, margin=1e-2):
    for f, p, r in zip(fused_grads, plain_grads, ref_grads):
        scale = r.abs().max().item()
        err_fused = (f.double() - r).abs().max().item() / scale
        err_plain = (p.double() - r).abs().max().item() / scale
        assert err_fused <= 1.5 * err_plain + margin, (err_fused, err_plain)


def plain_rms_norm(x, w, residual=None, eps=1e-6):
    if residual is not None:
        x = x + residual
    xf = x.float() if x.dtype != torch.float64 else x
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
    return (x, y) if residual is not None else y


@needs_cuda
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_train_matches_plain_forward_and_backward(with_residual):
    from vlswift.models import fused

    torch.manual_seed(0)
    x, r = torch.randn(2, 9, 4096, device="cuda"), torch.randn(2, 9, 4096, device="cuda")
    w = torch.randn(4096, device="cuda") * 0.1 + 1
    inputs = [x, w] + ([r] if with_residual else [])
    g_out = [torch.randn(2, 9, 4096, device="cuda")] * (2 if with_residual else 1)

    def fused_fn(x, w, *res):
        return fused.rms_norm_train(x, w, 1e-6, res[0] if res else None)

    def plain_fn(x, w, *res):
        return plain_rms_norm(x, w, res[0] if res else None)

    out_f, g_f = grads(fused_fn, inputs, g_out, BF16)
    out_p, g_p = grads(plain_fn, inputs, g_out, BF16)
    _, g_ref = grads(plain_fn, inputs, g_out, torch.float64)
    for a, b in zip(out_f, out_p):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)
    no_worse_than_plain(g_f, g_p, g_ref)
    if with_residual:  # one gradient reaches both addends
        assert torch.equal(g_f[0], g_f[2])


@needs_cuda
def test_silu_mul_train_matches_plain_forward_and_backward():
    from vlswift.models import fused

    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 11008, device="cuda") * 2, torch.randn(3, 5, 11008, device="cuda") * 2
    g_out = [torch.randn(3, 5, 11008, device="cuda")]
    out_f, g_f = grads(fused.silu_mul_train, [a, b], g_out, BF16)
    out_p, g_p = grads(lambda a, b: a * F.silu(b), [a, b], g_out, BF16)
    _, g_ref = grads(lambda a, b: a * F.silu(b), [a, b], g_out, torch.float64)
    assert torch.equal(out_f[0], out_p[0])
    no_worse_than_plain(g_f, g_p, g_ref)


@needs_cuda
def test_rotary_train_matches_plain_forward_and_backward():
    from vlswift.models import fused
    from vlswift.models.qwen import apply_rotary, rotary_cos_sin, rotary_inv_freq

    torch.manual_seed(0)
    b, t, heads, dim = 2, 11, 4, 128
    qkv = torch.randn(b, t, 3 * heads * dim, device="cuda")
    pos = torch.arange(t, device="cuda").expand(b, t)
    cos, sin = rotary_cos_sin(pos, rotary_inv_freq(torch.ones(b, dtype=torch.float64), dim, 10000, "cuda"))
    g_out = [torch.randn(b, t, 3 * heads * dim, device="cuda")]

    def plain(qkv):
        q, k, v = qkv.view(b, t, 3, heads, dim).unbind(2)
        c, s = (cos, sin) if qkv.dtype != torch.float64 else (cos.double(), sin.double())
        return torch.stack([apply_rotary(q, c, s), apply_rotary(k, c, s), v], 2).reshape(b, t, -1)

    def fused_fn(qkv):
        return fused.rotary_qk_train_(qkv * 1, heads, cos, sin)  # * 1: not in place on a leaf

    out_f, g_f = grads(fused_fn, [qkv], g_out, BF16)
    out_p, g_p = grads(plain, [qkv], g_out, BF16)
    _, g_ref = grads(plain, [qkv], g_out, torch.float64)
    torch.testing.assert_close(out_f[0], out_p[0], rtol=1.6e-2, atol=1e-2)
    no_worse_than_plain(g_f, g_p, g_ref)
    # the v third passes its gradient through untouched
    assert torch.equal(g_f[0].view(b, t, 3, -1)[:, :, 2], g_out[0].to(BF16).view(b, t, 3, -1)[:, :, 2])


@needs_cuda
def test_lora_training_with_fused_kernels_follows_the_plain_ops(tmp_path, monkeypatch):
    """LoRA on a tiny bf16 model on CUDA: the first step's adapter gradients are no further from
    the float32 model's than the plain bf16 ops' are, and three steps give the plain losses."""
    from peft import LoraConfig, get_peft_model

    from vlswift.models import fused
    from vlswift.models.loading import load_pretrained
    from vlswift.models.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny", hidden_size=256, heads=2)  # head_dim 128, as the real model
    gen = torch.Generator().manual_seed(0)
    start = json.loads((folder / "config.json").read_text())["visual"]["image_start_id"]
    ids = [[1, 2, start] + [start + 2] * 256 + [start + 1] + torch.randint(3, 200, (40,), generator=gen).tolist()
           for _ in range(2)]
    batch = {"input_ids": torch.tensor(ids, device="cuda"), "images": torch.randn(2, 3, 448, 448, generator=gen).cuda()}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :260] = -100
    real_train_enabled = fused.train_enabled

    def run(use_fused: bool, dtype=BF16):
        monkeypatch.setattr(fused, "train_enabled", real_train_enabled if use_fused else (lambda *t: False))
        model = load_pretrained(folder, dtype, "cuda")
        model.gradient_checkpointing_enable({"layers": 1})
        torch.manual_seed(1)  # the same adapters in every run
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn"]),
                               autocast_adapter_dtype=False)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses, first_grads = [], None
        for _ in range(3):
            loss = model(**batch).loss
            loss.backward()
            if first_grads is None:
                first_grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, first_grads

    fused_losses, fused_grads = run(True)
    plain_losses, plain_grads = run(False)
    _, ref_grads = run(False, torch.float32)
    assert fused_losses == pytest.approx(plain_losses, rel=2e-2)
    assert fused_losses[-1] < fused_losses[0]
    names = sorted(ref_grads)
    no_worse_than_plain([fused_grads[n] for n in names], [plain_grads[n] for n in names],
                        [ref_grads[n] for n in names], margin=2e-2)


@pytest.mark.parametrize("targets", [["DEFAULT"], ["ALL"]])
def test_a_frozen_vision_tower_runs_without_autograd_in_training(tiny_ckpt, targets):
    """LoRA on the LLM only: the tower records nothing for backward (and so can take its CUDA
    graph); LoRA on the tower too (ALL): it records, and its adapters get gradients."""
    from vlswift.models.loading import load_pretrained
    from vlswift.train.lora import apply_lora, resolve_target_modules

    model = load_pretrained(tiny_ckpt, torch.float32, "cpu")
    model = apply_lora(model, resolve_target_modules(model, targets), 8, 32, 0.0)
    model.train()
    seen = []
    block = model.get_base_model().transformer.visual.transformer.resblocks[0]
    block.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    start = model.config.visual["image_start_id"]
    ids = torch.tensor([[1, start] + [start + 2] * 256 + [start + 1] + [5, 6, 7, 8]])
    labels = ids.clone()
    labels[:, :259] = -100
    model(input_ids=ids, images=torch.randn(1, 3, 448, 448), labels=labels).loss.backward()
    vision_trainable = targets == ["ALL"]
    assert seen == [vision_trainable]
    # lora_B starts at zero, so only its gradient is non-zero after one step
    vision_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".visual." in n and "lora_B" in n]
    assert bool(vision_grads) == vision_trainable and all(g is not None and g.abs().sum() > 0 for g in vision_grads)
    llm_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".h." in n and "lora_A" in n]
    assert llm_grads and all(g is not None for g in llm_grads)
