"""The report's figures, each returned as PNG bytes (matplotlib, Agg backend).

sample_grid_png          rows of generated images, one row per identity (Figs. 6-7)
similarity_histograms_png genuine / imposter cosine histograms of several datasets (Fig. 5)
metric_bars_png          CST, DIV, SEP per dataset + CST-vs-SEP with DIV as circle size (Fig. 8)
cfg_sweep_png            Table 1's IoU against the guidance scale w, real and virtual ids
prototype_matrix_png     cosine matrix of real and virtual prototypes (Fig. 3a)
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

from vigface.eval.similarity import HIST_BINS, HIST_RANGE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def grid_rows(images: np.ndarray, labels: np.ndarray, ids: int, per_id: int) -> tuple[list, list]:
    """The first `per_id` images of each of the first `ids` labels, and a row name per label."""
    rows, names = [], []
    for label in np.unique(labels)[:ids]:
        rows.append(images[labels == label][:per_id])
        names.append(f"id {label}")
    return rows, names


def sample_grid_png(rows: list[np.ndarray], row_labels: list[str], title: str = "") -> bytes:
    """rows[r]: uint8 (M, H, W, 3) images of identity r, drawn left to right."""
    plt = _pyplot()
    cols = max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(0.9 * cols + 1.2, 0.9 * len(rows) + 0.5), dpi=100, squeeze=False
    )
    for r, images in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return _png(fig)


def similarity_histograms_png(histograms: dict, title: str = "") -> bytes:
    """histograms: {name: {"genuine": h, "imposter": h}} of `similarity.histogram` (HIST_BINS bins
    over HIST_RANGE); solid lines genuine pairs, dashed lines imposter pairs, one colour per name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
    edges = np.linspace(*HIST_RANGE, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, h) in enumerate(histograms.items()):
        colour = colours[k % len(colours)]
        ax.plot(centres, h["genuine"], color=colour, lw=1.4, label=f"{name} genuine")
        ax.plot(centres, h["imposter"], color=colour, lw=1.2, ls="--", label=f"{name} imposter")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(
        title or "intra-class (genuine, solid) and inter-class (imposter, dashed) similarity", fontsize=9
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _png(fig)


def metric_bars_png(metrics: dict) -> bytes:
    """metrics: {dataset name: {"cst", "div", "sep"}} -> three bar panels and the Fig. 8 scatter."""
    plt = _pyplot()
    names = list(metrics)
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in zip(
        axes[:3],
        ("cst", "div", "sep"),
        ("CST (consistency)", "DIV (diversity)", "SEP (separability)"),
        strict=True,
    ):
        values = [metrics[n].get(key, np.nan) for n in names]
        ax.bar(range(len(names)), values, color=[colours[i % len(colours)] for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            if np.isfinite(v):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax = axes[3]
    divs = np.array([metrics[n].get("div", np.nan) for n in names], dtype=float)
    scale = 600 / np.nanmax(divs) if np.any(np.isfinite(divs)) and np.nanmax(divs) > 0 else 0
    for i, n in enumerate(names):
        size = 40 + (divs[i] * scale if np.isfinite(divs[i]) else 0)
        ax.scatter(metrics[n].get("cst", np.nan), metrics[n].get("sep", np.nan), s=size, alpha=0.6,
                   color=colours[i % len(colours)], label=n)  # fmt: skip
    ax.set_xlabel("CST", fontsize=8)
    ax.set_ylabel("SEP", fontsize=8)
    ax.set_title("CST vs SEP (size: DIV)", fontsize=9)
    ax.legend(fontsize=6, markerscale=0.4)
    fig.tight_layout()
    return _png(fig)


def cfg_sweep_png(sweep: dict) -> bytes:
    """IoU (genuine, imposter, average) against w for real and virtual ids, the picked w marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.0), dpi=110, sharey=True)
    ws = sweep["w"]
    for ax, kind in zip(axes, ("real", "virtual"), strict=True):
        rows = sweep[kind]
        for key, style in (("genuine", "-o"), ("imposter", "--s"), ("average", "-^")):
            ax.plot(ws, [r[key] for r in rows], style, label=key, ms=4)
        ax.axvline(sweep["picked"][kind], color="k", lw=0.8, ls=":")
        ax.set_title(f"{kind} ids: picked w = {sweep['picked'][kind]:g}", fontsize=9)
        ax.set_xlabel("guidance scale w")
    axes[0].set_ylabel("IoU with real data")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def prototype_matrix_png(real, virtual, per_group: int = 100, title: str = "") -> bytes:
    """Fig. 3a via vigface.eval.prototypes.plot_prototype_similarity (which writes a file)."""
    from vigface.eval.prototypes import plot_prototype_similarity

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prototypes.png"
        plot_prototype_similarity(real, virtual, path, per_group=per_group, title=title)
        return path.read_bytes()
