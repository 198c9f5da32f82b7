"""Full-parameter fine-tuning of the real-shape Qwen-VL-Chat with FSDP2 (random bf16 weights).

Uses the sft recipe's own FSDP wrapping (``vlswift.train.distributed.wrap_fsdp``: one unit per
decoder / vision block) and gradient checkpointing, AdamW, a repeated synthetic batch of one
448px image + 50 caption tokens per sample, and prints one JSON line: per-GPU peak memory,
samples/s, model FLOPs utilisation and the loss of each step (it goes down on the repeated batch).

    PYTHONPATH=src python scripts/bench_full_sft.py [--nproc N] [--freeze_vit true] [--steps 8]

With ``--nproc N > 1`` it re-runs itself under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

import bench_common as bc
from bench_sft import CAPTION_TOKENS, PROMPT_TOKENS, make_batch


def flops_per_sample(config, base, vit_trainable: bool) -> float:
    """Forward + backward FLOPs of one sample (weights and activations; recomputation not counted)."""
    tr = base.transformer
    vit_fwd = 2 * sum(p.numel() for p in tr.visual.parameters()) * 1024
    vit_fwd += 4 * 1024**2 * config.visual["width"] * config.visual["layers"]
    t = PROMPT_TOKENS + CAPTION_TOKENS
    llm_fwd = 2 * sum(p.numel() for p in tr.h.parameters()) * t
    llm_fwd += 2 * t**2 * config.hidden_size * config.num_hidden_layers
    head_fwd = 2 * config.hidden_size * config.vocab_size * CAPTION_TOKENS
    return vit_fwd * (3 if vit_trainable else 1) + 3 * (llm_fwd + head_fwd)


def run(args) -> dict | None:
    from vlswift.train.distributed import close_distributed, init_distributed, wrap_fsdp
    from vlswift.train.lora import freeze_vision_tower

    info = init_distributed("nccl", torch.device("cuda"), force=True)
    torch.cuda.set_device(info.device)
    config = bc.read_config(args.config)
    base = bc.random_model(config, device=str(info.device))
    base.train()
    base.gradient_checkpointing_enable()
    if args.freeze_vit:
        freeze_vision_tower(base)
    flops = flops_per_sample(config, base, not args.freeze_vit)
    model = wrap_fsdp(base, info)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1234 + info.rank)
    batch = {k: v.to(info.device) for k, v in make_batch(config, args.batch_size, gen).items()}
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    step_s = sum(times[2:]) / max(1, len(times) - 2)
    peak = torch.cuda.max_memory_allocated() / bc.GB
    peaks = [peak]
    if info.distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, peak)
        peaks = gathered
    result = None
    if info.is_main:
        samples_per_s = args.batch_size * info.world_size / step_s
        result = {
            "device": bc.device_name(), "date": bc.today(), "command": bc.command_line(),
            "full_sft_nproc": info.world_size, "full_sft_batch_per_gpu": args.batch_size,
            "full_sft_freeze_vit": args.freeze_vit,
            "full_sft_peak_GB_per_gpu": round(max(peaks), 2),
            "full_sft_step_s": round(step_s, 4),
            "full_sft_samples_per_s": round(samples_per_s, 3),
            "full_sft_mfu": round(samples_per_s * flops / info.world_size / (args.peak_tflops * 1e12), 3),
            "full_sft_losses_repeated_batch": losses,
            "bf16_matmul_TFLOPs_assumed": args.peak_tflops,
        }
    close_distributed(info)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=bc.default_config_path())
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--freeze_vit", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 matmul peak (default: measured)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", sys.argv[0],
               *[a for a in sys.argv[1:]]]
        raise SystemExit(subprocess.call(cmd))
    if not args.peak_tflops:
        args.peak_tflops = round(bc.matmul_TFLOPs(), 1)
    result = run(args)
    if result is not None:
        bc.print_result(result, args.out)


if __name__ == "__main__":
    main()
