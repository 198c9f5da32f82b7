"""Short CPU runs of `vlswift sft` in half precision and with DataLoader workers.

Half precision on the CPU: torch runs bf16 and fp16 autocast and the fp16 GradScaler there (slowly,
but correctly), so these are the real code paths, not stand-ins. Workers only encode and collate
rows; the batch order and every random draw stay in the main process, so they train the same steps.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from vlswift.train.recipe import sft_main


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)


def loss_on_rows(model, tokenizer, data: Path) -> float:
    """Mean loss over every labelled token of ``data``'s rows in one batch (what evaluation computes)."""
    from vlswift.api import get_template
    from vlswift.train.data import EncodedDataset, collate, load_dataset

    samples, _ = load_dataset([str(data)])
    rows = EncodedDataset(samples, get_template("qwen", tokenizer))
    batch = collate([rows[i] for i in range(len(rows))], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("dtype, sft_type", [("bf16", "lora"), ("fp16", "lora"), ("fp16", "full")])
def test_half_precision_trains_and_its_checkpoint_loads(dtype, sft_type, fast_ckpt, example_data, train_args,
                                                        run_log, tmp_path):
    from vlswift.checkpoint import load_ckpt_model
    from vlswift.infer.engine import SamplingConfig, generate_stream

    lr = 1e-2 if sft_type == "lora" else 1e-3
    result = sft_main(train_args(fast_ckpt, example_data, tmp_path, dtype=dtype, sft_type=sft_type, max_steps=6,
                                 learning_rate=lr, lora_dropout_p=0.0, logging_steps=1))
    text = (Path(result["run_dir"]) / "logging.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON, for every reader
    log = [r for r in run_log(result["run_dir"]) if "loss" in r]
    losses = [r["loss"] for r in log]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses

    ckpt = Path(result["checkpoint"])
    state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    if dtype == "fp16":
        # The GradScaler starts at 2**16, too high for the first gradients: those steps are skipped
        # (inf grad norm, logged as null: strict JSON), the scale halves each time, and the schedule
        # waits for the first real step.
        skipped = [r["step"] for r in log if r["grad_norm"] is None]
        assert skipped == list(range(1, len(skipped) + 1)) and len(skipped) < 4, log
        assert state["scaler"]["scale"] == 2.0 ** (16 - len(skipped))
        assert [r["lr"] for r in log[:len(skipped) + 1]] == [lr] * (len(skipped) + 1)
    else:
        assert all(r["grad_norm"] is not None for r in log) and state["scaler"] == {}  # bf16 needs no scaler

    # The checkpoint loads for inference in the training dtype and holds the last step's weights: its
    # loss on the rows is the final evaluation's (which ran under autocast), and greedy decoding runs.
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model, tokenizer, info = load_ckpt_model(ckpt, torch_dtype, {"device_map": "cpu"})
    assert info.kind == sft_type and next(model.parameters()).dtype == torch_dtype
    assert loss_on_rows(model, tokenizer, example_data) == pytest.approx(result["eval_loss"], abs=1e-2)
    cfg = SamplingConfig(max_new_tokens=4, stop_token_ids=[])  # greedy; ids, not text (see test_export)
    *_, last = generate_stream(model, [tokenizer.encode("Hello!")], None, cfg, tokenizer.pad_token_id)
    assert len(last[0]) == 4


def test_dataloader_workers_train_the_same_steps(fast_ckpt, example_data, train_args, run_log, tmp_path):
    """Two DataLoader workers and two validation threads give the losses and adapter of in-process
    loading, to the bit, with dropout on (workers leave the main process's random stream alone)."""
    from safetensors.torch import load_file

    run = functools.partial(train_args, fast_ckpt, example_data, batch_size=2, max_steps=4, logging_steps=1,
                            lora_dropout_p=0.05, learning_rate=1e-2)
    results = {n: sft_main(run(tmp_path / f"workers-{n}", dataloader_num_workers=n, preprocess_num_proc=max(n, 1)))
               for n in (0, 2)}
    logs = {n: [(r["step"], r["loss"], r["grad_norm"]) for r in run_log(res["run_dir"]) if "loss" in r]
            for n, res in results.items()}
    assert len(logs[0]) == 4 and logs[2] == logs[0]  # two epochs of two batches: fresh workers each epoch
    assert results[2]["eval_loss"] == results[0]["eval_loss"]
    adapters = [load_file(str(Path(results[n]["checkpoint"]) / "adapter_model.safetensors")) for n in (0, 2)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
