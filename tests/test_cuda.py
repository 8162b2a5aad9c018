"""On a CUDA device the per-step path never synchronises with the host (skipped without CUDA)."""

import pytest
import torch
from torch import nn

import gatewatch as gw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _MMoE(nn.Module):
    def __init__(self, d: int = 32, e: int = 8, tasks: tuple[str, ...] = ("ctr", "like")) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, 64), nn.ReLU()) for _ in range(e)])
        self.gates = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, e), nn.Softmax(-1)) for t in tasks})
        self.towers = nn.ModuleDict({t: nn.Linear(64, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = torch.stack([e(x) for e in self.experts], 1)
        return [self.towers[t]((g(x).unsqueeze(-1) * f).sum(1)).squeeze(-1) for t, g in self.gates.items()]


def test_steps_between_flushes_never_sync(tmp_path):
    model = _MMoE().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(512, 32, device="cuda")
    y = (x[:, 0] > 0).float()
    watch = gw.GateWatch(model, tasks=["ctr", "like"], log_dir=tmp_path / "run", every=5, flush_every=1000,
                         tensorboard=False)
    bce = nn.functional.binary_cross_entropy_with_logits
    # the first step checks each gate's output once (a deliberate sync): do it before the strict section
    preds = model(x)
    watch.backward({"ctr": bce(preds[0], y), "like": bce(preds[1], 1 - y)})
    opt.step(), opt.zero_grad(), watch.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            preds = model(x)
            watch.backward({"ctr": bce(preds[0], y), "like": bce(preds[1], 1 - y)})
            opt.step()
            opt.zero_grad()
            watch.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.close()
    run = gw.load_run(tmp_path / "run")
    assert run.steps == 21
    assert set(run.gates["gate"]) == {"ctr", "like"}
    assert run.gates["samples"].sum() == 2 * 21 * 512
