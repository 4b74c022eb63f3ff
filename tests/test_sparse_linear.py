"""Sparse-input matmuls for decode: equal to the dense product, the dense fallback, and the swap into a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samba.model import MambaConfig, MambaLM, SambaConfig, SambaLM
from samba.sparsity import install
from samba.sparsity import sparse_linear
from samba.sparsity.sparse_linear import SparseInputLinear, sparse_input_linears, sparse_input_matvec

N_LAYERS = 3
EXPECTED_READERS = {
    "inner": ["layers.0.mixer.out_proj", "layers.1.mixer.out_proj", "layers.2.mixer.out_proj"],
    "block_output": ["layers.1.mixer.in_proj", "layers.2.mixer.in_proj", "lm_head"],
    "ssm_state": [],
}


def sparse_vector(features: int, zeros: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(features, generator=generator, dtype=torch.float64)
    x[torch.randperm(features, generator=generator)[:zeros]] = 0
    return x


def test_matvec_matches_dense_float64():
    weight = torch.randn(7, 40, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    x = sparse_vector(40, 36)
    torch.testing.assert_close(sparse_input_matvec(x, weight.t().contiguous(), bias), weight @ x + bias)


def test_matvec_all_zero_input_returns_bias():
    weight = torch.randn(3, 5, dtype=torch.float64)
    bias = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(sparse_input_matvec(torch.zeros(5, dtype=torch.float64), weight.t().contiguous(), bias), bias)


def test_sparse_linear_matches_linear_on_both_paths():
    linear = nn.Linear(40, 6).double()
    layer = SparseInputLinear(linear, max_density=0.5)
    for zeros in (36, 4):  # 10% nonzero takes the sparse path, 90% the dense one.
        x = sparse_vector(40, zeros).reshape(1, 1, 40)
        torch.testing.assert_close(layer(x), linear(x))


def test_sparse_linear_batch_runs_dense():
    linear = nn.Linear(8, 3).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(SparseInputLinear(linear)(x), linear(x))


def tiny_model(kind: str = "baseline") -> nn.Module:
    torch.manual_seed(0)
    mamba = MambaConfig(vocab_size=40, d_model=16, n_layers=N_LAYERS, d_state=4)
    return (MambaLM(mamba) if kind == "baseline" else SambaLM(SambaConfig(mamba=mamba))).eval()


def sparse_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, SparseInputLinear)]


@pytest.mark.parametrize("site", ["inner", "block_output", "ssm_state"])
def test_swap_covers_site_readers(site: str) -> None:
    model = tiny_model()
    with sparse_input_linears(model, site) as names:
        assert names == EXPECTED_READERS[site]
        assert sparse_module_names(model) == names
    assert sparse_module_names(model) == []


def test_swap_names_samba_backbone_layers() -> None:
    model = tiny_model("samba")
    with sparse_input_linears(model, "block_output") as names:
        assert names == [f"backbone.{name}" for name in EXPECTED_READERS["block_output"]]
        assert sparse_module_names(model) == names


def test_swap_shares_weights_and_undo_restores() -> None:
    model = tiny_model()
    originals = [layer.mixer.in_proj for layer in model.layers] + [model.lm_head]
    with sparse_input_linears(model, "block_output"):
        assert model.layers[1].mixer.in_proj.weight is originals[1].weight
        assert model.lm_head.weight is model.embedding.weight
        assert model.layers[0].mixer.in_proj is originals[0]
    current = [layer.mixer.in_proj for layer in model.layers] + [model.lm_head]
    assert all(now is before for now, before in zip(current, originals))
    assert list(model.state_dict()) == list(tiny_model().state_dict())


def test_swap_undone_after_error() -> None:
    model = tiny_model()
    original = model.layers[0].mixer.out_proj
    with pytest.raises(RuntimeError, match="inside"):
        with sparse_input_linears(model, "inner"):
            raise RuntimeError("inside")
    assert model.layers[0].mixer.out_proj is original


def test_nested_swap_rejected() -> None:
    model = tiny_model()
    with sparse_input_linears(model, "inner"):
        with pytest.raises(ValueError, match="layers.0.mixer.out_proj is a SparseInputLinear"):
            with sparse_input_linears(model, "inner"):
                pass


def test_unknown_site_rejected() -> None:
    with pytest.raises(ValueError, match="'residual'"):
        with sparse_input_linears(tiny_model(), "residual"):
            pass


@pytest.mark.parametrize("kind", ["baseline", "samba"])
@pytest.mark.parametrize("site", ["block_output", "inner"])
def test_sparse_steps_match_dense_logits(kind: str, site: str, monkeypatch) -> None:
    model = tiny_model(kind)
    install(model, site, "topk", target=0.9)
    ids = torch.tensor([3, 17, 5, 29, 11, 0])
    steps = getattr(model, "backbone", model).step

    dense_cache = model.new_cache()
    with torch.no_grad():
        dense = [steps(ids[i:i + 1], dense_cache).logits for i in range(len(ids))]

    calls = []
    matvec = sparse_linear.sparse_input_matvec

    def counting_matvec(*args):
        calls.append(args[0].shape)
        return matvec(*args)

    monkeypatch.setattr(sparse_linear, "sparse_input_matvec", counting_matvec)
    sparse_cache = model.new_cache()
    with torch.no_grad(), sparse_input_linears(model, site) as names:
        sparse = [steps(ids[i:i + 1], sparse_cache).logits for i in range(len(ids))]

    # topk keeps 2 of 16 or 3 of 32 inputs, under the 25% density limit, so every call is sparse.
    assert len(calls) == len(names) * len(ids)
    for dense_logits, sparse_logits in zip(dense, sparse):
        assert dense_logits.dtype == torch.float32
        torch.testing.assert_close(sparse_logits, dense_logits, rtol=0, atol=1e-5)
