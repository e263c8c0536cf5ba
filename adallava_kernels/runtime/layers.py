"""What one decoder layer runs under one layer plan, resolved once at plan time.

A :class:`LayerProgram` holds, for one (layer, layer plan, backend), the
weights and index tensors its prefill and decode read, so running it reads
nothing back from the device and builds no index. Per sub-block:

- all units on (the prefix layers, a kept -L layer): dense matmuls over the
  runner's stacked weights, on either backend;
- some units off, ``"triton"``: the gathered kernels read the plan's rows and
  columns of the weights in place (``head_projection`` with RoPE for q, k and
  v in one launch; ``col_gathered_linear`` for ``o_proj`` and ``down_proj``;
  ``swiglu_gathered``);
- some units off, ``"torch"``: dense matmuls over a copy of the plan's rows
  and columns, gathered here once per plan (the CPU path: the copy costs
  memory once per plan instead of a gather per call).

Decode attention reads the KV pages in place through the block table: the
Triton paged kernel, or (``"torch"``) one gather of the table's pages and
SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.library import adallava_ops
from ..ops.paged_attention import attend_gathered_pages
from ..plan import LayerPlan
from ..shape import ModelShape
from .weights import LayerWeights

# torch.ops.adallava: the Triton operators (registered by importing ops.library) and the extension's
# cache ops (registered when the pool loads the extension, before any layer runs).
_OPS = adallava_ops()

__all__ = ["KVPages", "LayerProgram", "LayerTables", "PrefillInputs", "DecodeInputs", "rms_norm", "rope", "rope_sign"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: normalised in float32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, with ``rotate_half(x) * sin == roll(x, d / 2) * signed_sin``
    where ``signed_sin`` is ``sin`` with its first half negated (exact: a sign flip rounds nothing)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


def rope_sign(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[-1] * (head_dim / 2) + [1] * (head_dim / 2)``: ``signed_sin = sin * rope_sign``."""
    sign = torch.ones(head_dim, dtype=dtype, device=device)
    sign[: head_dim // 2] = -1
    return sign


@dataclass(frozen=True)
class KVPages:
    """The pool's pages, and its K and V halves as views made once (indexing them per layer would dispatch)."""

    kv: torch.Tensor  # [2, num_pages, page_size, head_dim]
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of(cls, pages: torch.Tensor) -> "KVPages":
        return cls(pages, pages[0], pages[1])


@dataclass
class PrefillInputs:
    """Per-token tensors of the rows one layer program runs in prefill (built once per prefill)."""

    cos: torch.Tensor  # [rows, T, d], as the rotary module returns them
    sin: torch.Tensor
    cos4: torch.Tensor  # [rows, T, 1, d]: broadcast over heads
    signed_sin4: torch.Tensor
    mask: torch.Tensor  # [rows, 1, T, T] additive, causal and padding
    padding: torch.Tensor | None  # [rows, T] int32 (1: attend) for the Triton kernel; None without padding


@dataclass
class DecodeInputs:
    """Per-step tensors of the rows one layer program runs in a decode step."""

    cos: torch.Tensor  # [rows, 1, d]
    sin: torch.Tensor
    cos4: torch.Tensor  # [rows, 1, 1, d]
    signed_sin4: torch.Tensor
    lengths: torch.Tensor  # [rows] int32: positions stored before this step (the new token's slot)
    lengths_after: torch.Tensor  # lengths + 1
    starts: torch.Tensor  # [rows] int32: first position attended (the left padding)
    mask: torch.Tensor | None  # [rows, 1, 1, width * page_size] additive (torch backend)


@dataclass
class LayerTables:
    """The block tables of one layer program's rows (built once per prefill or decode batch)."""

    tables: torch.Tensor  # [rows, kv_heads, width] int32
    head_tables: torch.Tensor | None  # [rows, heads, width]: each query head's KV pages (torch decode)


class LayerProgram:
    """One decoder layer under one layer plan: weights, indices and kernels chosen at plan time."""

    def __init__(self, weights: LayerWeights, plan: LayerPlan, shape: ModelShape, backend: str) -> None:
        self.plan = plan
        self.index = plan.index
        self.eps = weights.eps
        self.input_norm, self.post_norm = weights.input_norm, weights.post_norm
        self.nq, self.nkv, self.head_dim = plan.num_heads, plan.num_kv_heads, shape.head_dim
        self.scale = shape.head_dim**-0.5
        self.runs_attention = plan.num_heads > 0
        self.runs_mlp = plan.num_neurons > 0
        # One query head per kept KV head, in order: the query-to-KV map is the identity.
        self.identity_map = self.nq == self.nkv
        self.head_to_kv = plan.head_to_kv
        self.gathered_attention = backend == "triton" and self.runs_attention and not plan.full_attention
        self.gathered_mlp = backend == "triton" and self.runs_mlp and not plan.full_mlp
        if (self.gathered_attention and weights.w_o_columns is None) or (
                self.gathered_mlp and weights.w_down_columns is None):
            raise ValueError(
                f"layer {plan.index} was not prepared for partial plans (its index is not in the runner's "
                "partial_layers), but the plan keeps only some of its units"
            )
        if self.runs_attention:
            self._resolve_attention(weights, plan, shape)
        if self.runs_mlp:
            self._resolve_mlp(weights, plan, shape)

    # -- plan time ---------------------------------------------------------------

    def _resolve_attention(self, weights: LayerWeights, plan: LayerPlan, shape: ModelShape) -> None:
        q_rows = shape.num_heads * shape.head_dim
        kv_rows = shape.num_kv_heads * shape.head_dim
        if self.gathered_attention:
            # Slots of q, k and v heads in the stacked weight, as head_projection indexes it.
            self.qkv_heads = torch.cat([plan.heads, plan.kv_heads + shape.num_heads,
                                        plan.kv_heads + shape.num_heads + shape.num_kv_heads])
            self.w_qkv, self.w_o_columns, self.o_columns = weights.w_qkv, weights.w_o_columns, plan.q_features
        elif plan.full_attention:
            self.w_qkv_t, self.w_o_t = weights.w_qkv.t(), weights.w_o.t()
        else:
            rows = torch.cat([plan.q_features, plan.kv_features + q_rows, plan.kv_features + q_rows + kv_rows])
            self.w_qkv_t = weights.w_qkv.index_select(0, rows.long()).t()
            self.w_o_t = weights.w_o.index_select(1, plan.q_features.long()).t()

    def _resolve_mlp(self, weights: LayerWeights, plan: LayerPlan, shape: ModelShape) -> None:
        if self.gathered_mlp:
            self.w_gate, self.w_up = weights.w_gate, weights.w_up
            self.w_down_columns, self.neurons = weights.w_down_columns, plan.neurons
        elif plan.full_mlp:
            self.w_gate_up_t, self.w_down_t = weights.w_gate_up.t(), weights.w_down.t()
        else:
            rows = torch.cat([plan.neurons, plan.neurons + shape.intermediate_size]).long()
            self.w_gate_up_t = weights.w_gate_up.index_select(0, rows).t()
            self.w_down_t = weights.w_down.index_select(1, plan.neurons.long()).t()

    def tables(self, tables: torch.Tensor, per_query_head: bool) -> LayerTables:
        """This layer's block tables ``[rows, kv_heads, width]``; with ``per_query_head``, also one row per
        query head (its KV head's pages), which the torch decode gathers."""
        head_tables = None
        if per_query_head:
            head_tables = tables if self.identity_map else tables.index_select(1, self.head_to_kv.long())
        return LayerTables(tables, head_tables)

    # -- prefill -------------------------------------------------------------------

    def prefill(self, h: torch.Tensor, inputs: PrefillInputs, pages: KVPages | None,
                tables: LayerTables | None) -> torch.Tensor:
        """``h`` ``[rows, T, hidden]`` through the layer; K/V written to ``pages`` at positions 0..T-1."""
        if self.runs_attention:
            h = h + self._prefill_attention(rms_norm(h, self.input_norm, self.eps), inputs, pages, tables)
        if self.runs_mlp:
            h = h + self._mlp(rms_norm(h, self.post_norm, self.eps))
        return h

    def _prefill_attention(self, x, inputs: PrefillInputs, pages, tables) -> torch.Tensor:
        rows, seq, hidden = x.shape
        nq, nkv, d = self.nq, self.nkv, self.head_dim
        if self.gathered_attention:
            qkv = _OPS.head_projection(x, self.w_qkv, self.qkv_heads, inputs.cos, inputs.sin, d, nq + nkv)
            q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        else:
            qkv = (x @ self.w_qkv_t).view(rows, seq, nq + 2 * nkv, d)
            qk = rope(qkv[:, :, :nq + nkv], inputs.cos4, inputs.signed_sin4)
            q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv:]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [rows, kv_heads, T, d]: the cache's layout
        if pages is not None:
            starts = torch.zeros(rows, dtype=torch.int32, device=x.device)
            _OPS.kv_append(pages.k, pages.v, k, v, tables.tables, starts)
        if self.gathered_attention:
            out = _OPS.flash_attention(q, k, v, self.head_to_kv, inputs.padding, self.scale)
            out = out.reshape(rows, seq, nq * d)
            return _OPS.col_gathered_linear(out, self.w_o_columns, self.o_columns)
        if not self.identity_map:
            k, v = k.index_select(1, self.head_to_kv.long()), v.index_select(1, self.head_to_kv.long())
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=inputs.mask, scale=self.scale)
        return out.transpose(1, 2).reshape(rows, seq, nq * d) @ self.w_o_t

    # -- decode --------------------------------------------------------------------

    def decode(self, h: torch.Tensor, inputs: DecodeInputs, pages: KVPages, tables: LayerTables,
               split: int) -> torch.Tensor:
        """``h`` ``[rows, hidden]`` (one new token per row) through the layer; its K/V written at ``lengths``."""
        if self.runs_attention:
            h = h + self._decode_attention(rms_norm(h, self.input_norm, self.eps), inputs, pages, tables, split)
        if self.runs_mlp:
            h = h + self._mlp(rms_norm(h, self.post_norm, self.eps))
        return h

    def _decode_attention(self, x, inputs: DecodeInputs, pages, tables: LayerTables, split: int) -> torch.Tensor:
        rows = x.shape[0]
        nq, nkv, d = self.nq, self.nkv, self.head_dim
        if self.gathered_attention:
            qkv = _OPS.head_projection(x[:, None], self.w_qkv, self.qkv_heads, inputs.cos, inputs.sin, d,
                                                 nq + nkv).view(rows, nq + 2 * nkv, 1, d)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        else:
            qkv = (x @ self.w_qkv_t).view(rows, nq + 2 * nkv, 1, d)  # [rows, heads, 1, d]: SDPA's and the cache's
            qk = rope(qkv[:, :nq + nkv], inputs.cos4, inputs.signed_sin4)
            q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]
        _OPS.kv_append(pages.k, pages.v, k, v, tables.tables, inputs.lengths)
        if tables.head_tables is not None:
            head_tables = tables.head_tables
            visible = inputs.mask.shape[-1] // pages.kv.shape[2]  # an eager step may attend fewer columns
            if visible != head_tables.shape[2]:
                head_tables = head_tables[:, :, :visible]
            out = attend_gathered_pages(q, pages.kv, head_tables, inputs.mask, self.scale).reshape(rows, nq * d)
        else:
            out = _OPS.paged_decode_attention(q[:, :, 0], pages.kv, tables.tables, self.head_to_kv,
                                                        inputs.lengths_after, inputs.starts, self.scale, split)
            out = out.view(rows, nq * d)
        if self.gathered_attention:
            return _OPS.col_gathered_linear(out, self.w_o_columns, self.o_columns)
        return out @ self.w_o_t

    # -- MLP -----------------------------------------------------------------------

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.gathered_mlp:
            act = _OPS.swiglu_gathered(x, self.w_gate, self.w_up, self.neurons)
            return _OPS.col_gathered_linear(act, self.w_down_columns, self.neurons)
        n = self.w_down_t.shape[0]
        gate_up = x @ self.w_gate_up_t
        return (F.silu(gate_up[..., :n]) * gate_up[..., n:]) @ self.w_down_t
