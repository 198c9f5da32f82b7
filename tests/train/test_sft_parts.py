"""The recipe's parts on their own: LoRA targets, data shards, the schedule, checkpoints, logs, launch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlswift.train import distributed
from vlswift.train.checkpointing import Checkpoints, find_resume_checkpoint, new_run_dir
from vlswift.train.lora import apply_lora, resolve_target_modules
from vlswift.train.recipe import lr_factor
from vlswift.train.tracking import plot_losses, smooth


@pytest.fixture(scope="module")
def tiny_model(fast_ckpt):
    from vlswift.models.loading import load_pretrained

    return load_pretrained(fast_ckpt, torch.float32, "cpu")


# ---------------------------------------------------------------------------------------------
# LoRA


def test_default_targets_are_the_llm_attention_inputs(tiny_model):
    assert resolve_target_modules(tiny_model, ["DEFAULT"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_all_targets_every_linear_layer_but_the_head(tiny_model):
    names = resolve_target_modules(tiny_model, ["ALL"])
    linears = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == [n for n in linears if n != "lm_head"]
    assert "transformer.visual.transformer.resblocks.1.mlp.c_fc" in names  # vision tower
    assert "transformer.visual.attn_pool.attn.out_proj" in names  # resampler
    assert "transformer.h.0.mlp.w1" in names


def test_explicit_targets_match_by_name_suffix(tiny_model):
    assert resolve_target_modules(tiny_model, ["w1", "attn.c_proj"]) == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.w1", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.w1"]
    with pytest.raises(ValueError, match="--lora_target_modules q_proj: no linear layer .* c_attn, c_fc, c_proj"):
        resolve_target_modules(tiny_model, ["q_proj"])


def test_lora_model_takes_images_and_trains_only_the_adapter_with_checkpointing(fast_ckpt):
    """No task_type: the PeftModel passes ``images`` through; non-reentrant checkpointing works
    with the frozen embeddings and vision tower (no in-place or no-grad errors)."""
    from vlswift.models.loading import load_pretrained
    from vlswift.template import get_template
    from vlswift.tokenizer import QWenTokenizer

    from PIL import Image

    model = load_pretrained(fast_ckpt, torch.float32, "cpu")
    model.gradient_checkpointing_enable()
    model = apply_lora(model, resolve_target_modules(model, ["DEFAULT"]), 8, 32, 0.05)
    model.train()
    assert model.peft_config["default"].base_model_name_or_path == str(fast_ckpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    image = Path(fast_ckpt) / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    template = get_template("qwen", QWenTokenizer.from_pretrained(fast_ckpt))
    enc = template.encode(f"Picture 1:<img>{image}</img>\nColour?", [], None, "red")
    out = model(input_ids=torch.tensor([enc["input_ids"]]), images=enc["images"], labels=torch.tensor([enc["labels"]]))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


# ---------------------------------------------------------------------------------------------
# Data shards and the schedule


def test_two_ranks_see_the_global_batches_of_one_process():
    one = distributed.ShardSampler(10, 0, 1, seed=3, epoch=1).indices
    ranks = [distributed.ShardSampler(10, r, 2, seed=3, epoch=1).indices for r in range(2)]
    for step in range(5):  # one process, batch 2 == two processes, batch 1
        assert sorted(one[2 * step:2 * step + 2]) == sorted([ranks[0][step], ranks[1][step]])
    assert sorted(one) == list(range(10))
    assert distributed.ShardSampler(10, 0, 1, seed=3, epoch=2).indices != one  # reshuffled per epoch
    assert distributed.ShardSampler(10, 1, 2, seed=3, epoch=1, skip=2).indices == ranks[1][2:]


def test_uneven_shards_are_padded_and_marked():
    shards = [distributed.ShardSampler(5, r, 2, shuffle=False) for r in range(2)]
    assert [s.indices for s in shards] == [[0, 2, 4], [1, 3, 0]]
    assert [s.is_padding for s in shards] == [[False, False, False], [False, False, True]]


def test_learning_rate_schedules():
    linear = [lr_factor(s, "linear", total=10, warmup=2) for s in range(11)]
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[6] == pytest.approx(0.5) and linear[10] == 0.0
    cosine = [lr_factor(s, "cosine", total=10, warmup=0) for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert [lr_factor(s, "constant", total=10, warmup=1) for s in (0, 1, 9)] == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Run folder and checkpoints


def test_run_folders_are_numbered_like_swift(tmp_path):
    first = new_run_dir(tmp_path, "qwen-vl-chat")
    second = new_run_dir(tmp_path, "qwen-vl-chat")
    assert first.parent == tmp_path / "qwen-vl-chat"
    assert first.name.startswith("v0-") and second.name.startswith("v1-") and len(first.name) == len("v0-20240101-120000")


def save(checkpoints: Checkpoints, step: int, eval_loss: float | None) -> None:
    checkpoints.save(step, lambda folder: (folder / "weights").write_text(str(step)), eval_loss)


def test_rotation_keeps_the_best_and_the_newest(tmp_path):
    checkpoints = Checkpoints(tmp_path, save_total_limit=2, is_main=True)
    for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5)):
        save(checkpoints, step, loss)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert (tmp_path / "best").resolve().name == "checkpoint-20" and (tmp_path / "last").resolve().name == "checkpoint-40"
    assert (tmp_path / "last" / "weights").read_text() == "40"
    assert not list(tmp_path.glob(".*"))  # no temp folders or links left behind
    assert checkpoints.state() == {"best_checkpoint": str(tmp_path / "checkpoint-20"), "best_metric": 1.0}


def test_rotation_without_evaluation_and_without_limit(tmp_path):
    newest = Checkpoints(tmp_path / "a", save_total_limit=1, is_main=True)
    keep_all = Checkpoints(tmp_path / "b", save_total_limit=-1, is_main=True)
    for checkpoints in (newest, keep_all):
        checkpoints.run_dir.mkdir()
        for step in (1, 2, 3):
            save(checkpoints, step, None)
    assert [p.name for p in (tmp_path / "a").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (tmp_path / "a" / "best").exists() and newest.best is None
    assert len(list((tmp_path / "b").glob("checkpoint-*"))) == 3


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    checkpoints = Checkpoints(tmp_path, save_total_limit=2, is_main=True)

    def crash(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.save(5, crash, None)
    assert not list(tmp_path.iterdir()) and checkpoints.last is None


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Every file and folder of a checkpoint is fsynced before it is renamed into place, and the
    run folder (the rename) after it, before rotation deletes the older checkpoint."""
    import os

    def inode(path: Path) -> tuple[int, int]:
        st = path.lstat()
        return st.st_dev, st.st_ino

    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        if Path(dst).name.startswith("checkpoint-"):
            synced = {key for kind, key in events if kind == "fsync"}
            written = [Path(src), *Path(src).rglob("*")]
            assert [p.name for p in written if inode(p) not in synced] == []
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def write(folder: Path) -> None:  # weights plus a subfolder, as FSDP's sharded optimizer state
        (folder / "weights").write_text("w")
        (folder / "optimizer").mkdir()
        (folder / "optimizer" / "__0_0.distcp").write_bytes(b"state")

    checkpoints = Checkpoints(tmp_path, save_total_limit=1, is_main=True)
    checkpoints.save(1, write, None)
    checkpoints.save(2, write, None)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    renamed = events.index(("replace", "checkpoint-2"))
    deleted = events.index(("replace", ".checkpoint-1.deleting"))
    assert ("fsync", inode(tmp_path)) in events[renamed:deleted]


def test_best_of_an_earlier_run_is_linked_after_a_resume(tmp_path):
    earlier, later = tmp_path / "v0-a", tmp_path / "v1-b"
    earlier.mkdir()
    later.mkdir()
    first = Checkpoints(earlier, 2, True)
    save(first, 10, 1.0)
    resumed = Checkpoints(later, 2, True)
    resumed.load_state(first.state())
    save(resumed, 20, 2.0)
    assert (later / "best").resolve() == earlier / "checkpoint-10"
    assert (later / "last").resolve() == later / "checkpoint-20"


def test_resume_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*gone: no such folder"):
        find_resume_checkpoint(tmp_path / "gone")
    from vlswift.train.checkpointing import load_training_state

    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
        load_training_state(find_resume_checkpoint(tmp_path))


# ---------------------------------------------------------------------------------------------
# Logs and launching


def test_smoothing_and_plots(tmp_path):
    assert smooth([1.0, 1.0, 0.0]) == pytest.approx([1.0, 1.0, 0.9])
    written = plot_losses({"train_loss": [(1, 2.0), (2, 1.0), (3, float("nan"))], "eval_loss": []}, tmp_path)
    assert written == [tmp_path / "train_loss.png"] and written[0].read_bytes()[:4] == b"\x89PNG"


def test_torchrun_relaunch_command(monkeypatch, tmp_path):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert not distributed.torchrun_requested()
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert distributed.torchrun_requested()
    cmd = distributed.torchrun_command(tmp_path / "args.json")
    # torchrun's flags, run by vlswift's quiet torchrun agent (distributed.agent_main).
    assert cmd[1:] == ["-m", "vlswift.train.distributed", "--nproc_per_node", "4", "--master_port", "29501",
                       "-m", "vlswift.train.recipe", str(tmp_path / "args.json")]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already one of the torchrun processes
    assert not distributed.torchrun_requested()


def test_a_rank_error_reaches_the_launcher_as_one_line(tmp_path, monkeypatch):
    from vlswift.train.data import DatasetError

    monkeypatch.setenv(distributed.ERRORS_ENV, str(tmp_path))
    for rank, error in ((1, FileNotFoundError("--model_id_or_path m: no such folder")),
                        (0, DatasetError("data[1].jsonl:2: invalid JSON", "invalid JSON"))):
        monkeypatch.setenv("RANK", str(rank))
        assert distributed.report_error(error)
    raised = distributed.reported_error(tmp_path)
    assert type(raised) is DatasetError and str(raised) == "data[1].jsonl:2: invalid JSON"  # rank 0's
    (tmp_path / "rank0.json").unlink()
    raised = distributed.reported_error(tmp_path)
    assert type(raised) is FileNotFoundError and str(raised) == "[rank 1] --model_id_or_path m: no such folder"
    monkeypatch.delenv(distributed.ERRORS_ENV)
    assert not distributed.report_error(ValueError("x"))  # torchrun run by hand: the rank prints it


def test_the_start_line_says_how_many_samples_a_step_holds():
    from types import SimpleNamespace

    from vlswift.train.recipe import SftRecipe

    def sizes(rows: int, batch_size: int, accumulation: int, world_size: int) -> str:
        recipe = SftRecipe(SimpleNamespace(batch_size=batch_size, gradient_accumulation_steps=accumulation))
        recipe.dist, recipe.train_samples = SimpleNamespace(world_size=world_size), [None] * rows
        recipe.steps_per_epoch = recipe.count_steps_per_epoch()
        return recipe.describe_step_sizes()

    assert sizes(8, 2, 2, 1) == "4 samples"
    assert sizes(10, 2, 2, 1) == "4 samples (the last of each epoch: 2)"
    assert sizes(10, 1, 2, 2) == "4 samples (the last of each epoch: 2)"
    assert sizes(3, 1, 16, 1) == "3 samples"  # fewer rows than a global batch of 16
    assert sizes(3, 1, 8, 2) == "4 samples"  # the sampler repeats a row to even out the two shards


def images_and_rows(folder: Path, n: int, missing: set[int]) -> list[dict]:
    """``n`` one-picture rows; the rows in ``missing`` name a picture that does not exist."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(folder / "images" / "red.png")
    return [{"query": f"Picture 1:<img>images/{'gone' if i in missing else 'red'}.png</img>\nRow {i}?",
             "response": f"Reply {i}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_held_out_split_left_empty_means_no_evaluation_not_no_run(
        fast_ckpt, train_args, run_log, tmp_path, monkeypatch, capsys):
    """Every held-out row names a missing picture (which rows are held out depends on
    --dataset_seed): the run trains without evaluation. The skips are counted per split, and
    the messages keep the brackets of the paths (they are not Rich markup)."""
    from vlswift.train.data import split_dataset
    from vlswift.train.recipe import sft_main

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # one message, one line
    folder = tmp_path / "set[v1]"
    _, held_out = split_dataset(list(range(8)), 0.25, seed=42)
    data = write_jsonl(folder / "data[1].jsonl", images_and_rows(folder, 8, set(held_out)))
    out = folder / "out[v1]"
    result = sft_main(train_args(fast_ckpt, data, out, val_dataset=[], dataset_test_ratio=0.25, max_steps=1,
                                 check_dataset_strategy="warning"))
    err = capsys.readouterr().err
    assert result["last_model_checkpoint"] and result["best_model_checkpoint"] is None
    for row in held_out:
        assert f"warning: {data}:{row + 1}: cannot load image images/gone.png: file not found" in err
    assert f"read 8 rows from {data}; none skipped" in err
    assert "validation split: skipped 2 of 2 rows (2 unloadable image); see warnings above" in err
    assert "training split" not in err
    assert "warning: no validation row is left (all 2 skipped): no evaluation" in err
    assert "6 train / 0 val rows; 1 steps of 4 samples" in err
    assert f"run folder {out}/qwen-vl-chat/v0-" in err
    assert f"last checkpoint: {result['last_model_checkpoint']}" in err
    assert "best checkpoint: none (no validation rows, no evaluation)" in err
    assert all(r.get("eval_loss") is None for r in run_log(result["run_dir"]))

    # With --val_dataset as well: the held-out rows and the file's rows are one split, counted together.
    extra = write_jsonl(folder / "val.jsonl", images_and_rows(folder, 2, {1}))
    result = sft_main(train_args(fast_ckpt, data, out, val_dataset=[str(extra)], dataset_test_ratio=0.25, max_steps=1))
    err = capsys.readouterr().err
    assert "validation split: skipped 3 of 4 rows (3 unloadable image)" in err
    assert "6 train / 1 val rows" in err and result["best_model_checkpoint"] == result["last_model_checkpoint"]


def test_training_rows_are_required_and_counted_alone(fast_ckpt, train_args, tmp_path, monkeypatch):
    from vlswift.train.data import DatasetError, split_dataset
    from vlswift.train.recipe import sft_main

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    train, held_out = split_dataset(list(range(4)), 0.25, seed=42)
    data = write_jsonl(tmp_path / "d.jsonl", images_and_rows(tmp_path, 4, set(train)))
    with pytest.raises(DatasetError) as e:
        sft_main(train_args(fast_ckpt, data, tmp_path / "out", val_dataset=[], dataset_test_ratio=0.25))
    assert str(e.value) == (f"no usable rows in the training split of {data}: 3 skipped (3 unloadable image); "
                            "use --check_dataset_strategy warning to list them")


def test_cli_runs_a_short_training(fast_ckpt, example_data, tmp_path, monkeypatch, capsys):
    """`vlswift sft ...` end to end through the CLI: two steps, one checkpoint, the paths printed."""
    from vlswift import cli

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped inside a path
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--model_id_or_path", str(fast_ckpt), "--dataset", str(example_data),
                  "--dataset_test_ratio", "0.25", "--max_steps", "2", "--batch_size", "3",
                  "--output_dir", str(tmp_path), "--dataloader_num_workers", "0", "--disable_tqdm", "true"])
    assert exit_info.value.code in (0, None)
    (run,) = (tmp_path / "qwen-vl-chat").iterdir()
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()
    args = json.loads((run / "sft_args.json").read_text())
    assert args["gradient_accumulation_steps"] == 6  # ceil(16 / 3 / 1)
    err = " ".join(capsys.readouterr().err.split())
    assert "3 train / 1 val rows" in err
    assert "2 steps of 3 samples" in err  # a global batch of 18, but only 3 rows to fill it
    assert f"last checkpoint: {run / 'checkpoint-2'}" in err and f"best checkpoint: {run / 'checkpoint-2'}" in err


def test_a_single_process_on_cuda_gets_an_indexed_device(monkeypatch):
    # FSDP's device mesh (and torch.cuda.set_device) refuse a bare "cuda"; seen on one GPU.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    info = distributed.init_distributed("nccl", torch.device("cuda"))
    assert info.device == torch.device("cuda", 0) and not info.distributed and not info.owns_group
    assert distributed.init_distributed("gloo", torch.device("cpu")).device == torch.device("cpu")


def test_fsdp_runs_in_a_single_process(fast_ckpt, example_data, train_args, tmp_path, monkeypatch):
    """`--fsdp true` without torchrun: a one-rank process group, the same checkpoint layout
    (official weights + sharded optimizer state) as with several ranks."""
    import torch.distributed as dist

    from vlswift.train.recipe import sft_main

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    result = sft_main(train_args(fast_ckpt, example_data, tmp_path, sft_type="full", fsdp=True, max_steps=2,
                                 val_dataset=[], freeze_vit=True))
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer" / "__0_0.distcp").is_file()
    assert not dist.is_initialized()  # the group it made is gone


def test_committed_example_data_is_what_the_script_draws(examples, example_data):
    from PIL import Image, ImageChops

    committed = Path(__file__).resolve().parents[2] / "examples" / "data"
    assert (committed / "train.jsonl").read_text() == example_data.read_text()
    for image in (example_data.parent / "images").iterdir():
        with Image.open(image) as drawn, Image.open(committed / "images" / image.name) as kept:
            assert ImageChops.difference(drawn.convert("RGB"), kept.convert("RGB")).getbbox() is None


def test_a_missing_dataset_fails_before_the_model_is_looked_for(tmp_path, monkeypatch, capsys):
    from vlswift import cli

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--model_id_or_path", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "train.jsonl"),
                  "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: --dataset {tmp_path / 'train.jsonl'}: no such file"
    assert not (tmp_path / "out").exists()


def test_resume_from_a_run_folder_takes_the_newest_complete_checkpoint(tmp_path):
    # A kill between renaming checkpoint-6 into place and moving `last` leaves `last` behind.
    from vlswift.train.checkpointing import TRAINING_STATE

    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / TRAINING_STATE).write_bytes(b"")
    (tmp_path / "checkpoint-9").mkdir()  # no training state: not complete
    (tmp_path / "checkpoint-6-merged").mkdir()
    (tmp_path / "last").symlink_to("checkpoint-3", target_is_directory=True)
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "checkpoint-6").resolve()
