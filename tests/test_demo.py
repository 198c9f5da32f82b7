"""The quick start: ``vlswift demo`` and ``scripts/make_tiny_checkpoint.py`` work offline and
write only where they are told to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SEPARATOR = "-" * 50


def test_make_tiny_checkpoint_script(tmp_path):
    from vlswift import get_model_tokenizer
    from vlswift.models.tiny import make_tiny_checkpoint

    out = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, "scripts/make_tiny_checkpoint.py", str(out), "--hidden", "32", "--layers", "1",
         "--dtype", "bf16", "--seed", "3", "--patch_size", "28"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["visual"]["patch_size"]) == (32, 1, 28)
    assert (config["torch_dtype"], config["bf16"]) == ("bfloat16", True)

    # The options reach make_tiny_checkpoint as they are: the same weights as a direct call.
    direct = make_tiny_checkpoint(tmp_path / "direct", seed=3, hidden_size=32, layers=1, dtype=torch.bfloat16,
                                  patch_size=28)
    written, expected = load_file(str(out / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)

    model, tokenizer = get_model_tokenizer("qwen-vl-chat", "bf16", {"device_map": "cpu"}, model_id_or_path=str(out))
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("Hello")])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_run_demo_streams_its_reply_and_reuses_the_checkpoint(tmp_path, monkeypatch, capsys):
    from vlswift.demo import run_demo

    monkeypatch.chdir(tmp_path)  # a relative folder: the same prompt, so the same reply, every run
    response = run_demo(folder="demo")
    first = capsys.readouterr().out
    assert "building a tiny random checkpoint" in first
    assert (tmp_path / "demo" / "tiny-qwen-vl" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "example.png").is_file()
    assert "<<< Picture 1:<img>demo/example.png</img>\nWhat is in this picture?\n" in first
    # What was streamed piece by piece adds up to the returned reply, then the separator follows.
    assert response and f"\n{response}\n{SEPARATOR}\n" in first

    assert run_demo(folder="demo") == response
    second = capsys.readouterr().out
    assert "building" not in second
    assert f"\n{response}\n{SEPARATOR}\n" in second


@pytest.mark.slow
def test_vlswift_demo_cli_writes_only_under_home(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VLSWIFT_DEMO_DIR" and not k.startswith("XDG_")}
    # Hub caches point into the temp folder too, so a write there would show up below.
    env.update(HOME=str(home), HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "vlswift.cli", "demo"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "<<< Picture 1:<img>" in out.replace("\n", "")  # Rich folds the long prompt line
    reply = out.split("What is in this picture?\n", 1)[1].split(f"\n{SEPARATOR}\n", 1)[0]
    assert reply.strip(), out
    demo = home / ".cache" / "vlswift" / "demo"
    assert (demo / "tiny-qwen-vl" / "config.json").is_file() and (demo / "example.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "home"]
    assert not any(cwd.iterdir())
    assert [p.relative_to(home) for p in home.iterdir()] == [Path(".cache")]
