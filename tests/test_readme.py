"""The README's Python API examples run as written (on a small toy set in a scratch folder)."""

import re
from pathlib import Path

import numpy as np

from vigface.data.toy_dataset import ToyConfig, make_toy_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_api_examples_run(tmp_path, monkeypatch):
    blocks = _python_api_blocks()
    assert len(blocks) == 3
    make_toy_dataset(tmp_path / "toy", ToyConfig(ids=4, per_id=3, pairs=40, val_ids=20), progress=False)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:  # one namespace: later blocks use what earlier ones made, as a reader would
        exec(compile(block, str(README), "exec"), scope)
    assert scope["faces"].dtype == np.uint8 and scope["label"] == 0
    assert scope["emb"].shape == (32, scope["fr"].config.embedding_dim)
    assert 0 < scope["metrics"]["cst"] <= 1 and scope["metrics"]["classes"] == 8
    assert 0.5 <= scope["accuracy"] <= 1
