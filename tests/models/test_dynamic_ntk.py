"""Dynamic NTK during decoding: the alpha chosen at prefill is kept for every decode step.

The official ``QWenModel.forward`` computes ``ntk_alpha`` from the sequence length only when the
whole sequence is new (``kv_seq_len == hidden_states.size(1)``: the prefill) and otherwise reuses
``rotary_emb._ntk_alpha_cached``, the prefill's value. So once a reply grows past the length at
which a fresh prompt would get the next alpha, the decode steps still rotate queries with the
prefill's alpha (the cached keys were rotated with it too). The golden prompts never cross such
a boundary; these tests do, with a small ``seq_length``.
"""

from __future__ import annotations

import pytest
import torch

from vlswift.models import qwen
from vlswift.models.loading import load_pretrained
from vlswift.models.tiny import make_tiny_checkpoint

SEQ_LENGTH = 32
PROMPT = 40  # alpha 3: 2**ceil(log2(40 / 32) + 1) - 1
NEW_TOKENS = 30  # up to 70 positions: a fresh 65..96-token prompt gets alpha 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-seq32"), seq_length=SEQ_LENGTH)
    model = load_pretrained(folder, torch.float32, "cpu")
    # Sharper attention: with the init's small query/key weights attention is nearly uniform and
    # barely depends on the rotary angles, so a wrong alpha would change the logits by ~1e-3 only.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.kv_channels * model.config.num_attention_heads] *= 8
    return model


def alpha_of(length: int) -> float:
    return qwen.ntk_alpha_for_length(torch.tensor([length]), SEQ_LENGTH).item()


def no_cache_logits(model, ids: torch.Tensor, alpha: float | None, monkeypatch) -> torch.Tensor:
    """Last-position logits of one forward over all of ``ids``; ``alpha`` forces the NTK alpha."""
    with monkeypatch.context() as m:
        if alpha is not None:
            m.setattr(qwen, "ntk_alpha_for_length",
                      lambda lengths, seq_length: torch.full(lengths.shape, alpha, dtype=torch.float64))
        return model(ids).logits[0, -1]


def make_cache(kind: str, model):
    if kind == "dynamic":  # what transformers' generate() passes
        from transformers import DynamicCache

        return DynamicCache()
    from vlswift.infer.engine import StaticKVCache  # what vlswift's engine passes

    cfg = model.config
    return StaticKVCache(cfg.num_hidden_layers, 1, cfg.num_attention_heads, PROMPT + NEW_TOKENS,
                         cfg.hidden_size // cfg.num_attention_heads, torch.float32, "cpu")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_decode_keeps_the_prefill_alpha_across_a_boundary(model, kind, monkeypatch):
    prefill_alpha, crossed_alpha = alpha_of(PROMPT), alpha_of(PROMPT + NEW_TOKENS)
    assert (prefill_alpha, crossed_alpha) == (3.0, 7.0)  # the reply crosses the next boundary (64)
    assert model.config.use_dynamic_ntk and model.config.use_logn_attn

    ids = torch.randint(0, 256, (1, PROMPT + NEW_TOKENS), generator=torch.Generator().manual_seed(0))
    cache = make_cache(kind, model)
    with torch.no_grad():
        logits = model(ids[:, :PROMPT], cache=cache).logits[0, -1]
        assert cache.ntk_alpha.tolist() == [prefill_alpha]
        assert (logits - no_cache_logits(model, ids[:, :PROMPT], None, monkeypatch)).abs().max() < 1e-4
        for n in range(PROMPT + 1, PROMPT + NEW_TOKENS + 1):  # feed ids[n-1], predict position n
            logits = model(ids[:, n - 1:n], cache=cache).logits[0, -1]
            assert cache.ntk_alpha.tolist() == [prefill_alpha], n
            want = no_cache_logits(model, ids[:, :n], prefill_alpha, monkeypatch)
            assert (logits - want).abs().max().item() < 1e-4, n
        # Past the boundary a fresh forward over the same tokens picks alpha 7 and computes
        # something else: keeping the prefill's alpha is a choice the test can see.
        fresh = no_cache_logits(model, ids, None, monkeypatch)
        assert (logits - fresh).abs().max().item() > 1e-2
