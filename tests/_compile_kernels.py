"""Compile every Triton kernel variant the library launches for a GPU target, without a GPU.

Run as a script with TRITON_INTERPRET unset (``triton.jit`` then gives compiled functions). Triton's
NVIDIA backend lowers each kernel to PTX and assembles it with its own ptxas, which needs no device:
so a kernel that only the interpreter ever ran still meets the compiler here (control flow, types,
tile shapes, shared memory the configs ask for). Prints one line per variant; exits 1 if any failed.

    python tests/_compile_kernels.py [cuda:90 ...]
"""

from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import importlib  # noqa: E402

# By module path: ``adallava_kernels.ops`` exports functions named like some of its modules.
(flash_attention, gathered_linear, head_projection, paged_decode_kernel, rms_norm, rope, silu_and_mul,
 split_combine) = (importlib.import_module(f"adallava_kernels.ops.{name}") for name in (
    "flash_attention", "gathered_linear", "head_projection", "paged_decode_kernel", "rms_norm", "rope",
    "silu_and_mul", "split_combine"))

INDEX_POINTERS = {"heads_ptr", "rows_ptr", "cols_ptr", "table_ptr", "pos_ptr", "len_ptr", "start_ptr", "kvmap_ptr",
                  "count_ptr", "pad_ptr"}
FLOAT_ARGS = {"qk_scale", "eps"}
BF16 = {"IEEE": False, "UPCAST": False}  # dot_flags(torch.bfloat16) on a GPU
# Shared memory a block may opt into: 227 KiB on Hopper (sm_90), 163 KiB on the A100 (sm_80).
MAX_SHARED = {"cuda:90": 227 * 1024, "cuda:80": 163 * 1024}


def _configs(table: dict, regime: str) -> list[tuple[dict, int, int]]:
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in table[regime]]


def variants():
    """(name, kernel, fp32 pointers, constexprs, warps, stages) of each launch shape."""
    out = []
    hp = head_projection
    for regime, block_h in (("prefill", 64), ("decode", 16)):
        for blocks, warps, stages in _configs(hp.CONFIGS, regime):
            for paged, split in ((False, 1), (False, 2), (True, 1)):
                if regime == "prefill" and split > 1:
                    continue
                const = dict(HEAD_DIM=128, BLOCK_H=block_h, ROPE=True, SPLIT_K=split, PAGED=paged, **BF16, **blocks)
                out.append((f"head_projection {regime} {blocks} paged={paged} split={split}", hp._head_proj_kernel,
                            {"y_ptr"} if split > 1 else set(), const, warps, stages))
    gl = gathered_linear
    for regime in ("prefill", "decode"):
        for blocks, warps, stages in _configs(gl.CONFIGS, regime):
            out.append((f"swiglu_gathered {regime} {blocks}", gl._row_gather_kernel, set(),
                        dict(SWIGLU=True, **BF16, **blocks), warps, stages))
            for split, counted, xmask, residual in ((1, False, False, False), (1, True, True, True),
                                                    (4, True, True, False), (4, False, False, False)):
                if regime == "prefill" and split > 1:
                    continue
                const = dict(SPLIT_K=split, COUNTED=counted, XMASK=xmask, RESIDUAL=residual, **BF16, **blocks)
                out.append((f"col_gathered_linear {regime} {blocks} split={split} counted={counted}",
                            gl._col_gather_kernel, {"y_ptr"} if split > 1 else set(), const, warps, stages))
    fa = flash_attention
    for regime in ("prefill", "decode"):
        for blocks, warps, stages in _configs(fa.CONFIGS, regime):
            for split, pad in ((1, True), (4, False)):
                const = dict(HEAD_DIM=128, BLOCK_D=128, SPLIT=split, HAS_PAD=pad, **BF16, **blocks)
                out.append((f"flash_attention {regime} {blocks} split={split}", fa._flash_attn_kernel,
                            {"o_ptr", "lse_ptr"} if split > 1 else {"lse_ptr"}, const, warps, stages))
    pd = paged_decode_kernel
    for split in (1, 8):
        const = dict(HEAD_DIM=128, BLOCK_D=128, SPLIT=split, BLOCK_N=pd._BLOCK_N)
        out.append((f"paged_decode split={split}", pd._paged_decode_kernel,
                    {"o_ptr", "lse_ptr"} if split > 1 else {"lse_ptr"}, const, pd._NUM_WARPS, 3))
    out.append(("split_combine", split_combine._combine_kernel, {"part_ptr", "lse_ptr"},
                dict(HEAD_DIM=128, BLOCK_D=128, SPLIT=8, BLOCK_SPLIT=8), 4, 3))
    for residual in (False, True):
        out.append((f"rms_norm residual={residual}", rms_norm._rms_norm_kernel, set(),
                    dict(HAS_RESIDUAL=residual, ROUND_BF16=True, BLOCK=4096), rms_norm._num_warps(4096), 3))
    out.append(("rope_", rope._rope_kernel, set(), dict(BLOCK_HEADS=rope._BLOCK_HEADS, BLOCK_HALF=64), 4, 3))
    out.append(("silu_and_mul", silu_and_mul._silu_and_mul_kernel, set(), dict(BLOCK=silu_and_mul._BLOCK), 4, 3))
    return out


def signature(kernel, fp32: set, constexprs: dict) -> dict:
    sig = {}
    for param in kernel.params:
        name = param.name
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INDEX_POINTERS else "*fp32" if name in fp32 else "*bf16"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"constexprs not given: {missing}")
    return sig


def main(targets: list[str]) -> int:
    failed = 0
    for target in targets:
        backend, arch = target.split(":")
        gpu = GPUTarget(backend, int(arch), 32)
        for name, kernel, fp32, const, warps, stages in variants():
            try:
                source = ASTSource(kernel, signature(kernel, fp32, const), constexprs=const)
                compiled = triton.compile(source, target=gpu, options={"num_warps": warps, "num_stages": stages})
                shared = compiled.metadata.shared
                if shared > MAX_SHARED[target]:  # it would fail to launch (a tuning config: never be chosen)
                    raise ValueError(f"needs {shared} bytes of shared memory, over {target}'s {MAX_SHARED[target]}")
                print(f"ok {target} {name} shared={shared}")
            except Exception:  # noqa: BLE001 - report every failing variant, not the first
                failed += 1
                print(f"FAILED {target} {name}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["cuda:90"]))
