"""`vigface demo`: the whole VIGFace pipeline on the toy world, from nothing, with a report.

    toy data -> stage 1 FR (real + virtual prototypes) -> stage 2 diffusion -> [cfg sweep]
      -> generate real and virtual ids -> a fresh FR trained on the generated set
      -> both FR models verified on held-out toy pairs -> dataset metrics -> report.html

An interrupted demo continues with `resume=True` (`vigface demo --resume`): demo.json keeps the
settings it started with, finished stages are kept, the trainers continue from their last
checkpoint (stage 2 saves every `dm_save_every` steps; the FR trainings restart, they are short)
and the generation from its last shard.

`FULL` is sized for about 10 minutes on 2 CPU cores; `QUICK` skips both stage trainings and
generates with the tiny model shipped in the package (`vigface.assets.tiny_model_dir()`), for
under 2 minutes. Both are plain `DemoConfig`s, so tests run the same code at a tiny size.

The FR models verified: the stage-1 model (trained on the real toy images; the virtual prototypes
only add classes to its head) and a fresh model on the generated set, which never sees a real
image. The paper compares datasets of similar size under one recipe; in FULL the stage-1 set (50 x
20 images) is about the generated set's size (100 x 8), but in QUICK the shipped stage-1 model saw
3,000 images against 400 generated, so QUICK (`matched_real`) also trains a fresh model with the
generated model's recipe on real toy images of the generated set's size (`_matched_real`) and
reports generated / real at that size beside generated / stage-1. The paper's goal is generated
>= 90 % of real accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vigface.data.files import write_atomically
from vigface.data.output_folder import refuse_foreign_output
from vigface.device import resolve_device
from vigface.errors import VigfaceError
from vigface.run_lock import FolderLock


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False  # use a trained denoiser + FR pair (`model`) instead of training them
    model: str | None = None  # quick: a denoiser folder; None: the shipped tiny model
    # toy world (quick: `ids` is replaced by the FR model's number of real identities)
    ids: int = 50
    per_id: int = 20
    val_ids: int = 40
    val_per_id: int = 8
    pose_per_id: int = 4
    pairs: int = 600
    seed: int = 0
    # FR models (stage 1 and the fresh model trained on generated data share this recipe)
    fr_width: int = 16
    fr_input_size: int = 32
    fr_dim: int = 128
    fr_epochs: int = 16
    fr_batch: int = 64
    # stage 2
    dm_steps: int = 950  # ~60 % of the demo's time; blurry faces, no detail (1,350 did no better)
    dm_batch: int = 24
    # 1e-3: at 1,000 steps the generated ids' CST rose 0.655 -> 0.870 (real) and 0.581 -> 0.761
    # (virtual) over 3e-4, in the same time (bench/results/demo_toy_cpu.json, "dm_lr")
    dm_lr: float = 1e-3
    dm_ema: float = 0.99  # the cap; the trainer's EMA warm-up reaches it near step 890
    dm_image_size: int = 32
    dm_patch: int = 4
    # U-ViT's output conv: generated / real 83.2 % -> 87.4 % at 1,000 steps, CST of the generated
    # real ids 0.870 -> 0.888 (bench/results/demo_toy_cpu.json, "final_conv")
    dm_final_conv: bool = True
    # the FR embedding times this in stage 2 (None: sqrt(fr_dim), coordinates of unit size): generated
    # accuracy 79.03 -> 81.06 % over three stage-2 seeds (bench/results/demo_toy_cpu.json, "cond_scale")
    dm_cond_scale: float | None = None
    # lambda of the paper's identity term (eq. 8). 0 here: with the scaled condition, the pixel loss
    # alone carries identity, and the term made the denoiser paint a texture the stage-1 model responds
    # to instead of faces: generated accuracy 81.06 -> 83.19 % over three stage-2 seeds, though the
    # stage-1 model's CST of the generated real ids falls 0.94 -> 0.52
    # (bench/results/demo_toy_cpu.json, "identity_weight_with_cond_scale")
    dm_identity_weight: float = 0.0
    dm_save_every: int = 200  # an interrupted demo loses at most this many stage-2 steps
    # generation
    gen_ids: int = 50  # per kind (real and virtual)
    gen_per_id: int = 8
    gen_steps: int = 10  # DPM-Solver++ steps (was 15: the time went to final_conv, within 10 minutes)
    sampler: str = "dpm++"
    w_real: float = 0.5  # the paper's; replaced by the sweep's pick when cfg_sweep is given
    w_virtual: float = 2.5
    cfg_sweep: tuple[float, ...] = ()
    sweep_ids: int = 8
    sweep_per_id: int = 5
    # measurement
    matched_real: bool = False  # also an FR model on real images of the generated set's size
    serfiq_passes: int = 30
    grid_ids: int = 6
    grid_per_id: int = 8
    workers: int = 1
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise VigfaceError(f"demo: {name} {why}")

        for name in (
            "ids",
            "per_id",
            "fr_epochs",
            "fr_batch",
            "dm_steps",
            "gen_ids",
            "gen_per_id",
            "gen_steps",
            "dm_save_every",
        ):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.model is not None and not self.quick:
            bad("model (--model)", "is used only with --quick (the full demo trains its own denoiser)")
        if self.dm_cond_scale is not None and not (
            np.isfinite(self.dm_cond_scale) and self.dm_cond_scale > 0
        ):
            bad("dm_cond_scale", f"must be a finite number > 0, got {self.dm_cond_scale}")
        if not (np.isfinite(self.dm_identity_weight) and self.dm_identity_weight >= 0):
            bad("dm_identity_weight", f"must be a finite number >= 0, got {self.dm_identity_weight}")
        if self.gen_ids < 2 or self.gen_per_id < 2:
            bad("gen_ids/gen_per_id", "must be at least 2 (genuine and imposter pairs)")
        # checked here, not when generation starts after both trainings
        for name, values in (("w_real", (self.w_real,)), ("w_virtual", (self.w_virtual,)),
                             ("cfg_sweep", self.cfg_sweep)):  # fmt: skip
            if not all(np.isfinite(w) and w >= 0 for w in values):
                bad(name, f"guidance scales must be finite numbers >= 0, got {getattr(self, name)}")


FULL = DemoConfig()
# QUICK renders 8 images per identity so that the equal-size real set (50 ids x 8) matches the
# generated one (25 real + 25 virtual ids x 8) in identities and images.
QUICK = DemoConfig(
    quick=True, per_id=8, val_ids=40, val_per_id=6, pose_per_id=3, pairs=400, matched_real=True,
    fr_epochs=12, gen_ids=25, gen_per_id=8, gen_steps=10, sweep_ids=6, sweep_per_id=4, serfiq_passes=20,
)  # fmt: skip


class _Clock:
    """Seconds per stage, printed as each stage ends (progress bars aside, a demo narrates)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name}: {self.times[name]:.1f} s", flush=True)
        return result

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _fr_config(c: DemoConfig, data: Path, out: Path, num_virtual: int):
    from vigface.fr.config import FRTrainConfig

    return FRTrainConfig(
        data=str(data), out=str(out), arch="iresnet18", width=c.fr_width, input_size=c.fr_input_size,
        embedding_dim=c.fr_dim, margin="cosface", scale=30.0, num_virtual=num_virtual, batch_size=c.fr_batch,
        epochs=c.fr_epochs, lr=0.1, lr_steps=[0.7 * c.fr_epochs, 0.9 * c.fr_epochs],
        warmup_epochs=min(1.0, c.fr_epochs / 4), workers=c.workers, save_every=10**9,
        log_every=10, device=c.device, progress=c.progress, seed=c.seed,
    )  # fmt: skip


def _diffusion_config(c: DemoConfig, data: Path, fr: Path, out: Path):
    from vigface.diffusion.config import DiffusionTrainConfig

    return DiffusionTrainConfig(
        data=str(data), fr_model=str(fr), out=str(out), size="tiny", image_size=c.dm_image_size,
        patch=c.dm_patch, final_conv=c.dm_final_conv, batch_size=c.dm_batch, steps=c.dm_steps, lr=c.dm_lr,
        cond_scale=math.sqrt(c.fr_dim) if c.dm_cond_scale is None else c.dm_cond_scale,
        identity_weight=c.dm_identity_weight,
        warmup_steps=min(100, c.dm_steps // 10), ema_decay=c.dm_ema, workers=c.workers,
        save_every=c.dm_save_every, log_every=50, device=c.device, progress=c.progress, seed=c.seed,
    )  # fmt: skip


DEMO_PLAN = "demo.json"  # the settings a demo folder was started with
# Everything a demo writes into its folder (stage folders, the report and its figures).
DEMO_ENTRIES = (
    DEMO_PLAN, "toy", "fr_real", "diffusion", "cfg_sweep", "generated", "fr_generated", "real_matched",
    "fr_real_matched", "figures", "report.json", "report.html",
)  # fmt: skip


def _check_folder(out: Path, resume: bool) -> None:
    """Refuse a finished run, a started one without `resume`, and `resume` with nothing to resume."""
    if (out / "report.html").exists():
        raise VigfaceError(
            f"demo: {out} holds a finished demo run (report.html); choose another --out or delete it"
        )
    started = (out / DEMO_PLAN).exists() or (out / "toy" / "toy.json").exists()
    if started and not (out / DEMO_PLAN).is_file():  # (it was told to --resume, then that there was nothing)
        raise VigfaceError(
            f"demo: {out} holds toy/toy.json but no {DEMO_PLAN}: not a demo run that can be continued; "
            "choose another --out or delete it"
        )
    if started and not resume:
        raise VigfaceError(
            f"demo: {out} already holds a demo run; pass --resume to continue it, or choose another --out "
            "or delete it"
        )
    if resume and not (out / DEMO_PLAN).is_file():
        raise VigfaceError(f"demo --resume: {out} holds no demo run to continue (no {DEMO_PLAN})")
    if not started:  # e.g. --out runs beside the README's runs/diffusion: never resume someone else's
        refuse_foreign_output(out, own=DEMO_ENTRIES, what="vigface demo")


RESUMABLE_CHANGES = ("progress", "device", "workers")


def _settings(c: DemoConfig) -> dict:
    """What a resumed run must share with the run it continues, as JSON has it: not the progress
    bars, the device (--resume --device cpu of an 'auto' run was refused; the trainers take a
    device change) or the loader processes (the same batches either way)."""
    return json.loads(json.dumps({k: v for k, v in asdict(c).items() if k not in RESUMABLE_CHANGES}))


def _start_or_match_plan(out: Path, c: DemoConfig, resume: bool) -> None:
    path = out / DEMO_PLAN
    now = _settings(c)
    if not resume:
        write_atomically(path, json.dumps({"demo_config": now}, indent=1))
        return
    try:
        before = json.loads(path.read_text())["demo_config"]
        # plans written before a setting became resumable still hold it
        before = {k: v for k, v in before.items() if k not in RESUMABLE_CHANGES}
        differs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError: bad JSON or UTF-8
        raise VigfaceError(
            f"demo --resume: {path}: is not a demo plan ({exc}); choose another --out"
        ) from None
    if differs:
        changes = ", ".join(f"{k} {before.get(k)!r} there, {now.get(k)!r} now" for k in differs)
        raise VigfaceError(f"demo --resume: {out} was started with other settings ({changes})")


def _has_checkpoint(folder: Path) -> bool:
    from vigface.fr.checkpoint import latest_checkpoint

    return latest_checkpoint(folder) is not None


def _describe_fr(fr_dir: Path, what: str, data: str | None = None) -> str:
    """One line from a backbone.json: architecture, size, head, epochs, training images (`data`
    names them where the recorded path means nothing here, e.g. a shipped model's)."""
    meta = json.loads((fr_dir / "backbone.json").read_text())
    b, t = meta["backbone"], meta.get("train_config", {})
    return (
        f"{what}: {b['arch']} width {b['width']}, {b['input_size']} px, {b['embedding_dim']}-d, "
        f"{meta.get('margin', {}).get('kind', '?')}, {meta.get('num_real', '?')} real + "
        f"{meta.get('num_virtual', 0)} virtual prototypes, {t.get('epochs', '?')} epochs "
        f"on {data or t.get('data', '?')}"
    )


MATCHED = "real, generated size"  # the equal-size real model's name in the report


def _matched_real(train_rec: Path, out_rec: Path, num_images: int, max_ids: int) -> tuple[int, int]:
    """Write the first k identities x p images of the real training set, k x p ~ num_images.

    k = min(max_ids, identities present); p = num_images / k, at most what each of them holds.
    Returns (k, p). The same images every run (the first of each identity in file order).
    """
    from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter

    ds = FaceRecordDataset(train_rec)
    labels = np.asarray(ds.labels)
    ids = [int(i) for i in np.unique(labels)[:max_ids]]
    held = min(int((labels == i).sum()) for i in ids)
    per_id = max(2, min(held, round(num_images / len(ids))))
    with FaceRecordWriter(out_rec) as writer:
        for new_label, ident in enumerate(ids):
            for index in np.flatnonzero(labels == ident)[:per_id]:
                writer.add(ds.encoded(int(index))[0], new_label)
    return len(ids), per_id


def run_demo(config: DemoConfig, out: str, resume: bool = False) -> dict:
    """Run the demo into `out` (or continue the one there); returns {"report": html path, "json": ...,
    "summary": ...}."""
    with FolderLock(out) as lock:
        return _run_demo(config, out, resume, lock)


def _run_demo(config: DemoConfig, out: str, resume: bool, lock: FolderLock) -> dict:
    import torch

    from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
    from vigface.data.verification_bin import load_verification_pairs
    from vigface.diffusion.model_folder import PROTOTYPES, fr_model_dir, load_prototypes, read_denoiser_meta
    from vigface.diffusion.sampling import FaceSampler
    from vigface.diffusion.trainer import train_diffusion
    from vigface.eval import plots
    from vigface.eval.cfg_sweep import SweepConfig, cfg_sweep
    from vigface.eval.labelled_set import read_labelled_set
    from vigface.eval.metrics import dataset_metrics
    from vigface.eval.peers import PEER_COLUMNS, PEER_NOTE, peer_rows
    from vigface.eval.privacy import training_set_search
    from vigface.eval.prototypes import prototype_stats
    from vigface.eval.report import write_report
    from vigface.eval.serfiq import serfiq_scores
    from vigface.eval.similarity import genuine_imposter, histogram
    from vigface.eval.verification import gap_to_real, summarise, verify_bins
    from vigface.fr.embed import embed_images, load_backbone
    from vigface.fr.trainer import train_fr
    from vigface.generate.config import GenerationConfig
    from vigface.generate.dataset import generate_dataset

    c = config
    out = Path(out)
    _check_folder(out, resume)
    device = resolve_device(c.device)
    clock = _Clock()

    # ---- the models: trained here, or the shipped pair --------------------------------------
    if c.quick:
        if c.model is None:
            from vigface.assets import tiny_model_dir

            dm_dir = tiny_model_dir()
        else:
            dm_dir = Path(c.model)
        try:
            fr_dir = fr_model_dir(dm_dir, read_denoiser_meta(dm_dir))
        except VigfaceError as err:
            raise VigfaceError(f"demo --quick: {err}") from None
        # Loaded once now (small models), so a damaged file stops the demo before any work is done.
        FaceSampler.load(dm_dir)
        load_backbone(fr_dir)
        num_real = int(json.loads((fr_dir / "backbone.json").read_text())["num_real"])
        # The toy world's first `num_real` identities are the ones the FR model was trained on;
        # held-out pairs use the identities after them.
        c = dataclasses.replace(c, ids=num_real, gen_ids=min(c.gen_ids, num_real))
    # Created only now: a run refused above (a wrong --model) leaves no folder behind.
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    _start_or_match_plan(out, c, resume)
    toy = out / "toy"
    toy_cfg = ToyConfig(
        ids=c.ids, per_id=c.per_id, seed=c.seed, pairs=c.pairs, val_ids=c.val_ids,
        val_per_id=c.val_per_id, pose_per_id=c.pose_per_id,
    )  # fmt: skip
    # Rendered in this process: a spawned pool costs more in start-up than it saves at these sizes.
    if not (toy / "toy.json").exists():  # written last: a toy folder without it is re-rendered
        clock.run("toy data", make_toy_dataset, toy, toy_cfg, workers=1, progress=c.progress)
    bins = [toy / "toy_val.bin", toy / "toy_pose.bin"]
    if not c.quick:
        fr_dir, dm_dir = out / "fr_real", out / "diffusion"
        # a stage with a checkpoint continues from it (a finished one only exports again)
        fr_cfg = _fr_config(c, toy / "train.rec", fr_dir, c.ids)
        clock.run("stage 1: FR on real toy data", train_fr, fr_cfg, resume=_has_checkpoint(fr_dir))
        dm_cfg = _diffusion_config(c, toy / "train.rec", fr_dir, dm_dir)
        clock.run("stage 2: diffusion", train_diffusion, dm_cfg, resume=_has_checkpoint(dm_dir))
    fr_real, _ = load_backbone(fr_dir, device)
    prototypes = load_prototypes(
        dm_dir / PROTOTYPES if (dm_dir / PROTOTYPES).is_file() else fr_dir / PROTOTYPES
    )
    gen_ids = min(c.gen_ids, len(prototypes["real"]), len(prototypes["virtual"]))
    if gen_ids < 2:
        raise VigfaceError("demo: the FR model needs at least 2 real and 2 virtual prototypes")

    # ---- guidance scale, generation --------------------------------------------------------
    w_real, w_virtual, sweep = c.w_real, c.w_virtual, None
    if c.cfg_sweep:
        sweep_cfg = SweepConfig(
            model=str(dm_dir), real=str(toy / "train.rec"), work=str(out / "cfg_sweep"), ws=list(c.cfg_sweep),
            num_ids=min(c.sweep_ids, gen_ids), per_id=c.sweep_per_id, steps=c.gen_steps, sampler=c.sampler,
            seed=c.seed, device=c.device, progress=c.progress,
        )  # fmt: skip
        sweep = clock.run("cfg sweep", cfg_sweep, sweep_cfg, fr_real)
        w_real, w_virtual = sweep["picked"]["real"], sweep["picked"]["virtual"]
    gen_dir = out / "generated"
    gen_cfg = GenerationConfig(
        model=str(dm_dir), out=str(gen_dir), ids="both", num_ids=gen_ids, per_id=c.gen_per_id,
        w_real=w_real, w_virtual=w_virtual, steps=c.gen_steps, sampler=c.sampler, batch_size=64,
        shard_size=1024, seed=c.seed, device=c.device, progress=c.progress,
    )  # fmt: skip
    clock.run("generate real + virtual ids", generate_dataset, gen_cfg)

    # ---- fresh FR models on generated data and on as much real data; all verified ----------
    fr_gen_dir = out / "fr_generated"
    fr_gen_cfg = _fr_config(c, gen_dir / "train.rec", fr_gen_dir, 0)
    clock.run("FR on generated data", train_fr, fr_gen_cfg, resume=_has_checkpoint(fr_gen_dir))
    fr_gen, _ = load_backbone(fr_gen_dir, device)
    fr_models = {"real": fr_real, "generated": fr_gen}
    n_gen = 2 * gen_ids * c.gen_per_id
    if c.matched_real:
        matched_rec, fr_matched_dir = out / "real_matched" / "train.rec", out / "fr_real_matched"
        matched_rec.parent.mkdir(parents=True, exist_ok=True)
        matched_ids, matched_per_id = _matched_real(
            toy / "train.rec", matched_rec, n_gen, max_ids=2 * gen_ids
        )
        matched_cfg = _fr_config(c, matched_rec, fr_matched_dir, 0)
        resume_matched = _has_checkpoint(fr_matched_dir)
        clock.run("FR on real data, generated size", train_fr, matched_cfg, resume=resume_matched)
        fr_models[MATCHED], _ = load_backbone(fr_matched_dir, device)
    tables = clock.run(
        "verification",
        lambda: {name: summarise(verify_bins(m, bins, device=device)) for name, m in fr_models.items()},
    )
    avg_real, avg_gen = tables["real"]["average"], tables["generated"]["average"]

    # ---- dataset properties measured with the stage-1 model ---------------------------------
    def measure():
        train = read_labelled_set(toy / "train.rec")  # decoded and embedded once: metrics and privacy
        gallery = embed_images(fr_real, train.images, device=device)
        first_ids = np.isin(train.labels, np.unique(train.labels)[:gen_ids])
        gen = read_labelled_set(gen_dir)
        sets = {
            "real toy data": train.select(first_ids),
            "generated, real ids": gen.select(gen.kinds == "real"),
            "generated, virtual ids": gen.select(gen.kinds == "virtual"),
        }
        metrics, hists, images, embeddings = {}, {}, {}, {"real toy data": gallery[first_ids]}
        for name, s in sets.items():
            if name not in embeddings:
                embeddings[name] = embed_images(fr_real, s.images, device=device)
            emb = embeddings[name]
            quality = serfiq_scores(fr_real, s.images, passes=c.serfiq_passes, seed=c.seed, device=device)
            m = dataset_metrics(emb, s.labels, quality)
            m.pop("per_class")
            metrics[name] = m
            g, i = genuine_imposter(emb, s.labels, seed=c.seed)
            hists[name] = {"genuine": histogram(g).tolist(), "imposter": histogram(i).tolist()}
            images[name] = plots.grid_rows(s.images, s.labels, c.grid_ids, c.grid_per_id)
        # Privacy: do generated faces look like the training people, more than never-seen people do?
        never_seen = embed_images(fr_real, load_verification_pairs(bins[0])[0], device=device)
        generated = {k: embeddings[k] for k in ("generated, real ids", "generated, virtual ids")}
        search = training_set_search(generated, gallery, never_seen)
        search["gallery images"] = len(gallery)
        return metrics, hists, images, search

    metrics, hists, grids, search = clock.run("dataset metrics", measure)
    proto_stats = prototype_stats(prototypes["real"], prototypes["virtual"])

    # ---- report ------------------------------------------------------------------------------
    def figures():
        figs = {}
        grid_keys = {
            "samples_real_data": "real toy data",
            "samples_generated_real": "generated, real ids",
            "samples_generated_virtual": "generated, virtual ids",
        }
        for key, name in grid_keys.items():
            rows, labels = grids[name]
            figs[key] = (
                f"Sample grid: {name} (one identity per row)",
                plots.sample_grid_png(rows, labels, name),
            )
        figs["similarity_histograms"] = (
            "Genuine (solid) and imposter (dashed) cosine similarity, stage-1 FR model (like Fig. 5)",
            plots.similarity_histograms_png(hists),
        )
        figs["metric_bars"] = (
            "CST / DIV / SEP per dataset and CST vs SEP (like Fig. 8)",
            plots.metric_bars_png(metrics),
        )
        figs["prototype_matrix"] = (
            "Cosine similarity of real and virtual prototypes, min-max normalised (like Fig. 3a)",
            plots.prototype_matrix_png(prototypes["real"], prototypes["virtual"]),
        )
        if sweep:
            figs["cfg_sweep"] = (
                "IoU with real data against the guidance scale w (Table 1)",
                plots.cfg_sweep_png(sweep),
            )
            figs["cfg_sweep_histograms"] = (
                "Similarity histograms of the sweep's generated sets against real data (Fig. 5)",
                plots.similarity_histograms_png(sweep["histograms"]),
            )
        return figs

    figs = clock.run("figures", figures)
    ratio = avg_gen / avg_real if avg_real else float("nan")
    comparison = {
        "real average %": avg_real,
        "generated average %": avg_gen,
        "generated / real": ratio,
        "gap to real (fraction)": gap_to_real(avg_real, avg_gen),
    }
    if c.matched_real:
        avg_matched = tables[MATCHED]["average"]
        ratio_matched = avg_gen / avg_matched if avg_matched else float("nan")
        verification_lines = [
            f"Verification on held-out toy pairs (average of {', '.join(b.stem for b in bins)}): "
            f"FR trained on generated data ({n_gen} images) {avg_gen:.2f} %; with the same recipe on "
            f"{matched_ids} x {matched_per_id} real toy images {avg_matched:.2f} % (generated / real at "
            f"that size = {100 * ratio_matched:.1f} %; the paper's goal is >= 90 %); the stage-1 model "
            f"(all real toy data) {avg_real:.2f} % (generated / stage-1 = {100 * ratio:.1f} %).",
            f"Gap-to-Real GR = (real - generated) / generated = "
            f"{100 * gap_to_real(avg_matched, avg_gen):.1f} % at equal size, "
            f"{100 * gap_to_real(avg_real, avg_gen):.1f} % against the stage-1 model.",
        ]
        comparison.update({
            "real, generated size average %": avg_matched,
            "generated / real, generated size": ratio_matched,
            "gap to real, generated size (fraction)": gap_to_real(avg_matched, avg_gen),
        })  # fmt: skip
    else:
        verification_lines = [
            f"Verification on held-out toy pairs (average of {', '.join(b.stem for b in bins)}): "
            f"FR trained on real toy data {avg_real:.2f} %, FR trained on generated data ({n_gen} images) "
            f"{avg_gen:.2f} % (generated / real = {100 * ratio:.1f} %; the paper's goal is >= 90 %).",
            "Gap-to-Real GR = (real - generated) / generated = "
            f"{100 * gap_to_real(avg_real, avg_gen):.1f} %.",
        ]
    summary = [
        *verification_lines,
        f"Generated {gen_ids} real + {gen_ids} virtual ids x {c.gen_per_id} images with w_real = {w_real:g}, "
        f"w_virtual = {w_virtual:g} ({c.sampler}, {c.gen_steps} steps).",
        "CST / DIV / SEP: " + "; ".join(
            f"{n}: {m['cst']:.3f} / {m['div']:.2e} / {m['sep']:.3f}" for n, m in metrics.items()
        ),
    ]  # fmt: skip
    real_ids, virtual_ids, people = (
        search[k] for k in ("generated, real ids", "generated, virtual ids", "never-seen people")
    )
    summary.append(
        f"Privacy check (stage-1 FR model): best cosine of an image to one of the {search['gallery images']} "
        f"real training images -- generated virtual ids {virtual_ids['best_cos']:.3f} "
        f"({100 * virtual_ids['above_bar']:.1f} % above the bar), never-seen toy people "
        f"{people['best_cos']:.3f} (the bar is their 95th percentile, {search['bar']:.3f}), generated "
        f"real ids {real_ids['best_cos']:.3f} ({100 * real_ids['above_bar']:.1f} % above)."
    )
    if sweep:
        summary.append(
            f"cfg sweep over w = {', '.join(f'{w:g}' for w in sweep['w'])}: picked w = {w_real:g} "
            f"for real ids and {w_virtual:g} for virtual ids (paper: 0.5 and 2.5)."
        )
    mode = "quick: shipped tiny checkpoints" if c.quick else "full: every stage trained here"
    models = {
        "real": {
            "description": _describe_fr(fr_dir, "stage-1 model trained on real toy data")
            if not c.quick
            else _describe_fr(  # the path it recorded is that of the machine that trained it
                fr_dir, "stage-1 model the denoiser was trained against", "its own toy world's real images"
            ),
            "table": tables["real"],
        },
        "generated": {
            "description": _describe_fr(fr_gen_dir, "fresh model trained on generated data only"),
            "table": tables["generated"],
        },
    }
    if c.matched_real:
        models[MATCHED] = {
            "description": _describe_fr(
                fr_matched_dir,
                f"fresh model, same recipe, on {matched_ids} x {matched_per_id} real toy images",
            ),
            "table": tables[MATCHED],
        }
    timings = {**clock.times, "total": clock.total()}
    report = {
        "title": f"vigface demo: the VIGFace pipeline on the toy world ({mode})",
        "summary": summary,
        "verification": {
            "sets": [b.stem for b in bins],
            "models": models,
            "comparison": comparison,
        },
        "peers": {"columns": list(PEER_COLUMNS), "rows": peer_rows(), "note": PEER_NOTE},
        "dataset_metrics": metrics,
        "training_set_search": search,
        "cfg_sweep": sweep,
        "picked_w": {"real": w_real, "virtual": w_virtual, "from_sweep": bool(sweep)},
        "prototypes": proto_stats,
        "timings": timings,
        "config": {
            # quick trains no denoiser: the dm_ settings did not apply
            **{k: v for k, v in asdict(c).items() if not (c.quick and k.startswith("dm_"))},
            # the scales generated with: a sweep's picks, not the 0.5 / 2.5 it replaced
            "w_real": w_real,
            "w_virtual": w_virtual,
            "model": str(dm_dir),
            "fr_model": str(fr_dir),
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "resumed": resume,  # timings then cover this process's part only
        },  # fmt: skip
    }
    html_path = write_report(out, report, figs)
    return {
        "report": str(html_path),
        "json": str(out / "report.json"),
        "summary": summary,
        "timings": timings,
    }
