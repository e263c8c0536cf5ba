import dataclasses
import json

import pytest
import torch

from _shapes import GQA6 as TINY

from adallava_kernels import ExecutionPlan, ModelShape, neuron_groups


def test_groups_split_remainder_over_first_groups():
    groups = neuron_groups(11008, 32)
    assert {len(g) for g in groups} == {344}
    groups = neuron_groups(13824, 40)  # 13824 = 40 * 345 + 24
    assert [len(g) for g in groups] == [346] * 24 + [345] * 16
    assert groups[0].start == 0 and groups[-1].stop == 13824
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))


@pytest.mark.parametrize("num_groups", [0, 521])
def test_groups_out_of_range(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        neuron_groups(520, num_groups)


def test_full_plan():
    plan = ExecutionPlan.full(TINY)
    assert plan.layer_mask == (True,) * 4
    assert plan.heads[0] == tuple(range(6))
    assert plan.neurons[3] == tuple(range(520))
    assert plan.kv_heads(0) == (0, 1)


def test_from_layer_mask():
    plan = ExecutionPlan.from_layer_mask(torch.tensor([1, 0, 1, 0]), TINY)
    assert plan.layer_mask == (True, False, True, False)
    assert plan.heads[1] == () and plan.neurons[1] == ()
    assert plan.layer(1).is_active is False
    assert plan == ExecutionPlan.from_layer_mask([True, False, True, False], TINY)


def test_from_switches_expands_groups_and_kv_heads():
    s = torch.zeros(4, 2, 6, dtype=torch.int64)
    s[0] = 1
    s[2, 0, 4] = 1  # one head of the second KV group
    s[2, 1, [0, 5]] = 1
    plan = ExecutionPlan.from_switches(s, TINY)
    groups = neuron_groups(520, 6)  # 87, 87, 87, 87, 86, 86
    assert plan.layer_mask == (True, False, True, False)
    assert plan.heads[2] == (4,)
    assert plan.kv_heads(2) == (1,)
    assert plan.neurons[2] == tuple(groups[0]) + tuple(groups[5])
    assert plan.neurons[0] == tuple(range(520))


def test_layer_tensors_are_int32_and_built_once():
    plan = ExecutionPlan(TINY, [[1, 4, 5], [], [0], []], [[3, 7], [], [], [519]])
    layer = plan.layer(0)
    assert layer.heads.dtype == torch.int32 and layer.heads.tolist() == [1, 4, 5]
    assert layer.kv_heads.tolist() == [0, 1]
    # heads 1 -> kv 0 (position 0); heads 4, 5 -> kv 1 (position 1)
    assert layer.head_to_kv.tolist() == [0, 1, 1]
    assert layer.neurons.tolist() == [3, 7]
    assert plan.layer(0) is layer
    assert plan.layers("cpu") is plan.layers(torch.device("cpu"))
    # A layer with neurons only still runs (its MLP), with no KV.
    assert plan.layer_mask == (True, False, True, True)
    assert plan.layer(3).num_kv_heads == 0


def test_json_round_trip():
    s = torch.randint(0, 2, (4, 2, 6))
    plan = ExecutionPlan.from_switches(s, TINY)
    text = plan.to_json()
    assert ExecutionPlan.from_json(text) == plan
    assert ExecutionPlan.from_json(text, shape=TINY) == plan
    # Neuron groups are stored as ranges, not one int per neuron.
    assert len(text) < 2000
    several = ExecutionPlan(TINY, [range(TINY.num_heads)] * TINY.num_layers,
                            [[0, 1, 2, 5, 6, TINY.intermediate_size - 1], range(4, 9), [], [3]])
    assert ExecutionPlan.from_json(several.to_json()) == several


def test_equality_and_hash():
    a = ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY)
    b = ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY)
    c = ExecutionPlan.from_layer_mask([1, 1, 1, 1], TINY)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY, num_groups=4)


def test_fingerprint_is_the_content():
    a = ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY)
    b = ExecutionPlan(TINY, [list(h) for h in a.heads], [list(n) for n in a.neurons])
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 32
    # Any difference in content: one neuron, the groups, the model's shape.
    one_neuron = ExecutionPlan(TINY, a.heads, [a.neurons[0][:-1]] + list(a.neurons[1:]))
    other_groups = ExecutionPlan.from_layer_mask([1, 1, 0, 1], TINY, num_groups=4)
    wider = dataclasses.replace(TINY, vocab_size=TINY.vocab_size + 1)
    other_shape = ExecutionPlan(wider, a.heads, a.neurons)
    prints = {p.fingerprint for p in (a, one_neuron, other_groups, other_shape)}
    assert len(prints) == 4
    # Plans with different fingerprints are unequal without a comparison of their indices.
    assert a != one_neuron and a == b


def _plans_of_every_kind():
    g = torch.Generator().manual_seed(0)
    return {
        "full": ExecutionPlan.full(TINY),
        "layer-mask": ExecutionPlan.from_layer_mask([0, 1, 1, 0], TINY),
        "switches": ExecutionPlan.from_switches(torch.randint(0, 2, (4, 2, 6), generator=g), TINY),
        "lists": ExecutionPlan(TINY, [[1, 4, 5], [], [0], range(6)], [[3, 7, 8, 9, 519], [], [], range(0, 520, 3)]),
        "empty": ExecutionPlan(TINY, [[]] * 4, [[]] * 4),
    }


@pytest.mark.parametrize("kind", ["full", "layer-mask", "switches", "lists", "empty"])
def test_unit_masks_are_the_plans_heads_and_neurons(kind):
    plan = _plans_of_every_kind()[kind]
    heads, neurons = plan.unit_masks()
    assert heads.dtype == neurons.dtype == torch.bool
    assert heads.shape == (4, 6) and neurons.shape == (4, 520)
    for i in range(TINY.num_layers):
        assert tuple(heads[i].nonzero().flatten().tolist()) == plan.heads[i]
        assert tuple(neurons[i].nonzero().flatten().tolist()) == plan.neurons[i]
    # Built once per device, like the index tensors.
    assert plan.unit_masks("cpu") is plan.unit_masks(torch.device("cpu"))


@pytest.mark.parametrize("kind", ["full", "layer-mask", "switches", "lists", "empty"])
def test_unit_counts_are_the_lengths_of_the_plans_lists(kind):
    plan = _plans_of_every_kind()[kind]
    assert plan.unit_counts() == (tuple(map(len, plan.heads)), tuple(map(len, plan.neurons)))


@pytest.mark.parametrize("kind", ["full", "layer-mask", "switches", "lists", "empty"])
def test_layer_tensors_follow_their_definitions(kind):
    plan = _plans_of_every_kind()[kind]
    per_kv = TINY.heads_per_kv_head
    for i, layer in enumerate(plan.layers()):
        heads, kv = list(plan.heads[i]), list(plan.kv_heads(i))
        assert layer.index == i and layer.heads.tolist() == heads and layer.kv_heads.tolist() == kv
        assert layer.head_to_kv.tolist() == [kv.index(h // per_kv) for h in heads]
        assert layer.q_features.tolist() == [h * 32 + d for h in heads for d in range(32)]
        assert layer.kv_features.tolist() == [k * 32 + d for k in kv for d in range(32)]
        assert layer.neurons.tolist() == list(plan.neurons[i])
        assert all(t.dtype == torch.int32 for t in (layer.heads, layer.kv_heads, layer.head_to_kv,
                                                    layer.q_features, layer.kv_features, layer.neurons))


def test_a_plan_keeps_no_view_of_its_inputs():
    switches = torch.ones(1, 2, 6, dtype=torch.bool)
    shape = dataclasses.replace(TINY, num_layers=1)
    plan = ExecutionPlan.from_switches(switches, shape)
    switches.zero_()
    assert plan.heads == (tuple(range(6)),) and plan.unit_masks()[0].all()


def test_whole_layers_share_one_copy_of_their_indices():
    layers = ExecutionPlan.full(TINY).layers()
    assert layers[0].neurons is layers[3].neurons and layers[0].q_features is layers[3].q_features


def test_equal_content_is_an_equal_plan_whatever_the_constructor():
    switches = torch.zeros(4, 2, 6, dtype=torch.bool)
    switches[0] = True
    switches[2, 0, [1, 4]] = True
    switches[2, 1, [1, 2, 5]] = True  # groups 1 and 2 are adjacent: one run of neurons
    groups = neuron_groups(520, 6)
    layer2 = list(groups[1]) + list(groups[2]) + list(groups[5])
    plans = [
        ExecutionPlan.from_switches(switches, TINY),
        ExecutionPlan(TINY, [range(6), [], [1, 4], []], [range(520), [], layer2, []]),
        ExecutionPlan(TINY, [torch.arange(6), torch.tensor([], dtype=torch.int64), torch.tensor([1, 4]), ()],
                      [torch.arange(520, dtype=torch.int32), [], torch.tensor(layer2), ()]),
    ]
    plans.append(ExecutionPlan.from_json(plans[0].to_json()))
    for plan in plans[1:]:
        assert plan == plans[0] and hash(plan) == hash(plans[0]) and plan.fingerprint == plans[0].fingerprint
    # One neuron more (group 3's first, next to the run of groups 1 and 2) is another plan.
    joined = sorted(layer2 + [groups[2].stop])
    other = ExecutionPlan(TINY, plans[0].heads, [range(520), [], joined, []])
    assert other != plans[0] and other.fingerprint != plans[0].fingerprint


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, match",
    [
        ([1, 0, 1], r"mask must have shape \[4\]"),
        ([[1, 0, 1, 1]], r"mask must have shape \[4\]"),
        ([1, 0, 2, 1], "mask must be 0/1, found 2"),
        ([1.0, 0.5, 1.0, 1.0], "mask must be 0/1, found 0.5"),
        ([1.0, float("nan"), 1.0, 1.0], "mask must be 0/1, found nan"),
    ],
)
def test_bad_layer_mask(mask, match):
    with pytest.raises(ValueError, match=match):
        ExecutionPlan.from_layer_mask(mask, TINY)


def test_bad_switches():
    with pytest.raises(ValueError, match=r"switches must have shape \[4, 2, 6\], got \[4, 2, 5\]"):
        ExecutionPlan.from_switches(torch.ones(4, 2, 5), TINY)
    bad = torch.ones(4, 2, 6)
    bad[1, 1, 3] = -1
    with pytest.raises(ValueError, match="switches must be 0/1, found -1"):
        ExecutionPlan.from_switches(bad, TINY)


@pytest.mark.parametrize(
    "heads, match",
    [
        ([[0, 6], [], [], []], r"heads\[0\]: index 6 out of range \[0, 6\)"),
        ([[], [-1], [], []], r"heads\[1\]: index -1 out of range"),
        ([[], [], [2, 2], []], r"heads\[2\]: index 2 is duplicated"),
        ([[], [], [], [3, 1]], r"heads\[3\] must be sorted ascending: 3 comes before 1"),
        ([[0.0], [], [], []], r"heads\[0\] must hold ints"),
        ([torch.tensor([[0]]), [], [], []], r"heads\[0\] must be 1-D"),
        ([torch.tensor([0.0]), [], [], []], r"heads\[0\] must hold integers"),
        ([[0], [], []], "heads must have one entry per layer"),
    ],
)
def test_bad_head_indices(heads, match):
    neurons = [[]] * len(heads)
    with pytest.raises(ValueError, match=match):
        ExecutionPlan(TINY, heads, neurons)


@pytest.mark.parametrize(
    "neurons, match",
    [
        ([[520], [], [], []], r"neurons\[0\]: index 520 out of range \[0, 520\)"),
        ([[], [5, 5], [], []], r"neurons\[1\]: index 5 is duplicated"),
        ([[], [], [9, 8], []], r"neurons\[2\] must be sorted ascending"),
    ],
)
def test_bad_neuron_indices(neurons, match):
    with pytest.raises(ValueError, match=match):
        ExecutionPlan(TINY, [[]] * 4, neurons)


def test_plan_for_another_shape():
    other = ModelShape(**(TINY.to_dict() | {"intermediate_size": 600}))
    plan = ExecutionPlan.full(TINY)
    with pytest.raises(ValueError, match="plan is for ModelShape"):
        plan.check_shape(other)
    with pytest.raises(ValueError, match="plan is for ModelShape"):
        ExecutionPlan.from_json(plan.to_json(), shape=other)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(version=99), "version 1"),
        (lambda d: d["layers"][0].update(neurons=[[5, 5]]), r"layers\[0\].neurons: empty or reversed range"),
        (lambda d: d["layers"][0].update(neurons=[5]), r"layers\[0\].neurons must be a list of \[start, stop\]"),
        (lambda d: d["layers"][1].update(heads=[7]), r"heads\[1\]: index 7 out of range"),
        # Several ranges make one index array: overlapping, unordered or too long ranges are refused by name.
        (lambda d: d["layers"][2].update(neurons=[[0, 4], [3, 6]]), r"neurons\[2\]: index 3 is duplicated"),
        (lambda d: d["layers"][2].update(neurons=[[6, 8], [0, 2]]), r"neurons\[2\] must be sorted ascending"),
        (lambda d: d["layers"][2].update(neurons=[[0, 2], [4, 10 ** 6]]), r"neurons\[2\]: index \d+ out of range"),
        (lambda d: d["layers"][2].update(neurons=[[True, 3]]), r"layers\[2\].neurons must be a list of \[start, stop\] int"),
    ],
)
def test_bad_json(mutate, match):
    data = json.loads(ExecutionPlan.full(TINY).to_json())
    mutate(data)
    with pytest.raises(ValueError, match=match):
        ExecutionPlan.from_json(json.dumps(data))


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match="layer index 4 out of range"):
        ExecutionPlan.full(TINY).layer(4)
