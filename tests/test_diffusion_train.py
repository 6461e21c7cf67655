"""The stage-2 trainer on the small toy world: learning, outputs, bit-exact resume, errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vigface.cli import train_diffusion as cli
from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter
from vigface.diffusion.config import DiffusionTrainConfig
from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.denoiser_config import DenoiserConfig
from vigface.diffusion.pose import landmark_image
from vigface.diffusion.trainer import ema_decay_at, train_diffusion
from vigface.errors import VigfaceError
from vigface.fr.checkpoint import latest_checkpoint
from vigface.generate.config import GenerationConfig
from vigface.generate.dataset import _load_pose_table
from vigface.run_lock import FolderLock


@pytest.fixture(scope="module")
def fr_model(tiny_fr_model):
    return tiny_fr_model


def tiny(small_toy, fr_model, out, **kw):
    base = dict(
        data=str(small_toy / "train.rec"), fr_model=str(fr_model), out=str(out), size="tiny", image_size=32,
        batch_size=16, steps=40, lr=1e-3, workers=0, save_every=10, log_every=5, progress=False,
    )  # fmt: skip
    return DiffusionTrainConfig(**{**base, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(small_toy, fr_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion_full")
    train_diffusion(tiny(small_toy, fr_model, out))
    return out


def test_learns_and_writes_its_outputs(uninterrupted, fr_model):
    records = metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert records[-1]["loss"] < 0.6 * records[0]["loss"], records  # eq. 8 goes down
    assert records[-1]["identity"] < records[0]["identity"]
    meta = json.loads((uninterrupted / "denoiser.json").read_text())
    fr_meta = json.loads((fr_model / "backbone.json").read_text())
    assert meta["fr_sha256"] == fr_meta["sha256"] and meta["step"] == 40
    model = Denoiser(DenoiserConfig(**meta["denoiser"]))
    model.load_state_dict(load_file(uninterrupted / "denoiser.safetensors"))
    assert model.config.cond_dim == 32  # follows the FR model's embedding width
    out = model(torch.zeros(1, 3, 32, 32), torch.tensor([10]), torch.zeros(1, 32), torch.zeros(1, 5, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_resume_is_bit_exact(uninterrupted, small_toy, fr_model, tmp_path):
    out = tmp_path / "resumed"
    train_diffusion(tiny(small_toy, fr_model, out, steps=25))  # stops mid-epoch (20 steps per epoch)
    out = shutil.move(out, tmp_path / "moved")  # a run folder resumes where it now is
    train_diffusion(tiny(small_toy, fr_model, out, workers=1), resume=True)
    a = load_file(latest_checkpoint(out) / "state.safetensors")
    b = load_file(latest_checkpoint(uninterrupted) / "state.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert torch.equal(
        load_file(out / "denoiser.safetensors")["final.weight"],
        load_file(uninterrupted / "denoiser.safetensors")["final.weight"],
    )


def test_cached_conditions_train_like_recomputed_ones(uninterrupted, small_toy, fr_model, tmp_path):
    # the uninterrupted run caches f(x0) (the default); this one embeds every batch every step
    out = tmp_path / "uncached"
    train_diffusion(tiny(small_toy, fr_model, out, cache_conditions=False))
    a = load_file(latest_checkpoint(out) / "state.safetensors")
    b = load_file(latest_checkpoint(uninterrupted) / "state.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

    def without_speed(folder):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(folder)]

    assert without_speed(out) != []
    assert without_speed(out) == without_speed(uninterrupted)


@pytest.mark.slow  # Inductor compiles the denoiser's forward and backward: ~1 minute on 2 cores
def test_compiled_denoiser_trains_like_eager(uninterrupted, small_toy, fr_model, tmp_path, compile_calls):
    out = tmp_path / "compiled"
    train_diffusion(tiny(small_toy, fr_model, out, steps=10, compile=True))
    assert [type(m).__name__ for m in compile_calls] == ["Denoiser"]
    got, want = metrics(out), metrics(uninterrupted)[:2]
    assert [r["step"] for r in got] == [5, 10]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "pixel", "identity"):
            assert g[key] == pytest.approx(w[key], rel=1e-3), (key, g, w)


def test_ema_warms_up(small_toy, fr_model, tmp_path):
    """EMA after step 2 = d * EMA after step 1 + (1 - d) * weights after step 2, d = 2/11, not 0.9999:
    a fixed 0.9999 would export mostly the random initial weights of a short run."""
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(8990, 0.9999) == pytest.approx(0.999)
    assert ema_decay_at(10**7, 0.9999) == 0.9999 and ema_decay_at(50, 0.5) == 0.5
    out = tmp_path / "ema"
    train_diffusion(tiny(small_toy, fr_model, out, steps=2, save_every=1, keep_checkpoints=3))
    one = load_file(out / "checkpoints" / "step_00000001" / "state.safetensors")
    two = load_file(out / "checkpoints" / "step_00000002" / "state.safetensors")
    d = 2 / 11
    # (not attention weights: they get no gradient while the AdaLN gates are still at zero)
    for name in ("final.weight", "in_blocks.0.ada.1.weight"):
        expected = d * one[f"ema.{name}"] + (1 - d) * two[f"model.{name}"]
        torch.testing.assert_close(two[f"ema.{name}"], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(two[f"ema.{name}"], one[f"ema.{name}"])


def test_cosine_lr_decay(small_toy, fr_model, tmp_path):
    """Warm-up, then lr = lr0 (1 + cos(pi (s - w) / (S - w))) / 2 for 0-based step s: what the
    trainer logs at each step, ending near 0; 'none' keeps lr0 after the warm-up."""
    c = tiny(small_toy, fr_model, tmp_path / "cos", steps=10, warmup_steps=2, lr_decay="cosine", log_every=1)
    train_diffusion(c)
    logged = [r["lr"] for r in metrics(tmp_path / "cos")]
    expected = [1e-3 * 1 / 2, 1e-3] + [1e-3 * (1 + np.cos(np.pi * (s - 2) / 8)) / 2 for s in range(2, 10)]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged[-1] == pytest.approx(1e-3 * (1 + np.cos(np.pi * 7 / 8)) / 2) and logged[-1] < 0.04 * 1e-3
    flat = dataclasses.replace(c, lr_decay="none")
    assert [flat.learning_rate(s) for s in (0, 1, 5, 9, 50)] == [5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
    with pytest.raises(VigfaceError, match="lr_decay 'linear' is unknown"):
        dataclasses.replace(c, lr_decay="linear")
    with pytest.raises(VigfaceError, match="warmup_steps must be >= 0, got -1"):
        dataclasses.replace(c, warmup_steps=-1)


def test_resuming_a_run_that_is_still_running_is_refused(uninterrupted, small_toy, fr_model):
    before = (uninterrupted / "metrics.jsonl").read_bytes()
    with FolderLock(uninterrupted) as running:
        running.acquire()
        refused = f"another process .pid {os.getpid()}."
        with pytest.raises(VigfaceError, match=refused):
            train_diffusion(tiny(small_toy, fr_model, uninterrupted, steps=60), resume=True)
    assert (uninterrupted / "metrics.jsonl").read_bytes() == before  # nothing trimmed or appended
    assert latest_checkpoint(uninterrupted).name == "step_00000040"


def test_a_run_that_ends_before_the_lock_is_not_overwritten(
    uninterrupted, small_toy, fr_model, tmp_path, monkeypatch
):
    """The check for checkpoints came before the lock, with the data and models loading between:
    a run that finished there was overwritten by a new one (tests/test_fr_train.py has --resume)."""
    out = tmp_path / "raced"
    acquire = FolderLock.acquire

    def other_run_finishes_first(self, rank=0):
        shutil.copytree(uninterrupted, out, dirs_exist_ok=True)
        acquire(self, rank)

    monkeypatch.setattr(FolderLock, "acquire", other_run_finishes_first)
    with pytest.raises(VigfaceError, match="already holds checkpoints; pass --resume"):
        train_diffusion(tiny(small_toy, fr_model, out, lr=5e-4))
    assert (out / "denoiser.safetensors").read_bytes() == (
        uninterrupted / "denoiser.safetensors"
    ).read_bytes()
    assert (out / "config.json").read_bytes() == (uninterrupted / "config.json").read_bytes()


def test_errors(small_toy, fr_model, tmp_path, capsys):
    with pytest.raises(VigfaceError, match="landmarks table not found"):
        train_diffusion(tiny(small_toy, fr_model, tmp_path / "a", landmarks=str(tmp_path / "none.npy")))
    # the .rec given as landmarks by mistake was NumPy's "pickled (object) data" ValueError, a traceback
    rec = str(small_toy / "train.rec")
    args = ["--data", rec, "--fr-model", str(fr_model), "--out", str(tmp_path / "d"), "--landmarks", rec]
    assert cli.main(args) == 2
    assert f"{rec}: is not a .npy file (no NumPy header)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    with pytest.raises(VigfaceError, match="not a trained backbone folder"):
        train_diffusion(tiny(small_toy, tmp_path, tmp_path / "b"))
    assert cli.main(["--data", str(small_toy), "--out", str(tmp_path / "c")]) == 2
    assert "--fr-model is required" in capsys.readouterr().err


def test_virtual_identity_term_with_final_conv_resumes_bit_exact(small_toy, fr_model, tmp_path):
    """The virtual-identity rows (beyond the paper) draw from their own per-step stream: a run
    stopped at step 6 and resumed equals an uninterrupted one; its metrics carry the term."""
    kw = dict(steps=12, save_every=6, virtual_weight=1.0, virtual_batch=3, final_conv=True)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_diffusion(tiny(small_toy, fr_model, whole, **kw))
    train_diffusion(tiny(small_toy, fr_model, part, **{**kw, "steps": 6}))
    train_diffusion(tiny(small_toy, fr_model, part, **kw), resume=True)
    a = load_file(latest_checkpoint(whole) / "state.safetensors")
    b = load_file(latest_checkpoint(part) / "state.safetensors")
    assert "model.final_conv.weight" in a and [k for k in a if not torch.equal(a[k], b[k])] == []
    records = metrics(whole)
    assert all(0 < r["virtual"] <= 4 for r in records)  # |unit - unit|^2
    assert json.loads((whole / "denoiser.json").read_text())["denoiser"]["final_conv"] is True
    no_protos = tmp_path / "fr_without_prototypes"
    shutil.copytree(fr_model, no_protos)
    (no_protos / "prototypes.safetensors").unlink()
    with pytest.raises(VigfaceError, match="prototypes.safetensors: not found"):
        train_diffusion(tiny(small_toy, no_protos, tmp_path / "c", **kw))


def test_outputs_generate_on_their_own(uninterrupted, fr_model):
    """The export carries the FR model's prototypes and a pose table, so the folder can move."""
    protos = load_file(uninterrupted / "prototypes.safetensors")
    assert protos.keys() == load_file(fr_model / "prototypes.safetensors").keys()
    assert torch.equal(protos["virtual"], load_file(fr_model / "prototypes.safetensors")["virtual"])
    table = np.load(uninterrupted / "pose_landmarks.npy")
    assert table.dtype == np.float32 and table.shape == (320, 5, 2)  # all 320 training images


def test_images_stored_at_another_size_export_poses_in_the_112_frame(small_toy, fr_model, tmp_path):
    """A set stored at 64 px has its landmarks in the 64 frame; the pose table generation draws
    from must hold the same faces in the 112 frame, and the training pose maps must be the ones
    generation draws from that table (the blob width follows the image, not the stored size)."""
    source = FaceRecordDataset(small_toy / "train.rec")
    lm112 = np.load(small_toy / "train_landmarks.npy")
    data = tmp_path / "at64"
    data.mkdir()
    with FaceRecordWriter(data / "train.rec", fmt="png") as writer:
        for i in range(len(source)):
            image, label = source[i]
            writer.add(np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR)), label)
    lm64 = (lm112.astype(np.float64) + 0.5) * 64 / 112 - 0.5  # pixel centres at integers in both frames
    np.save(data / "train_landmarks.npy", lm64.astype(np.float32))
    out = tmp_path / "run"
    train_diffusion(tiny(data, fr_model, out, steps=2, save_every=2, log_every=1))
    exported = np.load(out / "pose_landmarks.npy")
    np.testing.assert_allclose(exported, lm112, atol=1e-4)
    trained = landmark_image(torch.from_numpy(lm64[:4]).float(), 32, source_size=64)
    drawn = landmark_image(torch.from_numpy(exported[:4]), 32)
    torch.testing.assert_close(trained, drawn, atol=1e-5, rtol=0)
    meta = json.loads((out / "denoiser.json").read_text())
    assert meta["pose_table_frame"] == 112
    gen = GenerationConfig(model=str(out), out=str(tmp_path / "gen"))
    np.testing.assert_allclose(_load_pose_table(gen, meta), lm112, atol=1e-4)
    # A folder exported before the table moved to the 112 frame holds it in the stored (64) frame
    np.save(out / "pose_landmarks.npy", lm64.astype(np.float32))
    legacy_meta = {k: v for k, v in meta.items() if k != "pose_table_frame"}
    np.testing.assert_allclose(_load_pose_table(gen, legacy_meta), lm112, atol=1e-4)
    # A folder from before pose tables were exported: generation reads the training set's own table
    (out / "pose_landmarks.npy").unlink()
    np.testing.assert_allclose(_load_pose_table(gen, legacy_meta), lm112, atol=1e-4)


def test_torchrun_two_gloo_processes(small_toy, fr_model, tmp_path):
    """The CLI under torchrun: DDP over 2 CPU ranks, each its half of the global batch, one set of outputs."""
    out = tmp_path / "ddp"
    args = ["--data", str(small_toy / "train.rec"), "--fr-model", str(fr_model), "--out", str(out)]
    args += ["--size", "tiny", "--image-size", "32", "--batch-size", "8", "--steps", "6", "--lr", "1e-3"]
    args += ["--workers", "0", "--save-every", "3", "--log-every", "2", "--no-progress", "--device", "cpu"]
    args += ["--virtual-weight", "0.5"]  # its rows share the one forward DDP allows per step
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*cmd, "-m", "vigface.cli.train_diffusion", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_00000006"
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["world_size"] == 2
    steps = [r["step"] for r in metrics(out)]
    assert steps == [2, 3, 4, 6]  # every 2 steps and at each save, by rank 0 alone
    assert done.stdout.count(f"wrote {out}") == 1  # one closing line, not one per rank
    assert done.stdout.count("checkpoint saved") == 2  # steps 3 and 6, by rank 0
    weights = load_file(out / "denoiser.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    with pytest.raises(VigfaceError, match="2 process"):
        resumed = tiny(small_toy, fr_model, out, batch_size=8, steps=9, virtual_weight=0.5)
        train_diffusion(resumed, resume=True)


def test_resuming_with_fewer_steps_than_done_is_refused(uninterrupted, small_toy, fr_model):
    """It used to stop at once and export denoiser.json saying 20 steps beside 40 steps' weights."""
    before = {p.name: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()}
    with pytest.raises(VigfaceError, match="is at step 40, past --steps 20"):
        train_diffusion(tiny(small_toy, fr_model, uninterrupted, steps=20), resume=True)
    assert {p.name: p.read_bytes() for p in uninterrupted.iterdir() if p.is_file()} == before


def test_throughput_leaves_out_checkpoints_and_checkpoints_print_a_line(
    small_toy, fr_model, tmp_path, monkeypatch, capsys
):
    """images_per_s counted the checkpoint time of the window before it. A fake clock that moves only
    1000 s per save shows it: every row must stay fast. Without a bar, each checkpoint prints a line
    (the trainer printed nothing until it ended)."""
    import types

    import vigface.diffusion.trainer as trainer

    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 0.001
        return clock["t"]

    real_save = trainer._Run.save

    def slow_save(self):
        clock["t"] += 1000.0
        return real_save(self)

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(trainer._Run, "save", slow_save)
    out = tmp_path / "run"
    train_diffusion(tiny(small_toy, fr_model, out, steps=4, save_every=2, log_every=1))
    speeds = [row["images_per_s"] for row in metrics(out)]
    assert len(speeds) == 4 and min(speeds) > 1000
    printed = capsys.readouterr().out
    assert "step 2/4: loss " in printed and "step 4/4: loss " in printed and "checkpoint saved" in printed


def test_resume_with_the_fr_model_moved_matches_it_by_its_weights(small_toy, fr_model, tmp_path):
    """A moved stage-1 folder (same weights) was refused as "a different configuration"; another FR
    model still is."""
    moved_fr = shutil.copytree(fr_model, tmp_path / "fr_moved")
    out = tmp_path / "run"
    train_diffusion(tiny(small_toy, fr_model, out, steps=2, save_every=1))
    summary = train_diffusion(tiny(small_toy, moved_fr, out, steps=3, save_every=1), resume=True)
    assert summary["step"] == 3
    assert json.loads((out / "denoiser.json").read_text())["fr_model"] == str(moved_fr)

    other = shutil.copytree(fr_model, tmp_path / "fr_other")
    meta = json.loads((other / "backbone.json").read_text())
    meta["sha256"] = "0" * 64  # as a retrained model's would differ
    (other / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(VigfaceError, match="different configuration .*fr_model"):
        train_diffusion(tiny(small_toy, other, out, steps=4, save_every=1), resume=True)
