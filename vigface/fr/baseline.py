"""The untrained baseline: how well a run's *initial* backbone verifies faces.

"Accuracy rises well above its untrained value" needs a fair untrained value. An untrained net in
eval mode uses BatchNorm's initial running statistics (mean 0, var 1), so every embedding shares
one huge common component (all cosines ~0.9999) and the number measures that artefact. Here the
BN statistics are first set from training images (no weight changes), so the baseline measures
random features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vigface.data.loaders.source import open_face_dataset
from vigface.data.verification_bin import load_verification_pairs
from vigface.eval.verification import verify_embeddings
from vigface.fr.config import FRTrainConfig
from vigface.fr.embed import embed_images, to_input
from vigface.fr.iresnet import build_backbone
from vigface.fr.rng import step_seed


@torch.no_grad()
def calibrate_batchnorm(
    model: torch.nn.Module, images_u8: torch.Tensor, input_size: int, batch: int = 128
) -> None:
    """Replace BN running statistics with their cumulative average over `images_u8` (N, H, W, 3)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for chunk in images_u8.split(batch):
        model(to_input(chunk, input_size))
    model.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def untrained_accuracy(config: FRTrainConfig, val: list[str], calibration_images: int = 2048) -> dict:
    """{bin stem: 10-fold accuracy} of the backbone `train_fr(config)` starts from."""
    torch.manual_seed(step_seed(config.seed, 0, "init"))  # the trainer's initial weights
    model = build_backbone(config.backbone_config())
    dataset = open_face_dataset(config.data)
    pick = np.random.default_rng(0).permutation(len(dataset))[:calibration_images]
    images = torch.from_numpy(np.stack([dataset[int(i)][0] for i in pick]))
    calibrate_batchnorm(model, images, config.input_size)
    result = {}
    for path in val:
        pairs, issame = load_verification_pairs(path)
        emb = embed_images(model.eval(), pairs)
        result[Path(path).stem] = round(verify_embeddings(emb, np.asarray(issame)).accuracy, 4)
    return result
