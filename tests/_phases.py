"""What the tests of the phased kernels (ops.phased_mlp, ops.phased_attention) share: their sm_90 compile, run
without a GPU, and the synchronisation every such kernel compiles to."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compiled_variants(code: str) -> list[dict]:
    """Run ``code`` (it compiles through ``bench.static.capturing`` and prints the variants as JSON on its last
    line) with TRITON_INTERPRET unset, and return what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_phases_synchronise(variant: dict, waits: int = 1) -> None:
    """The ticket relaxed, a phase's count released, the finish counted acq_rel; each of the kernel's ``waits``
    an acquire load (strong, L1 invalidated) with one pause between polls, and a trap past MAX_POLLS polls (a
    broken count fails the launch instead of hanging the GPU); no local memory."""
    ops = variant["sass"]
    assert variant["atomics"] == ["atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.relaxed.add.u32",
                                  "atom.global.gpu.release.add.u32"]
    assert ops.get("LDG.E.STRONG.GPU", 0) >= 1 and "CCTL.IVALL" in ops and ops.get("NANOSLEEP") == waits, ops
    assert "BPT.TRAP" in ops, ops
    assert ops.get("LDGSTS.E.BYPASS.128", 0) > 0 and not any(op.startswith(("LDL", "STL")) for op in ops), ops
