"""What a ``--ckpt_dir`` is (LoRA adapter, full fine-tune, merged export) and how to load it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CheckpointDirError(ValueError):
    """A --ckpt_dir that cannot be used, with the reason in one line."""


@dataclass
class CkptInfo:
    path: Path
    kind: str  # "lora" or "full"
    model_type: str
    base_model_dir: Path  # the folder holding the base weights (for LoRA) or the checkpoint itself
    sft_args: dict[str, Any] = field(default_factory=dict)


def read_sft_args(ckpt_dir: Path) -> dict[str, Any]:
    """``sft_args.json`` from the checkpoint folder or the run folder above it ({} when absent)."""
    for folder in (ckpt_dir, ckpt_dir.parent):
        path = folder / "sft_args.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointDirError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return {}


def inspect_ckpt_dir(ckpt_dir: str | Path, model_type: str | None = None) -> CkptInfo:
    """Classify a checkpoint folder and find its base model."""
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise CheckpointDirError(f"--ckpt_dir {ckpt_dir}: no such folder")
    sft_args = read_sft_args(path)
    model_type = model_type or sft_args.get("model_type") or "qwen-vl-chat"
    if (path / "adapter_config.json").is_file():
        base = sft_args.get("model_id_or_path")
        if not base:
            adapter_cfg = json.loads((path / "adapter_config.json").read_text())
            base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise CheckpointDirError(
                f"{path}: a LoRA checkpoint without sft_args.json naming its base model; "
                "pass --model_id_or_path BASE_DIR"
            )
        return CkptInfo(path, "lora", model_type, Path(base), sft_args)
    if (path / "config.json").is_file():
        return CkptInfo(path, "full", model_type, path, sft_args)
    raise CheckpointDirError(
        f"{path} is neither a LoRA checkpoint (adapter_config.json) nor a full one (config.json + weights)"
    )


def load_ckpt_model(ckpt_dir: str | Path, torch_dtype=None, model_kwargs: dict | None = None,
                    model_id_or_path: str | None = None, model_type: str | None = None):
    """Load the model a checkpoint describes: base + LoRA adapter (peft), or the full checkpoint.

    Returns ``(model, tokenizer, info)``; for LoRA the model is a ``PeftModel``.
    """
    from .api import get_model_tokenizer

    info = inspect_ckpt_dir(ckpt_dir, model_type)
    if info.kind == "full":
        model, tokenizer = get_model_tokenizer(info.model_type, torch_dtype, model_kwargs,
                                               model_id_or_path=str(info.path))
        return model, tokenizer, info
    base = model_id_or_path or str(info.base_model_dir)
    model, tokenizer = get_model_tokenizer(info.model_type, torch_dtype, model_kwargs, model_id_or_path=base)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    model.eval()
    # A LoRA checkpoint may carry its run's generation config (swift saves one there, and
    # `vlswift export` puts it in the merged model): it wins over the base model's.
    from .models.loading import load_generation_config

    load_generation_config(model.get_base_model(), info.path)
    return model, tokenizer, info
