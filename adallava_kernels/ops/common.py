"""Backend choice and input checks shared by every op."""

from __future__ import annotations

import os
from typing import Callable

import torch

# Triton reads this when a kernel is defined, so it is read once, at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# ADALLAVA_AUTOTUNE=0 runs every kernel with the first config of its list: nothing
# is autotuned, so a test run compiles each kernel once per specialisation, not
# once per config. Read once, at import, like TRITON_INTERPRET.
AUTOTUNE = os.environ.get("ADALLAVA_AUTOTUNE", "1") != "0"
# Set only while bench.static compiles, for a GPU, the kernels that CPU-tensor launches would run (its
# launches compile and never run), and while bench.serve builds a runner on the meta device (it launches
# nothing): the Triton backend is then taken on CPU or meta tensors without the interpreter.
COMPILE_ONLY = False

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a padding mask (nonzero: attend) may be: transformers passes bool or integer masks.
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host integers. Launchers use this, not ``triton.cdiv``: that is a constexpr
    function, which costs microseconds a host call, several a launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of 2 >= ``n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``), for host integers."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def jit_where_available(fn):
    """``triton.jit`` where Triton is installed; without it the kernel is never launched (the module's torch
    reference is the path), so the modules that define elementwise kernels import on any machine."""
    try:
        import triton
    except ImportError:
        return fn
    return triton.jit(fn)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here (no kernel, no Triton, or no GPU)."""


def kernel_configs(tuned: list, interpreter: list) -> list:
    """The configs a kernel is autotuned over: ``interpreter`` under TRITON_INTERPRET=1 (autotuning
    does not work there), the first of ``tuned`` with ADALLAVA_AUTOTUNE=0, else all of ``tuned``."""
    if INTERPRETING:
        return interpreter
    return tuned if AUTOTUNE else tuned[:1]


def resolve_backend(op: str, backend: str, device: torch.device, triton_kernel: Callable | None) -> str:
    """Pick ``"torch"`` or ``"triton"`` for ``op`` on ``device``.

    ``"auto"`` takes Triton on CUDA when the op has a kernel, the PyTorch
    reference otherwise. ``"triton"`` on a CPU tensor is allowed only under
    ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if triton_kernel is not None and device.type == "cuda" else "torch"
    if triton_kernel is None:
        raise BackendUnavailableError(f"{op} has no Triton kernel in this version; use backend='torch'")
    if device.type != "cuda" and not (INTERPRETING or COMPILE_ONLY):
        raise BackendUnavailableError(
            f"{op}: Triton kernels run on CUDA tensors, or on CPU with TRITON_INTERPRET=1 set before "
            f"adallava_kernels is imported; got tensors on {device}"
        )
    return "triton"


def check_tensor(
    name: str,
    tensor: object,
    *,
    dim: int | None = None,
    min_dim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {list(tensor.shape)}")
    if min_dim is not None and tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {list(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    return tensor


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor.dtype != reference.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}, but {reference_name} has {reference.dtype}")


def check_index(
    name: str, index: object, upper: int, device: torch.device, *, check_values: bool
) -> torch.Tensor:
    """Validate a 1-D int32/int64 index list into ``[0, upper)``.

    The value checks (range, order, duplicates) read the index on the host,
    which costs a sync on a GPU; indices from an :class:`ExecutionPlan` were
    checked when the plan was built, so callers pass ``check_values=False`` for them.
    """
    index = check_tensor(name, index, dim=1, dtypes=(torch.int32, torch.int64), device=device)
    if check_values and index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: index {bad} out of range [0, {upper})")
        steps = index[1:] - index[:-1]
        if index.numel() > 1 and not bool((steps > 0).all()):
            position = int((steps <= 0).nonzero()[0])
            a, b = int(index[position]), int(index[position + 1])
            problem = f"index {b} is duplicated" if a == b else f"must be sorted ascending: {a} comes before {b}"
            raise ValueError(f"{name}: {problem}")
    return index
