"""The per-head projection kernel (Triton; under TRITON_INTERPRET=1 on a CPU) against float64 references.

Outputs are filled with NaN first, so an element the kernel never writes fails.
Reduction splits are forced both ways, so the atomic path runs.
"""

import pytest
import torch
import torch.nn.functional as F

from adallava_kernels.ops.head_projection import head_projection
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rotate(t, cos, sin):
    lo, hi = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-hi, lo), dim=-1) * sin


def rope_tables(batch, seq, head_dim):
    angles = torch.rand(batch, seq, head_dim // 2) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (1, 37)], ids=["T1", "B2-T7", "T37"])
def test_head_projection(batch, seq, dtype, rope, split):
    hidden, head_dim, heads = 90, 24, 5
    x = torch.randn(batch, seq, hidden).to(dtype)
    w = (torch.randn(heads * head_dim, hidden) * hidden**-0.5).to(dtype)
    chosen = torch.tensor([0, 3, 4], dtype=torch.int32)
    cos, sin = rope_tables(batch, seq, head_dim) if rope else (None, None)
    # The [batch, heads, seq, d] layout of a KV cache, written through a transposed view.
    out = poisoned(batch, 3, seq, head_dim, dtype=dtype, device=DEVICE)
    head_projection(*to_device(x, w, chosen), head_dim, *to_device(cos, sin), out.transpose(1, 2), split=split)
    expected = F.linear(x.double(), w.double()).view(batch, seq, heads, head_dim)[:, :, chosen.long()]
    if rope:
        expected = rotate(expected, cos.double()[:, :, None], sin.double()[:, :, None])
    assert_close(out.cpu(), expected.transpose(1, 2))


@pytest.mark.parametrize("split", [1, 3])
def test_head_projection_rotates_only_the_first_slots(split):
    """q, k and v heads of a stacked weight in one launch: the v slots (from rope_slots on) are not rotated."""
    batch, seq, hidden, head_dim = 2, 3, 90, 24
    x = torch.randn(batch, seq, hidden)
    w = torch.randn(9 * head_dim, hidden) * hidden**-0.5  # 5 q heads, 2 k heads, 2 v heads
    slots = torch.tensor([0, 3, 4, 5, 6, 8], dtype=torch.int32)  # q 0, 3, 4; k 0, 1; v 1
    cos, sin = rope_tables(batch, seq, head_dim)
    out = poisoned(batch, seq, 6, head_dim, dtype=torch.float32, device=DEVICE)
    head_projection(*to_device(x, w, slots), head_dim, *to_device(cos, sin), out, split=split, rope_slots=5)
    plain = F.linear(x.double(), w.double()).view(batch, seq, 9, head_dim)[:, :, slots.long()]
    expected = torch.cat([rotate(plain[:, :, :5], cos.double()[:, :, None], sin.double()[:, :, None]),
                          plain[:, :, 5:]], dim=2)
    assert_close(out.cpu(), expected)


@pytest.mark.parametrize("split", [1, 3])
def test_head_projection_skips_free_slots(split):
    """A head list padded to its capacity with -1 (a plan bound as data): the real slots are exact, and
    the kernel reads no weight row for a free one (an index of -1 would read before the weight) and
    writes nothing to it: its poison stays. With split reductions the launcher copies its zeroed fp32
    sums whole, so a free slot holds 0."""
    batch, seq, hidden, head_dim = 2, 1, 90, 24
    x = torch.randn(batch, seq, hidden)
    w = torch.randn(5 * head_dim, hidden) * hidden**-0.5
    slots = torch.tensor([3, 0, 4, -1, -1, -1, -1], dtype=torch.int32)
    cos, sin = rope_tables(batch, seq, head_dim)
    out = poisoned(batch, seq, 7, head_dim, dtype=torch.float32, device=DEVICE)
    head_projection(*to_device(x, w, slots), head_dim, *to_device(cos, sin), out, split=split)
    plain = F.linear(x.double(), w.double()).view(batch, seq, 5, head_dim)[:, :, [3, 0, 4]]
    assert_close(out[:, :, :3].cpu(), rotate(plain, cos.double()[:, :, None], sin.double()[:, :, None]))
    free = out[:, :, 3:].cpu()
    assert (free.isnan() if split == 1 else free == 0).all(), free


# The slots of a stacked [q; k; v] weight (5 q heads, 2 k heads, 2 v heads): q 0, 3, 4, k 0, 1 and v 0, 1;
# or a list padded to its capacity (a plan bound as data), a free slot among the q heads, then KV slot 1
# free (its K and V slots -1).
PAGED_SLOTS = {"all": [0, 3, 4, 5, 6, 7, 8], "free": [3, -1, 0, 6, -1, 8, -1]}


@pytest.mark.parametrize("slots", PAGED_SLOTS.values(), ids=PAGED_SLOTS.keys())
@pytest.mark.parametrize("seq", [1, 3], ids=["decode", "T3"])
def test_head_projection_writes_k_and_v_to_the_pages(seq, slots):
    """The KV append fused in: the K and V slots go to each row's pages at its positions (K rotated, V
    not), q to ``out``; every other element of the pages, and a free q slot of ``out``, keeps its poison.
    head_dim 40: a head's 20 rotation pairs span two decode programs, the second partly masked."""
    from adallava_kernels.ops.head_projection import PagedKV

    batch, hidden, head_dim, page_size, width = 3, 90, 40, 5, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, seq, hidden, generator=g)
    w = torch.randn(9 * head_dim, hidden, generator=g) * hidden**-0.5  # 5 q heads, 2 k heads, 2 v heads
    slots = torch.tensor(slots, dtype=torch.int32)
    cos, sin = rope_tables(batch, seq, head_dim)
    tables = torch.randperm(40, generator=g)[:batch * 2 * width].view(batch, 2, width).int()
    positions = torch.tensor([0, 7, 20 - seq], dtype=torch.int32)
    k_pages = poisoned(40, page_size, head_dim, dtype=torch.float32, device=DEVICE)
    v_pages = poisoned(40, page_size, head_dim, dtype=torch.float32, device=DEVICE)
    q = poisoned(batch, seq, 3, head_dim, dtype=torch.float32, device=DEVICE)
    paged = PagedKV(k_pages, v_pages, *to_device(tables, positions))
    head_projection(*to_device(x, w, slots), head_dim, *to_device(cos, sin), q, rope_slots=5, paged=paged)

    # A free slot's expected value is NaN: what it must leave unwritten.
    real = slots >= 0
    plain = torch.full((batch, seq, 7, head_dim), float("nan"), dtype=torch.float64)
    plain[:, :, real] = F.linear(x.double(), w.double()).view(batch, seq, 9, head_dim)[:, :, slots[real].long()]
    rotated = rotate(plain[:, :, :5], cos.double()[:, :, None], sin.double()[:, :, None])
    expected_k = torch.full((40, page_size, head_dim), float("nan"), dtype=torch.float64)
    expected_v = expected_k.clone()
    for b in range(batch):
        for s in range(seq):
            position = int(positions[b]) + s
            for j in range(2):
                page, offset = int(tables[b, j, position // page_size]), position % page_size
                if real[3 + j]:
                    expected_k[page, offset] = rotated[b, s, 3 + j]
                if real[5 + j]:
                    expected_v[page, offset] = plain[b, s, 5 + j]
    for actual, expected in ((q.cpu(), rotated[:, :, :3]), (k_pages.cpu(), expected_k), (v_pages.cpu(), expected_v)):
        written = ~expected.isnan()
        assert torch.equal(~actual.isnan(), written)  # nothing else was touched
        assert_close(actual[written], expected[written])
