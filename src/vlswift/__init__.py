"""vlswift: chat with, fine-tune and export Qwen-VL-Chat.

The public API is imported lazily so ``import vlswift`` and the CLI start fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "ModelType": "api", "get_model_tokenizer": "api", "get_default_template_type": "api",
    "get_template": "api", "inference": "api", "inference_stream": "api", "seed_everything": "api",
    "QWenTokenizer": "tokenizer", "QWenConfig": "models.config", "QWenLMHeadModel": "models.qwen",
    "SftArguments": "train.args", "sft_main": "train.recipe",
    "InferArguments": "infer.args", "infer_main": "infer.main",
    "ExportArguments": "export", "export_main": "export",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(f"vlswift.{_API[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'vlswift' has no attribute {name!r}")
