"""LLaVA-PruMerge visual token reduction (Shang et al., 2024, arXiv:2403.15388), as AdaLLaVA's
reference code computes it (``prune_merge`` in ``multimodal_encoder/prumerge_utils.py``).

Per image, with ``N`` patch tokens ``x_j`` and their [CLS] attention ``a_j``:

1. ``a`` is the [CLS] query's softmax attention over all tokens in the vision layer that reads the
   selected features (LLaVA-1.5: layer 23 of CLIP ViT-L/14's 24, which the reference hard-codes),
   computed over the full width as one head: ``softmax(q_cls . k / sqrt(C))``, without the [CLS]
   column.
2. ``r`` is the share of patches whose ``a_j`` is an interquartile-range outlier
   (``a_j > Q3 + 1.5 * (Q3 - Q1)``); the ``int(N * r)`` patches of highest attention are kept,
   highest first (an image without an outlier keeps none).
3. Each kept token ``i`` adds its ``m = min(neighbors, N - 1)`` most key-similar other tokens, kept
   or pruned, weighted by their attention and not normalised: ``x_i + sum_j a_j x_j`` (cosine
   similarity of the patch keys).
4. One extra token is appended: ``sum_j a_j x_j`` over the pruned tokens.

So an image gives ``int(N * r) + 1`` tokens, a number that varies per image (see
:func:`fit_image_tokens`). The merge runs on the vision features, before the projector.
Departures, both measure-zero or batch-1-only: the outlier fence is computed per image in float64
(the reference pools the whole batch through NumPy, which is the same for the batch of one it
evaluates with), and ``m`` is capped at ``N - 1`` (the reference fixes 32 and fails below 33 tokens).

:func:`image_features` and :func:`embed_inputs` give a LLaVA model's input embeddings with its
visual tokens, PruMerged when its config says so.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from adallava_kernels import check_token_ids
from adallava_kernels.checks import check_instance, check_int

__all__ = [
    "cls_attention_and_keys",
    "embed_inputs",
    "fit_image_tokens",
    "image_features",
    "iqr_outliers",
    "kept_tokens",
    "prune_merge",
    "vision_prumerge",
]


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
        scores: `[N]` or `[B, N]` finite floating-point scores, one row per sample.

    Returns:
        A bool mask shaped like `scores`, True where `score > Q3 + 1.5 * (Q3 - Q1)`, with Q1 and Q3
        the row's 25th and 75th percentiles (linear interpolation, as `numpy.percentile`), in float64.
    """
    _check_float("scores", scores, (1, 2))
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite, got NaN or infinite values")
    rows = scores.reshape(-1, scores.shape[-1]).double()
    q = torch.quantile(rows, torch.tensor([0.25, 0.75], dtype=rows.dtype, device=rows.device), dim=-1)
    q1, q3 = q[0].unsqueeze(-1), q[1].unsqueeze(-1)
    return (rows > q3 + 1.5 * (q3 - q1)).reshape(scores.shape)


def kept_tokens(cls_attention: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the indices of the patches PruMerge keeps, highest [CLS] attention first.

    ``cls_attention`` is ``[B, N]``; sample ``b`` keeps ``int(N * r_b)`` patches, ``r_b`` the share
    of its IQR outliers (the reference's arithmetic, which equals the outlier count for N = 576).
    """
    _check_float("cls_attention", cls_attention, (2,))
    n = cls_attention.shape[-1]
    counts = iqr_outliers(cls_attention).sum(dim=-1).tolist()
    return [cls_attention[b].topk(int(n * (c / n))).indices for b, c in enumerate(counts)]


def _merge_sample(x: torch.Tensor, a: torch.Tensor, k: torch.Tensor, kept: torch.Tensor, neighbors: int) -> torch.Tensor:
    """One sample's merged kept tokens and extra token, ``[len(kept) + 1, C]``; all inputs float32."""
    pruned = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    pruned[kept] = False
    extra = (a[pruned, None] * x[pruned]).sum(0, keepdim=True)
    m = min(neighbors, x.shape[0] - 1)
    if kept.numel() == 0 or m == 0:
        return torch.cat([x[kept], extra])
    k = F.normalize(k, dim=-1)
    similarity = k[kept] @ k.T
    similarity[torch.arange(kept.numel(), device=x.device), kept] = float("-inf")  # a token is not its own neighbour
    near = similarity.topk(m, dim=-1).indices  # [K, m]
    merged = x[kept] + (a[near, None] * x[near]).sum(1)
    return torch.cat([merged, extra])


def prune_merge(
    features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, *, neighbors: int = 32
) -> list[torch.Tensor]:
    """PruMerge each sample's visual tokens (see the module docstring for the rule).

    Args:
        features: `[B, N, C]` visual tokens (the vision tower's selected features), any float dtype.
        cls_attention: `[B, N]` attention of the [CLS] query to each patch (``cls_attention_and_keys``).
        keys: `[B, N, Ck]` patch keys from the same vision layer as `cls_attention`.
        neighbors: other tokens each kept token absorbs, at most (the reference: 32); 0 disables merging.

    Returns:
        A list of `B` tensors `[K_b + 1, C]` in the dtype of `features`: the kept tokens, merged, in
        the order of :func:`kept_tokens`, then the extra token. The arithmetic is done in float32.
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
    kept = kept_tokens(cls_attention)
    return [
        _merge_sample(features[b].float(), cls_attention[b].float(), keys[b].float(), kept[b], neighbors)
        .to(features.dtype)
        for b in range(features.shape[0])
    ]


def _reading_layer(vision_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The encoder layer whose input is `hidden_states[layer]`."""
    # Older transformers wrap the tower in `.vision_model`; newer ones hold the encoder directly.
    encoder = getattr(getattr(vision_model, "vision_model", vision_model), "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise ValueError(
            f"vision_model must be a CLIPVisionModel with an encoder, got {type(vision_model).__name__}"
        )
    n = len(encoder.layers)
    # hidden_states[i] is the input of layers[i]; hidden_states[n] (= [-1]) is read by no layer.
    if isinstance(layer, bool) or not isinstance(layer, int) or not (-n - 1 <= layer <= n - 1 and layer != -1):
        raise ValueError(
            f"layer must index hidden_states that an encoder layer reads, i.e. an int in [0, {n - 1}] or "
            f"[-{n + 1}, -2] (PruMerge reads the attention of the layer after the selected features), got {layer!r}"
        )
    return encoder.layers[layer if layer >= 0 else n + 1 + layer]


def _run_capturing_qk(vision_model, pixel_values, layer):
    """Run the tower once; return its output and the q/k projections of the layer reading `hidden_states[layer]`."""
    attn = _reading_layer(vision_model, layer).self_attn
    captured = {}
    handles = [
        attn.q_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        attn.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
    ]
    try:
        outputs = vision_model(pixel_values=pixel_values, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, captured["q"], captured["k"]


def _cls_attention(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = q.float(), k.float()
    scores = (q[:, :1] @ k.transpose(1, 2)) * k.shape[-1] ** -0.5  # [B, 1, N + 1]
    return scores.softmax(dim=-1)[:, 0, 1:], k[:, 1:]


@torch.no_grad()
def cls_attention_and_keys(
    vision_model: torch.nn.Module, pixel_values: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention and patch keys of the vision layer PruMerge reads.

    `layer` indexes `hidden_states` like LLaVA's `vision_feature_layer` (-2 by default); the
    statistics come from the encoder layer that reads those features, `encoder.layers[L]` with
    `hidden_states[L]` its input (for -2, the last layer). Read from the q/k projections'
    outputs, so the result does not depend on the model's `attn_implementation`.

    Args:
        vision_model: a transformers `CLIPVisionModel`, e.g. LLaVA's `model.vision_tower`.
        pixel_values: `[B, 3, H, W]` images, as the model takes them.
        layer: index into `hidden_states`, negative allowed; -1 (read by no layer) is rejected.

    Returns:
        `cls_attention` `[B, N]`: `softmax(q_cls . k / sqrt(C))` over all `N + 1` tokens, with the
        heads' dimensions together as one head of width `C`, without the [CLS] column; and `keys`
        `[B, N, C]`: the patch keys. Both float32.
    """
    _check_float("pixel_values", pixel_values, (4,))
    _, q, k = _run_capturing_qk(vision_model, pixel_values, layer)
    return _cls_attention(q, k)


@torch.no_grad()
def vision_prumerge(
    vision_model: torch.nn.Module, pixel_values: torch.Tensor, layer: int, *, neighbors: int = 32
) -> list[torch.Tensor]:
    """PruMerge of the patch features `hidden_states[layer][:, 1:]`, from one pass of the tower.

    Returns one `[K_b + 1, C]` tensor per image, in the tower's dtype (see :func:`prune_merge`).
    """
    _check_float("pixel_values", pixel_values, (4,))
    outputs, q, k = _run_capturing_qk(vision_model, pixel_values, layer)
    attention, keys = _cls_attention(q, k)
    return prune_merge(outputs.hidden_states[layer][:, 1:], attention, keys, neighbors=neighbors)


# -- a LLaVA model's inputs ---------------------------------------------------------------------


def image_features(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Projected visual tokens of a Llava ``model``, one ``[tokens, hidden]`` tensor per image (with
    PruMerge: the kept tokens, merged, then one extra token, a count that varies per image)."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int for AdaLLaVA, got {layer!r}")
    tower = model.model.vision_tower
    pixel_values = pixel_values.to(model.dtype)
    if config.prumerge:
        if config.vision_feature_select_strategy != "default":
            raise ValueError("prumerge needs vision_feature_select_strategy='default' (patch features, no [CLS])")
        merged = vision_prumerge(tower, pixel_values, layer, neighbors=config.prumerge_neighbors)
        return [model.model.multi_modal_projector(m[None])[0] for m in merged]
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return list(model.model.multi_modal_projector(hidden))


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with the visual tokens scattered over the image placeholders."""
    slots = input_ids == model.config.image_token_id
    # The placeholder's own embedding is never used; a converted LLaVA checkpoint keeps its
    # vocabulary, so its placeholder id lies past the embedding table.
    text_ids = input_ids.masked_fill(slots, 0)
    check_token_ids("input_ids", text_ids, model.get_input_embeddings().num_embeddings)
    embeds = model.get_input_embeddings()(text_ids)
    if pixel_values is None:
        return embeds
    features = torch.cat(image_features(model, pixel_values)).to(embeds.dtype)
    if int(slots.sum()) != features.shape[0]:
        raise ValueError(
            f"input_ids hold {int(slots.sum())} image tokens, but the images give {features.shape[0]} "
            "visual tokens (with PruMerge the count varies per image: see model.fit_image_tokens)"
        )
    return embeds.masked_scatter(slots[..., None], features)


def fit_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, counts: Sequence[int], image_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize each row's run of image tokens to ``counts[b]`` (PruMerge keeps a varying number), left-padding
    the rows back to one length. Each row must hold one contiguous run of image tokens."""
    check_instance("input_ids", input_ids, torch.Tensor, "a torch.Tensor [batch, prompt]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt], got shape {list(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be None or a tensor of input_ids' shape {list(input_ids.shape)}, got "
                         f"{type(attention_mask).__name__}")
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or len(counts) != len(input_ids):
        raise ValueError(f"counts must be a sequence of one image-token count per row ({len(input_ids)}), got "
                         f"{counts!r}")
    for b, count in enumerate(counts):
        check_int(f"counts[{b}]", count, 0)
    check_int("image_token_id", image_token_id, 0)
    check_int("pad_token_id", pad_token_id, 0)
    rows, masks = [], []
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for b, row in enumerate(input_ids):
        keep = attention_mask[b].bool()
        ids = row[keep]
        slots = (ids == image_token_id).nonzero().flatten()
        if slots.numel() == 0 or int(slots[-1] - slots[0]) + 1 != slots.numel():
            raise ValueError(f"input_ids row {b} must hold one contiguous run of image tokens")
        start, stop = int(slots[0]), int(slots[-1]) + 1
        run = ids.new_full((counts[b],), image_token_id)
        rows.append(torch.cat([ids[:start], run, ids[stop:]]))
    width = max(r.numel() for r in rows)
    for r in rows:
        masks.append(torch.cat([r.new_zeros(width - r.numel()), r.new_ones(r.numel())]))
    ids = torch.stack([torch.cat([r.new_full((width - r.numel(),), pad_token_id), r]) for r in rows])
    return ids, torch.stack(masks)
