"""The batch rows the logits processor keeps: joins, leaves, moves and swaps as vLLM reports them."""

import pytest

from adallava_kernels.vllm import BUDGET_KEY, PLAN_KEY

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from adallava_kernels.vllm.rows import BatchRows  # noqa: E402


def update(size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def added(index, budget=None, prompt=(5, 6)):
    extra = None if budget is None else {BUDGET_KEY: budget}
    return (index, SamplingParams(extra_args=extra), list(prompt), [])


def test_rows_follow_joins_leaves_and_moves():
    rows = BatchRows()
    rows.apply(update(3, added=[added(0, 0.5), added(1), added(2, 0.75)]))
    assert rows.row(0).spec == ("budget", 0.5) and rows.row(1).spec is None and rows.row(2).spec == ("budget", 0.75)
    rows.row(0).plan = "kept"
    # Row 1 leaves; row 2 moves into its place (vLLM condenses its batch).
    rows.apply(update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert rows.row(1).spec == ("budget", 0.75) and rows.row(2) is None
    rows.apply(update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert rows.row(1).plan == "kept" and rows.row(0).spec == ("budget", 0.75)
    # A request that leaves (finished, or preempted) takes its plan with it; when it joins again it is a new row.
    rows.apply(update(1, removed=[1]))
    assert rows.row(1) is None
    rows.apply(update(2, added=[added(1, 0.5)]))
    assert rows.row(1).plan is None and rows.joins == 4


def test_a_malformed_key_is_refused_when_the_request_is_added():
    from vllm.exceptions import VLLMValidationError

    from adallava_kernels.vllm.rows import AdaLlavaPlans

    for extra, match in (({BUDGET_KEY: 0.49}, "0.49"), ({BUDGET_KEY: True}, "True"), ({PLAN_KEY: 3}, PLAN_KEY),
                         ({PLAN_KEY: "{}", BUDGET_KEY: 0.5}, "not both")):
        with pytest.raises(VLLMValidationError, match=match):
            AdaLlavaPlans.validate_params(SamplingParams(extra_args=extra))
    AdaLlavaPlans.validate_params(SamplingParams(extra_args={BUDGET_KEY: 0.5, "other": 1}))
    AdaLlavaPlans.validate_params(SamplingParams())
