"""5-point face alignment: similarity estimation (Umeyama 1991) and batched bilinear affine warps.

Conventions (those of cv2.warpAffine and insightface's `norm_crop`):

* A matrix M (2, 3) maps source pixel coordinates to destination ones: dst = M @ [x, y, 1].
  Pixel centres sit at integer coordinates.
* Landmarks are (x, y) in the insightface order: left eye, right eye, nose tip, left and right
  mouth corner (left = smaller x).
* Images are uint8 HWC, batches NHWC; sizes are (height, width) in NumPy order, NOT cv2's
  dsize (width, height).

Every op has three implementations that give the same numbers:

=========  ==========================================  ========================================
backend    similarity                                  warp
=========  ==========================================  ========================================
"numpy"    `estimate_similarity_ref`: literal Umeyama   `warp_affine_ref`: vectorised NumPy
           (batched SVD), float64
"c"        vigface._C, closed-form 2-D Umeyama,         vigface._C, std::threads, no GIL
           float64
"cuda"     (runs "c": 5 points per face)                vigface._C CUDA kernel, torch CUDA tensors
=========  ==========================================  ========================================

The warp is specified exactly in csrc/warp_affine.h (float32, no FMA, round half up) and all
three backends follow it bit for bit; tests allow 1 intensity level. "auto" picks "cuda" for a
torch CUDA tensor, else "c" when vigface._C is importable, else "numpy", and logs its choice once.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from vigface.errors import AlignmentError, BackendUnavailableError

try:  # the compiled extension is optional: everything here also runs on NumPy alone
    from vigface import _C
except ImportError as exc:  # pragma: no cover - depends on how vigface was installed
    _C = None
    _C_IMPORT_ERROR: str = f"{type(exc).__name__}: {exc}"
else:
    _C_IMPORT_ERROR = ""

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "align_faces",
    "arcface_template",
    "available_backends",
    "estimate_similarity",
    "estimate_similarity_ref",
    "invert_affine",
    "transform_points",
    "warp_affine",
    "warp_affine_ref",
]

log = logging.getLogger(__name__)

# insightface's 5-point ArcFace template for 112x112 crops (arcface_torch / utils/face_align.py).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
ARCFACE_TEMPLATE_112.flags.writeable = False  # a shared constant: copy it to change it

# Same rule and value as csrc/similarity.h: a point set whose RMS distance to its centroid is at
# most 1e-6 * max(1, largest |coordinate|) (~16 float32 ulps) has no usable scale.
DEGENERATE_REL_TOL = 1e-6
_STATUS_OK, _STATUS_NONFINITE, _STATUS_DEGENERATE = 0, 1, 2

_BACKENDS = ("auto", "c", "numpy", "cuda")
_logged_choices: set[tuple[str, str]] = set()


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def available_backends() -> list[str]:
    """Backends usable in this process, fastest last: "numpy", then "c", then "cuda"."""
    out = ["numpy"]
    if _C is not None:
        out.append("c")
        if _C.has_cuda and _C.cuda_device_count() > 0:
            out.append("cuda")
    return out


def _require_c() -> None:
    if _C is None:
        raise BackendUnavailableError(
            "backend 'c' needs the compiled extension vigface._C, which failed to import "
            f"({_C_IMPORT_ERROR}); rebuild it with `pip install -e .` or use backend='numpy'"
        )


def _require_cuda() -> None:
    if _C is None:
        raise BackendUnavailableError(
            "backend 'cuda' needs the compiled extension vigface._C, which failed to import "
            f"({_C_IMPORT_ERROR})"
        )
    if not _C.has_cuda:
        raise BackendUnavailableError(
            "backend 'cuda': vigface._C was built without CUDA (no nvcc found at build time, or "
            "VIGFACE_CUDA=OFF); reinstall with nvcc on PATH, e.g. VIGFACE_CUDA=ON pip install -e ."
        )
    if _C.cuda_device_count() == 0:
        driver = _C.cuda_driver_version()  # e.g. 13000; 0 = no driver
        raise BackendUnavailableError(
            f"backend 'cuda': the CUDA {_C.build_info['cuda_runtime']} runtime in vigface._C sees no "
            + (
                "device: no NVIDIA driver is installed"
                if driver == 0
                else f"device (driver supports CUDA {driver // 1000}.{driver % 1000 // 10}; "
                "an older driver than the runtime also reads as no device)"
            )
        )


def _log_choice(op: str, backend: str) -> None:
    if (op, backend) not in _logged_choices:
        _logged_choices.add((op, backend))
        log.info("vigface.data.align.%s: backend='auto' -> %r", op, backend)


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------------------------
# Argument checks and array conversion
# ---------------------------------------------------------------------------------------------


def _torch_tensor_type():
    """torch.Tensor if torch is already imported (a tensor cannot exist otherwise), else None."""
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _to_numpy(x, name: str) -> np.ndarray:
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(x, tensor_type):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an object array")
    return a


def _as_points(x, name: str) -> tuple[np.ndarray, bool]:
    """(K, 2) or (N, K, 2) real numbers -> ((N, K, 2) float64, was_batched)."""
    a = _to_numpy(x, name)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim not in (2, 3) or a.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (K, 2) or (N, K, 2), got {a.shape}")
    batched = a.ndim == 3
    return np.ascontiguousarray(a if batched else a[None], dtype=np.float64), batched


def _as_template(template) -> np.ndarray:
    t = _to_numpy(template, "template")
    if not np.issubdtype(t.dtype, np.floating) and not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"template must hold real numbers, got dtype {t.dtype}")
    if t.ndim != 2 or t.shape[1] != 2 or t.shape[0] < 2:
        raise ValueError(f"template must have shape (K, 2) with K >= 2, got {t.shape}")
    t = np.ascontiguousarray(t, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError("template has NaN or infinite coordinates")
    if _degenerate(t[None])[0]:
        raise ValueError("template points are all (nearly) equal: no similarity can map onto them")
    return t


def _degenerate(points: np.ndarray) -> np.ndarray:
    """(N, K, 2) finite float64 -> (N,) bool: RMS spread <= DEGENERATE_REL_TOL * max(1, max|coord|)."""
    centred = points - points.mean(axis=1, keepdims=True)
    spread = np.sqrt((centred**2).sum(axis=2).mean(axis=1))
    scale = np.maximum(1.0, np.abs(points).max(axis=(1, 2), initial=0.0))
    return ~(spread > DEGENERATE_REL_TOL * scale)


def _raise_bad_landmarks(status: np.ndarray) -> None:
    bad = np.flatnonzero(status != _STATUS_OK)
    if bad.size == 0:
        return
    i = int(bad[0])
    what = (
        "has NaN or infinite coordinates"
        if status[i] == _STATUS_NONFINITE
        else "has all points (nearly) equal, so no scale is defined"
    )
    more = f" ({bad.size} bad samples in all, indices {bad[:10].tolist()}{'...' if bad.size > 10 else ''})"
    raise AlignmentError(f"landmarks[{i}] {what}{more if bad.size > 1 else ''}")


def _out_hw(out_size) -> tuple[int, int]:
    if isinstance(out_size, (int, np.integer)):
        h = w = int(out_size)
    else:
        try:
            h, w = (int(v) for v in out_size)
        except (TypeError, ValueError):
            raise ValueError(f"out_size must be an int or (height, width), got {out_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"out_size must be positive, got {out_size!r}")
    return h, w


def _border(border_value, c: int) -> list[int]:
    values = [border_value] if np.isscalar(border_value) else list(border_value)
    if len(values) not in (1, c):
        raise ValueError(f"border_value must be one value or {c} (one per channel), got {border_value!r}")
    out = []
    for v in values:
        if not float(v).is_integer() or not 0 <= v <= 255:
            raise ValueError(f"border_value must be integers in [0, 255], got {border_value!r}")
        out.append(int(v))
    return out * c if len(out) == 1 else out


def _check_images(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """(H, W, C) or (N, H, W, C) uint8 -> ((N, H, W, C) contiguous, was_batched)."""
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got dtype {a.dtype}")
    if a.ndim not in (3, 4):
        raise ValueError(f"images must have shape (H, W, C) or (N, H, W, C), got {a.shape}")
    batched = a.ndim == 4
    a = a if batched else a[None]
    if a.shape[3] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels (last axis), got shape {a.shape}")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise ValueError(f"images must not be empty, got shape {a.shape}")
    return np.ascontiguousarray(a), batched


def _check_matrices(m, n: int) -> np.ndarray:
    """(2, 3) or (N, 2, 3) -> (N, 2, 3) float32 contiguous; a single matrix serves every image."""
    a = _to_numpy(m, "matrices")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"matrices must hold real numbers, got dtype {a.dtype}")
    if a.shape == (2, 3):
        a = np.broadcast_to(a, (n, 2, 3))
    if a.ndim != 3 or a.shape[1:] != (2, 3) or a.shape[0] != n:
        raise ValueError(f"matrices must have shape (2, 3) or ({n}, 2, 3) for {n} images, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Similarity estimation
# ---------------------------------------------------------------------------------------------


def arcface_template(out_size: int = 112) -> np.ndarray:
    """The ArcFace template for out_size x out_size crops, (5, 2) float32.

    insightface's rule: sizes divisible by 112 scale the 112 template; sizes divisible by 128
    (and not 112) scale it by out_size / 128 and shift x by 8 * out_size / 128 (the 128 crop
    pads the 112 one by 8 px on each side horizontally); any other size scales by out_size / 112.
    """
    out_size = int(out_size)
    if out_size <= 0:
        raise ValueError(f"out_size must be positive, got {out_size}")
    if out_size % 112 != 0 and out_size % 128 == 0:
        ratio = out_size / 128.0
        shift = np.array([8.0 * ratio, 0.0])
    else:
        ratio = out_size / 112.0
        shift = np.zeros(2)
    return (ARCFACE_TEMPLATE_112.astype(np.float64) * ratio + shift).astype(np.float32)


def estimate_similarity_ref(landmarks, template=ARCFACE_TEMPLATE_112) -> np.ndarray:
    """NumPy reference of `estimate_similarity`: Umeyama's SVD form, batched, in float64.

    With centred points s_i, d_i, Sigma = 1/K sum d_i s_i^T = U D V^T, var_s = 1/K sum |s_i|^2:
    R = U diag(1, det U det V) V^T (a rotation, never a reflection; also right for rank-1
    Sigma, i.e. collinear points), c = tr(D S) / var_s, t = mu_d - c R mu_s.
    """
    src, batched = _as_points(landmarks, "landmarks")
    dst = _as_template(template)
    if src.shape[1] != dst.shape[0]:
        raise ValueError(f"landmarks have {src.shape[1]} points per sample but template has {dst.shape[0]}")
    n, k = src.shape[:2]

    status = np.zeros(n, dtype=np.int32)
    finite = np.isfinite(src).all(axis=(1, 2))
    status[~finite] = _STATUS_NONFINITE
    src = np.where(finite[:, None, None], src, 0.0)  # keep NaN out of the SVD; those rows raise below
    status[finite & _degenerate(src)] = _STATUS_DEGENERATE
    _raise_bad_landmarks(status)

    mu_s = src.mean(axis=1)  # (N, 2)
    mu_d = dst.mean(axis=0)  # (2,)
    s = src - mu_s[:, None]  # (N, K, 2)
    d = dst - mu_d  # (K, 2)
    var_s = (s**2).sum(axis=(1, 2)) / k  # (N,)
    sigma = np.einsum("ki,nkj->nij", d, s) / k  # (N, 2, 2): 1/K sum d s^T
    u, sv, vt = np.linalg.svd(sigma)
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)  # (N,)
    u = u.copy()
    u[:, :, 1] *= sign[:, None]  # U diag(1, sign)
    rot = u @ vt  # (N, 2, 2)
    scale = (sv[:, 0] + sign * sv[:, 1]) / var_s  # tr(D S) / var_s
    m = np.empty((n, 2, 3), dtype=np.float64)
    m[:, :, :2] = scale[:, None, None] * rot
    m[:, :, 2] = mu_d - np.einsum("nij,nj->ni", m[:, :, :2], mu_s)
    m = m.astype(np.float32)
    return m if batched else m[0]


def estimate_similarity(landmarks, template=ARCFACE_TEMPLATE_112, backend: str = "auto") -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) per sample.

    landmarks: (K, 2) or (N, K, 2) source points (any real dtype, numpy or torch);
    template: (K, 2) destination points, default the 112x112 ArcFace template; K >= 2.
    Returns float32 matrices M, (2, 3) or (N, 2, 3), with template ~= M @ [x, y, 1].
    Raises AlignmentError naming the first bad sample (NaN/inf, or all points equal);
    collinear points are fine. backend: "auto" | "c" | "numpy" ("cuda" runs "c").
    """
    _check_backend(backend)
    if backend == "numpy" or (backend == "auto" and _C is None):
        if backend == "auto":
            _log_choice("estimate_similarity", "numpy")
        return estimate_similarity_ref(landmarks, template)
    _require_c()
    if backend == "auto":
        _log_choice("estimate_similarity", "c")
    src, batched = _as_points(landmarks, "landmarks")
    dst = _as_template(template)
    if src.shape[1] != dst.shape[0]:
        raise ValueError(f"landmarks have {src.shape[1]} points per sample but template has {dst.shape[0]}")
    m, status = _C.estimate_similarity(src, dst)
    _raise_bad_landmarks(status)
    return m if batched else m[0]


# ---------------------------------------------------------------------------------------------
# Matrices and points
# ---------------------------------------------------------------------------------------------


def _inverse_f64(m: np.ndarray) -> np.ndarray:
    """(N, 2, 3) float32 -> (N, 6) float64 inverse, in csrc/warp_affine.h's exact expression order."""
    m = m.astype(np.float64)
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        det = a * e - b * d
        return np.stack(
            [e / det, -b / det, (b * f - e * c) / det, -d / det, a / det, (d * c - a * f) / det], axis=1
        )


def _inverse_f32(m: np.ndarray) -> np.ndarray:
    """(N, 2, 3) float32 -> (N, 6) float32 inverse; AlignmentError names a non-invertible matrix."""
    with np.errstate(over="ignore", invalid="ignore"):
        inv = _inverse_f64(m).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(inv).all(axis=1))
    if bad.size:
        raise AlignmentError(
            f"matrices[{int(bad[0])}] is not invertible (singular or not finite)"
            + (f"; {bad.size} such matrices in all" if bad.size > 1 else "")
        )
    return inv


def invert_affine(matrices) -> np.ndarray:
    """Inverse of (2, 3) or (N, 2, 3) affine matrices (e.g. aligned -> original coordinates), float32."""
    a = _to_numpy(matrices, "matrices")
    if a.shape[-2:] != (2, 3) or a.ndim not in (2, 3):
        raise ValueError(f"matrices must have shape (2, 3) or (N, 2, 3), got {a.shape}")
    batched = a.ndim == 3
    m = np.ascontiguousarray(a if batched else a[None], dtype=np.float32)
    inv = _inverse_f32(m).reshape(-1, 2, 3)
    return inv if batched else inv[0]


def transform_points(points, matrices) -> np.ndarray:
    """Map points through affine matrices: p' = M @ [x, y, 1], in float64, returned as float32.

    points (K, 2) with matrices (2, 3), or points (N, K, 2) with matrices (N, 2, 3) or one (2, 3).
    """
    p, batched = _as_points(points, "points")
    m = _to_numpy(matrices, "matrices").astype(np.float64)
    if m.shape == (2, 3):
        m = np.broadcast_to(m, (p.shape[0], 2, 3))
    if m.shape != (p.shape[0], 2, 3):
        raise ValueError(
            f"matrices must have shape (2, 3) or ({p.shape[0]}, 2, 3) for these points, got {m.shape}"
        )
    out = np.einsum("nij,nkj->nki", m[:, :, :2], p) + m[:, None, :, 2]
    out = out.astype(np.float32)
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------
# Warp
# ---------------------------------------------------------------------------------------------

# Output pixels per NumPy chunk: ~4 M keeps the float32 temporaries near 100 MB.
_REF_CHUNK_PIXELS = 1 << 22


def warp_affine_ref(images, matrices, out_size=(112, 112), border_value=0) -> np.ndarray:
    """NumPy reference of `warp_affine`, vectorised over the batch; same rule, same bits.

    Follows csrc/warp_affine.h step by step. Instead of testing every tap against the image
    bounds, it pads the images with one border pixel on the left/top and two on the right/bottom:
    with the source coordinates clamped to [-1, W] x [-1, H], every tap then lands in the padded
    image, and a tap outside the original image reads the border value, as in the C op.
    """
    imgs, batched = _check_images(_to_numpy(images, "images"))
    n, h, w, c = imgs.shape
    mats = _check_matrices(matrices, n)
    oh, ow = _out_hw(out_size)
    border = np.array(_border(border_value, c), dtype=np.uint8)
    inv = _inverse_f32(mats)  # (N, 6) float32

    out = np.empty((n, oh, ow, c), dtype=np.uint8)
    xs = np.arange(ow, dtype=np.float32)[None, None, :]  # (1, 1, ow)
    ys = np.arange(oh, dtype=np.float32)[None, :, None]  # (1, oh, 1)
    hp, wp = h + 3, w + 3  # padded size
    per_chunk = max(1, min(_REF_CHUNK_PIXELS // (oh * ow), _REF_CHUNK_PIXELS * 4 // (hp * wp * c)))
    lo, hi_x, hi_y = np.float32(-1.0), np.float32(w), np.float32(h)
    for s in range(0, n, per_chunk):
        e = min(n, s + per_chunk)
        b = e - s
        i = [inv[s:e, j][:, None, None] for j in range(6)]  # each (B, 1, 1)
        # Step 2: same operation order as the C op (each product and sum rounded to float32).
        sx = i[0] * xs + i[1] * ys + i[2]  # (B, oh, ow)
        sy = i[3] * xs + i[4] * ys + i[5]
        # Step 3: clamp (NaN -> -1).
        sx = np.where(sx >= lo, sx, lo)
        sx = np.where(sx <= hi_x, sx, hi_x)
        sy = np.where(sy >= lo, sy, lo)
        sy = np.where(sy <= hi_y, sy, hi_y)
        # Step 4.
        x0f, y0f = np.floor(sx), np.floor(sy)
        fx = (sx - x0f)[..., None]  # (B, oh, ow, 1)
        fy = (sy - y0f)[..., None]
        padded = np.empty((b, hp, wp, c), dtype=np.uint8)
        padded[...] = border
        padded[:, 1 : h + 1, 1 : w + 1] = imgs[s:e]
        flat = padded.reshape(-1, c)
        # Flat pixel index of tap (x0, y0) in the padded batch; the padding offset is +1.
        idx = (np.arange(b, dtype=np.intp)[:, None, None] * hp + (y0f.astype(np.intp) + 1)) * wp + (
            x0f.astype(np.intp) + 1
        )
        v00 = flat[idx].astype(np.float32)  # (B, oh, ow, C)
        v01 = flat[idx + 1].astype(np.float32)
        v10 = flat[idx + wp].astype(np.float32)
        v11 = flat[idx + wp + 1].astype(np.float32)
        # Steps 5-6.
        top = v00 + fx * (v01 - v00)
        bot = v10 + fx * (v11 - v10)
        v = np.floor(top + fy * (bot - top) + np.float32(0.5))
        out[s:e] = np.clip(v, 0, 255).astype(np.uint8)
    return out if batched else out[0]


def _warp_cuda(images, matrices, oh: int, ow: int, border_value):
    """images: torch CUDA uint8 tensor (H, W, C) or (N, H, W, C) -> same type on the same device."""
    import torch  # only here: vigface.data.align must not need torch to import

    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must have shape (H, W, C) or (N, H, W, C), got {tuple(images.shape)}")
    batched = images.dim() == 4
    src = (images if batched else images[None]).contiguous()
    n, h, w, c = src.shape
    if c not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels (last axis), got shape {tuple(images.shape)}")
    if h == 0 or w == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    border = _border(border_value, c)
    if isinstance(matrices, torch.Tensor) and matrices.is_cuda:
        # Device matrices are not checked (that would sync); a singular one yields a border-only image.
        if matrices.shape == (2, 3):
            matrices = matrices.expand(n, 2, 3)
        if tuple(matrices.shape) != (n, 2, 3):
            raise ValueError(
                f"matrices must have shape (2, 3) or ({n}, 2, 3) for {n} images, got {tuple(matrices.shape)}"
            )
        mats = matrices.to(device=src.device, dtype=torch.float32).contiguous()
    else:
        host = _check_matrices(matrices, n)
        _inverse_f32(host)  # fail here, with the sample index, rather than return border-only images
        mats = torch.from_numpy(host).to(src.device)
    out = torch.empty((n, oh, ow, c), dtype=torch.uint8, device=src.device)
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream(src.device).cuda_stream
        _C.warp_affine_cuda(
            src.data_ptr(), out.data_ptr(), mats.data_ptr(), n, h, w, c, oh, ow, border, stream
        )
    return out if batched else out[0]


def warp_affine(
    images,
    matrices,
    out_size=(112, 112),
    border_value=0,
    backend: str = "auto",
    num_threads: int = 0,
):
    """Bilinear warp of uint8 images by forward affine matrices (cv2.warpAffine semantics).

    images: (H, W, C) or (N, H, W, C) uint8, C in {1, 3, 4}: a numpy array, a torch CPU tensor,
        or (backend "cuda"/"auto") a torch CUDA tensor. The result has the same type and device.
    matrices: (2, 3) or (N, 2, 3), src -> dst (dst = M @ [x, y, 1]); one (2, 3) serves the batch.
    out_size: int or (height, width) of the output (NOT cv2's (width, height)).
    border_value: int in [0, 255], or one per channel; used for every tap outside the image.
    backend: "auto" | "c" | "numpy" | "cuda". num_threads: CPU threads of "c" (0 = all cores).
    Raises AlignmentError naming a non-invertible matrix, BackendUnavailableError for a backend
    that cannot run here.
    """
    _check_backend(backend)
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0 = all cores), got {num_threads}")
    oh, ow = _out_hw(out_size)
    tensor_type = _torch_tensor_type()
    is_tensor = tensor_type is not None and isinstance(images, tensor_type)

    if is_tensor and images.is_cuda:
        if backend in ("c", "numpy"):
            raise ValueError(
                f"images is a CUDA tensor but backend={backend!r} runs on host memory; "
                "pass images.cpu() or use backend='cuda'"
            )
        _require_cuda()
        if backend == "auto":
            _log_choice("warp_affine", "cuda")
        return _warp_cuda(images, matrices, oh, ow, border_value)
    if backend == "cuda":
        _require_cuda()
        raise ValueError(
            "backend='cuda' needs images as a torch CUDA tensor (e.g. torch.from_numpy(a).cuda())"
        )

    if is_tensor:  # CPU tensor: warp its numpy view, hand back a tensor
        import torch

        out = warp_affine(images.numpy(force=True), matrices, (oh, ow), border_value, backend, num_threads)
        return torch.from_numpy(out)

    if backend == "numpy" or (backend == "auto" and _C is None):
        if backend == "auto":
            _log_choice("warp_affine", "numpy")
        return warp_affine_ref(images, matrices, (oh, ow), border_value)
    _require_c()
    if backend == "auto":
        _log_choice("warp_affine", "c")
    imgs, batched = _check_images(_to_numpy(images, "images"))
    mats = _check_matrices(matrices, imgs.shape[0])
    border = _border(border_value, imgs.shape[3])
    _inverse_f32(mats)  # AlignmentError naming the sample; the C op would raise a ValueError
    out = _C.warp_affine(imgs, mats, oh, ow, border, num_threads)
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------
# Both together
# ---------------------------------------------------------------------------------------------


def align_faces(
    images,
    landmarks,
    out_size: int = 112,
    border_value=0,
    backend: str = "auto",
    num_threads: int = 0,
):
    """Align faces to the ArcFace template: returns (aligned images, matrices).

    images: (N, H, W, C) or (H, W, C) uint8 (numpy, or torch tensor on CPU/CUDA);
    landmarks: (N, 5, 2) or (5, 2) in the images' pixel coordinates (numpy or torch).
    out_size: side of the square crop; the template follows `arcface_template(out_size)`.
    Returns the aligned images (same type/device as `images`, out_size x out_size) and the
    float32 numpy matrices, (N, 2, 3) or (2, 3), mapping original -> aligned pixel coordinates
    (`transform_points(landmarks, matrices)` gives the landmarks in the crop).
    backend picks the warp; the similarity runs on "numpy" for backend="numpy", else on "c" when
    vigface._C is available.
    """
    _check_backend(backend)
    sim_backend = "numpy" if backend == "numpy" else "auto"
    matrices = estimate_similarity(landmarks, arcface_template(out_size), backend=sim_backend)
    aligned = warp_affine(images, matrices, (out_size, out_size), border_value, backend, num_threads)
    return aligned, matrices
