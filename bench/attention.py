"""Head-masked attention: measured time of each way to skip heads, against attention over all heads.

One decoder layer's attention (q/k/v projections, RoPE, causal attention,
o_proj), prefill over ``seq`` tokens and decode of one token over a context.

Providers:
- ``sdpa_all``: dense projections and ``F.scaled_dot_product_attention`` over
  every head (what a masked head costs when it is only zeroed: no saving; a
  reference point);
- ``sdpa_gathered``: gather the active heads' weights with ``index_select`` on
  every call, SDPA over the active heads (the reference AdaLLaVA inference; the
  library's torch backend, ``masked_attention(backend="torch")``);
- ``flash_attn``: as ``sdpa_gathered`` with ``flash_attn_func`` for the
  attention itself (only where ``flash_attn`` imports);
- ``triton``: the library's Triton kernels, the ``AttentionProgram`` that
  ``MaskedAttention`` and the runtime run: the weights read in place (q, k
  and v stacked, one projection launch), RoPE in the projection, flash
  attention over the active heads, column-gathered o_proj (CUDA only).

Decode steps read a cache of ``context`` positions holding only the active
KV heads (all heads for ``sdpa_all``); each timed step writes one position and
the cache is rewound before the next. FLOPs and bytes come from
``cost.masked_attention_cost`` (qk and sv count every score, as LLM-Viewer
does, so causal prefill runs at about half the TFLOP/s it reports).
On a CPU the heads and hidden size are divided by ``scale`` (head_dim stays).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from adallava_kernels import ContiguousKVCache, ModelShape, cost
from adallava_kernels.cost import Precision
from adallava_kernels.ops.layout import prepare_column_gather
from adallava_kernels.ops.masked_attention import (
    AttentionProgram,
    AttentionWeights,
    attention_indices,
    masked_attention_reference,
    run_masked_attention,
)
from adallava_kernels.plan import LayerPlan

from ._common import TIMING_COLUMNS, format_table, row_iqr, timing_cells
from .timing import OPS, TimingBudget, measure_op

HEAD_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # 7B: 32, 24, 16, 8 of 32 heads
GPU_PREFILL = {"seqs": (700, 2048, 8192), "batches": (1, 8)}
GPU_DECODE = {"contexts": (700, 4096), "batches": (1, 8)}
CPU_PREFILL = {"seqs": (64,), "batches": (1,)}
CPU_DECODE = {"contexts": (128,), "batches": (1,)}


def scaled(shape: ModelShape, scale: int) -> ModelShape:
    """Fewer heads (and hidden) by ``scale``; head_dim, and so the attention tile shapes, unchanged."""
    if shape.num_heads % scale or shape.num_kv_heads % scale:
        raise ValueError(f"scale {scale} must divide the head counts {shape.num_heads} and {shape.num_kv_heads}")
    return dataclasses.replace(
        shape, hidden_size=shape.hidden_size // scale, num_heads=shape.num_heads // scale,
        num_kv_heads=shape.num_kv_heads // scale,
    )


def providers(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The providers that run on ``device``, and why the others do not."""
    names = ["sdpa_all", "sdpa_gathered", "flash_attn", "triton"]
    skipped = {}
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        skipped["flash_attn"] = "flash_attn does not import here"
    if device.type != "cuda":
        skipped.setdefault("flash_attn", "flash_attn runs on CUDA only")
        skipped["triton"] = "Triton kernels are timed on CUDA only (the CPU interpreter is for correctness)"
    return [n for n in names if n not in skipped], skipped


def kept_heads(num_heads: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    count = max(1, round(fraction * num_heads))
    return torch.randperm(num_heads, generator=generator)[:count].sort().values.to(torch.int32)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    lo, hi = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-hi, lo), dim=-1) * sin


@dataclasses.dataclass
class Layer:
    """Random weights of one attention layer, in the layouts each provider reads."""

    shape: ModelShape
    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    w_o_columns: torch.Tensor  # column-major copy of w_o, as MaskedAttention holds it
    w_qkv: torch.Tensor  # w_q, w_k and w_v stacked, as MaskedAttention holds them

    @classmethod
    def random(cls, shape: ModelShape, device, dtype, generator) -> "Layer":
        hidden, q_out, kv_out = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim

        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=generator) * cols**-0.5).to(device, dtype)

        w_q, w_k, w_v = weight(q_out, hidden), weight(kv_out, hidden), weight(kv_out, hidden)
        w_o = weight(hidden, q_out)
        return cls(shape, w_q, w_k, w_v, w_o, prepare_column_gather(w_o), torch.cat([w_q, w_k, w_v]))


def dense_attention(layer: Layer, x, cos, sin, cache: ContiguousKVCache | None):
    """All heads, dense projections, SDPA: the layer as transformers runs it."""
    s = layer.shape
    batch, seq, _ = x.shape

    def heads(w, n):
        return F.linear(x, w).view(batch, seq, n, s.head_dim).transpose(1, 2)

    q, k, v = heads(layer.w_q, s.num_heads), heads(layer.w_k, s.num_kv_heads), heads(layer.w_v, s.num_kv_heads)
    q, k = _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None])
    if cache is not None:
        k, v = cache.update(k, v)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None, enable_gqa=s.num_heads != s.num_kv_heads)
    return F.linear(out.transpose(1, 2).reshape(batch, seq, -1), layer.w_o)


def flash_attn_gathered(layer: Layer, idx: LayerPlan, x, cos, sin, cache: ContiguousKVCache | None):
    """Gathered heads as ``sdpa_gathered``, with ``flash_attn_func`` for the attention."""
    from flash_attn import flash_attn_func

    batch, seq, _ = x.shape
    d = layer.shape.head_dim

    def heads(w, features):
        return F.linear(x, w.index_select(0, features.long())).view(batch, seq, -1, d)

    q, k, v = heads(layer.w_q, idx.q_features), heads(layer.w_k, idx.kv_features), heads(layer.w_v, idx.kv_features)
    q, k = _rope(q, cos[:, :, None], sin[:, :, None]), _rope(k, cos[:, :, None], sin[:, :, None])
    if cache is not None:
        k, v = (t.transpose(1, 2) for t in cache.update(k.transpose(1, 2), v.transpose(1, 2)))
    to_kv = idx.head_to_kv.long()
    # flash_attn's causal mask is aligned to the bottom right, so one decode query sees the whole context.
    out = flash_attn_func(q, k.index_select(2, to_kv), v.index_select(2, to_kv), causal=True)
    return F.linear(out.reshape(batch, seq, -1), layer.w_o.index_select(1, idx.q_features.long()))


def _calls(layer: Layer, idx: LayerPlan, x, cos, sin, caches: dict) -> dict[str, Callable[[], object]]:
    d = layer.shape.head_dim

    s = layer.shape
    # Plan time, once: the program MaskedAttention holds for this plan.
    program = AttentionProgram(AttentionWeights(layer.w_qkv, layer.w_o, layer.w_o_columns, s.num_heads,
                                                s.num_kv_heads, d), idx, "triton")
    return {
        "sdpa_all": lambda: dense_attention(layer, x, cos, sin, caches.get("all")),
        "sdpa_gathered": lambda: masked_attention_reference(
            x, layer.w_q, layer.w_k, layer.w_v, layer.w_o, idx, cos, sin, None, caches.get("active"), d),
        "flash_attn": lambda: flash_attn_gathered(layer, idx, x, cos, sin, caches.get("active")),
        "triton": lambda: run_masked_attention(x, program, cos, sin, kv_cache=caches.get("active")),
    }


def _rewinding(fn: Callable[[], object], caches: dict, context: int) -> Callable[[], object]:
    """Each call decodes the same step: the cache is rewound to ``context`` positions first."""
    def step():
        for cache in caches.values():
            cache.truncate(context)
        return fn()
    return step


def _filled_cache(batch, kv_heads, context, d, device, dtype, generator) -> ContiguousKVCache:
    cache = ContiguousKVCache(batch, kv_heads, d, context + 1, dtype=dtype, device=device)
    fill = torch.randn(batch, kv_heads, context, d, generator=generator).to(device, dtype)
    cache.update(fill, fill)
    return cache


def run_case(
    model: str, shape: ModelShape, stage: str, batch: int, q_len: int, kv_len: int,
    device: torch.device, dtype: torch.dtype, names: list[str],
    fractions=HEAD_FRACTIONS, budget: TimingBudget = OPS, seed: int = 0,
) -> list[dict]:
    """Rows for one (stage, batch, length): every provider at every head fraction."""
    generator = torch.Generator().manual_seed(seed)
    layer = Layer.random(shape, device, dtype, generator)
    d = shape.head_dim
    x = torch.randn(batch, q_len, shape.hidden_size, generator=generator).to(device, dtype)
    angles = torch.rand(batch, q_len, d // 2, generator=generator) * 6.28
    angles = torch.cat((angles, angles), dim=-1).to(device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    precision = Precision(*(torch.finfo(dtype).bits / 8,) * 3)

    def attention_cost(heads: int, kv_heads: int):
        return cost.masked_attention_cost(shape, heads=heads, kv_heads=kv_heads, q_tokens=q_len, kv_tokens=kv_len,
                                          batch_size=batch, precision=precision)

    full = attention_cost(shape.num_heads, shape.num_kv_heads)
    rows, all_heads_s = [], {}
    for fraction in fractions:
        active = kept_heads(shape.num_heads, fraction, generator).to(device)
        idx = attention_indices(active, shape.num_heads, shape.num_kv_heads, d)
        nq, nkv = idx.heads.numel(), idx.kv_heads.numel()
        executed = attention_cost(nq, nkv)
        caches = {}
        if stage == "decode":
            caches = {"active": _filled_cache(batch, nkv, kv_len - 1, d, device, dtype, generator)}
            if "sdpa_all" in names:
                caches["all"] = _filled_cache(batch, shape.num_kv_heads, kv_len - 1, d, device, dtype, generator)
        calls = _calls(layer, idx, x, cos, sin, caches)
        for name in names:
            if name == "sdpa_all" and fraction != 1.0:
                continue  # the dense baseline does not depend on the heads kept
            fn = _rewinding(calls[name], caches, kv_len - 1) if caches else calls[name]
            timing = measure_op(fn, device, budget)
            seconds = timing.median_s
            if fraction == 1.0:
                all_heads_s[name] = seconds
            done = full if name == "sdpa_all" else executed
            rows.append({
                "model": model, "stage": stage, "batch": batch, "q_len": q_len, "kv_len": kv_len,
                "provider": name, "heads": shape.num_heads if name == "sdpa_all" else nq,
                "kv_heads": shape.num_kv_heads if name == "sdpa_all" else nkv,
                "flops": done.flops, **timing.fields(),
                "tflops": done.flops / seconds / 1e12, "gbps": done.bytes / seconds / 1e9,
                "kv_bytes": done.kv_load_bytes,
                "time_ratio": seconds / all_heads_s[name],
                "vs_sdpa_all": seconds / all_heads_s["sdpa_all"],
                "flops_ratio": executed.flops / full.flops,
            })
    return rows


def run(models: dict[str, ModelShape], device, dtype, names, prefill: dict, decode: dict,
        budget: TimingBudget = OPS) -> list[dict]:
    rows = []
    for model, shape in models.items():
        for batch in prefill["batches"]:
            for seq in prefill["seqs"]:
                rows += run_case(model, shape, "prefill", batch, seq, seq, device, dtype, names, budget=budget)
        for batch in decode["batches"]:
            for context in decode["contexts"]:
                rows += run_case(model, shape, "decode", batch, 1, context + 1, device, dtype, names, budget=budget)
    return rows


COLUMNS = [
    ("model", "model", "s"),
    ("stage", "stage", "s"),
    ("batch", "batch", "d"),
    ("q_len", "q", "d"),
    ("kv_len", "kv", "d"),
    ("provider", "provider", "s"),
    ("heads", "heads", "d"),
    *TIMING_COLUMNS,
    ("tflops", "TFLOP/s", ".3f"),
    ("gbps", "GB/s", ".1f"),
    ("time_ratio", "time / all heads", ".3f"),
    ("vs_sdpa_all", "time / sdpa_all", ".3f"),
    ("flops_ratio", "FLOPs ratio", ".3f"),
]


def table(rows: list[dict]) -> str:
    return format_table([r | timing_cells(r) for r in rows], COLUMNS)


def report_rows(rows: list[dict]) -> list[dict]:
    """The head-masked providers' rows in the validation report's form, one op per case."""
    return [
        {"op": f"attention {r['model']} {r['stage']} b{r['batch']} q{r['q_len']} kv{r['kv_len']}",
         "series": r["provider"], "label": f"{r['heads']} heads", "flops": r["flops"], "seconds": r["median_s"],
         "iqr_seconds": row_iqr(r), "gpu_seconds": r["gpu_s"], "unstable": r["unstable"]}
        for r in rows if r["provider"] != "sdpa_all"
    ]
