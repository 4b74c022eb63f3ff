"""Training speed of our Mamba baseline and Samba against mambapy and transformers' Mamba.

Each case (model x batch shape) runs in its own Python process, so peak resident memory
is that case's alone and no allocator state leaks between cases. A case builds its model
from a config (no weights are downloaded), runs warmup steps, then times fp32 AdamW
training steps (forward, cross-entropy, backward, optimizer step) on random token ids.
A case whose warmup step takes longer than --max-seconds is timed on that step alone.

    python benchmarks/train_speed.py                      # the default table
    python benchmarks/train_speed.py --shapes 8x128 --cases ours-baseline,mambapy

Columns: tokens/s, ms per step, and the peak RSS of the case's process (torch and the
model code included). "vs best peer" divides tokens/s by the fastest peer's at that shape.
"matmul share" is the step's matmul work (6 FLOPs per weight of every Linear layer, per
token, times tokens/s) as a share of the measured fp32 matmul GFLOP/s. Needs the `bench`
extra for the peers: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

OURS = ("ours-baseline", "ours-samba")
PEERS = ("mambapy", "transformers")
DEFAULT_SHAPES = ("8x128", "32x512", "16x128", "1x2048")


def build_case(case: str, args) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Return the model of `case` and its AdamW optimizer, both as their authors set them up."""
    if case in OURS:
        from samba.model import MambaConfig, build_model
        from samba.model.backend import set_backend
        from samba.train.optim import build_optimizer

        set_backend(args.backend)
        config = MambaConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                             d_state=args.d_state, d_conv=4, expand=2)
        model = build_model("baseline" if case == "ours-baseline" else "samba", config)
        return model, build_optimizer(model, lr=1e-3, weight_decay=0.1)
    if case == "mambapy":
        model = MambapyLM(args)
    elif case == "transformers":
        from transformers import MambaConfig, MambaForCausalLM

        config = MambaConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.n_layers,
                             state_size=args.d_state, expand=2, conv_kernel=4, use_cache=False)
        model = MambaForCausalLM(config)
    else:
        raise SystemExit(f"unknown case {case!r}: expected one of {', '.join(OURS + PEERS)}")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class MambapyLM(nn.Module):
    """mambapy's Mamba backbone with a tied embedding and LM head.

    mambapy.lm.LM imports mambapy.mamba2, which needs mamba-ssm, so the wrapper is built
    here from mambapy.mamba alone.
    """

    def __init__(self, args) -> None:
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        config = MambaConfig(d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                             expand_factor=2, d_conv=4, pscan=True)
        self.embedding = nn.Embedding(args.vocab, args.d_model)
        self.mamba = Mamba(config)
        self.norm = RMSNorm(args.d_model)
        self.head = nn.Linear(args.d_model, args.vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, input_ids):
        return self.head(self.norm(self.mamba(self.embedding(input_ids))))


def step_loss(case: str, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return the training loss of next-token prediction on ids (batch, length + 1)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if case in OURS:
        from samba.loss import compute_loss

        return compute_loss(model(inputs), targets, readout_weight=0.5, pruning_weight=0.1).total
    output = model(inputs)
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def training_step(case: str, model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    # The model's outputs go out of scope with step_loss, so no case keeps its logits
    # through the backward pass (only what autograd saved).
    loss = step_loss(case, model, ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def matmul_flops_per_token(args, samba: bool) -> float:
    """Count 6 FLOPs (forward 2, backward 4) per weight of every Linear layer, per token."""
    d_inner = 2 * args.d_model
    dt_rank = -(-args.d_model // 16)
    per_layer = (args.d_model * 2 * d_inner + d_inner * (dt_rank + 2 * args.d_state)
                 + dt_rank * d_inner + d_inner * args.d_model)
    weights = args.n_layers * per_layer + args.d_model * args.vocab
    if samba:
        weights += args.n_layers * d_inner * args.d_state * args.readout_hidden + args.readout_hidden * args.vocab
    return 6.0 * weights


def run_case(case: str, shape: str, args) -> dict:
    """Run one case in this process and return its measurements."""
    batch, length = (int(part) for part in shape.split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, optimizer = build_case(case, args)
    device = torch.device(args.device)
    model.to(device).train()
    ids = torch.randint(0, args.vocab, (batch, length + 1), device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    first_step_only = False
    for _ in range(args.warmup):
        start, cpu_start = time.perf_counter(), time.process_time()
        training_step(case, model, optimizer, ids)
        synchronize()
        if time.perf_counter() - start > args.max_seconds:
            # One step takes minutes here: its one-time costs (optimizer state, first
            # allocations) are a small part of it, so it is the measurement.
            first_step_only = True
            break
    steps = 1
    if not first_step_only:
        steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while steps < args.steps and (steps == 0 or time.perf_counter() - start < args.max_seconds):
            training_step(case, model, optimizer, ids)
            synchronize()
            steps += 1
    seconds = (time.perf_counter() - start) / steps
    # CPU time of all this process's threads: on a machine shared with other work it counts
    # only the time this case ran, so it varies less with the load than wall time does.
    cpu_seconds = (time.process_time() - cpu_start) / steps
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {"case": case, "shape": shape, "steps": steps, "first_step_only": first_step_only,
              "ms_per_step": 1e3 * seconds,
              "tokens_per_s": batch * length / seconds, "tokens_per_cpu_s": batch * length / cpu_seconds,
              "peak_rss_mib": peak_kib / 1024,
              "matmul_gflop_per_s": batch * length / seconds * matmul_flops_per_token(args, case == "ours-samba") / 1e9}
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_matmul(args) -> dict:
    """Return the best fp32 GFLOP/s of a large matrix product on this machine, with its threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    a = torch.randn(4096, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"case": "matmul", "gflop_per_s": 2 * 4096 * 1024 * 1024 / best / 1e9, "threads": torch.get_num_threads()}


def run_in_subprocess(worker_args: list[str], timeout: float) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *worker_args]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode < 0:
        return {"error": f"killed by signal {-completed.returncode} (SIGKILL is most often the out-of-memory killer)"}
    if completed.returncode != 0 or not lines:
        errors = [line for line in completed.stderr.splitlines() if "Error" in line]
        message = (errors or completed.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"exit status {completed.returncode}: {message}"}
    return json.loads(lines[-1])


def format_table(results: list[dict], matmul: dict) -> str:
    on_gpu = any("peak_gpu_mib" in result for result in results)
    memory = "peak GPU memory (MiB)" if on_gpu else "peak RSS (MiB)"
    rows = [f"| case | batch x length | tokens/s | ms/step | {memory} | vs best peer | matmul share "
            "| tokens per CPU-s | vs best peer (CPU time) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in dict.fromkeys(result["shape"] for result in results):
        at_shape = [result for result in results if result["shape"] == shape]
        peers = [r for r in at_shape if r["case"] in PEERS and "error" not in r]
        best_peer = max((r["tokens_per_s"] for r in peers), default=None)
        best_peer_cpu = max((r["tokens_per_cpu_s"] for r in peers), default=None)
        for result in at_shape:
            if "error" in result:
                rows.append(f"| {result['case']} | {shape} | failed: {result['error']} | | | | | | |")
                continue
            ratio = f"{result['tokens_per_s'] / best_peer:.2f}x" if best_peer else "n/a"
            ratio_cpu = f"{result['tokens_per_cpu_s'] / best_peer_cpu:.2f}x" if best_peer_cpu else "n/a"
            share = f"{result['matmul_gflop_per_s'] / matmul['gflop_per_s']:.0%}" if "gflop_per_s" in matmul else "n/a"
            peak = result["peak_gpu_mib"] if on_gpu else result["peak_rss_mib"]
            rows.append(f"| {result['case']} | {shape} | {result['tokens_per_s']:.0f} | {result['ms_per_step']:.1f} | "
                        f"{peak:.0f} | {ratio} | {share} | {result['tokens_per_cpu_s']:.0f} | {ratio_cpu} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(OURS + PEERS), help="comma-separated cases to run")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated BATCHxLENGTH shapes")
    parser.add_argument("--only", default="", help="CASE@SHAPE pairs to run instead of every case at every shape")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per case (at most)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop timing after this many seconds")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a case is stopped")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--readout-hidden", type=int, default=256, help="Samba's readout MLP width")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case; 0 keeps torch's default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="auto", help="our scan backend: auto, torch, cpu or cuda")
    parser.add_argument("--json", default="", help="also write every result to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "SHAPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        case, shape = args.worker
        print(json.dumps(measure_matmul(args) if case == "matmul" else run_case(case, shape, args)))
        return

    passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                   if key in ("steps", "warmup", "max_seconds", "d_model", "n_layers", "d_state", "vocab",
                              "readout_hidden", "threads", "device", "backend")]
    if args.only:
        pairs = [tuple(item.split("@")) for item in args.only.split(",")]
    else:
        pairs = [(case, shape) for shape in args.shapes.split(",") for case in args.cases.split(",")]
    threads = args.threads or torch.get_num_threads()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads per case, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    matmul = run_in_subprocess(["--worker", "matmul", "0x0", *passthrough], args.timeout)
    print(f"# fp32 matmul (4096x1024 @ 1024x1024): {matmul.get('gflop_per_s', float('nan')):.0f} GFLOP/s", flush=True)
    results = []
    for case, shape in pairs:
        result = {"case": case, "shape": shape, **run_in_subprocess(["--worker", case, shape, *passthrough],
                                                                     args.timeout)}
        results.append(result)
        print(f"# {case} {shape}: " + (result["error"] if "error" in result else
                                       f"{result['tokens_per_s']:.0f} tokens/s, {result['peak_rss_mib']:.0f} MiB, "
                                       f"load {os.getloadavg()[0]:.2f}"), flush=True)
    print(format_table(results, matmul))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul": matmul, "results": results, "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
