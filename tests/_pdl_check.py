"""Compile the decode step's kernels for sm_90 with programmatic dependent launch on (ADALLAVA_PDL=1 as a
GPU would take it) and write, per kernel, whether the launch asks for it, and what its PTX does before it
waits: what it writes (nothing may be), which of its pointer arguments it reads (only the plan's lists and
counts, which no kernel writes) and how many lines it prefetches into L2.

Run as a script with TRITON_INTERPRET unset: ``python tests/_pdl_check.py OUT.json [--strict]``. On a CPU the
launchers turn PDL off (no CUDA device), so the flags are forced on here (bench.static's ``pdl``); ptxas
assembles the code. The step's variants also go through bench.static's checks, so the code PDL adds (the
prefetch) costs no registers, buffers or occupancy those need.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.compiler  # noqa: E402

WRITES = re.compile(r"^(?:st\.global|atom\.|red\.|cp\.async(?!\.bulk\.prefetch))")
REGISTER = re.compile(r"%[\w.]+")
PARAM = re.compile(r"_param_(\d+)\b")
# What a kernel may read before it waits: the plan's index lists and counts, which the runtime writes between
# steps and no kernel writes (adallava_kernels.ops.triton_utils.dependent_launch).
PLAN_ARGUMENTS = {"rows_ptr", "cols_ptr", "count_ptr", "heads_ptr"}


def compiled_decode_step() -> tuple[list, list]:
    """The runtime's decode step at LLaVA-1.5-7B shapes, batch 1 and 16, a whole layer and a partial one,
    every config the autotuner may pick, compiled with PDL forced on: the compiled kernels, and the
    variants bench.static reads."""
    from bench import static

    compiled, original = [], triton.compiler.compile

    def keep(src, *args, **kwargs):
        compiled.append(original(src, *args, **kwargs))
        compiled[-1].pointer_names = pointer_arguments(src.signature)
        return compiled[-1]

    triton.compiler.compile = keep
    try:
        variants = static.runtime_launches(prefill_tokens=None, pdl=True)
    finally:
        triton.compiler.compile = original
    return compiled, [v for v in variants if static.is_decode_step(v)]


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


def around_wait(ptx: str, pointer_names: dict[int, str], plan: set[str] = PLAN_ARGUMENTS) -> dict:
    """What the entry's code does before its first ``griddepcontrol.wait``: global writes, the pointer arguments
    its global loads read through (every argument an address is computed from, followed through registers)
    and L2 prefetches; and the ``plan`` arguments it reads again after the wait (by a load or an asynchronous
    copy addressed from plan arguments alone), so a list read early for a prefetch is read again where the
    kernel computes with it."""
    body = ptx[ptx.find(".entry"):]
    body = body[body.find("{"):]
    sources: dict[str, set] = {}  # register -> the registers and parameters any definition of it reads
    writes, prefetches, read, reread, waited = 0, 0, set(), set(), False

    def reach(registers):
        seen, todo, found = set(), list(registers), set()
        while todo:
            reg = todo.pop()
            if reg in seen:
                continue
            seen.add(reg)
            for item in sources.get(reg, ()):
                (found.add(item) if isinstance(item, int) else todo.append(item))
        return {pointer_names[p] for p in found if p in pointer_names}

    for opcode, dests, srcs, params, address in _statements(body):
        waited = waited or opcode == "griddepcontrol.wait"
        if not waited:
            writes += bool(WRITES.match(opcode))
            prefetches += opcode.startswith("prefetch")
            if opcode.startswith(("ld.global", "cp.async")):
                read |= reach(address)
        elif opcode.startswith(("ld.global", "cp.async")) and (pointers := reach(address)) and pointers <= plan:
            reread |= pointers
        for reg in dests:
            sources.setdefault(reg, set()).update(srcs + params + (address if opcode.startswith("ld.") else []))
    return {"writes_before_wait": writes, "reads_before_wait": sorted(read), "prefetches_before_wait": prefetches,
            "plan_reads_after_wait": sorted(reread)}


def facts(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    return {"kernel": kernel.metadata.name, "launch_pdl": bool(kernel.metadata.launch_pdl),
            "waits": ptx.count("griddepcontrol.wait"),
            "launches_dependents": ptx.count("griddepcontrol.launch_dependents"),
            **around_wait(ptx, kernel.pointer_names)}


def problems(report: dict) -> list[str]:
    """What breaks PDL's contract in a report of :func:`main`: each kernel launched with PDL, one wait and one
    launch of dependents, nothing written and only the plan read before the wait (and read again after it:
    the early read only addresses the prefetch), a prefetch in exactly the weight kernels; every variant
    passing bench.static's checks."""
    found = []
    for k in report["kernels"]:
        weights = k["kernel"] != "_paged_decode_kernel"  # K/V pages: the kernel before writes the newest
        if not (k["launch_pdl"] and k["waits"] == 1 and k["launches_dependents"] == 1):
            found.append(f"{k['kernel']}: launch_pdl {k['launch_pdl']}, {k['waits']} waits, "
                         f"{k['launches_dependents']} launches of dependents (want True, 1, 1)")
        if k["writes_before_wait"]:
            found.append(f"{k['kernel']}: {k['writes_before_wait']} writes before the wait")
        if not set(k["reads_before_wait"]) <= PLAN_ARGUMENTS:
            found.append(f"{k['kernel']}: reads {sorted(set(k['reads_before_wait']) - PLAN_ARGUMENTS)} before the wait")
        if not set(k["reads_before_wait"]) <= set(k["plan_reads_after_wait"]):
            found.append(f"{k['kernel']}: does not read "
                         f"{sorted(set(k['reads_before_wait']) - set(k['plan_reads_after_wait']))} again after the wait")
        if (k["prefetches_before_wait"] > 0) != weights:
            found.append(f"{k['kernel']}: {k['prefetches_before_wait']} prefetches before the wait")
    found += [f"{v['kernel']} [{v['site']}] {v['config']}: {'; '.join(v['failures'])}"
              for v in report["variants"] if v["failures"]]
    return found


def main(out: str, strict: bool = False) -> int:
    """``strict``: print what :func:`problems` finds and a summary, and exit 1 if it finds any."""
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with TRITON_INTERPRET unset"
    from bench import static

    compiled, variants = compiled_decode_step()
    step = {v.hash for v in variants if v.kernel in static.KERNELS}  # the bandwidth kernels of a decode step
    kernels = {kernel.hash: facts(kernel) for kernel in compiled if kernel.hash in step}
    checks = [{"kernel": v.kernel, "site": v.site, "config": v.config, "failures": static.failures(v)}
              for v in variants]
    report = {"kernels": list(kernels.values()), "variants": checks}
    Path(out).write_text(json.dumps(report, indent=1))
    if strict:
        found = problems(report)
        print("\n".join(found))
        print(f"triton {triton.__version__}, PDL on: {len(kernels)} kernels, {len(checks)} decode variants, "
              f"{len(found)} problems")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], strict="--strict" in sys.argv[2:]))
