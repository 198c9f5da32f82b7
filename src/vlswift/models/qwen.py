"""Qwen-VL: the Qwen-7B decoder with image features spliced in between ``<img>``/``</img>``.

Computes what the official ``modeling_qwen.py`` computes, including its inference-time
tricks: dynamic NTK rotary scaling (the alpha comes from the prompt length at prefill and is
kept for the decode steps of that prompt) and logn attention scaling for positions beyond
``seq_length``; neither applies in training mode. Parameter names are the official ones.

Differences from the official code that do not change results: positions come from the
attention mask (so left-padded batches give the same tokens as batch 1), the NTK alpha is
per sequence and travels with the KV cache instead of living on the module, and attention
is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import fused
from .config import QWenConfig, official_config_dict
from .loading import DTYPE_NAMES
from .visual import VisionTransformer

IGNORE_INDEX = -100

# One-query attention (a decode step) on CUDA must run the same deterministic kernel in the
# plain and in the CUDA-graph step (with cuDNN's the tokens of the two drifted apart on the
# 9.6B model). "triton": fused.decode_attention (split over key chunks, fills the GPU at
# batch 1); "sdpa": SDPA restricted to DECODE_SDPA_BACKENDS.
DECODE_ATTENTION = "triton"
DECODE_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` on a single row may go through the Triton GEMV."""
    if type(module) is nn.Linear and x.numel() == x.size(-1) and fused.enabled(x) and fused.gemv_wanted():
        return fused.gemv(x, module.weight, module.bias)
    return module(x)


class RecomputedInBackward(torch.autograd.Function):
    """``fn(*inputs)`` keeping only its inputs for backward, where ``fn`` is recomputed.

    For cheap element-wise steps (RMSNorm, SwiGLU's gate) whose plain autograd graph would
    keep float32 or extra intermediates alive: same forward, same gradients, less memory.
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (None, *[next(grads) if t.requires_grad else None for t in inputs])


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def swiglu_gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * F.silu(b)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with ``residual`` the pair (x + residual, norm(x + residual))."""
        if fused.enabled(x):
            summed, out = fused.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (summed, out)
        if fused.train_enabled(x, self.weight, *([] if residual is None else [residual])):
            return fused.rms_norm_train(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return x, self.norm(x)
        return self.norm(x)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x, self.weight):
            return RecomputedInBackward.apply(self._norm, x, self.weight)
        return self._norm(x, self.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * weight


def ntk_alpha_for_length(length: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Official dynamic-NTK alpha: 2**ceil(log2(len / seq_length) + 1) - 1, at least 1."""
    context = torch.log2(length.double() / seq_length) + 1
    return (2 ** torch.ceil(context) - 1).clamp(min=1)


def rotary_inv_freq(alpha: torch.Tensor, dim: int, base: float, device: torch.device | str) -> torch.Tensor:
    """Rotary inverse frequencies [B, dim/2] (float32, on ``device``) for per-sequence NTK alpha [B]."""
    ntk_base = (base * alpha.double() ** (dim / (dim - 2))).float()
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    return 1.0 / ntk_base[:, None].to(device) ** exponent[None]


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, 1, dim] in float32 for positions [B, T] and inverse frequencies [B, dim/2]."""
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tf = t.float()
    x1, x2 = tf.chunk(2, dim=-1)
    return (tf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(t)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Official logn factor per position [B, T]: log_{seq_length}(pos + 1) beyond seq_length, else 1."""
    n = (positions + 1).double()
    return torch.where(n > seq_length, n.log() / math.log(seq_length), torch.ones_like(n)).float()


@dataclass
class RopeState:
    """What attention needs about positions for one forward call."""

    cos: torch.Tensor
    sin: torch.Tensor
    logn: torch.Tensor | None  # [B, T, 1, 1] or None in training / when disabled


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(config.hidden_size, projection, bias=not config.no_bias)
        self.dropout = config.attn_dropout_prob

    def forward(self, x, rope: RopeState, mask, cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = linear(self.c_attn, x)
        if fused.enabled(qkv) and rope.cos.size(-1) == self.head_dim:
            fused.rotary_qk_(qkv, self.num_heads, rope.cos, rope.sin, rope.logn)
            q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        elif fused.train_enabled(qkv) and rope.logn is None and rope.cos.size(-1) == self.head_dim \
                and qkv.is_contiguous():
            # q, k, v stay views of one buffer: attention keeps exactly them for backward.
            qkv = fused.rotary_qk_train_(qkv, self.num_heads, rope.cos, rope.sin)
            q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        else:
            q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
            q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
            if rope.logn is not None:
                q = q * rope.logn.to(q.dtype)
            if needs_grad(v):
                v = v.contiguous()  # else attention's saved v keeps all of qkv alive for backward
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if t == 1 and DECODE_ATTENTION == "triton" and fused.enabled(q):
            out = fused.decode_attention(q, k, v, mask if isinstance(mask, torch.Tensor) else None)
        else:
            with sdpa_kernel(DECODE_SDPA_BACKENDS) if t == 1 and q.is_cuda else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(
                    q, k, v,
                    attn_mask=mask if isinstance(mask, torch.Tensor) else None,
                    is_causal=mask == "causal",
                    dropout_p=self.dropout if self.training else 0.0,
                )
        return linear(self.c_proj, out.transpose(1, 2).reshape(b, t, -1))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = linear(self.w1, x), linear(self.w2, x)
        if fused.enabled(a):
            gated = fused.silu_mul(a, b)
        elif fused.train_enabled(a, b):
            gated = fused.silu_mul_train(a, b)
        elif needs_grad(a, b):
            gated = RecomputedInBackward.apply(swiglu_gate, a, b)
        else:
            gated = swiglu_gate(a, b)
        return linear(self.c_proj, gated)


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x, rope: RopeState, mask, cache=None) -> torch.Tensor:
        x, normed = self.ln_2(self.attn(self.ln_1(x), rope, mask, cache), residual=x)
        return x + self.mlp(normed)


class QWenModel(nn.Module):
    """Embedding + vision tower + decoder blocks + final norm (official prefix ``transformer``)."""

    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.rotary_dim = int(config.kv_channels * config.rotary_pct)
        self.gradient_checkpointing = False
        # How many decoder blocks recompute their activations in backward when checkpointing
        # is on (the first ones); None = all. Fewer = faster steps, more activation memory.
        self.checkpoint_layers: int | None = None
        self.training_graphs = None  # a train_graphs.TrainingGraphs, see enable_training_graphs

    def splice_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, images) -> torch.Tensor:
        """Replace the 256 positions inside each ``<img>…</img>`` span by that image's features."""
        start_id = self.config.visual["image_start_id"]
        starts = (input_ids == start_id).nonzero()
        ends = (input_ids == start_id + 1).nonzero()
        n_images = 0 if images is None else images.size(0)
        if starts.size(0) != ends.size(0):
            raise ValueError(
                f"unbalanced image spans: {starts.size(0)} <img> tokens but {ends.size(0)} </img> tokens"
            )
        if starts.size(0) != n_images:
            raise ValueError(
                f"the input has {starts.size(0)} image span(s) (<img>…</img>) but {n_images} image(s) "
                "were given; pass one image per span, in order of appearance"
            )
        if n_images == 0:
            return embeds
        if not torch.equal(starts[:, 0], ends[:, 0]) or bool(((ends[:, 1] - starts[:, 1]) != 257).any()):
            raise ValueError("each <img> must be followed by exactly 256 positions and </img> on the same row")
        features = self.visual(images).to(embeds.dtype)  # [N, 256, D]
        rows = starts[:, 0:1].expand(-1, 256).reshape(-1)
        cols = (starts[:, 1:2] + 1 + torch.arange(256, device=starts.device)).reshape(-1)
        return embeds.index_put((rows, cols), features.reshape(-1, features.size(-1)))

    def forward(self, input_ids, images=None, attention_mask=None, position_ids=None, cache=None):
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        # Before the vision tower: the NTK alpha reads prompt lengths on the host, and that
        # sync is free while the GPU is idle, not after the image encoder was queued.
        rope = self.rope_state(position_ids, attention_mask, cache, past, t)
        # A static cache may hand attention more (masked) positions than are filled; see
        # StaticKVCache.read_length.
        read_length = getattr(cache, "read_length", None)
        key_length = read_length(past + t, t) if read_length is not None else past + t
        mask = self.attention_mask(attention_mask, past, t, input_ids.device, key_length)

        if past == 0:
            x = self.splice_images(input_ids, self.wte(input_ids), images)
        else:
            x = self.wte(input_ids)
        x = self.drop(x)
        return self.run_blocks(x, rope, mask, cache)

    def run_blocks(self, x: torch.Tensor, rope: RopeState, mask, cache=None) -> torch.Tensor:
        """Decoder blocks + final norm on embeddings ``x`` (the fast decode path calls this too).

        In training with ``training_graphs`` set (see :mod:`.train_graphs`), replayed from
        CUDA graphs where they apply.
        """
        if self.training_graphs is not None:
            out = self.training_graphs.run(x, rope, mask, cache)
            if out is not None:
                return out
        return self.run_blocks_eager(x, rope, mask, cache)

    def run_blocks_eager(self, x: torch.Tensor, rope: RopeState, mask, cache=None,
                         preserve_rng_state: bool = True) -> torch.Tensor:
        checkpointed = len(self.h) if self.checkpoint_layers is None else self.checkpoint_layers
        for i, block in enumerate(self.h):
            if self.gradient_checkpointing and self.training and i < checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, use_reentrant=False,
                                                      preserve_rng_state=preserve_rng_state)
            else:
                x = block(x, rope, mask, cache)
        return self.ln_f(x)

    def rope_state(self, position_ids, attention_mask, cache, past: int, t: int) -> RopeState:
        alpha = self.ntk_alpha(attention_mask, cache, past, position_ids.size(0), t)
        inv_freq = rotary_inv_freq(alpha, self.rotary_dim, self.config.rotary_emb_base, position_ids.device)
        return self.rope_from_inv_freq(position_ids, inv_freq, self.uses_logn(past + t))

    def ntk_alpha(self, attention_mask, cache, past: int, b: int, t: int) -> torch.Tensor:
        """Per-row dynamic-NTK alpha [B] (float64, CPU); a prefill (``past == 0``) stores it on ``cache``."""
        cfg = self.config
        if self.training or not cfg.use_dynamic_ntk:
            alpha = torch.ones(b, dtype=torch.float64)
        elif past == 0:
            # The official code takes the alpha from the prompt length at prefill; with left
            # padding that is each row's own length.
            lengths = attention_mask.sum(-1).cpu() if attention_mask is not None else torch.full((b,), t)
            alpha = ntk_alpha_for_length(lengths, cfg.seq_length)
            if cache is not None:
                cache.ntk_alpha = alpha
        else:
            alpha = getattr(cache, "ntk_alpha", None)
            if alpha is None:
                alpha = torch.ones(b, dtype=torch.float64)
        return alpha

    def uses_logn(self, length: int) -> bool:
        """Whether attention over ``length`` positions scales queries by logn (eval only)."""
        # logn is 1 for every position < seq_length; multiplying by 1 is exact, so skip it then.
        return self.config.use_logn_attn and not self.training and length > self.config.seq_length

    def rope_from_inv_freq(self, position_ids: torch.Tensor, inv_freq: torch.Tensor, with_logn: bool) -> RopeState:
        """Rotary cos/sin (and logn factors) for positions [B, T]; no host sync (graph-safe)."""
        cos, sin = rotary_cos_sin(position_ids, inv_freq)
        logn = logn_scale(position_ids, self.config.seq_length)[:, :, None, None] if with_logn else None
        return RopeState(cos, sin, logn)

    @staticmethod
    def attention_mask(attention_mask, past: int, t: int, device, key_length: int | None = None):
        """'causal' for the plain case (lets SDPA pick flash kernels), else a boolean [B,1,T,S] mask.

        S is ``key_length`` (default past + t); keys past ``past + t`` are masked out.
        """
        if attention_mask is None and past == 0:
            return "causal"
        s = past + t
        q_idx = torch.arange(past, s, device=device)[:, None]
        allowed = torch.arange(s, device=device)[None, :] <= q_idx  # [T, S]
        mask = allowed[None, None]
        if attention_mask is not None:
            keys = attention_mask[:, -s:].bool().to(device)
            mask = mask & keys[:, None, None, :]
        if key_length is not None and key_length > s:
            mask = F.pad(mask, (0, key_length - s), value=False)
        return mask


class QWenLMHeadModel(PreTrainedModel, GenerationMixin):
    """Qwen-VL-Chat with the official parameter names (``transformer.*``, ``lm_head``)."""

    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualBlock"]
    _supports_sdpa = True
    main_input_name = "input_ids"

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Random init for fresh models (tiny test checkpoints, benchmarks); checkpoints overwrite it.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """transformers' save, with ``config.json`` in the official form: transformers would write
        ``dtype`` instead of ``torch_dtype`` and keep the loaded ``bf16``/``fp32`` flags whatever
        the saved weights' dtype, so the official remote code would misread the folder."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            config = official_config_dict(self.config, DTYPE_NAMES[self.dtype])
            (Path(save_directory) / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **_) -> None:
        """Recompute decoder and ViT blocks in backward (non-reentrant: works with frozen embeddings).

        ``gradient_checkpointing_kwargs={"layers": N}`` recomputes only the first N decoder
        blocks (the rest keep their activations): faster where memory allows.
        """
        self.transformer.checkpoint_layers = (gradient_checkpointing_kwargs or {}).get("layers")
        self.transformer.gradient_checkpointing = True
        self.transformer.visual.transformer.gradient_checkpointing = True

    def enable_training_graphs(self, max_graphs: int = 16) -> None:
        """Replay the decoder blocks' forward and backward from CUDA graphs in training (one
        capture per input shape, up to ``max_graphs``); see :mod:`.train_graphs`."""
        from .train_graphs import TrainingGraphs

        self.transformer.training_graphs = TrainingGraphs(self.transformer, max_graphs)

    def disable_training_graphs(self) -> None:
        self.transformer.training_graphs = None

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False
        self.transformer.visual.transformer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing

    def forward(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **_,
    ) -> CausalLMOutputWithPast:
        """``input_ids`` [B, T]; ``images`` [N, 3, 448, 448] in order of appearance of their spans.

        With ``labels`` the loss is the mean next-token cross-entropy over labels != -100 (computed
        only at those positions; ``logits`` then holds the last ``logits_to_keep`` positions or all).
        """
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache and not self.training:
            from transformers import DynamicCache

            cache = DynamicCache()
        hidden = self.transformer(input_ids, images, attention_mask, position_ids, cache)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(hidden, labels.to(hidden.device), self.lm_head)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration:
            inputs.pop("images", None)
        return inputs


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean shifted cross-entropy, projecting only the positions that have a label.

    Equal to projecting every position then ignoring -100, without materialising the
    [B, T, vocab] logits of prompt tokens.
    """
    shift_labels = labels[:, 1:]
    selected = shift_labels != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, shift_labels[selected], reduction="mean") if logits.numel() else logits.sum()
