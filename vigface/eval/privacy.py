"""Do generated faces look like the people of the training set? A search against never-seen people.

The paper's privacy claim is that images of virtual identities are not images of anyone in the
real training set. "Nearest prototype" cannot show it: a classifier trained on n identities maps
every face, a person it never saw included, close to one of its n prototypes (on the toy world:
held-out people at cosine 0.63 to some training prototype). So each image is searched among the
real training images (its best cosine to one of them), and the bar is set by people the FR
model never saw: the `percentile`-th percentile of their best cosines. By construction
100 - percentile % of never-seen people pass it; images that look like training people (generated
real ids) pass it far more often, images of new people no more often.
"""

from __future__ import annotations

import numpy as np

from vigface.errors import VigfaceError


def _unit(embeddings, what: str) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) == 0:
        raise VigfaceError(
            f"training-set search: {what} must be a non-empty (N, d) array, got shape {e.shape}"
        )
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def best_match(probes, gallery) -> np.ndarray:
    """Each probe's highest cosine to any gallery embedding, (N,)."""
    p, g = _unit(probes, "probes"), _unit(gallery, "gallery")
    if p.shape[1] != g.shape[1]:
        raise VigfaceError(f"training-set search: probes are {p.shape[1]}-d, the gallery {g.shape[1]}-d")
    return (p @ g.T).max(axis=1)


def training_set_search(probes: dict, gallery, never_seen, percentile: float = 95.0) -> dict:
    """{"bar": the never-seen people's `percentile`-th best cosine, name: {"best_cos", "above_bar"}}
    for each probe set and for "never-seen people" themselves (mean best cosine, share above the bar).
    """
    if not 0 < percentile < 100:
        raise VigfaceError(f"training-set search: percentile must be in (0, 100), got {percentile}")
    reference = best_match(never_seen, gallery)
    bar = float(np.percentile(reference, percentile))
    result = {"bar": bar, "percentile": percentile}
    bests = {"never-seen people": reference, **{k: best_match(v, gallery) for k, v in probes.items()}}
    for name, best in bests.items():
        above = float((best > bar).mean())
        result[name] = {"best_cos": float(best.mean()), "above_bar": above, "images": len(best)}
    return result
