"""DecodeBatch: a running decode batch that requests join and leave between steps.

Rows are slots of persistent device buffers (:mod:`.slots`): joining
writes the row's slot, leaving clears it, and nothing else in the batch is
rebuilt or copied. A :meth:`DecodeBatch.step` is a fixed sequence of
launches (:mod:`.step`) over the first ``bucket`` slots (the live rows
padded to a bucket of :data:`~.slots.BUCKETS`); it reads nothing back from
the device and its host work does not grow with the batch or the plans.
With CUDA graphs, the first step of each bucket is captured and the later
ones replay it, whatever the rows' plans; so is :meth:`DecodeBatch.prepare`,
which derives the union after rows join or leave.

Host bookkeeping per step is a counter: a row's length is its length when
it joined plus the steps since, and the pool is told when it leaves.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from ..kv_cache.pool import check_seq_ids
from ..masks import visible_positions_mask
from ..ops.common import check_tensor
from ..ops.decode_io import greedy_reference_
from ..ops.library import eager_launchers
from ..ops.paged_attention import paged_decode_splits
from ..ops.rms_norm import rms_norm
from .graphs import GraphCache
from .slots import BUCKETS, BatchSlots, bucket_of
from .step import DecodeInputs

__all__ = ["DecodeBatch", "KERNELS_OUTSIDE_LAYERS", "TRITON_KERNELS_OUTSIDE_LAYERS"]

_BATCH_IDS = itertools.count()
_LAUNCH = eager_launchers()
# The kernels a Triton decode step launches outside its layers: the embedding, the rows' rotary angles and
# lengths (step_inputs), lm_head with the final norm inside it (a row gather of every row), and the greedy
# tokens with the lengths advanced (greedy_).
KERNELS_OUTSIDE_LAYERS = 4
TRITON_KERNELS_OUTSIDE_LAYERS = 3  # of them Triton's: all but the embedding


class DecodeBatch:
    """A running decode batch of at most ``capacity`` rows (made by :meth:`PlannedDecoder.decode`).

    Row ``b`` is ``seq_ids[b]``: :meth:`step` returns one output row per live row in that order.
    :meth:`leave` moves the last row into the place of the one that left, so the order changes then.
    """

    def __init__(self, runner, slots: BatchSlots, graphs: GraphCache | None,
                 prepare_graphs: GraphCache | None = None, capacity: int | None = None) -> None:
        self.runner, self.slots, self.graphs, self.prepare_graphs = runner, slots, graphs, prepare_graphs
        # The rows it takes; its buffers hold the bucket of that (the padded rows of its largest step).
        self.capacity = slots.capacity if capacity is None else capacity
        if bucket_of(self.capacity) > slots.capacity:
            raise ValueError(f"a batch of capacity {self.capacity} needs buffers of {bucket_of(self.capacity)} "
                             f"rows (its largest bucket), got {slots.capacity}")
        self.width = slots.width
        self.id = next(_BATCH_IDS)
        self.seq_ids: list[Hashable] = []
        self.steps = 0  # steps taken
        self._row: dict[Hashable, int] = {}
        self._requests: list = []  # per row, its request
        self._offset: list[int] = []  # per row, its length minus the steps taken when it joined
        self._full_at: list[tuple[int, int, Hashable]] = []  # heap: (steps at which a row is full, its join, id)
        self._joins = itertools.count()
        self._join_of: dict[Hashable, int] = {}
        self._waiting: set[Hashable] = set()  # rows with no next token yet (joined without one)
        self._dirty = True
        self._longest = 0  # the largest offset: the longest row's length is it plus the steps taken
        self._views: dict[int, list] = {}
        self._layers = runner.slot_layers
        self._splits: dict[int, int] = {}
        # The Triton step reads each row's rotary angles from tables (the torch step calls the module).
        self._rotary = runner.rotary_tables(self.width) if runner.backend == "triton" else None

    # -- membership ------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.seq_ids)

    def join(self, seq_ids: Sequence[Hashable], tokens: torch.Tensor | None = None) -> None:
        """Add prefilled sequences as new rows; ``tokens`` ``[len(seq_ids)]`` int64 on the device: each one's
        next input (``None``: given by the next :meth:`step`). Refused with a ``ValueError`` naming the
        sequence (unknown, unprefilled, in a batch, repeated, out of room) or the problem (a full batch,
        bad tokens) before anything changes."""
        check_seq_ids(seq_ids)
        runner = self.runner
        requests = [runner.decode_request(seq_id) for seq_id in seq_ids]
        for seq_id, request in zip(seq_ids, requests):
            self._check_joinable(seq_id, request)
        if self.rows + len(seq_ids) > self.capacity:
            raise ValueError(f"the batch is full: {self.rows} rows of {self.capacity}, {len(seq_ids)} joining")
        if tokens is not None:
            self._check_tokens(tokens, len(seq_ids))
        for i, (seq_id, request) in enumerate(zip(seq_ids, requests)):
            slot = self.rows
            self.slots.join(slot, runner.row_plan(seq_id), runner.cache.model_tables(seq_id, self.width),
                            request.length, request.starts, None if tokens is None else tokens[i:i + 1])
            self._add_row(seq_id, request, waiting=tokens is None)
        self._dirty = True

    def leave(self, seq_ids: Sequence[Hashable]) -> None:
        """Remove rows; each sequence's positions are recorded in the pool and it may join a batch again
        (or be freed). Refused with a ``ValueError`` naming a sequence not in this batch, before anything
        changes."""
        check_seq_ids(seq_ids)
        for seq_id in seq_ids:
            if seq_id not in self._row:
                raise ValueError(f"sequence {seq_id!r} is not a row of this batch")
        for seq_id in seq_ids:
            self._remove_row(seq_id)
        self._dirty = True

    def close(self) -> None:
        """Every row leaves and the batch's buffers go back to the runner (for the next batch of this
        capacity and width, with its captured graphs)."""
        if self.seq_ids:
            self.leave(list(self.seq_ids))
        self.runner.release_slots(self.slots)
        self.slots = None

    def length(self, seq_id: Hashable) -> int:
        """Positions ``seq_id`` has stored (a row of this batch)."""
        return self._offset[self._row_of(seq_id)] + self.steps

    # -- stepping ----------------------------------------------------------------------------

    def step(self, tokens: torch.Tensor | None = None, *,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (``[rows]`` int64 on the device; ``None``: each row's greedy token of
        the last step, or the one it joined with); returns ``(logits [rows, vocab], next tokens [rows])``.

        They are new tensors the caller owns; ``out`` (a pair of tensors of those shapes and dtypes): the
        step's outputs are copied there instead, and ``out`` is returned (no allocation). The ids are not
        read back (a sync per step): check ids that do not come from the model where they enter
        (``check_token_ids``)."""
        if self.slots is None:
            raise ValueError("the batch is closed")
        rows = self.rows
        if rows == 0:
            raise ValueError("the batch has no rows: join sequences first")
        if tokens is None:
            if self._waiting:
                raise ValueError(f"sequence {next(iter(self._waiting))!r} joined without a token: pass tokens")
        else:
            self._check_tokens(tokens, rows)
        self._check_room()
        if out is not None:
            self._check_out(out, rows)
        self.prepare()
        slots = self.slots
        if tokens is not None:
            slots.tokens[:rows].copy_(tokens)
            self._waiting.clear()
        bucket = bucket_of(rows)
        self._views_of(bucket)  # made outside the step: a graph replays no host work
        if self.graphs is None:
            try:
                self.forward_step(bucket, self._visible_pages())
            except IndexError as error:  # the embedding, the step's first op: nothing was written yet
                self._waiting.update(self.seq_ids)  # the next step needs tokens again
                raise ValueError(f"tokens holds an id outside the vocabulary [0, {self.runner.shape.vocab_size})"
                                 ) from error
        else:
            self.graphs.run((slots.id, bucket), lambda: self.forward_step(bucket))
        self.steps += 1
        logits, next_tokens = slots.logits[:rows], slots.next_tokens[:rows]
        if out is None:
            return logits.clone(), next_tokens.clone()
        out[0].copy_(logits)
        out[1].copy_(next_tokens)
        return out

    def forward_step(self, bucket: int, visible_pages: int | None = None) -> None:
        """The step over the first ``bucket`` slots, a pure function of the batch's buffers (what a graph
        captures): the logits and next tokens go to the slots' buffers, each live row's length grows by
        one. ``visible_pages``: the torch path attends that many table columns (default: all, a fixed
        shape)."""
        runner, slots = self.runner, self.slots
        weights = runner.weights
        tokens, lengths, starts = slots.tokens[:bucket], slots.state[0, :bucket], slots.state[1, :bucket]
        h = F.embedding(tokens, weights.embed)
        inputs = self._inputs(h, lengths, starts, visible_pages)
        views, split, pages = self._views_of(bucket), self._split_of(bucket), runner.pages
        for layer, view in zip(self._layers, views):
            h = layer.decode(h, inputs, pages, view, split, runner.rope_sign)
        logits = self._logits(h)
        # The logits and greedy tokens to the batch's buffers, the tokens also as the next step's input
        # (unless the caller gives one), and each live row's length advanced.
        outputs = (slots.live[:bucket], slots.logits[:bucket], slots.next_tokens[:bucket], tokens, lengths)
        if runner.backend == "triton":
            _LAUNCH.greedy_(logits, *outputs)
        else:
            greedy_reference_(logits, *outputs)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """``lm_head`` of the final norm of ``h``: on Triton one launch, the norm inside the projection (a
        one-program norm kernel of its own would be a fixed cost of the step, at no bandwidth)."""
        runner, weights = self.runner, self.runner.weights
        if runner.backend == "triton":
            return _LAUNCH.row_gathered_linear(h, weights.lm_head, runner.vocab_rows, None, weights.norm,
                                               weights.norm_eps)
        return rms_norm(h, weights.norm, weights.norm_eps, backend=runner.backend) @ weights.lm_head.t()

    def _inputs(self, h, lengths, starts, visible_pages: int | None) -> DecodeInputs:
        """The step's per-row inputs: rotary angles at each row's position, lengths after the step; on the
        torch path also the angles broadcast over heads and the visible positions' mask."""
        runner = self.runner
        if self._rotary is not None:
            cos, sin, lengths_after = _LAUNCH.step_inputs(lengths, starts, *self._rotary)
            return DecodeInputs(cos, sin, None, None, lengths, lengths_after, starts, None)
        cos, sin = runner.weights.rotary(h[:, None], (lengths - starts).long()[:, None])
        lengths_after = lengths + 1
        mask = None
        if runner.backend == "torch":
            width = (self.width if visible_pages is None else visible_pages) * runner.cache.page_size
            mask = visible_positions_mask(lengths_after, starts, width, h.dtype)
        return DecodeInputs(cos, sin, cos[:, :, None], (sin * runner.rope_sign)[:, :, None], lengths, lengths_after,
                            starts, mask)

    # -- internals ---------------------------------------------------------------------------

    def _check_joinable(self, seq_id, request) -> None:
        if request.batch is not None:
            where = "this batch" if request.batch is self else "another decode batch"
            raise ValueError(f"sequence {seq_id!r} is already a row of {where}")
        if request.length + 1 > request.max_tokens:
            raise ValueError(f"sequence {seq_id!r} is full: {request.length} positions stored of the "
                             f"{request.max_tokens} reserved by admit")
        pages = -(-request.max_tokens // self.runner.cache.page_size)
        if pages > self.width:
            raise ValueError(f"sequence {seq_id!r} reserves {pages} pages per KV head, more than the batch's "
                             f"tables hold ({self.width}); form the batch with max_tokens >= {request.max_tokens}")

    def _check_tokens(self, tokens, rows: int) -> None:
        check_tensor("tokens", tokens, dim=1, dtypes=(torch.int64,), device=self.runner.weights.device)
        if tokens.shape[0] != rows:
            raise ValueError(f"tokens must have one entry per row ({rows}), got {tokens.shape[0]}")

    def _check_out(self, out, rows: int) -> None:
        vocab = self.runner.shape.vocab_size
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise ValueError("out must be a pair of tensors (logits, next tokens)")
        expected = ((rows, vocab), self.runner.weights.dtype), ((rows,), torch.int64)
        for name, t, (shape, dtype) in zip(("out[0]", "out[1]"), out, expected):
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != self.runner.weights.device:
                raise ValueError(f"{name} must be a {dtype} tensor of shape {list(shape)} on "
                                 f"{self.runner.weights.device}, got {t.dtype} {list(t.shape)} on {t.device}")

    def _check_room(self) -> None:
        """No row past its reserved positions: the soonest to fill is at the top of a heap (rows that left
        are dropped from it lazily), so the check costs nothing per row."""
        heap = self._full_at
        while heap and self._join_of.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        if heap and heap[0][0] <= self.steps:
            seq_id = heap[0][2]
            request = self._requests[self._row[seq_id]]
            raise ValueError(f"sequence {seq_id!r} is full: {self.length(seq_id)} positions stored of the "
                             f"{request.max_tokens} reserved by admit; let it leave")

    def _add_row(self, seq_id, request, *, waiting: bool) -> None:
        self._row[seq_id] = len(self.seq_ids)
        self.seq_ids.append(seq_id)
        self._requests.append(request)
        offset = request.length - self.steps
        self._offset.append(offset)
        self._longest = max(self._longest, offset)
        join = next(self._joins)
        self._join_of[seq_id] = join
        heapq.heappush(self._full_at, (request.max_tokens - offset, join, seq_id))
        if waiting:
            self._waiting.add(seq_id)
        request.batch = self

    def _remove_row(self, seq_id) -> None:
        row, last = self._row.pop(seq_id), self.rows - 1
        request = self._requests[row]
        stored = self._offset[row] + self.steps
        self.runner.cache.advance([seq_id], stored - request.length)
        request.length, request.batch = stored, None
        self.slots.leave(row, last)
        if row != last:
            moved = self.seq_ids[last]
            self.seq_ids[row], self._requests[row], self._offset[row] = moved, self._requests[last], self._offset[last]
            self._row[moved] = row
        for values in (self.seq_ids, self._requests, self._offset):
            values.pop()
        del self._join_of[seq_id]
        self._waiting.discard(seq_id)

    def _row_of(self, seq_id) -> int:
        try:
            return self._row[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"sequence {seq_id!r} is not a row of this batch") from None

    @property
    def buckets(self) -> tuple[int, ...]:
        """The padded batch sizes this batch's steps can take (every bucket up to its capacity's)."""
        return tuple(b for b in BUCKETS if b < self.capacity) + (bucket_of(self.capacity),)

    def warm_up(self) -> list[tuple[int, int]]:
        """Capture now, before any row joins, the graphs of every bucket the batch can take (its step's
        and its refresh's), so that no later step captures whatever rows join and leave. A warm-up step
        runs padded rows only: they write to the scratch page and their outputs are dropped. Without CUDA
        graphs (a CPU, or ``cuda_graphs=False``) nothing runs. Returns the graph keys, as
        :attr:`graph_key` names them; a ``ValueError`` if the batch has rows or is closed."""
        if self.slots is None:
            raise ValueError("the batch is closed")
        if self.rows:
            raise ValueError(f"warm_up needs an empty batch: it has {self.rows} rows (a warm-up step would "
                             "advance them)")
        slots, keys = self.slots, [(self.slots.id, bucket) for bucket in self.buckets]
        if self.graphs is not None:
            for key in keys:
                bucket = key[1]
                if key not in self.prepare_graphs:
                    self.prepare_graphs.run(key, lambda: slots.refresh(bucket))
                self._views_of(bucket)
                if key not in self.graphs:
                    self.graphs.run(key, lambda: self.forward_step(bucket))
            self._dirty = True  # the next rows' union is derived anew
        return keys

    @property
    def graph_key(self) -> tuple[int, int]:
        """What the next step's CUDA graph is keyed by: the batch's buffers and the bucket of its rows
        (the same key on every device, so a CPU can count the graphs a trace would capture)."""
        return (self.slots.id, bucket_of(self.rows))

    def prepare(self) -> None:
        """Derive the union of the rows' plans and each row's view of it, if rows joined or left since the
        last step (the next step does it otherwise): device work, a fixed sequence of launches whatever
        the batch, nothing read back except the union's sizes on a CPU for the torch backend. A server
        calls it after a round of joins and leaves, off the step's critical path."""
        if self.slots is None:
            raise ValueError("the batch is closed")
        if not self._dirty:
            return
        slots, bucket = self.slots, bucket_of(self.rows)
        if self.prepare_graphs is None:
            host_counts = self.runner.backend == "torch" and slots.device.type == "cpu" and self.graphs is None
            slots.refresh(bucket, host_counts=host_counts)
        else:  # one replay: the refresh's launches are fixed by its bucket
            self.prepare_graphs.run((slots.id, bucket), lambda: slots.refresh(bucket))
        self._longest = max(self._offset, default=0)
        for views in self._views.values():
            self._set_counts(views)
        self._dirty = False

    def _views_of(self, bucket: int) -> list:
        """The step's per-layer views of the slots over ``bucket`` rows (made once per bucket)."""
        views = self._views.get(bucket)
        if views is None:
            views = self._views[bucket] = self.slots.layer_views(bucket)
            self._set_counts(views)
        return views

    def _set_counts(self, views: list) -> None:
        if self.slots.counts is not None:
            for view, counts in zip(views, self.slots.counts):
                view.counts = counts

    def _split_of(self, bucket: int) -> int:
        if self.runner.backend != "triton":
            return 1
        split = self._splits.get(bucket)
        if split is None:
            split = self._splits[bucket] = paged_decode_splits(
                bucket, self.runner.shape.num_heads, self.width * self.runner.cache.page_size,
                self.runner.weights.device)
        return split

    def _visible_pages(self) -> int | None:
        """Eager torch steps: the table columns the longest row reads, from the host's lengths (no sync), so
        the gathered attention costs the context, not ``max_tokens``. ``None`` (every column) on the
        Triton path, whose kernel stops at each row's length on the device."""
        if self.runner.backend != "torch":
            return None
        return -(-(self._longest + self.steps + 1) // self.runner.cache.page_size)

