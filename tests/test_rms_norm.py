"""RMSNorm fused with the residual add (Triton; under TRITON_INTERPRET=1 on a CPU) against float64 and transformers."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adallava_kernels.ops import library  # noqa: F401  (registers the operators)
from adallava_kernels.ops.rms_norm import (
    MAX_HIDDEN,
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
)
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device

EPS = 1e-6
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inputs(*shape: int, dtype: torch.dtype = torch.float32):
    """``x``, ``residual`` of ``shape`` and ``weight`` ``[shape[-1]]``, rounded to ``dtype``, on the CPU."""
    x = torch.randn(*shape).to(dtype)
    residual = (2 * torch.randn(*shape)).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    return x, residual, weight


def oracle(x, residual, weight) -> torch.Tensor:
    """The normed output in float64 from the same rounded inputs."""
    if residual is None:
        return rms_norm_reference(x.double(), weight.double(), EPS)
    return fused_add_rms_norm_reference(x.double(), residual.double(), weight.double(), EPS)[0]


def run_triton(x, residual, weight):
    """The launcher on DEVICE into NaN-filled buffers: ``(normed, new residual or None)`` on the CPU."""
    x_, residual_, weight_ = to_device(x, residual, weight)
    out = poisoned(*x.shape, dtype=x.dtype, device=DEVICE)
    if residual is None:
        rms_norm_triton(x_, weight_, EPS, out=out)
        return out.cpu(), None
    residual_out = poisoned(*x.shape, dtype=x.dtype, device=DEVICE)
    fused_add_rms_norm_triton(x_, residual_, weight_, EPS, out=out, residual_out=residual_out)
    return out.cpu(), residual_out.cpu()


def case(rows, hidden, name, with_residual):
    return pytest.param(rows, hidden, DTYPES[name], with_residual,
                        id=f"R{rows}-H{hidden}-{name}-{'residual' if with_residual else 'no-residual'}")


# Hidden sizes off the power of two (masked lanes), and LLaVA-7B's and -13B's and a larger one.
CASES = [case(rows, hidden, name, r) for rows in (1, 3, 17) for hidden in (24, 96, 100)
         for name in DTYPES for r in (False, True)]
LLAVA_CASES = [case(3, hidden, name, True) for hidden in (4096, 5120, 8192) for name in ("fp16", "bf16")]


@pytest.mark.parametrize("rows, hidden, dtype, with_residual", CASES + LLAVA_CASES)
def test_triton_matches_float64(rows, hidden, dtype, with_residual):
    x, residual, weight = inputs(rows, hidden, dtype=dtype)
    residual = residual if with_residual else None
    normed, new_residual = run_triton(x, residual, weight)
    assert_close(normed, oracle(x, residual, weight))
    if with_residual:
        assert torch.equal(new_residual, x + residual)


@pytest.mark.parametrize("hidden", [100, 4096, 5120], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("name", DTYPES)
def test_torch_path_is_transformers_llama_rms_norm(name, hidden):
    dtype = DTYPES[name]
    x, residual, weight = inputs(2, 5, hidden, dtype=dtype)
    module = LlamaRMSNorm(hidden, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        expected = module(x + residual)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, EPS, backend="torch")
    assert torch.equal(normed, expected)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(rms_norm(x, weight, EPS, backend="torch"), module(x))


def test_triton_matches_transformers_in_float32():
    x, residual, weight = inputs(17, 100)
    module = LlamaRMSNorm(100, eps=EPS)
    with torch.no_grad():
        module.weight.copy_(weight)
        expected = module(x + residual)
    normed, _ = run_triton(x, residual, weight)
    assert_close(normed, expected)


def permuted(*shape):
    """A tensor of ``shape`` whose last dim is not contiguous."""
    return torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))


LAYOUTS = {
    # the hidden dim strided: the launcher makes one contiguous copy
    "permuted": lambda: (permuted(2, 5, 100), permuted(2, 5, 100)),
    # rows strided, hidden contiguous: read in place through the row stride
    "row-strided": lambda: (torch.randn(2, 10, 100)[:, ::2], torch.randn(10, 200)[:, 50:150].view(2, 5, 100)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout):
    x, residual = LAYOUTS[layout]()
    assert not x.is_contiguous() and not residual.is_contiguous()
    weight = 1 + 0.1 * torch.randn(100)
    normed, new_residual = fused_add_rms_norm(*to_device(x, residual, weight), EPS, backend="triton")
    assert normed.shape == new_residual.shape == (2, 5, 100)
    assert_close(normed.cpu(), oracle(x, residual, weight))
    assert torch.equal(new_residual.cpu(), x + residual)


def test_leading_dims_and_no_rows():
    x, residual, weight = inputs(2, 3, 96)
    normed, new_residual = run_triton(x, residual, weight)
    assert normed.shape == (2, 3, 96)
    assert_close(normed, oracle(x, residual, weight))
    empty = torch.empty(0, 4, 96)
    normed, new_residual = fused_add_rms_norm(*to_device(empty, empty, weight), EPS, backend="triton")
    assert normed.shape == new_residual.shape == (0, 4, 96)


def test_outputs_may_be_the_inputs():
    x, residual, weight = to_device(*inputs(3, 100, dtype=torch.bfloat16))
    expected_normed, expected_residual = fused_add_rms_norm_triton(x, residual, weight, EPS)
    fused_add_rms_norm_triton(x, residual, weight, EPS, out=x, residual_out=residual)
    assert torch.equal(x, expected_normed) and torch.equal(residual, expected_residual)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_residual_returns_x_itself(backend):
    x, _, weight = to_device(*inputs(3, 100))
    normed, new_residual = fused_add_rms_norm(x, None, weight, EPS, backend=backend)
    assert new_residual is x
    assert_close(normed.cpu(), oracle(x.cpu(), None, weight.cpu()))


def test_auto_on_cpu_is_the_reference():
    x, residual, weight = inputs(3, 100, dtype=torch.bfloat16)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_residual = fused_add_rms_norm_reference(x, residual, weight, EPS)
    assert torch.equal(normed, expected_normed) and torch.equal(new_residual, expected_residual)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_add_rms_norm(x, residual, weight, EPS, backend="cuda")


def good_call() -> dict:
    x, residual, weight = inputs(3, 100)
    return {"x": x, "residual": residual, "weight": weight, "eps": EPS}


# id: (the change to a good call, the error, a regex its message matches)
BAD_INPUTS = {
    "x-not-a-tensor": ({"x": [[1.0] * 100] * 3}, TypeError, "x must be a torch.Tensor, got list"),
    "x-int": ({"x": torch.ones(3, 100, dtype=torch.int32)}, ValueError, "x must have dtype in"),
    "x-0d": ({"x": torch.tensor(1.0)}, ValueError, r"x must have at least 1 dims, got shape \[\]"),
    "hidden-0": ({"x": torch.ones(3, 0), "residual": torch.ones(3, 0), "weight": torch.ones(0)}, ValueError,
                 r"x must have a hidden size \(last dim\) of at least 1, got shape \[3, 0\]"),
    "residual-shape": ({"residual": torch.ones(3, 99)}, ValueError,
                       r"residual must have the shape of x \[3, 100\], got \[3, 99\]"),
    "residual-dtype": ({"residual": torch.ones(3, 100).half()}, ValueError,
                       "residual has dtype torch.float16, but x has torch.float32"),
    "residual-device": ({"residual": torch.ones(3, 100, device="meta")}, ValueError,
                        "residual must be on cpu, got meta"),
    "weight-length": ({"weight": torch.ones(99)}, ValueError,
                      r"weight must have shape \[hidden\] = \[100\] \(the last dim of x\), got \[99\]"),
    "weight-2d": ({"weight": torch.ones(1, 100)}, ValueError, r"weight must have shape \[hidden\] = \[100\]"),
    "weight-dtype": ({"weight": torch.ones(100).bfloat16()}, ValueError,
                     "weight has dtype torch.bfloat16, but x has torch.float32"),
    "weight-device": ({"weight": torch.ones(100, device="meta")}, ValueError, "weight must be on cpu, got meta"),
    "eps-zero": ({"eps": 0.0}, ValueError, "eps must be a positive finite float, got 0.0"),
    "eps-negative": ({"eps": -1e-6}, ValueError, "eps must be a positive finite float, got -1e-06"),
    "eps-nan": ({"eps": float("nan")}, ValueError, "eps must be a positive finite float, got nan"),
    "eps-tensor": ({"eps": torch.tensor(1e-6)}, ValueError, "eps must be a positive finite float, got tensor"),
}
ENTRIES = {
    "torch": lambda x, residual, weight, eps: fused_add_rms_norm(x, residual, weight, eps, backend="torch"),
    "triton": lambda x, residual, weight, eps: fused_add_rms_norm(x, residual, weight, eps, backend="triton"),
    "launcher": fused_add_rms_norm_triton,
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs(bad, entry):
    change, error, message = BAD_INPUTS[bad]
    with pytest.raises(error, match=message):
        ENTRIES[entry](**(good_call() | change))


def test_bad_out_buffers():
    call = good_call()
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of the shape of x \[3, 100\]"):
        fused_add_rms_norm_triton(**call, out=torch.empty(3, 99))
    with pytest.raises(ValueError, match="residual_out must be a contiguous torch.float32 tensor"):
        fused_add_rms_norm_triton(**call, residual_out=torch.empty(100, 3).t())
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor"):
        rms_norm_triton(call["x"], call["weight"], EPS, out=torch.empty(3, 100, dtype=torch.float16))


def test_launcher_limits():
    call = good_call()
    with pytest.raises(ValueError, match="residual must be a tensor; for the norm alone call rms_norm_triton"):
        fused_add_rms_norm_triton(**(call | {"residual": None}))
    wide = torch.ones(1, MAX_HIDDEN + 1)
    with pytest.raises(ValueError, match=f"up to hidden size {MAX_HIDDEN}; got {MAX_HIDDEN + 1}"):
        rms_norm_triton(wide, wide[0], EPS)


OP_ARGS = {
    "rms_norm": lambda x, residual, weight: (x, weight, EPS),
    "fused_add_rms_norm": lambda x, residual, weight: (x, residual, weight, EPS),
}


@pytest.mark.parametrize("name", OP_ARGS)
def test_registered_op_passes_opcheck(name):
    x, residual, weight = to_device(*inputs(2, 3, 100, dtype=torch.float16))
    torch.library.opcheck(getattr(torch.ops.adallava, name).default, OP_ARGS[name](x, residual, weight))


def test_compiled_call_goes_through_the_registered_op():
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def layer(x, residual, weight):
        return fused_add_rms_norm(x, residual, weight, EPS, backend="triton")

    x, residual, weight = to_device(*inputs(3, 100, dtype=torch.float16))
    normed, new_residual = torch.compile(layer, backend=record, fullgraph=True)(x, residual, weight)
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert any("adallava.fused_add_rms_norm" in target for target in targets), targets
    assert_close(normed.cpu(), oracle(x.cpu(), residual.cpu(), weight.cpu()))
    assert torch.equal(new_residual, x + residual)
