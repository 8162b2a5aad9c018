"""Linear CKA (Kornblith et al. 2019, centred) and the cosine of mean outputs, in torch.

For centred features ``X [n, d1]`` and ``Y [n, d2]``:
``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. It is 1 for identical features, invariant to
rotations (and isotropic scaling) of either side, and near ``d / n``-ish rather than 0 for unrelated
features of finite size. ``||Y^T X||_F^2 = <X X^T, Y Y^T>_F``: with fewer rows than features the products are
taken between the ``[n, n]`` Gram matrices (sample form), else between the features (feature form).
"""

from __future__ import annotations

import torch


def _feature_products(centred: list[torch.Tensor]) -> torch.Tensor:
    """``[E, E]`` of ``||X_i^T X_j||_F^2`` for experts of one width: one matmul per expert, the upper triangle."""
    e, d = len(centred), centred[0].shape[1]
    features = torch.cat(centred, dim=1)
    blocks = torch.empty(e, e, device=features.device)
    for i in range(e):
        row = (centred[i].T @ features[:, i * d:]).square().reshape(d, e - i, d).sum(dim=(0, 2))
        blocks[i, i:] = row
        blocks[i:, i] = row
    return blocks


def _gram_products(centred: list[torch.Tensor]) -> torch.Tensor:
    """``[E, E]`` of ``<X_i X_i^T, X_j X_j^T>_F``: the same figures from the ``[n, n]`` Gram matrices."""
    grams = torch.stack([x @ x.T for x in centred]).flatten(1)
    return grams @ grams.T


def similarity_matrices(outputs: list[torch.Tensor]) -> torch.Tensor:
    """``[2, E, E]``: linear CKA and the cosine of the mean outputs of every pair of ``outputs`` (each ``[n, d]``,
    the same ``n``); NaN where an expert's output is constant over the rows."""
    xs = [x.reshape(x.shape[0], -1).float() for x in outputs]
    same_width = len({x.shape[1] for x in xs}) == 1
    centred = [x - x.mean(0, keepdim=True) for x in xs]
    e, n = len(xs), xs[0].shape[0]
    if same_width and xs[0].shape[1] <= n:
        blocks = _feature_products(centred)
    elif same_width or n <= min(x.shape[1] for x in xs):
        blocks = _gram_products(centred)
    else:
        blocks = torch.stack([torch.stack([(a.T @ b).square().sum() for b in centred]) for a in centred])
    if same_width:
        unit = torch.nn.functional.normalize(torch.stack([x.mean(0) for x in xs]), dim=1)
        cosine = unit @ unit.T
    else:
        cosine = torch.full((e, e), float("nan"), device=blocks.device)
    norms = blocks.diagonal().sqrt()
    cka = blocks / (norms[:, None] * norms[None, :])
    return torch.stack([cka, cosine])
