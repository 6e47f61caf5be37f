"""Turning an HTTP request into model input, and bad input into a clean 4xx.

A request carries images as the raw body (``image/*``), as multipart ``file`` parts, or as JSON
``{"image": b64}`` / ``{"images": [b64, ...]}``. Everything a client can get wrong raises
:class:`BadInput` with an HTTP status and a reason; nothing here may raise anything else for
bad bytes, so a malicious or broken request can never answer 5xx or take a replica down.

Status codes: 400 malformed (empty body, bad base64, bad JSON — nested too deep too —, bad
multipart), 408 a body that does not arrive within ``body_timeout_s`` (a slow client holds no
slot for long), 413 too large (body, pixels of one image or of the whole request, images per
request, decoding time), 415 unsupported content type, 422 well-formed but unusable (not an
image, truncated image, JSON of the wrong shape).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from supersub.data import build_transforms
from supersub.data.images import SKIPPED_EMPTY, SKIPPED_TRUNCATED, decode_image

# Decoders we accept. Restricting PIL's format list keeps exotic parsers (EPS calls Ghostscript)
# out of reach of request bodies. Image.init() registers every plugin first: Image.open(formats=)
# raises KeyError for a listed format whose plugin is not loaded yet (MPO, WEBP, TIFF).
Image.init()
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)
RAW_TYPES = ("image/", "application/octet-stream")


class BadInput(ValueError):
    """A request the client has to fix: answered ``status`` with ``{"detail": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024  # a large phone JPEG is ~10 MB; base64 adds a third
    max_pixels: int = 40_000_000  # one image, ~ a 50 MP photo; PIL's own bomb guard is at 89 M
    max_request_pixels: int = 80_000_000  # all images of one request together
    max_batch: int = 16  # images per request
    body_timeout_s: float = 10.0  # the whole body must arrive within this
    decode_timeout_s: float = 5.0  # decoding a request's images may take this long (checked per image)


# ------------------------------------------------------------------------------ request → bytes
async def read_body(request: Request, limit: int, timeout_s: float = Limits.body_timeout_s) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes ``limit``, and
    with 408 when it has not all arrived after ``timeout_s``: a client sending a byte now and
    then would otherwise hold a request slot for as long as it likes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"body of {declared} bytes exceeds max_body_bytes={limit}")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked uploads have no content-length: count as they come
                raise BadInput(413, f"body exceeds max_body_bytes={limit}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BadInput(408, f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


async def request_images(request: Request, limits: Limits) -> tuple[list[bytes], bool]:
    """The encoded images of a ``/predict`` request and whether the client sent a batch
    (``images`` list, or more than one multipart file): a batch is answered as a list."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind == "application/json" or kind == "multipart/form-data" or kind.startswith(RAW_TYPES)):
        raise BadInput(
            415,
            f"unsupported content type {kind or '(none)'!r}: send image/jpeg, image/png, image/webp, ..., "
            "multipart/form-data with 'file' parts, or application/json {\"image\": base64}",
        )
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
    if not body:
        raise BadInput(400, "empty body")
    if kind == "application/json":
        images, batch = _json_images(body)
    elif kind == "multipart/form-data":
        images = await _multipart_images(request, body, limits)
        batch = len(images) > 1
    else:
        images, batch = [body], False
    if len(images) > limits.max_batch:
        raise BadInput(413, f"{len(images)} images in one request exceeds max_batch={limits.max_batch}")
    return images, batch


def _json_images(body: bytes) -> tuple[list[bytes], bool]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(400, f"malformed JSON: {e}") from None
    except RecursionError:  # [[[[...]]]] 100,000 deep: Python's parser gives up on the stack
        raise BadInput(400, "malformed JSON: nested too deep") from None
    if not isinstance(doc, dict) or ("image" in doc) == ("images" in doc):
        raise BadInput(422, 'JSON body must be an object with either "image" (base64) or "images" (list)')
    batch = "images" in doc
    items = doc["images"] if batch else [doc["image"]]
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise BadInput(422, '"images" must be a non-empty list of base64 strings' if batch else '"image" must be a base64 string')
    return [_b64(s, i) for i, s in enumerate(items)], batch


def _b64(text: str, i: int) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(400, f"image {i}: malformed base64 ({e})") from None


async def _multipart_images(request: Request, body: bytes, limits: Limits) -> list[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    # Starlette's own file cap would answer 400; the body limit already bounds the work, and the
    # count check below answers a batch over max_batch with 413 like the other encodings.
    parser = MultiPartParser(request.headers, stream(), max_files=1000, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadInput(400, f"malformed multipart body: {e.message}") from None
    try:
        files = [v for k, v in form.multi_items() if k in ("file", "files") and isinstance(v, UploadFile)]
        if not files:
            raise BadInput(422, "multipart body has no 'file' part")
        return [await f.read() for f in files]
    finally:
        await form.close()


# ------------------------------------------------------------------------------ bytes → tensor
def decode(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes → an RGB image, or :class:`BadInput`. The pixel count is read from the
    header and checked *before* decoding, so a decompression bomb costs nothing."""
    if not data:
        raise BadInput(400, "empty image")
    try:
        header = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise BadInput(413, f"image has too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise BadInput(422, f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 - any parser failure on a header is the client's bytes
        raise BadInput(422, f"unreadable image ({type(e).__name__})") from None
    w, h = header.size
    if w * h > max_pixels:
        raise BadInput(413, f"image of {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    # The data layer's decoder: same RGB conversion (palette, alpha, CMYK, 16 bit) and the same
    # DCT-scaled JPEG decoding as evaluation (decode_split), so served inputs match evaluated ones.
    # A clean RGB JPEG that the draft would not reduce is decoded by torchvision's decoder (the
    # data layer's JPEG fast path: the same pixels as PIL's, ~20 % sooner).
    decoded = decode_image(data, draft_size=draft_size)
    if decoded.image is None:
        event = decoded.events[-1]
        if event == SKIPPED_EMPTY:
            raise BadInput(422, "image has no pixels")
        raise BadInput(422, "truncated image" if event == SKIPPED_TRUNCATED else "unreadable image")
    return decoded.image


def decode_all(images: list[bytes], limits: Limits, draft_size: int | None,
               transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
    """A request's images decoded and preprocessed ``[B, 3, S, S]`` with per-image times (ms),
    within the request's budget: at most ``max_request_pixels`` pixels (read from the headers,
    before decoding) and ``decode_timeout_s`` seconds of decoding altogether."""
    pixels = 0
    for i, data in enumerate(images):
        try:
            w, h = Image.open(io.BytesIO(data), formats=FORMATS).size
        except Exception:  # noqa: BLE001 - decode() below says what is wrong with this image
            continue
        pixels += w * h
        if pixels > limits.max_request_pixels:
            raise BadInput(413, f"the request's images have more than max_request_pixels={limits.max_request_pixels} "
                                f"pixels together (at image {i})")
    start = time.perf_counter()
    tensors, ms = [], []
    for i, data in enumerate(images):
        if time.perf_counter() - start > limits.decode_timeout_s:
            raise BadInput(413, f"decoding took longer than decode_timeout_s={limits.decode_timeout_s:g} s (at image {i})")
        t0 = time.perf_counter()
        try:
            tensors.append(transform(decode(data, limits.max_pixels, draft_size)))
        except BadInput as e:
            raise BadInput(e.status, f"image {i}: {e.reason}" if len(images) > 1 else e.reason) from None
        ms.append((time.perf_counter() - t0) * 1000)
    return torch.stack(tensors), ms


def preprocessor(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The data layer's evaluation transform: RGB image → normalised ``[3, S, S]`` float, exactly
    as the bundle's networks were evaluated."""
    return build_transforms(image_size, train=False)
