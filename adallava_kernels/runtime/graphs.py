"""CUDA graphs of decode steps: captured once per running batch's buffers and bucket, replayed after.

A decode step (:mod:`.step`) over a running batch's slots (:mod:`.slots`) is a
fixed sequence of launches once its bucket (the live rows, padded) is
known: the plans' indices, counts and masks, the block tables and the
sequence lengths all live in the batch's persistent buffers and are read on
the device. So it is captured once per (buffers, bucket) and replayed
whatever rows join or leave and whatever their plans. The graphs live in a
bounded cache (least recently used out first), each with its own memory
pool.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

__all__ = ["GraphCache", "GraphEntry", "GraphStats"]


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
    """One captured step and the step function that made it (the latest caller's, for checks)."""

    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = ()
    capture_seconds: float = 0.0
    step: Callable[[], object] | None = field(default=None, repr=False)


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

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` holds a captured graph."""
        entry = self._entries.get(key)
        return entry is not None and entry.graph is not None

    def run(self, key: Hashable, step: Callable[[], object]) -> None:
        """Run ``step`` through the graph of ``key``: the first time warmed up eagerly and captured (recording
        runs nothing, so the step's effects happen once), later replayed."""
        entry = self.entry(key, GraphEntry)
        entry.step = step
        if entry.graph is None:
            self.warm_up(step)
            self.capture(entry, step)
        else:
            self.replay(entry)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

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

    def warm_up(self, step: Callable[[], object]) -> None:
        """Run ``step`` eagerly on a side stream, as graph capture asks of the first run (Triton compiles
        and autotunes its kernels here)."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.stats.warmup_seconds += time.perf_counter() - start

    def replay(self, entry: GraphEntry) -> None:
        entry.graph.replay()
        self.stats.replays += 1

    def capture(self, entry: GraphEntry, step: Callable[[], object]) -> None:
        """Record ``step`` into ``entry``. It reads and writes ``entry``'s buffers and the KV pages, and reads
        the weights: nothing a freed request owned."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # A private memory pool per graph: graphs of different batches replay in any order, and a shared
        # pool would let one replay's intermediates overwrite another graph's outputs before they are read.
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        entry.graph = graph
        entry.capture_seconds = time.perf_counter() - start
        self.stats.captures += 1
        self.stats.capture_seconds += entry.capture_seconds

    def clear(self) -> None:
        for entry in self._entries.values():
            _release(entry)
        self._entries.clear()


def _release(entry: GraphEntry) -> None:
    entry.graph, entry.outputs, entry.step = None, (), None
