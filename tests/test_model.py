"""Mamba-1 baseline and Samba models: shapes, causality, initial values, gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samba.loss import compute_loss
from samba.model import LMOutput, MambaConfig, MambaLM, ReadoutConfig, SambaConfig, SambaLM, build_model
from samba.model.mamba import MambaBlock

VOCAB = 50
BATCH = 2
LENGTH = 12


def tiny_mamba_config(**overrides) -> MambaConfig:
    fields = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "d_state": 4, "d_conv": 4, "expand": 2}
    fields.update(overrides)
    return MambaConfig(**fields)


def tiny_samba_config() -> SambaConfig:
    return SambaConfig(mamba=tiny_mamba_config(), readout=ReadoutConfig(hidden_size=24))


def make_model(kind: str, seed: int = 0) -> MambaLM | SambaLM:
    torch.manual_seed(seed)
    if kind == "baseline":
        return MambaLM(tiny_mamba_config())
    return SambaLM(tiny_samba_config())


def random_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def run_with_states(model: MambaLM | SambaLM, ids: torch.Tensor) -> LMOutput:
    if isinstance(model, SambaLM):
        return model(ids)
    return model(ids, return_states=True)


# Shapes


def test_baseline_shapes() -> None:
    model = make_model("baseline")
    config = model.config
    out = model(random_ids())
    assert out.logits.shape == (BATCH, LENGTH, VOCAB)
    assert out.states is None
    assert out.readout_logits is None

    out = model(random_ids(), return_states=True)
    assert len(out.states) == config.n_layers
    for states in out.states:
        assert states.shape == (BATCH, LENGTH, config.d_inner, config.d_state)


def test_samba_shapes() -> None:
    model = make_model("samba")
    mamba = model.config.mamba
    out = model(random_ids())
    assert out.logits.shape == (BATCH, LENGTH, VOCAB)
    assert out.readout_logits.shape == (BATCH, LENGTH, VOCAB)
    assert len(out.states) == mamba.n_layers
    for states in out.states:
        assert states.shape == (BATCH, LENGTH, mamba.d_inner, mamba.d_state)
    assert model.readout.input.in_features == mamba.n_layers * mamba.d_inner * mamba.d_state


def test_readout_feature_order() -> None:
    # Feature j = layer * d_inner * d_state + channel * d_state + state index.
    model = make_model("samba")
    mamba = model.config.mamba
    states = [torch.zeros(1, 1, mamba.d_inner, mamba.d_state) for _ in range(mamba.n_layers)]
    layer, channel, index = 1, 5, 2
    states[layer][0, 0, channel, index] = 1.0
    feature = layer * mamba.d_inner * mamba.d_state + channel * mamba.d_state + index
    readout = model.readout
    with torch.no_grad():
        hidden = readout.input.weight[:, feature] + readout.input.bias
        expected = readout.output(F.gelu(hidden))
        torch.testing.assert_close(readout(states)[0, 0], expected)


def test_build_model_kinds() -> None:
    assert type(build_model("baseline", tiny_mamba_config(), None)) is MambaLM
    samba = build_model("samba", tiny_mamba_config(), ReadoutConfig(hidden_size=24))
    assert type(samba) is SambaLM
    assert samba.readout.input.out_features == 24
    with pytest.raises(ValueError, match="baseline, samba"):
        build_model("transformer", tiny_mamba_config(), None)


def test_forward_rejects_flat_ids() -> None:
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        make_model("baseline")(torch.zeros(LENGTH, dtype=torch.long))


# Causality


def test_conv_is_left_padded() -> None:
    torch.manual_seed(0)
    block = MambaBlock(tiny_mamba_config())
    d_conv, d_inner = block.d_conv, block.d_inner
    x = torch.randn(1, LENGTH, d_inner)
    with torch.no_grad():
        out = block.causal_conv(x)
        weight, bias = block.conv1d.weight[:, 0, :], block.conv1d.bias  # (d_inner, d_conv)
        assert out.shape == x.shape
        # Position 0 depends only on itself, through the last kernel tap, because the left padding is zero.
        torch.testing.assert_close(out[0, 0], weight[:, -1] * x[0, 0] + bias)
        # Position t is the dot product of the kernel with positions t - d_conv + 1 .. t.
        t = 7
        window = x[0, t - d_conv + 1 : t + 1].T  # (d_inner, d_conv)
        torch.testing.assert_close(out[0, t], (weight * window).sum(dim=-1) + bias)


def test_conv_ignores_later_positions() -> None:
    torch.manual_seed(0)
    block = MambaBlock(tiny_mamba_config())
    x = torch.randn(1, LENGTH, block.d_inner)
    t = 5
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(1, LENGTH - t - 1, block.d_inner)
    with torch.no_grad():
        out, out_changed = block.causal_conv(x), block.causal_conv(changed)
    assert torch.equal(out[:, : t + 1], out_changed[:, : t + 1])
    assert not torch.allclose(out[:, t + 1], out_changed[:, t + 1])


@pytest.mark.parametrize("kind", ["baseline", "samba"])
@pytest.mark.parametrize("t", [0, 5, LENGTH - 2])
def test_model_is_causal(kind: str, t: int) -> None:
    model = make_model(kind)
    ids = random_ids()
    changed = ids.clone()
    changed[:, t + 1 :] = (ids[:, t + 1 :] + 1 + torch.arange(LENGTH - t - 1)) % VOCAB
    with torch.no_grad():
        out = run_with_states(model, ids)
        out_changed = run_with_states(model, changed)

    # Matmuls over different rows may round differently, so allow float32 round-off.
    def assert_prefix_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6, msg=f"{what} up to t")

    assert_prefix_equal(out.logits, out_changed.logits, "logits")
    for layer, (states, states_changed) in enumerate(zip(out.states, out_changed.states)):
        assert_prefix_equal(states, states_changed, f"layer {layer} states")
    if kind == "samba":
        assert_prefix_equal(out.readout_logits, out_changed.readout_logits, "readout logits")
    # The change must be visible after t, or the test would pass for a model that ignores its input.
    assert not torch.allclose(out.logits[:, t + 1], out_changed.logits[:, t + 1])


# Initial values


def mixers(model: MambaLM | SambaLM) -> list[MambaBlock]:
    backbone = model.backbone if isinstance(model, SambaLM) else model
    return [layer.mixer for layer in backbone.layers]


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_initial_ssm_parameters(kind: str) -> None:
    model = make_model(kind)
    config = tiny_mamba_config()
    expected_A_log = torch.log(torch.arange(1, config.d_state + 1, dtype=torch.float32))
    for mixer in mixers(model):
        assert mixer.A_log.shape == (config.d_inner, config.d_state)
        for channel in range(config.d_inner):
            assert torch.equal(mixer.A_log[channel], expected_A_log)
        assert torch.equal(mixer.D, torch.ones(config.d_inner))

        dt = F.softplus(mixer.dt_proj.bias.detach())
        assert dt.min() >= config.dt_min * (1 - 1e-5)
        assert dt.max() <= config.dt_max * (1 + 1e-5)
        bound = mixer.dt_rank**-0.5
        assert mixer.dt_proj.weight.abs().max() <= bound


def test_dt_floor_applies() -> None:
    torch.manual_seed(0)
    config = tiny_mamba_config(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    block = MambaBlock(config)
    dt = F.softplus(block.dt_proj.bias.detach().double())
    torch.testing.assert_close(dt, torch.full_like(dt, 1e-4), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("d_model", "expected"), [(16, 1), (24, 2), (32, 2), (33, 3)])
def test_dt_rank_default(d_model: int, expected: int) -> None:
    torch.manual_seed(0)
    block = MambaBlock(tiny_mamba_config(d_model=d_model))
    assert block.dt_rank == expected
    assert block.dt_proj.in_features == expected
    assert block.x_proj.out_features == expected + 2 * block.d_state


def test_embedding_and_out_proj_init() -> None:
    model = make_model("baseline")
    config = model.config
    std = model.embedding.weight.std().item()
    assert 0.015 < std < 0.025
    # Default Linear init is uniform in +-1/sqrt(fan_in). The residual rescale divides by sqrt(n_layers).
    bound = 1 / math.sqrt(config.d_inner) / math.sqrt(config.n_layers)
    for mixer in mixers(model):
        assert mixer.out_proj.weight.abs().max() <= bound
        assert mixer.out_proj.weight.abs().max() > 0.9 * bound


def test_head_tied_to_embedding() -> None:
    model = make_model("baseline")
    assert model.lm_head.weight is model.embedding.weight
    samba = make_model("samba")
    assert samba.backbone.lm_head.weight is samba.backbone.embedding.weight


def expected_mamba_parameters(config: MambaConfig) -> int:
    d_model, d_inner, d_state, rank = config.d_model, config.d_inner, config.d_state, config.resolved_dt_rank
    per_layer = (
        d_model  # norm
        + d_model * 2 * d_inner  # in_proj
        + d_inner * config.d_conv + d_inner  # conv1d weight and bias
        + d_inner * (rank + 2 * d_state)  # x_proj
        + rank * d_inner + d_inner  # dt_proj weight and bias
        + d_inner * d_state + d_inner  # A_log and D
        + d_inner * d_model  # out_proj
    )
    return config.vocab_size * d_model + config.n_layers * per_layer + d_model


def test_num_parameters_counts_tied_weight_once() -> None:
    config = tiny_samba_config()
    baseline = make_model("baseline")
    assert baseline.num_parameters() == expected_mamba_parameters(config.mamba)
    samba = make_model("samba")
    mamba = config.mamba
    features = mamba.n_layers * mamba.d_inner * mamba.d_state
    hidden = config.readout.hidden_size
    readout = features * hidden + hidden + hidden * mamba.vocab_size + mamba.vocab_size
    assert samba.num_parameters() == expected_mamba_parameters(mamba) + readout


def test_no_weight_decay_marks() -> None:
    model = make_model("samba")
    marked = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for layer in range(2):
        prefix = f"backbone.layers.{layer}"
        for name in ("norm.weight", "mixer.A_log", "mixer.D", "mixer.dt_proj.bias", "mixer.conv1d.bias"):
            assert f"{prefix}.{name}" in marked
        for name in ("mixer.in_proj.weight", "mixer.out_proj.weight", "mixer.dt_proj.weight"):
            assert f"{prefix}.{name}" not in marked
    assert "backbone.norm_f.weight" in marked
    assert "readout.input.bias" in marked
    assert "readout.output.bias" in marked
    assert "backbone.embedding.weight" not in marked
    assert "readout.input.weight" not in marked


# Gradients and determinism


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_backward_gives_finite_grads(kind: str) -> None:
    model = make_model(kind)
    ids = random_ids()
    out = model(ids[:, :-1])
    compute_loss(out, ids[:, 1:]).total.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_forward_is_deterministic(kind: str) -> None:
    model = make_model(kind)
    again = make_model(kind)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name

    ids = random_ids()
    with torch.no_grad():
        first = run_with_states(model, ids)
        second = run_with_states(model, ids)
        other = run_with_states(again, ids)
    assert (first.logits - second.logits).abs().max().item() == 0.0
    assert (first.logits - other.logits).abs().max().item() == 0.0
    for states, states_other in zip(first.states, other.states):
        assert (states - states_other).abs().max().item() == 0.0
    if kind == "samba":
        assert (first.readout_logits - other.readout_logits).abs().max().item() == 0.0


def test_fused_conv_silu_matches_autograd() -> None:
    from samba.model.fused import CausalConvSiLU, causal_conv

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CausalConvSiLU.apply, (x, weight, bias))
    fused = CausalConvSiLU.apply(x, weight, bias)
    plain = torch.nn.functional.silu(causal_conv(x, weight, bias))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(fused.square().sum(), (x, weight, bias))
    grads_plain = torch.autograd.grad(plain.square().sum(), (x, weight, bias))
    for grad, grad_plain in zip(grads, grads_plain):
        torch.testing.assert_close(grad, grad_plain, rtol=1e-12, atol=1e-12)


def test_fused_softplus_and_gate_match_autograd() -> None:
    from samba.model.fused import SiLUGate, SoftplusFromOutput

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, generator=generator, dtype=torch.float64) * 10).requires_grad_()
    y = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SoftplusFromOutput.apply, (x,))
    assert torch.autograd.gradcheck(SiLUGate.apply, (y, x))
    torch.testing.assert_close(SoftplusFromOutput.apply(x), torch.nn.functional.softplus(x), rtol=0, atol=0)
    torch.testing.assert_close(SiLUGate.apply(y, x), y * torch.nn.functional.silu(x), rtol=0, atol=0)


def test_fused_rms_norm_matches_autograd() -> None:
    from samba.model.fused import RMSNormFunction

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, weight: RMSNormFunction.apply(x, weight, 1e-5), (x, weight))
    plain = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(RMSNormFunction.apply(x, weight, 1e-5), plain, rtol=1e-14, atol=1e-14)
