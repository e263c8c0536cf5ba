"""The gathered-linear primitives (Triton; under TRITON_INTERPRET=1 on a CPU) against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from adallava_kernels.ops import gathered_linear
from adallava_kernels.ops.gathered_linear import DECODE_MAX_TOKENS, prepare_column_gather
from adallava_kernels.ops.rms_norm import rms_norm_reference
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, on_device

row_gathered_linear = on_device(gathered_linear.row_gathered_linear)
swiglu_gathered = on_device(gathered_linear.swiglu_gathered)
col_gathered_linear = on_device(gathered_linear.col_gathered_linear)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Token counts on both sides of the decode/prefill switch, none a multiple of a tile.
TOKENS = [1, 7, DECODE_MAX_TOKENS, 45]


def index(n: int, keep: int) -> torch.Tensor:
    return torch.randperm(n)[:keep].sort().values.to(torch.int32)


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
def test_row_gather(tokens, dtype):
    x, w = randn(tokens, 70, dtype=dtype), randn(150, 70, dtype=dtype, scale=70**-0.5)
    rows = index(150, 53)
    out = poisoned(tokens, 53, dtype=dtype)
    row_gathered_linear(x, w, rows, out=out)
    assert_close(out, F.linear(x.double(), w.double()[rows.long()]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
def test_swiglu_gather(tokens, dtype):
    x = randn(tokens, 70, dtype=dtype)
    w_gate, w_up = randn(150, 70, dtype=dtype, scale=70**-0.5), randn(150, 70, dtype=dtype, scale=70**-0.5)
    rows = index(150, 67)
    out = poisoned(tokens, 67, dtype=dtype)
    swiglu_gathered(x, w_gate, w_up, rows, out=out)
    idx = rows.long()
    expected = F.silu(F.linear(x.double(), w_gate.double()[idx])) * F.linear(x.double(), w_up.double()[idx])
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
def test_swiglu_gather_takes_its_input_through_the_norm(tokens, dtype):
    """norm_weight: SwiGLU of transformers' RMSNorm of x (a decode layer's post-attention norm, fused); the
    rows padded with free slots, whose outputs keep their poison."""
    x = randn(tokens, 70, dtype=dtype, scale=3.0)
    norm = (1 + 0.3 * torch.randn(70)).to(dtype)
    w_gate, w_up = randn(150, 70, dtype=dtype, scale=70**-0.5), randn(150, 70, dtype=dtype, scale=70**-0.5)
    real = index(150, 67)
    rows = torch.cat([real, torch.full((40,), -1, dtype=torch.int32)])
    out = poisoned(tokens, 107, dtype=dtype)
    swiglu_gathered(x, w_gate, w_up, rows, out=out, norm_weight=norm, eps=1e-5)
    idx = real.long()
    normed = rms_norm_reference(x.double(), norm.double(), 1e-5)
    expected = F.silu(F.linear(normed, w_gate.double()[idx])) * F.linear(normed, w_up.double()[idx])
    assert_close(out[:, :67], expected)
    assert out[:, 67:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
def test_row_gather_takes_its_input_through_the_norm(tokens, dtype):
    """norm_weight: a projection of transformers' RMSNorm of x (a decode step's final norm inside lm_head, every
    row of the weight); the rows padded with free slots, whose outputs keep their poison."""
    x = randn(tokens, 70, dtype=dtype, scale=3.0)
    norm = (1 + 0.3 * torch.randn(70)).to(dtype)
    w = randn(150, 70, dtype=dtype, scale=70**-0.5)
    for real in (torch.arange(150, dtype=torch.int32), index(150, 67)):
        rows = torch.cat([real, torch.full((9,), -1, dtype=torch.int32)])
        out = poisoned(tokens, rows.numel(), dtype=dtype)
        row_gathered_linear(x, w, rows, out=out, norm_weight=norm, eps=1e-5)
        normed = rms_norm_reference(x.double(), norm.double(), 1e-5)
        assert_close(out[:, :real.numel()], F.linear(normed, w.double()[real.long()]))
        assert out[:, real.numel():].isnan().all()


def test_row_gather_takes_a_norm_or_a_residual_not_both():
    x, w = torch.randn(2, 70), torch.randn(150, 70)
    rows = index(150, 10)
    with pytest.raises(ValueError, match="norm_weight must be a contiguous torch.float32 tensor of shape \\[70\\]"):
        gathered_linear.row_gathered_linear(x, w, rows, norm_weight=torch.ones(71), eps=1e-5)
    with pytest.raises(ValueError, match="takes norm_weight or residual, not both"):
        gathered_linear.row_gathered_linear(x, w, rows, residual=torch.zeros(2, 10), norm_weight=torch.ones(70))


def test_swiglu_gather_refuses_a_bad_norm_weight():
    x, w = torch.randn(2, 70), torch.randn(150, 70)
    rows = index(150, 10)
    for bad in (torch.ones(71), torch.ones(70, dtype=torch.bfloat16), torch.ones(1, 70)):
        with pytest.raises(ValueError, match="norm_weight must be a contiguous torch.float32 tensor of shape \\[70\\]"):
            gathered_linear.swiglu_gathered(x, w, w, rows, norm_weight=bad, eps=1e-5)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
def test_col_gather(tokens, dtype, layout):
    w = randn(90, 230, dtype=dtype, scale=0.1)
    if layout == "column-major":
        w = prepare_column_gather(w)
        assert w.stride() == (1, 90)
    cols = index(230, 141)
    x = randn(tokens, 141, dtype=dtype)
    out = poisoned(tokens, 90, dtype=dtype)
    col_gathered_linear(x, w, cols, out=out)
    assert_close(out, F.linear(x.double(), w.double()[:, cols.long()]))


def test_prepared_layout_is_the_same_matrix():
    w = torch.randn(9, 13)
    prepared = prepare_column_gather(w)
    assert torch.equal(prepared, w) and prepared.shape == w.shape and not prepared.is_contiguous()


@pytest.mark.parametrize("tokens", [1, 33], ids=lambda t: f"T{t}")
def test_single_and_all_indices(tokens):
    x, w = torch.randn(tokens, 40), torch.randn(60, 40)
    for rows in (torch.tensor([59], dtype=torch.int32), torch.arange(60, dtype=torch.int32)):
        assert_close(row_gathered_linear(x, w, rows), F.linear(x.double(), w.double()[rows.long()]))
    h, wd = torch.randn(tokens, 1), torch.randn(40, 60)
    assert_close(col_gathered_linear(h, wd, torch.tensor([0], dtype=torch.int32)), F.linear(h.double(), wd.double()[:, :1]))


def test_empty_index():
    x = torch.randn(3, 40)
    assert row_gathered_linear(x, torch.randn(60, 40), torch.empty(0, dtype=torch.int32)).shape == (3, 0)
    out = poisoned(3, 40, dtype=torch.float32)
    col_gathered_linear(torch.randn(3, 0), torch.randn(40, 60), torch.empty(0, dtype=torch.int32), out=out)
    assert torch.equal(out, torch.zeros(3, 40))


def test_strided_input_and_leading_dims():
    x = torch.randn(40, 5, 2).permute(2, 1, 0)  # [2, 5, 40], not contiguous
    w, rows = torch.randn(60, 40), index(60, 21)
    y = row_gathered_linear(x, w, rows)
    assert y.shape == (2, 5, 21)
    assert_close(y, F.linear(x.double(), w.double()[rows.long()]))


def test_bad_out():
    x, w, rows = torch.randn(3, 40), torch.randn(60, 40), index(60, 10)
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \[3, 10\]"):
        row_gathered_linear(x, w, rows, out=torch.empty(3, 11))
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32"):
        row_gathered_linear(x, w, rows, out=torch.empty(3, 10, dtype=torch.float16))


# -- plans bound as data: index lists padded to their capacity -------------------------------------


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "row"])
@pytest.mark.parametrize("tokens", [1, 5], ids=lambda t: f"T{t}")
def test_row_gathers_skip_free_slots(tokens, swiglu):
    # 37 real neurons, then -1 up to the capacity of 150: whole tiles of free slots, and one shared. A free
    # slot's output is never written: it keeps its poison.
    x = randn(tokens, 70, dtype=torch.float32)
    w_gate, w_up = randn(150, 70, dtype=torch.float32), randn(150, 70, dtype=torch.float32)
    real = index(150, 37)
    rows = torch.cat([real, torch.full((113,), -1, dtype=torch.int32)])
    out = poisoned(tokens, 150, dtype=torch.float32)
    idx = real.long()
    if swiglu:
        swiglu_gathered(x, w_gate, w_up, rows, out=out)
        expected = F.silu(F.linear(x.double(), w_gate.double()[idx])) * F.linear(x.double(), w_up.double()[idx])
    else:
        row_gathered_linear(x, w_gate, rows, out=out)
        expected = F.linear(x.double(), w_gate.double()[idx])
    assert_close(out[:, :37], expected)
    assert out[:, 37:].isnan().all()


@pytest.mark.parametrize("count", [0, 1, 53, 141])
@pytest.mark.parametrize("tokens", [1, 6], ids=lambda t: f"T{t}")
def test_col_gather_reads_the_count_and_the_row_mask(tokens, count):
    """Only the first ``count`` columns (a device scalar) and the elements ``x_mask`` keeps count: the rest
    of ``x`` holds NaN and ``cols`` holds -1 past the count, so reading either would show."""
    w = prepare_column_gather(randn(90, 230, dtype=torch.float32, scale=0.1))
    cols = torch.full((141,), -1, dtype=torch.int32)
    cols[:count] = index(230, count)
    x = randn(tokens, 141, dtype=torch.float32)
    keep = torch.rand(tokens, 141) < 0.7
    x[~keep] = float("nan")
    x[:, count:] = float("nan")
    out = poisoned(tokens, 90, dtype=torch.float32)
    col_gathered_linear(x, w, cols, out=out, count=torch.tensor([count], dtype=torch.int32),
                        x_mask=keep.to(torch.bfloat16))
    kept = torch.where(keep, x, 0.0)[:, :count].double()
    assert_close(out, F.linear(kept, w.double()[:, cols[:count].long()]))


@pytest.mark.parametrize("count", [0, 97, 230])
@pytest.mark.parametrize("tokens", [1, 6], ids=lambda t: f"T{t}")
def test_col_gather_reads_the_row_major_weight_when_the_count_is_every_column(tokens, count):
    """``dense_weight``: a count of every column reads the row-major weight as a dense projection (the
    column-major copy is NaN then, so reading it would show); any other count gathers the copy (the
    row-major weight is NaN then). The row mask and the residual apply either way."""
    weight = randn(90, 230, dtype=torch.float32, scale=0.1)
    cols = torch.full((230,), -1, dtype=torch.int32)
    cols[:count] = torch.arange(230, dtype=torch.int32)[:count] if count == 230 else index(230, count)
    nan = torch.full_like(weight, float("nan"))
    if count == 230:
        w, dense = prepare_column_gather(nan), weight
    else:
        w, dense = prepare_column_gather(weight), nan
    x, residual = randn(tokens, 230, dtype=torch.float32), randn(tokens, 90, dtype=torch.float32)
    keep = torch.rand(tokens, 230) < 0.7
    out = poisoned(tokens, 90, dtype=torch.float32)
    col_gathered_linear(x, w, cols, out=out, count=torch.tensor([count], dtype=torch.int32),
                        x_mask=keep.to(torch.float32), residual=residual, dense_weight=dense)
    kept = torch.where(keep, x, 0.0)[:, :count].double()
    assert_close(out, residual.double() + F.linear(kept, weight.double()[:, cols[:count].long()]))


def test_col_gather_refuses_a_dense_weight_of_another_matrix():
    w = prepare_column_gather(randn(90, 230, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"dense_weight must be w's matrix \(torch.float32 \[90, 230\]"):
        col_gathered_linear(randn(1, 230, dtype=torch.float32), w, torch.arange(230, dtype=torch.int32),
                            count=torch.tensor([230], dtype=torch.int32), dense_weight=randn(90, 231, dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 45], ids=lambda t: f"T{t}")
def test_col_gather_adds_the_residual(tokens, dtype):
    # Decode (split reductions, the sums started at the residual) and prefill (added in the epilogue).
    w = prepare_column_gather(randn(90, 230, dtype=dtype, scale=0.1))
    cols = index(230, 141)
    x, residual = randn(tokens, 141, dtype=dtype), randn(tokens, 90, dtype=dtype)
    out = poisoned(tokens, 90, dtype=dtype)
    col_gathered_linear(x, w, cols, out=out, residual=residual)
    assert_close(out, residual.double() + F.linear(x.double(), w.double()[:, cols.long()]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 45], ids=lambda t: f"T{t}")
def test_row_gather_adds_the_residual(tokens, dtype):
    # Every row of w, as a decode step's dense o_proj and down run it: split over K in decode (the splits
    # meet in the launch), whole in prefill; the residual added in the epilogue either way.
    w = randn(70, 300, dtype=dtype, scale=0.05)
    rows = torch.arange(70, dtype=torch.int32)
    x, residual = randn(tokens, 300, dtype=dtype), randn(tokens, 70, dtype=dtype)
    if tokens <= DECODE_MAX_TOKENS:
        assert gathered_linear._split_k(tokens, 70, 300, DEVICE) > 1  # the split path is the one tested
    out = poisoned(tokens, 70, dtype=dtype)
    row_gathered_linear(x, w, rows, out=out, residual=residual)
    assert_close(out, residual.double() + F.linear(x.double(), w.double()))


@pytest.mark.parametrize("which", ["row", "col"])
def test_split_reductions_are_bitwise_repeatable_and_leave_their_tickets_at_zero(which):
    """The splits of a decode launch meet in a fixed order, so two launches agree bit for bit; every ticket
    counter is back at 0 after each (the next launch, or a replayed graph, starts from there)."""
    from adallava_kernels.ops import workspace

    x = randn(3, 300, dtype=torch.float32)
    if which == "row":
        w, index_ = randn(70, 300, dtype=torch.float32), torch.arange(70, dtype=torch.int32)
        launch = lambda: row_gathered_linear(x, w, index_)  # noqa: E731
    else:
        w, index_ = prepare_column_gather(randn(70, 400, dtype=torch.float32)), index(400, 300)
        launch = lambda: col_gathered_linear(x, w, index_)  # noqa: E731
    assert gathered_linear._split_k(3, 70, 300, DEVICE) > 1
    first, second = launch(), launch()
    assert torch.equal(first, second)
    tickets = workspace.counters(DEVICE, 1)
    assert torch.count_nonzero(tickets) == 0
