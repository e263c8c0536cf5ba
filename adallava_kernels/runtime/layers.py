"""What one decoder layer runs under one layer plan, resolved once at plan time.

A :class:`LayerProgram` holds, for one (layer, layer plan, backend), the
planned attention and MLP its prefill and decode run
(:class:`~adallava_kernels.ops.masked_attention.AttentionProgram`,
:class:`~adallava_kernels.ops.masked_mlp.MlpProgram`: the code the drop-in
``MaskedAttention`` and ``MaskedMLP`` run too), with the layer's norms, so
running it reads nothing back from the device and builds no index. What is
the runtime's own: K/V go into the pool's pages (``kv_append`` at positions
the device holds), and decode attention reads the pages in place through the
block table: the Triton paged kernel, or (``"torch"``) one gather of the
table's pages and SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.library import adallava_ops
from ..ops.masked_attention import AttentionProgram
from ..ops.masked_mlp import MlpProgram
from ..ops.paged_attention import attend_gathered_pages
from ..ops.rms_norm import fused_add_rms_norm, rms_norm
from ..ops.silu_and_mul import silu_and_mul
from ..plan import ExecutionPlan, LayerPlan
from ..shape import ModelShape
from .binding import FULL, SKIP, SLOTS
from .weights import DecoderWeights, LayerWeights

# torch.ops.adallava: the Triton operators (registered by importing ops.library) and the extension's
# cache ops (registered when the pool loads the extension, before any layer runs).
_OPS = adallava_ops()

__all__ = ["BoundLayer", "KVPages", "LayerProgram", "LayerTables", "PrefillInputs", "ProgramCache", "DecodeInputs"]


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
    first_slots: torch.Tensor  # [rows] int32 zeros: a prompt's K/V go to positions 0..T-1 of its pages


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
    """One decoder layer under one layer plan: its planned attention and MLP, and its norms."""

    def __init__(self, weights: LayerWeights, plan: LayerPlan, shape: ModelShape, backend: str) -> None:
        self.plan = plan
        self.index = plan.index
        self.backend = backend
        self.eps = weights.eps
        self.input_norm, self.post_norm = weights.input_norm, weights.post_norm
        self.nq, self.nkv, self.head_dim = plan.num_heads, plan.num_kv_heads, shape.head_dim
        self.runs_attention = plan.num_heads > 0
        self.runs_mlp = plan.num_neurons > 0
        partial_attention = backend == "triton" and self.runs_attention and not plan.full_attention
        partial_mlp = backend == "triton" and self.runs_mlp and not plan.full_mlp
        if (partial_attention and weights.attention.w_o_columns is None) or (
                partial_mlp and weights.mlp.w_down_columns is None):
            raise ValueError(
                f"layer {plan.index} was not prepared for partial plans (its index is not in the runner's "
                "partial_layers), but the plan keeps only some of its units"
            )
        self.attention = AttentionProgram(weights.attention, plan, backend) if self.runs_attention else None
        self.mlp = MlpProgram(weights.mlp, plan.neurons, backend) if self.runs_mlp else None

    def tables(self, tables: torch.Tensor, per_query_head: bool) -> LayerTables:
        """This layer's block tables ``[rows, kv_heads, width]``; with ``per_query_head``, also one row per
        query head (its KV head's pages), which the torch decode gathers."""
        head_tables = None
        if per_query_head:
            attention = self.attention
            head_tables = tables if attention.identity_map else tables.index_select(1, attention.head_to_kv_index)
        return LayerTables(tables, head_tables)

    # -- prefill -------------------------------------------------------------------

    def prefill(self, h: torch.Tensor, inputs: PrefillInputs, pages: KVPages | None,
                tables: LayerTables | None) -> torch.Tensor:
        """``h`` ``[rows, T, hidden]`` through the layer; K/V written to ``pages`` at positions 0..T-1."""
        return self._sub_blocks(h, lambda x: self._prefill_attention(x, inputs, pages, tables), decode=False)

    def _prefill_attention(self, x, inputs: PrefillInputs, pages, tables) -> torch.Tensor:
        attention = self.attention
        q, k, v = attention.project(x, inputs.cos, inputs.sin, inputs.cos4, inputs.signed_sin4)
        if pages is not None:
            _OPS.kv_append(pages.k, pages.v, k, v, tables.tables, inputs.first_slots)
        return attention.output(attention.attend(q, k, v, inputs.padding, inputs.mask))

    # -- decode --------------------------------------------------------------------

    def decode(self, h: torch.Tensor, inputs: DecodeInputs, pages: KVPages, tables: LayerTables,
               split: int) -> torch.Tensor:
        """``h`` ``[rows, hidden]`` (one new token per row) through the layer; its K/V written at ``lengths``."""
        return self._sub_blocks(h, lambda x: self._decode_attention(x, inputs, pages, tables, split), decode=True)

    def _sub_blocks(self, h: torch.Tensor, attend, *, decode: bool) -> torch.Tensor:
        mlp = (lambda x, residual: self.mlp.add_to(x, residual, decode=decode)) if self.runs_mlp else None
        return sub_blocks(h, attend if self.runs_attention else None, mlp, self.input_norm, self.post_norm,
                          self.eps, self.backend)

    def _decode_attention(self, x, inputs: DecodeInputs, pages, tables: LayerTables, split: int) -> torch.Tensor:
        attention = self.attention
        rows, width = x.shape[0], self.nq * self.head_dim
        if tables.head_tables is None:  # Triton: the projection appends K/V, the paged kernel reads them
            q = attention.project_to_pages(x, inputs.cos, inputs.sin, pages.k, pages.v, tables.tables,
                                           inputs.lengths)
            out = _OPS.paged_decode_attention(q, pages.kv, tables.tables, attention.head_to_kv,
                                              inputs.lengths_after, inputs.starts, attention.scale, split)
            return attention.output(out.view(rows, width), step=True)
        q, k, v = attention.project_decode(x, inputs.cos4, inputs.signed_sin4)
        _OPS.kv_append(pages.k, pages.v, k, v, tables.tables, inputs.lengths)
        out = attend_pages_torch(q, pages, tables.head_tables, inputs.mask, attention.scale)
        return attention.output(out.reshape(rows, width), step=True)


def attend_pages_torch(q, pages: KVPages, head_tables: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch path's decode attention: SDPA over the pages ``head_tables`` names, as many table columns as
    ``mask`` covers (an eager step attends the columns its longest row has filled, not every reserved one)."""
    visible = mask.shape[-1] // pages.kv.shape[2]
    if visible != head_tables.shape[2]:
        head_tables = head_tables[:, :, :visible]
    return attend_gathered_pages(q, pages.kv, head_tables, mask, scale)


def sub_blocks(h: torch.Tensor, attend, mlp, input_norm, post_norm, eps: float, backend: str) -> torch.Tensor:
    """The attention (``attend(x)``), then the MLP (``mlp(x, residual)``: ``residual`` plus its output), each
    behind its RMSNorm and added to the residual stream (``None``: the sub-block does not run). The
    attention's residual add and the MLP's norm are one pass (one launch on Triton); the MLP adds its
    own residual in its down projection."""
    if attend is not None:
        out = attend(rms_norm(h, input_norm, eps, backend=backend))
        if mlp is None:
            return h + out
        x, h = fused_add_rms_norm(out, h, post_norm, eps, backend=backend)
        return mlp(x, h)
    if mlp is not None:
        return mlp(rms_norm(h, post_norm, eps, backend=backend), h)
    return h


class BoundLayer:
    """One decoder layer of a bound decode step (:mod:`.binding`): its sub-blocks in their modes, the
    plan read from a :class:`~.binding.LayerSlots` at run time. It holds no plan, so one serves every
    batch with the same modes at this layer; ``full`` is the layer's program under the full plan (its
    dense matmuls, norms and head map), which the FULL mode and the torch backend run."""

    def __init__(self, weights: LayerWeights, full: "LayerProgram", modes: tuple[str, str], backend: str) -> None:
        self.index, self.full, self.backend = full.index, full, backend
        self.attention_mode, self.mlp_mode = modes
        self.nq, self.nkv, self.head_dim = full.nq, full.nkv, full.head_dim
        if backend == "triton" and SLOTS in modes and (
                weights.attention.w_o_columns is None or weights.mlp.w_down_columns is None):
            raise ValueError(
                f"layer {self.index} was not prepared for partial plans (its index is not in the runner's "
                "partial_layers), but a plan of the batch keeps only some of its units"
            )
        self.w_qkv, self.w_o_columns = weights.attention.w_qkv, weights.attention.w_o_columns
        self.w_gate, self.w_up, self.w_down_columns = weights.mlp.w_gate, weights.mlp.w_up, weights.mlp.w_down_columns

    def decode(self, h: torch.Tensor, inputs: DecodeInputs, pages: KVPages, slots, split: int) -> torch.Tensor:
        full = self.full
        attend = None if self.attention_mode == SKIP else (lambda x: self._attention(x, inputs, pages, slots, split))
        mlp = None if self.mlp_mode == SKIP else (lambda x, residual: self._mlp(x, residual, slots))
        return sub_blocks(h, attend, mlp, full.input_norm, full.post_norm, full.eps, self.backend)

    def _attention(self, x, inputs: DecodeInputs, pages: KVPages, slots, split: int) -> torch.Tensor:
        full, rows = self.full.attention, x.shape[0]
        nq, nkv, d = self.nq, self.nkv, self.head_dim
        gathered = self.backend == "triton" and self.attention_mode == SLOTS
        if self.backend == "triton":
            # q, k and v of the union's heads (free slots skipped) or of every head, rotated, K and V
            # appended to the pages, in one launch.
            heads = slots.qkv_heads if gathered else full.qkv_heads
            q = _OPS.head_projection_paged(x[:, None], self.w_qkv, heads, inputs.cos, inputs.sin, d, nq + nkv,
                                           pages.k, pages.v, slots.tables, inputs.lengths)[:, 0]
        else:
            q, k, v = full.project_decode(x, inputs.cos4, inputs.signed_sin4)
            _OPS.kv_append(pages.k, pages.v, k, v, slots.tables, inputs.lengths)
            out = attend_pages_torch(q, pages, slots.head_tables, inputs.mask, full.scale).reshape(rows, nq * d)
            if self.attention_mode == SLOTS:
                out = out * slots.o_mask
            return out @ full.w_o_t
        head_to_kv = slots.head_to_kv if gathered else full.head_to_kv
        out = _OPS.paged_decode_attention(q, pages.kv, slots.tables, head_to_kv, inputs.lengths_after,
                                          inputs.starts, full.scale, split).view(rows, nq * d)
        if not gathered:
            return full.output(out, step=True)
        return _OPS.col_gathered_linear(out, self.w_o_columns, slots.o_cols, slots.o_count, slots.o_mask)

    def _mlp(self, x, residual, slots) -> torch.Tensor:
        full = self.full.mlp
        if self.mlp_mode == FULL:
            return full.add_to(x, residual, decode=True)
        if self.backend == "triton":
            act = _OPS.swiglu_gathered(x, self.w_gate, self.w_up, slots.neurons)
            return _OPS.col_gathered_linear(act, self.w_down_columns, slots.neurons, slots.n_count, slots.n_mask,
                                            residual)
        return full.down_add(silu_and_mul(x @ full.w_gate_up_t, backend=self.backend) * slots.n_mask, residual)


@dataclass
class _Held:
    """Something the cache built, and how many plans hold it now."""

    value: object
    holders: int = 0


class ProgramCache:
    """The layer programs of the plans in use: one per (layer, heads, neurons), shared by every plan that
    runs the layer alike, built when a plan first needs it and dropped when no plan holds it."""

    def __init__(self, weights: DecoderWeights, backend: str) -> None:
        self.weights, self.backend = weights, backend
        self._programs: dict[tuple, _Held] = {}  # (layer, heads, neurons) -> its LayerProgram
        # plan fingerprint -> its programs by layer: a lookup never compares two plans
        self._plans: dict[str, _Held] = {}

    def of(self, plan: ExecutionPlan) -> tuple[LayerProgram, ...]:
        """The programs of an acquired ``plan``, by layer."""
        return self._plans[plan.fingerprint].value

    def acquire(self, plan: ExecutionPlan) -> None:
        """Reference ``plan``'s layer programs, building those no other plan shares at first use."""
        held = self._plans.get(plan.fingerprint)
        if held is not None:
            held.holders += 1
            return
        shape = self.weights.shape
        layers = plan.layers(self.weights.device)
        programs, made = [], []
        try:
            for i in range(shape.num_layers):
                key = (i, plan.heads[i], plan.neurons[i])
                shared = self._programs.get(key)
                if shared is None:
                    program = LayerProgram(self.weights.layers[i], layers[i], shape, self.backend)
                    shared = self._programs[key] = _Held(program)
                shared.holders += 1
                made.append(key)
                programs.append(shared.value)
        except Exception:
            for key in made:
                self._unref(key)
            raise
        self._plans[plan.fingerprint] = _Held(tuple(programs), 1)

    def release(self, plan: ExecutionPlan) -> None:
        held = self._plans[plan.fingerprint]
        held.holders -= 1
        if held.holders == 0:
            del self._plans[plan.fingerprint]
            for i in range(self.weights.shape.num_layers):
                self._unref((i, plan.heads[i], plan.neurons[i]))

    def _unref(self, key) -> None:
        shared = self._programs[key]
        shared.holders -= 1
        if shared.holders == 0:
            del self._programs[key]
