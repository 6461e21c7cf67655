"""Every console script turns a filesystem error on a named path into one line, not a traceback."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from vigface.assets import tiny_model_dir
from vigface.cli import embed as embed_cli
from vigface.cli import eval as eval_cli
from vigface.cli import export as export_cli
from vigface.cli import gen as gen_cli
from vigface.cli import main as vigface_cli
from vigface.cli import train_diffusion as train_diffusion_cli
from vigface.cli import train_fr as train_fr_cli
from vigface.cli.common import run_command


def _raises(exc):
    def func(args):
        raise exc

    return func


def test_run_command_names_the_path_of_an_os_error(capsys):
    err = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "runs/a_file/out")
    assert run_command("prog", _raises(err), None) == 2
    assert capsys.readouterr().err == f"prog: error: runs/a_file/out: {os.strerror(errno.ENOTDIR)}\n"
    # two paths (a rename): both named
    err = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a.tmp", None, "b")
    assert run_command("prog", _raises(err), None) == 2
    assert capsys.readouterr().err == f"prog: error: a.tmp -> b: {os.strerror(errno.EXDEV)}\n"


def test_a_file_where_a_folder_is_needed_is_named(tmp_path, capsys):
    """Seen by hand: `vigface demo --out F` for an existing file F said only "F: File exists"."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for err in (
        FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(a_file)),
        NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(a_file / "out" / "shards")),
    ):
        assert run_command("prog", _raises(err), None) == 2
        hint = f"({a_file} is a file; a folder is needed there)"
        assert capsys.readouterr().err == f"prog: error: {err.filename}: {err.strerror} {hint}\n"
    # an existing folder, or nothing on disk: no such claim
    for path in (tmp_path, tmp_path / "missing" / "out"):
        err = FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        assert run_command("prog", _raises(err), None) == 2
        assert capsys.readouterr().err == f"prog: error: {path}: {os.strerror(errno.EEXIST)}\n"


def test_run_command_keeps_the_traceback_of_an_os_error_without_a_path():
    # no path to name: nothing the user can act on, so the traceback stays
    with pytest.raises(OSError, match="socket closed"):
        run_command("prog", _raises(OSError("socket closed")), None)


def test_a_full_disk_is_one_line_saying_what_to_do(capsys):
    """A write to a full disk (or quota) has no path; seen by hand on a small tmpfs, where vigface-gen
    (Python's write) and vigface-train-fr (safetensors' writer) printed tracebacks."""
    hint = "; free some space and run the command again (the trainers and the demo with --resume)"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert run_command("prog", _raises(full), None) == 2
    assert capsys.readouterr().err.startswith(f"prog: error: {os.strerror(errno.ENOSPC)}{hint}")
    # safetensors' own error type, with the message its writer gave on the full tmpfs
    written = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert run_command("prog", _raises(written), None) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prog: error: {os.strerror(errno.ENOSPC)}{hint}") and err.count("\n") == 1
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "runs/out/x")  # with a path: named too
    assert run_command("prog", _raises(quota), None) == 2
    assert capsys.readouterr().err.startswith(f"prog: error: runs/out/x: {os.strerror(errno.EDQUOT)}{hint}")
    # other safetensors errors are not the user's environment: their traceback stays
    with pytest.raises(SafetensorError, match="invalid header"):
        run_command("prog", _raises(SafetensorError("invalid header")), None)


def test_an_output_below_a_file_is_one_line_in_every_command(small_toy, tiny_fr_model, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = a_file / "out"
    fr_args = [
        "--data", str(small_toy), "--out", str(out), "--arch", "iresnet18", "--width", "8",
        "--input-size", "32", "--embedding-dim", "32", "--epochs", "1", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    diffusion_args = [
        "--data", str(small_toy), "--fr-model", str(tiny_fr_model), "--out", str(out), "--size", "tiny",
        "--image-size", "32", "--steps", "1", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    gen_args = [
        "--out", str(out), "--ids", "both", "--num-ids", "2", "--per-id", "2", "--steps", "2", "--quiet",
    ]  # fmt: skip
    commands = {
        "vigface data toy": lambda: vigface_cli.main(
            ["data", "toy", "--out", str(out), "--ids", "3", "--per-id", "2", "--quiet"]
        ),
        "vigface-gen": lambda: gen_cli.main(gen_args),
        "vigface-export": lambda: export_cli.main(
            ["--model", str(tiny_model_dir()), "--out", str(out / "d.onnx")]
        ),
        "vigface-train-fr": lambda: train_fr_cli.main(fr_args),
        "vigface-train-diffusion": lambda: train_diffusion_cli.main(diffusion_args),
    }
    for name, run in commands.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        last = err.splitlines()[-1]
        assert "Traceback" not in err and err.count("error:") == 1, (name, err)
        assert last.startswith(f"{name.split()[0]}: error: {a_file}"), (name, err)
        assert last.endswith(f"({a_file} is a file; a folder is needed there)"), (name, err)
        assert not out.exists()


def test_a_bad_val_file_stops_train_fr_before_its_run_folder_exists(small_toy, tmp_path, capsys):
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes((small_toy / "toy_val.bin").read_bytes()[:1000])
    for val, why in ((truncated, "trunc.bin"), (tmp_path / "missing.bin", "no such verification .bin file")):
        out = tmp_path / "fr"
        args = [
            "--data", str(small_toy), "--out", str(out), "--arch", "iresnet18", "--width", "8",
            "--input-size", "32", "--embedding-dim", "32", "--epochs", "1", "--workers", "0",
            "--no-progress", "--val", str(val),
        ]  # fmt: skip
        assert train_fr_cli.main(args) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err
        assert not out.exists()  # no config.json / metrics.jsonl of a run that never started


def test_eval_outputs_below_a_file_are_refused_before_any_work(tmp_path, capsys):
    """The model and data named do not even exist: the output check comes first."""
    a_file = tmp_path / "report.bin"
    a_file.write_text("a file")
    for out in (a_file, a_file / "below"):
        commands = {
            "--out": ["metrics", "no_model", "no_data", "--out", str(out)],
            "--work": ["cfg-sweep", "no_model", "--real", "no_data", "--work", str(out)],
            "--out ": ["protocol", "no_data", "--out", str(out), "--bins", "no.bin"],
        }
        for option, argv in commands.items():
            assert eval_cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            why = f"{option.strip()} {out}: {a_file} is a file; a folder is needed there"
            assert err.strip() == f"vigface-eval: error: {why}"


def test_file_outputs_that_are_folders_are_refused_before_any_work(tmp_path, capsys):
    """The model and inputs named do not exist: the output check comes first, nothing is left."""
    folder = tmp_path / "emb.npy"
    folder.mkdir()
    assert embed_cli.main(["no_model", "no.bin", "--out", str(folder)]) == 2
    assert f"--out {folder}: is a folder; give the file to write" in capsys.readouterr().err
    assert eval_cli.main(["verify", "no_model", "no.bin", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: is a folder; give the file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"] and not list(folder.iterdir())


def test_verify_takes_one_gap_to_real_reference(capsys):
    """--real-model and --real-reference were both accepted and the model silently won."""
    with pytest.raises(SystemExit) as info:
        eval_cli.main(["verify", "m", "a.bin", "--real-model", "r", "--real-reference", "CASIA (Real)"])
    assert info.value.code == 2
    assert "--real-reference: not allowed with argument --real-model" in capsys.readouterr().err


def test_cfg_sweep_deletes_only_its_own_generated_sets(small_toy, tmp_path, capsys):
    """cfg-sweep removed whatever stood at <work>/w<value> before generating there; two scales of
    one folder name overwrote each other; a negative --seed was a traceback."""
    work = tmp_path / "sweep"
    (work / "w0.5").mkdir(parents=True)
    (work / "w0.5" / "notes.txt").write_text("precious")
    sweep = ["cfg-sweep", str(tiny_model_dir()), "--real", str(small_toy / "train.rec"), "--work", str(work),
             "--num-ids", "2", "--per-id", "2", "--steps", "2", "--real-max-ids", "4", "--quiet"]  # fmt: skip
    assert eval_cli.main([*sweep, "--w", "0.5"]) == 2
    err = capsys.readouterr().err
    assert (
        "w0.5: holds notes.txt, which cfg-sweep does not write; choose an empty or new folder for --work"
        in err
    )
    assert (work / "w0.5" / "notes.txt").read_text() == "precious"
    assert eval_cli.main([*sweep, "--w", "1", "1.0000001"]) == 2
    assert "differ past 6 significant digits (w1); give distinct scales" in capsys.readouterr().err
    assert eval_cli.main([*sweep, "--w", "1", "--seed", "-1"]) == 2
    assert "seed must be in [0, 2**32), got -1" in capsys.readouterr().err
    assert eval_cli.main([*sweep, "--w", "1", "--keep-images"]) == 0
    assert (work / "w1" / "train.rec").is_file()
    assert eval_cli.main([*sweep, "--w", "1"]) == 0  # its own earlier set is replaced
    assert not (work / "w1").exists() and "Traceback" not in capsys.readouterr().err
    # a user's own vigface-gen set there is not the sweep's to delete
    assert eval_cli.main([*sweep, "--w", "1", "--keep-images"]) == 0
    (work / "w1" / ".cfg-sweep").unlink()
    assert eval_cli.main([*sweep, "--w", "1"]) == 2
    assert "w1: has no .cfg-sweep mark (a vigface-gen set" in capsys.readouterr().err
    assert (work / "w1" / "train.rec").is_file()
    (work / "w2").write_text("a file where a w folder goes")
    assert eval_cli.main([*sweep, "--w", "0.25", "2"]) == 2  # refused before w 0.25 is generated
    assert "w2: is a file; cfg-sweep writes a folder there" in capsys.readouterr().err
    assert not (work / "w0.25").exists()


def test_cfg_sweep_refuses_a_step_count_before_any_work(small_toy, tmp_path, capsys, monkeypatch):
    """--steps the schedule cannot take stopped the first w's generation, after --real was embedded
    and that w's folder made (an empty w1/ was left behind)."""
    import vigface.fr.embed

    embedded = []
    monkeypatch.setattr(vigface.fr.embed, "embed_images", lambda *a, **k: embedded.append(1))
    work = tmp_path / "sweep"
    sweep = ["cfg-sweep", str(tiny_model_dir()), "--real", str(small_toy / "train.rec"), "--work", str(work),
             "--w", "1", "2", "--steps", "5000", "--quiet"]  # fmt: skip
    assert eval_cli.main(sweep) == 2
    err = capsys.readouterr().err
    assert "--steps 5000 with --sampler ddim: DDIM steps must be in 1..1000, got 5000" in err
    assert not work.exists() and not embedded


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_device_cuda_without_a_gpu_is_one_line(small_toy, tiny_fr_model, tmp_path, capsys):
    """embed / eval asked for --device cuda on a machine without one ended in torch's "Torch not
    compiled with CUDA enabled" traceback (vigface-gen already said it in one line)."""
    val = str(small_toy / "toy_val.bin")
    commands = {
        "vigface-embed": lambda: embed_cli.main(
            [str(tiny_fr_model), val, "--out", str(tmp_path / "e.npy"), "--device", "cuda", "--quiet"]
        ),
        "vigface-eval": lambda: eval_cli.main(["verify", str(tiny_fr_model), val, "--device", "cuda"]),
    }
    for prog, run in commands.items():
        assert run() == 2, prog
        err = capsys.readouterr().err
        assert err == f"{prog}: error: device 'cuda' was requested but torch sees no CUDA device\n", err


def test_embed_to_a_full_disk_is_one_line_and_leaves_nothing(
    small_toy, tiny_fr_model, tmp_path, capsys, monkeypatch
):
    """Seen on a 600 KB tmpfs: np.save's own C write reported the full disk as "25600 requested and
    18400 written" (no errno: a traceback) and left its temporary .npy on the full disk."""
    import builtins

    class FullDisk:  # a file that takes 1,000 bytes, then fails as a full disk does
        def __init__(self, path, mode):
            self.f, self.room = builtins.open(path, mode), 1000

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self.room:
                self.f.write(data[: self.room])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("vigface.cli.embed.open", FullDisk, raising=False)
    out = tmp_path / "out" / "e.npy"
    args = [str(tiny_fr_model), str(small_toy / "toy_val.bin"), "--out", str(out), "--quiet"]
    assert embed_cli.main(args) == 2
    assert capsys.readouterr().err.startswith(f"vigface-embed: error: {os.strerror(errno.ENOSPC)}; free some")
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary
    monkeypatch.undo()
    assert embed_cli.main(args) == 0
    assert np.load(out).shape == (400, 32)


def test_metrics_of_a_degenerate_subset_are_refused(small_toy, tiny_fr_model, capsys):
    """--max-per-id 1 printed CST 1.0000 and DIV 0 (one image agrees with itself), --max-ids 1 SEP nan,
    both with exit 0; with --out they then failed on an empty histogram."""
    data = str(small_toy / "train.rec")
    for limit, shown in (
        (["--max-per-id", "1"], "40 identities of at most 1 images"),
        (["--max-ids", "1"], "1 identities of at most 8 images"),
    ):
        assert eval_cli.main(["metrics", str(tiny_fr_model), data, "--passes", "2", *limit]) == 2
        err = capsys.readouterr().err
        assert f"metrics: dataset holds {shown}" in err and "2 or more identities" in err, err


def test_a_read_only_output_folder_is_refused_before_any_work(
    small_toy, tiny_fr_model, tmp_path, capsys, monkeypatch
):
    """A read-only --out (seen on a read-only mount) was found only when the report was written,
    after all the work. Read-only is simulated: as root, permission bits do not stop writes."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("vigface.cli.common.os.access", lambda p, mode: p != locked and real_access(p, mode))
    embedded = []
    monkeypatch.setattr("vigface.fr.embed.embed_images", lambda *a, **k: embedded.append(1))
    args = ["metrics", str(tiny_fr_model), str(small_toy / "train.rec"), "--out", str(locked / "report")]
    assert eval_cli.main(args) == 2
    assert (
        f"--out {locked / 'report'}: {locked} is not writable here; choose another folder"
        in capsys.readouterr().err
    )
    assert embedded == []  # refused before any work


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_file_where_no_file_can_be_made_is_refused_before_any_work(tmp_path, capsys):
    """vigface-export --out /proc/x.onnx exported first, then failed on its temporary file's name:
    as root, /proc passes os.access and refuses new files."""
    from vigface.cli.common import check_output_file, check_output_folder
    from vigface.errors import VigfaceError

    for check, path in ((check_output_file, "/proc/x.onnx"), (check_output_folder, "/proc/new/report")):
        with pytest.raises(VigfaceError, match="/proc is not writable here; choose another folder"):
            check("--out", path)
    check_output_file("--json", tmp_path / "new" / "x.json")  # a folder still to make is fine
    assert list(tmp_path.iterdir()) == []  # and the check left nothing behind
    assert gen_cli.main(["--out", "/proc/vigface-gen", "--quiet"]) == 2  # it said "No such file ..."
    assert "--out /proc/vigface-gen: /proc is not writable here" in capsys.readouterr().err


def test_metrics_passes_below_two_are_refused_by_the_parser(capsys):
    """argparse said 'must be at least 1', then --passes 1 was refused by SER-FIQ (2..10,000)."""
    with pytest.raises(SystemExit):
        eval_cli.main(["metrics", "m", "d", "--passes", "1"])
    assert "argument --passes: '1' must be in 2..10,000" in capsys.readouterr().err


def test_a_reader_that_leaves_the_pipe_early_is_no_traceback():
    """`vigface data info X | head -5` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    code = (
        "import sys; from vigface.cli.common import run_command; "
        "sys.exit(run_command('prog', lambda a: [print('line ' * 20) for _ in range(100000)], None))"
    )
    done = subprocess.run(
        f'{sys.executable} -c "{code}" | head -1', shell=True, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.startswith("line line") and done.stderr == "", done.stderr[-2000:]
    # a broken pipe that is not stdout's (a worker pool's) is not taken for the reader leaving
    code = (
        "import sys; from vigface.cli.common import run_command; "
        "sys.exit(run_command('prog', lambda a: (_ for _ in ()).throw(BrokenPipeError(32, 'pool')), None))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "BrokenPipeError: [Errno 32] pool" in done.stderr


def test_embed_npy_writer_matches_np_save_even_when_empty(tmp_path):
    """The .npy writer that reports a full disk in one line writes np.save's bytes, an empty set
    included (a memoryview cast failed on a (0, d) array)."""
    from vigface.cli.embed import _save_npy

    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 4), np.float32)):
        _save_npy(tmp_path / "ours.npy", array)
        np.save(tmp_path / "numpy.npy", array)
        assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "numpy.npy").read_bytes()


def test_resolve_device_refuses_a_gpu_torch_does_not_see(monkeypatch):
    import torch

    from vigface.device import resolve_device
    from vigface.errors import BackendUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("auto") == "cuda"
    with pytest.raises(BackendUnavailableError, match="'cuda:1' was requested but torch sees 1 CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(BackendUnavailableError, match="torch sees no CUDA device"):
        resolve_device("cuda")


def test_console_scripts_guard_their_imports_against_ctrl_c(monkeypatch, capsys):
    """A Ctrl-C while a command imported torch (its first ~2 s) raised KeyboardInterrupt from inside
    the import, before run_command's handling: a traceback, not "interrupted" and status 130."""
    import importlib
    import re
    from pathlib import Path

    from vigface.cli import entry

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]")[1].split("\n[")[0]
    targets = re.findall(r'^vigface[\w-]* = "([\w.:]+)"', scripts, flags=re.M)
    assert len(targets) == 7 and all(target.startswith("vigface.cli.entry:") for target in targets)
    assert {target.split(":")[1] for target in targets} <= set(vars(entry))

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert entry.gen(["--help"]) == 130
    assert capsys.readouterr().err == "vigface-gen: interrupted\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as done:  # otherwise the command itself runs
        entry.export(["--help"])
    assert done.value.code == 0 and "vigface-export" in capsys.readouterr().out


def test_every_commands_help_comes_without_importing_torch():
    """--help (and every argument error) waited ~2 s for torch's import: the parsers took their
    choice lists and config defaults from torch modules. A fresh interpreter shows what each imports."""
    import subprocess
    import sys

    commands = ("main", "train_fr", "embed", "train_diffusion", "gen", "export", "eval")
    probe = (
        "import sys, importlib\n"
        f"for name in {commands!r}:\n"
        "    help_text = importlib.import_module(f'vigface.cli.{name}').build_parser().format_help()\n"
        "    assert 'usage:' in help_text, name\n"
        "print(sorted(m for m in ('torch', 'triton', 'onnx', 'onnxruntime') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_output_that_would_replace_an_input_is_refused_before_any_work(small_toy, tmp_path, capsys):
    """Found by a probe: export --out my/denoiser replaced the model's denoiser.json with its
    sidecar, embed --out fr/backbone.safetensors the weights it read, verify --json toy_val.bin the
    set it verified; each exited 0."""
    import shutil

    model = tmp_path / "my"
    shutil.copytree(tiny_model_dir(), model)
    before = {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()}
    bin_path = tmp_path / "val.bin"
    shutil.copy(small_toy / "toy_val.bin", bin_path)
    bin_bytes = bin_path.read_bytes()
    runs = {
        "vigface-export": (
            lambda: export_cli.main(["--model", str(model), "--out", str(model / "denoiser")]),
            f"its sidecar {model / 'denoiser.json'}: would replace",
        ),
        "vigface-embed": (
            lambda: embed_cli.main(
                [str(model / "fr"), str(bin_path), "--out", str(model / "fr" / "backbone.safetensors")]
            ),
            "would replace",
        ),
        "vigface-eval": (
            lambda: eval_cli.main(["verify", str(model / "fr"), str(bin_path), "--json", str(bin_path)]),
            f"--json {bin_path}: would replace {bin_path}, an input of this command",
        ),
    }
    for name, (run, why) in runs.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"{name}: error: ") and why in err, err
    assert {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()} == before
    assert bin_path.read_bytes() == bin_bytes
    # the default export goes into the model's engines/ folder, and again over its own earlier export
    for _ in range(2):
        assert export_cli.main(["--model", str(model)]) == 0
    assert (model / "engines" / "denoiser.onnx").is_file()


def test_cfg_sweep_names_a_damaged_denoiser_json(small_toy, tmp_path, capsys):
    """cfg-sweep read denoiser.json raw: broken JSON, a list, or a number for fr_model were
    tracebacks; an empty folder was 'No such file or directory'."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    meta = (model / "denoiser.json").read_text()
    sweep = ["cfg-sweep", str(model), "--real", str(small_toy / "train.rec"), "--work", str(tmp_path / "w"),
             "--num-ids", "2", "--per-id", "2", "--steps", "2", "--quiet", "--w", "0.5"]  # fmt: skip
    for text, why in (
        ("{broken", "denoiser.json: not readable JSON"),
        ("[1, 2]", "denoiser.json: not a denoiser description"),
        (meta.replace('"fr_model": "fr"', '"fr_model": 123'), "denoiser.json: not a denoiser description"),
    ):
        (model / "denoiser.json").write_text(text)
        assert eval_cli.main(sweep) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    sweep[1] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    assert eval_cli.main(sweep) == 2
    assert "not a trained denoiser folder" in capsys.readouterr().err


def test_embed_refuses_to_write_nan_embeddings(small_toy, tmp_path, capsys):
    """A diverged model (NaN in a bias) gave 400 NaN embeddings, written with exit 0; verify and
    metrics refuse the same model's scores."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "fr"
    shutil.copytree(tiny_model_dir() / "fr", model)
    weights = load_file(model / "backbone.safetensors")
    weights["fc.bias"][:] = float("nan")
    save_file(weights, model / "backbone.safetensors")
    out = tmp_path / "emb.npy"
    assert embed_cli.main([str(model), str(small_toy / "toy_val.bin"), "--out", str(out), "--quiet"]) == 2
    assert "embeddings hold NaN or infinite values (did the model diverge?)" in capsys.readouterr().err
    assert not out.exists()
