"""Fused CUDA kernels (Triton) for the decoder's small element-wise steps at inference.

A decode step at batch 1 streams 14 GB of weights in ~5 ms; left as separate PyTorch ops,
RMSNorm, rotary, logn and SwiGLU launch ~40 tiny kernels per layer, which costs as much
again. The GEMV serves the single-row linear layers of batch-1 decoding. Each function here does one of those steps in one kernel with the rounding points of
the PyTorch code it replaces (float32 math, one rounding to the model dtype wherever the
official code rounds), so results agree with the plain ops to float32 rounding.

They are used only where ``enabled(x)``: a CUDA tensor, no autograd, Triton importable, and
``VLSWIFT_NO_TRITON`` unset. The eager and the CUDA-graph decode paths both go through them,
so the two give identical bits.

Training (``train_enabled(x)``: CUDA, bf16/fp16, autograd on) uses the autograd functions at
the end of this file: the same forward kernels plus one backward kernel each for RMSNorm
(with the residual add) and SwiGLU, and rotary's backward as the inverse rotation. Each
replaces ~10 plain ops (and their backward) on [tokens, 4096..11008] tensors per use, most
of them in float32; they keep the same tensors for backward as the plain code's
``RecomputedInBackward`` (bf16 inputs, plus one float32 per row for RMSNorm).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_available() -> bool:
    if os.environ.get("VLSWIFT_NO_TRITON", "0") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused kernels apply to ``x`` (inference on CUDA with Triton)."""
    return x.is_cuda and not torch.is_grad_enabled() and _triton_available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                        HAS_RES: tl.constexpr, STORE_RSTD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
        if HAS_RES:
            # The residual add rounds to the model dtype, as `x + delta` does.
            r = tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        rstd = tl.math.rsqrt(var + eps)
        if STORE_RSTD:
            tl.store(rstd_ptr + row, rstd)
        normed = (xf * rstd).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(y_ptr + row * n_cols + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, logn_ptr, row_stride, heads,
                      HAS_LOGN: tl.constexpr, HALF: tl.constexpr):
        # One program per (token, head): rotates that head's q and k in place.
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        i = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + tok * 2 * HALF + i)
        c2 = tl.load(cos_ptr + tok * 2 * HALF + HALF + i)
        s1 = tl.load(sin_ptr + tok * 2 * HALF + i)
        s2 = tl.load(sin_ptr + tok * 2 * HALF + HALF + i)
        for part in tl.static_range(2):  # 0: q, 1: k
            base = qkv_ptr + tok * row_stride + (part * heads + head) * 2 * HALF
            x1 = tl.load(base + i)
            x2 = tl.load(base + HALF + i)
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            o1 = (f1 * c1 + (-f2) * s1).to(x1.dtype)
            o2 = (f2 * c2 + f1 * s2).to(x1.dtype)
            if HAS_LOGN and part == 0:
                scale = tl.load(logn_ptr + tok).to(x1.dtype).to(tl.float32)
                o1 = (o1.to(tl.float32) * scale).to(x1.dtype)
                o2 = (o2.to(tl.float32) * scale).to(x1.dtype)
            tl.store(base + i, o1)
            tl.store(base + HALF + i, o2)

    @triton.jit
    def silu_mul_kernel(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        a = tl.load(a_ptr + off, mask=m, other=0.0)
        b = tl.load(b_ptr + off, mask=m, other=0.0)
        bf = b.to(tl.float32)
        s = (bf / (1.0 + tl.exp(-bf))).to(b.dtype)
        tl.store(y_ptr + off, (a.to(tl.float32) * s.to(tl.float32)).to(a.dtype), mask=m)

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                        mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, m_ptr, part_ptr, stat_ptr, S, scale,
                                      sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
                                      H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
        # Program (row*head, chunk): softmax statistics and weighted values of CHUNK keys.
        # A decode step has one query per head, so the keys are split across programs
        # (flash-decoding) to fill the GPU; decode_attention_combine_kernel merges the chunks.
        bh = tl.program_id(0)
        c = tl.program_id(1)
        n_chunks = tl.num_programs(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D)
        n = c * CHUNK + tl.arange(0, CHUNK)
        valid = n < S
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32)
        keep = tl.load(m_ptr + b * sm_b + n * sm_s, mask=valid, other=0) != 0
        k = tl.load(k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        scores = tl.where(keep, scores, float("-inf"))
        m = tl.max(scores, axis=0)
        p = tl.exp(scores - tl.where(m == float("-inf"), 0.0, m))
        v = tl.load(v_ptr + b * sv_b + h * sv_h + n[:, None] * sv_s + d[None, :], mask=valid[:, None], other=0.0)
        acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        slot = bh * n_chunks + c
        tl.store(part_ptr + slot * D + d, acc)
        tl.store(stat_ptr + slot * 2, m)
        tl.store(stat_ptr + slot * 2 + 1, tl.sum(p, axis=0))

    @triton.jit
    def decode_attention_combine_kernel(part_ptr, stat_ptr, o_ptr, n_chunks, so_b, so_h,
                                        H: tl.constexpr, D: tl.constexpr):
        # Merge the chunks of one (row, head) in chunk order: chunks with every key masked
        # (max -inf) weigh exactly 0.
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D)
        m_all = tl.full((), float("-inf"), tl.float32)
        for c in range(0, n_chunks):
            m_all = tl.maximum(m_all, tl.load(stat_ptr + (bh * n_chunks + c) * 2))
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        acc = tl.zeros((D,), tl.float32)
        total = tl.zeros((), tl.float32)
        for c in range(0, n_chunks):
            slot = bh * n_chunks + c
            w = tl.exp(tl.load(stat_ptr + slot * 2) - m_safe)
            acc += w * tl.load(part_ptr + slot * D + d)
            total += w * tl.load(stat_ptr + slot * 2 + 1)
        tl.store(o_ptr + b * so_b + h * so_h + d, (acc / total).to(o_ptr.dtype.element_ty))

    @triton.jit
    def rms_norm_backward_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dsum_ptr, dx_ptr, n_cols,
                                 HAS_DSUM: tl.constexpr, BLOCK: tl.constexpr):
        # y = round(x * rstd) * w: the rounding passes gradients through unchanged, so
        # dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = x * rstd; plus the
        # gradient reaching the residual sum directly.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def silu_mul_backward_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
        # y = a * round(silu(b)): da = g * round(silu(b)), db = g * a * silu'(b).
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = off < n
        a = tl.load(a_ptr + off, mask=m, other=0.0)
        b = tl.load(b_ptr + off, mask=m, other=0.0)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        bf = b.to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-bf))
        s = (bf * sig).to(b.dtype).to(tl.float32)
        tl.store(da_ptr + off, (g * s).to(da_ptr.dtype.element_ty), mask=m)
        dsilu = sig * (1.0 + bf * (1.0 - sig))
        tl.store(db_ptr + off, (g * a.to(tl.float32) * dsilu).to(db_ptr.dtype.element_ty), mask=m)

    return (rms_norm_kernel, rotary_kernel, silu_mul_kernel, gemv_kernel,
            decode_attention_split_kernel, decode_attention_combine_kernel,
            rms_norm_backward_kernel, silu_mul_backward_kernel)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None,
             rstd: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(x + residual, norm(x + residual))`` (or ``(None, norm(x))``) in one kernel.

    norm(h) = (h.float() * rsqrt(mean(h.float()**2) + eps)).type_as(h) * weight. With ``rstd``
    (float32, one per row) the kernel also stores each row's rsqrt factor there.
    """
    kernel = _kernels()[0]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = None
    if residual is not None:
        summed = torch.empty_like(x2)
        res = residual.reshape(-1, shape[-1]).contiguous()
    block = _next_pow2(shape[-1])
    kernel[(x2.size(0),)](x2, res if residual is not None else x2, summed if summed is not None else x2,
                          weight, out, rstd if rstd is not None else out, shape[-1], eps,
                          HAS_RES=residual is not None, STORE_RSTD=rstd is not None, BLOCK=block,
                          num_warps=8 if block >= 4096 else 4)
    return (summed.view(shape) if summed is not None else None), out.view(shape)


def rotary_qk_(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
               logn: torch.Tensor | None) -> None:
    """Rotate q and k of a fused [B, T, 3*H*D] projection in place (q then scaled by logn).

    cos/sin: [B, T, 1, D] float32; logn: [B, T, 1, 1] float32 or None.
    """
    kernel = _kernels()[1]
    b, t, width = qkv.shape
    head_dim = width // (3 * heads)
    assert qkv.is_contiguous() and cos.size(-1) == head_dim
    cos = cos.expand(b, t, 1, head_dim).contiguous()
    sin = sin.expand(b, t, 1, head_dim).contiguous()
    logn_flat = logn.expand(b, t, 1, 1).contiguous() if logn is not None else cos
    kernel[(b * t, heads)](qkv, cos, sin, logn_flat, width, heads,
                           HAS_LOGN=logn is not None, HALF=head_dim // 2, num_warps=1)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * F.silu(b)`` with the silu rounded to the dtype first, as the plain ops do."""
    kernel = _kernels()[2]
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    block = 2048
    kernel[(triton_cdiv(n, block),)](a, b, out, n, BLOCK=block, num_warps=4)
    return out


def gemv_wanted() -> bool:
    """Single-row linear layers (batch-1 decode) through the Triton GEMV rather than cuBLAS;
    ``VLSWIFT_TRITON_GEMV=0`` keeps cuBLAS (measured ~2.5% slower decode on an H100)."""
    return os.environ.get("VLSWIFT_TRITON_GEMV", "1") not in ("", "0")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of a single row x [..., K] (one row in all) with weight [N, K]."""
    kernel = _kernels()[3]
    n, k = weight.shape
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block_n = 16
    kernel[(triton_cdiv(n, block_n),)](x.contiguous(), weight, bias if bias is not None else weight, out, n, k,
                                       HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=256,
                                       num_warps=4, num_stages=4)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     chunk: int = 64) -> torch.Tensor:
    """Attention of one query per row and head (a decode step), split over key chunks.

    q [B, H, 1, D]; k/v [B, H, S, D] with a contiguous last dim (cache views); ``mask``
    broadcastable to [B, 1, 1, S] (True = attend) or None. Deterministic; keys past the last
    unmasked one only add exact zeros.
    """
    split, combine = _kernels()[4:6]
    b, h, _, d = q.shape
    s = k.size(2)
    if mask is None:
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=q.device)
    m = mask.expand(b, 1, 1, s)
    n_chunks = triton_cdiv(s, chunk)
    part = torch.empty(b * h * n_chunks, d, dtype=torch.float32, device=q.device)
    stats = torch.empty(b * h * n_chunks, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    split[(b * h, n_chunks)](q, k, v, m, part, stats, s, d**-0.5,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), m.stride(0), m.stride(3),
                             H=h, D=d, CHUNK=chunk, num_warps=4)
    combine[(b * h,)](part, stats, out, n_chunks, out.stride(0), out.stride(1), H=h, D=d, num_warps=1)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- training: autograd functions over the kernels above -------------------------------


def train_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the fused training functions apply: autograd on, CUDA, half precision, one dtype."""
    x = tensors[0]
    return (x.is_cuda and torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float16)
            and all(t.dtype == x.dtype for t in tensors) and _triton_available())


def _rms_norm_backward(ctx, d_summed, d_out):
    x, weight, rstd = ctx.saved_tensors
    n = x.size(-1)
    x2 = x.reshape(-1, n).contiguous()
    dy = d_out.reshape(-1, n).contiguous() if d_out is not None else torch.zeros_like(x2)
    has_dsum = d_summed is not None
    dsum = d_summed.reshape(-1, n).contiguous() if has_dsum else dy
    dx = torch.empty_like(x2)
    block = _next_pow2(n)
    _kernels()[6][(x2.size(0),)](x2, weight, rstd, dy, dsum, dx, n, HAS_DSUM=has_dsum, BLOCK=block,
                                 num_warps=8 if block >= 4096 else 4)
    dw = None
    if ctx.needs_input_grad[1]:  # full fine-tuning: the norm weight's gradient, in plain ops
        normed = (x2.float() * rstd[:, None]).to(x.dtype)
        dw = (dy.float() * normed.float()).sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


class RMSNormFunction(torch.autograd.Function):
    """``norm(x)``, keeping ``x`` and one float32 per row for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.empty(x.numel() // x.size(-1), dtype=torch.float32, device=x.device)
        _, out = rms_norm(x, weight, eps, None, rstd=rstd)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, d_out):
        dx, dw = _rms_norm_backward(ctx, None, d_out)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    """``(x + residual, norm(x + residual))``, keeping the sum and one float32 per row."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        rstd = torch.empty(x.numel() // x.size(-1), dtype=torch.float32, device=x.device)
        summed, out = rms_norm(x, weight, eps, residual, rstd=rstd)
        ctx.save_for_backward(summed, weight, rstd)
        return summed, out

    @staticmethod
    def backward(ctx, d_summed, d_out):
        dx, dw = _rms_norm_backward(ctx, d_summed, d_out)
        return dx, dw, None, dx


def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    """Differentiable :func:`rms_norm`: ``norm(x)``, or ``(x + residual, norm(x + residual))``."""
    if residual is None:
        return RMSNormFunction.apply(x, weight, eps)
    return AddRMSNormFunction.apply(x, weight, eps, residual)


class SiluMulFunction(torch.autograd.Function):
    """``a * silu(b)`` (SwiGLU's gate), keeping only ``a`` and ``b`` for backward."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        return silu_mul(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = g.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        block = 2048
        _kernels()[7][(triton_cdiv(n, block),)](a, b, g, da, db, n, BLOCK=block, num_warps=4)
        return da, db


def silu_mul_train(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return SiluMulFunction.apply(a, b)


class RotaryFunction(torch.autograd.Function):
    """Rotate q and k of a fused [B, T, 3*H*D] projection in place (no logn: training).

    Backward is the inverse rotation (by -angle) of the incoming gradient, exact because
    rotary's cos/sin tables repeat the same angles in both halves of a head.
    """

    @staticmethod
    def forward(ctx, qkv, heads, cos, sin):
        rotary_qk_(qkv, heads, cos, sin, None)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.heads = heads
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad.clone(memory_format=torch.contiguous_format)  # rotated in place below
        rotary_qk_(grad, ctx.heads, cos, -sin, None)
        return grad, None, None, None


def rotary_qk_train_(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Differentiable in-place :func:`rotary_qk_` (without logn); returns ``qkv``."""
    return RotaryFunction.apply(qkv, heads, cos, sin)
