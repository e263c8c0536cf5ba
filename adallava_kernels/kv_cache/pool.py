"""The paged layer-skip KV pool: host bookkeeping of pages, sequences and plans.

Its data moves through the extension's ops (:mod:`.ops`: C++ on CPU, CUDA on
GPU); :mod:`.layers` adapts it to ``masked_attention`` and transformers; the
plan runtime (:mod:`adallava_kernels.runtime`) reads and writes its pages in
place through the page tables kept here.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import torch

from ..checks import check_device, check_int
from ..plan import ExecutionPlan
from ..shape import ModelShape
from .layers import PagedCacheLayer, check_storable
from .ops import cache_ops

__all__ = ["LayerSkipKVCache", "check_seq_id", "check_seq_ids"]


def check_seq_id(seq_id) -> None:
    """A sequence id keys dictionaries of the pool and of the runtime: it must be hashable."""
    try:
        hash(seq_id)
    except TypeError:
        raise ValueError(
            f"seq_id must be hashable (an int, a str or a tuple of them), got a {type(seq_id).__name__}: {seq_id!r}"
        ) from None


def check_seq_ids(seq_ids: Sequence[Hashable]) -> None:
    """A sequence of hashable ids, none repeated (a string is one id, not a sequence of them)."""
    if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence):
        raise TypeError(f"seq_ids must be a sequence of sequence ids (a list), got {type(seq_ids).__name__}")
    for seq_id in seq_ids:
        check_seq_id(seq_id)
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"seq_ids must not repeat a sequence, got {list(seq_ids)!r}")


@dataclasses.dataclass
class _Sequence:
    plan: ExecutionPlan
    max_tokens: int
    reserved: bool  # every page for max_tokens taken at admission
    lengths: list[int]  # per layer: positions stored
    pages: list[list[list[int]]]  # per layer, per kept KV head: page ids in position order
    tables: list[torch.Tensor | None]  # per layer: int32 [kept KV heads, pages], on the pool's device


class LayerSkipKVCache:
    """A paged KV pool that stores only the (layer, KV head) pairs each sequence's plan keeps.

    Page ``p`` holds ``page_size`` positions of one (layer, KV head) slice:
    K in ``k_pages[p]`` and V in ``v_pages[p]`` (two views of one ``pages``
    tensor ``[2, num_pages, page_size, head_dim]``). Pages are taken only for
    the layers a sequence's plan runs and the KV heads their active query
    heads read, so a lower budget holds more sequences. A sequence takes its
    pages either as its tokens arrive, or all at once when it is added with
    ``reserve=True``, as the plan runtime admits requests (then no page is
    taken mid-decode, and a request that cannot be served is refused at
    admission). Every call checks its input before it changes anything: a
    rejected call leaves every sequence as it was.

    Args:
        shape: the model.
        num_pages: pages in the pool (each K plus V of ``page_size`` positions of one head).
        page_size: positions per page.
        dtype, device: of the stored K/V.
        scratch_page: also hold one page that no sequence owns (``self.scratch_page``, after the
            ``num_pages``): where a batch's bound plans send the K/V a row does not keep (a unit of the
            batch's union that its own plan lacks), so they land nowhere that is read as data.
    """

    def __init__(
        self, shape: ModelShape, *, num_pages: int, page_size: int = 16,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", scratch_page: bool = False,
    ) -> None:
        if not isinstance(shape, ModelShape):
            raise ValueError(f"shape must be a ModelShape, got {type(shape).__name__}")
        check_int("num_pages", num_pages, 1)
        check_int("page_size", page_size, 1)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        device = check_device("device", device)
        self.shape = shape
        self.page_size = page_size
        self.ops = cache_ops()
        # K and V in one tensor, so a reader can fetch both pages of a table entry in one indexing op.
        self.pages = torch.zeros(2, num_pages + scratch_page, page_size, shape.head_dim, dtype=dtype, device=device)
        self._num_pages = num_pages
        self.scratch_page: int | None = num_pages if scratch_page else None
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pages are taken from the end
        self._sequences: dict[Hashable, _Sequence] = {}

    # -- accounting ------------------------------------------------------------

    @property
    def k_pages(self) -> torch.Tensor:
        return self.pages[0]

    @property
    def v_pages(self) -> torch.Tensor:
        return self.pages[1]

    @property
    def num_pages(self) -> int:
        """Pages sequences can take (the scratch page is not one of them)."""
        return self._num_pages

    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: K and V of ``page_size`` positions of one head."""
        return 2 * self.page_size * self.shape.head_dim * self.pages.element_size()

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.page_bytes

    def sequence_bytes(self, seq_id: Hashable) -> int:
        seq = self._sequence(seq_id)
        return sum(len(head) for layer in seq.pages for head in layer) * self.page_bytes

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        return tuple(self._sequences)

    def pages_for(self, plan: ExecutionPlan, max_tokens: int) -> int:
        """Pages a sequence under ``plan`` takes for ``max_tokens`` positions (for admission control)."""
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        check_int("max_tokens", max_tokens, 1)
        per_head = -(-max_tokens // self.page_size)
        return per_head * sum(len(plan.kv_heads(layer)) for layer in range(self.shape.num_layers))

    # -- sequences -------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, plan: ExecutionPlan, max_tokens: int, *, reserve: bool = False) -> None:
        """Admit ``seq_id`` with its plan, for at most ``max_tokens`` positions.

        With ``reserve`` it takes every page those positions need now (a
        ``ValueError`` says how many it needs and how many are free when they
        are not); otherwise pages are taken as positions are appended.
        """
        check_seq_id(seq_id)
        if seq_id in self._sequences:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        needed = self.pages_for(plan, max_tokens)
        if reserve and needed > len(self._free):
            raise ValueError(
                f"KV pool exhausted: sequence {seq_id!r} needs {needed} pages for {max_tokens} positions under "
                f"its plan, {len(self._free)} of {self.num_pages} are free"
            )
        layers = self.shape.num_layers
        seq = _Sequence(plan, max_tokens, bool(reserve), [0] * layers,
                        [[[] for _ in plan.kv_heads(layer)] for layer in range(layers)], [None] * layers)
        if reserve:
            self._take_all(seq, range(layers))
        self._sequences[seq_id] = seq

    def free(self, seq_id: Hashable) -> None:
        """Return every page of ``seq_id`` to the pool and forget it."""
        seq = self._sequence(seq_id)
        for layer in range(self.shape.num_layers):
            self._release(seq, layer)
        del self._sequences[seq_id]

    def clear(self, seq_id: Hashable, layer: int | None = None) -> None:
        """Drop the stored positions of ``seq_id`` (of one ``layer``, or all); the sequence stays, with
        its plan. A sequence added with ``reserve`` keeps its pages; otherwise they return to the pool."""
        seq = self._sequence(seq_id)
        for i in range(self.shape.num_layers) if layer is None else [self._layer(layer)]:
            if not seq.reserved:
                self._release(seq, i)
            seq.lengths[i] = 0

    def plan(self, seq_id: Hashable) -> ExecutionPlan:
        return self._sequence(seq_id).plan

    def max_tokens(self, seq_id: Hashable) -> int:
        return self._sequence(seq_id).max_tokens

    def set_plan(self, seq_id: Hashable, plan: ExecutionPlan) -> None:
        """Replace the plan of ``seq_id``; a layer that already holds positions must keep its KV heads.

        For a scheduler that plans mid-prefill (AdaLLaVA plans after the prefix
        layers): admit the sequence with a plan covering the prefix, or every
        layer, fill those layers, then set the whole plan before the remaining
        layers run. A reserved sequence then gives back the pages of the KV
        heads the new plan drops and takes those of the ones it adds (a
        ``ValueError`` when they are not free).
        """
        seq = self._sequence(seq_id)
        if not isinstance(plan, ExecutionPlan):
            raise ValueError(f"plan must be an ExecutionPlan, got {type(plan).__name__}")
        plan.check_shape(self.shape)
        changed = []
        for layer in range(self.shape.num_layers):
            if plan.kv_heads(layer) == seq.plan.kv_heads(layer):
                continue
            if seq.lengths[layer]:
                raise ValueError(
                    f"sequence {seq_id!r} holds {seq.lengths[layer]} positions of KV heads "
                    f"{list(seq.plan.kv_heads(layer))} in layer {layer}; the new plan keeps "
                    f"{list(plan.kv_heads(layer))} there (clear the layer first)"
                )
            changed.append(layer)
        if seq.reserved:
            per_head = -(-seq.max_tokens // self.page_size)
            needed = per_head * sum(len(plan.kv_heads(layer)) for layer in changed)
            released = sum(len(head) for layer in changed for head in seq.pages[layer])
            if needed > len(self._free) + released:
                raise ValueError(
                    f"KV pool exhausted: the new plan of sequence {seq_id!r} needs {needed - released} more pages, "
                    f"{len(self._free)} of {self.num_pages} are free"
                )
        for layer in changed:
            self._release(seq, layer)
            seq.pages[layer] = [[] for _ in plan.kv_heads(layer)]
        seq.plan = plan
        if seq.reserved:
            self._take_all(seq, changed)

    def pages_needed(self, seq_id: Hashable, tokens: int) -> int:
        """Pages ``tokens`` more positions in every layer of ``seq_id`` would take (0 once reserved)."""
        seq = self._sequence(seq_id)
        check_int("tokens", tokens, 0)
        return sum(self._pages_needed(seq, layer, tokens) for layer in range(self.shape.num_layers))

    def kv_heads(self, seq_id: Hashable, layer: int) -> tuple[int, ...]:
        """The KV heads ``seq_id`` stores in ``layer`` (empty for a skipped layer)."""
        return self._sequence(seq_id).plan.kv_heads(self._layer(layer))

    def length(self, seq_id: Hashable, layer: int = 0) -> int:
        """Positions of ``seq_id`` appended to ``layer``."""
        return self._sequence(seq_id).lengths[self._layer(layer)]

    # -- data ------------------------------------------------------------------

    def append(self, seq_id: Hashable, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``[kept KV heads, new, head_dim]`` K/V of ``seq_id`` to ``layer``, in one launch."""
        self.append_batch([seq_id], layer, [key], [value])

    def append_batch(
        self, seq_ids: Sequence[Hashable], layer: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
    ) -> None:
        """Append the new tokens of several sequences to ``layer`` in one launch.

        ``keys[i]``/``values[i]``: ``[KV heads kept by seq_ids[i], new, head_dim]``;
        every sequence appends the same number of new tokens.
        """
        layer = self._layer(layer)
        if not (len(seq_ids) == len(keys) == len(values)) or not seq_ids:
            raise ValueError(
                f"seq_ids, keys and values must be non-empty and of one length, got {len(seq_ids)}, "
                f"{len(keys)} and {len(values)}"
            )
        sequences = self._distinct(seq_ids)
        tokens = None
        for seq_id, seq, key, value in zip(seq_ids, sequences, keys, values):
            tokens = self._check_new(seq_id, seq, layer, key, value, tokens)
        needed = sum(self._pages_needed(seq, layer, tokens) for seq in sequences)
        if needed > len(self._free):
            raise ValueError(
                f"KV pool exhausted: appending {tokens} tokens to layer {layer} needs {needed} more pages, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        rows = [len(seq.pages[layer]) for seq in sequences]
        if sum(rows) == 0:  # a skipped layer, or no kept KV head: nothing is stored
            for seq in sequences:
                seq.lengths[layer] += tokens
            return
        snapshot = [(seq.pages[layer], seq.tables[layer]) for seq in sequences]
        free_before = list(self._free)
        try:
            for seq in sequences:
                self._grow(seq, layer, tokens)
            self._launch_append(sequences, layer, keys, values, rows)
        except Exception:
            for seq, (pages, table) in zip(sequences, snapshot):
                seq.pages[layer], seq.tables[layer] = pages, table
            self._free = free_before
            raise
        for seq in sequences:
            seq.lengths[layer] += tokens

    def advance(self, seq_ids: Sequence[Hashable], tokens: int) -> None:
        """Record that ``tokens`` positions of each of ``seq_ids`` were written to every layer that keeps a
        KV head, by kernels that write the pages in place (the runtime). Host bookkeeping only.

        The sequences must have been added with ``reserve`` (their pages exist) and have room left.
        """
        check_int("tokens", tokens, 0)
        sequences = self._distinct(seq_ids)
        for seq_id, seq in zip(seq_ids, sequences):
            if not seq.reserved:
                raise ValueError(f"sequence {seq_id!r} was not added with reserve=True: its pages are not all taken")
            stored = max(seq.lengths)
            if stored + tokens > seq.max_tokens:
                raise ValueError(
                    f"sequence {seq_id!r}: {stored} stored + {tokens} new tokens exceed the {seq.max_tokens} "
                    "reserved by add_sequence"
                )
        for seq in sequences:
            for layer, heads in enumerate(seq.pages):
                if heads:
                    seq.lengths[layer] += tokens

    def gather(self, seq_id: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``seq_id``'s stored K and V of ``layer`` as contiguous ``[kept KV heads, length, head_dim]``."""
        seq = self._sequence(seq_id)
        layer = self._layer(layer)
        length, heads = seq.lengths[layer], len(seq.pages[layer])
        if heads == 0 or length == 0:
            empty = self.pages.new_empty(heads, length, self.shape.head_dim)
            return empty, empty.clone()
        return self.ops.kv_gather(self.k_pages, self.v_pages, seq.tables[layer], length)

    def page_table(self, seq_id: Hashable, layer: int) -> torch.Tensor:
        """int32 ``[kept KV heads, pages]``: the pages of each kept KV head of ``layer``, in position order
        (for kernels that read ``k_pages``/``v_pages`` directly). Do not modify."""
        seq = self._sequence(seq_id)
        layer = self._layer(layer)
        table = seq.tables[layer]
        if table is None:
            return torch.empty(len(seq.pages[layer]), 0, dtype=torch.int32, device=self.pages.device)
        return table

    def model_tables(self, seq_id: Hashable, width: int) -> torch.Tensor:
        """int32 ``[layers, kv_heads, width]``: each layer's pages in the model's KV-head order, the scratch page
        for KV heads the plan does not keep and past the sequence's pages."""
        seq = self._sequence(seq_id)
        tables = torch.full((self.shape.num_layers, self.shape.num_kv_heads, width), self.scratch_page, dtype=torch.int32)
        for layer, heads in enumerate(seq.pages):
            for kv, pages in zip(seq.plan.kv_heads(layer), heads):
                tables[layer, kv, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return tables.to(self.pages.device)

    def page_lists(self, seq_id: Hashable, layer: int) -> tuple[tuple[int, ...], ...]:
        """The host's copy of :meth:`page_table`: per kept KV head of ``layer``, its pages (reads no device value)."""
        return tuple(tuple(head) for head in self._sequence(seq_id).pages[self._layer(layer)])

    def layer_view(self, seq_ids: Sequence[Hashable], layer: int) -> PagedCacheLayer:
        """``layer`` of ``seq_ids`` as a ``KVCacheLayer`` for ``masked_attention`` (batch row i = seq_ids[i])."""
        check_seq_ids(seq_ids)
        return PagedCacheLayer(self, list(seq_ids), self._layer(layer))

    # -- internals -------------------------------------------------------------

    def _sequence(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"sequence {seq_id!r} is not in the cache (never added, or freed)") from None

    def _distinct(self, seq_ids: Sequence[Hashable]) -> list[_Sequence]:
        check_seq_ids(seq_ids)
        return [self._sequence(s) for s in seq_ids]

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.shape.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.shape.num_layers}), got {layer!r}")
        return layer

    def _check_new(self, seq_id, seq: _Sequence, layer: int, key, value, tokens: int | None) -> int:
        heads = len(seq.pages[layer])
        expected = [heads, "new", self.shape.head_dim]
        for name, t in (("key", key), ("value", value)):
            check_storable(name, t, self.k_pages)
            if t.dim() != 3 or t.shape[0] != heads or t.shape[2] != self.shape.head_dim:
                raise ValueError(
                    f"{name} for sequence {seq_id!r}, layer {layer} must be {expected} ([kept KV heads, new "
                    f"tokens, head_dim]; its plan keeps KV heads {list(seq.plan.kv_heads(layer))}), got {list(t.shape)}"
                )
        if value.shape != key.shape:
            raise ValueError(f"value must have the shape of key {list(key.shape)}, got {list(value.shape)}")
        new = key.shape[1]
        if tokens is not None and new != tokens:
            raise ValueError(f"every sequence must append the same number of tokens: {tokens} and {new}")
        if seq.lengths[layer] + new > seq.max_tokens:
            raise ValueError(
                f"sequence {seq_id!r}, layer {layer}: {seq.lengths[layer]} stored + {new} new tokens exceed "
                f"the {seq.max_tokens} reserved by add_sequence"
            )
        return new

    def _pages_needed(self, seq: _Sequence, layer: int, tokens: int) -> int:
        heads = seq.pages[layer]
        have = len(heads[0]) if heads else 0  # every kept head of a layer holds as many pages
        need = -(-(seq.lengths[layer] + tokens) // self.page_size)
        return max(0, need - have) * len(heads)

    def _grow(self, seq: _Sequence, layer: int, tokens: int) -> None:
        """Take the pages ``tokens`` more positions need; rebuild the layer's table if any were taken."""
        if self._pages_needed(seq, layer, tokens) == 0:
            return
        need = -(-(seq.lengths[layer] + tokens) // self.page_size)
        # New lists, so a rollback can restore the old ones.
        seq.pages[layer] = [head + [self._free.pop() for _ in range(need - len(head))] for head in seq.pages[layer]]
        seq.tables[layer] = torch.tensor(seq.pages[layer], dtype=torch.int32, device=self.pages.device)

    def _take_all(self, seq: _Sequence, layers) -> None:
        """Take the pages of ``max_tokens`` positions for every kept KV head of ``layers`` (the caller checked
        that they are free); their tables go to the device in one copy."""
        per_head = -(-seq.max_tokens // self.page_size)
        layers = [layer for layer in layers if seq.pages[layer]]
        for layer in layers:
            seq.pages[layer] = [[self._free.pop() for _ in range(per_head)] for _ in seq.pages[layer]]
        if not layers:
            return
        flat = torch.tensor(
            [page for layer in layers for head in seq.pages[layer] for page in head], dtype=torch.int32
        ).to(self.pages.device)
        offset = 0
        for layer in layers:
            count = len(seq.pages[layer]) * per_head
            seq.tables[layer] = flat[offset:offset + count].view(len(seq.pages[layer]), per_head)
            offset += count

    def _release(self, seq: _Sequence, layer: int) -> None:
        for head in seq.pages[layer]:
            self._free.extend(reversed(head))
        seq.pages[layer] = [[] for _ in seq.pages[layer]]
        seq.tables[layer] = None

    def _launch_append(self, sequences, layer, keys, values, rows) -> None:
        kept = [i for i, r in enumerate(rows) if r]
        key = keys[kept[0]] if len(kept) == 1 else torch.cat([keys[i] for i in kept])
        value = values[kept[0]] if len(kept) == 1 else torch.cat([values[i] for i in kept])
        width = max(sequences[i].tables[layer].shape[1] for i in kept)
        tables = [sequences[i].tables[layer] for i in kept]
        table = tables[0] if len(tables) == 1 else torch.cat(
            [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables]
        )
        starts = torch.tensor(
            [sequences[i].lengths[layer] for i in kept for _ in range(rows[i])],
            dtype=torch.int32, device=self.pages.device,
        )
        self.ops.kv_append(self.k_pages, self.v_pages, key, value, table, starts)
