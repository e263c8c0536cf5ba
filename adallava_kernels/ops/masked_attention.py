"""Head-masked attention of a Llama decoder layer: only the active heads are projected, attended and output.

Equals a transformers ``LlamaAttention`` whose ``o_proj`` columns of the
inactive heads are zero. The query heads in ``active_heads`` are projected,
and of the KV heads only those an active query head reads (GQA: a KV head is
needed while any of its query heads is active). After masking, the map from
query head to KV head is arbitrary; it is carried as ``head_to_kv``.

The reference gathers the active heads' weight rows with ``index_select`` and
runs PyTorch's SDPA; the Triton path reads the weights in place, applies RoPE
in the projection's epilogue, writes K/V in the cache layout, runs causal
flash attention over the active heads and the column-gathered ``o_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..kv_cache import KVCacheLayer
from ..masks import causal_visible
from ..plan import LayerPlan
from .common import check_index, check_same_dtype, check_tensor, resolve_backend

__all__ = [
    "attention_indices",
    "masked_attention",
    "masked_attention_reference",
    "masked_attention_triton",
]

_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


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


def masked_attention_triton(
    x, w_q, w_k, w_v, w_o, idx: LayerPlan, cos, sin, padding, kv_cache, head_dim: int
) -> torch.Tensor:
    """Triton path, without input checks (``masked_attention`` checks)."""
    from .flash_attention import flash_attention
    from .head_projection import head_projection
    from .gathered_linear import col_gathered_linear

    batch, seq, _ = x.shape
    nq, nkv = idx.heads.numel(), idx.kv_heads.numel()
    new = dict(dtype=x.dtype, device=x.device)
    q = torch.empty(batch, seq, nq, head_dim, **new)
    k = torch.empty(batch, nkv, seq, head_dim, **new)
    v = torch.empty(batch, nkv, seq, head_dim, **new)
    head_projection(x, w_q, idx.heads, head_dim, cos, sin, q)
    # K and V are written in the cache layout [batch, kv_heads, seq, d] through transposed views.
    head_projection(x, w_k, idx.kv_heads, head_dim, cos, sin, k.transpose(1, 2))
    head_projection(x, w_v, idx.kv_heads, head_dim, None, None, v.transpose(1, 2))
    if kv_cache is not None:
        k, v = kv_cache.update(k, v)
    attn = torch.empty(batch, seq, nq, head_dim, **new)
    flash_attention(q, k, v, idx.head_to_kv, padding, attn, head_dim**-0.5)
    return col_gathered_linear(attn.view(batch, seq, nq * head_dim), w_o, idx.q_features)


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


def check_padding(mask: object, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """A ``[batch, kv_len]`` padding mask (nonzero: attend) as int32, or ``None``."""
    if mask is None:
        return None
    check_tensor("attention_mask", mask, dim=2, dtypes=_MASK_DTYPES, device=device)
    if tuple(mask.shape) != (batch, kv_len):
        raise ValueError(
            f"attention_mask must be a [batch, past + seq] = [{batch}, {kv_len}] padding mask "
            f"(1: attend, 0: padding), got {list(mask.shape)}"
        )
    return mask.to(torch.int32).contiguous()


def run_masked_attention(
    x, w_q, w_k, w_v, w_o, idx: LayerPlan, cos, sin, *,
    head_dim: int, attention_mask=None, kv_cache: KVCacheLayer | None = None, backend: str = "auto",
) -> torch.Tensor:
    """The op for callers whose weights and indices are already checked (``MaskedAttention``).

    Checks what changes per call (rotary tables, mask, cache) before the
    cache is touched, so a rejected call leaves the cache as it was.
    """
    batch, seq, _ = x.shape
    if kv_cache is not None and not isinstance(kv_cache, KVCacheLayer):
        raise TypeError(
            f"kv_cache must be a KVCacheLayer (ContiguousKVCache, TransformersCacheLayer, "
            f"LayerSkipKVCache.layer_view), got {type(kv_cache).__name__}"
        )
    past = 0 if kv_cache is None else kv_cache.length
    cos, sin = check_rotary(cos, sin, batch, seq, head_dim, x.device)
    padding = check_padding(attention_mask, batch, past + seq, x.device)
    impl = masked_attention_triton
    if resolve_backend("masked_attention", backend, x.device, masked_attention_triton) == "torch":
        impl = masked_attention_reference
    return impl(x, w_q, w_k, w_v, w_o, idx, cos, sin, padding, kv_cache, head_dim)


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
    return run_masked_attention(
        x, w_q, w_k, w_v, w_o, idx, cos, sin,
        head_dim=head_dim, attention_mask=attention_mask, kv_cache=kv_cache, backend=backend,
    )
