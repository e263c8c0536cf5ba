"""Argument checks shared by the library's public entry points (plain Python and torch, no GPU query
at import)."""

from __future__ import annotations

import torch

__all__ = ["check_device", "check_int", "check_token_ids"]


def check_int(name: str, value: object, minimum: int = 1, *, positive_wording: bool = False) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``, else raise ``ValueError`` naming ``name``.

    ``positive_wording`` words the rule as "a positive int" (only with ``minimum=1``), as the ops'
    messages always have.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rule = "a positive int" if positive_wording and minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_device(name: str, device: object) -> torch.device:
    """``device`` as a ``torch.device`` this process can allocate on, else ``ValueError`` naming ``name``.

    Accepts what ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``);
    rejects a string torch does not parse (``"gpu"``) and a CUDA device where CUDA is absent or the
    index is past the last GPU, which torch would only report at the first allocation.
    """
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ValueError(f"{name} must be a device string or torch.device, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {device!r} ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {device!r}, but CUDA is not available here; use 'cpu'")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{name} is {device!r}, but this machine has {count} CUDA device(s)")
    return parsed


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Every id of the integer tensor ``ids`` in ``[0, vocab_size)``, else ``ValueError`` naming ``name``
    and the first bad id (an embedding lookup would raise a bare ``IndexError`` on a CPU and a device-side
    assert, which ends the process's CUDA context, on a GPU). Reads two values back: call it at plan time."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
