"""The host time of an eager decode step's launch path at LLaVA-1.5-7B shapes, on any machine (no GPU needed).

A captured decode step replays its kernels with no host work, but an eager one (``cuda_graphs=False``, or
the vLLM plug-in, which vLLM runs eagerly) pays the library's launch code on the host for every kernel:
5 a layer, 160 in a 7B step's layers. This runs the runtime's decode step of a three-layer decoder of the model's layer
sizes (layers 0 and 2 whole, layer 1 keeping every other head and neuron group) on CPU tensors with every Triton launch stubbed at ``JITFunction.run``, which returns at once (nothing is compiled
or run), and each launch taking its kernel's first config, as a GPU launch does once its config is known.
So what it times is the library's own host work per layer, up to Triton's launcher. Triton's launcher and
the driver add theirs on a GPU machine, not measured here. The first layer of a step is timed apart: it runs
slower than the others whatever its plan (the host's caches after the step's own work, measured with the
partial layer first too), and a step has one.

``--through-dispatcher`` launches the operators through ``torch.ops.adallava`` instead (how decode steps
called them before they took the eager launchers): the A/B of the dispatcher's cost.

    python -m bench.launch_host OUT.json [--model llava-7b] [--batches 1,16] [--steps 200]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

from adallava_kernels.runtime.decode import TRITON_KERNELS_OUTSIDE_LAYERS

STEPS = 200
BATCHES = (1, 16)
CONTEXT = 700
PAGE = 16
LAYERS = 3  # the first (whole), a partial one, a whole one


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Inside the block every Triton launch returns at once (its kernel's name recorded), with its kernel's
    first config, and the Triton backend is taken on CPU tensors."""
    from triton.runtime.jit import JITFunction

    from adallava_kernels.ops import common, tuning

    launched: list[str] = []
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    saved = [(cls, cls.run) for cls in classes]
    saved_config, saved_compile = tuning.Tuned.config_for, common.COMPILE_ONLY

    def run(kernel, *args, grid, warmup, **kwargs):
        launched.append(getattr(kernel, "__name__", type(kernel).__name__))

    for cls in classes:
        cls.run = run
    tuning.Tuned.config_for = lambda self, args, kwargs: self.configs[0]
    common.COMPILE_ONLY = True
    try:
        yield launched
    finally:
        for cls, original in saved:
            cls.run = original
        tuning.Tuned.config_for, common.COMPILE_ONLY = saved_config, saved_compile


@contextlib.contextmanager
def through_dispatcher(on: bool) -> Iterator[None]:
    """With ``on``, the decode step calls the registered operators (``torch.ops.adallava``)."""
    from adallava_kernels.ops.library import adallava_ops
    from adallava_kernels.runtime import decode, step

    saved = step._LAUNCH, decode._LAUNCH
    if on:
        step._LAUNCH = decode._LAUNCH = adallava_ops()
    try:
        yield
    finally:
        step._LAUNCH, decode._LAUNCH = saved


@contextlib.contextmanager
def layer_timer() -> Iterator[dict[int, list[float]]]:
    """Seconds of each ``SlotLayer.decode`` call, by layer index."""
    from adallava_kernels.runtime.step import SlotLayer

    times: dict[int, list[float]] = {}
    original = SlotLayer.decode

    def timed(layer, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(layer, *args, **kwargs)
        finally:
            times.setdefault(layer.index, []).append(time.perf_counter() - start)

    SlotLayer.decode = timed
    try:
        yield times
    finally:
        SlotLayer.decode = original


def measure(model_name: str = "llava-7b", batches: tuple[int, ...] = BATCHES, steps: int = STEPS,
            dispatcher: bool = False) -> dict:
    """Per batch: the median host microseconds of the first layer, a later whole and a later partial layer, the
    launches a layer and the host time of a step of the model's layers (the first, then half of the others
    whole and half partial), one torch thread."""
    from adallava_kernels import get_shape
    from adallava_kernels.runtime import PlannedDecoder

    from .static import _half_plan, _two_layer_model

    shape = get_shape(model_name)
    # The vocabulary only sizes lm_head (a stubbed launch here, as every Triton one): a small one keeps its
    # weight out of the way.
    model = _two_layer_model(dataclasses.replace(shape, vocab_size=256), torch.bfloat16, layers=LAYERS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with stubbed_launches() as launched, through_dispatcher(dispatcher), torch.no_grad():
            # Every row's K and V of every layer's heads, whole.
            pages = max(batches) * LAYERS * 2 * shape.num_kv_heads * -(-(CONTEXT + 8) // PAGE) + 8
            runner = PlannedDecoder.from_hf(model, num_pages=pages, page_size=PAGE, backend="triton",
                                            partial_layers=[1], cuda_graphs=False)
            plan = _half_plan(runner.shape, partial=(1,))
            for batch in batches:
                rows.append(_batch_row(runner, plan, batch, steps, launched, shape))
    finally:
        torch.set_num_threads(threads)
    return {"model": model_name, "path": "dispatcher" if dispatcher else "eager launchers", "steps": steps,
            "context": CONTEXT, "torch_threads": 1, "rows": rows}


def _batch_row(runner, plan, batch: int, steps: int, launched: list[str], shape) -> dict:
    names = [f"b{batch}-{i}" for i in range(batch)]
    for name in names:
        runner.admit(name, plan, CONTEXT + 4)
    try:
        runner.prefill(names, torch.zeros(batch, 1, shape.hidden_size, dtype=torch.bfloat16))
        decode = runner.decode(names)
        tokens = torch.zeros(batch, dtype=torch.long)
        decode.step(tokens)  # the first step resolves what later steps reuse
        with layer_timer() as times:
            start = len(launched)
            decode.step(tokens)
            per_step = len(launched) - start
            for _ in range(steps):
                decode.step(tokens)
        first, partial, whole = (statistics.median(times[i][1:]) for i in (0, 1, 2))
        decode.close()
    finally:
        for name in names:
            runner.free(name)
    later = shape.num_layers - 1
    launches = (per_step - TRITON_KERNELS_OUTSIDE_LAYERS) / LAYERS
    return {"batch": batch, "first_layer_us": first * 1e6, "whole_layer_us": whole * 1e6,
            "partial_layer_us": partial * 1e6, "launches_per_step": per_step, "launches_per_layer": launches,
            "per_launch_us": (whole + partial) / 2 / launches * 1e6,
            "step_layers_ms": (first + (later - later // 2) * whole + later // 2 * partial) * 1e3}


def table(result: dict) -> str:
    from ._common import format_table

    columns = [("batch", "batch", "s"), ("first", "first layer", "s"), ("whole", "whole layer", "s"),
               ("partial", "partial layer", "s"),
               ("launches", "Triton launches a layer", "s"), ("per", "per launch", "s"),
               ("step", f"{result['model']} step's layers", "s")]
    cells = [{"batch": str(r["batch"]), "first": f"{r['first_layer_us']:.1f} us",
              "whole": f"{r['whole_layer_us']:.1f} us",
              "partial": f"{r['partial_layer_us']:.1f} us", "launches": f"{r['launches_per_layer']:g}",
              "per": f"{r['per_launch_us']:.1f} us",
              "step": f"{r['step_layers_ms']:.2f} ms"} for r in result["rows"]]
    return (f"host time of an eager decode step's launch path ({result['path']}; launches stubbed, "
            f"median of {result['steps']} steps, one torch thread)\n" + format_table(cells, columns))


def main(argv: list[str] | None = None) -> int:
    from adallava_kernels.cli import ArgumentParser
    from adallava_kernels.shape import PRESETS

    from ._common import positive

    parser = ArgumentParser(prog="python -m bench.launch_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the results' JSON file")
    parser.add_argument("--model", default="llava-7b", choices=sorted(PRESETS), help="the layer sizes")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma-separated decode batch sizes (default 1,16)")
    parser.add_argument("--steps", type=positive(int), default=STEPS, help="timed steps a batch")
    parser.add_argument("--through-dispatcher", action="store_true",
                        help="call the operators through torch.ops.adallava (the dispatcher), for the A/B")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        parser.error(f"--batches must be comma-separated ints, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be ints >= 1, got {args.batches!r}")
    result = measure(args.model, batches, args.steps, args.through_dispatcher)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
