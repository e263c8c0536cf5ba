"""The vLLM model without an engine: its plan and latency-token paths over batch rows built by hand."""

from __future__ import annotations

from unittest import mock

import torch

from adallava_kernels import ExecutionPlan, get_shape
from adallava_kernels.vllm import model as vllm_model
from adallava_kernels.vllm.rows import BatchRows, Row

SHAPE = get_shape("tiny")
LATENCY = 7  # the latency placeholder's token id


class Planner:
    """The latency encoder's stand-in: budget b's token is b in every feature; counts its calls."""

    class config:
        latency_token_id = LATENCY

    def __init__(self):
        self.calls = []

    def latency_token(self, budget):
        self.calls.append(budget)
        return torch.full((SHAPE.hidden_size,), float(budget))


class CountingRows(BatchRows):
    """Batch rows (given by index, before any update) that count how often the model reads one."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.reads = dict(enumerate(rows)), 0
        self.size = len(rows)

    def row(self, index):
        self.reads += 1
        return super().row(index)


def planned(spec, plan=None):
    """A batch row of ``spec`` whose plan is already made (``plan``) or made by the model (None)."""
    row = Row(spec, ())
    row.plan = plan
    return row


def model_stub(planner=True):
    model = vllm_model.AdaLlavaLlamaForCausalLM.__new__(vllm_model.AdaLlavaLlamaForCausalLM)
    torch.nn.Module.__init__(model)
    model.planner = Planner() if planner else None
    model.vllm_config, model.shape = None, SHAPE
    model._full = ExecutionPlan.full(SHAPE)
    model._explicit, model._warned, model._batch_plans = {}, set(), None
    model._latency_tokens = {}
    return model


def step(model, batch, starts, ids, h=None):
    """One forward step's plans over ``batch`` whose rows start at ``starts`` in the tokens ``ids``."""
    if h is None:
        h = torch.zeros(ids.numel(), SHAPE.hidden_size)
    with mock.patch.object(vllm_model, "row_starts", return_value=torch.tensor(starts)), \
            mock.patch.object(vllm_model, "rows_of", return_value=batch):
        plans = model.step_plans(ids.numel(), torch.device("cpu"), torch.float32, ids, h)
    return plans, h
