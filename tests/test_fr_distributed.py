"""Partial FC over 2 gloo processes equals one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_gloo_ranks

from vigface.fr.margin_config import MarginConfig
from vigface.fr.prototypes import VirtualPrototypeHead

N_REAL, N_VIRTUAL, DIM, LOCAL_BATCH = 13, 6, 8, 5  # 19 classes: shards of 10 and 9 rows


def _inputs():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2 * LOCAL_BATCH, 12, generator=g)
    labels = torch.randint(0, N_REAL, (2 * LOCAL_BATCH,), generator=g)
    backbone = torch.nn.Linear(12, DIM)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(DIM, 12, generator=g))
        backbone.bias.copy_(torch.randn(DIM, generator=g))
    return x, labels, backbone


def _run(rank: int, world_size: int, kind: str) -> dict:
    """Two steps of head + backbone; returns loss, grads and the full prototype matrix."""
    x, labels, backbone = _inputs()
    head = VirtualPrototypeHead(N_REAL, N_VIRTUAL, DIM, MarginConfig(kind=kind, scale=16.0), seed=5)
    if world_size > 1:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        x, labels = x[rows], labels[rows]
    opt = torch.optim.SGD([*backbone.parameters(), head.weight], lr=0.5, momentum=0.9)
    losses = []
    for step in range(2):
        opt.zero_grad()
        loss, _ = head(backbone(x), labels, step)
        loss.backward()
        grad = backbone.weight.grad.clone()
        if world_size > 1:  # what DDP does: average the backbone gradient over ranks
            for p in backbone.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            grad = backbone.weight.grad.clone()
        opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "backbone_grad": grad,
        "backbone": backbone.weight.detach().clone(),
        "prototypes": head.full_weight().clone(),
        "sigma": head.sigma.clone(),
        "adaface_mean": head.margin.norm_mean.clone(),
    }


@pytest.mark.parametrize("kind", ["arcface", "adaface"])
def test_two_gloo_ranks_match_one_process(tmp_path, kind):
    single = _run(0, 1, kind)
    for got in run_on_gloo_ranks(_run, kind, out_dir=tmp_path):
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert torch.allclose(got["backbone_grad"], single["backbone_grad"], atol=1e-5, rtol=1e-4)
        assert torch.allclose(got["backbone"], single["backbone"], atol=1e-5, rtol=1e-4)
        assert got["prototypes"].shape == (N_REAL + N_VIRTUAL, DIM)
        assert torch.allclose(got["prototypes"], single["prototypes"], atol=1e-6, rtol=1e-4)
        assert torch.allclose(got["sigma"], single["sigma"], atol=1e-6)
        assert torch.allclose(got["adaface_mean"], single["adaface_mean"], atol=1e-5)


def test_a_rank_whose_launcher_died_ends_with_a_warning_not_a_traceback():
    """kill -9 of torchrun's launcher leaves its ranks running (torchrun's behaviour); they wrote
    their outputs, then each died in finish_distributed's store.add with DistNetworkError and a C++
    frame dump, exit 1. The store here is hosted by a child process, killed as the launcher was."""
    import socket
    import subprocess
    import sys
    import time
    from datetime import timedelta

    from vigface.errors import VigfaceWarning
    from vigface.fr.distributed import finish_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, torch.distributed as d; s = d.TCPStore('127.0.0.1', "
         "int(sys.argv[1]), None, True); print('up', flush=True); time.sleep(600)", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert host.stdout.readline().strip() == "up"
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=20))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        host.kill()
        host.wait()
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.warns(VigfaceWarning, match="rendezvous store does not answer"):
            finish_distributed()
        assert not dist.is_initialized() and time.monotonic() - start < 15
    finally:
        host.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
