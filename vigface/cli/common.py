"""What every vigface console script shares: argument types and the one-line error exit."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import tempfile
import threading
import types
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from vigface.config_types import matches, type_name
from vigface.data.files import INPUT_PATH_FIELDS, resolved_paths
from vigface.errors import Terminated, VigfaceError, VigfaceWarning

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_HINT = (
    "; free some space and run the command again (the trainers and the demo with --resume): "
    "outputs are written under temporary names, so a finished part is kept and a half-written one is not"
)


def first_rank() -> bool:
    """Whether this process prints a command's closing lines: rank 0 under torchrun, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def check_output_folder(option: str, path: str | os.PathLike | None) -> None:
    """Refuse, before any work, an output folder that is a file or lies below one.

    Commands that compute for a while and write at the end call this first, so the user learns
    of a mistyped --out at once rather than after the work (which would then be lost)."""
    if path is None:
        return
    in_the_way = _file_at_or_above(Path(path))
    if in_the_way is not None:
        raise VigfaceError(f"{option} {path}: {in_the_way} is a file; a folder is needed there")
    _check_writable(option, path, Path(path))


def check_folder_writable(option: str, path: str | os.PathLike) -> None:
    """Refuse, before any work, an output folder where no file can be made; a file in its way is
    left to the command's own mkdir, which names it as every command does."""
    if _file_at_or_above(Path(path)) is None:
        _check_writable(option, path, Path(path))


def check_output_file(option: str, path: str | os.PathLike | None, example: str = "") -> None:
    """Refuse, before any work, an output file name that is an existing folder, or one whose folder
    cannot be written."""
    if path is None:
        return
    if Path(path).is_dir():
        raise VigfaceError(f"{option} {path}: is a folder; give the file to write{example}")
    if _file_at_or_above(Path(path).parent) is None:  # (below a file: the command's mkdir names it)
        _check_writable(option, path, Path(path).parent)


def refuse_writing_over_inputs(option: str, outputs, inputs, outputs_folder: str | None = None) -> None:
    """Refuse, before any work, outputs that would replace one of the command's inputs: a file
    named in `inputs`, or a file inside a folder named there (a model folder's own files), except
    in a subfolder of it named `outputs_folder` (export's engines/). `vigface-export --out
    my/denoiser` replaced the model's denoiser.json with its sidecar, `vigface-embed --out
    fr/backbone.safetensors` the weights it had just read, `verify --json toy_val.bin` the set it
    had verified."""
    protected = {}
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        if path.is_dir():
            for file in path.rglob("*"):
                if file.is_file() and file.relative_to(path).parts[0] != outputs_folder:
                    protected[file.resolve()] = file
        else:
            protected[path.resolve()] = path
    for out in outputs:
        if out is not None and Path(out).resolve() in protected:
            raise VigfaceError(
                f"{option} {out}: would replace {protected[Path(out).resolve()]}, an input of this command; "
                "write it elsewhere"
            )


def _check_writable(option: str, path, folder: Path) -> None:
    """Refuse an output whose folder (or, where it does not exist yet, the nearest folder above it
    that does) cannot take a new file."""
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    # os.access sees permissions and read-only mounts; a new file shows the rest (as root, /proc
    # and /sys pass os.access and refuse files: an export there failed after its work, at the rename)
    try:
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise PermissionError
        fd, probe = tempfile.mkstemp(dir=nearest, prefix=".vigface-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        why = f"{nearest} is not writable here; choose another folder"
        raise VigfaceError(f"{option} {path}: {why}") from None


def run_command(prog: str, func, args) -> int:
    """Run func(args); a VigfaceError becomes `prog: error: ...` and exit status 2, Ctrl-C 130.

    So does an OSError on a named path (an --out below a file, a folder without write permission):
    the user's environment, not a bug, so one line naming the path. So does a full disk or quota,
    which usually comes without a path (a write to an open file): every output is written to a
    temporary name and renamed, so what was finished is kept and the same command continues.
    Other OSErrors without a path keep their traceback. safetensors' writer reports a full disk as
    its own error type, "... (os error 28)": that is read as the OSError it stands for.
    """
    previous = _raise_on_sigterm()
    show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(prog, show_warning)
    try:
        return func(args)
    except VigfaceError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_is_broken():  # another pipe (a worker pool's): not the reader leaving
            raise
        # the reader of stdout left (`| head`): stop as a tool killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + getattr(signal, "SIGPIPE", 13)  # (Windows has no SIGPIPE)
    except OSError as err:
        line = _os_error_line(err)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            print(f"{prog}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # safetensors' SafetensorError is not an OSError
        if _STOP["terminated"]:  # an error the stop itself caused (a loader worker it killed first)
            print(f"{prog}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        os_error = _safetensors_os_error(err)
        line = None if os_error is None else _os_error_line(os_error)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show_warning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stdout_is_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (its write end then polls as an error)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows) or no descriptor: assume so
        return True


def _one_line_warnings(prog: str, fallback):
    """vigface's own warnings as `prog: warning: ...` (no source line); others as Python shows them."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, VigfaceWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


_STOP = {"terminated": False}


def _terminate(signum, frame):
    if _STOP["terminated"]:
        return  # one Terminated is enough; a second would interrupt the cleanup of the first
    _STOP["terminated"] = True
    raise Terminated()


def _raise_on_sigterm():
    """Turn SIGTERM into `Terminated` while a command runs (main thread only); returns the handler it
    replaced, or None where it could not install one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _STOP["terminated"] = False
    return signal.signal(signal.SIGTERM, _terminate)


def _os_error_line(err: OSError) -> str | None:
    """The one-line message for an OSError the user can act on (a named path, a full disk), else None."""
    full = err.errno in FULL_DISK
    if err.filename is None and not full:
        return None
    where = "" if err.filename is None else f"{err.filename}: "
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}: "
    in_the_way = _file_in_the_way(err)
    hint = f" ({in_the_way} is a file; a folder is needed there)" if in_the_way else ""
    return f"{where}{err.strerror or err}{hint}{FULL_DISK_HINT if full else ''}"


def _file_in_the_way(err: OSError) -> str | None:
    """For "File exists" / "Not a directory" (an --out that is, or lies below, a file): that file."""
    if err.errno not in (errno.EEXIST, errno.ENOTDIR) or err.filename is None:
        return None
    in_the_way = _file_at_or_above(Path(os.fsdecode(err.filename)))
    return None if in_the_way is None else str(in_the_way)


def _file_at_or_above(path: Path) -> Path | None:
    """The nearest existing entry at or above `path` when it is not a folder, else None."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _safetensors_os_error(err: Exception) -> OSError | None:
    """The OSError behind a safetensors SafetensorError such as "I/O error: No space left on device
    (os error 28)", or None (another error, or a safetensors error that is not an I/O one)."""
    if type(err).__name__ != "SafetensorError":
        return None
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _base_type(hint):
    """int | None -> (int, None); list[float] -> (list, float); bool -> (bool, None)."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list, typing.get_args(hint)[0]
    return hint, None


def config_parser(
    prog: str, description: str, config_cls, help_texts: dict, choices: dict, required_fields: tuple = ()
) -> argparse.ArgumentParser:
    """A parser with one flag per field of the dataclass `config_cls` (--resume and --config too).

    `required_fields`: those the command needs (from a flag, --config or the resumed run)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        if hints[f.name] is dict:
            continue  # free-form fields come from --config only
        default = f.default if f.default is not MISSING else f.default_factory()
        kind, item = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = help_texts.get(f.name, f.name.replace("_", " "))
        if "(default:" not in text:  # a text may say its default in words
            required = f.name in required_fields and default in ("", None)
            text += " (required)" if required else f" (default: {default})"
        kwargs = {"default": argparse.SUPPRESS, "help": text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is list:
            parser.add_argument(flag, type=item, nargs="*", **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=choices.get(f.name), **kwargs)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument("--config", help="a JSON file of config fields (flags override it)")
    return parser


def _read_config_json(config_cls, path: Path, what: str) -> dict:
    """A JSON object of config fields, each of its field's type (a string "false" for a bool field
    would otherwise be stored as given and read as true)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VigfaceError(f"{what} {path}: {exc}") from None
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise VigfaceError(f"{what} {path}: must be a JSON object of config fields, got a JSON {kind}")
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            raise VigfaceError(
                f"{what} {path}: {name} must be of type {type_name(hints[name])}, got {json.dumps(value)}"
            )
    return values


def config_from_args(config_cls, args: argparse.Namespace, prog: str, required: tuple) -> tuple:
    """(config, resume) from flags over --config over the run's own config.json when resuming."""
    given = {k: v for k, v in vars(args).items() if k not in ("resume", "config")}
    values: dict = {}
    if args.config:
        values.update(_read_config_json(config_cls, Path(args.config), "--config"))
    for source in (given, values):  # not a resumed run's saved values: they are as it was started
        for name in INPUT_PATH_FIELDS:  # absolute: --resume then works from any folder and spelling
            if name in source:
                source[name] = resolved_paths(source[name])
    if args.resume:
        out = given.get("out") or values.get("out")
        if not out:
            raise VigfaceError("--resume needs --out (the folder of the run to continue)")
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise VigfaceError(f"--resume: {saved} does not exist; is {out} a {prog} output folder?")
        values = {**_read_config_json(config_cls, saved, "--resume"), **values}
    values.update(given)
    for name in required:
        if not values.get(name):
            raise VigfaceError(f"--{name.replace('_', '-')} is required")
    return config_cls.from_dict(values), args.resume
