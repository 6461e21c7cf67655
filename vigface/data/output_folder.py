"""Refuse to write a dataset into a folder that already holds something else.

Writers replace their own files by atomic rename, so writing into a folder that holds another
tool's dataset (a toy set, a generated set, an aligned set) would silently swap its train.rec for
ours and leave the rest (toy.json, generation.json, .bin pairs) describing data that is gone.
Each writer names the entries it makes itself; anything else, hidden files aside, stops it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path

from vigface.errors import VigfaceError


def _is_own(name: str, own: Collection[str]) -> bool:
    # A killed writer leaves `<name>.<pid>.tmp` / `<name>.tmp` beside its outputs: still its own.
    return name in own or (name.endswith(".tmp") and any(name.startswith(f"{o}.") for o in own))


def refuse_foreign_output(out: Path, *, own: Collection[str], what: str, flag: str = "--out") -> None:
    """Raise unless `out` is missing, or a folder whose visible entries are all `own` (or their temps);
    the message names `flag`, the option that chose the folder."""
    if not out.is_dir():
        return  # missing (made later) or a file (the writer's own error names it)
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and not _is_own(p.name, own))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise VigfaceError(
            f"{out}: holds {shown}, which {what} does not write; choose an empty or new folder for {flag} "
            "(nothing was changed)"
        )


def process_running(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(out: Path, *, own: Collection[str]) -> list[str]:
    """Delete `<name>.<pid>.tmp` (and `.<name>.<pid>.tmp`) files of `own` outputs whose writer no longer
    runs (a `kill -9` leaves them: every other way out removes its own); returns the names removed."""
    removed = []
    if out.is_dir():
        for path in out.glob("*.tmp"):
            match = re.fullmatch(r"\.?(.+)\.(\d+)\.tmp", path.name)  # write_atomically's: .<name>.<pid>.tmp
            if match and match.group(1) in own and not process_running(int(match.group(2))):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return sorted(removed)
