"""What is trained: LoRA adapters through peft (target modules resolved to names), or every weight."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import nn

VISION_PREFIX = "transformer.visual."


def linear_module_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the model except the output head, in module order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def resolve_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module names for ``--lora_target_modules``.

    ``DEFAULT``: the LLM's attention input projections (``c_attn``), as swift for Qwen.
    ``ALL``: every linear layer, vision tower and resampler included, ``lm_head`` excluded.
    Other entries name modules by their last part(s) (``w1``, ``attn.c_proj``) or in full; each
    must match at least one linear layer.
    """
    linears = linear_module_names(model)
    chosen: set[str] = set()
    for target in targets:
        if target == "ALL":
            matched = linears
        elif target == "DEFAULT":
            matched = [n for n in linears if n.endswith(".c_attn") and not n.startswith(VISION_PREFIX)]
        else:
            matched = [n for n in linears if n == target or n.endswith("." + target)]
            if not matched:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise ValueError(f"--lora_target_modules {target}: no linear layer of the model has that name "
                                 f"(expected DEFAULT, ALL or names such as {', '.join(leaves)})")
        chosen.update(matched)
    if not chosen:
        raise ValueError("--lora_target_modules selects no layer: pass DEFAULT, ALL or module names")
    return [n for n in linears if n in chosen]


def apply_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: int, dropout: float):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA on ``target_modules`` (only those train).

    No ``task_type``: peft's causal-LM wrapper rewrites forward arguments and would drop
    ``images``; the plain ``PeftModel`` passes every argument through.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    peft_model = get_peft_model(model, config)
    # peft would record the model's name_or_path (empty for ours); infer/export read the base from here too.
    peft_model.peft_config["default"].base_model_name_or_path = getattr(model, "model_dir", None)
    return peft_model


def load_lora_weights(model, adapter_dir: str | Path) -> None:
    """Put the adapter weights of a LoRA checkpoint into an already-wrapped ``PeftModel``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{adapter_dir}: the adapter lacks {len(missing)} LoRA tensor(s) of this run "
                         f"(e.g. {missing[0]}): were --lora_target_modules/--lora_rank the same?")


def freeze_vision_tower(model: nn.Module) -> None:
    """``--freeze_vit true``: the vision tower and resampler keep their weights."""
    for name, param in model.named_parameters():
        if name.startswith(VISION_PREFIX):
            param.requires_grad_(False)


def vision_is_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if VISION_PREFIX in n)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total

