"""Console-script entry points: each imports its command's module inside a Ctrl-C guard.

A command's module imports torch (~2 s on a 2-core CPU). A Ctrl-C in that time raised
KeyboardInterrupt from inside the import, before the command's own handling (run_command) was in
place: a traceback instead of the one line and exit status 130 every command promises.
"""

from __future__ import annotations

import importlib
import sys


def _entry(module: str, prog: str):
    def main(argv: list[str] | None = None) -> int:
        try:
            command = importlib.import_module(f"vigface.cli.{module}")
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        return command.main(argv)

    main.__doc__ = f"`{prog}` (vigface.cli.{module}.main), its import guarded against Ctrl-C."
    return main


vigface = _entry("main", "vigface")
train_fr = _entry("train_fr", "vigface-train-fr")
embed = _entry("embed", "vigface-embed")
train_diffusion = _entry("train_diffusion", "vigface-train-diffusion")
gen = _entry("gen", "vigface-gen")
export = _entry("export", "vigface-export")
evaluate = _entry("eval", "vigface-eval")
