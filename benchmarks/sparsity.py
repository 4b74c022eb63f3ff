"""Benchmark the sparse-input matmuls and batch-1 CPU decode with sparse sites against dense.

Run: python benchmarks/sparsity.py [--threads 1] [--d-model 1024]
Prints Markdown tables. Weights are random (initialised as in training) and the zeros come
from top-k sparsifiers at the site, so the pattern is that of topk, not of a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from samba.model import MambaConfig, MambaLM
from samba.sparsity import install, site_input_linears, sparse_input_linears
from samba.sparsity.sparse_linear import sparse_input_matvec

SPARSITIES = (0.5, 0.75, 0.9, 0.95)


def time_us(function, repeats: int) -> float:
    """Return the median time of `function` in microseconds over `repeats` runs after a warmup."""
    for _ in range(5):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return 1e6 * samples[len(samples) // 2]


def matmul_table(d_model: int, n_layers: int, d_state: int, hidden: int, repeats: int) -> list[str]:
    d_inner = 2 * d_model
    shapes = {"in_proj": (2 * d_inner, d_model), "out_proj": (d_model, d_inner),
              "readout.input": (hidden, n_layers * d_inner * d_state)}
    lines = ["| Matmul | Weight (out × in) | Sparsity | Dense (µs) | Sparse (µs) | Speedup |", "|:--|--:|--:|--:|--:|--:|"]
    generator = torch.Generator().manual_seed(0)
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features, generator=generator)
        weight_t = weight.t().contiguous()
        for sparsity in SPARSITIES:
            x = torch.randn(in_features, generator=generator)
            x[torch.randperm(in_features, generator=generator)[: round(sparsity * in_features)]] = 0
            dense = time_us(lambda: F.linear(x, weight), repeats)
            sparse = time_us(lambda: sparse_input_matvec(x, weight_t), repeats)
            lines.append(f"| {name} | {out_features} × {in_features} | {100 * sparsity:.0f}% | {dense:.0f} | "
                         f"{sparse:.0f} | {dense / sparse:.2f}× |")
    return lines


def _time_modules(modules: list[torch.nn.Module], clock: list[float]) -> list:
    """Add the wall time of every call of `modules` to clock[0]; return the hook handles."""
    starts: dict[int, float] = {}

    def before(module, _inputs):
        starts[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        clock[0] += time.perf_counter() - starts[id(module)]

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    return handles


@torch.no_grad()
def decode_tokens_per_s(model: MambaLM, site: str, sparse: bool, tokens: int) -> tuple[float, float]:
    """Decode `tokens` tokens greedily at batch 1 with MambaLM.step; return tokens/s and the share of time in the site's matmuls.

    The site's matmuls are the linear layers that sparse_input_linears replaces; with
    `sparse` they run through SparseInputLinear, as `samba generate` runs them.
    """
    clock = [0.0]
    with contextlib.ExitStack() as stack:
        if sparse:
            stack.enter_context(sparse_input_linears(model, site))
        readers = [getattr(owner, attribute) for _, owner, attribute in site_input_linears(model, site)]
        for handle in _time_modules(readers, clock):
            stack.callback(handle.remove)

        cache = model.new_cache()
        token = torch.zeros(1, dtype=torch.long)
        start = time.perf_counter()
        for _ in range(tokens):
            token = model.step(token, cache).logits.argmax(dim=-1)
        seconds = time.perf_counter() - start
    return tokens / seconds, clock[0] / seconds


def decode_table(d_model: int, n_layers: int, vocab: int, tokens: int, rounds: int) -> list[str]:
    lines = ["| Site | Sparsity | Dense tokens/s | Sparse tokens/s | Speedup | Matmul share of dense decode | "
             "Amdahl bound | Share of bound |", "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers)).eval()
    for site in ("inner", "block_output"):
        for sparsity in (0.9, 0.95):
            install(model, site, "topk", target=sparsity)
            # Alternate dense and sparse runs and keep each one's fastest, so load from other
            # processes on the machine hits both alike.
            dense_runs, sparse_runs = [], []
            for _ in range(rounds):
                dense_runs.append(decode_tokens_per_s(model, site, sparse=False, tokens=tokens))
                sparse_runs.append(decode_tokens_per_s(model, site, sparse=True, tokens=tokens))
            dense, share = max(dense_runs)
            sparse = max(sparse_runs)[0]
            bound = 1.0 / (1.0 - share)
            lines.append(f"| {site} | {100 * sparsity:.0f}% | {dense:.1f} | {sparse:.1f} | {sparse / dense:.2f}× | "
                         f"{100 * share:.1f}% | {bound:.2f}× | {100 * (sparse / dense - 1) / (bound - 1):.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating dense and sparse decode runs per row")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per matmul")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {open('/proc/loadavg').read().split()[0]}; "
          f"torch {torch.__version__}, {args.threads} thread(s), d_model {args.d_model}, {args.n_layers} layers, "
          f"vocabulary {args.vocab}\n")
    print("\n".join(matmul_table(args.d_model, args.n_layers, 16, 256, args.repeats)) + "\n")
    print("\n".join(decode_table(args.d_model, args.n_layers, args.vocab, args.tokens, args.rounds)))


if __name__ == "__main__":
    main()
