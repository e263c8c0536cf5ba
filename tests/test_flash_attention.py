"""The flash attention kernel (Triton; under TRITON_INTERPRET=1 on a CPU) against float64 references.

Outputs are filled with NaN first, so an element the kernel never writes fails.
KV splits are forced both ways, so the combine path runs.
"""

import pytest
import torch

from adallava_kernels.ops.flash_attention import flash_attention
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def attention_reference(q, k, v, head_to_kv, padding):
    """float64 causal attention; queries are the last q_len positions; rows that see nothing are 0."""
    q, k, v = (t.double() for t in (q, k, v))
    sq, skv = q.shape[1], k.shape[2]
    k, v = k[:, head_to_kv.long()], v[:, head_to_kv.long()]
    scores = torch.einsum("bshd,bhkd->bhsk", q, k) * q.shape[-1] ** -0.5
    visible = torch.arange(skv)[None, :] <= torch.arange(skv - sq, skv)[:, None]
    visible = visible[None, None] & (padding.bool()[:, None, None, :] if padding is not None else True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhsk,bhkd->bshd", probs, v)


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch, q_len, kv_len, head_dim",
    [(1, 1, 83, 128), (2, 3, 40, 24), (1, 37, 37, 16), (2, 21, 50, 32)],
    ids=["decode-d128", "3-new-d24", "prefill-37", "chunk-21-of-50"],
)
def test_flash_attention(batch, q_len, kv_len, head_dim, dtype, split):
    nq, nkv = 3, 2
    q = torch.randn(batch, q_len, nq, head_dim).to(dtype)
    # K/V as views into a longer cache buffer: not contiguous in the sequence dimension's extent.
    k = torch.randn(batch, nkv, kv_len + 9, head_dim).to(dtype)[:, :, :kv_len]
    v = torch.randn(batch, nkv, kv_len + 9, head_dim).to(dtype)[:, :, :kv_len]
    head_to_kv = torch.tensor([1, 0, 1], dtype=torch.int32)
    padding = torch.ones(batch, kv_len, dtype=torch.int32)
    padding[0, : kv_len // 3] = 0
    if batch > 1:
        padding[1, -1] = 0
    out = poisoned(batch, q_len, nq, head_dim, dtype=dtype, device=DEVICE)
    flash_attention(*to_device(q, k, v, head_to_kv, padding), out, head_dim**-0.5, split=split)
    assert_close(out.cpu(), attention_reference(q, k, v, head_to_kv, padding))


@pytest.mark.parametrize("split", [1, 2])
def test_flash_attention_without_padding_and_all_masked_rows(split):
    q = torch.randn(1, 5, 2, 16)
    k, v = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    head_to_kv = torch.zeros(2, dtype=torch.int32)
    out = poisoned(1, 5, 2, 16, dtype=torch.float32, device=DEVICE)
    flash_attention(*to_device(q, k, v, head_to_kv), None, out, 0.25, split=split)
    assert_close(out.cpu(), attention_reference(q, k, v, head_to_kv, None))
    padding = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.int32)  # the first 3 queries see nothing
    flash_attention(*to_device(q, k, v, head_to_kv, padding), out, 0.25, split=split)
    out = out.cpu()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert_close(out, attention_reference(q, k, v, head_to_kv, padding))
