"""How the benchmark times a case: the stopping rule, quartiles, the IQR flag and the wall/GPU/host split,
checked on synthetic timings (no timing is asserted)."""

import math
import re
import types

import pytest
import torch

from bench import timing
from bench._common import timing_cells
from bench.timing import Timing, TimingBudget


class FakeClock:
    """A clock that advances by ``step`` seconds at each reading."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


# -- the stopping rule ---------------------------------------------------------

@pytest.mark.parametrize("reps, elapsed, enough", [
    (4, 100.0, False),  # under the floor, however long it took
    (5, 1.0, True),     # min_seconds with the floor reached
    (19, 0.99, False),  # neither min_reps nor min_seconds
    (20, 0.1, True),    # min_reps
], ids=["under-floor", "min-seconds", "neither", "min-reps"])
def test_budget_needs_reps_or_seconds_and_the_floor(reps, elapsed, enough):
    assert TimingBudget(min_reps=20, min_seconds=1.0, floor_reps=5).enough(reps, elapsed) is enough


@pytest.mark.parametrize("kwargs, message", [
    ({"floor_reps": 0}, "floor_reps"),
    ({"floor_reps": 30, "min_reps": 20}, "floor_reps <= min_reps"),
    ({"min_seconds": -1.0}, "min_seconds must be >= 0"),
    ({"warmup_calls": 0}, "warmup_calls"),
], ids=["zero-floor", "floor-over-min", "negative-seconds", "no-warmup"])
def test_budget_rejects_inconsistent_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimingBudget(**kwargs)


@pytest.mark.parametrize("call_seconds, expected", [
    (0.04, 20),  # a 40 ms forward: 20 repetitions come first (0.8 s)
    (0.125, 8),  # 125 ms calls: 1 s comes first
    (3.0, 5),    # 3 s calls: 1 s has passed after one, the floor asks for 5
], ids=["fast", "medium", "slow"])
def test_collect_stops_where_the_budget_says(call_seconds, expected):
    clock = FakeClock(0.0)

    def once():
        clock.now += call_seconds
        return call_seconds

    samples = timing.collect(once, timing.END_TO_END, clock=clock)
    assert len(samples) == expected and set(samples) == {call_seconds}


def test_warm_up_calls_once_then_up_to_the_budget():
    calls = []
    budget = TimingBudget(warmup_calls=3, warmup_seconds=0.5)
    assert timing.warm_up(lambda: calls.append(1), budget, clock=FakeClock(0.01)) == 3
    # A slow first call ends the warm-up at once; a first call always happens.
    assert timing.warm_up(lambda: calls.append(1), budget, clock=FakeClock(1.0)) == 1
    assert timing.warm_up(lambda: calls.append(1), timing.QUICK, clock=FakeClock(0.0)) == 1
    assert len(calls) == 5


# -- quartiles and the IQR flag --------------------------------------------------

def test_quartiles_of_samples():
    # numpy's linear interpolation: for 1..9 ms, q1 = 3, median = 5, q3 = 7.
    t = Timing.from_samples([i * 1e-3 for i in (9, 1, 8, 2, 7, 3, 6, 4, 5)], "fake")
    assert (t.q1_s, t.median_s, t.q3_s) == pytest.approx((3e-3, 5e-3, 7e-3))
    assert t.iqr_s == pytest.approx(4e-3) and t.iqr_ratio == pytest.approx(0.8)
    assert t.reps == 9 and t.unstable


@pytest.mark.parametrize("iqr, unstable", [(0.0, False), (0.049, False), (0.05, False), (0.051, True), (0.3, True)])
def test_iqr_flag_is_over_five_percent_of_the_median(iqr, unstable):
    # A median of 1 s and q1 = 0 keep the IQR's share exact in binary floating point.
    t = Timing(median_s=1.0, q1_s=0.0, q3_s=iqr, reps=20, timer="fake")
    assert t.iqr_ratio == iqr
    assert t.unstable is unstable
    assert t.fields()["unstable"] is unstable
    assert timing_cells(t.fields())["iqr"].endswith(" !") is unstable


def test_from_samples_rejects_empty_or_non_finite():
    with pytest.raises(ValueError, match="non-empty"):
        Timing.from_samples([], "fake")
    with pytest.raises(ValueError, match="finite"):
        Timing.from_samples([1.0, math.nan], "fake")


# -- wall, GPU and host ------------------------------------------------------------

def test_wall_gpu_host_split():
    t = Timing(median_s=40e-3, q1_s=39e-3, q3_s=41e-3, reps=25, timer="fake").with_gpu(10e-3, timing.PROFILER)
    assert t.host_s == pytest.approx(30e-3)
    assert t.host_share == pytest.approx(0.75)
    fields = t.fields()
    assert fields["gpu_s"] == 10e-3 and fields["gpu_source"] == timing.PROFILER
    assert fields["host_share"] == pytest.approx(0.75)
    cells = timing_cells(fields)
    assert (cells["wall_ms"], cells["gpu_ms"], cells["host"]) == ("40.000", "10.000", "75%")


def test_no_gpu_time_means_no_host_split():
    t = Timing(median_s=40e-3, q1_s=39e-3, q3_s=41e-3, reps=25, timer="fake")
    assert t.gpu_s is None and t.host_s is None and t.host_share is None
    assert t.with_gpu(None, timing.PROFILER).gpu_source is None
    cells = timing_cells(t.fields())
    assert cells["gpu_ms"] == "-" and cells["host"] == "-"


def test_a_gpu_time_over_the_wall_time_gives_a_negative_host_share():
    # Two timers disagreeing is shown, not hidden.
    t = Timing(median_s=10e-3, q1_s=10e-3, q3_s=10e-3, reps=5, timer="fake").with_gpu(11e-3, timing.PROFILER)
    assert t.host_share == pytest.approx(-0.1)


def test_graph_replay_gpu_time_gives_the_host_share():
    # 6 ms of replay in 8 ms of wall time: the other 2 ms, a quarter, are the host's.
    t = Timing(median_s=8e-3, q1_s=8e-3, q3_s=8e-3, reps=20, timer=timing.CUDA_EVENTS)
    replay = t.with_gpu(6e-3, timing.GRAPH_REPLAY)
    assert replay.host_s == pytest.approx(2e-3) and replay.host_share == pytest.approx(0.25)
    assert replay.gpu_source == timing.GRAPH_REPLAY and replay.fields()["host_share"] == pytest.approx(0.25)


def test_per_step_is_the_difference_over_the_steps():
    first = Timing(median_s=10e-3, q1_s=9e-3, q3_s=11e-3, reps=30, timer="t").with_gpu(4e-3, timing.PROFILER)
    longer = Timing(median_s=50e-3, q1_s=48e-3, q3_s=54e-3, reps=20, timer="t").with_gpu(12e-3, timing.PROFILER)
    step = timing.per_step(first, longer, 8)
    # (50 - 10) / 8 = 5 ms; the quartiles are the longer call's, shifted by the shorter one's median.
    assert (step.median_s, step.q1_s, step.q3_s) == pytest.approx((5e-3, 4.75e-3, 5.5e-3))
    assert step.gpu_s == pytest.approx(1e-3) and step.host_share == pytest.approx(0.8)
    assert step.reps == 20 and step.iqr_ratio == pytest.approx(0.15)
    no_gpu = timing.per_step(first.with_gpu(None, None), longer, 8)
    assert no_gpu.gpu_s is None and no_gpu.gpu_source is None
    with pytest.raises(ValueError, match="steps must be >= 1"):
        timing.per_step(first, longer, 0)


def test_per_step_of_noise_is_a_flagged_nanosecond():
    first = Timing(median_s=10e-3, q1_s=9e-3, q3_s=11e-3, reps=2, timer="t")
    faster = Timing(median_s=9.5e-3, q1_s=9e-3, q3_s=10.5e-3, reps=2, timer="t")
    step = timing.per_step(first, faster, 2)
    assert (step.q1_s, step.median_s) == (timing.MIN_STEP_S, timing.MIN_STEP_S)
    assert step.q3_s == pytest.approx(0.25e-3) and step.unstable


@pytest.mark.parametrize("median_s, reps", [(1.0, 1), (0.15, 2), (0.05, 4), (1e-4, 5), (0.0, 5)])
def test_profile_reps(median_s, reps):
    assert timing.profile_reps(median_s) == reps


def test_device_busy_seconds_sums_device_records_only():
    from torch.autograd import DeviceType

    def event(device, us, annotation=False):
        return types.SimpleNamespace(device_type=device, is_user_annotation=annotation,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us))

    events = [event(DeviceType.CPU, 500.0), event(DeviceType.CUDA, 120.0), event(DeviceType.CUDA, 30.0),
              event(DeviceType.CUDA, 1000.0, annotation=True)]
    assert timing.device_busy_seconds(events) == pytest.approx(150e-6)


# -- on this machine's CPU -----------------------------------------------------------

def test_measure_on_cpu_has_no_gpu_time():
    x = torch.randn(64, 64)
    t = timing.measure(lambda: x @ x, torch.device("cpu"), timing.QUICK)
    assert t.gpu_s is None and t.host_share is None
    assert t.reps >= timing.QUICK.floor_reps and 0 < t.q1_s <= t.median_s <= t.q3_s
    assert "torch.utils.benchmark" in t.timer


class Counter:
    """A call that counts itself: how many times the timer ran it."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


@pytest.mark.parametrize("budget", [timing.QUICK, timing.END_TO_END], ids=["quick", "end-to-end"])
@pytest.mark.parametrize("most_per_rep", [1, 10, 50])
def test_max_calls_bounds_what_measure_calls_on_cpu(budget, most_per_rep):
    # A call that takes nanoseconds grows the timer's blocks to the cap: the worst case of the bound.
    fn = Counter()
    t = timing.measure(fn, torch.device("cpu"), budget, most_per_rep=most_per_rep)
    assert fn.calls <= timing.max_calls(budget, torch.device("cpu"), most_per_rep)
    assert 1 <= int(re.search(r"(\d+) call\(s\) per repetition", t.timer).group(1)) <= most_per_rep


def test_max_calls_counts_warm_up_blocks_tried_and_repetitions():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # Blocks of one call: 3 warm-up timeit(1) calls and 20 repetitions, each timeit(1) runs 2 + 1 calls.
    assert timing.max_calls(timing.END_TO_END, cpu, 1) == 3 * 3 + 20 * 3
    # Blocks of up to 10: timeit(1) is tried (3 calls), then 20 repetitions of timeit(10) (2 + 10 calls).
    assert timing.max_calls(timing.END_TO_END, cpu, 10) == 3 * 3 + 3 + 20 * 12
    # Up to 1000: timeit(1), (10) and (100) are tried, then timeit(1000) runs 10 + 1000 calls.
    assert timing.max_calls(timing.QUICK, cpu, 1000) == 1 * 3 + (3 + 12 + 102) + 2 * 1010
    # On CUDA, one call a repetition: warm-up, repetitions and at most 5 profiled calls.
    assert timing.max_calls(timing.END_TO_END, cuda) == 3 + 20 + 5


def test_measure_with_one_call_a_repetition_makes_exactly_the_bound():
    fn = Counter()
    timing.measure(fn, torch.device("cpu"), timing.END_TO_END, most_per_rep=1)
    assert fn.calls == timing.max_calls(timing.END_TO_END, torch.device("cpu"), 1)


def test_measure_rejects_an_unknown_device_time_source():
    with pytest.raises(ValueError, match="device_time must be one of"):
        timing.measure(lambda: None, torch.device("cpu"), timing.QUICK, device_time="events")


# -- the CUDA wiring, with the device parts replaced by synthetic timings --------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """20 wall-time samples of 40 ms and 10 ms of profiled kernels, with no GPU."""
    profiled = []
    monkeypatch.setattr(timing, "_cuda_samples", lambda fn, budget: [0.039, 0.04, 0.041] * 7)
    monkeypatch.setattr(timing, "profiled_gpu_seconds", lambda fn, reps: profiled.append(reps) or 0.01)
    return profiled


def test_measure_on_cuda_splits_wall_gpu_and_host(fake_cuda):
    t = timing.measure(lambda: None, torch.device("cuda"))
    assert (t.median_s, t.gpu_s, t.gpu_source) == (0.04, 0.01, timing.PROFILER)
    assert t.host_share == pytest.approx(0.75) and t.reps == 21 and t.timer == timing.CUDA_EVENTS
    assert fake_cuda == [5]  # 0.2 s of profiling at 40 ms a call


def test_measure_of_a_graph_replay_takes_its_events_as_gpu_time(fake_cuda):
    t = timing.measure(lambda: None, torch.device("cuda"), device_time="graph-replay")
    assert (t.gpu_s, t.gpu_source, t.host_share) == (0.04, timing.GRAPH_REPLAY, 0.0)
    assert fake_cuda == []
    assert timing.measure(lambda: None, torch.device("cuda"), device_time=None).gpu_s is None


def test_measure_op_on_cuda_takes_do_bench_quartiles(fake_cuda, monkeypatch):
    import triton.testing

    calls = []

    def do_bench(fn, rep, quantiles):
        calls.append((rep, quantiles))
        return [1.0, 2.0, 4.0]  # ms

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(timing, "profiled_gpu_seconds", lambda fn, reps: 1.5e-3)
    t = timing.measure_op(lambda: None, torch.device("cuda"))
    assert calls == [(200, [0.25, 0.5, 0.75])]  # rep: OPS' 0.2 s, in ms
    assert (t.q1_s, t.median_s, t.q3_s, t.reps, t.timer) == (1e-3, 2e-3, 4e-3, None, timing.DO_BENCH)
    assert t.unstable and t.host_share == pytest.approx(0.25)
