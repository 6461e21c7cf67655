"""How the torch loader decodes: PIL (the reference), torchvision on the CPU, or nvJPEG on the GPU.

===========  ============  ===================================================================
decoder      runs in       what
===========  ============  ===================================================================
pil          workers       `vigface.data.images.decode_image` (PIL, libjpeg-turbo): the reference
torchvision  workers       `torchvision.io.decode_image` on the CPU (libjpeg-turbo, libpng)
nvjpeg       main process  workers only read the bytes; each step's JPEGs are decoded in one
                           batched `torchvision.io.decode_jpeg(..., device="cuda")` call (nvJPEG)
                           and aligned by the vigface._C CUDA warp, so pixels never touch the CPU
auto         -             nvjpeg when the device is CUDA and torchvision imports, else pil
===========  ============  ===================================================================

A payload nvJPEG cannot take (PNG, BMP, ...) is decoded by PIL in the worker instead. When the
batched nvJPEG call fails, the batch is decoded image by image so only the bad ones are skipped
(and listed as corrupt), as with the other decoders. nvJPEG's IDCT and chroma upsampling are not
libjpeg-turbo's: on the toy set (4:2:0 JPEGs) its pixels differ from PIL's by 1.1-1.6 levels on
average and up to ~80 levels on sharp colour edges (H100, tests/test_loaders.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from vigface.data.images import decode_image, exif_orientation, sniff_image_format
from vigface.errors import BackendUnavailableError, DataFormatError, VigfaceError

DECODERS = ("auto", "pil", "torchvision", "nvjpeg")


def import_torchvision_io(decoder: str):
    """torchvision.io, or BackendUnavailableError saying what `decoder` needs."""
    try:
        import torchvision.io as tio
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError/OSError
        raise BackendUnavailableError(
            f"decoder={decoder!r} needs torchvision built for this torch ({torch.__version__}), which "
            f"failed to import ({type(exc).__name__}: {exc}); install the matching torchvision or use "
            "decoder='pil'"
        ) from None
    return tio


def torchvision_available() -> bool:
    try:
        import_torchvision_io("torchvision")
    except BackendUnavailableError:
        return False
    return True


def resolve_decoder(decoder: str, loader: str, device: torch.device) -> str:
    """The concrete decoder for the torch loader ("auto" -> nvjpeg on CUDA with torchvision, else pil)."""
    if decoder not in DECODERS:
        raise VigfaceError(f"make_loader: decoder must be one of {DECODERS}, got {decoder!r}")
    if loader != "torch":
        if decoder != "auto":
            raise VigfaceError(
                f"make_loader: decoder={decoder!r} applies to loader='torch'; DALI decodes with its own "
                "decoder (nvJPEG on a GPU device)"
            )
        return "auto"
    if decoder == "auto":
        return "nvjpeg" if device.type == "cuda" and torchvision_available() else "pil"
    if decoder == "nvjpeg" and device.type != "cuda":
        raise VigfaceError(
            f"make_loader: decoder='nvjpeg' decodes on the GPU and needs a CUDA device, got device={device}; "
            "use decoder='pil' or 'torchvision' on the CPU"
        )
    if decoder in ("torchvision", "nvjpeg"):
        import_torchvision_io(decoder)
    return decoder


def _as_uint8_tensor(data) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy())


def decode_torchvision(data, where: str) -> np.ndarray:
    """torchvision's CPU decode of one payload -> uint8 HWC RGB; DataFormatError when it fails.

    libjpeg reports a truncated or damaged stream as a warning and returns grey pixels; here that
    warning is an error, as PIL makes it, so both decoders skip the same images.
    """
    tio = import_torchvision_io("torchvision")
    if len(data) == 0:
        raise DataFormatError(where, "image payload is empty, expected an encoded image")
    fmt = sniff_image_format(data)
    # formats torchvision.io does not decode, and tagged WebP (its WebP decoder ignores
    # apply_exif_orientation): PIL
    if fmt in ("bmp", "tiff") or (fmt == "webp" and exif_orientation(data) != 1):
        return decode_image(data, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = tio.decode_image(
                _as_uint8_tensor(data), mode=tio.ImageReadMode.RGB, apply_exif_orientation=True
            )
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
            raise DataFormatError(where, f"torchvision cannot decode it: {reason}") from None
    if caught:
        raise DataFormatError(where, f"torchvision decoded it with a warning: {caught[0].message}")
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def read_for_nvjpeg(data, where: str) -> tuple[np.ndarray, bool]:
    """A worker's share of the nvjpeg decoder: (JPEG bytes, True), or (PIL-decoded HWC pixels, False).

    nvJPEG decodes a truncated JPEG without complaint (grey below the cut; seen on an H100), where
    PIL refuses it: a JPEG whose last scan (SOS marker FF DA) is not followed by an end-of-image
    marker (FF D9) is refused here, so all decoders skip the same truncated files. Entropy-coded
    data cannot hold FF D9 (an FF byte there is followed by 00 or a restart marker).
    """
    # torchvision's nvJPEG path ignores EXIF orientation: the rare rotated JPEG goes through PIL
    raw = bytes(data)
    if sniff_image_format(raw) == "jpeg" and exif_orientation(raw) == 1:
        if raw.rfind(b"\xff\xd9") < raw.rfind(b"\xff\xda"):
            raise DataFormatError(
                where,
                f"JPEG payload ({len(raw)} bytes) ends inside its scan (no end-of-image marker): truncated",
            )
        return np.frombuffer(raw, dtype=np.uint8).copy(), True
    return decode_image(raw, where), False


def decode_jpegs_on_gpu(payloads: list[np.ndarray], device: torch.device) -> list[torch.Tensor | str]:
    """JPEG byte arrays -> uint8 (3, H, W) tensors on `device`, or the reason an image failed."""
    tio = import_torchvision_io("nvjpeg")
    tensors = [torch.from_numpy(p) for p in payloads]
    if not tensors:
        return []
    try:
        return list(tio.decode_jpeg(tensors, mode=tio.ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad image fails the whole batched call: find it
    out: list[torch.Tensor | str] = []
    for t in tensors:
        try:
            out.append(tio.decode_jpeg(t, mode=tio.ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            out.append(f"nvJPEG cannot decode it ({len(t)} bytes): {str(exc).splitlines()[0]}")
    return out
