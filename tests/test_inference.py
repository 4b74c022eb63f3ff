"""Recurrent inference equals one forward pass; bf16 autocast precision; memory of the baseline scan."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from samba.model import MambaConfig, build_model
from samba.model.backend import use_backend
from samba.model.scan_cpu import cpu_kernel_error

VOCAB = 50
LENGTH = 12
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    cpu_kernel_error() is not None, reason=f"the C scan kernel cannot be built here: {cpu_kernel_error()}"))]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_model(kind: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=4, d_conv=4)
    return build_model(kind, config).to(dtype).eval()


def assert_step_logits_match(model, ids: torch.Tensor, prompt_length: int, tolerance: float) -> None:
    full = model(ids)
    cache = model.new_cache()
    prefill = model(ids[:, :prompt_length], cache=cache)
    torch.testing.assert_close(prefill.logits, full.logits[:, :prompt_length], rtol=tolerance, atol=tolerance)
    assert cache.length == prompt_length
    for t in range(prompt_length, ids.shape[1]):
        out = model.step(ids[:, t], cache)
        torch.testing.assert_close(out.logits, full.logits[:, t], rtol=tolerance, atol=tolerance,
                                   msg=f"logits at position {t}")
        if full.readout_logits is not None:
            torch.testing.assert_close(out.readout_logits, full.readout_logits[:, t], rtol=tolerance,
                                       atol=tolerance, msg=f"readout logits at position {t}")
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["baseline", "samba"])
@pytest.mark.parametrize("prompt_length", [1, 2, 3, 4, 7])
def test_prefill_then_steps_match_forward(kind: str, dtype: torch.dtype, backend: str, prompt_length: int) -> None:
    # Prompts of 1 to 3 tokens are shorter than the conv kernel (d_conv = 4).
    model = tiny_model(kind, dtype)
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(1))
    with use_backend(backend), torch.no_grad():
        assert_step_logits_match(model, ids, prompt_length, TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_prefill_in_pieces_matches_forward(kind: str) -> None:
    model = tiny_model(kind, torch.float64)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, start:end], cache=cache) for start, end in ((0, 2), (2, 3), (3, 9), (9, LENGTH))]
    logits = torch.cat([piece.logits for piece in pieces], dim=1)
    torch.testing.assert_close(logits, full.logits, rtol=1e-10, atol=1e-10)
    if kind == "samba":
        readout = torch.cat([piece.readout_logits for piece in pieces], dim=1)
        torch.testing.assert_close(readout, full.readout_logits, rtol=1e-10, atol=1e-10)


def test_step_states_are_forward_states() -> None:
    model = tiny_model("samba", torch.float64)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        out = model.step(ids[:, 5], cache)
    for layer, (state, states) in enumerate(zip(out.states, full.states)):
        torch.testing.assert_close(state, states[:, 5], rtol=1e-10, atol=1e-10, msg=f"layer {layer}")


def test_cache_from_other_model_is_rejected() -> None:
    model = tiny_model("baseline")
    other = build_model("baseline", MambaConfig(vocab_size=VOCAB, d_model=16, n_layers=3, d_state=4))
    with pytest.raises(ValueError, match="the cache has 3 layers but the model has 2"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=other.new_cache())


def test_step_rejects_a_sequence() -> None:
    model = tiny_model("baseline")
    with pytest.raises(ValueError, match=r"step input_ids must have shape \(batch,\)"):
        model.step(torch.zeros(1, 2, dtype=torch.long), model.new_cache())


@pytest.mark.parametrize("kind", ["baseline", "samba"])
def test_bf16_autocast_keeps_ssm_in_float32(kind: str) -> None:
    model = tiny_model(kind)
    mixer = (model.backbone if kind == "samba" else model).layers[0].mixer
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            delta, A, _, _ = mixer._ssm_parameters(torch.randn(2, 3, mixer.d_inner))
            output = model(ids)

    assert delta.dtype == A.dtype == torch.float32
    assert mixer.D.dtype == torch.float32
    assert output.logits.dtype == torch.bfloat16  # the LM head runs in bf16 under autocast
    # Stated tolerance: log-probabilities within 0.05 of float32 (bf16 keeps ~3 significant digits).
    log_probs = torch.log_softmax(output.logits.float(), dim=-1)
    torch.testing.assert_close(log_probs, torch.log_softmax(reference.logits, dim=-1), rtol=0, atol=0.05)
    if kind == "samba":
        for states, states_ref in zip(output.states, reference.states):
            assert states.dtype == torch.float32
            # States within 2% of their largest magnitude.
            torch.testing.assert_close(states, states_ref, rtol=0, atol=0.02 * states_ref.abs().max().item())


class LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_baseline_never_builds_all_states(backend: str) -> None:
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=8)
    batch, length = 2, 256
    all_states = batch * length * config.d_inner * config.d_state
    for kind, expect_all_states in (("baseline", False), ("samba", True)):
        model = build_model(kind, config)
        ids = torch.randint(0, VOCAB, (batch, length))
        with use_backend(backend), LargestTensor() as mode:
            output = model(ids)
            loss = output.logits.mean() + (output.states[0].mean() if output.states else 0)
            loss.backward()
        # The chunked scan's largest tensors hold 32 of the 256 positions.
        assert (mode.largest >= all_states) == expect_all_states, (kind, mode.largest, all_states)


def test_bf16_autocast_backward_is_finite() -> None:
    model = tiny_model("samba")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(ids)
    loss = output.logits.float().mean() + output.readout_logits.float().mean() + output.states[0].abs().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
