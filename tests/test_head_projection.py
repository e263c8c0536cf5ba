"""The per-head projection kernel (Triton; under TRITON_INTERPRET=1 on a CPU) against float64 references.

Outputs are filled with NaN first, so an element the kernel never writes fails.
Reduction splits are forced both ways, so the split path (partials met through the workspace's tickets) runs.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adallava_kernels
from adallava_kernels.ops import workspace
from adallava_kernels.ops.head_projection import head_projection
from adallava_kernels.ops.rms_norm import rms_norm_reference
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq", [(1, 1), (3, 1), (1, 37)], ids=["T1", "B3", "T37"])
def test_head_projection_takes_its_input_through_the_norm(batch, seq, dtype):
    """norm_weight: the projection of transformers' RMSNorm of x (a decode layer's input norm, fused)."""
    hidden, head_dim, heads, eps = 90, 24, 5, 1e-5
    x = torch.randn(batch, seq, hidden).to(dtype)
    norm = (1 + 0.3 * torch.randn(hidden)).to(dtype)
    w = (torch.randn(heads * head_dim, hidden) * hidden**-0.5).to(dtype)
    chosen = torch.tensor([4, 0, 3], dtype=torch.int32)
    cos, sin = rope_tables(batch, seq, head_dim)
    out = poisoned(batch, seq, 3, head_dim, dtype=dtype, device=DEVICE)
    head_projection(*to_device(x, w, chosen), head_dim, *to_device(cos, sin), out, norm_weight=norm.to(DEVICE),
                    eps=eps)
    normed = rms_norm_reference(x.double(), norm.double(), eps)
    expected = F.linear(normed, w.double()).view(batch, seq, heads, head_dim)[:, :, chosen.long()]
    assert_close(out.cpu(), rotate(expected, cos.double()[:, :, None], sin.double()[:, :, None]))


def test_head_projection_refuses_a_bad_norm_weight_or_a_split_norm():
    x, w = torch.randn(1, 1, 90), torch.randn(48, 90)
    heads, out = torch.tensor([0, 1], dtype=torch.int32), torch.empty(1, 1, 2, 24)
    for bad in (torch.ones(89), torch.ones(90, dtype=torch.float16), torch.ones(180)[::2]):
        with pytest.raises(ValueError, match="norm_weight must be a contiguous torch.float32 tensor of shape \\[90\\]"):
            head_projection(x, w, heads, 24, None, None, out, norm_weight=bad, eps=1e-5)
    with pytest.raises(ValueError, match="split must be 1 or None with norm_weight"):
        head_projection(x, w, heads, 24, None, None, out, norm_weight=torch.ones(90), eps=1e-5, split=3)


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
    writes nothing to it: its poison stays, with split reductions too (their programs take no ticket)."""
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
    assert free.isnan().all(), free


# Prefill: 19 tokens, two 16-row tiles (the second partly masked), a head's 20 rotation pairs in one
# 32-pair tile; decode: 2 x 3 tokens, a head's pairs over two 16-pair programs (the second partly masked).
SPLIT_SHAPES = {"prefill-T19": (1, 19), "decode-B2-T3": (2, 3)}


def split_case(dtype, batch, seq, seed=0):
    """hidden 150 (5 K blocks of 32, the last partial), head_dim 40; slots 3 q heads (rotated), then one
    unrotated."""
    g = torch.Generator().manual_seed(seed)
    hidden, head_dim = 150, 40
    x = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    w = (torch.randn(6 * head_dim, hidden, generator=g) * hidden**-0.5).to(dtype)
    slots = torch.tensor([5, 0, 2, 3], dtype=torch.int32)
    angles = torch.rand(batch, seq, head_dim // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    plain = F.linear(x.double(), w.double()).view(batch, seq, 6, head_dim)[:, :, slots.long()]
    expected = torch.cat([rotate(plain[:, :, :3], angles.cos().double()[:, :, None], angles.sin().double()[:, :, None]),
                          plain[:, :, 3:]], dim=2)
    return (x, w, slots, head_dim, angles.cos(), angles.sin()), expected


@pytest.mark.parametrize("split", [3, 7], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES.values(), ids=SPLIT_SHAPES.keys())
def test_an_odd_split_matches_the_reference(shape, dtype, split):
    """An odd number of splits over sizes that are no multiple of any block: 7 splits of 5 K blocks leave
    two splits nothing to add (their zero partials still count, and take their tickets)."""
    (x, w, slots, head_dim, cos, sin), expected = split_case(dtype, *shape)
    out = poisoned(*expected.shape, dtype=dtype, device=DEVICE)
    head_projection(*to_device(x, w, slots), head_dim, *to_device(cos, sin), out, split=split, rope_slots=3)
    assert_close(out.cpu(), expected)


@pytest.mark.parametrize("shape", SPLIT_SHAPES.values(), ids=SPLIT_SHAPES.keys())
def test_split_runs_are_bitwise_repeatable_and_leave_their_tickets_at_zero(shape):
    """Two launches of a split reduction give the same bits (the partials are summed in split order, not
    added atomically), and every ticket counter is back at 0 after each (the next launch, or a replayed
    graph, starts from there)."""
    (x, w, slots, head_dim, cos, sin), expected = split_case(torch.float32, *shape, seed=1)
    args = to_device(x, w, slots)
    outs = []
    for _ in range(2):
        out = poisoned(*expected.shape, dtype=torch.float32, device=DEVICE)
        head_projection(*args, head_dim, *to_device(cos, sin), out, split=5, rope_slots=3)
        outs.append(out.cpu())
        tiles = 2 * 2 * len(slots)  # at most 2 row tiles by 2 pair blocks a slot
        assert torch.count_nonzero(workspace.counters(torch.device(DEVICE), tiles)[:tiles]) == 0
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], expected)


def atomic_calls(tree: ast.Module) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("atomic_")]


# The memory orders an integer counter is taken or read with (the phased kernels order their phases by them).
COUNTER_ORDERS = {"'relaxed'", "'acquire'", "'release'", "'acq_rel'"}
# Modules whose atomics are on counters their callers pass (the wait of ops.triton_utils), not their own.
COUNTER_HELPERS = {"triton_utils.py"}


def is_counter(call: ast.Call) -> bool:
    """``tl.atomic_add(<pointer(s)>, 0 or 1[, mask=...][, sem=...])``: int32 counters taken (a ticket, a count of
    tiles done) or read (plus 0, a poll), never a float added."""
    return (ast.unparse(call.func) == "tl.atomic_add" and len(call.args) == 2
            and isinstance(call.args[1], ast.Constant) and type(call.args[1].value) is int
            and call.args[1].value in (0, 1)
            and all(k.arg == "mask" or (k.arg == "sem" and ast.unparse(k.value) in COUNTER_ORDERS)
                    for k in call.keywords))


def test_no_kernel_adds_floats_atomically():
    """Every atomic in the library's kernels is on an int32 counter of the workspace (a ticket, a count, a poll):
    no float is added atomically (that order varies run to run, so results would not be bitwise repeatable),
    and a module that takes counters gets them from :mod:`adallava_kernels.ops.workspace`."""
    tickets = {}
    for path in sorted(Path(adallava_kernels.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = atomic_calls(tree)
        assert all(is_counter(c) for c in calls), [(path.name, c.lineno, ast.unparse(c)) for c in calls]
        if calls:
            tickets[path.name] = len(calls)
            imports = [alias.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "workspace"
                       for alias in n.names]
            assert "counters" in imports or path.name in COUNTER_HELPERS, path.name
    assert set(tickets) >= {"head_projection.py", "gathered_linear.py", "paged_decode_kernel.py", "phased_mlp.py",
                            "phased_attention.py"}, tickets


def test_the_counter_check_refuses_a_float_atomic_add():
    float_add = ast.parse('tl.atomic_add(y_ptr + y_off, out_lo, mask=tile_mask)')
    float_ticket = ast.parse('tl.atomic_add(cnt_ptr + tile, 1.0, sem="acq_rel")')
    ticket = ast.parse('tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")')
    poll = ast.parse('tl.atomic_add(sync_ptr + split, 0, sem="acquire")')
    counts = ast.parse('tl.atomic_add(rel_ptr + shares, 1, mask=shares <= last, sem="release")')
    float_counts = ast.parse('tl.atomic_add(y_ptr + offs, 1.0, mask=offs < n, sem="release")')
    assert [is_counter(c) for t in (float_add, float_ticket, ticket, poll, counts, float_counts)
            for c in atomic_calls(t)] == [False, False, True, True, True, False]


# The slots of a stacked [q; k; v] weight (5 q heads, 2 k heads, 2 v heads): q 0, 3, 4, k 0, 1 and v 0, 1;
# or a list padded to its capacity (a plan bound as data), a free slot among the q heads, then KV slot 1
# free (its K and V slots -1).
PAGED_SLOTS = {"all": [0, 3, 4, 5, 6, 7, 8], "free": [3, -1, 0, 6, -1, 8, -1]}


@pytest.mark.parametrize("split, norm", [(None, False), (3, False), (None, True)], ids=["whole", "split3", "norm"])
@pytest.mark.parametrize("slots", PAGED_SLOTS.values(), ids=PAGED_SLOTS.keys())
@pytest.mark.parametrize("seq", [1, 3], ids=["decode", "T3"])
def test_head_projection_writes_k_and_v_to_the_pages(seq, slots, split, norm):
    """The KV append fused in: the K and V slots go to each row's pages at its positions (K rotated, V
    not), q to ``out``; every other element of the pages, and a free q slot of ``out``, keeps its poison.
    head_dim 40: a head's 20 rotation pairs span two decode programs, the second partly masked. By default
    the paged projection does not split its reduction; a forced split writes the pages from its last
    program, once. With ``norm`` the input goes through RMSNorm first, in the same launch (a decode
    layer's q, k and v)."""
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
    norm_weight = 1 + 0.3 * torch.randn(hidden, generator=g) if norm else None
    head_projection(*to_device(x, w, slots), head_dim, *to_device(cos, sin), q, rope_slots=5, paged=paged,
                    split=split, norm_weight=None if norm_weight is None else norm_weight.to(DEVICE), eps=1e-5)
    if norm:
        x = rms_norm_reference(x.double(), norm_weight.double(), 1e-5)

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
