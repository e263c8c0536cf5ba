"""The CPU stand-in for CUDA graphs (``_graphs.py``): what it replays, and that a step which would go wrong
under a real graph raises under it (host values frozen at capture, a tensor freed or swapped after the
capture, a capture that changes state).

Its Triton launches run under the interpreter on every machine (``InterpretedFunction``), since the stand-in
records the interpreter's direct launches.
"""

import gc
import types
import weakref

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from adallava_kernels.ops import workspace

from _graphs import CaptureChangedState, FreedTensorRead, HostValueChanged, RecordedGraph


def _scale(x_ptr, factor_ptr, n, BLOCK: tl.constexpr):
    """x[:n] *= factor[0], in place."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(x_ptr + offs, x * tl.load(factor_ptr), mask=mask)


SCALE = InterpretedFunction(_scale)


@torch.library.custom_op("adallava_stand_in_test::add_one_undeclared", mutates_args=())
def add_one_undeclared(x: torch.Tensor) -> torch.Tensor:
    """Writes ``x`` without declaring it (what a custom op must not do)."""
    x.add_(1)
    return x * 2


@torch.library.custom_op("adallava_stand_in_test::add_one_declared", mutates_args=("x",))
def add_one_declared(x: torch.Tensor) -> None:
    x.add_(1)


class Entry:
    """What a recorded graph needs of its cache entry: a place for its static outputs."""

    outputs = ()


def capture(step):
    entry = Entry()
    return entry, RecordedGraph(entry, step)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN included): float32 compared as int32."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_a_capture_changes_nothing_and_a_replay_runs_the_step():
    # Declared writes (an in-place aten op, a custom op that declares its mutation) are undone at capture,
    # bit for bit, NaN included; each replay writes them again and returns what the step returns.
    state, x, counter = torch.randn(5), torch.randn(5), torch.randn(3)
    state[2] = float("nan")

    def step():
        state.add_(x)
        torch.ops.adallava_stand_in_test.add_one_declared(counter)
        return (state * 2, counter + 0)

    expected_state, expected_counter = state.clone(), counter.clone()
    entry, graph = capture(step)
    assert same_bits(state, expected_state) and same_bits(counter, expected_counter)
    for _ in range(2):
        graph.replay()
        expected_state.add_(x)
        expected_counter.add_(1)
        assert same_bits(state, expected_state) and same_bits(counter, expected_counter)
        assert same_bits(entry.outputs[0], expected_state * 2) and same_bits(entry.outputs[1], expected_counter)


def test_a_capture_that_leaves_an_undeclared_write_raises():
    x = torch.randn(4)

    def step():
        return (torch.ops.adallava_stand_in_test.add_one_undeclared(x),)

    with pytest.raises(CaptureChangedState, match="left 1 storage"):
        capture(step)


def scale_step(holder, factor):
    """A step that launches SCALE directly on ``holder.x``, its grid computed from that tensor."""

    def step():
        target = holder.x
        SCALE[lambda meta: (triton.cdiv(target.numel(), meta["BLOCK"]),)](target, factor, target.numel(), BLOCK=4)
        return (target + 0,)

    return step


def test_a_direct_triton_launch_is_undone_at_capture_and_replayed():
    # The kernel writes x in place: put back at capture, replayed on its grid (3 programs of 4 for 11
    # elements); the factor lives on the device, so a replay reads its new value.
    x, factor = torch.randn(11), torch.randn(1)
    expected = x.clone()
    entry, graph = capture(scale_step(types.SimpleNamespace(x=x), factor))
    assert same_bits(x, expected)
    for value in (factor.item(), -2.5):
        factor.fill_(value)
        graph.replay()
        expected *= factor
        assert same_bits(x, expected) and same_bits(entry.outputs[0], expected)


def test_the_graph_holds_what_the_step_did_not_create_weakly():
    # x is reached through a Python attribute and closed over by the launch's grid: once the holder goes,
    # nothing keeps it (a real graph keeps its address only), and a replay or a check that reads it raises.
    x, factor = torch.randn(11), torch.randn(1)
    holder = types.SimpleNamespace(x=x)
    step = scale_step(holder, factor)
    entry, graph = capture(step)
    collected = weakref.ref(x)
    del x, holder.x
    gc.collect()
    assert collected() is None
    with pytest.raises(FreedTensorRead):
        graph.replay()
    holder.x = torch.randn(11)
    with pytest.raises(FreedTensorRead):
        graph.check(step)


def test_a_step_that_would_read_another_tensor_raises():
    # The step reads whatever tensor the attribute holds now; the graph reads the captured one.
    holder = types.SimpleNamespace(w=torch.randn(6))
    step = lambda: (holder.w + 1,)  # noqa: E731
    entry, graph = capture(step)
    graph.check(step)  # the same tensor: the replay is what the step would run
    captured = holder.w
    holder.w = torch.randn(6)
    with pytest.raises(HostValueChanged, match="would read another tensor"):
        graph.check(step)
    holder.w = captured[:5]  # the same address, another shape
    with pytest.raises(HostValueChanged, match="would read another tensor"):
        graph.check(step)


def grow(kind):
    """Make the CPU's ``kind`` workspace outgrow its buffer (the old one is retired, kept alive)."""
    cpu = torch.device("cpu")
    before = kind(cpu, 1)
    after = kind(cpu, before.numel() + 1)
    assert after is not before and torch.equal(before, torch.zeros_like(before))


def test_a_workspace_that_grew_since_the_capture_is_read_where_the_graph_reads_it():
    # A launch takes a split workspace's whole buffer. A graph keeps reading the outgrown one, which the library
    # keeps alive and leaves as the grown one (ops/workspace.py): a step that would now read the grown buffer
    # replays as captured; any other tensor, even in the grown buffer or another workspace, is other memory.
    cpu = torch.device("cpu")
    holder = types.SimpleNamespace(buffer=workspace.counters(cpu, 2))
    step = lambda: (holder.buffer + 1,)  # noqa: E731
    entry, graph = capture(step)
    captured = holder.buffer.numel()
    grow(workspace.counters)
    holder.buffer = workspace.counters(cpu, 2)
    assert holder.buffer.numel() > captured
    graph.check(step)
    graph.replay()
    assert torch.equal(entry.outputs[0], torch.ones(captured, dtype=torch.int32))  # what the graph read
    grown = holder.buffer
    for other in (grown[1:], grown[:captured], workspace.scratch(cpu, 2)):
        holder.buffer = other
        with pytest.raises(HostValueChanged, match="would read another tensor"):
            graph.check(step)


def test_a_host_number_that_changes_per_step_raises():
    # A number read from host state each step is frozen at capture in a real graph. The same number kept
    # on the device is read at replay, which is right.
    x = torch.randn(7)
    steps = [0]

    def from_host():
        steps[0] += 1
        return (x * float(steps[0]),)

    _, graph = capture(from_host)
    with pytest.raises(HostValueChanged, match=r"a host value frozen at capture, 1.0, would be 2.0 now"):
        graph.check(from_host)

    count = torch.zeros(())

    def on_device():
        count.add_(1)
        return (x * count,)

    entry, graph = capture(on_device)
    for n in (1, 2):
        graph.check(on_device)
        graph.replay()
        assert same_bits(entry.outputs[0], x * float(n))


def test_a_step_that_would_run_other_calls_raises():
    # A branch on host state changes the calls, which a graph cannot: it replays the captured ones.
    x = torch.randn(4)
    flag = types.SimpleNamespace(on=False)

    def step():
        y = x + 1
        return (y.exp() if flag.on else y,)

    _, graph = capture(step)
    flag.on = True
    with pytest.raises(HostValueChanged, match="would run 2 calls, the graph replays 1"):
        graph.check(step)

    def other():
        y = x + 1
        return (y.exp() if flag.on else y.sin(),)

    flag.on = False
    _, graph = capture(other)
    flag.on = True
    with pytest.raises(HostValueChanged, match=r"call 1 \(aten.sin.default\): the step would call aten.exp.default"):
        graph.check(other)
