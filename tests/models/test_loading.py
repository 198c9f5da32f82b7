"""Checkpoint loading: layouts, dtypes and the errors a user sees for bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlswift.models.loading import (CheckpointError, checkpoint_files, load_pretrained, resolve_dtype,
                                    resolve_model_dir, write_sharded_safetensors)


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_safetensors_and_bin_load_the_same(tiny_ckpt, tmp_path):
    ref = load_pretrained(tiny_ckpt, torch.float32, "cpu")
    state = load_file(str(tiny_ckpt / "model.safetensors"))

    sharded = copy_ckpt(tiny_ckpt, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    write_sharded_safetensors(state, sharded, torch.float32, "200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(sharded)) > 2

    bins = copy_ckpt(tiny_ckpt, tmp_path / "bins")
    (bins / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:]), 1):
        torch.save({k: state[k] for k in part}, bins / f"pytorch_model-0000{i}-of-00002.bin")

    for folder in (sharded, bins):
        other = load_pretrained(folder, torch.float32, "cpu")
        for (k, a), (_, b) in zip(ref.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), k


def test_wrong_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_model_dir("qwen-vl-chat", str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path / "empty", torch.float32, "cpu")


def test_not_a_qwen_config(tiny_ckpt, tmp_path):
    folder = copy_ckpt(tiny_ckpt, tmp_path / "llama")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Qwen-VL config"):
        load_pretrained(folder, torch.float32, "cpu")


def test_tensor_of_wrong_shape(tiny_ckpt, tmp_path):
    folder = copy_ckpt(tiny_ckpt, tmp_path / "bad-shape")
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:-1]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.weight has shape"):
        load_pretrained(folder, torch.float32, "cpu")


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    folder = copy_ckpt(tiny_ckpt, tmp_path / "missing")
    state = load_file(str(folder / "model.safetensors"))
    del state["transformer.ln_f.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): transformer\.ln_f\.weight"):
        load_pretrained(folder, torch.float32, "cpu")


def test_no_weights(tiny_ckpt, tmp_path):
    folder = copy_ckpt(tiny_ckpt, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(folder, torch.float32, "cpu")


def test_offline_hub_download_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"could not download Qwen/Qwen-VL-Chat .*--model_id_or_path DIR") as e:
        resolve_model_dir("qwen-vl-chat")
    message = str(e.value)
    assert "\n" not in message
    assert "model_id_or_path=DIR in Python" in message  # the way to say it through the Python API too
    assert "no local folder" not in message  # nothing local was asked for


def test_hub_failure_reason_is_cut_at_a_word_boundary(monkeypatch):
    import huggingface_hub

    words = " ".join(f"word{i:03d}" for i in range(60))  # 8 characters a word: 160 falls inside one

    def fail(repo_id, **_):
        raise OSError(words + "\nsecond line")

    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError) as e:
        resolve_model_dir("qwen-vl-chat")
    message = str(e.value)
    assert "\n" not in message and "second line" not in message
    reason = message.split("offline or unreachable: ", 1)[1].split(")", 1)[0]
    assert reason.endswith("…") and len(reason) <= 161
    assert words.startswith(reason[:-1] + " ")  # whole words only


def test_mistyped_relative_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo").mkdir()
    # One slash, no leading ./ or /: it is tried as a hub id, so the error must say it is no folder either.
    with pytest.raises(CheckpointError, match=r"could not download typo/dir .* and there is no local folder typo/dir; "
                                              r"pass a local checkpoint folder") as e:
        resolve_model_dir("qwen-vl-chat", "typo/dir")
    assert "\n" not in str(e.value)


def test_dtypes():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("AUTO", "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")


def test_bf16_weights_load_as_bf16(tiny_ckpt):
    model = load_pretrained(tiny_ckpt, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in model.parameters())
