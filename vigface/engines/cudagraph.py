"""The cudagraph engine: the whole guided sampling loop captured once per (batch, steps, sampler).

At ViT-B/4 a denoiser forward is ~150 kernels; with 100 DDIM steps that is 15,000 launches per
batch whose CPU-side cost (~5 us each) is paid again and again by eager PyTorch. Here every step,
    model_in = [x; x]  ->  out = denoiser(model_in, t_i, [cond; 0], [pose; 0])  ->  fused update of x, prev
is recorded into one CUDA graph over static buffers and replayed with a single launch. The
timesteps (a (2N,) int64 buffer per step) and the update coefficients (kernel arguments) are fixed
at capture; the conditions, guidance weights and x_T are copied into the static buffers before
each replay. No host sync happens inside: no .item(), no data-dependent Python branch.

The update is the fused CUDA op (csrc/guided_update.cu) when vigface._C has CUDA, else its
PyTorch reference, captured all the same. Precisions: fp32, bf16, fp16 (weights cast; x and the
sampler state stay float32). `denoise` alone is also replayed from a captured graph per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vigface.diffusion.denoiser import Denoiser
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.base import DTYPES, Engine, check_precision, engine_model
from vigface.engines.fused_update import guided_update_, plan_steps
from vigface.errors import BackendUnavailableError


@dataclass
class _Loop:
    """Everything the captured loop reads or writes. A CUDA graph holds addresses, not tensors: a
    buffer it uses must live as long as the graph, or the allocator hands its memory to other
    tensors and later replays read garbage (the first H100 run: the first replay matched eager,
    later ones did not, because model_in and the timesteps lived only in the capture closure)."""

    cond: torch.Tensor  # (2N, d): [cond; 0]
    pose: torch.Tensor | None  # (2N, 5, S, S): [pose; 0]
    w: torch.Tensor  # (N,)
    x: torch.Tensor  # (N, 3, S, S): x_T in, the final x0 estimate out
    prev: torch.Tensor  # (N, 3, S, S): the previous step's x0
    model_in: torch.Tensor  # (2N, 3, S, S): [x; x], the denoiser's input at every step
    timesteps: list  # one (2N,) int64 tensor per step
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class _Forward:
    graph: torch.cuda.CUDAGraph
    inputs: tuple
    out: torch.Tensor


class CudaGraphEngine(Engine):
    name = "cudagraph"
    precisions = ("fp32", "bf16", "fp16")

    def __init__(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        device="cuda",
        precision: str = "fp32",
        update_impl: str = "auto",
    ):
        check_precision(self.name, precision, self.precisions)
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError("engine 'cudagraph' needs a CUDA device (CUDA graphs); use eager")
        super().__init__(denoiser.config, schedule, device, precision)
        self.dtype = DTYPES[precision]
        # The configured backends stay (Triton kernels are capturable; they compile in the warm-up).
        self.model = engine_model(denoiser, self.device, self.dtype)
        self.update_impl = update_impl
        self._loops: dict = {}
        self._forwards: dict = {}
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool shared by all captured graphs

    def describe(self) -> dict:
        return {**super().describe(), "update_impl": self.update_impl}

    def _forward(self, x, t, cond, pose):
        p = None if pose is None else pose.to(self.dtype)
        return self.model(x.to(self.dtype), t, cond.to(self.dtype), p)

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream first (lazy cuBLAS/cuDNN init must not happen during capture).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    @torch.no_grad()
    def denoise(self, x_t, t, cond, pose=None):
        key = (x_t.shape[0], pose is not None)
        fwd = self._forwards.get(key)
        if fwd is None:
            inputs = (
                torch.zeros_like(x_t, dtype=torch.float32, device=self.device),
                torch.zeros(x_t.shape[0], dtype=torch.long, device=self.device),
                torch.zeros(cond.shape, dtype=torch.float32, device=self.device),
                None if pose is None else torch.zeros(pose.shape, dtype=torch.float32, device=self.device),
            )
            holder = {}

            def run():
                holder["out"] = self._forward(*inputs)

            graph = self._capture(run)
            fwd = self._forwards[key] = _Forward(graph, inputs, holder["out"])
        for buffer, value in zip(fwd.inputs, (x_t, t, cond, pose), strict=True):
            if buffer is not None:
                buffer.copy_(value)
        fwd.graph.replay()
        # a copy: the next replay writes into fwd.out (.float() alone returns it itself in fp32)
        return fwd.out.to(torch.float32, copy=True)

    @torch.no_grad()
    def sample(self, cond, pose, w, *, sampler="ddim", steps=100, x_T=None, generator=None):
        plan = plan_steps(self.schedule, sampler, steps, self.config.prediction)
        cond2, pose2, w, x_T = self.prepare(cond, pose, w, x_T, generator)
        n = x_T.shape[0]
        key = (n, steps, sampler, pose2 is not None)
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = self._capture_loop(plan, cond2, pose2, w, x_T)
        loop.cond.copy_(cond2)
        if loop.pose is not None:
            loop.pose.copy_(pose2)
        loop.w.copy_(w)
        loop.x.copy_(x_T)
        loop.prev.zero_()
        loop.graph.replay()
        return loop.x.clone()

    def _capture_loop(self, plan, cond2, pose2, w, x_T) -> _Loop:
        n = x_T.shape[0]
        loop = _Loop(
            cond=cond2.clone(),
            pose=None if pose2 is None else pose2.clone(),
            w=w.clone(),
            x=x_T.clone(),
            prev=torch.zeros_like(x_T),
            model_in=torch.empty((2 * n, *x_T.shape[1:]), dtype=torch.float32, device=self.device),
            timesteps=[torch.full((2 * n,), s.t, dtype=torch.long, device=self.device) for s in plan],
        )

        def run():  # uses no tensor that `loop` does not hold
            for step, t in zip(plan, loop.timesteps, strict=True):
                loop.model_in[:n].copy_(loop.x)
                loop.model_in[n:].copy_(loop.x)
                out = self._forward(loop.model_in, t, loop.cond, loop.pose)
                guided_update_(out, loop.x, loop.prev, loop.w, step, self.update_impl)

        loop.graph = self._capture(run)  # the warm-up ran the loop once on these buffers: reset before replay
        return loop
