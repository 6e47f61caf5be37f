"""Image decoding with bad-data accounting.

Real image collections contain a few files that are not clean RGB JPEGs: grayscale and CMYK
JPEGs, palette or RGBA PNGs (some even under a ``.JPEG`` name), truncated downloads, empty or
random files. :func:`decode_image` turns each of them into an RGB image or a clean "skip", and
says what happened in terms of the event names below, which a build counts and reports.

PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: it is a process-wide global, and
setting it would silently change the behaviour of every other user of PIL in the process (and
would let half-grey truncated images into a training set).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Events a decode can report; the ``skipped_*`` ones mean "no image".
CONVERTED_GRAYSCALE = "converted_grayscale"
CONVERTED_CMYK = "converted_cmyk"
CONVERTED_OTHER_MODE = "converted_other_mode"  # palette, RGBA, LA, I;16, ... → RGB
FORMAT_MISMATCH = "format_mismatch"  # e.g. PNG bytes in a file named .JPEG
SKIPPED_TRUNCATED = "skipped_truncated"
SKIPPED_UNREADABLE = "skipped_unreadable"
SKIPPED_EMPTY = "skipped_empty"
EVENTS = (
    CONVERTED_GRAYSCALE,
    CONVERTED_CMYK,
    CONVERTED_OTHER_MODE,
    FORMAT_MISMATCH,
    SKIPPED_TRUNCATED,
    SKIPPED_UNREADABLE,
    SKIPPED_EMPTY,
)
SKIP_EVENTS = frozenset({SKIPPED_TRUNCATED, SKIPPED_UNREADABLE, SKIPPED_EMPTY})

# File-name extension → the PIL format names that legitimately live under it.
_EXTENSION_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".bmp": {"BMP"},
    ".gif": {"GIF"},
    ".webp": {"WEBP"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".ppm": {"PPM"},
}
IMAGE_EXTENSIONS = frozenset(_EXTENSION_FORMATS)
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16B", "I;16L", "F"})


class BadImageError(ValueError):
    """An image that could not be decoded; ``kind`` is one of the ``skipped_*`` events."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    """Result of :func:`decode_image`: an RGB image, or ``None`` when skipped, and the events."""

    image: Image.Image | None
    events: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.image is not None


def _extension(name: str | None) -> str:
    if not name:
        return ""
    dot = name.rfind(".")
    return name[dot:].lower() if dot >= 0 else ""


def _is_truncation(err: Exception) -> bool:
    text = str(err).lower()
    return "truncated" in text or "broken data stream" in text or "premature end" in text


def decode_image(data: bytes | None, name: str | None = None, *, draft_size: int | None = None,
                 fast: bool = True) -> Decoded:
    """Decodes encoded image bytes to an RGB PIL image, converting or skipping bad data.

    Args:
        data: the encoded file (JPEG, PNG, ...). ``None`` or ``b""`` is an empty image.
        name: the file name it came under; only its extension is used, to detect a format
            mismatch (PNG bytes in ``x.JPEG``).
        draft_size: when given, JPEGs are decoded by libjpeg's DCT scaling at the smallest of
            1/1, 1/2, 1/4, 1/8 of full size that is still at least ``draft_size`` pixels on
            both sides: much faster for small targets (e.g. a 500 px photo read for a 64 px
            model). The whole entropy-coded stream is still read, so truncation is still found.
        fast: clean RGB JPEGs that the draft would not reduce are decoded by torchvision's
            decoder (the JPEG fast path below: the same pixels, sooner); ``False``: PIL for
            everything (benchmarks compare the two).

    Returns:
        :class:`Decoded` with ``image`` in mode RGB (or ``None``) and the events in
        :data:`EVENTS` that happened (empty tuple for a clean RGB image).
    """
    if not data:
        return Decoded(None, (SKIPPED_EMPTY,))
    size = fast_jpeg_size(data, name) if fast else None
    if size is not None and not (draft_size and min(size[0] // draft_size, size[1] // draft_size) >= 2):
        # A clean JPEG that PIL's draft would not reduce: the same pixels, ~20 % sooner.
        tensor = _decode_jpeg_tensor(data)
        if tensor is not None:
            return Decoded(tensor_to_pil(tensor), ())
    events: list[str] = []
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Decoded(None, (SKIPPED_UNREADABLE,))
    except Exception as e:  # noqa: BLE001 - any parser failure is "unreadable", never a crash
        return Decoded(None, (SKIPPED_TRUNCATED if _is_truncation(e) else SKIPPED_UNREADABLE,))
    ext = _extension(name)
    if ext in _EXTENSION_FORMATS and img.format not in _EXTENSION_FORMATS[ext]:
        events.append(FORMAT_MISMATCH)
    try:
        if draft_size and img.format == "JPEG":
            # draft() only takes effect in the file's own colour space; RGB/L/CMYK are kept.
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, ValueError, DecompressionBomb...
        return Decoded(None, (SKIPPED_TRUNCATED if _is_truncation(e) else SKIPPED_UNREADABLE,))
    if img.width == 0 or img.height == 0:
        return Decoded(None, (SKIPPED_EMPTY,))
    if img.mode != "RGB":
        if img.mode in _GRAY_MODES:
            events.append(CONVERTED_GRAYSCALE)
        elif img.mode == "CMYK":
            events.append(CONVERTED_CMYK)
        else:
            events.append(CONVERTED_OTHER_MODE)
        try:
            img = _to_rgb(img)
        except Exception:  # noqa: BLE001
            return Decoded(None, (*events, SKIPPED_UNREADABLE))
    return Decoded(img, tuple(events))


# ------------------------------------------------------------------ the JPEG fast path
# torchvision's decoder (libjpeg-turbo, like Pillow's) takes ~20 % less time than PIL's for the same
# pixels (bit for bit equal on the 197 RGB images of ../shared/data/imagenet-sample-200), and gives
# a uint8 tensor the tensor transforms work on directly. It is used only for what it decodes exactly
# as PIL would and where no bad-data event can happen: baseline/progressive 8-bit 3-component JPEG
# bytes under a JPEG name (or none), ending in an EOI marker, within PIL's pixel limit. Everything
# else — grayscale, CMYK, PNG inside .JPEG, 12-bit, truncated, trailing bytes — takes the PIL path
# above with its accounting, and so does anything torchvision's decoder refuses.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NAMES = frozenset({"", ".jpg", ".jpeg"})


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """``(width, height, components, bits)`` from a JPEG's frame header, or ``None`` when the bytes
    are not a JPEG whose header can be read. Walks the marker segments only (microseconds)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_MARKERS:
            if i + 10 > n or length < 8:
                return None
            bits, height = data[i + 4], (data[i + 5] << 8) | data[i + 6]
            width, comps = (data[i + 7] << 8) | data[i + 8], data[i + 9]
            return width, height, comps, bits
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


def fast_jpeg_size(data: bytes | None, name: str | None = None) -> tuple[int, int] | None:
    """``(width, height)`` when ``data`` can take the JPEG fast path (see above), else ``None``."""
    ext = _extension(name)
    if not data or (ext in _EXTENSION_FORMATS and ext not in _JPEG_NAMES):  # PIL flags the mismatch
        return None
    header = jpeg_header(data)
    if header is None:
        return None
    w, h, comps, bits = header
    if comps != 3 or bits != 8 or w == 0 or h == 0 or w * h > (Image.MAX_IMAGE_PIXELS or 2**62):
        return None
    if data[-2:] != b"\xff\xd9":  # truncated (or trailing bytes): PIL decides what it is
        return None
    return w, h


def _decode_jpeg_tensor(data: bytes):
    """torchvision's JPEG decode → uint8 ``[3, H, W]``, or ``None`` when it refuses the bytes."""
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        # bytearray: a writable copy (torch warns about read-only buffers); decode_jpeg reads it only.
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - refused bytes, or a torchvision without its image extension: PIL decides
        return None


@dataclass(frozen=True)
class DecodedTensor:
    """Result of :func:`decode_tensor`: uint8 ``[3, H, W]`` (or ``None`` when skipped), the events,
    and whether the JPEG fast path decoded it."""

    tensor: Any
    events: tuple[str, ...]
    fast: bool = False

    @property
    def ok(self) -> bool:
        return self.tensor is not None


def decode_tensor(data: bytes | None, name: str | None = None) -> DecodedTensor:
    """Encoded bytes → RGB uint8 tensor ``[3, H, W]`` at full size: clean JPEGs by torchvision's
    decoder, everything else by :func:`decode_image` (same conversions, skips and events)."""
    if fast_jpeg_size(data, name) is not None:
        tensor = _decode_jpeg_tensor(data)  # type: ignore[arg-type]
        if tensor is not None:
            return DecodedTensor(tensor, (), True)
    decoded = decode_image(data, name)
    if decoded.image is None:
        return DecodedTensor(None, decoded.events)
    return DecodedTensor(pil_to_uint8(decoded.image), decoded.events)


def pil_to_uint8(img: Image.Image):
    """An RGB PIL image → uint8 tensor ``[3, H, W]`` (a view of one HWC copy, as the decoder's)."""
    import torch

    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def tensor_to_pil(tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` → an RGB PIL image."""
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion; transparent pixels are composited on white (not on PIL's black)."""
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float grayscale: PIL's convert("L") clips at 255; a 16-bit range is scaled down.
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0.0) > 255.0:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def read_rgb(data: bytes | None, name: str | None = None, *, draft_size: int | None = None) -> Image.Image:
    """Like :func:`decode_image`, but returns the image or raises :class:`BadImageError`."""
    decoded = decode_image(data, name, draft_size=draft_size)
    if decoded.image is None:
        kind = decoded.events[-1]
        raise BadImageError(kind, f"{name or 'image'}: {kind.replace('_', ' ')}")
    return decoded.image


class BadDataReport(Counter):
    """Counts of :data:`EVENTS` over a build, plus a few example references per event."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list[str]] = {}

    def add(self, events: tuple[str, ...] | list[str], ref: str, max_examples: int = 3) -> None:
        for ev in events:
            self[ev] += 1
            shown = self.examples.setdefault(ev, [])
            if len(shown) < max_examples:
                shown.append(ref)

    @property
    def skipped(self) -> int:
        return sum(self[k] for k in SKIP_EVENTS)

    def as_dict(self) -> dict[str, int]:
        """All events (zeros included), in the fixed order of :data:`EVENTS`."""
        return {k: int(self[k]) for k in EVENTS}

    def format(self) -> str:
        """A short human-readable report, one line per event that happened."""
        lines = [f"bad data: {self.skipped} skipped, {sum(self[k] for k in EVENTS if k not in SKIP_EVENTS)} converted/flagged"]
        for k in EVENTS:
            if self[k]:
                ex = ", ".join(self.examples.get(k, []))
                lines.append(f"  {k:<22} {self[k]:>7}" + (f"   e.g. {ex}" if ex else ""))
        return "\n".join(lines)
