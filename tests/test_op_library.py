"""The Triton kernels as torch.library operators: schema, fake implementations and eager results agree."""

import pytest
import torch

from adallava_kernels.ops import library  # noqa: F401  (registers the operators)

from _device import DEVICE

ops = torch.ops.adallava


def randn(*shape):
    return torch.randn(*shape).to(DEVICE)


def index(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


CASES = {
    "head_projection": lambda: (randn(2, 3, 40), randn(5 * 8, 40), index(0, 3, 4), randn(2, 3, 8), randn(2, 3, 8), 8, 2),
    "flash_attention": lambda: (randn(2, 5, 3, 8), randn(2, 2, 5, 8), randn(2, 2, 5, 8), index(0, 1, 1), None, 0.35),
    "paged_decode_attention": lambda: (randn(2, 3, 8), randn(2, 10, 4, 8), torch.arange(8, dtype=torch.int32,
                                       device=DEVICE).view(2, 2, 2), index(0, 1, 1), index(5, 8), index(0, 2), 0.35, 2),
    "row_gathered_linear": lambda: (randn(3, 40), randn(20, 40), index(1, 5, 7)),
    "swiglu_gathered": lambda: (randn(3, 40), randn(20, 40), randn(20, 40), index(1, 5, 7)),
    "col_gathered_linear": lambda: (randn(3, 3), randn(40, 20), index(1, 5, 7)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_passes_opcheck(name):
    torch.library.opcheck(getattr(ops, name).default, CASES[name]())


def paged_case():
    """A decode step's projection: 2 rows, q heads 0, 3, 4 then 2 KV heads' k and v slots, pages of 4."""
    tables = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=torch.int32, device=DEVICE)
    return (randn(2, 1, 40), randn(9 * 8, 40), index(0, 3, 4, 5, 6, 7, 8), randn(2, 1, 8), randn(2, 1, 8), 8, 5,
            randn(10, 4, 8), randn(10, 4, 8), tables, index(1, 5))


def bound_col_case():
    """A bound step's o_proj: a padded column list, its count on the device, a row mask, the residual."""
    return (randn(3, 6), randn(40, 20), index(1, 5, 7, -1, -1, -1), index(3), randn(3, 6).sign().clamp(min=0),
            randn(3, 40))


EXTRA_CASES = {"head_projection_paged": paged_case, "col_gathered_linear": bound_col_case}


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_operator_passes_opcheck_in_its_other_forms(name):
    torch.library.opcheck(getattr(ops, name).default, EXTRA_CASES[name]())


def test_eager_launchers_run_the_operators_functions_and_trace_as_the_operators():
    launch = library.eager_launchers()
    args = CASES["swiglu_gathered"]()
    torch.testing.assert_close(launch.swiglu_gathered(*args), ops.swiglu_gathered(*args))
    torch._dynamo.reset()
    # fullgraph: tracing the launcher must reach the operator, not the Triton launch inside it.
    traced = torch.compile(lambda *a: launch.swiglu_gathered(*a) * 2, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(traced, ops.swiglu_gathered(*args) * 2)


def test_eager_launchers_take_keyword_arguments_eager_and_traced():
    """The decode step passes the column gather's residual and dense flags by keyword."""
    launch = library.eager_launchers()
    x, w, cols, count, x_mask, residual = bound_col_case()
    kwargs = {"residual": residual, "dense": False, "dense_weight": None}
    expected = ops.col_gathered_linear(x, w, cols, count, x_mask, residual)
    torch.testing.assert_close(launch.col_gathered_linear(x, w, cols, count, x_mask, **kwargs), expected)
    torch._dynamo.reset()
    traced = torch.compile(lambda *a: launch.col_gathered_linear(*a, **kwargs) + 1, fullgraph=True,
                           backend="eager")(x, w, cols, count, x_mask)
    torch.testing.assert_close(traced, expected + 1)
