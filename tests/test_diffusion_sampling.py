"""Noise schedules, DDIM and classifier-free guidance against closed forms and slow references."""

import math

import pytest
import torch

from vigface.diffusion.cfg import cfg_combine, guided_x0
from vigface.diffusion.ddim import ddim_sample, ddim_step, ddim_timesteps
from vigface.diffusion.dpm_solver import (
    LOGSNR_START,
    dpm_solver_pp_sample,
    dpm_solver_pp_step,
    dpm_timesteps,
    logsnr_timesteps,
)
from vigface.diffusion.schedule import NoiseSchedule
from vigface.errors import VigfaceError


def test_cosine_schedule_is_the_closed_form():
    T, s = 1000, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    a = NoiseSchedule("cosine", T).alphas_cumprod
    for t in (0, 1, 250, 500, 900):  # the betas telescope: alpha_bar_t = f(t + 1) / f(0)
        assert a[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert (a[1:] < a[:-1]).all() and 0 < a[-1] < 1e-4


def test_linear_schedule_is_the_product_of_alphas():
    a = NoiseSchedule("linear", 1000).alphas_cumprod
    prod = 1.0
    for t in range(1000):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * t / 999)
        if t in (0, 10, 500, 999):
            assert a[t].item() == pytest.approx(prod, rel=1e-9)


def test_forward_process_and_target_conversions_round_trip():
    sched = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = sched.q_sample(x0, t, eps)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.allclose(sched.x0_from_v(x_t, t, sched.v_target(x0, t, eps)), x0, atol=1e-10)
    assert torch.allclose(sched.eps_from_x0(x_t, t, x0), eps, atol=1e-8)


def test_bad_schedule_and_steps_are_clear_errors():
    with pytest.raises(VigfaceError, match="schedule 'sigmoid'"):
        NoiseSchedule("sigmoid")
    with pytest.raises(VigfaceError, match="DDIM steps"):
        ddim_timesteps(1000, 0)
    with pytest.raises(VigfaceError, match="DDIM steps"):
        ddim_timesteps(10, 11)


@pytest.mark.parametrize("steps", [1, 7, 100, 1000])
def test_timesteps_span_the_schedule(steps):
    t = ddim_timesteps(1000, steps)
    assert len(t) == steps and t[0] == 999 and (t[1:] < t[:-1]).all()
    if steps > 1:
        assert t[-1] == 0


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_the_formula_element_by_element(eta):
    g = torch.Generator().manual_seed(1)
    x_t, x0, z = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_prev = 0.31, 0.58
    out = ddim_step(x_t, x0, a_t, a_prev, eta, z)
    for i in range(6):  # DDIM paper eq. 12 with python floats
        eps = (x_t[i].item() - math.sqrt(a_t) * x0[i].item()) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        ref = math.sqrt(a_prev) * x0[i].item() + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z[i].item()
        assert out[i].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 7, 100])
def test_deterministic_ddim_with_an_exact_model_follows_the_forward_process(kind, steps):
    """With the true x0 every eps estimate is the true eps, so each DDIM state is exactly
    q_sample(x0, t, eps) and the sampler ends at x0 (the closed form of eta = 0 DDIM)."""
    sched = NoiseSchedule(kind, 1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    x_T = sched.q_sample(x0, torch.full((3,), 999), eps)
    seen = []

    def oracle(x_t, t):
        seen.append(t[0].item())
        assert torch.allclose(x_t, sched.q_sample(x0, t, eps), atol=1e-9)
        return x0

    out = ddim_sample(oracle, x_T, sched, num_steps=steps)
    assert seen == ddim_timesteps(1000, steps).tolist()
    assert torch.allclose(out, x0, atol=1e-9)


def test_stochastic_ddim_is_deterministic_given_the_seed():
    sched = NoiseSchedule("cosine", 1000)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def model(x_t, t):
        return torch.tanh(x_t) * 0.5

    def run(seed):
        return ddim_sample(model, x_T, sched, 20, eta=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(4), run(4))
    assert not torch.allclose(run(4), run(5))
    assert not torch.allclose(run(4), ddim_sample(model, x_T, sched, 20, eta=0.0))


def test_cfg_combine_is_eq9():
    g = torch.Generator().manual_seed(6)
    c, u = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    assert torch.equal(cfg_combine(c, u, 1.0), c)
    assert torch.equal(cfg_combine(c, u, 0.0), u)
    assert torch.allclose(cfg_combine(c, u, 2.5), c + 1.5 * (c - u))
    w = torch.tensor([0.5, 2.5, 1.0])
    per_sample = cfg_combine(c, u, w)
    for i in range(3):
        assert torch.allclose(per_sample[i], w[i] * c[i] + (1 - w[i]) * u[i])


def test_guided_x0_runs_cond_and_uncond_in_one_batch():
    calls = []

    def denoise(x, t, cond):  # an x0 "model" whose output shows which condition it saw
        calls.append(x.shape[0])
        return x * 0 + cond.sum(1).view(-1, 1, 1, 1)

    x_t = torch.randn(2, 3, 4, 4)
    cond = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = guided_x0(denoise, x_t, torch.tensor([5, 5]), cond, 2.5)
    assert calls == [4]  # one forward of 2N rows
    assert torch.allclose(out[0], torch.full((3, 4, 4), 2.5 * 3.0))  # w * 3 + (1 - w) * 0
    assert torch.allclose(out[1], torch.full((3, 4, 4), 2.5 * 7.0))


def test_dpm_solver_first_order_step_is_ddim():
    g = torch.Generator().manual_seed(7)
    x_t, x0 = (
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    )
    assert torch.allclose(dpm_solver_pp_step(x_t, x0, 0.2, 0.6), ddim_step(x_t, x0, 0.2, 0.6), atol=1e-12)


def test_dpm_solver_2m_update_matches_the_algorithm():
    """Three model calls with changing x0 estimates, checked against Algorithm 2 written out by hand."""
    sched = NoiseSchedule("cosine", 1000)
    a = sched.alphas_cumprod.tolist()
    steps = ddim_timesteps(1000, 3).tolist()  # [999, 500, 0]
    x_T = torch.tensor([0.3, -1.2], dtype=torch.float64)
    estimates = [torch.tensor([0.1, 0.2]), torch.tensor([0.4, -0.3]), torch.tensor([0.5, -0.6])]

    def model(x, t):
        return estimates[[999, 500, 0].index(t[0].item())].double()

    out = dpm_solver_pp_sample(model, x_T, sched, num_steps=3)

    def lam(v):
        return 0.5 * math.log(v / (1 - v))

    # step 1 (first order) 999 -> 500
    h1 = lam(a[500]) - lam(a[999])
    x1 = (
        math.sqrt(1 - a[500]) / math.sqrt(1 - a[999]) * x_T
        - math.sqrt(a[500]) * math.expm1(-h1) * estimates[0]
    )
    # step 2 (second order) 500 -> 0
    h2 = lam(a[0]) - lam(a[500])
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * estimates[1] - 1 / (2 * r) * estimates[0]
    x2 = math.sqrt(1 - a[0]) / math.sqrt(1 - a[500]) * x1 - math.sqrt(a[0]) * math.expm1(-h2) * d
    # step 3: to sigma = 0, first order: the clean estimate itself
    assert steps == [999, 500, 0]
    assert torch.allclose(out, estimates[2].double())
    # and the intermediate state the third call saw is x2
    seen = []
    dpm_solver_pp_sample(lambda x, t: (seen.append(x.clone()), model(x, t))[1], x_T, sched, num_steps=3)
    assert torch.allclose(seen[1], x1.double(), atol=1e-12)
    assert torch.allclose(seen[2], x2.double(), atol=1e-12)


@pytest.mark.parametrize("steps", [2, 15, 30])
def test_logsnr_timesteps_are_evenly_spaced_in_lambda(steps):
    """T - 1, then each timestep the nearest (of all 1000) to its target lambda; targets evenly spaced
    from LOGSNR_START to lambda(0), computed here in NumPy."""
    import numpy as np

    sched = NoiseSchedule("cosine", 1000)
    a = sched.alphas_cumprod.double().numpy()
    lam = 0.5 * np.log(a / (1 - a))
    t = logsnr_timesteps(sched, steps).numpy()
    assert len(t) == steps and t[0] == 999 and t[-1] == 0 and (np.diff(t) < 0).all()
    targets = (
        [lam[0]]
        if steps == 2
        else LOGSNR_START + (lam[0] - LOGSNR_START) * np.arange(steps - 1) / (steps - 2)
    )
    for step, target in zip(t[1:], targets, strict=True):
        assert abs(lam[step] - target) <= np.abs(lam - target).min() + 1e-12
    assert dpm_timesteps(sched, steps, "logsnr").tolist() == t.tolist()
    assert dpm_timesteps(sched, steps, "time").tolist() == ddim_timesteps(1000, steps).tolist()


def test_crowded_logsnr_timesteps_stay_strictly_decreasing():
    """Past ~30 steps several targets are nearest to the same small t: the next free ones are taken."""
    sched = NoiseSchedule("cosine", 1000)
    for steps in (40, 100):
        t = logsnr_timesteps(sched, steps)
        assert len(t) == steps and t[0] == 999 and (t[1:] < t[:-1]).all()
        assert t[-6:].tolist() == [5, 4, 3, 2, 1, 0]
    assert logsnr_timesteps(sched, 1000).tolist() == list(range(999, -1, -1))
    assert logsnr_timesteps(NoiseSchedule("cosine", 10), 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(VigfaceError, match="logsnr steps must be in 2..1000, got 1"):
        logsnr_timesteps(NoiseSchedule("cosine", 1000), 1)
    with pytest.raises(VigfaceError, match="spacing 'karras' is unknown"):
        dpm_timesteps(NoiseSchedule("cosine", 1000), 10, "karras")


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_dpm_solver_with_an_exact_model_ends_at_x0(steps, spacing):
    sched = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = sched.q_sample(x0, torch.full((2,), 999), eps)

    def oracle(x_t, t):
        assert torch.allclose(x_t, sched.q_sample(x0, t, eps), atol=1e-9)
        return x0

    assert torch.allclose(dpm_solver_pp_sample(oracle, x_T, sched, steps, spacing=spacing), x0, atol=1e-9)
