"""Shared fixtures: the ../shared folder beside the repo (golden parity data) and tiny checkpoints."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "golden" / "cases.json").is_file():
        pytest.skip(f"parity data not found at {SHARED} (it sits beside the repo in CI, not in a user's clone)")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    return shared_dir / "golden"


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir: Path, shared_dir: Path, tmp_path_factory) -> Path:
    """The golden tiny checkpoint unpacked into a folder in the official layout."""
    out = tmp_path_factory.mktemp("golden-ckpt")
    src = golden_dir / "tiny-qwen-vl"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy2(src / name, out / name)
    shutil.copy2(shared_dir / "qwen-vl-chat" / "qwen.tiktoken", out / "qwen.tiktoken")
    with gzip.open(src / "model.safetensors.gz", "rb") as fin, open(out / "model.safetensors", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return out


@pytest.fixture(scope="session")
def golden_cases(golden_dir: Path) -> list[dict]:
    import json

    return json.loads((golden_dir / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint with the byte-level vocabulary (fast to train on a CPU)."""
    from vlswift.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="session")
def qwen_tokenizer(shared_dir: Path):
    """The real Qwen-VL tokenizer, from the official ``qwen.tiktoken`` in ../shared."""
    from vlswift.tokenizer import QWenTokenizer

    return QWenTokenizer.from_pretrained(shared_dir / "qwen-vl-chat")
