"""Qwen-VL configuration, read from the official ``config.json`` keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

# The keys of the official Qwen-VL-Chat config.json, in its order. `save_official_config`
# writes exactly these so an exported folder is a drop-in for the official remote code.
OFFICIAL_CONFIG_KEYS = (
    "architectures", "attn_dropout_prob", "bf16", "emb_dropout_prob", "fp16", "fp32",
    "hidden_size", "initializer_range", "intermediate_size", "kv_channels",
    "layer_norm_epsilon", "max_position_embeddings", "model_type", "no_bias",
    "num_attention_heads", "num_hidden_layers", "onnx_safe", "rotary_emb_base", "rotary_pct",
    "scale_attn_weights", "seq_length", "tie_word_embeddings", "tokenizer_type", "torch_dtype",
    "transformers_version", "use_cache", "use_dynamic_ntk", "use_flash_attn", "use_logn_attn",
    "visual", "vocab_size",
)

OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}

DEFAULT_VISUAL = {
    "heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
    "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664,
}


class QWenConfig(PreTrainedConfig):
    """Configuration of Qwen-VL (the official key names; defaults are Qwen-VL-Chat's)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: int = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: Any = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        seq_length: int = 2048,
        tie_word_embeddings: bool = False,
        visual: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.intermediate_size = intermediate_size
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = dict(DEFAULT_VISUAL, **(visual or {}))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def read_config_dict(folder: str | Path) -> dict:
    """The raw ``config.json`` of a checkpoint folder, with a clear error when it is missing or broken."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Qwen-VL checkpoint folder: it has no config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if data.get("model_type") != "qwen" or "visual" not in data:
        raise ValueError(
            f"{path}: not a Qwen-VL config (expected model_type 'qwen' and a 'visual' section, "
            f"found model_type {data.get('model_type')!r})"
        )
    return data


def load_config(folder: str | Path) -> QWenConfig:
    """Build a :class:`QWenConfig` from a checkpoint folder's ``config.json``."""
    data = read_config_dict(folder)
    data.pop("auto_map", None)
    return QWenConfig(**{k: v for k, v in data.items() if k != "model_type"})


def official_config_dict(config: QWenConfig, torch_dtype: str, add_auto_map: bool = False) -> dict:
    """The config as the official code writes it: only the official keys (plus ``auto_map`` on request)."""
    out: dict[str, Any] = {}
    for key in OFFICIAL_CONFIG_KEYS:
        if key == "architectures":
            out[key] = ["QWenLMHeadModel"]
        elif key == "model_type":
            out[key] = "qwen"
        elif key == "torch_dtype":
            out[key] = torch_dtype
        elif key == "transformers_version":
            out[key] = "4.32.0"
        elif key == "tokenizer_type":
            out[key] = "QWenTokenizer"
        elif key in ("bf16", "fp16", "fp32"):
            out[key] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[key] == torch_dtype
        else:
            out[key] = getattr(config, key, None)
    if add_auto_map:
        out["auto_map"] = dict(OFFICIAL_AUTO_MAP)
    return dict(sorted(out.items()))
