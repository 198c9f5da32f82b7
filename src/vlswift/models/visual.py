"""Qwen-VL's vision tower: ViT-bigG patch encoder + 256-query cross-attention resampler.

Parameter names follow the official ``visual.py`` (``conv1``, ``transformer.resblocks.N``,
``attn_pool``, ``ln_post``, ``proj``) so checkpoints load without renaming. Attention runs
through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic-resize a square grid of position embeddings [L, C] to ``num_tokens`` positions."""
    src, tgt = int(math.sqrt(pos.size(0))), int(math.sqrt(num_tokens))
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class ResizedPosEmbed:
    """``resize_pos_embed`` of a parameter, kept while the parameter is unchanged.

    The bicubic resize of a 256-entry table to 1024 positions takes ~14 ms on an H100 (as
    much as the rest of the image encoder's non-matmul work), and its result depends only on
    the table; it is recomputed only when gradients must flow through it.
    """

    def __init__(self):
        self.key = None
        self.value: torch.Tensor | None = None

    def __call__(self, pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if torch.is_grad_enabled() and pos.requires_grad:
            return resize_pos_embed(pos, num_tokens)
        key = (pos.data_ptr(), pos._version, pos.dtype, pos.device, num_tokens)
        if key != self.key:
            with torch.no_grad():
                self.value = resize_pos_embed(pos, num_tokens)
            self.key = key
        return self.value


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2D sin-cos position table [grid*grid, dim] (first half encodes rows, second columns)."""

    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], dim=1).float()


class VisualAttention(nn.Module):
    """Self-attention with a fused ``in_proj`` laid out per head as [q | k | v]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3, d // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisualBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisualAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(dim, heads, mlp_ratio) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """Cross-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), written out so LoRA can wrap ``out_proj``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, d, h = k.size(0), k.size(-1), self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.size(0), t.size(1), h, d // h).transpose(1, 2)

        q = heads(F.linear(q, wq, bq))
        k, v = heads(F.linear(k, wk, bk)), heads(F.linear(v, wv, bv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, d))


class Resampler(nn.Module):
    """256 learned queries attend to the patch features (2D sin-cos positions on both sides)."""

    def __init__(self, grid_size: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid_size**2, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = ResamplerAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.resized_pos_embed = ResizedPosEmbed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv_pos = self.resized_pos_embed(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.size(0), -1, -1)
        return self.attn(q, x + kv_pos, x)


MAX_GRAPHED_IMAGES = 8  # larger image batches keep the GPU busy without a graph


class VisionTransformer(nn.Module):
    """Images [N, 3, 448, 448] -> features [N, 256, output_dim] for the LLM."""

    def __init__(
        self,
        image_size: int = 448,
        patch_size: int = 14,
        width: int = 1664,
        layers: int = 48,
        heads: int = 16,
        mlp_ratio: float = 4.9231,
        output_dim: int = 4096,
        n_queries: int = 256,
        **_: object,
    ):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, layers, heads, mlp_ratio)
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, output_dim // 128 or 1, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim**-0.5 * torch.randn(output_dim, output_dim))
        self.resized_pos_embed = ResizedPosEmbed()
        self.graphed: tuple | None = None  # (key, CUDA graph, its input, its output); see encode_graphed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.parameters()):
            # A frozen tower in training (LoRA on the LLM, --freeze_vit): nothing to record
            # for backward, so it runs as at inference (the CUDA graph included).
            with torch.no_grad():
                return self.forward(images)
        # Graphs only for plain modules: under FSDP the blocks all-gather their weights in hooks.
        if x.is_cuda and not torch.is_grad_enabled() and x.size(0) <= MAX_GRAPHED_IMAGES \
                and type(self.transformer.resblocks[0]) is VisualBlock \
                and os.environ.get("VLSWIFT_NO_CUDA_GRAPHS", "0") in ("", "0"):
            return self.encode_graphed(x)
        return self.encode(x)

    def encode_graphed(self, x: torch.Tensor) -> torch.Tensor:
        """``encode(x)`` replayed from a CUDA graph captured for this image count.

        At batch 1 the encoder's ~700 kernel launches take longer on the host than the
        kernels on the GPU; a replay runs the same kernels (same bits) without that gap.
        The graph is kept for the last image count and the current parameter tensors.
        """
        key = (tuple(x.shape), x.dtype, x.device, tuple(p.data_ptr() for p in self.parameters()))
        if self.graphed is None or self.graphed[0] != key:
            self.graphed = None
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture (handles, cached tables)
                self.encode(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.encode(static_in)
            self.graphed = (key, graph, static_in, static_out)
        _, graph, static_in, static_out = self.graphed
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = x + self.resized_pos_embed(self.positional_embedding, x.size(1))
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
