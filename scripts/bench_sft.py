"""LoRA training benchmark: the real-shape Qwen-VL-Chat (random bf16 weights) on one GPU.

What the anchors measure for the official code: LoRA r=8 on ``c_attn`` (peft), AdamW, one
448px image + ~50 caption tokens per sample (336 tokens, loss on the caption only), at batch
1, 4 and 16. For each batch size it tries several gradient-checkpointing policies (how many
decoder blocks recompute their activations) and reports the fastest whose peak memory stays
within --max-gb (allocated; the reserved peak is reported beside it), with the whole sweep.
With ``--graphs true`` (default) the decoder blocks' forward and backward replay from CUDA
graphs (``--cuda_graphs`` of ``vlswift sft``); ``--eager-batches`` are measured eagerly too,
in the same run, for comparison. Also the copy bandwidth and bf16 matmul peak of the
device, and model FLOPs utilisation. Prints one JSON line (and writes it to --out).

    PYTHONPATH=src python scripts/bench_sft.py [--config path/to/config.json] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import bench_common as bc

PROMPT_TOKENS = 286  # system + "Picture 1:<img>…</img>" + question, as the chat template makes it
CAPTION_TOKENS = 50


def make_batch(config, batch: int, gen: torch.Generator) -> dict:
    ids, labels = [], []
    for _ in range(batch):
        prompt = bc.image_prompt(config, PROMPT_TOKENS, gen)
        caption = torch.randint(0, 151643, (CAPTION_TOKENS,), generator=gen).tolist()
        ids.append(prompt + caption)
        labels.append([-100] * PROMPT_TOKENS + caption)
    return {"input_ids": torch.tensor(ids, device="cuda"), "labels": torch.tensor(labels, device="cuda"),
            "images": bc.random_images(batch, gen).cuda()}


def lora_model(config):
    from peft import LoraConfig, get_peft_model

    base = bc.random_model(config)
    # No task_type: peft then calls our forward as it is (no causal-LM wrapping). Adapters in
    # the model's dtype, as the peft of ms-swift 2.x made them (newer peft upcasts to float32).
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn"]),
                           autocast_adapter_dtype=False)
    model.train()
    return base, model


def time_steps(model, opt, batch: dict, steps: int, warmup: int = 2) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), averaged over ``steps``."""

    def one():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def flops_per_sample(config, base) -> float:
    """Model FLOPs of one sample (no recomputation counted): ViT forward, LLM forward and the
    backward to activations (the frozen weights get no gradients), attention included."""
    tr = base.transformer
    vit_params = sum(p.numel() for p in tr.visual.parameters())
    vit = 2 * vit_params * 1024 + 4 * 1024**2 * config.visual["width"] * config.visual["layers"]
    t = PROMPT_TOKENS + CAPTION_TOKENS
    llm_params = sum(p.numel() for p in tr.h.parameters())
    llm_fwd = 2 * llm_params * t + 2 * t**2 * config.hidden_size * config.num_hidden_layers
    head_fwd = 2 * config.hidden_size * config.vocab_size * CAPTION_TOKENS
    return vit + 2 * (llm_fwd + head_fwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=bc.default_config_path(), help="official config.json of the shape to build")
    ap.add_argument("--out", default=None, help="also write the result (indented JSON) here")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--policies", default="32,16,8,4,0",
                    help="gradient-checkpointing policies to try: decoder blocks that recompute")
    ap.add_argument("--max-gb", type=float, default=24.0, help="memory cap when choosing the policy")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--graphs", default="true", choices=["true", "false"],
                    help="replay the decoder blocks' forward and backward from CUDA graphs (as --cuda_graphs)")
    ap.add_argument("--eager-batches", default="4",
                    help="with --graphs true, also measure these batch sizes eagerly (for comparison)")
    args = ap.parse_args()
    res = bc.start_result("bench_sft.py", args.config)

    config = bc.read_config(args.config)
    base, model = lora_model(config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    flops = flops_per_sample(config, base)
    res["lora_flops_per_sample_T"] = round(flops / 1e12, 2)
    res["lora_tokens_per_sample"] = PROMPT_TOKENS + CAPTION_TOKENS
    gen = torch.Generator().manual_seed(0)
    res["cuda_graphs"] = args.graphs == "true"
    sweep = []
    batches = [int(x) for x in args.batches.split(",") if x]
    eager_batches = [int(x) for x in args.eager_batches.split(",") if x] if res["cuda_graphs"] else []
    # The eager comparison first: graph pools freed later cannot inflate its memory figures.
    for b, graphed in [(b, False) for b in eager_batches] + [(b, res["cuda_graphs"]) for b in batches]:
        batch = make_batch(config, b, gen)
        for layers in [int(x) for x in args.policies.split(",") if x != ""]:
            base.gradient_checkpointing_enable({"layers": layers})
            # A fresh capture per policy (the graphs' memory pool freed), so each row's peak is its own.
            if graphed:
                base.enable_training_graphs()
            else:
                base.disable_training_graphs()
            opt.zero_grad(set_to_none=True)
            gc.collect()  # a dropped graph (its classes are in reference cycles) frees its pool only then
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                step_s = time_steps(model, opt, batch, args.steps)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                sweep.append({"batch": b, "ckpt_layers": layers, "graphed": graphed, "oom": True})
                continue
            graphs = base.transformer.training_graphs
            sweep.append({"batch": b, "ckpt_layers": layers, "graphed": bool(graphs and graphs.replays),
                          "step_s": round(step_s, 4), "samples_per_s": round(b / step_s, 2),
                          "peak_GB": round(torch.cuda.max_memory_allocated() / bc.GB, 2),
                          "reserved_GB": round(torch.cuda.max_memory_reserved() / bc.GB, 2)})
            print(sweep[-1], flush=True)
        base.disable_training_graphs()
        if not graphed and res["cuda_graphs"]:
            continue  # the eager comparison rows do not give the headline figures
        fits = [s for s in sweep if s["batch"] == b and not s.get("oom") and s["peak_GB"] <= args.max_gb
                and s["graphed"] == graphed]
        if fits:
            best = max(fits, key=lambda s: s["samples_per_s"])
            res[f"lora_samples_per_s_bs{b}"] = best["samples_per_s"]
            res[f"lora_tokens_per_s_bs{b}"] = round(best["samples_per_s"] * res["lora_tokens_per_sample"])
            res[f"lora_peak_GB_bs{b}"] = best["peak_GB"]
            res[f"lora_ckpt_layers_bs{b}"] = best["ckpt_layers"]
            res[f"lora_reserved_GB_bs{b}"] = best["reserved_GB"]
            res[f"lora_mfu_bs{b}"] = round(best["samples_per_s"] * flops / (res["bf16_matmul_TFLOPs"] * 1e12), 3)
    res["lora_sweep"] = sweep
    bc.print_result(res, args.out)


if __name__ == "__main__":
    main()
