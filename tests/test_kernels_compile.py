"""Every Triton kernel the library defines compiles for Hopper (sm_90) as its launch sites launch it, down to
a cubin whose shared memory and registers fit: without a GPU.

The other kernel tests run under the interpreter, which checks results but not what the compiler accepts
(control flow, types, tile shapes, shared memory). ``tests/_static_check.py`` runs in a process without
TRITON_INTERPRET and compiles each variant through the library's own launch sites (the runtime's decode
steps and prefill at LLaVA-1.5-7B shapes, the eager launchers), with the JIT's own specialisation, every
config a kernel's autotuner may pick. ``tests/test_kernels_static.py`` reads the same compiled code for the
properties bandwidth needs.
"""

from _static_report import compiled_variants


def test_every_kernel_the_library_defines_is_launched_and_compiles():
    report = compiled_variants()
    launched = {v["kernel"] for v in report["variants"]}
    assert launched == set(report["defined"]), set(report["defined"]) ^ launched


def test_every_variant_fits_the_hopper_block_and_keeps_its_registers():
    bad = [(v["kernel"], v["site"], v["config"], [f for f in v["failures"] if f.startswith(("no spills",
                                                                                          "shared memory"))])
           for v in compiled_variants()["variants"]]
    assert [b for b in bad if b[3]] == []
