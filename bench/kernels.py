"""Per kernel: what one full and one partial decoder layer launch, against the cost model and the machine.

A random-weight model of the chosen shape is served by a
:class:`~adallava_kernels.runtime.PlannedDecoder` (no CUDA graphs) under one
plan: every layer full except the last, which keeps every other head and
every other neuron group (half of each, scattered as a scheduler picks them).
One prefill and one decode step run through the runner; the inputs it hands
the first (full) and the last (partial) layer are kept (a prefill's
``LayerProgram``, a decode step's ``SlotLayer`` with the plan as data),
and each layer call is then repeated alone under ``torch.profiler``, with
ranges around the attention's projection, attention and ``o_proj`` and
around the MLP, so that each kernel is known by the sub-block it runs in.

Per kernel: its time (on CUDA, GPU time of the profiler's device records;
on a CPU, CPU time of each top-level op, on one thread), the FLOPs and bytes
of the cost-model ops it computes (:func:`adallava_kernels.cost.layer_ops`)
where one kernel computes them, and that work as a fraction of the rate
that bounds it: the copy rate (``timing.measure_copy``) below the ridge
point, the matrix rate (a large matmul) above it, both measured in the same
run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
from typing import Callable

import torch

from adallava_kernels import ExecutionPlan, ModelShape, cost
from adallava_kernels.plan import neuron_groups
from adallava_kernels.runtime import PlannedDecoder
from adallava_kernels.runtime.layers import KVPages
from adallava_kernels.runtime.step import SlotLayer

from . import model as model_bench
from . import timing
from ._common import device_name, format_table, markdown_table, si_text, sync

CPU_TOKENS = 32
CPU_CONTEXT = 64
PAGE_SIZE = 16
GPU_REPS, CPU_REPS = 5, 3
# Copy: 512 MiB of bf16 on a GPU, far past its L2; 64 MiB of float32 on a CPU, past its last-level cache.
GPU_COPY_ELEMENTS, CPU_COPY_ELEMENTS = 1 << 28, 1 << 24
GPU_MATMUL_N, CPU_MATMUL_N = 8192, 1024
CPU_TIME = "CPU time of each top-level op, 1 thread"
GPU_TIME = "GPU time of each device kernel (profiler device records)"

# Sub-blocks a layer's kernels are attributed to, by the range they run in, and the cost-model ops
# each of the sub-block's main kernels computes, in launch order.
STAGES = {
    "qkv": [("q_proj", "k_proj", "v_proj")],
    "attention": [("qk_matmul", "softmax", "sv_matmul")],
    "o_proj": [("o_proj",)],
    "mlp": [("gate_proj", "up_proj"), ("down_proj", "mlp_add")],
}
# Two kernels in the MLP: the Triton path's first fuses SiLU-and-multiply; the down projection adds the
# residual in every path.
FUSED_MLP = [("gate_proj", "up_proj", "mlp_act"), ("down_proj", "mlp_add")]
# Kernels outside the wrapped sub-blocks: the norms (the second fuses the attention's residual add),
# the decode attention over the pages, and a residual add that ends a layer without an MLP.
NORMS = [("attn_norm",), ("attn_add", "mlp_norm")]
MATMUL = re.compile(r"matmul|aten::mm|addmm|linear|bmm|gemm|nvjet|cutlass|xmma|gather_kernel|head_proj", re.I)
ATTENTION = re.compile(r"attention|attn|fmha|flash|paged_decode", re.I)
NORM = re.compile(r"rms_norm", re.I)
ADD = re.compile(r"add", re.I)
STAGE_PREFIX = "kernels:"


def layer_plan(shape: ModelShape) -> tuple[ExecutionPlan, int, int]:
    """A plan whose first layer is full and whose last keeps half its heads and half its neuron groups
    (every other one); the two layers' indices."""
    last = shape.num_layers - 1
    heads = [range(shape.num_heads)] * last + [range(0, shape.num_heads, 2)]
    groups = neuron_groups(shape.intermediate_size, shape.num_heads)
    half = [n for g in groups[::2] for n in g]
    neurons = [range(shape.intermediate_size)] * last + [half]
    return ExecutionPlan(shape, heads, neurons), 0, last


@contextlib.contextmanager
def _replaced(obj, name: str, make: Callable[[Callable], Callable]):
    """``obj.name`` replaced on this instance by ``make(original)`` until the block ends."""
    had = name in vars(obj)
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def _ranged(label: str) -> Callable[[Callable], Callable]:
    def make(original):
        def call(*args, **kwargs):
            with torch.profiler.record_function(STAGE_PREFIX + label):
                return original(*args, **kwargs)
        return call
    return make


@contextlib.contextmanager
def _stage_ranges(program):
    """Profiler ranges around the program's attention stages and its MLP, for this instance only."""
    with contextlib.ExitStack() as stack:
        if isinstance(program, SlotLayer):  # a decode layer: its Triton stages, or the torch path's sub-blocks
            for method, label in (("_qkv", "qkv"), ("_attend", "attention"), ("_o_proj", "o_proj"),
                                  ("_mlp_triton", "mlp"), ("_attention_torch", "attention"), ("_mlp_torch", "mlp")):
                stack.enter_context(_replaced(program, method, _ranged(label)))
        elif program.attention is not None:
            for method, label in (("project", "qkv"), ("project_decode", "qkv"), ("project_to_pages", "qkv"),
                                  ("attend", "attention"), ("output", "o_proj")):
                stack.enter_context(_replaced(program.attention, method, _ranged(label)))
        if not isinstance(program, SlotLayer) and program.mlp is not None:
            stack.enter_context(_replaced(program.mlp, "add_to", _ranged("mlp")))
        yield


def _frozen(value):
    """A copy of a layer input the runner changes after the call (a decode step advances its lengths)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, KVPages):
        fields = dataclasses.fields(value)
        return dataclasses.replace(value, **{f.name: _frozen(getattr(value, f.name)) for f in fields})
    return value


@contextlib.contextmanager
def _capturing(programs: dict, method: str):
    """The arguments the runner passes to each program's ``method`` (``prefill`` or ``decode``), by key."""
    calls: dict = {}

    def recorder(key):
        def make(original):
            def call(*args):
                calls[key] = tuple(_frozen(a) for a in args)
                return original(*args)
            return call
        return make

    with contextlib.ExitStack() as stack:
        for key, program in programs.items():
            stack.enter_context(_replaced(program, method, recorder(key)))
        yield calls


def _innermost(event, ranges) -> str | None:
    """The stage label of the narrowest range whose interval holds ``event``."""
    holding = [r for r in ranges if r.time_range.start <= event.time_range.start
               and event.time_range.end <= r.time_range.end]
    if not holding:
        return None
    return min(holding, key=lambda r: r.time_range.elapsed_us()).name.removeprefix(STAGE_PREFIX)


def _is_stage(event) -> bool:
    return event.name.startswith(STAGE_PREFIX)


def _cpu_kernels(events) -> list[tuple[str, float, str | None]]:
    """Each top-level op (ranges aside) of one call: name, CPU seconds, stage."""
    ranges = [e for e in events if _is_stage(e)]
    out = []
    for event in events:
        parent = event.cpu_parent
        while parent is not None and _is_stage(parent):
            parent = parent.cpu_parent
        if parent is None and not _is_stage(event):
            out.append((event.name, event.time_range.elapsed_us() / 1e6, _innermost(event, ranges)))
    return out


def _gpu_kernels(events) -> list[tuple[str, float, str | None]]:
    """Each device record of one call, in start order: name, GPU seconds, stage (the device-side ranges)."""
    from torch.autograd import DeviceType

    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    ranges = [e for e in on_device if getattr(e, "is_user_annotation", False) and _is_stage(e)]
    kernels = sorted((e for e in on_device if not getattr(e, "is_user_annotation", False)),
                     key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us() / 1e6, _innermost(e, ranges)) for e in kernels]


def profile_call(call: Callable[[], object], device: torch.device, reps: int) -> list[dict]:
    """Each kernel of ``call`` in launch order, with its median time over ``reps`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    runs = []
    for _ in range(reps):
        sync(device)
        with profile(activities=activities) as prof:
            call()
            sync(device)
        runs.append((_gpu_kernels if on_gpu else _cpu_kernels)(prof.events()))
    first = runs[0]
    alike = [run for run in runs if [k[0] for k in run] == [k[0] for k in first]]
    return [{"name": name, "stage": stage, "seconds": statistics.median(run[i][1] for run in alike)}
            for i, (name, _, stage) in enumerate(first)]


def _stage_groups(stage: str, kernels: list[dict]) -> list[tuple[list[dict], tuple]]:
    """(the kernel(s), cost ops) pairs of one stage: each main kernel takes the next op group."""
    groups = FUSED_MLP if stage == "mlp" and len(kernels) == 2 else STAGES[stage]
    if len(kernels) == len(groups):
        return list(zip(([k] for k in kernels), groups))
    pattern = ATTENTION if stage == "attention" else MATMUL
    main = [k for k in kernels if pattern.search(k["name"])]
    return list(zip(([k] for k in main), groups)) if len(main) == len(groups) else []


def assign_ops(kernels: list[dict]) -> None:
    """Sets each kernel's ``ops``: the cost-model ops it alone computes, or ``None``."""
    for k in kernels:
        k["ops"] = None
    for stage in STAGES:
        for (kernel,), ops in _stage_groups(stage, [k for k in kernels if k["stage"] == stage]):
            kernel["ops"] = list(ops)
    outside = [k for k in kernels if k["stage"] is None]
    for kernel, ops in zip([k for k in outside if NORM.search(k["name"])], NORMS):
        kernel["ops"] = list(ops)
    attention = [k for k in outside if ATTENTION.search(k["name"])]
    if len(attention) == 1:
        attention[0]["ops"] = list(STAGES["attention"][0])
    if outside and outside[-1] is kernels[-1] and ADD.search(kernels[-1]["name"]) and kernels[-1]["ops"] is None:
        kernels[-1]["ops"] = ["mlp_add"]


def price(kernels: list[dict], ops: dict[str, cost.OpCost], rates: dict) -> None:
    """Each mapped kernel's FLOPs and bytes, and its work as a fraction of the rate that bounds it."""
    for k in kernels:
        if k["ops"] is None:
            k.update(flops=None, bytes=None, bound=None, fraction=None)
            continue
        flops = sum(ops[name].flops for name in k["ops"])
        moved = sum(ops[name].bytes for name in k["ops"])
        compute = moved > 0 and flops / moved >= rates["ridge_flops_per_byte"]
        achieved = (flops / rates["matmul_flops_per_s"]) if compute else (moved / rates["copy_bytes_per_s"])
        k.update(flops=flops, bytes=moved, bound="compute" if compute else "memory",
                 fraction=achieved / k["seconds"])


def _device_seconds(t: timing.Timing) -> float:
    """GPU time where there is one (the rate of the device, not of the launches), else wall time."""
    return t.gpu_s if t.gpu_s is not None else t.median_s


def measure_rates(device: torch.device, dtype: torch.dtype) -> dict:
    """The copy rate (bytes read and written per second) and the matrix rate of ``dtype`` on this device."""
    on_gpu = device.type == "cuda"
    elements = GPU_COPY_ELEMENTS if on_gpu else CPU_COPY_ELEMENTS
    copy = timing.measure_copy(elements, device, dtype)
    n = GPU_MATMUL_N if on_gpu else CPU_MATMUL_N
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    matmul = timing.measure_op(lambda: a @ b, device)
    copy_rate = 2 * elements * dtype.itemsize / _device_seconds(copy)
    matmul_rate = 2 * n**3 / _device_seconds(matmul)
    return {"copy_elements": elements, "copy_bytes_per_s": copy_rate, "matmul_n": n,
            "matmul_flops_per_s": matmul_rate, "ridge_flops_per_byte": matmul_rate / copy_rate}


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """On a CPU, profile on one thread, as the copy and matmul rates are timed."""
    if device.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _captured_calls(runner: PlannedDecoder, plan: ExecutionPlan, programs: dict, shape: ModelShape,
                    tokens: int, context: int, device: torch.device) -> dict:
    """The arguments the runner gives each chosen layer in a prefill of ``tokens`` and in a decode step
    at ``context`` positions (after a prefill of ``context - 1``)."""
    generator = torch.Generator().manual_seed(0)
    embeds = {n: runner.weights.embed[torch.randint(0, shape.vocab_size - 1, (1, n), generator=generator).to(device)]
              for n in (tokens, context - 1)}
    runner.admit("prefill", plan, tokens)
    runner.admit("decode", plan, context)
    try:
        with _capturing(programs["prefill"], "prefill") as prefill:
            runner.prefill(["prefill"], embeds[tokens])
        logits = runner.prefill(["decode"], embeds[context - 1])
        batch = runner.decode(["decode"])
        with _capturing(programs["decode"], "decode") as decode:
            batch.step(logits[:, -1].argmax(-1))
        batch.close()
    finally:
        runner.free("prefill")
        runner.free("decode")
    return {"prefill": prefill, "decode": decode}


def profile_layer(program, stage: str, args: tuple, plan: ExecutionPlan, shape: ModelShape, q_tokens: int,
                  kv_tokens: int, rates: dict, device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    """One layer program's ``stage`` (``prefill`` or ``decode``) on the runner's ``args``, profiled and priced."""
    def layer_call():
        return getattr(program, stage)(*args)

    layer_call()  # compiled and tuned in the runner's call; once more, outside any timing
    with _stage_ranges(program), _one_thread(device):
        kernels = profile_call(layer_call, device, reps)
    i = program.index
    precision = cost.Precision(dtype.itemsize, dtype.itemsize, dtype.itemsize)
    ops = {op.name: op for op in cost.layer_ops(
        shape, heads=len(plan.heads[i]), kv_heads=len(plan.kv_heads(i)), neurons=len(plan.neurons[i]),
        q_tokens=q_tokens, kv_tokens=kv_tokens, precision=precision)}
    assign_ops(kernels)
    price(kernels, ops, rates)
    return {"index": i, "stage": stage, "heads": len(plan.heads[i]), "neurons": len(plan.neurons[i]),
            "kernel_count": len(kernels), "total_s": sum(k["seconds"] for k in kernels),
            "predicted_flops": sum(op.flops for op in ops.values()),
            "predicted_bytes": sum(op.bytes for op in ops.values()), "kernels": kernels}


def profile_step_ends(runner: PlannedDecoder, plan: ExecutionPlan, shape: ModelShape, context: int,
                      device: torch.device, reps: int) -> dict:
    """The kernels a decode step launches outside its layers (the embedding, the rows' rotary angles, the
    final norm, ``lm_head``, the greedy tokens): one row's eager step at ``context`` positions (``forward_step``,
    the step a graph captures) profiled with a range around each layer, the kernels outside them kept."""
    generator = torch.Generator().manual_seed(1)
    embeds = runner.weights.embed[torch.randint(0, shape.vocab_size - 1, (1, context - 1),
                                                generator=generator).to(device)]
    # Each step stores a position: room for the warm-up step, the warm-up call and every profiled one.
    runner.admit("step", plan, context + reps + 2)
    try:
        logits = runner.prefill(["step"], embeds)
        batch = runner.decode(["step"])
        try:
            batch.step(logits[:, -1].argmax(-1))  # the step's buffers and views made, its kernels compiled
            step_call = lambda: batch.forward_step(1)  # noqa: E731
            step_call()
            with contextlib.ExitStack() as stack, _one_thread(device):
                for layer in runner.slot_layers:
                    stack.enter_context(_replaced(layer, "decode", _ranged("layer")))
                kernels = [k for k in profile_call(step_call, device, reps) if k["stage"] != "layer"]
        finally:
            batch.close()
    finally:
        runner.free("step")
    return {"context": context, "kernel_count": len(kernels), "total_s": sum(k["seconds"] for k in kernels),
            "kernels": [{"name": k["name"], "seconds": k["seconds"]} for k in kernels]}


def run(shape: ModelShape, model_name: str, device: torch.device, dtype: torch.dtype, backend: str,
        tokens: int, context: int, seed: int = 0) -> dict:
    """Per layer (full, partial) and stage (prefill of ``tokens``, a decode step at ``context`` positions):
    each kernel's time, cost and share of the measured rates."""
    if tokens < 1 or context < 2:
        raise ValueError(f"need tokens >= 1 and context >= 2 (a prefill before the step), got {tokens} and {context}")
    reps = GPU_REPS if device.type == "cuda" else CPU_REPS
    model = model_bench.build(shape, device, dtype, seed)
    plan, full, partial = layer_plan(shape)
    pages = 2 * shape.num_layers * shape.num_kv_heads * -(-max(tokens, context) // PAGE_SIZE)
    runner = PlannedDecoder.from_hf(model, num_pages=pages, page_size=PAGE_SIZE, backend=backend,
                                    partial_layers=[partial], cuda_graphs=False)
    rates = measure_rates(device, dtype)
    runner.programs.acquire(plan)  # the two layers' programs outlive the requests whose inputs they replay
    try:
        # Prefill runs the plan's layer programs; a decode step, the runner's layers with the plan as data.
        programs = {"prefill": {"full": runner.programs.of(plan)[full], "partial": runner.programs.of(plan)[partial]},
                    "decode": {"full": runner.slot_layers[full], "partial": runner.slot_layers[partial]}}
        with torch.no_grad():
            calls = _captured_calls(runner, plan, programs, shape, tokens, context, device)
            layers = [{"layer": kind, **profile_layer(program, stage, calls[stage][kind], plan, shape, q_tokens,
                                                      kv_tokens, rates, device, dtype, reps)}
                      for stage, q_tokens, kv_tokens in (("prefill", tokens, tokens), ("decode", 1, context))
                      for kind, program in programs[stage].items()]
            step_ends = profile_step_ends(runner, plan, shape, context, device, reps)
    finally:
        runner.programs.release(plan)
    return {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "model": model_name,
            "shape": shape.to_dict(), "backend": runner.backend, "tokens": tokens, "context": context,
            "reps": reps, "time": GPU_TIME if device.type == "cuda" else CPU_TIME, **rates, "layers": layers,
            "step_ends": step_ends}


COLUMNS = [
    ("name", "kernel (CPU: top-level op)", "s"),
    ("part", "in", "s"),
    ("us", "time us", "s"),
    ("ops", "cost-model ops", "s"),
    ("flops", "FLOPs", "s"),
    ("bytes", "bytes", "s"),
    ("bound", "bound", "s"),
    ("fraction", "of rate", "s"),
]
NAME_WIDTH = 48


def _short(name: str) -> str:
    """A kernel's name cut to the table's column (a CUDA template's runs to hundreds of characters)."""
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def _cells(k: dict) -> dict:
    mapped = k["ops"] is not None
    return {"name": _short(k["name"]), "part": k["stage"] or "-", "us": f"{k['seconds'] * 1e6:.1f}",
            "ops": "+".join(k["ops"]) if mapped else "-",
            "flops": si_text(k["flops"], "FLOP") if mapped else "-",
            "bytes": si_text(k["bytes"], "B") if mapped else "-",
            "bound": k["bound"] or "-", "fraction": f"{k['fraction']:.1%}" if mapped else "-"}


def _rates_line(result: dict) -> str:
    return (f"measured copy rate {si_text(result['copy_bytes_per_s'], 'B/s')} (read + write), matmul rate "
            f"{si_text(result['matmul_flops_per_s'], 'FLOP/s')} ({result['matmul_n']}^3): ridge point "
            f"{result['ridge_flops_per_byte']:.1f} FLOP/B; time: {result['time']}")


def _layer_line(result: dict, layer: dict) -> str:
    where = f"{result['tokens']} tokens" if layer["stage"] == "prefill" else f"context {result['context']}"
    return (f"{layer['layer']} layer {layer['index']} ({layer['heads']} heads, {layer['neurons']} neurons), "
            f"{layer['stage']} over {where}: {layer['kernel_count']} kernels, {layer['total_s'] * 1e6:.1f} us, "
            f"{si_text(layer['predicted_flops'], 'FLOP')} predicted")


UNMAPPED = ("'-': no single cost-model op for the kernel (rotary embedding, K/V append into the pages, copies, the "
            "split combine of the paged decode attention, one of several elementwise ops of a norm or the "
            "activation); 'of rate': the cost model's bytes / time / copy rate below the ridge point, FLOPs / time "
            "/ matmul rate above it")


STEP_COLUMNS = [("name", "kernel (CPU: top-level op)", "s"), ("us", "time us", "s")]


def _step_line(ends: dict) -> str:
    return (f"a decode step's own kernels, outside its layers (one row, context {ends['context']}): "
            f"{ends['kernel_count']} kernels, {ends['total_s'] * 1e6:.1f} us")


def _step_cells(ends: dict) -> list[dict]:
    return [{"name": _short(k["name"]), "us": f"{k['seconds'] * 1e6:.1f}"} for k in ends["kernels"]]


def table(result: dict) -> str:
    """The measured rates, then per layer and stage its kernels, its kernel count and total time; then the
    decode step's own kernels."""
    lines = [_rates_line(result)]
    for layer in result["layers"]:
        lines.append("\n" + _layer_line(result, layer))
        lines.append(format_table([_cells(k) for k in layer["kernels"]], COLUMNS))
    if "step_ends" in result:
        lines += ["\n" + _step_line(result["step_ends"]), format_table(_step_cells(result["step_ends"]), STEP_COLUMNS)]
    lines.append(UNMAPPED)
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The section in report.md: the rates, then per layer and stage a line and its kernels, folded."""
    parts = [_rates_line(result) + "."]
    for layer in result["layers"]:
        parts += [f"<details><summary>{_layer_line(result, layer)}</summary>",
                  markdown_table([_cells(k) for k in layer["kernels"]], COLUMNS), "</details>"]
    if "step_ends" in result:
        ends = result["step_ends"]
        parts += [f"<details><summary>{_step_line(ends)}</summary>", markdown_table(_step_cells(ends), STEP_COLUMNS),
                  "</details>"]
    return "\n\n".join(parts + [UNMAPPED + "."])


def static_report(out) -> dict:
    """Without a GPU: what the compiled sm_90 code of the decode step's kernels says (bench/static.py), in a
    child process without TRITON_INTERPRET (the kernels compile there, they never run), printed and
    returned; ``{"error": ...}`` if it could not be made."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALLAVA_AUTOTUNE")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out) / "static.json" if out else Path(tmp) / "static.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "bench.static", str(path)], env=env, capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent.parent, timeout=1800)
        if done.returncode != 0 or not path.exists():
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"\nstatic report: not made ({error})")
            return {"error": error}
        print("\n" + done.stdout.rstrip())
        return json.loads(path.read_text())
