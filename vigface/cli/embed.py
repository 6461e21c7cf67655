"""`vigface-embed`: embeddings of a .rec, a verification .bin or an image folder with a trained backbone.

    vigface-embed runs/fr toy/toy_val.bin --out val.npy
    vigface-embed runs/fr toy/train.rec --out train.safetensors      # embeddings + labels

Embeddings are L2-normalised sums of the image's and its mirror's embedding (insightface's
protocol; --no-flip for one pass), computed in batches on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vigface.cli.common import check_output_file, positive_int, refuse_writing_over_inputs, run_command
from vigface.data.files import sort_safetensors_metadata, usual_permissions
from vigface.device import resolve_device
from vigface.errors import VigfaceError


def _source(path: Path):
    """(images iterable, count, labels or None, issame or None) for a .rec / .bin / folder."""
    from vigface.data.loaders.source import FaceSource
    from vigface.data.verification_bin import load_verification_pairs

    if path.suffix == ".bin":
        images, issame = load_verification_pairs(path)
        return images, len(images), None, np.asarray(issame)
    from vigface.data.alignment_check import check_dataset_alignment

    source = FaceSource(path)  # opened once: a folder without a manifest is scanned once
    check_dataset_alignment(source, "INPUT", name=path)  # embeddings of unaligned faces mislead
    dataset = source.dataset
    return (dataset[i][0] for i in range(len(dataset))), len(dataset), np.asarray(dataset.labels), None


def _embed(args: argparse.Namespace) -> int:
    from safetensors.numpy import save_file

    from vigface.fr.embed import embed_images, load_backbone

    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        raise VigfaceError(f"--out {out}: use a .npy or .safetensors file name")
    check_output_file("--out", out)  # found now, not after the whole embedding pass
    data = Path(args.input)  # a file (.rec with its .idx, .bin), or an image folder (not walked)
    inputs = [data, data.with_suffix(".idx")] if data.is_file() else []
    refuse_writing_over_inputs("--out", [out], [args.model, *inputs])
    device = resolve_device(args.device)
    model, meta = load_backbone(args.model, device)
    images, count, labels, issame = _source(Path(args.input))
    with tqdm(total=count, desc="embed", unit="img", disable=args.quiet) as bar:
        emb = embed_images(
            model, images, batch_size=args.batch_size, flip=not args.no_flip, progress=bar.update
        )
    bad = int((~np.isfinite(emb).all(axis=1)).sum())
    if bad:  # verify and metrics refuse such scores; written, they passed on silently
        raise VigfaceError(
            f"{args.model}: {bad} of {emb.shape[0]} embeddings hold NaN or infinite values (did the model "
            f"diverge?); nothing written to {out}"
        )
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".npy":
            _save_npy(tmp, emb)
        else:
            tensors = {"embeddings": emb}
            if labels is not None:
                tensors["labels"] = labels.astype(np.int64)
            if issame is not None:
                tensors["issame"] = issame.astype(np.bool_)
            save_file(
                tensors, tmp, metadata={"backbone_sha256": meta.get("sha256", ""), "source": str(args.input)}
            )
            sort_safetensors_metadata(tmp)
            usual_permissions(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing; after the rename, nothing
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out}")
    return 0


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, with the data written by Python's file object: np.save's own C write reported a
    full disk as "25600 requested and 18400 written" with no errno, so it could not be told apart."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.reshape(-1).view(np.uint8).data)  # (a memoryview cast fails on an empty array)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigface-embed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", help="a vigface-train-fr output folder (backbone.safetensors + backbone.json)"
    )
    parser.add_argument("input", help="train.rec, a verification .bin, or an image folder")
    parser.add_argument("--out", required=True, help=".npy (embeddings) or .safetensors (+ labels / issame)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--no-flip", action="store_true", help="skip the mirror-image pass")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("vigface-embed", _embed, args)


if __name__ == "__main__":
    sys.exit(main())
