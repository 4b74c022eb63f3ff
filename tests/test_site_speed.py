"""Timing the matmuls that read a sparsity site: which layers, which inputs, and the returned numbers."""

from __future__ import annotations

import pytest
import torch

from samba.model import MambaConfig, ReadoutConfig, build_model
from samba.sparsity import install, topk_keep_count
from samba.sparsity.speed import site_matmul_inputs, time_matvecs

CONFIG = MambaConfig(vocab_size=50, d_model=16, n_layers=2, d_state=4)


def samba_model(site: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("samba", CONFIG, ReadoutConfig(hidden_size=8))
    install(model, site, "topk", target=0.75)
    return model


@pytest.mark.parametrize(("site", "names", "features"), [
    ("ssm_state", ["readout.input"], 2 * 32 * 4),
    ("inner", ["backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.out_proj"], 32),
    ("block_output", ["backbone.layers.1.mixer.in_proj", "backbone.lm_head"], 16),
])
def test_site_inputs_carry_topk_zeros(site, names, features):
    inputs = torch.randint(0, 50, (2, 5))
    found = site_matmul_inputs(samba_model(site), "samba", site, inputs)

    assert [name for name, _, _ in found] == names
    for _, linear, vectors in found:
        assert vectors.shape == (10, features)
        assert linear.in_features == features
    # ssm_state concatenates both layers' states, each with its own top-k count.
    max_nonzeros = 2 * topk_keep_count(32 * 4, 0.75) if site == "ssm_state" else topk_keep_count(features, 0.75)
    for _, _, vectors in found:
        assert torch.count_nonzero(vectors, dim=1).max().item() <= max_nonzeros


def test_baseline_has_no_readout_to_time():
    torch.manual_seed(0)
    model = build_model("baseline", CONFIG)
    assert site_matmul_inputs(model, "baseline", "ssm_state", torch.randint(0, 50, (1, 4))) == []


def test_site_without_sparsifier_rejected():
    torch.manual_seed(0)
    model = build_model("samba", CONFIG, ReadoutConfig(hidden_size=8))
    with pytest.raises(ValueError, match="install a sparsifier at inner"):
        site_matmul_inputs(model, "samba", "inner", torch.randint(0, 50, (1, 4)))


def test_time_matvecs_reports_share_and_speedup():
    linear = torch.nn.Linear(64, 8)
    vectors = torch.zeros(6, 64)
    vectors[:, :16] = 1.0

    timing = time_matvecs(linear, vectors, repeats=2)

    assert timing["weight_shape"] == [8, 64]
    assert timing["tokens"] == 6
    assert timing["nonzero_share"] == 0.25
    assert timing["dense_us_per_token"] > 0
    assert timing["sparse_us_per_token"] > 0
    assert timing["speedup"] == pytest.approx(timing["dense_us_per_token"] / timing["sparse_us_per_token"])


def test_time_matvecs_rejects_empty():
    with pytest.raises(ValueError, match="at least one token"):
        time_matvecs(torch.nn.Linear(4, 2), torch.zeros(0, 4))
