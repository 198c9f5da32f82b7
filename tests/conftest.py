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


# Helpers for scripts that measure their own peak resident set size in a fresh interpreter:
# ``reset_peak()`` (through /proc/self/clear_refs) then ``status("VmHWM:")`` (bytes).
PEAK_RSS_PRELUDE = '''
import json, sys

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        print(json.dumps({"skip": "cannot reset the peak RSS through /proc/self/clear_refs"}))
        sys.exit(0)
'''


@pytest.fixture(scope="session")
def peak_rss_run():
    """``peak_rss_run(script, *args)``: run ``script`` (which may call ``status`` and ``reset_peak``)
    in a fresh interpreter with vlswift importable; returns the JSON of its last output line.
    Skips where /proc cannot report or reset the peak (not Linux, a restricted container)."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    src = Path(__file__).resolve().parents[1] / "src"

    def run(script: str, *args: str) -> dict:
        if not Path("/proc/self/status").is_file():
            pytest.skip("reads the resident set size from /proc (Linux)")
        code = PEAK_RSS_PRELUDE + textwrap.dedent(script)
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(src)))
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "skip" in result:
            pytest.skip(result["skip"])
        return result

    return run
