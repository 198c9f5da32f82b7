"""Fixtures of the infer tests: a working folder with the golden checkpoint, its images and the
golden cases as a dataset; the golden model loaded once; the CLI run in-process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def infer_workdir(golden_ckpt: Path, golden_dir: Path, golden_cases: list[dict], tmp_path_factory) -> Path:
    """The golden checkpoint folder with ``images/`` beside it (the golden prompts name
    ``images/a.png``) and ``golden.jsonl`` (the cases as query/response/history rows)."""
    work = tmp_path_factory.mktemp("infer-work")
    for f in golden_ckpt.iterdir():
        os.symlink(f, work / f.name)
    shutil.copytree(golden_dir / "images", work / "images")
    with open(work / "golden.jsonl", "w", encoding="utf-8") as f:
        for case in golden_cases:
            row = {"query": case["query"], "response": case["chat_response"], "history": case["history"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return work


@pytest.fixture(scope="session")
def golden_model(infer_workdir: Path):
    """(model, template, generation_config): the golden model, greedy, 12 new tokens."""
    import copy

    from vlswift.api import get_default_template_type, get_model_tokenizer, get_template

    model, tokenizer = get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"},
                                           model_id_or_path=str(infer_workdir))
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.max_new_tokens = False, 12
    return model, get_template(get_default_template_type("qwen-vl-chat"), tokenizer), gc


@pytest.fixture
def greedy() -> list[str]:
    """The flags of the golden replies: greedy decoding, 12 new tokens."""
    return ["--do_sample", "false", "--max_new_tokens", "12"]


@pytest.fixture
def run_cli():
    """``run_cli(argv)``: ``vlswift ARGV`` in this process (the real Typer command); returns the exit code."""
    from vlswift.cli import main

    def run(argv: list[str]) -> int:
        try:
            main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0

    return run


@pytest.fixture
def read_jsonl():
    def read(path: str | Path) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]

    return read
