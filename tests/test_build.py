"""The compiled extension vigface._C: its build facts, and the CUDA sources compile for sm_80/sm_90.

The CUDA sources are compiled here even on machines without a GPU (DESIGN.md: nvcc is present
on the CPU machines), with the flags CMakeLists.txt uses, so a CUDA error cannot hide until the
code reaches a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))


def test_extension_reports_its_build():
    C = pytest.importorskip("vigface._C", reason="vigface._C is not built (pip install -e .)")
    assert isinstance(C.has_cuda, bool)
    n = C.cuda_device_count()  # must not raise without a driver or GPU
    assert isinstance(n, int) and n >= 0
    info = C.build_info
    assert info["cuda"] is C.has_cuda
    assert info["cxx_compiler"] and info["build_type"]
    if C.has_cuda:
        assert info["cuda_compiler"].startswith("NVIDIA") and info["cuda_archs"]
    else:
        assert n == 0 and info["cuda_archs"] == ""


def test_nvcc_on_path_means_cuda_build():
    """The default VIGFACE_CUDA=AUTO must build the .cu sources when nvcc is found."""
    C = pytest.importorskip("vigface._C", reason="vigface._C is not built (pip install -e .)")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    if C.build_info["cuda_option"] == "OFF":
        pytest.skip("built with VIGFACE_CUDA=OFF on purpose")
    assert C.has_cuda, "nvcc is on PATH but vigface._C was built without CUDA (VIGFACE_CUDA=OFF?)"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile(tmp_path):
    assert CU_SOURCES, "no .cu files in csrc/"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90")]
    # One nvcc per file, all at once: about 4 s in all on the 2-core CPU machine.
    procs = {
        src.name: subprocess.Popen(
            [
                "nvcc",
                "-c",
                str(src),
                "-o",
                str(tmp_path / f"{src.stem}.o"),
                "-std=c++17",
                "--fmad=false",
                f"-I{CSRC}",
                "-Xcompiler=-Wall",
                *gencode,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in CU_SOURCES
    }
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[name] = out
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {k}\n{v}" for k, v in failed.items())
