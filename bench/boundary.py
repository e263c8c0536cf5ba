"""``python -m bench.boundary``: what one more kernel costs in a captured decode step, with and without PDL.

The static model (``bench/static.py``) charges every kernel of a decode step a fixed cost (``FIXED_S``) on
top of its bytes, and most of the gap between its steps and the copy rate is that cost times the step's
kernels. Whether a step should lose kernels (fusion) or programmatic dependent launch can hide the cost
is a question of one number, measured here directly rather than inferred from a whole step:

- one stream of ``total`` bytes is read by ``launches`` kernels in a row (the stream cut into that many
  contiguous slices), ``launches`` from 1 to 32, each kernel a grid of four programs per SM that sums its
  slice (16-byte loads, 16 KB of them in flight per program: 64 KB per SM, what Little's law asks of the
  copy rate at a microsecond of latency);
- each chain is captured in a CUDA graph and replayed, timed with CUDA events, as a decode step runs;
- the least-squares line of the chain's time against its launches: its **slope is the cost of one more
  kernel** (launch, first round trip, last wave's drain), its intercept the stream's own time.

Each ``total`` (128 MiB and 512 MiB: more than L2, so every chain reads memory) is measured with
programmatic dependent launch off and on. On, each kernel asks L2 for its first lines, then waits
(``griddepcontrol``), as the library's decode kernels do with ``ADALLAVA_PDL=1``. On a GPU without it (or
a Triton without grid dependency control) the ``on`` rows are left out and say why.

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

from adallava_kernels.ops.triton_utils import (INTERPRET, supports_pdl, dependent_launch, multiprocessors,
                                               prefetch_lines)

from ._common import metadata
from .report import linear_fit, pearson
from .timing import graph_replay_seconds

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the bench needs Triton; the message says so at run time
    triton = tl = None

LAUNCHES = (1, 2, 4, 8, 16, 32)
GPU_TOTALS = (128 << 20, 512 << 20)  # bytes: both beyond an H100's or H200's L2
DRY_TOTALS = (64 << 10,)  # the interpreter's: a smoke run
PROGRAMS_PER_SM = 4  # 96 registers a thread at 4 warps: four programs fit an SM's registers
# Elements a program sums per iteration: 16 KB of bf16, 64 bytes a thread at 4 warps (four 16-byte loads);
# a small block under the interpreter, so a dry run's few KB still make chains of many launches.
BLOCK = 256 if INTERPRET else 8192
# Every share starts and ends on a multiple of this many elements (32 bytes of bf16): the JIT then knows the
# bounds divisible by 16, and the masked loads stay 16 bytes wide.
ALIGN = 16
NUM_WARPS = 4
NUM_STAGES = 3
REPLAYS = 20
QUICK_REPLAYS = 5
# Chains per graph: enough work that one replay's launch is lost in it.
ROUNDS = 4


if triton is not None:
    @triton.jit
    def _stream_sum_kernel(x_ptr, out_ptr, n, span, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program ``p``: the sum of ``x[p * span : (p + 1) * span]`` (within ``n``) into ``out[p]``."""
        pid = tl.program_id(0)
        lo = pid.to(tl.int64) * span
        hi = tl.minimum(lo + span, n)
        if PDL:  # as the library's decode kernels: ask L2 for the first tiles, then wait for the kernel before
            prefetch_lines(x_ptr, tl.zeros((1,), tl.int64), tl.full((1,), True, tl.int1), 0, lo, hi, 1, 2 * BLOCK)
        dependent_launch(PDL)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            acc += tl.load(x_ptr + idx, mask=idx < hi, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, 0))


def share(n: int, parts: int) -> int:
    """Elements of each of ``parts`` shares of ``n``: an equal share rounded up to ``ALIGN`` (so the last shares
    may be shorter, or empty)."""
    return -(-(-(-n // parts)) // ALIGN) * ALIGN


def stream_sum(x: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``out[p]`` = the sum (fp32) of program ``p``'s :func:`share` of the 1-D ``x``, ``len(out)`` programs (a
    program past the end writes 0)."""
    if x.dim() != 1 or x.stride(0) != 1:
        raise ValueError(f"x must be a contiguous 1-D tensor, got shape {list(x.shape)}, strides {list(x.stride())}")
    if out.dim() != 1 or out.dtype != torch.float32 or out.device != x.device or out.numel() == 0:
        raise ValueError(f"out must be a non-empty 1-D float32 tensor on {x.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    programs = out.numel()
    span = share(x.numel(), programs)
    flags = {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}
    _stream_sum_kernel[(programs,)](x, out, x.numel(), span, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                    num_stages=NUM_STAGES, **flags)
    return out


def chain_calls(x: torch.Tensor, launches: int, programs: int, pdl: bool) -> list:
    """``launches`` calls of :func:`stream_sum`, each over its own contiguous :func:`share` of ``x`` (the last
    takes the rest), each into its own output."""
    per = share(x.numel(), launches)
    if (launches - 1) * per >= x.numel():
        raise ValueError(f"a stream of {x.numel()} elements cannot make {launches} launches of multiples of "
                         f"{ALIGN}: it needs more than {(launches - 1) * per}")
    calls = []
    for i in range(launches):
        piece, out = x[i * per:(i + 1) * per], torch.empty(programs, dtype=torch.float32, device=x.device)
        calls.append(lambda piece=piece, out=out: stream_sum(piece, out, pdl))
    return calls


def time_chain(calls: list, device: torch.device, replays: int) -> float:
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


def per_launch(launches: list[int], seconds: list[float]) -> dict:
    """The line of a chain's time against its launches: the cost of one more kernel (``slope_s``), the stream's
    own time (``intercept_s``) and the fit's Pearson ``r``."""
    slope, intercept = linear_fit(launches, seconds)
    return {"slope_s": slope, "intercept_s": intercept, "r": pearson(launches, seconds)}


def pdl_modes(device: torch.device) -> dict[str, str | None]:
    """``{"off": None, "on": None}``, or ``"on"``'s reason to be left out where the device cannot do it."""
    return {"off": None, "on": None if supports_pdl(device) else
            "programmatic dependent launch needs a CUDA GPU of compute capability 9.0+ and a Triton with grid "
            "dependency control"}


def measure(device: torch.device, totals=None, launches=None, quick: bool = False,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every ``(total, pdl)`` series: each chain's time, and its line (:func:`per_launch`)."""
    if triton is None:
        raise RuntimeError("bench.boundary needs Triton")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("bench.boundary runs Triton kernels: on a CPU set TRITON_INTERPRET=1 (a dry run)")
    totals = totals or (GPU_TOTALS if device.type == "cuda" else DRY_TOTALS)
    launches = launches or LAUNCHES
    programs = PROGRAMS_PER_SM * multiprocessors(device)
    element = torch.finfo(dtype).bits // 8
    x = torch.randn(max(totals) // element, dtype=dtype, device=device)
    # A dry run's times mean nothing: one sample each.
    replays = (QUICK_REPLAYS if quick else REPLAYS) if device.type == "cuda" else 1
    series, skipped, errors = [], {}, {}
    for mode, reason in pdl_modes(device).items():
        if reason is not None:
            skipped[mode] = reason
            continue
        try:  # a mode that fails (PDL in a captured graph is new to this GPU) keeps the other's series
            for total in totals:
                stream = x[:total // element]
                seconds = [time_chain(chain_calls(stream, n, programs, mode == "on"), device, replays)
                           for n in launches]
                series.append({"pdl": mode, "total_bytes": total, "launches": list(launches), "seconds": seconds,
                               **per_launch(list(launches), seconds)})
        except Exception as error:  # noqa: BLE001 - recorded with its type, and the run exits 1
            errors[mode] = f"{type(error).__name__}: {error}"
    return {"meta": metadata(device, dtype, "bench.boundary"), "programs": programs, "block": BLOCK,
            "rounds": ROUNDS if device.type == "cuda" else 1, "replays": replays,
            "timer": "CUDA events around a CUDA graph replay" if device.type == "cuda" else "wall clock (dry run)",
            "series": series, "skipped": skipped, "errors": errors}


def table(result: dict) -> str:
    lines = [f"the cost of one more kernel in a captured chain ({result['meta']['device']}, {result['timer']}; "
             f"{result['programs']} programs a kernel)"]
    if result["series"]:
        counts = " ".join(f"{f'{n} launches':>12}" for n in result["series"][0]["launches"])
        lines.append(f"{'pdl':>4} {'stream':>9} {counts} {'per kernel':>11} {'stream time':>12} {'r':>7}")
    for s in result["series"]:
        cells = " ".join(f"{t * 1e6:>9.2f} us" for t in s["seconds"])
        lines.append(f"{s['pdl']:>4} {_size(s['total_bytes']):>9} {cells} {s['slope_s'] * 1e6:>8.2f} us "
                     f"{s['intercept_s'] * 1e6:>9.2f} us {s['r']:>7.4f}")
    lines += [f"pdl {mode}: not run: {reason}" for mode, reason in result["skipped"].items()]
    lines += [f"pdl {mode}: failed: {error}" for mode, error in result["errors"].items()]
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
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPLAYS} replays a chain, not {REPLAYS}")
    args = parser.parse_args(argv)
    device = checked_device(parser, args.device)
    result = measure(device, quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
