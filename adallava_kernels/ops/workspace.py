"""Scratch memory the split reductions share: one grow-only buffer per device and kind, made outside graphs.

A reduction split across programs (split-K in the gathered projections and
the head projection, split-KV in the paged decode attention) leaves fp32
partials in scratch memory, and the last program of each output tile (a
ticket taken with one integer atomic per program) reduces them in a fixed
order and resets its ticket counter to 0. No kernel adds floats atomically.
No torch kernel runs around such a launch (no zero-fill, no copy back), the
reduction is bitwise repeatable, and what a captured CUDA graph reads by
address never moves: buffers only grow, a grown one replaces the old for
later launches, and every old one is kept (a graph captured with it may
replay). Growing inside a CUDA graph capture is refused: the first, eager
run of a step shape (the warm-up a capture needs anyway) sizes it.

Launches on one device share these buffers, so they must run in stream order,
one at a time: the runtime's steps do.
"""

from __future__ import annotations

import torch

__all__ = ["counters", "scratch"]

_BUFFERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[tuple[tuple, torch.Tensor]] = []  # (key, outgrown buffer): a captured graph may still read it


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _buffer(kind: str, device: torch.device, numel: int, dtype: torch.dtype, fill) -> torch.Tensor:
    key = (kind, device.type, device.index, dtype)
    found = _BUFFERS.get(key)
    if found is not None and found.numel() >= numel:
        return found
    if _capturing(device):
        raise RuntimeError(f"the {kind} workspace must grow to {numel} elements during a CUDA graph capture; "
                           "run the step once eagerly first (the runtime's warm-up does)")
    size = max(numel, 2 * found.numel() if found is not None else 0)
    made = torch.full((size,), fill, dtype=dtype, device=device)
    if found is not None:
        _RETIRED.append((key, found))
    _BUFFERS[key] = made
    return made


def scratch(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` fp32 elements of partials (any values: each is written before it is read)."""
    return _buffer("scratch", device, numel, torch.float32, 0.0)


def counters(device: torch.device, numel: int) -> torch.Tensor:
    """At least ``numel`` int32 ticket counters, all 0 (each launch leaves the ones it used at 0)."""
    return _buffer("counters", device, numel, torch.int32, 0)


def outgrown(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``old`` is an outgrown buffer and ``new`` the one of its kind now (each whole, as :func:`counters`
    and :func:`scratch` hand them out): what a launch takes now where a CUDA graph captured before the growth
    reads ``old``, which stays alive. (The CPU stand-in for CUDA graphs allows exactly this change.)"""
    def whole(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
        return (tensor.device == buffer.device and tensor.dtype == buffer.dtype and tensor.shape == buffer.shape
                and tensor.data_ptr() == buffer.data_ptr())

    return any(whole(old, buffer) and key in _BUFFERS and whole(new, _BUFFERS[key]) for key, buffer in _RETIRED)
