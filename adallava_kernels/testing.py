"""What the tests and benchmarks compare against: per-dtype tolerances and helpers.

Tolerances are defined here once. An op's output in ``dtype`` is compared
with the same op computed in float64 from the same (rounded) inputs.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "tolerance", "assert_close", "poisoned", "poison_"]

# (atol, rtol) of an op's low-precision output against a float64 oracle, for
# outputs of magnitude about 1. A fused op rounds its intermediate activations
# to the dtype once (SwiGLU's silu(gate) * up, attention's probabilities) and
# its output once; together that is a few unit roundoffs u, and the bound is
# 8u: u = 2**-8 for bf16 (8 significant bits), 2**-11 for fp16 (11 bits).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (8 * 2**-11, 8 * 2**-11),
    torch.bfloat16: (8 * 2**-8, 8 * 2**-8),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}; expected one of {list(TOLERANCES)}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``actual`` within the tolerance of ``dtype`` (default: its own) of ``expected``.

    Any NaN in ``actual`` fails, so a poisoned element left unwritten shows.
    """
    atol, rtol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=False)


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` with NaN in place (an element a kernel never writes then fails)."""
    return tensor.fill_(float("nan"))


def poisoned(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A new tensor full of NaN."""
    return poison_(torch.empty(*shape, dtype=dtype, device=device))
