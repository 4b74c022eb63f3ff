"""Sparsity methods: the scale-invariant penalty, top-k, magnitude calibration, sites and enforced zeros."""

from __future__ import annotations

import math

import pytest
import torch

from samba.evaluate import evaluate_split
from samba.loss import compute_loss, penalty, pruning_loss, rms_normalised_l1
from samba.metrics.active_params import matmul_active_parameters
from samba.metrics.sparsity import SparsityAccumulator
from samba.model import MambaConfig, ReadoutConfig, SambaConfig, SambaLM
from samba.sparsity import (
    Sparsifier,
    SparsityConfig,
    calibrate_thresholds,
    install,
    magnitude_threshold,
    record_sites,
    remove,
    topk_keep_count,
)

VOCAB = 40


def tiny_samba(seed: int = 0, dtype: torch.dtype = torch.float32) -> SambaLM:
    torch.manual_seed(seed)
    config = SambaConfig(mamba=MambaConfig(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=4, expand=2),
                         readout=ReadoutConfig(hidden_size=12))
    return SambaLM(config).to(dtype).eval()


def random_ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_l1_rms_by_hand():
    values = torch.tensor([[[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]]])  # (batch 1, length 3, 2 features)
    ratio_flat = 3.5 / math.sqrt(12.5)  # mean |v| / RMS of (3, 4)
    ratio_one_hot = 1.0 / math.sqrt(2.0)
    expected = (ratio_flat + ratio_one_hot + 0.0) / 3
    assert rms_normalised_l1([values], token_dims=1).item() == pytest.approx(expected, rel=1e-6)


def test_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="invalid penalty 'l0'"):
        penalty([torch.ones(1, 1, 2, 2)], "l0")


def rescale_states(model: SambaLM, factor: float) -> None:
    """Multiply every B by `factor` and divide C and the readout's input weight by it: outputs stay equal."""
    with torch.no_grad():
        for layer in model.backbone.layers:
            mixer = layer.mixer
            b_rows = slice(mixer.dt_rank, mixer.dt_rank + mixer.d_state)
            c_rows = slice(mixer.dt_rank + mixer.d_state, mixer.dt_rank + 2 * mixer.d_state)
            mixer.x_proj.weight[b_rows] *= factor
            mixer.x_proj.weight[c_rows] /= factor
        model.readout.input.weight /= factor


def test_rescaling_moves_l1_not_l1_rms():
    model = tiny_samba(dtype=torch.float64)
    ids = random_ids()
    before = model(ids)
    rescale_states(model, 0.01)
    after = model(ids)

    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.readout_logits, before.readout_logits)
    assert pruning_loss(after.states).item() == pytest.approx(0.01 * pruning_loss(before.states).item(), rel=1e-9)
    assert rms_normalised_l1(after.states, 2).item() == pytest.approx(rms_normalised_l1(before.states, 2).item(), rel=1e-9)


@pytest.mark.parametrize(("features", "target", "expected"), [
    (64, 0.9, 6), (64, 0.95, 3), (4, 0.99, 1), (10, 0.0, 10),
    (4096, 0.9, 409), (4096, 0.5, 2048), (10, 0.8, 2), (128, 0.75, 32),
])
def test_topk_keep_count(features, target, expected):
    assert topk_keep_count(features, target) == expected


def test_topk_keeps_exactly_k_largest():
    values = torch.randn(3, 5, 8, 4, generator=torch.Generator().manual_seed(1))
    sparse = Sparsifier("topk", token_dims=2, target=0.75)(values)
    tokens, dense = sparse.reshape(15, 32), values.reshape(15, 32)
    assert ((tokens != 0).sum(dim=1) == 8).all()
    smallest_kept = torch.where(tokens != 0, dense.abs(), torch.inf).min(dim=1).values
    largest_dropped = torch.where(tokens == 0, dense.abs(), -torch.inf).max(dim=1).values
    assert (smallest_kept > largest_dropped).all()
    torch.testing.assert_close(tokens[tokens != 0], dense[tokens != 0])


def test_magnitude_threshold_on_calibration_set():
    values = torch.randperm(1000).float() + 1.0  # 1 .. 1000, no ties
    threshold = magnitude_threshold(values, 0.9)
    assert threshold == 900.0
    sparse = Sparsifier("magnitude", token_dims=1, threshold=threshold)(values)
    assert (sparse == 0).sum().item() == 900


def test_magnitude_threshold_zero_target_keeps_all():
    values = torch.tensor([0.0, 1.0, 2.0])
    sparse = Sparsifier("magnitude", token_dims=1, threshold=magnitude_threshold(values, 0.0))(values)
    torch.testing.assert_close(sparse, values)


def test_magnitude_calibration_holds_out():
    generator = torch.Generator().manual_seed(2)
    calibration = [[torch.randn(100_000, generator=generator)], [3.0 * torch.randn(100_000, generator=generator)]]
    thresholds = calibrate_thresholds(calibration, 0.8)
    for scale, threshold in zip((1.0, 3.0), thresholds):
        held_out = scale * torch.randn(100_000, generator=generator)
        zeros = (Sparsifier("magnitude", 1, threshold=threshold)(held_out) == 0).float().mean().item()
        assert zeros == pytest.approx(0.8, abs=0.01)


# For each site: the matmul that reads the site tensor and the values per token vector there.
SITE_READERS = {
    "ssm_state": (lambda model: model.readout.input, 2 * 32 * 4),
    "inner": (lambda model: model.backbone.layers[0].mixer.out_proj, 32),
    "block_output": (lambda model: model.backbone.layers[1].mixer.in_proj, 16),
}


@pytest.mark.parametrize("site", list(SITE_READERS))
def test_topk_zeros_reach_the_matmul(site):
    model = tiny_samba()
    install(model, site, "topk", target=0.75)
    reader, features = SITE_READERS[site]
    seen = []
    handle = reader(model).register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    model(random_ids())
    handle.remove()
    nonzeros = (seen[0] != 0).sum(dim=-1)
    # ssm_state: the readout reads both layers' states at once, 8 nonzeros per layer of 32 * 4.
    per_token = 2 * topk_keep_count(32 * 4, 0.75) if site == "ssm_state" else topk_keep_count(features, 0.75)
    assert (nonzeros == per_token).all()


def test_state_zeros_change_main_output():
    model = tiny_samba(dtype=torch.float64)
    ids = random_ids()
    dense = model(ids).logits
    install(model, "ssm_state", "none")
    torch.testing.assert_close(model(ids).logits, dense)
    install(model, "ssm_state", "topk", target=0.9)
    assert (model(ids).logits - dense).abs().max().item() > 1e-6
    remove(model)
    torch.testing.assert_close(model(ids).logits, dense)


def test_install_moves_site():
    model = tiny_samba()
    install(model, "inner", "topk", target=0.5)
    install(model, "block_output", "none")
    assert all(layer.mixer.inner_sparsifier is None for layer in model.backbone.layers)
    assert all(isinstance(layer.output_sparsifier, Sparsifier) for layer in model.backbone.layers)


def test_magnitude_install_needs_thresholds():
    with pytest.raises(ValueError, match="one threshold per layer"):
        install(tiny_samba(), "inner", "magnitude", thresholds=[0.1])


def test_penalty_reads_site_values_with_gradient():
    model = tiny_samba().train()
    install(model, "inner", "none")
    ids = random_ids()
    output = model(ids)
    assert [value.shape for value in output.site_values] == [(2, 10, 32)] * 2
    parts = compute_loss(output, ids, pruning_weight=1.0, penalty_kind="l1_rms")
    assert parts.pruning.item() == pytest.approx(rms_normalised_l1(output.site_values, 1).item())
    parts.total.backward()
    assert model.backbone.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0


def test_record_sites_empty_without_sparsifier():
    model = tiny_samba()
    with record_sites(model) as recorded:
        model(random_ids())
    assert recorded == []


def states_with_zeros() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(2, 6, 5, 4, generator=generator, dtype=torch.float64)
    return states * (torch.rand(states.shape, generator=generator) > 0.4)


def test_sparsity_numbers_scale_invariant():
    results = []
    for factor in (1.0, 7.5):
        accumulator = SparsityAccumulator(1, relative_threshold=0.05)
        accumulator.update([factor * states_with_zeros()])
        results.append(accumulator.result()["layers"][0])
    scale_dependent = {"mean_abs", "near_zero_fraction_absolute"}
    for key in results[0].keys() - scale_dependent:
        if isinstance(results[0][key], dict):  # The histogram: bin edges and exact integer counts.
            assert results[1][key] == results[0][key], key
        else:
            assert results[1][key] == pytest.approx(results[0][key], rel=1e-12), key
    assert results[1]["mean_abs"] == pytest.approx(7.5 * results[0]["mean_abs"])


def test_dead_units_and_firing_rates_by_hand():
    # 2 tokens, 2 channels x 2 state values: channel 0 fires 3 of 4 times, channel 1 once; one feature never.
    states = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 5.0]]]])
    accumulator = SparsityAccumulator(1, relative_threshold=0.01)
    accumulator.update([states])
    layer = accumulator.result()["layers"][0]
    assert layer["channel_firing_rate"] == [0.75, 0.25]
    assert layer["dead_fraction"] == 0.25
    assert sum(layer["abs_over_rms_histogram"]["counts"]) == 4
    assert layer["abs_over_rms_histogram"]["exact_zeros"] == 4


def test_matmul_active_parameters_by_hand():
    matmuls = [{"name": "a", "out_features": 10, "in_features": 8, "nonzero_inputs": 2.0},
               {"name": "lm_head", "out_features": 50, "in_features": 8, "nonzero_inputs": 4.0, "counted": False}]
    result = matmul_active_parameters(1000, matmuls)
    assert result["active"] == 1000 - 10 * 6
    assert result["reduction"] == pytest.approx(0.06)
    assert [row["active_column_fraction"] for row in result["matmuls"]] == [0.25, 0.5]


def test_evaluate_inner_topk_measures_enforced_zeros():
    model = tiny_samba()
    install(model, "inner", "topk", target=0.75)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(4))
    metrics = evaluate_split(model, ids, 200, kind="samba", seq_len=20, batch_size=4, eos_id=1,
                             relative_threshold=0.01, absolute_threshold=1e-3, site="inner")
    assert metrics["sparsity"]["overall"]["exact_zero_fraction"] == pytest.approx(0.75)
    out_proj = metrics["site_active_params"]["matmuls"][0]
    assert out_proj["name"] == "layer_0.out_proj"
    assert out_proj["active_column_fraction"] == pytest.approx(0.25)


def test_sparsity_config_rejects_bad_site():
    with pytest.raises(ValueError, match="site must be one of"):
        SparsityConfig(site="embedding")


@pytest.mark.parametrize("site", list(SITE_READERS))
def test_step_matches_forward_with_zeros(site):
    model = tiny_samba(dtype=torch.float64)
    install(model, site, "topk", target=0.75)
    ids = random_ids(batch=1, length=6)
    full = model(ids)
    cache = model.new_cache()
    for position in range(ids.shape[1]):
        stepped = model.step(ids[:, position], cache)
        torch.testing.assert_close(stepped.logits, full.logits[:, position])
        torch.testing.assert_close(stepped.readout_logits, full.readout_logits[:, position])
