"""A step's plans from the batch rows, kept as device tables that each join, leave and move patches: a step
reads no row that no update touched, the work of an update follows its rows (not the batch), and the tables
always give each token its row's plan and each layer the part its live plans call for (an independent
recomputation from the rows, over random streams of updates)."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _dispatch import RecordOps
from _stub import LATENCY, SHAPE, CountingRows, model_stub, planned, step

pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from adallava_kernels import ExecutionPlan  # noqa: E402
from adallava_kernels.vllm import PLAN_KEY  # noqa: E402
from adallava_kernels.vllm.rows import BatchRows, Row  # noqa: E402

EVERY_HEAD = [range(SHAPE.num_heads)] * SHAPE.num_layers
EVERY_NEURON = [range(SHAPE.intermediate_size)] * SHAPE.num_layers


def params(plan):
    return SimpleNamespace(extra_args={PLAN_KEY: plan.to_json()} if plan is not None else None)


def added(index, plan):
    return (index, params(plan), [3, 4], [])


def test_a_step_reads_only_the_rows_an_update_touched():
    half = ExecutionPlan.from_layer_mask([1, 0] * (SHAPE.num_layers // 2), SHAPE)
    full = Row(None, ())
    batch = CountingRows([planned(("budget", 0.5), half), full, planned(("budget", 0.75), half)])
    model = model_stub()
    ids = torch.tensor([LATENCY, 3, LATENCY, 0])  # 3 decode rows and a padding token

    first, h = step(model, batch, [0, 1, 2, 3], ids)
    assert batch.reads == 3 and first.token_plan.tolist()[:3] == [0, 1, 0]
    assert h[0].eq(0.5).all() and h[1].eq(0).all() and h[2].eq(0.75).all() and h[3].eq(0).all()

    again, h = step(model, batch, [0, 1, 2, 3], ids)  # the next decode step: no update came
    assert batch.reads == 3 and again.layers is first.layers
    assert h[0].eq(0.5).all() and h[2].eq(0.75).all() and h[1].eq(0).all()

    step(model, batch, [0, 2, 3, 4], torch.tensor([1, 2, 3, 4]))  # a prefill chunk of 2: no row read either
    assert batch.reads == 3

    batch.apply(BatchUpdate(batch_size=3, removed=[], added=[], moved=[]))  # an empty update: nothing to read
    step(model, batch, [0, 1, 2, 3], ids)
    assert batch.reads == 3
    batch.apply(BatchUpdate(batch_size=4, removed=[], added=[added(3, half)], moved=[]))  # one join: one row
    step(model, batch, [0, 1, 2, 3, 4], torch.tensor([1, 2, 3, 4]))
    assert batch.reads == 4
    batch.apply(BatchUpdate(batch_size=4, removed=[], added=[], moved=[(0, 3, MoveDirectionality.SWAP)]))
    step(model, batch, [0, 1, 2, 3, 4], torch.tensor([1, 2, 3, 4]))
    assert batch.reads == 6


def test_an_updates_host_and_device_work_does_not_grow_with_the_batch():
    """The ops an update of one join and one leave runs, and the rows it reads, at a batch of 4 and of 64."""
    plans = [ExecutionPlan(SHAPE, EVERY_HEAD[:1] + [range(k, k + 2)] + EVERY_HEAD[2:], EVERY_NEURON)
             for k in range(4)]
    counts = []
    for size in (4, 64):
        # Row 1's plan stays live in row 3, and the join brings a plan new to either batch: the same event.
        batch = CountingRows([planned(("plan", str(i % 2)), plans[i % 2]) for i in range(size)])
        model = model_stub(planner=False)
        starts, ids = list(range(size + 1)), torch.arange(size)
        step(model, batch, starts, ids)
        reads = batch.reads
        batch.apply(BatchUpdate(batch_size=size, removed=[1], added=[added(1, plans[2])], moved=[]))
        with RecordOps() as ops:
            step(model, batch, starts, ids)
        counts.append((batch.reads - reads, len(ops.ops)))
    assert counts[0] == counts[1] and counts[0][0] == 1, counts


def test_a_layer_no_row_runs_is_skipped_padding_tokens_included():
    skip_1 = ExecutionPlan.from_layer_mask([1, 0] + [1] * (SHAPE.num_layers - 2), SHAPE)
    batch = CountingRows([planned(("plan", "a"), skip_1), planned(("plan", "a"), skip_1)])
    plans, _ = step(model_stub(), batch, [0, 1, 2], torch.tensor([3, 4, 0, 0]))  # 2 rows, 2 padding tokens
    assert [kind for kind, _ in plans.layers[1]] == ["skip", "skip"]
    assert [kind for kind, _ in plans.layers[0]] == ["dense", "dense"]


def test_rows_of_partial_layers_gather_the_union_of_their_units():
    low = ExecutionPlan(SHAPE, EVERY_HEAD[:1] + [range(1)] + EVERY_HEAD[2:], EVERY_NEURON)
    high = ExecutionPlan(SHAPE, EVERY_HEAD[:1] + [range(2, 3)] + EVERY_HEAD[2:], EVERY_NEURON)
    batch = CountingRows([planned(("plan", "low"), low), planned(("plan", "high"), high)])
    plans, _ = step(model_stub(), batch, [0, 1, 2], torch.tensor([3, 4]))
    kind, heads = plans.layers[1][0]
    assert kind == "union" and heads.tolist() == [0, 2]
    per_kv = SHAPE.heads_per_kv_head  # the KV heads the union's query heads read, for q/k/v's gathers
    assert plans.kv_heads[1].tolist() == sorted({0 // per_kv, 2 // per_kv})
    assert plans.kv_heads[0] is None and plans.kv_heads[2] is None
    assert plans.head_mask(1, heads).tolist() == [[1, 0], [0, 1]]
    assert plans.layers[1][1] == ("dense", None)


def test_every_row_on_the_full_plan_needs_no_plans():
    batch = CountingRows([Row(None, ()), Row(None, ())])
    assert step(model_stub(), batch, [0, 1, 2], torch.tensor([3, 4]))[0] is None


# -- against an independent recomputation --------------------------------------------------------------


def random_plan(rng: random.Random) -> ExecutionPlan | None:
    """The full plan (None), or one that drops some heads and neuron groups of the second half's layers."""
    if rng.random() < 0.2:
        return None
    s = SHAPE
    heads, neurons = list(EVERY_HEAD), list(EVERY_NEURON)
    for layer in range(s.num_layers // 2, s.num_layers):
        kind = rng.choice(["whole", "skip", "part"])
        if kind == "skip":
            heads[layer], neurons[layer] = [], []
        elif kind == "part":
            heads[layer] = sorted(rng.sample(range(s.num_heads), rng.randint(1, s.num_heads - 1)))
            start = rng.randrange(0, s.intermediate_size // 2)
            neurons[layer] = range(start, start + s.intermediate_size // 2)
    return ExecutionPlan(s, heads, neurons)


def expected_parts(plans: list[ExecutionPlan]) -> list:
    """Each layer's (attention, mlp) parts over ``plans``, from their masks directly."""
    masks = [p.unit_masks("cpu") for p in plans]
    parts = []
    for layer in range(SHAPE.num_layers):
        pair = []
        for unit in (0, 1):
            keep = np.stack([m[unit][layer].numpy() for m in masks])
            if not keep.any():
                pair.append(("skip", None))
            elif keep.all():
                pair.append(("dense", None))
            elif keep.any(0).all():
                pair.append(("masked", None))
            else:
                pair.append(("union", np.flatnonzero(keep.any(0)).tolist()))
        parts.append(pair)
    return parts


def random_update(rng: random.Random, rows: dict, pool: list) -> BatchUpdate:
    """Leaves, joins and moves over ``rows`` (index -> plan), applied to it as vLLM would."""
    removed = rng.sample(sorted(rows), rng.randint(0, min(3, len(rows))))
    for index in removed:
        del rows[index]
    free = [i for i in range(len(rows) + 4) if i not in rows]
    joins = []
    for index in rng.sample(free, rng.randint(0, 3)):
        rows[index] = rng.choice(pool)
        joins.append(added(index, rows[index]))
    moved = []
    if len(rows) >= 2 and rng.random() < 0.5:
        a, b = rng.sample(sorted(rows), 2)
        rows[a], rows[b] = rows[b], rows[a]
        moved.append((a, b, MoveDirectionality.SWAP))
    if rows and rng.random() < 0.5:
        a = rng.choice(sorted(rows))
        b = min(i for i in range(max(rows) + 2) if i not in rows)
        rows[b] = rows.pop(a)
        moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
    size = max(rows) + 1 if rows else 0
    return BatchUpdate(batch_size=size, removed=removed, added=joins, moved=moved)


@pytest.mark.parametrize("seed", range(4))
def test_the_tables_follow_a_random_stream_of_updates(seed):
    rng = random.Random(seed)
    pool = [random_plan(rng) for _ in range(6)]
    model, batch, rows = model_stub(planner=False), BatchRows(), {}
    for _ in range(25):
        batch.apply(random_update(rng, rows, pool))
        size = max(rows) + 1 if rows else 0
        counts = [rng.randint(1, 3) if rng.random() < 0.3 else 1 for _ in range(size)]
        starts = np.concatenate(([0], np.cumsum(counts))).tolist()
        tokens = starts[-1] + rng.randint(0, 2)
        plans, _ = step(model, batch, starts, torch.arange(tokens))
        live = [model._full if p is None else p for p in rows.values()]
        if all(p == model._full for p in live):
            assert plans is None
            continue
        got = [[(kind, None if idx is None else idx.tolist()) for kind, idx in layer] for layer in plans.layers]
        expected = expected_parts(live)
        assert got == [list(layer) for layer in expected]
        for layer, (attention, _) in enumerate(expected):
            kv = None if attention[0] != "union" else sorted({h // SHAPE.heads_per_kv_head for h in attention[1]})
            assert (None if plans.kv_heads[layer] is None else plans.kv_heads[layer].tolist()) == kv
        assert plans.token_plan.shape == (tokens,)
        for index, plan in rows.items():  # each of a row's tokens reads its plan's masks
            heads, neurons = (model._full if plan is None else plan).unit_masks("cpu")
            for t in range(starts[index], starts[index + 1]):
                slot = int(plans.token_plan[t])
                assert torch.equal(plans.heads[slot].bool(), heads)
                assert torch.equal(plans.neurons[slot].bool(), neurons)
    assert len(model.batch_plans.plans.keys) <= len(pool)  # slots of plans that left are taken again
