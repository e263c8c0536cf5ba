"""The compiled sm_90 code of every kernel variant a decode step launches has what bandwidth needs.

Read without a GPU (bench/static.py, through tests/_static_check.py): the runtime's bound decode step at
LLaVA-1.5-7B shapes, batch 1 and 16, a whole layer and one keeping half its heads and neurons, every config
the autotuner (or the committed table) may pick. Each must load its weight (or K/V) tiles 16 bytes a thread
asynchronously, keep no scalar 16-bit loads, stage its streamed tiles at least 2 buffers deep with at least
32 KiB in flight per SM, launch at least one program per SM with no 1.0-1.5 wave tail, spill nothing, fit
its shared memory and use no ordered float atomics (bench.static.CHECKS).
"""

from collections import Counter

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
    """ADALLAVA_PDL=1 (programmatic dependent launch, opt in): each decode kernel's launch asks for it; before
    its code waits (griddepcontrol.wait) it writes nothing, prefetches its first tiles into L2 and reads only
    buffers that neither it nor the launch before it in the step writes (the one hazard of a program that
    starts while the kernel before it drains), each read again after the wait. The runtime's decode step at
    LLaVA-1.5-7B shapes, batch 1 and 16, every config, as launched by default and with the phased launches,
    assembled for sm_90 by ptxas; with PDL on, every variant still passes the static checks (the prefetch costs
    no occupancy, buffers or spills)."""
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
    bandwidth = [k for k in report["kernels"] if k["bandwidth"]]
    assert {k["kernel"] for k in bandwidth} == set(static.KERNELS) | {"_phased_mlp_kernel", "_phased_attention_kernel"}
    assert len(report["variants"]) >= 38
    # Each step's Triton launches, in order: the rows' rotary angles, the launches of each of the two layers
    # (five; three with the MLP and the attention with o_proj phased; two with the whole attention block phased),
    # lm_head with the final norm inside it, the greedy tokens (the embedding is torch's).
    layers = {"": ["_head_proj_kernel", "_paged_decode_kernel", "_col_gather_kernel", "_row_gather_kernel",
                   "_col_gather_kernel"],
              "/phased": ["_head_proj_kernel", "_phased_attention_kernel", "_phased_mlp_kernel"],
              "/phased-qkv": ["_phased_attention_kernel", "_phased_mlp_kernel"]}
    assert {step: [launch["kernel"] for launch in launches] for step, launches in report["steps"].items()} == {
        f"decode b{batch}{form}": ["_step_inputs_kernel"] + 2 * layer + ["_row_gather_kernel", "_greedy_kernel"]
        for form, layer in layers.items() for batch in (1, 16)}
    assert problems(report) == []
    # The weight kernels read their plan lists early (to address the prefetch); the attention its row's head
    # map, lengths and block table, none of which the head projection before it writes. The phased kernels
    # read what their first phase's programs would: the MLP's neuron list, the attention's head map, lengths
    # and block tables, or with the block phased the projection's slot list.
    early = {}
    for k in bandwidth:
        early.setdefault(k["kernel"], set()).add(frozenset(k["reads_before_wait"]))
    assert early["_paged_decode_kernel"] == {frozenset({"kvmap_ptr", "len_ptr", "start_ptr", "table_ptr"})}
    assert early["_head_proj_kernel"] == {frozenset({"heads_ptr"})}
    assert early["_phased_mlp_kernel"] == {frozenset({"rows_ptr"})}
    assert early["_phased_attention_kernel"] == {frozenset({"kvmap_ptr", "len_ptr", "start_ptr", "table_ptr"}),
                                                 frozenset({"slots_ptr"})}
    assert all(k["prefetches_before_wait"] > 0 for k in bandwidth)
    # The attention also compiles with PDL at head sizes that are not a power of 2 (80 in fp32, 96 in bf16; one
    # split and four), holding the same contract (problems() reads them too).
    assert len(report["odd_head_dims"]) == 4
    assert all(k["prefetches_before_wait"] > 0 for k in report["odd_head_dims"])


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


@pytest.mark.parametrize("body, reads, writes, again, written", [
    ("", ["rows_ptr"], 0, [], ["x_ptr"]),  # the list read, the weight only prefetched
    # An address computed from both: x read early, and again after the wait.
    ("ld.global.b32 { %r5 }, [ %rd3 + 0 ];", ["rows_ptr", "x_ptr"], 0, ["x_ptr"], ["x_ptr"]),
    ("@%p2 st.global.b32 [ %rd1 + 0 ], { %r1 };", ["rows_ptr"], 1, [], ["rows_ptr", "x_ptr"]),
    ("atom.global.acq_rel.gpu.add.u32 %r6, [ %rd1 + 0 ], 1;", ["rows_ptr"], 1, [], ["rows_ptr", "x_ptr"]),
    ("cp.async.cg.shared.global [ %r7 + 0 ], [ %rd2 + 0 ], 0x10, %r8;", ["rows_ptr", "x_ptr"], 1, ["x_ptr"],
     ["x_ptr"]),
    # A store into x at an index loaded from the list writes x, not the list.
    ("ld.global.b32 { %r5 }, [ %rd1 + 4 ]; mad.wide.s32 %rd4, %r5, 2, %rd2; st.global.b32 [ %rd4 + 0 ], { %r1 };",
     ["rows_ptr"], 1, [], ["x_ptr"]),
    # A store through a pointer loaded from the list is charged to the list (where else it points is unknown).
    ("ld.global.b64 { %rd5 }, [ %rd1 + 8 ]; st.global.b32 [ %rd5 + 0 ], { %r1 };", ["rows_ptr"], 1, [],
     ["rows_ptr", "x_ptr"]),
])
def test_the_pdl_check_sees_each_read_and_write_before_the_wait(body, reads, writes, again, written):
    """The PTX reader behind the test above, on a hand-written entry: a global load is charged with every
    pointer argument its address is computed from, through registers; stores, atomics and asynchronous
    copies count as writes before the wait; the prefetch is neither; after the wait, loads addressed from
    arguments read early alone count as reading them again; a store or atomic anywhere writes the buffer its
    address is based on (not one an index it uses was loaded from)."""
    from _pdl_check import around_wait

    facts = around_wait(_PTX.replace("BODY", body), {0: "rows_ptr", 1: "x_ptr"})
    assert facts == {"writes_before_wait": writes, "reads_before_wait": reads, "prefetches_before_wait": 1,
                     "reads_again_after_wait": again, "writes_to": written}


def _kernel_of(facts: dict, name: str = "_row_gather_kernel", hash: str = "h") -> dict:
    return {"kernel": name, "hash": hash, "bandwidth": True, "launch_pdl": True, "waits": 1,
            "launches_dependents": 1, **facts}


def test_the_pdl_check_wants_a_list_read_before_the_wait_read_again_after_it():
    # The rows list is read before the wait and never after (as if the compiler had merged the two loads):
    # the code after the wait would index with what it read before the kernel before it finished.
    from _pdl_check import around_wait, problems

    kernel = _kernel_of(around_wait(_PTX.replace("BODY", ""), {0: "rows_ptr", 1: "x_ptr"}))
    assert problems({"kernels": [kernel], "steps": {}, "variants": []}) == [
        "_row_gather_kernel: does not read ['rows_ptr'] again after the wait"]
    reread = _PTX.replace("BODY", "").replace("\tld.global.b32 { %r4 }, [ %rd2 + 0 ];",
                                              "\tld.global.b32 { %r4 }, [ %rd1 + 0 ];")
    kernel.update(around_wait(reread, {0: "rows_ptr", 1: "x_ptr"}))
    assert problems({"kernels": [kernel], "steps": {}, "variants": []}) == []
    no_prefetch = reread.replace("@p prefetch.global.L2 [%rd3];", "")
    kernel.update(around_wait(no_prefetch, {0: "rows_ptr", 1: "x_ptr"}))
    assert problems({"kernels": [kernel], "steps": {}, "variants": []}) == [
        "_row_gather_kernel: no prefetch before the wait"]


@pytest.mark.parametrize("read_at, writer", [
    ((150, 160), 0),  # inside what the launch before writes
    ((190, 210), 0),  # across its end
    ((300, 310), None),  # a buffer no launch writes
    ((500, 504), 1),  # what the launch itself writes
])
def test_the_pdl_check_finds_an_early_read_of_what_the_launch_before_writes(read_at, writer):
    """A launch may not read before its wait the bytes that the launch before it in its step (which may still
    be running) or the launch itself writes; buffers are told apart by the bytes their tensors span."""
    from _pdl_check import problems

    before = _kernel_of({"reads_before_wait": [], "reads_again_after_wait": [], "writes_to": ["y_ptr"],
                         "writes_before_wait": 0, "prefetches_before_wait": 1}, "_row_gather_kernel", "a")
    after = _kernel_of({"reads_before_wait": ["rows_ptr"], "reads_again_after_wait": ["rows_ptr"],
                        "writes_to": ["y_ptr"], "writes_before_wait": 0, "prefetches_before_wait": 1},
                       "_col_gather_kernel", "b")
    steps = {"decode b1": [
        {"launch": 0, "kernel": "_row_gather_kernel", "hashes": ["a"], "spans": {"y_ptr": (100, 200)}},
        {"launch": 1, "kernel": "_col_gather_kernel", "hashes": ["b"],
         "spans": {"rows_ptr": read_at, "y_ptr": (500, 600)}}]}
    found = problems({"kernels": [before, after], "steps": steps, "variants": []})
    if writer is None:
        assert found == []
    else:
        name = ["_row_gather_kernel", "_col_gather_kernel"][writer]
        assert found == [f"decode b1 launch 1 (_col_gather_kernel): reads rows_ptr before the wait, whose bytes "
                         f"launch {writer} ({name}) writes through ['y_ptr']"]


def test_the_column_gather_stages_its_weight_as_deep_gathered_as_dense():
    """A partial layer's o_proj and down gather their weight's columns through an index list: its tile keeps
    num_stages - 1 buffers, as a dense layer's does (loaded with the weight, the indices would halve them)."""
    gathers = [v for v in decode_variants() if v["kernel"] == "_col_gather_kernel"]
    assert {v["site"].split()[-1] for v in gathers} == {"whole", "partial"}
    shallow = [(v["site"], v["config"], v["buffers"]) for v in gathers if v["buffers"]["b"] != v["num_stages"] - 1]
    assert shallow == []


def _streaming_variant(programs: int, flight: int) -> static.Variant:
    """A launch of ``programs`` programs, one an SM (120 KiB of shared memory each), ``flight`` bytes of one
    streamed tile in flight a program (two buffers)."""
    return static.Variant(kernel="_stand_in", site="test", config="", grid=(programs, 1, 1), num_warps=4,
                          num_stages=2, shared=120 * 1024, registers=32, stack=0, sass=Counter(),
                          buffers={"w": 2}, tile_bytes={"w": flight}, atomics=[], args={})


@pytest.mark.parametrize(
    "programs, flight, expected",
    [
        # Each wave keeps the copy rate busy: the partial last wave costs its share of the bytes, not a wave.
        (static.SMS * 3 // 2, 64 * 1024, 1.0),
        # Fewer programs than SMs, each at F / latency: together programs x F / latency, whatever SMS is.
        (static.SMS // 2, 16 * 1024, static.COPY_RATE * static.LATENCY_S / (static.SMS // 2 * 16 * 1024)),
        # A full wave at the copy rate, then one program alone at its own rate.
        (static.SMS + 1, 64 * 1024,
         static.SMS / (static.SMS + 1) + static.COPY_RATE * static.LATENCY_S / (64 * 1024) / (static.SMS + 1)),
    ],
    ids=["1.5 waves, copy-bound tail", "half the SMs", "one program past a wave"])
def test_the_latency_model_runs_a_partial_wave_at_its_programs_own_rate(monkeypatch, programs, flight, expected):
    """predicted_seconds: FIXED_S plus each wave's bytes at the lesser of the copy rate and its programs' loads
    in flight over the latency (Little's law). ``expected``: the time beyond FIXED_S, in units of the bytes at
    the copy rate."""
    moved = 100e6
    monkeypatch.setitem(static.KERNELS, "_stand_in", static.KernelSpec(("w",), True, lambda v: moved))
    v = _streaming_variant(programs, flight)
    assert v.occupancy == 1
    beyond = static.predicted_seconds(v) - static.FIXED_S
    assert beyond == pytest.approx(expected * moved / static.COPY_RATE, rel=1e-12)


def test_an_empty_grid_is_not_priced(monkeypatch):
    monkeypatch.setitem(static.KERNELS, "_stand_in", static.KernelSpec(("w",), True, lambda v: 0.0))
    assert static.predicted_seconds(_streaming_variant(0, 64 * 1024)) is None


def test_a_step_priced_again_at_another_copy_rate_is_the_step_priced_there(monkeypatch):
    """A step keeps its launches' price terms (every config's), so it is priced again at another device's copy
    rate (priced_step) exactly as it would be priced there anew, through a JSON file too; each launch takes its
    fastest config at that rate, and a launch the model does not price pays FIXED_S."""
    import dataclasses
    import json
    from types import SimpleNamespace

    monkeypatch.setitem(static.KERNELS, "_stand_in",
                        static.KernelSpec(("w",), True, lambda v: 40e6 * v.programs / static.SMS))

    def launch(site, index, programs, flight, kernel="_stand_in"):
        return dataclasses.replace(_streaming_variant(programs, flight), site=site, launch=index, kernel=kernel)

    variants = [launch("decode b1 whole", 0, static.SMS, 64 * 1024), launch("decode b1 whole", 0, 200, 16 * 1024),
                launch("decode b1 whole", 1, 66, 8 * 1024), launch("decode b1 whole", 2, 1, 0, kernel="_norm"),
                launch("decode b1 partial", 0, 40, 64 * 1024), launch("decode b1", 0, 300, 64 * 1024)]
    shape = SimpleNamespace(num_layers=4)
    step = json.loads(json.dumps(static.predicted_step(variants, 1, shape, partial_layers=1)))
    assert step["kernels"] == 3 * 3 + 1 + static.KERNELS_OUTSIDE_LAYERS
    fields = ("seconds", "share", "fixed_s_at_target", "phase_s_at_target", "phases_s_at_target",
              "block_phases_s_at_target", "copy_rate")
    for rate in (static.COPY_RATE, 2.0e12, 0.3e12):
        again, fresh = static.priced_step(step, rate), static.predicted_step(variants, 1, shape, 1, copy_rate=rate)
        assert {f: again[f] for f in fields} == pytest.approx({f: fresh[f] for f in fields}, rel=1e-12)
    # The unpriced norm and the step's ends without terms pay FIXED_S whatever the rate.
    slow = static.priced_step(step, 1.0)
    priced_bytes = 3 * (40e6 + 40e6 * 66 / static.SMS) + 40e6 * 40 / static.SMS + 40e6 * 300 / static.SMS
    assert slow["seconds"] == pytest.approx(priced_bytes + step["kernels"] * static.FIXED_S, rel=1e-9)


def test_a_report_is_priced_again_from_its_file_and_an_old_one_is_refused(tmp_path, capsys, monkeypatch):
    """python -m bench.static OUT --from REPORT --copy-rate R: the report's launches and steps at R, no compiling;
    a report without price terms is refused in one line naming --from."""
    import json

    step = {"batch": 1, "partial_layers": 0, "bytes": 1e6, "layers": 1, "kernels": 2,
            "layout": {"whole": [1, [[[[1e6, 1e13]]], []]], "partial": [0, []], "ends": [1, []]}}
    launches = [{"site": "decode b1 whole", "terms": [[1e6, 1e13]]}, {"site": "decode b1 whole", "terms": None}]
    report = {"target": "cuda:90", "model": "tiny", "latency_s": static.LATENCY_S, "fixed_s": static.FIXED_S,
              "target_share": static.TARGET_SHARE, "launches": launches, "steps": [step]}
    source, out = tmp_path / "report.json", tmp_path / "again.json"
    source.write_text(json.dumps(report))
    monkeypatch.setattr(static, "report_table", lambda result: "table")  # it reads facts this stand-in lacks
    assert static.main([str(out), "--from", str(source), "--copy-rate", "2e12"]) == 0
    again = json.loads(out.read_text())
    assert (again["copy_rate"], again["model_copy_rate"]) == (2e12, static.COPY_RATE)
    assert again["launches"][0]["predicted_seconds"] == pytest.approx(static.FIXED_S + 1e6 / 2e12)
    assert again["launches"][1]["predicted_seconds"] is None
    assert again["steps"][0]["seconds"] == pytest.approx(2 * static.FIXED_S + 1e6 / 2e12)  # one launch unpriced

    del report["steps"][0]["layout"]
    source.write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_:
        static.main([str(out), "--from", str(source)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--from {source}: a report without the price terms this version keeps; make it again with "
        f"python -m bench.static")
    with pytest.raises(SystemExit):
        static.main([str(out), "--from", str(source), "--copy-rate", "0"])
    assert "--copy-rate must be a positive number of bytes a second, got 0.0" in capsys.readouterr().err
