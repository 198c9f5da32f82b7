"""QWenTokenizer against the official tokenizer's ids (golden set) and its image-span rules."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest

from vlswift.tokenizer import IMAGE_ST, QWenTokenizer, extract_boxes, to_list_format


def test_golden_ids_and_decoding(golden_dir: Path, qwen_tokenizer: QWenTokenizer) -> None:
    cases = json.loads((golden_dir / "cases.json").read_text())["tokenizer"]
    assert cases
    for case in cases:
        ids = qwen_tokenizer.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert qwen_tokenizer.decode(ids) == case["decoded"], case["text"]


def test_special_token_ids(qwen_tokenizer: QWenTokenizer) -> None:
    tok = qwen_tokenizer
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.eos_token_id == tok.pad_token_id == tok.eod_id
    assert tok.encode("<|extra_0|><|extra_204|>") == [151646, 151850]
    tags = [tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id, tok.quad_start_id,
            tok.quad_end_id, tok.img_start_id, tok.img_end_id, tok.img_pad_id]
    assert tags == list(range(151851, 151860))
    # <img> alone is refused (unclosed span), so check the tags in a closed span.
    assert tok.encode("".join(IMAGE_ST[:6])) == tags[:6]
    assert tok.encode("<img></img>") == [tok.img_start_id] + [tok.img_pad_id] * 256 + [tok.img_end_id]
    assert tok.IMAGE_ST == IMAGE_ST
    assert len(tok) == 151860


def test_disallowed_specials_are_plain_text(qwen_tokenizer: QWenTokenizer) -> None:
    text = "<|im_end|><ref>x</ref>"
    ids = qwen_tokenizer.encode(text, allowed_special=set(IMAGE_ST))
    assert qwen_tokenizer.im_end_id not in ids
    assert qwen_tokenizer.ref_start_id in ids
    assert qwen_tokenizer.decode(ids) == text


def test_image_span_is_bytes_padded_to_256(qwen_tokenizer: QWenTokenizer) -> None:
    tok = qwen_tokenizer
    url = "dir/猫.png"
    ids = tok.encode(f"a<img>{url}</img>b")
    start = ids.index(tok.img_start_id)
    span = ids[start : start + 258]
    raw = url.encode()
    assert span[1 : 1 + len(raw)] == list(raw)
    assert span[1 + len(raw) : -1] == [tok.img_pad_id] * (256 - len(raw))
    assert span[-1] == tok.img_end_id
    assert tok.decode(ids) == f"a<img>{url}</img>b"
    assert tok.decode(ids, skip_special_tokens=True) == f"a{url}b"


def test_image_span_limits(qwen_tokenizer: QWenTokenizer) -> None:
    exact = "x" * 256
    assert len(qwen_tokenizer.encode(f"<img>{exact}</img>")) == 258
    with pytest.raises(ValueError, match="257 bytes.*xxxx"):
        qwen_tokenizer.encode(f"<img>{exact}y</img>")
    with pytest.raises(ValueError, match="unclosed <img>"):
        qwen_tokenizer.encode("<img>a.png")


def test_decode_accepts_what_streamers_pass(qwen_tokenizer: QWenTokenizer) -> None:
    import torch

    ids = qwen_tokenizer.encode("Hello world")
    assert qwen_tokenizer.decode(ids[0]) == "Hello"
    assert qwen_tokenizer.decode(torch.tensor(ids), skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False) == "Hello world"
    # Half of a multi-byte character decodes to the replacement character, not an error.
    assert qwen_tokenizer.decode([160]) == "\ufffd"


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"no qwen.tiktoken in {tmp_path}") as err:
        QWenTokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_save_pretrained_round_trip(tmp_path: Path, shared_dir: Path, qwen_tokenizer: QWenTokenizer) -> None:
    vocab, config = qwen_tokenizer.save_pretrained(tmp_path)
    assert vocab.read_bytes() == (shared_dir / "qwen-vl-chat" / "qwen.tiktoken").read_bytes()
    saved = json.loads(config.read_text())
    assert saved["tokenizer_class"] == "QWenTokenizer" and "auto_map" not in saved
    again = QWenTokenizer.from_pretrained(tmp_path)
    assert again.encode("Picture 1:<img>a.png</img>") == qwen_tokenizer.encode("Picture 1:<img>a.png</img>")
    assert again.model_max_length == 8192


def test_pickle_round_trip(qwen_tokenizer: QWenTokenizer) -> None:
    again = pickle.loads(pickle.dumps(qwen_tokenizer))
    assert again.encode("你好，世界！") == [108386, 3837, 99489, 6313]


def test_byte_level_vocab(tmp_path: Path) -> None:
    # The tiny test checkpoints use 256 single-byte ranks; special ids then start at 256.
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (tmp_path / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    tok = QWenTokenizer.from_pretrained(tmp_path)
    assert (tok.eod_id, tok.img_start_id, len(tok)) == (256, 256 + 3 + 205 + 6, 256 + 217)
    text = "hé <img>a.png</img><|im_end|>"
    assert tok.decode(tok.encode(text)) == text


def test_to_list_format_and_boxes() -> None:
    text = "Picture 1:<img>c.png</img>\n<ref> the square </ref><box>(10,20),(300,400)</box><box>(1,2),(3,4)</box>"
    assert to_list_format(text) == [
        {"text": "Picture 1:"}, {"image": "c.png"}, {"text": "\n"}, {"ref": " the square "},
        {"box": "(10,20),(300,400)"}, {"box": "(1,2),(3,4)"},
    ]
    assert extract_boxes(text) == [{"box": (10, 20, 300, 400), "ref": "the square"}, {"box": (1, 2, 3, 4)}]
    # A half-generated reply: the unclosed tag stays text, a malformed box is skipped.
    assert extract_boxes("<box>(1,2)</box><ref>dog</ref><box>(1,") == []
    assert to_list_format("<ref>dog")[-1] == {"text": "<ref>dog"}


def test_ids_of_the_padded_vocabulary_rows_decode_to_nothing(qwen_tokenizer):
    # config vocab_size is 151936 but the tokenizer has 151860 ids: a model can emit the rest.
    assert qwen_tokenizer.decode([9707, 151900, 1879]) == "Hello world"
