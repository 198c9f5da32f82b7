"""`vlswift infer` with checkpoints (LoRA, merged, full) and the one-line errors of bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest


@pytest.mark.parametrize("argv,message", [
    (["--model_type", "qwen-vl-plus"], "unknown --model_type 'qwen-vl-plus': expected one of qwen-vl-chat, qwen-vl"),
    (["--ckpt_dir", "{tmp}/output/v0-x/checkpoint-10"], "--ckpt_dir {tmp}/output/v0-x/checkpoint-10: no such folder"),
    (["--ckpt_dir", "{tmp}", "--load_dataset_config", "true"],
     "{tmp} is neither a LoRA checkpoint (adapter_config.json) nor a full one (config.json + weights)"),
])
def test_bad_input_is_one_line(argv, message, run_cli, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert run_cli(["infer", *argv]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message.format(tmp=tmp_path)}"


def test_merge_lora_needs_a_lora_checkpoint(infer_workdir, run_cli, capsys):
    assert run_cli(["infer", "--ckpt_dir", str(infer_workdir), "--merge_lora", "true"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --merge_lora true: {infer_workdir} is a full checkpoint, "
                                               "not a LoRA one; drop --merge_lora")


def test_load_dataset_config_needs_sft_args(infer_workdir, run_cli, capsys):
    assert run_cli(["infer", "--ckpt_dir", str(infer_workdir), "--load_dataset_config", "true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --load_dataset_config: no sft_args.json in {infer_workdir}")


def make_lora_ckpt(base: Path, root: Path, dataset: Path) -> Path:
    """A LoRA checkpoint of ``base`` (random A and B on c_attn) laid out as `vlswift sft` writes it."""
    from peft import LoraConfig, get_peft_model

    from vlswift.api import get_model_tokenizer

    model, _ = get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"}, model_id_or_path=str(base))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    run = root / "qwen-vl-chat" / "v0-20260101-000000"
    ckpt = run / "checkpoint-2"
    model.save_pretrained(str(ckpt))
    sft_args = {"model_type": "qwen-vl-chat", "model_id_or_path": str(base), "sft_type": "lora",
                "system": "You are a LoRA.", "dataset": [str(dataset)], "val_dataset": [],
                "dataset_seed": 42, "dataset_test_ratio": 0.5, "check_dataset_strategy": "none"}
    for folder in (run, ckpt):
        (folder / "sft_args.json").write_text(json.dumps(sft_args))
    return ckpt


@pytest.fixture(scope="module")
def lora_ckpt(golden_ckpt, infer_workdir, tmp_path_factory):
    return make_lora_ckpt(golden_ckpt, tmp_path_factory.mktemp("output"), infer_workdir / "golden.jsonl")


@pytest.mark.slow
def test_lora_checkpoint_with_its_validation_split(lora_ckpt, infer_workdir, golden_model, run_cli, greedy,
                                                    read_jsonl, tmp_path, capsys, monkeypatch):
    from vlswift.api import inference
    from vlswift.train.data import load_dataset, split_dataset

    result = tmp_path / "lora.jsonl"
    code = run_cli(["infer", "--ckpt_dir", str(lora_ckpt), "--load_dataset_config", "true", "--batch_size", "2",
                    "--result_path", str(result), *greedy])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Adapter: LoRA {lora_ckpt}" in err and "System: 'You are a LoRA.'" in err
    base = json.loads((lora_ckpt / "sft_args.json").read_text())["model_id_or_path"]
    assert f"Model: qwen-vl-chat from {base} (float32 on cpu)" in err
    rows = read_jsonl(result)
    _, val = split_dataset(load_dataset([str(infer_workdir / "golden.jsonl")], "none")[0], 0.5, 42)
    assert [r["query"] for r in rows] == [s.query for s in val] and len(rows) == 3
    assert all(r["system"] == "You are a LoRA." for r in rows)
    # The adapter changes the replies of the base model (given the same system prompt).
    model, template, gc = golden_model
    monkeypatch.chdir(infer_workdir)
    base = [inference(model, template, s.query, s.history, "You are a LoRA.", gc)[0] for s in val]
    assert [r["response"] for r in rows] != base


@pytest.mark.slow
def test_merge_lora_gives_the_same_replies(lora_ckpt, run_cli, greedy, read_jsonl, tmp_path, capsys):
    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    unmerged = infer_main(InferArguments(ckpt_dir=str(lora_ckpt), load_dataset_config=True, do_sample=False,
                                         max_new_tokens=12, save_result=False))["result"]
    capsys.readouterr()
    result = tmp_path / "merged.jsonl"
    code = run_cli(["infer", "--ckpt_dir", str(lora_ckpt), "--merge_lora", "true", "--load_dataset_config", "true",
                    "--result_path", str(result), *greedy])
    err = capsys.readouterr().err
    assert code == 0, err
    merged = lora_ckpt.with_name(lora_ckpt.name + "-merged")
    assert (merged / "config.json").is_file()
    assert re.search(rf"Adapter: none \(full checkpoint {re.escape(str(merged))}\)", err)
    assert len(unmerged) == 3 and read_jsonl(result) == unmerged


def test_an_existing_merge_is_reused_only_for_its_checkpoint_and_base(golden_ckpt, infer_workdir, run_cli, capsys,
                                                                     tmp_path):
    from vlswift.export import merge_lora_checkpoint
    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import resolve_checkpoint

    ckpt = make_lora_ckpt(golden_ckpt, tmp_path / "output", infer_workdir / "golden.jsonl")
    merged = merge_lora_checkpoint(ckpt)
    assert merged == ckpt.with_name("checkpoint-2-merged")
    # The base the checkpoint names, by default or given: the merge is reused.
    for base in (None, str(golden_ckpt)):
        info = resolve_checkpoint(InferArguments(ckpt_dir=str(ckpt), merge_lora=True, model_id_or_path=base))
        assert (info.path, info.kind) == (merged, "full")
    capsys.readouterr()
    # Another base (the same weights in another folder): not what the folder holds.
    argv = ["infer", "--ckpt_dir", str(ckpt), "--merge_lora", "true", "--model_id_or_path", str(infer_workdir)]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --merge_lora true: {merged} holds {ckpt} merged into {golden_ckpt.resolve()}, not {ckpt} "
                   f"merged into {infer_workdir.resolve()}: remove it to merge again, or run `vlswift export "
                   f"--ckpt_dir {ckpt} --model_id_or_path {infer_workdir.resolve()} --output_dir DIR` and infer with "
                   "--ckpt_dir DIR")
    # A folder that does not say what it merged is not trusted either.
    sft_args = json.loads((merged / "sft_args.json").read_text())
    del sft_args["merged_from"]
    (merged / "sft_args.json").write_text(json.dumps(sft_args))
    with pytest.raises(ValueError, match=r"does not say what it was merged from \(no merged_from in its sft_args"):
        resolve_checkpoint(InferArguments(ckpt_dir=str(ckpt), merge_lora=True))


def test_loading_shows_a_progress_bar_over_the_weights(golden_ckpt):
    import io

    from rich.console import Console

    from vlswift.api import get_model_tokenizer
    from vlswift.infer.main import loading_bar
    from vlswift.models.loading import load_progress

    reports: list[tuple[int, int]] = []
    with load_progress(lambda done, total: reports.append((done, total))):
        get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"}, model_id_or_path=str(golden_ckpt))
    size = (golden_ckpt / "model.safetensors").stat().st_size
    assert len(reports) > 10 and reports[-1] == (size, size)  # tensor by tensor, up to the file's bytes
    assert [d for d, _ in reports] == sorted(d for d, _ in reports) and {t for _, t in reports} == {size}
    reports.clear()
    get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"}, model_id_or_path=str(golden_ckpt))
    assert reports == []  # only inside load_progress

    out = io.StringIO()
    with loading_bar("Loading golden", console=Console(file=out, force_terminal=True, width=100, color_system=None)):
        get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"}, model_id_or_path=str(golden_ckpt))
    frames = out.getvalue()
    assert "Loading golden" in frames and f"{size / 1e6:.1f}/{size / 1e6:.1f} MB" in frames


GENERATION_FILE = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
                   "max_new_tokens": 7, "do_sample": True, "temperature": 0.65, "top_k": 13, "top_p": 0.55,
                   "repetition_penalty": 1.15}


def with_generation_file(where: str, golden_ckpt: Path, dataset: Path, tmp_path: Path) -> Path:
    """The golden base folder / full checkpoint (``full``) or a LoRA checkpoint of it (``lora``),
    with ``GENERATION_FILE`` as its generation_config.json (the golden one says max_new_tokens 512,
    top_p 0.3, top_k 0)."""
    if where == "lora":
        # swift saves the run's generation config in a LoRA checkpoint; `vlswift export` copies it
        # into the merged model, so inferring the checkpoint unmerged must use it too.
        folder = make_lora_ckpt(golden_ckpt, tmp_path / "output", dataset)
    else:
        folder = tmp_path / "full"
        folder.mkdir()
        for f in golden_ckpt.iterdir():
            if f.name != "generation_config.json":
                os.symlink(f, folder / f.name)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_FILE))
    return folder


@pytest.mark.parametrize("flag,kind", [("model_id_or_path", "full"), ("ckpt_dir", "full"), ("ckpt_dir", "lora")])
def test_generation_defaults_come_from_generation_config_json(flag, kind, golden_ckpt, infer_workdir, tmp_path,
                                                              monkeypatch, capsys):
    from vlswift.infer import dataset_infer
    from vlswift.infer.args import InferArguments
    from vlswift.infer.engine import SamplingConfig
    from vlswift.infer.main import infer_main

    data = tmp_path / "one.jsonl"
    data.write_text('{"query": "Hello! Who are you?"}\n')
    configs: list[SamplingConfig] = []

    def capture(model, encoded, cfg, pad_id):
        configs.append(cfg)
        return [[] for _ in encoded]

    monkeypatch.setattr(dataset_infer, "generate_batch", capture)
    place = {flag: str(with_generation_file(kind, golden_ckpt, infer_workdir / "golden.jsonl", tmp_path))}

    def run(**flags) -> SamplingConfig:
        configs.clear()
        infer_main(InferArguments(val_dataset=[str(data)], save_result=False, verbose=False, **place, **flags))
        assert len(configs) == 1
        return configs[0]

    cfg = run()
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty,
            cfg.num_beams) == (7, True, 0.65, 13, 0.55, 1.15, 1)
    assert ("Generation: max_new_tokens=7, sampling (temperature=0.65, top_k=13, top_p=0.55), "
            "repetition_penalty=1.15") in capsys.readouterr().err
    # A flag given wins over the file; the others still come from it.
    cfg = run(top_p=0.9, max_new_tokens=3)
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (
        3, True, 0.65, 13, 0.9, 1.15)
    cfg = run(do_sample=False, repetition_penalty=1.0)
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.repetition_penalty) == (7, False, 1.0)
    assert "Generation: max_new_tokens=7, greedy\n" in capsys.readouterr().err


def test_default_result_path_is_under_the_checkpoint(lora_ckpt, tmp_path, capsys):
    """No --result_path with --ckpt_dir: ``<ckpt_dir>/infer_result/<YYYYmmdd-HHMMSS>.jsonl``."""
    import time

    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    data = tmp_path / "one.jsonl"
    data.write_text('{"query": "Hello! Who are you?"}\n')
    before = time.strftime("%Y%m%d-%H%M%S")
    out = infer_main(InferArguments(ckpt_dir=str(lora_ckpt), val_dataset=[str(data)], max_new_tokens=1,
                                    verbose=False))
    after = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out["result_path"])
    assert path.parent == (lora_ckpt / "infer_result").resolve()
    assert re.fullmatch(r"\d{8}-\d{6}\.jsonl", path.name) and before <= path.stem <= after
    assert [json.loads(line)["query"] for line in path.read_text().splitlines()] == ["Hello! Who are you?"]
    assert f"Results: {path}" in capsys.readouterr().err
