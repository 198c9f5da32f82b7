"""Prompt templates: query + history -> token ids, training labels and image pixels.

``qwen`` is the chatml format of Qwen-VL-Chat, token for token as the official ``make_context``
builds it: role, ``\\n`` and content are tokenized separately, and only the image/box tags are
special inside contents (a user typing ``<|im_end|>`` gets plain text, not a turn boundary).
``default-generation`` is the raw format of the base Qwen-VL: the query alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .media import load_image_tensor
from .tokenizer import IMAGE_ST, IMEND, IMSTART, QWenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100
TEMPLATE_TYPES = ("qwen", "default-generation")
TRUNCATION_STRATEGIES = ("delete", "truncation_left")
_DEFAULT_TEMPLATE = {"qwen-vl-chat": "qwen", "qwen-vl": "default-generation"}


class SampleTooLongError(ValueError):
    """A sample has more tokens than ``max_length`` (callers usually drop it with a warning)."""

    def __init__(self, length: int, max_length: int):
        self.length = length
        self.max_length = max_length
        super().__init__(f"sample has {length} tokens, more than max_length={max_length}")


def get_default_template_type(model_type: str) -> str:
    """The template a model type is trained with: ``qwen`` for qwen-vl-chat, raw text for qwen-vl."""
    try:
        return _DEFAULT_TEMPLATE[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type {model_type!r}: expected one of {', '.join(_DEFAULT_TEMPLATE)}") from None


class Template:
    """Turns a conversation into model inputs, and generated ids back into a reply.

    ``encode`` returns ``input_ids``, ``labels`` (only when a ``response`` is given),
    ``images`` (``[N, 3, 448, 448]`` for the ``<img>`` spans left in ``input_ids``, in order,
    or None) and ``raw_text`` (the prompt string).
    """

    def __init__(
        self,
        template_type: str,
        tokenizer: QWenTokenizer,
        default_system: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str = "delete",
        base_dir: str | Path | None = None,
    ):
        if template_type not in TEMPLATE_TYPES:
            raise ValueError(f"unknown template_type {template_type!r}: expected one of {', '.join(TEMPLATE_TYPES)}")
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"unknown truncation_strategy {truncation_strategy!r}: "
                             f"expected one of {', '.join(TRUNCATION_STRATEGIES)}")
        self.template_type = template_type
        self.tokenizer = tokenizer
        self.default_system = DEFAULT_SYSTEM if default_system is None else default_system
        # swift spells "no limit" as -1.
        self.max_length = max_length if max_length is not None and max_length > 0 else None
        self.truncation_strategy = truncation_strategy
        self.base_dir = base_dir

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a reply."""
        tok = self.tokenizer
        if self.template_type == "qwen":
            return [tok.im_end_id, tok.im_start_id, tok.eod_id]
        return [tok.eod_id]

    def encode(
        self,
        query: str,
        history: Sequence[Sequence[str]] | None = None,
        system: str | None = None,
        response: str | None = None,
    ) -> dict[str, Any]:
        """Encode a conversation; with ``response`` it is a training sample (``labels`` set).

        ``history`` is ``[[query, response], ...]``; ``system`` None means the default system.
        Raises :class:`SampleTooLongError` (strategy ``delete``) and
        :class:`~vlswift.media.ImageLoadError` (an image that cannot be loaded).
        """
        history = [tuple(turn) for turn in history or []]
        for i, turn in enumerate(history):
            if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
                raise ValueError(f"history[{i}] must be a [query, response] pair of strings, got {turn!r}")
        if self.template_type == "qwen":
            ids, train, raw_text = self._chatml(query, history, self.default_system if system is None else system,
                                                response)
        else:
            if history:
                raise ValueError("template 'default-generation' (base qwen-vl) takes no history")
            ids, train, raw_text = self._raw(query, response)
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, train)] if response is not None else None
        ids, labels = self._truncate(ids, labels)
        return {"input_ids": ids, "labels": labels, "images": self._load_images(ids), "raw_text": raw_text}

    def _chatml(
        self, query: str, history: list[tuple[str, str]], system: str, response: str | None
    ) -> tuple[list[int], list[bool], str]:
        tok = self.tokenizer
        nl = tok.encode("\n")

        def content(text: str) -> list[int]:
            return tok.encode(text, allowed_special=IMAGE_ST)

        def opening(role: str) -> list[int]:
            return [tok.im_start_id] + tok.encode(role, allowed_special=IMAGE_ST) + nl

        ids: list[int] = []
        train: list[bool] = []

        def add(tokens: list[int], trained: bool = False) -> None:
            ids.extend(tokens)
            train.extend([trained] * len(tokens))

        add(opening("system") + content(system) + [tok.im_end_id])
        raw_text = f"{IMSTART}system\n{system}{IMEND}"
        # Every assistant reply (history included) and its <|im_end|> are trained, so the model
        # learns to answer and to stop, as Qwen-VL's finetune.py does.
        for turn_query, turn_response in history:
            add(nl + opening("user") + content(turn_query) + [tok.im_end_id] + nl + opening("assistant"))
            add(content(turn_response) + [tok.im_end_id], trained=True)
            raw_text += f"\n{IMSTART}user\n{turn_query}{IMEND}\n{IMSTART}assistant\n{turn_response}{IMEND}"
        add(nl + opening("user") + content(query) + [tok.im_end_id] + nl + opening("assistant"))
        raw_text += f"\n{IMSTART}user\n{query}{IMEND}\n{IMSTART}assistant\n"
        if response is not None:
            add(content(response) + [tok.im_end_id], trained=True)
            raw_text += f"{response}{IMEND}"
        return ids, train, raw_text

    def _raw(self, query: str, response: str | None) -> tuple[list[int], list[bool], str]:
        ids = self.tokenizer.encode(query)
        train = [False] * len(ids)
        if response is not None:
            reply = self.tokenizer.encode(response) + [self.tokenizer.eod_id]
            ids, train = ids + reply, train + [True] * len(reply)
            return ids, train, query + response
        return ids, train, query

    def _image_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) index of each ``<img> ... </img>`` span, both inclusive."""
        tok = self.tokenizer
        starts = [i for i, t in enumerate(ids) if t == tok.img_start_id]
        return [(s, ids.index(tok.img_end_id, s)) for s in starts]

    def _truncate(self, ids: list[int], labels: list[int] | None) -> tuple[list[int], list[int] | None]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels
        if self.truncation_strategy == "delete":
            raise SampleTooLongError(len(ids), self.max_length)
        cut = len(ids) - self.max_length
        for start, end in self._image_spans(ids):
            # Half an image span would leave the model fewer than 256 positions for its features.
            if start < cut <= end:
                cut = end + 1
        if cut >= len(ids):
            raise SampleTooLongError(len(ids), self.max_length)
        return ids[cut:], labels[cut:] if labels is not None else None

    def _load_images(self, ids: list[int]) -> torch.Tensor | None:
        tok = self.tokenizer
        paths = []
        for start, end in self._image_spans(ids):
            inner = ids[start + 1 : end]
            if tok.img_pad_id in inner:
                inner = inner[: inner.index(tok.img_pad_id)]
            paths.append(bytes(inner).decode("utf-8"))
        if not paths:
            return None
        return torch.stack([load_image_tensor(p, self.base_dir) for p in paths])

    def decode_response(self, generated_ids: Iterable[int]) -> str:
        """The reply text of the generated ids (prompt excluded), as the official ``chat`` returns it.

        Cut before the first stop token. Without a stop token the official ``_decode_chatml``
        also drops the last generated token (its search loop leaves the index on the last
        token); the golden replies show it, so the ``qwen`` template does the same.
        """
        ids = generated_ids.tolist() if hasattr(generated_ids, "tolist") else list(generated_ids)
        stops = set(self.stop_token_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        if end is None:
            end = max(len(ids) - 1, 0) if self.template_type == "qwen" else len(ids)
        return self.tokenizer.decode(ids[:end], errors="replace").strip()


def get_template(
    template_type: str,
    tokenizer: QWenTokenizer,
    default_system: str | None = None,
    max_length: int | None = None,
    truncation_strategy: str = "delete",
    base_dir: str | Path | None = None,
) -> Template:
    """Build a :class:`Template` (``qwen`` or ``default-generation``).

    ``max_length`` None or -1 means no limit; ``base_dir`` is the folder that relative image
    paths are read from (default: the current folder).
    """
    return Template(template_type, tokenizer, default_system, max_length, truncation_strategy, base_dir)
