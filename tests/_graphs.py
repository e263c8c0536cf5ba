"""A CPU stand-in for CUDA graphs, as strict as a real one about what it reads.

A CUDA graph records kernels with the raw addresses of their operands and
replays exactly those kernels on exactly those addresses: host values are
frozen at capture, and a tensor freed after the capture is read anyway, from
memory that may hold something else by then. :class:`RecordedGraph` records
the aten and custom ops a step dispatches and replays the same ops, in order,
on the same tensors. Like the real graph it holds the tensors it did not
create only by weak reference; where a real graph would read freed memory,
a replay raises :class:`FreedTensorRead`.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from adallava_kernels.runtime import GraphCache

__all__ = ["FreedTensorRead", "RecordedGraph", "RecordingGraphs"]


class FreedTensorRead(RuntimeError):
    """A replay read a tensor that was collected after the capture (on a GPU: freed memory)."""


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # (op, args, kwargs, flat outputs): strong references, during the capture only
        self.written = []  # (tensor, its contents before the op wrote it): capture must change nothing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema.arguments
        operands = list(zip(schema, args)) + [(a, kwargs[a.name]) for a in schema if a.name in kwargs]
        for argument, value in operands:
            if isinstance(value, torch.Tensor) and argument.alias_info is not None and argument.alias_info.is_write:
                self.written.append((value, value.clone()))
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, tree_flatten(out)[0]))
        return out

    def undo(self):
        """Put back what the recorded ops wrote: recording a CUDA graph runs no kernel."""
        for tensor, before in reversed(self.written):
            tensor.copy_(before)
        self.written.clear()


class RecordedGraph:
    """One recorded step; :meth:`replay` runs it again and copies its results into the entry's outputs."""

    def __init__(self, entry, step):
        recorder = _Recorder()
        with recorder:
            outputs = step()
        recorder.undo()
        made = {}  # id of a tensor the step created (or returned in place) -> (call, position)

        def encode(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) in made:
                return ("made",) + made[id(value)]
            return ("read", weakref.ref(value))

        # In order: a call's operands refer to earlier calls' results, or (weakly) to what the step read.
        self.calls = []
        for index, (func, args, kwargs, flat) in enumerate(recorder.calls):
            self.calls.append((func, tree_map(encode, args), tree_map(encode, kwargs)))
            for position, value in enumerate(flat):
                if isinstance(value, torch.Tensor):
                    made[id(value)] = (index, position)
        self.outputs = [encode(t) for t in outputs]
        self.entry = weakref.ref(entry)
        self.reads = [ref for _, args, kwargs in self.calls for ref in _reads((args, kwargs))]
        entry.outputs = tuple(t.clone() for t in outputs)  # static outputs, as a graph's memory pool holds

    def replay(self):
        results = []

        def decode(value):
            if isinstance(value, tuple) and value and value[0] == "made":
                return results[value[1]][value[2]]
            if isinstance(value, tuple) and value and value[0] == "read":
                tensor = value[1]()
                if tensor is None:
                    raise FreedTensorRead("the replayed step reads a tensor that was freed after the capture")
                return tensor
            return value

        for func, args, kwargs in self.calls:
            out = func(*_decode_tree(args, decode), **_decode_tree(kwargs, decode))
            results.append(tree_flatten(out)[0])
        entry = self.entry()
        for static, encoded in zip(entry.outputs, self.outputs):
            static.copy_(decode(encoded))


def _is_ref(value) -> bool:
    return isinstance(value, tuple) and len(value) >= 2 and value[0] in ("made", "read")


def _decode_tree(tree, decode):
    flat, spec = tree_flatten(tree, is_leaf=_is_ref)
    return tree_unflatten([decode(v) for v in flat], spec)


def _reads(tree) -> list:
    flat, _ = tree_flatten(tree, is_leaf=_is_ref)
    return [v[1] for v in flat if _is_ref(v) and v[0] == "read"]


class RecordingGraphs(GraphCache):
    """The runtime's graph cache with :class:`RecordedGraph` for ``torch.cuda.CUDAGraph``."""

    def warm_up(self, step):
        return step()

    def capture(self, entry, step):
        entry.graph = RecordedGraph(entry, step)
        self.stats.captures += 1
