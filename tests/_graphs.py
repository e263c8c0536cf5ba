"""A CPU stand-in for CUDA graphs, as strict as a real one about what it reads.

A CUDA graph records kernels with the raw addresses of their operands and
replays exactly those kernels on exactly those addresses: host values are
frozen at capture, and a tensor freed after the capture is read anyway, from
memory that may hold something else by then. :class:`RecordedGraph` records
the aten and custom ops a step dispatches, and the Triton kernels it launches
directly (under TRITON_INTERPRET=1, launches that bypass the dispatcher), and
replays the same calls, in order, on the same tensors. Like the real graph it
holds the tensors it did not create only by weak reference; where a real
graph would read freed memory, a replay raises :class:`FreedTensorRead`.
Recording runs no kernel in a real graph: what the recorded calls wrote is
put back (every tensor a direct launch receives counts as written, since a
kernel's writes are not declared).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
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
        self.inside = 0  # > 0 while a recorded op runs: what it launches is part of that op's call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema.arguments
        operands = list(zip(schema, args)) + [(a, kwargs[a.name]) for a in schema if a.name in kwargs]
        for argument, value in operands:
            if isinstance(value, torch.Tensor) and argument.alias_info is not None and argument.alias_info.is_write:
                self.written.append((value, value.clone()))
        self.inside += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.inside -= 1
        self.calls.append((func, args, kwargs, tree_flatten(out)[0]))
        return out

    def launched(self, launch, executor, args, kwargs):
        """A direct Triton launch during the recording: its tensors saved (for :meth:`undo`), the launch run
        outside this mode (the interpreter's own tensor calls are not the step's), and recorded."""
        if self.inside:  # inside a recorded custom op: the op's call replays it
            return launch(executor, *args, **kwargs)
        with _disable_current_modes():
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    self.written.append((value, value.clone()))
            launch(executor, *args, **kwargs)
        self.calls.append((_DirectLaunch(launch, executor), args, kwargs, []))

    def undo(self):
        """Put back what the recorded ops wrote: recording a CUDA graph runs no kernel."""
        with _disable_current_modes():
            for tensor, before in reversed(self.written):
                tensor.copy_(before)
        self.written.clear()


class _DirectLaunch:
    """A recorded direct Triton launch: calling it launches the same kernel, grid and constants again."""

    def __init__(self, launch, executor):
        self.launch, self.executor = launch, executor

    def __call__(self, *args, **kwargs):
        self.launch(self.executor, *args, **kwargs)


@contextlib.contextmanager
def _recording_direct_launches(recorder: _Recorder):
    """Route the interpreter's kernel launches through ``recorder`` while the step is recorded."""
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # no Triton: nothing launches directly
        yield
        return
    original = GridExecutor.__call__

    def call(executor, *args, **kwargs):
        recorder.launched(original, executor, args, kwargs)

    GridExecutor.__call__ = call
    try:
        yield
    finally:
        GridExecutor.__call__ = original


class RecordedGraph:
    """One recorded step; :meth:`replay` runs it again and copies its results into the entry's outputs."""

    def __init__(self, entry, step):
        recorder = _Recorder()
        with recorder, _recording_direct_launches(recorder):
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
