"""Serving: a trace of requests that join and leave one running decode batch, each under its own plan.

A fixed seed draws the trace (:func:`make_trace`): Poisson arrivals (in
decode steps), prompt and output lengths (uniform over their ranges), and for
each request its plan's kind and budget: a full plan for a share of them,
else AdaLLaVA-L or -H (evenly) at a budget drawn from [0.5, 1.0], over switch
logits of its own (the scheduler's logits; :func:`~bench.plans.random_scores`).
:class:`Server` replays it as a server runs: at each decode step the requests
that arrived wait for a free row of the one running batch (capacity
:data:`CAPACITY`); each is planned (``best_plan`` over its logits), admitted
(``admit`` + ``row_plan``), prefilled and joins; ``prepare()`` derives the
union once after the round of joins; one step; the requests whose output is
complete leave and are freed. The section reports:

1. **host time per event** (:func:`host_times`) at LLaVA-1.5-7B shapes with
   no weight allocated: the runner is built on the ``meta`` device (weights
   and KV pool hold shapes only; the pool's bookkeeping is real). Meta runs
   no kernel, so a step's forward (``DecodeBatch.forward_step``, the launches
   a CUDA graph replays) is replaced by a no-op on that batch and prefill is
   not run: a request is marked prefilled as ``PlannedDecoder.prefill``
   records it (:func:`mark_prefilled`). Timed apart, at batch sizes 1, 16 and
   64 (the batch filled to B - 1 rows, the state restored after each
   repeat): plan construction (-L, -H), admission, join, ``prepare()``, a
   step's bookkeeping (nothing dirty) and leave; medians with IQR over
   repeats on one thread, with the aten ops each event dispatches (views
   left out: on CUDA about one launch each). Meta computes shapes with
   Python reference code for many ops, so its time per op exceeds a CUDA
   launch's host cost: the times are expected to bound the host work from
   above, the op counts are what carries over. On a GPU the same events are
   also timed on the GPU runner (real launches, not waited for);
2. **graph keys over a trace** (:func:`key_trace`): ``batch.graph_key``
   before every step of a 1000-event trace (joins and leaves) whose batch
   spans 1 to 64 rows: the distinct keys (the CUDA graphs the trace would
   capture) and those first seen after the first 100 events;
3. **on a GPU** (:func:`measure_trace`): a shorter trace with real weights
   (random, at the run's shape; Triton, CUDA graphs warmed up and captured
   for every batch size first) and the same trace with every plan full:
   tokens per second, time per output token, time to first token, each
   step's wall and GPU time (CUDA events), the graph captures while the
   traces run, and the union cost model's prediction
   (``cost.batch_decode_cost(union=True)`` per step, summed) of the mixed /
   full ratio beside the measured one. Without a GPU the measured rows are
   pending; the prediction (a function of the trace alone) is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
from collections import deque
from typing import Callable, Hashable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adallava_kernels import ExecutionPlan, ModelShape, UnitScheme, best_plan, cost, get_device
from adallava_kernels.devices import DeviceSpec
from adallava_kernels.runtime import PlannedDecoder

from . import model as model_bench
from ._common import format_table, markdown_table, sync
from .plans import random_scores
from .timing import IQR_LIMIT, Timing

CAPACITY = 64
PAGE_SIZE = 16
BATCH_SIZES = (1, 16, 64)
HOST_MODEL = "llava-7b"  # the host-time and key sections' shape unless --model names one (meta: no memory)
HOST_PROMPT = 700  # positions a request of the host-time section holds when it joins
HOST_MAX_TOKENS = 4096  # LLaVA-1.5's context: the rows never fill while the steps are timed
HOST_REPEATS = 200
QUICK_REPEATS = 5
STEPS_PER_REPEAT = 5
KEY_EVENTS = 1000
QUICK_KEY_EVENTS = 200
WARM_EVENTS = 100  # keys first seen after this many events are "new after warm-up"
GPU_REQUESTS = 96
QUICK_GPU_REQUESTS = 16
DEVICE_PROMPT = 64  # the host-time events on the GPU runner: its pool holds the GPU trace's requests
FULL = "full"
EVENTS = ("plan -L", "plan -H", "admission -L", "admission -H", "join", "prepare", "step", "leave")
EVENT_TEXT = {
    "plan -L": "scheduler logits -> best_plan -> ExecutionPlan, AdaLLaVA-L",
    "plan -H": "scheduler logits -> best_plan -> ExecutionPlan, AdaLLaVA-H",
    "admission -L": "admit (every KV page reserved) + row_plan (the plan's device masks), an -L plan",
    "admission -H": "admit (every KV page reserved) + row_plan (the plan's device masks), an -H plan",
    "join": "DecodeBatch.join of one prefilled request (writes its slot)",
    "prepare": "DecodeBatch.prepare(): the union and each row's view, once after a round of joins/leaves",
    "step": "DecodeBatch.step() bookkeeping, nothing dirty, forward_step a no-op",
    "leave": "DecodeBatch.leave of one row (the last row moves into its slot) + its length to the pool",
}
META_NOTE = ("meta device: weights and KV pool hold shapes only; the step's forward_step (the launches a CUDA graph "
             "replays) is a no-op on the timed batch and prefill is not run (requests are marked prefilled as "
             "prefill records it), so the forward's own launches are excluded: meta has no kernels to run them; "
             "meta computes shapes with Python reference code for many ops, so a meta op costs more host time than "
             "a CUDA launch: the times are expected to bound the host work from above; the op counts carry over")


# -- the trace -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """What a trace draws: ``requests`` arrivals, Poisson at ``rate`` per decode step; prompt and output
    lengths uniform over their inclusive ranges (an output of at least 2 tokens: the first comes from the
    prefill, the others from decode steps); ``full_share`` of the requests under the full plan, the others
    AdaLLaVA-L or -H (evenly) at a budget uniform over [0.5, 1.0]; everything from ``seed``."""

    requests: int
    rate: float
    prompt: tuple[int, int]
    output: tuple[int, int]
    full_share: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.rate > 0 or not 0 <= self.full_share <= 1:
            raise ValueError(f"a trace needs requests >= 1, rate > 0 and full_share in [0, 1], got {self}")
        if not 1 <= self.prompt[0] <= self.prompt[1] or not 2 <= self.output[0] <= self.output[1]:
            raise ValueError(f"prompt lengths must be >= 1 and outputs >= 2 (lo <= hi), got {self.prompt}, "
                             f"{self.output}")

    def to_dict(self) -> dict:
        return {"requests": self.requests, "rate": self.rate, "prompt": list(self.prompt),
                "output": list(self.output), "full_share": self.full_share, "seed": self.seed}


# The key trace: 500 requests, so 1000 joins and leaves; at 0.8 arrivals a step of about 68 output tokens each,
# about 54 rows are busy on average: the batch ramps from 1 row to 64, stays between about 50 and 64 (a queue
# forms while it is full), then drains to 1.
KEYS_TRACE = TraceConfig(KEY_EVENTS // 2, 0.8, (32, 700), (8, 128))
# The GPU trace: short enough for a few minutes at LLaVA-7B on an H200 (--serve-requests scales it).
GPU_TRACE = TraceConfig(GPU_REQUESTS, 0.8, (32, 512), (16, 128))


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival: int  # the decode step at which it arrives
    prompt: int
    output: int  # tokens it generates: one from its prefill, output - 1 from decode steps
    kind: str  # "L", "H" or FULL
    budget: float  # 1.0 for a full plan
    scores: object = None  # the scheduler's logits (None for a full plan)

    @property
    def max_tokens(self) -> int:
        """Positions it stores: its prompt and every generated token but the last (which is not fed back)."""
        return self.prompt + self.output - 1


@dataclasses.dataclass(frozen=True)
class Trace:
    config: TraceConfig
    shape: ModelShape
    requests: tuple[TraceRequest, ...]

    @property
    def max_tokens(self) -> int:
        return max(r.max_tokens for r in self.requests)

    def summary(self) -> dict:
        """The trace as results.json records it: its settings and what it drew."""
        requests = self.requests
        return {**self.config.to_dict(), "last_arrival": requests[-1].arrival,
                "kinds": {kind: sum(r.kind == kind for r in requests) for kind in ("L", "H", FULL)},
                "output_tokens": sum(r.output for r in requests), "max_tokens": self.max_tokens}


def make_trace(shape: ModelShape, config: TraceConfig) -> Trace:
    """The trace ``config`` draws from its seed: the same seed, the same trace (arrivals, lengths, kinds,
    budgets and scheduler logits)."""
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    schemes = {kind: UnitScheme.default(kind, shape) for kind in "LH"}
    clock, requests = 0.0, []
    for index in range(config.requests):
        clock += rng.expovariate(config.rate)
        prompt = rng.randint(*config.prompt)
        output = rng.randint(*config.output)
        if rng.random() < config.full_share:
            kind, budget, scores = FULL, 1.0, None
        else:
            kind = "LH"[rng.random() < 0.5]
            budget = 0.5 + 0.5 * rng.random()
            scores = random_scores(schemes[kind], generator)
        requests.append(TraceRequest(index, int(clock), prompt, output, kind, budget, scores))
    return Trace(config, shape, tuple(requests))


# -- the serving loop --------------------------------------------------------------------------------


@dataclasses.dataclass
class ReplayLog:
    """What a replay did: per step the rows, their request indices and the graph key, the join and leave
    events before it; per request its plan, the step it joined before (``joined``: the index of its first
    step) and the steps taken when it left (``left``: its last token came from step ``left - 1``)."""

    rows: list[int] = dataclasses.field(default_factory=list)
    members: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    keys: list[tuple] = dataclasses.field(default_factory=list)
    events_before: list[int] = dataclasses.field(default_factory=list)
    events: int = 0
    joined: dict[int, int] = dataclasses.field(default_factory=dict)
    left: dict[int, int] = dataclasses.field(default_factory=dict)
    plans: dict[int, ExecutionPlan] = dataclasses.field(default_factory=dict)
    warm_keys: list[tuple] = dataclasses.field(default_factory=list)  # captured by warm_up() before the trace


class Server:
    """The serving loop over a trace, as a server runs it with one running batch of ``capacity`` rows.

    ``all_full``: every request under the full plan (the same arrivals and lengths). Subclasses say how a
    request is prefilled and how a step runs (:class:`MetaServer`: neither runs; :class:`MeasuredServer`:
    both, timed)."""

    def __init__(self, runner: PlannedDecoder, trace: Trace, *, capacity: int = CAPACITY, all_full: bool = False):
        self.runner, self.trace, self.capacity, self.all_full = runner, trace, capacity, all_full
        self.schemes = {kind: UnitScheme.default(kind, runner.shape) for kind in "LH"}
        self.full = ExecutionPlan.full(runner.shape)
        self.log = ReplayLog()
        self.batch = None

    def plan(self, request: TraceRequest) -> ExecutionPlan:
        """The scheduler's plan: ``best_plan`` over the request's logits at its budget."""
        if self.all_full or request.kind == FULL:
            return self.full
        return best_plan(self.schemes[request.kind], request.budget, request.scores)

    def prefill(self, request: TraceRequest) -> torch.Tensor:
        """Prefill an admitted request; returns its first token ``[1]`` (its next input). The loop itself runs
        no prefill: each server says how (:class:`MetaServer` records it, :class:`MeasuredServer` runs it)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how a request is prefilled: use "
                                  "MetaServer or MeasuredServer, or override Server.prefill")

    def arrived(self, request: TraceRequest) -> None:
        """Called when the clock reaches a request's arrival."""

    def step(self) -> None:
        self.batch.step()

    def open_batch(self):
        """The running batch, every bucket's graphs captured before the first request (``warm_up``)."""
        batch = self.runner.decode(capacity=self.capacity, max_tokens=self.trace.max_tokens)
        self.log.warm_keys = batch.warm_up()
        return batch

    def run(self) -> ReplayLog:
        runner, log = self.runner, self.log
        pending, waiting = deque(self.trace.requests), deque()
        leaving: dict[int, list[int]] = {}  # clock -> the requests whose output is complete then
        admitted: set[int] = set()
        clock = 0
        self.batch = batch = self.open_batch()
        try:
            while pending or waiting or admitted:
                while pending and pending[0].arrival <= clock:
                    request = pending.popleft()
                    waiting.append(request)
                    self.arrived(request)
                if not waiting and not admitted:
                    clock = pending[0].arrival  # idle: the clock moves to the next arrival
                    continue
                while waiting and batch.rows < self.capacity:
                    request = waiting.popleft()
                    plan = log.plans[request.index] = self.plan(request)
                    runner.admit(request.index, plan, request.max_tokens)
                    admitted.add(request.index)
                    token = self.prefill(request)
                    batch.join([request.index], token)
                    log.joined[request.index] = len(log.rows)  # the first step it is a row of
                    leaving.setdefault(clock + request.output - 1, []).append(request.index)
                    log.events += 1
                batch.prepare()  # once, after the round of joins and leaves
                log.rows.append(batch.rows)
                log.members.append(tuple(batch.seq_ids))
                log.keys.append(batch.graph_key)
                log.events_before.append(log.events)
                self.step()
                clock += 1
                for index in leaving.pop(clock, ()):
                    batch.leave([index])
                    runner.free(index)
                    admitted.discard(index)
                    log.left[index] = len(log.rows)  # steps taken: its last token came from the one before
                    log.events += 1
        finally:
            for index in admitted:
                runner.free(index)  # a row leaves its batch first
            batch.close()
        return log


def mark_prefilled(runner: PlannedDecoder, seq_id: Hashable, length: int) -> None:
    """Record ``seq_id`` as prefilled over ``length`` prompt positions without running the prefill: what
    ``PlannedDecoder.prefill`` records (the pool advanced by ``length``, the request's ``prefilled``,
    ``length`` and ``starts``, no left padding). The runtime has no public call for it: the request is
    reached through ``runner._request``."""
    request = runner._request(seq_id)
    if request.prefilled or length > request.max_tokens:
        raise ValueError(f"sequence {seq_id!r}: already prefilled, or {length} positions exceed its max_tokens")
    runner.cache.advance([seq_id], length)
    request.prefilled, request.length = True, length
    request.starts = torch.zeros(1, dtype=torch.int32, device=runner.weights.device)


def _no_forward(bucket: int, visible_pages: int | None = None) -> None:
    """A decode step's forward on the meta device: nothing (meta has no kernels to run)."""


class MetaServer(Server):
    """The loop on a meta runner: prefill marked (:func:`mark_prefilled`), every step's forward a no-op."""

    def prefill(self, request: TraceRequest) -> torch.Tensor:
        mark_prefilled(self.runner, request.index, request.prompt)
        return torch.zeros(1, dtype=torch.int64, device=self.runner.weights.device)

    def open_batch(self):
        batch = super().open_batch()
        batch.forward_step = _no_forward  # on this instance only
        return batch


# -- a runner on the meta device -------------------------------------------------------------------


@contextlib.contextmanager
def _triton_on_meta():
    """The Triton backend for a runner on meta (as ``bench.static`` takes it on CPU tensors: no kernel is
    launched). Only ``resolve_backend`` reads the flag, when the runner is built; it then holds the CUDA
    path's buffers (no torch-backend index tensors) and skips the torch path's host work."""
    from adallava_kernels.ops import common

    common.COMPILE_ONLY = True
    try:
        yield
    finally:
        common.COMPILE_ONLY = False


def meta_runner(shape: ModelShape, dtype: torch.dtype = torch.bfloat16, max_tokens: int = HOST_MAX_TOKENS
                ) -> PlannedDecoder:
    """A :class:`PlannedDecoder` at ``shape`` on the meta device, Triton backend, prefix layers whole (as the
    AdaLLaVA model builds its runtime), with a pool that holds ``CAPACITY + 1`` full requests of
    ``max_tokens`` (meta: the pages take no memory)."""
    model = model_bench.build(shape, torch.device("meta"), dtype)
    switchable = range(UnitScheme.default("H", shape).prefix_layers, shape.num_layers)
    pages = (CAPACITY + 1) * shape.num_layers * shape.num_kv_heads * -(-max_tokens // PAGE_SIZE)
    with _triton_on_meta():
        return PlannedDecoder.from_hf(model, num_pages=pages, page_size=PAGE_SIZE, backend="triton",
                                      partial_layers=switchable)


# -- 1. host time per event ----------------------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched, views left out (on CUDA about one launch each)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def one_thread():
    """torch on one thread (restored after), the Python GC off (as ``timeit``): host timings less noisy."""
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    torch.set_num_threads(1)
    gc.disable()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


def _fresh_logits(shape: ModelShape, count: int, seed: int) -> list[dict[str, tuple[float, object]]]:
    """``count`` draws of a budget and scheduler logits for each of -L and -H."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    schemes = {kind: UnitScheme.default(kind, shape) for kind in "LH"}
    return [{kind: (0.5 + 0.5 * rng.random(), random_scores(schemes[kind], generator)) for kind in "LH"}
            for _ in range(count)]


WARM_REPEATS = 2  # untimed repeats first: the step's per-bucket views are made there


def host_times(shape: ModelShape, *, batch_sizes=BATCH_SIZES, repeats: int = HOST_REPEATS,
               steps: int = STEPS_PER_REPEAT, prompt: int = HOST_PROMPT, max_tokens: int = HOST_MAX_TOKENS,
               seed: int = 0, runner: PlannedDecoder | None = None) -> list[dict]:
    """Host seconds of each serving event (:data:`EVENTS`) on a meta runner at ``shape`` (made here unless
    given), at each batch size B. The batch holds B - 1 rows; per repeat a new request's -L and -H plans
    are built from fresh logits (one of them, alternately, is its plan: each admission kind gets half the
    repeats), it is admitted, marked prefilled
    and joins (B rows), the union is prepared, ``steps`` steps run with nothing dirty, and the row in the
    middle leaves (the last row moves into its slot); then the state is restored, untimed (the row that
    left rejoins, the new request leaves and is freed, the union is prepared). Each event is timed alone
    (``time.perf_counter``); two last, untimed repeats count each event's aten ops. One row per (event, B):
    median and quartiles over the repeats (the step's over every step) and the ops."""
    if repeats < 2 or steps < 1:
        raise ValueError(f"repeats must be >= 2 (each admission kind takes every other one) and steps >= 1, got "
                         f"{repeats} and {steps}")
    rounds = WARM_REPEATS + repeats + 2  # the last two count ops (an -L request, then an -H one), untimed
    if prompt + rounds * steps + 1 > max_tokens:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for {rounds} rounds of {steps} steps after a "
                         f"prompt of {prompt}")
    runner = runner or meta_runner(shape, max_tokens=max_tokens)
    token = torch.zeros(1, dtype=torch.int64, device=runner.weights.device)
    schemes = {kind: UnitScheme.default(kind, shape) for kind in "LH"}
    rows = []
    with one_thread():
        for b in batch_sizes:
            if not 1 <= b <= CAPACITY:
                raise ValueError(f"batch sizes must be in [1, {CAPACITY}], got {b}")
            # Fresh logits, so a fresh plan object, per request: nothing cached from an earlier one is reused.
            drawn = _fresh_logits(shape, rounds + b, seed * 1000 + b)
            batch = runner.decode(capacity=CAPACITY, max_tokens=max_tokens)
            # On this instance only: no forward, and no graph (a runner on CUDA would capture the no-op).
            batch.forward_step, batch.graphs = _no_forward, None
            for i in range(b - 1):
                kind = "LH"[i % 2]
                name = f"b{b}-fill{i}"
                runner.admit(name, best_plan(schemes[kind], *drawn[rounds + i][kind]), max_tokens)
                mark_prefilled(runner, name, prompt)
                batch.join([name], token)
            batch.prepare()
            samples: dict[str, list[float]] = {event: [] for event in EVENTS}
            ops: dict[str, list[int]] = {}
            for r in range(rounds):
                counting = r >= rounds - 2
                kind = "LH"[(r - rounds) % 2]  # alternate, the last round -H
                measured = _event_round(runner, batch, schemes, drawn[r], kind, f"b{b}-new{r}", prompt, max_tokens,
                                        token, steps, _CountOps() if counting else None)
                if counting:
                    ops |= measured
                elif r >= WARM_REPEATS:
                    for event, values in measured.items():
                        samples[event] += values
            for seq_id in list(batch.seq_ids):
                batch.leave([seq_id])
                runner.free(seq_id)
            batch.close()
            for event in EVENTS:
                measured = Timing.from_samples(samples[event], "time.perf_counter, one event a sample")
                rows.append({"event": event, "batch": b, "ops": ops[event][0], **measured.fields()})
    return rows


def _event_round(runner, batch, schemes, logits, kind, seq_id, prompt, max_tokens, token, steps, counter
                 ) -> dict[str, list]:
    """One repeat of :func:`host_times`: per event its seconds (the step: one per step) or, with ``counter``,
    its aten ops (one step)."""
    out: dict[str, list] = {}

    def timed(event: str, fn: Callable[[], object]):
        if counter is not None:
            counter.ops = 0
            with counter:
                result = fn()
            out.setdefault(event, []).append(counter.ops)
            return result
        start = time.perf_counter()
        result = fn()
        out.setdefault(event, []).append(time.perf_counter() - start)
        return result

    plans = {k: timed(f"plan -{k}", lambda k=k: best_plan(schemes[k], *logits[k])) for k in "LH"}
    timed(f"admission -{kind}", lambda: (runner.admit(seq_id, plans[kind], max_tokens), runner.row_plan(seq_id)))
    mark_prefilled(runner, seq_id, prompt)
    timed("join", lambda: batch.join([seq_id], token))
    timed("prepare", batch.prepare)
    for _ in range(1 if counter is not None else steps):
        timed("step", batch.step)
    leaving = batch.seq_ids[(batch.rows - 1) // 2]  # the middle row: the last one moves into its slot
    timed("leave", lambda: batch.leave([leaving]))
    if leaving != seq_id:  # restore: the row that left rejoins, the new request leaves
        batch.join([leaving], token)
        batch.leave([seq_id])
    runner.free(seq_id)
    batch.prepare()
    return out


# -- 2. graph keys over a trace -----------------------------------------------------------------------


def key_trace(runner: PlannedDecoder, trace: Trace, *, capacity: int = CAPACITY, warm_events: int = WARM_EVENTS
              ) -> dict:
    """Replay ``trace`` on a meta runner (:class:`MetaServer`) recording ``batch.graph_key`` before every
    step (the key of the graph the step replays on CUDA, computed alike on any device): the distinct keys
    over the trace, those first seen after ``warm_events`` join/leave events, the batch sizes."""
    start = time.perf_counter()
    log = MetaServer(runner, trace, capacity=capacity).run()
    seconds = time.perf_counter() - start
    # key -> (step, events before it); the warm-up's keys at step -1, before any event
    first_seen: dict[tuple, tuple[int, int]] = {key: (-1, 0) for key in log.warm_keys}
    for step, (key, events) in enumerate(zip(log.keys, log.events_before)):
        first_seen.setdefault(key, (step, events))
    new_after = [key for key, (_, events) in first_seen.items() if events >= warm_events]
    rows = log.rows
    return {
        "trace": trace.summary(), "events": log.events, "steps": len(rows), "replay_s": seconds,
        "distinct_keys": len(first_seen), "warm_up_keys": len(log.warm_keys),
        "new_keys_after_warm_up": sum(step >= 0 for step, _ in first_seen.values()),
        "warm_events": warm_events, "new_keys_after_warm": len(new_after),
        "keys": [{"key": list(key), "bucket": key[1], "first_step": step, "events_before": events}
                 for key, (step, events) in first_seen.items()],
        "rows_min": min(rows), "rows_max": max(rows), "distinct_rows": len(set(rows)),
        "rows_per_step": rows, "events_before": log.events_before,
    }


# -- 3. the trace on a GPU -------------------------------------------------------------------------------


PRICED_STEPS = 16
QUICK_PRICED_STEPS = 4


def priced_steps(steps: int, count: int) -> list[int]:
    """``count`` step indices evenly spaced over ``steps`` (every step when there are no more)."""
    if steps <= count:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


def predict(shape: ModelShape, trace: Trace, log: ReplayLog, roofline_device: str | DeviceSpec = "H200",
            count: int = PRICED_STEPS) -> dict:
    """The union cost model over a replay's steps: per priced step ``cost.batch_decode_cost(union=True)`` of
    its rows' plans and of as many full plans, at its rows' mean context, summed. ``count`` steps evenly
    spaced are priced (all of them when there are no more): at LLaVA-7B one call takes about 0.15 to 0.3 s
    with 60 rows (the per-layer unions of the plans' neuron sets), so pricing every step of the trace would
    take minutes. The batches are the trace's alone (they do not depend on timing): any replay gives them."""
    spec = get_device(roofline_device) if isinstance(roofline_device, str) else roofline_device
    prompts = {r.index: r.prompt for r in trace.requests}
    totals = {which: {"flops": 0.0, "bytes": 0.0, "roofline_s": 0.0} for which in ("mixed", "full")}
    steps = priced_steps(len(log.members), count)
    for step in steps:
        members = log.members[step]
        # A row that joined before step j holds its prompt and step - j fed tokens, and attends one more.
        context = round(sum(prompts[i] + step - log.joined[i] for i in members) / len(members)) + 1
        for which, plans in (("mixed", [log.plans[i] for i in members]), ("full", [None] * len(members))):
            breakdown = cost.batch_decode_cost(shape, context, plans, union=True)
            totals[which]["flops"] += breakdown.flops
            totals[which]["bytes"] += breakdown.bytes
            totals[which]["roofline_s"] += cost.roofline(breakdown, spec).total_seconds
    ratios = {f"{key}_ratio": totals["mixed"][key] / totals["full"][key] for key in totals["full"]}
    return {"steps": len(log.members), "priced_steps": len(steps), "roofline_device": spec.name, **totals,
            **ratios}


def _quartiles(values: list[float]) -> dict:
    if not values:
        return {"median_s": None, "q1_s": None, "q3_s": None, "count": 0}
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3), "count": len(values)}


class MeasuredServer(Server):
    """The loop with real prefills and steps, timed: each request's arrival, first token (its prefill's,
    read back) and last token; each step's wall time (through reading its tokens back, as a server
    streams them) and, on CUDA, its GPU time (CUDA events around the step)."""

    def __init__(self, runner, trace, embeds: Callable[[TraceRequest], torch.Tensor], **kwargs):
        super().__init__(runner, trace, **kwargs)
        self.embeds = embeds
        self.cuda = runner.weights.device.type == "cuda"
        self.arrival_s: dict[int, float] = {}
        self.first_s: dict[int, float] = {}
        self.step_wall: list[float] = []
        self.step_events: list[tuple] = []
        self.token_s: list[float] = []  # per step, when its tokens were read back

    def arrived(self, request: TraceRequest) -> None:
        self.arrival_s[request.index] = time.perf_counter()

    def prefill(self, request: TraceRequest) -> torch.Tensor:
        logits = self.runner.prefill([request.index], self.embeds(request))
        token = logits[:, -1].argmax(-1)
        token.cpu()  # the first token, streamed to the client
        self.first_s[request.index] = time.perf_counter()
        return token

    def step(self) -> None:
        start = time.perf_counter()
        if self.cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        _, tokens = self.batch.step()
        if self.cuda:
            events[1].record()
            self.step_events.append(events)
        tokens.cpu()  # the step's tokens, streamed to the clients
        now = time.perf_counter()
        self.step_wall.append(now - start)
        self.token_s.append(now)

    def result(self, seconds: float) -> dict:
        log, trace = self.log, self.trace
        if self.cuda:
            torch.cuda.synchronize()
        gpu = [a.elapsed_time(b) / 1e3 for a, b in self.step_events] if self.step_events else []
        ttft = [self.first_s[r.index] - self.arrival_s[r.index] for r in trace.requests]
        # The step at clock c produces the token of clock c + 1; a request's last token is at the step it leaves.
        tpot = [(self.token_s[log.left[r.index] - 1] - self.first_s[r.index]) / (r.output - 1)
                for r in trace.requests]
        tokens = sum(r.output for r in trace.requests)
        return {
            "seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds, "steps": len(log.rows),
            "ttft": _quartiles(ttft), "tpot": _quartiles(tpot), "step_wall": _quartiles(self.step_wall),
            "step_gpu": _quartiles(gpu), "step_wall_sum_s": sum(self.step_wall),
            "step_gpu_sum_s": sum(gpu) if gpu else None,
            "step_wall_per_step": self.step_wall, "step_gpu_per_step": gpu or None,
        }


def prompt_embeds(runner: PlannedDecoder, seed: int) -> Callable[[TraceRequest], torch.Tensor]:
    """Each request's prompt: random token ids (from ``seed`` and its index) through the embedding."""
    vocab, embed = runner.shape.vocab_size, runner.weights.embed

    def embeds(request: TraceRequest) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + request.index)
        ids = torch.randint(0, vocab - 1, (1, request.prompt), generator=generator)
        return embed[ids.to(embed.device)]

    return embeds


def warm_up(runner: PlannedDecoder, trace: Trace, embeds, capacity: int = CAPACITY) -> dict:
    """Before the timed traces: the trace's first ``capacity`` requests (their plans, their prompts cut to
    leave room for the steps) prefilled and joined one by one, one step after each join, so that every
    batch size up to ``capacity`` runs (with CUDA graphs: every bucket is captured, over the buffers the
    timed traces take: same capacity, same table width) and the prefill and step kernels compile; then all
    leave."""
    server = Server(runner, trace, capacity=capacity)
    room = trace.max_tokens - capacity - 1  # the longest prompt that still has a position for every step
    if room < 1:
        raise ValueError(f"the trace's longest request ({trace.max_tokens} positions) leaves no room for a "
                         f"warm-up over {capacity} rows")
    batch = server.open_batch()  # every bucket captured (warm_up), then real rows through them
    joined = []
    start = time.perf_counter()
    try:
        for request in trace.requests[:capacity]:
            prompt = min(request.prompt, room)
            runner.admit(request.index, server.plan(request), prompt + capacity + 1)
            joined.append(request.index)
            logits = runner.prefill([request.index], embeds(request)[:, :prompt])
            batch.join([request.index], logits[:, -1].argmax(-1))
            batch.step()
    finally:
        for index in joined:
            runner.free(index)
        batch.close()
    sync(runner.weights.device)
    return {"requests": len(joined), "seconds": time.perf_counter() - start}


def _graph_delta(runner: PlannedDecoder, before: dict) -> dict:
    now = runner.graph_stats()
    if not now["enabled"]:
        return now
    return {"enabled": True, **{key: now[key] - before.get(key, 0)
                                for key in ("captures", "warmup_seconds", "capture_seconds", "replays")}}


def measure_trace(runner: PlannedDecoder, trace: Trace, *, capacity: int = CAPACITY,
                  roofline_device: str | DeviceSpec = "H200",
                  priced: int = PRICED_STEPS, seed: int = 0) -> dict:
    """The trace served for real (its plans), then again with every plan full, after a warm-up
    (:func:`warm_up`): per run tokens/s, TTFT, TPOT, step wall and GPU time, graph captures; the measured
    mixed / full ratios beside the union cost model's (:func:`predict`)."""
    embeds = prompt_embeds(runner, seed)
    with torch.no_grad():
        stats = runner.graph_stats()
        warm = warm_up(runner, trace, embeds, capacity) | {"graphs": _graph_delta(runner, stats)}
        runs, logs = {}, {}
        for which, all_full in (("mixed", False), ("full", True)):
            stats = runner.graph_stats()
            server = MeasuredServer(runner, trace, embeds, capacity=capacity, all_full=all_full)
            sync(runner.weights.device)
            start = time.perf_counter()
            logs[which] = server.run()
            sync(runner.weights.device)
            runs[which] = server.result(time.perf_counter() - start) | {"graphs": _graph_delta(runner, stats)}
    if logs["mixed"].members != logs["full"].members:
        raise RuntimeError("the full-plan replay's batches differ from the mixed one's: the trace's schedule "
                           "should not depend on the plans")
    predicted = predict(runner.shape, trace, logs["mixed"], roofline_device, priced)
    mixed, full = runs["mixed"], runs["full"]

    def ratio(key: str) -> float | None:
        a, b = mixed[key], full[key]
        return None if a is None or not b else a / b

    def priced_ratio(key: str) -> float | None:
        """Mixed / full over the steps the cost model priced."""
        a, b = mixed[key], full[key]
        if a is None or b is None:
            return None
        steps = priced_steps(len(a), priced)
        return sum(a[i] for i in steps) / sum(b[i] for i in steps)

    measured = {"step_wall_sum": ratio("step_wall_sum_s"), "step_gpu_sum": ratio("step_gpu_sum_s"),
                "step_wall_priced": priced_ratio("step_wall_per_step"),
                "step_gpu_priced": priced_ratio("step_gpu_per_step"), "tokens_per_s": ratio("tokens_per_s"),
                "tpot_median": mixed["tpot"]["median_s"] / full["tpot"]["median_s"],
                "ttft_median": mixed["ttft"]["median_s"] / full["ttft"]["median_s"]}
    return {"trace": trace.summary(), "warm_up": warm, "mixed": mixed, "full": full,
            "graph_stats": runner.graph_stats(), "predicted": predicted, "measured_ratio": measured,
            "rows_per_step": logs["mixed"].rows}


def gpu_runner(shape: ModelShape, device: torch.device, dtype: torch.dtype, trace: Trace, backend: str = "auto",
               capacity: int = CAPACITY, seed: int = 0) -> PlannedDecoder:
    """A runner with random weights at ``shape`` (``bench.model.build``), prefix layers whole, CUDA graphs
    (on CUDA with Triton), a pool that holds ``capacity`` full requests of the trace's longest."""
    model = model_bench.build(shape, device, dtype, seed)
    switchable = range(UnitScheme.default("H", shape).prefix_layers, shape.num_layers)
    pages = capacity * shape.num_layers * shape.num_kv_heads * -(-trace.max_tokens // PAGE_SIZE)
    return PlannedDecoder.from_hf(model, num_pages=pages, page_size=PAGE_SIZE, backend=backend,
                                  partial_layers=switchable, max_graphs=16)


# -- the section -----------------------------------------------------------------------------------------


def run(shape: ModelShape, model_name: str, device: torch.device, dtype: torch.dtype, backend: str = "auto", *,
        host_shape: ModelShape, host_model: str, repeats: int = HOST_REPEATS, key_events: int = KEY_EVENTS,
        gpu_requests: int = GPU_REQUESTS, priced: int = PRICED_STEPS, roofline_device: str | DeviceSpec = "H200",
        seed: int = 0) -> dict:
    """The serve section: host time per event and graph keys on a meta runner at ``host_shape``; on CUDA the
    measured trace at ``shape`` (``model_name``); elsewhere that trace's prediction only (its batches from a
    meta replay), the measured rows pending."""
    runner = meta_runner(host_shape)
    host = host_times(host_shape, repeats=repeats, runner=runner, seed=seed)
    keys_config = dataclasses.replace(KEYS_TRACE, requests=max(1, key_events // 2), seed=seed)
    with one_thread():
        keys = key_trace(runner, make_trace(host_shape, keys_config))
    gpu_config = dataclasses.replace(GPU_TRACE, requests=gpu_requests, seed=seed)
    result = {
        "model": model_name, "host_model": host_model, "host_shape": host_shape.to_dict(), "host_device": "meta",
        "host_backend": runner.backend, "threads": 1, "capacity": CAPACITY, "page_size": PAGE_SIZE,
        "batch_sizes": list(BATCH_SIZES), "repeats": repeats, "steps_per_repeat": STEPS_PER_REPEAT,
        "prompt": HOST_PROMPT, "max_tokens": HOST_MAX_TOKENS, "host_note": META_NOTE, "rows": host, "keys": keys,
        "gpu_trace": gpu_config.to_dict(),
    }
    if device.type == "cuda":
        trace = make_trace(shape, gpu_config)
        gpu = gpu_runner(shape, device, dtype, trace, backend, seed=seed)
        result["backend"] = gpu.backend
        result["gpu"] = measure_trace(gpu, trace, roofline_device=roofline_device, priced=priced, seed=seed)
        result["predicted"] = result["gpu"]["predicted"]
        # The same events on the CUDA runner: real launches (asynchronous, not waited for), forward excluded.
        room = (trace.max_tokens - DEVICE_PROMPT - 1) // STEPS_PER_REPEAT - WARM_REPEATS - 2
        if room >= 2:  # the rows need room for every timed step in the trace's table width
            result["device_repeats"] = min(repeats, room)
            result["device_rows"] = host_times(shape, repeats=result["device_repeats"], prompt=DEVICE_PROMPT,
                                               max_tokens=trace.max_tokens, runner=gpu, seed=seed)
    else:
        # The batches are the trace's alone: replayed on the meta runner, the cost model prices them.
        trace = make_trace(host_shape, gpu_config)
        with one_thread():
            log = MetaServer(runner, trace).run()
        result["predicted"] = predict(host_shape, trace, log, roofline_device, priced)
        result["predicted"]["rows_per_step"] = log.rows
        result["gpu"] = {"status": "pending", "why": f"no GPU in this run (device {device}): the measured trace "
                                                      "needs CUDA; not faked"}
    return result


# -- tables ----------------------------------------------------------------------------------------------


def _us(row: dict | None) -> str:
    if row is None:
        return "-"
    flag = " !" if row.get("unstable") else ""
    return f"{row['median_s'] * 1e6:.1f} ({(row['q3_s'] - row['q1_s']) * 1e6:.1f}){flag}"


def host_cells(result: dict, key: str = "rows") -> list[dict]:
    """One cell row per event: its aten ops and, per batch size, median us (IQR us)."""
    by = {(r["event"], r["batch"]): r for r in result[key]}
    sizes = result["batch_sizes"]
    return [{"event": event, "ops": "/".join(str(by[event, b]["ops"]) if (event, b) in by else "-" for b in sizes),
             **{f"b{b}": _us(by.get((event, b))) for b in sizes}}
            for event in EVENTS if any((event, b) in by for b in sizes)]


def host_columns(result: dict) -> list[tuple[str, str, str]]:
    return ([("event", "event", "s"), ("ops", "aten ops (B=" + "/".join(map(str, result["batch_sizes"])) + ")", "s")]
            + [(f"b{b}", f"B={b}: median us (IQR)", "s") for b in result["batch_sizes"]])


def _keys_line(result: dict) -> str:
    keys = result["keys"]
    trace = keys["trace"]
    buckets = ", ".join(str(k["bucket"]) for k in keys["keys"])
    return (f"graph keys over a trace of {keys['events']} join/leave events ({trace['requests']} requests, Poisson "
            f"arrivals at {trace['rate']:g} a step, prompts {trace['prompt'][0]}-{trace['prompt'][1]}, outputs "
            f"{trace['output'][0]}-{trace['output'][1]} tokens, {trace['kinds']['L']} -L, {trace['kinds']['H']} -H "
            f"and {trace['kinds'][FULL]} full plans, seed {trace['seed']}; {keys['steps']} steps, batch of "
            f"{keys['rows_min']} to {keys['rows_max']} rows, {keys['distinct_rows']} sizes): "
            f"{keys['distinct_keys']} distinct keys (buckets {buckets}), {keys.get('warm_up_keys', 0)} of them "
            f"captured by warm_up() before the first request; {keys.get('new_keys_after_warm_up', '-')} new during "
            f"the trace, {keys['new_keys_after_warm']} new after the first {keys['warm_events']} events")


def _ratio_text(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _gpu_lines(result: dict) -> list[str]:
    predicted = result["predicted"]
    trace = result["gpu_trace"]
    head = (f"trace on the GPU: {trace['requests']} requests, Poisson at {trace['rate']:g} a step, prompts "
            f"{trace['prompt'][0]}-{trace['prompt'][1]}, outputs {trace['output'][0]}-{trace['output'][1]}, seed "
            f"{trace['seed']}, against the same trace with every plan full")
    prediction = (f"predicted mixed / full (cost.batch_decode_cost(union=True) per step at its rows' mean context, "
                  f"summed over {predicted['priced_steps']} of its {predicted['steps']} steps, evenly spaced): "
                  f"roofline on {predicted['roofline_device']} "
                  f"{predicted['roofline_s_ratio']:.3f}, FLOPs {predicted['flops_ratio']:.3f}, bytes "
                  f"{predicted['bytes_ratio']:.3f}")
    gpu = result["gpu"]
    if gpu.get("status") == "pending":
        return [head, prediction, f"measured: pending ({gpu['why']})"]
    lines = [head, prediction]
    for which in ("mixed", "full"):
        run = gpu[which]
        graphs = run["graphs"]
        captured = f", {graphs['captures']} graph captures" if graphs.get("enabled") else ""
        gpu_step = run["step_gpu"]["median_s"]
        lines.append(
            f"{which}: {run['tokens_per_s']:.1f} tokens/s, TTFT median {run['ttft']['median_s'] * 1e3:.2f} ms "
            f"(IQR {(run['ttft']['q3_s'] - run['ttft']['q1_s']) * 1e3:.2f}), TPOT median "
            f"{run['tpot']['median_s'] * 1e3:.3f} ms (IQR {(run['tpot']['q3_s'] - run['tpot']['q1_s']) * 1e3:.3f}), "
            f"step wall median {run['step_wall']['median_s'] * 1e3:.3f} ms, GPU "
            + ("-" if gpu_step is None else f"{gpu_step * 1e3:.3f} ms") + f" over {run['steps']} steps{captured}")
    measured = gpu["measured_ratio"]
    lines.append(f"measured mixed / full, over the {predicted['priced_steps']} priced steps: step wall "
                 f"{_ratio_text(measured['step_wall_priced'])}, step GPU {_ratio_text(measured['step_gpu_priced'])} "
                 f"(predicted {predicted['roofline_s_ratio']:.3f}); over every step: step wall "
                 f"{_ratio_text(measured['step_wall_sum'])}, step GPU {_ratio_text(measured['step_gpu_sum'])}; TPOT "
                 f"median {_ratio_text(measured['tpot_median'])}, TTFT median {_ratio_text(measured['ttft_median'])}, "
                 f"tokens/s {_ratio_text(measured['tokens_per_s'])}")
    warm = gpu["warm_up"]
    if warm["graphs"].get("enabled"):
        stats = gpu["graph_stats"]
        lines.append(f"graphs: warm-up ({warm['requests']} requests, {warm['seconds']:.1f} s) captured "
                     f"{warm['graphs']['captures']}; runner: {stats['captures']} captures, {stats['replays']} replays, "
                     f"buckets held {stats['keys']}")
    return lines


def _head(result: dict) -> str:
    shape = result["host_shape"]
    return (f"host time per serving event at {result['host_model']} shapes ({shape['num_layers']} layers, hidden "
            f"{shape['hidden_size']}) on the meta device, backend {result['host_backend']}, one thread, batch "
            f"capacity {result['capacity']}, {result['repeats']} repeats ({result['steps_per_repeat']} steps each), "
            f"medians and IQR in us; ! marks an IQR over {IQR_LIMIT:.0%} of the median; aten ops: views left out")


def _device_head(result: dict) -> str:
    return (f"the same events on the GPU runner ({result['model']}, kernels {result['backend']}): real launches, "
            f"not waited for, the forward excluded as on meta, {result['device_repeats']} repeats, prompt "
            f"{DEVICE_PROMPT}")


def _events_text() -> str:
    return "; ".join(f"{event}: {text}" for event, text in EVENT_TEXT.items())


def table(result: dict) -> str:
    """The host times per event and batch size (meta; on a GPU its runner's too), then the keys, then the GPU
    trace's lines."""
    parts = [_head(result), format_table(host_cells(result), host_columns(result)), f"({result['host_note']})"]
    if "device_rows" in result:
        parts += [_device_head(result), format_table(host_cells(result, "device_rows"), host_columns(result))]
    return "\n".join([*parts, _keys_line(result), *_gpu_lines(result)])


def markdown(result: dict) -> str:
    """The section in report.md."""
    parts = [_head(result) + ".", markdown_table(host_cells(result), host_columns(result)),
             f"_{result['host_note']}. Events: {_events_text()}._"]
    if "device_rows" in result:
        parts += [_device_head(result) + ".", markdown_table(host_cells(result, "device_rows"), host_columns(result))]
    return "\n\n".join([*parts, *(f"- {line}" for line in [_keys_line(result), *_gpu_lines(result)])])


def summary_cases(result: dict) -> dict[str, dict]:
    """The section's timed cases (for ``bench.compare``): each host event at each batch size, and on a GPU
    each trace's TTFT, TPOT and step wall and GPU times (medians and quartiles over requests or steps)."""
    cases = {f"serve {result['host_model']} meta {r['event']} B{r['batch']}": r for r in result["rows"]}
    cases |= {f"serve {result['model']} device {r['event']} B{r['batch']}": r for r in result.get("device_rows", [])}
    gpu = result.get("gpu", {})
    for which in ("mixed", "full"):
        run = gpu.get(which)
        if run is None:
            continue
        for metric in ("ttft", "tpot", "step_wall", "step_gpu"):
            if run[metric]["median_s"] is not None:
                cases[f"serve {result['model']} trace {which} {metric}"] = run[metric]
    return cases


