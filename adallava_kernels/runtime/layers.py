"""What one decoder layer runs in a prefill under one layer plan, resolved once at plan time.

A :class:`LayerProgram` holds, for one (layer, layer plan, backend), the
planned attention and MLP a prefill runs
(:class:`~adallava_kernels.ops.masked_attention.AttentionProgram`,
:class:`~adallava_kernels.ops.masked_mlp.MlpProgram`: the code the drop-in
``MaskedAttention`` and ``MaskedMLP`` run too), with the layer's norms, so
running it reads nothing back from the device and builds no index. What is
the runtime's own: K/V go into the pool's pages (``kv_append`` at positions
the device holds). Decode steps run :mod:`.step` instead, with the plans as
data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.library import adallava_ops
from ..ops.masked_attention import AttentionProgram
from ..ops.masked_mlp import MlpProgram
from ..ops.rms_norm import fused_add_rms_norm, rms_norm
from ..plan import ExecutionPlan, LayerPlan
from ..shape import ModelShape
from .weights import DecoderWeights, LayerWeights

# torch.ops.adallava: the Triton operators (registered by importing ops.library) and the extension's
# cache ops (registered when the pool loads the extension, before any layer runs).
_OPS = adallava_ops()

__all__ = ["KVPages", "LayerProgram", "PrefillInputs", "ProgramCache", "sub_blocks"]


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

    # -- prefill -------------------------------------------------------------------

    def prefill(self, h: torch.Tensor, inputs: PrefillInputs, pages: KVPages | None,
                tables: torch.Tensor | None) -> torch.Tensor:
        """``h`` ``[rows, T, hidden]`` through the layer; K/V written to ``pages`` at positions 0..T-1."""
        return self._sub_blocks(h, lambda x: self._prefill_attention(x, inputs, pages, tables))

    def _prefill_attention(self, x, inputs: PrefillInputs, pages, tables) -> torch.Tensor:
        attention = self.attention
        q, k, v = attention.project(x, inputs.cos, inputs.sin, inputs.cos4, inputs.signed_sin4)
        if pages is not None:
            _OPS.kv_append(pages.k, pages.v, k, v, tables, inputs.first_slots)
        return attention.output(attention.attend(q, k, v, inputs.padding, inputs.mask))

    def _sub_blocks(self, h: torch.Tensor, attend) -> torch.Tensor:
        mlp = (lambda x, residual: self.mlp.add_to(x, residual, decode=False)) if self.runs_mlp else None
        return sub_blocks(h, attend if self.runs_attention else None, mlp, self.input_norm, self.post_norm,
                          self.eps, self.backend)


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


@dataclass
class _Held:
    """Something the cache built, and how many plans hold it now."""

    value: object
    holders: int = 0


# How many plans' programs a runner keeps after their last holder lets go (the most recent): a planned forward
# (which holds its plan for the call only) with a plan it ran lately builds nothing. A Triton program holds
# index tensors, not weights; the torch backend's hold gathered copies of the weights, so it keeps none.
RECENT_PLANS = {"triton": 4, "torch": 0}


class ProgramCache:
    """The layer programs of the plans in use: one per (layer, heads, neurons), shared by every plan that
    runs the layer alike, built when a plan first needs it and dropped when no plan holds it and it is not
    among the :data:`RECENT_PLANS` last let go."""

    def __init__(self, weights: DecoderWeights, backend: str) -> None:
        self.weights, self.backend = weights, backend
        self._programs: dict[tuple, _Held] = {}  # (layer, heads, neurons) -> its LayerProgram
        # plan fingerprint -> its programs by layer: a lookup never compares two plans
        self._plans: dict[str, _Held] = {}
        # Plans no one holds, kept with their programs' references, oldest first.
        self._recent: dict[str, tuple[ExecutionPlan, _Held]] = {}
        self._keep = RECENT_PLANS[backend]

    def of(self, plan: ExecutionPlan) -> tuple[LayerProgram, ...]:
        """The programs of an acquired ``plan``, by layer."""
        return self._plans[plan.fingerprint].value

    def acquire(self, plan: ExecutionPlan) -> None:
        """Reference ``plan``'s layer programs, building those no other plan shares at first use."""
        held = self._plans.get(plan.fingerprint)
        if held is not None:
            held.holders += 1
            return
        recent = self._recent.pop(plan.fingerprint, None)
        if recent is not None:
            recent[1].holders = 1
            self._plans[plan.fingerprint] = recent[1]
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
            self._recent[plan.fingerprint] = (plan, held)
            while len(self._recent) > self._keep:
                oldest = next(iter(self._recent))
                self._drop(self._recent.pop(oldest)[0])

    def _drop(self, plan: ExecutionPlan) -> None:
        for i in range(self.weights.shape.num_layers):
            self._unref((i, plan.heads[i], plan.neurons[i]))

    def _unref(self, key) -> None:
        shared = self._programs[key]
        shared.holders -= 1
        if shared.holders == 0:
            del self._programs[key]
