"""The names and limits a user picks from on a command line, torch-free.

Each lives here rather than in the torch module that acts on it, so that a command's --help and
its argument errors come at once instead of after torch's import (~2 s on a 2-core CPU). Those
modules import their names from here.
"""

from __future__ import annotations

# stage-2 noise schedules (vigface.diffusion.schedule)
SCHEDULES = ("cosine", "linear")
MAX_TIMESTEPS = 100_000  # the paper trains with T = 1000

# The timestep spacing of every sampler name, for the eager reference and the engines' fused plans
# (vigface.diffusion.dpm_solver). dpm++logsnr: DPM-Solver++(2M) at logSNR-spaced timesteps.
SAMPLER_SPACING = {"ddim": "time", "dpm++": "time", "dpm++logsnr": "logsnr"}
SAMPLERS = tuple(SAMPLER_SPACING)

# classifier-free guidance scales (vigface.diffusion.cfg): the paper's
DEFAULT_W_REAL = 0.5
DEFAULT_W_VIRTUAL = 2.5

# sampling engines (vigface.engines), their precisions, and the denoiser's kernels while sampling
ENGINES = ("eager", "compile", "cudagraph", "onnx", "trt", "auto")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
KERNELS = ("reference", "fast")

# ONNX / TensorRT export (vigface.engines.export, vigface.engines.trt)
EXPORTERS = ("auto", "dynamo", "legacy")
DEFAULT_OPSET = 18
TYPINGS = ("auto", "weak", "strong")  # TensorRT network typing
