"""The Triton kernels as ``torch.ops.adallava.*`` operators (``torch.library.custom_op``).

Registered like the extension's C++ ops, each with a fake (shape-only)
implementation, so that ``torch.compile`` traces a step that calls them and
a CUDA graph captures them like any other op. They are functional (each
returns a new tensor) and check nothing: the runtime and the ops that call
them validated their inputs at plan time. (``paged_decode_attention`` checks
its head map's dims, dtype and shape, metadata only: two forms share it.)

- ``head_projection(x, w, heads, cos, sin, head_dim, rope_slots)``: ``[batch, seq, len(heads),
  head_dim]``, its first ``rope_slots`` heads rotated when ``cos``/``sin`` are given;
- ``head_projection_paged(x, w, heads, cos, sin, head_dim, rope_slots, k_pages, v_pages, tables,
  positions, norm_weight=None, eps=0.0)``: the same with its last ``2 * tables.shape[1]`` slots (K, then
  V) written to the pages at each row's positions (the KV append, fused); returns the other slots (q);
  with ``norm_weight``, ``x`` goes through RMSNorm first, in the same launch;
- ``flash_attention(q, k, v, head_to_kv, padding, scale)``: causal attention,
  ``q`` ``[batch, q_len, heads, d]``, ``k``/``v`` ``[batch, kv_heads, kv_len, d]``;
- ``paged_decode_attention(q, pages, block_tables, head_to_kv, lengths, starts, scale, split)``:
  ``head_to_kv`` ``[heads]`` (one map for every row) or ``[batch, heads]`` (each row's own);
- ``row_gathered_linear(x, w, rows, residual=None, norm_weight=None, eps=0.0)``,
  ``swiglu_gathered(x, w_gate, w_up, rows, norm_weight=None, eps=0.0)`` (with ``norm_weight``, RMSNorm of
  ``x`` first, in the same launch),
  ``col_gathered_linear(x, w, cols, count=None, x_mask=None, residual=None)``;
- ``swiglu_mlp_phased(h, w_gate, w_up, rows, norm_weight, eps, w_down, count, x_mask, dense=False,
  dense_weight=None)``: a decode layer's MLP with its norm and residual, gate|up and down as two phases of
  one launch (:mod:`.phased_mlp`; the decode step's with ``ADALLAVA_PHASED_MLP=1``);
- ``paged_attention_o_proj_phased(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols,
  count, residual, dense=False, dense_weight=None)``: a decode layer's paged attention, then ``o_proj`` with
  the residual, as two phases of one launch (:mod:`.phased_attention`; the decode step's with
  ``ADALLAVA_PHASED_ATTENTION=1``);
- ``attention_block_phased(h, w_qkv, heads, cos, sin, norm_weight, eps, pages, block_tables, positions, head_to_kv,
  lengths, starts, scale, split, w_o, cols, count, dense=False, dense_weight=None)``: a decode layer's whole
  attention block (q, k and v of the normed ``h`` with RoPE, K and V appended to ``pages``, the paged attention,
  ``o_proj`` with ``h`` as the residual) as three phases of one launch (:mod:`.phased_attention`; the decode
  step's with ``ADALLAVA_PHASED_ATTENTION=qkv``);
- index lists may be padded to a fixed capacity (a plan bound as data): ``heads``, ``rows`` and
  ``head_to_kv`` with -1 (those slots are skipped: the projections leave their outputs unwritten, the
  paged attention gives 0), ``cols`` with a ``count`` read on the device;
- ``step_inputs(lengths, starts, cos_table, sin_table)`` -> ``(cos, sin, lengths + 1)``: a decode step's
  rotary rows at each row's position, read from tables; ``greedy_(logits, live, logits_out, next_tokens,
  tokens, lengths)``: each row's argmax to ``next_tokens`` and ``tokens``, the logits copied to
  ``logits_out``, ``lengths += live``, in place (:mod:`.decode_io`);
- ``rms_norm(x, weight, eps)`` and ``fused_add_rms_norm(x, residual, weight, eps)`` ->
  ``(normed, x + residual)``: transformers' ``LlamaRMSNorm``, the second fused with the residual add;
- ``silu_and_mul(gate_up)``: ``silu(gate) * up`` of a stacked gate|up projection;
- ``rope_(x, cos, sin, heads)``: rotary embedding of the first ``heads`` heads of ``x``, in place.

Importing this module registers them all; it compiles nothing. :func:`eager_launchers` calls the same
functions without the dispatcher in eager mode.

The elementwise ops (``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul``, ``rope_``) are registered by
the modules that implement them, which this one imports; they import only :mod:`.registry`, so no module
imports this one back. The gathered and attention kernels are registered here: their modules import
Triton, and registering needs none, so the operators exist (and the torch paths that name them run) on a
machine without it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import rms_norm, rope, silu_and_mul  # noqa: F401  (each registers its operators)
from .registry import eager_launchers, register_op

__all__ = ["adallava_ops", "eager_launchers"]


@register_op("head_projection", mutates_args=())
def head_projection(
    x: torch.Tensor, w: torch.Tensor, heads: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    head_dim: int, rope_slots: int,
) -> torch.Tensor:
    from .head_projection import head_projection as launch

    out = x.new_empty(x.shape[0], x.shape[1], heads.shape[0], head_dim)
    return launch(x, w, heads, head_dim, cos, sin, out, rope_slots=rope_slots)


@head_projection.register_fake
def _(x, w, heads, cos, sin, head_dim, rope_slots):
    return x.new_empty(x.shape[0], x.shape[1], heads.shape[0], head_dim)


@register_op("head_projection_paged", mutates_args=("k_pages", "v_pages"))
def head_projection_paged(
    x: torch.Tensor, w: torch.Tensor, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
    rope_slots: int, k_pages: torch.Tensor, v_pages: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
) -> torch.Tensor:
    from .head_projection import PagedKV, head_projection as launch

    out = x.new_empty(x.shape[0], x.shape[1], heads.shape[0] - 2 * tables.shape[1], head_dim)
    return launch(x, w, heads, head_dim, cos, sin, out, rope_slots=rope_slots,
                  paged=PagedKV(k_pages, v_pages, tables, positions), norm_weight=norm_weight, eps=eps)


@head_projection_paged.register_fake
def _(x, w, heads, cos, sin, head_dim, rope_slots, k_pages, v_pages, tables, positions, norm_weight=None, eps=0.0):
    return x.new_empty(x.shape[0], x.shape[1], heads.shape[0] - 2 * tables.shape[1], head_dim)


@register_op("flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_to_kv: torch.Tensor, padding: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    from .flash_attention import flash_attention as launch

    return launch(q, k, v, head_to_kv, padding, torch.empty_like(q), scale)


@flash_attention.register_fake
def _(q, k, v, head_to_kv, padding, scale):
    return torch.empty_like(q)


@register_op("paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int,
) -> torch.Tensor:
    from .paged_attention import paged_decode_attention_triton

    return paged_decode_attention_triton(q, pages, block_tables, head_to_kv, lengths, starts, scale, split)


@paged_decode_attention.register_fake
def _(q, pages, block_tables, head_to_kv, lengths, starts, scale, split):
    from .paged_attention import check_head_to_kv

    check_head_to_kv(head_to_kv, q)
    return torch.empty_like(q)


@register_op("row_gathered_linear", mutates_args=())
def row_gathered_linear(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor,
                        residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                        eps: float = 0.0) -> torch.Tensor:
    from .gathered_linear import row_gathered_linear as launch

    return launch(x, w, rows, residual=residual, norm_weight=norm_weight, eps=eps)


@row_gathered_linear.register_fake
def _(x, w, rows, residual=None, norm_weight=None, eps=0.0):
    return x.new_empty(*x.shape[:-1], rows.shape[0])


@register_op("swiglu_gathered", mutates_args=())
def swiglu_gathered(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor,
                    norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0) -> torch.Tensor:
    from .gathered_linear import swiglu_gathered as launch

    return launch(x, w_gate, w_up, rows, norm_weight=norm_weight, eps=eps)


@swiglu_gathered.register_fake
def _(x, w_gate, w_up, rows, norm_weight=None, eps=0.0):
    return x.new_empty(*x.shape[:-1], rows.shape[0])


@register_op("col_gathered_linear", mutates_args=())
def col_gathered_linear(
    x: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, count: Optional[torch.Tensor] = None,
    x_mask: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, dense: bool = False,
    dense_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .gathered_linear import col_gathered_linear as launch

    return launch(x, w, cols, count=count, x_mask=x_mask, residual=residual, dense=dense, dense_weight=dense_weight)


@col_gathered_linear.register_fake
def _(x, w, cols, count=None, x_mask=None, residual=None, dense=False, dense_weight=None):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@register_op("swiglu_mlp_phased", mutates_args=())
def swiglu_mlp_phased(
    h: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor, norm_weight: torch.Tensor,
    eps: float, w_down: torch.Tensor, count: torch.Tensor, x_mask: torch.Tensor, dense: bool = False,
    dense_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .phased_mlp import swiglu_mlp_phased as launch

    return launch(h, w_gate, w_up, rows, norm_weight, eps, w_down, count, x_mask, dense, dense_weight)


@swiglu_mlp_phased.register_fake
def _(h, w_gate, w_up, rows, norm_weight, eps, w_down, count, x_mask, dense=False, dense_weight=None):
    return torch.empty_like(h)


@register_op("paged_attention_o_proj_phased", mutates_args=())
def paged_attention_o_proj_phased(
    q: torch.Tensor, pages: torch.Tensor, block_tables: torch.Tensor, head_to_kv: torch.Tensor,
    lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int, w_o: torch.Tensor, cols: torch.Tensor,
    count: torch.Tensor, residual: torch.Tensor, dense: bool = False, dense_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .phased_attention import paged_attention_o_proj_phased as launch

    return launch(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, residual,
                  dense, dense_weight)


@paged_attention_o_proj_phased.register_fake
def _(q, pages, block_tables, head_to_kv, lengths, starts, scale, split, w_o, cols, count, residual, dense=False,
      dense_weight=None):
    return torch.empty_like(residual)


@register_op("attention_block_phased", mutates_args=("pages",))
def attention_block_phased(
    h: torch.Tensor, w_qkv: torch.Tensor, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norm_weight: torch.Tensor, eps: float, pages: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor,
    head_to_kv: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, scale: float, split: int,
    w_o: torch.Tensor, cols: torch.Tensor, count: torch.Tensor, dense: bool = False,
    dense_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    from .phased_attention import attention_block_phased as launch

    return launch(h, w_qkv, heads, cos, sin, norm_weight, eps, pages, block_tables, positions, head_to_kv, lengths,
                  starts, scale, split, w_o, cols, count, dense, dense_weight)


@attention_block_phased.register_fake
def _(h, w_qkv, heads, cos, sin, norm_weight, eps, pages, block_tables, positions, head_to_kv, lengths, starts, scale,
      split, w_o, cols, count, dense=False, dense_weight=None):
    return torch.empty_like(h)


@register_op("step_inputs", mutates_args=())
def step_inputs(lengths: torch.Tensor, starts: torch.Tensor, cos_table: torch.Tensor,
                sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .decode_io import launch_step_inputs

    return launch_step_inputs(lengths, starts, cos_table, sin_table)


@step_inputs.register_fake
def _(lengths, starts, cos_table, sin_table):
    rows, head_dim = lengths.shape[0], cos_table.shape[1]
    return (cos_table.new_empty(rows, 1, head_dim), cos_table.new_empty(rows, 1, head_dim),
            torch.empty_like(lengths))


@register_op("greedy_", mutates_args=("logits_out", "next_tokens", "tokens", "lengths"))
def greedy_(logits: torch.Tensor, live: torch.Tensor, logits_out: torch.Tensor, next_tokens: torch.Tensor,
            tokens: torch.Tensor, lengths: torch.Tensor) -> None:
    from .decode_io import launch_greedy

    launch_greedy(logits, live, logits_out, next_tokens, tokens, lengths)


@greedy_.register_fake
def _(logits, live, logits_out, next_tokens, tokens, lengths):
    return None


def adallava_ops():
    """``torch.ops.adallava`` with the Triton operators registered (and the extension's, when built)."""
    return torch.ops.adallava
