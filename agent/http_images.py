"""Request bodies of the local HTTP endpoint as images: media type, size check, decode.

The pixel count is read from the PNG or JPEG header before anything is decoded, so a small
body that claims a huge image (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

ImageKind = Literal["jpeg", "png"]

MEDIA_TYPES: dict[str, ImageKind] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/png": "png",
}
"""Accepted ``Content-Type`` values (parameters such as ``; charset`` are ignored)."""

MAX_PIXELS = 7680 * 4320
"""Largest image accepted (8K UHD, about 100 MB once decoded to BGR)."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
"""JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size."""


class BadImage(ValueError):
    """The body is not a decodable image of its declared type (HTTP 400)."""


def media_kind(content_type: str | None) -> ImageKind | None:
    """``image/jpeg`` / ``image/png`` (any case, parameters ignored) to its kind; else None."""
    if not content_type:
        return None
    return MEDIA_TYPES.get(content_type.split(";", 1)[0].strip().lower())


def image_size(data: bytes, kind: ImageKind) -> tuple[int, int]:
    """``(width, height)`` from the header of a PNG or JPEG body; BadImage if it has none."""
    if kind == "png":
        if len(data) < 24 or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR":
            raise BadImage("the body is not a PNG image (no PNG signature and IHDR header)")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return _jpeg_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    if not data.startswith(b"\xff\xd8"):
        raise BadImage("the body is not a JPEG image (it does not start with the SOI marker)")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise BadImage(f"the JPEG is corrupt: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        i += 2 + length
    raise BadImage("the JPEG has no frame header (SOF): it is truncated or not an image")


def decode_image(data: bytes, kind: ImageKind) -> npt.NDArray[Any]:
    """The body as a BGR uint8 image (as the camera delivers frames); BadImage otherwise."""
    import cv2

    width, height = image_size(data, kind)
    if width < 1 or height < 1:
        raise BadImage(f"the {kind.upper()} header says {width}x{height} pixels")
    if width * height > MAX_PIXELS:
        raise BadImage(
            f"the image is {width}x{height} pixels; at most {MAX_PIXELS:,} pixels (8K) are "
            "accepted: scale it down first"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise BadImage(f"the body could not be decoded as a {kind.upper()} image (corrupt?)")
    return image
