"""bench.boundary: the stream kernel its chains launch, the chains' slices, the line through their times, and
its dry run (under the interpreter: what a GPU times, run on the CPU)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adallava_kernels.testing import assert_close, poisoned
from bench import boundary

ROOT = Path(__file__).resolve().parents[1]


def reference_sums(x: torch.Tensor, programs: int) -> torch.Tensor:
    """Each program's share as stream_sum cuts it (the last shares short or empty), in float64."""
    span = boundary.share(x.numel(), programs)
    assert span % boundary.ALIGN == 0 and span * programs >= x.numel()
    return torch.stack([x[p * span:(p + 1) * span].double().sum() for p in range(programs)])


@pytest.mark.parametrize("n,programs", [(3001, 8), (boundary.BLOCK, 3), (5 * boundary.BLOCK + 7, 2), (1, 4), (40, 9)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_program_sums_its_share(n, programs, dtype):
    # Sums of about 1 (the tolerances are for outputs of magnitude 1); programs past the end write 0.
    x = (torch.randn(n) / math.sqrt(n)).to(dtype)
    out = poisoned(programs, dtype=torch.float32)
    boundary.stream_sum(x, out)
    assert_close(out, reference_sums(x, programs))


def test_a_chain_reads_the_stream_once_in_whole_blocks():
    x = torch.randn(10 * boundary.BLOCK + 5) / 64
    for launches in (1, 2, 4, 11):
        outs = []
        real = boundary.stream_sum
        try:
            boundary.stream_sum = lambda piece, out, pdl: outs.append(real(piece, out, pdl))
            calls = boundary.chain_calls(x, launches, programs=3, pdl=False)
            for call in calls:
                call()
        finally:
            boundary.stream_sum = real
        assert len(calls) == launches
        assert_close(torch.stack([o.double().sum() for o in outs]).sum(), x.double().sum(), torch.float32)
    with pytest.raises(ValueError, match="cannot make 12 launches"):
        boundary.chain_calls(torch.randn(20 * boundary.ALIGN), 12, programs=3, pdl=False)


def test_bad_tensors_are_named():
    out = torch.empty(2)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D tensor"):
        boundary.stream_sum(torch.randn(4, 4), out)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D tensor"):
        boundary.stream_sum(torch.randn(8)[::2], out)
    with pytest.raises(ValueError, match="out must be a non-empty 1-D float32 tensor"):
        boundary.stream_sum(torch.randn(8), torch.empty(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be a non-empty 1-D float32 tensor"):
        boundary.stream_sum(torch.randn(8), torch.empty(0))


def test_the_slope_is_the_cost_of_one_more_kernel():
    launches = [1, 2, 4, 8, 16, 32]
    line = boundary.per_launch(launches, [50e-6 + 3e-6 * n for n in launches])
    assert line["slope_s"] == pytest.approx(3e-6) and line["intercept_s"] == pytest.approx(50e-6)
    assert line["r"] == pytest.approx(1.0)


def test_the_dry_run_writes_each_series_and_says_why_pdl_did_not_run(tmp_path, capsys):
    out = tmp_path / "boundary" / "results.json"
    assert boundary.main([str(out), "--device", "cpu", "--quick"]) == 0
    result = json.loads(out.read_text())
    (series,) = result["series"]
    assert (series["pdl"], series["total_bytes"], series["launches"]) == ("off", boundary.DRY_TOTALS[0],
                                                                          list(boundary.LAUNCHES))
    assert len(series["seconds"]) == len(boundary.LAUNCHES) and min(series["seconds"]) > 0
    assert set(series) >= {"slope_s", "intercept_s", "r"}
    assert "compute capability 9.0+" in result["skipped"]["on"]
    assert " -m bench.boundary" in result["meta"]["command"] and result["meta"]["commit"]
    printed = capsys.readouterr().out
    assert "the cost of one more kernel in a captured chain" in printed and "pdl on: not run" in printed


COMPILE = """
import json, torch
from bench import boundary, static
with static.capturing() as variants:
    variants.site.update(name="boundary", extra={})
    x, out = torch.empty(1 << 20, dtype=torch.bfloat16), torch.empty(528, dtype=torch.float32)
    for pdl in (False, True):
        boundary.stream_sum(x, out, pdl)
print(json.dumps([{"pdl": v.args["PDL"], "sass": dict(v.sass), "registers": v.registers} for v in variants]))
"""


def test_the_stream_kernel_compiles_for_hopper_with_and_without_pdl():
    # What the GPU run launches, compiled for sm_90 without a GPU (the interpreter checks no compile): 16-byte
    # loads, no local memory, four programs' registers to an SM; with PDL the L2 prefetch and the wait.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout.splitlines()[-1])
    assert [v["pdl"] for v in variants] == [False, True]
    for v in variants:
        ops = v["sass"]
        assert ops.get("LDG.E.128", 0) > 0 and not any(op.startswith(("LDL", "STL")) for op in ops), ops
        assert v["registers"] * 32 * boundary.NUM_WARPS * boundary.PROGRAMS_PER_SM <= 65536
        assert ("ACQBULK" in ops, any(op.startswith("CCTL") for op in ops)) == (v["pdl"], v["pdl"]), ops


def test_a_mode_that_fails_keeps_the_others_series_and_the_run_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(boundary, "pdl_modes", lambda device: {"off": None, "on": None})
    real = boundary.chain_calls

    def failing_on(x, launches, programs, pdl):
        if pdl:
            raise RuntimeError("capture refused")
        return real(x, launches, programs, pdl)

    monkeypatch.setattr(boundary, "chain_calls", failing_on)
    monkeypatch.setattr(boundary, "LAUNCHES", (1, 2))
    out = tmp_path / "results.json"
    assert boundary.main([str(out), "--device", "cpu"]) == 1
    result = json.loads(out.read_text())
    assert [s["pdl"] for s in result["series"]] == ["off"] and result["errors"] == {"on": "RuntimeError: capture refused"}
    assert "pdl on: failed: RuntimeError: capture refused" in capsys.readouterr().out
