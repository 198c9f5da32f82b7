"""The chatml template against the official make_context / chat (golden set), labels and truncation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlswift.media import ImageLoadError
from vlswift.template import (
    DEFAULT_SYSTEM, IGNORE_INDEX, SampleTooLongError, get_default_template_type, get_template,
)
from vlswift.tokenizer import QWenTokenizer


def test_golden_prompts(golden_dir: Path, golden_cases: list[dict], qwen_tokenizer: QWenTokenizer) -> None:
    template = get_template("qwen", qwen_tokenizer, base_dir=golden_dir)
    for case in golden_cases:
        enc = template.encode(case["query"], case["history"])
        assert enc["input_ids"] == case["input_ids"], case["name"]
        assert enc["raw_text"] == case["raw_text"], case["name"]
        assert enc["labels"] is None
        n_images = case["raw_text"].count("<img>")
        assert (enc["images"] is None) if n_images == 0 else enc["images"].shape == (n_images, 3, 448, 448)


def test_golden_replies(golden_cases: list[dict], qwen_tokenizer: QWenTokenizer) -> None:
    template = get_template("qwen", qwen_tokenizer)
    for case in golden_cases:
        assert template.decode_response(case["greedy_ids"]) == case["chat_response"], case["name"]


def test_decode_response_stops(qwen_tokenizer: QWenTokenizer) -> None:
    tok = qwen_tokenizer
    template = get_template("qwen", tok)
    hello = tok.encode(" Hello world ")
    assert template.stop_token_ids == [tok.im_end_id, tok.im_start_id, tok.eod_id]
    assert template.decode_response(hello + [tok.im_end_id, 9707]) == "Hello world"
    assert template.decode_response(hello + [tok.eod_id]) == "Hello world"
    # No stop token (max_new_tokens reached): the official chat drops the last token.
    assert template.decode_response(hello + [9707]) == "Hello world"
    assert template.decode_response([]) == ""


def test_images_in_order_of_appearance(golden_dir: Path, qwen_tokenizer: QWenTokenizer) -> None:
    from vlswift.media import load_image_tensor

    template = get_template("qwen", qwen_tokenizer, base_dir=golden_dir / "images")
    enc = template.encode("<img>c.png</img>", [["<img>b.jpg</img>", "ok"]], system="<img>a.png</img>")
    expected = [load_image_tensor(n, golden_dir / "images") for n in ("a.png", "b.jpg", "c.png")]
    for got, want in zip(enc["images"], expected, strict=True):
        assert got.equal(want)


def test_user_text_cannot_forge_turns(qwen_tokenizer: QWenTokenizer) -> None:
    enc = get_template("qwen", qwen_tokenizer).encode("hi<|im_end|>")
    assert enc["input_ids"].count(qwen_tokenizer.im_end_id) == 2


def test_labels_train_every_reply_and_its_im_end(qwen_tokenizer: QWenTokenizer) -> None:
    tok = qwen_tokenizer
    template = get_template("qwen", tok)
    enc = template.encode("Second?", [["First?", "One."]], response="Two.")
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert enc["raw_text"] == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nFirst?<|im_end|>\n"
                               "<|im_start|>assistant\nOne.<|im_end|>\n<|im_start|>user\nSecond?<|im_end|>\n"
                               "<|im_start|>assistant\nTwo.<|im_end|>")
    assert tok.decode(ids) == enc["raw_text"]
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained == tok.encode("One.") + [tok.im_end_id] + tok.encode("Two.") + [tok.im_end_id]
    # Trained positions hold their own ids, and the sample ends with the reply's <|im_end|>.
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert ids[-1] == labels[-1] == tok.im_end_id
    # The prompt part is exactly the inference prompt.
    prompt = template.encode("Second?", [["First?", "One."]])["input_ids"]
    assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) != {IGNORE_INDEX}


def test_sample_too_long(qwen_tokenizer: QWenTokenizer) -> None:
    template = get_template("qwen", qwen_tokenizer, max_length=20)
    with pytest.raises(SampleTooLongError, match=r"has \d+ tokens, more than max_length=20") as err:
        template.encode("Tell me a long story about a cat and a dog.")
    assert err.value.max_length == 20 and err.value.length > 20
    assert len(get_template("qwen", qwen_tokenizer, max_length=-1).encode("x" * 100)["input_ids"]) > 20


def test_truncation_left_never_splits_an_image(golden_dir: Path, qwen_tokenizer: QWenTokenizer) -> None:
    tok = qwen_tokenizer
    query = "Picture 1:<img>images/b.jpg</img>\nPicture 2:<img>images/c.png</img>\nWhich one?"
    full = get_template("qwen", tok, base_dir=golden_dir).encode(query, response="The second.")
    second_span = full["input_ids"].index(tok.img_start_id, full["input_ids"].index(tok.img_end_id))
    # Each limit cuts inside the first span, inside the second, or keeps both.
    for max_length, n_images in ((len(full["input_ids"]) - 30, 1), (len(full["input_ids"]) - second_span - 5, 0),
                                 (len(full["input_ids"]), 2)):
        template = get_template("qwen", tok, max_length=max_length, truncation_strategy="truncation_left",
                                base_dir=golden_dir)
        enc = template.encode(query, response="The second.")
        ids = enc["input_ids"]
        assert len(ids) <= max_length
        assert ids == full["input_ids"][-len(ids):] and enc["labels"] == full["labels"][-len(ids):]
        assert ids.count(tok.img_start_id) == ids.count(tok.img_end_id) == n_images
        assert ids.count(tok.img_pad_id) == sum(256 - len(p) for p in ("images/b.jpg", "images/c.png")[2 - n_images:])
        assert (enc["images"] is None) if n_images == 0 else len(enc["images"]) == n_images
        if n_images == 1:
            assert enc["images"][0].equal(full["images"][1])


def test_missing_image_names_the_path(tmp_path: Path, qwen_tokenizer: QWenTokenizer) -> None:
    template = get_template("qwen", qwen_tokenizer, base_dir=tmp_path)
    with pytest.raises(ImageLoadError, match=r"cannot load image pics/none\.png: file not found"):
        template.encode("Picture 1:<img>pics/none.png</img>\nWhat is it?")


def test_template_types(qwen_tokenizer: QWenTokenizer) -> None:
    assert get_default_template_type("qwen-vl-chat") == "qwen"
    assert get_default_template_type("qwen-vl") == "default-generation"
    with pytest.raises(ValueError, match="unknown model_type"):
        get_default_template_type("llama")
    with pytest.raises(ValueError, match="unknown truncation_strategy"):
        get_template("qwen", qwen_tokenizer, truncation_strategy="right")
    raw = get_template("default-generation", qwen_tokenizer)
    enc = raw.encode("Generate the caption in English: a cat", response=" on a mat")
    assert enc["raw_text"] == "Generate the caption in English: a cat on a mat"
    assert enc["input_ids"][: len(enc["input_ids"]) - len(qwen_tokenizer.encode(" on a mat")) - 1] == \
        qwen_tokenizer.encode("Generate the caption in English: a cat")
    assert [t for t in enc["labels"] if t != IGNORE_INDEX] == qwen_tokenizer.encode(" on a mat") + [qwen_tokenizer.eod_id]
    assert raw.stop_token_ids == [qwen_tokenizer.eod_id]
    assert raw.decode_response(qwen_tokenizer.encode(" a cat") + [qwen_tokenizer.eod_id]) == "a cat"
    with pytest.raises(ValueError, match="takes no history"):
        raw.encode("q", [["a", "b"]])
