"""Paged decode attention: the Triton kernel and the PyTorch path against a float64 loop over the pages."""

import os

import pytest
import torch

from adallava_kernels.ops.paged_attention import (
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_decode_splits,
)
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kv_slot(head_to_kv, b, h):
    """The KV slot of head ``h`` in row ``b``: from a map ``[heads]`` shared by every row, or ``[batch, heads]``."""
    return int(head_to_kv[h] if head_to_kv.dim() == 1 else head_to_kv[b, h])


def loop_oracle(q, pages, tables, head_to_kv, lengths, starts, scale):
    """float64, one (sequence, head) at a time, reading each visible position's page by hand. A head
    mapped to -1 (a free slot of a padded list, or a head its row's plan does not keep) attends nothing
    and gives 0."""
    batch, heads, d = q.shape
    page_size = pages.shape[2]
    out = torch.zeros(batch, heads, d, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = kv_slot(head_to_kv, b, h)
            if kv < 0:
                continue
            positions = range(int(starts[b]), int(lengths[b]))
            rows = [(int(tables[b, kv, p // page_size]), p % page_size) for p in positions]
            keys = torch.stack([pages[0, page, slot] for page, slot in rows]).double()
            values = torch.stack([pages[1, page, slot] for page, slot in rows]).double()
            weights = torch.softmax(keys @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ values
    return out


def case(dtype, page_size=5, width=7, seed=0):
    """3 sequences, 5 query heads over 2 KV heads (an arbitrary map after masking), pages of an odd size."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, d, num_pages = 3, 5, 2, 24, 60
    q = torch.randn(batch, heads, d, generator=g).to(dtype)
    pages = torch.randn(2, num_pages, page_size, d, generator=g).to(dtype)
    tables = torch.randperm(num_pages, generator=g)[: batch * kv_heads * width].view(batch, kv_heads, width).int()
    head_to_kv = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)
    # Lengths short of, at and inside the pages; left padding on two rows.
    lengths = torch.tensor([4, width * page_size, 19], dtype=torch.int32)
    starts = torch.tensor([0, 3, 18], dtype=torch.int32)
    return q, pages, tables, head_to_kv, lengths, starts, d**-0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_equals_the_loop(dtype):
    args = case(dtype)
    out = paged_decode_attention_reference(*args)
    assert_close(out, loop_oracle(*args), dtype)


@pytest.mark.parametrize("split", [1, 2, 4, None], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_equals_the_loop(dtype, split):
    q, pages, tables, head_to_kv, lengths, starts, scale = case(dtype)
    if split is None:  # as the runtime picks it: from the pages' capacity, not the lengths
        split = paged_decode_splits(3, 5, tables.shape[2] * pages.shape[2], DEVICE)
    out = poisoned(*q.shape, dtype=dtype, device=DEVICE)
    paged_decode_attention_triton(*to_device(q, pages, tables, head_to_kv, lengths, starts), scale, split, out=out)
    assert_close(out.cpu(), loop_oracle(q, pages, tables, head_to_kv, lengths, starts, scale))


def test_strided_query_and_one_page():
    """q as a slice of a projection output (the runtime's), a page size of 1 and a 1-position context."""
    q, pages, tables, head_to_kv, _, _, scale = case(torch.float32, page_size=1, width=9)
    wide = torch.randn(3, 9, 1, 24)
    wide[:, 2:7, 0] = q
    lengths, starts = torch.tensor([1, 9, 5], dtype=torch.int32), torch.tensor([0, 8, 0], dtype=torch.int32)
    out = paged_decode_attention_triton(*to_device(wide[:, 2:7, 0], pages, tables, head_to_kv, lengths, starts),
                                        scale, 3)
    assert_close(out.cpu(), loop_oracle(q, pages, tables, head_to_kv, lengths, starts, scale))


# (batch, heads, positions the pages hold) -> splits, on a device of 4 SMs (the CPU's stand-in) running 2
# programs each: one full wave, 8 // (batch * heads), at most one split per block of positions (32 under
# the interpreter, which splits small tests too; 64 compiled), at most 16.
SPLIT_CASES = [
    ((1, 1, 10), 1, 1),
    ((1, 1, 64), 2, 1),
    ((1, 1, 65), 3, 2),  # one position more capacity: one split more
    ((1, 1, 700), 8, 8),
    ((1, 3, 4096), 2, 2),  # 3 programs, 2 splits each: 6 of the 8 slots
    ((2, 2, 4096), 2, 2),
    ((3, 3, 4096), 1, 1),  # 9 programs already cover the 8 slots
    ((1, 1, 10**6), 8, 8),
]


@pytest.mark.parametrize("case, interpreted, compiled", SPLIT_CASES,
                         ids=[f"B{b}-H{h}-P{p}" for (b, h, p), _, _ in SPLIT_CASES])
def test_splits_follow_capacity(case, interpreted, compiled):
    expected = interpreted if os.environ.get("TRITON_INTERPRET") == "1" else compiled
    assert paged_decode_splits(*case, torch.device("cpu")) == expected


# Head lists padded with -1 (plans bound as data), the free slots after, between and before the real ones,
# or every slot free; the real slots' KV heads in another order than case()'s map.
PADDED = {
    "trailing": [1, 0, 1, -1, -1],
    "between": [1, -1, 1, -1, 1],  # no real slot reads KV head 0
    "leading": [-1, -1, 0, 1, 0],
    "all-free": [-1, -1, -1, -1, -1],
}


def poisoned_outside(pages, tables, head_to_kv, lengths, starts):
    """``pages`` with NaN everywhere but the positions a real slot may read (its row's visible ones, on the
    pages of its KV head; with a map per row, of its row's map): a read of anything else shows in the
    output."""
    page_size = pages.shape[2]
    readable = torch.zeros(pages.shape[1], page_size, dtype=torch.bool)
    for b in range(tables.shape[0]):
        for kv in {kv_slot(head_to_kv, b, h) for h in range(head_to_kv.shape[-1])} - {-1}:
            for p in range(int(starts[b]), int(lengths[b])):
                readable[int(tables[b, kv, p // page_size]), p % page_size] = True
    return torch.where(readable[None, :, :, None], pages, float("nan"))


@pytest.mark.parametrize("padded", PADDED.values(), ids=PADDED.keys())
@pytest.mark.parametrize("split", [1, 3])
def test_triton_skips_free_head_slots(split, padded):
    """A head list padded with -1 (a plan bound as data): the real heads equal the loop over the pages,
    free ones read no page and give 0, wherever they lie in the list. Every page element no real slot may
    read holds NaN."""
    q, pages, tables, _, lengths, starts, scale = case(torch.float32)
    padded = torch.tensor(padded, dtype=torch.int32)
    pages = poisoned_outside(pages, tables, padded, lengths, starts)
    out = poisoned(*q.shape, dtype=torch.float32, device=DEVICE)
    paged_decode_attention_triton(*to_device(q, pages, tables, padded, lengths, starts), scale, split, out=out)
    expected = loop_oracle(q, pages, tables, padded, lengths, starts, scale)
    assert_close(out.cpu(), expected)
    free = padded < 0
    assert torch.equal(out[:, free].cpu().double(), expected[:, free])  # exactly the oracle's 0


# -- a head map per row ------------------------------------------------------------------------------------
# head_to_kv [batch, heads]: each row's own plan, -1 where it does not keep a head.


def rowmap_case(dtype, group, seed):
    """5 sequences, 3 KV slots and ``group`` query heads per KV head (1: MHA, 2: GQA), head_dim 40, pages
    of 5 positions, 7 a row; odd lengths, left padding on two rows, one row with a single position. Each
    row keeps a random subset of the heads (about 60%, each kept head on its own KV head); one row keeps
    none and one keeps all."""
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, d, page_size, width, num_pages = 5, 3, 40, 5, 7, 120
    heads = kv_heads * group
    q = torch.randn(batch, heads, d, generator=g).to(dtype)
    pages = torch.randn(2, num_pages, page_size, d, generator=g).to(dtype)
    tables = torch.randperm(num_pages, generator=g)[: batch * kv_heads * width].view(batch, kv_heads, width).int()
    full = (torch.arange(heads) // group).expand(batch, heads)
    kept = torch.rand(batch, heads, generator=g) < 0.6
    kept[1], kept[3] = False, True
    head_to_kv = torch.where(kept, full, -1).to(torch.int32)
    lengths = torch.tensor([1, 33, 19, width * page_size, 27], dtype=torch.int32)
    starts = torch.tensor([0, 3, 18, 0, 5], dtype=torch.int32)
    return q, pages, tables, head_to_kv, lengths, starts, d**-0.5


ROWMAP_GROUPS = {"MHA": 1, "GQA2": 2}


@pytest.mark.parametrize("group", ROWMAP_GROUPS.values(), ids=ROWMAP_GROUPS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_takes_a_map_per_row(dtype, group):
    args = rowmap_case(dtype, group, seed=1)
    out = paged_decode_attention_reference(*args)
    assert_close(out, loop_oracle(*args), dtype)
    free = args[3] < 0
    assert (out[free] == 0).all()


@pytest.mark.parametrize("split", [1, 2, 3, 5], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("group", ROWMAP_GROUPS.values(), ids=ROWMAP_GROUPS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_takes_a_map_per_row(dtype, group, split):
    """Each row's own map, its free heads at random: equal to the loop over the pages and to the reference,
    the free (row, head) pairs exactly 0; the poisoned output fully written."""
    q, pages, tables, head_to_kv, lengths, starts, scale = case_args = rowmap_case(dtype, group, seed=2 + group)
    out = poisoned(*q.shape, dtype=dtype, device=DEVICE)
    paged_decode_attention_triton(*to_device(q, pages, tables, head_to_kv, lengths, starts), scale, split, out=out)
    out = out.cpu()
    assert_close(out, loop_oracle(*case_args))
    assert_close(out, paged_decode_attention_reference(*case_args).double(), dtype)
    free = head_to_kv < 0
    assert free.any() and (~free).any()
    assert torch.equal(out[free], torch.zeros_like(out[free]))


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("group", ROWMAP_GROUPS.values(), ids=ROWMAP_GROUPS.keys())
def test_a_head_its_row_does_not_keep_reads_no_page(group, split):
    """Every page element that no kept (row, head) may read holds NaN, the pages of a KV slot that another
    row keeps included: the free pairs give exactly 0, the kept ones equal the loop, nothing is NaN. With
    splits, the ticket counters are all back at 0 and a second launch gives the same bits."""
    from adallava_kernels.ops.workspace import counters

    q, pages, tables, head_to_kv, lengths, starts, scale = rowmap_case(torch.float32, group, seed=7)
    # Row 2 keeps only KV slot 2's heads: the pages of its slots 0 and 1 (which other rows keep) are NaN.
    slot = torch.arange(q.shape[1]) // group
    head_to_kv[2] = torch.where(slot == 2, 2, -1)
    pages = poisoned_outside(pages, tables, head_to_kv, lengths, starts)
    assert pages[:, tables[2, :2].flatten().long()].isnan().any()
    args = to_device(q, pages, tables, head_to_kv, lengths, starts)
    outs = []
    for _ in range(2):
        out = poisoned(*q.shape, dtype=torch.float32, device=DEVICE)
        paged_decode_attention_triton(*args, scale, split, out=out)
        outs.append(out.cpu())
        assert (counters(torch.device(DEVICE), q.shape[0] * q.shape[1])[:q.shape[0] * q.shape[1]] == 0).all()
    assert torch.equal(outs[0], outs[1])
    assert outs[0].isfinite().all()
    assert_close(outs[0], loop_oracle(q, pages, tables, head_to_kv, lengths, starts, scale))
    free = head_to_kv < 0
    assert torch.equal(outs[0][free], torch.zeros_like(outs[0][free]))


@pytest.mark.parametrize("split", [1, 3])
def test_a_map_per_row_that_repeats_one_map_equals_it(split):
    """The map ``[heads]`` and the same map on every row, as a ``[batch, heads]`` tensor (int64, or an
    expanded view with a row stride of 0): the same bits."""
    q, pages, tables, head_to_kv, lengths, starts, scale = case(torch.float16)
    head_to_kv = torch.tensor([0, -1, 1, 0, -1], dtype=torch.int32)
    outs = []
    for m in (head_to_kv, head_to_kv.expand(3, -1), head_to_kv.long().repeat(3, 1)):
        out = poisoned(*q.shape, dtype=torch.float16, device=DEVICE)
        paged_decode_attention_triton(*to_device(q, pages, tables, m, lengths, starts), scale, split, out=out)
        outs.append(out.cpu())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


BAD_MAPS = {
    "3-D": (lambda: torch.zeros(3, 5, 1, dtype=torch.int32), r"head_to_kv must be \[heads\] = \[5\] or \[batch"),
    "heads": (lambda: torch.zeros(4, dtype=torch.int32), r"got shape \[4\]"),
    "rows": (lambda: torch.zeros(2, 5, dtype=torch.int32), r"\[batch, heads\] = \[3, 5\].*got shape \[2, 5\]"),
    "float": (lambda: torch.zeros(3, 5), "head_to_kv must have dtype in"),
}


@pytest.mark.parametrize("bad", BAD_MAPS.values(), ids=BAD_MAPS.keys())
def test_a_bad_head_map_is_named(bad):
    """The Triton path, the registered op, its fake (what torch.compile traces) and the reference refuse a
    map of the wrong dims, shape or dtype, naming it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adallava_kernels.ops.library import adallava_ops

    make, match = bad
    q, pages, tables, _, lengths, starts, scale = case(torch.float32)
    args = to_device(q, pages, tables, make(), lengths, starts)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_triton(*args, scale, 2)
    with pytest.raises(ValueError, match=match):
        adallava_ops().paged_decode_attention(*args, scale, 2)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_reference(*args, scale)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        adallava_ops().paged_decode_attention(*(mode.from_tensor(a) for a in args), scale, 2)
