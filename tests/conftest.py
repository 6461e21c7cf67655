"""Shared fixtures: one small toy-world dataset per test session (made in a few seconds)."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. `triton.jit` reads this variable when
# a kernel module is imported, so it is set here, before any test module imports vigface.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.fr.config import FRTrainConfig
from vigface.fr.trainer import train_fr

SMALL_TOY = ToyConfig(ids=40, per_id=8, seed=3, pairs=200, val_ids=20, val_per_id=4, pose_per_id=2)


@pytest.fixture(scope="session")
def small_toy(tmp_path_factory):
    """40 identities x 8 aligned images in train.rec, plus 200-pair toy_val.bin / toy_pose.bin."""
    out = tmp_path_factory.mktemp("small_toy")
    make_toy_dataset(out, SMALL_TOY, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_fr_model(small_toy, tmp_path_factory):
    """A stage-1 model trained one epoch on small_toy (32 px, 32-d, 40 real + 10 virtual prototypes):
    the frozen FR network the stage-2 tests train and generate against."""
    out = tmp_path_factory.mktemp("tiny_fr_model")
    train_fr(
        FRTrainConfig(
            data=str(small_toy / "train.rec"), out=str(out), arch="iresnet18", width=8, input_size=32,
            embedding_dim=32, num_virtual=10, batch_size=16, epochs=1, lr_steps=[], scale=16.0, workers=0,
            progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture
def compile_calls(monkeypatch):
    """The modules torch.compile is called on during the test (the real torch.compile still runs)."""
    calls, real_compile = [], torch.compile

    def spy(model, **kwargs):
        calls.append(model)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    return calls
