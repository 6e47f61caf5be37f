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


def decode_image(data: bytes | None, name: str | None = None, *, draft_size: int | None = None) -> Decoded:
    """Decodes encoded image bytes to an RGB PIL image, converting or skipping bad data.

    Args:
        data: the encoded file (JPEG, PNG, ...). ``None`` or ``b""`` is an empty image.
        name: the file name it came under; only its extension is used, to detect a format
            mismatch (PNG bytes in ``x.JPEG``).
        draft_size: when given, JPEGs are decoded by libjpeg's DCT scaling at the smallest of
            1/1, 1/2, 1/4, 1/8 of full size that is still at least ``draft_size`` pixels on
            both sides: much faster for small targets (e.g. a 500 px photo read for a 64 px
            model). The whole entropy-coded stream is still read, so truncation is still found.

    Returns:
        :class:`Decoded` with ``image`` in mode RGB (or ``None``) and the events in
        :data:`EVENTS` that happened (empty tuple for a clean RGB image).
    """
    if not data:
        return Decoded(None, (SKIPPED_EMPTY,))
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
