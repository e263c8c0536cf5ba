"""The compiled-code report of tests/_static_check.py, made once per test session (about two minutes of
compiling on a 2-core CPU, then Triton's cache) and shared by the tests that read it."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def compiled_variants(target: str = "cuda:90") -> dict:
    # Compiled code (no interpreter), every config of each kernel's list (not the first only).
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "ADALLAVA_AUTOTUNE")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "static.json"
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "_static_check.py"), str(out), target],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        report = json.loads(out.read_text()) if out.exists() else {"error": done.stdout[-4000:] + done.stderr[-4000:]}
    if done.returncode != 0 or "error" in report:
        raise AssertionError(f"compiling the kernels failed:\n{report.get('error', '')}")
    return report
