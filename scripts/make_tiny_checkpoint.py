#!/usr/bin/env python3
"""Write a tiny random Qwen-VL checkpoint in the official layout (for tests, demos, experiments).

    python scripts/make_tiny_checkpoint.py OUT_DIR [--vocab qwen.tiktoken] [--hidden 64] [--layers 2]

Without --vocab the vocabulary is byte-level (256 ranks + the special tokens).
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
    a = p.parse_args()
    out = make_tiny_checkpoint(
        a.out_dir, vocab_file=a.vocab, seed=a.seed, hidden_size=a.hidden, layers=a.layers, heads=a.heads,
        vision_width=a.vision_width, vision_layers=a.vision_layers, seq_length=a.seq_length,
        dtype=torch.float32 if a.dtype == "fp32" else torch.bfloat16,
    )
    print(out)


if __name__ == "__main__":
    main()
