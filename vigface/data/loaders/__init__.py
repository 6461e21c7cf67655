"""Training-data loaders: `make_loader(..., loader="torch" | "dali" | "auto")` (see interface.py)."""

from vigface.data.loaders.base import Batch, FaceLoader, LoaderOptions
from vigface.data.loaders.corrupt import CorruptImageWarning
from vigface.data.loaders.interface import LOADERS, make_loader, resolve_loader
from vigface.data.loaders.source import FaceSource

__all__ = [
    "LOADERS",
    "Batch",
    "CorruptImageWarning",
    "FaceLoader",
    "FaceSource",
    "LoaderOptions",
    "make_loader",
    "resolve_loader",
]
