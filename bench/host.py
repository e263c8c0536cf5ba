"""Where the host's time goes in one call (a prefill): how long the call takes to return, against its wall time.

A call that launches its kernels from Python returns once the last is queued; the GPU then finishes the
queue. So for one call, synchronised before and after:

- ``host_s``: from the start until the call returns (the host's work, plus any wait inside it for the GPU);
- ``wall_s``: until the GPU is done too.

``host_s`` close to ``wall_s`` means the GPU waited on the host, or the host on the GPU: ``syncs`` (CUDA only)
counts the calls that made the host wait, caught by torch's sync debug mode, so the two can be told apart.
``top`` is the call under ``cProfile`` (which slows Python down, so its times are relative): the functions
with the most time of their own.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

__all__ = ["host_profile", "host_text"]

TOP = 25
REPS = 3
SYNC_MESSAGES = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(host_s, wall_s) of one call."""
    _sync(device)
    start = time.perf_counter()
    call()
    returned = time.perf_counter()
    _sync(device)
    return returned - start, time.perf_counter() - start


def _syncs(call: Callable[[], object], device: torch.device) -> dict | None:
    """The host-device synchronisations of one call, as torch's sync debug mode reports them (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return {"count": len(messages), "messages": sorted(set(messages))[:SYNC_MESSAGES]}


def _where(key: tuple) -> str:
    filename, line, name = key
    if filename == "~":  # a built-in
        return name
    parts = Path(filename).parts
    return f"{'/'.join(parts[-2:])}:{line}({name})"


def _top(call: Callable[[], object], device: torch.device, top: int) -> tuple[float, list[dict]]:
    profiler = cProfile.Profile()
    _sync(device)
    profiler.enable()
    try:
        call()
        _sync(device)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    total = sum(entry[2] for entry in stats.values())
    return total, [{"function": _where(key), "calls": entry[1], "own_s": entry[2], "cumulative_s": entry[3]}
                   for key, entry in rows]


def host_profile(call: Callable[[], object], device: torch.device, reps: int = REPS, top: int = TOP) -> dict:
    """One warm-up call, then the median ``host_s`` and ``wall_s`` of ``reps`` calls, the synchronisations of
    one call and the ``top`` functions of one profiled call (see the module's docstring)."""
    call()
    timed = [_timed(call, device) for _ in range(reps)]
    host = statistics.median(t[0] for t in timed)
    wall = statistics.median(t[1] for t in timed)
    syncs = _syncs(call, device)
    profiled, rows = _top(call, device, top)
    return {"host_s": host, "wall_s": wall, "host_share": host / wall if wall else None, "reps": reps,
            "syncs": syncs, "profiled_s": profiled, "top": rows}


def host_text(label: str, profile: dict, shown: int = 5) -> str:
    """One line: the host's share of the wall time, the synchronisations, the functions with most own time."""
    syncs = "syncs not counted (no CUDA)" if profile["syncs"] is None else f"{profile['syncs']['count']} syncs"
    top = ", ".join(f"{row['function']} {row['own_s'] * 1e3:.1f} ms" for row in profile["top"][:shown])
    return (f"{label}: returns after {profile['host_s'] * 1e3:.3f} ms of {profile['wall_s'] * 1e3:.3f} ms wall "
            f"({profile['host_share']:.0%}), {syncs}; most own time under cProfile: {top}")
