"""CUDA fast decode: the one-token step with fixed shapes, replayed from CUDA graphs.

A decode step of the 7B decoder at batch 1 is ~1,500 kernel launches; launched one by one
from Python they take longer than the 14 GB of weight reads they wrap. Here the step is
written with fixed shapes and captured once in a CUDA graph, then replayed per token:

- the KV cache is preallocated (``StaticKVCache``) and the step writes its keys/values at a
  slot given as a device tensor (``index_copy_``), so nothing in the step depends on a
  host-side length;
- attention reads the cache up to the next multiple of ``KV_BUCKET`` positions (one graph
  per bucket) with a key mask, exactly as the plain step over ``StaticKVCache`` does, so
  both run attention on identical inputs;
- positions, rotary cos/sin (from inverse frequencies fixed at prefill, i.e. the prompt's
  dynamic-NTK alpha) and logn factors are computed inside the graph from the key mask.

The step calls the model's own blocks (``QWenModel.run_blocks``), so the eager step and its
graph run the same kernels and give the same tokens. ``VLSWIFT_NO_FAST_DECODE=1`` turns the
path off (``generate_stream`` then calls the model once per token).

The prompt's prefill is a CUDA graph too (``StaticDecoder.prefill``): at batch 1 its ~1,000
launches took ~14 ms on the host for ~7 ms of GPU work. The embeddings (and the vision
tower, itself a graph) run eagerly; the decoder blocks are replayed from a graph captured
per prompt-length bucket (``PREFILL_BUCKET``). The prompt is padded on the *right* up to
the bucket: with causal attention no real position sees a pad, so the real positions run
the same (flash, causal) attention as the unpadded prefill, every other op is row-wise, and
the pad slots of the cache are zeroed afterwards (the cache then holds what the unpadded
prefill writes). Only prompts without a padding mask (all rows of one length) and up to
``PREFILL_GRAPH_MAX_TOKENS`` positions in all use it; ``VLSWIFT_NO_PREFILL_GRAPH=1`` turns it off.
"""

from __future__ import annotations

import os

import torch

from ..models.qwen import rotary_inv_freq
from .engine import KV_BUCKET, StaticKVCache, round_up

# Prefill graphs: prompt lengths are padded (on the right) to a multiple of this; it divides
# KV_BUCKET, so a bucket never outgrows the cache. Above PREFILL_GRAPH_MAX_TOKENS positions
# (batch x bucket) the prefill keeps the GPU busy on its own and runs eagerly.
PREFILL_BUCKET = 32
PREFILL_GRAPH_MAX_TOKENS = 1024


def wanted(model) -> bool:
    """Whether ``generate_stream`` should decode through CUDA graphs for ``model``."""
    if os.environ.get("VLSWIFT_NO_FAST_DECODE", "0") not in ("", "0"):
        return False
    base = _base_model(model)
    if not hasattr(base, "transformer") or not base.lm_head.weight.is_cuda:
        return False
    # Spread over several devices (accelerate's device_map) the step cannot be one graph.
    return len(set((getattr(base, "hf_device_map", None) or {"": 0}).values())) == 1


def decoder_for(model, batch: int, max_len: int, graphs: bool = True) -> "StaticDecoder":
    """The model's decoder for ``batch`` rows and ``max_len`` positions, reused across calls.

    Steps replay CUDA graphs where the model is on CUDA and ``graphs``, else run eagerly. One decoder (its cache and graphs) is kept on the model; a call with another shape
    replaces it.
    """
    base = _base_model(model)
    max_len = round_up(max_len, KV_BUCKET)
    graphs = graphs and base.lm_head.weight.is_cuda
    dec = getattr(base, "_vlswift_decoder", None)
    if dec is None or (dec.batch, dec.max_len, dec.graphs_on) != (batch, max_len, graphs):
        base._vlswift_decoder = None
        del dec
        dec = StaticDecoder(model, batch, max_len, graphs)
        base._vlswift_decoder = dec
    dec.cache.reset()
    return dec


def _base_model(model):
    """The ``QWenLMHeadModel`` inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _SlotCache:
    """What attention sees of the cache during a fixed-shape step: writes at ``slot``, reads ``:kv_len``."""

    def __init__(self, cache: StaticKVCache, slot: torch.Tensor, kv_len: int):
        self.cache, self.slot, self.kv_len = cache, slot, kv_len

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]


class _PrefillCache:
    """What attention sees of the cache in a prefill padded to ``width`` positions: writes and reads ``:width``."""

    def __init__(self, cache: StaticKVCache, width: int):
        self.cache, self.width = cache, width

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[:, :, : self.width] = k
        values[:, :, : self.width] = v
        return keys[:, :, : self.width], values[:, :, : self.width]


def prefill_bucket(length: int) -> int:
    return round_up(length, PREFILL_BUCKET)


class StaticDecoder:
    """One-token decode steps with fixed shapes over a static KV cache (eager or CUDA graphs).

    Use: ``start(prompt_mask)`` after the prefill has filled ``cache`` (the model's forward, or
    ``prefill`` where ``prefill_fits``), then per token ``step(token, keep)`` -> logits [B, vocab]
    (a buffer the next step overwrites).
    """

    # The padded prefill also without graphs (CPU tests of its logic); the engine otherwise
    # uses it only where it is replayed from CUDA graphs.
    pad_prefill_eagerly = False

    def __init__(self, model, batch: int, max_len: int, graphs: bool = True):
        base = _base_model(model)
        cfg = base.config
        self.model = model
        self.base = base
        self.batch, self.max_len, self.graphs_on = batch, max_len, graphs
        device = base.lm_head.weight.device
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.cache = StaticKVCache(cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len,
                                   head_dim, base.lm_head.weight.dtype, device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.inv_freq = torch.zeros(batch, base.transformer.rotary_dim // 2, dtype=torch.float32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.prefill_inv_freq = torch.zeros_like(self.inv_freq)
        # (bucket, logn) -> (graph or None, embeddings in [B, bucket, D], final hidden states out)
        self.prefill_graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor]] = {}

    def prefill_fits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Whether ``prefill`` can take this prompt batch (no padding mask, one length, small enough)."""
        if not (self.graphs_on or self.pad_prefill_eagerly) or attention_mask is not None or self.base.training:
            return False
        if os.environ.get("VLSWIFT_NO_PREFILL_GRAPH", "0") not in ("", "0"):
            return False
        b, t = ids.shape
        bucket = prefill_bucket(t)
        return b == self.batch and t > 1 and b * bucket <= PREFILL_GRAPH_MAX_TOKENS and bucket <= self.max_len

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """``model(input_ids=ids, images=images, cache=self.cache, logits_to_keep=1).logits[:, -1]``
        with the decoder blocks replayed from a graph of the prompt's length bucket.

        ``ids`` [B, T] without padding (see ``prefill_fits``), after ``decoder_for`` emptied the
        cache; fills the cache as that call does.
        """
        tr = self.base.transformer
        b, t = ids.shape
        bucket = prefill_bucket(t)
        if self.cache.length:
            self.cache.reset()
        # As QWenModel.forward at past == 0 without a mask: the NTK alpha from the length
        # (stored on the cache for the decode steps), embeddings with the images spliced in.
        alpha = tr.ntk_alpha(None, self.cache, 0, b, t)
        self.prefill_inv_freq.copy_(rotary_inv_freq(alpha, tr.rotary_dim, self.base.config.rotary_emb_base,
                                                    self.prefill_inv_freq.device))
        x = tr.drop(tr.splice_images(ids, tr.wte(ids), images))
        key = (bucket, tr.uses_logn(t))
        entry = self.prefill_graphs.get(key)
        if entry is None:
            x_in = torch.zeros(b, bucket, x.size(-1), dtype=x.dtype, device=x.device)
        else:
            x_in = entry[1]
        x_in[:, :t].copy_(x)
        if t < bucket:
            x_in[:, t:].zero_()
        if not self.graphs_on:
            hidden = self._prefill_body(x_in, key[1])
        elif entry is None:
            hidden = self._capture_prefill(key, x_in)
        else:
            graph, _, hidden = entry
            graph.replay()
        if t < bucket:
            self.cache.buffer[:, :, :, :, t:bucket].zero_()  # what the pad positions wrote
        self.cache.length = t
        return self.base.lm_head(hidden[:, t - 1: t])[:, -1]

    def _prefill_body(self, x: torch.Tensor, with_logn: bool) -> torch.Tensor:
        tr = self.base.transformer
        b, width = x.shape[:2]
        positions = torch.arange(width, device=x.device).expand(b, width)
        rope = tr.rope_from_inv_freq(positions, self.prefill_inv_freq, with_logn)
        return tr.run_blocks(x, rope, "causal", _PrefillCache(self.cache, width))

    def _capture_prefill(self, key: tuple[int, bool], x_in: torch.Tensor) -> torch.Tensor:
        # As in _replay: warm-up outside the capture, writing what the replay writes.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._prefill_body(x_in, key[1])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self._prefill_body(x_in, key[1])
        self.pool = graph.pool()
        self.prefill_graphs[key] = (graph, x_in, hidden)
        graph.replay()
        return hidden

    def start(self, prompt_mask: torch.Tensor) -> None:
        """Take the prompt's key mask [B, S0] and NTK alpha from the prefill that filled the cache."""
        cfg = self.base.config
        s0 = prompt_mask.size(1)
        self.key_mask.zero_()
        self.key_mask[:, :s0].copy_(prompt_mask)
        alpha = self.cache.ntk_alpha if self.cache.ntk_alpha is not None else torch.ones(self.batch, dtype=torch.float64)
        self.inv_freq.copy_(rotary_inv_freq(alpha, self.base.transformer.rotary_dim, cfg.rotary_emb_base,
                                            self.inv_freq.device))

    def step(self, token: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [B] at the next cache slot (attended later only where ``keep``); return logits [B, V]."""
        slot = self.cache.length
        if slot >= self.max_len:
            raise ValueError(f"KV cache full: {slot + 1} positions needed, {self.max_len} allocated")
        self.ids.copy_(token[:, None])
        self.key_mask[:, slot].copy_(keep)
        self.slot.fill_(slot)
        kv_len = self.cache.read_length(slot + 1, 1)
        if self.graphs_on:
            logits = self._replay(kv_len)
        else:
            logits = self._body(kv_len)
        self.cache.length = slot + 1
        return logits

    @torch.inference_mode()
    def _body(self, kv_len: int) -> torch.Tensor:
        tr = self.base.transformer
        positions = (self.key_mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        rope = tr.rope_from_inv_freq(positions, self.inv_freq,
                                     with_logn=self.base.config.use_logn_attn and kv_len > self.base.config.seq_length)
        mask = self.key_mask[:, None, None, :kv_len].bool()
        x = tr.drop(tr.wte(self.ids))
        hidden = tr.run_blocks(x, rope, mask, _SlotCache(self.cache, self.slot, kv_len))
        return self.base.lm_head(hidden)[:, -1]

    def _replay(self, kv_len: int) -> torch.Tensor:
        if kv_len not in self.graphs:
            # Warm-up runs (Triton compilation, cuBLAS handles) happen outside the capture;
            # they write the same slot with the same inputs as the replay below.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body(kv_len)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._body(kv_len)
            self.pool = graph.pool()
            self.graphs[kv_len] = (graph, out)
        graph, out = self.graphs[kv_len]
        graph.replay()
        return out
