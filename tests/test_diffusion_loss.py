"""Paper eq. 8: pixel term + identity term through a frozen FR backbone, with CFG condition dropout."""

import types

import pytest
import torch
import torch.nn.functional as F

from vigface.diffusion.loss import VirtualRows, diffusion_loss, identity_features, spread_around
from vigface.diffusion.schedule import NoiseSchedule


class HalfDenoiser(torch.nn.Module):
    """x0 estimate = a * x_t + cond-dependent offset; records what it was given."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.seen = {}

    def forward(self, x_t, t, cond, pose):
        self.seen = {"cond": cond.clone(), "pose": pose.clone(), "t": t.clone()}
        return self.a * x_t + cond[:, :1, None, None] * 0.1


class FlatFR(torch.nn.Module):
    def __init__(self, size, dim=6):
        super().__init__()
        self.config = types.SimpleNamespace(input_size=size)
        self.fc = torch.nn.Linear(3 * size * size, dim)
        self.requires_grad_(False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.randn(4, 16, generator=g)
    pose = torch.rand(4, 5, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 100, 500, 999])
    return x0, cond, pose, noise, t


def test_pixel_loss_and_condition_dropout():
    sched = NoiseSchedule("cosine", 1000)
    x0, cond, pose, noise, t = _batch()
    model = HalfDenoiser()
    drop = torch.tensor([False, True, False, True])
    loss, parts = diffusion_loss(model, sched, x0, cond, pose, t=t, noise=noise, drop=drop)
    kept = (~drop).float()
    assert torch.equal(model.seen["cond"], cond * kept[:, None])
    assert torch.equal(model.seen["pose"], pose * kept.view(-1, 1, 1, 1))
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = 0.5 * x_t + (cond * kept[:, None])[:, :1, None, None] * 0.1
    assert loss.item() == pytest.approx(((x0_hat - x0) ** 2).mean().item(), rel=1e-5)
    assert "identity" not in parts


def test_v_prediction_target():
    sched = NoiseSchedule("cosine", 1000)
    x0, cond, pose, noise, t = _batch(1)
    model = HalfDenoiser()
    loss, _ = diffusion_loss(
        model, sched, x0, cond, pose, t=t, noise=noise, drop=torch.zeros(4, dtype=torch.bool), prediction="v"
    )
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    out = 0.5 * x_t + cond[:, :1, None, None] * 0.1
    assert loss.item() == pytest.approx(((out - v) ** 2).mean().item(), rel=1e-5)


def test_identity_term_is_two_minus_two_cosine_and_trains_only_the_denoiser():
    sched = NoiseSchedule("cosine", 1000)
    x0, cond, pose, noise, t = _batch(2)
    model, fr = HalfDenoiser(), FlatFR(8)
    drop = torch.zeros(4, dtype=torch.bool)
    loss, parts = diffusion_loss(
        model, sched, x0, cond, pose, t=t, noise=noise, drop=drop, fr_backbone=fr, identity_weight=0.3
    )
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x0_hat = 0.5 * (a.sqrt() * x0 + (1 - a).sqrt() * noise) + cond[:, :1, None, None] * 0.1
    cos = F.cosine_similarity(fr(x0_hat), fr(x0))
    assert parts["identity"].item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(parts["pixel"].item() + 0.3 * parts["identity"].item(), rel=1e-5)
    loss.backward()
    assert model.a.grad is not None and model.a.grad.abs() > 0
    assert fr.fc.weight.grad is None


def test_identity_features_resize_to_the_backbone_input():
    sched = NoiseSchedule("cosine", 1000)
    x0, cond, pose, noise, t = _batch(3)
    fr = FlatFR(12)  # the denoiser works at 8x8, the FR model at 12x12
    loss, parts = diffusion_loss(
        HalfDenoiser(),
        sched,
        x0,
        cond,
        pose,
        t=t,
        noise=noise,
        drop=torch.zeros(4, dtype=torch.bool),
        fr_backbone=fr,
        identity_weight=1.0,
    )
    assert torch.isfinite(loss) and parts["identity"] > 0


def test_identity_features_shrink_by_area_like_stage_1_and_embedding():
    """f(x0) of a stored image larger than the FR input: the 2x2 box average (what stage 1 trained
    on and what vigface.fr.embed feeds), not a bilinear filter, so f(x0) lies where the prototypes
    were learned."""
    fr = FlatFR(4)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    boxed = x.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # by hand
    expected = torch.nn.functional.normalize(fr(boxed), dim=1)
    torch.testing.assert_close(identity_features(fr, x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_virtual_rows_share_the_forward_and_add_their_own_term(prediction):
    sched = NoiseSchedule("cosine", 1000)
    x0, cond, pose, noise, t = _batch(4)
    fr, drop = FlatFR(8, dim=16), torch.tensor([False, True, False, False])  # embeddings are conditions
    g = torch.Generator().manual_seed(5)
    rows = VirtualRows(
        x_t=torch.randn(2, 3, 8, 8, generator=g),
        t=torch.tensor([600, 950]),
        cond=F.normalize(torch.randn(2, 16, generator=g), dim=1),
        pose=torch.rand(2, 5, 8, 8, generator=g),
    )
    kwargs = dict(t=t, noise=noise, drop=drop, fr_backbone=fr, identity_weight=0.3, prediction=prediction)
    plain_loss, plain = diffusion_loss(HalfDenoiser(), sched, x0, cond, pose, **kwargs)
    model = HalfDenoiser()
    loss, parts = diffusion_loss(model, sched, x0, cond, pose, virtual=rows, virtual_weight=0.7, **kwargs)
    # one forward for all rows: the real ones first, then the virtual ones as given
    assert model.seen["cond"].shape[0] == 6 and torch.equal(model.seen["cond"][4:], rows.cond)
    assert torch.equal(model.seen["pose"][4:], rows.pose) and torch.equal(model.seen["t"][4:], rows.t)
    # the real rows' terms are untouched
    assert parts["pixel"].item() == pytest.approx(plain["pixel"].item(), rel=1e-6)
    assert parts["identity"].item() == pytest.approx(plain["identity"].item(), rel=1e-6)
    # the virtual term, by hand: |f(x0^) - c_v|^2 of the unit embedding, x0^ from the raw output
    out = 0.5 * rows.x_t + rows.cond[:, :1, None, None] * 0.1
    if prediction == "v":
        a = sched.alphas_cumprod[rows.t].float().view(-1, 1, 1, 1)
        out = a.sqrt() * rows.x_t - (1 - a).sqrt() * out
    expected = (F.normalize(fr(out), dim=1) - rows.cond).pow(2).sum(1).mean()
    assert parts["virtual"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain_loss.item() + 0.7 * expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="fr_backbone"):
        diffusion_loss(HalfDenoiser(), sched, x0, cond, pose, t=t, noise=noise, drop=drop, virtual=rows)


def test_spread_around_puts_unit_vectors_at_the_asked_cosine():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(500, 128, generator=g), dim=1)
    noise = torch.randn(500, 128, generator=g)
    for cos in (0.3, 0.6, 0.9):
        out = spread_around(protos, noise, torch.tensor(cos))
        assert torch.allclose(out.norm(dim=1), torch.ones(500), atol=1e-5)
        assert (out * protos).sum(1).mean().item() == pytest.approx(cos, abs=0.02)
    assert torch.allclose(spread_around(protos, noise, 1.0), protos, atol=1e-6)
