"""The native model against the official implementation's outputs on the golden checkpoint."""

from __future__ import annotations

import gzip
import re

import pytest
import torch

from vlswift.infer.engine import SamplingConfig, generate_stream
from vlswift.models.loading import load_pretrained


@pytest.fixture(scope="module")
def model(golden_ckpt):
    return load_pretrained(golden_ckpt, torch.float32, "cpu")


@pytest.fixture(scope="module")
def golden_logits(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "logits.safetensors"))


@pytest.fixture(scope="module")
def golden_pixels(golden_dir):
    from safetensors.torch import load

    out = {}
    for name in ("a.png", "b.jpg", "c.png"):
        with gzip.open(golden_dir / "images" / f"pixels_{name}.safetensors.gz") as f:
            out[name] = load(f.read())["pixels"]
    return out


def case_images(case, pixels):
    """The golden pixel tensors of a case's images, in order of appearance (history first)."""
    text = "".join(q for q, _ in case["history"]) + case["query"]
    names = re.findall(r"<img>images/(.*?)</img>", text)
    return torch.stack([pixels[n] for n in names]) if names else None


def test_last_logits_and_row_sums(model, golden_cases, golden_logits, golden_pixels):
    for case in golden_cases:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids, images=case_images(case, golden_pixels)).logits[0]
        last = (logits[-1] - golden_logits[f"{case['name']}.last"]).abs().max().item()
        rowsum = (logits.sum(-1) - golden_logits[f"{case['name']}.rowsum"]).abs().max().item()
        assert last < 1e-4, (case["name"], last)
        assert rowsum < 1e-3, (case["name"], rowsum)


def test_prompts_exercise_ntk_and_logn(model, golden_cases):
    # The golden seq_length is 128: the image prompts are longer, so NTK and logn are in play.
    assert model.config.seq_length == 128
    assert max(len(c["input_ids"]) for c in golden_cases) > 4 * model.config.seq_length


def test_train_mode_loss(model, golden_cases, golden_pixels):
    model.train()
    try:
        for case in golden_cases:
            ids = torch.tensor([case["input_ids"]])
            with torch.no_grad():
                loss = model(ids, images=case_images(case, golden_pixels), labels=ids).loss.item()
            assert abs(loss - case["train_loss_labels_eq_inputs"]) < 1e-4, case["name"]
    finally:
        model.eval()


def test_greedy_ids(model, golden_cases, golden_pixels):
    cfg = SamplingConfig(max_new_tokens=12)
    for case in golden_cases:
        *_, rows = generate_stream(model, [case["input_ids"]], case_images(case, golden_pixels), cfg)
        assert rows[0] == case["greedy_ids"], case["name"]


def test_batched_greedy_equals_single(model, golden_cases, golden_pixels):
    cfg = SamplingConfig(max_new_tokens=12)
    images = [case_images(c, golden_pixels) for c in golden_cases]
    stacked = torch.cat([i for i in images if i is not None])
    *_, rows = generate_stream(model, [c["input_ids"] for c in golden_cases], stacked, cfg)
    assert rows == [c["greedy_ids"] for c in golden_cases]


def test_hf_generate_with_cache_matches(model, golden_cases, golden_pixels):
    from transformers import GenerationConfig

    case = next(c for c in golden_cases if c["name"] == "one_image")
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[151645, 151644], pad_token_id=151643)
    out = model.generate(input_ids=torch.tensor([case["input_ids"]]), images=case_images(case, golden_pixels),
                         generation_config=gc)
    assert out[0, len(case["input_ids"]):].tolist() == case["greedy_ids"]


def test_bf16_load_agrees_with_fp32(golden_ckpt, model, golden_cases, golden_pixels):
    bf16 = load_pretrained(golden_ckpt, torch.bfloat16, "cpu")
    case = next(c for c in golden_cases if c["name"] == "one_image")
    ids = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        ref = model(ids, images=case_images(case, golden_pixels)).logits[0, -1]
        low = bf16(ids, images=case_images(case, golden_pixels)).logits[0, -1].float()
    assert bf16.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; compare relative to the logits' scale.
    assert (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert torch.nn.functional.cosine_similarity(low, ref, dim=0).item() > 0.999


def test_image_span_count_mismatch(model, golden_cases, golden_pixels):
    case = next(c for c in golden_cases if c["name"] == "two_images")
    one = case_images(case, golden_pixels)[:1]
    with pytest.raises(ValueError, match=r"2 image span\(s\).*but 1 image\(s\)"):
        model(torch.tensor([case["input_ids"]]), images=one)
