import math

import pytest
from _shapes import GQA6

from adallava_kernels import ExecutionPlan, ModelShape, cost, get_device, get_shape
from adallava_kernels.cost import OP_NAMES, Precision

# hidden 8, 2 layers, 2 heads of dim 4 over 1 KV head, 12 neurons, vocab 10.
SMALL = ModelShape(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=12, vocab_size=10)

# Prefill over T = 3 tokens, counted by hand (2 FLOPs per multiply-add):
PREFILL_LAYER = {
    "attn_norm": 7 * 3 * 8,          # 168
    "q_proj": 2 * 3 * 8 * 8,         # 384
    "k_proj": 2 * 3 * 8 * 4,         # 192: one KV head of dim 4
    "v_proj": 2 * 3 * 8 * 4,         # 192
    "qk_matmul": 2 * 3 * 3 * 4 * 2,  # 144: T x T scores of dim 4, 2 heads
    "softmax": 5 * 3 * 3 * 2,        # 90
    "sv_matmul": 2 * 3 * 3 * 4 * 2,  # 144
    "o_proj": 2 * 3 * 8 * 8,         # 384
    "attn_add": 3 * 8,               # 24
    "mlp_norm": 7 * 3 * 8,           # 168
    "gate_proj": 2 * 3 * 8 * 12,     # 576
    "up_proj": 2 * 3 * 8 * 12,       # 576
    "mlp_act": 2 * 3 * 12,           # 72
    "down_proj": 2 * 3 * 12 * 8,     # 576
    "mlp_add": 3 * 8,                # 24
}
LM_HEAD = 2 * 8 * 10  # 160, last position only

# One decode step whose token attends to 5 positions:
DECODE_LAYER = {
    "attn_norm": 56, "q_proj": 128, "k_proj": 64, "v_proj": 64,
    "qk_matmul": 2 * 5 * 4 * 2, "softmax": 5 * 5 * 2, "sv_matmul": 2 * 5 * 4 * 2,
    "o_proj": 128, "attn_add": 8,
    "mlp_norm": 56, "gate_proj": 192, "up_proj": 192, "mlp_act": 24, "down_proj": 192, "mlp_add": 8,
}


def test_prefill_flops_by_hand():
    assert sum(PREFILL_LAYER.values()) == 3714
    assert cost.prefill_flops(SMALL, 3) == 2 * 3714 + LM_HEAD == 7588
    by_op = cost.prefill_cost(SMALL, 3).by_op()
    assert list(by_op) == list(OP_NAMES)
    for name, flops in PREFILL_LAYER.items():
        assert by_op[name].flops == 2 * flops, name
    assert by_op["lm_head"].flops == LM_HEAD


def test_decode_flops_by_hand():
    assert sum(DECODE_LAYER.values()) == 1322
    assert cost.decode_flops(SMALL, 5) == 2 * 1322 + LM_HEAD == 2804
    by_op = cost.decode_cost(SMALL, 5).by_op()
    for name, flops in DECODE_LAYER.items():
        assert by_op[name].flops == 2 * flops, name


def test_batch_scales_everything_but_weights():
    one, four = cost.prefill_cost(SMALL, 3), cost.prefill_cost(SMALL, 3, batch_size=4)
    assert four.flops == 4 * one.flops
    assert four.by_op()["q_proj"].weight_bytes == one.by_op()["q_proj"].weight_bytes


def test_bytes_by_hand():
    ops = cost.prefill_cost(SMALL, 3).layers[0]
    q = next(op for op in ops if op.name == "q_proj")
    # bf16: weight 8*8*2, read 3*8*2, write 3*8*2
    assert (q.weight_bytes, q.act_load_bytes, q.act_store_bytes) == (128, 48, 48)
    k = next(op for op in ops if op.name == "k_proj")
    assert (k.act_store_bytes, k.kv_store_bytes) == (0, 3 * 4 * 2)  # K goes to the cache
    qk = next(op for op in ops if op.name == "qk_matmul")
    assert qk.kv_load_bytes == 3 * 4 * 2 and qk.act_store_bytes == 3 * 3 * 2 * 2
    fp32 = cost.prefill_cost(SMALL, 3, precision=Precision(4, 4, 4)).layers[0]
    assert next(op for op in fp32 if op.name == "q_proj").bytes == 2 * q.bytes


def test_head_plan_scales_attention_terms():
    full = cost.prefill_cost(SMALL, 3).by_op()
    plan = ExecutionPlan(SMALL, [[1], [1]], [range(12)] * 2)
    half = cost.prefill_cost(SMALL, 3, plan).by_op()
    for name in ("q_proj", "o_proj", "qk_matmul", "softmax", "sv_matmul"):
        assert half[name].flops == full[name].flops / 2, name
    # Head 1 still needs the one KV head, so k/v are unchanged.
    for name in ("k_proj", "v_proj", "attn_norm", "attn_add", "gate_proj", "mlp_act"):
        assert half[name].flops == full[name].flops, name


def test_neuron_plan_scales_mlp_terms():
    full = cost.decode_cost(SMALL, 5).by_op()
    plan = ExecutionPlan(SMALL, [range(2)] * 2, [[0, 1, 2], range(12)])
    part = cost.decode_cost(SMALL, 5, plan).by_op()
    # Layer 0 keeps 3 of 12 neurons: (1/4 + 1) / 2 of the full count.
    for name in ("gate_proj", "up_proj", "mlp_act", "down_proj"):
        assert part[name].flops == full[name].flops * (0.25 + 1) / 2, name
    assert part["q_proj"].flops == full["q_proj"].flops


def test_skipped_layers_and_empty_sub_blocks_cost_nothing():
    shape = get_shape("llava-7b")
    full = cost.prefill_cost(shape, 700)
    half = cost.prefill_cost(shape, 700, ExecutionPlan.from_layer_mask([1] * 16 + [0] * 16, shape))
    assert half.layer_flops()[16:] == [0.0] * 16
    assert half.flops - full.lm_head.flops == pytest.approx((full.flops - full.lm_head.flops) / 2)
    mlp_only = ExecutionPlan(SMALL, [[], []], [range(12)] * 2)
    by_op = cost.prefill_cost(SMALL, 3, mlp_only).by_op()
    for name in cost.ATTENTION_OPS:
        assert by_op[name].flops == 0 and by_op[name].bytes == 0, name
    assert by_op["mlp_norm"].flops == 2 * PREFILL_LAYER["mlp_norm"]


def test_plan_for_another_shape_is_rejected():
    with pytest.raises(ValueError, match="plan is for"):
        cost.prefill_flops(get_shape("tiny"), 10, ExecutionPlan.full(SMALL))


@pytest.mark.parametrize("call", [
    lambda: cost.prefill_flops(SMALL, 0),
    lambda: cost.decode_flops(SMALL, 0),
    lambda: cost.prefill_flops(SMALL, 3, batch_size=0),
    lambda: cost.kv_cache_bytes(SMALL, 3, page_size=0),
])
def test_bad_counts(call):
    with pytest.raises(ValueError, match="must be an int >= "):
        call()


def test_kv_cache_bytes():
    # 2 layers x 1 KV head x (K and V) x 3 tokens x dim 4 x 2 bytes
    assert cost.kv_cache_bytes(SMALL, 3) == 2 * 2 * 3 * 4 * 2
    skip_one = ExecutionPlan(SMALL, [[0, 1], []], [range(12), range(12)])
    assert cost.kv_cache_bytes(SMALL, 3, skip_one) == 2 * 3 * 4 * 2
    assert cost.kv_cache_bytes(SMALL, 3, page_size=16) == 2 * 2 * 16 * 4 * 2
    tiny = GQA6  # 6 heads over 2 KV heads
    one_group = ExecutionPlan(tiny, [[0, 1, 2]] + [[]] * 3, [[]] * 4)
    assert cost.kv_cache_bytes(tiny, 10, one_group, kv_bytes=4) == 2 * 10 * 32 * 4


def test_masked_mlp_cost_matches_layer_terms():
    c = cost.masked_mlp_cost(SMALL, 3, 12)
    expected = sum(PREFILL_LAYER[n] for n in ("gate_proj", "up_proj", "mlp_act", "down_proj"))
    assert c.flops == expected
    assert cost.masked_mlp_cost(SMALL, 3, 0).flops == 0


def test_masked_attention_cost_matches_layer_terms():
    ops = ("q_proj", "k_proj", "v_proj", "qk_matmul", "softmax", "sv_matmul", "o_proj")
    prefill = cost.masked_attention_cost(SMALL, heads=2, kv_heads=1, q_tokens=3, kv_tokens=3)
    assert prefill.flops == sum(PREFILL_LAYER[n] for n in ops)
    decode = cost.masked_attention_cost(SMALL, heads=2, kv_heads=1, q_tokens=1, kv_tokens=5)
    assert decode.flops == sum(DECODE_LAYER[n] for n in ops)
    # One head of two: half of every head-proportional term; the one KV head is still read.
    half = cost.masked_attention_cost(SMALL, heads=1, kv_heads=1, q_tokens=1, kv_tokens=5)
    assert half.flops == decode.flops - (128 + 80 + 50 + 80 + 128) / 2  # q, qk, softmax, sv, o
    assert half.kv_load_bytes == decode.kv_load_bytes == 2 * 5 * 4 * 2
    two = cost.masked_attention_cost(SMALL, heads=2, kv_heads=1, q_tokens=1, kv_tokens=5, batch_size=2)
    assert two.flops == 2 * decode.flops
    assert cost.masked_attention_cost(SMALL, heads=0, kv_heads=0, q_tokens=3, kv_tokens=3).flops == 0
    with pytest.raises(ValueError, match=r"heads \(3\) and kv_heads \(1\) must be at most 2 and 1"):
        cost.masked_attention_cost(SMALL, heads=3, kv_heads=1, q_tokens=1, kv_tokens=1)


def test_roofline_prefill_is_compute_bound_and_decode_memory_bound():
    shape = get_shape("llava-7b")
    prefill = cost.roofline(cost.prefill_cost(shape, 4096), "H200")
    decode = cost.roofline(cost.decode_cost(shape, 700), "H200")
    assert prefill.compute_bound["q_proj"] and not decode.compute_bound["q_proj"]
    h200 = get_device("H200")
    q = cost.decode_cost(shape, 700).by_op()["q_proj"]
    assert decode.seconds["q_proj"] == pytest.approx(q.bytes / h200.bandwidth)
    # Less bandwidth, same peak: H100 decodes slower.
    assert cost.roofline(cost.decode_cost(shape, 700), "H100").total_seconds > decode.total_seconds


def test_roofline_of_half_the_layers_is_about_half():
    shape = get_shape("llava-7b")
    plan = ExecutionPlan.from_layer_mask([1] * 16 + [0] * 16, shape)
    full = cost.roofline(cost.prefill_cost(shape, 700), "A100").total_seconds
    half = cost.roofline(cost.prefill_cost(shape, 700, plan), "A100").total_seconds
    assert 0.5 < half / full < 0.52  # lm_head is not halved


def test_measured_cpu_profile_and_unknown_device():
    spec = get_device("measure")
    assert spec.peak_flops > 1e8 and spec.bandwidth > 1e8 and math.isfinite(spec.ridge_point)
    with pytest.raises(ValueError, match="unknown device 'B200'"):
        get_device("B200")


def test_batch_decode_cost_pays_weights_once_per_cohort():
    shape = get_shape("tiny")
    layers = shape.num_layers
    a = ExecutionPlan.from_layer_mask([1] * layers, shape)
    b = ExecutionPlan(shape, [range(shape.num_heads)] * (layers - 1) + [[0]],
                      [range(shape.intermediate_size)] * (layers - 1) + [range(7)])
    same = cost.batch_decode_cost(shape, 300, [a, a, a])
    assert same.flops == pytest.approx(cost.decode_flops(shape, 300, a, batch_size=3))
    assert same.bytes == pytest.approx(cost.decode_cost(shape, 300, a, batch_size=3).bytes)
    # None is the full plan: one cohort with a full plan built anew.
    assert cost.batch_decode_cost(shape, 300, [None, a]).bytes == cost.batch_decode_cost(shape, 300, [a, a]).bytes
    mixed = cost.batch_decode_cost(shape, 300, [a, b])
    # FLOPs: each row's own. Weight bytes: the shared layers once, the last layer once per plan.
    assert mixed.flops == pytest.approx(cost.decode_flops(shape, 300, a) + cost.decode_flops(shape, 300, b))
    weights = lambda breakdown: sum(op.weight_bytes for op in breakdown.ops())  # noqa: E731
    one_a, one_b = cost.decode_cost(shape, 300, a), cost.decode_cost(shape, 300, b)
    last_b = sum(op.weight_bytes for op in one_b.layers[-1])
    assert weights(mixed) == pytest.approx(weights(one_a) + last_b)
    with pytest.raises(ValueError, match="plans must hold one plan"):
        cost.batch_decode_cost(shape, 300, [])


def test_a_union_step_where_every_head_attends_prices_vllms_attention_over_all_heads():
    shape = get_shape("tiny")
    layers = shape.num_layers
    h1 = ExecutionPlan(shape, [[0]] * (layers - 1) + [[]], [range(5)] * layers)  # the last layer: no head
    dense = cost.decode_cost(shape, 300, None, batch_size=2)
    own = cost.batch_decode_cost(shape, 300, [h1, h1], union=True)
    every = cost.batch_decode_cost(shape, 300, [h1, h1], union=True, every_head_attends=True)
    core = ("qk_matmul", "softmax", "sv_matmul")
    for i in range(layers):
        for got, own_op, dense_op in zip(every.layers[i], own.layers[i], dense.layers[i]):
            if got.name in core and i < layers - 1:  # every head, every KV head, for both rows
                assert got.flops == pytest.approx(dense_op.flops) and got.bytes == pytest.approx(dense_op.bytes)
            else:  # the rest (and a layer whose union keeps no head, whose attention is not run) as the union's
                assert got.flops == pytest.approx(own_op.flops) and got.bytes == pytest.approx(own_op.bytes)
    with pytest.raises(ValueError, match="union=True"):
        cost.batch_decode_cost(shape, 300, [h1], every_head_attends=True)


def test_union_batch_decode_cost_runs_the_union_for_every_row_but_attends_its_own_heads():
    shape = get_shape("tiny")
    layers, per_kv = shape.num_layers, shape.heads_per_kv_head
    h1 = ExecutionPlan(shape, [[0]] * layers, [range(5)] * layers)
    h2 = ExecutionPlan(shape, [[per_kv]] * layers, [range(3, 9)] * layers)
    union = ExecutionPlan(shape, [[0, per_kv]] * layers, [range(9)] * layers)  # both rows' units
    bound = cost.batch_decode_cost(shape, 300, [h1, h2], union=True)
    expected = cost.decode_cost(shape, 300, union, batch_size=2)
    own = cost.decode_cost(shape, 300, h1)  # each row attends one head over one KV head
    for i in range(layers):
        for got, union_op, own_op in zip(bound.layers[i], expected.layers[i], own.layers[i]):
            if got.name in ("qk_matmul", "softmax", "sv_matmul"):  # each row's own heads: twice one row's
                assert got.flops == pytest.approx(2 * own_op.flops) and got.bytes == pytest.approx(2 * own_op.bytes)
            else:  # the union's units for every row
                assert got.flops == pytest.approx(union_op.flops) and got.bytes == pytest.approx(union_op.bytes)
    # Equal plans: their union is the plan, so a step over the union costs what cohorts cost.
    assert cost.batch_decode_cost(shape, 300, [h1, h1], union=True).bytes == pytest.approx(
        cost.batch_decode_cost(shape, 300, [h1, h1]).bytes)
    assert cost.batch_decode_cost(shape, 300, [h1, h1], union=True).flops == pytest.approx(
        cost.batch_decode_cost(shape, 300, [h1, h1]).flops)
    # Disjoint plans: cohorts read each plan's weights (the union's) and compute each row's own units.
    eager = cost.batch_decode_cost(shape, 300, [h1, h2])
    assert eager.flops < bound.flops
