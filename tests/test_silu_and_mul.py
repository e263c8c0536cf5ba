"""SwiGLU's activation of a stacked gate|up projection (Triton; under TRITON_INTERPRET=1 on a CPU) against float64."""

import pytest
import torch
import torch.nn.functional as F

from adallava_kernels.ops import library  # noqa: F401  (registers the operators)
from adallava_kernels.ops.silu_and_mul import silu_and_mul, silu_and_mul_reference, silu_and_mul_triton
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def oracle(gate_up: torch.Tensor) -> torch.Tensor:
    """The activation in float64 from the same rounded inputs."""
    n = gate_up.shape[-1] // 2
    g, u = gate_up.double()[..., :n], gate_up.double()[..., n:]
    return g * torch.sigmoid(g) * u


# Halves off the block size (1024) and its multiples: 1, 7, 100, 1000; one past a block, 1025; 11008 (LLaVA-7B).
CASES = [pytest.param(rows, n, DTYPES[name], id=f"R{rows}-N{n}-{name}")
         for rows in (1, 3, 17) for n in (1, 7, 100, 1025) for name in DTYPES]
CASES += [pytest.param(2, 11008, DTYPES[name], id=f"R2-N11008-{name}") for name in ("fp16", "bf16")]


@pytest.mark.parametrize("rows, n, dtype", CASES)
def test_triton_equals_float64(rows, n, dtype):
    gate_up = (3 * torch.randn(rows, 2 * n)).to(dtype)
    out = poisoned(rows, n, dtype=dtype, device=DEVICE)
    silu_and_mul_triton(to_device(gate_up)[0], out=out)
    assert_close(out.cpu(), oracle(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_reference_is_transformers_act_times_up(dtype):
    gate_up = torch.randn(5, 2 * 37).to(dtype)
    gate, up = gate_up[:, :37], gate_up[:, 37:]
    assert torch.equal(silu_and_mul_reference(gate_up), F.silu(gate) * up)
    assert_close(silu_and_mul_reference(gate_up), oracle(gate_up), dtype)


def test_leading_dims_and_a_strided_projection():
    # [batch, seq, 2n] as a matmul gives it, and a slice whose rows are strided (the last dim contiguous).
    wide = torch.randn(2, 5, 3 * 50)
    gate_up = wide[..., :100]
    out = silu_and_mul(to_device(gate_up)[0], backend="triton")
    assert out.shape == (2, 5, 50)
    assert_close(out.cpu(), oracle(gate_up), torch.float32)


def test_backends_agree_and_auto_takes_the_reference_on_a_cpu():
    gate_up = torch.randn(4, 2 * 33)
    expected = silu_and_mul_reference(gate_up)
    assert torch.equal(silu_and_mul(gate_up, backend="torch"), expected)
    if DEVICE.type == "cpu":
        assert torch.equal(silu_and_mul(gate_up), expected)
    assert_close(silu_and_mul(to_device(gate_up)[0], backend="triton").cpu(), expected.double(), torch.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: silu_and_mul([1.0, 2.0]), TypeError, "gate_up must be a torch.Tensor"),
    (lambda: silu_and_mul(torch.randn(3, 7)), ValueError, r"gate_up must stack gate and up .* got \[3, 7\]"),
    (lambda: silu_and_mul(torch.randn(3, 8).double()), ValueError, "gate_up must have dtype in"),
    (lambda: silu_and_mul(torch.randn(3, 8), backend="cuda"), ValueError, "backend must be one of"),
    (lambda: silu_and_mul_triton(torch.randn(3, 8), out=torch.empty(3, 5)), ValueError,
     r"out must be a contiguous torch.float32 tensor of shape \[3, 4\]"),
], ids=["not-a-tensor", "odd-last-dim", "float64", "bad-backend", "bad-out"])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_registered_op_checks_out():
    gate_up = to_device(torch.randn(3, 2 * 20))[0]
    torch.library.opcheck(torch.ops.adallava.silu_and_mul, (gate_up,))
    compiled = torch.compile(lambda t: silu_and_mul(t, backend="triton"), fullgraph=True, backend="eager")
    assert_close(compiled(gate_up).cpu(), oracle(gate_up.cpu()), torch.float32)
