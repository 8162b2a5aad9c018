"""Data sets used by the examples and tests: the MMoE paper's synthetic data and UCI census-income."""

from gatewatch.data.census import CensusData, load_census
from gatewatch.data.synthetic import make_synthetic, synthetic_weights

__all__ = ["CensusData", "load_census", "make_synthetic", "synthetic_weights"]
