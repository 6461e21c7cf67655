"""vigface-gen: sampling determinism, the shard layout, and kill -9 / resume byte-identity."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vigface.cli import gen as gen_cli
from vigface.data.image_folder import ImageFolderDataset
from vigface.data.loaders.source import FaceSource
from vigface.data.recordio import FaceRecordDataset
from vigface.diffusion.config import DiffusionTrainConfig
from vigface.diffusion.sampling import FaceSampler
from vigface.diffusion.trainer import train_diffusion
from vigface.engines.compile import fast_kernel_options
from vigface.errors import BackendUnavailableError, VigfaceError, VigfaceWarning
from vigface.generate.config import GenerationConfig
from vigface.generate.dataset import _Generator, generate_dataset, remove_stale_shards
from vigface.run_lock import FolderLock


@pytest.fixture(scope="module")
def denoiser_dir(small_toy, tiny_fr_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_denoiser")
    train_diffusion(
        DiffusionTrainConfig(
            data=str(small_toy / "train.rec"), fr_model=str(tiny_fr_model), out=str(out), size="tiny",
            image_size=32, batch_size=16, steps=10, lr=1e-3, workers=0, progress=False,
        )
    )  # fmt: skip
    return out


def gen_args(model, out) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--ids", "both", "--num-ids", "3", "--per-id", "4",
            "--steps", "8", "--batch-size", "2", "--shard-size", "4", "--quiet"]  # fmt: skip


def test_an_image_does_not_depend_on_its_batch(denoiser_dir):
    sampler = FaceSampler.load(denoiser_dir)
    cond = torch.nn.functional.normalize(
        torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=1
    )
    pose = torch.rand(3, 5, 32, 32, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.5, 2.5, 2.5])
    together = sampler.sample(cond, pose, w, [11, 12, 13], steps=6)
    alone = sampler.sample(cond[1:2], pose[1:2], w[1:2], [12], steps=6)
    assert together.dtype == np.uint8 and together.shape == (3, 32, 32, 3)
    assert np.abs(together[1].astype(int) - alone[0].astype(int)).max() <= 1  # float rounding at most
    assert not np.array_equal(together[0], together[1])
    assert np.array_equal(sampler.sample(cond, pose, w, [11, 12, 13], steps=6), together)


def test_layout_and_labels(denoiser_dir, tmp_path):
    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    data = FaceRecordDataset(out / "train.rec")
    assert len(data) == 24 and data.num_classes == 6
    assert data[0][0].shape == (112, 112, 3)
    assert np.load(out / "train_landmarks.npy").shape == (24, 5, 2)
    labels = json.loads((out / "generation.json").read_text())["labels"]
    assert labels["0"] == ["real", 0] and labels["3"] == ["virtual", 0]
    assert len((out / "shards.jsonl").read_text().splitlines()) == 6


def test_kill_and_rerun_is_byte_identical(denoiser_dir, tmp_path):
    full = tmp_path / "full"
    generate_dataset(GenerationConfig(model=str(denoiser_dir), out=str(full), ids="both", num_ids=3, per_id=4,
                                      steps=8, batch_size=2, shard_size=4, progress=False))  # fmt: skip
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vigface.cli.gen", *gen_args(denoiser_dir, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "shards").glob("shard_*"))) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "generation finished before it could be killed"
    assert not (out / "train.rec").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("train.rec", "train.idx", "train_landmarks.npy", "shards.jsonl"):
        assert (out / name).read_bytes() == (full / name).read_bytes(), name
    assert not list((out / "shards").glob(".tmp-*"))


def test_errors(denoiser_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(BackendUnavailableError, match="engine 'trt' is not available"):
        FaceSampler.load(denoiser_dir, engine="trt")
    with pytest.raises(VigfaceError, match="100 virtual identities asked for"):
        generate_dataset(
            GenerationConfig(model=str(denoiser_dir), out=str(tmp_path / "x"), num_ids=100, progress=False)
        )
    assert gen_cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "not a trained denoiser folder" in capsys.readouterr().err
    # a step count the schedule cannot take: one line, and no half-made output folder to trip a rerun
    for sampler, steps, why in (("ddim", 5000, "DDIM steps must be in 1..1000, got 5000"),
                                ("dpm++logsnr", 1, "logsnr steps must be in 2..1000, got 1")):  # fmt: skip
        out = tmp_path / f"steps_{sampler}"
        args = ["--model", str(denoiser_dir), "--out", str(out), "--sampler", sampler, "--steps", str(steps)]
        with monkeypatch.context() as patched:  # refused before the weights load (and an engine builds)
            patched.setattr(
                FaceSampler, "load", lambda *a, **k: pytest.fail("loaded before --steps was checked")
            )
            assert gen_cli.main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--steps {steps} with --sampler {sampler}: " in err and why in err
        assert not out.exists()
    # a guidance weight that is not a finite w >= 0 (NaN made NaN images): one line, nothing written
    for flag, value in (("--w-real", "nan"), ("--w-virtual", "-1"), ("--w-virtual", "inf")):
        out = tmp_path / f"w_{flag}_{value}"
        assert gen_cli.main(["--model", str(denoiser_dir), "--out", str(out), flag, value, "--quiet"]) == 2
        assert f"{flag} must be a finite number >= 0, got {float(value)}" in capsys.readouterr().err
        assert not out.exists()


def test_pose_file_and_frontal(denoiser_dir, tmp_path):
    frontal_face = [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]
    turned_face = [[30.0, 50.0], [60.0, 45.0], [40.0, 70.0], [35.0, 90.0], [62.0, 88.0]]
    table = np.array([frontal_face, turned_face], dtype=np.float32)
    np.save(tmp_path / "poses.npy", table)
    common = dict(
        model=str(denoiser_dir), ids="virtual", num_ids=2, per_id=3, steps=2, batch_size=6, progress=False
    )
    generate_dataset(GenerationConfig(out=str(tmp_path / "file"), pose=str(tmp_path / "poses.npy"), **common))
    used = np.load(tmp_path / "file" / "train_landmarks.npy")
    assert used.shape == (6, 5, 2)
    assert all(any(np.allclose(row, t) for t in table) for row in used)  # every pose drawn from the file
    generate_dataset(GenerationConfig(out=str(tmp_path / "frontal"), pose="frontal", **common))
    frontal = np.load(tmp_path / "frontal" / "train_landmarks.npy")
    assert np.allclose(frontal, frontal[0]) and np.allclose(frontal[0], table[0], atol=0.1)
    with pytest.raises(VigfaceError, match="bad.npy: has shape \\(3, 4\\), expected \\(N, 5, 2\\)"):
        np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
        generate_dataset(
            GenerationConfig(out=str(tmp_path / "bad"), pose=str(tmp_path / "bad.npy"), **common)
        )
    # rows without 5 finite points are no pose (NaN poses went into the output, exit 0); none: refused
    holes = np.concatenate([table, np.full((2, 5, 2), np.nan, np.float32)])
    np.save(tmp_path / "holes.npy", holes)
    generate_dataset(
        GenerationConfig(out=str(tmp_path / "holes"), pose=str(tmp_path / "holes.npy"), **common)
    )
    drawn = np.load(tmp_path / "holes" / "train_landmarks.npy")
    assert np.isfinite(drawn).all() and all(any(np.allclose(row, t) for t in table) for row in drawn)
    np.save(tmp_path / "nan.npy", np.full((3, 5, 2), np.nan, np.float32))
    with pytest.raises(VigfaceError, match="nan.npy: none of its 3 rows holds 5 finite points"):
        generate_dataset(
            GenerationConfig(out=str(tmp_path / "nan"), pose=str(tmp_path / "nan.npy"), **common)
        )
    assert not (tmp_path / "nan").exists()


def test_torchrun_two_ranks_equal_one_process(denoiser_dir, tmp_path):
    """Each rank generates its own shards, rank 0 merges: the same bytes as a single process."""
    one = tmp_path / "one"
    assert gen_cli.main(gen_args(denoiser_dir, one)) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "vigface.cli.gen", *gen_args(denoiser_dir, two), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("train.rec", "train.idx", "train_landmarks.npy", "shards.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert done.stdout.count(f"-> {two}") == 1  # one closing line, not one per rank


def test_model_folder_generates_on_its_own(denoiser_dir, tmp_path):
    """Moved away from its FR model and training data, the folder still generates: it holds a copy of
    the prototypes and the pose table (what vigface's shipped model relies on)."""
    moved = tmp_path / "moved"
    shutil.copytree(denoiser_dir, moved, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((moved / "denoiser.json").read_text())
    meta["fr_model"] = str(tmp_path / "gone")
    meta["train_config"]["data"] = str(tmp_path / "gone")
    (moved / "denoiser.json").write_text(json.dumps(meta))
    assert gen_cli.main(gen_args(moved, tmp_path / "a")) == 0
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "b")) == 0
    assert (tmp_path / "a" / "train.rec").read_bytes() == (tmp_path / "b" / "train.rec").read_bytes()
    drawn = np.load(tmp_path / "a" / "train_landmarks.npy")  # output size 112: the table's own frame
    table = np.load(moved / "pose_landmarks.npy")
    assert all(any(np.allclose(row, t) for t in table) for row in drawn)


def test_folder_format_holds_the_same_images_and_their_landmarks(denoiser_dir, tmp_path):
    """--format folder: the .rec's images byte for byte, and each manifest line carries the image's
    landmarks, so the folder trains stage 2 like the .rec (it said "the manifest has no landmarks")."""
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "rec")) == 0
    assert gen_cli.main([*gen_args(denoiser_dir, tmp_path / "folder"), "--format", "folder"]) == 0
    rec, folder = FaceRecordDataset(tmp_path / "rec" / "train.rec"), ImageFolderDataset(tmp_path / "folder")
    assert len(folder) == len(rec) == 24
    assert all(folder.encoded(i) == rec.encoded(i)[0] for i in range(24))
    assert folder.labels.tolist() == rec.labels.tolist()
    expected = np.load(tmp_path / "rec" / "train_landmarks.npy")
    assert np.array_equal(np.load(tmp_path / "folder" / "train_landmarks.npy"), expected)
    assert np.allclose(FaceSource(tmp_path / "folder", need_landmarks=True).landmarks, expected)


def test_precision_flag(denoiser_dir, tmp_path, capsys):
    """--precision reaches the engine: bf16 eager images stay close to fp32 ones; an engine that does
    not offer a precision refuses it with a one-line error."""
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "fp32")) == 0
    assert gen_cli.main([*gen_args(denoiser_dir, tmp_path / "bf16"), "--precision", "bf16"]) == 0
    a, b = (
        FaceRecordDataset(tmp_path / "fp32" / "train.rec"),
        FaceRecordDataset(tmp_path / "bf16" / "train.rec"),
    )
    assert len(a) == len(b) == 24 and np.array_equal(a.labels, b.labels)
    diff = np.mean([np.abs(a[i][0].astype(int) - b[i][0].astype(int)).mean() for i in range(len(a))])
    assert 0 < diff < 8, diff  # bf16 changes pixels, a few levels on average at most
    assert (
        gen_cli.main([*gen_args(denoiser_dir, tmp_path / "x"), "--engine", "onnx", "--precision", "bf16"])
        == 2
    )
    assert "precision 'bf16' is not offered" in capsys.readouterr().err


def test_kernels_flag(denoiser_dir, tmp_path, capsys):
    """--kernels fast sets the denoiser's runtime choices to auto (the fast paths on CUDA, the
    reference ops on a CPU, so the same bytes here); the plan records it, so a rerun with other
    kernels into the same folder is refused, while a reference run's plan has no such key (plans
    written before the option existed still match)."""
    with pytest.warns(VigfaceWarning, match="on the CPU the reference ones run"):  # it said nothing
        sampler = FaceSampler.load(denoiser_dir, kernels="fast")
    assert (sampler.config.attention, sampler.config.adaln, sampler.config.mlp) == ("auto", "auto", "auto")
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "ref")) == 0
    assert gen_cli.main([*gen_args(denoiser_dir, tmp_path / "fast"), "--kernels", "fast"]) == 0
    a, b = (FaceRecordDataset(tmp_path / d / "train.rec") for d in ("ref", "fast"))
    assert len(a) == len(b) == 24 and all(np.array_equal(a[i][0], b[i][0]) for i in range(len(a)))
    plans = {
        d: json.loads((tmp_path / d / "generation.json").read_text())["plan"]["config"]
        for d in ("ref", "fast")
    }
    assert "kernels" not in plans["ref"] and plans["fast"]["kernels"] == "fast"
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "fast")) == 2
    assert "other settings" in capsys.readouterr().err
    with pytest.raises(VigfaceError, match="kernels 'turbo' is unknown"):
        FaceSampler.load(denoiser_dir, kernels="turbo")


def test_fast_kernels_for_the_compile_engine():
    """The compile engine's share of --kernels fast: nothing off CUDA; on CUDA the cuBLASLt MLP and the
    Triton attention for 16-bit / fp8 only (the rule alone: no GPU needed to check it)."""
    assert fast_kernel_options("cpu", "bf16") == {} and fast_kernel_options(torch.device("cpu"), None) == {}
    for precision, attention in [("bf16", "triton"), ("fp16", "triton"), ("fp8", "triton"), ("fp32", "sdpa")]:
        assert fast_kernel_options("cuda", precision) == {"attention": attention, "mlp": "cublaslt"}
    assert fast_kernel_options("cuda:1", None) == {"attention": "sdpa", "mlp": "cublaslt"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["eager", "cudagraph"])  # compile (max-autotune here): test_engines
def test_fast_kernels_on_cuda_stay_within_bf16_rounding(denoiser_dir, engine):
    samplers = {k: FaceSampler.load(denoiser_dir, "cuda", engine, "bf16", k) for k in ("reference", "fast")}
    config, n = samplers["fast"].config, 6
    g = torch.Generator().manual_seed(0)
    cond = torch.nn.functional.normalize(torch.randn(n, config.cond_dim, generator=g), dim=1)
    pose = torch.rand(n, 5, config.image_size, config.image_size, generator=g)
    w, seeds = torch.full((n,), 1.5), list(range(n))
    images = {k: s.sample(cond, pose, w, seeds, steps=10).astype(int) for k, s in samplers.items()}
    diff = np.abs(images["fast"] - images["reference"])
    assert diff.mean() < 2.0 and diff.max() < 64, (diff.mean(), diff.max())


def test_a_damaged_generation_plan_is_a_one_line_error(denoiser_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    for damage in ("garbage", "[1, 2]"):
        (out / "generation.json").write_text(damage)
        assert gen_cli.main(gen_args(denoiser_dir, out)) == 2
        err = capsys.readouterr().err
        assert "generation.json" in err and "not a generation plan" in err
        assert "Traceback" not in err


def test_a_rerun_matches_the_plan_by_content_not_path_spelling(denoiser_dir, tmp_path, capsys, monkeypatch):
    """An unfinished generation continues from another folder, under an absolute --out, or from a moved
    (reinstalled) model; weights retrained in place or another setting are refused, named."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(denoiser_dir, tmp_path / "model")
    assert gen_cli.main(gen_args("model", "gen")) == 0  # relative paths
    reference = (tmp_path / "gen" / "train.rec").read_bytes()
    (tmp_path / "gen" / "shards" / "shard_00003").rename(tmp_path / "gen" / "shards" / ".removed")
    (tmp_path / "gen" / "train.rec").unlink()  # as if killed before the merge
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "model", moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert gen_cli.main(gen_args(moved, tmp_path / "gen")) == 0
    assert "(1 made now)" in capsys.readouterr().out
    assert (tmp_path / "gen" / "train.rec").read_bytes() == reference

    args = gen_args(moved, tmp_path / "gen")
    assert gen_cli.main([*args, "--w-real", "1.0"]) == 2
    refused = capsys.readouterr().err
    assert "other settings (w_real 0.5 there, 1.0 now); it is finished: choose another --out" in refused
    # the defaults spelt out are the same settings (--precision fp32 was "precision None there")
    assert gen_cli.main([*args, "--precision", "fp32", "--kernels", "reference"]) == 0
    assert gen_cli.main([*args, "--kernels", "fast"]) == 2
    assert "other settings (kernels 'reference' there, 'fast' now)" in capsys.readouterr().err
    weights = moved / "denoiser.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # "retrained in place"
    save_file(tensors, weights)
    assert gen_cli.main(args) == 2
    assert "other settings (the denoiser weights differ)" in capsys.readouterr().err

    # a plan written before the hashes is compared by path, resolved
    meta = json.loads((tmp_path / "gen" / "generation.json").read_text())
    del meta["plan"]["inputs_sha256"]
    meta["plan"]["config"]["model"] = "../model"
    (tmp_path / "gen" / "generation.json").write_text(json.dumps(meta))
    assert gen_cli.main(gen_args(tmp_path / "model", tmp_path / "gen")) == 0
    assert gen_cli.main(args) == 2
    assert f"other settings (model '{tmp_path / 'model'}' there, '{moved}' now)" in capsys.readouterr().err


def test_shipped_model_generates_without_arguments(tmp_path, capsys):
    """`vigface-gen --out DIR` uses the tiny model inside the package (its FR model in fr/)."""
    out = tmp_path / "shipped"
    args = ["--out", str(out), "--ids", "both", "--num-ids", "2", "--per-id", "2", "--steps", "3", "--quiet"]
    assert gen_cli.main(args) == 0
    assert "shipped tiny toy-world model" in capsys.readouterr().err
    data = FaceRecordDataset(out / "train.rec")
    assert len(data) == 8 and data.num_classes == 4 and data[0][0].shape == (112, 112, 3)


def test_damaged_model_folder_files_are_one_line_errors(denoiser_dir, tmp_path, capsys):
    """A truncated prototypes file or a non-.npy pose table: exit 2 naming the file, nothing written."""
    model = tmp_path / "model"
    shutil.copytree(denoiser_dir, model, ignore=shutil.ignore_patterns("checkpoints"))
    good = (model / "prototypes.safetensors").read_bytes()
    (model / "prototypes.safetensors").write_bytes(good[:100])
    assert gen_cli.main(gen_args(model, tmp_path / "a")) == 2
    assert "prototypes.safetensors: cannot be read as safetensors" in capsys.readouterr().err
    (model / "prototypes.safetensors").write_bytes(good)
    (model / "pose_landmarks.npy").write_text("garbage")
    assert gen_cli.main(gen_args(model, tmp_path / "b")) == 2
    assert "pose_landmarks.npy: is not a .npy file (no NumPy header)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_second_generation_into_a_folder_in_use_is_refused(denoiser_dir, tmp_path, capsys):
    """Seen by hand: a second vigface-gen into the folder of a running one deleted its half-written
    shard as a killed run's leftover, and the first died with an unrelated 'No such file' error."""
    out = tmp_path / "gen"
    (out / "shards" / ".tmp-shard_00000-4242").mkdir(parents=True)  # the running one's shard
    with FolderLock(out) as running:
        running.acquire()
        assert gen_cli.main(gen_args(denoiser_dir, out)) == 2
        err = capsys.readouterr().err
        assert f"vigface-gen: error: another process (pid {os.getpid()}) is writing into {out}" in err
        assert (out / "shards" / ".tmp-shard_00000-4242").is_dir()  # left alone
        assert not list((out / "shards").glob("shard_*")) and not (out / "train.rec").exists()
        assert not (out / "generation.json").exists()  # refused before its plan was written
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0  # once it is gone, the folder is ours
    assert len(FaceRecordDataset(out / "train.rec")) == 24
    assert not (out / ".lock").exists()


def test_finished_shards_without_their_plan_are_refused(denoiser_dir, tmp_path, capsys):
    """A folder whose generation.json is gone: its shards were merged under a new plan with other
    settings (seed 1 took seed 0's images). Now refused, naming the shards."""
    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    for name in ("generation.json", "train.rec", "train.idx", "train_landmarks.npy", "shards.jsonl"):
        (out / name).unlink()
    assert gen_cli.main([*gen_args(denoiser_dir, out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds finished shards (shard_00000, shard_00001, shard_00002 ...) but no generation.json" in err
    assert not (out / "train.rec").exists()


def test_generation_settings_out_of_range_are_refused(tmp_path):
    for field, value, message in (("quality", 101, "--quality must be a JPEG quality in"),
                                  ("seed", 2**32, "--seed must be in"), ("seed", -1, "--seed must be in"),
                                  ("per_id", 1_000_003, "--per-id must be under 1,000,003")):  # fmt: skip
        with pytest.raises(VigfaceError, match=message):
            GenerationConfig(model="m", out=str(tmp_path), **{field: value})


def test_an_interrupted_shard_leaves_no_partial_folder(denoiser_dir, tmp_path, monkeypatch):
    """Ctrl-C while a shard is written: its temporary folder goes with it (a rerun had to clear it),
    the finished shards stay, and the rerun completes the set."""
    out = tmp_path / "gen"
    calls = {"n": 0}
    sample = FaceSampler.sample

    def interrupted_on_the_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(FaceSampler, "sample", interrupted_on_the_third_batch)
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 130
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00000"]
    monkeypatch.setattr(FaceSampler, "sample", sample)
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert len(FaceRecordDataset(out / "train.rec")) == 24


def test_a_run_stopped_in_its_first_shard_takes_new_settings(denoiser_dir, tmp_path, monkeypatch, capsys):
    """A run that died in its first batch (out of GPU memory at its --batch-size) left its plan, and
    the rerun with a smaller batch was refused as 'other settings' although nothing had been made.
    Once a shard is finished, the settings stay bound (test_generate's kill-and-rerun)."""
    out = tmp_path / "gen"
    sample = FaceSampler.sample

    def out_of_memory(self, *args, **kwargs):
        raise KeyboardInterrupt  # stands in for the allocator's error: the run stops in shard 0

    monkeypatch.setattr(FaceSampler, "sample", out_of_memory)
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 130
    assert (out / "generation.json").is_file() and not list((out / "shards").iterdir())
    monkeypatch.setattr(FaceSampler, "sample", sample)
    args = gen_args(denoiser_dir, out)
    args[args.index("--batch-size") + 1] = "1"
    assert gen_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "no shard of the generation started there was finished, so this run's settings replace its" in err
    assert "batch_size 2 there, 1 now" in err
    assert json.loads((out / "generation.json").read_text())["plan"]["config"]["batch_size"] == 1
    assert len(FaceRecordDataset(out / "train.rec")) == 24
    args[args.index("--batch-size") + 1] = "3"  # finished: bound
    assert gen_cli.main(args) == 2
    assert "it is finished: choose another --out" in capsys.readouterr().err


def test_a_shard_damaged_on_disk_is_named_with_what_to_do(denoiser_dir, tmp_path, capsys):
    """A finished shard damaged before the merge: a flipped byte was merged silently (shards carried
    no checksum), a cut one failed in the .idx reader without saying which shard to make again."""
    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    merged = (out / "train.rec").read_bytes()
    shard = out / "shards" / "shard_00001"
    meta = json.loads((shard / "meta.json").read_text())
    assert meta["data.rec_sha256"] == hashlib.sha256((shard / "data.rec").read_bytes()).hexdigest()
    good = (shard / "data.rec").read_bytes()
    for damage, why in (
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "data.rec does not match the checksum"),
        (lambda b: b[:-100], "data.rec does not match the checksum"),
    ):
        (shard / "data.rec").write_bytes(damage(good))
        (out / "shards.jsonl").unlink(missing_ok=True)  # as when a shard is made again: merge once more
        assert gen_cli.main(gen_args(denoiser_dir, out)) == 2
        err = capsys.readouterr().err
        assert f"{shard}: damaged ({why} in its meta.json); remove {shard} and rerun the same command" in err
    shutil.rmtree(shard)
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert (out / "train.rec").read_bytes() == merged
    first = out / "shards" / "shard_00000"
    (first / "meta.json").write_text("[1]")
    (out / "shards.jsonl").unlink()
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 2
    assert f"{first}: damaged (its meta.json is not a JSON object)" in capsys.readouterr().err
    # a shard folder without meta.json (written last) is made again; the rename onto it was
    # "Directory not empty"
    (first / "meta.json").unlink()
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert (out / "train.rec").read_bytes() == merged


def test_stale_partial_shards_of_dead_ranks_are_removed(tmp_path):
    """Under torchrun a killed run's partial shards were never removed (each rank left the others'
    alone); now any rank removes those whose process is gone, and keeps a live one's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shards = tmp_path / "shards"
    for name in (f".tmp-shard_00003-{dead.pid}", f".tmp-shard_00004-{os.getpid()}", "shard_00000"):
        (shards / name).mkdir(parents=True)
    remove_stale_shards(shards, world_size=2)
    assert sorted(p.name for p in shards.iterdir()) == [f".tmp-shard_00004-{os.getpid()}", "shard_00000"]
    remove_stale_shards(shards, world_size=1)  # one rank holds the folder lock: any partial shard is stale
    assert [p.name for p in shards.iterdir()] == ["shard_00000"]


def test_landmarks_follow_the_output_size_with_pixel_centres(denoiser_dir, tmp_path):
    """--output-size 224: the saved landmarks are the planned 112-frame poses moved with the
    pixel-centre convention (x + 0.5) * 2 - 0.5, as the resize moves the pixels (it was x * 2)."""
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "a")) == 0
    assert gen_cli.main([*gen_args(denoiser_dir, tmp_path / "b"), "--output-size", "224"]) == 0
    at112 = np.load(tmp_path / "a" / "train_landmarks.npy").astype(np.float64)
    at224 = np.load(tmp_path / "b" / "train_landmarks.npy")
    np.testing.assert_allclose(at224, (at112 + 0.5) * 2 - 0.5, atol=1e-4)


def test_a_folder_holding_another_dataset_is_refused_untouched(denoiser_dir, small_toy, tmp_path, capsys):
    """A toy set (or any folder with other files) as --out: refused, its files byte-identical."""
    toy = tmp_path / "toy"
    shutil.copytree(small_toy, toy)
    before = {p.name: p.read_bytes() for p in toy.iterdir() if p.is_file()}
    assert gen_cli.main(gen_args(denoiser_dir, toy)) == 2
    err = capsys.readouterr().err
    assert "which vigface-gen does not write" in err and "toy.json" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in toy.iterdir() if p.is_file()} == before
    assert not (toy / "shards").exists() and not (toy / "generation.json").exists()
    # An empty folder, or one a killed run left with only its (empty) shards folder, is fine.
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "empty")) == 0


def test_data_info_describes_a_generated_folder(denoiser_dir, tmp_path, capsys):
    from vigface.cli.main import main as vigface_main

    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    capsys.readouterr()
    assert vigface_main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "generated-dataset" and (info["real_ids"], info["virtual_ids"]) == (3, 3)
    assert info["data"]["images"] == info["planned_images"] == 24 and info["data"]["identities"] == 6
    assert (info["w_real"], info["sampler"]) == (0.5, "ddim, 8 steps")
    (out / "train.rec").unlink()  # as if the merge had not happened yet
    assert vigface_main(["data", "info", str(out), "--json"]) == 0
    assert "not finished (6 of 6 shards made)" in json.loads(capsys.readouterr().out)["data"]
    for damage in ("[1]", '{"plan": {"config": {}}, "labels": [1]}'):
        (out / "generation.json").write_text(damage)
        assert vigface_main(["data", "info", str(out)]) == 2
        err = capsys.readouterr().err
        assert "generation.json: not a generation description" in err and "Traceback" not in err


def test_poses_outside_the_aligned_frame_are_warned_about(denoiser_dir, tmp_path, capsys):
    """--pose with the landmarks of unaligned photos (another frame) generated faces posed from them
    without a word; it now warns, naming the file."""
    from vigface.data.align import ARCFACE_TEMPLATE_112

    shifted = np.stack([ARCFACE_TEMPLATE_112 + [16.0, 16.0]] * 3).astype(np.float32)  # a 144-frame centre
    np.save(tmp_path / "poses.npy", shifted)
    args = ["--model", str(denoiser_dir), "--out", str(tmp_path / "g"), "--num-ids", "1", "--per-id", "2",
            "--steps", "2", "--pose", str(tmp_path / "poses.npy"), "--quiet"]  # fmt: skip
    assert gen_cli.main(args) == 0
    err = capsys.readouterr().err
    assert (
        f"vigface-gen: warning: poses {tmp_path / 'poses.npy'}: these landmarks do not look like aligned"
        in err
    )


def test_prototypes_of_another_fr_model_are_warned_about(denoiser_dir, tmp_path, capsys):
    """--prototypes from another FR model was accepted silently: prototypes now record their backbone."""
    from safetensors import safe_open

    own = denoiser_dir / "prototypes.safetensors"
    with safe_open(str(own), framework="pt") as f:
        recorded = f.metadata()["backbone_sha256"]
    assert recorded == json.loads((denoiser_dir / "denoiser.json").read_text())["fr_sha256"]
    args = ["--model", str(denoiser_dir), "--num-ids", "1", "--per-id", "2", "--steps", "2", "--quiet"]
    assert gen_cli.main([*args, "--out", str(tmp_path / "a"), "--prototypes", str(own)]) == 0
    assert "warning" not in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    save_file(load_file(own), other, metadata={"backbone_sha256": "0" * 64})
    assert gen_cli.main([*args, "--out", str(tmp_path / "b"), "--prototypes", str(other)]) == 0
    assert (
        f"vigface-gen: warning: --prototypes {other}: they come from another FR model"
        in capsys.readouterr().err
    )
    # prototypes of another size, or NaN ones: refused before the plan is written (the run failed at
    # its first batch, leaving a folder only those prototypes' settings could finish, and they fail)
    tables = load_file(own)
    wide = {k: torch.cat([v, v], dim=1) for k, v in tables.items()}
    holes = {k: v.clone() for k, v in tables.items()}
    holes["virtual"][0, 0] = float("nan")
    for name, table, why in (("wide", wide, r"real prototypes are \d+-d, but the denoiser takes"),
                             ("holes", holes, "virtual prototypes hold NaN")):  # fmt: skip
        save_file(table, tmp_path / f"{name}.safetensors")
        out = tmp_path / name
        assert (
            gen_cli.main([*args, "--out", str(out), "--prototypes", str(tmp_path / f"{name}.safetensors")])
            == 2
        )
        assert re.search(why, capsys.readouterr().err)
        assert not out.exists()


def test_a_finished_generation_is_not_merged_again(denoiser_dir, tmp_path, monkeypatch):
    """Rerunning a finished command returns without merging all its images again (minutes for a
    large set); a shard made again, a missing train.rec or a damaged shards.jsonl still re-merge."""
    out = tmp_path / "gen"
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    names = ("train.rec", "train.idx", "train_landmarks.npy", "shards.jsonl")
    first = {name: (out / name).read_bytes() for name in names}
    merges, merge = [], _Generator.merge
    monkeypatch.setattr(_Generator, "merge", lambda self: (merges.append(1), merge(self))[1])
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == []
    shutil.rmtree(out / "shards" / "shard_00002")  # made again below: the merged set is outdated
    (out / "train.rec").unlink()
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == [1] and (out / "shards" / "shard_00002" / "meta.json").is_file()
    shutil.rmtree(out / "shards" / "shard_00004")  # the merged files all kept this time
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == [1, 1]
    (out / "train.idx").unlink()
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == [1, 1, 1]
    (out / "shards.jsonl").write_text("{damaged\n")
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == [1, 1, 1, 1]
    with open(out / "train.rec", "r+b") as f:  # cut: its index points past the end
        f.truncate(1000)
    assert gen_cli.main(gen_args(denoiser_dir, out)) == 0
    assert merges == [1, 1, 1, 1, 1]
    assert {name: (out / name).read_bytes() for name in names} == first
    folder = [*gen_args(denoiser_dir, tmp_path / "folder"), "--format", "folder"]
    assert gen_cli.main(folder) == 0 and gen_cli.main(folder) == 0
    assert merges == [1, 1, 1, 1, 1, 1]  # made once, not merged again
    (tmp_path / "folder" / "manifest.jsonl").unlink()
    assert gen_cli.main(folder) == 0 and merges == [1, 1, 1, 1, 1, 1, 1]
    assert {name: (out / name).read_bytes() for name in names} == first


def _generate_with_a_slow_merge(rank: int, world_size: int, model, out) -> int:
    """A rank of a two-rank vigface-gen whose merge outlasts the timeout of the ranks' store."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=2))
    merge = _Generator.merge

    def slow_merge(self):
        time.sleep(5)
        merge(self)

    _Generator.merge = slow_merge
    return gen_cli.main(gen_args(model, out))


def test_torchrun_ranks_do_not_wait_for_the_merge(denoiser_dir, tmp_path):
    """Ranks other than 0 used to wait for rank 0's merge under the store's timeout (10 minutes
    with NCCL), so merging a large set stopped the whole job; they now leave before it."""
    from gloo_ranks import run_on_gloo_ranks

    out = tmp_path / "two"
    assert run_on_gloo_ranks(_generate_with_a_slow_merge, denoiser_dir, out, out_dir=tmp_path) == [0, 0]
    assert gen_cli.main(gen_args(denoiser_dir, tmp_path / "one")) == 0
    for name in ("train.rec", "train.idx", "train_landmarks.npy", "shards.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_plan_too_large_to_hold_is_refused_before_it_is_built():
    """--per-id 1,000,000 over 100 ids grew a 10**8-entry plan list to 8 GB without a word."""
    from vigface.generate.dataset import MAX_PLANNED_IMAGES, plan_jobs

    huge = GenerationConfig(model="m", out="o", ids="real", per_id=1_000_000)
    with pytest.raises(
        VigfaceError, match=r"100,000,000 images asked for \(100 ids x 1,000,000\); one run plans at most"
    ):
        plan_jobs(huge, num_real=100, num_virtual=100)
    edge = GenerationConfig(model="m", out="o", ids="both", num_ids=30, per_id=3)
    assert len(plan_jobs(edge, 30, 30)) == 180
    with pytest.raises(VigfaceError, match="one run plans at most"):  # 60 ids: just over the limit
        plan_jobs(dataclasses.replace(edge, per_id=MAX_PLANNED_IMAGES // 60 + 1), 30, 30)
