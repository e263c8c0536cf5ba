"""A step's latency tokens: each budget row's placeholder takes its budget's token, in a fixed handful of ops
over the step's tokens that read nothing back to the host; each budget's token is made once, when the
first row of that budget joins."""

import pytest
import torch
from _dispatch import RecordOps as Ops
from _stub import LATENCY, SHAPE, CountingRows, model_stub, planned, step

pytest.importorskip("vllm")

from adallava_kernels import ExecutionPlan  # noqa: E402
from adallava_kernels.vllm.rows import Row  # noqa: E402

SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
         "aten.masked_select.default"}
HALF = ExecutionPlan.from_layer_mask([1, 0] * (SHAPE.num_layers // 2), SHAPE)


def budget_row(budget):
    return planned(("budget", budget), HALF)  # its plan made already: the scheduler is not under test here


def test_budget_rows_placeholders_take_their_budgets_token_without_a_sync():
    model = model_stub()
    # Rows: a 0.5 budget (a prefill chunk of 4 with its placeholder last), a row with no spec, a 0.75 budget
    # (one decode token that happens to be the placeholder id), a fixed plan, then 2 padding tokens.
    batch = CountingRows([budget_row(0.5), Row(None, ()), budget_row(0.75), planned(("plan", "{}"), HALF)])
    starts = [0, 4, 6, 7, 8]
    ids = torch.tensor([3, 4, 5, LATENCY, LATENCY, 9, LATENCY, LATENCY, 0, 0])
    before = torch.randn(ids.numel(), SHAPE.hidden_size)
    expected = before.clone()
    expected[3] = 0.5
    expected[6] = 0.75
    step(model, batch, starts, ids, before.clone())  # the joins: the budgets' tokens and the layers' parts made
    with Ops() as mode:
        _, h = step(model, batch, starts, ids, before.clone())
    assert torch.equal(h, expected)
    assert not SYNCS & set(mode.ops), mode.ops
    first = len(mode.ops)

    # The next step: no latency token computed again, the same ops.
    with Ops() as mode:
        _, h = step(model, batch, starts, ids, before.clone())
    assert torch.equal(h, expected) and model.planner.calls == [0.5, 0.75]
    assert len(mode.ops) == first and not SYNCS & set(mode.ops)

    # A decode step of 16 budget rows launches no more ops than one of 4 (nothing per row on the device).
    many = CountingRows([budget_row(0.5 + i / 40) for i in range(16)])
    model = model_stub()
    ids = torch.full((16,), LATENCY)
    step(model, many, list(range(17)), ids)  # the joins
    h = torch.randn(16, SHAPE.hidden_size)
    with Ops() as mode:
        step(model, many, list(range(17)), ids, h)
    few = CountingRows([budget_row(0.5 + i / 40) for i in range(4)])
    model = model_stub()
    ids_few, h_few = ids[:4], torch.randn(4, SHAPE.hidden_size)
    step(model, few, list(range(5)), ids_few)
    with Ops() as mode_few:
        step(model, few, list(range(5)), ids_few, h_few)
    assert len(mode.ops) == len(mode_few.ops) and not SYNCS & set(mode.ops)
    assert torch.allclose(h[:, 0], torch.tensor([0.5 + i / 40 for i in range(16)]))


def test_a_step_without_budget_rows_touches_nothing():
    model = model_stub()
    batch = CountingRows([Row(None, ()), planned(("plan", "{}"), HALF)])
    ids = torch.full((3,), LATENCY)
    before = torch.randn(3, SHAPE.hidden_size)
    with Ops() as mode:
        _, h = step(model, batch, [0, 2, 3], ids, before.clone())
    assert "aten.where.self" not in mode.ops and torch.equal(h, before) and model.planner.calls == []


def test_a_budget_whose_last_row_left_frees_its_slot_for_the_next():
    from vllm.v1.sample.logits_processor import BatchUpdate

    model = model_stub()
    batch = CountingRows([budget_row(0.5), budget_row(0.6)])
    step(model, batch, [0, 1, 2], torch.tensor([LATENCY, LATENCY]))
    batch.apply(BatchUpdate(batch_size=2, removed=[1], added=[], moved=[]))
    batch.rows[1] = budget_row(0.9)  # a join of another budget into the freed row
    batch._changed.add(1)
    _, h = step(model, batch, [0, 1, 2], torch.tensor([LATENCY, LATENCY]))
    assert h[:, 0].tolist() == pytest.approx([0.5, 0.9])
    assert model.batch_plans.budgets.capacity == 3  # slot 0 (no budget) and two budgets' slots, 0.6's taken again
