"""The paper's evaluation protocol as one call: train IR-SE-50 + AdaFace on a (generated) dataset,
verify it on the five benchmark .bin sets, and put the result beside the published peers.

    run_protocol(ProtocolConfig(data="gen/train.rec", out="runs/protocol",
                                bins=["lfw.bin", "cfp_fp.bin", "cplfw.bin", "agedb_30.bin", "calfw.bin"]))

The peers (vigface.eval.peers) are the table of the VIGFace README (all trained with IR-SE50 +
AdaFace; numbers except CASIA-WebFace and VIGFace from the peers' own papers). Gap-to-Real is
computed against a named real reference: the README's "CASIA (Real)" row by default, or a model of
our own (`real_model=`, a vigface-train-fr folder) evaluated on the same .bin files.

The training recipe defaults to AdaFace's CASIA-WebFace one at full size (IR-SE-50, 112 px,
512-d, m = 0.4, s = 64, SGD lr 0.1, 26 epochs with lr x0.1 at 12, 20, 24). CPU runs shrink
`width`, `input_size` and `epochs`; the lr steps then stay at the same fractions of the run
(12/26, 20/26, 24/26 of `epochs`) unless `lr_steps` is given. The recipe used is written into the
result.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vigface.data.files import write_atomically
from vigface.data.verification_bin import read_bin
from vigface.device import resolve_device
from vigface.errors import VigfaceError
from vigface.eval.peers import DEFAULT_REAL_REFERENCE, PEER_COLUMNS, PEER_NOTE, peer_average, peer_rows
from vigface.eval.verification import BENCHMARKS, gap_to_real, summarise, verify_bins

ADAFACE_EPOCHS, ADAFACE_LR_STEPS = 26, (12, 20, 24)  # AdaFace's CASIA-WebFace schedule


@dataclass
class ProtocolConfig:
    data: str  # the dataset to train on (train.rec, a folder holding it, or an image folder)
    out: str
    bins: list[str] = field(default_factory=list)  # verification .bin files (the five benchmarks)
    real_reference: str = DEFAULT_REAL_REFERENCE  # a PEER_TABLE method for GR ...
    real_model: str | None = None  # ... or our own trained FR folder, evaluated on the same bins
    arch: str = "irse50"
    margin: str = "adaface"
    width: int = 64
    input_size: int = 112
    embedding_dim: int = 512
    scale: float = 64.0
    batch_size: int = 128
    epochs: int = 26
    lr: float = 0.1
    lr_steps: list[float] | None = None  # None: ADAFACE_LR_STEPS scaled to `epochs`
    warmup_epochs: float = 0.0
    max_steps: int | None = None
    workers: int = 2
    # steps between checkpoints (a Ctrl-C keeps the work up to the last; it was 10**9: all was lost)
    save_every: int = 1000
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        # Everything the evaluation after the (long) training needs is checked here, before it.
        if not self.bins:
            raise VigfaceError("protocol: pass at least one verification .bin (--bins)")
        stems: dict[str, str] = {}
        for path in self.bins:
            if not Path(path).exists():
                raise VigfaceError(f"protocol: --bins {path} does not exist")
            if not Path(path).is_file():
                raise VigfaceError(f"protocol: --bins {path} is a folder, not a verification .bin")
            _, issame = read_bin(path)  # parsed (not decoded): a damaged file stops us before the training
            if len(issame) < 10:
                raise VigfaceError(
                    f"protocol: --bins {path} holds {len(issame)} pairs, fewer than the 10 folds"
                )
            stem = Path(path).stem  # the results are keyed by it
            if stem in stems:
                if Path(stems[stem]).resolve() == Path(path).resolve():
                    raise VigfaceError(f"protocol: --bins names {path} twice; give each set once")
                raise VigfaceError(
                    f"protocol: --bins {stems[stem]} and {path} share the name {stem!r}; rename one"
                )
            stems[stem] = str(path)
        if self.real_model is None:
            peer_average(self.real_reference)  # validates the name
        else:
            from vigface.fr.embed import check_backbone_folder

            try:
                check_backbone_folder(self.real_model)
            except VigfaceError as err:
                raise VigfaceError(f"protocol: --real-model {err}") from None


def lr_steps_for(config: ProtocolConfig) -> list[float]:
    """The given lr steps, or AdaFace's at the same fractions of a shorter or longer run (a 4-epoch
    CPU run decays at epochs 1.85, 3.08, 3.69 instead of never)."""
    if config.lr_steps is not None:
        return list(config.lr_steps)
    return adaface_lr_steps(config.epochs)


def adaface_lr_steps(epochs: float) -> list[float]:
    return [step * epochs / ADAFACE_EPOCHS for step in ADAFACE_LR_STEPS]


def train_config(config: ProtocolConfig):
    from vigface.fr.config import FRTrainConfig

    return FRTrainConfig(
        data=config.data, out=config.out, arch=config.arch, margin=config.margin, width=config.width,
        input_size=config.input_size, embedding_dim=config.embedding_dim, scale=config.scale,
        batch_size=config.batch_size, epochs=config.epochs, lr=config.lr, lr_steps=lr_steps_for(config),
        warmup_epochs=config.warmup_epochs, max_steps=config.max_steps, workers=config.workers,
        seed=config.seed, device=config.device, progress=config.progress, num_virtual=0,
        save_every=config.save_every,
    )  # fmt: skip


def evaluate_model(model_dir: str | os.PathLike, bins: list[str], device: str = "auto") -> dict:
    """summarise() of a trained backbone folder on `bins`."""

    from vigface.fr.embed import load_backbone

    device = resolve_device(device)
    model, _ = load_backbone(model_dir, device)
    return summarise(verify_bins(model, bins, device=device))


def compare_to_real(ours: dict, real: dict | None, real_reference: str) -> dict:
    """GR of our table against a real model's table (same sets) or a named peer's five-set average."""
    if real is not None:
        avg_real, name = real["average"], "our real-data model"
        avg_syn = ours["average"]
    else:
        avg_real, name = peer_average(real_reference), real_reference
        avg_syn = ours["five_benchmark_average"]
        if avg_syn is None:
            return {
                "reference": name,
                "gap_to_real": None,
                "why": "GR against a peer needs all five benchmarks",
            }
    return {
        "reference": name,
        "avg_real": avg_real,
        "avg_syn": avg_syn,
        "gap_to_real": gap_to_real(avg_real, avg_syn),
    }


RECIPE_FIELDS = (
    "arch",
    "margin",
    "scale",
    "width",
    "input_size",
    "embedding_dim",
    "epochs",
    "batch_size",
    "lr",
    "lr_steps",
    "max_steps",  # a run stopped early trained less than its epochs say
)


def recipe_differences(real_model: str | os.PathLike, train: dict) -> list[str]:
    """How the --real-model's training recipe (its run's config.json) differs from this run's: Gap-to-Real
    against it then measures the recipe as well as the data. Empty when the same or unknown."""
    path = Path(real_model) / "config.json"
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(theirs, dict):
        return []
    return [
        f"{name} {theirs[name]} there, {train[name]} here"
        for name in RECIPE_FIELDS
        if name in theirs and theirs[name] != train.get(name)
    ]


def compares_with_peers(bins: list[str]) -> bool:
    """Whether `bins` hold the five benchmarks the published peers were measured on (other sets may
    come too: the peers compare with the five-set average, which leaves them out)."""
    return set(BENCHMARKS) <= {Path(b).stem for b in bins}


def _lr_steps_hint(config: ProtocolConfig) -> str:
    """Why a resume without --lr-steps changed them: name the flag the user changed, not the field."""
    try:
        first = json.loads((Path(config.out) / "config.json").read_text())
        first_steps, first_epochs = list(first["lr_steps"]), first["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        first_steps, first_epochs = None, None
    if first_steps is not None and first_steps != adaface_lr_steps(first_epochs):
        given = " ".join(f"{step:g}" for step in first_steps)
        return f"the first run was given --lr-steps {given}; pass them again"
    return (
        "without --lr-steps the protocol places them at fixed fractions of --epochs, so a resumed run keeps "
        "its --epochs (pass the first run's --lr-steps to train longer)"
    )


def run_protocol(config: ProtocolConfig, *, resume: bool = False) -> dict:
    """Train, evaluate, compare; writes out/protocol.json and returns the same dict."""
    from vigface.fr.trainer import train_fr

    fr = train_config(config)
    try:
        train_fr(fr, resume=resume)
    except VigfaceError as err:
        if resume and config.lr_steps is None and "lr_steps" in str(err):
            raise VigfaceError(f"{err}; {_lr_steps_hint(config)}") from None
        raise
    ours = evaluate_model(config.out, config.bins, config.device)
    real = evaluate_model(config.real_model, config.bins, config.device) if config.real_model else None
    result = {
        "config": asdict(config),
        "train_config": fr.to_dict(),
        "ours": ours,
        "real": real,
        "gap": compare_to_real(ours, real, config.real_reference),
        "real_model_recipe_differs": recipe_differences(config.real_model, fr.to_dict()) if real else [],
        "comparable_with_peers": compares_with_peers(config.bins),
        "peers": {"columns": list(PEER_COLUMNS), "rows": peer_rows(), "note": PEER_NOTE},
        "benchmarks": BENCHMARKS,
    }
    write_atomically(Path(config.out) / "protocol.json", json.dumps(result, indent=2))
    return result
