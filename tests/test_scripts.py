"""scripts/make_tiny_model.py: its install step replaces only a model folder."""

import shutil
import subprocess
import sys

import pytest
from script_module import ROOT, load_script

from vigface.assets import tiny_model_dir
from vigface.errors import VigfaceError

SCRIPT = ROOT / "scripts" / "make_tiny_model.py"


def _script():
    return load_script("scripts/make_tiny_model.py")


def test_install_destination_must_be_a_model_folder(tmp_path):
    """--install --dest X deleted X whatever it held (rmtree), and was only looked at after the
    ~1.5 h training."""
    script = _script()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "my_thesis.txt").write_text("years of work")
    with pytest.raises(VigfaceError, match="holds my_thesis.txt"):
        script.install(tmp_path / "work", victim)
    assert (victim / "my_thesis.txt").read_text() == "years of work"
    shipped = tmp_path / "shipped"  # an installed model (the one in the package) may be replaced
    shutil.copytree(tiny_model_dir(), shipped)
    script.check_dest(shipped)
    (shipped / "fr" / "my_notes.txt").write_text("also deleted as a whole")  # fr/ and hidden entries count
    with pytest.raises(VigfaceError, match="holds my_notes.txt"):
        script.check_dest(shipped)
    (shipped / "fr" / "my_notes.txt").unlink()
    (shipped / ".git").mkdir()
    with pytest.raises(VigfaceError, match="holds .git"):
        script.check_dest(shipped)
    script.check_dest(tmp_path / "new")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--install", "--dest", str(victim)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "holds my_thesis.txt" in done.stderr
    assert not (tmp_path / "work").exists()  # refused before any training
