"""The decode MLP in one launch of two phases (ops.phased_mlp) against the two launches it replaces and a float64
reference; its counters; its bad inputs; its sm_90 code (compiled without a GPU)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton

from adallava_kernels.ops import gathered_linear, phased_mlp, workspace
from adallava_kernels.ops.layout import prepare_column_gather
from adallava_kernels.ops.rms_norm import rms_norm_reference
from adallava_kernels.ops.triton_utils import config, wait_at_least
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE
from _phases import assert_phases_synchronise, compiled_variants

ROOT = Path(__file__).resolve().parents[1]
swiglu_mlp_phased = phased_mlp.swiglu_mlp_phased
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def layer(rows: int, hidden: int, inter: int, dtype: torch.dtype, kept: int | None, capacity: int):
    """A decode MLP's inputs: ``kept`` listed neurons (None: a dense layer, every neuron in order; 0 with a
    dense layer: skipped), the list padded with -1 to ``capacity``, a random per-row mask over it."""
    h = (torch.randn(rows, hidden) * 2).to(dtype)
    w_gate, w_up = ((torch.randn(inter, hidden) * hidden**-0.5).to(dtype) for _ in range(2))
    w_down = (torch.randn(hidden, inter) * inter**-0.5).to(dtype)
    norm = (1 + 0.3 * torch.randn(hidden)).to(dtype)
    if kept is None:
        listed = torch.arange(inter, dtype=torch.int32)
    else:
        listed = torch.randperm(inter)[:kept].sort().values.to(torch.int32)
    neurons = torch.cat([listed, torch.full((capacity - listed.numel(),), -1, dtype=torch.int32)])
    mask = (torch.rand(rows, capacity) > 0.3).to(dtype)
    tensors = [t.to(DEVICE) for t in (h, w_gate, w_up, w_down, norm, neurons, mask)]
    return tensors, listed.numel()


def two_launches(h, w_gate, w_up, w, neurons, norm, count, mask, dense, dense_weight):
    act = gathered_linear.swiglu_gathered(h, w_gate, w_up, neurons, norm_weight=norm, eps=EPS)
    return gathered_linear.col_gathered_linear(act, w, neurons, count=count, x_mask=mask, residual=h, dense=dense,
                                               dense_weight=dense_weight)


def reference(h, w_gate, w_up, w_down, norm, neurons, mask, counted):
    listed = neurons[:counted].long()
    x = rms_norm_reference(h.double(), norm.double(), EPS)
    act = F.silu(x @ w_gate.double()[listed].T) * (x @ w_up.double()[listed].T) * mask[:, :counted].double()
    return h.double() + act @ w_down.double()[:, listed].T


# kind: "partial" (a column-major w_down, its row-major matrix as dense_weight), "dense" (row-major, DENSE).
CASES = [
    ("partial", 1, 72, 200, 70, 230),    # a third of the neurons, free slots after them
    ("partial", 5, 72, 200, 200, 200),   # the union keeps every neuron: the row-major matrix is read
    ("partial", 16, 40, 130, 1, 130),     # one neuron
    ("partial", 3, 40, 130, 0, 130),      # no neuron: h itself
    ("dense", 2, 72, 130, None, 130),     # a layer kept whole
    ("dense", 7, 40, 130, 0, 130),        # a layer every row skips
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, rows, hidden, inter, kept, capacity", CASES)
def test_one_launch_gives_the_two_launches_result(kind, rows, hidden, inter, kept, capacity, dtype):
    """Bit for bit under the interpreter (the same tiles and splits), the float64 reference within tolerance,
    every output written, the counters back to 0."""
    (h, w_gate, w_up, w_down, norm, neurons, mask), counted = layer(rows, hidden, inter, dtype, kept, capacity)
    if kind == "dense" and kept == 0:
        neurons.fill_(-1)  # a skipped layer's union lists nothing
    count = torch.tensor([counted], dtype=torch.int32, device=DEVICE)
    dense = kind == "dense"
    w, dense_weight = (w_down, None) if dense else (prepare_column_gather(w_down), w_down)
    out = poisoned(rows, hidden, dtype=dtype, device=DEVICE)
    for _ in range(2):  # the second launch starts from the counters the first put back
        got = swiglu_mlp_phased(h, w_gate, w_up, neurons, norm, EPS, w, count, mask, dense, dense_weight, out=out)
        assert got is out and not out.isnan().any()
        assert not workspace.counters(h.device, 1).any()
    expected = two_launches(h, w_gate, w_up, w, neurons, norm, count, mask, dense, dense_weight)
    if DEVICE.type == "cpu":
        assert torch.equal(out, expected)
    assert_close(out, reference(h, w_gate, w_up, w_down, norm, neurons, mask, counted))


@pytest.mark.parametrize("kind, rows, hidden, inter, kept, capacity", [CASES[0], CASES[1], CASES[4]])
def test_a_down_split_waits_for_every_gate_up_tile_of_its_share(kind, rows, hidden, inter, kept, capacity,
                                                                 monkeypatch):
    """The GPU config's shape of phases under the interpreter: a split's share is 4 gate|up tiles wide per
    BLOCK_KB (128 / 32 on the GPU, 64 / 16 here), so each count gathers several tiles. A count that came short
    would be raised (the interpreter finds it at the wait), not spun on."""
    monkeypatch.setattr(phased_mlp, "INTERPRETER_CONFIGS", [config(4, 1, BLOCK_M=16, BLOCK_NA=16, BLOCK_KA=32,
                                                                   BLOCK_NB=32, BLOCK_KB=64)])
    (h, w_gate, w_up, w_down, norm, neurons, mask), counted = layer(rows, hidden, inter, torch.float32, kept,
                                                                    capacity)
    count = torch.tensor([counted], dtype=torch.int32, device=DEVICE)
    dense = kind == "dense"
    w, dense_weight = (w_down, None) if dense else (prepare_column_gather(w_down), w_down)
    got = swiglu_mlp_phased(h, w_gate, w_up, neurons, norm, EPS, w, count, mask, dense, dense_weight)
    assert_close(got, reference(h, w_gate, w_up, w_down, norm, neurons, mask, counted))
    assert not workspace.counters(h.device, 1).any()


@triton.jit
def _waiting(counter_ptr, error_ptr, target):
    wait_at_least(counter_ptr, target, error_ptr, False)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's path of the wait")
def test_under_the_interpreter_a_wait_for_an_unfinished_count_is_counted_not_spun():
    counter, errors = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _waiting[(2,)](counter, errors, 3)
    assert errors.item() == 0
    _waiting[(2,)](counter, errors, 4)
    assert errors.item() == 2 and counter.item() == 3


def test_a_free_slot_is_never_read_whatever_its_mask_and_weights_hold():
    (h, w_gate, w_up, w_down, norm, neurons, mask), counted = layer(4, 40, 130, torch.float32, 50, 80)
    w = prepare_column_gather(w_down)
    count = torch.tensor([counted], dtype=torch.int32, device=DEVICE)
    mask[:, counted:] = float("nan")
    got = swiglu_mlp_phased(h, w_gate, w_up, neurons, norm, EPS, w, count, mask)
    assert_close(got, reference(h, w_gate, w_up, w_down, norm, neurons, mask, counted))


def test_bad_inputs_are_named():
    (h, w_gate, w_up, w_down, norm, neurons, mask), counted = layer(2, 40, 130, torch.float32, 50, 80)
    count = torch.tensor([counted], dtype=torch.int32)
    w = prepare_column_gather(w_down)

    def call(**changed):
        args = dict(h=h, w_gate=w_gate, w_up=w_up, rows=neurons, norm_weight=norm, eps=EPS, w_down=w, count=count,
                    x_mask=mask)
        args.update(changed)
        phased_mlp.swiglu_mlp_phased(**args)

    with pytest.raises(ValueError, match=r"h must have 1 to 16 rows \(a decode step's\), got 17"):
        call(h=torch.randn(17, 40), x_mask=torch.ones(17, 80))
    with pytest.raises(ValueError, match="h must be 2-D"):
        call(h=h[None])
    with pytest.raises(ValueError, match=r"w_up must be \[intermediate, 40\]"):
        call(w_up=w_up[:, :39])
    with pytest.raises(ValueError, match=r"w_up must have w_gate's 130 rows"):
        call(w_up=w_up[:129])
    with pytest.raises(ValueError, match=r"w_down must be \[40, 130\]"):
        call(w_down=w_down.T)
    with pytest.raises(ValueError, match="rows must have dtype in"):
        call(rows=neurons.long())
    with pytest.raises(ValueError, match="count must hold one int32"):
        call(count=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x_mask must be \[2, 80\]"):
        call(x_mask=mask[:, :79])
    with pytest.raises(ValueError, match="norm_weight is required"):
        call(norm_weight=None)
    with pytest.raises(ValueError, match=r"norm_weight must be a contiguous torch.float32 tensor of shape \[40\]"):
        call(norm_weight=torch.ones(41))
    with pytest.raises(ValueError, match="dense_weight must be w_down's matrix"):
        call(dense_weight=w_down[:, :129])
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32 tensor of shape"):
        call(out=torch.empty(2, 41))


COMPILE = """
import json, torch
from bench import static
from adallava_kernels.ops.phased_mlp import swiglu_mlp_phased
hidden, inter, dt = 4096, 11008, torch.bfloat16
w_gate_up = torch.empty(2 * inter, hidden, dtype=dt)
w_down, w_columns = torch.empty(hidden, inter, dtype=dt), torch.empty(inter, hidden, dtype=dt).t()
norm = torch.empty(hidden, dtype=dt)
with static.capturing() as variants:
    for batch in (1, 16):
        for dense in (True, False):
            variants.site.update(name=f"b{batch} {dense}", extra={})
            h, mask = torch.empty(batch, hidden, dtype=dt), torch.ones(batch, inter, dtype=dt)
            count = torch.tensor([inter if dense else inter // 2], dtype=torch.int32)
            swiglu_mlp_phased(h, w_gate_up[:inter], w_gate_up[inter:], torch.arange(inter, dtype=torch.int32), norm,
                              1e-5, w_down if dense else w_columns, count, mask, dense, None if dense else w_down)
print(json.dumps([{"site": v.site, "grid": v.grid, "sass": dict(v.sass), "buffers": v.buffers, "atomics": v.atomics,
                   "occupancy": v.occupancy, "failures": static.failures(v)} for v in variants]))
"""


def test_it_compiles_for_hopper_as_the_two_launches_do():
    """At LLaVA-1.5-7B shapes, batch 1 and 16, a layer kept whole and a partial one, every config the table may
    hold, for sm_90 without a GPU: 16-byte asynchronous weight loads 3 buffers deep in both phases (4 at 5
    stages), two programs an SM, and the phases' synchronisation (:func:`_phases.assert_phases_synchronise`),
    its acquire load the only strong one."""
    variants = compiled_variants(COMPILE)
    assert len(variants) == 4 * len(phased_mlp.CONFIGS["decode"])
    depths = [min(v["buffers"][tile] for tile in ("b1", "b2", "b")) for v in variants]
    assert depths == [config.num_stages - 1 for config in phased_mlp.CONFIGS["decode"]] * 4
    for v in variants:
        assert_phases_synchronise(v)
        assert v["sass"].get("LDG.E.STRONG.GPU") == 1, v["sass"]
        assert min(v["buffers"][tile] for tile in ("b1", "b2", "b")) >= 2, v["buffers"]
        assert v["occupancy"] >= 2 and v["failures"] == [], v
        # 11008 neurons in tiles of 32, then 4096 outputs in tiles of 64, three splits.
        assert v["grid"] == [344 + 64 * 3, 1, 1]
