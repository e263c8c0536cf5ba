"""``python -m bench.boundary``: what one more kernel costs in a captured decode step, with and without PDL, and
what one more phase of a single kernel costs instead.

The static model (``bench/static.py``) charges every kernel of a decode step a fixed cost (``FIXED_S``) on
top of its bytes, and most of the gap between its steps and the copy rate is that cost times the step's
kernels. Whether a step should lose kernels (fusion) or programmatic dependent launch can hide the cost
is a question of two numbers, measured here directly rather than inferred from a whole step:

- one stream of ``total`` bytes is cut into ``parts`` contiguous slices, ``parts`` from 1 to 32, and read
  slice after slice by grids of four programs per SM that sum it (16-byte loads, 16 KB of them in flight
  per program: 64 KB per SM, what Little's law asks of the copy rate at a microsecond of latency);
- each run is captured in a CUDA graph and replayed, timed with CUDA events, as a decode step runs;
- the least-squares line of the run's time against its parts: its **slope is the cost of one more
  boundary**, its intercept the stream's own time.

Each ``total`` (128 MiB and 512 MiB: more than L2, so every run reads memory) is measured in three modes
(:data:`MODES`):

- ``off``: one kernel a slice (the boundary: a launch, the first round trip, the last wave's drain);
- ``on``: the same with programmatic dependent launch: each kernel asks L2 for its first lines, then waits
  (``griddepcontrol``), as the library's decode kernels do with ``ADALLAVA_PDL=1``. On a GPU without it (or
  a Triton without grid dependency control) its rows are left out and say why;
- ``fused``: one kernel for the whole run, a slice a phase. A program takes a ticket from a counter, and
  the ticket, not its program ID, names its phase and share, so a program only ever waits on programs that
  took their tickets before it (and so are running or done): no wait can deadlock, whatever order the GPU
  starts programs in, and under the interpreter (one program at a time, in order) no wait spins. A phase's
  program asks L2 for its first lines, then waits until every program of the phase before has released its
  count (acquire loads about 100 ns apart, release atomics: the grid-wide dependency of a decode layer's
  kernel boundaries). The last program puts the counters back to 0 for the next launch. This is the cost a
  layer fused into one kernel with ordered phases would pay per boundary instead of ``off``'s or ``on``'s
  (``adallava_kernels/ops/phased_mlp.py`` fuses a layer's MLP so).

Without a GPU it runs the same code under the Triton interpreter (``TRITON_INTERPRET=1``) at a few KB, timed
with the wall clock: a dry run, whose numbers mean nothing.

    python -m bench.boundary OUT.json [--device cuda] [--quick]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from adallava_kernels.ops.triton_utils import (INTERPRET, dependent_launch, multiprocessors, prefetch_lines,
                                               supports_pdl, wait_at_least)

from ._common import metadata
from .report import linear_fit, pearson
from .timing import graph_replay_seconds

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the bench needs Triton; the message says so at run time
    triton = tl = None

PARTS = (1, 2, 4, 8, 16, 32)
# What cuts the stream's slices apart (module docstring).
MODES = ("off", "on", "fused")
GPU_TOTALS = (128 << 20, 512 << 20)  # bytes: both beyond an H100's or H200's L2
DRY_TOTALS = (64 << 10,)  # the interpreter's: a smoke run
PROGRAMS_PER_SM = 4  # 96 registers a thread at 4 warps: four programs fit an SM's registers
# Elements a program sums per iteration: 16 KB of bf16, 64 bytes a thread at 4 warps (four 16-byte loads);
# a small block under the interpreter, so a dry run's few KB still make runs of many slices.
BLOCK = 256 if INTERPRET else 8192
# Every share starts and ends on a multiple of this many elements (32 bytes of bf16): the JIT then knows the
# bounds divisible by 16, and the masked loads stay 16 bytes wide.
ALIGN = 16
NUM_WARPS = 4
NUM_STAGES = 3
REPLAYS = 20
QUICK_REPLAYS = 5
# Runs per graph: enough work that one replay's launch is lost in it.
ROUNDS = 4
# The most phases one fused launch takes (its counters: a ticket and a count per phase).
MAX_PHASES = 63


if triton is not None:
    @triton.jit
    def _sum_range(x_ptr, lo, hi, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            acc += tl.load(x_ptr + idx, mask=idx < hi, other=0.0).to(tl.float32)
        return tl.sum(acc, 0)

    @triton.jit
    def _stream_sum_kernel(x_ptr, out_ptr, n, span, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program ``p``: the sum of ``x[p * span : (p + 1) * span]`` (within ``n``) into ``out[p]``."""
        pid = tl.program_id(0)
        lo = pid.to(tl.int64) * span
        hi = tl.minimum(lo + span, n)
        if PDL:  # as the library's decode kernels: ask L2 for the first tiles, then wait for the kernel before
            prefetch_lines(x_ptr, tl.zeros((1,), tl.int64), tl.full((1,), True, tl.int1), 0, lo, hi, 1, 2 * BLOCK)
        dependent_launch(PDL)
        tl.store(out_ptr + pid, _sum_range(x_ptr, lo, hi, BLOCK))

    @triton.jit
    def _stream_phases_kernel(x_ptr, out_ptr, sync_ptr, error_ptr, n, per, programs, phases, BLOCK: tl.constexpr,
                              ALIGN: tl.constexpr, SYNC: tl.constexpr, COMPILED: tl.constexpr):
        """The program with ticket ``t`` (phase ``f = t // programs``, share ``p = t % programs``): the sum of
        share ``p`` of slice ``f`` (``x[f * per : (f + 1) * per]`` within ``n``, cut as :func:`share` cuts it)
        into ``out[t]``, once every program of phase ``f - 1`` is done. ``sync`` (int32, 0 before the launch
        and after it): the ticket counter, then each phase's count of programs done; ``error``: waits the
        interpreter found unfinished (:func:`~adallava_kernels.ops.triton_utils.wait_at_least`)."""
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        phase = ticket // programs
        first = phase.to(tl.int64) * per
        last = tl.minimum(first + per, n)
        span = tl.cdiv(tl.cdiv(last - first, programs), ALIGN) * ALIGN
        lo = first + (ticket % programs) * span
        hi = tl.minimum(lo + span, last)
        if COMPILED:  # as a fused layer's next phase would: its first lines from L2 while the phase before drains
            prefetch_lines(x_ptr, tl.zeros((1,), tl.int64), tl.full((1,), True, tl.int1), 0, lo, hi, 1, 2 * BLOCK)
        if phase > 0:  # as the phased MLP waits (adallava_kernels/ops/phased_mlp.py)
            wait_at_least(sync_ptr + phase, programs, error_ptr, COMPILED)
        tl.store(out_ptr + ticket, _sum_range(x_ptr, lo, hi, BLOCK))
        tl.debug_barrier()  # the whole program's work is done before its count releases it
        done = tl.atomic_add(sync_ptr + 1 + phase, 1, sem="release")
        # The last program of the last phase: every ticket is taken and every wait is over.
        if (phase == phases - 1) & (done == programs - 1):
            offs = tl.arange(0, SYNC)
            tl.store(sync_ptr + offs, tl.zeros((SYNC,), tl.int32), mask=offs <= phases)


def share(n: int, parts: int) -> int:
    """Elements of each of ``parts`` shares of ``n``: an equal share rounded up to ``ALIGN`` (so the last shares
    may be shorter, or empty)."""
    return -(-(-(-n // parts)) // ALIGN) * ALIGN


def _check_stream(x: torch.Tensor) -> None:
    if x.dim() != 1 or x.stride(0) != 1:
        raise ValueError(f"x must be a contiguous 1-D tensor, got shape {list(x.shape)}, strides {list(x.stride())}")


def stream_sum(x: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``out[p]`` = the sum (fp32) of program ``p``'s :func:`share` of the 1-D ``x``, ``len(out)`` programs (a
    program past the end writes 0)."""
    _check_stream(x)
    if out.dim() != 1 or out.dtype != torch.float32 or out.device != x.device or out.numel() == 0:
        raise ValueError(f"out must be a non-empty 1-D float32 tensor on {x.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    programs = out.numel()
    span = share(x.numel(), programs)
    flags = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    _stream_sum_kernel[(programs,)](x, out, x.numel(), span, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                    num_stages=NUM_STAGES, **flags)
    return out


def stream_phases(x: torch.Tensor, out: torch.Tensor, sync: torch.Tensor, phases: int) -> torch.Tensor:
    """One launch, ``phases`` phases of ``programs = len(out) // phases`` programs: ``out[f * programs + p]`` =
    the sum (fp32) of share ``p`` of slice ``f`` of the 1-D ``x`` (its :func:`share` of ``phases`` slices, each
    cut as :func:`stream_sum` cuts its ``x``), phase ``f`` after phase ``f - 1`` (``_stream_phases_kernel``).
    ``sync``: int32 zeros, at least ``phases + 1`` of them (:func:`sync_buffer`); zeros again after the launch."""
    _check_stream(x)
    if not 1 <= phases <= MAX_PHASES:
        raise ValueError(f"phases must be in [1, {MAX_PHASES}], got {phases}")
    if out.dim() != 1 or out.dtype != torch.float32 or out.device != x.device or out.numel() == 0 \
            or out.numel() % phases:
        raise ValueError(f"out must be a non-empty 1-D float32 tensor on {x.device} of a multiple of phases "
                         f"({phases}) elements, got {out.dtype} {list(out.shape)} on {out.device}")
    if sync.dim() != 1 or sync.dtype != torch.int32 or sync.device != x.device or sync.numel() <= phases:
        raise ValueError(f"sync must be a 1-D int32 tensor on {x.device} of more than phases ({phases}) elements, "
                         f"got {sync.dtype} {list(sync.shape)} on {sync.device}")
    per = _slice(x.numel(), phases)
    errors = torch.zeros(1, dtype=torch.int32, device=x.device) if INTERPRET else sync
    _stream_phases_kernel[(out.numel(),)](x, out, sync, errors, x.numel(), per, out.numel() // phases, phases,
                                          BLOCK=BLOCK, ALIGN=ALIGN, SYNC=triton.next_power_of_2(phases + 1),
                                          COMPILED=not INTERPRET, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if INTERPRET and errors.item():
        raise RuntimeError(f"{errors.item()} programs of stream_phases found the phase before unfinished")
    return out


def sync_buffer(device: torch.device) -> torch.Tensor:
    """The counters of :func:`stream_phases`, room for any number of phases it takes."""
    return torch.zeros(MAX_PHASES + 1, dtype=torch.int32, device=device)


def _slice(n: int, parts: int) -> int:
    """Elements of each of ``parts`` slices of a stream of ``n``: :func:`share`, each slice non-empty."""
    per = share(n, parts)
    if (parts - 1) * per >= n:
        raise ValueError(f"a stream of {n} elements cannot make {parts} slices of multiples of {ALIGN}: it "
                         f"needs more than {(parts - 1) * per}")
    return per


def chain_calls(x: torch.Tensor, parts: int, programs: int, pdl: bool) -> list:
    """``parts`` calls of :func:`stream_sum`, each over its own contiguous :func:`share` of ``x`` (the last
    takes the rest), each into its own output."""
    per = _slice(x.numel(), parts)
    calls = []
    for i in range(parts):
        piece, out = x[i * per:(i + 1) * per], torch.empty(programs, dtype=torch.float32, device=x.device)
        calls.append(lambda piece=piece, out=out: stream_sum(piece, out, pdl))
    return calls


def fused_calls(x: torch.Tensor, parts: int, programs: int) -> list:
    """One call of :func:`stream_phases`: ``parts`` phases of ``programs`` programs over ``x``."""
    _slice(x.numel(), parts)
    out = torch.empty(parts * programs, dtype=torch.float32, device=x.device)
    sync = sync_buffer(x.device)
    return [lambda: stream_phases(x, out, sync, parts)]


def run_calls(x: torch.Tensor, parts: int, programs: int, mode: str) -> list:
    """The calls that read ``x`` in ``parts`` slices in ``mode`` (:data:`MODES`)."""
    if mode == "fused":
        return fused_calls(x, parts, programs)
    return chain_calls(x, parts, programs, pdl=mode == "on")


def time_run(calls: list, device: torch.device, replays: int) -> float:
    """Seconds one run of ``calls`` takes: on CUDA, ``ROUNDS`` runs captured back to back in a CUDA graph, the
    median replay over ``ROUNDS``; elsewhere the median wall clock of one run."""
    for call in calls:  # compiles outside the capture
        call()
    if device.type != "cuda":
        samples = []
        for _ in range(replays):
            start = time.perf_counter()
            for call in calls:
                call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    with torch.cuda.device(device):
        return graph_replay_seconds(calls, ROUNDS, replays)


def per_part(parts: list[int], seconds: list[float]) -> dict:
    """The line of a run's time against its parts: the cost of one more boundary (``slope_s``), the stream's
    own time (``intercept_s``) and the fit's Pearson ``r``."""
    slope, intercept = linear_fit(parts, seconds)
    return {"slope_s": slope, "intercept_s": intercept, "r": pearson(parts, seconds)}


def modes(device: torch.device) -> dict[str, str | None]:
    """Each of :data:`MODES` -> None, or the reason it is left out where the device cannot run it (``on``)."""
    pdl = None if supports_pdl(device) else ("programmatic dependent launch needs a CUDA GPU of compute capability "
                                             "9.0+ and a Triton with grid dependency control")
    return {"off": None, "on": pdl, "fused": None}


def measure(device: torch.device, totals=None, parts=None, quick: bool = False,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every ``(mode, total)`` series: each run's time, and its line (:func:`per_part`)."""
    if triton is None:
        raise RuntimeError("bench.boundary needs Triton")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("bench.boundary runs Triton kernels: on a CPU set TRITON_INTERPRET=1 (a dry run)")
    totals = totals or (GPU_TOTALS if device.type == "cuda" else DRY_TOTALS)
    parts = list(parts or PARTS)
    programs = PROGRAMS_PER_SM * multiprocessors(device)
    element = torch.finfo(dtype).bits // 8
    x = torch.randn(max(totals) // element, dtype=dtype, device=device)
    # A dry run's times mean nothing: one sample each.
    replays = (QUICK_REPLAYS if quick else REPLAYS) if device.type == "cuda" else 1
    series, skipped, errors = [], {}, {}
    for mode, reason in modes(device).items():
        if reason is not None:
            skipped[mode] = reason
            continue
        try:  # a mode that fails (PDL in a captured graph is new to this GPU) keeps the others' series
            for total in totals:
                stream = x[:total // element]
                seconds = [time_run(run_calls(stream, n, programs, mode), device, replays) for n in parts]
                series.append({"mode": mode, "total_bytes": total, "parts": parts, "seconds": seconds,
                               **per_part(parts, seconds)})
        except Exception as error:  # noqa: BLE001 - recorded with its type, and the run exits 1
            errors[mode] = f"{type(error).__name__}: {error}"
    return {"meta": metadata(device, dtype, "bench.boundary"), "programs": programs, "block": BLOCK,
            "rounds": ROUNDS if device.type == "cuda" else 1, "replays": replays,
            "timer": "CUDA events around a CUDA graph replay" if device.type == "cuda" else "wall clock (dry run)",
            "series": series, "skipped": skipped, "errors": errors}


# How the table and the verdict name each mode's boundary.
MODE_NAMES = {"off": "a kernel", "on": "a kernel with PDL", "fused": "a phase of one kernel"}


def table(result: dict) -> str:
    lines = [f"the cost of one more boundary in a captured run ({result['meta']['device']}, {result['timer']}; "
             f"{result['programs']} programs a slice)"]
    if result["series"]:
        counts = " ".join(f"{f'{n} slice' + ('s' if n != 1 else ''):>12}" for n in result["series"][0]["parts"])
        lines.append(f"{'boundary':>21} {'stream':>9} {counts} {'per boundary':>13} {'stream time':>12} {'r':>7}")
    for s in result["series"]:
        cells = " ".join(f"{t * 1e6:>9.2f} us" for t in s["seconds"])
        lines.append(f"{MODE_NAMES[s['mode']]:>21} {_size(s['total_bytes']):>9} {cells} {s['slope_s'] * 1e6:>10.2f} us "
                     f"{s['intercept_s'] * 1e6:>9.2f} us {s['r']:>7.4f}")
    lines += [f"{mode} ({MODE_NAMES[mode]}): not run: {reason}" for mode, reason in result["skipped"].items()]
    lines += [f"{mode} ({MODE_NAMES[mode]}): failed: {error}" for mode, error in result["errors"].items()]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def main(argv: list[str] | None = None) -> int:
    from adallava_kernels.cli import ArgumentParser

    from ._common import checked_device

    parser = ArgumentParser(prog="python -m bench.boundary", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the results' JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N, or cpu (under TRITON_INTERPRET=1: a dry run)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPLAYS} replays a run, not {REPLAYS}")
    args = parser.parse_args(argv)
    device = checked_device(parser, args.device)
    result = measure(device, quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
