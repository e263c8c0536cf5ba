"""PlannedDecoder: a transformers Llama decoder serving requests under execution plans.

Plan on the host once per request, run on the device with no host sync:

- :meth:`PlannedDecoder.admit` validates a request and reserves every KV page
  it can need (its plan's kept layers and KV heads, ``max_tokens``
  positions), or refuses it, changing nothing;
- :meth:`PlannedDecoder.prefill` runs the prompt; a scheduler that plans
  mid-prefill (AdaLLaVA, after the prefix layers) is a ``planner`` callback,
  the one place a device value may come back to the host. Rows whose plans
  agree on a layer run it together, as one cohort (:mod:`.cohorts`);
- :meth:`PlannedDecoder.decode` opens a running :class:`~.decode.DecodeBatch`
  of a fixed row capacity that prefilled requests join and leave between
  steps; each step is the same launches whatever the rows' plans
  (:mod:`.rows` -> :mod:`.slots` -> :mod:`.step`: plan, bind, run), so
  with CUDA graphs one capture per padded batch size serves every plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Callable, Hashable, Sequence

import torch

from ..checks import check_callable, check_int
from ..kv_cache import LayerSkipKVCache
from ..kv_cache.pool import check_seq_id, check_seq_ids
from ..masks import causal_mask, positions
from ..ops.common import resolve_backend
from ..ops.rope import rope_sign, rotary_tables
from ..ops.rms_norm import rms_norm
from ..plan import ExecutionPlan
from .cohorts import Schedule, attach_tables, build_schedule, for_cohort, run_layer
from .decode import DecodeBatch
from .graphs import GraphCache
from .layers import KVPages, PrefillInputs, ProgramCache
from .prompts import check_prompt
from .rows import RowPlan
from .slots import BatchSlots, bucket_of
from .step import SlotLayer
from .weights import DecoderWeights

__all__ = ["PlannedDecoder", "DecodeBatch", "Request"]

Planner = Callable[[torch.Tensor], Sequence[ExecutionPlan]]


@dataclasses.dataclass
class Request:
    """An admitted request, as the runner and its decode batches see it."""

    plan: ExecutionPlan | None  # None until set: admitted for any plan (its pages are the full plan's)
    max_tokens: int
    prefilled: bool = False
    length: int = 0  # positions stored when it last left a batch (a batch counts its steps itself)
    starts: torch.Tensor | None = None  # [1] int32 on the device: the left padding, from prefill
    batch: object = None  # the decode batch it is a row of
    row: RowPlan | None = None  # its plan in the form a batch reads, made once per plan


def width_bucket(pages: int) -> int:
    """Table widths a batch holds: the next power of two, so requests of nearby ``max_tokens`` share one."""
    return 1 << max(0, pages - 1).bit_length()


class PlannedDecoder:
    """A Llama decoder whose requests each run their own :class:`ExecutionPlan`, over a paged KV pool.

    Build it with :meth:`from_hf`. It holds the weights in the kernels'
    layout (:class:`~adallava_kernels.runtime.weights.DecoderWeights`) and a
    :class:`~adallava_kernels.LayerSkipKVCache` of ``num_pages`` pages
    (``self.cache``). ``backend``: ``"triton"`` (gathered and paged Triton
    kernels), ``"torch"`` (PyTorch ops; the CPU path) or ``"auto"`` (Triton
    on CUDA). ``cuda_graphs``: replay decode steps as CUDA graphs (on CUDA,
    with the Triton backend), at most ``max_graphs`` of them, one per running
    batch's buffers and padded batch size.

    All validation happens at admission, at plan time and when a request
    joins a decode batch; prefill layers and decode steps read no device
    value back. ``graph_stats()`` reports what graph captures cost.
    """

    def __init__(
        self, weights: DecoderWeights, *, num_pages: int, page_size: int = 16, backend: str = "auto",
        cuda_graphs: bool = True, max_graphs: int = 16,
    ) -> None:
        if not isinstance(weights, DecoderWeights):
            raise TypeError(f"weights must be DecoderWeights, got {type(weights).__name__}")
        check_int("max_graphs", max_graphs, 1)
        self.weights, self.shape = weights, weights.shape
        self.backend = resolve_backend("PlannedDecoder", backend, weights.device, _has_triton())
        self.cache = self._new_pool(num_pages, page_size)
        graphs = cuda_graphs and weights.device.type == "cuda" and self.backend == "triton"
        self.graphs = GraphCache(max_graphs) if graphs else None
        # A batch's refresh after joins and leaves, captured per (buffers, bucket) like its step.
        self.prepare_graphs = GraphCache(max_graphs) if graphs else None
        self._requests: dict[Hashable, Request] = {}
        self.programs = ProgramCache(weights, self.backend)
        self._full = ExecutionPlan.full(self.shape)
        self.programs.acquire(self._full)  # held for good: most prefill rows run it
        self.rope_sign = rope_sign(self.shape.head_dim, weights.dtype, weights.device)
        # Every row of lm_head, as a decode step's row gather reads them (its final norm inside).
        self.vocab_rows = torch.arange(weights.lm_head.shape[0], dtype=torch.int32, device=weights.device)
        self.pages = KVPages.of(self.cache.pages)  # the pool's pages, as the layers read them
        self.slot_layers = [SlotLayer(i, layer, self.backend) for i, layer in enumerate(weights.layers)]
        self._slot_sets: dict[tuple[int, int], list[BatchSlots]] = {}  # (capacity, width) -> idle buffers
        self._rotary_tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # width -> (cos, sin)

    @classmethod
    def from_hf(
        cls, model, *, lm_head=None, num_pages: int, page_size: int = 16, backend: str = "auto",
        partial_layers=None, cuda_graphs: bool = True, max_graphs: int = 16,
    ) -> "PlannedDecoder":
        """From a transformers ``LlamaForCausalLM``, ``LlavaForConditionalGeneration`` (its language model),
        or a ``LlamaModel`` with ``lm_head``. ``partial_layers``: the layers a plan may run with only some
        heads or neurons (default all; each gets column-major copies of ``o_proj`` and ``down_proj``)."""
        weights = DecoderWeights.from_hf(model, lm_head=lm_head, partial_layers=partial_layers)
        return cls(weights, num_pages=num_pages, page_size=page_size, backend=backend, cuda_graphs=cuda_graphs,
                   max_graphs=max_graphs)

    # -- requests ------------------------------------------------------------------

    def pages_for(self, plan: ExecutionPlan | None, max_tokens: int) -> int:
        """Pages a request under ``plan`` (``None``: any plan) for ``max_tokens`` positions reserves."""
        return self.cache.pages_for(self._full if plan is None else plan, max_tokens)

    def admit(self, seq_id: Hashable, plan: ExecutionPlan | None, max_tokens: int) -> None:
        """Admit ``seq_id`` for at most ``max_tokens`` positions (prompt and generated tokens that are fed back).

        Reserves every KV page the request can need: its plan's, or, with
        ``plan=None`` (a scheduler that plans during prefill), the full plan's,
        narrowed by :meth:`set_plan`. A request whose pages cannot be reserved
        is refused with a ``ValueError`` saying how many it needs and how many
        are free; nothing changes for the other sequences.
        """
        check_seq_id(seq_id)
        if seq_id in self._requests:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        check_int("max_tokens", max_tokens, 1)
        if plan is not None:
            self._check_plan(plan)
        self.cache.add_sequence(seq_id, self._full if plan is None else plan, max_tokens, reserve=True)
        self._requests[seq_id] = Request(plan, max_tokens)

    def set_plan(self, seq_id: Hashable, plan: ExecutionPlan) -> None:
        """Give ``seq_id`` its plan before its first decode step (or from a prefill ``planner``).

        Pages of the KV heads the plan drops go back to the pool, those it
        adds are taken (a ``ValueError`` when they are not free). Layers that
        already ran must run the same units under the new plan.
        """
        request = self._request(seq_id)
        if request.prefilled:
            raise ValueError(f"sequence {seq_id!r} has run its prefill: its plan is fixed")
        self._check_plan(plan)
        self._replan(seq_id, request, plan)

    def _replan(self, seq_id: Hashable | None, request: Request, plan: ExecutionPlan | None) -> None:
        """``request`` (``seq_id``'s in the pool, or ``None``: a forward's, which holds no pages) under ``plan``
        (``None``: any plan, the full plan's pages), its pages moved with it; on failure nothing changes."""
        if seq_id is not None:
            self.cache.set_plan(seq_id, self._full if plan is None else plan)
        request.plan, request.row = plan, None

    def free(self, seq_id: Hashable) -> None:
        """Return the pages of ``seq_id`` to the pool and forget it (a row of a decode batch leaves it first)."""
        request = self._request(seq_id)
        if request.batch is not None:
            request.batch.leave([seq_id])
        self.cache.free(seq_id)
        del self._requests[seq_id]

    def plan(self, seq_id: Hashable) -> ExecutionPlan | None:
        return self._request(seq_id).plan

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        return tuple(self._requests)

    def resize_pool(self, num_pages: int) -> None:
        """Replace the KV pool by an empty one of ``num_pages`` pages (only while no sequence is admitted;
        the captured graphs, which read the old pool, are dropped)."""
        if self._requests:
            raise ValueError(f"resize_pool needs an empty pool; {len(self._requests)} sequences are admitted")
        self.cache = self._new_pool(num_pages, self.cache.page_size)
        self.pages = KVPages.of(self.cache.pages)  # the pool's pages, as the layers read them
        self._slot_sets.clear()  # their tables name the old pool's scratch page
        for graphs in (self.graphs, self.prepare_graphs):
            if graphs is not None:
                graphs.clear()

    def graph_stats(self) -> dict:
        """The graph cache's captures, the wall seconds of their warm-up steps and of the recordings, the
        replays and the evictions; ``prepare``: the same of the batches' refresh graphs (``{"enabled": False}``
        without graphs: on a CPU, or ``cuda_graphs=False``)."""
        if self.graphs is None:
            return {"enabled": False}
        stats = {"enabled": True, "cached": len(self.graphs), "max_graphs": self.graphs.max_graphs,
                 "keys": [key[1] for key in self.graphs.keys()], **self.graphs.stats.as_dict()}
        if self.prepare_graphs is not None:
            stats["prepare"] = {"cached": len(self.prepare_graphs), **self.prepare_graphs.stats.as_dict()}
        return stats

    # -- prefill -------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self, seq_ids: Sequence[Hashable], inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
        *, planner: Planner | None = None, plan_after: int | None = None, logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run the prompts of ``seq_ids`` (row ``b`` is ``seq_ids[b]``) and store their K/V in the pool.

        Args:
            inputs_embeds: ``[batch, T, hidden]`` in the weights' dtype, on their device.
            attention_mask: ``[batch, T]`` left padding (1: token, 0: padding), or ``None``.
            planner: called once with the hidden states ``[batch, T, hidden]`` entering layer
                ``plan_after``; returns one plan per row, set with :meth:`set_plan`
                before the remaining layers run. Every row's plan is checked before any is
                set, and a call that fails (a bad plan, pages not free for one row, an error
                in a later layer) leaves every sequence under the plan it had.
            logits_to_keep: logits of the last this many positions (0: all).

        Returns:
            ``[batch, logits_to_keep or T, vocab]`` logits.
        """
        self._check_planner(planner, plan_after)
        requests = self._requests_of(seq_ids, prefilled=False)
        seq = self._check_prompt(inputs_embeds, attention_mask, len(seq_ids), left_padding=True)
        for seq_id, request in zip(seq_ids, requests):
            if seq > request.max_tokens:
                raise ValueError(f"sequence {seq_id!r}: a prompt of {seq} positions exceeds its max_tokens "
                                 f"{request.max_tokens}")
        logits, starts = self._run_prompt(inputs_embeds, attention_mask, list(seq_ids), requests, planner,
                                          plan_after, logits_to_keep)
        self.cache.advance(list(seq_ids), seq)
        for b, request in enumerate(requests):
            request.prefilled, request.length, request.starts = True, seq, starts[b:b + 1]
        return logits

    @torch.no_grad()
    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
        plans: Sequence[ExecutionPlan] | None = None, *, planner: Planner | None = None, plan_after: int | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, list[ExecutionPlan]]:
        """A planned forward over whole sequences that stores no K/V: ``plans`` (one per row), or the full
        plan until ``planner`` gives them at ``plan_after``. ``attention_mask`` may pad anywhere (it makes
        no sync). Returns the logits and the plans run."""
        self._check_planner(planner, plan_after)
        batch = inputs_embeds.shape[0] if isinstance(inputs_embeds, torch.Tensor) else 0
        self._check_prompt(inputs_embeds, attention_mask, batch, left_padding=False)
        rows = [self._full] * batch if plans is None else _plans_per_row("plans", plans, batch)
        for plan in rows:
            self._check_plan(plan)
        requests = [Request(plan, inputs_embeds.shape[1]) for plan in rows]
        logits, _ = self._run_prompt(inputs_embeds, attention_mask, None, requests, planner, plan_after,
                                     logits_to_keep)
        return logits, [r.plan for r in requests]

    def _check_planner(self, planner, plan_after) -> None:
        """A planner that can be called and the layer it plans at, checked before any layer runs."""
        if planner is None:
            return
        check_callable("planner", planner)
        layers = self.shape.num_layers
        if isinstance(plan_after, bool) or not isinstance(plan_after, int) or not 0 <= plan_after <= layers:
            raise ValueError(f"plan_after must be an int in [0, {layers}] with a planner, got {plan_after!r}")

    def _acquire_all(self, plans: Sequence[ExecutionPlan]) -> None:
        """Every plan's programs, or none of them."""
        acquired = []
        try:
            for plan in plans:
                self.programs.acquire(plan)
                acquired.append(plan)
        except BaseException:
            for plan in acquired:
                self.programs.release(plan)
            raise

    def _run_prompt(self, h, mask, seq_ids, requests, planner, plan_after, logits_to_keep):
        layers = self.shape.num_layers
        batch, seq, _ = h.shape
        padding = None if mask is None else mask.to(torch.int32)
        if mask is None:
            mask = torch.ones(batch, seq, dtype=torch.int32, device=h.device)
        cos, sin = self.weights.rotary(h, positions(mask))
        shared = PrefillInputs(cos, sin, cos[:, :, None], (sin * self.rope_sign)[:, :, None],
                               causal_mask(mask, seq, h.dtype), padding,
                               torch.zeros(batch, dtype=torch.int32, device=h.device))
        starts = (seq - mask.sum(-1)).to(torch.int32)
        stop = plan_after if planner is not None else layers
        h = self._prefill_layers(h, 0, stop, shared, seq_ids, requests)
        undo = self._apply_planner(planner, h, seq_ids, requests, stop) if planner is not None else None
        try:
            h = self._prefill_layers(h, stop, layers, shared, seq_ids, requests)
            keep = seq if logits_to_keep == 0 else logits_to_keep
            hidden = rms_norm(h[:, seq - keep:], self.weights.norm, self.weights.norm_eps, backend=self.backend)
            return hidden @ self.weights.lm_head.t(), starts
        except BaseException:
            if undo is not None:  # the call failed after planning: every row back under the plan it had
                undo()
            raise

    def _prefill_layers(self, h, start, stop, shared: PrefillInputs, seq_ids, requests):
        if start == stop:
            return h
        plans = [self._plan_of(r) for r in requests]
        # Layer programs live while a prefill runs them: decode steps read the plans as data.
        self._acquire_all(plans)
        try:
            schedule = self._schedule(plans, range(start, stop))
            if seq_ids is not None:
                self._attach_tables(schedule, seq_ids)
            inputs = [for_cohort(shared, rows) for rows in schedule.cohorts]
            pages = self.pages if seq_ids is not None else None
            for runs in schedule.layers:
                h = run_layer(h, runs, schedule.cohorts, lambda run, part: run.program.prefill(
                    part, inputs[run.cohort], pages, run.tables))
            return h
        finally:
            for plan in plans:
                self.programs.release(plan)

    def _apply_planner(self, planner, h, seq_ids, requests, ran: int) -> Callable[[], None]:
        """Call ``planner`` on ``h``, check every row's plan (its type, its shape, the ``ran`` layers it must
        leave as they ran), then set them all; returns what sets them back. If setting one fails (its pages
        are not free), the rows set before it are set back first: the call changes nothing."""
        plans = _plans_per_row("the planner", planner(h), len(requests), returned=True)
        for b, (request, plan) in enumerate(zip(requests, plans)):
            self._check_plan(plan, f"the planner's plan for row {b}")
            before = self._plan_of(request)
            changed = [i for i in range(ran) if (plan.heads[i], plan.neurons[i]) != (before.heads[i], before.neurons[i])]
            if changed:
                raise ValueError(f"the plan of row {b} changes layers {changed}, which ran before the planner")
        applied: list[tuple[int, ExecutionPlan | None]] = []

        def undo() -> None:
            while applied:  # last first: each row's old pages were free when it left them
                b, before = applied.pop()
                self._replan(None if seq_ids is None else seq_ids[b], requests[b], before)

        try:
            for b, (request, plan) in enumerate(zip(requests, plans)):
                before = request.plan
                self._replan(None if seq_ids is None else seq_ids[b], request, plan)
                applied.append((b, before))
        except BaseException:
            undo()
            raise
        return undo

    # -- decode --------------------------------------------------------------------------

    def decode(self, seq_ids: Sequence[Hashable] = (), tokens: torch.Tensor | None = None, *,
               capacity: int | None = None, max_tokens: int | None = None) -> DecodeBatch:
        """A running decode batch of at most ``capacity`` rows (default: the bucket of ``seq_ids``), with
        ``seq_ids`` joined (``tokens``: their next inputs, or ``None``: given at the first step). Requests
        of up to ``max_tokens`` positions may join it (default: those of ``seq_ids``, rounded up to a
        power of two of pages). Its buffers (rows for the bucket of ``capacity``) are the runner's, reused
        by the next batch of that bucket and width once it is closed (with the CUDA graphs captured over them)."""
        check_seq_ids(seq_ids)
        requests = [self.decode_request(seq_id) for seq_id in seq_ids]
        if capacity is None:
            capacity = bucket_of(max(1, len(seq_ids)))
        check_int("capacity", capacity, 1)
        if max_tokens is None:
            if not requests:
                raise ValueError("decode() with no sequences needs max_tokens: the longest request that may join")
            max_tokens = max(r.max_tokens for r in requests)
        check_int("max_tokens", max_tokens, 1)
        width = width_bucket(-(-max_tokens // self.cache.page_size))
        # Buffers of the capacity's bucket: a step pads the live rows to a bucket, the largest that one.
        batch = DecodeBatch(self, self._take_slots(bucket_of(capacity), width), self.graphs, self.prepare_graphs,
                            capacity)
        try:
            batch.join(list(seq_ids), tokens)
        except BaseException:
            batch.close()
            raise
        return batch

    def decode_request(self, seq_id: Hashable) -> Request:
        """The request of ``seq_id``, for a decode batch to join: admitted and prefilled, else a ``ValueError``."""
        request = self._request(seq_id)
        if not request.prefilled:
            raise ValueError(f"sequence {seq_id!r} has not run its prefill")
        return request

    def row_plan(self, seq_id: Hashable) -> RowPlan:
        """The plan of ``seq_id`` on the device, as a decode batch's slot holds it (made once per plan)."""
        request = self._request(seq_id)
        if request.row is None:
            request.row = RowPlan.of(self._plan_of(request), self.weights.device)
        return request.row

    def rotary_tables(self, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary module's ``(cos, sin)`` rows of every position a decode batch of ``width`` pages per KV
        head can reach, which its Triton step reads (:func:`~adallava_kernels.ops.rope.rotary_tables`; ``None``
        for a rope type that rescales with the length: the step calls the module). Made once per width."""
        if width not in self._rotary_tables:
            self._rotary_tables[width] = rotary_tables(self.weights.rotary, width * self.cache.page_size,
                                                       self.weights.embed)
        return self._rotary_tables[width]

    def release_slots(self, slots: BatchSlots) -> None:
        """Take back a closed batch's buffers, cleared, for the next batch of their capacity and width."""
        slots.clear()
        self._slot_sets.setdefault((slots.capacity, slots.width), []).append(slots)

    def _take_slots(self, capacity: int, width: int) -> BatchSlots:
        idle = self._slot_sets.get((capacity, width))
        if idle:
            return idle.pop()
        return BatchSlots(self.shape, capacity=capacity, width=width, scratch_page=self.cache.scratch_page,
                          dtype=self.weights.dtype, device=self.weights.device, torch_index=self.backend == "torch")

    # -- internals -------------------------------------------------------------------------

    def _new_pool(self, num_pages: int, page_size: int) -> LayerSkipKVCache:
        # The scratch page takes what bound steps write for units a row's own plan lacks.
        return LayerSkipKVCache(self.shape, num_pages=num_pages, page_size=page_size, dtype=self.weights.dtype,
                                device=self.weights.device, scratch_page=True)

    def _request(self, seq_id: Hashable) -> Request:
        try:
            return self._requests[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"sequence {seq_id!r} is not admitted (never, or freed)") from None

    def _requests_of(self, seq_ids: Sequence[Hashable], *, prefilled: bool) -> list[Request]:
        """The requests of ``seq_ids`` (at least one, distinct, admitted), each prefilled or not as asked."""
        if not seq_ids:
            raise ValueError("seq_ids must name at least one admitted sequence, got none")
        check_seq_ids(seq_ids)
        requests = [self._request(s) for s in seq_ids]
        for seq_id, request in zip(seq_ids, requests):
            if request.prefilled != prefilled:
                state = "has run its prefill already" if request.prefilled else "has not run its prefill"
                raise ValueError(f"sequence {seq_id!r} {state}")
        return requests

    def _plan_of(self, request: Request) -> ExecutionPlan:
        return self._full if request.plan is None else request.plan

    def _check_plan(self, plan: ExecutionPlan, name: str = "plan") -> None:
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"{name} must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        if self.backend != "triton":
            return
        shape, partial = self.shape, self.weights.partial_layers
        heads, neurons = plan.unit_counts()
        for i in range(shape.num_layers):
            if i in partial:
                continue
            if heads[i] not in (0, shape.num_heads) or neurons[i] not in (0, shape.intermediate_size):
                raise ValueError(
                    f"{name} keeps only some units of layer {i}, which was not prepared for partial plans (its "
                    "index is not in the runner's partial_layers): run it whole or skip it")

    def _check_prompt(self, h, mask, batch: int, *, left_padding: bool) -> int:
        return check_prompt(h, mask, batch, self.shape.hidden_size, self.weights.dtype, self.weights.device,
                            left_padding=left_padding)

    def _schedule(self, plans: Sequence[ExecutionPlan], layers) -> Schedule:
        """Per layer, its programs and the cohorts each runs (a skipped layer runs nothing)."""
        return build_schedule([self.programs.of(plan) for plan in plans], layers, self.weights.device)

    def _attach_tables(self, schedule: Schedule, seq_ids) -> None:
        """Each run's block tables ``[cohort rows, kv_heads, width]`` (stacked on the device, widths padded)."""
        width = max(-(-self._request(s).max_tokens // self.cache.page_size) for s in seq_ids)
        attach_tables(schedule, self.cache.page_table, seq_ids, width)


def _plans_per_row(name: str, plans: object, rows: int, *, returned: bool = False) -> list:
    """``plans`` as a list of one entry per row, else a ``TypeError`` (not a sequence of plans: a string, a
    mapping, a single plan, ``None``) or ``ValueError`` (another count) that names ``name``, the type it got and
    what it expected; ``returned``: ``name`` returned them (a planner)."""
    verb = "return" if returned else "hold"
    expected = f"a sequence of {rows} ExecutionPlan{'s' if rows != 1 else ''}, one per row"
    if isinstance(plans, (ExecutionPlan, str, bytes, Mapping)) or not isinstance(plans, Iterable):
        raise TypeError(f"{name} must {verb} {expected}, got {type(plans).__name__}")
    plans = list(plans)
    if len(plans) != rows:
        raise ValueError(f"{name} must {verb} one plan per row ({rows}), got {len(plans)}")
    return plans


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return True
