"""What every Triton kernel of the library shares: the dot, its flags, the regimes, the GPU's size.

- :func:`dot`: ``tl.dot`` with fp32 inputs kept IEEE (not TF32) and the
  interpreter's bf16 upcast; :func:`dot_flags` gives its two constexprs;
- :data:`DECODE_MAX_TOKENS` and :func:`regime`: a launch of at most this many
  token rows is ``"decode"`` (memory-bound tiles), else ``"prefill"``;
- :func:`config` and :func:`autotuned`: one kernel per regime, launched with
  the config a GPU sweep committed for its device and shape bucket
  (:mod:`.tuning`), else autotuned over a config table ``{"prefill": [...],
  "decode": [...]}`` (the shape every kernel's table has), and over its one
  interpreter config under TRITON_INTERPRET=1, where autotuning does not
  work (a small config, so odd sizes still cross tile boundaries in tests);
- :func:`multiprocessors`, :func:`splits` and :func:`min_per_split`: how many
  programs fill the GPU, and when a split reduction stops paying;
- :func:`pdl_flags` and :func:`dependent_launch`: programmatic dependent launch
  (Hopper on), opt in with ``ADALLAVA_PDL=1``; :func:`prefetch_lines`: the
  lines (weight, or K/V pages) a program brings into L2 before it waits;
  :func:`pause` and :func:`wait_at_least`: a program's wait for a counter, and
  the sleep between its polls; :func:`finish_phases`: the counters of a kernel
  of phases back to 0;
- :data:`INTERPRET` (``TRITON_INTERPRET=1``) and :data:`LOG2E`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .common import INTERPRETING as INTERPRET, cdiv, kernel_configs
from .tuning import Tuned

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: pdl_flags never turns it on
    gdc_launch_dependents = gdc_wait = None

__all__ = [
    "DECODE_MAX_TOKENS",
    "INTERPRET",
    "LOG2E",
    "REGIMES",
    "autotuned",
    "config",
    "dot",
    "dot_flags",
    "finish_phases",
    "min_per_split",
    "multiprocessors",
    "dependent_launch",
    "pdl_flags",
    "supports_pdl",
    "MAX_POLLS",
    "PREFETCH_TILES",
    "pause",
    "prefetch_lines",
    "regime",
    "smallest_block",
    "splits",
    "wait_at_least",
]

DECODE_MAX_TOKENS = 16
REGIMES = ("prefill", "decode")
# Softmax in base 2: exp(x) = exp2(x * log2(e)), folded into the score scale.
LOG2E = 1.4426950408889634
# Reductions are split at most this many ways: past it the combine costs more than the split hides.
MAX_SPLITS = 32


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # The interpreter computes bf16 dots wrongly; fp32 is exact for bf16 inputs.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        # fp32 inputs: full precision, not TF32.
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def dot_flags(dtype: torch.dtype) -> dict:
    """fp32 inputs take IEEE dots (not TF32); the interpreter upcasts before tl.dot."""
    return {"IEEE": dtype == torch.float32, "UPCAST": INTERPRET}


# Programmatic dependent launch: a decode kernel's programs may start while the kernel before it in the
# stream drains, and wait (griddepcontrol.wait) until it has finished and its writes are visible. What it
# hides is the launch and the start of the next kernel's programs, of the few us every kernel of a
# captured step pays. Before they wait, the programs ask L2 for their first tiles (prefetch_lines): the
# weight kernels their weight's, the paged attention its K/V pages', so the drain of one kernel overlaps the
# first DRAM round trip of the next. Since every program of a kernel calls launch_dependents only after its
# own wait, a kernel starts once the one two before it has finished: only the kernel just before it may still
# be writing. Off unless ADALLAVA_PDL=1: no GPU has measured it yet.
PDL_ENV = "ADALLAVA_PDL"
# The K tiles of its weight a program prefetches before it waits: what its pipeline reads first (more would
# compete for L2 with the kernel still draining).
PREFETCH_TILES = tl.constexpr(2)


@triton.jit
def dependent_launch(PDL: tl.constexpr):
    """With PDL, wait for the kernel before it (nothing it writes is read, and nothing is written, before
    this line), then let the next one start its programs. Before it a kernel may read only what neither the
    kernel before it nor itself writes (the plan's index lists and counts, the rows' block tables and
    lengths), only to address a prefetch, and reads it again after it (tests/_pdl_check.py)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs, mask):
    # A hint, not a load: no register is written and no ordering is implied, so it may run before the wait.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_lines(base, index, index_mask, stride_index, lo, hi, stride_elem, ELEMS: tl.constexpr):
    """Bring into L2 elements ``[lo, min(lo + ELEMS, hi))`` of each line ``index`` (where ``index_mask``) of
    the matrix at ``base``, element ``e`` of line ``i`` at ``base + i * stride_index + e * stride_elem``: one
    prefetch per 128 bytes, which covers the line where ``stride_elem`` is 1. Only a hint: correctness never
    depends on it, so ``index`` may come from plan data read before the wait."""
    STEP: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
    LINES: tl.constexpr = (ELEMS + STEP - 1) // STEP
    elems = lo + tl.arange(0, LINES) * STEP
    ptrs = base + index.to(tl.int64)[:, None] * stride_index + elems.to(tl.int64)[None, :] * stride_elem
    _prefetch_l2(ptrs, index_mask[:, None] & (elems < hi)[None, :])


# A wait that has polled this many times (a second of pauses or more) waits for a count that will never come:
# a bug, not a slow program. The kernel then traps, so its launch fails with an error instead of hanging.
MAX_POLLS = tl.constexpr(10_000_000)


@triton.jit
def pause(t):
    """About 100 ns of sleep (``nanosleep``; compiled code only, the interpreter has no inline assembly): a
    program that polls a counter asks about that often, not back to back, so its polls leave L2 to the
    programs it waits for. ``t``, any int32, orders the pause after what computed it."""
    return tl.inline_asm_elementwise("{ nanosleep.u32 100; mov.u32 $0, $1; }", "=r,r", [t], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _trap(t):
    return tl.inline_asm_elementwise("{ trap; mov.u32 $0, $1; }", "=r,r", [t], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def wait_at_least(counter_ptr, target, error_ptr, COMPILED: tl.constexpr):
    """Wait until the int32 counter at ``counter_ptr`` reaches ``target``: acquire loads, a :func:`pause`
    between them, so what the programs that counted (with release) wrote before is visible after. Compiled, a
    wait past :data:`MAX_POLLS` polls traps. Under the interpreter (``COMPILED`` False) programs run one at a
    time in order, so a program that waits only for programs that started before it (a ticket order) finds
    its count complete at once; one that does not adds 1 at ``error_ptr`` for its launcher to raise, where a
    loop would spin forever."""
    if COMPILED:
        polls = 0
        while (tl.atomic_add(counter_ptr, 0, sem="acquire") < target) & (polls < MAX_POLLS):
            pause(polls)
            polls += 1
        if polls >= MAX_POLLS:
            _trap(polls)
    else:
        if tl.atomic_add(counter_ptr, 0, sem="acquire") < target:
            tl.atomic_add(error_ptr, 1)


@triton.jit
def finish_phases(sync_ptr, programs, used, SYNC: tl.constexpr):
    """The end of every program of a kernel whose phases are ordered by tickets (``sync_ptr``: the ticket
    counter, the programs finished, then the phases' counts, ``used`` of the ``SYNC`` in all): the last of its
    ``programs`` to finish, when every ticket is taken and every wait is over, puts them back to 0 for the next
    launch."""
    done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
    if done == programs - 1:
        offs = tl.arange(0, SYNC)
        tl.store(sync_ptr + offs, tl.zeros((SYNC,), tl.int32), mask=offs < used)


def pdl_flags(device: torch.device, which: str) -> dict:
    """The launch's ``PDL`` constexpr, and ``launch_pdl`` where it is on: decode launches on a GPU of compute
    capability 9.0 or newer, with ``ADALLAVA_PDL=1`` and a Triton that has grid dependency control."""
    on = which == "decode" and os.environ.get(PDL_ENV) == "1" and supports_pdl(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def supports_pdl(device: torch.device) -> bool:
    """Whether a launch on ``device`` can use programmatic dependent launch: a CUDA GPU of compute capability
    9.0 or newer, a Triton with grid dependency control, not the interpreter."""
    if INTERPRET or gdc_wait is None or device.type != "cuda":
        return False
    return _capability(torch.cuda.current_device() if device.index is None else device.index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    # Read once per device: this runs on every decode launch with ADALLAVA_PDL=1, where torch's lookup costs
    # microseconds of the launch's host time.
    return torch.cuda.get_device_capability(index)


def config(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def regime(m: int) -> str:
    return "decode" if m <= DECODE_MAX_TOKENS else "prefill"


def autotuned(kernel, table: dict, interpreter: list, key: list[str]) -> dict:
    """``{regime: kernel tuned over table[regime]}``: launched with the committed table's config where the
    device and shape bucket have one (:mod:`.tuning`), else autotuned over ``table[regime]``
    (``interpreter`` under TRITON_INTERPRET=1, the first config with ADALLAVA_AUTOTUNE=0). No kernel adds
    into its outputs (split reductions meet through :mod:`.workspace`), so a timed run needs nothing
    restored."""
    return {r: Tuned(kernel, triton.autotune(configs=kernel_configs(table[r], interpreter), key=key)(kernel), r, key)
            for r in REGIMES}


def smallest_block(name: str, table: dict, interpreter: list, which: str) -> int:
    """The smallest ``name`` tile of the configs a kernel is tuned over in regime ``which``."""
    return min(c.kwargs[name] for c in kernel_configs(table[which], interpreter))


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the split paths are exercised


def min_per_split(compiled: int) -> int:
    """The least reduction (features, positions) a split should cover: ``compiled`` on a GPU, below which
    splitting costs more than it hides; 32 under the interpreter, so small test shapes take the split
    paths."""
    return 32 if INTERPRET else compiled


def splits(programs: int, reduction_blocks: int, device: torch.device) -> int:
    """Reduction splits so that ``programs`` times the splits covers the GPU about twice."""
    if programs == 0 or programs >= multiprocessors(device):
        return 1
    return max(1, min(cdiv(2 * multiprocessors(device), programs), reduction_blocks, MAX_SPLITS))
