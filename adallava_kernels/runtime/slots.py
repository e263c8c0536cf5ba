"""Bind: a running decode batch's rows as slots of persistent device buffers, and their union.

A :class:`BatchSlots` holds ``capacity`` rows. A row's slot holds what its
request's plan is on the device (:class:`~.rows.RowPlan`: the heads and
neurons it keeps in every layer), its block tables in the model's KV-head
order, its position and left padding. Joining writes one slot, leaving
clears one (the last row moves into the hole, so the live rows are always
the first ``rows``); nothing else is rebuilt, and nothing is read back.

What the kernels read is derived from the slots on the device by
:meth:`BatchSlots.refresh`, a fixed sequence of tensor ops whatever the
plans: per layer the batch's *union* (every unit some row keeps), compacted
into index lists of the full capacity padded with -1 and their counts; each
row's map from the union's query-head slots to KV slots (-1 where its own
plan lacks the head: the paged attention skips it), its mask over the
union's neurons, and its block tables in the union's KV-slot order (the
scratch page for KV heads it does not keep). The union is an OR over the
bucket's rows, taken on the device by the refresh, so joining and leaving
write one slot each and keep no running sums. On CUDA the runtime captures
the refresh as a graph per (buffers, bucket): its host cost is one replay.

The plans are data: one captured step serves every mix of plans, and a
layer no row runs is a count of 0 that the kernels read (their programs
return at once).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..shape import ModelShape
from .rows import RowPlan

__all__ = ["BatchSlots", "LayerSlots", "TorchIndex", "bucket_of", "BUCKETS"]

_IDS = itertools.count()

# Padded batch sizes a step is captured for (beyond the last: multiples of 32).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def bucket_of(rows: int) -> int:
    """The padded batch size of ``rows`` live rows: the smallest bucket that holds them."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // 32) * 32


@dataclasses.dataclass
class LayerSlots:
    """One layer's plan data for a step over the first ``rows`` slots: views of a :class:`BatchSlots`.

    ``qkv_heads`` ``[H + 2 KVH]``: the union's query heads, then its KV heads as rows of the stacked
    q|k|v weight (K, then V), each list padded with -1; ``o_cols`` ``[H * d]`` and ``o_count`` ``[1]``:
    the union's ``o_proj`` columns; ``kv_map`` ``[rows, H]``: per row, each query-head slot's KV slot
    (-1: the row's plan lacks that head); ``tables`` ``[rows, KVH, width]``: per row, each KV slot's
    pages; ``neurons`` ``[I]``, ``n_count`` ``[1]``: the union's neurons; ``n_mask`` ``[rows, I]``: 1
    where the row keeps the union's neuron in that slot. ``counts`` (host ints, or ``None``): the
    union's query heads, KV heads and neurons, where the host knows them (the torch backend on a CPU)."""

    qkv_heads: torch.Tensor
    o_cols: torch.Tensor
    o_count: torch.Tensor
    kv_map: torch.Tensor
    tables: torch.Tensor
    neurons: torch.Tensor
    n_count: torch.Tensor
    n_mask: torch.Tensor
    counts: tuple[int, int, int] | None = None
    gather: "TorchIndex | None" = None


@dataclasses.dataclass
class TorchIndex:
    """The torch backend's gathers of one layer, as int64 indices (free slots read unit 0, masked later):
    ``qkv_rows`` ``[H + 2 KVH, d]`` (rows of the stacked weight per slot of ``qkv_heads``), ``o_cols``
    ``[H * d]``, ``neurons`` ``[I]``, ``kv_map`` ``[rows, H]``."""

    qkv_rows: torch.Tensor
    o_cols: torch.Tensor
    neurons: torch.Tensor
    kv_map: torch.Tensor


def _compact(mask: torch.Tensor, out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row of ``mask`` ``[L, U]`` as the sorted indices of its set entries, padded with -1, into
    ``out`` ``[L, U]``; their numbers into ``counts`` ``[L]``. Returns each entry's slot (-1 where unset)."""
    layers, units = mask.shape
    slot = mask.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    # Unset entries all go to a dump column past the end, which is dropped.
    target = torch.where(mask, slot, units).long()
    padded = torch.full((layers, units + 1), -1, dtype=torch.int32, device=mask.device)
    padded.scatter_(1, target, torch.arange(units, dtype=torch.int32, device=mask.device).expand(layers, units))
    out.copy_(padded[:, :units])
    counts.copy_(mask.sum(-1, dtype=torch.int32))
    return torch.where(mask, slot, -1)


class BatchSlots:
    """The device buffers of a running batch of ``capacity`` rows with block tables ``width`` pages wide."""

    def __init__(self, shape: ModelShape, *, capacity: int, width: int, scratch_page: int, dtype: torch.dtype,
                 device: torch.device, torch_index: bool = False) -> None:
        self.shape, self.capacity, self.width, self.scratch_page = shape, capacity, width, scratch_page
        self.device, self.dtype = device, dtype
        self.id = next(_IDS)  # what graphs captured over these buffers are keyed by
        L, H, KVH, I, d = (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.intermediate_size,
                           shape.head_dim)
        i32 = dict(dtype=torch.int32, device=device)
        # What the rows are: written by join and leave only. Each row's kept query heads, then its kept
        # neurons, in one buffer, so a join or a leave moves a row's plan in one copy.
        self.own = torch.zeros(capacity, L, H + I, dtype=torch.bool, device=device)
        self.model_tables = torch.full((capacity, L, KVH, width), scratch_page, **i32)
        self.state = torch.zeros(2, capacity, **i32)  # positions stored, left padding
        self.live = torch.zeros(capacity, **i32)
        self.tokens = torch.zeros(capacity, dtype=torch.int64, device=device)  # each row's next input
        self.logits = torch.zeros(capacity, shape.vocab_size, dtype=dtype, device=device)
        self.next_tokens = torch.zeros(capacity, dtype=torch.int64, device=device)
        # What the kernels read: derived by refresh.
        self.qkv_heads = torch.full((L, H + 2 * KVH), -1, **i32)
        self.o_cols = torch.full((L, H * d), -1, **i32)
        self.o_count = torch.zeros(L, 1, **i32)
        self.neurons = torch.full((L, I), -1, **i32)
        self.n_count = torch.zeros(L, 1, **i32)
        self.kv_map = torch.full((capacity, L, H), -1, **i32)
        self.tables = torch.full((capacity, L, KVH, width), scratch_page, **i32)
        self.n_mask = torch.zeros(capacity, L, I, dtype=dtype, device=device)
        self._q_slots = torch.full((L, H), -1, **i32)
        self._kv_slots = torch.full((L, KVH), -1, **i32)
        self._q_count = torch.zeros(L, **i32)
        self._kv_count = torch.zeros(L, **i32)
        self._n_count = torch.zeros(L, **i32)
        self._offsets = torch.arange(d, **i32)
        self.counts: list[tuple[int, int, int]] | None = None
        self._views: dict[int, list[LayerSlots]] = {}
        self.index = None
        if torch_index:  # the torch backend's gathers, derived with the rest
            self.index = TorchIndex(torch.zeros(L, H + 2 * KVH, d, dtype=torch.long, device=device),
                                    torch.zeros(L, H * d, dtype=torch.long, device=device),
                                    torch.zeros(L, I, dtype=torch.long, device=device),
                                    torch.zeros(capacity, L, H, dtype=torch.long, device=device))

    @property
    def own_heads(self) -> torch.Tensor:
        """``[capacity, L, H]``: 1 where the row's plan keeps the query head (a view of ``own``)."""
        return self.own[..., :self.shape.num_heads]

    @property
    def own_neurons(self) -> torch.Tensor:
        """``[capacity, L, I]``: 1 where the row's plan keeps the neuron (a view of ``own``)."""
        return self.own[..., self.shape.num_heads:]

    # -- rows ----------------------------------------------------------------------------

    def join(self, slot: int, row: RowPlan, tables: torch.Tensor, length: int, start: torch.Tensor,
             token: torch.Tensor | None) -> None:
        """Write a row into the free ``slot``: its plan, its tables ``[L, KVH, width]``, its ``length``
        (positions stored), its left padding ``start`` (``[1]`` int32 on the device) and its next input
        ``token`` (``[1]`` int64, or ``None``: fed at the next step)."""
        self.own[slot].copy_(row.units)
        self.model_tables[slot].copy_(tables)
        self.state[0, slot].fill_(length)
        self.state[1, slot:slot + 1].copy_(start)
        self.live[slot].fill_(1)
        if token is not None:
            self.tokens[slot:slot + 1].copy_(token)

    def leave(self, slot: int, last: int) -> None:
        """Clear ``slot``; the row in slot ``last`` (the last live one) moves into it."""
        if slot != last:
            for buffer in (self.own, self.model_tables, self.tokens):
                buffer[slot].copy_(buffer[last])
            self.state[:, slot].copy_(self.state[:, last])
        self.own[last].zero_()
        self.model_tables[last].fill_(self.scratch_page)
        self.state[:, last].zero_()
        self.live[last].zero_()

    def clear(self) -> None:
        """Every slot free (the buffers of a closed batch, before another batch takes them)."""
        for buffer in (self.own, self.state, self.live, self.tokens):
            buffer.zero_()
        self.model_tables.fill_(self.scratch_page)

    # -- the union -------------------------------------------------------------------------

    def refresh(self, rows: int, *, host_counts: bool = False) -> None:
        """Derive what the kernels read for the first ``rows`` slots from the rows' plans, on the device (a
        fixed sequence of launches for a given ``rows``: what a graph captures). ``host_counts``: also bring the union's sizes to the host (``self.counts``; a CPU reads them
        for free, and the torch backend then computes only the union)."""
        shape = self.shape
        H, KVH, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        # Rows past the live ones are cleared slots: they add nothing to the OR.
        union = self.own[:rows].any(0)
        heads = union[:, :H]
        kv = heads.reshape(heads.shape[0], KVH, H // KVH).any(-1)
        _compact(heads, self._q_slots, self._q_count)
        kv_slot_of = _compact(kv, self._kv_slots, self._kv_count)
        _compact(union[:, H:], self.neurons, self._n_count)
        q, kv_slots = self._q_slots, self._kv_slots
        self.qkv_heads[:, :H].copy_(q)
        self.qkv_heads[:, H:H + KVH].copy_(torch.where(kv_slots >= 0, kv_slots + H, -1))
        self.qkv_heads[:, H + KVH:].copy_(torch.where(kv_slots >= 0, kv_slots + H + KVH, -1))
        self.o_cols.view(-1, H, d).copy_(torch.where(q[:, :, None] >= 0, q[:, :, None] * d + self._offsets, -1))
        self.o_count.copy_((self._q_count * d)[:, None])
        self.n_count.copy_(self._n_count[:, None])
        self._per_row(rows, kv_slot_of)
        if self.index is not None:
            index = self.index
            index.qkv_rows.copy_(self.qkv_heads.clamp(min=0)[:, :, None] * d + self._offsets)
            index.o_cols.copy_(self.o_cols.clamp(min=0))
            index.neurons.copy_(self.neurons.clamp(min=0))
            index.kv_map[:rows].copy_(self.kv_map[:rows].clamp(min=0))
        if host_counts:
            self.counts = list(zip(*(c.tolist() for c in (self._q_count, self._kv_count, self._n_count))))

    def _per_row(self, rows: int, kv_slot_of: torch.Tensor) -> None:
        """Each row's view of the union: its KV map, its neuron mask and its tables in KV-slot order."""
        if rows == 0:
            return
        shape = self.shape
        per_kv = shape.num_heads // shape.num_kv_heads
        q = self._q_slots.clamp(min=0).long()  # free slots read unit 0, and are masked out below
        valid_q = self._q_slots >= 0
        kept = torch.gather(self.own_heads[:rows], 2, q.expand(rows, *q.shape)) & valid_q
        kv_slot = torch.gather(kv_slot_of, 1, q // per_kv)
        self.kv_map[:rows].copy_(torch.where(kept, kv_slot, -1))
        n = self.neurons.clamp(min=0).long()
        keeps = torch.gather(self.own_neurons[:rows], 2, n.expand(rows, *n.shape)) & (self.neurons >= 0)
        self.n_mask[:rows].copy_(keeps)
        kvs = self._kv_slots.clamp(min=0).long()
        index = kvs[None, :, :, None].expand(rows, *kvs.shape, self.width)
        gathered = torch.gather(self.model_tables[:rows], 2, index)
        # A free KV slot writes nowhere that is read: the scratch page.
        self.tables[:rows].copy_(torch.where((self._kv_slots >= 0)[None, :, :, None], gathered, self.scratch_page))

    # -- what a step reads -------------------------------------------------------------------

    def layer_views(self, rows: int) -> list[LayerSlots]:
        """Each layer's :class:`LayerSlots` over the first ``rows`` slots, made once per ``rows`` and held
        here: a graph captured over them reads them for as long as these buffers live, whichever batch
        holds the buffers then."""
        views = self._views.get(rows)
        if views is None:
            views = self._views[rows] = self._make_views(rows)
        return views

    def _make_views(self, rows: int) -> list[LayerSlots]:
        index = self.index
        return [LayerSlots(self.qkv_heads[i], self.o_cols[i], self.o_count[i], self.kv_map[:rows, i],
                           self.tables[:rows, i], self.neurons[i], self.n_count[i], self.n_mask[:rows, i],
                           gather=None if index is None else TorchIndex(
                               index.qkv_rows[i], index.o_cols[i], index.neurons[i], index.kv_map[:rows, i]))
                for i in range(self.shape.num_layers)]
