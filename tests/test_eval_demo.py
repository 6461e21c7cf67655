"""`vigface demo` at a tiny size (the full pipeline, then --quick on its models), and `vigface-eval`."""

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vigface.cli import eval as eval_cli
from vigface.cli import main as vigface_cli
from vigface.data.verification_bin import load_verification_pairs, read_bin, write_bin
from vigface.errors import VigfaceError
from vigface.eval.demo import FULL, QUICK, DemoConfig, run_demo
from vigface.eval.labelled_set import read_labelled_set
from vigface.eval.peers import PEER_TABLE
from vigface.eval.privacy import training_set_search
from vigface.eval.protocol import (
    ProtocolConfig,
    compare_to_real,
    compares_with_peers,
    recipe_differences,
    run_protocol,
    train_config,
)
from vigface.eval.verification import summarise, verify_bins
from vigface.fr.embed import embed_images, load_backbone
from vigface.run_lock import FolderLock

TINY = DemoConfig(
    ids=8, per_id=6, val_ids=20, val_per_id=2, pose_per_id=1, pairs=40, fr_width=8, fr_input_size=16,
    fr_dim=16, fr_epochs=1, fr_batch=16, dm_steps=3, dm_batch=8, dm_image_size=16, dm_patch=4, gen_ids=4,
    gen_per_id=4, gen_steps=2, cfg_sweep=(0.5, 2.5), sweep_ids=2, sweep_per_id=2, serfiq_passes=4,
    workers=0, progress=False, matched_real=True,
    w_real=1.0, w_virtual=1.0,  # outside the sweep, so its picks always replace them
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "full"
    return out, run_demo(TINY, str(out))


def _check_report(out, result, n_figures):
    html = (out / "report.html").read_text()
    assert result["report"] == str(out / "report.html")
    assert html.count("data:image/png;base64,") == n_figures
    assert "src='http" not in html and 'src="http' not in html  # self-contained
    report = json.loads((out / "report.json").read_text())
    for path in report["figures"].values():
        with Image.open(out / path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    return report


def test_full_pipeline_writes_a_consistent_report(demo_run):
    out, result = demo_run
    report = _check_report(out, result, n_figures=8)
    # Every stage left its output.
    for folder in ("toy", "fr_real", "diffusion", "generated", "fr_generated", "fr_real_matched"):
        assert (out / folder).is_dir()
    gen = read_labelled_set(out / "generated")
    assert len(gen.labels) == 2 * TINY.gen_ids * TINY.gen_per_id
    assert sorted(set(gen.kinds)) == ["real", "virtual"]
    # The equal-size real set: the first identities of the real training set, as many images as generated.
    matched, real = read_labelled_set(out / "real_matched"), read_labelled_set(out / "toy" / "train.rec")
    ids = min(2 * TINY.gen_ids, len(set(real.labels)))
    per_id = len(matched.labels) // ids
    assert len(set(matched.labels)) == ids and abs(len(matched.labels) - len(gen.labels)) <= ids
    for label in range(ids):
        np.testing.assert_array_equal(
            matched.images[matched.labels == label], real.images[real.labels == label][:per_id]
        )
    # The verification table is what the saved models score on the held-out pairs.
    bins = [out / "toy" / "toy_val.bin", out / "toy" / "toy_pose.bin"]
    v = report["verification"]
    for name, folder in (
        ("real", "fr_real"),
        ("real, generated size", "fr_real_matched"),
        ("generated", "fr_generated"),
    ):
        model, _ = load_backbone(out / folder)
        again = summarise(verify_bins(model, bins))
        assert v["models"][name]["table"]["average"] == pytest.approx(again["average"])
    c = v["comparison"]
    assert c["generated / real"] == pytest.approx(c["generated average %"] / c["real average %"])
    assert c["generated / real, generated size"] == pytest.approx(
        c["generated average %"] / c["real, generated size average %"]
    )
    # The sweep picked the w with the best average IoU, and the final generation used it.
    sweep = report["cfg_sweep"]
    for kind in ("real", "virtual"):
        best = sweep["w"][int(np.argmax([r["average"] for r in sweep[kind]]))]
        assert sweep["picked"][kind] == best == report["picked_w"][kind]
    # The report says how many pairs each IoU rests on: sweep_ids x C(sweep_per_id, 2) genuine ones.
    genuine_pairs = TINY.sweep_ids * TINY.sweep_per_id * (TINY.sweep_per_id - 1) // 2
    assert sweep["real"][0]["genuine_stats"]["pairs"] == genuine_pairs
    assert f"compares {genuine_pairs:,} genuine and" in (out / "report.html").read_text()
    plan = json.loads((out / "generated" / "generation.json").read_text())["plan"]["config"]
    assert (plan["w_real"], plan["w_virtual"]) == (sweep["picked"]["real"], sweep["picked"]["virtual"])
    # and the report's settings show the scales used, not the defaults the picks replaced
    assert (report["config"]["w_real"], report["config"]["w_virtual"]) == (plan["w_real"], plan["w_virtual"])
    assert set(report["dataset_metrics"]) == {
        "real toy data",
        "generated, real ids",
        "generated, virtual ids",
    }
    # The privacy check is the training-set search redone from the saved files and stage-1 model.
    stage1, _ = load_backbone(out / "fr_real")
    gen = read_labelled_set(out / "generated")
    again = training_set_search(
        {
            f"generated, {k} ids": embed_images(stage1, gen.images[gen.kinds == k])
            for k in ("real", "virtual")
        },
        embed_images(stage1, read_labelled_set(out / "toy" / "train.rec").images),
        embed_images(stage1, load_verification_pairs(bins[0])[0]),
    )
    for name in ("never-seen people", "generated, real ids", "generated, virtual ids"):
        assert report["training_set_search"][name] == pytest.approx(again[name])
    assert any(line.startswith("Privacy check") for line in report["summary"])
    assert len(report["peers"]["rows"]) == 19
    with pytest.raises(VigfaceError, match="holds a finished demo run"):
        run_demo(TINY, str(out))


def test_quick_mode_uses_trained_models_without_training_them(demo_run, tmp_path):
    """Also the path without the equal-size real model (FULL's default): ~20 s."""
    full_out, _ = demo_run
    out = tmp_path / "quick"
    config = dataclasses.replace(
        TINY, quick=True, model=str(full_out / "diffusion"), cfg_sweep=(), matched_real=False
    )
    result = run_demo(config, str(out))
    report = _check_report(out, result, n_figures=6)
    assert not (out / "fr_real").exists() and not (out / "diffusion").exists()
    assert not (out / "fr_real_matched").exists() and not (out / "real_matched").exists()
    assert set(report["verification"]["models"]) == {"real", "generated"}
    c = report["verification"]["comparison"]
    assert set(c) == {"real average %", "generated average %", "generated / real", "gap to real (fraction)"}
    assert report["config"]["fr_model"] == str(full_out / "fr_real")
    assert report["config"]["ids"] == TINY.ids  # the FR model's real identities
    assert not any(key.startswith("dm_") for key in report["config"])  # quick trains no denoiser
    real = report["verification"]["models"]["real"]["description"]
    assert real.startswith("stage-1 model the denoiser was trained against") and str(full_out) not in real
    assert report["picked_w"] == {"real": TINY.w_real, "virtual": TINY.w_virtual, "from_sweep": False}
    with pytest.raises(VigfaceError, match="demo --quick: .*: not a trained denoiser folder"):
        run_demo(dataclasses.replace(config, model=str(tmp_path)), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()  # a refused run leaves no folder
    # A folder holding other runs (the README's runs/ with runs/fr beside runs/diffusion): refused untouched.
    runs = tmp_path / "runs"
    (runs / "fr").mkdir(parents=True)
    (runs / "diffusion").mkdir()
    with pytest.raises(VigfaceError, match="holds fr, which vigface demo does not write"):
        run_demo(config, str(runs))
    assert sorted(p.name for p in runs.iterdir()) == ["diffusion", "fr"]
    # A damaged model file: refused before the toy data is made, no folder left either.
    damaged = tmp_path / "damaged"
    shutil.copytree(full_out / "diffusion", damaged)
    weights = damaged / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VigfaceError, match="denoiser.safetensors"):
        run_demo(dataclasses.replace(config, model=str(damaged)), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    (tmp_path / "a_file").write_text("not a folder")
    for bad_out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(OSError) as caught:  # the CLI prints it as one line (test_cli_errors)
            run_demo(config, str(bad_out))
        assert caught.value.filename == str(bad_out)
    busy = tmp_path / "busy"  # a folder another demo is writing into (before it wrote anything)
    busy.mkdir()
    with FolderLock(busy) as running:
        running.acquire()
        refused = f"another process .pid {os.getpid()}. is writing into {busy}"
        with pytest.raises(VigfaceError, match=refused):
            run_demo(config, str(busy))
        assert [p.name for p in busy.iterdir()] == [".lock"]  # the running demo's own lock, nothing else


def test_demo_command_line(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_run(config, out, resume=False):
        seen.update(config=config, out=out, resume=resume)
        return {"summary": ["ok"], "timings": {"total": 1.0}, "report": f"{out}/report.html"}

    monkeypatch.setattr("vigface.eval.demo.run_demo", fake_run)
    assert (
        vigface_cli.main(["demo", "--quick", "--out", str(tmp_path), "--cfg-sweep", "0.5", "2", "--quiet"])
        == 0
    )
    assert seen["config"] == dataclasses.replace(QUICK, cfg_sweep=(0.5, 2.0), progress=False)
    assert f"report: {tmp_path}/report.html" in capsys.readouterr().out
    assert seen["resume"] is False
    assert vigface_cli.main(["demo", "--out", str(tmp_path), "--resume"]) == 0
    assert seen["config"].quick is False and seen["config"].dm_steps == FULL.dm_steps
    assert seen["resume"] is True


def test_an_interrupted_demo_resumes_to_the_uninterrupted_report(demo_run, tmp_path, monkeypatch):
    """Interrupted in stage 2 right after its second checkpoint, then resumed: finished stages are
    kept, stage 2 continues from its checkpoint, and the report's numbers equal the uninterrupted
    run's (which saved no checkpoint before its end)."""
    import vigface.diffusion.trainer as diffusion_trainer
    import vigface.fr.trainer as fr_trainer

    full_out, _ = demo_run
    out = tmp_path / "resumed"
    config = dataclasses.replace(TINY, dm_save_every=1)
    saves, save = [], diffusion_trainer.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(args[1])
        if len(saves) == 2:
            raise KeyboardInterrupt  # Ctrl-C just after the step-2 checkpoint

    with monkeypatch.context() as m:
        m.setattr(diffusion_trainer, "save_checkpoint", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_demo(config, str(out))
    assert saves == [1, 2] and not (out / "report.html").exists() and not (out / "generated").exists()

    with pytest.raises(VigfaceError, match="already holds a demo run; pass --resume"):
        run_demo(config, str(out))
    with pytest.raises(VigfaceError, match="other settings .gen_per_id 4 there, 5 now"):
        run_demo(dataclasses.replace(config, gen_per_id=5), str(out), resume=True)
    with pytest.raises(VigfaceError, match="holds no demo run to continue"):
        run_demo(config, str(tmp_path / "nothing"), resume=True)
    toy_only = tmp_path / "toy_only"  # a toy set copied in: told to --resume, then that nothing was there
    shutil.copytree(out / "toy", toy_only / "toy")
    for resume in (False, True):
        with pytest.raises(VigfaceError, match="holds toy/toy.json but no demo.json: not a demo run"):
            run_demo(config, str(toy_only), resume=resume)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for content in (b"\xbe\x00 not text", b'{"demo_config": 5}'):
        (damaged / "demo.json").write_bytes(content)
        with pytest.raises(VigfaceError, match="demo.json: is not a demo plan"):
            run_demo(config, str(damaged), resume=True)
        assert [p.name for p in damaged.iterdir()] == ["demo.json"]  # nothing else written

    trained = []
    for module, name in ((fr_trainer, "train_fr"), (diffusion_trainer, "train_diffusion")):
        original = getattr(module, name)

        def recording(cfg, *, resume=False, original=original):
            trained.append((Path(cfg.out).name, resume))
            return original(cfg, resume=resume)

        monkeypatch.setattr(module, name, recording)
    # another device name or loader-process count continues the run (the trainers take them)
    result = run_demo(dataclasses.replace(config, device="cpu", workers=1), str(out), resume=True)
    assert trained == [  # the finished stage 1 only exports again; stage 2 continues from step 2
        ("fr_real", True), ("diffusion", True), ("fr_generated", False), ("fr_real_matched", False)
    ]  # fmt: skip
    resumed = json.loads(Path(result["json"]).read_text())
    uninterrupted = json.loads((full_out / "report.json").read_text())
    for key in ("dataset_metrics", "training_set_search", "picked_w", "prototypes"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["verification"]["comparison"] == uninterrupted["verification"]["comparison"]
    for name, model in uninterrupted["verification"]["models"].items():  # descriptions name the folders
        assert resumed["verification"]["models"][name]["table"] == model["table"], name
    assert resumed["config"]["resumed"] is True
    with pytest.raises(VigfaceError, match="holds a finished demo run"):
        run_demo(config, str(out), resume=True)


def test_demo_config_refuses_bad_settings_before_any_work():
    for changes, why in (
        ({"w_real": float("nan")}, "demo: w_real guidance scales must be finite numbers >= 0, got nan"),
        ({"w_virtual": -0.5}, "demo: w_virtual guidance scales must be finite numbers >= 0, got -0.5"),
        ({"cfg_sweep": (1.0, float("inf"))}, r"demo: cfg_sweep guidance scales .* got \(1.0, inf\)"),
        ({"gen_per_id": 1}, "must be at least 2"),
        ({"dm_steps": 0}, "dm_steps must be at least 1"),
        ({"model": "runs/diffusion"}, r"model \(--model\) is used only with --quick"),
        ({"dm_cond_scale": 0.0}, "dm_cond_scale must be a finite number > 0, got 0.0"),
        ({"dm_identity_weight": -1.0}, "dm_identity_weight must be a finite number >= 0, got -1.0"),
    ):
        with pytest.raises(VigfaceError, match=why):
            dataclasses.replace(TINY, **changes)
    assert dataclasses.replace(TINY, w_real=0.0, cfg_sweep=(0.0, 2.0)).w_real == 0.0  # w = 0: unconditional
    # stage 2 scales the unit FR embedding to coordinates of unit size: sqrt of its length
    from vigface.eval.demo import FULL, _diffusion_config

    full_stage2 = _diffusion_config(FULL, Path("d"), Path("f"), Path("o"))
    assert full_stage2.cond_scale == math.sqrt(FULL.fr_dim)
    # FULL drops the identity term (measured: see DemoConfig); the trainer keeps the paper's lambda 1
    from vigface.diffusion.config import DiffusionTrainConfig

    assert full_stage2.identity_weight == 0.0
    assert DiffusionTrainConfig.__dataclass_fields__["identity_weight"].default == 1.0
    assert (
        _diffusion_config(
            dataclasses.replace(FULL, dm_cond_scale=2.0), Path("d"), Path("f"), Path("o")
        ).cond_scale
        == 2.0
    )


def test_eval_command_line(demo_run, capsys, tmp_path):
    out, _ = demo_run
    bins = [str(out / "toy" / "toy_val.bin"), str(out / "toy" / "toy_pose.bin")]
    js = tmp_path / "verify.json"
    assert (
        eval_cli.main(
            [
                "verify",
                str(out / "fr_generated"),
                *bins,
                "--real-model",
                str(out / "fr_real"),
                "--json",
                str(js),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "toy_val" in printed and "Gap-to-Real vs our real-data model" in printed
    data = json.loads(js.read_text())
    assert data["gap"]["gap_to_real"] == pytest.approx(
        (data["real"]["average"] - data["ours"]["average"]) / data["ours"]["average"]
    )
    assert eval_cli.main(
        ["metrics", str(out / "fr_real"), str(out / "generated"), "--real", str(out / "toy" / "train.rec"),
         "--passes", "3", "--out", str(tmp_path / "m")]
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "real ids" in printed and "virtual ids" in printed and "IoU with real data" in printed
    page = (tmp_path / "m" / "report.html").read_text()
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    iou = report["dataset_metrics"]["virtual ids"]["iou_with_real"]  # on the page too (it was not)
    assert "genuine IoU" in page and f"{iou['genuine']:.3f}" in page and f"{iou['imposter']:.3f}" in page
    figures = report["figures"]
    assert {"samples_0", "samples_1", "samples_2"} <= set(figures)  # real data, real ids, virtual ids
    with Image.open(tmp_path / "m" / figures["samples_1"]) as grid:  # a picture of faces, not an empty page
        assert grid.size[0] > 200 and len(np.unique(np.asarray(grid.convert("L")))) > 50
    assert eval_cli.main(
        ["cfg-sweep", str(out / "diffusion"), "--real", str(out / "toy" / "train.rec"),
         "--work", str(tmp_path / "s"), "--w", "2", "1", "--num-ids", "2", "--per-id", "2", "--steps", "1",
         "--real-max-ids", "3", "--quiet"]
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    sweep = json.loads((tmp_path / "s" / "report.json").read_text())["cfg_sweep"]
    assert sweep["w"] == [1.0, 2.0] and f"picked w: real ids {sweep['picked']['real']:g}" in printed
    sweep_figures = json.loads((tmp_path / "s" / "report.json").read_text())["figures"]
    assert {"samples_0", "samples_1"} <= set(sweep_figures)  # one grid per w
    # The real histograms come from the first 3 identities only: 3 x C(per_id, 2) genuine pairs.
    assert sweep["config"]["real_max_ids"] == 3
    assert sweep["real_data"]["genuine"]["pairs"] == 3 * TINY.per_id * (TINY.per_id - 1) // 2
    # --fr-model: another FR folder measures (the paper's independent ResNet-18): other real-data scores
    assert eval_cli.main(
        ["cfg-sweep", str(out / "diffusion"), "--real", str(out / "toy" / "train.rec"),
         "--work", str(tmp_path / "s2"), "--w", "1", "--num-ids", "2", "--per-id", "2", "--steps", "1",
         "--real-max-ids", "3", "--fr-model", str(out / "fr_generated"), "--quiet"]
    ) == 0  # fmt: skip
    other = json.loads((tmp_path / "s2" / "report.json").read_text())["cfg_sweep"]["real_data"]["genuine"]
    assert other["pairs"] == sweep["real_data"]["genuine"]["pairs"]
    assert other["mean"] != pytest.approx(sweep["real_data"]["genuine"]["mean"], abs=1e-6)
    for bad in ("1", "-3", "x"):
        with pytest.raises(SystemExit) as stop:
            eval_cli.main(["cfg-sweep", "m", "--real", "r", "--work", "w", "--real-max-ids", bad])
        assert stop.value.code == 2 and "--real-max-ids" in capsys.readouterr().err
    assert not (tmp_path / "s" / "w1").exists()  # generated sets are deleted once measured
    assert eval_cli.main(["verify", str(tmp_path), *bins]) == 2  # not a model folder: one-line error
    assert "vigface-eval: error:" in capsys.readouterr().err
    # a misspelt peer is refused before the verification runs (nothing printed), each name listed once
    assert eval_cli.main(["verify", str(out / "fr_generated"), *bins, "--real-reference", "Nobody"]) == 2
    printed = capsys.readouterr()
    assert "toy_val" not in printed.out and "no peer named 'Nobody'" in printed.err
    names = printed.err.split("choose one of ")[1].split(" (for a method")[0]
    assert names.count("DCFace") == 1 and "VIGFace(L)" in names  # each method once, sizes aside


@pytest.mark.slow  # IR-SE-50's 50 layers: ~25 s on the shared 2-core machine even at width 4, 16 px
def test_protocol_trains_irse50_adaface_and_compares(demo_run, tmp_path, capsys):
    out, _ = demo_run
    bins = [str(out / "toy" / "toy_val.bin")]
    code = eval_cli.main(
        ["protocol", str(out / "generated"), "--out", str(tmp_path / "p"), "--bins", *bins,
         "--width", "4", "--input-size", "16", "--embedding-dim", "16", "--batch-size", "8",
         "--max-steps", "2", "--workers", "0", "--real-model", str(out / "fr_real"), "--quiet",
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"--real-model {out / 'fr_real'}:\n  toy_val" in printed  # its table beside ours
    result = json.loads((tmp_path / "p" / "protocol.json").read_text())
    assert result["train_config"]["arch"] == "irse50" and result["train_config"]["margin"] == "adaface"
    assert result["gap"]["reference"] == "our real-data model"
    assert [r["method"] for r in result["peers"]["rows"]][-1] == "VIGFace(L)"


def test_protocol_pieces(small_toy, tmp_path, monkeypatch):
    # The peer table as transcribed: each average is the mean of its five sets (to the 0.01 printed).
    for row in PEER_TABLE:
        assert np.mean(row[3:8]) == pytest.approx(row[8], abs=0.011), row[0]
    assert [r[0] for r in PEER_TABLE][:2] == ["CASIA (Real)", "SynFace"] and PEER_TABLE[1][-1] == 74.75
    bin_path = tmp_path / "lfw.bin"
    bin_path.write_bytes((small_toy / "toy_val.bin").read_bytes())
    # A damaged .bin is refused by the config, before the long training (it was found after it).
    damaged = tmp_path / "cfp_fp.bin"
    damaged.write_bytes(bin_path.read_bytes()[:500])
    with pytest.raises(VigfaceError, match="cfp_fp.bin"):
        ProtocolConfig(data="d.rec", out="o", bins=[str(bin_path), str(damaged)])
    fr = train_config(ProtocolConfig(data="d.rec", out=str(tmp_path), bins=[str(bin_path)]))
    assert (fr.arch, fr.margin, fr.num_virtual, fr.input_size) == ("irse50", "adaface", 0, 112)
    assert (fr.epochs, fr.lr_steps) == (26, [12, 20, 24])
    # A shorter run decays at the same fractions (it used to keep 12, 20, 24 and never decay) ...
    short = train_config(ProtocolConfig(data="d.rec", out=str(tmp_path), bins=[str(bin_path)], epochs=13))
    assert short.lr_steps == [6, 10, 12]
    # ... unless the steps are given, as the CLI passes them with its other recipe flags.
    seen = {}

    def captured(config, resume):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before the training (the CLI exits 130)

    monkeypatch.setattr("vigface.eval.protocol.run_protocol", captured)
    code = eval_cli.main(
        ["protocol", "d.rec", "--out", str(tmp_path / "p"), "--bins", str(bin_path), "--epochs", "4",
         "--lr-steps", "3", "--scale", "32", "--seed", "7", "--arch", "iresnet18", "--margin", "arcface"]
    )  # fmt: skip
    assert code == 130
    fr = train_config(seen["config"])
    recipe = (fr.epochs, fr.lr_steps, fr.scale, fr.seed, fr.arch, fr.margin)
    assert recipe == (4, [3], 32, 7, "iresnet18", "arcface")
    with pytest.raises(VigfaceError, match="does not exist"):
        ProtocolConfig(data="d.rec", out="o", bins=[str(tmp_path / "missing.bin")])
    # ... and what the evaluation after the training refused (a bad --real-model, two bins of one name,
    # a set too small for 10 folds) is refused before it, as is a folder given as a .bin
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lfw.bin").write_bytes(bin_path.read_bytes())
    few = tmp_path / "few.bin"
    images, issame = read_bin(bin_path)
    write_bin(few, images[:8], issame[:4])
    for fields, message in (
        ({"bins": [str(bin_path), str(tmp_path / "other" / "lfw.bin")]}, "share the name 'lfw'; rename one"),
        ({"bins": [str(bin_path), f"{tmp_path}/./lfw.bin"]}, "names .*lfw.bin twice; give each set once"),
        ({"bins": [str(few)]}, "holds 4 pairs, fewer than the 10 folds"),
        ({"bins": [str(tmp_path / "other")]}, "is a folder, not a verification .bin"),
        ({"bins": [str(bin_path)], "real_model": str(tmp_path)}, "--real-model .*: not a trained backbone"),
    ):
        with pytest.raises(VigfaceError, match=message):
            ProtocolConfig(data="d.rec", out="o", **fields)

    # --resume --epochs N: the refusal named lr_steps, a field the user never set
    def refuses_lr_steps(config, *, resume=False):
        raise VigfaceError("--resume: run was trained with a different configuration (lr_steps: [12] -> [6])")

    monkeypatch.setattr("vigface.fr.trainer.train_fr", refuses_lr_steps)
    with pytest.raises(VigfaceError, match="lr_steps.*fixed fractions of --epochs, so a resumed run keeps"):
        run_protocol(
            ProtocolConfig(data="d.rec", out=str(tmp_path), bins=[str(bin_path)], epochs=13), resume=True
        )
    # ... unless the first run was given its own --lr-steps: then those are what to pass again
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 26, "lr_steps": [5, 9.5]}))
    with pytest.raises(VigfaceError, match=r"first run was given --lr-steps 5 9\.5; pass them again"):
        run_protocol(ProtocolConfig(data="d.rec", out=str(tmp_path), bins=[str(bin_path)]), resume=True)
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 26, "lr_steps": [12, 20, 24]}))
    with pytest.raises(VigfaceError, match="fixed fractions of --epochs"):
        run_protocol(ProtocolConfig(data="d.rec", out=str(tmp_path), bins=[str(bin_path)]), resume=True)
    # checkpoints as the trainer's default: a Ctrl-C kept nothing (save_every was 10**9)
    assert train_config(ProtocolConfig(data="d.rec", out="o", bins=[str(bin_path)])).save_every == 1000
    with pytest.raises(VigfaceError, match="no peer"):
        ProtocolConfig(data="d.rec", out="o", bins=[str(bin_path)], real_reference="Nobody")
    five = {"average": 90.0, "five_benchmark_average": 90.0}
    gap = compare_to_real(five, None, "CASIA (Real)")
    assert gap["gap_to_real"] == pytest.approx((94.93 - 90.0) / 90.0)
    assert (
        compare_to_real({"average": 90.0, "five_benchmark_average": None}, None, "CASIA (Real)")[
            "gap_to_real"
        ]
        is None
    )
    assert compare_to_real(five, {"average": 99.0}, "CASIA (Real)")["gap_to_real"] == pytest.approx(0.1)
    # The peers' rows compare only on the five benchmarks, whatever folder they are in.
    assert compares_with_peers([f"/d/{n}.bin" for n in ("calfw", "lfw", "cfp_fp", "cplfw", "agedb_30")])
    assert not compares_with_peers([str(bin_path)]) and not compares_with_peers(["lfw.bin"] * 5)
    # An extra set beside the five leaves them comparable: the five-set average leaves it out.
    five_and_toy = [f"{n}.bin" for n in ("lfw", "cfp_fp", "cplfw", "agedb_30", "calfw", "toy_val")]
    assert compares_with_peers(five_and_toy) and not compares_with_peers(five_and_toy[1:])
    # A --real-model trained with another recipe is named field by field (from its run's config.json).
    real = tmp_path / "real_model"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({"arch": "iresnet18", "margin": "adaface", "epochs": 4}))
    ours = train_config(ProtocolConfig(data="d.rec", out="o", bins=[str(bin_path)], epochs=4)).to_dict()
    assert recipe_differences(real, ours) == ["arch iresnet18 there, irse50 here"]
    # ... its training length too: lr steps, and a run stopped early by max_steps
    recipe = {**ours, "lr_steps": [2, 3], "max_steps": 100}
    (real / "config.json").write_text(json.dumps(recipe))
    assert recipe_differences(real, ours) == [
        f"lr_steps [2, 3] there, {ours['lr_steps']} here",
        "max_steps 100 there, None here",
    ]
    assert recipe_differences(tmp_path / "no_such_model", ours) == []


def test_a_plan_written_before_device_and_workers_were_resumable_still_resumes(tmp_path):
    """demo.json files written before d8392c6 hold device and workers; --resume compared them with
    settings that no longer carry them, and refused every such run."""
    from vigface.eval.demo import DEMO_PLAN, _start_or_match_plan

    older = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(TINY))).items() if k != "progress"}
    (tmp_path / DEMO_PLAN).write_text(json.dumps({"demo_config": older}))
    _start_or_match_plan(tmp_path, dataclasses.replace(TINY, device="cpu"), resume=True)  # no refusal
    with pytest.raises(VigfaceError, match="other settings .gen_steps"):
        _start_or_match_plan(tmp_path, dataclasses.replace(TINY, gen_steps=TINY.gen_steps + 1), resume=True)
