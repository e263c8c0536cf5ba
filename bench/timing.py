"""How every case is timed: wall time with its spread, and the GPU's own time beside it.

Wall time is what a user waits for. On CUDA it is taken with CUDA events
around each call, the queue drained before the call, so the host's work
between launches (Python, host syncs, launches themselves) counts as it does
for a user; on a CPU with ``torch.utils.benchmark``. Each case is warmed up,
then timed until it has ``min_reps`` repetitions or has run for
``min_seconds``, whichever comes first, and never for fewer than
``floor_reps`` repetitions; the median and the interquartile range are
reported, and a case whose IQR exceeds ``IQR_LIMIT`` of its median is
flagged as unstable.

GPU time is the kernels' own time, without the host gaps between them. It
comes from one of two sources, recorded per row in ``gpu_source``:

- ``PROFILER``: the sum of the device records (kernels, memcpy, memset) that
  ``torch.profiler`` collects over a few calls, divided by the calls;
- ``GRAPH_REPLAY``: CUDA events around the replay of a captured CUDA graph,
  whose one launch leaves no host gap inside it.

Host overhead is wall minus GPU time, reported as a share of wall time. On a
CPU there is no device time apart from the wall time: ``gpu_s`` is ``None``.

The micro-benchmarks of single ops keep ``triton.testing.do_bench`` on CUDA
(back-to-back calls with the L2 cache flushed between them, its quartiles).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

IQR_LIMIT = 0.05
PROFILER = "profiler: sum of GPU kernel, memcpy and memset records"
GRAPH_REPLAY = "CUDA events around a CUDA graph replay"
DEVICE_TIME_SOURCES = ("profiler", "graph-replay", None)
CUDA_EVENTS = "CUDA events, queue drained before each call"
DO_BENCH = "triton.testing.do_bench (CUDA events, back-to-back calls, L2 flushed)"
MIN_STEP_S = 1e-9
# Calls the profiler adds at most (profile_reps' ``most``).
PROFILE_MOST = 5
# Calls per repetition of the CPU timer at most: it grows a block of calls tenfold until the block takes 1 ms.
CPU_MOST_PER_REP = 10**6


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """How long a case is timed: until ``min_reps`` repetitions or ``min_seconds``, whichever comes first, and
    ``floor_reps`` repetitions at least (a median and quartiles need a few). Warm-up: at least one call, then
    up to ``warmup_calls`` calls or ``warmup_seconds``, whichever comes first."""

    min_reps: int = 20
    min_seconds: float = 1.0
    floor_reps: int = 5
    warmup_calls: int = 3
    warmup_seconds: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.floor_reps <= self.min_reps:
            raise ValueError(f"need 1 <= floor_reps <= min_reps, got floor_reps={self.floor_reps}, "
                             f"min_reps={self.min_reps}")
        if self.min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")
        if self.warmup_calls < 1 or self.warmup_seconds < 0:
            raise ValueError(f"warmup_calls must be >= 1 and warmup_seconds >= 0, got {self.warmup_calls} and "
                             f"{self.warmup_seconds}")

    def enough(self, reps: int, elapsed: float) -> bool:
        """Whether ``reps`` repetitions that took ``elapsed`` seconds in all end the timing."""
        return reps >= self.floor_reps and (reps >= self.min_reps or elapsed >= self.min_seconds)

    def describe(self) -> str:
        return (f"warm-up, then {self.min_reps} repetitions or {self.min_seconds:g} s, whichever comes first, "
                f"and {self.floor_reps} repetitions at least")


# A 40 ms forward gets 20 repetitions; a 4 s request 5, over 20 s.
END_TO_END = TimingBudget()
# Single ops take microseconds to milliseconds: 0.2 s of them, as long as 200 repetitions take.
OPS = TimingBudget(min_reps=200, min_seconds=0.2)
# --quick checks that everything runs: two repetitions give a median, not a spread worth reading.
QUICK = TimingBudget(min_reps=2, min_seconds=0.0, floor_reps=2, warmup_calls=1, warmup_seconds=0.0)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One timed case: wall-time quartiles, and the GPU time where there is a GPU."""

    median_s: float
    q1_s: float
    q3_s: float
    reps: int | None
    timer: str
    gpu_s: float | None = None
    gpu_source: str | None = None

    @classmethod
    def from_samples(cls, samples: Sequence[float], timer: str) -> "Timing":
        """Quartiles of per-repetition wall times (linear interpolation, as ``numpy.percentile``)."""
        values = np.asarray(samples, dtype=np.float64)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"samples must be a non-empty 1-D sequence, got shape {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError("samples must all be finite")
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), len(values), timer)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @property
    def iqr_ratio(self) -> float:
        """IQR as a share of the median (infinite when the median is not positive)."""
        return self.iqr_s / self.median_s if self.median_s > 0 else math.inf

    @property
    def unstable(self) -> bool:
        return self.iqr_ratio > IQR_LIMIT

    @property
    def host_s(self) -> float | None:
        """Wall minus GPU time: the host's share of the wait (launches, Python, syncs)."""
        return None if self.gpu_s is None else self.median_s - self.gpu_s

    @property
    def host_share(self) -> float | None:
        """Host time as a share of wall time; negative when the GPU source measured more than the wall timer."""
        if self.gpu_s is None or self.median_s <= 0:
            return None
        return self.host_s / self.median_s

    def with_gpu(self, gpu_s: float | None, source: str | None) -> "Timing":
        return dataclasses.replace(self, gpu_s=gpu_s, gpu_source=None if gpu_s is None else source)

    def fields(self) -> dict:
        """The columns every timed row of ``results.json`` carries."""
        return {
            "median_s": self.median_s, "q1_s": self.q1_s, "q3_s": self.q3_s, "iqr_ratio": self.iqr_ratio,
            "unstable": self.unstable, "reps": self.reps, "timer": self.timer,
            "gpu_s": self.gpu_s, "gpu_source": self.gpu_source, "host_share": self.host_share,
        }


def within_spread(a_s: float, a_iqr_s: float, b_s: float, b_iqr_s: float) -> bool:
    """Whether two medians differ by no more than their two IQRs together: a difference the timing did not
    resolve, which no verdict may rest on."""
    return abs(a_s - b_s) <= a_iqr_s + b_iqr_s


def per_step(first: Timing, longer: Timing, steps: int) -> Timing:
    """One decode step as ``(longer - first) / steps``: two calls that differ by ``steps`` decode steps.

    The quartiles are those of ``longer`` shifted by the median of ``first``;
    the spread of the shorter call is left out (it is the smaller of the two).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shift = first.median_s

    def step(value: float) -> float:
        # Noise can put the longer call's time under the shorter one's: the step then reads as a nanosecond,
        # an outlier the report shows (its IQR flags it) rather than a negative time it cannot place.
        return max((value - shift) / steps, MIN_STEP_S)

    gpu = None
    if first.gpu_s is not None and longer.gpu_s is not None:
        gpu = max((longer.gpu_s - first.gpu_s) / steps, MIN_STEP_S)
    return Timing(step(longer.median_s), step(longer.q1_s), step(longer.q3_s), longer.reps,
                  f"({longer.timer}: call with {steps} more decode steps - shorter call) / {steps}",
                  gpu, longer.gpu_source if gpu is not None else None)


def collect(run_once: Callable[[], float], budget: TimingBudget,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Samples of ``run_once()`` (each returns one repetition's seconds) until ``budget`` has enough."""
    samples: list[float] = []
    start = clock()
    while not budget.enough(len(samples), clock() - start):
        samples.append(run_once())
    return samples


def warm_up(fn: Callable[[], object], budget: TimingBudget, sync: Callable[[], object] = lambda: None,
            clock: Callable[[], float] = time.perf_counter) -> int:
    """Call ``fn`` once, then until ``budget.warmup_calls`` calls or ``budget.warmup_seconds``; the call count."""
    start, calls = clock(), 0
    while calls == 0 or (calls < budget.warmup_calls and clock() - start < budget.warmup_seconds):
        fn()
        sync()
        calls += 1
    return calls


def profile_reps(median_s: float, target_s: float = 0.2, most: int = PROFILE_MOST) -> int:
    """Calls to profile: enough for about ``target_s`` of work, between 1 and ``most``."""
    if median_s <= 0:
        return most
    return max(1, min(most, math.ceil(target_s / median_s)))


def device_busy_seconds(events: Iterable) -> float:
    """Seconds of CUDA activity in ``torch.profiler`` events: kernels, memcpy, memset.

    The events the profiler's own table sums as "Self CUDA time total": those
    on the CUDA device, less user annotations (``record_function`` ranges
    mirrored on the GPU timeline, which span kernels already counted).
    """
    from torch.autograd import DeviceType

    total_us = 0.0
    for event in events:
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        total_us += event.time_range.elapsed_us()
    return total_us / 1e6


def profiled_gpu_seconds(fn: Callable[[], object], reps: int) -> float:
    """GPU time of one call of ``fn``: the device records of ``reps`` calls under ``torch.profiler``, per call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return device_busy_seconds(prof.events()) / reps


def graph_replay_seconds(calls: Sequence[Callable[[], object]], rounds: int, replays: int) -> float:
    """Seconds one pass over ``calls`` takes inside a CUDA graph: ``rounds`` passes captured back to back, the
    graph replayed ``replays`` times and timed with events, the median replay over ``rounds`` (no host launch
    cost inside it, as a captured decode step runs its kernels). The calls must have run once already (their
    kernels compiled, their buffers sized), outside the capture."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / rounds)
    return sorted(samples)[len(samples) // 2]


def _cuda_samples(fn: Callable[[], object], budget: TimingBudget) -> list[float]:
    warm_up(fn, budget, torch.cuda.synchronize)

    def once() -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # An empty queue: the call's own host work, not earlier GPU work, sets when it ends.
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    return collect(once, budget)


def _timeit_calls(number: int) -> int:
    """Calls of ``fn`` in one ``torch.utils.benchmark.Timer.timeit(number)``: it runs ``max(number // 100, 2)``
    calls of its own warm-up before the ``number`` it times."""
    return number + max(number // 100, 2)


def _block_sizes(most_per_rep: int) -> list[int]:
    """The block sizes the CPU timer tries before settling on one: 1, 10, 100, ... below ``most_per_rep``."""
    sizes, number = [], 1
    while number < most_per_rep:
        sizes.append(number)
        number *= 10
    return sizes


def _cpu_samples(fn: Callable[[], object], budget: TimingBudget,
                 most_per_rep: int = CPU_MOST_PER_REP) -> tuple[list[float], int]:
    """Per-call seconds of blocks of calls, and the calls per block (timer overhead under 0.1% of a block, with
    at most ``most_per_rep`` calls a block)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    # Warm up through the timer too: it runs fn on one thread, and so must the warm-up (on a busy machine a
    # call on every core can take ten times as long).
    warm_up(lambda: timer.timeit(1), budget)
    number = 1
    while number < most_per_rep and timer.timeit(number).raw_times[0] < 1e-3:
        number = min(number * 10, most_per_rep)
    return collect(lambda: timer.timeit(number).times[0], budget), number


def max_calls(budget: TimingBudget, device: torch.device, most_per_rep: int = CPU_MOST_PER_REP) -> int:
    """The most calls of ``fn`` that ``measure(fn, device, budget, most_per_rep=most_per_rep)`` makes: what a
    caller whose ``fn`` uses something up on every call (a decode step stores a position) must set aside.

    On CUDA: the warm-up, the repetitions and the profiled calls. On a CPU: the warm-up and the block sizes tried
    (each a ``timeit`` call with its own warm-up), then every repetition at the largest block.
    """
    if device.type == "cuda":
        return budget.warmup_calls + budget.min_reps + PROFILE_MOST
    tried = sum(_timeit_calls(n) for n in _block_sizes(most_per_rep))
    return budget.warmup_calls * _timeit_calls(1) + tried + budget.min_reps * _timeit_calls(most_per_rep)


def measure(fn: Callable[[], object], device: torch.device, budget: TimingBudget = END_TO_END,
            device_time: str | None = "profiler", most_per_rep: int = CPU_MOST_PER_REP) -> Timing:
    """Wall time of ``fn()`` and, on CUDA, its GPU time.

    ``device_time``: ``"profiler"`` (sum of the profiler's device records over
    a few extra calls), ``"graph-replay"`` (``fn`` replays a captured CUDA graph:
    the events around it are its GPU time) or ``None`` (not measured).
    ``most_per_rep`` bounds the calls of one CPU repetition (on CUDA each is one
    call), so that :func:`max_calls` bounds them all.
    """
    if device_time not in DEVICE_TIME_SOURCES:
        raise ValueError(f"device_time must be one of {DEVICE_TIME_SOURCES}, got {device_time!r}")
    if most_per_rep < 1:
        raise ValueError(f"most_per_rep must be >= 1, got {most_per_rep}")
    if device.type != "cuda":
        samples, number = _cpu_samples(fn, budget, most_per_rep)
        return Timing.from_samples(samples, f"torch.utils.benchmark, 1 thread, {number} call(s) per repetition")
    timing = Timing.from_samples(_cuda_samples(fn, budget), CUDA_EVENTS)
    if device_time == "profiler":
        return timing.with_gpu(profiled_gpu_seconds(fn, profile_reps(timing.median_s)), PROFILER)
    if device_time == "graph-replay":
        return timing.with_gpu(timing.median_s, GRAPH_REPLAY)
    return timing


def measure_op(fn: Callable[[], object], device: torch.device, budget: TimingBudget = OPS) -> Timing:
    """A single op: ``do_bench`` quartiles and profiler GPU time on CUDA, ``measure`` on a CPU."""
    if device.type != "cuda":
        return measure(fn, device, budget)
    import triton.testing

    # do_bench's own warm-up (25 ms) follows a first call that compiles and autotunes; rep is in ms.
    quartiles = triton.testing.do_bench(fn, rep=max(1, round(budget.min_seconds * 1e3)), quantiles=[0.25, 0.5, 0.75])
    q1, median, q3 = (ms / 1e3 for ms in quartiles)
    timing = Timing(median, q1, q3, None, DO_BENCH)
    return timing.with_gpu(profiled_gpu_seconds(fn, profile_reps(median)), PROFILER)


def measure_copy(elements: int, device: torch.device, dtype: torch.dtype, budget: TimingBudget = OPS) -> Timing:
    """A device-to-device ``copy_`` of ``elements`` elements, timed as a single op: what moving bytes costs on
    this device, the yardstick of ops bound by memory."""
    src = torch.empty(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return measure_op(lambda: dst.copy_(src), device, budget)
