"""The domains data set (token statistics per domain, answers per domain) and the sparse MoE model: built from
kwargs, found by GateWatch with its fused experts, trained by the loop, rebuilt from its run directory."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

from gatewatch.data.domains import make_domains
from gatewatch.training.datasets import load_dataset, load_ref


def test_domains_differ_in_token_statistics_and_answers() -> None:
    data = make_domains(3000, seq_len=12, vocab=32, n_domains=3, seed=4)
    assert data.tokens.dtype == torch.long and data.tokens.shape == (3000, 12)
    assert data.domain.bincount().tolist() == [1000, 1000, 1000]
    # bigram frequencies per domain: each domain's own chain, far apart between domains
    bigrams = []
    for d in range(3):
        t = data.tokens[data.domain == d]
        pairs = (t[:, :-1] * 32 + t[:, 1:]).reshape(-1)
        bigrams.append(pairs.bincount(minlength=32 * 32).float() / len(pairs))
    for a in range(3):
        for b in range(a + 1, 3):
            assert (bigrams[a] - bigrams[b]).abs().sum() > 1.0  # total variation > 0.5
    # the flag splits each domain near its median; the score is standardised
    for d in range(3):
        share = data.targets[data.domain == d, 0].mean()
        assert 0.25 < share < 0.6
    assert abs(float(data.targets[:, 1].mean())) < 1e-5 and abs(float(data.targets[:, 1].std()) - 1) < 1e-5
    again = make_domains(3000, seq_len=12, vocab=32, n_domains=3, seed=4)
    assert torch.equal(again.tokens, data.tokens) and torch.equal(again.targets, data.targets)


def test_domains_splits_carry_domain_labels_and_rebuild() -> None:
    splits = load_dataset("domains", n_train=60, n_val=30, n_test=30, n_domains=4)
    assert splits.tasks == ["flag", "score"] and splits.task_types == ["binary", "regression"]
    assert splits.domain_names == ["d0", "d1", "d2", "d3"]
    assert [len(splits.domains[s]) for s in ("train", "val", "test")] == [60, 30, 30]
    rebuilt = load_ref(splits.ref)
    assert torch.equal(rebuilt.x_test, splits.x_test) and torch.equal(rebuilt.domains["test"], splits.domains["test"])


def test_domains_reject_one_domain() -> None:
    with pytest.raises(ValueError, match="n_domains must be >= 2"):
        make_domains(10, n_domains=1)


def test_sparse_moe_needs_transformers_and_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    from gatewatch.models import SparseMoE

    real_import = builtins.__import__

    def no_transformers(name: str, *args: object, **kwargs: object) -> object:
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"pip install gatewatch\[huggingface\]"):
        SparseMoE(in_dim=8, tasks=["a", "b"])


@pytest.mark.slow
def test_sparse_moe_trains_watched_and_rebuilds(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import gatewatch as gw
    from gatewatch.training import TrainConfig, load_model, train

    config = TrainConfig(model="sparse_moe", data="domains", data_kwargs={"n_train": 256, "n_val": 64, "n_test": 64},
                         model_kwargs={"n_experts": 4}, steps=12, batch_size=32, every=4, flush_every=12,
                         tensorboard=False, conflict_every=4)
    result = train(config, tmp_path / "run", progress=False)
    run = gw.load_run(tmp_path / "run")
    assert run.table("routers")["gate"].nunique() == 2  # one router per layer
    conflict = run.table("conflict")
    fused = conflict[(conflict["scope"] == "module") & conflict["name"].str.contains(r"experts\[", regex=True)]
    assert fused["name"].nunique() == 2 * 4  # per-expert conflict on the fused experts of both layers
    model, info = load_model(tmp_path / "run")  # trusted: a gatewatch.models class
    assert info.factory == "gatewatch.models.sparse:SparseMoE" and info.data["name"] == "domains"
    splits = load_ref(info.data)
    out = model(splits.x_test[:5])
    assert [o.shape for o in out] == [torch.Size([5])] * 2
    assert 0 <= result.metrics["test"]["flag"]["auc"] <= 1 and result.metrics["test"]["score"]["mse"] > 0
    groups = run.table("group_routing")  # the loop labels each batch with its rows' domains
    assert run.meta["sample_groups"] == ["d0", "d1", "d2"] and set(groups["group"]) == {"d0", "d1", "d2"}
    seen = groups.groupby("group")["tokens"].sum() / 2  # both layers see every token of every batch once
    assert seen.sum() == 12 * 32 * 16  # steps x sequences x tokens


def test_loop_labels_groups_only_on_data_with_domains(tmp_path: Path) -> None:
    from gatewatch.training import TrainConfig, train

    with pytest.raises(ValueError, match="sample_groups=True needs a data set whose rows carry their domain"):
        train(TrainConfig(data="synthetic", data_kwargs={"n_train": 64, "n_val": 16, "n_test": 16}, steps=2,
                          batch_size=16, tensorboard=False, sample_groups=True), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="sample_groups is True, False or None"):
        TrainConfig(sample_groups="yes")  # type: ignore[arg-type]


def test_deepseek_bias_update_balances_against_each_forward_load() -> None:
    pytest.importorskip("transformers")
    from gatewatch.models import SparseMoE

    torch.manual_seed(0)
    model = SparseMoE(in_dim=8, tasks=["a"], family="deepseek_v3", vocab_size=32, n_layers=2, n_experts=8,
                      bias_update=0.01, backbone_config={"n_group": 2, "topk_group": 1, "first_k_dense_replace": 1})
    router = next(m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter")
    chosen: list[torch.Tensor] = []
    router.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].detach().reshape(-1)))
    x = torch.randint(0, 32, (6, 8))
    model.train()
    model(x)
    assert torch.equal(router.e_score_correction_bias, torch.zeros(8))  # applied before the next forward
    load = torch.bincount(chosen[0], minlength=8).float()
    model(x)
    want = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.e_score_correction_bias, want)
    model.eval()
    before = router.e_score_correction_bias.clone()
    model(x)
    model(x)  # eval forwards neither count nor move the bias
    torch.testing.assert_close(router.e_score_correction_bias, before)
    with pytest.raises(ValueError, match="bias_update needs routers with an expert bias"):
        SparseMoE(in_dim=8, tasks=["a"], bias_update=0.01)
