"""The Qwen(-VL) tokenizer: tiktoken BPE over ``qwen.tiktoken`` plus Qwen's special tokens.

Ids are identical to the official ``tokenization_qwen.QWenTokenizer``. The one Qwen-VL twist:
the text between ``<img>`` and ``</img>`` (a path or URL) is not BPE-encoded but stored as its
raw UTF-8 byte values, padded with ``<imgpad>`` to a fixed 256 ids, because the model later
overwrites those 256 positions with the image's 256 visual features.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any, Collection, Iterable, Literal

import tiktoken

VOCAB_FILE = "qwen.tiktoken"
CONFIG_FILE = "tokenizer_config.json"

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
# Order matters: ids are assigned in this order right after the BPE ranks.
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_ST
IMG_TOKEN_SPAN = 256


class TokenizerFileError(ValueError):
    """The tokenizer files of a folder are missing or unreadable."""


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``<base64 token> <rank>`` per line).

    Parsed here rather than with ``tiktoken.load.load_tiktoken_bpe`` because tiktoken caches
    even local files by path and would return stale ranks for a changed file.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise TokenizerFileError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def _find(ids: list[int], start_id: int, end_id: int, pos: int) -> tuple[int, int] | None:
    """(start, end) indices of the next closed ``start_id ... end_id`` span at or after ``pos``."""
    try:
        start = ids.index(start_id, pos)
        return start, ids.index(end_id, start)
    except ValueError:
        return None


class QWenTokenizer:
    """Qwen tokenizer with the official ids; what ``decode`` returns matches the official ``decode``.

    Load with :meth:`from_pretrained` (a folder holding ``qwen.tiktoken``). Works as the
    tokenizer of HF streamers, which only call ``decode(ids_or_id, **kwargs)``.
    """

    IMAGE_ST = IMAGE_ST

    def __init__(self, vocab_file: str | Path, errors: str = "replace", config: dict[str, Any] | None = None):
        self.vocab_file = Path(vocab_file)
        self.errors = errors
        self.config = dict(config or {})
        self.model_max_length: int = int(self.config.get("model_max_length", 8192))
        self.mergeable_ranks = load_ranks(self.vocab_file)
        self.special_tokens = {tok: i for i, tok in enumerate(SPECIAL_TOKENS, start=len(self.mergeable_ranks))}
        self._enc = self._build_encoding()

        ids = self.special_tokens
        self.eod_id = ids[ENDOFTEXT]
        self.im_start_id, self.im_end_id = ids[IMSTART], ids[IMEND]
        self.ref_start_id, self.ref_end_id = ids[REF_START], ids[REF_END]
        self.box_start_id, self.box_end_id = ids[BOX_START], ids[BOX_END]
        self.quad_start_id, self.quad_end_id = ids[QUAD_START], ids[QUAD_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = ids[IMG_START], ids[IMG_END], ids[IMG_PAD]
        self.eos_token_id = self.pad_token_id = self.eod_id

    def _build_encoding(self) -> tiktoken.Encoding:
        return tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )

    # tiktoken's Encoding is rebuilt rather than pickled so DataLoader workers get a clean copy.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_enc"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._enc = self._build_encoding()

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> "QWenTokenizer":
        """Load from a checkpoint folder holding ``qwen.tiktoken`` (and optionally ``tokenizer_config.json``)."""
        folder = Path(folder).expanduser()
        vocab = folder / VOCAB_FILE
        if not vocab.is_file():
            raise TokenizerFileError(f"no {VOCAB_FILE} in {folder}: is this a Qwen-VL checkpoint folder?")
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(vocab, config=config, **kwargs)

    def save_pretrained(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``qwen.tiktoken`` and ``tokenizer_config.json`` into ``folder``; returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = folder / VOCAB_FILE
        if vocab.resolve() != self.vocab_file.resolve():
            shutil.copyfile(self.vocab_file, vocab)
        # Drop the official auto_map: it points at remote code that our folders do not ship.
        config = {k: v for k, v in self.config.items() if k != "auto_map"}
        config.update(model_max_length=self.model_max_length, tokenizer_class="QWenTokenizer")
        config_path = folder / CONFIG_FILE
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return vocab, config_path

    def __len__(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of ``text`` (NFC-normalised first, as the official tokenizer does).

        Special tokens not in ``allowed_special`` are encoded as ordinary text. Each
        ``<img>PATH</img>`` becomes ``<img>``, PATH's UTF-8 bytes as ids, ``<imgpad>`` up to 256
        ids, ``</img>``.
        """
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        ids = self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        out: list[int] = []
        pos = 0
        while (span := _find(ids, self.img_start_id, self.img_end_id, pos)) is not None:
            start, end = span
            url = self._enc.decode_bytes(ids[start + 1 : end])
            if len(url) > IMG_TOKEN_SPAN:
                raise ValueError(
                    f"image path/URL is {len(url)} bytes, longer than the {IMG_TOKEN_SPAN} an <img> span holds: "
                    f"{url.decode('utf-8', 'replace')[:80]}... (shorten it, e.g. move or link the file)"
                )
            out += ids[pos:start] + [self.img_start_id] + list(url)
            out += [self.img_pad_id] * (IMG_TOKEN_SPAN - len(url)) + [self.img_end_id]
            pos = end + 1
        if pos < len(ids) and self.img_start_id in ids[pos:]:
            raise ValueError(f"unclosed {IMG_START} in {text[:80]!r}: every {IMG_START} needs its {IMG_END}")
        return out + ids[pos:]

    def decode(
        self,
        ids: int | Iterable[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Text of ``ids``; image spans turn back into ``<img>PATH</img>``.

        ``skip_special_tokens`` drops every id from ``<|endoftext|>`` upward (tags included).
        Accepts an int, a list or a 1-D tensor. Other keyword arguments (passed by HF
        streamers, e.g. ``clean_up_tokenization_spaces``) are ignored.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else list(ids)
        out: list[int] = []
        pos = 0
        while (span := _find(ids, self.img_start_id, self.img_end_id, pos)) is not None:
            start, end = span
            inner = ids[start + 1 : end]
            if self.img_pad_id in inner:
                inner = inner[: inner.index(self.img_pad_id)]
            out += ids[pos : start + 1]
            # A generated span need not hold byte values; leave such ids to the plain decode.
            if all(0 <= i < 256 for i in inner):
                out += self._enc.encode_ordinary(bytes(inner).decode("utf-8", errors or self.errors))
            else:
                out += inner
            out.append(self.img_end_id)
            pos = end + 1
        out += ids[pos:]
        # The embedding table is padded past the vocabulary (151936 > 151860); a model can
        # still generate those ids, which have no text.
        limit = self.eod_id if skip_special_tokens else self._enc.n_vocab
        return self._enc.decode([i for i in out if 0 <= i < limit], errors=errors or self.errors)

    def to_list_format(self, text: str) -> list[dict[str, str]]:
        """The module's :func:`to_list_format`, also here because the official tokenizer has it."""
        return to_list_format(text)


_TAG_PAIRS = {"image": (IMG_START, IMG_END), "ref": (REF_START, REF_END),
              "box": (BOX_START, BOX_END), "quad": (QUAD_START, QUAD_END)}
_TAGGED = re.compile(
    "|".join(f"(?P<{key}>{re.escape(a)}(?P<{key}_v>.*?){re.escape(b)})" for key, (a, b) in _TAG_PAIRS.items()),
    re.DOTALL,
)
_BOX = re.compile(r"^\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$")


def to_list_format(text: str) -> list[dict[str, str]]:
    """Split a Qwen-VL text into ``[{'text'|'image'|'ref'|'box'|'quad': content}, ...]``.

    Like the official ``to_list_format``: NFC-normalised, empty text pieces dropped, a span ends
    at the first closing tag of its kind. Unlike it, an unclosed tag stays plain text instead of
    raising, so half-finished model replies can be parsed.
    """
    text = unicodedata.normalize("NFC", text)
    out: list[dict[str, str]] = []
    pos = 0
    for m in _TAGGED.finditer(text):
        if m.start() > pos:
            out.append({"text": text[pos : m.start()]})
        key = next(k for k in _TAG_PAIRS if m.group(k) is not None)
        out.append({key: m.group(f"{key}_v")})
        pos = m.end()
    if pos < len(text):
        out.append({"text": text[pos:]})
    return out


def extract_boxes(text: str) -> list[dict[str, Any]]:
    """Boxes in a grounding reply: ``[{'box': (x1, y1, x2, y2), 'ref': str?}, ...]``.

    Coordinates are Qwen-VL's 0..1000 scale. A box takes the ``<ref>`` right before it (stripped),
    as the official ``_fetch_all_box_with_ref`` does; malformed boxes are skipped.
    """
    items = to_list_format(text)
    boxes: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        m = _BOX.match(item.get("box", ""))
        if m is None:
            continue
        box: dict[str, Any] = {"box": tuple(int(v) for v in m.groups())}
        if i > 0 and "ref" in items[i - 1]:
            box["ref"] = items[i - 1]["ref"].strip()
        boxes.append(box)
    return boxes
