"""Fused margin-softmax cross-entropy (Triton; the interpreter on CPU) against materialised logits.

Ground truth is float64: the (N, C) logits written out with `MarginHead.logits` (the head's own
margin code) and `torch.logsumexp`, independent of the kernels and of `sharded_cross_entropy`.

Tolerances, with the errors measured here (interpreter, scale 64, "ragged" case):
- fp32: per-row loss within 2e-5 * (1 + |loss|) (measured 2.6e-7); gradients within 1e-5 of the
  largest entry (measured 1.1e-6, the same as PyTorch's own fp32 materialised path).
- bf16 inputs: the kernels accumulate in fp32, so their error must stay within 2x the error of the
  same-dtype PyTorch reference (bf16 matmul giving bf16 cosines, then fp32 cross-entropy) plus a
  floor of 2^-8 of the largest entry for the bf16 rounding of the returned gradients. Measured:
  loss 6.8e-8 (reference 2.4e-3), gradients 2.8e-3 / 3.5e-3 (reference 1.0e-2 / 1.1e-2).
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import vigface.kernels.margin_softmax as ms
from gloo_ranks import run_on_gloo_ranks

from vigface.cli.common import config_from_args
from vigface.cli.train_fr import build_parser
from vigface.errors import BackendUnavailableError, VigfaceError
from vigface.fr import prototypes
from vigface.fr.config import FRTrainConfig
from vigface.fr.margin_config import MarginConfig
from vigface.fr.margins import MarginHead
from vigface.fr.prototypes import VirtualPrototypeHead, gather_shards, resolve_head_loss

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or ms.INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- inputs and the float64 truth ---------------------------------------------------------------


def make_inputs(n, c, d, num_real, first_virtual_col, dtype, seed, wrap_rows=(), margin=None):
    """Unit rows and prototypes; labels include 0 and C-1; `wrap_rows` point away from their target."""
    g = torch.Generator().manual_seed(seed)
    weight = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[num_real:] = torch.randint(first_virtual_col, c, (n - num_real,), generator=g)  # virtual ids
    labels[0] = 0 if num_real > 0 else c - 1
    labels[-1] = c - 1
    rows = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    for i in wrap_rows:  # cos(theta) ~ -0.99 < cos(pi - m): the arcface continuation branch
        rows[i] = F.normalize(
            -weight[labels[i]] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64), dim=0
        )
    row_weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5  # d loss / d loss_i
    return rows.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), labels.to(DEVICE), row_weights.to(DEVICE)


def target_cosine(rows, weight, labels):
    return (rows.double() * weight.double()[labels]).sum(1)


def fused_loss(rows, weight, labels, margin, num_real, first_virtual_col):
    return ms.margin_cross_entropy(
        rows,
        weight,
        labels,
        margin.config.scale,
        lambda cos: margin.target_cosine(cos, None),
        num_real_rows=num_real,
        first_virtual_col=first_virtual_col,
    )


def materialised_loss(rows, weight, labels, margin, num_real, first_virtual_col, compute_dtype):
    """What the head's reference path computes: cosines in the inputs' dtype, then `compute_dtype`."""
    cols = torch.arange(weight.shape[0], device=weight.device)
    w_virtual = torch.where((cols >= first_virtual_col)[:, None], weight, weight.detach())
    cos = torch.cat([rows[:num_real] @ weight.T, rows[num_real:].detach() @ w_virtual.T]).to(compute_dtype)
    logits = margin.logits(cos, labels)
    return torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]


def loss_and_grads(fn, rows, weight, row_weights):
    rows = rows.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(rows, weight)
    grads = torch.autograd.grad((loss.double() * row_weights).sum(), [rows, weight])
    return [loss.double(), *(g.double() for g in grads)]


def errors(got, truth):
    """Per-row loss error relative to 1 + |loss|; gradient errors relative to the largest entry."""
    loss_err = ((got[0] - truth[0]).abs() / (1 + truth[0].abs())).max().item()
    return [loss_err] + [
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got[1:], truth[1:], strict=True)
    ]


# ---- the kernels against the truth --------------------------------------------------------------

CASES = {
    # name: (N, C, D, real rows, first virtual column, margin kind, rows in the theta + m > pi branch)
    "ragged-real+virtual": (20, 70, 24, 13, 50, "arcface", (1, 2)),  # nothing a multiple of a block
    "batch1": (1, 45, 16, 1, 0, "cosface", ()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_and_gradients_match_materialised_logits(case, dtype):
    n, c, d, num_real, first_virtual, kind, wrap = CASES[case]
    margin = MarginHead(MarginConfig(kind=kind, scale=64.0)).to(DEVICE)
    rows, weight, labels, row_weights = make_inputs(n, c, d, num_real, first_virtual, dtype, 7, wrap)
    if wrap:
        cos_t = target_cosine(rows, weight, labels)[list(wrap)]
        assert (cos_t < math.cos(math.pi - 0.5)).all()  # the edge case really is exercised
    truth = loss_and_grads(
        lambda r, w: materialised_loss(r, w, labels, margin, num_real, first_virtual, torch.float64),
        rows.double(),
        weight.double(),
        row_weights,
    )
    got = errors(
        loss_and_grads(
            lambda r, w: fused_loss(r, w, labels, margin, num_real, first_virtual), rows, weight, row_weights
        ),
        truth,
    )
    if dtype == torch.float32:
        assert got[0] < 2e-5, f"loss error {got[0]:.2e}"
        assert max(got[1:]) < 1e-5, f"gradient errors {got[1:]}"
    else:
        ref = errors(
            loss_and_grads(
                lambda r, w: materialised_loss(r, w, labels, margin, num_real, first_virtual, torch.float32),
                rows,
                weight,
                row_weights,
            ),
            truth,
        )
        for name, ours, theirs in zip(("loss", "grad rows", "grad weight"), got, ref, strict=True):
            floor = 1e-5 if name == "loss" else 2.0**-8
            assert ours <= 2 * theirs + floor, (
                f"{name}: fused error {ours:.2e} vs bf16 reference {theirs:.2e}"
            )


def test_arcface_theta_plus_m_beyond_pi():
    """Every target angle past pi - m: the loss follows insightface's linear continuation, slope 1."""
    margin = MarginHead(MarginConfig(kind="arcface", scale=64.0, margin=0.5)).to(DEVICE)
    rows, weight, labels, row_weights = make_inputs(4, 33, 16, 4, 0, torch.float32, 3, wrap_rows=range(4))
    cos_t = target_cosine(rows, weight, labels)
    assert (cos_t < math.cos(math.pi - 0.5)).all()
    loss = fused_loss(rows, weight, labels, margin, 4, 0)
    # Direct check of the value: LSE over s*cos with the target's logit s*(cos - m sin m).
    z = 64.0 * (rows.double() @ weight.double().T)
    t = 64.0 * (cos_t.double() - 0.5 * math.sin(0.5))
    z[torch.arange(4), labels] = t
    assert torch.allclose(loss.double(), torch.logsumexp(z, 1) - t, rtol=1e-5, atol=1e-5)
    truth = loss_and_grads(
        lambda r, w: materialised_loss(r, w, labels, margin, 4, 0, torch.float64),
        rows.double(),
        weight.double(),
        row_weights,
    )
    got = errors(
        loss_and_grads(lambda r, w: fused_loss(r, w, labels, margin, 4, 0), rows, weight, row_weights), truth
    )
    assert got[0] < 2e-5 and max(got[1:]) < 1e-5, got


def test_sharded_partials_combine_like_one_matrix():
    """Partial FC in one process: W in 4 uneven shards (one empty), local LSE partials combined."""
    n, c, d, num_real, first_virtual, s = 12, 53, 20, 8, 40, 32.0
    rows, weight, labels, row_weights = make_inputs(n, c, d, num_real, first_virtual, torch.float32, 5)
    g = torch.Generator().manual_seed(6)
    target_logit = (s * (torch.rand(n, generator=g) * 2 - 1)).to(DEVICE)  # any target logit
    bounds = [(0, 20), (20, 21), (21, 21), (21, 53)]
    tuning = ms.INTERPRETER_TUNING if DEVICE.type == "cpu" else ms.GPU_TUNING

    def local(lo, hi):
        inside = (labels >= lo) & (labels < hi)
        return torch.where(inside, labels - lo, -1), min(max(first_virtual - lo, 0), hi - lo)

    parts = [
        ms.lse_partials(rows, weight[lo:hi], local(lo, hi)[0], target_logit, s, tuning) for lo, hi in bounds
    ]
    lse = ms.combine_lse(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    grad_lse = row_weights.float()
    grads = []
    for lo, hi in bounds:
        target, first_col = local(lo, hi)
        grads.append(
            ms.lse_backward(rows, weight[lo:hi], target, lse, grad_lse, s, num_real, first_col, tuning)
        )
    grad_rows = sum(gr for gr, _ in grads)
    grad_weight = torch.cat([gw for _, gw in grads])
    grad_target = grad_lse * torch.exp(target_logit - lse)

    # Truth: the whole (N, C) float64 logit matrix with the target's logit put in, under autograd.
    r = rows.double().requires_grad_()
    w = weight.double().requires_grad_()
    t = target_logit.double().requires_grad_()
    cols = torch.arange(c, device=DEVICE)
    w_virtual = torch.where((cols >= first_virtual)[:, None], w, w.detach())
    z = s * torch.cat([r[:num_real] @ w.T, r[num_real:].detach() @ w_virtual.T])
    z = torch.where(cols[None, :] == labels[:, None], t[:, None], z)
    lse_truth = torch.logsumexp(z, 1)
    truth = torch.autograd.grad((lse_truth * row_weights).sum(), [r, w, t])
    assert torch.allclose(lse.double(), lse_truth.detach(), rtol=1e-6, atol=1e-5)
    for got, want in zip((grad_rows, grad_weight, grad_target), truth, strict=True):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.equal(grad_rows[num_real:], torch.zeros_like(grad_rows[num_real:]))  # virtual: constants


# ---- the VIGFace head: fused equals reference ---------------------------------------------------


def head_step(kind: str, loss: str, **head_kwargs) -> dict:
    """One training step of a 40 + 12 class head on 10 rows; loss, stats and both gradients."""
    head = VirtualPrototypeHead(
        40, 12, 24, MarginConfig(kind=kind, scale=32.0), seed=1, loss=loss, **head_kwargs
    ).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    emb = (torch.randn(10, 24, generator=g) * 3).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 40, (10,), generator=g).to(DEVICE)
    labels[0], labels[-1] = 0, 39
    total, stats = head(emb, labels, step=0)
    grad_emb, grad_w = torch.autograd.grad(total, [emb, head.weight])
    return {"loss": total, **stats, "grad_emb": grad_emb, "grad_weight": grad_w}


@pytest.mark.parametrize("kind", ["arcface", "cosface", "combined", "adaface"])
def test_head_fused_equals_reference(kind):
    fused, ref = head_step(kind, "fused"), head_step(kind, "reference")
    for key in ("loss", "loss_real", "loss_virtual", "sigma_mean"):
        assert fused[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-6), key
    for key in ("grad_emb", "grad_weight"):
        assert (fused[key] - ref[key]).abs().max() <= 1e-5 * ref[key].abs().max(), key
    # Fig. 2 holds in the fused path too: virtual rows give W_R nothing, so without them W_R's
    # gradient is unchanged to the last bit of tolerance.
    real_only = head_step(kind, "fused", virtual_embeddings=False)
    assert torch.allclose(fused["grad_weight"][:40], real_only["grad_weight"][:40], atol=1e-6)
    assert torch.allclose(fused["grad_emb"], real_only["grad_emb"], atol=1e-6)


N_REAL, N_VIRTUAL, DIM, LOCAL_BATCH = 23, 9, 16, 5  # 32 classes: shards of 16 (rank 1 is all virtual but 7)


def _gloo_step(rank: int, world_size: int, loss: str) -> dict:
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(2 * LOCAL_BATCH, DIM, generator=g) * 2
    labels = torch.randint(0, N_REAL, (2 * LOCAL_BATCH,), generator=g)
    labels[0], labels[-1] = 0, N_REAL - 1
    if world_size > 1:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        emb, labels = emb[rows], labels[rows]
    head = VirtualPrototypeHead(
        N_REAL, N_VIRTUAL, DIM, MarginConfig(kind="arcface", scale=16.0), seed=5, loss=loss
    )
    emb = emb.clone().requires_grad_()
    total, _ = head(emb, labels, step=0)
    total.backward()
    return {"loss": total.item(), "grad_emb": emb.grad, "grad_weight": gather_shards(head.weight.grad, 32)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU processes; the GPU runs the kernels natively")
def test_two_gloo_ranks_fused_match_one_process_reference(tmp_path):
    """All-reduce of max / sum over 2 processes: the fused head equals the one-process reference."""
    single = _gloo_step(0, 1, "reference")
    for rank, got in enumerate(run_on_gloo_ranks(_gloo_step, "fused", out_dir=tmp_path)):
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        # Each rank's rows get the gradient of the global loss (times W: DDP averages it back).
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert torch.allclose(got["grad_emb"] / 2, single["grad_emb"][rows], atol=1e-5, rtol=1e-4)
        assert torch.allclose(got["grad_weight"], single["grad_weight"], atol=1e-6, rtol=1e-4)


# ---- choosing the backend and bad input ---------------------------------------------------------


def test_auto_picks_fused_only_when_the_reference_logits_would_crowd_the_gpu(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(prototypes, "device_memory_bytes", lambda device: 80 * 2**30)
    monkeypatch.setattr(ms, "fused_unavailable_reason", lambda device: None)
    # 1024 rows (512 real + 512 virtual) x 100k classes: 3.3 x 0.41 GB = 1.35 GB of 80 GiB
    assert resolve_head_loss("auto", gpu, 1024, 100_000) == "reference"
    # 1024 x 4M classes: 54 GB > 80 GiB / 8
    assert resolve_head_loss("auto", gpu, 1024, 4_000_000) == "fused"
    # the boundary: the share of memory, computed by hand
    limit_classes = int(80 * 2**30 / 8 / (3.3 * 1024 * 4))
    assert resolve_head_loss("auto", gpu, 1024, limit_classes) == "reference"
    assert resolve_head_loss("auto", gpu, 1024, limit_classes + 2) == "fused"
    assert resolve_head_loss("auto", torch.device("cpu"), 1024, 4_000_000) == "reference"
    assert resolve_head_loss("reference", gpu, 1024, 4_000_000) == "reference"
    # without Triton the reference is the only way left
    monkeypatch.setattr(ms, "fused_unavailable_reason", lambda device: "no kernels here")
    assert resolve_head_loss("auto", gpu, 1024, 4_000_000) == "reference"
    with pytest.raises(VigfaceError, match="loss 'fast' is unknown"):
        resolve_head_loss("fast", torch.device("cpu"))


def test_fused_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ms, "INTERPRETED", False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1.*use --loss reference"):
        resolve_head_loss("fused", torch.device("cpu"))
    rows, weight, labels, _ = make_inputs(3, 5, 4, 3, 0, torch.float32, 1)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        ms.margin_cross_entropy(rows.cpu(), weight.cpu(), labels.cpu(), 1.0)


def test_loss_flag_reaches_the_config():
    args = build_parser().parse_args(["--data", "x.rec", "--out", "o", "--loss", "fused"])
    config, _ = config_from_args(FRTrainConfig, args, "vigface-train-fr", ("data", "out"))
    assert config.loss == "fused"
    assert FRTrainConfig().loss == "auto"
    with pytest.raises(VigfaceError, match="loss 'fast' is unknown"):
        FRTrainConfig(loss="fast")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--loss", "fast"])


def test_bad_inputs_name_the_argument():
    rows, weight, labels, _ = make_inputs(3, 5, 4, 3, 0, torch.float32, 1)
    with pytest.raises(VigfaceError, match="weight has width 6"):
        ms.margin_cross_entropy(rows, torch.zeros(5, 6, device=DEVICE), labels, 1.0)
    with pytest.raises(VigfaceError, match="share one of"):
        ms.margin_cross_entropy(rows, weight.double(), labels, 1.0)
    with pytest.raises(VigfaceError, match="target_index must be"):
        ms.margin_cross_entropy(rows, weight, labels.float(), 1.0)
    with pytest.raises(VigfaceError, match="num_real_rows must be in"):
        ms.margin_cross_entropy(rows, weight, labels, 1.0, num_real_rows=4)
    with pytest.raises(VigfaceError, match="scale must be positive"):
        ms.margin_cross_entropy(rows, weight, labels, 0.0)
    with pytest.raises(VigfaceError, match="impl 'fast'"):
        ms.margin_cross_entropy(rows, weight, labels, 1.0, impl="fast")
    with pytest.raises(VigfaceError, match="head loss 'fast'"):
        VirtualPrototypeHead(4, 0, 4, MarginConfig(), loss="fast")


@pytest.mark.slow  # ~45 s on 2 CPU cores: the toy dataset, two short runs, the head in the interpreter
def test_trainer_with_fused_loss_follows_the_reference_run(small_toy, tmp_path):
    """`--loss fused` reaches the head: three trainer steps log the reference run's losses."""
    from vigface.fr.trainer import train_fr

    tiny = dict(
        arch="iresnet18", width=8, input_size=32, embedding_dim=32, num_virtual=10, batch_size=16,
        max_steps=3, scale=16.0, lr=0.05, workers=0, log_every=1, save_every=100, progress=False,
    )  # fmt: skip
    logged = {}
    for loss in ("fused", "reference"):
        out = tmp_path / loss
        train_fr(FRTrainConfig(data=str(small_toy / "train.rec"), out=str(out), loss=loss, **tiny))
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged[loss] = [r[k] for r in lines if "loss" in r for k in ("loss_real", "loss_virtual")]
        assert json.loads((out / "backbone.json").read_text())["head_loss"] == loss
    assert len(logged["fused"]) == 6
    assert logged["fused"] == pytest.approx(logged["reference"], rel=1e-4, abs=2e-5)  # logged to 5 digits


COMPILE_FOR_GPU = """
import sys
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import vigface.kernels.margin_softmax as ms

common = dict(rows_ptr="*{d}", weight_ptr="*{d}", target_ptr="*i64", N="i32", C="i32", D="i32",
              stride_r="i32", stride_w="i32", scale="fp32", lse_ptr="*fp32", grad_ptr="*fp32",
              target_logit_ptr="*fp32", max_out_ptr="*fp32", sum_out_ptr="*fp32", grad_w_ptr="*fp32",
              grad_e_ptr="*fp32", cols_per_split="i32", num_real_rows="i32", first_virtual_col="i32")
# the largest shared memory one block may use: A100 163 KiB, H100 / H200 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
for arch in (80, 90):
    for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "tf32")):
        t = ms.gpu_tuning((arch // 10, arch % 10), precision)  # as default_tuning picks
        kernels = [
            (ms._lse_forward_kernel, dict(BLOCK_C=t.block_c)),
            (ms._grad_weight_kernel, dict(BLOCK_C=t.block_c_grad_w, BLOCK_DW=t.block_d_grad_w)),
            (ms._grad_rows_kernel, dict(BLOCK_C=t.block_c, BLOCK_DE=t.block_d_grad_e)),
        ]
        for fn, blocks in kernels:
            consts = dict(BLOCK_N=t.block_n, BLOCK_D=t.block_d, PRECISION=precision, WIDEN=False, **blocks)
            sig = {a: "constexpr" if a in consts else common[a].format(d=dtype) for a in fn.arg_names}
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            kernel = compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": t.num_warps})
            assert kernel.asm["cubin"], fn
            shared = kernel.metadata.shared
            assert shared <= SHARED_LIMIT[arch], (arch, dtype, precision, fn.__name__, shared)
            print(arch, dtype, precision, fn.__name__, "shared", shared)
"""


@pytest.mark.slow  # ~6 min on 2 CPU cores the first time (ptxas, 18 variants); Triton caches them
def test_kernels_compile_for_sm80_and_sm90():
    """Not the interpreter: the pinned GPU tiles lower to cubin for A100 and H100 within each one's
    shared memory (no GPU needed)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("shared") == 18
