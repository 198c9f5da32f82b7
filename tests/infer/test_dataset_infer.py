"""`vlswift infer --val_dataset`: golden replies in the result jsonl, batching, sampling, bad rows."""

from __future__ import annotations

import json
import random
import re

import pytest


@pytest.fixture(scope="module")
def batch1(infer_workdir, tmp_path_factory):
    """Result path and stdout of the golden dataset inferred one row at a time (run in the test)."""
    return {"path": tmp_path_factory.mktemp("batch1") / "result.jsonl"}


def test_val_dataset_replies_equal_golden(infer_workdir, golden_cases, run_cli, greedy, read_jsonl, batch1, capsys):
    path = batch1["path"]
    code = run_cli(["infer", "--model_id_or_path", str(infer_workdir), "--val_dataset",
                    str(infer_workdir / "golden.jsonl"), "--result_path", str(path), *greedy])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = read_jsonl(path)
    assert [r["response"] for r in rows] == [c["chat_response"] for c in golden_cases]
    assert [r["label"] for r in rows] == [c["chat_response"] for c in golden_cases]
    assert [r["query"] for r in rows] == [c["query"] for c in golden_cases]
    assert [r["history"] for r in rows] == [c["history"] for c in golden_cases]
    assert rows[3]["images"] == [str(infer_workdir / "images/b.jpg"), str(infer_workdir / "images/c.png")]
    assert rows[0]["images"] == [] and rows[0]["system"] == "You are a helpful assistant."
    assert f"Results: {path}" in err
    # Fewer than 100 rows: each is printed, as swift does.
    assert out.count("[PROMPT]") == len(golden_cases) and f"[LABELS]{golden_cases[0]['chat_response']}" in out


def test_batched_equals_one_by_one(infer_workdir, run_cli, greedy, read_jsonl, batch1, tmp_path):
    """Batches of 4 mix text-only and image prompts of 25 to 584 tokens (left padding)."""
    path = tmp_path / "batch4.jsonl"
    code = run_cli(["infer", "--model_id_or_path", str(infer_workdir), "--val_dataset",
                    str(infer_workdir / "golden.jsonl"), "--result_path", str(path), "--batch_size", "4",
                    "--verbose", "false", *greedy])
    assert code == 0
    assert read_jsonl(path) == read_jsonl(batch1["path"])


def test_default_result_path_and_sampling(infer_workdir, run_cli, greedy, read_jsonl, golden_cases, capsys):
    code = run_cli(["infer", "--model_id_or_path", str(infer_workdir), "--val_dataset",
                    str(infer_workdir / "golden.jsonl"), "--show_dataset_sample", "2", "--dataset_seed", "7",
                    "--max_new_tokens", "1"])
    err = capsys.readouterr().err
    assert code == 0
    path = re.search(r"Results: (\S+)", err).group(1)
    assert re.fullmatch(re.escape(str(infer_workdir / "infer_result")) + r"/\d{8}-\d{6}\.jsonl", path)
    expected = random.Random(7).sample([c["query"] for c in golden_cases], 2)  # train.data.sample_rows
    assert [r["query"] for r in read_jsonl(path)] == expected


def test_unparsable_row_names_file_and_line(infer_workdir, run_cli, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "fine", "response": "ok"}\n{"query": "broken", \n')
    assert run_cli(["infer", "--model_id_or_path", str(infer_workdir), "--val_dataset", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:2: invalid JSON") and "\n" not in err


def test_bad_rows_skipped_with_warning(infer_workdir, run_cli, tmp_path, read_jsonl, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text('{"query": "Hello! Who are you?"}\n{"query": 3}\n'
                    '{"query": "Picture 1:<img>missing.png</img>\\nWhat?"}\n', encoding="utf-8")
    result = tmp_path / "out.jsonl"
    code = run_cli(["infer", "--model_id_or_path", str(infer_workdir), "--val_dataset", str(data),
                    "--check_dataset_strategy", "warning", "--max_new_tokens", "2", "--result_path", str(result)])
    err = capsys.readouterr().err
    assert code == 0
    assert f"warning: {data}:2: wrong type (field query" in err
    assert f"warning: {data}:3: cannot load image missing.png" in err
    rows = read_jsonl(result)
    assert len(rows) == 1 and rows[0]["label"] is None and rows[0]["query"] == "Hello! Who are you?"


@pytest.mark.parametrize("batch_size,failing_call,error", [(1, 3, KeyboardInterrupt), (2, 2, RuntimeError)])
def test_an_interrupted_run_keeps_the_finished_batches(batch_size, failing_call, error, infer_workdir, tmp_path,
                                                       monkeypatch, capsys):
    """Each row is appended (and the file closed) as soon as its batch's generation returns, so
    when a later batch is interrupted (Ctrl-C) or fails, the rows done are on disk, as valid jsonl."""
    from vlswift.infer import dataset_infer
    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    result = tmp_path / "partial.jsonl"
    data = infer_workdir / "golden.jsonl"
    real = dataset_infer.generate_batch
    calls = []

    def generate_then_fail(model, encoded, cfg, pad_id):
        calls.append(len(encoded))
        if len(calls) == failing_call:
            assert len(result.read_text().splitlines()) == 2  # on disk before the next batch starts
            raise error("generation stopped")
        return real(model, encoded, cfg, pad_id)

    monkeypatch.setattr(dataset_infer, "generate_batch", generate_then_fail)
    with pytest.raises(error, match="generation stopped"):
        infer_main(InferArguments(model_id_or_path=str(infer_workdir), val_dataset=[str(data)],
                                  batch_size=batch_size, max_new_tokens=1, result_path=str(result), verbose=False))
    assert calls == [batch_size] * failing_call
    text = result.read_text(encoding="utf-8")
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["query"] for r in rows] == [json.loads(line)["query"] for line in data.read_text().splitlines()[:2]]
    assert all(set(r) == {"system", "query", "history", "response", "label", "images"} for r in rows)
    assert f"Results: {result}" in capsys.readouterr().err  # the path is still printed


def test_same_seed_same_samples(infer_workdir, tmp_path):
    """--do_sample true: --seed decides the replies (hot sampling over the whole vocabulary of the
    random golden model, so two seeds giving the same 8 tokens on 3 rows is out of reach)."""
    import torch

    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    data = str(infer_workdir / "golden.jsonl")

    def replies(seed: int) -> list[str]:
        torch.rand(7)  # the global generator moves between runs: only --seed may make them agree
        out = infer_main(InferArguments(model_id_or_path=str(infer_workdir), val_dataset=[data],
                                        show_dataset_sample=3, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
                                        max_new_tokens=8, seed=seed, batch_size=2, save_result=False, verbose=False))
        return [r["response"] for r in out["result"]]

    first = replies(1)
    assert len(first) == 3 and len(set(first)) == 3
    assert replies(1) == first
    other = replies(2)
    assert all(a != b for a, b in zip(other, first))


def test_save_result_false_writes_nothing(infer_workdir, tmp_path, capsys):
    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    result = tmp_path / "none.jsonl"
    data = str(infer_workdir / "golden.jsonl")
    out = infer_main(InferArguments(model_id_or_path=str(infer_workdir), val_dataset=[data],
                                    show_dataset_sample=1, max_new_tokens=1, save_result=False,
                                    result_path=str(result)))
    assert out["result_path"] is None and len(out["result"]) == 1 and not result.exists()
    assert "Results:" not in capsys.readouterr().err
