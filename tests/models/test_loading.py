"""Checkpoint loading: layouts, dtypes and the errors a user sees for bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlswift.models.config import OFFICIAL_CONFIG_KEYS, official_config_dict
from vlswift.models.loading import (CheckpointError, checkpoint_files, load_pretrained, resolve_dtype,
                                    resolve_model_dir, write_sharded_safetensors)
from vlswift.models.tiny import make_tiny_checkpoint


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
    assert len(reason) <= 160
    head, tail = reason.split(" … ")  # the start (what failed) and the end (the root cause), whole words
    assert words.startswith(head + " ") and words.endswith(" " + tail)


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


def test_save_pretrained_round_trip(tiny_ckpt, tmp_path):
    from vlswift import get_model_tokenizer

    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        model, tokenizer = get_model_tokenizer("qwen-vl-chat", dtype, {"device_map": "cpu"},
                                               model_id_or_path=str(tiny_ckpt))
        out = tmp_path / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        # A drop-in for the official remote code: its keys only, dtype flags matching the weights.
        assert sorted(config) == sorted(OFFICIAL_CONFIG_KEYS)
        assert config == official_config_dict(model.config, name)
        again, _ = get_model_tokenizer("qwen-vl-chat", dtype, {"device_map": "cpu"}, model_id_or_path=str(out))
        assert {p.dtype for p in again.parameters()} == {dtype}
        state, reloaded = model.state_dict(), again.state_dict()
        assert state.keys() == reloaded.keys()
        assert all(torch.equal(state[k], reloaded[k]) for k in state)
        ids = torch.tensor([tokenizer.encode("Hello, world! What is in the picture?")])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, again(ids).logits)


# Each load runs in a fresh interpreter (so no load can reuse memory an earlier one freed, unseen)
# that reports its peak resident set size (reset through /proc/self/clear_refs, read from VmHWM)
# after every weight has been read, so weights mapped from the file count as well as copies. Two
# deliberately wasteful loaders are measured alongside ours: they show the measurement does see a
# second copy.
MEMORY_SCRIPT = """
    import gc
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from vlswift.models.config import load_config
    from vlswift.models.loading import build_model, checkpoint_files, load_pretrained

    def ours(folder):
        return load_pretrained(folder, torch.float32, "cpu")

    def naive(folder):  # a randomly initialised model, then the state dict copied into it
        model = build_model(load_config(folder), torch.float32, "cpu")
        model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        return model

    def all_shards_at_once(folder):
        model = build_model(load_config(folder), torch.float32, "meta")
        state = {k: v for f in checkpoint_files(Path(folder)) for k, v in load_file(str(f)).items()}
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        return model

    loader, warm, folder = sys.argv[1:]
    reset_peak()  # skips at once where the peak cannot be reset
    ours(warm)  # lazy imports and first allocations stay out of the measured load
    gc.collect()
    before = status("VmRSS:")
    reset_peak()
    model = {"ours": ours, "naive": naive, "all_shards_at_once": all_shards_at_once}[loader](folder)
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    print(json.dumps({"growth": status("VmHWM:") - before}))
"""


@pytest.fixture(scope="module")
def load_memory(tiny_ckpt, tmp_path_factory, peak_rss_run) -> dict:
    """Peak RSS growth of loading ~110 MB of fp32 weights: one file, and bf16 shards loaded as fp32."""
    root = tmp_path_factory.mktemp("load-memory")
    single = make_tiny_checkpoint(root / "single", hidden_size=768, layers=4)
    state = load_file(str(single / "model.safetensors"))
    sharded = root / "sharded"
    shutil.copytree(single, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    write_sharded_safetensors(state, sharded, torch.bfloat16, "12MB")
    shards = list(sharded.glob("model-*.safetensors"))
    result = {}
    for name, loader, folder in [("naive", "naive", single), ("single", "ours", single),
                                 ("all_shards_at_once", "all_shards_at_once", sharded), ("sharded", "ours", sharded)]:
        result[name] = peak_rss_run(MEMORY_SCRIPT, loader, str(tiny_ckpt), str(folder))
    result["weight_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    result["shard_bytes"] = max(p.stat().st_size for p in shards)
    result["shards"] = len(shards)
    return result


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def test_load_peak_is_one_copy_of_the_weights(load_memory):
    weights = load_memory["weight_bytes"]
    naive, ours = load_memory["naive"]["growth"], load_memory["single"]["growth"]
    assert naive > 1.8 * weights, f"the naive load took {mb(naive)} for {mb(weights)}: the measurement misses copies"
    assert ours < 1.5 * weights, f"load_pretrained peaked at {mb(ours)} for {mb(weights)} of weights"


def test_sharded_load_peak_is_one_copy_plus_a_shard(load_memory):
    weights, shard = load_memory["weight_bytes"], load_memory["shard_bytes"]
    assert load_memory["shards"] >= 5
    # bf16 shards cast to fp32: each shard is read, cast and dropped before the next one.
    limit = weights + 2 * shard
    wasteful, ours = load_memory["all_shards_at_once"]["growth"], load_memory["sharded"]["growth"]
    assert wasteful > limit, f"holding every shard took only {mb(wasteful)}: the measurement misses copies"
    assert ours < limit, f"sharded load peaked at {mb(ours)} for {mb(weights)} of weights in {mb(shard)} shards"
