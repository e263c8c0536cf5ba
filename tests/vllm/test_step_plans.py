"""A step's plans from the batch rows: a decode step of a batch no update changed reuses the previous decode
step's plans and latency tables without reading a row (the host's work per step does not grow with the
batch); an update, a prefill chunk or a new row count makes them again."""

from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402

from adallava_kernels import ExecutionPlan, get_shape  # noqa: E402
from adallava_kernels.vllm import model as vllm_model  # noqa: E402
from adallava_kernels.vllm.rows import BatchRows, Row  # noqa: E402

SHAPE = get_shape("tiny")
LATENCY = 7


class Planner:
    class config:
        latency_token_id = LATENCY

    def latency_token(self, budget):
        return torch.full((SHAPE.hidden_size,), float(budget))


class CountingRows(BatchRows):
    """Batch rows that count how often the model reads a row."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.reads = dict(enumerate(rows)), 0

    def row(self, index):
        self.reads += 1
        return super().row(index)


def planned(spec, plan):
    row = Row(spec, ())
    row.plan = plan
    return row


def model_stub():
    model = vllm_model.AdaLlavaLlamaForCausalLM.__new__(vllm_model.AdaLlavaLlamaForCausalLM)
    torch.nn.Module.__init__(model)
    model.planner, model.vllm_config, model.shape = Planner(), None, SHAPE
    model._full = ExecutionPlan.full(SHAPE)
    model._explicit, model._decode_step = {}, None
    model._latency_tokens, model._latency_step = {}, None
    return model


def step(model, batch, starts, ids):
    h = torch.zeros(ids.numel(), SHAPE.hidden_size)
    with mock.patch.object(vllm_model, "row_starts", return_value=torch.tensor(starts)), \
            mock.patch.object(vllm_model, "rows_of", return_value=batch):
        plans = model.step_plans(ids.numel(), torch.device("cpu"), torch.float32, ids, h)
    return plans, h


def test_a_decode_step_of_an_unchanged_batch_reads_no_row():
    half = ExecutionPlan.from_layer_mask([1, 0] * (SHAPE.num_layers // 2), SHAPE)
    batch = CountingRows([planned(("budget", 0.5), half), None, planned(("budget", 0.75), half)])
    model = model_stub()
    ids = torch.tensor([LATENCY, 3, LATENCY, 0])  # 3 decode rows and a padding token

    first, h = step(model, batch, [0, 1, 2, 3], ids)
    assert batch.reads == 3 and first.token_plan.tolist() == [0, 1, 0, 0]
    assert h[0].eq(0.5).all() and h[1].eq(0).all() and h[2].eq(0.75).all() and h[3].eq(0).all()

    again, h = step(model, batch, [0, 1, 2, 3], ids)  # the next decode step: no update came
    assert batch.reads == 3 and again is first
    assert h[0].eq(0.5).all() and h[2].eq(0.75).all() and h[1].eq(0).all()

    batch.apply(BatchUpdate(batch_size=3, removed=[], added=[], moved=[]))  # any update: made again
    step(model, batch, [0, 1, 2, 3], ids)
    assert batch.reads == 6


def test_prefill_chunks_and_a_new_row_count_read_the_rows_again():
    batch = CountingRows([None, None, None])
    model = model_stub()
    step(model, batch, [0, 2, 3, 4], torch.tensor([1, 2, 3, 4]))  # a prefill chunk of 2
    step(model, batch, [0, 2, 3, 4], torch.tensor([1, 2, 3, 4]))
    assert batch.reads == 6
    step(model, batch, [0, 1, 2], torch.tensor([1, 2, 0, 0]))  # 2 decode rows
    step(model, batch, [0, 1, 2, 3], torch.tensor([1, 2, 3, 0]))  # 3 decode rows, the same version
    assert batch.reads == 6 + 2 + 3


def test_a_layer_no_row_runs_is_skipped_padding_tokens_included():
    skip_1 = ExecutionPlan.from_layer_mask([1, 0] + [1] * (SHAPE.num_layers - 2), SHAPE)
    batch = CountingRows([planned(("plan", "a"), skip_1), planned(("plan", "a"), skip_1)])
    plans, _ = step(model_stub(), batch, [0, 1, 2], torch.tensor([3, 4, 0, 0]))  # 2 rows, 2 padding tokens
    assert [kind for kind, _ in plans.layers[1]] == ["skip", "skip"]
    assert [kind for kind, _ in plans.layers[0]] == ["dense", "dense"]


def test_rows_of_partial_layers_gather_the_union_of_their_units():
    s = SHAPE
    every = [range(s.num_heads)] * s.num_layers
    neurons = [range(s.intermediate_size)] * s.num_layers
    low = ExecutionPlan(s, every[:1] + [range(1)] + every[2:], neurons)
    high = ExecutionPlan(s, every[:1] + [range(2, 3)] + every[2:], neurons)
    batch = CountingRows([planned(("plan", "low"), low), planned(("plan", "high"), high)])
    plans, _ = step(model_stub(), batch, [0, 1, 2], torch.tensor([3, 4, 0]))
    kind, heads = plans.layers[1][0]
    assert kind == "union" and heads.tolist() == [0, 2]
    assert plans.head_mask(1, heads).tolist() == [[1, 0], [0, 1], [1, 0]]  # the padding token: row 0's plan
    assert plans.layers[1][1] == ("dense", None)
