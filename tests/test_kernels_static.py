"""The compiled sm_90 code of every kernel variant a decode step launches has what bandwidth needs.

Read without a GPU (bench/static.py, through tests/_static_check.py): the runtime's bound decode step at
LLaVA-1.5-7B shapes, batch 1 and 16, a whole layer and one keeping half its heads and neurons, every config
the autotuner (or the committed table) may pick. Each must load its weight (or K/V) tiles 16 bytes a thread
asynchronously, keep no scalar 16-bit loads, stage its streamed tiles at least 2 buffers deep with at least
32 KiB in flight per SM, launch at least one program per SM with no 1.0-1.5 wave tail, spill nothing, fit
its shared memory and use no ordered float atomics (bench.static.CHECKS).
"""

import pytest

from _static_report import compiled_variants

from bench import static


def decode_variants() -> list[dict]:
    return [v for v in compiled_variants()["variants"] if v["decode_step"]]


def test_the_decode_step_is_checked_at_both_batches_and_both_layer_kinds():
    sites = {v["site"] for v in decode_variants()}
    assert sites >= {"decode b1 whole", "decode b1 partial", "decode b16 whole", "decode b16 partial"}, sites
    streaming = {v["kernel"] for v in decode_variants() if v["kernel"] in static.KERNELS}
    assert streaming == set(static.KERNELS), streaming


def test_every_decode_variant_passes_the_bandwidth_checks():
    failing = [(v["kernel"], v["site"], v["config"], v["failures"]) for v in decode_variants() if v["failures"]]
    assert failing == []


def test_the_paged_attention_fills_the_gpu_at_batch_1():
    paged = [v for v in decode_variants() if v["kernel"] == "_paged_decode_kernel" and v["site"].startswith("decode b1 ")]
    assert paged and all(v["grid"][0] * v["grid"][1] >= static.SMS for v in paged)
    assert all(min(v["buffers"][t] for t in ("k", "v")) >= 2 for v in paged)


def test_with_pdl_every_decode_kernel_waits_before_it_reads_what_a_kernel_writes(tmp_path):
    """ADALLAVA_PDL=1 (programmatic dependent launch, opt in): each decode kernel's launch asks for it, and
    before its code waits (griddepcontrol.wait) it writes nothing and reads only the plan's lists and counts,
    so a program that starts while the kernel before it drains reads nothing that kernel writes. The weight
    kernels prefetch their first tiles into L2 there. The runtime's decode step at LLaVA-1.5-7B shapes, batch 1
    and 16, every config, assembled for sm_90 by ptxas; with PDL on, every variant still passes the static
    checks (the prefetch costs no occupancy, buffers or spills)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _pdl_check import problems

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALLAVA_AUTOTUNE")}
    out = tmp_path / "pdl.json"
    done = subprocess.run([sys.executable, str(root / "tests" / "_pdl_check.py"), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {k["kernel"] for k in report["kernels"]} == set(static.KERNELS)
    assert len(report["variants"]) >= 38
    assert problems(report) == []
    # The weight kernels read their plan lists (to address the prefetch); attention reads nothing.
    assert all(bool(k["reads_before_wait"]) == (k["kernel"] != "_paged_decode_kernel") for k in report["kernels"])


_PTX = """
.entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	// begin inline asm
	mov.u32 %r2, 0x0;
	@%p1 ld.global.b32 { %r2 }, [ %rd1 + 0 ];
	// end inline asm
	mad.wide.s32 	%rd3, %r2, 2, %rd2;
	{ .reg .pred p; setp.ne.b32 p, %r1, 0; @p prefetch.global.L2 [%rd3]; mov.u32 %r3, 0; }
	BODY
	griddepcontrol.wait; // dummy %r9
	ld.global.b32 { %r4 }, [ %rd2 + 0 ];
	st.global.b32 [ %rd2 + 0 ], { %r4 };
}
"""


@pytest.mark.parametrize("body, reads, writes", [
    ("", ["rows_ptr"], 0),  # the list read, the weight only prefetched
    ("ld.global.b32 { %r5 }, [ %rd3 + 0 ];", ["rows_ptr", "x_ptr"], 0),  # an address computed from both
    ("@%p2 st.global.b32 [ %rd1 + 0 ], { %r1 };", ["rows_ptr"], 1),
    ("atom.global.acq_rel.gpu.add.u32 %r6, [ %rd1 + 0 ], 1;", ["rows_ptr"], 1),
    ("cp.async.cg.shared.global [ %r7 + 0 ], [ %rd2 + 0 ], 0x10, %r8;", ["rows_ptr", "x_ptr"], 1),
])
def test_the_pdl_check_sees_each_read_and_write_before_the_wait(body, reads, writes):
    """The PTX reader behind the test above, on a hand-written entry: a global load is charged with every
    pointer argument its address is computed from, through registers; stores, atomics and asynchronous
    copies count as writes; the prefetch is neither; after the wait only reads of the plan count (none here)."""
    from _pdl_check import around_wait

    facts = around_wait(_PTX.replace("BODY", body), {0: "rows_ptr", 1: "x_ptr"})
    assert facts == {"writes_before_wait": writes, "reads_before_wait": reads, "prefetches_before_wait": 1,
                     "plan_reads_after_wait": []}


def test_the_pdl_check_wants_a_list_read_before_the_wait_read_again_after_it():
    # The rows list is read before the wait and never after (as if the compiler had merged the two loads):
    # the code after the wait would index with what it read before the kernel before it finished.
    from _pdl_check import around_wait, problems

    facts = around_wait(_PTX.replace("BODY", ""), {0: "rows_ptr", 1: "x_ptr"})
    kernel = {"kernel": "_row_gather_kernel", "launch_pdl": True, "waits": 1, "launches_dependents": 1, **facts}
    assert problems({"kernels": [kernel], "variants": []}) == [
        "_row_gather_kernel: does not read ['rows_ptr'] again after the wait"]
    reread = _PTX.replace("BODY", "").replace("\tld.global.b32 { %r4 }, [ %rd2 + 0 ];",
                                              "\tld.global.b32 { %r4 }, [ %rd1 + 0 ];")
    kernel.update(around_wait(reread, {0: "rows_ptr", 1: "x_ptr"}))
    assert problems({"kernels": [kernel], "variants": []}) == []


def test_the_column_gather_stages_its_weight_as_deep_gathered_as_dense():
    """A partial layer's o_proj and down gather their weight's columns through an index list: its tile keeps
    num_stages - 1 buffers, as a dense layer's does (loaded with the weight, the indices would halve them)."""
    gathers = [v for v in decode_variants() if v["kernel"] == "_col_gather_kernel"]
    assert {v["site"].split()[-1] for v in gathers} == {"whole", "partial"}
    shallow = [(v["site"], v["config"], v["buffers"]) for v in gathers if v["buffers"]["b"] != v["num_stages"] - 1]
    assert shallow == []
