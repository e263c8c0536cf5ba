"""A decode layer's attention and o_proj in one launch of two phases (ops.phased_attention) against the two
launches it replaces and a float64 reference; its counters; its bad inputs; its sm_90 code (compiled without a
GPU)."""

from pathlib import Path

import pytest
import torch

from adallava_kernels.ops import gathered_linear, phased_attention, workspace
from adallava_kernels.ops.layout import prepare_column_gather
from adallava_kernels.ops.paged_attention import paged_decode_attention_triton
from adallava_kernels.ops.triton_utils import config
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE
from _phases import assert_phases_synchronise, compiled_variants
from test_paged_attention import loop_oracle

ROOT = Path(__file__).resolve().parents[1]
phased = phased_attention.paged_attention_o_proj_phased
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def layer(rows, heads, kv_heads, d, hidden, kept, dtype, page_size=5, width=6, seed=0):
    """A decode layer's attention inputs: ``rows`` rows over ``heads`` query-head slots (the first ``kept``
    the union's, the rest free: -1 for every row), each row lacking a random one of the union's heads; pages
    of an odd size, lengths short of, at and inside them, left padding on some rows; ``w_o`` and a residual."""
    g = torch.Generator().manual_seed(seed)
    num_pages = rows * kv_heads * width + 3
    q = torch.randn(rows, heads, d, generator=g).to(dtype)
    pages = torch.randn(2, num_pages, page_size, d, generator=g).to(dtype)
    tables = torch.randperm(num_pages, generator=g)[:rows * kv_heads * width].view(rows, kv_heads, width).int()
    kv_map = (torch.arange(heads) * kv_heads // heads).to(torch.int32).repeat(rows, 1)
    kv_map[:, kept:] = -1
    for r in range(rows):
        if kept > 1:
            kv_map[r, int(torch.randint(kept, (1,), generator=g))] = -1
    lengths = torch.randint(1, width * page_size + 1, (rows,), generator=g).to(torch.int32)
    lengths[0] = width * page_size
    starts = (torch.rand(rows, generator=g) * lengths * 0.5).to(torch.int32)
    w_o = (torch.randn(hidden, heads * d, generator=g) * (heads * d) ** -0.5).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    listed = torch.arange(kept * d, dtype=torch.int32)
    cols = torch.cat([listed, torch.full((heads * d - listed.numel(),), -1, dtype=torch.int32)])
    count = torch.tensor([listed.numel()], dtype=torch.int32)
    tensors = [t.to(DEVICE) for t in (q, pages, tables, kv_map, lengths, starts, w_o, residual, cols, count)]
    return tensors, d ** -0.5


def two_launches(q, pages, tables, kv_map, lengths, starts, scale, split, w, cols, count, residual, dense,
                 dense_weight):
    attended = paged_decode_attention_triton(q, pages, tables, kv_map, lengths, starts, scale, split)
    return gathered_linear.col_gathered_linear(attended.flatten(1), w, cols, count=count, residual=residual,
                                               dense=dense, dense_weight=dense_weight)


def reference(q, pages, tables, kv_map, lengths, starts, scale, w_o, residual, counted):
    attended = loop_oracle(q.cpu(), pages.cpu(), tables.cpu(), kv_map.cpu(), lengths.cpu(), starts.cpu(), scale)
    return residual.cpu().double() + attended.flatten(1)[:, :counted] @ w_o.cpu().double()[:, :counted].T


# kind: "partial" (w_o column-major, its row-major matrix as dense_weight), "dense" (row-major, DENSE).
# rows, heads, kv_heads, head_dim, hidden, the union's heads, the attention's splits.
CASES = [
    ("partial", 1, 6, 2, 32, 72, 3, 2),     # half the heads, free slots after them
    ("partial", 3, 5, 5, 24, 40, 5, 1),     # every head (the row-major matrix is read); head_dim below a tile
    ("partial", 16, 4, 2, 48, 40, 1, 3),    # one head, head_dim not a power of 2, 16 rows
    ("partial", 2, 4, 2, 32, 40, 0, 2),     # no head: the residual itself
    ("dense", 2, 6, 3, 32, 72, 6, 4),       # a layer kept whole
    ("dense", 3, 4, 2, 32, 40, 0, 1),       # a layer every row skips
]


def _run(kind, rows, heads, kv_heads, d, hidden, kept, split, dtype):
    (q, pages, tables, kv_map, lengths, starts, w_o, residual, cols, count), scale = layer(
        rows, heads, kv_heads, d, hidden, kept, dtype)
    dense = kind == "dense"
    w, dense_weight = (w_o, None) if dense else (prepare_column_gather(w_o), w_o)
    args = (q, pages, tables, kv_map, lengths, starts, scale, split, w, cols, count, residual, dense, dense_weight)
    return args, (q, pages, tables, kv_map, lengths, starts, scale, w_o, residual, kept * d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, rows, heads, kv_heads, d, hidden, kept, split", CASES)
def test_one_launch_gives_the_two_launches_result(kind, rows, heads, kv_heads, d, hidden, kept, split, dtype):
    """Bit for bit under the interpreter (the same programs and splits), the float64 reference within
    tolerance, every output written, the counters back to 0."""
    args, ref = _run(kind, rows, heads, kv_heads, d, hidden, kept, split, dtype)
    out = poisoned(rows, hidden, dtype=dtype, device=DEVICE)
    for _ in range(2):  # the second launch starts from the counters the first put back
        got = phased(*args, out=out)
        assert got is out and not out.isnan().any()
        assert not workspace.counters(out.device, 1).any()
    if DEVICE.type == "cpu":
        assert torch.equal(out, two_launches(*args))
    assert_close(out.cpu(), reference(*ref), dtype)


@pytest.mark.parametrize("kind, rows, heads, kv_heads, d, hidden, kept, split", [
    ("partial", 2, 6, 2, 16, 40, 5, 2),    # a share holds 4 head slots at 16 wide (o_proj tiles 64 deep)
    ("dense", 1, 4, 2, 96, 72, 4, 3),      # a head slot straddles two shares (96 wide, shares of 64)
])
def test_an_o_proj_share_waits_for_every_head_its_columns_come_from(kind, rows, heads, kv_heads, d, hidden, kept,
                                                                    split, monkeypatch):
    """Shares wider and narrower than a head slot, under the interpreter: each count gathers every (row, head)
    output its columns need. A count that came short would be raised (the interpreter finds it at the wait),
    not spun on."""
    monkeypatch.setattr(phased_attention, "INTERPRETER_CONFIGS", [config(4, 1, BLOCK_M=16, BLOCK_NO=32, BLOCK_KO=64,
                                                                         BLOCK_MP=16, BLOCK_KP=32, BLOCK_H=16)])
    args, ref = _run(kind, rows, heads, kv_heads, d, hidden, kept, split, torch.float32)
    assert_close(phased(*args).cpu(), reference(*ref), torch.float32)
    assert not workspace.counters(DEVICE, 1).any()


def test_a_free_slot_is_never_read_whatever_its_weights_and_query_hold():
    args, ref = _run("partial", 2, 6, 2, 32, 40, 3, 2, torch.float32)
    q, w = args[0], args[8]
    q[:, 3:] = float("nan")
    w[:, 3 * 32:] = float("nan")  # the column-major copy: free columns' weights
    assert_close(phased(*args).cpu(), reference(*ref), torch.float32)


def test_bad_inputs_are_named():
    (q, pages, tables, kv_map, lengths, starts, w_o, residual, cols, count), scale = layer(
        2, 4, 2, 32, 40, 3, torch.float32)

    def call(**changed):
        args = dict(q=q, pages=pages, block_tables=tables, head_to_kv=kv_map, lengths=lengths, starts=starts,
                    scale=scale, split=2, w_o=w_o, cols=cols, count=count, residual=residual)
        args.update(changed)
        phased(**args)

    with pytest.raises(ValueError, match=r"q must have 1 to 16 rows \(a decode step's\), got 17"):
        call(q=torch.randn(17, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="q must be 3-D"):
        call(q=q[0])
    with pytest.raises(ValueError, match=r"pages must be \[2, pages, page size, 32\]"):
        call(pages=pages[..., :16])
    with pytest.raises(ValueError, match=r"block_tables must be \[2, kv heads, pages\]"):
        call(block_tables=tables[:1])
    with pytest.raises(ValueError, match=r"head_to_kv must be \[heads\]"):
        call(head_to_kv=kv_map[:, :3])
    with pytest.raises(ValueError, match=r"lengths must be \[2\]"):
        call(lengths=lengths[:1])
    with pytest.raises(ValueError, match="starts must have dtype in"):
        call(starts=starts.long())
    with pytest.raises(ValueError, match="split must be a positive int"):
        call(split=0)
    with pytest.raises(ValueError, match=r"w_o must be \[hidden, 128\]"):
        call(w_o=w_o[:, :127])
    with pytest.raises(ValueError, match="cols must list 128 columns"):
        call(cols=cols[:100])
    with pytest.raises(ValueError, match="count must hold one int32"):
        call(count=torch.tensor([1, 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"residual must be \[2, 40\]"):
        call(residual=residual[:, :39])
    with pytest.raises(ValueError, match="dense_weight must be w_o's matrix"):
        call(dense_weight=w_o[:, :127])
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor of shape"):
        call(out=torch.empty(2, 41, device=DEVICE))


def compile_script(launch: str) -> str:
    """A script for :func:`_phases.compiled_variants`: the phased attention at LLaVA-1.5-7B shapes for sm_90, batch 1
    and 16, a layer kept whole and a partial one, each launched by ``launch`` (code over the names the loop binds:
    h, q, pages, tables, kv_map, lengths, split, w, cols, count, dense, dense_weight, and the module's ops)."""
    return f"""
import json, torch
from bench import static
from adallava_kernels.ops.phased_attention import attention_block_phased, paged_attention_o_proj_phased
from adallava_kernels.ops.paged_attention import paged_decode_splits
heads, d, hidden, dt, page, width = 32, 128, 4096, torch.bfloat16, 16, 64
w_o, w_columns = torch.empty(hidden, hidden, dtype=dt), torch.empty(hidden, hidden, dtype=dt).t()
w_qkv, cols = torch.empty(3 * hidden, hidden, dtype=dt), torch.arange(hidden, dtype=torch.int32)
pages = torch.empty(2, 16 * heads * width, page, d, dtype=dt)
with static.capturing() as variants:
    for batch in (1, 16):
        for dense in (True, False):
            variants.site.update(name=f"b{{batch}} {{dense}}", extra={{}})
            q, h = torch.empty(batch, heads, d, dtype=dt), torch.empty(batch, hidden, dtype=dt)
            tables = torch.zeros(batch, heads, width, dtype=torch.int32)
            kv_map = torch.arange(heads, dtype=torch.int32).repeat(batch, 1)
            lengths = torch.full((batch,), 700, dtype=torch.int32)
            split = paged_decode_splits(batch, heads, width * page, torch.device("cpu"))
            count = torch.tensor([hidden if dense else hidden // 2], dtype=torch.int32)
            w, dense_weight = (w_o, None) if dense else (w_columns, w_o)
            {launch}
print(json.dumps([{{"site": v.site, "grid": v.grid, "sass": dict(v.sass), "buffers": v.buffers, "atomics": v.atomics,
                   "occupancy": v.occupancy, "shared": v.shared, "failures": static.failures(v)}} for v in variants]))
"""


COMPILE = compile_script("paged_attention_o_proj_phased(q, pages, tables, kv_map, lengths, lengths * 0, d ** -0.5, "
                         "split, w, cols, count, h, dense, dense_weight)")


def test_it_compiles_for_hopper_as_the_two_launches_do():
    """At LLaVA-1.5-7B shapes, batch 1 and 16, a layer kept whole and a partial one, for sm_90 without a GPU:
    16-byte asynchronous K/V and weight loads, K/V 3 buffers deep, two programs an SM, and the phases'
    synchronisation (:func:`_phases.assert_phases_synchronise`; the attention's combine reads its splits'
    partials strong too, past L1)."""
    variants = compiled_variants(COMPILE)
    assert len(variants) == 4
    for v in variants:
        assert_phases_synchronise(v)
        # K/V as deep as in the attention launched alone (its loop's own stages), the weight as o_proj's.
        assert min(v["buffers"][tile] for tile in ("k", "v")) >= 3 and v["buffers"]["b"] >= 2, v["buffers"]
        assert v["occupancy"] >= 2 and v["failures"] == [], v
    # 32 heads x 8 splits at batch 1 (16 rows x 32 heads, one split at 16), then 4096 outputs in tiles of 64,
    # three splits.
    assert [v["grid"][0] for v in variants] == [32 * 8 + 64 * 3] * 2 + [16 * 32 + 64 * 3] * 2
