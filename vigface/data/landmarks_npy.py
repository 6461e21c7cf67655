"""Read a (N, 5, 2) landmark table from a .npy file, or fail naming the file and what is wrong.

Every command that takes landmarks (training, alignment, generation poses) reads them here, so a
wrong file gets the same one-line error everywhere: NumPy's own message for a non-.npy file is
"This file contains pickled (object) data ..." (it falls back to unpickling), which says nothing
about the mistake, and one trainer let that ValueError out as a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vigface.errors import DataFormatError

NPY_MAGIC = b"\x93NUMPY"


def read_landmarks_npy(
    path: str | os.PathLike, n: int | None = None, images: str = "", *, mmap: bool = False
) -> np.ndarray:
    """(N, 5, 2) float32 (N = n when given, else any N >= 1). `images` names what the rows belong
    to, for the error ("the images of train.rec"). A missing file raises FileNotFoundError.
    mmap: check the file but return it memory-mapped, in its own dtype (a summary reads no rows)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise DataFormatError(path, "is not a .npy file (no NumPy header); expected (N, 5, 2) landmarks")
    try:
        table = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(path, f"is not a readable .npy array ({err})") from None
    rows_ok = len(table) > 0 if n is None else len(table) == n
    if table.ndim != 3 or table.shape[1:] != (5, 2) or not rows_ok:
        rows = "N" if n is None else n
        of = f" for {images}" if images else ""
        raise DataFormatError(path, f"has shape {table.shape}, expected ({rows}, 5, 2) landmarks{of}")
    return table if mmap else np.ascontiguousarray(table, dtype=np.float32)
