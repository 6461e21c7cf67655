"""The toy face world: determinism, exact landmark geometry, pose behaviour."""

import dataclasses
import math

import numpy as np

from vigface.data import toyfaces
from vigface.data.align import ARCFACE_TEMPLATE_112


def test_deterministic_from_seed_identity_index():
    a, la = toyfaces.render_wild(3, 11, 5)
    b, lb = toyfaces.render_wild(3, 11, 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = toyfaces.render_wild(3, 11, 6)
    d, _ = toyfaces.render_wild(4, 11, 5)
    assert np.abs(a.astype(int) - c).mean() > 5  # another image of the same person differs
    assert np.abs(a.astype(int) - d).mean() > 5  # another world differs
    assert toyfaces.identity_params(3, 11) == toyfaces.identity_params(3, 11)
    assert toyfaces.identity_params(3, 11) != toyfaces.identity_params(3, 12)


def _frontal(seed=0, identity=1, **changes):
    p = toyfaces.identity_params(seed, identity)
    n = toyfaces.nuisance_params(seed, identity, 0)
    base = dict(yaw=0.0, pitch=0.0, roll=0.0, scale=1.0, shift=(0.0, 0.0), smile=0.0, occlusion=0)
    base.update(changes)
    return p, dataclasses.replace(n, **base)


def test_roll_scale_shift_move_landmarks_by_exactly_that_similarity():
    p, n0 = _frontal()
    _, lm0 = toyfaces._draw_face(p, n0)
    roll, scale, shift = 0.3, 1.1, (3.0, -2.0)
    _, lm1 = toyfaces._draw_face(p, dataclasses.replace(n0, roll=roll, scale=scale, shift=shift))
    centre = np.array([toyfaces._Head.CX, toyfaces._Head.CY]) + (toyfaces.WILD_SIZE - 112) / 2
    c, s = math.cos(roll), math.sin(roll)
    expected = (lm0 - centre) @ (scale * np.array([[c, -s], [s, c]])).T + centre + shift
    np.testing.assert_allclose(lm1, expected, atol=1e-9)


def test_frontal_landmarks_sit_near_the_arcface_template():
    errs = []
    for identity in range(20):
        p, n = _frontal(identity=identity)
        _, lm = toyfaces._draw_face(p, n)
        errs.append(np.abs(lm - (toyfaces.WILD_SIZE - 112) / 2 - ARCFACE_TEMPLATE_112).max())
    # Identities differ in eye spacing and mouth width, so not exact, but the same face layout.
    assert np.median(errs) < 8


def test_yaw_swings_the_nose_further_than_the_eyes():
    p, n = _frontal()
    _, lm0 = toyfaces._draw_face(p, n)
    _, lm1 = toyfaces._draw_face(p, dataclasses.replace(n, yaw=0.5))
    eye_shift = (lm1[:2, 0] - lm0[:2, 0]).mean()
    nose_shift = lm1[2, 0] - lm0[2, 0]
    assert nose_shift > eye_shift > 0
    # Yaw foreshortens: the eyes come closer together.
    assert lm1[1, 0] - lm1[0, 0] < lm0[1, 0] - lm0[0, 0]


def test_aligned_images_put_landmarks_on_the_template():
    for index in range(10):
        img, lm = toyfaces.render_aligned(0, 2, index)
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        # A similarity cannot fit a yawed face exactly, but it lands near the template.
        assert np.abs(lm - ARCFACE_TEMPLATE_112).max() < 14
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # insightface order survives roll


def test_pose_range_controls_yaw():
    front = [toyfaces.nuisance_params(0, 1, k, yaw_range=(0.0, 0.1)).yaw for k in range(50)]
    side = [toyfaces.nuisance_params(0, 1, k, yaw_range=(0.5, 0.7)).yaw for k in range(50)]
    assert max(map(abs, front)) <= 0.1
    assert min(map(abs, side)) >= 0.5
    assert min(side) < 0 < max(side)  # both directions
