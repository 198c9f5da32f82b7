"""Dataset files -> samples -> checks -> batches (vlswift.train.data)."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from vlswift.models.tiny import write_byte_vocab
from vlswift.template import get_template
from vlswift.tokenizer import QWenTokenizer
from vlswift.train import data
from vlswift.train.data import (
    DatasetError,
    DatasetReport,
    EncodedDataset,
    Sample,
    collate,
    length_of,
    load_dataset,
    parse_row,
    sample_rows,
    split_dataset,
    validate_samples,
)


def draw(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(img).rectangle((8, 8, 40, 40), fill=color)
    img.save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> QWenTokenizer:
    # The tiny checkpoint's byte-level vocabulary alone: building its weights would take seconds.
    folder = tmp_path_factory.mktemp("tokenizer")
    write_byte_vocab(folder / "qwen.tiktoken")
    return QWenTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def template(tokenizer):
    return get_template("qwen", tokenizer, max_length=2048)


def conversation(system: str | None = "Be brief.") -> list[tuple[str, str]]:
    turns = [("user", "Picture 1:<img>a.png</img>\nWhat colour?"), ("assistant", "Red."),
             ("user", "And now?"), ("assistant", "Still red.")]
    return ([("system", system)] if system else []) + turns


# ---------------------------------------------------------------------------------------------
# Row formats


def test_every_format_parses_to_the_same_sample(tmp_path):
    turns = conversation()
    rows = [
        {"query": turns[3][1], "response": turns[4][1], "history": [[turns[1][1], turns[2][1]]], "system": turns[0][1]},
        {"conversations": [{"from": role, "value": text} for role, text in turns]},
        {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(role, role), "value": text}
                           for role, text in turns]},
        {"messages": [{"role": role, "content": text} for role, text in turns]},
    ]
    samples, report = load_dataset([str(write_jsonl(tmp_path / "d.jsonl", rows))])
    assert [s.source for s in samples] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in range(1, 5)]
    assert {(s.query, s.response, str(s.history), s.system, s.base_dir) for s in samples} == {
        ("And now?", "Still red.", str([[turns[1][1], "Red."]]), "Be brief.", tmp_path)}
    assert report.n_skipped == 0 and report.total == 4

    alpaca = parse_row({"instruction": "Describe.", "input": "<img>a.png</img>", "output": "A square."}, "x:1", tmp_path)
    assert (alpaca.query, alpaca.response, alpaca.history, alpaca.system) == ("Describe.\n<img>a.png</img>",
                                                                              "A square.", [], None)
    no_system = parse_row({"messages": [{"role": r, "content": t} for r, t in conversation(None)]}, "x:1", tmp_path)
    assert no_system.system is None and no_system.history == [[turns[1][1], "Red."]]


def test_json_array_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"query": "a", "response": "b"},\n\n  {"query": "c",\n   "response": ""},\n'
                    '  {"query": "e", "response": "f"}\n]\n')
    samples, report = load_dataset([str(path)])
    assert [s.source for s in samples] == [f"{path}:2", f"{path}:6"]
    assert report.messages == [f"{path}:4: empty reply (field response: expected a non-empty reply)"]

    path.write_text('[\n  {"query": "a", "response": "b"},\n  {"query": "c" "response": "d"}\n]')
    with pytest.raises(DatasetError, match=rf"^{path}:3: invalid JSON: Expecting ',' delimiter at column 17"):
        load_dataset([str(path)])


def test_multi_turn_multi_image_sample_encodes_every_image_in_order(tmp_path, template, tokenizer):
    data = tmp_path / "data"
    for name, color in [("img/a.png", "red"), ("img/b.png", "green"), ("c.png", "blue")]:
        draw(data / name, color)
    row = {"conversations": [
        {"from": "user", "value": "Picture 1:<img>img/a.png</img>\nPicture 2:<img>img/b.png</img>\nSame?"},
        {"from": "assistant", "value": "No."},
        {"from": "user", "value": "Why?"},  # a turn without images
        {"from": "assistant", "value": "Colours differ."},
        {"from": "user", "value": f"Picture 3:<img>{data / 'c.png'}</img>\nAnd <img>https://example.com/x.png</img>?"},
        {"from": "assistant", "value": "Blue."},
    ]}
    (sample,), _ = load_dataset([str(write_jsonl(data / "train.jsonl", [row]))])
    assert len(sample.history) == 2
    assert sample.image_refs() == ["img/a.png", "img/b.png", str(data / "c.png"), "https://example.com/x.png"]
    assert sample.images() == [str(data / "img/a.png"), str(data / "img/b.png"), str(data / "c.png"),
                               "https://example.com/x.png"]

    local = Sample(sample.query.replace("And <img>https://example.com/x.png</img>?", ""), sample.response,
                   sample.history, None, sample.source, sample.base_dir)
    item = EncodedDataset([local], template)[0]
    assert item["images"].shape == (3, 3, 448, 448)
    assert (item["input_ids"] == tokenizer.img_start_id).sum() == 3
    red, green, blue = item["images"][:, :, 200, 200]  # a pixel inside the drawn square, CLIP-normalised
    assert red[0] > red[1] and green[1] > green[0] and blue[2] > blue[0]
    assert 0 < length_of(local, tokenizer) < len(item["input_ids"])


def test_relative_paths_are_resolved_against_the_dataset_folder(tmp_path, monkeypatch, template):
    draw(tmp_path / "data" / "img" / "a.png")
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [{"query": "<img>img/a.png</img>", "response": "red"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    samples, report = load_dataset([str(path)])
    assert validate_samples(samples, template, report) == samples
    assert samples[0].resolved().query == f"<img>{tmp_path / 'data' / 'img' / 'a.png'}</img>"


def test_a_file_name_without_a_slash_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"query": "hi", "response": "hello"}] * 5)
    samples, _ = load_dataset(["train.jsonl"])
    assert len(samples) == 5 and samples[0].source == "train.jsonl:1" and samples[0].base_dir == tmp_path
    assert len(load_dataset(["train.jsonl#3"])[0]) == 3
    assert len(load_dataset(["train.jsonl#12"])[0]) == 12  # upsampled: two full copies and a draw of 2


def test_inference_rows_may_end_with_the_query(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"query": "q"}]
    samples, _ = load_dataset([str(write_jsonl(tmp_path / "v.jsonl", rows))], require_response=False)
    assert [(s.query, s.response, s.history) for s in samples] == [("hi", None, []), ("q", None, [])]
    with pytest.raises(DatasetError, match="v.jsonl:1: the conversation ends with a user turn"):
        load_dataset([str(tmp_path / "v.jsonl")], "error")


# ---------------------------------------------------------------------------------------------
# Bad datasets, each with its message


@pytest.mark.parametrize("row, message", [
    ('{"query": "a", "response": "b"', "invalid JSON: Expecting ',' delimiter at column 31"),
    ({"conversations": [{"from": "user", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "unknown role 'bot' (field conversations[1].from: expected one of user, human, assistant, gpt, system)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
     "wrong role order: 'user' after a user turn (field messages[1].role: expected assistant (user and assistant "
     "alternate; system only as the first turn))"),
    ({"messages": [{"role": "assistant", "content": "hi"}]},
     "wrong role order: 'assistant' after the start (field messages[0].role: expected user"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]},
     "wrong role order: 'system' after a user turn"),
    ({"conversations": [{"from": "user", "value": "hi"}]},
     "the conversation ends with a user turn (field conversations[0]: expected a final assistant reply to train on)"),
    ({"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "empty reply (field conversations[1].value: expected a non-empty reply)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "x"}]},
     "wrong type (field messages[0].content: expected a string, got array)"),
    ({"query": "hi"}, "missing field (field response: expected a string)"),
    ({"response": "hi"}, "missing field (field query: expected a string)"),
    ({"query": "a", "response": "b", "history": [["only one"]]},
     "wrong type (field history[0]: expected a [query, response] pair)"),
    ({"question": "a", "answer": "b"}, "unknown row format (keys: answer, question) (field row: expected "
                                       "query/response, instruction/output, conversations or messages)"),
    ("[1, 2]", "not an object (field row: expected a JSON object, got array)"),
])
def test_bad_row_messages(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "ok", "response": "fine"}, row])
    with pytest.raises(DatasetError) as e:
        load_dataset([str(path)], "error")
    assert str(e.value).startswith(f"{path}:2: {message}")


def test_missing_image_is_reported_by_validation(tmp_path, template):
    draw(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "<img>a.png</img>", "response": "ok"},
                                              {"query": "<img>missing.png</img>", "response": "ok"}])
    samples, report = load_dataset([str(path)])
    assert validate_samples(samples, template, report, num_proc=2) == samples[:1]
    assert report.messages == [f"{path}:2: cannot load image missing.png: file not found ({tmp_path / 'missing.png'})"]
    assert report.summary() == "skipped 1 of 2 rows (1 unloadable image); see warnings above"

    with pytest.raises(DatasetError, match=rf"^{path}:2: cannot load image missing.png: file not found"):
        validate_samples(samples, template, DatasetReport("error"))


def test_too_long_samples_are_reported_not_dropped_silently(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "short", "response": "ok"},
                                              {"query": "x" * 500, "response": "ok"}])
    samples, report = load_dataset([str(path)])
    short = get_template("qwen", tokenizer, max_length=100)
    assert validate_samples(samples, short, report) == samples[:1]
    assert report.messages[0].startswith(f"{path}:2: sample has ") and "more than max_length=100" in report.messages[0]
    assert report.skipped == {"too long": 1}


def test_empty_dataset_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"query": ', {"query": "a", "response": ""}, {"query": "b"}])
    with pytest.raises(DatasetError) as e:
        load_dataset([str(path)])
    assert str(e.value) == f"no usable rows in {path}: 3 skipped (1 invalid JSON, 1 empty reply, 1 missing field)"
    with pytest.raises(DatasetError, match=rf"no usable rows in {tmp_path / 'e.jsonl'}: the file has no rows"):
        load_dataset([str(write_jsonl(tmp_path / "e.jsonl", []))])


def test_missing_file_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"^--dataset nope\.jsonl: no such file$"):
        load_dataset(["nope.jsonl"])
    with pytest.raises(DatasetError, match=r"^--val_dataset data/nope: no such file$"):
        load_dataset(["data/nope"], option="--val_dataset")
    with pytest.raises(DatasetError, match=r"^--dataset coco-en: no such file, and not a builtin dataset "
                                           r"\(builtins: coco-en-mini\)$"):
        load_dataset(["coco-en"])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.txt'"):
        load_dataset(["d.txt"])


@pytest.mark.parametrize("strategy", ["none", "discard", "warning", "error"])
def test_check_dataset_strategies(tmp_path, strategy):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "a", "response": "b"}, "{oops",
                                              {"query": "c", "response": "d"},
                                              {"messages": [{"role": "robot", "content": "x"}]}])
    if strategy == "error":
        with pytest.raises(DatasetError, match=rf"^{path}:2: invalid JSON"):
            load_dataset([str(path)], strategy)
        return
    samples, report = load_dataset([str(path)], strategy)
    assert [s.query for s in samples] == ["a", "c"]
    assert report.skipped == {"invalid JSON": 1, "unknown role": 1}
    if strategy == "warning":
        assert [m.split(": ")[0] for m in report.messages] == [f"{path}:2", f"{path}:4"]
        assert report.summary() == "skipped 2 of 4 rows (1 invalid JSON, 1 unknown role); see warnings above"
    else:
        assert report.messages == []
        assert report.summary().endswith("use --check_dataset_strategy warning to list them")


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown --check_dataset_strategy 'loud'"):
        load_dataset(["x.jsonl"], "loud")


# ---------------------------------------------------------------------------------------------
# Builtin datasets (the hub is faked: tests run offline)


def test_builtin_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="coco-en-mini needs the `datasets` package: pip install datasets") as e:
        load_dataset(["coco-en-mini"])
    assert "pip install 'vlswift[datasets]'" in str(e.value)


def fake_datasets(monkeypatch, tmp_path, load, hub_reachable: bool = True) -> None:
    """A ``datasets`` module whose ``load_dataset`` is ``load``; the hub check passes unless
    ``hub_reachable`` is false."""
    module = types.ModuleType("datasets")
    module.load_dataset = load
    module.Image = lambda decode: ("Image", decode)
    module.config = types.SimpleNamespace(HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    if hub_reachable:
        monkeypatch.setattr(data, "_hub_unreachable", lambda: None)


def test_builtin_with_the_hub_unreachable_fails_fast_in_one_line(monkeypatch, tmp_path):
    """Offline, the hub client retries for ~30 s, warning each time; one short request says it first."""
    def load(hub_id, split):
        raise AssertionError("the download must not be tried")

    fake_datasets(monkeypatch, tmp_path, load, hub_reachable=False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        load_dataset(["coco-en-mini"])
    assert time.perf_counter() - started < 5
    assert str(e.value) == ("could not download coco-en-mini (modelscope/coco_2014_caption, split validation): "
                            "cannot reach http://127.0.0.1:9 (ConnectionError): offline? pass your own --dataset FILE "
                            "(HF_HUB_OFFLINE=1 reads a copy downloaded before)")


def test_builtin_in_offline_mode_reads_the_cache_without_asking_the_hub(monkeypatch, tmp_path):
    import requests

    def not_cached(hub_id, split):
        raise ConnectionError("Couldn't find cache for modelscope/coco_2014_caption")

    fake_datasets(monkeypatch, tmp_path, not_cached, hub_reachable=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(requests, "head", lambda *a, **k: pytest.fail("offline mode must not reach for the hub"))
    with pytest.raises(DatasetError, match=r"^could not download coco-en-mini .*: Couldn't find cache for "
                                           r"modelscope/coco_2014_caption: offline\? pass your own --dataset FILE$"):
        load_dataset(["coco-en-mini"])


def test_builtin_offline_says_so(monkeypatch, tmp_path):
    def offline(hub_id, split):
        raise ConnectionError("Couldn't reach 'modelscope/coco_2014_caption' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, tmp_path, offline)
    with pytest.raises(DatasetError) as e:
        load_dataset(["coco-en-mini"])
    assert str(e.value).startswith("could not download coco-en-mini (modelscope/coco_2014_caption, split validation): "
                                   "Couldn't reach")
    assert str(e.value).endswith("offline? pass your own --dataset FILE") and "\n" not in str(e.value)


def test_builtin_coco_rows(monkeypatch, tmp_path):
    png = draw(tmp_path / "src.png")

    class Table(list):
        def cast_column(self, column, feature):
            assert (column, feature) == ("image", ("Image", False))
            return self

    rows = Table([{"image": {"path": "COCO_val_1.jpg", "bytes": png.read_bytes()}, "caption": "A red square.&&A box"},
                  {"image": {"path": str(png), "bytes": None}, "caption": "Square"},
                  {"image": {"path": "x.jpg", "bytes": b"..."}, "caption": "&&"}])
    fake_datasets(monkeypatch, tmp_path, lambda hub_id, split: rows)
    samples, report = load_dataset(["coco-en-mini"])
    cached = tmp_path / "hf-cache" / "vlswift" / "coco-en-mini" / "validation" / "COCO_val_1.jpg"
    assert [(s.query, s.response) for s in samples] == [
        (f"Picture 1:<img>{cached}</img>\nplease describe the image.", "A red square."),
        (f"Picture 1:<img>{png}</img>\nplease describe the image.", "Square")]
    assert cached.read_bytes() == png.read_bytes()
    assert report.messages == ["coco-en-mini:row 3: empty reply (field caption: expected a non-empty reply)"]
    samples, report = load_dataset(["coco-en-mini#2"])
    assert report.total == 2 and len(samples) + report.n_skipped == 2


# ---------------------------------------------------------------------------------------------
# Splits and batches


def test_split_is_deterministic():
    rows = [Sample(str(i), "r", [], None, f"f:{i}", Path(".")) for i in range(200)]
    train, val = split_dataset(rows, 0.05, seed=42)
    assert (len(train), len(val)) == (190, 10) and sorted(train + val, key=lambda s: int(s.query)) == rows
    assert split_dataset(rows, 0.05, seed=42) == (train, val)
    assert split_dataset(rows, 0.05, seed=7)[1] != val
    assert len(split_dataset(rows, 0.001)[1]) == 1  # at least one validation row
    assert split_dataset(rows[:1], 0.01) == (rows[:1], [])
    assert split_dataset(rows[:1], 1.0) == ([], rows[:1])  # --val_dataset: all of it
    assert split_dataset(rows, 0.0)[1] == []
    sampled, val2 = split_dataset(rows, 0.05, seed=42, train_sample=20)
    assert len(sampled) == 20 and val2 == val and {s.source for s in sampled} <= {s.source for s in train}
    assert sample_rows(rows[:3], 7, 0).count(rows[0]) in (2, 3)


def test_collate_pads_right_and_concatenates_images(tmp_path, template, tokenizer):
    draw(tmp_path / "a.png", "red")
    draw(tmp_path / "b.png", "blue")
    rows = [{"query": "<img>a.png</img>two <img>b.png</img>", "response": "ab"},
            {"query": "no image here", "response": "a much longer reply than the others"},
            {"query": "<img>b.png</img>", "response": "b"}]
    samples, _ = load_dataset([str(write_jsonl(tmp_path / "d.jsonl", rows))])
    items = [EncodedDataset(samples, template)[i] for i in range(3)]
    batch = collate(items, tokenizer.pad_token_id)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["images"].shape == (3, 3, 448, 448)
    assert torch.equal(batch["images"][2], items[2]["images"][0]) and torch.equal(batch["images"][1], batch["images"][2])
    for row, n in enumerate(lengths):
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == -100).all()
    assert items[1]["source"] == f"{tmp_path / 'd.jsonl'}:2"
    assert collate(items[1:2], tokenizer.pad_token_id)["images"] is None
