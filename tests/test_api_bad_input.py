"""The Python API refuses bad input in one clear error (found by a probe of the public functions),
where it used to return a silently wrong result or fail deep inside torch / NumPy."""

import numpy as np
import pytest
import torch

from vigface.assets import tiny_model_dir
from vigface.data.loaders import make_loader
from vigface.diffusion.sampling import FaceSampler
from vigface.errors import VigfaceError
from vigface.eval.verification import verify_scores
from vigface.fr.embed import embed_images, load_backbone


@pytest.fixture(scope="module")
def sampler():
    return FaceSampler.load(tiny_model_dir())


def test_sampler_refuses_nan_inputs_and_bad_seeds(sampler):
    """NaN in cond, pose or w made every image black (NaN passes the clamp and casts to 0); float
    seeds were truncated (0.7 gave seed 0's face); a seed count other than the batch named x_T."""
    cond = torch.nn.functional.normalize(
        torch.randn(2, 128, generator=torch.Generator().manual_seed(0)), dim=1
    )
    pose, w = torch.zeros(2, 5, 32, 32), torch.ones(2)
    nan = float("nan")
    for args, message in (
        ((torch.full((2, 128), nan), pose, w, [0, 1]), "cond holds NaN or infinite values"),
        ((cond, torch.full((2, 5, 32, 32), nan), w, [0, 1]), "pose holds NaN or infinite values"),
        ((cond, pose, torch.tensor([1.0, float("inf")]), [0, 1]), "w holds NaN or infinite values"),
        ((cond, pose, w, [0.7, 1]), r"seeds must be integers"),
        ((cond, pose, w, [2**64, 0]), r"seeds must be in \[0, 2\*\*64\)"),
        ((cond, pose, w, [0]), r"one seed per row, got \(2, 128\) and 1 seeds"),
    ):
        with pytest.raises(VigfaceError, match=message):
            sampler.sample(*args, steps=2)
    # NumPy inputs are taken (they failed on .dim()), and an empty batch gives no images
    images = sampler.sample(cond.numpy(), pose.numpy(), np.ones(2), [0, 1], steps=2)
    assert np.array_equal(images, sampler.sample(cond, pose, w, [0, 1], steps=2))
    empty = sampler.sample(torch.zeros(0, 128), torch.zeros(0, 5, 32, 32), torch.ones(0), [], steps=2)
    assert empty.shape == (0, 32, 32, 3) and empty.dtype == np.uint8


def test_embed_images_takes_uint8_rgb_only():
    """A float array in [0, 1] was embedded as a near-black image (cosine ~0 to the right embedding);
    batch_size -1 returned no embeddings; CHW or grayscale failed inside the network."""
    model, _ = load_backbone(tiny_model_dir() / "fr")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert embed_images(model, images).shape[0] == 4
    for bad in (images.astype(np.float32) / 255, images.transpose(0, 3, 1, 2), images[..., 0]):
        with pytest.raises(VigfaceError, match=r"images must be uint8 \(N, H, W, 3\) RGB"):
            embed_images(model, bad)
    for size in (-1, 0, 2.5):
        with pytest.raises(VigfaceError, match="batch_size must be a positive integer"):
            embed_images(model, images, batch_size=size)
    assert embed_images(model, images[:0]).shape == (0, 128)


def test_verify_scores_refuses_labels_that_are_not_booleans():
    """issame was cast to bool: "no", 2 / 5 and 0.3 all meant "same", for an accuracy of 1.0."""
    scores = np.linspace(-1, 1, 40)
    truth = scores > 0
    assert verify_scores(scores, truth) == verify_scores(scores, truth.astype(int))  # 0 / 1 are taken
    for bad in (np.array(["no"] * 40), np.where(truth, 2, 5), np.full(40, 0.3)):
        with pytest.raises(VigfaceError, match="issame must be booleans or 0 / 1"):
            verify_scores(scores, bad)


def test_loader_refuses_an_integer_dtype_and_steps_outside_the_epoch(small_toy):
    """dtype torch.int8 gave images of -1, 0 and 1 only; first_step -3 gave 3 batches too many."""
    with pytest.raises(VigfaceError, match="dtype must be a floating-point type"):
        make_loader(small_toy / "train.rec", 8, workers=0, dtype=torch.int8)
    loader = make_loader(small_toy / "train.rec", 8, workers=0)
    for epoch, first in ((0, -3), (0, loader.steps_per_epoch + 1), (-1, 0)):
        with pytest.raises(VigfaceError, match="epoch must be >= 0 and first_step in"):
            next(iter(loader.epoch(epoch, first)))
    assert len(list(loader.epoch(0, loader.steps_per_epoch))) == 0  # resuming at an epoch's end
    big = make_loader(small_toy / "train.rec", 10**6, workers=0)  # drop_last: no batch at all
    with pytest.raises(VigfaceError, match="fewer than one global batch"):
        next(iter(big.epoch(0)))
    assert len(list(make_loader(small_toy / "train.rec", 10**6, workers=0, drop_last=False).epoch(0))) == 1


def test_generation_config_refuses_non_integers_unknown_devices_and_huge_images():
    """steps / per_id 2.5 failed deep inside generation, "5" compared as a string, device "gpu" ran
    on the CPU without a word, output_size 10**6 asked for 120 GB."""
    from vigface.generate.config import GenerationConfig

    for change, message in (
        ({"steps": 2.5}, "--steps must be an integer, got 2.5"),
        ({"per_id": 2.5}, "--per-id must be an integer"),
        ({"steps": "5"}, "--steps must be an integer, got '5'"),
        ({"device": "gpu"}, "--device 'gpu' is unknown"),
        ({"device": "cuda:1"}, "--device 'cuda:1' is unknown"),
        ({"output_size": 10**6}, "--output-size must be at most 2048"),
    ):
        with pytest.raises(VigfaceError, match=message):
            GenerationConfig(model="m", out="o", **change)
    GenerationConfig(model="m", out="o", steps=np.int64(5), device="cpu")  # NumPy integers are integers


def test_writers_readers_and_verification_refuse_out_of_range_arguments(tmp_path):
    """The writers took JPEG quality -5 / 1000; an empty image failed inside PIL; an image folder's
    index past its end was a bare IndexError; n_folds 0 failed inside NumPy and 2.5 was taken."""
    from vigface.data.image_folder import ImageFolderDataset, ImageFolderWriter, write_image_folder
    from vigface.data.recordio import FaceRecordWriter

    image = np.zeros((8, 8, 3), np.uint8)
    for quality in (-5, 0, 1000, 2.5):
        with pytest.raises(VigfaceError, match="JPEG quality must be an integer in 1..100"):
            with FaceRecordWriter(tmp_path / f"q{quality}", quality=quality) as writer:
                writer.add(image, 0)
        with pytest.raises(VigfaceError, match="JPEG quality must be an integer in 1..100"):
            ImageFolderWriter(tmp_path / f"f{quality}", quality=quality).add(image, 0)
    with pytest.raises(VigfaceError, match=r"got shape \(0, 0, 3\)"):
        with FaceRecordWriter(tmp_path / "empty") as writer:
            writer.add(np.zeros((0, 0, 3), np.uint8), 0)
    write_image_folder(tmp_path / "ok", [image], [0])
    with pytest.raises(IndexError, match="index 5 out of range for 1 images of"):
        ImageFolderDataset(tmp_path / "ok")[5]
    with pytest.raises(TypeError):
        ImageFolderDataset(tmp_path / "ok")[0.0]
    scores, truth = np.linspace(-1, 1, 40), np.linspace(-1, 1, 40) > 0
    for folds in (0, 1, 2.5):
        with pytest.raises(VigfaceError, match="n_folds must be an integer >= 2"):
            verify_scores(scores, truth, n_folds=folds)


def test_loaders_of_models_name_a_device_torch_does_not_know():
    """FaceSampler.load(device="gpu0") and load_backbone(device="gpu") failed inside torch."""
    with pytest.raises(VigfaceError, match="device 'gpu0' is not a torch device"):
        FaceSampler.load(tiny_model_dir(), device="gpu0")
    with pytest.raises(VigfaceError, match="device 'gpu' is not a torch device"):
        load_backbone(tiny_model_dir() / "fr", device="gpu")
    assert (
        next(load_backbone(tiny_model_dir() / "fr", torch.device("cpu"))[0].parameters()).device.type == "cpu"
    )


def test_training_configs_built_from_python_check_their_field_types():
    """FRTrainConfig(batch_size=2.5) or ("8") and DiffusionTrainConfig(steps=2.5) were taken and
    failed deep inside training; the CLI already checked --config files this way."""
    from vigface.diffusion.config import DiffusionTrainConfig
    from vigface.fr.config import FRTrainConfig

    for build, message in (
        (lambda: FRTrainConfig(data="d", out="o", batch_size=2.5), "batch_size must be of type int, got 2.5"),
        (lambda: FRTrainConfig(data="d", out="o", batch_size="8"), "batch_size must be of type int, got '8'"),
        (lambda: FRTrainConfig(data="d", out="o", lr_steps=["a"]), "lr_steps must be of type list"),
        (
            lambda: DiffusionTrainConfig(data="d", fr_model="f", out="o", steps=2.5),
            "steps must be of type int",
        ),
        (
            lambda: DiffusionTrainConfig(data="d", fr_model="f", out="o", extra="x"),
            "extra must be of type dict",
        ),
    ):
        with pytest.raises(VigfaceError, match=message):
            build()
    FRTrainConfig(data="d", out="o", batch_size=np.int64(8), lr_steps=[1, 2.5])  # ints are floats too


def test_training_configs_refuse_values_outside_their_range():
    """Each of these was taken: dropout 1.5 failed inside nn.Dropout, a NaN lr_decay or lr step
    trained on silently, patch 0 or heads 0 raised ZeroDivisionError, a negative patch or width 0
    failed deep inside the model, and 10**9 timesteps built 8 GB schedule tables."""
    from vigface.diffusion.config import DiffusionTrainConfig
    from vigface.diffusion.denoiser_config import DenoiserConfig
    from vigface.fr.config import FRTrainConfig

    nan = float("nan")
    for fields, message in (
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"lr_decay": nan}, "lr_decay must be a finite number > 0, got nan"),
        ({"lr_steps": [4.0, -1.0]}, "lr_steps must be finite epochs >= 0, got -1.0"),
        ({"lr_steps": [nan]}, "lr_steps must be finite epochs >= 0, got nan"),
    ):
        with pytest.raises(VigfaceError, match=message):
            FRTrainConfig(data="d", out="o", **fields)
    for fields, message in (
        ({"patch": 0}, "patch must be at least 1, got 0"),
        ({"patch": -4}, "patch must be at least 1, got -4"),
        ({"image_size": 0}, "image_size must be at least 1, got 0"),
        ({"timesteps": 10**9}, r"diffusion config: timesteps must be in 2..100000, got 1000000000"),
        ({"timesteps": 1}, r"timesteps must be in 2..100000, got 1"),
    ):
        with pytest.raises(VigfaceError, match=message):
            DiffusionTrainConfig(data="d", fr_model="f", out="o", size="tiny", **fields)
    for fields, message in (
        ({"heads": 0}, "heads must be at least 1, got 0"),
        ({"width": 0}, "width must be at least 1, got 0"),
        ({"depth": -1}, "depth must be at least 1, got -1"),
        ({"cond_dim": 0}, "cond_dim must be at least 1, got 0"),
        ({"mlp_ratio": nan}, "mlp_ratio must be a finite number > 0, got nan"),
    ):
        with pytest.raises(VigfaceError, match=message):
            DenoiserConfig(**fields)
    FRTrainConfig(data="d", out="o", dropout=0.4, lr_steps=[0, 3.5])  # the edges that stay allowed
    DiffusionTrainConfig(data="d", fr_model="f", out="o", size="tiny", timesteps=2)


def test_metric_functions_refuse_input_that_made_nan_or_failed_inside_numpy():
    """A NaN quality score made DIV NaN; an all-zero embedding made SEP 0 / 0 = NaN; a set without
    genuine pairs gave a NaN mean; bins 0, max_pairs -1 and scores longer than issame failed
    inside NumPy (an IndexError for the last)."""
    from vigface.eval.metrics import class_diversity, class_separability, dataset_metrics
    from vigface.eval.similarity import genuine_imposter, histogram, mean_genuine_imposter
    from vigface.eval.verification import best_threshold

    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 4))
    labels = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(VigfaceError, match="quality scores contain NaN"):
        class_diversity([0.5, np.nan, 0.4, 0.2, 0.1, 0.3], labels)
    with pytest.raises(VigfaceError, match="no quality scores"):
        class_diversity([], [])
    zero = e.copy()
    zero[3] = 0
    with pytest.raises(VigfaceError, match="embedding row 3 is all zeros"):
        class_separability(zero, labels)
    with pytest.raises(VigfaceError, match="no genuine pairs"):
        mean_genuine_imposter(e[:3], [0, 1, 2])
    with pytest.raises(VigfaceError, match="no imposter pairs"):
        mean_genuine_imposter(e[:3], [7, 7, 7])
    with pytest.raises(VigfaceError, match="bins must be an integer >= 1, got 0"):
        histogram([0.1, 0.2], bins=0)
    with pytest.raises(VigfaceError, match="value_range must be finite"):
        histogram([0.1, 0.2], value_range=(1.0, -1.0))
    with pytest.raises(VigfaceError, match="max_pairs must be an integer >= 1, got -1"):
        genuine_imposter(e, labels, max_pairs=-1)
    with pytest.raises(VigfaceError, match=r"scores \(5,\) and issame \(3,\)"):
        best_threshold(np.linspace(0, 1, 5), [True, False, True])
    # what stays allowed: a real dataset's metrics, and a one-pair-per-kind set
    assert np.isfinite(dataset_metrics(e, labels, quality=np.linspace(0, 1, 6))["div"])
    genuine, imposter = mean_genuine_imposter(e[:3], [0, 0, 1])
    assert genuine == pytest.approx(e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1]))


def test_a_backbone_json_that_disagrees_with_its_weights_is_one_error(tmp_path):
    """input_size edited in backbone.json: load_state_dict(strict=False) still raised its own
    RuntimeError, a traceback in embed, verify and metrics."""
    import json
    import shutil

    from vigface.errors import DataFormatError

    folder = tmp_path / "fr"
    shutil.copytree(tiny_model_dir() / "fr", folder)
    meta = json.loads((folder / "backbone.json").read_text())
    meta["backbone"]["input_size"] = 112
    (folder / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataFormatError,
        match=r"backbone.safetensors: does not match the backbone backbone.json describes \(fc.weight",
    ):
        load_backbone(folder)
