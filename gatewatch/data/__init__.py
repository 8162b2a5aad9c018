"""Data sets used by the examples and tests: the MMoE paper's synthetic data, UCI census-income, and token
sequences from several domains (for the sparse MoE model)."""

from gatewatch.data.census import CensusData, load_census
from gatewatch.data.domains import DomainData, make_domains
from gatewatch.data.synthetic import make_synthetic, synthetic_weights

__all__ = ["CensusData", "DomainData", "load_census", "make_domains", "make_synthetic", "synthetic_weights"]
