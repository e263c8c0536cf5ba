"""A step's latency tokens: each budget row's placeholder takes its budget's token, in a fixed handful of ops
over the step's tokens that read nothing back to the host, the tables made once per batch composition."""

import pytest
import torch
from _dispatch import RecordOps as Ops

pytest.importorskip("vllm")

from adallava_kernels.vllm.model import AdaLlavaLlamaForCausalLM  # noqa: E402
from adallava_kernels.vllm.rows import Row  # noqa: E402

LATENCY, HIDDEN = 7, 6
SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
         "aten.masked_select.default"}


class Planner:
    """The latency encoder's stand-in: budget b's token is b in every feature; counts its calls."""

    class config:
        latency_token_id = LATENCY

    def __init__(self):
        self.calls = []

    def latency_token(self, budget):
        self.calls.append(budget)
        return torch.full((HIDDEN,), float(budget))


def model_stub():
    model = AdaLlavaLlamaForCausalLM.__new__(AdaLlavaLlamaForCausalLM)
    torch.nn.Module.__init__(model)
    model.planner = Planner()
    model._latency_tokens, model._latency_step = {}, None
    return model


def test_budget_rows_placeholders_take_their_budgets_token_without_a_sync():
    model = model_stub()
    # Rows: a 0.5 budget (a prefill chunk of 4 with its placeholder last), a row with no spec, a 0.75 budget
    # (one decode token that happens to be the placeholder id), a fixed plan, then 2 padding tokens.
    specs = [Row(("budget", 0.5), ()), None, Row(("budget", 0.75), ()), Row(("plan", "{}"), ())]
    counts = [4, 2, 1, 1]
    ids = torch.tensor([3, 4, 5, LATENCY, LATENCY, 9, LATENCY, LATENCY, 0, 0])
    h = torch.randn(ids.numel(), HIDDEN)
    before = h.clone()
    with Ops() as mode:
        model._write_latency_tokens(h, ids, specs, counts)
    expected = before.clone()
    expected[3] = 0.5
    expected[6] = 0.75
    assert torch.equal(h, expected)
    assert not SYNCS & set(mode.ops), mode.ops
    first = len(mode.ops)

    # The next step of the same composition reuses the tables: no latency token computed again, the same ops.
    h = before.clone()
    with Ops() as mode:
        model._write_latency_tokens(h, ids, specs, counts)
    assert torch.equal(h, expected) and model.planner.calls == [0.5, 0.75]
    assert len(mode.ops) <= first and not SYNCS & set(mode.ops)
    steady = len(mode.ops)

    # A step of 16 budget rows launches no more ops than one of 2 (nothing per row on the device).
    many = [Row(("budget", 0.5 + i / 40), ()) for i in range(16)]
    h, ids = torch.randn(16, HIDDEN), torch.full((16,), LATENCY)
    model._write_latency_tokens(h, ids, many, [1] * 16)  # builds its tables
    with Ops() as mode:
        model._write_latency_tokens(h, ids, many, [1] * 16)
    assert len(mode.ops) == steady
    assert torch.allclose(h[:, 0], torch.tensor([0.5 + i / 40 for i in range(16)]))


def test_a_step_without_budget_rows_touches_nothing():
    model = model_stub()
    h, ids = torch.randn(3, HIDDEN), torch.full((3,), LATENCY)
    before = h.clone()
    with Ops() as mode:
        model._write_latency_tokens(h, ids, [None, Row(("plan", "{}"), ())], [2, 1])
    assert mode.ops == [] and torch.equal(h, before) and model.planner.calls == []
