"""Which row of vLLM's batch each token of a forward pass belongs to: the one place this plug-in
reads vLLM's forward context.

vLLM lays out a forward's tokens request by request, rows in order (prefill chunks and decode
tokens alike); the attention metadata of the step holds where each row's tokens start
(``query_start_loc``, ``[rows + 1]``). It is read from ``vllm.forward_context.get_forward_context()``,
which every vLLM model's attention layers read; ``query_start_loc`` is an attribute of the
attention backend's metadata, not a documented interface. Tested on vLLM 0.32 (the CPU backend's
``CPUAttentionMetadata``); ``tests/vllm/test_surfaces.py`` fails if it moves.

On a GPU backend ``query_start_loc`` lives on the device, and reading it stops the host until the
step's earlier work is done. A decode-only step does not need it: its ``max_query_len`` (a host int)
is 1, so row r holds token r and ``num_actual_tokens`` is the number of rows. Only a step that holds a
prefill chunk (a request joining, or a chunked prompt going on) copies the tensor to the host.
"""

from __future__ import annotations

import torch

__all__ = ["row_starts"]


def row_starts(num_tokens: int) -> torch.Tensor | None:
    """``query_start_loc`` of the running step (int, on the host), or ``None`` where the step has no
    attention metadata (vLLM's warm-up and profiling runs: every token then runs the full plan)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batches: not served
        raise NotImplementedError("AdaLLaVA plans do not support vLLM's micro-batching (ubatching)")
    if not metadata:
        return None
    first = next(iter(metadata.values()))
    starts = getattr(first, "query_start_loc", None)
    if starts is None:
        raise RuntimeError(f"vLLM's attention metadata {type(first).__name__} has no query_start_loc: this "
                           "vLLM release is not one the AdaLLaVA plug-in was tested with")
    if starts.device.type != "cpu" and getattr(first, "max_query_len", None) == 1:
        rows = getattr(first, "num_actual_tokens", None)
        if isinstance(rows, int):
            return _decode_starts(rows, num_tokens)
    starts = starts.detach().to("cpu", torch.int64)
    if int(starts[-1]) > num_tokens:
        raise RuntimeError(f"query_start_loc ends at {int(starts[-1])}, past the step's {num_tokens} tokens")
    return starts


def _decode_starts(rows: int, num_tokens: int) -> torch.Tensor:
    """A decode-only step's row starts: one token a row, made on the host without reading the device."""
    if rows > num_tokens:
        raise RuntimeError(f"the attention metadata counts {rows} decode tokens, past the step's {num_tokens}")
    return torch.arange(rows + 1, dtype=torch.int64)
