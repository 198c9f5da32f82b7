"""Finding, reading and writing Qwen-VL checkpoints in the official layout.

Weights are read shard by shard into a model built on the meta device, so loading the
19 GB checkpoint needs about one copy of it in memory (one shard more at most).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..messages import one_line
from .config import QWenConfig, load_config

HUB_IDS = {
    "qwen-vl-chat": ("Qwen/Qwen-VL-Chat", "qwen/Qwen-VL-Chat"),
    "qwen-vl": ("Qwen/Qwen-VL", "qwen/Qwen-VL"),
}
AUX_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


LoadProgress = Callable[[int, int], None]  # (bytes of tensors loaded, bytes of the weight files)
_load_progress: ContextVar[LoadProgress | None] = ContextVar("load_progress", default=None)


@contextmanager
def load_progress(callback: LoadProgress) -> Iterator[None]:
    """Inside, ``load_pretrained`` reports to ``callback`` after every tensor (a progress bar for
    loads reached through the API, whose functions take no callback)."""
    token = _load_progress.set(callback)
    try:
        yield
    finally:
        _load_progress.reset(token)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used, with what is wrong in one line."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The one place where ``bf16|fp16|fp32|AUTO`` becomes a torch dtype.

    AUTO: bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "AUTO").lower().replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32")
    if name == "auto":
        dev = torch.device(device) if device is not None else default_device()
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of bf16, fp16, fp32, AUTO")
    return DTYPES[name]


def default_device() -> torch.device:
    """The one place where the default device is chosen: the first visible GPU, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def resolve_model_dir(model_type: str, model_id_or_path: str | None = None) -> Path:
    """A local checkpoint folder: the given path, or a hub download of the model type's weights."""
    if model_id_or_path:
        folder = Path(model_id_or_path).expanduser()
        if folder.is_dir():
            return folder
        looks_like_hub_id = model_id_or_path.count("/") == 1 and not model_id_or_path.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise CheckpointError(f"{model_id_or_path}: no such checkpoint folder")
    elif model_type not in HUB_IDS:
        raise CheckpointError(f"unknown model_type {model_type!r}: expected one of {', '.join(HUB_IDS)}")
    hf_id, ms_id = HUB_IDS.get(model_type, (model_id_or_path, model_id_or_path))
    repo_id = model_id_or_path or (ms_id if use_modelscope() else hf_id)
    # A given id that failed to download may be a mistyped relative folder: say it is not one either.
    return download_checkpoint(repo_id, no_local_folder=bool(model_id_or_path))


def use_modelscope() -> bool:
    if os.environ.get("USE_MODELSCOPE_HUB", "0") not in ("1", "true", "True"):
        return False
    try:
        import modelscope  # noqa: F401
    except ImportError:
        return False
    return True


def download_checkpoint(repo_id: str, no_local_folder: bool = False) -> Path:
    """Download (or find in the local cache) a hub checkpoint; offline, say so in one line.

    ``no_local_folder``: ``repo_id`` was also looked for as a local folder and is not one; the
    error then says so.
    """
    patterns = ["*.json", "*.safetensors", "*.bin", "*.tiktoken", "*.py", "*.ttf"]
    try:
        if use_modelscope():
            from modelscope import snapshot_download as ms_download

            return Path(ms_download(repo_id))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same actionable message
        hub = "ModelScope" if use_modelscope() else "the Hugging Face Hub"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = f" and there is no local folder {repo_id}" if no_local_folder else ""
        raise CheckpointError(
            f"could not download {repo_id} from {hub} (offline or unreachable: {one_line(reason, 160)}){local}; "
            "pass a local checkpoint folder (--model_id_or_path DIR, or model_id_or_path=DIR in Python)"
        ) from None


def checkpoint_files(folder: Path) -> list[Path]:
    """Weight files of a folder: sharded or single safetensors, else pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder}: {index_name} names missing shard(s): {', '.join(missing)}")
            return files
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no weights found (expected *.safetensors or pytorch_model*.bin)")
    return files


def iter_shards(files: list[Path]) -> Iterator[dict[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            yield load_file(str(path))
        else:
            yield torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def build_model(config: QWenConfig, dtype: torch.dtype, device: str | torch.device = "meta"):
    """An empty (meta) or randomly initialised model of ``config``."""
    from .qwen import QWenLMHeadModel

    with torch.device(device):
        model = QWenLMHeadModel(config)
    return model.to(dtype) if device != "meta" else model


def load_weights(model, files: list[Path], dtype: torch.dtype, device_for,
                 progress: LoadProgress | None = None) -> None:
    """Assign checkpoint tensors to a meta model, shard by shard, checking names and shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    seen: set[str] = set()
    unexpected: list[str] = []
    total = sum(f.stat().st_size for f in files)
    done = 0
    for shard in iter_shards(files):
        ready = {}
        for name, tensor in shard.items():
            done += tensor.numel() * tensor.element_size()
            if progress is not None:
                progress(min(done, total), total)
            if name not in expected:
                if not name.endswith(("masked_bias", "rotary_emb.inv_freq")):
                    unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but the config "
                    f"expects {tuple(expected[name])}: config.json and the weights do not match"
                )
            ready[name] = tensor.to(device=device_for(name), dtype=dtype)
            seen.add(name)
        model.load_state_dict(ready, strict=False, assign=True)
        del shard, ready
    if progress is not None:
        progress(total, total)  # the files' headers are no tensors
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:6])}")
        raise CheckpointError(f"checkpoint does not match the Qwen-VL layout: {'; '.join(parts)}")


def load_pretrained(
    folder: str | Path,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    progress: LoadProgress | None = None,
):
    """Load a model from an official-layout folder onto ``device`` or an accelerate ``device_map``.

    ``progress(bytes_loaded, total_bytes)`` is called after every tensor (default: the callback
    of an enclosing ``load_progress``).
    """
    progress = progress or _load_progress.get()
    folder = Path(folder)
    config = load_config(folder)
    model = build_model(config, dtype, "meta")
    files = checkpoint_files(folder)
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        if device_map == "auto":
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
        resolved = dict(device_map)

        def device_for(name: str):
            best = max((k for k in resolved if k == "" or name == k or name.startswith(k + ".")), key=len)
            dev = resolved[best]
            return f"cuda:{dev}" if isinstance(dev, int) else dev

        load_weights(model, files, dtype, device_for, progress)
        model = dispatch_model(model, device_map=resolved)
    else:
        target = torch.device(device) if device is not None else default_device()
        load_weights(model, files, dtype, lambda _: target, progress)
    model.eval()
    model.model_dir = str(folder)
    load_generation_config(model, folder)
    return model


def load_generation_config(model, folder: Path) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))


def save_official(model, out_dir: str | Path, torch_dtype: torch.dtype, max_shard_size: str = "5GB",
                  add_auto_map: bool = False) -> None:
    """Write weights (safetensors shards + index) and the official config.json to ``out_dir``."""
    from .config import official_config_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_sharded_safetensors(model.state_dict(), out_dir, torch_dtype, max_shard_size)
    cfg = official_config_dict(model.config, DTYPE_NAMES[torch_dtype], add_auto_map)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_sharded_safetensors(state: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
                              max_shard_size: str | int = "5GB") -> None:
    """Safetensors shards of at most ``max_shard_size`` (+ index when there are several)."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * torch.tensor([], dtype=dtype).element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    total = len(shards)
    weight_map = {}
    total_size = 0
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        data = {k: v.detach().to("cpu", dtype).contiguous() for k, v in shard.items()}
        save_file(data, str(out_dir / fname), metadata={"format": "pt"})
        total_size += sum(t.numel() * t.element_size() for t in data.values())
        weight_map.update({k: fname for k in data})
        del data
    if total > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path, names=AUX_FILES[1:]) -> None:
    """Copy tokenizer and generation files that a checkpoint folder needs beside its weights."""
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
