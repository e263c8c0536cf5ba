"""What a request asks for, read from its ``SamplingParams.extra_args`` (no vLLM import here).

A request's spec is one of: ``None`` (no AdaLLaVA key: the full plan), ``("plan", json)`` or
``("budget", value)``. :func:`request_spec` checks it as far as it can without the model (the
budget's range, the plan's JSON); the model checks a plan's shape when it first runs the request.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..budget import check_budget
from ..plan import ExecutionPlan
from . import BUDGET_KEY, PLAN_KEY

__all__ = ["RequestSpec", "request_spec"]

RequestSpec = tuple  # None | ("plan", str) | ("budget", float)


def request_spec(extra_args: Mapping[str, Any] | None, *, parse_plan: bool = True) -> RequestSpec | None:
    """The spec of a request's ``extra_args``, or a ``ValueError`` naming the key at fault. ``parse_plan=False``
    takes a plan's JSON as it is: for a request checked when it was added, whose plan the model parses (and
    checks against its shape) when it first runs, so a join does not parse a plan twice."""
    if not extra_args:
        return None
    has_plan, has_budget = PLAN_KEY in extra_args, BUDGET_KEY in extra_args
    if has_plan and has_budget:
        raise ValueError(f"extra_args may hold {PLAN_KEY!r} or {BUDGET_KEY!r}, not both")
    if has_budget:
        value = extra_args[BUDGET_KEY]
        try:
            budget = check_budget(value)
        except ValueError:
            raise ValueError(f"extra_args[{BUDGET_KEY!r}] must be a latency budget in [0.5, 1.0], "
                             f"got {value!r}") from None
        return ("budget", budget)
    if has_plan:
        text = extra_args[PLAN_KEY]
        if not parse_plan:
            return ("plan", text)
        try:
            ExecutionPlan.from_json(text)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"extra_args[{PLAN_KEY!r}] must be ExecutionPlan.to_json() text: {error}") from None
        return ("plan", text)
    return None
