"""Synthetic token sequences from several domains, with two tasks whose answer depends on the domain.

Each domain ``d`` has its own sparse Markov chain over the vocabulary (every token has ``branching``
likely successors, drawn per domain, plus a small chance of any token), so domains differ in the
statistics of their tokens; no token marks the domain. Each domain also has its own answers:

* ``flag`` (binary): does the sequence hold more of the domain's key tokens (a random quarter of the
  vocabulary, drawn per domain) than the domain's median sequence does;
* ``score`` (regression): the mean over the sequence of a per-domain value of each token (standard normal
  values drawn per domain), standardised over the sample.

A model must therefore tell the domain from the token statistics to answer either task. ``domain`` holds
each row's domain index (0 .. n_domains - 1), for grouping rows by domain.
Seeded and deterministic: the chains and answers come from ``seed``, the sequences from ``seed + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..validate import positive_int

__all__ = ["DomainData", "domain_names", "make_domains"]

DOMAIN_TASKS = ("flag", "score")


@dataclass(frozen=True)
class DomainData:
    """Token ids ``[N, seq_len]`` (int64), targets ``[N, 2]`` (flag, score; float32), domain index ``[N]``."""

    tokens: Tensor
    targets: Tensor
    domain: Tensor


def domain_names(n_domains: int) -> list[str]:
    """The domains' names: ``d0``, ``d1``, ..."""
    return [f"d{i}" for i in range(n_domains)]


def _chains(n_domains: int, vocab: int, branching: int, noise: float, g: torch.Generator) -> Tensor:
    """Per-domain transition matrices ``[n_domains, vocab, vocab]`` (rows sum to 1)."""
    successors = torch.randint(0, vocab, (n_domains, vocab, branching), generator=g)
    weights = torch.rand(n_domains, vocab, branching, generator=g) + 0.5
    chains = torch.zeros(n_domains, vocab, vocab).scatter_add_(2, successors, weights)
    chains = chains / chains.sum(-1, keepdim=True)
    return (1 - noise) * chains + noise / vocab


def make_domains(
    n: int,
    *,
    seq_len: int = 16,
    vocab: int = 64,
    n_domains: int = 3,
    branching: int = 3,
    noise: float = 0.05,
    seed: int = 0,
) -> DomainData:
    """``n`` sequences, an equal share from each domain (shuffled); see the module docstring."""
    n, seq_len, vocab = (positive_int(name, v) for name, v in (("n", n), ("seq_len", seq_len), ("vocab", vocab)))
    if n_domains < 2:
        raise ValueError(f"n_domains must be >= 2 (the tasks differ by domain), got {n_domains}.")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise is the chance of a uniformly random next token, in [0, 1]; got {noise}.")
    positive_int("branching", branching)
    rules = torch.Generator().manual_seed(seed)
    chains = _chains(n_domains, vocab, branching, noise, rules)
    keys = torch.rand(n_domains, vocab, generator=rules).argsort(-1) < vocab // 4  # [domains, vocab] key tokens
    values = torch.randn(n_domains, vocab, generator=rules)
    draw = torch.Generator().manual_seed(seed + 1)
    domain = torch.arange(n) % n_domains
    domain = domain[torch.randperm(n, generator=draw)]
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=draw)
    for t in range(1, seq_len):
        tokens[:, t] = torch.multinomial(chains[domain, tokens[:, t - 1]], 1, generator=draw).squeeze(1)
    counts = keys[domain.unsqueeze(1), tokens].sum(1).float()
    flag = torch.zeros(n)
    for d in range(n_domains):
        rows = domain == d
        flag[rows] = (counts[rows] > counts[rows].median()).float()
    score = values[domain.unsqueeze(1), tokens].mean(1)
    score = (score - score.mean()) / score.std().clamp_min(1e-8)
    return DomainData(tokens=tokens, targets=torch.stack([flag, score], 1), domain=domain)
