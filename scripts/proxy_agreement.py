"""How well the conflict proxy tracks exact conflict per expert: MMoE and PLE on the MMoE paper's synthetic
data at two task correlations, exact conflict and the proxy measured on the same steps.

Prints, per setting, over every (measured step, expert module, task pair) measured both ways: the Pearson
correlation of the cosines and the share of rows whose cosines have the same sign (PLE: the proxy covers the
last level's experts only, so only those are compared). About a minute of CPU per setting.

    python scripts/proxy_agreement.py [--steps 600] [--every 10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gatewatch as gw
from gatewatch.models import PLE, MMoE
from gatewatch.quantities.conflict.read import expert_table
from gatewatch.training.datasets import synthetic_splits

MODELS = {
    "MMoE (4 experts)": lambda d, t: MMoE(in_dim=d, tasks=t, n_experts=4, expert_hidden=(32,), expert_dim=16),
    "PLE (2 levels, 1+2 experts)": lambda d, t: PLE(in_dim=d, tasks=t, n_levels=2, n_specific=1, n_shared=2,
                                                     expert_hidden=(32,), expert_dim=16),
}


def agreement(make, correlation: float, steps: int, every: int, folder: Path) -> tuple[int, float, float]:
    """(rows compared, correlation of the cosines, sign agreement) of one training run."""
    data = synthetic_splits(correlation=correlation, n_train=8000, n_val=200, n_test=200, dim=32)
    torch.manual_seed(0)
    model = make(data.in_dim, data.tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gw.GateWatch(model, tasks=data.tasks, log_dir=folder, tensorboard=False, conflict_every=every,
                      conflict_proxy=True) as watch:
        for _ in range(steps):
            idx = torch.randint(0, len(data.x_train), (256,), generator=g)
            out = model(data.x_train[idx])
            y = data.y_train[idx]
            watch.backward({t: nn.functional.mse_loss(o, y[:, k]) for k, (t, o) in enumerate(zip(data.tasks, out,
                                                                                               strict=True))})
            opt.step()
            opt.zero_grad()
            watch.step()
    table = expert_table(gw.load_run(folder))
    keys = ["step", "module", "task_a", "task_b"]
    both = table[table["mode"] == "exact"].merge(table[table["mode"] == "proxy"], on=keys, suffixes=("_x", "_p"))
    both = both[~both["zero_grad_x"].astype(bool) & ~both["zero_grad_p"].astype(bool)]
    x, p = both["cosine_x"].to_numpy(float), both["cosine_p"].to_numpy(float)
    return len(both), float(np.corrcoef(x, p)[0, 1]), float(np.mean(np.sign(x) == np.sign(p)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':<30} {'correlation':>11} {'rows':>6} {'pearson r':>10} {'same sign':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in MODELS.items():
            for correlation in (0.9, 0.1):
                n, r, sign = agreement(make, correlation, args.steps, args.every,
                                       Path(tmp) / f"{name[:4]}-{correlation}")
                print(f"{name:<30} {correlation:>11} {n:>6} {r:>10.2f} {sign:>10.0%}", flush=True)


if __name__ == "__main__":
    main()
