"""A decode layer's whole attention block in one launch of three phases (ops.phased_attention.attention_block_phased):
against the launches it replaces (the paged head projection, then the attention and o_proj), a float64 reference,
its counters, its bad inputs and its sm_90 code (compiled without a GPU)."""

import pytest
import torch

from adallava_kernels.ops import phased_attention, workspace
from adallava_kernels.ops.head_projection import PagedKV, head_projection
from adallava_kernels.ops.layout import prepare_column_gather
from adallava_kernels.ops.rms_norm import rms_norm_reference
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE
from _phases import assert_phases_synchronise, compiled_variants
from test_head_projection import rotate
from test_paged_attention import loop_oracle
from test_phased_attention import compile_script

block = phased_attention.attention_block_phased
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def layer(rows, heads, kv_heads, d, hidden, kept, dtype, page_size=5, width=6, seed=0, shared_rope=False):
    """A decode layer's attention block inputs as the decode step binds them: ``rows`` rows over ``heads`` query
    head slots (the first ``kept`` the union's, the rest free) and ``kv_heads`` KV slots (free where no kept
    head maps to one), each row lacking a random one of the union's heads; a stacked ``w_qkv`` of
    ``heads + 2 kv_heads`` heads; pages of an odd size, each row's new position inside, at the end of or past a
    page boundary, left padding on some rows; ``w_o``, the input norm's weight and rotations."""
    g = torch.Generator().manual_seed(seed)
    num_pages = rows * kv_heads * width + 3
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    w_qkv = (torch.randn((heads + 2 * kv_heads) * d, hidden, generator=g) * hidden ** -0.5).to(dtype)
    pages = torch.randn(2, num_pages, page_size, d, generator=g).to(dtype)
    tables = torch.randperm(num_pages, generator=g)[:rows * kv_heads * width].view(rows, kv_heads, width).int()
    kv_map = (torch.arange(heads) * kv_heads // heads).to(torch.int32).repeat(rows, 1)
    kv_map[:, kept:] = -1
    used = torch.zeros(kv_heads, dtype=torch.bool)
    used[kv_map[0, :kept].long()] = True
    for r in range(rows):
        if kept > 1:
            kv_map[r, int(torch.randint(kept, (1,), generator=g))] = -1
    q_slots = torch.where(torch.arange(heads) < kept, torch.arange(heads), -1)
    kv_slots = torch.where(used, torch.arange(kv_heads), -1)
    slots = torch.cat([q_slots, torch.where(used, kv_slots + heads, -1),
                       torch.where(used, kv_slots + heads + kv_heads, -1)]).to(torch.int32)
    lengths = torch.randint(1, width * page_size + 1, (rows,), generator=g).to(torch.int32)
    lengths[0] = width * page_size
    starts = (torch.rand(rows, generator=g) * (lengths - 1) * 0.5).to(torch.int32)
    angles = torch.rand(1 if shared_rope else rows, 1, d // 2, generator=g) * 6.28
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    norm_weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype)
    w_o = (torch.randn(hidden, heads * d, generator=g) * (heads * d) ** -0.5).to(dtype)
    listed = torch.arange(kept * d, dtype=torch.int32)
    cols = torch.cat([listed, torch.full((heads * d - listed.numel(),), -1, dtype=torch.int32)])
    count = torch.tensor([listed.numel()], dtype=torch.int32)
    named = dict(h=h, w_qkv=w_qkv, heads=slots, cos=cos, sin=sin, norm_weight=norm_weight, pages=pages,
                 block_tables=tables, positions=lengths - 1, head_to_kv=kv_map, lengths=lengths, starts=starts,
                 w_o=w_o, cols=cols, count=count)
    return {k: v.to(DEVICE) for k, v in named.items()}, d ** -0.5


def arguments(inputs, scale, split, dense):
    """The op's arguments: ``w_o`` column-major with its row-major matrix as ``dense_weight`` (a partial layer)
    or row-major and ``dense`` (a layer kept whole or skipped)."""
    args = dict(inputs, eps=EPS, scale=scale, split=split, dense=dense)
    if not dense:
        args.update(w_o=prepare_column_gather(inputs["w_o"]), dense_weight=inputs["w_o"])
    return args


def separate_launches(args):
    """The launches the op replaces: the paged head projection (norm inside), then the attention and o_proj."""
    a = dict(args)
    rows, nq, d = a["h"].shape[0], a["head_to_kv"].shape[1], a["pages"].shape[3]
    q = torch.empty(rows, 1, nq, d, dtype=a["h"].dtype, device=DEVICE)
    head_projection(a["h"][:, None], a["w_qkv"], a["heads"], d, a["cos"], a["sin"], q,
                    rope_slots=nq + a["block_tables"].shape[1],
                    paged=PagedKV(a["pages"][0], a["pages"][1], a["block_tables"], a["positions"]),
                    norm_weight=a["norm_weight"], eps=EPS)
    return phased_attention.paged_attention_o_proj_phased(
        q[:, 0], a["pages"], a["block_tables"], a["head_to_kv"], a["lengths"], a["starts"], a["scale"], a["split"],
        a["w_o"], a["cols"], a["count"], a["h"], a["dense"], a.get("dense_weight"))


def reference(inputs, scale, kept):
    """float64 throughout, except where the op stores in the inputs' dtype: q and the new K and V are rounded
    to it, as the pages and the attention's query hold them. Returns the output and the pages."""
    i = {k: v.cpu() for k, v in inputs.items()}
    dtype, (rows, hidden) = i["h"].dtype, i["h"].shape
    nq, nkv, d = i["head_to_kv"].shape[1], i["block_tables"].shape[1], i["pages"].shape[3]
    x = rms_norm_reference(i["h"].double(), i["norm_weight"].double(), EPS)
    stacked = (x @ i["w_qkv"].double().T).view(rows, -1, d)
    cos, sin = i["cos"].double().expand(rows, 1, d), i["sin"].double().expand(rows, 1, d)
    q = rotate(stacked[:, :nq], cos, sin).to(dtype)
    k = rotate(stacked[:, nq:nq + nkv], cos, sin).to(dtype)
    v = stacked[:, nq + nkv:].to(dtype)
    pages, tables, slots = i["pages"].clone(), i["block_tables"], i["heads"]
    page_size = pages.shape[2]
    for b in range(rows):
        position = int(i["positions"][b])
        for j in range(nkv):
            page, offset = int(tables[b, j, position // page_size]), position % page_size
            if slots[nq + j] >= 0:
                pages[0, page, offset] = k[b, int(slots[nq + j]) - nq]
            if slots[nq + nkv + j] >= 0:
                pages[1, page, offset] = v[b, int(slots[nq + nkv + j]) - nq - nkv]
    q = q[:, [max(int(s), 0) for s in slots[:nq]]]
    attended = loop_oracle(q, pages, tables, i["head_to_kv"], i["lengths"], i["starts"], scale)
    counted = kept * d
    out = i["h"].double() + attended.flatten(1)[:, :counted] @ i["w_o"].double()[:, :counted].T
    return out, pages


# rows, heads, kv_heads, head_dim, hidden, the union's heads, the attention's splits, dense.
CASES = [
    (1, 6, 2, 32, 72, 3, 2, False),     # half the heads, free q and KV slots after them
    (3, 5, 5, 24, 40, 5, 1, False),     # every head (the row-major matrix is read); head_dim below a tile
    (16, 4, 2, 48, 40, 1, 3, False),    # one head, head_dim not a power of 2 (3 pair blocks, one part masked)
    (2, 4, 2, 32, 40, 0, 2, False),     # no head: the residual itself, no page written
    (2, 6, 3, 32, 72, 6, 4, True),      # a layer kept whole
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, heads, kv_heads, d, hidden, kept, split, dense", CASES)
def test_one_launch_gives_the_separate_launches_result(rows, heads, kv_heads, d, hidden, kept, split, dense, dtype):
    """Bit for bit under the interpreter (output and pages), the float64 reference within tolerance, every
    output written, no page but the new positions' touched, the counters back to 0."""
    inputs, scale = layer(rows, heads, kv_heads, d, hidden, kept, dtype)
    args = arguments(inputs, scale, split, dense)
    expected, expected_pages = reference(inputs, scale, kept)
    out = poisoned(rows, hidden, dtype=dtype, device=DEVICE)
    got = block(**args, out=out)
    assert got is out and not out.isnan().any()
    assert not workspace.counters(out.device, 1).any()
    assert_close(out.cpu(), expected, dtype)
    assert_close(args["pages"].cpu(), expected_pages, dtype)
    if DEVICE.type == "cpu":
        separate = dict(args, pages=inputs["pages"].clone())
        separate["pages"].copy_(args["pages"])  # the append is idempotent: the same values again
        assert torch.equal(out, separate_launches(separate))
        assert torch.equal(separate["pages"], args["pages"])


def test_a_batch_shares_one_rotation_row_and_a_second_launch_starts_from_clean_counters():
    inputs, scale = layer(3, 4, 2, 32, 40, 4, torch.float32, shared_rope=True)
    args = arguments(inputs, scale, 2, False)
    expected, _ = reference(inputs, scale, 4)
    for _ in range(2):
        assert_close(block(**args).cpu(), expected, torch.float32)
        assert not workspace.counters(DEVICE, 1).any()


def test_a_free_slot_is_never_read_whatever_its_weights_hold():
    inputs, scale = layer(2, 6, 2, 32, 40, 3, torch.float32)
    expected, expected_pages = reference(inputs, scale, 3)
    args = arguments(inputs, scale, 2, False)
    args["w_qkv"][3 * 32:6 * 32] = float("nan")  # the free q slots' heads
    args["w_o"][:, 3 * 32:] = float("nan")  # the column-major copy: free columns' weights
    assert_close(block(**args).cpu(), expected, torch.float32)
    assert_close(args["pages"].cpu(), expected_pages, torch.float32)


def test_bad_inputs_are_named():
    inputs, scale = layer(2, 4, 2, 32, 40, 3, torch.float32)
    base = arguments(inputs, scale, 2, False)

    def call(**changed):
        block(**dict(base, **changed))

    with pytest.raises(ValueError, match="h must be 2-D"):
        call(h=base["h"][None])
    with pytest.raises(ValueError, match=r"h must have 1 to 16 rows \(a decode step's\), got 17"):
        call(h=torch.randn(17, 40, device=DEVICE))
    with pytest.raises(ValueError, match=r"w_qkv must be \[heads x 32, 40\]"):
        call(w_qkv=base["w_qkv"][:, :39])
    with pytest.raises(ValueError, match=r"heads must list 8 slots \(head_to_kv's 4 q slots"):
        call(heads=base["heads"][:7])
    with pytest.raises(ValueError, match=r"cos must be contiguous \[2 or 1, 1, 32\]"):
        call(cos=base["cos"][..., :16])
    with pytest.raises(ValueError, match="norm_weight must be given"):
        call(norm_weight=None)
    with pytest.raises(ValueError, match="norm_weight must be a contiguous"):
        call(norm_weight=base["norm_weight"][:39])
    with pytest.raises(ValueError, match=r"positions must be \[2\]"):
        call(positions=base["positions"][:1])
    with pytest.raises(ValueError, match=r"pages must be \[2, pages, page size, 32\]"):
        call(pages=base["pages"][:1])
    with pytest.raises(ValueError, match=r"w_o must be \[40, 128\] \(h's features"):
        call(w_o=base["w_o"][:39], dense_weight=None)
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor of shape"):
        call(out=torch.empty(2, 41, device=DEVICE))


COMPILE = compile_script("attention_block_phased(h, w_qkv, torch.arange(3 * heads, dtype=torch.int32), "
                         "torch.empty(batch, 1, d, dtype=dt), torch.empty(batch, 1, d, dtype=dt), "
                         "torch.empty(hidden, dtype=dt), 1e-5, pages, tables, lengths - 1, kv_map, lengths, "
                         "lengths * 0, d ** -0.5, split, w, cols, count, dense, dense_weight)")


def test_it_compiles_for_hopper_as_the_separate_launches_do():
    """At LLaVA-1.5-7B shapes, batch 1 and 16, a layer kept whole and a partial one, every config the table may
    hold, for sm_90 without a GPU: 16-byte asynchronous loads, K/V 3 buffers deep, the projection's weights and
    o_proj's at least 2, two programs an SM, and the phases' synchronisation."""
    variants = compiled_variants(COMPILE)
    assert len(variants) == 4 * len(phased_attention.CONFIGS["decode"])
    for v in variants:
        assert_phases_synchronise(v, waits=4)  # the attention's on its q, K and V slots; o_proj's on its heads
        buffers = v["buffers"]
        assert min(buffers[tile] for tile in ("k", "v")) >= 3 and buffers["b"] >= 2, buffers
        assert min(buffers[tile] for tile in ("w_lo", "w_hi")) >= 2, buffers
        assert v["occupancy"] >= 2 and v["failures"] == [], v
    # 96 slots x 4 pair blocks of 16 (or 2 of 32), then the attention's and o_proj's programs as in the two-phase
    # launch.
    assert [v["grid"][0] for v in variants] == (2 * [384 + 32 * 8 + 64 * 3, 192 + 32 * 8 + 64 * 3]
                                                + 2 * [384 + 16 * 32 + 64 * 3, 192 + 16 * 32 + 64 * 3])
