"""The compiled sm_90 code of every kernel variant a decode step launches has what bandwidth needs.

Read without a GPU (bench/static.py, through tests/_static_check.py): the runtime's bound decode step at
LLaVA-1.5-7B shapes, batch 1 and 16, a whole layer and one keeping half its heads and neurons, every config
the autotuner (or the committed table) may pick. Each must load its weight (or K/V) tiles 16 bytes a thread
asynchronously, keep no scalar 16-bit loads, stage its streamed tiles at least 2 buffers deep with at least
32 KiB in flight per SM, launch at least one program per SM with no 1.0-1.5 wave tail, spill nothing, fit
its shared memory and use no ordered float atomics (bench.static.CHECKS).
"""

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


def test_with_pdl_every_decode_kernel_waits_for_the_one_before_it_before_touching_memory(tmp_path):
    """ADALLAVA_PDL=1 (programmatic dependent launch, opt in): each decode kernel's launch asks for it and its
    code waits (griddepcontrol.wait) before its first global load or store, so a program that starts while
    the kernel before it drains reads nothing that kernel writes; assembled for sm_90 by ptxas."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALLAVA_AUTOTUNE")}
    out = tmp_path / "pdl.json"
    done = subprocess.run([sys.executable, str(root / "tests" / "_pdl_check.py"), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    kernels = json.loads(out.read_text())
    assert {k["kernel"] for k in kernels} == set(static.KERNELS)
    assert all(k["launch_pdl"] and k["waits"] == 1 and k["launches_dependents"] == 1 and k["waits_before_memory"]
               for k in kernels), kernels


def test_the_column_gather_stages_its_weight_as_deep_gathered_as_dense():
    """A partial layer's o_proj and down gather their weight's columns through an index list: its tile keeps
    num_stages - 1 buffers, as a dense layer's does (loaded with the weight, the indices would halve them)."""
    gathers = [v for v in decode_variants() if v["kernel"] == "_col_gather_kernel"]
    assert {v["site"].split()[-1] for v in gathers} == {"whole", "partial"}
    shallow = [(v["site"], v["config"], v["buffers"]) for v in gathers if v["buffers"]["b"] != v["num_stages"] - 1]
    assert shallow == []
