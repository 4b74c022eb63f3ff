"""Token streams cut into language-model batches: training windows and evaluation windows."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TrainStream:
    """Training batches from one token stream, as a pure function of the step.

    The stream is cut into `batch_size` contiguous rows (the classic language-model
    "batchify"). Window w of an epoch is columns [w * seq_len, (w + 1) * seq_len] of every
    row, which is seq_len inputs plus the one extra token the targets need. Consecutive
    steps continue each row's text. The tail that does not fill a full row or window is unused.

    For data-parallel training, `batch_size` is the global batch and rank r of `world_size`
    processes keeps rows [r * local, (r + 1) * local) with local = batch_size / world_size, its
    own contiguous shard of the stream. The ranks' batches stacked in rank order give the
    single-process batch.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got batch_size={batch_size} and seq_len={seq_len}")
        row_len = ids.numel() // batch_size
        windows = (row_len - 1) // seq_len if row_len > 0 else 0
        if windows < 1:
            raise ValueError(
                f"the train split has {ids.numel()} tokens, too few for one batch of batch_size={batch_size} "
                f"rows of seq_len={seq_len} tokens plus one target each (needs {batch_size * (seq_len + 1)}): "
                "lower batch_size or seq_len, or use more text"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} and world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} does not split evenly over {world_size} processes: "
                             f"use a multiple of {world_size}")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seq_len = seq_len
        first = rank * self.local_batch_size
        rows = ids[: batch_size * row_len].long().reshape(batch_size, row_len)  # (batch, row_len)
        # A copy of the shard only, so a rank does not keep the other ranks' rows alive.
        self._rows = rows if world_size == 1 else rows[first:first + self.local_batch_size].clone()
        self._windows = windows

    @property
    def windows_per_epoch(self) -> int:
        """Number of distinct batches; step `windows_per_epoch` repeats step 0."""
        return self._windows

    def epoch(self, step: int) -> int:
        """Return the 0-based epoch that `step` falls in."""
        _check_step(step)
        return step // self._windows

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, targets) for `step`, each (local batch, seq_len) int64, targets shifted by one token."""
        _check_step(step)
        start = (step % self._windows) * self.seq_len
        window = self._rows[:, start:start + self.seq_len + 1]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def eval_windows(ids: torch.Tensor, seq_len: int, batch_size: int, bos_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, targets) batches that predict every token of `ids` exactly once.

    `bos_id` is put before the stream so the first token is predicted too. Passing the
    <eos> id predicts it after an end of sentence, like the first word of every other row.
    The stream is cut into non-overlapping windows of `seq_len` targets. Full windows
    come in batches of up to `batch_size`, each (batch, seq_len). A shorter last window comes
    alone as a (1, remainder) batch. Concatenating all targets in order gives `ids` back.
    """
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty 1-D token stream, got shape {tuple(ids.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got batch_size={batch_size} and seq_len={seq_len}")
    stream = torch.cat([torch.tensor([bos_id], dtype=torch.long), ids.long()])  # (n_tokens + 1,)
    n_tokens = ids.numel()
    n_full = n_tokens // seq_len

    full_end = n_full * seq_len
    inputs = stream[:full_end].view(n_full, seq_len)
    targets = stream[1:full_end + 1].view(n_full, seq_len)
    for start in range(0, n_full, batch_size):
        yield inputs[start:start + batch_size], targets[start:start + batch_size]
    if full_end < n_tokens:
        yield stream[full_end:n_tokens].unsqueeze(0), stream[full_end + 1:].unsqueeze(0)


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
