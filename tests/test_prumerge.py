"""PruMerge against an independent re-implementation of the reference's ``prune_merge``."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.prumerge import cls_attention_and_keys, iqr_outliers, kept_tokens, prune_merge, vision_prumerge

from _tiny_llava import tiny_inputs, tiny_model

NUM_LAYERS = 3
PATCHES = 64  # 64 / 8 squared: more than the reference's 32 neighbours


def _np_outliers(row: np.ndarray) -> np.ndarray:
    q1, q3 = np.percentile(row, [25, 75])
    return row > q3 + 1.5 * (q3 - q1)


def _spiky_scores(gen: torch.Generator, rows: int, n: int, spikes: list[list[int]]) -> torch.Tensor:
    """Uniform [0, 1) scores, whose upper fence is near 1.5, plus spikes of 10+ at known indices."""
    scores = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    for r, idx in enumerate(spikes):
        scores[r, idx] += 10 + torch.rand(len(idx), generator=gen, dtype=torch.float64)
    return scores


def _tiny_clip(attn_implementation: str = "sdpa", seed: int = 9) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        image_size=64, patch_size=8, attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():  # sharper attention than the default 0.02 init, so some patches stand out
        for layer in _encoder(model).layers:
            layer.self_attn.q_proj.weight.normal_(std=0.5)
            layer.self_attn.k_proj.weight.normal_(std=0.5)
    return model


def _encoder(model):
    return getattr(model, "vision_model", model).encoder


# ------------------------------------------------------- the reference, re-implemented (float64)


def reference_statistics(tower, pixel_values, feature_layer):
    """Features, [CLS] attention and keys as the reference reads them: q/k of the layer after the features."""
    with torch.no_grad():
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    layers = _encoder(tower).layers
    reader = layers[len(layers) + 1 + feature_layer] if feature_layer < 0 else layers[feature_layer]
    attn = reader.self_attn
    with torch.no_grad():
        normed = reader.layer_norm1(hidden[feature_layer]).double()
        q = normed @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()
        k = normed @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()
    features = hidden[feature_layer][:, 1:].double()
    width = features.shape[-1]
    cls_attention = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(-1)[:, 0, 1:]
    return features, cls_attention, k[:, 1:]


def reference_prune_merge(features, cls_attention, keys, neighbors=32):
    """One image (a batch of one, as the reference evaluates): kept indices, merged tokens, extra token."""
    x, a, k = features.double(), cls_attention.double(), keys.double()
    n = a.shape[0]
    ratio = _np_outliers(a.numpy()).sum() / n
    kept = a.topk(int(n * ratio)).indices.tolist()
    pruned = sorted(set(range(n)) - set(kept))
    unit = k / k.norm(dim=-1, keepdim=True)
    merged = []
    for position, i in enumerate(kept):
        rest = kept[:position] + kept[position + 1:] + pruned
        similarity = torch.stack([unit[i] @ unit[j] for j in rest])
        near = [rest[t] for t in similarity.topk(min(neighbors, len(rest))).indices.tolist()]
        merged.append(x[i] + sum(a[j] * x[j] for j in near))
    extra = sum(a[j] * x[j] for j in pruned) if pruned else torch.zeros_like(x[0])
    return kept, torch.stack(merged) if merged else x[:0], extra


# ---------------------------------------------------------------------------------------- iqr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_iqr_outliers_match_numpy(dtype):
    gen = torch.Generator().manual_seed(2)
    spikes = [[0], [5, 6, 7], [], [12, 30]]
    scores = _spiky_scores(gen, len(spikes), 37, spikes).to(dtype)
    mask = iqr_outliers(scores)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    for r, idx in enumerate(spikes):
        np.testing.assert_array_equal(mask[r].numpy(), _np_outliers(scores[r].double().numpy()))
        assert mask[r].nonzero().flatten().tolist() == idx


def test_iqr_outliers_fence_is_strict():
    # Q1 = 2, Q3 = 6, fence = 12: the score equal to the fence is not an outlier, 13 is.
    scores = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 12, 13])
    assert iqr_outliers(scores).nonzero().squeeze(1).tolist() == [8]


@pytest.mark.parametrize(
    "scores",
    [torch.rand(2, 3, 4), torch.tensor(1.0), torch.arange(5), torch.rand(0), torch.tensor([1.0, float("nan")])],
    ids=["3d", "0d", "int", "empty", "nan"],
)
def test_iqr_outliers_rejects_bad_scores(scores):
    with pytest.raises(ValueError, match="scores"):
        iqr_outliers(scores)


# --------------------------------------------------------------------------------- prune_merge


def _sample_inputs(seed: int, b: int = 3, n: int = 45, c: int = 24, ck: int = 16):
    gen = torch.Generator().manual_seed(seed)
    spikes = [torch.randperm(n, generator=gen)[: 2 + r].tolist() for r in range(b)]
    attn = _spiky_scores(gen, b, n, spikes).float().softmax(dim=-1)
    return torch.randn(b, n, c, generator=gen), attn, torch.randn(b, n, ck, generator=gen)


@pytest.mark.parametrize("neighbors", [0, 1, 5, 32, 44, 1000])
def test_prune_merge_equals_the_reference_on_given_statistics(neighbors):
    features, attn, keys = _sample_inputs(seed=10 + neighbors)
    out = prune_merge(features, attn, keys, neighbors=neighbors)
    kept = kept_tokens(attn)
    for b, merged in enumerate(out):
        ref_kept, ref_merged, ref_extra = reference_prune_merge(features[b], attn[b], keys[b], neighbors)
        assert kept[b].tolist() == ref_kept and len(ref_kept) == 2 + b
        assert merged.shape == (len(ref_kept) + 1, features.shape[-1]) and merged.dtype == torch.float32
        torch.testing.assert_close(merged[:-1].double(), ref_merged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged[-1].double(), ref_extra, atol=1e-5, rtol=1e-5)


def test_prune_merge_without_outliers_keeps_only_the_extra_token():
    gen = torch.Generator().manual_seed(3)
    features, keys = torch.randn(1, 50, 8, generator=gen), torch.randn(1, 50, 4, generator=gen)
    attn = torch.full((1, 50), 1 / 50)
    (out,) = prune_merge(features, attn, keys)
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[0], features[0].sum(0) / 50)


def test_prune_merge_preserves_bf16():
    features, attn, keys = _sample_inputs(seed=6)
    out = prune_merge(features.bfloat16(), attn.bfloat16(), keys.bfloat16())
    ref = prune_merge(features.bfloat16().float(), attn.bfloat16().float(), keys.bfloat16().float())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b.bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda f, a, k: (f[0], a, k), "features"),
        (lambda f, a, k: (f.long(), a, k), "features"),
        (lambda f, a, k: (f, a[:, 1:], k), "cls_attention"),
        (lambda f, a, k: (f, a[:2], k), "cls_attention"),
        (lambda f, a, k: (f, a, k[:, :-1]), "keys"),
        (lambda f, a, k: (f, a, k[0]), "keys"),
    ],
    ids=["features-2d", "features-int", "attn-N", "attn-B", "keys-N", "keys-2d"],
)
def test_prune_merge_rejects_mismatched_inputs(change, name):
    with pytest.raises(ValueError, match=name):
        prune_merge(*change(*_sample_inputs(seed=7)))


@pytest.mark.parametrize("neighbors", [-1, 2.0, True])
def test_prune_merge_rejects_bad_neighbors(neighbors):
    with pytest.raises(ValueError, match="neighbors"):
        prune_merge(*_sample_inputs(seed=8), neighbors=neighbors)


# ------------------------------------------------------------------------ on a vision tower


@pytest.mark.parametrize("feature_layer", [-2, -3, 1])
def test_vision_prumerge_equals_the_reference_on_a_synthetic_tower(feature_layer):
    tower = _tiny_clip()
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    attention, keys = cls_attention_and_keys(tower, pixels, feature_layer)
    out = vision_prumerge(tower, pixels, feature_layer)
    kept = kept_tokens(attention)
    features, ref_attention, ref_keys = reference_statistics(tower, pixels, feature_layer)
    torch.testing.assert_close(attention.double(), ref_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys.double(), ref_keys, atol=1e-5, rtol=1e-5)
    assert any(k.numel() for k in kept)
    for b in range(pixels.shape[0]):
        ref_kept, ref_merged, ref_extra = reference_prune_merge(features[b], ref_attention[b], ref_keys[b])
        assert kept[b].tolist() == ref_kept
        assert out[b].shape == (len(ref_kept) + 1, 32)
        torch.testing.assert_close(out[b][:-1].double(), ref_merged, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[b][-1].double(), ref_extra, atol=1e-4, rtol=1e-4)


def test_model_image_features_project_the_reference_tokens_and_fit_the_prompt():
    model = tiny_model("L", prumerge=True)
    _, pixels = tiny_inputs()
    with torch.no_grad():
        tokens = model.image_features(pixels)
        tower = model.model.vision_tower
        for b, image in enumerate(tokens):
            features, attention, keys = reference_statistics(tower, pixels[b:b + 1], -2)
            kept, merged, extra = reference_prune_merge(features[0], attention[0], keys[0])
            expected = model.model.multi_modal_projector(torch.cat([merged, extra[None]]).float())
            assert image.shape == (len(kept) + 1, model.config.text_config.hidden_size)
            torch.testing.assert_close(image, expected, atol=1e-4, rtol=1e-4)


def test_cls_attention_and_keys_independent_of_attn_implementation():
    eager, sdpa = _tiny_clip("eager"), _tiny_clip("sdpa")
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    for a, b in zip(cls_attention_and_keys(sdpa, pixel_values, -2), cls_attention_and_keys(eager, pixel_values, -2)):
        torch.testing.assert_close(a, b)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_cls_attention_and_keys_removes_hooks_when_forward_fails():
    model = _tiny_clip()
    cls_attention_and_keys(model, torch.randn(1, 3, 64, 64), -2)  # transformers adds its own hooks on a first call
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError):
        cls_attention_and_keys(model, torch.randn(1, 4, 64, 64), -2)  # 4 channels: conv fails
    assert _hook_count(model) == hooks_before


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS, -NUM_LAYERS - 2, 1.0])
def test_cls_attention_and_keys_rejects_a_layer_no_encoder_layer_reads(layer):
    with pytest.raises(ValueError, match="layer must index hidden_states"):
        cls_attention_and_keys(_tiny_clip(), torch.randn(1, 3, 64, 64), layer)


def test_cls_attention_and_keys_rejects_bad_inputs():
    model = _tiny_clip()
    with pytest.raises(ValueError, match="pixel_values"):
        cls_attention_and_keys(model, torch.randn(3, 64, 64), -2)
    with pytest.raises(ValueError, match="vision_model"):
        cls_attention_and_keys(torch.nn.Linear(2, 2), torch.randn(1, 3, 64, 64), -2)
