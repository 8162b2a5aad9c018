"""Linear CKA (Kornblith et al. 2019, centred, feature-space form) and the cosine of mean outputs, in torch.

For centred features ``X [n, d1]`` and ``Y [n, d2]``:
``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. It is 1 for identical features, invariant to
rotations (and isotropic scaling) of either side, and near ``d / n``-ish rather than 0 for unrelated
features of finite size.
"""

from __future__ import annotations

import torch


def similarity_matrices(outputs: list[torch.Tensor]) -> torch.Tensor:
    """``[2, E, E]``: linear CKA and the cosine of the mean outputs of every pair of ``outputs`` (each ``[n, d]``,
    the same ``n``). Experts of one width take one matmul each against the features of the later experts; NaN where
    an expert's output is constant over the rows."""
    xs = [x.reshape(x.shape[0], -1).float() for x in outputs]
    means = torch.stack([x.mean(0) for x in xs]) if len({x.shape[1] for x in xs}) == 1 else None
    centred = [x - x.mean(0, keepdim=True) for x in xs]
    e = len(xs)
    if means is not None:
        d = xs[0].shape[1]
        features = torch.cat(centred, dim=1)
        blocks = torch.empty(e, e, device=features.device)
        for i in range(e):  # the upper triangle only: ||X_i^T X_j||_F^2 for j >= i, one matmul per expert
            row = (centred[i].T @ features[:, i * d:]).square().reshape(d, e - i, d).sum(dim=(0, 2))
            blocks[i, i:] = row
            blocks[i:, i] = row
        unit = torch.nn.functional.normalize(means, dim=1)
        cosine = unit @ unit.T
    else:
        blocks = torch.stack([torch.stack([(a.T @ b).square().sum() for b in centred]) for a in centred])
        cosine = torch.full((e, e), float("nan"), device=blocks.device)
    norms = blocks.diagonal().sqrt()
    cka = blocks / (norms[:, None] * norms[None, :])
    return torch.stack([cka, cosine])
