"""Token generation: prefill once, then decode one token at a time against a static KV cache.

The plain path (any device) runs the model eagerly, one call per token. On CUDA the decode
steps are CUDA-graph replays of a fixed-shape step instead (``fast_decode.py``), and so are
the decoder blocks of a short prompt's prefill; both paths write the same cache and give the
same tokens. ``VLSWIFT_NO_FAST_DECODE=1`` keeps the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


KV_BUCKET = 128  # decode steps read the cache in steps of this many positions


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StaticKVCache:
    """Preallocated keys/values [B, H, max_len, D] per layer, filled left to right.

    Implements what the attention layers use (``update``, ``get_seq_length``,
    ``read_length``); ``ntk_alpha`` (per sequence) is set at prefill and reused by the decode
    steps. A one-token step reads the cache up to the next multiple of ``KV_BUCKET`` (the
    model masks the unfilled part), which is what the CUDA-graph step of ``fast_decode.py``
    reads too: the two then run attention on identical inputs and give identical bits.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        # One buffer, so that resetting it is one kernel.
        self.buffer = torch.zeros((num_layers, 2, batch, heads, max_len, head_dim), dtype=dtype, device=device)
        self.keys = list(self.buffer[:, 0].unbind(0))
        self.values = list(self.buffer[:, 1].unbind(0))
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0
        self.ntk_alpha: torch.Tensor | None = None

    def reset(self) -> None:
        """Empty the cache for a new prompt (zeroed, so stale values never meet a mask)."""
        self.buffer.zero_()
        self.length = 0
        self.ntk_alpha = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def read_length(self, end: int, new: int) -> int:
        """How many positions attention reads after writing ``new`` of them up to ``end``."""
        return min(self.max_len, round_up(end, KV_BUCKET)) if new == 1 else end

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        if layer_idx == self.num_layers - 1:
            self.length = end
        read = self.read_length(end, k.size(2))
        return self.keys[layer_idx][:, :, :read], self.values[layer_idx][:, :, :read]


@dataclass
class SamplingConfig:
    """The generation options swift exposes; defaults = greedy."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    stop_token_ids: list[int] = field(default_factory=lambda: [151645, 151644, 151643])

    @classmethod
    def from_generation_config(cls, gc, stop_token_ids: list[int] | None = None) -> "SamplingConfig":
        """Read an HF ``GenerationConfig`` (e.g. ``model.generation_config``)."""
        temperature = getattr(gc, "temperature", None)
        do_sample = bool(getattr(gc, "do_sample", False)) and (temperature is None or temperature > 0)
        cfg = cls(
            max_new_tokens=getattr(gc, "max_new_tokens", None) or 512,
            do_sample=do_sample,
            temperature=temperature if temperature else 1.0,
            top_k=getattr(gc, "top_k", None) or 0,
            top_p=getattr(gc, "top_p", None) or 1.0,
            repetition_penalty=getattr(gc, "repetition_penalty", None) or 1.0,
            num_beams=getattr(gc, "num_beams", None) or 1,
        )
        if stop_token_ids is not None:
            cfg.stop_token_ids = list(stop_token_ids)
        return cfg


def next_token(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token per row from last-position logits [B, V] (HF processor semantics)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        prev = logits.gather(1, seen)
        prev = torch.where(prev < 0, prev * cfg.repetition_penalty, prev / cfg.repetition_penalty)
        logits = logits.scatter(1, seen, prev)
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.inference_mode()
def generate_stream(
    model,
    prompts: list[list[int]],
    images: torch.Tensor | None,
    cfg: SamplingConfig,
    pad_id: int = 151643,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[list[list[int]]]:
    """Yield, after each step, the generated ids of every prompt (a row that stopped ends with its stop token).

    ``images``: all prompts' images in order (prompt 0's first). Rows that stop keep their
    ids; the loop ends when every row stopped or ``max_new_tokens`` is reached.
    """
    if cfg.num_beams > 1:
        yield from _beam_search(model, prompts, images, cfg, pad_id)
        return
    from . import fast_decode

    device = model_device(model)
    ids, mask = left_pad(prompts, pad_id)
    # Without padding the prefill needs no mask: plain causal attention (flash kernels).
    prefill_mask = None if bool(mask.all()) else mask.to(device)
    ids, mask = ids.to(device), mask.to(device)
    b = ids.size(0)
    # Rounded up so that the plain and the fast path lay the cache out alike (and later
    # prompts can reuse the fast path's graphs).
    max_len = round_up(ids.size(1) + cfg.max_new_tokens, KV_BUCKET)
    decoder = fast_decode.decoder_for(model, b, max_len) if fast_decode.wanted(model) else None
    if decoder is not None:
        cache = decoder.cache
    else:
        cfg_model = model.config
        cache = StaticKVCache(
            cfg_model.num_hidden_layers, b, cfg_model.num_attention_heads, max_len,
            cfg_model.hidden_size // cfg_model.num_attention_heads, model.dtype, device,
        )
    stop = torch.tensor(cfg.stop_token_ids, device=device)
    if decoder is not None and decoder.prefill_fits(ids, prefill_mask):
        logits = decoder.prefill(ids, images)  # the same call, its decoder blocks from a CUDA graph
    else:
        logits = model(input_ids=ids, images=images, attention_mask=prefill_mask, cache=cache,
                       logits_to_keep=1).logits[:, -1]
    if decoder is not None:
        decoder.start(mask)
    generated: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    done_host = [False] * b
    seen = ids

    def advance(token: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` and pick the next one (queued on the device, no host sync)."""
        nonlocal seen, mask
        if cfg.repetition_penalty != 1.0:
            seen = torch.cat([seen, token[:, None]], dim=1)
        if decoder is not None:
            logits = decoder.step(token, ~done)
        else:
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        return next_token(logits, seen, cfg)

    # On CUDA the next step is queued before this token is handed out (the GPU computes step
    # n+1 while the host yields token n); on the CPU that would only delay the yield.
    ahead = device.type == "cuda"
    host = torch.empty((2, b), dtype=torch.long, pin_memory=ahead)
    token = next_token(logits, seen, cfg)
    for step in range(cfg.max_new_tokens):
        token = torch.where(done, torch.full_like(token, pad_id), token)
        done = done | torch.isin(token, stop)
        more = step + 1 < cfg.max_new_tokens
        host.copy_(torch.stack([token, done.long()]), non_blocking=ahead)
        if ahead:
            copied = torch.cuda.Event()
            copied.record()
            following = advance(token, done) if more else None
            copied.synchronize()
        tokens, stopped = host.tolist()
        for i, t in enumerate(tokens):
            if not done_host[i]:
                generated[i].append(t)
        done_host = [bool(x) for x in stopped]
        yield generated
        if all(done_host) or (should_stop is not None and should_stop()):
            return
        token = following if ahead else advance(token, done)


def beam_search_options(cfg: SamplingConfig, pad_id: int) -> dict:
    """``GenerationConfig`` keywords of a beam search: the sampling options only when sampling.

    Without sampling they are set to transformers' own defaults rather than left out: ``generate``
    fills what is unset from the checkpoint's ``generation_config.json`` (Qwen-VL-Chat's
    ``top_p=0.3``, ``top_k=0``) and then warns that they are invalid without ``do_sample``.
    """
    options = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                   repetition_penalty=cfg.repetition_penalty, eos_token_id=cfg.stop_token_ids,
                   pad_token_id=pad_id)
    if cfg.do_sample:
        options.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    else:
        options.update(temperature=1.0, top_k=50, top_p=1.0)
    return options


def _beam_search(model, prompts, images, cfg: SamplingConfig, pad_id: int) -> Iterator[list[list[int]]]:
    """Beam search through transformers' ``generate`` (rare in chat; no streaming)."""
    from transformers import GenerationConfig

    device = model_device(model)
    ids, mask = left_pad(prompts, pad_id)
    gc = GenerationConfig(**beam_search_options(cfg, pad_id))
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), images=images, generation_config=gc)
    rows = []
    for row in out[:, ids.size(1):].tolist():
        stops = [i for i, t in enumerate(row) if t in cfg.stop_token_ids]
        rows.append(row[: stops[0] + 1] if stops else row)
    yield rows
