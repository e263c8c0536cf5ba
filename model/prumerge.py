"""LLaVA-PruMerge visual token reduction (Shang et al., 2024, arXiv:2403.15388).

PruMerge keeps the patches whose [CLS] attention is an interquartile-range outlier and folds each
pruned patch into the kept patches whose keys it resembles most, so the language model reads a
short, sample-dependent number of visual tokens that still summarise the whole image.
"""

import torch
import torch.nn.functional as F

__all__ = ["iqr_outliers", "prune_merge", "cls_attention_and_keys"]


def _check_float(name: str, tensor: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() not in dims or not tensor.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor with {' or '.join(map(str, dims))} dims, "
            f"got dtype {tensor.dtype} and shape {tuple(tensor.shape)}"
        )
    if tensor.shape[-1] == 0 or (tensor.dim() > 1 and tensor.shape[0] == 0):
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Mark the scores above the upper interquartile-range fence of their row.

    Args:
        scores: `[N]` or `[B, N]` floating-point scores, one row per sample.

    Returns:
        A bool mask shaped like `scores`, True where `score > Q3 + 1.5 * (Q3 - Q1)`, with Q1 and Q3
        the row's 25th and 75th percentiles (linear interpolation, as `numpy.percentile`). A row
        with no outlier keeps its single highest-scoring token instead, so that a sample is never
        reduced to zero tokens.
    """
    _check_float("scores", scores, (1, 2))
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite, got NaN or infinite values")
    # torch.quantile accepts only float32/float64.
    rows = scores.reshape(-1, scores.shape[-1])
    rows = rows if rows.dtype == torch.float64 else rows.float()
    q = torch.quantile(rows, torch.tensor([0.25, 0.75], dtype=rows.dtype, device=rows.device), dim=-1)
    q1, q3 = q[0].unsqueeze(-1), q[1].unsqueeze(-1)
    mask = rows > q3 + 1.5 * (q3 - q1)
    empty = ~mask.any(dim=-1)
    mask[empty, rows[empty].argmax(dim=-1)] = True
    return mask.reshape(scores.shape)


def _merge_sample(x: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, neighbors: int) -> torch.Tensor:
    """Merge one sample's pruned tokens into its kept tokens; `x`, `k` are float32."""
    kept, pruned = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
    x_kept = x[kept]
    m = min(neighbors, pruned.numel())
    if m == 0:
        return x_kept
    k = F.normalize(k, dim=-1)
    top = (k[kept] @ k[pruned].T).topk(m, dim=-1)
    # A sparse [K, P] weight matrix turns the neighbour sum into one matmul instead of gathering
    # a [K, m, C] tensor, which is large for 4096-wide projected features.
    weights = torch.zeros(kept.numel(), pruned.numel(), dtype=x.dtype, device=x.device)
    weights.scatter_(1, top.indices, top.values.clamp_min(0))
    return (x_kept + weights @ x[pruned]) / (1 + weights.sum(dim=-1, keepdim=True))


def prune_merge(
    features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, *, neighbors: int = 32
) -> list[torch.Tensor]:
    """Reduce each sample's visual tokens to its [CLS]-attention outliers, merged with neighbours.

    Each sample keeps the tokens selected by `iqr_outliers(cls_attention[b])`, in their original
    (spatial) order. Each kept token `i` absorbs the `min(neighbors, num_pruned)` pruned tokens `j`
    whose keys are most cosine-similar to its own:
    `merged_i = (x_i + sum_j s_ij x_j) / (1 + sum_j s_ij)` with `s_ij = max(cos(k_i, k_j), 0)`.
    This departs from the original code, which adds the neighbours weighted by their [CLS]
    attention to the kept token without normalising; the similarity-weighted average keeps the
    token's scale, which the projector and language model were trained on.

    Args:
        features: `[B, N, C]` visual tokens (before or after the projector), any float dtype.
        cls_attention: `[B, N]` attention of the [CLS] query to each patch, averaged over heads.
        keys: `[B, N, Ck]` patch keys from the same vision layer as `cls_attention`.
        neighbors: how many pruned tokens each kept token merges, at most; 0 disables merging.

    Returns:
        A list of `B` tensors `[K_b, C]` in the dtype of `features`; `K_b` varies per sample.
        The arithmetic is done in float32.
    """
    _check_float("features", features, (3,))
    _check_float("cls_attention", cls_attention, (2,))
    _check_float("keys", keys, (3,))
    if cls_attention.shape != features.shape[:2]:
        raise ValueError(
            f"cls_attention must have shape [B, N] = {tuple(features.shape[:2])} to match features, "
            f"got {tuple(cls_attention.shape)}"
        )
    if keys.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"keys must have shape [B, N, Ck] with [B, N] = {tuple(features.shape[:2])} to match "
            f"features, got {tuple(keys.shape)}"
        )
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 0:
        raise ValueError(f"neighbors must be a non-negative int, got {neighbors!r}")
    keep = iqr_outliers(cls_attention)
    return [
        _merge_sample(features[b].float(), keys[b].float(), keep[b], neighbors).to(features.dtype)
        for b in range(features.shape[0])
    ]


def _encoder_layer(vision_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The encoder layer whose output is `hidden_states[layer]`."""
    # Older transformers wrap the tower in `.vision_model`; newer ones hold the encoder directly.
    encoder = getattr(getattr(vision_model, "vision_model", vision_model), "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise ValueError(
            f"vision_model must be a CLIPVisionModel with an encoder, got {type(vision_model).__name__}"
        )
    n = len(encoder.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not (-n <= layer <= n and layer != 0):
        raise ValueError(
            f"layer must index hidden_states produced by an encoder layer, i.e. an int in "
            f"[-{n}, -1] or [1, {n}] (0 is the embeddings), got {layer!r}"
        )
    # hidden_states[0] is the embedding output and hidden_states[i + 1] the output of layers[i].
    return encoder.layers[(layer if layer > 0 else n + 1 + layer) - 1]


@torch.no_grad()
def cls_attention_and_keys(
    vision_model: torch.nn.Module, pixel_values: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention and patch keys of the vision layer PruMerge reads.

    `layer` indexes `hidden_states` like LLaVA's `vision_feature_layer` (-2 by default): the
    statistics come from the self-attention of the encoder layer that produces
    `hidden_states[layer]`, i.e. `encoder.layers[L]` where `hidden_states[L + 1]` is its output.
    They are recomputed from the attention's captured input, so the result does not depend on
    the model's `attn_implementation` (sdpa and flash attention return no weights).

    Args:
        vision_model: a transformers `CLIPVisionModel`, e.g. LLaVA's `model.vision_tower`.
        pixel_values: `[B, 3, H, W]` images, as the model takes them.
        layer: index into `hidden_states`, negative allowed; 0 (the embeddings) is rejected.

    Returns:
        `cls_attention` `[B, N]`: the [CLS] query's softmax attention over all `N + 1` keys,
        averaged over heads, without the [CLS] key column; and `keys` `[B, N, C]`: the patch keys
        with heads concatenated. Both are float32.
    """
    _check_float("pixel_values", pixel_values, (4,))
    attn = _encoder_layer(vision_model, layer).self_attn
    captured = []

    def capture(module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        vision_model(pixel_values=pixel_values)
    finally:
        handle.remove()
    h = captured[0]
    b, t, _ = h.shape
    q = attn.q_proj(h[:, :1]).float().view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).float()
    scores = q @ k.view(b, t, attn.num_heads, attn.head_dim).permute(0, 2, 3, 1) * attn.scale
    cls_attention = scores.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    return cls_attention, k[:, 1:]
