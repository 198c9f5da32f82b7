"""What bench_infer.py and bench_sft.py share: the random real-shape model, prompts, ceilings."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlswift.models.config import QWenConfig, load_config  # noqa: E402
from vlswift.models.loading import build_model  # noqa: E402
from vlswift.models.visual import sincos_pos_embed_2d  # noqa: E402

# Where the real config.json is: beside the repo, or carried into .carry/ on the device machine.
DEFAULT_CONFIGS = (ROOT.parent / "shared" / "qwen-vl-chat" / "config.json", ROOT / ".carry" / "config.json")
GB = 1e9


def default_config_path() -> str | None:
    return next((str(p) for p in DEFAULT_CONFIGS if p.is_file()), None)


def read_config(path: str) -> QWenConfig:
    return load_config(Path(path).parent) if Path(path).name == "config.json" else load_config(path)


@torch.no_grad()
def random_model(config: QWenConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The model of ``config`` with random weights, built on the meta device and filled in place.

    Linear/conv/embedding weights ~ N(0, 0.02), norms 1, biases 0; the resampler's fixed sin-cos
    table as the real model has it.
    """
    torch.manual_seed(seed)
    model = build_model(config, dtype, "meta").to(dtype).to_empty(device=device)
    for name, p in model.named_parameters():
        if name.endswith("attn_pool.pos_embed"):
            p.copy_(sincos_pos_embed_2d(p.size(1), int(math.isqrt(p.size(0)))))
        elif p.dim() == 1:
            is_norm_weight = name.split(".")[-2].startswith("ln") and name.endswith("weight")
            p.fill_(1.0 if is_norm_weight else 0.0)
        else:
            p.normal_(0.0, 0.02)
    model.eval()
    return model


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def today() -> str:
    return datetime.date.today().isoformat()


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def cuda_time(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of ``fn()`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_GBps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (as the anchors do)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), warmup=3, reps=20)
    del src, dst
    return 2 * nbytes / t / GB


def matmul_TFLOPs(n: int = 8192) -> float:
    """bf16 n x n x n matrix product on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, reps=10)
    del a, b
    return 2 * n**3 / t / 1e12


def image_prompt(config: QWenConfig, length: int, generator: torch.Generator, text_vocab: int = 151643) -> list[int]:
    """``length`` ids: random text, one ``<img>`` + 256 ``<imgpad>`` + ``</img>`` span, random text."""
    start = config.visual["image_start_id"]
    span = [start] + [start + 2] * 256 + [start + 1]
    n_text = length - len(span)
    before = torch.randint(0, text_vocab, (n_text // 2,), generator=generator).tolist()
    after = torch.randint(0, text_vocab, (n_text - n_text // 2,), generator=generator).tolist()
    return before + span + after


def random_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """CLIP-normalised-looking pixels [n, 3, 448, 448] (float32, on the CPU like a loaded image)."""
    return torch.randn(n, 3, 448, 448, generator=generator)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def start_result(script: str, config_path: str | None) -> dict:
    """Check the machine and the config, then the result's header: device, date, command, torch,
    and the device's copy bandwidth and bf16 matmul peak, measured now."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    if config_path is None:
        raise SystemExit("no config.json found: pass --config")
    res: dict = {"device": device_name(), "date": today(), "command": command_line(), "torch": torch.__version__}
    res["copy_GBps_read_plus_write"] = round(copy_bandwidth_GBps(), 1)
    res["bf16_matmul_TFLOPs"] = round(matmul_TFLOPs(), 1)
    return res


def print_result(result: dict, out: str | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
