"""The swift-style Python API: load a model and tokenizer, build a template, chat."""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator

import torch

from .models.loading import CheckpointError, load_pretrained, resolve_dtype, resolve_model_dir
from .template import get_default_template_type, get_template  # noqa: F401 - re-exported
from .tokenizer import QWenTokenizer

History = list[list[str]]


class ModelType:
    """Model types known to vlswift (swift's names)."""

    qwen_vl_chat = "qwen-vl-chat"
    qwen_vl = "qwen-vl"

    @classmethod
    def all(cls) -> list[str]:
        return [cls.qwen_vl_chat, cls.qwen_vl]


def check_model_type(model_type: str) -> str:
    if model_type not in ModelType.all():
        raise ValueError(f"unknown --model_type {model_type!r}: expected one of {', '.join(ModelType.all())}")
    return model_type


def get_model_tokenizer(
    model_type: str,
    torch_dtype: torch.dtype | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    load_model: bool = True,
    model_id_or_path: str | None = None,
) -> tuple[Any, QWenTokenizer]:
    """Load Qwen-VL(-Chat) and its tokenizer from a local folder or the hub.

    ``model_kwargs``: ``device_map`` ('auto', a device string or an accelerate map).
    ``torch_dtype``: a torch dtype or ``bf16|fp16|fp32|AUTO``.
    """
    check_model_type(model_type)
    folder = resolve_model_dir(model_type, model_id_or_path)
    tokenizer = QWenTokenizer.from_pretrained(folder)
    if not load_model:
        return None, tokenizer
    kwargs = dict(model_kwargs or {})
    device_map = kwargs.pop("device_map", None)
    device = None
    if isinstance(device_map, (str, torch.device)) and device_map != "auto":
        device, device_map = device_map, None
    dtype = resolve_dtype(torch_dtype, device)
    model = load_pretrained(folder, dtype, device=device, device_map=device_map)
    gc = model.generation_config
    gc.eos_token_id = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    gc.pad_token_id = tokenizer.pad_token_id
    model.model_type = model_type
    return model, tokenizer


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA) for reproducible sampling and training."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _sampling_config(model, template, generation_config):
    from .infer.engine import SamplingConfig

    return SamplingConfig.from_generation_config(
        generation_config if generation_config is not None else model.generation_config,
        template.stop_token_ids,
    )


def stream_text(tokenizer: QWenTokenizer, ids: list[int], stop_ids: list[int]) -> str:
    """Decoded text of ids so far, holding back a trailing incomplete multi-byte character."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, errors="replace")
    return text[:-1] if text.endswith("\ufffd") else text


def encode_within_window(template, query: str, history: History, system: str | None,
                         max_window_size: int | None) -> dict:
    """Encode the prompt, leaving out the oldest history turns while it is longer than
    ``max_window_size`` tokens (as the official ``chat`` does with its generation config's
    ``max_window_size``); the history itself is kept whole."""
    used = history
    enc = template.encode(query, used, system)
    while max_window_size and used and len(enc["input_ids"]) >= max_window_size:
        used = used[1:]
        enc = template.encode(query, used, system)
    return enc


def inference_stream(
    model,
    template,
    query: str,
    history: History | None = None,
    system: str | None = None,
    generation_config=None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[str, History]]:
    """Yield ``(response_so_far, history)`` as tokens arrive; the last item has the final reply."""
    from .infer.engine import generate_stream

    history = [list(h) for h in (history or [])]
    gc = generation_config if generation_config is not None else model.generation_config
    enc = encode_within_window(template, query, history, system, getattr(gc, "max_window_size", None))
    cfg = _sampling_config(model, template, generation_config)
    ids: list[int] = []
    shown = ""
    for rows in generate_stream(model, [enc["input_ids"]], enc["images"], cfg,
                                pad_id=template.tokenizer.pad_token_id, should_stop=should_stop):
        ids = rows[0]
        # One token behind and left-stripped: the final reply drops the newest token when no stop
        # token came (the qwen template does, like the official chat) and is stripped, so every
        # partial text stays a prefix of the final one.
        text = stream_text(template.tokenizer, ids[:-1], cfg.stop_token_ids).lstrip()
        if text != shown:
            shown = text
            yield text, history + [[query, text]]
    response = template.decode_response(ids)
    yield response, history + [[query, response]]


def inference(
    model,
    template,
    query: str,
    history: History | None = None,
    system: str | None = None,
    generation_config=None,
) -> tuple[str, History]:
    """One reply to ``query`` given ``history``; returns ``(response, history + [[query, response]])``."""
    response, new_history = "", history or []
    for response, new_history in inference_stream(model, template, query, history, system, generation_config):
        pass
    return response, new_history


__all__ = [
    "CheckpointError", "ModelType", "get_model_tokenizer", "get_default_template_type", "get_template",
    "inference", "inference_stream", "seed_everything",
]
