"""``vlswift export --merge_lora true``: the merged folder computes what base + adapter computes,
is laid out like the official checkpoint, and is written safely with bounded memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlswift.export import ExportArguments, ExportError, export_main, merge_lora_checkpoint
from vlswift.models.loading import checkpoint_files, load_pretrained
from vlswift.models.tiny import make_tiny_checkpoint

# Name -> LoraConfig arguments. DEFAULT and ALL are swift's --lora_target_modules; "extras" covers
# rslora, an embedding LoRA, trained biases and modules_to_save (whole tensors in the adapter).
LORA_CASES = {
    "DEFAULT": {"target_modules": ["c_attn"]},
    "ALL": {"target_modules": "ALL"},
    "extras": {"target_modules": ["c_attn", "wte"], "use_rslora": True, "bias": "lora_only",
               "modules_to_save": ["ln_f"]},
}


def all_linear_names(model: nn.Module) -> list[str]:
    """swift's ALL: the name of every nn.Linear but lm_head (vision tower and resampler included)."""
    linears = (n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    return sorted({n.rsplit(".", 1)[-1] for n in linears})


def make_lora_checkpoint(base: Path, run_dir: Path, seed: int = 0, **lora_kwargs):
    """A fake `vlswift sft --sft_type lora` checkpoint whose trained weights are random (non-zero B).

    Returns the in-memory peft model (base + adapter) and the checkpoint folder.
    """
    from peft import LoraConfig, get_peft_model

    model = load_pretrained(base, torch.float32, "cpu")
    if lora_kwargs.get("target_modules") == "ALL":
        lora_kwargs["target_modules"] = all_linear_names(model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * 0.05
                p.copy_(noise if "lora_B" in name or "lora_embedding_B" in name else p + noise)
    ckpt = run_dir / "checkpoint-5"
    peft_model.save_pretrained(ckpt)
    sft_args = {"model_type": "qwen-vl-chat", "model_id_or_path": str(base), "sft_type": "lora",
                "lora_target_modules": lora_kwargs["target_modules"], "dtype": "fp32", "max_length": 2048}
    for folder in (run_dir, ckpt):
        (folder / "sft_args.json").write_text(json.dumps(sft_args, indent=2))
    return peft_model.eval(), ckpt


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def assert_merged_logits(merged: nn.Module, adapted: nn.Module, base: nn.Module, enc: dict, min_change: float,
                         case: tuple) -> None:
    """The merged model's float32 last-position logits for the encoded query ``enc`` are base +
    adapter's within 1e-4, and the base model's differ from them by more than ``min_change``."""
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        want = adapted(input_ids=ids, images=enc["images"]).logits[0, -1]
        got = merged(ids, images=enc["images"]).logits[0, -1]
        before = base(ids, images=enc["images"]).logits[0, -1]
    assert got.dtype == want.dtype == torch.float32, case
    assert (got - want).abs().max().item() < 1e-4, case
    assert (before - want).abs().max().item() > min_change, ("the adapter should change the model", case)


def leftovers(target: Path) -> list[str]:
    """Temp folders a merge into ``target`` left beside it."""
    return [p.name for p in target.parent.glob(f".{target.name}.*")]


@pytest.fixture(scope="module")
def image_query(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "grad.png"
    Image.frombytes("RGB", (64, 48), bytes((i * 7) % 256 for i in range(64 * 48 * 3))).save(path)
    return f"Picture 1:<img>{path}</img>\nWhat is in the picture?"


@pytest.fixture(scope="module")
def lora_runs(tiny_ckpt, tmp_path_factory):
    """case name -> (case name, peft model, LoRA checkpoint, merged folder), built once per case."""
    runs = {}

    def get(name: str):
        if name not in runs:
            peft_model, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path_factory.mktemp(f"run-{name}"),
                                                    **dict(LORA_CASES[name]))
            runs[name] = name, peft_model, ckpt, merge_lora_checkpoint(ckpt)
        return runs[name]

    return get


@pytest.fixture(params=list(LORA_CASES))
def merged_run(request, lora_runs):
    return lora_runs(request.param)


def test_merged_logits_equal_base_plus_adapter(merged_run, tiny_ckpt, image_query):
    from vlswift.api import get_model_tokenizer, get_template

    name, peft_model, ckpt, merged_dir = merged_run
    merged, tokenizer = get_model_tokenizer("qwen-vl-chat", torch.float32, {"device_map": "cpu"},
                                            model_id_or_path=str(merged_dir))
    base = load_pretrained(tiny_ckpt, torch.float32, "cpu")
    template = get_template("qwen", tokenizer)
    for query in ("Say something.", image_query):
        assert_merged_logits(merged, peft_model, base, template.encode(query), min_change=1e-2, case=(name, query))


def test_all_targets_merge_into_the_vision_tower(lora_runs, tiny_ckpt):
    *_, merged_dir = lora_runs("ALL")
    base, merged = load_file(str(tiny_ckpt / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    for key in ("transformer.visual.transformer.resblocks.0.attn.in_proj.weight",
                "transformer.visual.transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.visual.attn_pool.attn.out_proj.weight",
                "transformer.visual.attn_pool.kv_proj.weight",
                "transformer.h.1.mlp.w2.weight"):
        assert key in changed, key
    # Only weights of linear layers change: norms, embeddings, biases and the lm_head stay.
    assert all(k.endswith(".weight") and "ln" not in k and k != "lm_head.weight" for k in changed)


def test_greedy_replies_equal_base_plus_adapter(merged_run, image_query):
    from vlswift.api import get_template
    from vlswift.checkpoint import load_ckpt_model
    from vlswift.infer.engine import SamplingConfig, generate_stream

    name, _, ckpt, merged_dir = merged_run
    replies = []
    for folder in (ckpt, merged_dir):  # peft on the base, then the merged folder as a full checkpoint
        model, tokenizer, info = load_ckpt_model(folder, torch.float32, {"device_map": "cpu"})
        assert info.kind == ("lora" if folder == ckpt else "full")
        template = get_template("qwen", tokenizer)
        cfg = SamplingConfig(max_new_tokens=12, stop_token_ids=template.stop_token_ids)  # greedy
        # Generated ids, not text: a random tiny model may pick padded vocabulary rows the tokenizer
        # cannot decode.
        for query in ("Hello!", image_query):
            enc = template.encode(query)
            *_, last = generate_stream(model, [enc["input_ids"]], enc["images"], cfg, tokenizer.pad_token_id)
            replies.append(last[0])
    assert replies[:2] == replies[2:], name
    assert all(len(r) > 1 for r in replies), "greedy decoding should run for several tokens"


def write_sft_data(folder: Path) -> Path:
    """Two rows for a short real LoRA run: one about a picture, one text-only."""
    from PIL import Image

    Image.frombytes("RGB", (40, 40), bytes((i * 11) % 256 for i in range(40 * 40 * 3))).save(folder / "pic.png")
    rows = [{"query": "Picture 1:<img>pic.png</img>\nWhat is it?", "response": "A pattern."},
            {"query": "Hello!", "response": "Hi there."}]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_runs(tiny_ckpt, tmp_path_factory):
    """target ("DEFAULT"/"ALL") -> run folder of a real 4-step `vlswift sft --sft_type lora` run
    (checkpoints at steps 2 and 4), trained once per target."""
    from vlswift.train.args import SftArguments
    from vlswift.train.recipe import sft_main

    data = write_sft_data(tmp_path_factory.mktemp("sft-data"))
    runs = {}

    def get(target: str) -> Path:
        if target not in runs:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny ops: a second thread only spins when the cores are shared
            try:
                result = sft_main(SftArguments(
                    model_id_or_path=str(tiny_ckpt), dataset=[str(data)], dataset_test_ratio=0.0,
                    output_dir=str(tmp_path_factory.mktemp(f"sft-{target}")), lora_target_modules=[target],
                    max_steps=4, save_steps=2, eval_steps=1000, batch_size=2, gradient_accumulation_steps=1,
                    learning_rate=2e-2, warmup_ratio=0.0, lora_dropout_p=0.0, gradient_checkpointing=False,
                    dtype="fp32", dataloader_num_workers=0, disable_tqdm=True,
                ))
            finally:
                torch.set_num_threads(threads)
            runs[target] = Path(result["run_dir"])
        return runs[target]

    return get


@pytest.mark.parametrize("target", ["DEFAULT", "ALL"])
def test_real_sft_checkpoint_merges_to_base_plus_adapter(sft_runs, target, tiny_ckpt, image_query):
    from peft import PeftModel

    from vlswift.api import get_template
    from vlswift.infer.engine import SamplingConfig, generate_stream
    from vlswift.tokenizer import QWenTokenizer

    ckpt = sft_runs(target) / "checkpoint-4"
    assert json.loads((ckpt / "sft_args.json").read_text())["lora_target_modules"] == [target]
    merged_dir = merge_lora_checkpoint(ckpt)
    assert stat.S_IMODE(merged_dir.stat().st_mode) == stat.S_IMODE(ckpt.stat().st_mode)  # as readable as the run
    merged = load_pretrained(merged_dir, torch.float32, "cpu")
    base_plus_adapter = PeftModel.from_pretrained(load_pretrained(tiny_ckpt, torch.float32, "cpu"), str(ckpt),
                                                  is_trainable=False).eval()
    base = load_pretrained(tiny_ckpt, torch.float32, "cpu")
    if target == "ALL":
        assert any(".visual." in n and ".lora_A." in n for n, _ in base_plus_adapter.named_parameters()), \
            "ALL should put LoRA on the vision tower too"
    template = get_template("qwen", QWenTokenizer.from_pretrained(tiny_ckpt))
    cfg = SamplingConfig(max_new_tokens=12, stop_token_ids=template.stop_token_ids)  # greedy
    for query in ("Hello!", image_query):
        enc = template.encode(query)
        # min_change: the training steps should change the model.
        assert_merged_logits(merged, base_plus_adapter, base, enc, min_change=1e-3, case=(target, query))
        # Generated ids, not text: the tiny model may pick vocabulary rows the tokenizer cannot decode.
        replies = []
        for model in (base_plus_adapter, merged):
            *_, last = generate_stream(model, [enc["input_ids"]], enc["images"], cfg, template.tokenizer.pad_token_id)
            replies.append(last[0])
        assert replies[0] == replies[1] and len(replies[0]) > 1, (target, query)


def test_run_folder_as_ckpt_dir_names_its_newest_checkpoint(sft_runs, tiny_ckpt, tmp_path):
    run = sft_runs("DEFAULT")
    merge_lora_checkpoint(run / "checkpoint-2", overwrite=True)  # an export is no checkpoint to suggest
    before = {p.name for p in run.iterdir()}
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-2-merged", "last"} <= before
    newest = re.escape(str(run / "checkpoint-4"))
    with pytest.raises(ExportError, match=rf"is a run folder, not a checkpoint: did you mean {newest}\?"):
        merge_lora_checkpoint(run)
    assert {p.name for p in run.iterdir()} == before

    # A full fine-tune's run folder: its newest checkpoint is a model already, no LoRA to merge.
    full_run = tmp_path / "v0-full"
    shutil.copytree(tiny_ckpt, full_run / "checkpoint-3")
    (full_run / "checkpoint-3" / "training_state.pt").write_bytes(b"")
    (full_run / "sft_args.json").write_text("{}")
    with pytest.raises(ExportError, match=r"run folder of a full fine-tune: its newest checkpoint .*checkpoint-3 "
                                          r"is already a full model"):
        merge_lora_checkpoint(full_run)


def test_merged_folder_has_the_base_layout(merged_run, tiny_ckpt):
    from vlswift.checkpoint import inspect_ckpt_dir

    _, _, ckpt, merged_dir = merged_run
    assert merged_dir == ckpt.with_name("checkpoint-5-merged")
    assert tensor_shapes(merged_dir) == tensor_shapes(tiny_ckpt)
    base_config = json.loads((tiny_ckpt / "config.json").read_text())
    config = json.loads((merged_dir / "config.json").read_text())
    assert list(config) == list(base_config) and "auto_map" not in config
    assert config == base_config  # same dtype (the base's torch_dtype), same values
    for fname in ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken"):
        assert (merged_dir / fname).read_bytes() == (tiny_ckpt / fname).read_bytes(), fname
    sft_args = json.loads((merged_dir / "sft_args.json").read_text())
    assert sft_args["sft_type"] == "full" and sft_args["model_type"] == "qwen-vl-chat"
    assert sft_args["merged_from"] == {"ckpt_dir": str(ckpt), "model_id_or_path": str(tiny_ckpt.resolve())}
    assert sft_args["max_length"] == 2048  # the run's other arguments are kept for reference
    assert inspect_ckpt_dir(merged_dir).kind == "full"
    assert not leftovers(merged_dir)


def test_merged_golden_checkpoint_is_a_drop_in(golden_ckpt, golden_dir, tmp_path):
    _, ckpt = make_lora_checkpoint(golden_ckpt, tmp_path / "run", target_modules="ALL")
    merged = merge_lora_checkpoint(ckpt, tmp_path / "merged", add_remote_code_map=True)
    golden_config = json.loads((golden_dir / "tiny-qwen-vl" / "config.json").read_text())
    config = json.loads((merged / "config.json").read_text())
    assert set(config) == set(golden_config) | {"auto_map"}
    assert config["auto_map"] == {"AutoConfig": "configuration_qwen.QWenConfig",
                                  "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    assert {k: v for k, v in config.items() if k != "auto_map"} == golden_config
    assert tensor_shapes(merged) == tensor_shapes(golden_ckpt)  # names and shapes of the official file
    # The golden weights are stored in bfloat16 but its config says float32: the config decides.
    assert {t.dtype for t in load_file(str(merged / "model.safetensors")).values()} == {torch.float32}


def test_small_shards_and_dtype(tiny_ckpt, tmp_path):
    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn", "w1"])
    single = load_file(str(merge_lora_checkpoint(ckpt) / "model.safetensors"))

    sharded = merge_lora_checkpoint(ckpt, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for path in shards:
        part = load_file(str(path))
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 100_000
        assert all(index["weight_map"][k] == path.name for k in part)
    model = load_pretrained(sharded, torch.float32, "cpu")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in single.items())

    bf16 = merge_lora_checkpoint(ckpt, tmp_path / "bf16", dtype="bf16")
    weights = load_file(str(bf16 / "model.safetensors"))
    assert all(torch.equal(weights[k], v.to(torch.bfloat16)) for k, v in single.items())
    config = json.loads((bf16 / "config.json").read_text())
    assert (config["torch_dtype"], config["bf16"], config["fp32"]) == ("bfloat16", True, False)
    assert json.loads((bf16 / "sft_args.json").read_text())["dtype"] == "bf16"


def test_merge_peak_memory_stays_near_one_copy(tmp_path, peak_rss_run):
    # Big enough (~50 MB of weights) that allocator noise does not dominate.
    base = make_tiny_checkpoint(tmp_path / "base", hidden_size=512, layers=4)
    _, ckpt = make_lora_checkpoint(base, tmp_path / "run", target_modules="ALL")
    weight_bytes = sum(t.numel() * t.element_size() for t in load_file(str(base / "model.safetensors")).values())
    result = peak_rss_run("""
        import torch, safetensors.torch
        import vlswift.checkpoint, vlswift.models.config, vlswift.models.loading
        from vlswift.export import merge_lora_checkpoint

        before = status("VmRSS:")
        reset_peak()
        merge_lora_checkpoint(sys.argv[1])
        print(json.dumps({"before": before, "peak": status("VmHWM:")}))
    """, str(ckpt))
    used = result["peak"] - result["before"]
    assert used < 2.5 * weight_bytes, f"merge used {used / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"


def test_export_main(tiny_ckpt, tmp_path, capsys):
    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])
    out = export_main(ExportArguments(str(ckpt), merge_lora=True, max_shard_size="100KB", dtype="AUTO"))
    assert out == ckpt.with_name("checkpoint-5-merged") and (out / "model.safetensors.index.json").is_file()
    assert f"saved to {out}" in capsys.readouterr().out


def test_cli(tiny_ckpt, tmp_path, capsys):
    from vlswift.cli import main

    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_dir", str(ckpt), "--merge_lora", "true", "--output_dir", str(tmp_path / "cli"),
              "--max_shard_size", "100KB", "--dtype", "fp16"])
    assert e.value.code in (0, None)
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["torch_dtype"] == "float16"
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()

    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_dir", str(ckpt), "--merge_lora", "true", "--output_dir", str(tmp_path / "cli")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite true" in err and "Traceback" not in err


def test_refuses_what_is_not_a_lora_checkpoint(tiny_ckpt, tmp_path):
    with pytest.raises(ExportError, match="no such folder"):
        merge_lora_checkpoint(tmp_path / "nope")
    with pytest.raises(ExportError, match="already a full model"):
        merge_lora_checkpoint(tiny_ckpt, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a LoRA checkpoint"):
        merge_lora_checkpoint(tmp_path / "empty")
    with pytest.raises(ExportError, match="--ckpt_dir is required"):
        ExportArguments()
    with pytest.raises(ExportError, match="pass --merge_lora true"):
        export_main(ExportArguments(str(tmp_path / "empty")))
    assert not (tmp_path / "out").exists()


def test_refuses_adapters_it_cannot_merge(tiny_ckpt, tmp_path):
    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])

    def variant(name: str, edit_config=None, edit_weights=None, config_text=None) -> Path:
        folder = tmp_path / name / "checkpoint-5"
        shutil.copytree(ckpt, folder)
        if config_text:
            (folder / "adapter_config.json").write_text(config_text)
        if edit_config:
            config = json.loads((folder / "adapter_config.json").read_text())
            edit_config(config)
            (folder / "adapter_config.json").write_text(json.dumps(config))
        if edit_weights:
            weights = load_file(str(folder / "adapter_model.safetensors"))
            save_file(edit_weights(weights), str(folder / "adapter_model.safetensors"))
        return folder

    def rename(weights):
        for half in ("lora_A", "lora_B"):
            key = f"base_model.model.transformer.h.0.attn.c_attn.{half}.weight"
            weights[key.replace("c_attn", "q_proj")] = weights.pop(key)
        return weights

    cases = [
        (variant("dora", edit_config=lambda c: c.update(use_dora=True)), "DoRA"),
        (variant("ia3", edit_config=lambda c: c.update(peft_type="IA3")), "only LoRA adapters"),
        (variant("pissa", edit_config=lambda c: c.update(init_lora_weights="pissa")), "rewrote the base weights"),
        (variant("broken", config_text='{"r": 8,\n "lora_alpha": }'), r"adapter_config.json: not valid JSON \(line 2"),
        (variant("stray", edit_weights=rename), r"transformer\.h\.0\.attn\.q_proj\.weight match no tensor"),
        (variant("half", edit_weights=lambda w: {k: v for k, v in w.items() if "h.1.attn.c_attn.lora_B" not in k}),
         "only one of lora_A/lora_B"),
    ]
    for folder, message in cases:
        with pytest.raises(ExportError, match=message):
            merge_lora_checkpoint(folder)
        assert not folder.with_name("checkpoint-5-merged").exists() and not leftovers(folder)

    other_base = make_tiny_checkpoint(tmp_path / "other-base", hidden_size=32)
    with pytest.raises(ExportError, match="trained on another base model"):
        merge_lora_checkpoint(ckpt, base_dir=other_base)

    moved = variant("moved")
    (moved / "sft_args.json").write_text(json.dumps({"model_id_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match=r"gone \(from sft_args.json\).*pass --model_id_or_path"):
        merge_lora_checkpoint(moved)


def test_overwrite_only_when_asked_and_only_once_complete(tiny_ckpt, tmp_path, monkeypatch):
    from vlswift import export

    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])
    target = merge_lora_checkpoint(ckpt)
    (target / "marker").write_text("old")
    with pytest.raises(ExportError, match="already exists; pass --overwrite true"):
        merge_lora_checkpoint(ckpt)
    assert (target / "marker").is_file()

    # A merge that fails half-way (weights written, config not) leaves the old folder untouched.
    def fail(out, *args):
        assert (out / "model.safetensors").is_file()
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_merged_metadata", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_lora_checkpoint(ckpt, overwrite=True)
    assert (target / "marker").is_file() and not leftovers(target)

    monkeypatch.undo()
    assert merge_lora_checkpoint(ckpt, overwrite=True) == target
    assert not (target / "marker").exists() and (target / "model.safetensors").is_file()
    assert not leftovers(target)
    for folder in (tiny_ckpt, ckpt, ckpt.parent):
        with pytest.raises(ExportError, match="would overwrite the checkpoint or the base model"):
            merge_lora_checkpoint(ckpt, folder, overwrite=True)
    assert (ckpt / "adapter_config.json").is_file()


def test_merged_files_reach_the_disk_before_the_rename(tiny_ckpt, tmp_path, monkeypatch):
    """A new and an overwriting merge: each file and folder is fsynced before the temp folder is
    renamed to the target, the parent folder (the rename) after it, before the old one is deleted."""
    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])
    target = tmp_path / "out" / "merged"
    synced: list[tuple[int, int]] = []
    renames: list[tuple[Path, int]] = []  # (destination, fsync calls before it)
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    def identity(path: Path) -> tuple[int, int]:
        st = path.lstat()
        return st.st_dev, st.st_ino

    def replace(src, dst):
        if Path(dst) == target:
            unsynced = [p for p in [Path(src), *Path(src).rglob("*")] if identity(p) not in synced]
            assert unsynced == [], "renamed into place before these were fsynced"
        renames.append((Path(dst), len(synced)))
        real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(f".{target.name}.old-"):  # the replaced folder goes once the new one is durable
            assert identity(target.parent) in synced[renames[-1][1]:]
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    for overwrite in (False, True):
        synced.clear()
        renames.clear()
        assert merge_lora_checkpoint(ckpt, target, max_shard_size="100KB", overwrite=overwrite) == target
        assert len(list(target.glob("model-*.safetensors"))) > 1
        (i,) = [n for n, (dst, _) in enumerate(renames) if dst == target]
        assert identity(target.parent) in synced[renames[i][1]:], "the rename itself was not fsynced"
    assert not leftovers(target)


def test_merged_folder_has_the_umask_mode(tiny_ckpt, tmp_path):
    _, ckpt = make_lora_checkpoint(tiny_ckpt, tmp_path / "run", target_modules=["c_attn"])
    old = os.umask(0o022)
    try:
        group_readable = merge_lora_checkpoint(ckpt, tmp_path / "022")
        os.umask(0o027)
        private_to_others = merge_lora_checkpoint(ckpt, tmp_path / "027")
    finally:
        os.umask(old)
    # The mode a plain mkdir gives (as the checkpoint's own folder has), not mkdtemp's 0700.
    assert stat.S_IMODE(group_readable.stat().st_mode) == 0o755
    assert stat.S_IMODE(private_to_others.stat().st_mode) == 0o750
    for path in group_readable.iterdir():  # and every file in it is readable by the serving process
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name
