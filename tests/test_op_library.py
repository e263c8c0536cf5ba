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
