"""Grounding boxes drawn on images: Qwen-VL's 0..1000 coordinates, labels, corner order."""

from __future__ import annotations

from PIL import Image

from vlswift.infer.grounding import COLORS, draw_boxes

WHITE = (255, 255, 255)


def test_boxes_scale_to_the_image_and_keep_the_original():
    img = Image.new("RGB", (400, 200), "white")
    out = draw_boxes(img, [{"box": (500, 500, 250, 250)}, {"box": (0, 0, 1000, 1000), "ref": "all"}])
    assert img.getpixel((100, 75)) == WHITE  # the input is not drawn on
    # First box, corners given in reverse order: x 100..200, y 50..100.
    assert out.getpixel((100, 75)) == COLORS[0] and out.getpixel((200, 75)) == COLORS[0]
    assert out.getpixel((150, 75)) == WHITE
    # Second box: the image border, with its label inside the top edge (no room above).
    assert out.getpixel((0, 150)) == COLORS[1]
    label_area = [out.getpixel((x, y)) for x in range(4, 30) for y in range(3, 15)]
    assert label_area.count(COLORS[1]) > 50 and any(min(p) > 200 for p in label_area)


def test_grayscale_image_and_label_above_the_box():
    img = Image.new("L", (300, 300), 255)
    out = draw_boxes(img, [{"box": (500, 500, 900, 900), "ref": "the circle"}])
    assert out.mode == "RGB"
    label_area = [out.getpixel((x, y)) for x in range(150, 200) for y in range(120, 150)]
    assert label_area.count(COLORS[0]) > 50 and any(min(p) > 200 for p in label_area)  # filled, white text
