"""Head-masked attention of a Llama decoder layer: only the active heads are projected, attended and output.

Equals a transformers ``LlamaAttention`` whose ``o_proj`` columns of the
inactive heads are zero. The query heads in ``active_heads`` are projected,
and of the KV heads only those an active query head reads (GQA: a KV head is
needed while any of its query heads is active). After masking, the map from
query head to KV head is arbitrary; it is carried as ``head_to_kv``.

- :class:`AttentionProgram`: one layer's attention under one layer plan,
  resolved once (the one planned attention: ``MaskedAttention``, the
  runtime's ``LayerProgram`` and :func:`masked_attention`'s Triton backend
  run it). Over the
  weights stacked ``[q; k; v]`` (:class:`AttentionWeights`): with every head
  on, dense matmuls and SDPA; with some off, ``"triton"`` reads the plan's
  rows in place (``head_projection`` with RoPE for q, k and v in one launch,
  causal flash attention, the column-gathered ``o_proj``) and ``"torch"``
  multiplies by a copy of the plan's rows and columns gathered once.
- :func:`masked_attention_reference`: gathers the active heads' weight rows
  with ``index_select`` on every call and runs PyTorch's SDPA: the oracle,
  and :func:`masked_attention`'s torch backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..kv_cache import KVCacheLayer
from ..masks import causal_visible
from ..plan import LayerPlan
from .common import MASK_DTYPES, check_index, check_same_dtype, check_tensor, resolve_backend
from .library import adallava_ops, eager_launchers
from .rope import rope, rope_, rope_sign

# torch.ops.adallava: the Triton operators, registered by importing ops.library; _LAUNCH: the same, launched
# without the dispatcher but under torch.compile (what every call here runs).
_OPS = adallava_ops()
_LAUNCH = eager_launchers()

__all__ = [
    "AttentionProgram",
    "AttentionWeights",
    "attention_indices",
    "masked_attention",
    "masked_attention_reference",
    "rope",
    "rope_sign",
]


def attention_indices(active_heads: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> LayerPlan:
    """The attention part of a :class:`~adallava_kernels.plan.LayerPlan` from sorted active query heads.

    The number of KV heads needed depends on the values, so on a GPU this
    reads it back to the host once; an ``ExecutionPlan`` layer has these lists
    prebuilt and costs nothing.
    """
    kv_of_head = active_heads.long() // (num_heads // num_kv_heads)
    kv_heads = torch.unique_consecutive(kv_of_head)
    head_to_kv = torch.searchsorted(kv_heads, kv_of_head)
    return LayerPlan.for_heads(active_heads, kv_heads, head_to_kv, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim)


@dataclass(frozen=True)
class AttentionWeights:
    """One attention layer's weights as a planned attention reads them (made once per model)."""

    w_qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: q_proj, k_proj, v_proj stacked
    w_o: torch.Tensor  # [hidden, heads * head_dim], any layout
    w_o_columns: torch.Tensor | None  # w_o column-major, for gathered columns (None: the plans keep every head)
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def stack(cls, w_q, w_k, w_v, w_o, *, num_heads: int, num_kv_heads: int,
              w_o_columns: torch.Tensor | None = None) -> "AttentionWeights":
        """q, k and v stacked into one new tensor (a copy of the three)."""
        return cls(torch.cat([w_q, w_k, w_v]), w_o, w_o_columns, num_heads, num_kv_heads, w_q.shape[0] // num_heads)


class AttentionProgram:
    """One attention layer under one layer plan: weights, indices and kernels chosen at plan time.

    ``backend`` is resolved (``"torch"`` or ``"triton"``). Running it reads nothing back from the
    device and builds no index. Stages, shared by every caller: :meth:`project` (q, k, v of the
    plan's heads, rotated), :meth:`attend` (causal attention over those heads), :meth:`output`
    (``o_proj`` over their columns); :meth:`__call__` runs them around a
    :class:`~adallava_kernels.kv_cache.KVCacheLayer`.
    """

    def __init__(self, weights: AttentionWeights, plan: LayerPlan, backend: str) -> None:
        nh, nkvh, d = weights.num_heads, weights.num_kv_heads, weights.head_dim
        self.nq, self.nkv, self.head_dim = plan.num_heads, plan.num_kv_heads, d
        self.hidden = weights.w_o.shape[0]
        self.scale = d**-0.5
        # One query head per kept KV head, in order: the query-to-KV map is the identity.
        self.identity_map = self.nq == self.nkv
        self.head_to_kv = plan.head_to_kv
        self.head_to_kv_index = plan.head_to_kv.long()  # index_select's dtype, converted once per plan
        # GQA with every head on. On Triton the flash kernel reads each query head's KV head in place; on a
        # CPU SDPA's own GQA does (its CUDA flash backend alone takes enable_gqa: with fp32 or a mask the
        # CUDA dispatcher would fall back to the math path, so there the KV heads are copied per query head).
        gqa = plan.full_attention and not self.identity_map
        self.flash_gqa = gqa and backend == "triton"
        self.sdpa_gqa = {"enable_gqa": True} if gqa and weights.w_qkv.device.type == "cpu" else {}
        self.backend = backend
        self.gathered = backend == "triton" and self.nq > 0 and not plan.full_attention
        self.rope_sign = rope_sign(d, weights.w_qkv.dtype, weights.w_qkv.device)
        self.w_qkv = weights.w_qkv
        self.qkv_heads = None  # slots of q, k and v heads in the stacked weight, as head_projection indexes it
        self.o_rows = None  # every row of w_o (int32), for a decode step's dense o_proj on Triton
        if backend == "triton" and self.nq > 0:
            self.qkv_heads = torch.cat([plan.heads, plan.kv_heads + nh, plan.kv_heads + nh + nkvh])
        if self.gathered:
            self.o_columns = plan.q_features
            self.w_o_columns = weights.w_o if weights.w_o_columns is None else weights.w_o_columns
        elif plan.full_attention:
            self.w_qkv_t, self.w_o_t = weights.w_qkv.t(), weights.w_o.t()
            if backend == "triton":  # a decode step's dense o_proj: every row of w_o, split-K, one launch
                self.w_o, self.o_rows = weights.w_o, torch.arange(self.hidden, dtype=torch.int32,
                                                                  device=weights.w_o.device)
        else:
            q_rows, kv_rows = nh * d, nkvh * d
            rows = torch.cat([plan.q_features, plan.kv_features + q_rows, plan.kv_features + q_rows + kv_rows])
            self.w_qkv_t = weights.w_qkv.index_select(0, rows.long()).t()
            self.w_o_t = weights.w_o.index_select(1, plan.q_features.long()).t()

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed_sin)`` ``[batch or 1, seq, 1, d]``, broadcast over heads, for the torch path."""
        return cos[:, :, None], (sin * self.rope_sign)[:, :, None]

    def project(self, x, cos, sin, cos4, signed_sin4):
        """``x`` ``[batch, seq, hidden]`` -> ``q`` ``[batch, seq, heads, d]``, ``k`` and ``v``
        ``[batch, kv_heads, seq, d]`` (the cache's layout), q and k rotated. ``cos``/``sin``: ``[batch or 1,
        seq, d]`` (Triton); ``cos4``/``signed_sin4``: from :meth:`rotary` (torch)."""
        batch, seq, _ = x.shape
        nq, nkv, d = self.nq, self.nkv, self.head_dim
        if self.gathered:
            qkv = _LAUNCH.head_projection(x, self.w_qkv, self.qkv_heads, cos, sin, d, nq + nkv)
            q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        elif self.backend == "triton":  # one matmul, then q and k rotated in place in one launch
            qkv = rope_((x @ self.w_qkv_t).view(batch, seq, nq + 2 * nkv, d), cos, sin, nq + nkv, backend="triton")
            q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        else:
            qkv = (x @ self.w_qkv_t).view(batch, seq, nq + 2 * nkv, d)
            qk = rope(qkv[:, :, :nq + nkv], cos4, signed_sin4)
            q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv:]
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def project_decode(self, x, cos4, signed_sin4):
        """The torch path, one token per row: ``x`` ``[rows, hidden]`` -> ``q`` ``[rows, heads, 1, d]``, ``k``
        and ``v`` ``[rows, kv_heads, 1, d]`` (SDPA's and the cache's layout). (Triton decodes through
        :meth:`project_to_pages`.)"""
        rows = x.shape[0]
        nq, nkv, d = self.nq, self.nkv, self.head_dim
        qkv = (x @ self.w_qkv_t).view(rows, nq + 2 * nkv, 1, d)
        qk = rope(qkv[:, :nq + nkv], cos4, signed_sin4)
        return qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]

    def project_to_pages(self, x, cos, sin, k_pages, v_pages, tables, lengths) -> torch.Tensor:
        """Triton, one token per row: q, k and v of the plan's heads in one launch, q and k rotated, K and V
        written straight to the pages at ``lengths`` (the KV append, fused); returns q ``[rows, heads, d]``."""
        q = _LAUNCH.head_projection_paged(x[:, None], self.w_qkv, self.qkv_heads, cos, sin, self.head_dim,
                                          self.nq + self.nkv, k_pages, v_pages, tables, lengths)
        return q[:, 0]

    def attend(self, q, k, v, padding: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of ``q`` ``[batch, q_len, heads, d]`` (the last ``q_len`` positions) over ``k``,
        ``v`` ``[batch, kv_heads, kv_len, d]`` -> ``[batch, q_len, heads * d]``.

        ``padding``: ``[batch, kv_len]`` int32 (0: padding) or ``None``. ``mask``: an additive
        ``[batch, 1, q_len, kv_len]`` mask for the torch path (a query that sees nothing averages, as
        transformers); without one, the torch path masks by ``padding`` and such a query gives 0, as
        the Triton kernel does.
        """
        batch, q_len = q.shape[:2]
        if self.gathered or self.flash_gqa:
            out = _LAUNCH.flash_attention(q, k, v, self.head_to_kv, padding, self.scale)
            return out.reshape(batch, q_len, self.nq * self.head_dim)
        gqa = self.sdpa_gqa
        if not self.identity_map and not gqa:
            k, v = k.index_select(1, self.head_to_kv_index), v.index_select(1, self.head_to_kv_index)
        q = q.transpose(1, 2)
        kv_len = k.shape[2]
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, **gqa)
        elif padding is None and kv_len == q_len:
            # No mask tensor: lets SDPA take its flash kernels on a GPU.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **gqa)
        elif padding is None and q_len == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, **gqa)
        else:
            visible = causal_visible(batch, q_len, kv_len, padding, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale, **gqa)
            # SDPA gives NaN for a query that sees no key.
            out = torch.where(visible.any(-1, keepdim=True), out, 0.0)
        return out.transpose(1, 2).reshape(batch, q_len, self.nq * self.head_dim)

    def output(self, out: torch.Tensor, *, step: bool = False) -> torch.Tensor:
        """``o_proj`` of ``out`` ``[..., heads * d]`` over the plan's heads' columns -> ``[..., hidden]``;
        ``step``: in a decode step (on Triton, a dense ``o_proj`` is a GEMV over every row of ``w_o``)."""
        if self.gathered:
            return _LAUNCH.col_gathered_linear(out, self.w_o_columns, self.o_columns)
        if step and self.backend == "triton" and self.o_rows is not None:
            # A GEMV: the row gather over every row reads w_o once at bandwidth in one launch (cuBLAS's
            # split-K GEMV takes two, its reduction apart).
            return _LAUNCH.row_gathered_linear(out, self.w_o, self.o_rows, None)
        return out @ self.w_o_t

    def __call__(self, x, cos, sin, padding=None, kv_cache: KVCacheLayer | None = None) -> torch.Tensor:
        """The layer's attention of the new tokens ``x`` ``[batch, seq, hidden]``: their K/V appended to
        ``kv_cache`` (``None``: ``x`` is the whole sequence), ``padding`` ``[batch, past + seq]`` int32."""
        cos4, signed_sin4 = (None, None) if self.gathered else self.rotary(cos.to(x.dtype), sin.to(x.dtype))
        q, k, v = self.project(x, cos, sin, cos4, signed_sin4)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if self.nq == 0:
            return x.new_zeros(*x.shape[:2], self.hidden)
        return self.output(self.attend(q, k, v, padding))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.chunk(2, dim=-1)
    return torch.cat((-hi, lo), dim=-1)


def masked_attention_reference(
    x, w_q, w_k, w_v, w_o, idx: LayerPlan, cos, sin, padding, kv_cache, head_dim: int
) -> torch.Tensor:
    """PyTorch reference, without input checks: the oracle for the kernels and the CPU backend.

    RoPE is applied in the dtype of ``x``, as transformers does.
    """
    batch, seq, hidden = x.shape

    def project(w, features, heads):
        return F.linear(x, w.index_select(0, features.long())).view(batch, seq, heads, head_dim).transpose(1, 2)

    q = project(w_q, idx.q_features, idx.heads.numel())
    k = project(w_k, idx.kv_features, idx.kv_heads.numel())
    v = project(w_v, idx.kv_features, idx.kv_heads.numel())
    cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if kv_cache is not None:
        k, v = kv_cache.update(k, v)
    if idx.heads.numel() == 0:
        return x.new_zeros(batch, seq, hidden)
    to_kv = idx.head_to_kv.long()
    kv_len = k.shape[2]
    k, v = k.index_select(1, to_kv), v.index_select(1, to_kv)
    scale = head_dim**-0.5
    if padding is None and kv_len == seq:
        # No mask tensor: lets SDPA take its flash kernels on a GPU.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif padding is None and seq == 1:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        visible = causal_visible(batch, seq, kv_len, padding, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        # SDPA gives NaN for a query that sees no key; the op defines its output as 0.
        out = torch.where(visible.any(-1, keepdim=True), out, 0.0)
    out = out.transpose(1, 2).reshape(batch, seq, idx.q_features.numel())
    return F.linear(out, w_o.index_select(1, idx.q_features.long()))


def _check_weights(x, w_q, w_k, w_v, w_o, num_heads: int, num_kv_heads: int) -> int:
    """Check the weights against ``x`` and the head counts; return ``head_dim``."""
    device = x.device
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        check_tensor(name, w, dim=2, device=device)
    check_same_dtype("x", x, w_q=w_q, w_k=w_k, w_v=w_v, w_o=w_o)
    hidden = x.shape[-1]
    weights_hidden = {w_q.shape[1], w_k.shape[1], w_v.shape[1], w_o.shape[0]}
    if len(weights_hidden) == 1 and hidden not in weights_hidden:
        # The four weights agree on the hidden size: x is the odd one out.
        raise ValueError(
            f"x must have the weights' hidden size {w_q.shape[1]} in its last dim ([batch, seq, hidden]), "
            f"got shape {list(x.shape)}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    q_out = w_q.shape[0]
    if q_out % num_heads or w_q.shape[1] != hidden:
        raise ValueError(
            f"w_q must have shape [num_heads * head_dim, hidden] = [{num_heads} * head_dim, {hidden}], "
            f"got {list(w_q.shape)}"
        )
    head_dim = q_out // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {head_dim}")
    kv_shape = [num_kv_heads * head_dim, hidden]
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if list(w.shape) != kv_shape:
            raise ValueError(f"{name} must have shape {kv_shape} ([num_kv_heads * head_dim, hidden]), got {list(w.shape)}")
    if list(w_o.shape) != [hidden, q_out]:
        raise ValueError(f"w_o must have shape {[hidden, q_out]} ([hidden, num_heads * head_dim]), got {list(w_o.shape)}")
    return head_dim


def check_rotary(cos: object, sin: object, batch: int, seq: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` as ``[batch or 1, seq, head_dim]`` contiguous tensors (2-D ``[seq, head_dim]`` broadcasts)."""
    out = []
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, device=device)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, head_dim):
            batches = "1" if batch == 1 else f"{batch} or 1"
            raise ValueError(
                f"{name} must have shape [{batches}, {seq}, {head_dim}] ([batch, seq, head_dim], as "
                f"LlamaRotaryEmbedding returns it), got {list(t.shape)}"
            )
        out.append(t.contiguous())
    if out[0].shape != out[1].shape:
        raise ValueError(f"cos and sin must have the same shape, got {list(out[0].shape)} and {list(out[1].shape)}")
    return out[0], out[1]


def check_cache(kv_cache: object) -> KVCacheLayer | None:
    if kv_cache is not None and not isinstance(kv_cache, KVCacheLayer):
        raise TypeError(
            f"kv_cache must be a KVCacheLayer (ContiguousKVCache, TransformersCacheLayer, "
            f"LayerSkipKVCache.layer_view), got {type(kv_cache).__name__}"
        )
    return kv_cache


def check_padding(mask: object, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """A ``[batch, kv_len]`` padding mask (nonzero: attend) as int32, or ``None``."""
    if mask is None:
        return None
    check_tensor("attention_mask", mask, dim=2, dtypes=MASK_DTYPES, device=device)
    if tuple(mask.shape) != (batch, kv_len):
        raise ValueError(
            f"attention_mask must be a [batch, past + seq] = [{batch}, {kv_len}] padding mask "
            f"(1: attend, 0: padding), got {list(mask.shape)}"
        )
    return mask.to(torch.int32).contiguous()


def check_call(x, head_dim: int, cos, sin, attention_mask, kv_cache):
    """What changes per call (cache, rotary tables, mask), checked before the cache is touched, so a
    rejected call leaves the cache as it was: ``(cos, sin, padding, kv_cache)``."""
    batch, seq, _ = x.shape
    kv_cache = check_cache(kv_cache)
    cos, sin = check_rotary(cos, sin, batch, seq, head_dim, x.device)
    padding = check_padding(attention_mask, batch, seq + (0 if kv_cache is None else kv_cache.length), x.device)
    return cos, sin, padding, kv_cache


def run_masked_attention(
    x, program: AttentionProgram, cos, sin, *, attention_mask=None, kv_cache: KVCacheLayer | None = None,
) -> torch.Tensor:
    """The op for callers that hold a program (``MaskedAttention``, a benchmark): its weights and indices
    were checked when it was built; this checks what changes per call (:func:`check_call`)."""
    cos, sin, padding, kv_cache = check_call(x, program.head_dim, cos, sin, attention_mask, kv_cache)
    return program(x, cos, sin, padding, kv_cache)


def masked_attention(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    active_heads: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    attention_mask: torch.Tensor | None = None,
    kv_cache: KVCacheLayer | None = None,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Causal self-attention of a Llama decoder layer computed over ``active_heads`` only.

    Equals a transformers ``LlamaAttention`` (no biases, scaling
    ``head_dim ** -0.5``) whose ``o_proj`` columns of the inactive heads are
    zero; with no active head the output is zero. A query that sees no key
    (a padded position with nothing before it) gives zero, where transformers'
    eager attention gives an average over its masked keys.

    ``"torch"`` runs :func:`masked_attention_reference`; ``"triton"`` an
    :class:`AttentionProgram` built for this call, over a copy of ``w_q``,
    ``w_k`` and ``w_v`` stacked: a caller with the same weights on every call
    holds a program instead (as ``MaskedAttention`` does) and stacks once.

    Args:
        x: ``[batch, seq, hidden]`` (fp32, fp16 or bf16): the new tokens.
        w_q: ``[num_heads * head_dim, hidden]``; ``w_k``, ``w_v``:
            ``[num_kv_heads * head_dim, hidden]``; ``w_o``: ``[hidden, num_heads *
            head_dim]`` (``nn.Linear`` layout, any strides; the Triton path reads
            ``w_o`` faster from ``prepare_column_gather``'s copy). Dtype of ``x``.
        active_heads: 1-D int32/int64 query heads, sorted and unique, on the device of ``x``.
        cos, sin: ``[batch or 1, seq, head_dim]`` for the new tokens' positions,
            as transformers' ``LlamaRotaryEmbedding`` returns them.
        num_heads, num_kv_heads: the layer's query and KV head counts (GQA when they differ).
        attention_mask: ``[batch, past + seq]`` padding mask, nonzero where a
            position is attended (transformers' 2-D ``attention_mask``); causal
            masking is always applied.
        kv_cache: a :class:`~adallava_kernels.kv_cache.KVCacheLayer` holding
            the active KV heads of the earlier positions; the new tokens' K/V
            are appended to it. Without one, ``x`` is the whole sequence.
        backend: ``"auto"`` (Triton on CUDA), ``"torch"`` or ``"triton"``.
        check_indices: check the values of ``active_heads`` (one host sync on a GPU).

    Returns:
        ``[batch, seq, hidden]`` in the dtype of ``x``.
    """
    check_tensor("x", x, dim=3)
    check_int("num_heads", num_heads, positive_wording=True)
    check_int("num_kv_heads", num_kv_heads, positive_wording=True)
    head_dim = _check_weights(x, w_q, w_k, w_v, w_o, num_heads, num_kv_heads)
    check_index("active_heads", active_heads, num_heads, x.device, check_values=check_indices)
    idx = attention_indices(active_heads, num_heads, num_kv_heads, head_dim)
    cos, sin, padding, kv_cache = check_call(x, head_dim, cos, sin, attention_mask, kv_cache)
    if resolve_backend("masked_attention", backend, x.device, _OPS.head_projection) == "torch":
        return masked_attention_reference(x, w_q, w_k, w_v, w_o, idx, cos, sin, padding, kv_cache, head_dim)
    weights = AttentionWeights.stack(w_q, w_k, w_v, w_o, num_heads=num_heads, num_kv_heads=num_kv_heads)
    return AttentionProgram(weights, idx, "triton")(x, cos, sin, padding, kv_cache)
