"""`vigface data toy` end to end on a small world: files, layout, determinism, refusal to clobber."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from vigface.cli.main import main
from vigface.data.recordio import FaceRecordDataset, RecordIOReader
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.data.verification_bin import read_bin
from vigface.errors import VigfaceError, VigfaceWarning

SMALL = ToyConfig(ids=6, per_id=3, pairs=40, val_ids=20, val_per_id=2, pose_per_id=1, seed=5)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, SMALL, workers=1, progress=False)
    return out


def test_files_and_training_records(toy):
    recipe = json.loads((toy / "toy.json").read_text())
    assert recipe["config"]["ids"] == 6 and recipe["images"]["train"] == 18
    ds = FaceRecordDataset(toy / "train.rec")
    assert len(ds) == 18
    assert list(ds.labels) == [i for i in range(6) for _ in range(3)]
    img, label = ds[4]
    assert img.shape == (112, 112, 3) and label == 1
    lm = np.load(toy / "train_landmarks.npy")
    assert lm.shape == (18, 5, 2) and lm.dtype == np.float32
    assert np.all((lm > 0) & (lm < 112))
    identities = json.loads((toy / "identities.json").read_text())
    assert [r["identity"] for r in identities] == list(range(26))


def test_verification_bins_hold_ten_folds_of_held_out_pairs(toy):
    for name in ("toy_val.bin", "toy_pose.bin"):
        images, issame = read_bin(toy / name)
        assert len(images) == 80 and len(issame) == 40
        # Each fold of 4 pairs: 2 positives then 2 negatives.
        np.testing.assert_array_equal(np.asarray(issame).reshape(10, 4), [[True, True, False, False]] * 10)
    # No verification image is a training image (held-out identities).
    train = {payload for _, payload in RecordIOReader(toy / "train.rec")}
    val_images, _ = read_bin(toy / "toy_val.bin")
    assert not any(bytes(v) in p for v in val_images[:10] for p in train)


def test_parallel_and_serial_runs_are_byte_identical(toy, tmp_path):
    make_toy_dataset(tmp_path, SMALL, workers=2, progress=False)
    for name in ("train.rec", "train.idx", "train_landmarks.npy", "toy_val.bin", "toy_pose.bin"):
        assert (tmp_path / name).read_bytes() == (toy / name).read_bytes(), name


def test_refuses_to_overwrite_and_bad_config(toy, tmp_path):
    with pytest.raises(VigfaceError, match="overwrite"):
        make_toy_dataset(toy, SMALL, workers=1, progress=False)
    with pytest.raises(VigfaceError, match="--pairs"):
        make_toy_dataset(tmp_path, ToyConfig(ids=4, per_id=1, pairs=30), workers=1, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written for a refused config
    with pytest.raises(VigfaceError, match="--workers must be >= 0"):
        make_toy_dataset(tmp_path / "w", SMALL, workers=-1, progress=False)


def test_a_pair_set_of_mostly_repeats_is_warned_about(tmp_path):
    """2 ids x 1 image for 6,000 pairs: 556 distinct of the 3,000 genuine pairs, without a word."""
    from vigface.data.pairs import repeated_pairs

    few = ToyConfig(ids=2, per_id=1, pairs=2000, val_ids=20, val_per_id=2, pose_per_id=1)
    with pytest.warns(VigfaceWarning, match=r"toy_val.bin: \d+ of its 2000 pairs repeat another"):
        make_toy_dataset(tmp_path / "few", few, workers=1, progress=False)
    assert repeated_pairs([([(1, 2), (3, 4)], None), ([(2, 1), (3, 5)], None)]) == 1  # either order
    with warnings.catch_warnings():
        warnings.simplefilter("error", VigfaceWarning)  # SMALL repeats a few: not said
        make_toy_dataset(tmp_path / "small", SMALL, workers=1, progress=False)


def test_overwrite_without_pairs_leaves_no_pair_sets_of_the_old_world(toy, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(toy, copy)
    assert (copy / "toy_val.bin").is_file()
    recipe = make_toy_dataset(
        copy, ToyConfig(ids=3, per_id=2, pairs=0, val_ids=2), workers=1, progress=False, overwrite=True
    )
    assert not (copy / "toy_val.bin").exists() and not (copy / "toy_pose.bin").exists()
    assert sorted(p.name for p in copy.iterdir()) == sorted(recipe["files"] + ["toy.json"])


def test_cli_toy_and_info(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "data",
            "toy",
            "--out",
            str(out),
            "--ids",
            "3",
            "--per-id",
            "2",
            "--pairs",
            "20",
            "--val-ids",
            "20",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0
    assert "wrote 6 training images" in capsys.readouterr().out
    assert main(["data", "info", str(out / "train.rec"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 6 and info["identities"] == 3
    assert info["landmarks"] == "train_landmarks.npy (6, 5, 2) float32"
    # a damaged landmarks table is reported, not a traceback (NumPy's "pickled (object) data" error)
    (out / "train_landmarks.npy").write_text("garbage")
    assert main(["data", "info", str(out / "train.rec"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["landmarks"] == (
        f"unusable: {out / 'train_landmarks.npy'}: is not a .npy file (no NumPy header); "
        "expected (N, 5, 2) landmarks"
    )
    assert main(["data", "info", str(out / "toy_val.bin")]) == 0
    assert "pairs: 20" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing.rec")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigface: error:") and "missing.rec" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["data", "toy", "--out", str(tmp_path), "--ids", "zero"])
    assert e.value.code == 2


def test_a_folder_holding_another_dataset_is_refused_even_with_overwrite(tmp_path):
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation.json").write_text("{}")
    (other / "train.rec").write_bytes(b"not ours")
    for overwrite in (False, True):
        with pytest.raises(VigfaceError, match="holds generation.json, which a toy dataset does not write"):
            make_toy_dataset(other, SMALL, workers=1, progress=False, overwrite=overwrite)
    assert (other / "train.rec").read_bytes() == b"not ours"
    # A half-made toy folder (a killed run's files and temporaries) is finished, not refused.
    half = tmp_path / "half"
    half.mkdir()
    (half / "train.rec.123.tmp").write_bytes(b"partial")
    (half / "toy_val.bin").write_bytes(b"partial")
    make_toy_dataset(half, SMALL, workers=1, progress=False)
    assert (half / "toy.json").is_file()


def _start_toy(out, *extra):
    """`vigface data toy` as its own process group (a terminal's Ctrl-C reaches the whole group)."""
    cmd = [sys.executable, "-m", "vigface.cli.main", "data", "toy", "--out", str(out), "--ids", "400",
           "--per-id", "20", "--pairs", "0", "--workers", "2", "--quiet", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_temporaries(proc, out):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("train.rec.*.tmp")):
            time.sleep(0.5)  # well inside the rendering: the workers have started
            return
        time.sleep(0.02)
    raise AssertionError("the toy set finished (or failed) before it could be stopped")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT to the group"])
def test_stopped_toy_run_cleans_up_in_one_line(tmp_path, how):
    """SIGTERM (a plain kill, a scheduler's stop) used to kill the writer mid-file and leave its *.tmp
    files; Ctrl-C printed a KeyboardInterrupt traceback from every pool worker. Both now end in one
    line, with no temporary file left."""
    out = tmp_path / "toy"
    proc = _start_toy(out)
    _wait_for_temporaries(proc, out)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if how == "SIGTERM" else 130)
    assert err.strip() == ("vigface: terminated" if how == "SIGTERM" else "vigface: interrupted")
    assert not list(out.glob("*.tmp"))


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path):
    """kill -9 leaves `train.rec.<pid>.tmp`; the next run into the folder removes those of dead writers."""
    out = tmp_path / "toy"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / f"train.rec.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half a file")
    hidden = out / f".toy.json.{int(dead.stdout)}.tmp"  # write_atomically's temporary name
    hidden.write_text("{")
    alive = out / f"train.idx.{os.getppid()}.tmp"  # a writer that still runs: left alone
    alive.write_bytes(b"")
    make_toy_dataset(out, ToyConfig(ids=4, per_id=2, pairs=0, val_ids=2), workers=1, progress=False)
    assert not stale.exists() and not hidden.exists() and alive.exists()


def test_a_negative_seed_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "toy", "--out", str(tmp_path / "t"), "--seed", "-1", "--quiet"]) == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_info_describes_model_and_run_folders(tiny_fr_model, tmp_path, capsys):
    """`vigface data info runs/fr` said "no manifest.jsonl and no images"; it now describes the model."""
    assert main(["data", "info", str(tiny_fr_model)]) == 0
    out = capsys.readouterr().out
    assert "kind: fr-model" in out and "prototypes: 40 real + 10 virtual" in out and "32-d" in out
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert main(["data", "info", str(run)]) == 0  # stopped before its first checkpoint
    assert "kind: training run (not exported yet)" in capsys.readouterr().out
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    assert main(["data", "info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "kind: training run (not exported yet)" in out and "latest step_00000003" in out
    (run / "backbone.json").write_text("[1, 2]")
    assert main(["data", "info", str(run)]) == 2
    assert "backbone.json: not a JSON object" in capsys.readouterr().err
