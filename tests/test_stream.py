"""Training batches as a pure function of the step, and evaluation windows that cover every token once."""

from __future__ import annotations

import pytest
import torch

from samba.data.stream import TrainStream, eval_windows


def test_train_stream_closed_form() -> None:
    # With ids = 0..n-1, row b starts at b * row_len and every target is its input + 1.
    ids = torch.arange(103)
    stream = TrainStream(ids, batch_size=4, seq_len=5)  # row_len 25, so (25 - 1) // 5 = 4 windows

    assert stream.windows_per_epoch == 4
    for step in range(4):
        inputs, targets = stream.batch(step)
        assert inputs.shape == (4, 5)
        assert inputs.dtype == torch.int64
        expected = torch.arange(4).unsqueeze(1) * 25 + step * 5 + torch.arange(5)
        assert torch.equal(inputs, expected)
        assert torch.equal(targets, inputs + 1)


def test_train_stream_pure_in_step() -> None:
    stream = TrainStream(torch.randint(0, 50, (500,)), batch_size=3, seq_len=7)
    windows = stream.windows_per_epoch

    later = stream.batch(windows + 2)
    first = stream.batch(2)

    assert torch.equal(later[0], first[0])
    assert torch.equal(later[1], first[1])
    assert stream.epoch(0) == 0
    assert stream.epoch(windows - 1) == 0
    assert stream.epoch(windows) == 1
    assert stream.epoch(3 * windows + 1) == 3


def test_train_stream_exposes_sizes() -> None:
    stream = TrainStream(torch.arange(100, dtype=torch.int32), batch_size=2, seq_len=8)

    assert stream.batch_size == 2
    assert stream.seq_len == 8
    assert stream.batch(0)[0].dtype == torch.int64


def test_train_stream_batches_are_copies() -> None:
    ids = torch.arange(40)
    stream = TrainStream(ids, batch_size=2, seq_len=4)

    inputs, _ = stream.batch(0)
    inputs.zero_()

    assert torch.equal(stream.batch(0)[0][0], torch.arange(4))


def test_train_stream_exactly_one_window() -> None:
    stream = TrainStream(torch.arange(12), batch_size=2, seq_len=5)

    assert stream.windows_per_epoch == 1


def test_train_stream_too_short_raises() -> None:
    with pytest.raises(ValueError) as raised:
        TrainStream(torch.arange(11), batch_size=2, seq_len=5)

    message = str(raised.value)
    assert "11 tokens" in message
    assert "batch_size=2" in message
    assert "seq_len=5" in message
    assert "needs 12" in message


def test_train_stream_negative_step_raises() -> None:
    stream = TrainStream(torch.arange(40), batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="step"):
        stream.batch(-1)


def _collect(ids: torch.Tensor, seq_len: int, batch_size: int, bos_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(eval_windows(ids, seq_len, batch_size, bos_id))


@pytest.mark.parametrize("n_tokens", [1, 9, 10, 11, 37, 40])
def test_eval_windows_cover_every_token(n_tokens: int) -> None:
    ids = torch.randint(2, 100, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    batches = _collect(ids, seq_len=10, batch_size=3, bos_id=1)

    targets = torch.cat([t.reshape(-1) for _, t in batches])
    assert torch.equal(targets, ids)
    inputs = torch.cat([i.reshape(-1) for i, _ in batches])
    assert torch.equal(inputs, torch.cat([torch.tensor([1]), ids[:-1]]))


def test_eval_windows_batch_shapes() -> None:
    ids = torch.arange(2, 75)  # 73 tokens: 7 full windows of 10 and a last window of 3
    batches = _collect(ids, seq_len=10, batch_size=3, bos_id=1)

    assert [tuple(inputs.shape) for inputs, _ in batches] == [(3, 10), (3, 10), (1, 10), (1, 3)]
    assert all(inputs.shape == targets.shape for inputs, targets in batches)
    assert all(inputs.dtype == torch.int64 for inputs, _ in batches)


def test_eval_windows_first_input_is_bos() -> None:
    ids = torch.arange(5, 25)
    batches = _collect(ids, seq_len=10, batch_size=4, bos_id=1)

    assert len(batches) == 1
    inputs, targets = batches[0]
    assert inputs[0, 0] == 1
    assert torch.equal(inputs[0, 1:], targets[0, :-1])
    # Window 1 starts with the last target of window 0, so no token is skipped between windows.
    assert inputs[1, 0] == targets[0, -1]


def test_eval_windows_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        _collect(torch.tensor([], dtype=torch.long), 4, 2, 1)
    with pytest.raises(ValueError, match="seq_len"):
        _collect(torch.arange(10), 0, 2, 1)
