"""Margin heads and the VIGFace head against hand-written references (paper eqs. 3, 5-7)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vigface.errors import VigfaceError
from vigface.fr.distributed import shard_bounds, sharded_cross_entropy
from vigface.fr.margin_config import MARGINS, MarginConfig
from vigface.fr.margins import MarginHead
from vigface.fr.prototypes import VirtualPrototypeHead


def reference_margin_loss(
    emb, labels, weight, kind, s, m, norm_mean=None, norm_std=None, h=0.333, m1=1.0, m3=0.2
):
    """Mean margin-softmax loss, one row at a time with the math module (independent of vigface)."""
    total = 0.0
    for i in range(len(emb)):
        e = [float(v) for v in emb[i]]
        en = math.sqrt(sum(v * v for v in e))
        logits = []
        for j in range(len(weight)):
            w = [float(v) for v in weight[j]]
            wn = math.sqrt(sum(v * v for v in w))
            c = sum(a * b for a, b in zip(e, w, strict=True)) / (en * wn)
            if j == int(labels[i]):
                if kind == "cosface":
                    c = c - m
                elif kind == "arcface":
                    theta = math.acos(max(-1.0, min(1.0, c)))
                    c = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
                elif kind == "combined":  # beyond pi: continue as cos(theta), shifted to meet -1 - m3
                    theta = math.acos(max(-1.0, min(1.0, c)))
                    theta_0 = (math.pi - m) / m1
                    c = math.cos(m1 * theta + m) - m3 if theta <= theta_0 else c - math.cos(theta_0) - 1 - m3
                else:  # adaface
                    g = (min(max(en, 0.001), 100) - norm_mean) / (norm_std + 1e-3) * h
                    g = max(-1.0, min(1.0, g))
                    theta = math.acos(max(-1 + 1e-3, min(1 - 1e-3, c)))
                    theta = max(1e-3, min(math.pi - 1e-3, theta - m * g))
                    c = math.cos(theta) - (m + m * g)
            logits.append(s * c)
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        total += lse - logits[int(labels[i])]
    return total / len(emb)


@pytest.mark.parametrize(
    "kind,s,m",
    [("arcface", 64.0, 0.5), ("arcface", 30.0, 0.5), ("cosface", 30.0, 0.35), ("combined", 30.0, 0.3)],
)
def test_margin_loss_matches_reference(kind, s, m):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(7, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,), generator=g)
    head = MarginHead(MarginConfig(kind=kind, scale=s, margin=m))
    cos = F.normalize(emb) @ F.normalize(weight).T
    loss = F.cross_entropy(head.logits(cos, labels), labels)
    assert loss.item() == pytest.approx(reference_margin_loss(emb, labels, weight, kind, s, m), rel=1e-9)


def test_arcface_wraparound_branch():
    """theta + m > pi: the logit continues linearly instead of rising again."""
    head = MarginHead(MarginConfig(kind="arcface", scale=1.0, margin=0.5))
    cos = torch.tensor([[-0.99, 0.2]], dtype=torch.float64)
    out = head.logits(cos, torch.tensor([0]))
    assert out[0, 0].item() == pytest.approx(-0.99 - 0.5 * math.sin(0.5))
    assert out[0, 1].item() == 0.2


def test_combined_margin_is_continuous_and_falling_beyond_pi():
    """m1 theta + m2 > pi: a cosine shifted to meet the curve at theta_0, so the logit keeps falling."""
    m1, m2, m3 = 1.2, 0.4, 0.1
    head = MarginHead(MarginConfig(kind="combined", scale=1.0, margin=m2, combined_m1=m1, combined_m3=m3))
    theta_0 = (math.pi - m2) / m1
    thetas = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    out = head.target_cosine(thetas.cos(), None)
    assert torch.all(out[1:] < out[:-1])  # strictly falling over [0, pi]
    near = torch.tensor([theta_0 - 1e-7, theta_0 + 1e-7], dtype=torch.float64)
    edge = head.target_cosine(near.cos(), None)
    assert edge[0].item() == pytest.approx(-1 - m3, abs=1e-6) and edge[1].item() == pytest.approx(
        -1 - m3, abs=1e-6
    )
    # m1 = 1, m3 = 0 is ArcFace inside the range
    arc = MarginHead(MarginConfig(kind="arcface", scale=1.0, margin=0.5))
    comb = MarginHead(MarginConfig(kind="combined", scale=1.0, margin=0.5, combined_m1=1.0, combined_m3=0.0))
    # (up to 0.999: at cos = 1 ArcFace's sin is clamped to sqrt(1e-9), a 1.5e-5 difference)
    inside = torch.linspace(-0.8, 0.999, 50, dtype=torch.float64)
    assert torch.allclose(arc.target_cosine(inside, None), comb.target_cosine(inside, None), atol=1e-9)


def test_adaface_matches_reference_and_updates_norm_stats():
    g = torch.Generator().manual_seed(2)
    emb = (
        torch.randn(9, 6, generator=g, dtype=torch.float64)
        * torch.linspace(0.5, 30, 9, dtype=torch.float64)[:, None]
    )
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (9,), generator=g)
    head = MarginHead(MarginConfig(kind="adaface", scale=64.0, margin=0.4)).double()
    norms = emb.norm(dim=1)
    mean = 0.01 * norms.mean().item() + 0.99 * 20.0
    std = 0.01 * norms.std().item() + 0.99 * 100.0
    scaler = head.adaface_scaler(norms, update=True)
    assert head.norm_mean.item() == pytest.approx(mean) and head.norm_std.item() == pytest.approx(std)
    cos = F.normalize(emb) @ F.normalize(weight).T
    loss = F.cross_entropy(head.logits(cos, labels, scaler), labels)
    ref = reference_margin_loss(emb, labels, weight, "adaface", 64.0, 0.4, mean, std)
    assert loss.item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kind", MARGINS)
def test_margin_gradient_is_finite_at_cosine_one_and_minus_one(kind):
    """An embedding exactly on (or opposite) its prototype: finite logits and gradients."""
    head = MarginHead(MarginConfig(kind=kind, scale=16.0))
    cos = torch.tensor([[1.0, 0.3], [-1.0, 0.2], [0.5, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0])
    scaler = head.adaface_scaler(torch.tensor([5.0, 20.0, 40.0]), update=True) if kind == "adaface" else None
    F.cross_entropy(head.logits(cos, labels, scaler), labels).backward()
    assert torch.isfinite(cos.grad).all(), cos.grad


def test_adaface_batch_of_one_keeps_its_norm_statistics():
    """One row has no std: the EMA is left as it was rather than turned NaN for the rest of the run."""
    head = MarginHead(MarginConfig(kind="adaface"))
    g = head.adaface_scaler(torch.tensor([12.0]), update=True)
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0
    assert g.item() == pytest.approx((12.0 - 20.0) / (100.0 + 1e-3) * 0.333)
    head.adaface_scaler(torch.tensor([12.0, 30.0]), update=True)
    assert math.isfinite(head.norm_std.item()) and head.norm_std.item() < 100.0


def test_margin_config_errors():
    with pytest.raises(VigfaceError, match="margin kind 'sphere'"):
        MarginConfig(kind="sphere")
    for scale in (0, -1.0, float("inf"), float("nan")):  # inf / NaN started a run that learnt nothing
        with pytest.raises(VigfaceError, match="scale must be a finite positive number"):
            MarginConfig(scale=scale)
    for m in (-0.1, 1.6, float("nan")):
        with pytest.raises(VigfaceError, match="margin m must be in"):
            MarginConfig(margin=m)
    with pytest.raises(VigfaceError, match="combined margin needs m1 > 0"):
        MarginConfig(kind="combined", combined_m1=float("inf"))


def test_sharded_cross_entropy_single_rank_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (6,), generator=g)
    ours = sharded_cross_entropy(logits, labels)
    ref = F.cross_entropy(logits.float(), labels, reduction="none")
    assert torch.allclose(ours, ref, atol=1e-6)
    (gw,) = torch.autograd.grad(ours.sum() * 1.0, logits)
    logits_ref = logits.detach().float().requires_grad_()
    F.cross_entropy(logits_ref, labels, reduction="sum").backward()
    assert torch.allclose(gw.float(), logits_ref.grad, atol=1e-6)


def test_shard_bounds_cover_all_classes():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def _head(n=20, k=8, d=16, virtual=True, kind="arcface", seed=0):
    return VirtualPrototypeHead(
        n, k, d, MarginConfig(kind=kind, scale=30.0), virtual_embeddings=virtual, seed=seed
    )


def test_real_loss_matches_reference_and_virtual_rows_follow_eq5():
    head = _head()
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(5, 16, generator=g)
    labels = torch.randint(0, 20, (5,), generator=g)
    loss, stats = head(emb, labels, step=3)
    ref_real = reference_margin_loss(
        emb.double(), labels, head.weight.detach().double(), "arcface", 30.0, 0.5
    )
    assert stats["loss_real"].item() == pytest.approx(ref_real, rel=1e-5)
    # The virtual part rebuilt by hand: f' = w_v[j] + N(0,1) sigma on the unit sphere, labels n + j.
    ids, noise = head.draw_virtual(3, 5)
    w_hat = F.normalize(head.weight.detach().double(), dim=1)
    f_v = w_hat[20 + ids] + noise.double() * head.sigma.double()
    ref_virtual = reference_margin_loss(f_v, 20 + ids, w_hat, "arcface", 30.0, 0.5)
    assert stats["loss_virtual"].item() == pytest.approx(ref_virtual, rel=1e-5)
    assert loss.item() == pytest.approx(ref_real + ref_virtual, rel=1e-5)


def test_sigma_follows_eq6_and_ema_eq7():
    head = _head(virtual=True)
    g = torch.Generator().manual_seed(5)
    sigmas = []
    for step in range(3):
        emb = torch.randn(6, 16, generator=g)
        labels = torch.randint(0, 20, (6,), generator=g)
        f_hat = F.normalize(emb.double(), dim=1)
        w_hat = F.normalize(head.weight.detach().double(), dim=1)
        batch_sigma = ((f_hat - w_hat[labels]) ** 2).mean(0).sqrt()  # eq. 6
        expected = batch_sigma if step == 0 else 0.9 * batch_sigma + 0.1 * sigmas[-1]  # eq. 7
        head(emb, labels, step=step)
        assert torch.allclose(head.sigma.double(), expected, atol=1e-6)
        sigmas.append(expected)
    assert head.sigma_steps.item() == 3
    head.eval()  # evaluation does not move the EMA
    head(torch.randn(6, 16, generator=g), torch.randint(0, 20, (6,), generator=g), step=9)
    assert torch.allclose(head.sigma.double(), sigmas[-1], atol=1e-6)


def test_virtual_gradient_reaches_virtual_prototypes_only():
    """Autograd check of Fig. 2: the virtual loss gives the backbone and W_R exactly zero gradient."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(10, 16)
    head = _head()
    x = torch.randn(8, 10)
    labels = torch.randint(0, 20, (8,))
    head(backbone(x), labels, step=0)  # one step so sigma is non-zero
    # The same head without the virtual part gives the real part's gradient alone; the difference
    # is what the virtual rows contribute.
    real_only = _head(virtual=False)
    real_only.load_state_dict(head.state_dict())
    loss_all, _ = head(backbone(x), labels, step=1)
    loss_real, _ = real_only(backbone(x), labels, step=1)
    g_all = torch.autograd.grad(loss_all, [backbone.weight, backbone.bias, head.weight])
    g_real = torch.autograd.grad(loss_real, [backbone.weight, backbone.bias, real_only.weight])
    virtual_grad = [a - b for a, b in zip(g_all, g_real, strict=True)]
    assert torch.equal(virtual_grad[0], torch.zeros_like(virtual_grad[0]))  # backbone weight
    assert torch.equal(virtual_grad[1], torch.zeros_like(virtual_grad[1]))  # backbone bias
    assert torch.equal(virtual_grad[2][:20], torch.zeros_like(virtual_grad[2][:20]))  # W_R
    assert virtual_grad[2][20:].abs().sum() > 0  # W_V learns from the virtual rows


def test_ablation_has_no_virtual_term():
    head = _head(virtual=False)
    emb, labels = torch.randn(4, 16), torch.randint(0, 20, (4,))
    loss, stats = head(emb, labels, step=0)
    assert "loss_virtual" not in stats and loss.item() == stats["loss_real"].item()
    assert head.sigma_steps.item() == 0
