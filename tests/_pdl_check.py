"""Compile the decode step's kernels for sm_90 with programmatic dependent launch on (ADALLAVA_PDL=1 as a
GPU would take it) and write, per kernel, whether the launch asks for it and where the PTX waits.

Run as a script with TRITON_INTERPRET unset: ``python tests/_pdl_check.py OUT.json``. On a CPU the
launchers turn PDL off (no CUDA device), so the flags are forced on here; ptxas assembles the code.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.compiler  # noqa: E402

MEMORY = re.compile(r"\b(?:ld\.global|cp\.async|st\.global|atom\.global|red\.global)")


def compiled_decode_kernels() -> list:
    """The four decode kernels, each compiled once through its launcher with PDL forced on."""
    from bench import static
    from adallava_kernels.ops import gathered_linear, head_projection, paged_decode_kernel

    compiled, original = [], triton.compiler.compile

    def keep(*args, **kwargs):
        compiled.append(original(*args, **kwargs))
        return compiled[-1]

    triton.compiler.compile = keep
    for module in (gathered_linear, head_projection, paged_decode_kernel):
        module.pdl_flags = lambda device, which: {"PDL": True, "launch_pdl": True}
    bf16 = dict(dtype=torch.bfloat16)
    hidden, neurons, heads, d = 256, 512, 4, 64
    x = torch.randn(2, hidden, **bf16)
    norm = torch.ones(hidden, **bf16)
    w = torch.randn(neurons, hidden, **bf16)
    rows = torch.arange(neurons, dtype=torch.int32)
    count = torch.tensor([neurons], dtype=torch.int32)
    try:
        with static.capturing():
            gathered_linear.swiglu_gathered(x, w, w, rows, norm_weight=norm, eps=1e-5)
            gathered_linear.col_gathered_linear(torch.randn(2, neurons, **bf16), w.t().contiguous(), rows,
                                                count=count, residual=x)
            pages = torch.randn(2, 16, 16, d, **bf16)
            tables = torch.arange(2 * 2 * 4, dtype=torch.int32).view(2, 2, 4) % 16
            positions = torch.tensor([3, 9], dtype=torch.int32)
            w_qkv = torch.randn((heads + 2 * 2) * d, hidden, **bf16)
            cos, sin = torch.ones(2, 1, d, **bf16), torch.zeros(2, 1, d, **bf16)
            q = torch.empty(2, 1, heads, d, **bf16)
            head_projection.head_projection(
                x[:, None], w_qkv, torch.arange(heads + 4, dtype=torch.int32), d, cos, sin, q, rope_slots=heads + 2,
                paged=head_projection.PagedKV(pages[0], pages[1], tables, positions), norm_weight=norm, eps=1e-5)
            head_to_kv = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
            paged_decode_kernel.launch_paged_decode(
                q[:, 0], pages, tables, head_to_kv, positions + 1, torch.zeros(2, dtype=torch.int32), 0.125, 2)
    finally:
        triton.compiler.compile = original
    return compiled


def facts(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    first = MEMORY.search(ptx)
    return {"kernel": kernel.metadata.name, "launch_pdl": bool(kernel.metadata.launch_pdl),
            "waits": ptx.count("griddepcontrol.wait"),
            "launches_dependents": ptx.count("griddepcontrol.launch_dependents"),
            "waits_before_memory": wait >= 0 and (first is None or wait < first.start())}


def main(out: str) -> int:
    Path(out).write_text(json.dumps([facts(k) for k in compiled_decode_kernels()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
