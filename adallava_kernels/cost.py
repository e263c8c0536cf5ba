"""FLOPs, bytes and roofline time of a Llama-family decoder under an ExecutionPlan.

FLOPs are counted as LLM-Viewer (hahnyuan/LLM-Viewer, ``model_analyzer.py``)
counts them: one multiply-add is 2 FLOPs; a linear layer costs
``2 * tokens * in * out``; ``qk`` and ``sv`` cost ``2 * q_tokens * kv_tokens *
head_dim`` per head (no causal halving); softmax 5 per score; RMSNorm 7 per
element; a residual add 1 per element; SwiGLU's activation 2 per neuron (SiLU
and the multiply); ``lm_head`` once per sequence, for the last position.
Two deliberate departures: the activation is counted over the MLP neurons
(LLM-Viewer counts it over ``hidden_size``, which would not shrink with a
neuron mask), and ``lm_head`` at 2 FLOPs per multiply-add like every other
linear layer. Embedding lookups and the final norm are not counted.

Bytes are what each op must move when nothing is fused: its weights once per
call, the activations it reads and writes, the KV it reads and stores, at the
widths of a :class:`Precision`.

Under a plan, inactive heads scale q/k/v/o and the attention terms, inactive
neurons scale gate/up/down and the activation, a sub-block (attention or MLP)
with no active unit costs nothing (its norm and residual add included), and a
skipped layer costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch

from .checks import check_int
from .devices import DeviceSpec, get_device
from .plan import ExecutionPlan, check_execution_plan
from .shape import ModelShape, check_model_shape

__all__ = [
    "OP_NAMES",
    "OpCost",
    "Precision",
    "CostBreakdown",
    "Roofline",
    "layer_ops",
    "masked_attention_cost",
    "masked_mlp_cost",
    "prefill_cost",
    "decode_cost",
    "batch_decode_cost",
    "prefill_flops",
    "decode_flops",
    "kv_cache_bytes",
    "roofline",
    "format_flops",
]

ATTENTION_OPS = ("attn_norm", "q_proj", "k_proj", "v_proj", "qk_matmul", "softmax", "sv_matmul", "o_proj", "attn_add")
MLP_OPS = ("mlp_norm", "gate_proj", "up_proj", "mlp_act", "down_proj", "mlp_add")
# What ``adallava_kernels.masked_mlp`` and ``masked_attention`` compute: the
# sub-block without its norm and residual add.
MASKED_MLP_OPS = ("gate_proj", "up_proj", "mlp_act", "down_proj")
MASKED_ATTENTION_OPS = ("q_proj", "k_proj", "v_proj", "qk_matmul", "softmax", "sv_matmul", "o_proj")
OP_NAMES = ATTENTION_OPS + MLP_OPS + ("lm_head",)

_NORM_FLOPS_PER_ELEMENT = 7  # square, sum, mean, rsqrt-add, scale, weight multiply as LLM-Viewer counts
_SOFTMAX_FLOPS_PER_SCORE = 5  # max, subtract, exp, sum, divide
_ACT_FLOPS_PER_NEURON = 2  # SiLU and the gate-times-up multiply


@dataclass(frozen=True)
class Precision:
    """Bytes per element of weights, activations and KV cache (default: bf16 throughout)."""

    weight: float = 2
    act: float = 2
    kv: float = 2


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one op (summed over whatever it aggregates)."""

    name: str
    flops: float = 0.0
    weight_bytes: float = 0.0
    act_load_bytes: float = 0.0
    act_store_bytes: float = 0.0
    kv_load_bytes: float = 0.0
    kv_store_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        return (
            self.weight_bytes + self.act_load_bytes + self.act_store_bytes
            + self.kv_load_bytes + self.kv_store_bytes
        )

    def __add__(self, other: "OpCost") -> "OpCost":
        if other.name != self.name:
            raise ValueError(f"cannot add cost of {other.name!r} to {self.name!r}")
        numbers = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "name"}
        return OpCost(self.name, **numbers)


def _linear(name: str, tokens: int, n_in: int, n_out: int, p: Precision, *, to_kv: bool = False) -> OpCost:
    if n_in == 0 or n_out == 0:
        return OpCost(name)
    out_bytes = tokens * n_out
    return OpCost(
        name,
        flops=2.0 * tokens * n_in * n_out,
        weight_bytes=n_in * n_out * p.weight,
        act_load_bytes=tokens * n_in * p.act,
        act_store_bytes=0.0 if to_kv else out_bytes * p.act,
        kv_store_bytes=out_bytes * p.kv if to_kv else 0.0,
    )


def _elementwise(name: str, elements: int, flops_per_element: int, loads: int, p: Precision) -> OpCost:
    return OpCost(
        name,
        flops=float(flops_per_element * elements),
        act_load_bytes=loads * elements * p.act,
        act_store_bytes=elements * p.act,
    )


def layer_ops(
    shape: ModelShape,
    *,
    heads: int,
    kv_heads: int,
    neurons: int,
    q_tokens: int,
    kv_tokens: int,
    batch_size: int = 1,
    precision: Precision = Precision(),
) -> tuple[OpCost, ...]:
    """Cost of each op of one decoder layer, in :data:`OP_NAMES` order (without ``lm_head``).

    ``q_tokens`` new tokens per sequence attend to ``kv_tokens`` positions
    (prefill: both the prompt length; decode: 1 and the context length).
    """
    p = precision
    t = batch_size * q_tokens
    hd, hidden = shape.head_dim, shape.hidden_size
    scores = batch_size * q_tokens * kv_tokens * heads
    attention_on = heads > 0
    mlp_on = neurons > 0
    hidden_elems = t * hidden
    attention = (
        _elementwise("attn_norm", hidden_elems * attention_on, _NORM_FLOPS_PER_ELEMENT, 1, p),
        _linear("q_proj", t, hidden, heads * hd, p),
        _linear("k_proj", t, hidden, kv_heads * hd, p, to_kv=True),
        _linear("v_proj", t, hidden, kv_heads * hd, p, to_kv=True),
        OpCost(
            "qk_matmul",
            flops=2.0 * scores * hd,
            act_load_bytes=t * heads * hd * p.act,
            act_store_bytes=scores * p.act,
            kv_load_bytes=batch_size * kv_tokens * kv_heads * hd * p.kv,
        ),
        _elementwise("softmax", scores, _SOFTMAX_FLOPS_PER_SCORE, 1, p),
        OpCost(
            "sv_matmul",
            flops=2.0 * scores * hd,
            act_load_bytes=scores * p.act,
            act_store_bytes=t * heads * hd * p.act,
            kv_load_bytes=batch_size * kv_tokens * kv_heads * hd * p.kv,
        ),
        _linear("o_proj", t, heads * hd, hidden, p),
        _elementwise("attn_add", hidden_elems * attention_on, 1, 2, p),
    )
    mlp = (
        _elementwise("mlp_norm", hidden_elems * mlp_on, _NORM_FLOPS_PER_ELEMENT, 1, p),
        _linear("gate_proj", t, hidden, neurons, p),
        _linear("up_proj", t, hidden, neurons, p),
        _elementwise("mlp_act", t * neurons, _ACT_FLOPS_PER_NEURON, 2, p),
        _linear("down_proj", t, neurons, hidden, p),
        _elementwise("mlp_add", hidden_elems * mlp_on, 1, 2, p),
    )
    return attention + mlp


def _sum_ops(name: str, ops: Iterable[OpCost], names: Sequence[str]) -> OpCost:
    total = OpCost(name)
    for op in ops:
        if op.name in names:
            total = total + OpCost(name, **{f.name: getattr(op, f.name) for f in fields(op) if f.name != "name"})
    return total


def masked_mlp_cost(
    shape: ModelShape, num_tokens: int, neurons: int, precision: Precision = Precision()
) -> OpCost:
    """FLOPs and bytes of one ``masked_mlp`` call over ``num_tokens`` tokens and ``neurons`` active neurons."""
    check_int("num_tokens", num_tokens)
    check_int("neurons", neurons, minimum=0)
    ops = layer_ops(
        shape, heads=0, kv_heads=0, neurons=neurons, q_tokens=num_tokens, kv_tokens=0, precision=precision
    )
    return _sum_ops("masked_mlp", ops, MASKED_MLP_OPS)


def masked_attention_cost(
    shape: ModelShape,
    *,
    heads: int,
    kv_heads: int,
    q_tokens: int,
    kv_tokens: int,
    batch_size: int = 1,
    precision: Precision = Precision(),
) -> OpCost:
    """FLOPs and bytes of one ``masked_attention`` call: ``q_tokens`` new tokens per sequence over
    ``kv_tokens`` positions (prefill: equal; decode: 1 and the context), ``heads`` active query heads
    reading ``kv_heads`` KV heads. As LLM-Viewer, ``qk``/``sv`` count every score (no causal halving)."""
    check_int("q_tokens", q_tokens)
    check_int("kv_tokens", kv_tokens)
    check_int("batch_size", batch_size)
    check_int("heads", heads, minimum=0)
    check_int("kv_heads", kv_heads, minimum=0)
    if heads > shape.num_heads or kv_heads > shape.num_kv_heads or (heads > 0) != (kv_heads > 0):
        raise ValueError(
            f"heads ({heads}) and kv_heads ({kv_heads}) must be at most {shape.num_heads} and "
            f"{shape.num_kv_heads}, and both zero or both positive"
        )
    ops = layer_ops(
        shape, heads=heads, kv_heads=kv_heads, neurons=0, q_tokens=q_tokens, kv_tokens=kv_tokens,
        batch_size=batch_size, precision=precision,
    )
    return _sum_ops("masked_attention", ops, MASKED_ATTENTION_OPS)


@dataclass(frozen=True)
class CostBreakdown:
    """Per-layer op costs of one forward (prefill or one decode step) plus ``lm_head``."""

    stage: str
    layers: tuple[tuple[OpCost, ...], ...]
    lm_head: OpCost

    def ops(self) -> Iterable[OpCost]:
        for layer in self.layers:
            yield from layer
        yield self.lm_head

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops())

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops())

    def by_op(self) -> dict[str, OpCost]:
        """Each op summed over the layers, in :data:`OP_NAMES` order."""
        totals = {name: OpCost(name) for name in OP_NAMES}
        for op in self.ops():
            totals[op.name] = totals[op.name] + op
        return totals

    def layer_flops(self) -> list[float]:
        return [sum(op.flops for op in layer) for layer in self.layers]


def _active_counts(shape: ModelShape, plan: ExecutionPlan | None) -> Sequence[tuple[int, int, int]]:
    """Per layer: (active heads, KV heads needed, active neurons)."""
    check_model_shape("shape", shape)
    if check_execution_plan("plan", plan, optional=True) is None:
        return [(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)] * shape.num_layers
    plan.check_shape(shape)
    heads, neurons = plan.unit_counts()
    return [(heads[i], len(plan.kv_heads(i)), neurons[i]) for i in range(shape.num_layers)]


def _breakdown(
    stage: str, shape: ModelShape, q_tokens: int, kv_tokens: int,
    plan: ExecutionPlan | None, batch_size: int, precision: Precision,
) -> CostBreakdown:
    layers = tuple(
        layer_ops(
            shape, heads=h, kv_heads=kv, neurons=n, q_tokens=q_tokens, kv_tokens=kv_tokens,
            batch_size=batch_size, precision=precision,
        )
        for h, kv, n in _active_counts(shape, plan)
    )
    # Only the last position's logits are needed, in prefill and decode alike.
    lm_head = _linear("lm_head", batch_size, shape.hidden_size, shape.vocab_size, precision)
    return CostBreakdown(stage, layers, lm_head)


def prefill_cost(
    shape: ModelShape, num_tokens: int, plan: ExecutionPlan | None = None,
    batch_size: int = 1, precision: Precision = Precision(),
) -> CostBreakdown:
    """Per-op cost of a prefill over ``num_tokens`` tokens per sequence."""
    check_int("num_tokens", num_tokens)
    check_int("batch_size", batch_size)
    return _breakdown("prefill", shape, num_tokens, num_tokens, plan, batch_size, precision)


def decode_cost(
    shape: ModelShape, context_len: int, plan: ExecutionPlan | None = None,
    batch_size: int = 1, precision: Precision = Precision(),
) -> CostBreakdown:
    """Per-op cost of one decode step whose token attends to ``context_len`` positions (itself included)."""
    check_int("context_len", context_len)
    check_int("batch_size", batch_size)
    return _breakdown("decode", shape, 1, context_len, plan, batch_size, precision)


def batch_decode_cost(
    shape: ModelShape, context_len: int, plans: Sequence[ExecutionPlan | None], precision: Precision = Precision(),
    *, union: bool = False, every_head_attends: bool = False,
) -> CostBreakdown:
    """Per-op cost of one decode step of a batch whose row ``b`` runs ``plans[b]`` (``None``: the full plan),
    each row attending ``context_len`` positions, as the plan runtime runs it.

    Eager steps (``union=False``): at each layer the rows whose plans keep the same heads and neurons
    there form a cohort, which reads that layer's weights once for all its rows; rows that differ read
    their own. So the FLOPs are the rows' own, summed, while the weight bytes are paid once per distinct
    layer plan in the batch: a batch of equal plans costs :func:`decode_cost` with ``batch_size``, a
    batch of plans that share no layer costs the sum of one-row steps (only ``lm_head`` is read once).

    The runtime's steps (``union=True``, ``runtime.step``): each layer projects and runs the MLP over the
    union of the rows' units for every row, so its weights are read once and every row pays the union's
    FLOPs there; the attention itself (scores, softmax, the weighted sum, and the KV they read) is each
    row's own heads only, as the paged attention skips a (row, head) the row's plan lacks.

    ``every_head_attends`` (with ``union``): the attention itself runs every head for every row of a layer
    whose union keeps any head, as in vLLM (``adallava_kernels.vllm``), whose KV cache and attention are
    laid out for all heads; the projections, ``o_proj`` and the MLP stay the union's.
    """
    check_int("context_len", context_len)
    check_model_shape("shape", shape)
    if isinstance(plans, (str, bytes, ExecutionPlan)) or not isinstance(plans, Sequence):
        raise TypeError(f"plans must be a sequence of one ExecutionPlan (or None) per row, got {type(plans).__name__}")
    if not plans:
        raise ValueError("plans must hold one plan (or None) per row, got none")
    full = ExecutionPlan.full(shape)
    plans = [full if check_execution_plan(f"plans[{b}]", plan, optional=True) is None else plan
             for b, plan in enumerate(plans)]
    if every_head_attends and not union:
        raise ValueError("every_head_attends describes a step over the union: pass union=True with it")
    if union:
        return _union_decode_cost(shape, context_len, plans, precision, every_head_attends)
    counts = [_active_counts(shape, plan) for plan in plans]
    layers = []
    for i in range(shape.num_layers):
        cohorts: dict[tuple, list] = {}  # the layer's (heads, neurons) -> [rows, its active counts]
        for plan, row_counts in zip(plans, counts):
            cohorts.setdefault((plan.heads[i], plan.neurons[i]), [0, row_counts[i]])[0] += 1
        total = None
        for rows, (heads, kv_heads, neurons) in cohorts.values():
            ops = layer_ops(shape, heads=heads, kv_heads=kv_heads, neurons=neurons, q_tokens=1,
                            kv_tokens=context_len, batch_size=rows, precision=precision)
            total = ops if total is None else tuple(a + b for a, b in zip(total, ops))
        layers.append(total)
    lm_head = _linear("lm_head", len(plans), shape.hidden_size, shape.vocab_size, precision)
    return CostBreakdown("decode", tuple(layers), lm_head)


# The ops of a layer's attention that each row runs over its own heads only, in a step over the union.
_OWN_HEADS_OPS = ("qk_matmul", "softmax", "sv_matmul")


def _union_decode_cost(shape, context_len, plans, precision, every_head_attends: bool = False) -> CostBreakdown:
    per_kv = shape.heads_per_kv_head
    counts = [_active_counts(shape, plan) for plan in plans]
    layers = []
    for i in range(shape.num_layers):
        heads = set().union(*(plan.heads[i] for plan in plans))
        neurons = set().union(*(plan.neurons[i] for plan in plans))
        ops = layer_ops(shape, heads=len(heads), kv_heads=len({h // per_kv for h in heads}), neurons=len(neurons),
                        q_tokens=1, kv_tokens=context_len, batch_size=len(plans), precision=precision)
        attending = [(shape.num_heads, shape.num_kv_heads) if every_head_attends and heads else row[i][:2]
                     for row in counts]
        own = [layer_ops(shape, heads=h, kv_heads=kv, neurons=0, q_tokens=1, kv_tokens=context_len,
                         precision=precision) for h, kv in attending]
        layers.append(tuple(_sum_ops(op.name, (row[k] for row in own), (op.name,)) if op.name in _OWN_HEADS_OPS
                            else op for k, op in enumerate(ops)))
    lm_head = _linear("lm_head", len(plans), shape.hidden_size, shape.vocab_size, precision)
    return CostBreakdown("decode", tuple(layers), lm_head)


def prefill_flops(shape: ModelShape, num_tokens: int, plan: ExecutionPlan | None = None, batch_size: int = 1) -> float:
    """FLOPs of a prefill over ``num_tokens`` tokens per sequence."""
    return prefill_cost(shape, num_tokens, plan, batch_size).flops


def decode_flops(shape: ModelShape, context_len: int, plan: ExecutionPlan | None = None, batch_size: int = 1) -> float:
    """FLOPs of one decode step at ``context_len`` positions (the new token included)."""
    return decode_cost(shape, context_len, plan, batch_size).flops


def kv_cache_bytes(
    shape: ModelShape, num_tokens: int, plan: ExecutionPlan | None = None,
    batch_size: int = 1, kv_bytes: float | None = None, page_size: int = 1, *, dtype: torch.dtype | None = None,
) -> int:
    """Bytes of K and V for ``num_tokens`` positions of ``batch_size`` sequences.

    Only the layers and KV heads the plan keeps store anything; with
    ``page_size`` > 1 each (layer, KV head) slice is rounded up to whole pages.
    Each element takes ``dtype``'s size (default ``torch.bfloat16``, the
    default of :class:`~adallava_kernels.LayerSkipKVCache`: pass the pool's
    dtype to match its ``bytes_in_use``), or ``kv_bytes`` bytes; not both.
    """
    check_int("num_tokens", num_tokens, minimum=0)
    check_int("batch_size", batch_size)
    check_int("page_size", page_size)
    element = _element_bytes(kv_bytes, dtype)
    stored_tokens = math.ceil(num_tokens / page_size) * page_size
    kv_slices = sum(kv for _, kv, _ in _active_counts(shape, plan))
    return int(2 * kv_slices * stored_tokens * shape.head_dim * element * batch_size)


def _element_bytes(kv_bytes: float | None, dtype: torch.dtype | None) -> float:
    if kv_bytes is not None and dtype is not None:
        raise ValueError(f"pass kv_bytes or dtype, not both (got kv_bytes={kv_bytes!r}, dtype={dtype})")
    if kv_bytes is not None:
        if isinstance(kv_bytes, bool) or not isinstance(kv_bytes, (int, float)) or not kv_bytes > 0:
            raise ValueError(f"kv_bytes must be a positive number, got {kv_bytes!r}")
        return kv_bytes
    dtype = torch.bfloat16 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return dtype.itemsize


@dataclass(frozen=True)
class Roofline:
    """Roofline time of each op (seconds, summed over layers) on one device."""

    device: DeviceSpec
    seconds: dict[str, float]
    compute_bound: dict[str, bool]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def roofline(breakdown: CostBreakdown, device: DeviceSpec | str) -> Roofline:
    """Predict time as ``max(flops / peak, bytes / bandwidth)`` per op and layer, summed.

    Each op is bound separately in each layer, so a plan that makes one layer's
    op memory-bound is priced as such.
    """
    if not isinstance(breakdown, CostBreakdown):
        raise TypeError(f"breakdown must be a CostBreakdown (prefill_cost, decode_cost), got "
                        f"{type(breakdown).__name__}")
    spec = get_device(device) if isinstance(device, str) else device
    if not isinstance(spec, DeviceSpec):
        raise TypeError(f"device must be a DeviceSpec or a device name, got {type(device).__name__}")
    seconds = {name: 0.0 for name in OP_NAMES}
    compute_time = {name: 0.0 for name in OP_NAMES}
    for op in breakdown.ops():
        t_compute = op.flops / spec.peak_flops
        seconds[op.name] += max(t_compute, op.bytes / spec.bandwidth)
        compute_time[op.name] += t_compute
    bound = {name: seconds[name] > 0 and compute_time[name] >= seconds[name] for name in OP_NAMES}
    return Roofline(spec, seconds, bound)


_SI_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_flops(flops: float) -> str:
    """``flops`` in the largest unit it reaches, four significant digits: ``9.33 TFLOP``, ``215.2 MFLOP``
    (a fixed unit would print a tiny model's cost as ``0.0000 TFLOP``)."""
    if isinstance(flops, bool) or not isinstance(flops, (int, float)):
        raise TypeError(f"flops must be a number, got {type(flops).__name__}")
    for scale, prefix in _SI_PREFIXES:
        if abs(flops) >= scale:
            return f"{flops / scale:.4g} {prefix}FLOP"
    return f"{flops:.4g} FLOP"
