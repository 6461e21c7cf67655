"""vigface.data.loaders: torch vs DALI batches, rank sharding, alignment, corrupt images.

References: `vigface.fr.data` (the trainers' GlobalBatchSampler + prepare_batch on images decoded by
FaceRecordDataset), `align_faces` through the `vigface data align` command, and plain sets of indices.
"""

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vigface.cli.main import main
from vigface.data.alignment_check import crop_inside_fraction
from vigface.data.image_folder import ImageFolderDataset, write_image_folder
from vigface.data.images import encode_image
from vigface.data.loaders import CorruptImageWarning, FaceSource, make_loader
from vigface.data.loaders.order import rank_batches, steps_per_epoch
from vigface.data.recordio import FaceRecordDataset, FaceRecordWriter
from vigface.data.toy_dataset import ToyConfig, make_toy_dataset
from vigface.data.toyfaces import render_aligned, render_wild
from vigface.errors import BackendUnavailableError, VigfaceError
from vigface.fr.data import GlobalBatchSampler, prepare_batch

N_IDS, PER_ID = 6, 4  # 24 images: batch 5 x 2 ranks leaves a remainder of 4
ONE_LEVEL = 1 / 127.5 + 1e-5  # one intensity level in [-1, 1] units (+ float32 rounding)


@pytest.fixture(scope="module")
def aligned_rec(tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned")
    make_toy_dataset(out, ToyConfig(ids=N_IDS, per_id=PER_ID, seed=5, pairs=0), workers=1, progress=False)
    return out / "train.rec"


@pytest.fixture(scope="module")
def wild_rec(tmp_path_factory):
    """Unaligned 144x144 toy faces with train_landmarks.npy (the toy world's unaligned variant)."""
    out = tmp_path_factory.mktemp("wild")
    cfg = ToyConfig(ids=N_IDS, per_id=PER_ID, seed=6, pairs=0, unaligned=True)
    make_toy_dataset(out, cfg, workers=1, progress=False)
    return out / "train.rec"


@pytest.fixture(scope="module")
def wild_folder(tmp_path_factory):
    """Unaligned PNG (lossless) image folder with landmarks in its manifest."""
    root = tmp_path_factory.mktemp("wild_folder")
    rendered = [render_wild(8, ident, k) for ident in range(3) for k in range(3)]
    labels = [ident for ident in range(3) for _ in range(3)]
    write_image_folder(root, [r[0] for r in rendered], labels, landmarks=[r[1] for r in rendered], fmt="png")
    return root


def _epoch(loader, epoch=0, first_step=0):
    return list(loader.epoch(epoch, first_step))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC (exact for values that came from uint8 as u / 127.5 - 1)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- torch loader = trainer path


def test_torch_loader_reproduces_trainer_batches(aligned_rec):
    """Same indices as GlobalBatchSampler and same tensors as prepare_batch, flips included."""
    ds = FaceRecordDataset(aligned_rec)
    loader = make_loader(aligned_rec, 4, loader="torch", seed=11, flip=True, workers=0, image_size=56)
    spe = loader.steps_per_epoch
    assert spe == len(ds) // 4
    for epoch in (0, 1):
        sampler = GlobalBatchSampler(len(ds), 4, 0, 1, 11, epoch)
        batches = _epoch(loader, epoch)
        assert [b.index.tolist() for b in batches] == list(sampler)
        for t, (batch, indices) in enumerate(zip(batches, sampler, strict=True)):
            images = torch.from_numpy(np.stack([ds[i][0] for i in indices]))
            expected = prepare_batch(
                images, step=epoch * spe + t, seed=11, rank=0, input_size=56, flip=True,
                device=torch.device("cpu"), channels_last=False,
            )  # fmt: skip
            assert torch.equal(batch.images, expected)
            assert batch.labels.tolist() == [ds[i][1] for i in indices]
            assert batch.step == t


def test_resume_from_a_step_gives_the_rest_of_the_epoch(aligned_rec):
    loader = make_loader(aligned_rec, 5, loader="torch", seed=2, flip=True, workers=0, drop_last=False)
    full = _epoch(loader, 3)
    tail = _epoch(loader, 3, first_step=2)
    assert [b.step for b in tail] == [b.step for b in full[2:]]
    for a, b in zip(full[2:], tail, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)


def test_workers_do_not_change_batches(aligned_rec):
    serial = _epoch(make_loader(aligned_rec, 5, loader="torch", flip=True, workers=0))
    parallel = _epoch(make_loader(aligned_rec, 5, loader="torch", flip=True, workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_batches_are_nchw_contiguous_unless_channels_last_is_asked(aligned_rec, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    (batch, *_) = _epoch(make_loader(aligned_rec, 3, loader=loader, image_size=None, workers=0))
    assert batch.images.shape == (3, 3, 112, 112) and batch.images.is_contiguous()


def test_bf16_channels_last_output(aligned_rec):
    (batch, *_) = _epoch(
        make_loader(aligned_rec, 3, loader="torch", dtype="bfloat16", channels_last=True, workers=0)
    )
    assert batch.images.dtype == torch.bfloat16 and batch.images.shape == (3, 3, 112, 112)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.images.min() >= -1 and batch.images.max() <= 1


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_image_size_none_keeps_the_stored_size(wild_rec, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    ds = FaceRecordDataset(wild_rec)
    (batch, *_) = _epoch(make_loader(wild_rec, 3, loader=loader, image_size=None, shuffle=False, workers=0))
    assert batch.images.shape == (3, 3, 144, 144)  # the unaligned frame, taken as it is
    expected = torch.from_numpy(np.stack([ds[i][0] for i in range(3)])).permute(0, 3, 1, 2) / 127.5 - 1
    assert (batch.images - expected).abs().max() < 1e-5
    with pytest.raises(VigfaceError, match="image_size must be a positive integer"):
        make_loader(wild_rec, 3, loader=loader, image_size=None, aligned=False)


# --------------------------------------------------------------------------- rank sharding


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_read_every_record_exactly_once(aligned_rec, loader, epoch):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    n = N_IDS * PER_ID
    per_rank = []
    for rank in range(2):
        ld = make_loader(aligned_rec, 5, loader=loader, rank=rank, world_size=2, drop_last=False, workers=0)
        batches = _epoch(ld, epoch)
        assert len(batches) == ld.steps_per_epoch == 3  # 2 full global batches + the remainder (4 = 2 + 2)
        assert [len(b.index) for b in batches] == [5, 5, 2]
        per_rank.append(np.concatenate([b.index.numpy() for b in batches]))
    seen = np.concatenate(per_rank)
    assert sorted(seen.tolist()) == list(range(n))  # each record once: none lost, none twice
    labels = FaceRecordDataset(aligned_rec).labels
    for rank in range(2):
        ld = make_loader(aligned_rec, 5, loader=loader, rank=rank, world_size=2, drop_last=False, workers=0)
        for b in _epoch(ld, epoch):
            assert b.labels.tolist() == labels[b.index.numpy()].tolist()


def test_sharding_plan_reference():
    """rank_batches vs a plain-Python statement of the plan, drop_last both ways, odd sizes."""
    for n, b, w in [(23, 4, 3), (7, 2, 4), (10, 5, 2), (1, 1, 1)]:
        for drop_last in (True, False):
            plans = [rank_batches(n, b, r, w, 9, 0, True, drop_last) for r in range(w)]
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_order_seed(9, 0))).tolist()
            g = b * w
            full = n // g
            for r in range(w):
                expected = [order[t * g + r * b : t * g + (r + 1) * b] for t in range(full)]
                if not drop_last and n % g:
                    tail = order[full * g :]
                    k, extra = divmod(len(tail), w)
                    lo = r * k + min(r, extra)
                    part = tail[lo : lo + k + (r < extra)]
                    expected += [part] if part else []
                assert [p.tolist() for p in plans[r]] == expected
            seen = sorted(i for plan in plans for p in plan for i in p.tolist())
            assert seen == (list(range(n)) if not drop_last else sorted(order[: full * g]))
            assert steps_per_epoch(n, b, w, drop_last) == max(len(p) for p in plans)


def _order_seed(seed, epoch):
    from vigface.fr.rng import step_seed

    return step_seed(seed, epoch, "order")


# --------------------------------------------------------------------------- alignment


def test_aligned_output_equals_vigface_data_align(wild_folder, tmp_path):
    out = tmp_path / "aligned"
    argv = [
        "data",
        "align",
        "--images",
        str(wild_folder),
        "--out",
        str(out),
        "--image-format",
        "png",
        "--quiet",
    ]
    assert main(argv) == 0
    reference = ImageFolderDataset(out)  # PNG: what the command computed, losslessly
    loader = make_loader(
        wild_folder, 4, aligned=False, loader="torch", shuffle=False, drop_last=False, workers=0
    )
    got = {}
    for batch in _epoch(loader):
        for i, image in zip(batch.index.tolist(), _to_uint8(batch.images), strict=True):
            got[i] = image.numpy()
    assert sorted(got) == list(range(len(reference)))
    for i in range(len(reference)):
        np.testing.assert_array_equal(got[i], reference[i][0])  # bit for bit


def test_landmarks_jsonl_by_record_key_equals_npy(wild_rec, tmp_path):
    table = np.load(wild_rec.with_name("train_landmarks.npy"))
    keys = FaceRecordDataset(wild_rec).image_keys.tolist()
    jsonl = tmp_path / "lm.jsonl"
    rows = [
        json.dumps({"key": k, "landmarks": table[n].tolist()}) for n, k in reversed(list(enumerate(keys)))
    ]
    jsonl.write_text("\n".join(rows) + "\n")
    source = FaceSource(wild_rec, landmarks=jsonl)
    np.testing.assert_array_equal(source.landmarks, table)
    a = _epoch(make_loader(wild_rec, 6, aligned=False, loader="torch", workers=0))
    b = _epoch(make_loader(source, 6, aligned=False, loader="torch", workers=0))
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))


def test_unaligned_source_without_landmarks_is_a_clear_error(aligned_rec, tmp_path):
    folder = tmp_path / "no_lm"
    write_image_folder(folder, [render_aligned(1, 0, 0)[0]], [0])
    with pytest.raises(VigfaceError, match="no landmarks"):
        make_loader(folder, 1, aligned=False, loader="torch")
    lonely = tmp_path / "lonely.rec"
    with FaceRecordWriter(lonely) as w:
        w.add(render_aligned(1, 0, 0)[0], 0)
    with pytest.raises(VigfaceError, match="landmarks"):
        make_loader(lonely, 1, aligned=False, loader="torch")


# --------------------------------------------------------------------------- torch vs DALI


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_torch_and_dali_cpu_give_the_same_batches(aligned_rec, wild_rec, aligned):
    pytest.importorskip("nvidia.dali")
    rec = aligned_rec if aligned else wild_rec
    kw = dict(aligned=aligned, seed=4, flip=True, drop_last=False, workers=2)
    for epoch in (0, 1):
        ref = _epoch(make_loader(rec, 5, loader="torch", **kw), epoch)
        dali = _epoch(make_loader(rec, 5, loader="dali", **kw), epoch)
        assert len(ref) == len(dali) == 5
        for a, b in zip(ref, dali, strict=True):
            assert torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
            assert a.images.shape == b.images.shape == (len(a.index), 3, 112, 112)
            diff = (a.images - b.images).abs()
            assert diff.max() <= ONE_LEVEL
            if aligned:  # same libjpeg-turbo decode, no warp: equal up to float rounding
                assert diff.max() < 1e-5


def test_dali_alignment_matches_vigface_data_align(wild_folder, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "aligned"
    align_argv = ["data", "align", "--images", str(wild_folder), "--out", str(out), "--image-format", "png"]
    assert main([*align_argv, "--quiet"]) == 0
    reference = ImageFolderDataset(out)
    loader = make_loader(wild_folder, 9, aligned=False, loader="dali", shuffle=False, workers=1)
    (batch,) = _epoch(loader)
    got = _to_uint8(batch.images).numpy().astype(int)
    expected = np.stack([reference[i][0] for i in batch.index.tolist()]).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.mean(got != expected) < 0.01  # DALI's float weights round differently on a few pixels


# --------------------------------------------------------------------------- corrupt images


@pytest.fixture(scope="module")
def corrupt_rec(tmp_path_factory, aligned_rec):
    """The aligned toy set with three bad payloads: truncated, garbage after a JPEG marker, bit-flipped."""
    ds = FaceRecordDataset(aligned_rec)
    path = tmp_path_factory.mktemp("corrupt") / "train.rec"
    bad = {3: "truncated", 10: "garbage", 17: "flipped"}
    with FaceRecordWriter(path) as w:
        for i in range(len(ds)):
            data, label = ds.encoded(i)
            if bad.get(i) == "truncated":
                data = data[: len(data) // 2]
            elif bad.get(i) == "garbage":
                data = b"\xff\xd8\xff" + bytes(range(256)) * 4
            elif bad.get(i) == "flipped":
                data = data[:600] + bytes(x ^ 0x5A for x in data[600:1200]) + data[1200:]
            w.add(data, label)
    return path, sorted(bad)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_corrupt_images_are_skipped_counted_and_listed(corrupt_rec, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    path, bad = corrupt_rec
    ld = make_loader(path, 5, loader=loader, drop_last=False, shuffle=False, workers=2)
    with pytest.warns(CorruptImageWarning, match="skipped 3 corrupt images") as record:
        batches = _epoch(ld)
    message = str(record[0].message)
    for i in bad:
        assert f"image {i}:" in message
    seen = np.concatenate([b.index.numpy() for b in batches]).tolist()
    assert seen == [i for i in range(N_IDS * PER_ID) if i not in bad]
    assert sorted(ld.corrupt.skipped) == bad
    assert [len(b.index) for b in batches] == [4, 5, 4, 4, 4]  # batches shrink, the epoch goes on


def test_torch_and_dali_skip_the_same_corrupt_images(corrupt_rec):
    pytest.importorskip("nvidia.dali")
    path, _ = corrupt_rec
    with pytest.warns(CorruptImageWarning):
        ref = _epoch(make_loader(path, 5, loader="torch", flip=True, workers=0))
    with pytest.warns(CorruptImageWarning):
        dali = _epoch(make_loader(path, 5, loader="dali", flip=True, workers=1))
    for a, b in zip(ref, dali, strict=True):
        assert torch.equal(a.index, b.index)
        assert (a.images - b.images).abs().max() < 1e-5


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_dataset_where_everything_fails_is_a_clear_error(tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    path = tmp_path / "broken.rec"
    with FaceRecordWriter(path) as w:
        for i in range(6):
            w.add(b"\xff\xd8\xff" + bytes([i]) * 50, i // 3)
    ld = make_loader(path, 4, loader=loader, drop_last=False, workers=0)
    with pytest.raises(VigfaceError, match="every image this rank read in epoch 0 failed"):
        _epoch(ld)


# --------------------------------------------------------------------------- arguments


def test_bad_arguments_are_clear_errors(aligned_rec):
    with pytest.raises(VigfaceError, match="loader must be one of"):
        make_loader(aligned_rec, 4, loader="opencv")
    with pytest.raises(VigfaceError, match="batch_size must be a positive integer"):
        make_loader(aligned_rec, 0, loader="torch")
    with pytest.raises(VigfaceError, match=r"rank must be an integer in \[0, 2\)"):
        make_loader(aligned_rec, 4, loader="torch", rank=2, world_size=2)
    with pytest.raises(VigfaceError, match="dtype must be one of"):
        make_loader(aligned_rec, 4, loader="torch", dtype="int8")
    with pytest.raises(VigfaceError, match="not a .rec file"):
        make_loader(aligned_rec.with_suffix(".txt"), 4, loader="torch")


def test_dali_missing_is_named(aligned_rec, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"vigface\[dali\]"):
        make_loader(aligned_rec, 4, loader="dali")
    assert make_loader(aligned_rec, 4, loader="auto").name == "torch"


# --------------------------------------------------------------------------- torch loader decoders


def _torchvision_io():
    try:
        import torchvision.io as tio
    except Exception as exc:  # missing, or built for another torch
        pytest.skip(f"torchvision is not usable here: {type(exc).__name__}: {exc}")
    return tio


def _nvjpeg_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _torchvision_io()
    from vigface.data.align import available_backends

    if "cuda" not in available_backends():
        pytest.skip("vigface._C was built without CUDA")
    return torch.device("cuda")


def test_decoder_arguments_are_checked(aligned_rec, monkeypatch):
    with pytest.raises(VigfaceError, match="decoder must be one of"):
        make_loader(aligned_rec, 4, loader="torch", decoder="opencv")
    with pytest.raises(VigfaceError, match="decoder='nvjpeg' decodes on the GPU and needs a CUDA device"):
        make_loader(aligned_rec, 4, loader="torch", decoder="nvjpeg", device="cpu")
    assert make_loader(aligned_rec, 4, loader="torch", device="cpu").decoder == "pil"
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(BackendUnavailableError, match="decoder='torchvision' needs torchvision"):
        make_loader(aligned_rec, 4, loader="torch", decoder="torchvision")


def _with_exif_orientation(image: np.ndarray, orientation: int, fmt: str) -> bytes:
    """`image` stored as is, tagged with an EXIF Orientation (how a camera saves a turned photo)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(image).save(out, format=fmt, exif=exif.tobytes(), **options)
    return out.getvalue()


# What a viewer shows for each EXIF Orientation of stored pixels a (the EXIF 2.3 table), by hand
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored turned left: turn 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # stored turned right: turn 90 counter-clockwise
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_opencv_and_dali(orientation, fmt):
    """A photo stored sideways with an EXIF Orientation tag decodes upright (OpenCV's imread and
    DALI's decoder do; PIL alone does not), so landmarks found on the upright image fit it."""
    from vigface.data.images import decode_image, exif_orientation, image_shape

    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    data = _with_exif_orientation(stored, orientation, fmt)
    raw = stored  # the stored pixels, exact for the lossless formats
    if fmt == "JPEG":
        with Image.open(io.BytesIO(data)) as pil:  # as decoded, not turned
            raw = np.array(pil.convert("RGB"))
    assert exif_orientation(data) == orientation
    np.testing.assert_array_equal(decode_image(data), UPRIGHT[orientation](raw))
    assert image_shape(data) == decode_image(data).shape[:2]  # from the header alone (landmarks-fit check)
    assert (
        exif_orientation(encode_image(stored, "jpeg")) == exif_orientation(encode_image(stored, "png")) == 1
    )


@pytest.fixture(scope="module")
def exif_rec(tmp_path_factory, aligned_rec):
    """Aligned toy faces stored turned, each JPEG tagged with the Orientation that turns it back."""
    ds = FaceRecordDataset(aligned_rec)
    path = tmp_path_factory.mktemp("exif") / "train.rec"
    stored_as = {6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1), 3: lambda a: a[::-1, ::-1]}
    with FaceRecordWriter(path) as w:
        for i in range(10):
            image, label = ds[i]
            orientation = (6, 8, 3, 1)[i % 4]
            stored = stored_as[orientation](image) if orientation != 1 else image
            w.add(_with_exif_orientation(np.ascontiguousarray(stored), orientation, "JPEG"), label)
    return path, ds


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "nvjpeg", "dali"])
def test_every_decoder_turns_exif_tagged_faces_upright(exif_rec, decoder):
    path, ds = exif_rec
    kw = dict(aligned=True, flip=False, shuffle=False, drop_last=False, workers=0)
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
        loader = make_loader(path, 10, loader="dali", **kw)
    else:
        if decoder == "torchvision":
            _torchvision_io()
        device = _nvjpeg_device() if decoder == "nvjpeg" else torch.device("cpu")
        loader = make_loader(path, 10, loader="torch", decoder=decoder, device=device, **kw)
    (batch,) = _epoch(loader)
    got = _to_uint8(batch.images.cpu()).numpy().astype(int)
    upright = np.stack([ds[i][0] for i in range(10)]).astype(int)
    error = np.abs(got - upright).mean(axis=(1, 2, 3))
    assert error.max() < 3, error  # the same face through JPEG q95 (a turned one is off by ~40 levels)


def test_decoder_is_the_torch_loaders_option(aligned_rec):
    pytest.importorskip("nvidia.dali")
    with pytest.raises(VigfaceError, match="applies to loader='torch'"):
        make_loader(aligned_rec, 4, loader="dali", decoder="pil")


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_torchvision_cpu_decoder_gives_the_pil_batches(aligned_rec, wild_rec, aligned):
    _torchvision_io()
    rec = aligned_rec if aligned else wild_rec
    kw = dict(aligned=aligned, loader="torch", seed=2, flip=True, drop_last=False, workers=0)
    ref = _epoch(make_loader(rec, 5, decoder="pil", **kw))
    got = _epoch(make_loader(rec, 5, decoder="torchvision", **kw))
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert (a.images - b.images).abs().max() <= ONE_LEVEL  # both libjpeg-turbo


def test_torchvision_cpu_decoder_reads_bmp_and_tiff_payloads_too(tmp_path):
    """torchvision.io decodes JPEG/PNG/WebP/GIF only; a BMP or TIFF image (PIL reads them) must not
    be skipped as corrupt."""
    _torchvision_io()
    from vigface.data.loaders.decoders import decode_torchvision

    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    for fmt in ("BMP", "TIFF", "PNG"):
        out = io.BytesIO()
        Image.fromarray(stored).save(out, format=fmt)
        np.testing.assert_array_equal(decode_torchvision(out.getvalue(), fmt), stored)


def test_torchvision_cpu_decoder_skips_the_pil_corrupt_images(corrupt_rec):
    _torchvision_io()
    path, bad = corrupt_rec
    ld = make_loader(
        path, 5, loader="torch", decoder="torchvision", drop_last=False, shuffle=False, workers=0
    )
    with pytest.warns(CorruptImageWarning, match="skipped 3 corrupt images"):
        batches = _epoch(ld)
    assert sorted(ld.corrupt.skipped) == bad
    assert [len(b.index) for b in batches] == [4, 5, 4, 4, 4]


def _pil_stand_in_for_nvjpeg(payloads, device):
    """decode_jpegs_on_gpu's contract, computed with PIL on the CPU: (3, H, W) uint8 tensors or reasons."""
    from vigface.data.images import decode_image

    out = []
    for p in payloads:
        try:
            out.append(torch.from_numpy(decode_image(p.tobytes())).permute(2, 0, 1).to(device))
        except VigfaceError as err:
            out.append(str(err))
    return out


def _nvjpeg_loader_on_cpu(monkeypatch, path, **kw):
    """A torch loader running decoder='nvjpeg''s main-process code on the CPU: PIL in place of
    nvJPEG and the C warp in place of the CUDA one, so its batches must equal decoder='pil''s."""
    from vigface.data import align
    from vigface.data.loaders import torch_loader

    def warp_on_cpu(images, matrices, out_size, border_value=0, backend="auto"):
        assert backend == "cuda"
        return torch.from_numpy(
            align.warp_affine(images.numpy(), matrices, out_size, border_value, backend="c")
        )

    monkeypatch.setattr(torch_loader, "decode_jpegs_on_gpu", _pil_stand_in_for_nvjpeg)
    monkeypatch.setattr(torch_loader, "warp_affine", warp_on_cpu)
    ld = make_loader(path, 5, loader="torch", decoder="pil", **kw)
    ld.decoder = "nvjpeg"
    return ld


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_nvjpeg_main_process_path_with_a_cpu_stand_in(aligned_rec, wild_rec, aligned, monkeypatch):
    rec = aligned_rec if aligned else wild_rec
    kw = dict(aligned=aligned, seed=3, flip=True, drop_last=False, workers=0)
    ref = _epoch(make_loader(rec, 5, loader="torch", decoder="pil", **kw))
    got = _epoch(_nvjpeg_loader_on_cpu(monkeypatch, rec, **kw))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_nvjpeg_path_skips_what_pil_skips_with_a_cpu_stand_in(corrupt_rec, wild_rec, monkeypatch):
    path, bad = corrupt_rec
    ld = _nvjpeg_loader_on_cpu(monkeypatch, path, drop_last=False, shuffle=False, workers=0)
    with pytest.warns(CorruptImageWarning, match="skipped 3 corrupt images"):
        batches = _epoch(ld)
    assert sorted(ld.corrupt.skipped) == bad
    assert [len(b.index) for b in batches] == [4, 5, 4, 4, 4]
    # landmarks that admit no similarity: the GPU path's alignment skips that image alone
    ref = make_loader(wild_rec, 5, aligned=False, loader="torch", shuffle=False, workers=0)
    got = _nvjpeg_loader_on_cpu(monkeypatch, wild_rec, aligned=False, shuffle=False, workers=0)
    for ld in (ref, got):
        ld.source.landmarks[7] = np.nan
    with pytest.warns(CorruptImageWarning, match="skipped 1 corrupt images"):
        a = _epoch(ref)
    with pytest.warns(CorruptImageWarning, match="skipped 1 corrupt images"):
        b = _epoch(got)
    assert sorted(got.corrupt.skipped) == sorted(ref.corrupt.skipped) == [7]
    # the reason names the record, as DALI's does (it said "landmarks[0] has NaN ...": row 0 of one)
    assert ref.corrupt.skipped[7].startswith(f"{ref.source.describe(7)}: landmarks[0] has NaN")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)


def _level_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean, 99.9th percentile and max |a - b| in intensity levels."""
    d = ((a.float() - b.float()).abs() * 127.5).flatten().cpu()
    return d.mean().item(), d.kthvalue(max(1, int(0.999 * d.numel()))).values.item(), d.max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_nvjpeg_decoder_on_the_gpu_is_close_to_pil(aligned_rec, wild_rec, aligned):
    device = _nvjpeg_device()
    rec = aligned_rec if aligned else wild_rec
    kw = dict(aligned=aligned, loader="torch", seed=2, flip=True, drop_last=False, workers=2, device=device)
    ref = _epoch(make_loader(rec, 5, decoder="pil", **kw))
    got = _epoch(make_loader(rec, 5, decoder="nvjpeg", **kw))
    assert len(ref) == len(got) == 5
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert b.images.is_cuda and b.images.shape == a.images.shape and b.images.dtype == torch.float32
    mean, p999, top = _level_stats(torch.cat([a.images for a in ref]), torch.cat([b.images for b in got]))
    print(f"nvJPEG vs PIL ({'aligned' if aligned else 'unaligned'}): mean {mean:.3f}, "
          f"99.9th pct {p999:.1f}, max {top:.1f} levels")  # fmt: skip
    # The toy JPEGs are 4:2:0: nvJPEG upsamples chroma unlike libjpeg-turbo, so sharp colour edges
    # differ by tens of levels (first H100 run: mean 1.64 / 1.10, 99.9th pct 39 / 30, max 74 / 81);
    # a swapped channel or a wrong warp moves the mean by far more.
    assert mean <= 2.5 and p999 <= 64


@pytest.mark.cuda
def test_nvjpeg_equals_pil_within_idct_rounding_without_chroma_subsampling():
    """4:4:4 JPEGs have no chroma upsampling: what is left between nvJPEG and PIL is the IDCT."""
    device = _nvjpeg_device()
    tio = _torchvision_io()
    from io import BytesIO

    from PIL import Image

    from vigface.data.images import decode_image

    images = [render_aligned(5, ident, k)[0] for ident in range(3) for k in range(2)]
    diffs = []
    for image in images:
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
        data = buffer.getvalue()
        ref = torch.from_numpy(decode_image(data)).permute(2, 0, 1)
        got = tio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device=device).cpu()
        diffs.append((got.int() - ref.int()).abs())
    d = torch.stack(diffs).float()
    print(f"nvJPEG vs PIL, 4:4:4: mean {d.mean().item():.3f}, max {d.max().item():.0f} levels")
    assert d.mean() <= 0.5 and d.max() <= 4


@pytest.mark.cuda
def test_nvjpeg_decoder_skips_the_pil_corrupt_images(corrupt_rec):
    device = _nvjpeg_device()
    tio = _torchvision_io()
    path, bad = corrupt_rec
    ds = FaceRecordDataset(path)
    rejected = []
    for i in range(
        len(ds)
    ):  # what nvJPEG alone refuses (it decodes the truncated one: read_for_nvjpeg refuses it)
        try:
            tio.decode_jpeg(torch.frombuffer(bytearray(ds.encoded(i)[0]), dtype=torch.uint8), device=device)
        except RuntimeError:
            rejected.append(i)
    print(f"nvJPEG alone rejects {rejected} of the damaged {bad}")
    assert set(rejected) <= set(bad)
    ld = make_loader(path, 5, loader="torch", decoder="nvjpeg", drop_last=False, shuffle=False, device=device)
    with pytest.warns(CorruptImageWarning, match="skipped 3 corrupt images"):
        batches = _epoch(ld)
    assert sorted(ld.corrupt.skipped) == bad
    seen = np.concatenate([b.index.numpy() for b in batches]).tolist()
    assert seen == [i for i in range(len(ds)) if i not in bad]


def test_nvjpeg_workers_refuse_truncated_jpegs(aligned_rec):
    """nvJPEG would decode a truncated JPEG (grey below the cut); the worker's marker check refuses it."""
    from vigface.data.loaders.decoders import read_for_nvjpeg
    from vigface.errors import DataFormatError

    data = FaceRecordDataset(aligned_rec).encoded(0)[0]
    payload, is_jpeg = read_for_nvjpeg(data, "train.rec key 1")
    assert is_jpeg and payload.tobytes() == data
    for cut in (len(data) // 2, len(data) - 2, len(data) - 1):
        with pytest.raises(DataFormatError, match="truncated"):
            read_for_nvjpeg(data[:cut], "train.rec key 1")
    read_for_nvjpeg(data + b"\x00" * 7, "padded")  # bytes after the end-of-image marker are fine
    png = encode_image(render_aligned(1, 0, 0)[0], "png")
    pixels, is_jpeg = read_for_nvjpeg(png, "a.png")
    assert not is_jpeg and pixels.shape == (112, 112, 3)


def test_images_of_several_sizes_name_the_way_out(tmp_path):
    """Unaligned photos of several sizes: the error said "set aligned=False", a Python argument the
    CLI does not have; it now names `vigface data align` first."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for size in (16, 24, 16, 24)]
    write_image_folder(tmp_path / "mixed", images, [0, 0, 1, 1], fmt="png")
    loader = make_loader(tmp_path / "mixed", 4, loader="torch", workers=0, image_size=None)
    with pytest.raises(
        VigfaceError, match=r"differ in shape.*; align them to one size first \(vigface data align\)"
    ):
        next(iter(loader))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_sixteen_bit_grayscale_pngs_decode_to_their_eight_bit_values(tmp_path, loader):
    """PIL's convert("RGB") clipped 16-bit samples at 255: a 16-bit grayscale PNG came out solid
    white from the torch loader (DALI scaled it; the two differed by up to 243 levels)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    gray = render_aligned(seed=0, identity=1, index=0)[0][..., 1]  # an 8-bit face, one channel
    wide = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(wide, format="PNG")  # the same face in 16 bits
    assert Image.open(io.BytesIO(wide.getvalue())).mode.startswith("I")
    write_image_folder(tmp_path / "f", [wide.getvalue(), wide.getvalue()], [0, 1])
    image, _ = ImageFolderDataset(tmp_path / "f")[0]
    assert np.array_equal(image, np.repeat(gray[..., None], 3, axis=2))
    (batch,) = _epoch(
        make_loader(tmp_path / "f", 2, loader=loader, image_size=None, shuffle=False, workers=0)
    )
    levels = (batch.images[0].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(levels - gray[..., None]).max() <= 1.01


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_landmarks_in_another_frame_are_refused_not_warped_into_black_crops(wild_rec, tmp_path, loader):
    """--no-aligned with landmarks shifted, scaled or x/y-swapped trained on black squares without a
    word (the warp fills outside the image); `vigface data align` wrote them too."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    table = np.load(wild_rec.with_name("train_landmarks.npy"))
    for name, wrong in (("shifted", table - 1000), ("scaled", table * 10), ("swapped", table[..., ::-1])):
        path = tmp_path / f"{name}.npy"
        np.save(path, np.ascontiguousarray(wrong))
        with pytest.raises(
            VigfaceError, match=f"landmarks {path}: these landmarks put the aligned crops mostly"
        ):
            make_loader(wild_rec, 4, loader=loader, aligned=False, landmarks=path, workers=0)
    near_border = table + 30  # every face pushed towards a corner keeps much of its crop: taken
    sizes = np.full((len(table), 2), 144.0)
    assert 0.5 < np.median(crop_inside_fraction(near_border, sizes)) < 0.95
    border = tmp_path / "border.npy"
    np.save(border, near_border)
    (batch, *_) = _epoch(make_loader(wild_rec, 4, loader=loader, aligned=False, landmarks=border, workers=0))
    assert batch.images.shape[0] == 4
    assert main(["data", "align", "--images", str(wild_rec), "--landmarks", str(tmp_path / "swapped.npy"),
                 "--out", str(tmp_path / "aligned" / "train.rec")]) == 2  # fmt: skip
    assert not (tmp_path / "aligned" / "train.rec").exists()
