"""The generation engine's beam search path (transformers' ``generate``)."""

from __future__ import annotations

import pytest

from vlswift.infer.engine import SamplingConfig, beam_search_options, generate_stream


@pytest.fixture
def transformers_warnings(monkeypatch) -> list[str]:
    """What the generation config's validation warns (``warning_once`` would hide a repeat)."""
    from transformers.generation import configuration_utils

    seen: list[str] = []
    monkeypatch.setattr(configuration_utils.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda msg, *a, **k: seen.append(str(msg)))
    return seen


def test_greedy_beam_search_does_not_warn_about_sampling_options(golden_model, transformers_warnings):
    model, template, _ = golden_model
    # The golden generation_config.json has top_p=0.3 and top_k=0, as Qwen-VL-Chat's has.
    assert model.generation_config.top_p == 0.3
    prompt = template.encode("Hello! Who are you?", [], None)["input_ids"]
    rows = list(generate_stream(model, [prompt], None, SamplingConfig(max_new_tokens=4, num_beams=2)))
    assert len(rows) == 1 and len(rows[0]) == 1 and 1 <= len(rows[0][0]) <= 4
    assert transformers_warnings == []


def test_beam_search_options_keep_sampling_options_only_when_sampling():
    sampling = beam_search_options(SamplingConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.3,
                                                  num_beams=3), pad_id=0)
    assert (sampling["temperature"], sampling["top_k"], sampling["top_p"]) == (0.7, 5, 0.3)
    greedy = beam_search_options(SamplingConfig(temperature=0.7, top_k=5, top_p=0.3, num_beams=3), pad_id=0)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (1.0, 50, 1.0)
    assert greedy["num_beams"] == 3 and greedy["do_sample"] is False
