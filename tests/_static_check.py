"""Compile every Triton kernel variant the library launches, as its launch sites launch it, for a GPU target
without a GPU, and write what the compiled code says (bench/static.py) to a JSON file.

Run as a script with TRITON_INTERPRET unset (``triton.jit`` then gives compiled functions):

    python tests/_static_check.py OUT.json [cuda:90 | cuda:80] [--strict]

Triton's NVIDIA backend lowers each kernel to PTX and assembles it with its own ptxas, which needs no
device; the launch sites (the runtime's decode steps at batch 1 and 16 and its prefill, at LLaVA-1.5-7B
shapes; the eager launchers) give each kernel its real arguments, so the JIT's specialisation and the
launch's shared memory are the GPU's. Exits 1 if a variant failed to compile.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import static  # noqa: E402


def main(out: str, target: str = "cuda:90", strict: bool = False) -> int:
    """``strict``: print each failing variant and a summary, and exit 1 if any fails."""
    try:
        variants = static.library_launches(target=target)
    except Exception:  # noqa: BLE001 - the report names what failed
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))
        return 1
    max_shared = static.TARGETS[target][2]
    rows = []
    for v in variants:
        failures = static.failures(v)
        if v.shared > max_shared:
            failures.append(f"shared memory fits {target}: {v.shared} B (> {max_shared})")
        rows.append({"kernel": v.kernel, "site": v.site, "config": v.config, "grid": list(v.grid),
                     "shared": v.shared, "registers": v.registers, "stack": v.stack, "num_stages": v.num_stages,
                     "occupancy": v.occupancy,
                     "buffers": v.buffers, "decode_step": static.is_decode_step(v), "failures": failures,
                     "predicted_share": static.predicted_share(v), "in_flight_per_sm": static.in_flight_per_sm(v),
                     "atomics": v.atomics})
    Path(out).write_text(json.dumps({"target": target, "variants": rows, "defined": sorted(static.jit_kernels())},
                                    indent=1))
    if strict:
        import triton

        failing = [row for row in rows if row["failures"]]
        for row in failing:
            print(f"{row['kernel']} [{row['site']}] {row['config']}: {'; '.join(row['failures'])}")
        print(f"triton {triton.__version__}, {target}: {len(rows)} variants, "
              f"{sum(row['decode_step'] for row in rows)} of a decode step, {len(failing)} failing")
        return 1 if failing else 0
    return 0


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--strict"]
    sys.exit(main(*arguments, strict="--strict" in sys.argv[1:]))
