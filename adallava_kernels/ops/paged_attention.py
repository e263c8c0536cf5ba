"""Decode attention that reads a :class:`~adallava_kernels.LayerSkipKVCache`'s pages in place.

One new query per sequence and active head attends the keys its sequence
stores in positions ``[starts[b], lengths[b])`` (``starts``: the left
padding; ``lengths``: positions stored, this step's included), read through
the block table ``[batch, kept KV heads, pages]`` of the layer. Sequence
lengths live on the device, so a decode step launches the same grid whatever
the context: the reduction is split over the context in a number of splits
fixed by the table's width (the sequences' ``max_tokens``), which is what
lets a step be captured once as a CUDA graph and replayed.

``head_to_kv`` maps each query head to its KV slot of the block table: one
map for every sequence (``[heads]``) or one per sequence (``[batch, heads]``,
each row's own plan); -1 marks a free slot, which attends nothing and gives 0.

- :func:`paged_decode_attention_reference`: PyTorch, gathers the pages
  (``O(max_tokens)`` per call): the oracle and the CPU path;
- :func:`paged_decode_attention_triton`: one program per (sequence, head,
  split) streams its pages with an online softmax; the last split of each
  (sequence, head) combines them in the same launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import visible_positions_mask
from .common import check_tensor

__all__ = [
    "check_head_to_kv",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "paged_decode_splits",
    "visible_positions_mask",
]


def attend_gathered_pages(
    q: torch.Tensor, pages: torch.Tensor, head_tables: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA of ``q`` ``[batch, heads, 1, d]`` over the pages ``head_tables`` ``[batch, heads, width]`` names.

    ``pages`` is the pool's ``[2, num_pages, page_size, d]`` (K and V), so one
    indexing op fetches both; ``head_tables`` has one row per query head (its
    KV head's pages), which is how GQA is served. ``mask``: from
    :func:`visible_positions_mask`. Returns ``[batch, heads, 1, d]``.
    """
    batch, heads, width = head_tables.shape
    kv = pages[:, head_tables].view(2, batch, heads, width * pages.shape[2], pages.shape[3])
    k, v = kv.unbind(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def check_head_to_kv(head_to_kv: object, q: torch.Tensor) -> torch.Tensor:
    """``head_to_kv`` as the paged decode attention takes it: int32 or int64, ``[heads]`` or ``[batch, heads]``
    for ``q`` ``[batch, heads, d]``. Only its metadata is read (no sync with the device): its values are
    the plan's, checked when the plan was built."""
    head_to_kv = check_tensor("head_to_kv", head_to_kv, dtypes=(torch.int32, torch.int64), device=q.device)
    batch, heads = q.shape[0], q.shape[1]
    if head_to_kv.dim() not in (1, 2) or head_to_kv.shape[-1] != heads or (
            head_to_kv.dim() == 2 and head_to_kv.shape[0] != batch):
        raise ValueError(f"head_to_kv must be [heads] = [{heads}] or [batch, heads] = [{batch}, {heads}] "
                         f"(q is [batch, heads, d]), got shape {list(head_to_kv.shape)}")
    return head_to_kv


def paged_decode_attention_reference(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``q`` ``[batch, heads, d]`` -> ``[batch, heads, d]``; ``block_tables`` ``[batch, kv_heads, width]``;
    ``head_to_kv`` ``[heads]`` or ``[batch, heads]``, 0 where it holds -1."""
    check_head_to_kv(head_to_kv, q)
    kv = head_to_kv.long()
    free = kv < 0
    kv = kv.clamp(min=0)
    if kv.dim() == 1:
        head_tables = block_tables.index_select(1, kv)
    else:
        head_tables = block_tables.gather(1, kv[:, :, None].expand(-1, -1, block_tables.shape[2]))
    mask = visible_positions_mask(lengths, starts, block_tables.shape[2] * pages.shape[2], q.dtype)
    out = attend_gathered_pages(q[:, :, None], pages, head_tables, mask, scale)[:, :, 0]
    return out.masked_fill(free[..., None], 0.0)


# Programs an SM runs at once of the paged decode kernel at head_dim 128 (its shared memory: K and V tiles
# in flight); the static check of the compiled kernel (tests/test_kernels_static.py) holds it to this.
PAGED_DECODE_RESIDENT = 2


def paged_decode_splits(batch: int, heads: int, max_positions: int, device: torch.device) -> int:
    """Splits of each (sequence, head) in a decode step: enough programs for one full wave over the GPU
    (its SMs x :data:`PAGED_DECODE_RESIDENT`), rounded down so no wave is left part-filled, and at most one
    split per block of positions the pages can hold (``max_tokens``, not the current length, so the grid is
    fixed for a captured step)."""
    from .triton_utils import MAX_SPLITS, min_per_split, multiprocessors

    programs = batch * heads
    if programs == 0:
        return 1
    slots = multiprocessors(device) * PAGED_DECODE_RESIDENT
    blocks = max(1, -(-max_positions // min_per_split(64)))
    return max(1, min(slots // programs, blocks, MAX_SPLITS // 2))


def paged_decode_attention_triton(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path of :func:`paged_decode_attention_reference`; a row with nothing visible gives 0.
    Of its inputs it checks only ``head_to_kv``'s metadata (:func:`check_head_to_kv`)."""
    from .paged_decode_kernel import launch_paged_decode

    check_head_to_kv(head_to_kv, q)
    return launch_paged_decode(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, out)
