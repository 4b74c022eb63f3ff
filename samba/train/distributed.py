"""Data-parallel training across processes: the layout torchrun exports, DDP, and state broadcast.

Each process (rank) trains the same model on its own rows of the global batch.
DistributedDataParallel averages the gradients, so with equal rows per rank a step
equals one step on the whole global batch. Only rank 0 touches files: it loads a
training state and broadcasts it, so resuming needs no shared file system.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the training processes; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()


def context_from_env(environ: Mapping[str, str] = os.environ) -> DistributedContext:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun exports them.

    Without WORLD_SIZE the process trains alone. Raises ValueError for values that are not
    integers or do not fit together.
    """
    if "WORLD_SIZE" not in environ:
        return SINGLE_PROCESS
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", None)):
        text = environ.get(name, default if default is not None else environ["WORLD_SIZE"])
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer "
                             "(start multi-process training with torchrun)") from None
    context = DistributedContext(rank=values["RANK"], world_size=values["WORLD_SIZE"],
                                 local_rank=values["LOCAL_RANK"], local_world_size=values["LOCAL_WORLD_SIZE"])
    if context.world_size < 1 or not 0 <= context.rank < context.world_size:
        raise ValueError(f"RANK={context.rank} and WORLD_SIZE={context.world_size} do not fit together "
                         "(start multi-process training with torchrun)")
    return context


def device_for(context: DistributedContext, device_type: str) -> torch.device:
    """Return this rank's device: the CPU, or GPU number LOCAL_RANK."""
    if device_type == "cuda":
        return torch.device("cuda", context.local_rank)
    return torch.device("cpu")


def init_process_group(context: DistributedContext, device: torch.device) -> None:
    """Join the process group: NCCL for GPUs, gloo for CPUs. MASTER_ADDR and MASTER_PORT come from torchrun."""
    # NOTE: the tests run gloo on CPUs only. The NCCL branch follows the PyTorch docs but has
    # not been run by this project's test suite.
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=context.rank, world_size=context.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=context.rank, world_size=context.world_size)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Wrap `model` in DistributedDataParallel when several processes train; return it unchanged otherwise."""
    if not context.is_distributed:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def mean_across_ranks(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Average a 1-D tensor over all ranks; with equal rows per rank this is the global-batch mean."""
    if not context.is_distributed:
        return values
    reduced = values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


def broadcast_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                          context: DistributedContext) -> int:
    """Copy rank 0's step, weights, optimizer state and torch RNG state to every rank; return the step.

    Other ranks first create empty optimizer slots of the shapes rank 0 reports (sent as
    JSON bytes, not pickled), so the broadcast works for any optimizer whose state is tensors.
    """
    if not context.is_distributed:
        return step
    device = next(model.parameters()).device
    step_tensor = torch.tensor([step], dtype=torch.int64, device=device)
    dist.broadcast(step_tensor, src=0)
    step = int(step_tensor.item())
    if step == 0:
        return 0  # A fresh run: same seed on every rank, and DDP syncs the weights when it wraps the model.

    for tensor in (*model.parameters(), *model.buffers()):
        _broadcast(tensor.data, device)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    layout = _broadcast_json(_optimizer_layout(optimizer, params) if context.is_main else None, device)
    for index, key, shape, dtype in layout:
        slots = optimizer.state[params[index]]
        if not context.is_main:
            # AdamW keeps its step count on the CPU and its moments on the parameter's device.
            where = "cpu" if key == "step" else params[index].device
            slots[key] = torch.zeros(shape, dtype=getattr(torch, dtype), device=where)
        _broadcast(slots[key], device)
    rng = torch.get_rng_state()
    _broadcast(rng, device)
    torch.set_rng_state(rng)
    return step


def _optimizer_layout(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list:
    layout = []
    for index, param in enumerate(params):
        for key, value in sorted(optimizer.state.get(param, {}).items()):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} is not a tensor and cannot be broadcast")
            layout.append([index, key, list(value.shape), str(value.dtype).removeprefix("torch.")])
    return layout


def _broadcast(tensor: torch.Tensor, device: torch.device) -> None:
    """Broadcast from rank 0 in place, staging through `device` (NCCL only sends GPU tensors)."""
    if tensor.device == device:
        dist.broadcast(tensor, src=0)
        return
    staged = tensor.to(device)
    dist.broadcast(staged, src=0)
    tensor.copy_(staged)


def _broadcast_json(value: object, device: torch.device) -> list:
    payload = json.dumps(value).encode("utf-8") if value is not None else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if value is not None:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()).decode("utf-8"))
