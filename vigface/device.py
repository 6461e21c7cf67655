"""Which torch device a command runs on: --device auto | cpu | cuda."""

from __future__ import annotations

from vigface.errors import BackendUnavailableError, VigfaceError


def resolve_device(choice) -> str:
    """ "auto": cuda when torch sees a GPU, else cpu. "cuda" without one is refused in one line (it
    was torch's "Torch not compiled with CUDA enabled" traceback from deep inside a command), as are
    a CUDA index torch does not see and a name torch does not know ("gpu"). A torch.device is taken
    by its name."""
    import torch

    choice = str(choice)
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(choice)
    except RuntimeError:
        raise VigfaceError(f"device {choice!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {choice!r} was requested but torch sees no CUDA device")
    index = choice.partition(":")[2]
    if choice.startswith("cuda") and index.isdigit() and int(index) >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"device {choice!r} was requested but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return choice
