"""Encode and decode the JPEG/PNG payloads stored in .rec, .bin and image-folder datasets.

Images are numpy uint8 arrays, HWC, RGB. Decoding failures become `DataFormatError` naming the
file (and byte offset) the payload came from, so a bad record reads as one line, not a PIL trace.

EXIF orientation is applied: a camera photo stored sideways with an Orientation tag decodes
upright, as OpenCV's imread/imdecode (InsightFace's tools, and the landmark detectors run on them)
and DALI's decoder give it. Every decoder here (PIL, torchvision, nvJPEG, DALI) follows that.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image, ImageOps

from vigface.errors import DataFormatError, VigfaceError

# Formats PIL may try when decoding. Restricting the list keeps a random payload from being
# "recognised" by an obscure PIL plugin instead of being reported as not an image.
_DECODE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
_EXIF_ORIENTATION = 0x0112


def exif_orientation(data: bytes | bytearray | memoryview) -> int:
    """The payload's EXIF Orientation (1 = upright, 2-8 = mirrored / rotated), 1 when it has none
    or cannot be read. Payloads without an EXIF block (every image vigface writes) are answered
    from their bytes alone, without opening them."""
    head = bytes(data[:65536])  # not the whole payload: the markers sit in the header
    fmt = sniff_image_format(head)
    if fmt == "bmp":
        return 1  # BMP has no EXIF
    # the EXIF block's marker: JPEG APP1 "Exif\0\0", PNG chunk "eXIf", WebP chunk "EXIF" (TIFF keeps
    # the tag in its own directory: always opened)
    if fmt in ("jpeg", "png", "webp") and not any(m in head for m in (b"Exif\x00\x00", b"eXIf", b"EXIF")):
        return 1
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=_DECODE_FORMATS) as pil:
            value = pil.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # an unreadable header is the decoder's to report
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_shape(
    data: bytes | bytearray | memoryview, path: str | os.PathLike = "<bytes>", offset: int | None = None
) -> tuple[int, int]:
    """(height, width) of the image `decode_image` makes of `data` (turned upright by its EXIF
    Orientation), read from its header without decoding the pixels; DataFormatError if the header
    is not an image's."""
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=_DECODE_FORMATS) as pil:
            if pil.format == "TIFF":  # Pillow's TIFF reader turns the image upright as it loads it
                pil.load()
            orientation = pil.getexif().get(_EXIF_ORIENTATION, 1)  # as decode_image reads it
            width, height = pil.size
    except Exception as exc:  # as decode_image: PIL raises several kinds
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise DataFormatError(
            path, f"image payload ({len(data)} bytes) has no image header: {why}", offset
        ) from None
    # Orientations 5-8 turn the image a quarter (or mirror it across a diagonal): sides swap
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


# Leading bytes of the formats we write or accept as already-encoded payloads.
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_image_format(data: bytes | bytearray | memoryview) -> str | None:
    """Name of the image format `data` starts with ("jpeg", "png", ...), or None."""
    head = bytes(data[:12])
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an HWC (or HW grayscale) uint8 image as JPEG or PNG bytes (deterministic)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise VigfaceError(f"encode_image: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or image.size == 0:
        raise VigfaceError(f"encode_image: expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        # PIL took -5 and 1000 without a word (the writers pass their quality here)
        raise VigfaceError(f"encode_image: JPEG quality must be an integer in 1..100, got {quality!r}")
    fmt = fmt.lower()
    pil = Image.fromarray(np.ascontiguousarray(image))
    out = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        if pil.mode == "RGBA":
            pil = pil.convert("RGB")  # JPEG has no alpha channel
        pil.save(out, format="JPEG", quality=int(quality))
    elif fmt == "png":
        pil.save(out, format="PNG")
    else:
        raise VigfaceError(f"encode_image: unknown format {fmt!r}; use 'jpeg' or 'png'")
    return out.getvalue()


# PIL's modes for 16-bit grayscale PNG / TIFF samples ("I": older Pillow's 16-bit PNG): scaled by
# 1/257 to 8 bits, as DALI and OpenCV's IMREAD_COLOR decode them
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(
    data: bytes | bytearray | memoryview,
    path: str | os.PathLike = "<bytes>",
    offset: int | None = None,
    *,
    what: str = "image payload",
) -> np.ndarray:
    """Decode an encoded image to uint8 HWC RGB; DataFormatError(path, ..., offset) if it is not one.

    `what` names the payload in the error message (e.g. "image 7 of pair 3").
    """
    if len(data) == 0:
        raise DataFormatError(path, f"{what} is empty, expected an encoded image", offset)
    try:
        with Image.open(io.BytesIO(data), formats=_DECODE_FORMATS) as pil:
            pil.load()
            if pil.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                pil = ImageOps.exif_transpose(pil)  # upright, as OpenCV and DALI decode it
            if pil.mode in _WIDE_GRAY_MODES:
                # 16-bit samples: convert("RGB") clipped every one above 255, a white image
                gray = np.round(np.asarray(pil, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            if pil.mode != "RGB":
                pil = pil.convert("RGB")
            return np.array(pil, dtype=np.uint8)  # a writable copy
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        head = bytes(data[:8]).hex()
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # PIL named its buffer
        raise DataFormatError(
            path, f"{what} ({len(data)} bytes, starting {head}) is not a decodable image: {why}", offset
        ) from None
