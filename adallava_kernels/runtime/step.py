"""Run: one decode step over a running batch's slots, the same launches whatever the plans.

Every layer runs the same sub-blocks on every step, each reading its plan
from a :class:`~.slots.LayerSlots` at run time, so the step depends on the
batch's padded size alone and one captured CUDA graph serves every mix of
plans. A sub-block no row runs has a union of 0 units: its kernels launch
and their programs return at once, reading no weight.

- ``triton``: the layer's five kernels (one fewer with ``ADALLAVA_PHASED_MLP=1``, the MLP one launch
  of two phases: :mod:`~adallava_kernels.ops.phased_mlp`; one fewer with ``ADALLAVA_PHASED_ATTENTION=1``,
  the attention and ``o_proj`` one launch: :mod:`~adallava_kernels.ops.phased_attention`; two fewer with
  ``ADALLAVA_PHASED_ATTENTION=qkv``, q, k and v too) (q, k and v of
  the union's heads of
  the normed input, the RMSNorm inside the projection, with RoPE, K and V
  written to the pages; the paged attention, each row over its own heads
  only; ``o_proj`` over the union's columns with the residual; gate and up
  of the union's neurons of the normed residual stream, the second RMSNorm
  inside, with SiLU-and-multiply; ``down_proj`` over them, each row's
  neurons masked, with the residual).
- ``torch``: the same computation with PyTorch ops over the union's weights,
  gathered (the reference of the Triton path). Where the host knows the
  union's sizes (a CPU), only the union is computed; otherwise, as a graph
  needs, every slot of the capacity, free slots masked.

A layer whose weights have no column-major copies (not in the runner's
``partial_layers``) reads ``o_proj`` and ``down_proj`` in their own layout,
as dense projections that a count of 0 switches off: its plans keep it whole
or skip it, so its union is every unit or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.library import adallava_ops, eager_launchers
from ..ops.paged_attention import attend_gathered_pages
from ..ops.phased_attention import phased_attention_mode
from ..ops.phased_mlp import phased_mlp_enabled
from ..ops.rope import rope
from .layers import sub_blocks
from .slots import LayerSlots
from .weights import LayerWeights

_OPS = adallava_ops()  # the extension's kv_append
_LAUNCH = eager_launchers()  # the Triton operators

__all__ = ["DecodeInputs", "SlotLayer"]


@dataclass
class DecodeInputs:
    """Per-step tensors of a decode step's rows."""

    cos: torch.Tensor  # [rows, 1, d]
    sin: torch.Tensor
    cos4: torch.Tensor | None  # [rows, 1, 1, d] (the torch path's; None on Triton)
    signed_sin4: torch.Tensor | None
    lengths: torch.Tensor  # [rows] int32: positions stored before this step (the new token's slot)
    lengths_after: torch.Tensor  # lengths + 1
    starts: torch.Tensor  # [rows] int32: first position attended (the left padding)
    mask: torch.Tensor | None  # [rows, 1, 1, visible positions] additive (torch backend)


class SlotLayer:
    """One decoder layer of a decode step, its plan read from :class:`LayerSlots` at run time."""

    def __init__(self, index: int, weights: LayerWeights, backend: str) -> None:
        self.index, self.backend = index, backend
        attention, mlp = weights.attention, weights.mlp
        self.input_norm, self.post_norm, self.eps = weights.input_norm, weights.post_norm, weights.eps
        self.nq, self.nkv, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.scale = self.head_dim ** -0.5
        self.w_qkv = attention.w_qkv
        self.w_o = attention.w_o if attention.w_o_columns is None else attention.w_o_columns
        self.w_gate, self.w_up = mlp.w_gate, mlp.w_up
        self.w_down = mlp.w_down if mlp.w_down_columns is None else mlp.w_down_columns
        self.partial = attention.w_o_columns is not None and mlp.w_down_columns is not None
        # A partial layer whose union is whole reads these, row-major, as a dense layer does.
        self.w_o_rows = attention.w_o if self.partial else None
        self.w_down_rows = mlp.w_down if self.partial else None
        self.phased_mlp = backend == "triton" and phased_mlp_enabled()
        attention = phased_attention_mode() if backend == "triton" else None
        self.phased_attention = attention is not None
        self.phased_qkv = attention == "qkv"

    def decode(self, h: torch.Tensor, inputs: DecodeInputs, pages, slots: LayerSlots, split: int,
               rope_sign: torch.Tensor) -> torch.Tensor:
        """``h`` ``[rows, hidden]`` (one new token per row) through the layer; K/V written at ``lengths``."""
        if self.backend == "triton":
            if self.phased_qkv:
                return self._mlp_triton(self._attention_block(h, inputs, pages, slots, split), slots)
            q = self._qkv(h, inputs, pages, slots)
            if self.phased_attention:
                h = self._attend_o_proj(q, inputs, pages, slots, split, h)
            else:
                h = self._o_proj(self._attend(q, inputs, pages, slots, split), slots, h)
            return self._mlp_triton(h, slots)
        # Where the host knows the union is empty, the sub-block is not run at all.
        q_n, _, n = self._sizes(slots)
        attend = (lambda x: self._attention_torch(x, inputs, pages, slots, rope_sign)) if q_n else None
        mlp = (lambda x, residual: self._mlp_torch(x, residual, slots)) if n else None
        return sub_blocks(h, attend, mlp, self.input_norm, self.post_norm, self.eps, "torch")

    # -- triton --------------------------------------------------------------------------

    def _qkv(self, h, inputs: DecodeInputs, pages, slots: LayerSlots) -> torch.Tensor:
        """q ``[rows, heads, d]`` of the union's heads of the normed ``h``, rotated; K and V appended to the
        pages, in one launch (the input norm inside it)."""
        return _LAUNCH.head_projection_paged(h[:, None], self.w_qkv, slots.qkv_heads, inputs.cos, inputs.sin,
                                            self.head_dim, self.nq + self.nkv, pages.k, pages.v, slots.tables,
                                            inputs.lengths, self.input_norm, self.eps)[:, 0]

    def _attend(self, q, inputs: DecodeInputs, pages, slots: LayerSlots, split: int) -> torch.Tensor:
        """Each row over its own heads' pages (a head it lacks attends nothing and gives 0)."""
        return _LAUNCH.paged_decode_attention(q, pages.kv, slots.tables, slots.kv_map, inputs.lengths_after,
                                             inputs.starts, self.scale, split)

    def _o_proj(self, out, slots: LayerSlots, residual) -> torch.Tensor:
        """The residual stream after the attention: ``residual`` plus ``o_proj`` of ``out``."""
        # The heads a row lacks are 0 already: no mask.
        return _LAUNCH.col_gathered_linear(out.view(out.shape[0], -1), self.w_o, slots.o_cols, slots.o_count,
                                          residual=residual, dense=not self.partial, dense_weight=self.w_o_rows)

    def _attend_o_proj(self, q, inputs: DecodeInputs, pages, slots: LayerSlots, split: int, residual) -> torch.Tensor:
        """:meth:`_attend`, then :meth:`_o_proj`, as two phases of one launch (``ADALLAVA_PHASED_ATTENTION=1``,
        :mod:`~adallava_kernels.ops.phased_attention`)."""
        return _LAUNCH.paged_attention_o_proj_phased(q, pages.kv, slots.tables, slots.kv_map, inputs.lengths_after,
                                                     inputs.starts, self.scale, split, self.w_o, slots.o_cols,
                                                     slots.o_count, residual, not self.partial, self.w_o_rows)

    def _attention_block(self, h, inputs: DecodeInputs, pages, slots: LayerSlots, split: int) -> torch.Tensor:
        """:meth:`_qkv`, :meth:`_attend` and :meth:`_o_proj` as three phases of one launch
        (``ADALLAVA_PHASED_ATTENTION=qkv``, :func:`~adallava_kernels.ops.phased_attention.attention_block_phased`)."""
        return _LAUNCH.attention_block_phased(h, self.w_qkv, slots.qkv_heads, inputs.cos, inputs.sin, self.input_norm,
                                              self.eps, pages.kv, slots.tables, inputs.lengths, slots.kv_map,
                                              inputs.lengths_after, inputs.starts, self.scale, split, self.w_o,
                                              slots.o_cols, slots.o_count, not self.partial, self.w_o_rows)

    def _mlp_triton(self, h, slots: LayerSlots) -> torch.Tensor:
        """The residual stream after the MLP, its norm inside gate|up; with ``ADALLAVA_PHASED_MLP=1`` one
        launch (:mod:`~adallava_kernels.ops.phased_mlp`), else two."""
        if self.phased_mlp:
            return _LAUNCH.swiglu_mlp_phased(h, self.w_gate, self.w_up, slots.neurons, self.post_norm, self.eps,
                                             self.w_down, slots.n_count, slots.n_mask, not self.partial,
                                             self.w_down_rows)
        act = _LAUNCH.swiglu_gathered(h, self.w_gate, self.w_up, slots.neurons, self.post_norm, self.eps)
        return _LAUNCH.col_gathered_linear(act, self.w_down, slots.neurons, slots.n_count, slots.n_mask, h,
                                          dense=not self.partial, dense_weight=self.w_down_rows)

    # -- torch ---------------------------------------------------------------------------

    def _sizes(self, slots: LayerSlots) -> tuple[int, int, int]:
        """The union's query heads, KV heads and neurons the torch path computes: its sizes where the host
        knows them, else every slot (a fixed shape; the free ones are masked)."""
        if slots.counts is not None:
            return slots.counts
        return self.nq, self.nkv, slots.neurons.shape[0]

    def _attention_torch(self, x, inputs: DecodeInputs, pages, slots: LayerSlots, rope_sign) -> torch.Tensor:
        rows, nq, nkv, d = x.shape[0], self.nq, self.nkv, self.head_dim
        q_n, kv_n, _ = self._sizes(slots)
        index = slots.gather
        features = torch.cat([index.qkv_rows[:q_n], index.qkv_rows[nq:nq + kv_n],
                              index.qkv_rows[nq + nkv:nq + nkv + kv_n]]).view(-1)
        qkv = (x @ self.w_qkv.index_select(0, features).t()).view(rows, q_n + 2 * kv_n, 1, d)
        qk = rope(qkv[:, :q_n + kv_n], inputs.cos4, inputs.signed_sin4)
        q, k, v = qk[:, :q_n], qk[:, q_n:], qkv[:, q_n + kv_n:]
        tables = slots.tables[:, :kv_n].contiguous()
        _OPS.kv_append(pages.k, pages.v, k, v, tables, inputs.lengths)
        visible = inputs.mask.shape[-1] // pages.kv.shape[2]
        head_tables = torch.gather(tables[:, :, :visible], 1,
                                   index.kv_map[:, :q_n, None].expand(-1, -1, visible))
        out = attend_gathered_pages(q, pages.kv, head_tables, inputs.mask, self.scale)
        # A head the row lacks gives 0, as the Triton kernel's.
        out = (out * (slots.kv_map[:, :q_n] >= 0)[:, :, None, None]).reshape(rows, q_n * d)
        return out @ self.w_o.index_select(1, index.o_cols[:q_n * d]).t()

    def _mlp_torch(self, x, residual, slots: LayerSlots) -> torch.Tensor:
        _, _, n = self._sizes(slots)
        neurons = slots.gather.neurons[:n]
        act = F.silu(x @ self.w_gate.index_select(0, neurons).t()) * (x @ self.w_up.index_select(0, neurons).t())
        act = act * slots.n_mask[:, :n]
        return torch.addmm(residual, act, self.w_down.index_select(1, neurons).t())
