"""Every autotune config of every kernel computes the right result.

The suite runs with ADALLAVA_AUTOTUNE=0 (conftest.py), so the other tests
compile each kernel with the first config of its list only. Here each config
is forced in turn, with sizes that are not multiples of its tiles, so a
config the autotuner may pick on some GPU is never one no test has run.
"""

import pytest
import torch
import torch.nn.functional as F
import triton

from adallava_kernels.ops import flash_attention, gathered_linear, head_projection, phased_attention, phased_mlp, tuning
from adallava_kernels.testing import assert_close, poisoned

from _device import DEVICE, to_device
import test_attention_block_phased as block_case
import test_phased_mlp as mlp_case


def only(kernels: dict, regime: str, config, **tune) -> object:
    """``kernels[regime]``'s kernel autotuned over ``config`` alone."""
    return triton.autotune(configs=[config], **tune)(kernels[regime].fn)


def config_id(config) -> str:
    blocks = "-".join(f"{k}{v}" for k, v in config.kwargs.items())
    return f"{blocks}-w{config.num_warps}-s{config.num_stages}"


def cases(table: dict, kernel: str | None = None) -> list:
    """Each config of ``table``'s regimes, and the sweep's extra candidates for ``kernel`` (bench.configs.EXTRA:
    the committed table may name them too)."""
    from bench.configs import EXTRA

    extra = EXTRA.get(kernel, {})
    return [pytest.param(regime, c, id=f"{regime}-{config_id(c)}") for regime in table
            for c in list(table[regime]) + extra.get(regime, [])]


# Tokens in each regime, neither a multiple of any tile.
TOKENS = {"prefill": 37, "decode": 3}


GATHERS = {"row": (gathered_linear.ROW_KERNELS, gathered_linear.ROW_CONFIGS, "_row_gather_kernel"),
           "col": (gathered_linear.COL_KERNELS, gathered_linear.COL_CONFIGS, "_col_gather_kernel")}


@pytest.mark.parametrize("which, regime, config", [
    pytest.param(which, *case.values, id=f"{which}-{case.id}") for which, (_, table, kernel) in GATHERS.items()
    for case in cases(table, kernel)])
def test_gathered_linear_config(which, regime, config, monkeypatch):
    kernels = GATHERS[which][0]
    monkeypatch.setitem(kernels, regime, only(kernels, regime, config, key=["M_BUCKET"]))
    tokens, hidden, inter = TOKENS[regime], 200, 300
    x = torch.randn(tokens, hidden).half()
    w_gate, w_up = ((torch.randn(inter, hidden) * hidden**-0.5).half() for _ in range(2))
    w_down = (torch.randn(hidden, inter) * inter**-0.5).half()
    rows = torch.randperm(inter)[:277].sort().values.to(torch.int32)

    act = poisoned(tokens, rows.numel(), dtype=torch.float16, device=DEVICE)
    gathered_linear.swiglu_gathered(*to_device(x, w_gate, w_up, rows), out=act)
    idx = rows.long()
    expected = F.silu(F.linear(x.double(), w_gate.double()[idx])) * F.linear(x.double(), w_up.double()[idx])
    assert_close(act.cpu(), expected)

    out = poisoned(tokens, hidden, dtype=torch.float16, device=DEVICE)
    w_cols = gathered_linear.prepare_column_gather(w_down)
    gathered_linear.col_gathered_linear(act, *to_device(w_cols, rows), out=out)
    assert_close(out.cpu(), F.linear(act.cpu().double(), w_down.double()[:, idx]))


@pytest.mark.parametrize("regime, config", cases(head_projection.CONFIGS, "_head_proj_kernel"))
def test_head_projection_config(regime, config, monkeypatch):
    kernels = head_projection.KERNELS
    monkeypatch.setitem(kernels, regime, only(kernels, regime, config, key=["M_BUCKET"]))
    batch, seq, hidden, head_dim = 1, TOKENS[regime], 200, 24
    x = torch.randn(batch, seq, hidden).half()
    w = (torch.randn(5 * head_dim, hidden) * hidden**-0.5).half()
    heads = torch.tensor([1, 2, 4], dtype=torch.int32)
    out = poisoned(batch, seq, 3, head_dim, dtype=torch.float16, device=DEVICE)
    head_projection.head_projection(*to_device(x, w, heads), head_dim, None, None, out)
    expected = F.linear(x.double(), w.double()).view(batch, seq, 5, head_dim)[:, :, heads.long()]
    assert_close(out.cpu(), expected)


@pytest.mark.parametrize("regime, config", cases(flash_attention.CONFIGS, "_flash_attn_kernel"))
def test_flash_attention_config(regime, config, monkeypatch):
    monkeypatch.setitem(flash_attention.KERNELS, regime, only(flash_attention.KERNELS, regime, config, key=["SQ_BUCKET"]))
    batch, q_len, kv_len, head_dim = 2, TOKENS[regime], 150, 24
    q = torch.randn(batch, q_len, 3, head_dim).half()
    k, v = (torch.randn(batch, 2, kv_len, head_dim).half() for _ in range(2))
    head_to_kv = torch.tensor([0, 1, 1], dtype=torch.int32)
    out = poisoned(batch, q_len, 3, head_dim, dtype=torch.float16, device=DEVICE)
    flash_attention.flash_attention(*to_device(q, k, v, head_to_kv), None, out, head_dim**-0.5)

    kk, vv = (t.double()[:, head_to_kv.long()] for t in (k, v))
    scores = torch.einsum("bqhd,bhkd->bhqk", q.double(), kk) * head_dim**-0.5
    causal = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    assert_close(out.cpu(), torch.einsum("bhqk,bhkd->bqhd", probs, vv))


@pytest.mark.parametrize("regime, config", cases(phased_mlp.CONFIGS, "_phased_mlp_kernel"))
@pytest.mark.parametrize("kind, kept", [("partial", 170), ("dense", None)])
def test_phased_mlp_config(regime, config, kind, kept):
    """A candidate the sweep may put in the table (the phased kernels are never autotuned), forced."""
    (h, w_gate, w_up, w_down, norm, neurons, mask), counted = mlp_case.layer(3, 200, 300, torch.float16, kept, 300)
    count = torch.tensor([counted], dtype=torch.int32, device=DEVICE)
    dense = kind == "dense"
    w, dense_weight = (w_down, None) if dense else (gathered_linear.prepare_column_gather(w_down), w_down)
    out = poisoned(3, 200, dtype=torch.float16, device=DEVICE)
    with tuning.forcing("_phased_mlp_kernel", regime, config):
        phased_mlp.swiglu_mlp_phased(h, w_gate, w_up, neurons, norm, mlp_case.EPS, w, count, mask, dense,
                                     dense_weight, out=out)
    assert_close(out.cpu(), mlp_case.reference(*(t.cpu() for t in (h, w_gate, w_up, w_down, norm, neurons, mask)),
                                               counted))


@pytest.mark.parametrize("regime, config", cases(phased_attention.CONFIGS, "_phased_attention_kernel"))
@pytest.mark.parametrize("dense", [False, True])
def test_phased_attention_block_config(regime, config, dense):
    """A candidate, forced: head_dim 48 (24 rotation pairs: two projection programs a slot at 16 pairs, one
    at 32), the union's heads partial or the layer whole."""
    kept = 6 if dense else 4
    inputs, scale = block_case.layer(3, 6, 3, 48, 72, kept, torch.float16)
    args = block_case.arguments(inputs, scale, 2, dense)
    expected, expected_pages = block_case.reference(inputs, scale, kept)
    out = poisoned(3, 72, dtype=torch.float16, device=DEVICE)
    with tuning.forcing("_phased_attention_kernel", regime, config):
        phased_attention.attention_block_phased(**args, out=out)
    assert_close(out.cpu(), expected)
    assert_close(args["pages"].cpu(), expected_pages)


def test_programmatic_dependent_launch_is_opt_in_and_decode_only(monkeypatch):
    """ADALLAVA_PDL=1 turns it on for decode launches on a GPU of compute capability 9.0 or newer; never on a
    CPU, under the interpreter, for a prefill or without the variable."""
    import torch

    from adallava_kernels.ops import triton_utils

    cpu = torch.device("cpu")
    monkeypatch.delenv(triton_utils.PDL_ENV, raising=False)
    assert triton_utils.pdl_flags(cpu, "decode") == {"PDL": False}
    monkeypatch.setenv(triton_utils.PDL_ENV, "1")
    assert triton_utils.pdl_flags(cpu, "decode") == {"PDL": False}
    monkeypatch.setattr(triton_utils, "supports_pdl", lambda device: True)
    assert triton_utils.pdl_flags(cpu, "decode") == {"PDL": True, "launch_pdl": True}
    assert triton_utils.pdl_flags(cpu, "prefill") == {"PDL": False}
    monkeypatch.setenv(triton_utils.PDL_ENV, "0")
    assert triton_utils.pdl_flags(cpu, "decode") == {"PDL": False}


def test_pdl_reads_a_devices_compute_capability_once(monkeypatch):
    """pdl_flags runs on every decode launch: the capability of each device is looked up once."""
    import torch

    from adallava_kernels.ops import triton_utils

    asked, capabilities = [], {0: (8, 0), 1: (9, 0)}

    def capability(index):
        asked.append(index)
        return capabilities[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(triton_utils, "INTERPRET", False)
    monkeypatch.setattr(triton_utils, "gdc_wait", object())
    monkeypatch.setenv(triton_utils.PDL_ENV, "1")
    triton_utils._capability.cache_clear()
    try:
        flags = [triton_utils.pdl_flags(torch.device("cuda", i % 2), "decode")["PDL"] for i in range(6)]
    finally:
        triton_utils._capability.cache_clear()
    assert flags == [False, True] * 3 and asked == [0, 1]


def test_host_cdiv_and_next_power_of_2_match_tritons():
    """The launchers' host integer helpers (triton's are constexpr functions, microseconds a host call)."""
    import triton

    from adallava_kernels.ops.common import cdiv, next_power_of_2

    for n in range(0, 4100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
