"""The fused guidance + sampler update: its plan and PyTorch reference against the closed forms.

The reference (vigface.engines.fused_update) must reproduce, step for step and over whole loops,
the composition cfg_combine -> clamp -> ddim_step / dpm_solver_pp_step that the reference
samplers run; the CUDA op (csrc/guided_update.cu) must reproduce the reference (on a GPU).
"""

import math

import pytest
import torch

from vigface.diffusion.cfg import cfg_combine
from vigface.diffusion.ddim import ddim_sample, ddim_step, ddim_timesteps
from vigface.diffusion.dpm_solver import dpm_solver_pp_sample
from vigface.diffusion.schedule import NoiseSchedule
from vigface.engines.fused_update import (
    cuda_op_available,
    guided_update_,
    guided_update_ref,
    plan_steps,
)
from vigface.errors import VigfaceError

SCHEDULE = NoiseSchedule("cosine", 1000)


def toy_model(x, t, salt):
    """A smooth stand-in for the denoiser: depends on x, t and the row's condition (salt)."""
    a = SCHEDULE.alpha_bar(t, x)
    return torch.tanh(1.3 * a.sqrt() * x + 0.2 * salt + 0.01 * t.float().view(-1, 1, 1, 1) / 1000)


def loop_with_plan(x_T, w, sampler, steps, prediction="x0"):
    """The stepped loop the engines run: [cond; uncond] model rows, then the fused reference update."""
    n = x_T.shape[0]
    x, prev = x_T.clone(), torch.zeros_like(x_T)
    salt = torch.cat([torch.ones(n, 1, 1, 1), torch.zeros(n, 1, 1, 1)])
    for step in plan_steps(SCHEDULE, sampler, steps, prediction):
        t = torch.full((2 * n,), step.t)
        guided_update_(toy_model(torch.cat([x, x]), t, salt), x, prev, w, step, impl="torch")
    return x


def reference_loop(x_T, w, sampler, steps, prediction="x0"):
    n = x_T.shape[0]

    def predict(x, t):
        both = toy_model(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.ones(n), torch.zeros(n)]).view(-1, 1, 1, 1)
        )
        if prediction == "v":
            both = SCHEDULE.x0_from_v(torch.cat([x, x]), torch.cat([t, t]), both)
        return cfg_combine(both[:n], both[n:], w).clamp(-1, 1)

    if sampler == "ddim":
        return ddim_sample(predict, x_T, SCHEDULE, steps)
    return dpm_solver_pp_sample(
        predict, x_T, SCHEDULE, steps, spacing={"dpm++": "time", "dpm++logsnr": "logsnr"}[sampler]
    )


def test_one_ddim_step_is_the_composition_of_eq9_and_ddim_step():
    g = torch.Generator().manual_seed(0)
    n = 3
    model_out = torch.randn(2 * n, 3, 7, 5, generator=g)
    x = torch.randn(n, 3, 7, 5, generator=g)
    w = torch.tensor([0.5, 2.5, 1.0])
    timesteps = ddim_timesteps(1000, 10)
    alphas = SCHEDULE.alphas_cumprod
    for i, step in enumerate(plan_steps(SCHEDULE, "ddim", 10)):
        assert step.t == timesteps[i]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < 10 else 1.0
        x0_ref = cfg_combine(model_out[:n], model_out[n:], w).clamp(-1, 1)
        x_ref = ddim_step(x, x0_ref, alphas[step.t], a_prev)
        x_new, x0 = guided_update_ref(model_out, x, torch.zeros_like(x), w, step)
        assert torch.allclose(x0, x0_ref, atol=1e-6)
        assert torch.allclose(x_new, x_ref, atol=1e-5, rtol=1e-5)


def test_second_order_coefficients_are_the_dpm_solver_formula():
    alphas = SCHEDULE.alphas_cumprod.tolist()
    t = ddim_timesteps(1000, 20).tolist()
    plan = plan_steps(SCHEDULE, "dpm++", 20)

    def lam(a):
        return 0.5 * math.log(a / (1 - a))

    i = 5  # a middle (second-order) step: from t[i] to t[i + 1], history from t[i - 1]
    h = lam(alphas[t[i + 1]]) - lam(alphas[t[i]])
    r = (lam(alphas[t[i]]) - lam(alphas[t[i - 1]])) / h
    alpha_to = math.sqrt(alphas[t[i + 1]])
    # x_new = sigma_to / sigma_from x - alpha_to expm1(-h) ((1 + 1/2r) x0 - 1/2r prev)
    assert plan[i].c_x == pytest.approx(
        math.sqrt(1 - alphas[t[i + 1]]) / math.sqrt(1 - alphas[t[i]]), rel=1e-12
    )
    assert plan[i].c_0 == pytest.approx(-alpha_to * math.expm1(-h) * (1 + 1 / (2 * r)), rel=1e-12)
    assert plan[i].c_p == pytest.approx(alpha_to * math.expm1(-h) / (2 * r), rel=1e-12)
    assert plan[0].c_p == 0 and (plan[-1].c_x, plan[-1].c_0, plan[-1].c_p) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize(
    "sampler,steps",
    [("ddim", 1), ("ddim", 7), ("ddim", 50), ("dpm++", 1), ("dpm++", 2), ("dpm++", 20), ("dpm++logsnr", 2),
     ("dpm++logsnr", 15)],
)  # fmt: skip
def test_whole_loop_matches_the_reference_samplers(sampler, steps, prediction):
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(3, 3, 9, 11, generator=g)
    w = torch.tensor([0.5, 2.5, 0.0])
    got = loop_with_plan(x_T, w, sampler, steps, prediction)
    want = reference_loop(x_T, w, sampler, steps, prediction)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def test_bad_shapes_and_names_are_clear_errors():
    step = plan_steps(SCHEDULE, "ddim", 3)[0]
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(VigfaceError, match="model_out must have shape"):
        guided_update_(torch.zeros(2, 3, 4, 4), x, x.clone(), torch.ones(2), step)
    with pytest.raises(VigfaceError, match="w shape"):
        guided_update_(torch.zeros(4, 3, 4, 4), x, x.clone(), torch.ones(3), step)
    with pytest.raises(VigfaceError, match="impl 'numba'"):
        guided_update_(torch.zeros(4, 3, 4, 4), x, x.clone(), torch.ones(2), step, impl="numba")
    with pytest.raises(VigfaceError, match="sampler 'euler'"):
        plan_steps(SCHEDULE, "euler", 3)


def update_inputs(shape, dtype, seed):
    """Random [cond; uncond] model output (2N rows, `dtype`), float32 x, prev in [-1, 1], w in [0, 2.5]."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    model_out = torch.randn(2 * n, *shape[1:], generator=g).to(dtype)
    x = torch.randn(shape, generator=g)
    prev = torch.randn(shape, generator=g).clamp(-1, 1)
    return model_out, x, prev, torch.linspace(0, 2.5, n)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_op_available(), reason="needs vigface._C with CUDA and a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 112, 112), (5, 3, 37, 41)])
@pytest.mark.parametrize("step_index", [0, 7, 19])
def test_cuda_op_matches_the_reference(dtype, shape, step_index):
    model_out, x, prev, w = update_inputs(shape, dtype, seed=1)
    for prediction in ("x0", "v"):
        step = plan_steps(SCHEDULE, "dpm++", 20, prediction)[step_index]
        x_ref, x0_ref = guided_update_ref(model_out, x, prev, w, step)
        xc, pc = x.cuda(), prev.cuda()
        guided_update_(model_out.cuda(), xc, pc, w.cuda(), step, impl="cuda")
        # float32 arithmetic on identical inputs; only the order of roundings may differ
        assert torch.allclose(xc.cpu(), x_ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(pc.cpu(), x0_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 9, 11), (3, 3, 37, 41)])  # 1,089 / 13,653 elements: ragged blocks
def test_triton_update_matches_the_reference(dtype, shape):
    """The Triton twin of the CUDA op (the interpreter on a CPU, compiled on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_out, x, prev, w = update_inputs(shape, dtype, seed=2)
    for prediction, sampler, index in (("x0", "dpm++", 7), ("v", "dpm++", 19), ("x0", "ddim", 0)):
        step = plan_steps(SCHEDULE, sampler, 20, prediction)[index]
        x_ref, x0_ref = guided_update_ref(model_out, x, prev, w, step)
        xd, pd = x.to(device), prev.to(device)
        guided_update_(model_out.to(device), xd, pd, w.to(device), step, impl="triton")
        assert torch.allclose(xd.cpu(), x_ref, atol=1e-5, rtol=1e-5), (xd.cpu() - x_ref).abs().max()
        assert torch.allclose(pd.cpu(), x0_ref, atol=1e-5, rtol=1e-5)


def test_auto_impl_follows_the_environment(monkeypatch):
    step = plan_steps(SCHEDULE, "dpm++", 5)[2]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled on a GPU, interpreted here
    model_out, x = torch.randn(4, 3, 5, 5, device=device), torch.randn(2, 3, 5, 5, device=device)
    prev, w = torch.zeros_like(x), torch.tensor([0.5, 2.5], device=device)
    monkeypatch.setenv("VIGFACE_GUIDED_UPDATE", "triton")
    x_auto, p_auto = x.clone(), prev.clone()
    guided_update_(model_out, x_auto, p_auto, w, step)  # the interpreter on a CPU
    x_ref, x0_ref = guided_update_ref(model_out, x, prev, w, step)
    assert torch.allclose(x_auto, x_ref, atol=1e-5) and torch.allclose(p_auto, x0_ref, atol=1e-5)
    monkeypatch.setenv("VIGFACE_GUIDED_UPDATE", "opencl")
    with pytest.raises(VigfaceError, match="VIGFACE_GUIDED_UPDATE='opencl'"):
        guided_update_(model_out, x.clone(), prev.clone(), w, step)
