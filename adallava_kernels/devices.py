"""Peak compute and memory bandwidth of the devices the roofline model predicts for."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

__all__ = ["DeviceSpec", "DEVICES", "get_device", "measure_cpu"]


@dataclass(frozen=True)
class DeviceSpec:
    """Roofline ceilings: ``peak_flops`` in FLOP/s, ``bandwidth`` in bytes/s."""

    name: str
    peak_flops: float
    bandwidth: float
    source: str

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) above which an op is compute-bound."""
        return self.peak_flops / self.bandwidth


# Dense (no structured sparsity) 16-bit tensor-core peaks and HBM bandwidth of
# the SXM parts, as NVIDIA's data sheets give them. They are ceilings, not
# measurements: achieved numbers are lower.
DEVICES: dict[str, DeviceSpec] = {
    "H200": DeviceSpec("H200", 989.4e12, 4.8e12, "NVIDIA H200 SXM data sheet, dense BF16"),
    "H100": DeviceSpec("H100", 989.4e12, 3.35e12, "NVIDIA H100 SXM data sheet, dense BF16"),
    "A100": DeviceSpec("A100", 312e12, 2.039e12, "NVIDIA A100 80GB SXM data sheet, dense BF16"),
    "V100": DeviceSpec("V100", 125e12, 0.9e12, "NVIDIA V100 SXM2 data sheet, FP16 tensor core"),
}


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and thread-pool start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def measure_cpu(dtype: torch.dtype = torch.float32, matmul_size: int = 1024, copy_mib: int = 256) -> DeviceSpec:
    """Probe this CPU: FLOP/s of a square matmul and bandwidth of a large copy.

    Best of a few runs, so the numbers are the machine's ceiling as torch sees
    it (with its current thread count), about a second in all. Cached per process.
    """
    a = torch.randn(matmul_size, matmul_size, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, dtype=dtype)
    flops = 2 * matmul_size**3 / _best_seconds(lambda: torch.mm(a, b), repeats=5)
    numel = copy_mib * 2**20 // a.element_size()
    src = torch.randn(numel, dtype=dtype)
    dst = torch.empty_like(src)
    # A copy reads and writes every byte once.
    bandwidth = 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), repeats=5)
    threads = torch.get_num_threads()
    return DeviceSpec(
        "measure", flops, bandwidth,
        f"measured on this CPU: {matmul_size}^3 {dtype} matmul, {copy_mib} MiB copy, {threads} threads",
    )


def get_device(name: str) -> DeviceSpec:
    """A preset (``H200``, ``H100``, ``A100``, ``V100``) or ``measure`` to probe this CPU."""
    if name == "measure":
        return measure_cpu()
    try:
        return DEVICES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown device {name!r}: name must be one of {sorted(DEVICES) + ['measure']}") from None
