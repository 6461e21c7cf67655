"""Corrupt images: skipped, counted and listed, never a crash in the middle of an epoch.

Every image that cannot be read, decoded or aligned is logged once as it happens; at the end of
an epoch one `CorruptImageWarning` lists the epoch's skipped images. An epoch in which this rank
could use no image at all is not a dataset with a few bad files but a broken one (wrong format,
wrong landmarks table): that raises a VigfaceError naming the first failures.
"""

from __future__ import annotations

import logging
import warnings

from vigface.errors import VigfaceError, VigfaceWarning

log = logging.getLogger(__name__)

_LISTED = 20  # images named in one warning; the rest are counted


class CorruptImageWarning(VigfaceWarning):
    """Images were skipped because they could not be read, decoded or aligned."""


class CorruptImages:
    """What a loader skipped: {dataset index: reason}, over its whole life and per epoch."""

    def __init__(self, source_name: str):
        self.source_name = source_name
        self.skipped: dict[int, str] = {}  # every skipped image so far
        self.epoch_skipped: dict[int, str] = {}

    def start_epoch(self) -> None:
        self.epoch_skipped = {}

    def add(self, index: int, reason: str) -> None:
        index = int(index)
        if index not in self.skipped:
            log.warning("%s: skipping corrupt image %d (%d so far): %s", self.source_name, index,
                        len(self.skipped) + 1, reason)  # fmt: skip
        self.skipped[index] = reason
        self.epoch_skipped[index] = reason

    def _listing(self, items: dict[int, str]) -> str:
        shown = list(items.items())[:_LISTED]
        more = f"\n  ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
        return "".join(f"\n  image {i}: {reason}" for i, reason in shown) + more

    def end_epoch(self, epoch: int, delivered: int) -> None:
        """Warn about this epoch's skipped images; raise if none of this rank's images was usable."""
        if not self.epoch_skipped:
            return
        if delivered == 0:
            raise VigfaceError(
                f"{self.source_name}: every image this rank read in epoch {epoch} failed "
                f"({len(self.epoch_skipped)} images); is it the right dataset and landmarks table?"
                + self._listing(self.epoch_skipped)
            )
        warnings.warn(
            CorruptImageWarning(
                f"{self.source_name}: skipped {len(self.epoch_skipped)} corrupt images in epoch {epoch}"
                + self._listing(self.epoch_skipped)
            ),
            stacklevel=3,
        )
