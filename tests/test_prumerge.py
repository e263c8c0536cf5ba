import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.prumerge import cls_attention_and_keys, iqr_outliers, prune_merge

NUM_LAYERS = 3


def _np_outliers(row: np.ndarray) -> np.ndarray:
    q1, q3 = np.percentile(row, [25, 75])
    return row > q3 + 1.5 * (q3 - q1)


def _spiky_scores(gen: torch.Generator, rows: int, n: int, spikes: list[list[int]]) -> torch.Tensor:
    """Uniform [0, 1) scores, whose upper fence is near 1.5, plus spikes of 10+ at known indices."""
    scores = torch.rand(rows, n, generator=gen, dtype=torch.float64)
    for r, idx in enumerate(spikes):
        scores[r, idx] += 10 + torch.rand(len(idx), generator=gen, dtype=torch.float64)
    return scores


# ---------------------------------------------------------------------------------------- iqr


def test_iqr_outliers_keeps_exactly_the_known_outliers():
    gen = torch.Generator().manual_seed(1)
    spikes = [3, 17, 40, 41, 58]
    scores = _spiky_scores(gen, 1, 61, [spikes])[0]
    mask = iqr_outliers(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.nonzero().squeeze(1).tolist() == spikes
    np.testing.assert_array_equal(mask.numpy(), _np_outliers(scores.numpy()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_iqr_outliers_batched_rows_match_numpy(dtype):
    gen = torch.Generator().manual_seed(2)
    spikes = [[0], [5, 6, 7], [], [12, 30]]
    scores = _spiky_scores(gen, len(spikes), 37, spikes).to(dtype)
    mask = iqr_outliers(scores)
    assert mask.shape == scores.shape
    for r, idx in enumerate(spikes):
        expected = _np_outliers(scores[r].double().numpy())
        if not idx:  # no outlier: the fallback keeps the row's maximum
            expected[scores[r].argmax()] = True
        np.testing.assert_array_equal(mask[r].numpy(), expected)
        assert mask[r].sum() == max(len(idx), 1)


def test_iqr_outliers_fence_is_strict():
    # Q1 = 2, Q3 = 6, fence = 12: the score equal to the fence is not an outlier, 13 is.
    scores = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 12, 13])
    assert iqr_outliers(scores).nonzero().squeeze(1).tolist() == [8]
    np.testing.assert_array_equal(iqr_outliers(scores).numpy(), _np_outliers(scores.double().numpy()))


def test_iqr_outliers_without_outliers_keeps_the_maximum():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 50, generator=gen)
    assert not _np_outliers(scores[0].double().numpy()).any()
    mask = iqr_outliers(scores)
    assert mask.sum(dim=-1).tolist() == [1, 1]
    assert mask.float().argmax(dim=-1).tolist() == scores.argmax(dim=-1).tolist()
    assert iqr_outliers(torch.tensor([0.7])).tolist() == [True]


@pytest.mark.parametrize(
    "scores",
    [
        torch.rand(2, 3, 4), torch.tensor(1.0), torch.arange(5), torch.rand(0),
        torch.tensor([1.0, float("nan")]),
    ],
    ids=["3d", "0d", "int", "empty", "nan"],
)
def test_iqr_outliers_rejects_bad_scores(scores):
    with pytest.raises(ValueError, match="scores"):
        iqr_outliers(scores)


# ---------------------------------------------------------------------------------- prune_merge


def _merge_reference(x, k, attn, neighbors):
    """Loop-based float64 PruMerge for one sample: (kept indices, merged tokens)."""
    x, k = x.double(), k.double()
    keep = _np_outliers(attn.double().numpy())
    if not keep.any():
        keep[int(attn.argmax())] = True
    kept = [i for i in range(len(keep)) if keep[i]]
    pruned = [j for j in range(len(keep)) if not keep[j]]
    merged = []
    for i in kept:
        sims = [float(k[i] @ k[j] / (k[i].norm() * k[j].norm())) for j in pruned]
        order = sorted(range(len(pruned)), key=lambda t: -sims[t])[: min(neighbors, len(pruned))]
        total, weight = x[i].clone(), 1.0
        for t in order:
            s = max(sims[t], 0.0)
            total += s * x[pruned[t]]
            weight += s
        merged.append(total / weight)
    return kept, torch.stack(merged)


def _sample_inputs(seed: int, b: int = 3, n: int = 45, c: int = 24, ck: int = 16):
    gen = torch.Generator().manual_seed(seed)
    spikes = [torch.randperm(n, generator=gen)[: 2 + r].tolist() for r in range(b)]
    attn = _spiky_scores(gen, b, n, spikes).float().softmax(dim=-1)
    features = torch.randn(b, n, c, generator=gen)
    keys = torch.randn(b, n, ck, generator=gen)
    return features, attn, keys, spikes


@pytest.mark.parametrize("neighbors", [0, 1, 5, 32, 1000])
def test_prune_merge_matches_loop_reference(neighbors):
    features, attn, keys, spikes = _sample_inputs(seed=10 + neighbors)
    out = prune_merge(features, attn, keys, neighbors=neighbors)
    assert len(out) == features.shape[0]
    for b, merged in enumerate(out):
        kept, expected = _merge_reference(features[b], keys[b], attn[b], neighbors)
        assert kept == sorted(spikes[b])
        assert merged.shape == (len(kept), features.shape[-1]) and merged.dtype == torch.float32
        torch.testing.assert_close(merged.double(), expected, atol=1e-5, rtol=1e-5)
    if neighbors == 0:
        for b, merged in enumerate(out):
            torch.testing.assert_close(merged, features[b, sorted(spikes[b])], atol=0, rtol=0)


def test_prune_merge_neighbors_cap_saturates_at_the_pruned_count():
    features, attn, keys, _ = _sample_inputs(seed=4)
    num_pruned = features.shape[1] - int(iqr_outliers(attn).sum(dim=-1).max())
    capped = prune_merge(features, attn, keys, neighbors=num_pruned + 100)
    exact = prune_merge(features, attn, keys, neighbors=features.shape[1])
    fewer = prune_merge(features, attn, keys, neighbors=2)
    for a, b, c in zip(capped, exact, fewer):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.allclose(a, c)


def test_prune_merge_single_token_is_kept_unchanged():
    gen = torch.Generator().manual_seed(5)
    features, keys = torch.randn(2, 1, 8, generator=gen), torch.randn(2, 1, 4, generator=gen)
    out = prune_merge(features, torch.ones(2, 1), keys)
    for b in range(2):
        torch.testing.assert_close(out[b], features[b], atol=0, rtol=0)


def test_prune_merge_preserves_bf16():
    features, attn, keys, _ = _sample_inputs(seed=6)
    features, keys = features.bfloat16(), keys.bfloat16()
    out = prune_merge(features, attn.bfloat16(), keys)
    ref = prune_merge(features.float(), attn.bfloat16().float(), keys.float())
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
    features, attn, keys, _ = _sample_inputs(seed=7)
    with pytest.raises(ValueError, match=name):
        prune_merge(*change(features, attn, keys))


@pytest.mark.parametrize("neighbors", [-1, 2.0, True])
def test_prune_merge_rejects_bad_neighbors(neighbors):
    features, attn, keys, _ = _sample_inputs(seed=8)
    with pytest.raises(ValueError, match="neighbors"):
        prune_merge(features, attn, keys, neighbors=neighbors)


# ------------------------------------------------------------------------ cls_attention_and_keys


def _tiny_clip(attn_implementation: str) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        image_size=32, patch_size=8, attn_implementation=attn_implementation,
    )
    torch.manual_seed(9)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():  # sharper attention than the default 0.02 init, so rows differ
        for layer in model.encoder.layers:
            layer.self_attn.q_proj.weight.normal_(std=0.3)
            layer.self_attn.k_proj.weight.normal_(std=0.3)
    return model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# (layer as an index into hidden_states, encoder layer that produces hidden_states[layer])
LAYERS = [(-1, 2), (-2, 1), (-3, 0), (1, 0), (2, 1), (3, 2)]


@pytest.mark.parametrize("layer, encoder_index", LAYERS, ids=[f"layer{l}" for l, _ in LAYERS])
def test_cls_attention_and_keys_match_eager_attentions(layer, encoder_index):
    model = _tiny_clip("eager")
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    produced, keys_out = [], []
    enc_layer = model.encoder.layers[encoder_index]
    handles = [
        enc_layer.register_forward_hook(lambda m, a, out: produced.append(out)),
        enc_layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys_out.append(out)),
    ]
    with torch.no_grad():
        ref = model(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()
    torch.testing.assert_close(produced[0], ref.hidden_states[layer])  # the documented mapping
    hooks_before = _hook_count(model)

    cls_attention, keys = cls_attention_and_keys(model, pixel_values, layer)

    assert _hook_count(model) == hooks_before
    assert cls_attention.shape == (2, 16) and keys.shape == (2, 16, 32)
    weights = ref.attentions[encoder_index]  # [B, heads, 17, 17]
    torch.testing.assert_close(cls_attention, weights[:, :, 0, 1:].mean(dim=1))
    torch.testing.assert_close(cls_attention.sum(-1) + weights[:, :, 0, 0].mean(dim=1), torch.ones(2))
    torch.testing.assert_close(keys, keys_out[0][:, 1:])


def test_cls_attention_and_keys_independent_of_attn_implementation():
    eager, sdpa = _tiny_clip("eager"), _tiny_clip("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    expected = cls_attention_and_keys(eager, pixel_values, -2)
    for a, b in zip(cls_attention_and_keys(sdpa, pixel_values, -2), expected):
        torch.testing.assert_close(a, b)


def test_cls_attention_and_keys_removes_hook_when_forward_fails():
    model = _tiny_clip("sdpa")
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError):
        cls_attention_and_keys(model, torch.randn(1, 4, 32, 32), -2)  # 4 channels: conv fails
    assert _hook_count(model) == hooks_before


@pytest.mark.parametrize("layer", [0, NUM_LAYERS + 1, -NUM_LAYERS - 1, 1.0])
def test_cls_attention_and_keys_rejects_bad_layer(layer):
    with pytest.raises(ValueError, match="layer"):
        cls_attention_and_keys(_tiny_clip("sdpa"), torch.randn(1, 3, 32, 32), layer)


def test_cls_attention_and_keys_rejects_bad_inputs():
    model = _tiny_clip("sdpa")
    with pytest.raises(ValueError, match="pixel_values"):
        cls_attention_and_keys(model, torch.randn(3, 32, 32), -2)
    with pytest.raises(ValueError, match="vision_model"):
        cls_attention_and_keys(torch.nn.Linear(2, 2), torch.randn(1, 3, 32, 32), -2)
