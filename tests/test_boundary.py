"""bench.boundary: the stream kernels its runs launch (one a slice, or one whole run in phases), the slices, the
line through the runs' times, and its dry run (under the interpreter: what a GPU times, run on the CPU)."""

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


def reference_phases(x: torch.Tensor, phases: int, programs: int) -> torch.Tensor:
    """Each phase's slice as a chain of that many kernels cuts it, each cut as stream_sum cuts it."""
    per = boundary.share(x.numel(), phases)
    return torch.cat([reference_sums(x[f * per:(f + 1) * per], programs) for f in range(phases)])


@pytest.mark.parametrize("n,phases,programs", [(3001, 3, 4), (7 * boundary.BLOCK + 48, 5, 3), (96, 1, 5),
                                               (62 * boundary.ALIGN + 5, 32, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_launch_sums_each_phase_and_leaves_its_counters_at_0(n, phases, programs, dtype):
    x = (torch.randn(n) / math.sqrt(n)).to(dtype)
    out, sync = poisoned(phases * programs, dtype=torch.float32), boundary.sync_buffer(x.device)
    for _ in range(2):  # the second launch starts from the counters the first put back
        boundary.stream_phases(x, out, sync, phases)
        assert_close(out, reference_phases(x, phases, programs))
        assert not sync.any(), sync


def test_bad_phase_launches_are_named():
    x, sync = torch.randn(64), boundary.sync_buffer(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"phases must be in \[1, 63\], got 0"):
        boundary.stream_phases(x, torch.empty(4), sync, 0)
    with pytest.raises(ValueError, match=r"out must be .* of a multiple of phases \(3\) elements"):
        boundary.stream_phases(x, torch.empty(4), sync, 3)
    with pytest.raises(ValueError, match=r"sync must be a 1-D int32 tensor .* of more than phases \(2\)"):
        boundary.stream_phases(x, torch.empty(4), torch.zeros(2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="sync must be a 1-D int32 tensor"):
        boundary.stream_phases(x, torch.empty(4), torch.zeros(8), 2)
    with pytest.raises(ValueError, match="x must be a contiguous 1-D tensor"):
        boundary.stream_phases(torch.randn(8, 8), torch.empty(4), sync, 2)
    with pytest.raises(ValueError, match="cannot make 12 slices"):
        boundary.fused_calls(torch.randn(20 * boundary.ALIGN), 12, programs=3)


def test_a_chain_reads_the_stream_once_in_whole_blocks():
    x = torch.randn(10 * boundary.BLOCK + 5) / 64
    for parts in (1, 2, 4, 11):
        outs = []
        real = boundary.stream_sum
        try:
            boundary.stream_sum = lambda piece, out, pdl: outs.append(real(piece, out, pdl))
            calls = boundary.chain_calls(x, parts, programs=3, pdl=False)
            for call in calls:
                call()
        finally:
            boundary.stream_sum = real
        assert len(calls) == parts
        assert_close(torch.stack([o.double().sum() for o in outs]).sum(), x.double().sum(), torch.float32)
        (fused,) = boundary.run_calls(x, parts, 3, "fused")
        assert_close(fused().double().sum(), x.double().sum(), torch.float32)
    with pytest.raises(ValueError, match="cannot make 12 slices"):
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


def test_the_slope_is_the_cost_of_one_more_boundary():
    parts = [1, 2, 4, 8, 16, 32]
    line = boundary.per_part(parts, [50e-6 + 3e-6 * n for n in parts])
    assert line["slope_s"] == pytest.approx(3e-6) and line["intercept_s"] == pytest.approx(50e-6)
    assert line["r"] == pytest.approx(1.0)


def test_the_dry_run_writes_each_series_and_says_why_pdl_did_not_run(tmp_path, capsys):
    out = tmp_path / "boundary" / "results.json"
    assert boundary.main([str(out), "--device", "cpu", "--quick"]) == 0
    result = json.loads(out.read_text())
    assert [(s["mode"], s["total_bytes"], s["parts"]) for s in result["series"]] == [
        (mode, boundary.DRY_TOTALS[0], list(boundary.PARTS)) for mode in ("off", "fused")]
    for series in result["series"]:
        assert len(series["seconds"]) == len(boundary.PARTS) and min(series["seconds"]) > 0
        assert set(series) >= {"slope_s", "intercept_s", "r"}
    assert "compute capability 9.0+" in result["skipped"]["on"] and not result["errors"]
    assert " -m bench.boundary" in result["meta"]["command"] and result["meta"]["commit"]
    printed = capsys.readouterr().out
    assert "the cost of one more boundary in a captured run" in printed and "on (a kernel with PDL): not run" in printed
    assert "a phase of one kernel" in printed


COMPILE = """
import json, torch
from bench import boundary, static
with static.capturing() as variants:
    variants.site.update(name="boundary", extra={})
    x, out = torch.empty(1 << 20, dtype=torch.bfloat16), torch.empty(528 * 4, dtype=torch.float32)
    for pdl in (False, True):
        boundary.stream_sum(x, out[:528], pdl)
    boundary.stream_phases(x, out, boundary.sync_buffer(x.device), 4)
print(json.dumps([{"kernel": v.kernel, "pdl": v.args.get("PDL"), "sass": dict(v.sass), "registers": v.registers,
                   "atomics": v.atomics} for v in variants]))
"""


def test_the_stream_kernels_compile_for_hopper():
    # What the GPU run launches, compiled for sm_90 without a GPU (the interpreter checks no compile): 16-byte
    # loads, no local memory, four programs' registers to an SM; with PDL the L2 prefetch and the wait; the
    # phases' ticket relaxed, the count released, the wait an acquire (a strong load after which L1 is
    # invalidated) with a pause between polls, and the prefetch before it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout.splitlines()[-1])
    assert [(v["kernel"], v["pdl"]) for v in variants] == [("_stream_sum_kernel", False), ("_stream_sum_kernel", True),
                                                           ("_stream_phases_kernel", None)]
    for v in variants:
        ops = v["sass"]
        assert ops.get("LDG.E.128", 0) > 0 and not any(op.startswith(("LDL", "STL")) for op in ops), ops
        assert v["registers"] * 32 * boundary.NUM_WARPS * boundary.PROGRAMS_PER_SM <= 65536
    for v in variants[:2]:
        ops = v["sass"]
        assert ("ACQBULK" in ops, any(op.startswith("CCTL.E.PF") for op in ops)) == (v["pdl"], v["pdl"]), ops
    phases = variants[2]
    assert phases["atomics"] == ["atom.global.gpu.relaxed.add.u32", "atom.global.gpu.release.add.u32"]
    ops = phases["sass"]
    assert ops.get("LDG.E.STRONG.GPU") == 1 and "CCTL.IVALL" in ops and "CCTL.E.PF2" in ops, ops
    assert ops.get("NANOSLEEP") == 1 and "BPT.TRAP" in ops, ops


def test_a_mode_that_fails_keeps_the_others_series_and_the_run_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(boundary, "modes", lambda device: {"off": None, "on": None, "fused": None})
    real = boundary.run_calls

    def failing_on(x, parts, programs, mode):
        if mode == "on":
            raise RuntimeError("capture refused")
        return real(x, parts, programs, mode)

    monkeypatch.setattr(boundary, "run_calls", failing_on)
    monkeypatch.setattr(boundary, "PARTS", (1, 2))
    out = tmp_path / "results.json"
    assert boundary.main([str(out), "--device", "cpu"]) == 1
    result = json.loads(out.read_text())
    assert [s["mode"] for s in result["series"]] == ["off", "fused"]
    assert result["errors"] == {"on": "RuntimeError: capture refused"}
    assert "on (a kernel with PDL): failed: RuntimeError: capture refused" in capsys.readouterr().out
