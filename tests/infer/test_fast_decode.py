"""The fixed-shape decode step (fast_decode.py) against the plain one-call-per-token loop.

On the CPU the step runs eagerly; on CUDA it is also replayed from CUDA graphs and the fused
Triton kernels (models/fused.py) are checked against the plain ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlswift.infer import fast_decode
from vlswift.infer.engine import SamplingConfig, generate_stream

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graphs, Triton kernels)")


def tiny_model(tmp_path, device: str, dtype: torch.dtype, seq_length: int = 2048):
    from vlswift.models.loading import load_pretrained
    from vlswift.models.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / f"tiny-{seq_length}", seq_length=seq_length)
    model = load_pretrained(folder, dtype, device)
    with torch.no_grad():  # sharper logits, so greedy picks never hinge on a near-tie
        model.lm_head.weight.mul_(30)
    return model


def prompts_with_images(model, gen: torch.Generator, lengths=(120, 97)):
    """Prompts (ragged, so left padding is exercised) each with one image span."""
    start = model.config.visual["image_start_id"]
    rows = []
    for n in lengths:
        text = torch.randint(0, 256, (n - 258,), generator=gen).tolist()
        rows.append(text[:5] + [start] + [start + 2] * 256 + [start + 1] + text[5:])
    images = torch.randn(len(lengths), 3, 448, 448, generator=gen)
    return rows, images


def run(model, prompts, images, new_tokens: int, fast: bool, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(fast_decode, "wanted", lambda m: fast)
    cfg = SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    *_, rows = generate_stream(model, prompts, images, cfg, pad_id=model.generation_config.pad_token_id)
    return rows


@pytest.mark.parametrize("seq_length", [2048, 128])  # 128: NTK alpha > 1 and logn scaling
def test_static_step_matches_plain_loop_on_cpu(tmp_path, monkeypatch, seq_length):
    model = tiny_model(tmp_path, "cpu", torch.float32, seq_length)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(0), lengths=(290, 263))
    # 290 + 40 positions cross a KV_BUCKET boundary (384).
    plain = run(model, prompts, images, 40, False, monkeypatch)
    static = run(model, prompts, images, 40, True, monkeypatch)
    assert static == plain


def test_static_step_logits_match_plain_step_on_cpu(tmp_path):
    from vlswift.infer.engine import StaticKVCache, left_pad

    model = tiny_model(tmp_path, "cpu", torch.float32, seq_length=128)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(1), lengths=(270, 262))
    ids, mask = left_pad(prompts, model.generation_config.pad_token_id)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain_cache = StaticKVCache(cfg.num_hidden_layers, 2, cfg.num_attention_heads, 300, head_dim, torch.float32, "cpu")
    dec = fast_decode.decoder_for(model, 2, 300)
    with torch.inference_mode():
        ref = model(input_ids=ids, images=images, attention_mask=mask, cache=plain_cache, logits_to_keep=1).logits[:, -1]
        out = model(input_ids=ids, images=images, attention_mask=mask, cache=dec.cache, logits_to_keep=1).logits[:, -1]
        dec.start(mask)
        keep = torch.tensor([True, False])  # row 1 "stopped": its later tokens are masked out
        for _ in range(6):
            token = ref.argmax(-1)
            mask = torch.cat([mask, keep.long()[:, None]], dim=1)
            ref = model(input_ids=token[:, None], attention_mask=mask, cache=plain_cache, logits_to_keep=1).logits[:, -1]
            out = dec.step(token, keep)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decoder_is_reused_across_calls_of_the_same_shape(tmp_path, monkeypatch):
    model = tiny_model(tmp_path, "cpu", torch.float32)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(2), lengths=(270,))
    first = run(model, prompts, images, 8, True, monkeypatch)
    dec = model._vlswift_decoder
    assert run(model, prompts, images, 8, True, monkeypatch) == first
    assert model._vlswift_decoder is dec


@pytest.mark.parametrize("seq_length", [2048, 128])  # 128: NTK alpha > 1 and logn scaling
@pytest.mark.parametrize("lengths", [(270,), (300, 300)])  # padded to 288 and 320
def test_padded_prefill_matches_the_model_prefill_on_cpu(tmp_path, monkeypatch, seq_length, lengths):
    from vlswift.infer.engine import StaticKVCache

    monkeypatch.setattr(fast_decode.StaticDecoder, "pad_prefill_eagerly", True)
    model = tiny_model(tmp_path, "cpu", torch.float32, seq_length)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(4), lengths=lengths)
    ids = torch.tensor(prompts)
    b, t = ids.shape
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain = StaticKVCache(cfg.num_hidden_layers, b, cfg.num_attention_heads, 384, head_dim, torch.float32, "cpu")
    dec = fast_decode.decoder_for(model, b, 384)
    assert dec.prefill_fits(ids, None) and fast_decode.prefill_bucket(t) > t
    with torch.inference_mode():
        ref = model(input_ids=ids, images=images, cache=plain, logits_to_keep=1).logits[:, -1]
        out = dec.prefill(ids, images)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert dec.cache.length == plain.length == t
    assert torch.equal(dec.cache.ntk_alpha, plain.ntk_alpha)
    torch.testing.assert_close(dec.cache.buffer[..., :t, :], plain.buffer[..., :t, :], rtol=1e-5, atol=1e-5)
    assert not dec.cache.buffer[..., t:, :].any()  # the pad positions' keys/values are zeroed

    # Through generate_stream: the same tokens as the plain loop (whose prefill is unpadded).
    assert run(model, prompts, images, 40, True, monkeypatch) == run(model, prompts, images, 40, False, monkeypatch)


def test_padded_prefill_is_only_taken_where_it_fits(tmp_path, monkeypatch):
    model = tiny_model(tmp_path, "cpu", torch.float32)
    dec = fast_decode.decoder_for(model, 1, 2048)
    ids = torch.zeros(1, 270, dtype=torch.long)
    assert not dec.prefill_fits(ids, None)  # on the CPU (no graphs) the model's own prefill runs
    monkeypatch.setattr(fast_decode.StaticDecoder, "pad_prefill_eagerly", True)
    assert dec.prefill_fits(ids, None)
    assert not dec.prefill_fits(ids, torch.ones(1, 270, dtype=torch.long))  # a padding mask
    assert not dec.prefill_fits(torch.zeros(2, 270, dtype=torch.long), None)  # another batch size
    assert not dec.prefill_fits(torch.zeros(1, fast_decode.PREFILL_GRAPH_MAX_TOKENS + 1, dtype=torch.long), None)
    assert not dec.prefill_fits(torch.zeros(1, 1, dtype=torch.long), None)
    model.train()
    assert not dec.prefill_fits(ids, None)
    model.eval()
    monkeypatch.setenv("VLSWIFT_NO_PREFILL_GRAPH", "1")
    assert not dec.prefill_fits(ids, None)


def test_env_flag_turns_the_fast_path_off(monkeypatch):
    monkeypatch.setenv("VLSWIFT_NO_FAST_DECODE", "1")
    assert not fast_decode.wanted(torch.nn.Linear(2, 2))


@needs_cuda
def test_cuda_graph_decode_gives_the_eager_tokens_and_bits(tmp_path, monkeypatch):
    model = tiny_model(tmp_path, "cuda", torch.bfloat16, seq_length=300)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(3), lengths=(290, 263))
    plain = run(model, prompts, images, 60, False, monkeypatch)
    graphs = run(model, prompts, images, 60, True, monkeypatch)
    assert graphs == plain

    from vlswift.infer.engine import left_pad

    ids, mask = left_pad(prompts, model.generation_config.pad_token_id)
    ids, mask = ids.cuda(), mask.cuda()
    steps = []
    for use_graphs in (False, True):
        dec = fast_decode.decoder_for(model, 2, 400, graphs=use_graphs)
        with torch.inference_mode():
            logits = model(input_ids=ids, images=images, attention_mask=mask, cache=dec.cache, logits_to_keep=1).logits[:, -1]
            dec.start(mask)
            out = []
            for _ in range(5):
                logits = dec.step(logits.argmax(-1), torch.ones(2, dtype=torch.bool, device="cuda")).clone()
                out.append(logits)
        steps.append(out)
    for eager, graph in zip(*steps):
        assert torch.equal(eager, graph)


@needs_cuda
def test_cuda_graph_prefill_gives_the_plain_tokens(tmp_path, monkeypatch):
    model = tiny_model(tmp_path, "cuda", torch.bfloat16, seq_length=300)
    gen = torch.Generator().manual_seed(5)
    captured = []
    for lengths in [(270,), (280,), (310,), (300, 300)]:  # 270 and 280 share the 288 bucket
        prompts, images = prompts_with_images(model, gen, lengths=lengths)
        plain = run(model, prompts, images, 40, False, monkeypatch)
        graphs = run(model, prompts, images, 40, True, monkeypatch)
        assert graphs == plain
        captured.append(sorted(model._vlswift_decoder.prefill_graphs))
    assert captured[0] == captured[1] == [(288, False)]  # one graph for both lengths
    assert (320, True) in captured[2]  # 310 > seq_length: logn scaling


@needs_cuda
def test_cuda_graph_prefill_replays_the_padded_eager_prefill_bit_for_bit(tmp_path):
    from vlswift.infer.engine import StaticKVCache

    model = tiny_model(tmp_path, "cuda", torch.bfloat16, seq_length=300)
    prompts, images = prompts_with_images(model, torch.Generator().manual_seed(6), lengths=(305,))
    ids = torch.tensor(prompts, device="cuda")
    results = []
    for use_graphs in (False, True, True):  # the second graph call replays the captured graph
        dec = fast_decode.decoder_for(model, 1, 384, graphs=use_graphs)
        with torch.inference_mode():
            results.append((dec.prefill(ids, images).clone(), dec.cache.buffer.clone()))
    for logits, cache in results[1:]:
        assert torch.equal(logits, results[0][0]) and torch.equal(cache, results[0][1])

    # Against the model's own (unpadded) prefill: equal up to bf16 rounding.
    cfg = model.config
    plain = StaticKVCache(cfg.num_hidden_layers, 1, cfg.num_attention_heads, 384,
                          cfg.hidden_size // cfg.num_attention_heads, torch.bfloat16, "cuda")
    with torch.inference_mode():
        ref = model(input_ids=ids, images=images, cache=plain, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(results[-1][0], ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[-1][1], plain.buffer, rtol=2e-2, atol=2e-2)
    assert not results[-1][1][..., 305:, :].any()


@needs_cuda
def test_fused_kernels_match_plain_ops():
    from vlswift.models import fused
    from vlswift.models.qwen import RMSNorm, apply_rotary, logn_scale, rotary_cos_sin, rotary_inv_freq

    torch.manual_seed(0)
    dt = torch.bfloat16
    x, r = torch.randn(3, 5, 4096, device="cuda", dtype=dt), torch.randn(3, 5, 4096, device="cuda", dtype=dt)
    norm = RMSNorm(4096).cuda().to(dt)
    norm.weight.data.normal_(1, 0.1)
    with torch.no_grad():
        summed, y = fused.rms_norm(x, norm.weight, 1e-6, r)
        assert torch.equal(summed, x + r)
        torch.testing.assert_close(y, norm.norm(x + r), rtol=1.6e-2, atol=1e-2)

        heads, dim = 32, 128
        qkv = torch.randn(2, 7, 3 * heads * dim, device="cuda", dtype=dt)
        pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3000, 3001, 3002, 3003, 3004, 3005, 3006]], device="cuda")
        inv = rotary_inv_freq(torch.tensor([1.0, 3.0], dtype=torch.float64), dim, 10000, "cuda")
        cos, sin = rotary_cos_sin(pos, inv)
        logn = logn_scale(pos, 2048)[:, :, None, None]
        q, k, v = qkv.view(2, 7, 3, heads, dim).unbind(2)
        ref_q, ref_k = apply_rotary(q, cos, sin) * logn.to(dt), apply_rotary(k, cos, sin)
        ref_v = v.clone()
        fused.rotary_qk_(qkv, heads, cos, sin, logn)
        q, k, v = qkv.view(2, 7, 3, heads, dim).unbind(2)
        torch.testing.assert_close(q, ref_q, rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(k, ref_k, rtol=1.6e-2, atol=1e-2)
        assert torch.equal(v, ref_v)

        a, b = torch.randn(4, 11008, device="cuda", dtype=dt), torch.randn(4, 11008, device="cuda", dtype=dt)
        torch.testing.assert_close(fused.silu_mul(a, b), a * F.silu(b), rtol=1.6e-2, atol=1e-2)

        x, w, bias = (torch.randn(1, 1, 4096, device="cuda", dtype=dt), torch.randn(11008, 4096, device="cuda", dtype=dt),
                      torch.randn(11008, device="cuda", dtype=dt))
        torch.testing.assert_close(fused.gemv(x, w, bias), F.linear(x, w, bias), rtol=1.6e-2, atol=0.5)

        q = torch.randn(2, 32, 1, 128, device="cuda", dtype=dt)
        keys, values = (torch.randn(2, 32, 384, 128, device="cuda", dtype=dt) for _ in range(2))
        mask = torch.ones(2, 1, 1, 384, dtype=torch.bool, device="cuda")
        mask[1, ..., :70] = False  # left padding
        mask[..., 300:] = False  # the unfilled part of a cache
        ref = F.scaled_dot_product_attention(q, keys[:, :, :300], values[:, :, :300], attn_mask=mask[..., :300])
        torch.testing.assert_close(fused.decode_attention(q, keys, values, mask), ref, rtol=1.6e-2, atol=1e-2)
        assert torch.equal(fused.decode_attention(q, keys, values, mask),
                           fused.decode_attention(q, keys[:, :, :300], values[:, :, :300], mask[..., :300]))
