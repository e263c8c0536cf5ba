"""Argument checks shared by the library's public entry points (plain Python and torch, no GPU query
at import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["check_backend", "check_callable", "check_device", "check_instance", "check_int", "check_output_dir",
           "check_token_ids"]


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
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    check_int("vocab_size", vocab_size, 1)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_instance(name: str, value: object, types: type | tuple[type, ...], expected: str) -> object:
    """Return ``value`` if it is one of ``types`` (a bool is never an int here), else raise ``TypeError`` naming
    ``name``, ``expected`` (what it should be, in words) and the type it has."""
    wrong_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if wrong_bool or not isinstance(value, types):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def check_callable(name: str, value: object) -> object:
    """Return ``value`` if it can be called, else raise ``TypeError`` naming ``name``: before any work is
    done, so that a callback that cannot run is not found only when it is due."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_backend(name: str, backend: object, device: torch.device | str) -> str:
    """``backend`` (``"auto"``, ``"torch"`` or ``"triton"``) as it resolves on ``device``, else ``ValueError``
    naming ``name``: ``"triton"`` runs on CUDA, or on a CPU only under ``TRITON_INTERPRET=1``, which the ops
    would otherwise report only at their first launch."""
    from .ops.common import BACKENDS, BackendUnavailableError, resolve_backend

    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    try:
        return resolve_backend(name, backend, torch.device(device), triton_kernel=True)
    except BackendUnavailableError:
        raise ValueError(f"{name} is 'triton', but Triton kernels run on CUDA (none here) or on a CPU under "
                         "TRITON_INTERPRET=1 (unset); use 'torch' or 'auto'") from None


def check_output_dir(name: str, path: object) -> Path:
    """``path`` as a ``Path`` to a directory results can be written into, else ``ValueError`` naming ``name``.

    An existing directory must take a new file; a missing one must be creatable: its nearest existing
    ancestor a directory that takes a new file. Probed with a temporary file that is removed at once, so
    that a refused command leaves nothing behind, and an accepted one is not refused only after its work.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a directory path, got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be written: it exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be written: {str(ancestor)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r} cannot be written: {str(ancestor)!r} takes no new file "
                         f"({error.strerror or error})") from None
    return path
