"""vigface.data.align: the C/CUDA ops against the NumPy references, and hand-checkable cases.

The warp is specified exactly (csrc/warp_affine.h), so C, CUDA and NumPy agree bit for bit; the
tests still allow the 1 intensity level the API promises and print the real difference.
"""

from __future__ import annotations

import numpy as np
import pytest

from vigface.data import align
from vigface.errors import AlignmentError, BackendUnavailableError

HAS_C = align._C is not None
needs_c = pytest.mark.skipif(not HAS_C, reason="vigface._C is not built")
SIM_BACKENDS = ["numpy", pytest.param("c", marks=needs_c)]
T112 = align.ARCFACE_TEMPLATE_112.astype(np.float64)


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    """(2, 3) float64: rotate by `angle` (radians), scale, then translate."""
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def random_matrices(rng: np.random.Generator, n: int, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    """(n, 2, 3) float32 similarities + shear from source to output, some pushing far out of the image."""
    mats = np.empty((n, 2, 3), dtype=np.float32)
    for i in range(n):
        m = similarity(rng.uniform(0.5, 2.0), rng.uniform(-np.pi, np.pi), 0.0, 0.0)
        m[:, :2] += rng.normal(scale=0.1, size=(2, 2))  # a bit of shear: a general affine map
        # Put the source centre near the output centre, off by up to ~half an image (border taps).
        centre = np.array([w / 2, h / 2]) + rng.normal(scale=0.3, size=2) * [w, h]
        m[:, 2] = np.array([out_w / 2, out_h / 2]) - m[:, :2] @ centre
        mats[i] = m
    return mats


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SIM_BACKENDS)
@pytest.mark.parametrize(
    "scale, angle, tx, ty",
    [(1.0, 0.0, 0.0, 0.0), (0.37, 0.4, 12.5, -30.0), (2.5, -2.9, 300.0, 41.0), (1.3, np.pi, -7.0, 7.0)],
)
def test_similarity_recovers_exact_transform(backend, scale, angle, tx, ty):
    m_true = similarity(scale, angle, tx, ty)
    # landmarks whose image under m_true is exactly the template
    inv = np.linalg.inv(np.vstack([m_true, [0, 0, 1]]))[:2]
    landmarks = apply(inv, T112)
    m = align.estimate_similarity(landmarks, backend=backend)
    assert m.shape == (2, 3) and m.dtype == np.float32
    np.testing.assert_allclose(m, m_true, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", SIM_BACKENDS)
def test_similarity_custom_template_any_k(backend):
    rng = np.random.default_rng(1)
    template = rng.uniform(0, 100, size=(3, 2))
    m_true = similarity(0.8, 1.1, 5.0, -3.0)
    inv = np.linalg.inv(np.vstack([m_true, [0, 0, 1]]))[:2]
    landmarks = np.stack([apply(inv, template)] * 4)  # (4, 3, 2)
    m = align.estimate_similarity(landmarks, template=template, backend=backend)
    assert m.shape == (4, 2, 3)
    np.testing.assert_allclose(m, np.broadcast_to(m_true, (4, 2, 3)), atol=1e-4, rtol=0)
    # K = 2 (two points define a similarity exactly)
    m2 = align.estimate_similarity(landmarks[0, :2], template=template[:2], backend=backend)
    np.testing.assert_allclose(m2, m_true, atol=1e-4, rtol=0)


@needs_c
def test_similarity_c_matches_numpy_random():
    rng = np.random.default_rng(0)
    landmarks = rng.normal(size=(300, 5, 2)) * rng.uniform(1, 200, size=(300, 1, 1)) + rng.uniform(
        -50, 500, (300, 1, 2)
    )
    landmarks = landmarks.astype(np.float32)
    m_c = align.estimate_similarity(landmarks, backend="c")
    m_np = align.estimate_similarity(landmarks, backend="numpy")
    assert m_c.shape == (300, 2, 3) and m_c.dtype == np.float32
    np.testing.assert_allclose(m_c, m_np, rtol=1e-5, atol=1e-4)
    # both are rotations times a positive scale: never a reflection
    assert (np.linalg.det(m_c[:, :, :2]) > 0).all()


@pytest.mark.parametrize("backend", SIM_BACKENDS)
def test_similarity_collinear_and_near_degenerate(backend):
    t = np.linspace(-1, 1, 5)[:, None]
    cases = {
        "horizontal line": np.hstack([40 + 30 * t, np.full_like(t, 60.0)]),
        "diagonal line": np.hstack([50 + 20 * t, 70 - 25 * t]),
        "two distinct points": np.array([[10.0, 10.0]] * 4 + [[20.0, 30.0]]),
        "tiny spread far away": 1000.0 + 1e-2 * np.random.default_rng(3).normal(size=(5, 2)),
    }
    landmarks = np.stack(list(cases.values()))
    m = align.estimate_similarity(landmarks, backend=backend)
    assert np.isfinite(m).all()
    assert (np.linalg.det(m[:, :, :2].astype(np.float64)) > 0).all()
    ref = align.estimate_similarity_ref(landmarks)
    np.testing.assert_allclose(m, ref, rtol=1e-4, atol=1e-3)
    # Least squares: no small perturbation of the fitted parameters lowers the residual.
    for i in range(len(landmarks)):
        m64 = m[i].astype(np.float64)

        def residual(a, b, tx, ty, i=i):
            return ((apply(np.array([[a, -b, tx], [b, a, ty]]), landmarks[i]) - T112) ** 2).sum()

        base = residual(m64[0, 0], m64[1, 0], m64[0, 2], m64[1, 2])
        for k in range(4):
            params = [m64[0, 0], m64[1, 0], m64[0, 2], m64[1, 2]]
            params[k] += 1e-3 * max(1.0, abs(params[k]))
            assert residual(*params) >= base * (1 - 1e-6)


@pytest.mark.parametrize("backend", SIM_BACKENDS)
def test_similarity_never_reflects(backend):
    mirrored = T112 * [-1, 1] + [112, 0]  # left/right swapped image of the template
    m = align.estimate_similarity(mirrored, backend=backend)
    assert np.linalg.det(m[:, :2].astype(np.float64)) > 0
    np.testing.assert_allclose(m, align.estimate_similarity_ref(mirrored), atol=1e-4)


@pytest.mark.parametrize("backend", SIM_BACKENDS)
def test_similarity_bad_samples_name_the_index(backend):
    good = np.broadcast_to(T112, (6, 5, 2)).copy()
    same = good.copy()
    same[3] = [[50.0, 60.0]] * 5
    with pytest.raises(AlignmentError, match=r"landmarks\[3\].*equal"):
        align.estimate_similarity(same, backend=backend)
    nan = good.copy()
    nan[1, 2, 0] = np.nan
    nan[4, 0, 1] = np.inf
    with pytest.raises(AlignmentError, match=r"landmarks\[1\].*NaN.*2 bad samples.*\[1, 4\]"):
        align.estimate_similarity(nan, backend=backend)
    with pytest.raises(AlignmentError, match=r"landmarks\[0\]"):
        align.estimate_similarity(np.full((5, 2), 7.0), backend=backend)


@pytest.mark.parametrize("backend", SIM_BACKENDS)
def test_similarity_argument_errors(backend):
    with pytest.raises(ValueError, match="landmarks must have shape"):
        align.estimate_similarity(np.zeros((5, 3)), backend=backend)
    with pytest.raises(ValueError, match="template has 5"):
        align.estimate_similarity(np.zeros((2, 4, 2)), backend=backend)
    with pytest.raises(TypeError, match="landmarks must hold real numbers"):
        align.estimate_similarity(np.zeros((5, 2), dtype=complex), backend=backend)
    with pytest.raises(ValueError, match="template points are all"):
        align.estimate_similarity(T112, template=np.ones((5, 2)), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        align.estimate_similarity(T112, backend="gpu")


def test_arcface_template_sizes():
    np.testing.assert_array_equal(align.arcface_template(112), align.ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(align.arcface_template(224), T112 * 2, rtol=1e-6)
    np.testing.assert_allclose(align.arcface_template(56), T112 / 2, rtol=1e-6)
    np.testing.assert_allclose(align.arcface_template(128), T112 + [8, 0], rtol=1e-6)  # insightface rule


# ---------------------------------------------------------------------------------------------
# Warp
# ---------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize(
    "n, h, w, c, out_size",
    [(5, 112, 112, 3, (112, 112)), (1, 37, 53, 1, (41, 29)), (3, 20, 17, 4, (31, 33)), (4, 144, 144, 3, 112)],
)
def test_warp_c_matches_numpy(n, h, w, c, out_size):
    rng = np.random.default_rng(n * 1000 + h + c)
    images = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    mats = random_matrices(rng, n, h, w, out_h, out_w)
    border = [int(v) for v in rng.integers(0, 256, size=c)]
    out_c = align.warp_affine(images, mats, out_size, border, backend="c")
    out_np = align.warp_affine(images, mats, out_size, border, backend="numpy")
    assert out_c.shape == out_np.shape == (n, out_h, out_w, c) and out_c.dtype == np.uint8
    diff = np.abs(out_c.astype(np.int16) - out_np).max()
    print(f"warp C vs NumPy max abs diff: {diff}")
    assert diff <= 1
    # the random matrices send some pixels outside the source: the border is exercised
    assert any((out_np[i] == border).all(axis=-1).any() for i in range(n))


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("c", [1, 3, 4])
def test_warp_identity_is_exact(backend, c):
    rng = np.random.default_rng(c)
    images = rng.integers(0, 256, size=(2, 23, 31, c), dtype=np.uint8)
    eye = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    out = align.warp_affine(images, eye, (23, 31), border_value=255, backend=backend)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_warp_half_pixel_shift_averages_neighbours(backend):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(9, 12, 1), dtype=np.uint8)
    # dst = src - 0.5 in x, so dst pixel x samples src x + 0.5: the mean of columns x and x + 1
    m = np.array([[1, 0, -0.5], [0, 1, 0]], dtype=np.float32)
    out = align.warp_affine(image, m, (9, 12), border_value=100, backend=backend)
    a = image[:, :-1, 0].astype(np.int32)
    b = image[:, 1:, 0].astype(np.int32)
    np.testing.assert_array_equal(out[:, :-1, 0], (a + b + 1) // 2)  # round half up
    # the last column's right tap is outside: the border value stands in for it
    np.testing.assert_array_equal(out[:, -1, 0], (image[:, -1, 0].astype(np.int32) + 100 + 1) // 2)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_warp_outside_is_border_and_single_image(backend):
    image = np.full((10, 10, 3), 9, dtype=np.uint8)
    far = np.array([[1, 0, 1000], [0, 1, 0]], dtype=np.float32)  # the image lands far to the right
    out = align.warp_affine(image, far, 16, border_value=(1, 2, 3), backend=backend)
    assert out.shape == (16, 16, 3)
    assert (out == [1, 2, 3]).all()


@needs_c
def test_warp_threads_agree():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(7, 60, 50, 3), dtype=np.uint8)
    mats = random_matrices(rng, 7, 60, 50, 112, 112)
    outs = [align.warp_affine(images, mats, backend="c", num_threads=t) for t in (1, 2, 3, 0)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_warp_errors(backend):
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    mats = np.tile(np.eye(2, 3, dtype=np.float32), (2, 1, 1))
    mats[1, :, :2] = 0  # singular
    with pytest.raises(AlignmentError, match=r"matrices\[1\] is not invertible"):
        align.warp_affine(images, mats, backend=backend)
    with pytest.raises(TypeError, match="images must be uint8"):
        align.warp_affine(images.astype(np.float32), mats[:1].repeat(2, 0), backend=backend)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        align.warp_affine(np.zeros((2, 8, 8, 2), np.uint8), mats, backend=backend)
    with pytest.raises(ValueError, match=r"matrices must have shape \(2, 3\) or \(2, 2, 3\)"):
        align.warp_affine(images, np.zeros((3, 2, 3)), backend=backend)
    with pytest.raises(ValueError, match="border_value"):
        align.warp_affine(images, mats[0], border_value=300, backend=backend)


def test_warp_torch_cpu_tensor_round_trip():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(2, 30, 30, 3), dtype=np.uint8)
    mats = random_matrices(rng, 2, 30, 30, 24, 24)
    out = align.warp_affine(torch.from_numpy(images), torch.from_numpy(mats), 24)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), align.warp_affine_ref(images, mats, 24))


def test_backend_availability_errors(monkeypatch):
    if "cuda" not in align.available_backends():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            align.warp_affine(np.zeros((8, 8, 3), np.uint8), np.eye(2, 3), backend="cuda")
    monkeypatch.setattr(align, "_C", None)
    with pytest.raises(BackendUnavailableError, match=r"vigface\._C"):
        align.warp_affine(np.zeros((8, 8, 3), np.uint8), np.eye(2, 3), backend="c")
    with pytest.raises(BackendUnavailableError, match=r"vigface\._C"):
        align.estimate_similarity(T112, backend="c")
    assert align.available_backends() == ["numpy"]
    # "auto" falls back to NumPy
    assert align.warp_affine(np.zeros((8, 8, 3), np.uint8), np.eye(2, 3), 4).shape == (4, 4, 3)


# ---------------------------------------------------------------------------------------------
# Alignment end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size", [112, 56])
def test_align_faces_and_transform_points(out_size):
    rng = np.random.default_rng(11)
    # Faces in a 144x144 frame: the template, moved by a random similarity per image.
    m_true = np.stack([similarity(rng.uniform(0.9, 1.3), rng.uniform(-0.5, 0.5), 15, 20) for _ in range(3)])
    landmarks = np.stack([apply(m, T112) for m in m_true]).astype(np.float32)
    images = rng.integers(0, 256, size=(3, 144, 144, 3), dtype=np.uint8)
    aligned, mats = align.align_faces(images, landmarks, out_size=out_size)
    assert aligned.shape == (3, out_size, out_size, 3) and mats.shape == (3, 2, 3)
    mapped = align.transform_points(landmarks, mats)
    np.testing.assert_allclose(
        mapped, np.broadcast_to(align.arcface_template(out_size), (3, 5, 2)), atol=1e-3
    )
    # invert_affine maps the aligned landmarks back
    back = align.transform_points(mapped, align.invert_affine(mats))
    np.testing.assert_allclose(back, landmarks, atol=1e-3)
    # the same through the NumPy backend, bit for bit
    aligned_np, mats_np = align.align_faces(images, landmarks, out_size=out_size, backend="numpy")
    np.testing.assert_allclose(mats_np, mats, atol=1e-4)
    if np.array_equal(mats_np, mats):
        np.testing.assert_array_equal(aligned_np, aligned)


def test_align_single_image_shapes():
    image = np.zeros((144, 144, 3), dtype=np.uint8)
    aligned, m = align.align_faces(image, T112 + 10)
    assert aligned.shape == (112, 112, 3) and m.shape == (2, 3)
    assert align.transform_points(T112, m).shape == (5, 2)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a device)
# ---------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("c", [1, 3, 4])
def test_warp_cuda_matches_cpu(c):
    import torch

    if "cuda" not in align.available_backends():
        pytest.skip("vigface._C was built without CUDA")
    rng = np.random.default_rng(40 + c)
    n, h, w = 9, 131, 97
    images = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    mats = random_matrices(rng, n, h, w, 112, 112)
    ref = align.warp_affine(images, mats, 112, 17, backend="c")
    dev = torch.from_numpy(images).cuda()
    out = align.warp_affine(dev, mats, 112, 17, backend="cuda")  # host matrices
    assert out.is_cuda and out.shape == (n, 112, 112, c)
    diff = np.abs(out.cpu().numpy().astype(np.int16) - ref).max()
    print(f"warp CUDA vs C max abs diff: {diff}")
    assert diff <= 1
    # a non-contiguous batch with device matrices, through backend="auto"
    out2 = align.warp_affine(dev[::2], torch.from_numpy(mats[::2].copy()).cuda(), 112, 17)
    np.testing.assert_array_equal(out2.cpu().numpy(), out[::2].cpu().numpy())
    # a side stream and a single image
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out3 = align.warp_affine(dev[0], mats[0], 112, 17, backend="cuda")
    stream.synchronize()
    np.testing.assert_array_equal(out3.cpu().numpy(), out[0].cpu().numpy())
