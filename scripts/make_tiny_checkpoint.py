#!/usr/bin/env python3
"""Write a tiny random Qwen-VL checkpoint in the official layout (for tests, demos, experiments).

    python scripts/make_tiny_checkpoint.py OUT_DIR [--vocab qwen.tiktoken] [--hidden 64] [--layers 2]

Without --vocab the vocabulary is byte-level (256 ranks + the special tokens). To fine-tune it
on a CPU (examples/make_examples.py) add --patch_size 28 --head_std 0.5: 16x less vision
attention, and an output head wide enough for LoRA to memorise replies (as the tests do).
"""

import argparse

import torch

from vlswift.models.tiny import make_tiny_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--vocab", default=None, help="a qwen.tiktoken file (default: byte-level vocabulary)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision_width", type=int, default=32)
    p.add_argument("--vision_layers", type=int, default=2)
    p.add_argument("--seq_length", type=int, default=2048)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch_size", type=int, default=14, help="vision patch size (28: 16x fewer patches)")
    p.add_argument("--head_std", type=float, default=None,
                   help="std of the output head's random init (default 0.02; 0.5 lets LoRA memorise)")
    a = p.parse_args()
    out = make_tiny_checkpoint(
        a.out_dir, vocab_file=a.vocab, seed=a.seed, hidden_size=a.hidden, layers=a.layers, heads=a.heads,
        vision_width=a.vision_width, vision_layers=a.vision_layers, seq_length=a.seq_length,
        dtype=torch.float32 if a.dtype == "fp32" else torch.bfloat16, patch_size=a.patch_size, head_std=a.head_std,
    )
    print(out)


if __name__ == "__main__":
    main()
