"""Compile the decode step's kernels for sm_90 with programmatic dependent launch on (ADALLAVA_PDL=1 as a
GPU would take it) and write, per kernel, whether the launch asks for it, what its PTX does before it waits
(what it writes: nothing may be; which of its pointer arguments it reads; how many lines it prefetches into
L2), which arguments it reads again after the wait and which it writes anywhere; and, per launch of the step
in order, the bytes each tensor argument spans.

PDL's one hazard is a read before the wait of what the kernel before it writes: a kernel's programs start
once every program of the kernel before it has passed its own wait (so the one before that has finished), and
the kernel before it may still be writing. :func:`problems` holds each launch's early reads against the
buffers the launch before it (and the launch itself) writes, and wants every argument read early read again
after the wait, so an early read only ever addresses a prefetch. The paged attention is also compiled at
head sizes that are not a power of 2 (:data:`ODD_HEAD_DIMS`) and held to the same per-kernel contract.

Run as a script with TRITON_INTERPRET unset: ``python tests/_pdl_check.py OUT.json [--strict]``. On a CPU the
launchers turn PDL off (no CUDA device), so the flags are forced on here (bench.static's ``pdl``); ptxas
assembles the code. The step's variants also go through bench.static's checks, so the code PDL adds (the
prefetch) costs no registers, buffers or occupancy those need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.compiler  # noqa: E402

WRITES = re.compile(r"^(?:st\.global|atom\.|red\.|cp\.async(?!\.bulk\.prefetch))")
# What changes global memory (an asynchronous copy writes shared memory: its global side is a read).
GLOBAL_WRITES = re.compile(r"^(?:st\.global|(?:atom|red)\.(?!shared))")
REGISTER = re.compile(r"%[\w.]+")
PARAM = re.compile(r"_param_(\d+)\b")


@contextlib.contextmanager
def kept_compiles():
    """Inside the block, every kernel Triton compiles is added to the list yielded, with its pointer arguments'
    names (``pointer_names``)."""
    compiled, original = [], triton.compiler.compile

    def keep(src, *args, **kwargs):
        compiled.append(original(src, *args, **kwargs))
        compiled[-1].pointer_names = pointer_arguments(src.signature)
        return compiled[-1]

    triton.compiler.compile = keep
    try:
        yield compiled
    finally:
        triton.compiler.compile = original


# The decode step's phased forms (the variables that turn them on), each compiled as a step of its own: the MLP
# and the attention with o_proj phased, then the MLP and the whole attention block.
PHASED_STEPS = {"phased": {"ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "1"},
                "phased-qkv": {"ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "qkv"}}
# Bandwidth kernels bench.static does not price: each phase of these streams as one of its kernels does.
PHASED_KERNELS = {"_phased_mlp_kernel", "_phased_attention_kernel"}


def _in_step(site: str, form: str) -> str:
    """``site`` ("decode b1 whole") in the step of the decode step's phased ``form`` ("decode b1/phased whole")."""
    words = site.split()
    return " ".join([words[0], f"{words[1]}/{form}", *words[2:]])


def compiled_decode_step() -> tuple[list, list]:
    """The runtime's decode step at LLaVA-1.5-7B shapes, batch 1 and 16, a whole layer and a partial one,
    every config the autotuner may pick, compiled with PDL forced on, as launched by default and in each of
    its :data:`PHASED_STEPS` forms: the compiled kernels, and the variants bench.static reads."""
    from bench import static

    with kept_compiles() as compiled:
        variants = list(static.runtime_launches(prefill_tokens=None, pdl=True))
        for form, values in PHASED_STEPS.items():
            variants += [dataclasses.replace(v, site=_in_step(v.site, form))
                         for v in static.runtime_launches(prefill_tokens=None, pdl=True,
                                                          environment=tuple(values.items()))
                         if static.is_decode_step(v)]
    return compiled, [v for v in variants if static.is_decode_step(v)]


# The paged attention at head sizes that are not a power of 2 (its prefetch covers BLOCK_D elements, those
# below HEAD_DIM): (head_dim, dtype).
ODD_HEAD_DIMS = ((80, "float32"), (96, "bfloat16"))


def odd_head_dim_attention() -> list:
    """The paged decode attention compiled with PDL forced on at :data:`ODD_HEAD_DIMS`, batch 2, one split
    and four."""
    import torch

    from adallava_kernels.ops import common
    from adallava_kernels.ops.paged_decode_kernel import launch_paged_decode
    from bench import static

    with kept_compiles() as compiled, static.capturing() as variants, static._triton_on_cpu(common), \
            static._pdl_forced(True):
        variants.site["name"] = "decode odd head_dim"
        for head_dim, dtype in ODD_HEAD_DIMS:
            dtype = getattr(torch, dtype)
            q = torch.randn(2, 4, head_dim, dtype=dtype)
            pages = torch.randn(2, 8, 16, head_dim, dtype=dtype)
            tables = torch.arange(8, dtype=torch.int32).reshape(2, 2, 2)
            lengths = torch.tensor([20, 31], dtype=torch.int32)
            for split in (1, 4):
                launch_paged_decode(q, pages, tables, torch.tensor([0, 0, 1, 1], dtype=torch.int32), lengths,
                                    torch.zeros(2, dtype=torch.int32), head_dim ** -0.5, split)
    return compiled


def pointer_arguments(signature: dict) -> dict[int, str]:
    """PTX parameter index -> name, for the kernel's pointer arguments (constexprs, including integers the JIT
    specialized to 1, are not parameters)."""
    params = [(name, kind) for name, kind in signature.items() if kind != "constexpr"]
    return {i: name for i, (name, kind) in enumerate(params) if str(kind).startswith("*")}


def _statements(ptx: str):
    """(opcode, destination registers, source registers, parameters, address registers) per instruction."""
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "$")):
            continue
        for text in line.replace("{", " ").replace("}", " ").split(";"):
            text = re.sub(r"^\s*@!?%?\w+\s+", "", text.strip())
            if not text or text.startswith(".reg"):
                continue
            opcode, _, operands = text.partition(" ")
            address = " ".join(re.findall(r"\[([^\]]*)\]", operands))
            outside = re.sub(r"\[[^\]]*\]", " ", operands)
            registers = REGISTER.findall(outside)
            params = [int(p) for p in PARAM.findall(operands)]
            if opcode.startswith(("st.", "prefetch", "red.")) or opcode.startswith("bra") or opcode == "bar.sync":
                yield opcode, [], registers, params, REGISTER.findall(address)
            else:
                yield opcode, registers[:1] if not opcode.startswith("ld.") else registers, registers[1:], params, \
                    REGISTER.findall(address)


def around_wait(ptx: str, pointer_names: dict[int, str]) -> dict:
    """What the entry's code does before its first ``griddepcontrol.wait``: global writes, the pointer arguments
    its global loads read through (every argument an address is computed from, followed through registers)
    and L2 prefetches; the arguments read early that it reads again after the wait (by a load or an
    asynchronous copy addressed from arguments read early alone), so a value read early only addresses the
    prefetch; and every pointer argument any store or atomic of the entry writes through. An entry with no
    wait (a launch without PDL) starts after the kernel before it ends: none of its code is early."""
    body = ptx[ptx.find(".entry"):]
    body = body[body.find("{"):]
    sources: dict[str, set] = {}  # register -> the registers and parameters any definition of it reads
    # Registers a load from memory defines (a value, not an address's base; Triton's masked loads first move
    # the default value into the register, then load into it under the mask).
    loaded: set[str] = set()
    writes, prefetches, read, reread, written = 0, 0, set(), set(), set()
    waited = "griddepcontrol.wait" not in body

    def reach(registers, through_loads=True):
        seen, todo, found = set(), list(registers), set()
        while todo:
            reg = todo.pop()
            if reg in seen or (not through_loads and reg in loaded):
                continue
            seen.add(reg)
            for item in sources.get(reg, ()):
                (found.add(item) if isinstance(item, int) else todo.append(item))
        return {pointer_names[p] for p in found if p in pointer_names}

    for opcode, dests, srcs, params, address in _statements(body):
        waited = waited or opcode == "griddepcontrol.wait"
        if GLOBAL_WRITES.match(opcode):
            # The buffer written: the address's base, not where an index in it was loaded from (unless the
            # address is a loaded pointer: then every argument it came from, to be safe).
            written |= reach(address, through_loads=False) or reach(address)
        if not waited:
            writes += bool(WRITES.match(opcode))
            prefetches += opcode.startswith("prefetch")
            if opcode.startswith(("ld.global", "cp.async")):
                read |= reach(address)
        elif opcode.startswith(("ld.global", "cp.async")) and (pointers := reach(address)) and pointers <= read:
            reread |= pointers
        for reg in dests:
            sources.setdefault(reg, set()).update(srcs + params + (address if opcode.startswith("ld.") else []))
            if opcode.startswith("ld.") and not opcode.startswith("ld.param"):
                loaded.add(reg)
    return {"writes_before_wait": writes, "reads_before_wait": sorted(read), "prefetches_before_wait": prefetches,
            "reads_again_after_wait": sorted(reread), "writes_to": sorted(written)}


def facts(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    return {"kernel": kernel.metadata.name, "launch_pdl": bool(kernel.metadata.launch_pdl),
            "waits": ptx.count("griddepcontrol.wait"),
            "launches_dependents": ptx.count("griddepcontrol.launch_dependents"),
            **around_wait(ptx, kernel.pointer_names)}


def problems(report: dict) -> list[str]:
    """What breaks PDL's contract in a report of :func:`main`: each bandwidth kernel launched with PDL, with one
    wait and one launch of dependents, writing nothing before the wait and reading again after it what it read
    before (the early read only addresses the prefetch), and prefetching there; no launch reading before its
    wait a buffer that it or the launch before it writes; every variant passing bench.static's checks."""
    found = []
    for k in report["kernels"] + report.get("odd_head_dims", []):
        if not k["bandwidth"]:
            continue
        if not (k["launch_pdl"] and k["waits"] == 1 and k["launches_dependents"] == 1):
            found.append(f"{k['kernel']}: launch_pdl {k['launch_pdl']}, {k['waits']} waits, "
                         f"{k['launches_dependents']} launches of dependents (want True, 1, 1)")
        if k["writes_before_wait"]:
            found.append(f"{k['kernel']}: {k['writes_before_wait']} writes before the wait")
        if not set(k["reads_before_wait"]) <= set(k["reads_again_after_wait"]):
            found.append(f"{k['kernel']}: does not read "
                         f"{sorted(set(k['reads_before_wait']) - set(k['reads_again_after_wait']))} again after the wait")
        if not k["prefetches_before_wait"]:
            found.append(f"{k['kernel']}: no prefetch before the wait")
    found += early_reads_of_written_buffers(report)
    found += [f"{v['kernel']} [{v['site']}] {v['config']}: {'; '.join(v['failures'])}"
              for v in report["variants"] if v["failures"]]
    return found


def early_reads_of_written_buffers(report: dict) -> list[str]:
    """Each launch's arguments read before its wait whose bytes meet those of an argument that the launch
    before it in its step, or the launch itself, writes through."""
    kernels = {k["hash"]: k for k in report["kernels"]}
    found = []
    for step, launches in report["steps"].items():
        for before, launch in zip([None] + launches[:-1], launches):
            early = {name for h in launch["hashes"] for name in kernels[h]["reads_before_wait"]}
            writers = [w for w in (before, launch) if w is not None]
            for name in sorted(early):
                lo, hi = launch["spans"][name]
                for writer in writers:
                    hit = [w for h in writer["hashes"] for w in kernels[h]["writes_to"]
                           if writer["spans"][w][0] < hi and lo < writer["spans"][w][1]]
                    if hit:
                        found.append(f"{step} launch {launch['launch']} ({launch['kernel']}): reads {name} before "
                                     f"the wait, whose bytes launch {writer['launch']} ({writer['kernel']}) writes "
                                     f"through {sorted(set(hit))}")
    return found


def launch_order(variants: list) -> dict[str, list[dict]]:
    """Per decode step ("decode b1", ...), its launches in order: the kernel, its compiled configs' hashes and
    its tensor arguments' spans."""
    steps: dict[str, dict[int, dict]] = {}
    for v in variants:
        step = " ".join(v.site.split()[:2])
        launch = steps.setdefault(step, {}).setdefault(v.launch, {"launch": v.launch, "kernel": v.kernel,
                                                                   "hashes": [], "spans": v.spans})
        if v.hash not in launch["hashes"]:
            launch["hashes"].append(v.hash)
    return {step: [launches[i] for i in sorted(launches)] for step, launches in steps.items()}


def main(out: str, strict: bool = False) -> int:
    """``strict``: print what :func:`problems` finds and a summary, and exit 1 if it finds any."""
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
    from bench import static

    compiled, variants = compiled_decode_step()
    step = {v.hash for v in variants}
    kernels = {kernel.hash: {"hash": kernel.hash, **facts(kernel),
                             "bandwidth": kernel.metadata.name in static.KERNELS or kernel.metadata.name in PHASED_KERNELS}
               for kernel in compiled if kernel.hash in step}
    checks = [{"kernel": v.kernel, "site": v.site, "config": v.config, "failures": static.failures(v)}
              for v in variants]
    report = {"kernels": list(kernels.values()), "steps": launch_order(variants), "variants": checks,
              "odd_head_dims": [{"hash": kernel.hash, **facts(kernel), "bandwidth": True}
                                for kernel in odd_head_dim_attention()]}
    Path(out).write_text(json.dumps(report, indent=1))
    if strict:
        found = problems(report)
        print("\n".join(found))
        bandwidth = sum(k["bandwidth"] for k in kernels.values())
        pairs = sum(len(launches) for launches in report["steps"].values())
        print(f"triton {triton.__version__}, PDL on: {bandwidth} kernels, {len(checks)} decode variants, "
              f"{pairs} launches held against the one before, {len(found)} problems")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], strict="--strict" in sys.argv[2:]))
