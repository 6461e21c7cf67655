"""loader="dali": NVIDIA DALI decodes, aligns, mirrors and normalises (extra `dali`).

Pipeline (one per loader, built once): encoded bytes -> `fn.decoders.image` ("mixed" = nvJPEG on
a CUDA device, libjpeg-turbo on the CPU) -> `fn.warp_affine` with one matrix per image (only for
unaligned sources) -> `fn.crop_mirror_normalize` (mirror flag per image, (x - 127.5) / 127.5, CHW).

The Python side feeds the pipeline with `fn.external_source`: it reads the encoded images of
each step in the order of `order.rank_batches`, estimates the similarity transforms with
vigface._C and draws the flips with `normalise.flip_mask`, so "dali" reads, aligns and mirrors
exactly the images "torch" does, and a resumed run can start at any step. (Reading a record is a
pread of a few KB; decoding is the work, and it happens in DALI's threads or on the GPU.)

Alignment: DALI's warp samples the output pixel (x, y) at its centre (x + 0.5, y + 0.5) and maps
destination to source, while vigface's matrices map source to destination with centres at
integers. `dali_warp_matrices` converts; the two warps then agree within one intensity level
(float rounding of the bilinear weights), measured in tests/test_loaders.py.

Corrupt images: a batch DALI cannot decode is checked image by image with PIL (the torch
loader's decoder); the images PIL rejects are skipped, the pipeline is rebuilt (DALI leaves a
failed pipeline unusable) and the rest of the batch runs again. If PIL can decode every image of
the failing batch, DALI's error is raised with the batch's images named.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vigface.data.align import arcface_template, estimate_similarity, invert_affine
from vigface.data.images import decode_image
from vigface.data.loaders.base import ALIGN_HINT, FaceLoader, Job, Produced
from vigface.errors import BackendUnavailableError, VigfaceError


def import_dali():
    """(nvidia.dali.fn, nvidia.dali.types, Pipeline); BackendUnavailableError when DALI is missing."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as err:
        raise BackendUnavailableError(
            f"loader='dali' needs NVIDIA DALI, which failed to import ({err}); install the extra: "
            "pip install 'vigface[dali]' (or use loader='torch')"
        ) from None
    return fn, types, Pipeline


def dali_available() -> bool:
    try:
        import_dali()
    except BackendUnavailableError:
        return False
    return True


def dali_warp_matrices(forward: np.ndarray) -> np.ndarray:
    """(N, 2, 3) vigface matrices (src -> dst, centres at integers) -> DALI's (dst -> src, centres at +0.5).

    With A, b the float32 inverse (what vigface's warp uses): src = A dst + b for integer centres,
    so for half-integer centres src_c - 0.5 = A (dst_c - 0.5) + b, i.e. b' = b + 0.5 - A (0.5, 0.5).
    """
    inv = invert_affine(forward).astype(np.float64)  # (N, 2, 3)
    inv[:, :, 2] += 0.5 - 0.5 * (inv[:, :, 0] + inv[:, :, 1])
    return inv.astype(np.float32)


class DaliLoader(FaceLoader):
    name = "dali"

    def __init__(self, source, options):
        super().__init__(source, options)
        self._fn, self._types, self._Pipeline = import_dali()
        self.gpu = options.device.type == "cuda"
        self._pipe = None
        self._template = None if options.aligned else arcface_template(options.image_size)

    # ---- the pipeline ------------------------------------------------------------------------

    def _build(self):
        fn, types, o = self._fn, self._types, self.options
        device_id = (o.device.index or 0) if self.gpu else None
        # prefetch_queue_depth=1: one batch fed, one batch run; the caller owns the order.
        pipe = self._Pipeline(
            batch_size=o.batch_size,
            num_threads=max(o.workers, 1),
            device_id=device_id,
            prefetch_queue_depth=1,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image(  # EXIF orientation applied, as every vigface decoder does
                encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB, adjust_orientation=True
            )
            if not o.aligned:
                matrix = fn.external_source(name="matrix", dtype=types.FLOAT, ndim=2)
                images = fn.warp_affine(
                    images, matrix=matrix, size=(o.image_size, o.image_size), fill_value=0,
                    interp_type=types.INTERP_LINEAR, inverse_map=True,
                )  # fmt: skip
            out = fn.crop_mirror_normalize(
                images, mirror=mirror, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW",
                dtype=types.FLOAT,
            )  # fmt: skip
            pipe.set_outputs(out)
        pipe.build()
        return pipe

    def _run(self, encoded: list, mirror: np.ndarray, matrices: np.ndarray | None) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("mirror", [np.array(m, dtype=np.int32) for m in mirror])
        if matrices is not None:
            pipe.feed_input("matrix", list(matrices))
        (out,) = pipe.run()
        shapes = {tuple(s) for s in out.shape()}
        if len(shapes) > 1:
            raise VigfaceError(
                f"{self.source.path}: images in one batch differ in shape: {sorted(shapes)}; {ALIGN_HINT}"
            )
        from nvidia.dali.plugin.pytorch import feed_ndarray

        x = torch.empty((len(encoded), *shapes.pop()), dtype=torch.float32, device=self.options.device)
        stream = torch.cuda.current_stream(self.options.device) if self.gpu else None
        feed_ndarray(out.as_tensor(), x, cuda_stream=stream)  # a dense (b, 3, S, S) view
        return x

    # ---- one step ----------------------------------------------------------------------------

    def _read(self, job: Job) -> tuple[list, list, list]:
        """(positions read, encoded arrays, failures) of one job's images."""
        kept, encoded, failed = [], [], []
        for pos, i in enumerate(job.indices):
            try:
                data = self.source.encoded(int(i))
                if len(data) == 0:
                    raise VigfaceError(f"{self.source.describe(i)}: empty image payload")
            except VigfaceError as err:
                failed.append((int(i), str(err)))
                continue
            kept.append(pos)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
        return kept, encoded, failed

    def _matrices(self, job: Job, kept: list, encoded: list, failed: list):
        """Similarity transforms of the kept images; images with unusable landmarks join `failed`."""
        rows = job.indices[kept]
        points = self.source.landmarks[rows]
        try:
            return kept, encoded, estimate_similarity(points, self._template)
        except VigfaceError:
            pass  # some rows are bad: find them one by one (rare)
        good, mats = [], []
        for n, row in enumerate(rows):
            try:
                mats.append(estimate_similarity(points[n], self._template))
                good.append(n)
            except VigfaceError as err:
                failed.append((int(row), f"{self.source.describe(row)}: {err}"))
        return [kept[n] for n in good], [encoded[n] for n in good], np.asarray(mats).reshape(-1, 2, 3)

    def _prepare(self, job: Job) -> tuple[list, list, list, np.ndarray | None]:
        """The CPU side of one step: read its records, estimate its alignment matrices."""
        kept, encoded, failed = self._read(job)
        matrices = None
        if not self.options.aligned and kept:
            kept, encoded, forward = self._matrices(job, kept, encoded, failed)
            matrices = dali_warp_matrices(forward)
        return kept, encoded, failed, matrices

    def _produce(self, jobs: list[Job]) -> Iterator[Produced]:
        # Step k+1 is read (preads and vigface._C release the GIL) while DALI decodes step k, so
        # the reads do not add to the decode time. One step ahead is enough: a step's reads are
        # far shorter than its decode.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-read") as pool:
            ahead = pool.submit(self._prepare, jobs[0]) if jobs else None
            for n, job in enumerate(jobs):
                prepared = ahead.result()
                ahead = pool.submit(self._prepare, jobs[n + 1]) if n + 1 < len(jobs) else None
                yield self._decode(job, *prepared)

    def _decode(self, job: Job, kept: list, encoded: list, failed: list, matrices) -> Produced:
        """Run the pipeline on one prepared step; images DALI cannot decode are dropped (see top)."""
        while kept:
            mirror = job.mirror[kept].numpy() if job.mirror is not None else np.zeros(len(kept), bool)
            try:
                x = self._run(encoded, mirror, matrices)
                break
            except RuntimeError as err:
                self._pipe = None  # a pipeline that raised is no longer valid
                bad = self._undecodable(job, kept, encoded)
                if not bad:
                    names = ", ".join(self.source.describe(job.indices[p]) for p in kept[:8])
                    message = f"DALI failed on a batch that PIL decodes ({names}, ...): {err}"
                    raise VigfaceError(message) from None
                failed += [(int(job.indices[kept[n]]), reason) for n, reason in bad]
                drop = {n for n, _ in bad}
                keep = [n for n in range(len(kept)) if n not in drop]
                kept, encoded = [kept[n] for n in keep], [encoded[n] for n in keep]
                matrices = matrices[keep] if matrices is not None else None
        if not kept:
            return Produced(job, np.zeros(0, dtype=np.int64), None, failed)
        return Produced(job, np.asarray(kept, dtype=np.int64), x, failed)

    def _undecodable(self, job: Job, kept: list, encoded: list) -> list[tuple[int, str]]:
        bad = []
        for n, data in enumerate(encoded):
            try:
                decode_image(data.tobytes(), self.source.describe(job.indices[kept[n]]))
            except VigfaceError as err:
                bad.append((n, str(err)))
        return bad

    def close(self) -> None:
        self._pipe = None
