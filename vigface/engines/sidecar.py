"""JSON sidecars of exported artifacts: `denoiser.plan.json` beside `denoiser.plan`, and so on.

A sidecar records what an artifact was built from and for (model sha256, precision, TensorRT
version, GPU, ...). Loading compares it with the present setup and refuses a mismatch, naming
every key that differs, instead of running stale weights or an engine built for another GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from vigface.data.files import write_atomically
from vigface.errors import DataFormatError, VigfaceError

SIDECAR_FORMAT = 1


def sidecar_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def write_sidecar(artifact: str | Path, facts: dict) -> Path:
    path = sidecar_path(artifact)
    write_atomically(path, json.dumps({"format": SIDECAR_FORMAT, **facts}, indent=2) + "\n")
    return path


def read_sidecar(artifact: str | Path) -> dict:
    path = sidecar_path(artifact)
    if not Path(artifact).is_file():
        raise DataFormatError(artifact, "not found; build it with vigface-export")
    if not path.is_file():
        raise DataFormatError(path, "the sidecar of this export is missing; rebuild with vigface-export")
    try:
        facts = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not valid JSON ({exc})") from None
    if not isinstance(facts, dict) or facts.get("format") != SIDECAR_FORMAT:
        raise DataFormatError(path, f"not a vigface export sidecar of format {SIDECAR_FORMAT}")
    return facts


def check_sidecar(artifact: str | Path, facts: dict, expected: dict) -> None:
    """Refuse an artifact whose sidecar differs from `expected` in any key `expected` names."""
    differences = [
        f"{key}: built for {facts.get(key)!r}, here {value!r}"
        for key, value in expected.items()
        if facts.get(key) != value
    ]
    if differences:
        raise VigfaceError(
            f"{artifact} does not match this setup and is refused ("
            + "; ".join(differences)
            + "). Rebuild it here with vigface-export"
        )
