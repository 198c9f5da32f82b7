"""Image loading (paths, URLs, data URIs) and the pixels the official transform produces."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlswift import media
from vlswift.media import ImageLoadError, image_to_tensor, load_image, load_image_tensor


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    media.clear_image_cache()
    monkeypatch.setattr(media, "RETRY_BACKOFF_S", 0.0)


def _png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["a.png", "b.jpg", "c.png"])
def test_pixels_match_official_transform(golden_dir: Path, name: str) -> None:
    from safetensors.torch import load

    ref = load(gzip.decompress((golden_dir / "images" / f"pixels_{name}.safetensors.gz").read_bytes()))["pixels"]
    pixels = load_image_tensor(name, base_dir=golden_dir / "images")
    assert pixels.shape == (3, 448, 448) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, ref, atol=1e-5, rtol=0)


def test_relative_path_uses_cwd(golden_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(golden_dir)
    assert load_image("images/c.png").size == (96, 64)
    assert load_image("images/c.png").mode == "RGB"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"cannot load image nope\.png: file not found") as err:
        load_image_tensor("nope.png", base_dir=tmp_path)
    assert str(tmp_path / "nope.png") in str(err.value)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image("nope.png", base_dir=tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture\n")
    with pytest.raises(ImageLoadError, match=r"notes\.png: not an image file"):
        load_image_tensor("notes.png", base_dir=tmp_path)


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.png").write_bytes(_png_bytes((100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(str(tmp_path / "big.png"))


def test_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    img = load_image(uri)
    assert img.size == (8, 6) and img.getpixel((0, 0)) == (200, 30, 60)
    with pytest.raises(ImageLoadError, match=r"data:image/png;base64,\S*\.\.\.: not an image"):
        load_image("data:image/png;base64," + base64.b64encode(b"x" * 60).decode())


def test_exif_rotation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image("rotated.jpg", base_dir=tmp_path).size == (20, 40)


def test_cache_reloads_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes(color=(255, 0, 0)))
    first = load_image_tensor(str(path))
    path.write_bytes(_png_bytes(size=(9, 6), color=(0, 255, 0)))
    assert not torch.equal(first, load_image_tensor(str(path)))


class _Server:
    """A local HTTP server; ``routes`` maps a path to a list of (status, body) served in turn."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple[int, bytes]]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                answers = server.routes.get(self.path, [(404, b"")])
                status, body = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_url_is_downloaded_once(server: _Server) -> None:
    server.routes["/cat.png"] = [(200, _png_bytes())]
    first = load_image_tensor(server.url + "/cat.png")
    second = load_image_tensor(server.url + "/cat.png")
    torch.testing.assert_close(first, second)
    assert server.hits["/cat.png"] == 1
    torch.testing.assert_close(first, image_to_tensor(Image.open(io.BytesIO(_png_bytes()))))


def test_http_404(server: _Server) -> None:
    with pytest.raises(ImageLoadError, match=r"/missing\.png: HTTP 404") as err:
        load_image_tensor(server.url + "/missing.png")
    assert "\n" not in str(err.value)
    assert server.hits["/missing.png"] == 1  # a 4xx is not retried


def test_http_5xx_is_retried(server: _Server) -> None:
    server.routes["/flaky.png"] = [(503, b""), (200, _png_bytes())]
    assert load_image(server.url + "/flaky.png").size == (8, 6)
    server.routes["/down.png"] = [(500, b"")]
    with pytest.raises(ImageLoadError, match="HTTP 500, after 3 attempts"):
        load_image(server.url + "/down.png")
    assert server.hits == {"/flaky.png": 2, "/down.png": 3}


def test_download_size_cap(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "MAX_DOWNLOAD_BYTES", 10)
    server.routes["/big.png"] = [(200, _png_bytes())]
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(server.url + "/big.png")


def test_unreachable_host(server: _Server) -> None:
    url = server.url + "/x.png"
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(ImageLoadError, match=r"cannot reach host .*after 3 attempts") as err:
        load_image(url)
    # requests' message is longer than the reason may be: its end, the root cause, is kept.
    assert "Connection refused" in str(err.value) and "\n" not in str(err.value)


def test_long_reasons_are_cut_between_words() -> None:
    words = [f"word{i}" for i in range(100)]
    text = " ".join(words) + " (Caused by OSError('[Errno 111] Connection refused'))"
    short = media._one_line(ValueError(text))
    assert len(short) <= media.MAX_REASON_CHARS and "\n" not in short
    head, tail = short.split(" … ")
    assert text.startswith(head + " ") and text.endswith(" " + tail)
    assert tail.endswith("[Errno 111] Connection refused'))")
    assert media._one_line(ValueError("short\n  message")) == "short message"
    assert media._one_line(ValueError("")) == "ValueError"
