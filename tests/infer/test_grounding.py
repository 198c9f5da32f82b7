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


def test_draw_boxes_through_infer_main(infer_workdir, tmp_path, monkeypatch, capsys):
    """``--draw_boxes true`` in the chat: the reply's box is drawn on the query's image, saved
    beside the result jsonl, and its path printed."""
    import io
    import re

    from vlswift import api
    from vlswift.infer.args import InferArguments
    from vlswift.infer.main import infer_main

    gray = (90, 90, 90)
    image = tmp_path / "gray.png"
    Image.new("RGB", (500, 500), gray).save(image)
    reply = "<ref>x</ref><box>(10,20),(300,400)</box>"
    queries = []

    def answer_with_a_box(model, template, query, history=None, system=None, generation_config=None,
                          should_stop=None):
        queries.append(query)
        yield reply, (history or []) + [[query, reply]]

    monkeypatch.setattr(api, "inference_stream", answer_with_a_box)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Picture 1:<img>{image}</img>\nWhere is x?#\n"))
    result = tmp_path / "chat.jsonl"
    out = infer_main(InferArguments(model_id_or_path=str(infer_workdir), draw_boxes=True, result_path=str(result)))
    assert queries == [f"Picture 1:<img>{image}</img>\nWhere is x?"]
    assert [r["response"] for r in out["result"]] == [reply]
    printed = re.findall(r"^\[boxes\] (.+)$", capsys.readouterr().out, re.M)
    assert printed == [str(tmp_path / "chat-boxes-1.png")]
    drawn = Image.open(printed[0])
    assert drawn.size == (500, 500)
    # 0..1000 coordinates on a 500x500 image: x 5..150, y 10..200; the outline is the first color.
    for xy in [(5, 100), (150, 100), (75, 200), (100, 10)]:
        assert drawn.getpixel(xy) == COLORS[0], xy
    for xy in [(75, 120), (300, 300), (2, 100), (160, 100), (75, 210)]:
        assert drawn.getpixel(xy) == gray, xy
    assert Image.open(image).getpixel((5, 100)) == gray  # the user's image is not drawn on
