"""``vlswift export --merge_lora true``: fold a LoRA checkpoint into a standalone model.

The merge streams: the base checkpoint is read one tensor at a time, each weight a LoRA
targets gets ``scale * B @ A`` added in float32, and the result goes straight into the output
safetensors shard (whose header is planned up front from the base tensors' names and shapes).
Peak host memory is about the adapter plus a few copies of the largest tensor (plus the base
shard's pages the kernel keeps mapped), whatever the model size; no model is built, so it runs
on a CPU-only machine.

Only the standard library is imported at module level so ``vlswift --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "base_model.model."
# LoraConfig fields whose adapters do not merge as W + scale * B @ A; a truthy value is refused.
UNSUPPORTED_LORA_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
# init_lora_weights methods that rewrite the base weights, so the adapter only fits that rewritten base.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class ExportError(ValueError):
    """An export that cannot be done, with the reason (and what to do) in one line."""


@dataclass
class ExportArguments:
    """Options of ``vlswift export``; ``export_main(ExportArguments(...))`` is the same as the CLI."""

    ckpt_dir: str | None = field(default=None, metadata={
        "help": "The LoRA checkpoint to merge (a checkpoint-<step> folder of `vlswift sft --sft_type lora`)."})
    merge_lora: bool = field(default=False, metadata={
        "help": "Merge the LoRA weights into the base model and save a standalone model (the export vlswift does)."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where to write the merged model (default: <ckpt_dir>-merged beside the checkpoint)."})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest safetensors shard, e.g. 5GB, 500MB (a single larger tensor gets a shard of its own)."})
    dtype: str | None = field(default=None, metadata={
        "help": "bf16, fp16 or fp32 for the saved weights (default or AUTO: the base checkpoint's torch_dtype)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only once the new one is complete)."})
    add_remote_code_map: bool = field(default=False, metadata={
        "help": "Add the official auto_map to config.json (and copy the base's *.py remote code files) so "
                "transformers' trust_remote_code loading of the official code works on the merged folder."})
    model_id_or_path: str | None = field(default=None, metadata={
        "help": "The base model folder or hub id (default: the one the checkpoint's sft_args.json names)."})

    def __post_init__(self) -> None:
        if not self.ckpt_dir:
            raise ExportError("--ckpt_dir is required: the LoRA checkpoint folder to merge")


def export_main(args: ExportArguments) -> Path:
    """Run ``vlswift export``: merge ``args.ckpt_dir`` and return the merged folder."""
    if not args.merge_lora:
        raise ExportError("nothing to export: pass --merge_lora true (merging a LoRA checkpoint into a "
                          "standalone model is the export vlswift does)")
    out = merge_lora_checkpoint(
        args.ckpt_dir, args.output_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, add_remote_code_map=args.add_remote_code_map, base_dir=args.model_id_or_path,
    )
    print(f"merged LoRA checkpoint saved to {out}")
    return out


def merge_lora_checkpoint(
    ckpt_dir: str | Path,
    output_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    add_remote_code_map: bool = False,
    base_dir: str | Path | None = None,
) -> Path:
    """Write base model + LoRA deltas as a full checkpoint in the official layout; return its folder.

    ``output_dir`` defaults to ``<ckpt_dir>-merged`` beside the checkpoint; ``dtype`` (bf16, fp16,
    fp32, a torch dtype, or None/AUTO for the base's ``torch_dtype``) is the saved weights' dtype;
    ``base_dir`` overrides the base model named in the checkpoint's ``sft_args.json``. The folder
    appears only when complete; an existing one is refused unless ``overwrite``.
    """
    from .checkpoint import read_sft_args
    from .models.config import read_config_dict
    from .models.loading import checkpoint_files, parse_size

    ckpt = Path(ckpt_dir).expanduser()
    check_lora_ckpt_dir(ckpt, str(ckpt_dir))
    ckpt = ckpt.resolve()
    adapter_config = read_adapter_config(ckpt)
    sft_args = read_sft_args(ckpt)
    model_type = sft_args.get("model_type") or "qwen-vl-chat"
    base = find_base_dir(ckpt, sft_args, adapter_config, model_type, base_dir)
    target = Path(output_dir).expanduser().resolve() if output_dir else default_output_dir(ckpt)
    if target in (ckpt, base) or target in ckpt.parents or target in base.parents:
        raise ExportError(f"--output_dir {target} would overwrite the checkpoint or the base model it is "
                          "merged from; choose another folder")
    check_target(target, overwrite)
    try:
        limit = parse_size(max_shard_size)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ExportError(f"--max_shard_size {max_shard_size!r}: expected a size such as 5GB, 500MB or 100KB")

    base_config = read_config_dict(base)
    missing = [n for n in ("qwen.tiktoken", "tokenizer_config.json") if not (base / n).is_file()]
    if missing:
        raise ExportError(f"base model {base} has no {' or '.join(missing)}: the merged folder would have no "
                          "tokenizer; pass a complete base folder with --model_id_or_path")
    files = checkpoint_files(base)
    specs = read_tensor_specs(files)
    out_dtype = output_dtype(dtype, base_config, specs)
    adapter = LoraAdapter.read(ckpt, adapter_config, specs)

    with staged_folder(target, overwrite) as tmp:
        write_merged_shards(files, specs, adapter, out_dtype, limit, tmp)
        write_merged_metadata(tmp, base, ckpt, base_config, sft_args, model_type, out_dtype, add_remote_code_map)
    logger.info("merged %s into %s", ckpt, target)
    return target


def default_output_dir(ckpt_dir: str | Path) -> Path:
    """Where a checkpoint's merge goes unless told otherwise: ``<ckpt_dir>-merged`` beside it."""
    ckpt = Path(ckpt_dir).expanduser().resolve()
    return ckpt.with_name(ckpt.name + "-merged")


def check_lora_ckpt_dir(ckpt: Path, given: str) -> None:
    """Refuse a --ckpt_dir that is missing or holds no LoRA adapter, saying what it is instead."""
    if not ckpt.is_dir():
        raise ExportError(f"--ckpt_dir {given}: no such folder")
    if (ckpt / "adapter_config.json").is_file():
        return
    if (ckpt / "config.json").is_file():
        raise ExportError(f"--ckpt_dir {given} is already a full model (config.json, no adapter_config.json): "
                          "there is no LoRA to merge; use it directly with `vlswift infer --ckpt_dir`")
    from .train.checkpointing import find_resume_checkpoint

    # A run folder (output/<model_type>/vN-...): name its newest complete checkpoint, as sft resume takes.
    newest = find_resume_checkpoint(ckpt)
    if newest != ckpt.resolve():
        suggestion = Path(given) / newest.name
        if (newest / "adapter_config.json").is_file():
            raise ExportError(f"--ckpt_dir {given} is a run folder, not a checkpoint: did you mean {suggestion}?")
        raise ExportError(f"--ckpt_dir {given} is the run folder of a full fine-tune: its newest checkpoint "
                          f"{suggestion} is already a full model; use it directly with `vlswift infer --ckpt_dir`")
    raise ExportError(f"--ckpt_dir {given} is not a LoRA checkpoint (no adapter_config.json): pass a "
                      "checkpoint-<step> folder of a `vlswift sft --sft_type lora` run")


def find_base_dir(ckpt: Path, sft_args: dict, adapter_config: dict, model_type: str,
                  base_dir: str | Path | None) -> Path:
    """The local base model folder: ``base_dir``, else the one sft_args.json (or adapter_config.json) names."""
    from .models.loading import CheckpointError, resolve_model_dir

    named_in = "--model_id_or_path"
    if base_dir is None:
        base_dir, named_in = sft_args.get("model_id_or_path"), "sft_args.json"
    if not base_dir:
        base_dir = adapter_config.get("base_model_name_or_path")
        named_in = "adapter_config.json"
    if not base_dir:
        raise ExportError(f"{ckpt}: neither sft_args.json nor adapter_config.json names the base model; "
                          "pass --model_id_or_path BASE_DIR")
    try:
        return resolve_model_dir(model_type, str(base_dir)).resolve()
    except CheckpointError as e:
        raise ExportError(f"base model {base_dir} (from {named_in}): {e}; pass --model_id_or_path BASE_DIR") from None


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"output {target} exists and is not a folder")
    if target.exists() and not overwrite:
        raise ExportError(f"output folder {target} already exists; pass --overwrite true to replace it "
                          "(or --output_dir to write elsewhere)")


@contextmanager
def staged_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside ``target`` that becomes ``target`` (via ``os.replace``) only on success.

    Its files are flushed to disk before the rename and the rename before an old ``target`` is
    deleted, so a power loss leaves the old folder or the complete new one, never empty files.
    """
    from .train.checkpointing import fsync_path, sync_tree  # torch is loaded by then: the merge uses it

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_folder(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        sync_tree(tmp)
        if not target.exists():
            os.replace(tmp, target)
            fsync_path(target.parent)
            return
        check_target(target, overwrite)  # it may have appeared while we were writing
        # A folder cannot be renamed onto a non-empty one: move the old one aside first.
        old = fresh_folder(target.parent, f".{target.name}.old-")
        os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old / target.name, target)
            raise
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><random>`` with the umask's mode, as ``checkpoint-<step>`` gets.

    Not ``tempfile.mkdtemp``: its 0700 would travel with the rename and leave the merged model
    unreadable to the other users and serving processes that can read the checkpoint beside it.
    """
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def output_dtype(dtype: str | torch.dtype | None, base_config: dict, specs: list[TensorSpec]) -> torch.dtype:
    """The saved weights' dtype: ``dtype``, else the base config's ``torch_dtype``, else its weights' dtype."""
    import torch

    from .models.loading import resolve_dtype

    if dtype is None or (isinstance(dtype, str) and dtype.upper() == "AUTO"):
        dtype = base_config.get("torch_dtype")
        if dtype not in ("bfloat16", "float16", "float32"):
            dtype = next((s.dtype for s in specs if s.dtype.is_floating_point), torch.float32)
    out = resolve_dtype(dtype)
    if out not in (torch.bfloat16, torch.float16, torch.float32):
        raise ExportError(f"dtype {dtype}: expected bf16, fp16 or fp32")
    return out


# ---- the adapter ---------------------------------------------------------------------------------


@dataclass
class LoraPair:
    a: torch.Tensor  # [r, in]   (lora_embedding_A: [r, num_embeddings])
    b: torch.Tensor  # [out, r]  (lora_embedding_B: [dim, r])
    scale: float
    transpose: bool  # the delta is (B @ A).T: fan_in_fan_out layers and embeddings

    def delta(self) -> torch.Tensor:
        d = (self.b.float() @ self.a.float()) * self.scale
        return d.T if self.transpose else d


@dataclass
class LoraAdapter:
    """A peft LoRA adapter as base tensor name -> delta (``loras``) or full replacement (``replaced``)."""

    loras: dict[str, LoraPair]
    replaced: dict[str, torch.Tensor]

    @classmethod
    def read(cls, ckpt: Path, config: dict, specs: list[TensorSpec]) -> LoraAdapter:
        """Read the adapter weights of ``ckpt`` and check them against the base tensors ``specs``."""
        weights = read_adapter_weights(ckpt)
        shapes = {s.name: s.shape for s in specs}
        halves: dict[str, dict[str, torch.Tensor]] = {}
        replaced: dict[str, torch.Tensor] = {}
        for key, tensor in weights.items():
            if not key.startswith(ADAPTER_PREFIX):
                raise ExportError(f"{ckpt}: adapter key {key} does not start with {ADAPTER_PREFIX!r} "
                                  "(not a peft LoRA adapter of the whole model)")
            name = key[len(ADAPTER_PREFIX):]
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
            if m:
                halves.setdefault(m[1], {})[m[2]] = tensor
            elif "lora_magnitude_vector" in name:
                raise ExportError(f"{ckpt}: the adapter uses DoRA ({key}); only plain LoRA can be merged")
            elif ".lora_" in name:
                raise ExportError(f"{ckpt}: adapter key {key} is not a plain LoRA weight; only lora_A/lora_B "
                                  "(and lora_embedding_A/B) can be merged")
            else:
                # modules_to_save and trained biases (bias="all"/"lora_only") replace the base tensor.
                replaced[name.replace(".base_layer.", ".")] = tensor
        loras = {}
        for module, parts in halves.items():
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
                (parts.get("lora_A.weight"), parts.get("lora_B.weight"))
            if a is None or b is None:
                raise ExportError(f"{ckpt}: adapter has only one of lora_A/lora_B for {module}: the file is incomplete")
            loras[f"{module}.weight"] = lora_pair(ckpt, config, module, a, b, embedding)
        unknown = sorted(n for n in [*loras, *replaced] if n not in shapes)
        if unknown:
            more = " …" if len(unknown) > 4 else ""
            raise ExportError(f"{ckpt}: adapter weights for {', '.join(unknown[:4])}{more} match no tensor of the "
                              "base model: was it trained on another base? pass the right one with --model_id_or_path")
        for name, pair in loras.items():
            out = pair.a.shape[1] if pair.transpose else pair.b.shape[0]
            inp = pair.b.shape[0] if pair.transpose else pair.a.shape[1]
            if len(shapes[name]) != 2:
                raise ExportError(f"{ckpt}: LoRA on {name} (shape {tuple(shapes[name])}) is not supported: "
                                  "only linear and embedding layers can be merged")
            if tuple(shapes[name]) != (out, inp):
                raise ExportError(f"{ckpt}: LoRA for {name} has shape {(out, inp)} but the base tensor is "
                                  f"{tuple(shapes[name])}: the adapter was trained on another base model")
        for name, tensor in replaced.items():
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ExportError(f"{ckpt}: adapter tensor {name} has shape {tuple(tensor.shape)} but the base "
                                  f"tensor is {tuple(shapes[name])}: the adapter was trained on another base model")
        return cls(loras, replaced)

    def merge(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged value of base tensor ``name`` (float32 where LoRA applies, else as given)."""
        import torch

        tensor = self.replaced.get(name, tensor)
        pair = self.loras.get(name)
        if pair is None:
            return tensor
        merged = tensor.to(torch.float32, copy=True)
        merged += pair.delta()
        return merged


def read_adapter_config(ckpt: Path) -> dict:
    """``adapter_config.json``, refusing what does not merge as W + scale * B @ A."""
    path = ckpt / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ExportError(f"{path}: peft_type {peft_type!r}; only LoRA adapters can be merged")
    for key, what in UNSUPPORTED_LORA_FEATURES.items():
        if config.get(key):
            raise ExportError(f"{path}: the adapter uses {what}, which this merge does not support")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise ExportError(f"{path}: init_lora_weights={init!r} rewrote the base weights, so the adapter does "
                          "not fit the original base; convert it to a plain LoRA with peft first")
    return config


def read_adapter_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    import torch

    if (ckpt / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "adapter_model.safetensors"))
    if (ckpt / "adapter_model.bin").is_file():
        return torch.load(ckpt / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ExportError(f"{ckpt}: has adapter_config.json but no adapter_model.safetensors (or .bin): "
                      "the checkpoint is incomplete")


def lora_pair(ckpt: Path, config: dict, module: str, a, b, embedding: bool) -> LoraPair:
    """A LoRA pair with peft's scale: alpha / r (alpha / sqrt(r) with rslora); rank from A's shape."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ExportError(f"{ckpt}: LoRA weights of {module} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                          "expected A [r, in] and B [out, r] (convolution LoRA is not supported)")
    r = a.shape[0]
    alpha = config.get("lora_alpha", 8)
    # alpha_pattern keys match a module name's suffix as in peft.utils.other.get_pattern_key (rank_pattern
    # needs nothing: r is A's row count).
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return LoraPair(a, b, scale, transpose=embedding or bool(config.get("fan_in_fan_out")))


# ---- streaming shards ----------------------------------------------------------------------------


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_tensor_specs(files: list[Path]) -> list[TensorSpec]:
    """Names, shapes and dtypes of a checkpoint's tensors, in file order, without reading the data."""
    import torch
    from safetensors import safe_open

    specs = []
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    specs.append(TensorSpec(name, tuple(sl.get_shape()), safetensors_dtype(sl.get_dtype())))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            specs += [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
            del state
    return specs


SAFETENSORS_DTYPE_CODES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def safetensors_dtype(code: str) -> torch.dtype:
    import torch

    if code not in SAFETENSORS_DTYPE_CODES:
        raise ExportError(f"base checkpoint holds a tensor of dtype {code}, which the merge does not handle")
    return getattr(torch, SAFETENSORS_DTYPE_CODES[code])


def safetensors_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, n in SAFETENSORS_DTYPE_CODES.items() if n == name)


def plan_shards(specs: list[TensorSpec], out_dtype: torch.dtype, limit: int) -> list[list[TensorSpec]]:
    """Group the output tensors (floats in ``out_dtype``) into shards of at most ``limit`` bytes."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        out = TensorSpec(spec.name, spec.shape, out_dtype if spec.dtype.is_floating_point else spec.dtype)
        nbytes = tensor_nbytes(out)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += nbytes
    return shards


def tensor_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * spec.dtype.itemsize


def iter_base_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a checkpoint one tensor at a time, in :func:`read_tensor_specs` order.

    Unlike ``loading.iter_shards`` no whole shard is copied into memory: safetensors are read
    tensor by tensor and ``.bin`` files are memory-mapped.
    """
    import torch
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name)


def write_merged_shards(files: list[Path], specs: list[TensorSpec], adapter: LoraAdapter,
                        out_dtype: torch.dtype, limit: int, out_dir: Path) -> None:
    """Stream the base tensors through the merge into output shards (+ index when several)."""
    import torch

    shards = plan_shards(specs, out_dtype, limit)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    tensors = iter_base_tensors(files)
    for fname, shard in zip(names, shards):
        logger.info("writing %s (%d tensors)", fname, len(shard))
        with open(out_dir / fname, "wb") as f:
            f.write(safetensors_header(shard))
            for spec in shard:
                name, tensor = next(tensors)
                data = adapter.merge(name, tensor).to(spec.dtype).contiguous().reshape(-1).view(torch.uint8)
                if name != spec.name or data.numel() != tensor_nbytes(spec):
                    raise RuntimeError(f"base tensors changed while merging: got {name} ({data.numel()} bytes), "
                                       f"planned {spec.name} ({tensor_nbytes(spec)} bytes)")
                f.write(data.numpy())
                del tensor, data
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(tensor_nbytes(s) for shard in shards for s in shard)},
            "weight_map": {s.name: fname for fname, shard in zip(names, shards) for s in shard},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def safetensors_header(shard: list[TensorSpec]) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``shard`` in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        end = offset + tensor_nbytes(spec)
        header[spec.name] = {"dtype": safetensors_code(spec.dtype), "shape": list(spec.shape),
                             "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to keep the data 8-aligned
    return struct.pack("<Q", len(raw)) + raw


# ---- config, tokenizer and run files -------------------------------------------------------------


def write_merged_metadata(out: Path, base: Path, ckpt: Path, base_config: dict, sft_args: dict,
                          model_type: str, out_dtype: torch.dtype, add_remote_code_map: bool) -> None:
    """config.json (the base's official keys), tokenizer + generation files, and sft_args.json."""
    from .models.config import load_config, official_config_dict
    from .models.loading import DTYPE_NAMES, DTYPES, copy_aux_files

    official = official_config_dict(load_config(base), DTYPE_NAMES[out_dtype], add_remote_code_map)
    config = {k: v for k, v in official.items() if k in base_config or k in ("torch_dtype", "auto_map")}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    copy_aux_files(base, out)
    copy_aux_files(ckpt, out, ("generation_config.json",))  # swift saves the run's generation config there
    if add_remote_code_map:
        copy_aux_files(base, out, [p.name for p in sorted(base.glob("*.py")) + sorted(base.glob("*.ttf"))])
    short = {v: k for k, v in DTYPES.items()}[out_dtype]
    args = dict(sft_args, model_type=model_type, sft_type="full", dtype=short)
    args["merged_from"] = {"ckpt_dir": str(ckpt), "model_id_or_path": str(base)}
    (out / "sft_args.json").write_text(json.dumps(args, indent=2, ensure_ascii=False) + "\n")
