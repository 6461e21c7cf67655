"""Dataset properties of paper §5.2 (Fig. 8): intra-class consistency, diversity, separability.

With u_i = f(x_i) / ||f(x_i)|| the FR embedding of image i and class k holding N images:

    CST_k = 1/N^2 sum_i sum_j u_i . u_j                    (eq. 10; = ||mean_i u_i||^2, i = j included)
    DIV_k = 1/N sum_i (q_i - mean q)^2                     (eqs. 11-12; q = SER-FIQ score, see serfiq.py)
    SEP_k = 1/N sum_i CCS_i / NNCCS_i                      (eqs. 13-14)
        CCS_i   = cos(u_i, c_k)          c_k = mean of class k's embeddings (its centre)
        NNCCS_i = max_{j != k} cos(u_i, c_j)   the nearest other class centre

SEP is the paper's ratio as written: it is > 1 when images sit closer to their own centre than to
any other, and it is undefined (we return inf or a negative number) when no other centre has a
positive cosine, which happens only with very few, mutually orthogonal classes. The means of CCS
and NNCCS are returned beside it so the ratio can be read.
"""

from __future__ import annotations

import numpy as np

from vigface.errors import VigfaceError


def _prepare(embeddings, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit embeddings float64, class index per row 0..C-1, the sorted class labels)."""
    e = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if e.ndim != 2 or labels.shape != (len(e),):
        raise VigfaceError(f"metrics: need (N, d) embeddings and N labels, got {e.shape} and {labels.shape}")
    if not len(e):
        raise VigfaceError("metrics: no embeddings")
    if not np.all(np.isfinite(e)):
        raise VigfaceError("metrics: embeddings contain NaN or inf")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if not norms.all():  # it has no direction: its cosines came out 0, and SEP 0 / 0 = NaN
        raise VigfaceError(f"metrics: embedding row {int(np.argmin(norms))} is all zeros")
    e = e / norms
    classes, index = np.unique(labels, return_inverse=True)
    return e, index, classes


def _class_means(e: np.ndarray, index: np.ndarray, num_classes: int) -> np.ndarray:
    sums = np.zeros((num_classes, e.shape[1]))
    np.add.at(sums, index, e)
    return sums / np.bincount(index, minlength=num_classes)[:, None]


def class_consistency(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    """(classes, CST per class), eq. 10."""
    e, index, classes = _prepare(embeddings, labels)
    means = _class_means(e, index, len(classes))
    return classes, np.sum(means * means, axis=1)  # 1/N^2 sum_ij u_i.u_j = ||mean u||^2


def class_diversity(quality, labels) -> tuple[np.ndarray, np.ndarray]:
    """(classes, DIV per class): the population variance of the quality scores, eqs. 11-12."""
    q = np.asarray(quality, dtype=np.float64)
    labels = np.asarray(labels)
    if q.ndim != 1 or labels.shape != q.shape:
        raise VigfaceError(f"metrics: need N quality scores and N labels, got {q.shape} and {labels.shape}")
    if not len(q):
        raise VigfaceError("metrics: no quality scores")
    if not np.all(np.isfinite(q)):  # a NaN score made its class's DIV, and the average, NaN
        raise VigfaceError("metrics: quality scores contain NaN or inf")
    classes, index = np.unique(labels, return_inverse=True)
    n = np.bincount(index, minlength=len(classes))
    mean = np.bincount(index, weights=q, minlength=len(classes)) / n
    return classes, np.bincount(index, weights=(q - mean[index]) ** 2, minlength=len(classes)) / n


def class_separability(embeddings, labels) -> dict:
    """{"classes", "sep", "ccs", "nnccs"} per class (eqs. 13-14; ccs/nnccs are class means)."""
    e, index, classes = _prepare(embeddings, labels)
    if len(classes) < 2:
        raise VigfaceError("metrics: separability needs at least two classes")
    centres = _class_means(e, index, len(classes))
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    n = np.bincount(index, minlength=len(classes))
    ccs = np.empty(len(e))
    nnccs = np.empty(len(e))
    for lo in range(0, len(e), 4096):  # (rows, C) at a time keeps memory O(4096 C)
        cos = e[lo : lo + 4096] @ centres.T
        own = index[lo : lo + 4096]
        rows = np.arange(len(cos))
        ccs[lo : lo + 4096] = cos[rows, own]
        cos[rows, own] = -np.inf
        nnccs[lo : lo + 4096] = cos.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ccs / nnccs

    def per_class(x):
        return np.bincount(index, weights=x, minlength=len(classes)) / n

    return {"classes": classes, "sep": per_class(ratio), "ccs": per_class(ccs), "nnccs": per_class(nnccs)}


def dataset_metrics(embeddings, labels, quality=None) -> dict:
    """CST, DIV (when `quality` is given), SEP averaged over classes, plus the per-class values."""
    classes, cst = class_consistency(embeddings, labels)
    result = {
        "images": len(np.asarray(labels)),
        "classes": len(classes),
        "cst": float(cst.mean()),
        "per_class": {"label": classes.tolist(), "cst": cst.tolist()},
    }
    if quality is not None:
        _, div = class_diversity(quality, labels)
        result["div"] = float(div.mean())
        result["quality_mean"] = float(np.mean(quality))
        result["per_class"]["div"] = div.tolist()
    if len(classes) >= 2:
        sep = class_separability(embeddings, labels)
        result.update(
            sep=float(sep["sep"].mean()), ccs=float(sep["ccs"].mean()), nnccs=float(sep["nnccs"].mean())
        )
        result["per_class"]["sep"] = sep["sep"].tolist()
    return result
