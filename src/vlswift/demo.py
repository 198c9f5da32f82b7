"""The offline demo: a tiny random Qwen-VL checkpoint, a drawn image, one streamed chat turn."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def draw_example_image(path: Path) -> Path:
    """A 448x448 picture with a red circle and a blue square (no download needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 60, 200, 220), fill=(220, 30, 30))
    draw.rectangle((250, 240, 400, 390), fill=(30, 60, 220))
    img.save(path)
    return path


def run_demo(query: str = "What is in this picture?", folder: str | None = None) -> str:
    """Build (once) a tiny checkpoint in the official layout and chat about the example image."""
    from rich.console import Console

    from .api import get_model_tokenizer, get_template, inference_stream
    from .models.tiny import make_tiny_checkpoint

    console = Console(highlight=False)
    root = Path(folder or os.environ.get("VLSWIFT_DEMO_DIR", Path.home() / ".cache" / "vlswift" / "demo"))
    ckpt = root / "tiny-qwen-vl"
    if not (ckpt / "config.json").is_file():
        console.print(f"[dim]building a tiny random checkpoint (official layout) in {ckpt}[/]")
        make_tiny_checkpoint(ckpt, seed=0)
    image = draw_example_image(root / "example.png")

    model, tokenizer = get_model_tokenizer("qwen-vl-chat", "fp32", {"device_map": "cpu"}, model_id_or_path=str(ckpt))
    template = get_template("qwen", tokenizer)
    model.generation_config.max_new_tokens = 32
    model.generation_config.do_sample = False
    prompt = f"Picture 1:<img>{image}</img>\n{query}"
    console.print(f"[bold]<<<[/] {prompt}")
    shown = ""
    response = ""
    for response, _ in inference_stream(model, template, prompt):
        sys.stdout.write(response[len(shown):])
        sys.stdout.flush()
        shown = response
    print()
    console.print("-" * 50)
    console.print(
        "[dim]The weights are random, so the reply is noise. With real weights: "
        "vlswift infer --model_type qwen-vl-chat [--model_id_or_path DIR][/]"
    )
    return response
