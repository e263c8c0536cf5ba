"""DecodeBatch: decode steps of a fixed set of prefilled sequences, planned once.

Two ways to run a step, both a fixed sequence of launches that reads
nothing back from the device:

- **cohorts** (eager): each layer runs its layer programs over the rows
  whose plans agree there (:mod:`.cohorts`); the plans shape the launches.
  The eager path on a CPU, or on CUDA without graphs.
- **bound** (:mod:`.binding`): the plans are data in device buffers and the
  launches depend on the step's shape only (modes, batch size, table width
  bucket), so a CUDA graph captured for one batch is replayed by any other
  batch of that shape. Always with CUDA graphs.
"""

from __future__ import annotations

from typing import Hashable

import torch
import torch.nn.functional as F

from ..masks import visible_positions_mask
from ..ops.common import check_tensor
from ..ops.paged_attention import paged_decode_splits
from ..ops.rms_norm import rms_norm
from .binding import bind_plans, width_bucket
from .cohorts import for_cohort, list_tables, run_layer
from .graphs import GraphOwner
from .layers import DecodeInputs

__all__ = ["DecodeBatch"]


class DecodeBatch(GraphOwner):
    """Decode steps of a fixed set of prefilled sequences, planned once.

    At construction (plan time): checks, what each layer runs (its cohorts'
    programs, or with ``bound`` the batch's plans bound as data), every
    block table, all packed in device buffers, and the device state
    (``state[0]``: positions stored, ``state[1]``: left padding). A
    :meth:`step` then reads nothing back from the device. With graphs (always
    bound), the first step of a new step shape runs eagerly and is captured;
    later steps of any batch of that shape replay it with their own data.
    """

    def __init__(self, runner, seq_ids: list[Hashable], *, bound: bool = False) -> None:
        requests = runner._requests_of(seq_ids, prefilled=True)
        self.runner, self.seq_ids, self.requests = runner, seq_ids, requests
        self.batch = len(seq_ids)
        self.plans = [runner._plan_of(r) for r in requests]
        self.bound = bound
        pages = max(-(-r.max_tokens // runner.cache.page_size) for r in requests)
        if bound:
            self._bind(runner, pages)
        else:
            self._schedule_cohorts(runner, pages)
        lengths = torch.tensor([r.length for r in requests], dtype=torch.int32).to(runner.weights.device)
        self.state = torch.stack([lengths, torch.cat([r.starts for r in requests])])
        self.graphs = runner.graphs if bound else None
        for request in requests:  # a sequence's device state moves into this batch
            request.batch = self

    def _schedule_cohorts(self, runner, pages: int) -> None:
        self.width = pages
        self.schedule = runner._schedule(self.plans, range(runner.shape.num_layers))
        runner._attach_tables(self.schedule, self.seq_ids, decode=True)
        self.key = None  # an eager path: never captured
        self.views = list_tables(self.schedule)

    def _bind(self, runner, pages: int) -> None:
        self.width = width_bucket(pages)
        cache, weights = runner.cache, runner.weights
        self.binding = bind_plans(
            self.plans, lambda b, layer: cache.page_lists(self.seq_ids[b], layer), runner.shape,
            partial=weights.partial_layers, backend=runner.backend, width=self.width,
            scratch_page=cache.scratch_page, dtype=weights.dtype, device=weights.device)
        self.layers = runner._bound_layers(self.binding.modes)
        self.split = paged_decode_splits(self.batch, runner.shape.num_heads, self.width * cache.page_size,
                                         weights.device) if runner.backend == "triton" else 1
        # Batches of one step shape share a graph, whatever their plans: the key holds no plan, and its
        # modes are interned to a number once per batch, so a step hashes four small values.
        self.key = (runner._modes_id(self.binding.modes), self.batch, self.width, runner.backend)
        self.buffers = (self.binding.index, self.binding.masks)
        self.views = self.binding.views(*self.buffers)

    def views_of(self, buffers: tuple[torch.Tensor, ...]) -> list:
        """The step's per-layer plan data over buffers shaped as this batch's (a graph entry's copies)."""
        return self.binding.views(*buffers)

    # -- stepping ----------------------------------------------------------------------------

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (``[batch]`` int64 on the device); returns ``(logits [batch, vocab],
        greedy next tokens [batch])``. With CUDA graphs these are the graph's output buffers: read or
        copy them before the next step of any batch with the same key. The ids are not read back (a sync
        per step): check ids that do not come from the model's logits where they enter (``check_token_ids``)."""
        runner = self.runner
        for seq_id, request in zip(self.seq_ids, self.requests):
            if request.batch is not self:
                raise ValueError(f"sequence {seq_id!r} was freed or joined another decode batch; form a new one")
            if request.length + 1 > request.max_tokens:
                raise ValueError(f"sequence {seq_id!r} is full: {request.length} positions stored of the "
                                 f"{request.max_tokens} reserved by admit")
        check_tensor("tokens", tokens, dim=1, dtypes=(torch.int64,), device=runner.weights.device)
        if tokens.shape[0] != self.batch:
            raise ValueError(f"tokens must have one entry per row ({self.batch}), got {tokens.shape[0]}")
        if self.graphs is None:
            try:
                out = self.forward_step(tokens, self.state, self.views, self._visible_pages())
            except IndexError as error:  # the embedding, the step's first op: nothing was written yet
                raise ValueError(f"tokens holds an id outside the vocabulary [0, {runner.shape.vocab_size})") from error
        else:
            out = self.graph_step(tokens)
        runner.cache.advance(self.seq_ids, 1)
        for request in self.requests:
            request.length += 1
        return out

    def _visible_pages(self) -> int | None:
        """Eager torch steps: the table columns this step's longest row reads, from the host's lengths (no
        sync), so the gathered attention costs the context, not ``max_tokens``. ``None`` (every column) on
        the Triton path, whose kernel stops at each row's length on the device."""
        if self.runner.backend != "torch":
            return None
        longest = max(request.length for request in self.requests) + 1
        return -(-longest // self.runner.cache.page_size)

    def forward_step(self, tokens: torch.Tensor, state: torch.Tensor, views: list,
                     visible_pages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself, a pure function of its tensors (what a graph captures and ``torch.compile`` traces).
        ``views``: the per-layer plan data (bound) or block tables (cohorts) over this batch's buffers or a
        graph's. ``visible_pages``: the torch path attends that many table columns (default: all, a fixed shape)."""
        runner = self.runner
        weights = runner.weights
        lengths, starts = state[0], state[1]
        h = F.embedding(tokens, weights.embed)
        cos, sin = weights.rotary(h[:, None], (lengths - starts).long()[:, None])
        lengths_after = lengths + 1
        width = (self.width if visible_pages is None else visible_pages) * runner.cache.page_size
        mask = visible_positions_mask(lengths_after, starts, width, h.dtype) if runner.backend == "torch" else None
        every = DecodeInputs(cos, sin, cos[:, :, None], (sin * runner._rope_sign)[:, :, None], lengths,
                             lengths_after, starts, mask)
        pages = runner.pages
        if self.bound:
            for layer in self.layers:
                h = layer.decode(h, every, pages, views[layer.index], self.split)
        else:
            inputs = [for_cohort(every, rows) for rows in self.schedule.cohorts]
            for runs in self.schedule.layers:
                h = run_layer(h, runs, self.schedule.cohorts, lambda run, part: run.program.decode(
                    part, inputs[run.cohort], pages, views[run.table_index], run.split))
        logits = rms_norm(h, weights.norm, weights.norm_eps, backend=runner.backend) @ weights.lm_head.t()
        lengths.add_(1)
        return logits, logits.argmax(-1)
