"""The compiled-code report of tests/_static_check.py, made once per test session (about two minutes of
compiling on a 2-core CPU, then Triton's cache) and shared by the tests that read it: by every pytest-xdist
worker of the session too (the first to need it makes it under a file lock, the others read its file)."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def compiled_variants(target: str = "cuda:90") -> dict:
    """The report for ``target``; under pytest-xdist, made by one worker of the session and read by the rest."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return _compile(target)
    name = hashlib.sha256(target.encode()).hexdigest()[:16]  # a target may be a whole script
    shared = Path(tempfile.gettempdir()) / f"adallava-static-{run}-{name}.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, a failed worker's included
        if shared.exists():
            return json.loads(shared.read_text())
        report = _compile(target)
        tmp = shared.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, shared)
        return report


def _compile(target: str) -> dict:
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
