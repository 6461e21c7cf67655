"""SER-FIQ face-image quality: how robust an image's embedding is to dropout in the embedding head.

Terhörst et al., CVPR 2020 ("stochastic embedding robustness"): pass the image through the FR
model `m` times with dropout switched on in the last layers, L2-normalise the m stochastic
embeddings x_1..x_m, and score

    q = 2 * sigmoid(-(2 / m^2) * sum_{i<j} ||x_i - x_j||)                          (SER-FIQ eq. 2)

Identical passes give q = 1 (the maximum); the more the passes disagree, the lower q. This is the
paper's formula; the authors' released code divides the pair sum by m (m - 1) / 2 (a mean) instead
of m^2 / 2, so its exponent is m / (m - 1) times ours (1 % apart at m = 100). The paper's
DIV (eqs. 11-12, `vigface.eval.metrics.class_diversity`) is the per-class variance of this score.

Only the head is stochastic: the convolutional trunk runs once per image and the m passes redo
dropout -> FC -> feature BN on its output, so m = 100 costs little more than one forward pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vigface.errors import VigfaceError

DEFAULT_PASSES = 100  # the SER-FIQ paper's m
MAX_PASSES = 10_000  # far past where the score settles; 10**8 asked torch for 200 GB
DEFAULT_DROPOUT = 0.5  # used when the backbone has no dropout of its own (the SER-FIQ paper's rate)


def serfiq_quality(stochastic: np.ndarray) -> np.ndarray:
    """(N, m, d) stochastic embeddings (normalised here) -> (N,) SER-FIQ scores in (0, 1]."""
    x = np.asarray(stochastic, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] < 2:
        raise VigfaceError(f"SER-FIQ: need (N, m >= 2, d) stochastic embeddings, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    m = x.shape[1]
    gram = np.einsum("nid,njd->nij", x, x)
    dist = np.sqrt(np.clip(2.0 - 2.0 * gram, 0.0, None))  # unit vectors: ||a - b||^2 = 2 - 2 a.b
    upper_i, upper_j = np.triu_indices(m, k=1)
    pair_sum = dist[:, upper_i, upper_j].sum(axis=1)
    return 2.0 / (1.0 + np.exp((2.0 / m**2) * pair_sum))  # 2 sigmoid(-s)


def _trunk_and_head(model: torch.nn.Module):
    """The IResNet pieces: trunk(x) -> flat features, head(features) -> embedding."""
    needed = ("stem", "stages", "bn", "fc", "features")
    if not all(hasattr(model, name) for name in needed):
        raise VigfaceError(
            f"SER-FIQ: the model must be a vigface IResNet (with {', '.join(needed)}), "
            f"got {type(model).__name__}"
        )

    def trunk(x):
        return model.bn(model.stages(model.stem(x))).flatten(1)  # (N, 8w * s * s)

    def head(h):
        with torch.autocast(h.device.type, enabled=False):
            return model.features(model.fc(h.float()))  # (N, dim)

    return trunk, head


@torch.no_grad()
def serfiq_scores(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    passes: int = DEFAULT_PASSES,
    dropout: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(N,) SER-FIQ scores of uint8 (N, H, W, 3) images with a vigface backbone.

    `dropout`: the rate of the stochastic passes; None takes the backbone's own dropout rate, or
    0.5 when it has none (iresnet models train without dropout; IR-SE-50 uses 0.4).
    """
    from vigface.fr.embed import to_input

    if not 2 <= passes <= MAX_PASSES:
        raise VigfaceError(f"SER-FIQ: passes must be in 2..{MAX_PASSES:,}, got {passes:,}")
    # Each pass holds a copy of the batch's trunk features: keep passes x batch at the default's
    # 100 x 128 (a score does not depend on its batch, see below).
    batch_size = max(1, min(batch_size, DEFAULT_PASSES * 128 // passes))
    if dropout is None:
        own = getattr(getattr(model, "dropout", None), "p", 0.0)
        dropout = own if own > 0 else DEFAULT_DROPOUT
    if not 0 < dropout < 1:
        raise VigfaceError(f"SER-FIQ: dropout must be in (0, 1), got {dropout}")
    trunk, head = _trunk_and_head(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()  # batch norm on running statistics; only our own masks are random
    g = torch.Generator(device="cpu")
    input_size = model.config.input_size
    scores = []
    try:
        for lo in range(0, len(images), batch_size):
            x = to_input(torch.as_tensor(np.asarray(images[lo : lo + batch_size])).to(device), input_size)
            h = trunk(x)  # (B, F)
            # Each image's m dropout masks come from its own (seed, index) stream, so a score does
            # not depend on the batch the image was in.
            keep = (
                torch.stack(
                    [
                        torch.rand((passes, h.shape[1]), generator=g.manual_seed(seed * 1_000_003 + lo + i))
                        for i in range(len(h))
                    ],
                    dim=1,
                )
                >= dropout
            )  # (m, B, F)
            h = h.unsqueeze(0) * keep.to(device) / (1.0 - dropout)
            e = head(h.reshape(-1, h.shape[-1])).reshape(passes, len(x), -1)  # (m, B, d)
            e = F.normalize(e, dim=2).transpose(0, 1).double().cpu().numpy()  # (B, m, d)
            scores.append(serfiq_quality(e))
    finally:
        model.train(was_training)
    return np.concatenate(scores) if scores else np.zeros(0)
