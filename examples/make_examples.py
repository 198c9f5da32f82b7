r"""Draw the example images and write the example datasets (no downloads, Pillow only).

    python examples/make_examples.py [OUT_DIR] [--colour-task]     # default OUT_DIR: examples/data

writes ``OUT_DIR/images/*.png`` and ``OUT_DIR/train.jsonl``: four conversations, multi-turn,
several pictures in a turn, turns and rows without pictures, in the three row formats
``vlswift sft`` reads (conversations, messages, query/response/history). Fine-tune on it, then
ask the same questions:

    vlswift sft --model_id_or_path MODEL_DIR --dataset examples/data/train.jsonl --dataset_test_ratio 0
    vlswift infer --ckpt_dir output/qwen-vl-chat/v0-.../last --val_dataset examples/data/train.jsonl

On a CPU, with a tiny random model instead of Qwen-VL-Chat: its patches and output head need
the two flags below (with the defaults LoRA stays near loss 5), and the options the tests use
memorise the four rows (loss under 0.05) in under a minute; infer then repeats every reply:

    python scripts/make_tiny_checkpoint.py tiny --patch_size 28 --head_std 0.5
    vlswift sft --model_id_or_path tiny --dataset examples/data/train.jsonl --dataset_test_ratio 0 \
        --batch_size 4 --max_steps 60 --learning_rate 1e-2 --lora_rank 16 --lora_alpha 64 --lora_dropout_p 0
    vlswift infer --ckpt_dir output/qwen-vl-chat/v0-.../last --val_dataset examples/data/train.jsonl --do_sample false

``--colour-task`` also writes ``colours_train.jsonl`` / ``colours_test.jsonl``: "Colour?" about
one shape of random kind, size and place, so the answer is only in the picture; the test rows
use unseen pictures (:func:`make_colour_task`; ``blank=True`` writes blank pictures instead).

The tests run these functions to build their data in a temporary folder.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20),
           "cyan": (20, 200, 210), "black": (20, 20, 20)}
# The colour task's answers: no word repeats a letter, so a tiny byte-level model that has
# learned the colour does not stumble over "yel-l-l-ow" (the task tests seeing, not spelling).
TASK_COLOURS = ("red", "blue", "cyan", "black")
SHAPES = ("circle", "square", "triangle")
SIZE = 224


def draw_shape(path: Path, shape: str, colour: str, rng: random.Random | None = None) -> Path:
    """A white picture with one filled shape; ``rng`` moves and resizes it (centred and large without)."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = rng.randint(40, 90) if rng else 80
    cx = rng.randint(r, SIZE - r) if rng else SIZE // 2
    cy = rng.randint(r, SIZE - r) if rng else SIZE // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def make_examples(out_dir: str | Path) -> Path:
    """The multi-turn, multi-image example dataset; returns the path of ``train.jsonl``."""
    out = Path(out_dir)
    for name in ("red_circle", "blue_square", "green_triangle", "yellow_circle"):
        colour, shape = name.split("_")
        draw_shape(out / "images" / f"{name}.png", shape, colour)

    def img(name: str, n: int) -> str:
        return f"Picture {n}:<img>images/{name}.png</img>\n"

    rows = [
        # Two turns, one picture each.
        {"conversations": [
            {"from": "user", "value": img("red_circle", 1) + "What is this?"},
            {"from": "assistant", "value": "A red circle."},
            {"from": "user", "value": img("blue_square", 2) + "And this one?"},
            {"from": "assistant", "value": "A blue square."},
        ]},
        # Two pictures in one turn, a follow-up without a picture, a system prompt.
        {"messages": [
            {"role": "system", "content": "You describe pictures briefly."},
            {"role": "user", "content": img("green_triangle", 1) + img("yellow_circle", 2) + "Compare them."},
            {"role": "assistant", "content": "Green triangle, yellow circle."},
            {"role": "user", "content": "Which is round?"},
            {"role": "assistant", "content": "The yellow one."},
        ]},
        # A text-only history, then a picture.
        {"query": img("blue_square", 1) + "Colour?", "response": "Blue.",
         "history": [["Hello!", "Hi! Show me a picture."]]},
        # No picture at all (sharegpt-style roles).
        {"conversations": [
            {"from": "human", "value": "What can you do?"},
            {"from": "gpt", "value": "I describe pictures."},
        ]},
    ]
    return write_jsonl(out / "train.jsonl", rows)


def make_colour_task(out_dir: str | Path, n_train: int = 48, n_test: int = 16, seed: int = 0,
                     blank: bool = False) -> tuple[Path, Path]:
    """``colours_train.jsonl`` and ``colours_test.jsonl``: one shape per picture, the reply is its colour.

    Shapes, sizes and places vary, so only the colour predicts the answer; test pictures are
    new ones. With ``blank`` every picture is plain white (the answer is nowhere in the input).
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    colours = list(TASK_COLOURS)
    tag = "blank" if blank else "shape"
    files = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            colour = colours[i % len(colours)]
            path = out / "images" / f"{tag}_{split}_{i}.png"
            if blank:
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(path)
            else:
                draw_shape(path, rng.choice(SHAPES), colour, rng)
            rows.append({"query": f"Picture 1:<img>images/{path.name}</img>\nColour?", "response": colour})
        rng.shuffle(rows)
        files.append(write_jsonl(out / f"colours_{split}{'_blank' if blank else ''}.jsonl", rows))
    return files[0], files[1]


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    target = Path(folders[0]) if folders else Path(__file__).parent / "data"
    print(make_examples(target))
    if "--colour-task" in flags:
        print(*make_colour_task(target), sep="\n")
