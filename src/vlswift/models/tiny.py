"""Tiny random Qwen-VL checkpoints in the official layout, for tests, the demo and benchmarks."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch

from .config import QWenConfig
from .loading import build_model, save_official

NUM_SPECIAL_TOKENS = 3 + 205 + 9  # endoftext, im_start, im_end, extra_0..204, 9 image/box tags


def write_byte_vocab(path: Path) -> int:
    """A byte-level ``.tiktoken`` vocabulary (rank b = the single byte b); returns its size."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines) + "\n")
    return 256


def make_tiny_checkpoint(
    out_dir: str | Path,
    vocab_file: str | Path | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vision_width: int = 32,
    vision_layers: int = 2,
    seq_length: int = 2048,
    dtype: torch.dtype = torch.float32,
    patch_size: int = 14,
    head_std: float | None = None,
) -> Path:
    """Write a random Qwen-VL checkpoint (weights, config, generation and tokenizer files).

    Without ``vocab_file`` the vocabulary is byte-level (256 ranks + the special tokens), so
    the model is small enough to train in seconds on a CPU; with the real ``qwen.tiktoken``
    the ids are the official ones.

    Two settings make fine-tuning on a CPU quick (the training tests use ``patch_size=28,
    head_std=0.5``): 28-pixel patches give 256 patches per 448-pixel image instead of 1024
    (16x less vision attention; the positional grid is then exactly 16 x 16); ``head_std``
    draws the output head wider than the usual 0.02, because a freshly initialised tiny
    model's logits span too few nats for LoRA (which never trains ``lm_head``) to memorise
    replies with.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_file is not None:
        shutil.copyfile(vocab_file, out / "qwen.tiktoken")
        n_ranks = sum(1 for line in Path(vocab_file).read_text().splitlines() if line.strip())
    else:
        n_ranks = write_byte_vocab(out / "qwen.tiktoken")
    n_tokens = n_ranks + NUM_SPECIAL_TOKENS
    vocab_size = 151936 if n_ranks == 151643 else (n_tokens + 63) // 64 * 64
    eod = n_ranks
    config = QWenConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, kv_channels=hidden_size // heads, intermediate_size=4 * hidden_size,
        seq_length=seq_length, fp32=dtype == torch.float32, bf16=dtype == torch.bfloat16,
        visual={"heads": max(1, vision_width // 16), "layers": vision_layers, "width": vision_width,
                "mlp_ratio": 2.0, "output_dim": hidden_size, "image_start_id": eod + 3 + 205 + 6,
                "patch_size": patch_size},
    )
    torch.manual_seed(seed)
    model = build_model(config, dtype, "cpu")
    if head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, head_std)
    save_official(model, out, dtype)
    (out / "generation_config.json").write_text(json.dumps({
        "chat_format": "chatml", "eos_token_id": eod, "pad_token_id": eod, "max_window_size": 6144,
        "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3,
    }, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}, indent=2) + "\n")
    return out
