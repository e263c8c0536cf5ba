"""A CPU stand-in for CUDA graphs, as strict as a real one about what it reads.

A CUDA graph records kernels with the raw addresses of their operands and
replays exactly those kernels on exactly those addresses: host values are
frozen at capture, and a tensor freed after the capture is read anyway, from
memory that may hold something else by then. :class:`RecordedGraph` records
the aten and custom ops a step dispatches, and the Triton kernels it launches
directly (under TRITON_INTERPRET=1, launches that bypass the dispatcher, each
with its grid resolved at capture), and replays the same calls, in order, on
the same tensors. Like the real graph it holds the tensors it did not create
only by weak reference: a recorded call keeps nothing but operators, kernels,
plain host values and weak references (a value of any other kind, which could
hold a tensor through its attributes, is refused at capture); where a real
graph would read freed memory, a replay raises :class:`FreedTensorRead`.

Host values are frozen at capture: before each replay, the step of the batch
bound to the entry is recorded again, and a replay whose step would now pass
another host value (a Python number derived from per-step host state, a grid),
run other calls, or read another tensor than the captured one raises
:class:`HostValueChanged`, where a real graph would silently replay the
captured ones. Recording runs no kernel in a real graph: what the recorded
calls wrote is put back (every tensor a direct launch receives counts as
written, since a kernel's writes are not declared), and every tensor the step
did not create must then equal, bit for bit, what it held before the step;
otherwise the capture raises :class:`CaptureChangedState`.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from adallava_kernels.ops import workspace
from adallava_kernels.runtime import GraphCache

__all__ = ["CaptureChangedState", "FreedTensorRead", "HostValueChanged", "RecordedGraph", "RecordingGraphs"]


class FreedTensorRead(RuntimeError):
    """A replay read a tensor that was collected after the capture (on a GPU: freed memory)."""


class HostValueChanged(RuntimeError):
    """The step would now run other calls, pass other host values or read other tensors than the graph
    froze at capture (a real graph replays the captured ones regardless)."""


class CaptureChangedState(RuntimeError):
    """Recording the step left a tensor it did not create changed (recording a real graph runs nothing)."""


# The host values a recorded call may keep: none of them can hold a tensor.
_PLAIN = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _storage_key(tensor: torch.Tensor):
    return tensor.device, tensor.untyped_storage().data_ptr()


def _storage_bytes(storage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # (op, args, kwargs, flat outputs): strong references, during the capture only
        self.written = []  # (tensor, its contents before the op wrote it): capture must change nothing
        self.inside = 0  # > 0 while a recorded op runs: what it launches is part of that op's call
        self.made = set()  # storages the step created
        self.before = {}  # storage key -> (storage, its bytes) of every other storage the step reached, first seen

    def _reached(self, values):
        """Keep the bytes of the storages of ``values`` the step did not create, as they were when first reached."""
        for value in values:
            if not isinstance(value, torch.Tensor) or value.untyped_storage().nbytes() == 0:
                continue
            key = _storage_key(value)
            if key not in self.made and key not in self.before:
                storage = value.untyped_storage()
                self.before[key] = (storage, _storage_bytes(storage).clone())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._reached(tree_flatten((args, kwargs))[0])
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
        flat = tree_flatten(out)[0]
        for value in flat:  # a new storage (not a view of, or the same tensor as, an operand)
            if isinstance(value, torch.Tensor) and _storage_key(value) not in self.before:
                self.made.add(_storage_key(value))
        self.calls.append((func, args, kwargs, flat))
        return out

    def launched(self, launch, executor, args, kwargs):
        """A direct Triton launch during the recording: its tensors saved (for :meth:`undo`), the launch run
        outside this mode (the interpreter's own tensor calls are not the step's), and recorded with its
        grid resolved (a graph holds the grid, not the host code that computed it)."""
        if self.inside:  # inside a recorded custom op: the op's call replays it
            return launch(executor, *args, **kwargs)
        with _disable_current_modes():
            tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
            self._reached(tensors)
            for value in tensors:
                self.written.append((value, value.clone()))
            launch(executor, *args, **kwargs)
        self.calls.append((_DirectLaunch.of(launch, executor, args, kwargs), args, kwargs, []))

    def undo(self):
        """Put back what the recorded ops wrote (recording a CUDA graph runs no kernel), then check that every
        storage the step reached and did not create holds, bit for bit, what it held when first reached."""
        with _disable_current_modes():
            for tensor, before in reversed(self.written):
                tensor.copy_(before)
            self.written.clear()
            changed = [storage for storage, saved in self.before.values()
                       if not torch.equal(_storage_bytes(storage), saved)]
            self.before.clear()
        if changed:
            raise CaptureChangedState(
                f"recording the step left {len(changed)} storage(s) it did not create changed "
                f"({', '.join(f'{s.nbytes()} bytes on {s.device}' for s in changed)}): a write the recording "
                "could not undo (an op that writes an input without declaring it)")


class _DirectLaunch:
    """A recorded direct Triton launch: calling it launches the same kernel on the same grid again. It holds
    the kernel's function and the grid as numbers, not the launcher's closures."""

    def __init__(self, launch, fn, arg_names, grid, hooks):
        self.launch, self.fn, self.arg_names, self.grid, self.hooks = launch, fn, arg_names, grid, hooks

    @classmethod
    def of(cls, launch, executor, args, kwargs):
        grid = executor.grid
        if callable(grid):  # as the interpreter calls it: with the kernel's arguments by name
            names = inspect.getfullargspec(executor.fn).args
            grid = grid(inspect.getcallargs(executor.fn, *args, **{k: v for k, v in kwargs.items() if k in names}))
        return cls(launch, executor.fn, executor.arg_names, tuple(int(g) for g in grid), tuple(executor.pre_run_hooks))

    def __eq__(self, other):
        return isinstance(other, _DirectLaunch) and (self.launch, self.fn, self.grid, self.hooks) == (
            other.launch, other.fn, other.grid, other.hooks)

    def __repr__(self):
        return f"triton.{getattr(self.fn, '__name__', self.fn)}[{self.grid}]"

    def __call__(self, *args, **kwargs):
        from triton.runtime.interpreter import GridExecutor

        self.launch(GridExecutor(self.fn, self.arg_names, self.grid, list(self.hooks)), *args, **kwargs)


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


def _record(step):
    """Run ``step`` under a recorder, put back what it wrote; its outputs and the recorder."""
    recorder = _Recorder()
    with recorder, _recording_direct_launches(recorder):
        outputs = step()
    recorder.undo()
    return () if outputs is None else outputs, recorder


def _encode(calls, outputs, hold):
    """The recorded calls with their tensor operands as references: ``("made", call, position)`` for a result
    of an earlier call, ``("read", hold(tensor))`` for a tensor the step did not create. Any other operand
    must be a plain host value."""
    made = {}  # id of a tensor the step created (or returned in place) -> (call, position)

    def encode(value):
        if isinstance(value, torch.Tensor):
            if id(value) in made:
                return ("made",) + made[id(value)]
            return ("read", hold(value))
        if not isinstance(value, _PLAIN):
            raise TypeError(f"a recorded call takes {type(value).__name__} {value!r}, which the stand-in cannot "
                            "hold weakly (it may reach tensors through its attributes)")
        return value

    encoded = []
    for index, (func, args, kwargs, flat) in enumerate(calls):
        encoded.append((func, tree_map(encode, args), tree_map(encode, kwargs)))
        for position, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                made[id(value)] = (index, position)
    return encoded, [encode(t) for t in outputs]


def _strong(tensor):
    return lambda: tensor


def _address(tensor: torch.Tensor):
    """What a graph bakes in of an operand: where it lies and how it is laid out."""
    return tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def _same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    return a == b or (a != a and b != b)  # NaN equals NaN here


class RecordedGraph:
    """One recorded step; :meth:`replay` runs it again and copies its results into the entry's outputs."""

    def __init__(self, entry, step):
        outputs, recorder = _record(step)
        # In order: a call's operands refer to earlier calls' results, or (weakly) to what the step read.
        self.calls, self.outputs = _encode(recorder.calls, outputs, weakref.ref)
        self.entry = weakref.ref(entry)
        self.reads = [ref for _, args, kwargs in self.calls for ref in _reads((args, kwargs))]
        entry.outputs = tuple(t.clone() for t in outputs)  # static outputs, as a graph's memory pool holds

    def check(self, step) -> None:
        """Raise unless ``step``, recorded now, runs the captured calls with the captured host values on the
        captured tensors (a real graph replays those whatever the step would do now)."""
        outputs, recorder = _record(step)
        now, now_outputs = _encode(recorder.calls, outputs, _strong)
        if len(now) != len(self.calls):
            first = next((i for i, (a, b) in enumerate(zip(self.calls, now)) if a[0] != b[0]), min(len(now), len(self.calls)))
            raise HostValueChanged(f"the step would run {len(now)} calls, the graph replays {len(self.calls)} (first "
                                   f"differing: call {first})")
        for index, ((func, args, kwargs), (func_now, args_now, kwargs_now)) in enumerate(zip(self.calls, now)):
            where = f"call {index} ({func})"
            if func != func_now:
                raise HostValueChanged(f"{where}: the step would call {func_now} instead")
            captured, spec = tree_flatten((args, kwargs), is_leaf=_is_ref)
            current, spec_now = tree_flatten((args_now, kwargs_now), is_leaf=_is_ref)
            if spec != spec_now:
                raise HostValueChanged(f"{where}: the step would pass other arguments ({spec_now} for {spec})")
            for frozen, value in zip(captured, current):
                _check_operand(where, frozen, value)
        for frozen, value in zip(self.outputs, now_outputs):
            _check_operand("the outputs", frozen, value)

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


def _check_operand(where: str, frozen, value) -> None:
    if _is_ref(frozen) and frozen[0] == "read":
        tensor = frozen[1]()
        if tensor is None:
            raise FreedTensorRead(f"{where}: the replayed step reads a tensor that was freed after the capture")
        if not (_is_ref(value) and value[0] == "read"):
            raise HostValueChanged(f"{where}: the step would read another tensor than the captured one")
        now = value[1]()
        # A split workspace that grew since the capture: the graph reads the outgrown buffer, which the library
        # keeps alive and leaves as the grown one (ops/workspace.py).
        if _address(now) != _address(tensor) and not workspace.outgrown(tensor, now):
            raise HostValueChanged(f"{where}: the step would read another tensor than the captured one")
    elif _is_ref(frozen):
        if frozen != value:
            raise HostValueChanged(f"{where}: the step would pass another intermediate than at capture")
    elif _is_ref(value) or not _same_value(frozen, value):
        raise HostValueChanged(f"{where}: a host value frozen at capture, {frozen!r}, would be {value!r} now")


def _is_ref(value) -> bool:
    return isinstance(value, tuple) and len(value) >= 2 and value[0] in ("made", "read")


def _decode_tree(tree, decode):
    flat, spec = tree_flatten(tree, is_leaf=_is_ref)
    return tree_unflatten([decode(v) for v in flat], spec)


def _reads(tree) -> list:
    flat, _ = tree_flatten(tree, is_leaf=_is_ref)
    return [v[1] for v in flat if _is_ref(v) and v[0] == "read"]


class RecordingGraphs(GraphCache):
    """The runtime's graph cache with :class:`RecordedGraph` for ``torch.cuda.CUDAGraph``. Before each replay
    the step the caller would run now (``entry.step``) is checked against the recording."""

    def warm_up(self, step):
        step()

    def capture(self, entry, step):
        entry.graph = RecordedGraph(entry, step)
        self.stats.captures += 1

    def replay(self, entry):
        entry.graph.check(entry.step)
        super().replay(entry)
