"""Rotary embedding of the q|k heads of a stacked projection, in place (Triton; under TRITON_INTERPRET=1 on a
CPU) against float64 and transformers' apply_rotary_pos_emb."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adallava_kernels.ops import library  # noqa: F401  (registers the operators)
from adallava_kernels.ops.rope import rope, rope_, rope_sign, rope_triton_
from adallava_kernels.testing import assert_close

from _device import to_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rotary(batch: int, seq: int, d: int, dtype: torch.dtype):
    """cos, sin ``[batch, seq, d]`` of random positions, as transformers' rotary module builds them."""
    positions = torch.randint(0, 4000, (batch, seq)).double()
    freqs = positions[..., None] / 10000 ** (torch.arange(0, d, 2).double() / d)
    angles = torch.cat([freqs, freqs], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def oracle(x, cos, sin, heads):
    """Heads ``[0, heads)`` rotated in float64 from the same rounded inputs, the rest as they were."""
    out = x.double().clone()
    q = out[:, :, :heads].transpose(1, 2)
    rotated, _ = apply_rotary_pos_emb(q, q, cos.double(), sin.double())
    out[:, :, :heads] = rotated.transpose(1, 2)
    return out


# Head sizes 24 (a half of 12: masked lanes) and 128 (LLaVA's); rotated heads across a block of 16 (21 of 25);
# none and all; cos shared by the batch (1) or per row.
CASES = [pytest.param(batch, seq, total, heads, d, DTYPES[name], shared, id=f"B{batch}-T{seq}-H{heads}of{total}-"
                      f"D{d}-{name}{'-shared-cos' if shared else ''}")
         for batch, seq, total, heads, d, shared in [(2, 5, 25, 21, 24, False), (1, 3, 8, 8, 128, False),
                                                     (3, 1, 6, 4, 24, True), (2, 2, 5, 0, 24, False)]
         for name in DTYPES]


@pytest.mark.parametrize("batch, seq, total, heads, d, dtype, shared", CASES)
def test_triton_equals_float64_and_leaves_the_other_heads(batch, seq, total, heads, d, dtype, shared):
    x = torch.randn(batch, seq, total, d).to(dtype)
    cos, sin = rotary(1 if shared else batch, seq, d, dtype)
    out = rope_triton_(*to_device(x.clone(), cos, sin), heads).cpu()
    assert_close(out, oracle(x, cos, sin, heads), dtype)
    assert torch.equal(out[:, :, heads:], x[:, :, heads:])  # v is not touched


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_torch_path_is_transformers_bit_for_bit(dtype):
    x = torch.randn(2, 4, 6, 24).to(dtype)
    cos, sin = rotary(2, 4, 24, dtype)
    expected, _ = apply_rotary_pos_emb(x[:, :, :4].transpose(1, 2), x[:, :, :4].transpose(1, 2), cos, sin)
    out = rope_(x.clone(), cos, sin, 4, backend="torch")
    assert torch.equal(out[:, :, :4], expected.transpose(1, 2)) and torch.equal(out[:, :, 4:], x[:, :, 4:])
    signed = (sin * rope_sign(24, dtype, sin.device))[:, :, None]
    assert torch.equal(rope(x[:, :, :4], cos[:, :, None], signed), expected.transpose(1, 2))


def test_a_decode_step_layout():
    # A decode step's projection is [rows, heads, 1, d]: the same memory as [rows, 1, heads, d].
    qkv = torch.randn(3, 10, 1, 24)
    cos, sin = rotary(3, 1, 24, torch.float32)
    expected = oracle(qkv.view(3, 1, 10, 24), cos, sin, 8)
    flat = to_device(qkv.clone())[0]
    rope_(flat.view(3, 1, 10, 24), *to_device(cos, sin), 8, backend="triton")
    assert_close(flat.cpu().view(3, 1, 10, 24), expected, torch.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, c, s: rope_(x[0], c, s, 2), ValueError, "x must be 4-D"),
    (lambda x, c, s: rope_(x[..., :23], c, s, 2), ValueError, "x must have an even head size"),
    (lambda x, c, s: rope_(x, c, s, 7), ValueError, r"heads must be an int in \[0, 6\]"),
    (lambda x, c, s: rope_(x, c.double(), s, 2), ValueError, "cos must have dtype in"),
    (lambda x, c, s: rope_(x, c[:, :3], s, 2), ValueError, r"cos must be \[2 or 1, 4, 24\]"),
    (lambda x, c, s: rope_(x, c, s, 2, backend="gpu"), ValueError, "backend must be one of"),
], ids=["3-D", "odd-head-size", "too-many-heads", "cos-dtype", "cos-shape", "bad-backend"])
def test_bad_input_is_named(call, error, match):
    x = torch.randn(2, 4, 6, 24)
    cos, sin = rotary(2, 4, 24, torch.float32)
    with pytest.raises(error, match=match):
        call(x, cos, sin)


def test_the_registered_op_checks_out():
    x = torch.randn(2, 3, 4, 24)
    cos, sin = rotary(2, 3, 24, torch.float32)
    torch.library.opcheck(torch.ops.adallava.rope_, (*to_device(x.clone(), cos, sin), 3))
    compiled = torch.compile(lambda t, c, s: rope_(t, c, s, 3, backend="triton"), fullgraph=True, backend="eager")
    out = compiled(*to_device(x.clone(), cos, sin))
    assert_close(out.cpu(), oracle(x, cos, sin, 3), torch.float32)
