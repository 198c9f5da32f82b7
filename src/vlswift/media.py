"""All image loading: local paths, http(s) URLs and data URIs -> RGB PIL images -> model pixels.

Every failure is an :class:`ImageLoadError` with a one-line message naming the image, so a bad
row in a dataset or a typo in a chat query is reported where it is understood.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .messages import one_line

IMAGE_SIZE = 448
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
HTTP_TIMEOUT_S = (10.0, 30.0)  # (connect, read)
HTTP_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5  # doubled after each failed attempt
CACHE_SIZE = 64


class ImageLoadError(ValueError):
    """An image could not be loaded; ``image`` is the source as given, ``reason`` says why."""

    def __init__(self, image: str, reason: str):
        self.image = image
        self.reason = reason
        super().__init__(f"cannot load image {_short(image)}: {reason}")


def _short(src: str) -> str:
    # Data URIs can be megabytes long; the message must stay one readable line.
    return src[:48] + "..." if src.startswith("data:") and len(src) > 48 else src


MAX_REASON_CHARS = 200


def _one_line(err: BaseException, limit: int = MAX_REASON_CHARS) -> str:
    """``err`` as one line of at most ``limit`` characters (:func:`messages.one_line`)."""
    return one_line(str(err), limit) or type(err).__name__


def is_url(src: str) -> bool:
    """True for ``http://`` and ``https://`` sources."""
    return src.startswith(("http://", "https://"))


def resolve_source(src: str, base_dir: str | Path | None = None) -> str:
    """The canonical form of ``src``: URLs and data URIs unchanged, paths absolute.

    Relative paths are taken relative to ``base_dir`` (e.g. the dataset's folder) if given,
    else to the current folder; ``~`` is expanded.
    """
    if is_url(src) or src.startswith("data:"):
        return src
    path = Path(src).expanduser()
    if not path.is_absolute():
        path = Path(base_dir).expanduser() / path if base_dir is not None else Path.cwd() / path
    return os.path.abspath(path)


def _fetch(url: str) -> bytes:
    """Download ``url`` with a timeout, retries on connection errors and 5xx, and a size cap."""
    import requests

    delay = RETRY_BACKOFF_S
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        retry_reason = None
        try:
            with requests.get(url, stream=True, timeout=HTTP_TIMEOUT_S) as resp:
                if resp.status_code >= 500:
                    retry_reason = f"HTTP {resp.status_code}"
                elif resp.status_code >= 400:
                    raise ImageLoadError(url, f"HTTP {resp.status_code} {resp.reason or ''}".strip())
                else:
                    declared = int(resp.headers.get("Content-Length") or 0)
                    if declared > MAX_DOWNLOAD_BYTES:
                        raise ImageLoadError(url, f"too large ({declared} bytes > {MAX_DOWNLOAD_BYTES} byte limit)")
                    data = bytearray()
                    for chunk in resp.iter_content(chunk_size=1 << 16):
                        data += chunk
                        if len(data) > MAX_DOWNLOAD_BYTES:
                            raise ImageLoadError(url, f"too large (over the {MAX_DOWNLOAD_BYTES} byte limit)")
                    return bytes(data)
        except requests.exceptions.Timeout as e:
            retry_reason = f"timed out ({_one_line(e)})"
        except requests.exceptions.ConnectionError as e:
            retry_reason = f"cannot reach host ({_one_line(e)})"
        except requests.exceptions.RequestException as e:
            raise ImageLoadError(url, f"download failed ({_one_line(e)})") from e
        if attempt == HTTP_ATTEMPTS:
            raise ImageLoadError(url, f"{retry_reason}, after {HTTP_ATTEMPTS} attempts")
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError(uri, "expected a data URI of the form data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(uri, f"invalid base64 ({_one_line(e)})") from e


def _open(source: str | io.BytesIO, name: str) -> Image.Image:
    """Decode into an upright RGB image; PIL errors become :class:`ImageLoadError`."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img = ImageOps.exif_transpose(img)
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, f"too many pixels, refused as a possible decompression bomb "
                                   f"(limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(name, "not an image file (PIL cannot identify it)") from e
    except FileNotFoundError as e:
        raise ImageLoadError(name, f"file not found ({source})") from e
    except IsADirectoryError as e:
        raise ImageLoadError(name, f"is a folder, not an image file ({source})") from e
    except OSError as e:
        raise ImageLoadError(name, f"cannot decode ({_one_line(e)})") from e


def load_image(src: str, base_dir: str | Path | None = None) -> Image.Image:
    """Load an RGB image from a local path, an http(s) URL or a ``data:image/...;base64,`` URI.

    EXIF orientation is applied. Raises :class:`ImageLoadError` for a missing file, a non-image,
    an HTTP error, an unreachable host, a download over 20 MB or a decompression bomb.
    """
    resolved = resolve_source(src, base_dir)
    if is_url(resolved):
        return _open(io.BytesIO(_fetch(resolved)), src)
    if resolved.startswith("data:"):
        return _open(io.BytesIO(_decode_data_uri(resolved)), src)
    if not os.path.exists(resolved):
        raise ImageLoadError(src, f"file not found ({resolved})")
    return _open(resolved, src)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """The official Qwen-VL transform: bicubic resize to 448x448, scale to [0, 1], CLIP-normalise.

    Resizes the PIL image (not a tensor) because that is what the official torchvision
    ``Resize`` does on PIL input; returns float32 ``[3, 448, 448]``.
    """
    img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3)
    x = pixels.permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached_tensor(resolved: str, stamp: tuple[int, int] | None) -> torch.Tensor:
    # `stamp` (mtime, size) is only part of the key: a file rewritten in place is reloaded.
    return image_to_tensor(load_image(resolved))


def load_image_tensor(src: str, base_dir: str | Path | None = None) -> torch.Tensor:
    """Pixels ``[3, 448, 448]`` of ``src`` (see :func:`load_image`), cached.

    The last 64 distinct images are kept, keyed by URL or by absolute path plus modification
    time, so a multi-turn chat or a multi-epoch run does not download or decode them again.
    """
    resolved = resolve_source(src, base_dir)
    stamp = None
    if not is_url(resolved) and not resolved.startswith("data:"):
        try:
            st = os.stat(resolved)
        except OSError:
            raise ImageLoadError(src, f"file not found ({resolved})") from None
        stamp = (st.st_mtime_ns, st.st_size)
    try:
        # A copy, so a caller that edits its tensor in place cannot corrupt the cache.
        return _cached_tensor(resolved, stamp).clone()
    except ImageLoadError as e:
        if e.image == src:
            raise
        raise ImageLoadError(src, e.reason) from None


def clear_image_cache() -> None:
    """Forget cached image tensors (e.g. between tests)."""
    _cached_tensor.cache_clear()
