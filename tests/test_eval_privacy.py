"""The training-set search (vigface.eval.privacy) on hand-made embeddings with known answers."""

import numpy as np
import pytest

from vigface.errors import VigfaceError
from vigface.eval.privacy import best_match, training_set_search


def _at_cosine(cos: float) -> np.ndarray:
    """A 4-d vector at cosine `cos` to e1 (in the e1-e3 plane), scaled by 3: search must normalise."""
    return 3 * np.array([cos, 0.0, np.sqrt(1 - cos**2), 0.0])


def test_search_against_never_seen_people():
    gallery = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    never_seen = np.stack([_at_cosine(0.05 * k) for k in range(1, 21)])  # best cosines 0.05 ... 1.0
    probes = {
        "copies": np.array([[0, 5.0, 0, 0], [1.0, 0, 0, 0]]),  # training images themselves
        "strangers": np.array([[0, 0, 0, 1.0], [0, 0, 0, -2.0]]),  # orthogonal to everyone
        "mixed": np.stack([_at_cosine(0.99), _at_cosine(0.5)]),
    }
    np.testing.assert_allclose(best_match(never_seen, gallery), 0.05 * np.arange(1, 21), atol=1e-12)
    result = training_set_search(probes, gallery, never_seen, percentile=95)
    # numpy's linear percentile of 0.05 ... 1.0 at 95 %: position 0.95 * 19 = 18.05 -> 0.95 + 0.05 * 0.05
    assert result["bar"] == pytest.approx(0.9525)
    assert result["never-seen people"] == pytest.approx({"best_cos": 0.525, "above_bar": 0.05, "images": 20})
    assert result["copies"] == pytest.approx({"best_cos": 1.0, "above_bar": 1.0, "images": 2})
    assert result["strangers"] == pytest.approx({"best_cos": 0.0, "above_bar": 0.0, "images": 2})
    assert result["mixed"] == pytest.approx({"best_cos": 0.745, "above_bar": 0.5, "images": 2})


def test_bad_input_is_a_clear_error():
    gallery = np.eye(4)
    with pytest.raises(VigfaceError, match="probes are 3-d, the gallery 4-d"):
        best_match(np.ones((2, 3)), gallery)
    with pytest.raises(VigfaceError, match="gallery must be a non-empty"):
        best_match(np.ones((2, 4)), np.zeros((0, 4)))
    with pytest.raises(VigfaceError, match="percentile must be in"):
        training_set_search({}, gallery, np.ones((3, 4)), percentile=100)
