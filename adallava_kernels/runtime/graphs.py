"""CUDA graphs of decode steps: captured once per step shape, replayed after.

A bound decode step (:mod:`.binding`) is a fixed sequence of launches once
its shape is known: each layer's sub-block modes, the batch size and the
table width bucket. Every grid depends on those only; the plans' indices,
counts and masks, the block tables and the sequence lengths are read on the
device. So it is captured once and replayed with its inputs copied into
persistent buffers: a batch with other plans of the same shape binds its
data into the buffers and replays. The graphs live in a bounded cache (least
recently used out first), each with its own memory pool.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

__all__ = ["GraphCache", "GraphEntry", "GraphOwner", "GraphStats"]


@dataclass
class GraphStats:
    """What the graphs have cost, in wall seconds: ``warmup_seconds``, the first (eager) step of each key,
    Triton's compiling and autotuning included; ``capture_seconds``, recording the graphs."""

    captures: int = 0
    warmup_seconds: float = 0.0
    capture_seconds: float = 0.0
    replays: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class GraphEntry:
    """One captured step: its persistent inputs, its outputs, and the batch whose state it holds now.

    ``buffers``: the bound plans' data (indices, counts, masks, block tables), which a batch copies in
    when it binds the entry; ``views``: the step's per-layer views of them. The step reads nothing
    else by address but the weights and the KV pool, which the runner holds."""

    tokens: torch.Tensor
    state: torch.Tensor
    buffers: tuple[torch.Tensor, ...]
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = ()
    capture_seconds: float = 0.0
    owner: weakref.ref | None = field(default=None, repr=False)
    views: list = field(default_factory=list, repr=False)


class GraphCache:
    """At most ``max_graphs`` captured decode steps, by key."""

    def __init__(self, max_graphs: int) -> None:
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.stats = GraphStats()
        self._entries: OrderedDict[Hashable, GraphEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: Hashable, make: Callable[[], GraphEntry]) -> GraphEntry:
        """The entry of ``key``, made (without a graph yet) if absent; the oldest goes when the cache is full."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        while len(self._entries) >= self.max_graphs:
            _, old = self._entries.popitem(last=False)
            _release(old)
            self.stats.evictions += 1
        entry = self._entries[key] = make()
        return entry

    def warm_up(self, step: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Run ``step`` eagerly on a side stream, as graph capture asks of the first run (Triton compiles
        and autotunes its kernels here)."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.stats.warmup_seconds += time.perf_counter() - start
        return out

    def replay(self, entry: GraphEntry) -> tuple[torch.Tensor, ...]:
        entry.graph.replay()
        self.stats.replays += 1
        return entry.outputs

    def capture(self, entry: GraphEntry, step: Callable[[], tuple[torch.Tensor, ...]]) -> None:
        """Record ``step`` into ``entry``. It reads and writes ``entry``'s buffers and the KV pages, and reads
        the weights: nothing a freed request owned."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # A private memory pool per graph: graphs of different batches replay in any order, and a shared
        # pool would let one replay's intermediates overwrite another graph's outputs before they are read.
        with torch.cuda.graph(graph):
            outputs = step()
        torch.cuda.synchronize()
        entry.graph, entry.outputs = graph, outputs
        entry.capture_seconds = time.perf_counter() - start
        self.stats.captures += 1
        self.stats.capture_seconds += entry.capture_seconds

    def clear(self) -> None:
        for entry in self._entries.values():
            _release(entry)
        self._entries.clear()


class GraphOwner:
    """What lets a decode batch step through a captured graph: the batch owns an entry's buffers while it
    steps (its state moves in on :meth:`bind`, back out on :meth:`unbind`), so batches with one key share
    one graph.

    The batch provides ``graphs`` (the runner's :class:`GraphCache`), ``key``, ``batch`` (rows),
    ``state``, ``buffers`` (its bound plans' data), ``views_of(buffers)`` (the step's views of such
    buffers) and ``forward_step(tokens, state, views)``.
    """

    _entry: GraphEntry | None = None

    def graph_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        graphs = self.graphs
        entry = graphs.entry(self.key, self._new_entry)
        if entry.owner is None or entry.owner() is not self:
            self.bind(entry)
        entry.tokens.copy_(tokens)
        step = lambda: self.forward_step(entry.tokens, entry.state, entry.views)  # noqa: E731
        if entry.graph is None:
            # The first step of a key runs eagerly (the warm-up), then is recorded for the next ones;
            # recording runs nothing, so the pages and lengths change only on replay.
            out = graphs.warm_up(step)
            graphs.capture(entry, step)
            return out
        return graphs.replay(entry)

    def _new_entry(self) -> GraphEntry:
        entry = GraphEntry(tokens=torch.zeros(self.batch, dtype=torch.int64, device=self.state.device),
                           state=torch.empty_like(self.state),
                           buffers=tuple(torch.empty_like(b) for b in self.buffers))
        entry.views = self.views_of(entry.buffers)
        return entry

    def bind(self, entry: GraphEntry) -> None:
        """Move this batch's state into ``entry``'s buffers (saving the previous owner's first)."""
        previous = entry.owner() if entry.owner is not None else None
        if previous is not None:
            previous.unbind(entry)
        if self._entry is not None and self._entry is not entry:
            self.unbind(self._entry)
        entry.state.copy_(self.state)
        for mine, theirs in zip(self.buffers, entry.buffers):
            theirs.copy_(mine)
        entry.owner = weakref.ref(self)
        self._entry = entry

    def unbind(self, entry: GraphEntry) -> None:
        """Take this batch's state back from ``entry`` (another batch needs the graph, or it is evicted)."""
        if self._entry is entry:
            self.state.copy_(entry.state)
            self._entry = None
            entry.owner = None

    def close(self) -> None:
        """Release the graph this batch holds (its state stays with the batch)."""
        if self._entry is not None:
            self.unbind(self._entry)


def _release(entry: GraphEntry) -> None:
    """Give the entry's state back to the batch that owns it (it goes on eagerly or in another graph)."""
    owner = entry.owner() if entry.owner is not None else None
    if owner is not None:
        owner.unbind(entry)
    entry.graph, entry.outputs = None, ()
