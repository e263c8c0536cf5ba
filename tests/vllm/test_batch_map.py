"""Where each row's tokens start (batch_map.row_starts): read from the attention metadata, and on a device
backend's decode-only step made on the host without reading the device tensor (a sync every step)."""

import dataclasses
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

from adallava_kernels.vllm.batch_map import row_starts  # noqa: E402


@dataclasses.dataclass
class Metadata:
    query_start_loc: torch.Tensor
    max_query_len: int
    num_actual_tokens: int


@contextmanager
def forward_context(metadata):
    context = mock.Mock(attn_metadata={"model.layers.0.self_attn.attn": metadata})
    with mock.patch("vllm.forward_context.is_forward_context_available", return_value=True), \
            mock.patch("vllm.forward_context.get_forward_context", return_value=context):
        yield


def on_device(values) -> torch.Tensor:
    """A device tensor's stand-in: the meta device holds no values, so any read of them fails."""
    return torch.tensor(values, dtype=torch.int32).to("meta")


def test_a_host_tensor_is_read_as_it_is():
    starts = torch.tensor([0, 4, 5, 6], dtype=torch.int32)
    with forward_context(Metadata(starts, max_query_len=4, num_actual_tokens=6)):
        assert row_starts(8).tolist() == [0, 4, 5, 6]


def test_a_device_decode_step_is_made_on_the_host_without_reading_the_device():
    with forward_context(Metadata(on_device([0, 1, 2, 3, 3, 3]), max_query_len=1, num_actual_tokens=3)):
        starts = row_starts(8)  # 3 decode rows; the device tensor is padded to the graph's batch of 5
    assert starts.device.type == "cpu" and starts.tolist() == [0, 1, 2, 3]


def test_a_device_step_with_a_prefill_chunk_copies_the_starts():
    with forward_context(Metadata(on_device([0, 4, 5]), max_query_len=4, num_actual_tokens=5)):
        with pytest.raises(NotImplementedError):  # meta has no values: the copy was attempted
            row_starts(8)


def test_decode_rows_past_the_steps_tokens_are_refused():
    with forward_context(Metadata(on_device([0, 1, 2]), max_query_len=1, num_actual_tokens=9)):
        with pytest.raises(RuntimeError, match="9 decode tokens, past the step's 8"):
            row_starts(8)
