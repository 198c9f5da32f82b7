"""Inference benchmark: the real-shape Qwen-VL-Chat (random bf16 weights) on one GPU.

Measures, in one run, the device's copy bandwidth and bf16 matmul peak, then what the
anchors in ../shared/anchors measure for the official code: batch-1 greedy decode of 256 new
tokens after a 288-token prompt with one 448px image (eos ignored), time to first token,
batch 8 / 32 throughput, peak memory; plus issue 2's check (a 512-token reply streamed at
batch 1) and whether the CUDA-graph path gives the same tokens as the plain one (and the
graph prefill, padded to its length bucket, the same bits as the unpadded one). Prints one
JSON line (and writes it to --out).

    PYTHONPATH=src python scripts/bench_infer.py [--config path/to/config.json] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import bench_common as bc
from vlswift.infer import fast_decode
from vlswift.infer.engine import KV_BUCKET, SamplingConfig, generate_stream, round_up

PROMPT_TOKENS = 288


def stream(model, prompts, images, new_tokens: int, fast: bool = True) -> tuple[float, float, list[list[int]]]:
    """(seconds to the first token, seconds in all, generated ids) for one generate_stream call."""
    os.environ["VLSWIFT_NO_FAST_DECODE"] = "0" if fast else "1"
    cfg = SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first = None
    for rows in generate_stream(model, prompts, images, cfg):
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return first, total, [list(r) for r in rows]


def ttft_ms(model, prompt, image, reps: int = 7) -> float:
    """Median time to the first token of one prompt (after one call that captures graphs)."""
    stream(model, [prompt], image, 1)
    ttfts = sorted(stream(model, [prompt], image, 1)[0] for _ in range(reps))
    return round(1e3 * ttfts[len(ttfts) // 2], 1)


@torch.inference_mode()
def prefill_bits(model, prompt, image) -> dict:
    """Whether the graph prefill (padded to its bucket) gives the unpadded prefill's bits."""
    ids = torch.tensor([prompt], device="cuda")
    dec = fast_decode.decoder_for(model, 1, round_up(len(prompt) + 1, KV_BUCKET))
    graph_logits = dec.prefill(ids, image).clone()
    graph_cache = dec.cache.buffer.clone()
    dec.cache.reset()
    logits = model(input_ids=ids, images=image, cache=dec.cache, logits_to_keep=1).logits[:, -1]
    out = {"prefill_graph_logits_bits_equal": torch.equal(graph_logits, logits),
           "prefill_graph_cache_bits_equal": torch.equal(graph_cache, dec.cache.buffer),
           "prefill_graph_logits_max_abs_diff": (graph_logits.float() - logits.float()).abs().max().item()}
    del graph_cache, dec
    return out


def decode_rate(batch: int, new_tokens: int, first: float, total: float) -> float:
    """Tokens/s after the first token (the anchors' decode_tok_per_s: (n - 1) / (total - prefill))."""
    return batch * (new_tokens - 1) / (total - first)


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / bc.GB, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=bc.default_config_path(), help="official config.json of the shape to build")
    ap.add_argument("--out", default=None, help="also write the result (indented JSON) here")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="8,32", help="batch sizes for throughput, comma-separated")
    ap.add_argument("--skip-eager", action="store_true", help="skip the plain-path comparison runs")
    ap.add_argument("--profile", default=None, help="write a kernel-time table of a few decode steps here")
    args = ap.parse_args()
    res = bc.start_result("bench_infer.py", args.config)

    config = bc.read_config(args.config)
    t = time.perf_counter()
    model = bc.random_model(config)
    torch.cuda.synchronize()
    res["init_s"] = round(time.perf_counter() - t, 1)
    tr = model.transformer
    res["params_B"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    decode_bytes = bc.param_bytes(tr.h) + bc.param_bytes(tr.ln_f) + bc.param_bytes(model.lm_head)
    res["decode_bytes_per_token_GB"] = round(decode_bytes / bc.GB, 2)
    res["decode_roofline_tok_per_s"] = round(res["copy_GBps_read_plus_write"] * bc.GB / decode_bytes, 1)

    gen = torch.Generator().manual_seed(0)
    prompt = bc.image_prompt(config, PROMPT_TOKENS, gen)
    image = bc.random_images(1, gen)
    n = args.new_tokens
    if args.profile:
        profile_decode(model, prompt, image, args.profile)

    # Batch 1: decode rate, time to first token, peak memory (the first runs capture the graphs).
    torch.cuda.reset_peak_memory_stats()
    res["first_call_s_bs1"] = round(stream(model, [prompt], image, n)[1], 2)  # includes graph capture
    first, total, fast_ids = stream(model, [prompt], image, n)
    res["decode_tok_per_s_bs1"] = round(decode_rate(1, n, first, total), 1)
    res["ttft_ms_1img"] = ttft_ms(model, prompt, image)
    res["infer_peak_GB"] = peak_gb()
    # Before/after of the prefill graph (fast_decode.StaticDecoder.prefill), same run.
    os.environ["VLSWIFT_NO_PREFILL_GRAPH"] = "1"
    res["ttft_ms_1img_eager_prefill"] = ttft_ms(model, prompt, image)
    os.environ["VLSWIFT_NO_PREFILL_GRAPH"] = "0"
    res["prefill_bucket"] = fast_decode.PREFILL_BUCKET
    # A prompt length off the buckets (300 -> padded to 320) and whether padding changed any bit.
    prompt300 = bc.image_prompt(config, 300, torch.Generator().manual_seed(1))
    res["ttft_ms_1img_prompt300"] = ttft_ms(model, prompt300, image)
    for p in (prompt, prompt300):
        try:
            res.update({f"{k}_T{len(p)}": v for k, v in prefill_bits(model, p, image).items()})
        except Exception as e:  # a check for the record: keep the run's other figures
            res[f"prefill_graph_check_error_T{len(p)}"] = repr(e)
    with torch.inference_mode():
        res["vit_ms_1img"] = round(1e3 * bc.cuda_time(lambda: tr.visual(image.cuda()), reps=5), 1)
        text_ids = torch.tensor([prompt], device="cuda").clamp(max=151642)  # the prompt without its image span
        res["prefill_text_ms"] = round(1e3 * bc.cuda_time(lambda: model(input_ids=text_ids, logits_to_keep=1), reps=5), 1)
        dec = fast_decode.decoder_for(model, 1, 384)
        res["prefill_text_graph_ms"] = round(1e3 * bc.cuda_time(lambda: dec.prefill(text_ids, None), reps=5), 1)
        del dec
    res["prefill_graphs_bs1"] = sorted(model._vlswift_decoder.prefill_graphs)
    vit_flops = 2 * bc.param_bytes(tr.visual) / 2 * 1024
    llm_flops = 2 * (bc.param_bytes(tr.h) / 2) * PROMPT_TOKENS
    res["prefill_flops_T"] = round((vit_flops + llm_flops) / 1e12, 2)
    res["ttft_at_matmul_peak_ms"] = round(1e3 * (vit_flops + llm_flops) / (res["bf16_matmul_TFLOPs"] * 1e12), 1)

    # Issue 2's acceptance: a reply of 512 tokens streamed at batch 1, peak memory.
    torch.cuda.reset_peak_memory_stats()
    _, total512, ids512 = stream(model, [prompt], image, 512)
    res["stream512_tokens"] = len(ids512[0])
    res["stream512_s"] = round(total512, 2)
    res["stream512_peak_GB"] = peak_gb()

    # Before/after of the Triton GEMV for single-row linears: the same run with cuBLAS.
    os.environ["VLSWIFT_TRITON_GEMV"] = "0"
    model._vlswift_decoder = None
    stream(model, [prompt], image, n)
    first_c, total_c, _ = stream(model, [prompt], image, n)
    res["decode_tok_per_s_bs1_cublas_gemv"] = round(decode_rate(1, n, first_c, total_c), 1)
    os.environ["VLSWIFT_TRITON_GEMV"] = "1"
    model._vlswift_decoder = None

    # Decode attention through SDPA instead (memory-efficient kernel; cuDNN's, whose plain and
    # graph steps gave different tokens): for the record.
    from torch.nn.attention import SDPBackend

    from vlswift.models import qwen

    chosen = qwen.DECODE_SDPA_BACKENDS
    qwen.DECODE_ATTENTION = "sdpa"
    for name, backends in (("sdpa_efficient", chosen), ("sdpa_cudnn", [SDPBackend.CUDNN_ATTENTION, *chosen])):
        qwen.DECODE_SDPA_BACKENDS = backends
        model._vlswift_decoder = None
        stream(model, [prompt], image, n)
        first_c, total_c, _ = stream(model, [prompt], image, n)
        res[f"decode_tok_per_s_bs1_{name}_attention"] = round(decode_rate(1, n, first_c, total_c), 1)
    qwen.DECODE_SDPA_BACKENDS, qwen.DECODE_ATTENTION = chosen, "triton"
    model._vlswift_decoder = None

    if not args.skip_eager:
        first_e, total_e, eager_ids = stream(model, [prompt], image, n, fast=False)
        res["eager_decode_tok_per_s_bs1"] = round(decode_rate(1, n, first_e, total_e), 1)
        res["fast_equals_eager_bs1"] = eager_ids == fast_ids
        # The padded prefill graph (300 -> 320 positions) against the plain path, 64 tokens.
        res["fast_equals_eager_bs1_prompt300"] = (stream(model, [prompt300], image, 64)[2]
                                                  == stream(model, [prompt300], image, 64, fast=False)[2])

    for b in [int(x) for x in args.batches.split(",") if x]:
        prompts = [bc.image_prompt(config, PROMPT_TOKENS, gen) for _ in range(b)]
        images = bc.random_images(b, gen)
        torch.cuda.reset_peak_memory_stats()
        stream(model, prompts, images, n)
        first, total, ids = stream(model, prompts, images, n)
        res[f"decode_tok_per_s_bs{b}"] = round(decode_rate(b, n, first, total), 1)
        res[f"ttft_ms_bs{b}"] = round(1e3 * first, 1)
        res[f"infer_peak_GB_bs{b}"] = peak_gb()
        stream(model, prompts, images, 128)
        _, total128, _ = stream(model, prompts, images, 128)
        res[f"generate_bs{b}_tok_per_s_incl_prefill"] = round(b * 128 / total128, 1)
        if b == 8 and not args.skip_eager:
            _, _, eager_ids = stream(model, prompts, images, n, fast=False)
            res["fast_equals_eager_bs8"] = eager_ids == ids

    roof = res["decode_roofline_tok_per_s"]
    res["decode_bs1_vs_roofline"] = round(res["decode_tok_per_s_bs1"] / roof, 3)
    res["ttft_vs_matmul_peak"] = round(res["ttft_at_matmul_peak_ms"] / res["ttft_ms_1img"], 3)
    if "decode_tok_per_s_bs32" in res:
        # Roofline at batch 32: weights once per step plus every row's KV cache (~550 positions).
        kv_bytes = 32 * 2 * config.num_hidden_layers * config.hidden_size * (PROMPT_TOKENS + n) * 2
        roof32 = res["copy_GBps_read_plus_write"] * bc.GB / (decode_bytes + kv_bytes) * 32
        res["decode_roofline_tok_per_s_bs32"] = round(roof32, 1)
        res["decode_bs32_vs_roofline"] = round(res["decode_tok_per_s_bs32"] / roof32, 3)

    bc.print_result(res, args.out)


def profile_decode(model, prompt, image, path: str) -> None:
    """Tables of where time goes: the prefill of one prompt, and a batch-1 stream of 16 tokens."""
    from torch.profiler import ProfilerActivity, profile

    os.environ["VLSWIFT_NO_FAST_DECODE"] = "0"
    with open(path, "w") as f:
        for tokens in (1, 16):
            stream(model, [prompt], image, tokens)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                stream(model, [prompt], image, tokens)
            table = prof.key_averages()
            f.write(f"## {tokens} new token(s), by CUDA time\n")
            f.write(table.table(sort_by="cuda_time_total", row_limit=30) + "\n")
            f.write(f"## {tokens} new token(s), by CPU time\n")
            f.write(table.table(sort_by="cpu_time_total", row_limit=30) + "\n")


if __name__ == "__main__":
    main()
