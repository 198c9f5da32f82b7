"""Draw Qwen-VL grounding boxes (``<ref>label</ref><box>(x1,y1),(x2,y2)</box>``) on an image.

Qwen-VL writes box corners on a 0..1000 scale of the image's width and height. Labels use
Pillow's bundled default font, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
          (240, 50, 230), (128, 128, 0))
SCALE = 1000


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each ``{'box': (x1, y1, x2, y2), 'ref': label?}`` drawn and labelled."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    line = max(2, round(min(w, h) / 200))
    font = _font(max(12, round(min(w, h) / 30)))
    for i, item in enumerate(boxes):
        color = COLORS[i % len(COLORS)]
        x1, y1, x2, y2 = item["box"]
        left, right = sorted((x1 * w / SCALE, x2 * w / SCALE))
        top, bottom = sorted((y1 * h / SCALE, y2 * h / SCALE))
        draw.rectangle((left, top, right, bottom), outline=color, width=line)
        label = item.get("ref")
        if label:
            tl, tt, tr, tb = draw.textbbox((0, 0), label, font=font)
            tw, th = tr - tl, tb - tt
            # Above the box when there is room, else just inside its top edge.
            ty = top - th - 2 * line if top - th - 2 * line >= 0 else top
            draw.rectangle((left, ty, left + tw + 2 * line, ty + th + 2 * line), fill=color)
            draw.text((left + line - tl, ty + line - tt), label, fill=(255, 255, 255), font=font)
    return out


def save_boxes_image(image_src: str, boxes: Sequence[dict[str, Any]], out_path: str | Path) -> Path:
    """Load ``image_src`` (path or URL), draw ``boxes`` on it and save it to ``out_path`` (PNG)."""
    from ..media import load_image

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(load_image(image_src), boxes).save(out_path)
    return out_path
