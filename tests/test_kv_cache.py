"""The layer-skip KV cache: extension ops, the paged pool against a plain Python model, failures, transformers.

Runs on DEVICE: the CUDA extension where there is a GPU, the C++ CPU one otherwise. The raw ops' bad-input
cases run in a child process (``_op_checks.py``), so a native crash fails a test instead of killing pytest.
"""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import adallava_kernels._C  # noqa: F401  (built by the install: its absence fails, it is not skipped)
from adallava_kernels import ExecutionPlan, ModelShape, cost, masked_attention
from adallava_kernels.kv_cache import LayerSkipKVCache, cache_ops, transformers_cache
from adallava_kernels.kv_cache import ops as kv_ops
from adallava_kernels.kv_cache.ops import CacheOpInputError
from adallava_kernels.testing import assert_close

from _device import DEVICE
from _dispatch import RecordOps
from _transformers import CACHE_KEYWORD
from _op_checks import CASES as RAW_CASES

ops = torch.ops.adallava

# 3 layers, 4 query heads over 2 KV heads of dim 8.
SHAPE = ModelShape(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=40, vocab_size=50)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(DEVICE, dtype)


# --- the extension ops --------------------------------------------------------


def reference_append(k_pages, v_pages, key, value, tables, starts):
    page_size = k_pages.shape[1]
    for r in range(key.shape[0]):
        for t in range(key.shape[1]):
            position = int(starts[r]) + t
            page = int(tables[r, position // page_size])
            k_pages[page, position % page_size] = key[r, t]
            v_pages[page, position % page_size] = value[r, t]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_and_gather_ops(dtype):
    k_pages, v_pages = randn(9, 4, 8, dtype=dtype), randn(9, 4, 8, dtype=dtype)
    expected_k, expected_v = k_pages.clone(), v_pages.clone()
    # Strided key/value, as a [batch, heads, seq, d] view of a projection output.
    key = randn(5, 3, 8, dtype=dtype).transpose(0, 1)
    value = randn(3, 5, 8, dtype=dtype)
    tables = torch.tensor([[7, 2], [0, 8], [4, 1]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEVICE)
    ops.kv_append(k_pages, v_pages, key, value, tables, starts)
    reference_append(expected_k, expected_v, key, value, tables, starts)
    assert torch.equal(k_pages, expected_k) and torch.equal(v_pages, expected_v)

    k, v = ops.kv_gather(k_pages, v_pages, tables, 7)
    pages = tables.long()
    assert torch.equal(k, k_pages[pages].reshape(3, 8, 8)[:, :7])
    assert torch.equal(v, v_pages[pages].reshape(3, 8, 8)[:, :7])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_append_writes_every_head_of_a_row_from_its_start(dtype):
    """The runtime's form: key [batch, heads, tokens, d], tables [batch, heads, W], one start per batch row."""
    k_pages, v_pages = randn(20, 4, 8, dtype=dtype), randn(20, 4, 8, dtype=dtype)
    expected_k, expected_v = k_pages.clone(), v_pages.clone()
    # A [batch, tokens, heads, d] projection output viewed as [batch, heads, tokens, d]: strided.
    key = randn(2, 3, 3, 8, dtype=dtype).transpose(1, 2)
    value = randn(2, 3, 3, 8, dtype=dtype).transpose(1, 2)
    tables = torch.randperm(20)[:18].view(2, 3, 3).to(DEVICE, torch.int32)
    starts = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    ops.kv_append(k_pages, v_pages, key, value, tables, starts)
    rows = lambda t: t.reshape(6, *t.shape[2:])  # noqa: E731  (row b * heads + h)
    reference_append(expected_k, expected_v, rows(key), rows(value), rows(tables), starts.repeat_interleave(3))
    assert torch.equal(k_pages, expected_k) and torch.equal(v_pages, expected_v)


def test_ops_pass_opcheck():
    """Schema, fake (meta) implementations for torch.compile, and registration are consistent."""
    cache_ops()
    k_pages, v_pages = randn(6, 4, 8), randn(6, 4, 8)
    tables = torch.tensor([[3, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.kv_append.default, (k_pages, v_pages, randn(2, 5, 8), randn(2, 5, 8), tables, starts))
    batched = (k_pages, v_pages, randn(2, 1, 5, 8), randn(2, 1, 5, 8), tables[:, None], starts)
    torch.library.opcheck(ops.kv_append.default, batched)
    torch.library.opcheck(ops.kv_gather.default, (k_pages, v_pages, tables, 6))


# --- bad input: an error, never a crash -------------------------------------------


@pytest.fixture(scope="module")
def raw_op_results():
    """What the raw ops raised for every case of ``_op_checks``, all run in one child process on DEVICE."""
    return run_child([sys.executable, str(Path(__file__).with_name("_op_checks.py")), str(DEVICE)])


def run_child(command: list[str]) -> dict:
    """The JSON ``command`` prints. A native crash there fails the calling test, naming the signal and the
    last case the child announced on stderr, instead of killing the test process (or a pytest-xdist worker)."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        started = [line for line in proc.stderr.splitlines() if line.startswith("case ")]
        during = started[-1] if started else "start-up"
        pytest.fail(f"the child running the raw ops' bad-input cases {exit_reason(proc.returncode)} during "
                    f"{during}:\n{proc.stderr[-4000:]}", pytrace=False)
    return json.loads(proc.stdout)


def exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def test_a_crash_in_the_child_fails_naming_the_signal_and_the_case():
    crash = ("import os, signal, sys; print('case boom', file=sys.stderr, flush=True); "
             "os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(pytest.fail.Exception, match="was killed by SIGSEGV during case boom"):
        run_child([sys.executable, "-c", crash])


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_op_raises_its_check_and_writes_nothing(raw_op_results, name):
    result = raw_op_results[name]
    assert result["error"] == "RuntimeError", result
    assert re.search(RAW_CASES[name].match, result["message"]), result["message"]
    assert result["untouched"]  # a rejected call wrote nothing


# Checked in Python by kv_cache.ops; the page indices and positions are left to the CPU op.
CHECKED_CASES = [name for name, case in RAW_CASES.items() if not case.reads_tables]


@pytest.mark.parametrize("name", CHECKED_CASES)
def test_checked_op_raises_the_extensions_message_before_dispatch(raw_op_results, name, monkeypatch):
    case = RAW_CASES[name]
    dispatched = []
    monkeypatch.setattr(kv_ops, "_extension", lambda: dispatched.append(case.op))
    with pytest.raises(CacheOpInputError) as raised:
        getattr(kv_ops, case.op)(*case.args(DEVICE))
    assert str(raised.value) == raw_op_results[name]["message"]
    assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, ValueError)
    assert dispatched == []


def test_checked_op_names_a_tensor_on_another_device():
    other = "meta" if DEVICE.type == "cpu" else "cpu"
    pools = torch.zeros(6, 4, 8, device=DEVICE)
    key = randn(2, 5, 8)
    tables = torch.tensor([[3, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    here = pools.device  # with its index on CUDA: cuda:0
    calls = [
        ((pools, pools.to(other), key, key, tables, starts), rf"v_pages must be on the device of k_pages \({here}"),
        ((pools, pools, key.to(other), key.to(other), tables, starts),
         rf"key must be on the device of the pools \({here}\), got {other}"),
        ((pools, pools, key, key, tables, starts.to(other)),
         rf"starts must be on the device of the pools \({here}\), got {other}"),
    ]
    for args, match in calls:
        with pytest.raises(CacheOpInputError, match=match):
            kv_ops.kv_append(*args)
    with pytest.raises(CacheOpInputError, match=r"block_tables must be contiguous"):
        kv_ops.kv_gather(pools, pools, tables.t(), 1)
    with pytest.raises(CacheOpInputError, match="length must be an int, got float"):
        kv_ops.kv_gather(pools, pools, tables, 1.0)


def test_checked_ops_read_nothing_from_the_device_and_the_pool_calls_them():
    """The checks read metadata only: the op is all that is dispatched (no .item(), no copy to the host)."""
    k_pages, v_pages = randn(6, 4, 8), randn(6, 4, 8)
    tables = torch.tensor([[3, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    key, batched_tables = randn(2, 1, 5, 8), tables[:, None]
    with RecordOps() as recorded:
        kv_ops.kv_append(k_pages, v_pages, key, key, batched_tables, starts)
        kv_ops.kv_gather(k_pages, v_pages, tables, 6)
    assert recorded.ops == ["adallava.kv_append.default", "adallava.kv_gather.default"]

    pool = LayerSkipKVCache(SHAPE, num_pages=4, page_size=4, dtype=torch.float32, device=DEVICE)
    assert pool.ops is cache_ops() and pool.ops.kv_append is kv_ops.kv_append
    assert pool.ops.kv_gather is kv_ops.kv_gather


# --- the pool against a plain Python model ------------------------------------


class ModelCache:
    """What the cache must hold: per sequence and layer, the appended K/V of each kept KV head."""

    def __init__(self):
        self.data = {}

    def add(self, seq_id, plan):
        self.data[seq_id] = [[[], []] for _ in range(plan.shape.num_layers)]

    def append(self, seq_id, layer, key, value):
        self.data[seq_id][layer][0].append(key)
        self.data[seq_id][layer][1].append(value)

    def expected(self, seq_id, layer, heads):
        keys, values = self.data[seq_id][layer]
        if not keys:
            return torch.empty(heads, 0, SHAPE.head_dim), torch.empty(heads, 0, SHAPE.head_dim)
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def random_plan(draw_or_rng) -> ExecutionPlan:
    rng = draw_or_rng
    heads = [sorted(rng.sample(range(SHAPE.num_heads), rng.randint(0, SHAPE.num_heads))) for _ in range(SHAPE.num_layers)]
    neurons = [range(SHAPE.intermediate_size) if h else () for h in heads]
    return ExecutionPlan(SHAPE, heads, neurons)


def check_matches(cache: LayerSkipKVCache, model: ModelCache, dtype):
    """Every sequence's contents equal the model's, and the bytes equal the cost model's."""
    for seq_id in cache.sequences:
        seq_plan = cache.plan(seq_id)
        length = cache.length(seq_id)
        for layer in range(SHAPE.num_layers):
            heads = len(seq_plan.kv_heads(layer))
            k, v = cache.gather(seq_id, layer)
            ek, ev = model.expected(seq_id, layer, heads)
            assert torch.equal(k.cpu(), ek.to(dtype)) and torch.equal(v.cpu(), ev.to(dtype))
            assert cache.length(seq_id, layer) == length
        assert cache.sequence_bytes(seq_id) == cost.kv_cache_bytes(
            SHAPE, length, seq_plan, kv_bytes=torch.finfo(dtype).bits // 8, page_size=cache.page_size
        )
    assert cache.bytes_in_use == sum(cache.sequence_bytes(s) for s in cache.sequences)
    assert cache.pages_in_use + cache.pages_free == cache.num_pages


def forward_append(cache, model, seq_ids, tokens, dtype, rng_seed):
    """What one forward does: every layer appends ``tokens`` positions of each sequence, batched."""
    generator = torch.Generator().manual_seed(rng_seed)
    for layer in range(SHAPE.num_layers):
        keys, values = [], []
        for s in seq_ids:
            heads = len(cache.kv_heads(s, layer))
            k = torch.randn(heads, tokens, SHAPE.head_dim, generator=generator)
            v = torch.randn(heads, tokens, SHAPE.head_dim, generator=generator)
            keys.append(k.to(DEVICE, dtype))
            values.append(v.to(DEVICE, dtype))
        cache.append_batch(seq_ids, layer, keys, values)
        for s, k, v in zip(seq_ids, keys, values):
            model.append(s, layer, k.cpu().to(dtype), v.cpu().to(dtype))


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["add", "append", "batch", "free"]), st.integers(0, 7), st.integers(1, 6)),
    min_size=1, max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_random_interleavings_match_the_model(operations, seed, dtype):
    import random

    rng = random.Random(seed)
    cache = LayerSkipKVCache(SHAPE, num_pages=48, page_size=3, dtype=dtype, device=DEVICE)
    model = ModelCache()
    for step, (op, seq_id, tokens) in enumerate(operations):
        live = list(cache.sequences)
        if op == "add" and seq_id not in live:
            plan = random_plan(rng)
            cache.add_sequence(seq_id, plan, max_tokens=12)
            model.add(seq_id, plan)
        elif op == "append" and seq_id in live:
            tokens = min(tokens, 12 - cache.length(seq_id))
            if tokens and fits(cache, [seq_id], tokens):
                forward_append(cache, model, [seq_id], tokens, dtype, seed + step)
        elif op == "batch" and len(live) > 1:
            chosen = rng.sample(live, rng.randint(2, len(live)))
            tokens = min([tokens] + [12 - cache.length(s) for s in chosen])
            if tokens and fits(cache, chosen, tokens):
                forward_append(cache, model, chosen, tokens, dtype, seed + step)
        elif op == "free" and seq_id in live:
            cache.free(seq_id)
            del model.data[seq_id]
        check_matches(cache, model, dtype)


def fits(cache, seq_ids, tokens) -> bool:
    return sum(cache.pages_needed(s, tokens) for s in seq_ids) <= cache.pages_free


# --- failures leave every other sequence as it was -----------------------------


def snapshot(cache):
    return (
        {s: [tuple(t.clone() for t in cache.gather(s, layer)) for layer in range(SHAPE.num_layers)] for s in cache.sequences},
        {s: [cache.length(s, layer) for layer in range(SHAPE.num_layers)] for s in cache.sequences},
        cache.pages_free, cache.bytes_in_use,
    )


def assert_unchanged(cache, before):
    after = snapshot(cache)
    assert after[1:] == before[1:]
    assert before[0].keys() == after[0].keys()
    for s in before[0]:
        for (k0, v0), (k1, v1) in zip(before[0][s], after[0][s]):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.fixture
def busy_cache():
    """Two sequences with different plans, 5 positions each, in a pool with few pages left."""
    cache = LayerSkipKVCache(SHAPE, num_pages=20, page_size=4, dtype=torch.float32, device=DEVICE)
    model = ModelCache()
    plans = {
        "a": ExecutionPlan(SHAPE, [[0, 1, 2, 3], [2], []], [range(40), range(40), []]),
        "b": ExecutionPlan(SHAPE, [[1], [0, 3], [3]], [range(40)] * 3),
    }
    for s, plan in plans.items():
        cache.add_sequence(s, plan, max_tokens=10)
        model.add(s, plan)
    forward_append(cache, model, ["a", "b"], 5, torch.float32, 0)
    return cache, plans


def test_an_append_copies_to_the_device_without_waiting_for_it(busy_cache, monkeypatch):
    """Every host-to-device copy of an append (the rows' start positions, a grown page table) goes through the
    pool's pinned, asynchronous copy, so a transformers decode step does not wait for the GPU at every layer
    (on CUDA, torch's sync debug mode would raise on a wait)."""
    cache, _ = busy_cache
    copied = []
    to_device = type(cache)._to_device
    monkeypatch.setattr(type(cache), "_to_device", lambda pool, host: copied.append(host.clone()) or to_device(pool, host))
    keys = [torch.randn(len(cache.kv_heads(s, 0)), 1, SHAPE.head_dim, device=DEVICE) for s in ("a", "b")]
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        cache.append_batch(["a", "b"], 0, keys, [k.clone() for k in keys])
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    # One copy of the starts: each row (a kept KV head of layer 0, a's then b's) at the 5 positions stored.
    rows = [len(cache.kv_heads(s, 0)) for s in ("a", "b")]
    assert [t.tolist() for t in copied if t.dtype == torch.int32 and t.dim() == 1] == [[5] * sum(rows)]


def test_every_failure_is_clear_and_changes_nothing(busy_cache):
    cache, plans = busy_cache
    before = snapshot(cache)
    one = torch.randn(1, 1, 8, device=DEVICE)
    failures = [
        (lambda: cache.append("zzz", 0, one, one), "sequence 'zzz' is not in the cache"),
        (lambda: cache.append("a", 1, one.repeat(1, 6, 1), one.repeat(1, 6, 1)),
         r"sequence 'a', layer 1: 5 stored \+ 6 new tokens exceed the 10 reserved"),
        (lambda: cache.append("a", 1, one.double(), one.double()), "key must be torch.float32"),
        (lambda: cache.append("a", 1, torch.randn(2, 1, 8, device=DEVICE), one),
         r"key for sequence 'a', layer 1 must be \[1, 'new', 8\].*keeps KV heads \[1\]"),
        (lambda: cache.append("a", 1, one, torch.randn(1, 2, 8, device=DEVICE)), "value must have the shape of key"),
        (lambda: cache.append("a", 3, one, one), r"layer must be an int in \[0, 3\)"),
        (lambda: cache.append_batch(["a", "a"], 1, [one, one], [one, one]), "seq_ids must not repeat"),
        (lambda: cache.add_sequence("a", plans["a"], 4), "sequence 'a' is already in the cache"),
        (lambda: cache.add_sequence("c", ExecutionPlan.full(ModelShape(32, 3, 4, 4, 8, 40, 50)), 4),
         "plan is for ModelShape.*but the model is"),
        (lambda: cache.add_sequence("c", plans["a"], 0), "max_tokens must be an int >= 1"),
    ]
    if DEVICE.type == "cpu":
        failures.append((lambda: cache.append("a", 1, one.to("meta"), one.to("meta")), "key must be torch.float32 on cpu"))
    for call, match in failures:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
        assert_unchanged(cache, before)

    # Exhausting the pool: a batch that needs more pages than are free writes nothing.
    free = cache.pages_free
    cache.add_sequence("big", ExecutionPlan.full(SHAPE), max_tokens=100)
    big = torch.randn(2, 4 * free, 8, device=DEVICE)
    with pytest.raises(ValueError, match=f"KV pool exhausted: appending {4 * free} tokens to layer 0 needs"):
        cache.append("big", 0, big, big)
    assert cache.pages_free == free and cache.length("big") == 0
    cache.free("big")
    assert_unchanged(cache, before)

    cache.free("b")
    with pytest.raises(ValueError, match="sequence 'b' is not in the cache"):
        cache.gather("b", 0)
    assert cache.sequences == ("a",)


def test_free_returns_pages_and_skipped_layers_take_none(busy_cache):
    cache, plans = busy_cache
    # a: layer 0 keeps both KV heads, layer 1 KV head 1, layer 2 is skipped; 5 positions in pages of 4 -> 2 each.
    assert cache.page_table("a", 0).shape == (2, 2) and cache.page_table("a", 2).shape == (0, 0)
    assert cache.sequence_bytes("a") == 3 * 2 * cache.page_bytes
    assert cache.sequence_bytes("a") == cost.kv_cache_bytes(SHAPE, 5, plans["a"], kv_bytes=4, page_size=4)
    assert cache.pages_needed("a", 3) == 0 and cache.pages_needed("a", 4) == 3  # positions 6-8 fit the 2nd page
    in_use = cache.pages_in_use
    cache.clear("b", 1)  # b keeps 2 KV heads in layer 1: 2 pages each
    assert cache.pages_in_use == in_use - 4 and cache.length("b", 1) == 0 and cache.length("b", 0) == 5
    cache.free("a")
    assert cache.pages_in_use == in_use - 4 - 6


def test_set_plan_replans_empty_layers_only(busy_cache):
    cache, plans = busy_cache
    before = snapshot(cache)
    other = ExecutionPlan(SHAPE, [[0, 1, 2, 3], [0], []], [range(40), range(40), []])
    with pytest.raises(ValueError, match=r"sequence 'a' holds 5 positions of KV heads \[1\] in layer 1; the new plan keeps \[0\]"):
        cache.set_plan("a", other)
    with pytest.raises(ValueError, match="plan must be an ExecutionPlan"):
        cache.set_plan("a", "full")
    assert_unchanged(cache, before)

    # AdaLLaVA's order: the prefix layer is filled under a provisional plan, the rest is planned after it.
    prefix_only = ExecutionPlan(SHAPE, [range(4), [], []], [range(40), [], []])
    cache.add_sequence("c", prefix_only, max_tokens=8)
    k = torch.randn(2, 3, 8, device=DEVICE)
    cache.append("c", 0, k, k)
    final = ExecutionPlan(SHAPE, [range(4), [1], []], [range(40), range(40), []])
    cache.set_plan("c", final)
    cache.append("c", 1, k[:1], k[:1])
    assert cache.plan("c") == final and cache.kv_heads("c", 1) == (0,)
    assert cache.sequence_bytes("c") == cost.kv_cache_bytes(SHAPE, 3, final, kv_bytes=4, page_size=4)
    assert_close(cache.gather("c", 1)[0], k[:1])


# --- reservation: every page taken at admission -----------------------------------


def test_reserved_sequences_take_every_page_at_admission_or_are_refused(busy_cache):
    cache, plans = busy_cache
    before = snapshot(cache)
    free = cache.pages_free  # a and b hold 5 positions of 3 and 4 (layer, KV head) pairs: 14 pages of 20
    assert free == 6 and cache.pages_for(plans["b"], 9) == 4 * 3
    with pytest.raises(ValueError, match="KV pool exhausted: sequence 'c' needs 12 pages for 9 positions under "
                                         "its plan, 6 of 20 are free"):
        cache.add_sequence("c", plans["b"], 9, reserve=True)
    assert_unchanged(cache, before)
    one_head = ExecutionPlan(SHAPE, [[], [2], []], [[], range(40), []])  # layer 1, KV head 1
    cache.add_sequence("c", one_head, 9, reserve=True)
    assert cache.pages_free == free - 3 and cache.sequence_bytes("c") == cost.kv_cache_bytes(
        SHAPE, 9, one_head, kv_bytes=4, page_size=4)
    assert cache.page_table("c", 1).shape == (1, 3) and cache.pages_needed("c", 9) == 0
    k = torch.randn(1, 9, 8, device=DEVICE)
    cache.append("c", 1, k, k)  # no page is taken: they are all there
    assert cache.pages_free == free - 3
    assert_close(cache.gather("c", 1)[0], k)
    cache.clear("c")  # the positions go, the reservation stays
    assert cache.length("c", 1) == 0 and cache.pages_free == free - 3
    cache.free("c")
    assert_unchanged(cache, before)


def test_reserved_set_plan_trades_pages_and_advance_counts_positions():
    cache = LayerSkipKVCache(SHAPE, num_pages=20, page_size=4, dtype=torch.float32, device=DEVICE)
    full, narrow = ExecutionPlan.full(SHAPE), ExecutionPlan(SHAPE, [range(4), [3], []], [range(40)] * 3)
    cache.add_sequence("s", full, 8, reserve=True)  # 3 layers x 2 KV heads x 2 pages
    k = torch.randn(2, 5, 8, device=DEVICE)
    cache.append("s", 0, k, k)
    cache.set_plan("s", narrow)  # layer 1 keeps KV head 1, layer 2 none: 6 pages go back
    assert cache.pages_in_use == 6 and cache.page_table("s", 1).shape == (1, 2)
    cache.add_sequence("t", narrow, 16, reserve=True)  # 3 x 4 pages: 2 are left
    # Back to every KV head: layers 1 and 2 take 2 x 2 pages each and give back layer 1's 2.
    with pytest.raises(ValueError, match="KV pool exhausted: the new plan of sequence 's' needs 6 more pages, 2 of 20"):
        cache.set_plan("s", full)
    assert cache.plan("s") == narrow and cache.pages_in_use == 18
    cache.advance(["s"], 3)  # kernels wrote 3 positions in every layer that keeps a KV head
    assert [cache.length("s", i) for i in range(3)] == [3 + 5, 3, 0]
    with pytest.raises(ValueError, match=r"sequence 's': 8 stored \+ 1 new tokens exceed the 8 reserved"):
        cache.advance(["s"], 1)
    lazy = ExecutionPlan.full(SHAPE)
    cache.free("t")
    cache.add_sequence("u", lazy, 4)
    with pytest.raises(ValueError, match="sequence 'u' was not added with reserve=True"):
        cache.advance(["u"], 1)


# --- the attention's decode path and transformers ------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_attention_decodes_from_the_paged_cache(backend):
    hidden, heads, kv_heads, d = 32, 4, 2, 8
    shape = ModelShape(hidden, 1, heads, kv_heads, d, 40, 50)
    w = [randn(heads * d, hidden) * 0.2, randn(kv_heads * d, hidden) * 0.2, randn(kv_heads * d, hidden) * 0.2,
         randn(hidden, heads * d) * 0.2]
    active = torch.tensor([2, 3], dtype=torch.int32, device=DEVICE)  # KV head 1 only
    plan = ExecutionPlan(shape, [[2, 3]], [range(40)])
    x = randn(2, 11, hidden)
    angles = torch.rand(1, 11, d // 2, device=DEVICE)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    cache = LayerSkipKVCache(shape, num_pages=16, page_size=4, dtype=torch.float32, device=DEVICE)
    for s in ("p", "q"):
        cache.add_sequence(s, plan, max_tokens=11)
    common = dict(num_heads=heads, num_kv_heads=kv_heads, backend=backend)
    outs = []
    for start, stop in [(0, 7), (7, 8), (8, 9), (9, 11)]:
        view = cache.layer_view(["p", "q"], 0)
        outs.append(masked_attention(x[:, start:stop], *w, active, cos[:, start:stop], sin[:, start:stop],
                                     kv_cache=view, **common))
    full = masked_attention(x, *w, active, cos, sin, **common)
    assert_close(torch.cat(outs, 1).cpu(), full.cpu().double())
    assert cache.page_table("p", 0).shape == (1, 3)  # one KV head of two, 11 positions in pages of 4


def test_transformers_generate_matches_dynamic_cache_at_a_full_plan():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=40, num_hidden_layers=3, vocab_size=50)
    model = LlamaForCausalLM(config).eval().to(DEVICE)
    assert ModelShape.from_hf_config(config) == SHAPE
    cache = LayerSkipKVCache(SHAPE, num_pages=64, page_size=4, dtype=torch.float32, device=DEVICE)
    for s in (0, 1):
        cache.add_sequence(s, ExecutionPlan.full(SHAPE), max_tokens=20)
    ids = torch.randint(0, 50, (2, 9)).to(DEVICE)
    # min_new_tokens: the page count below must not depend on where the default EOS happens to fall.
    kwargs = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **{CACHE_KEYWORD: transformers_cache(cache, [0, 1])}, **kwargs)
        theirs = model.generate(ids, **{CACHE_KEYWORD: DynamicCache()}, **kwargs)
    assert torch.equal(ours, theirs)
    # 15 positions (the last token is not fed back) in pages of 4, 3 layers x 2 KV heads, 2 sequences.
    assert cache.pages_in_use == 2 * 3 * 2 * 4
    assert cache.bytes_in_use == cost.kv_cache_bytes(SHAPE, 15, batch_size=2, kv_bytes=4, page_size=4)
    hf_cache = transformers_cache(cache, [0, 1])
    hf_cache.reset()  # transformers' reset empties the sequences and returns their pages
    assert cache.pages_in_use == 0 and hf_cache.get_seq_length() == 0 and cache.sequences == (0, 1)


# --- host bookkeeping: page ownership, model tables, a meta pool ----------------------


def random_head_plan(generator: torch.Generator, shape=SHAPE) -> ExecutionPlan:
    """Each layer keeps a random subset of the query heads (possibly none: the layer stores nothing)."""
    heads = [(torch.rand(shape.num_heads, generator=generator) < 0.5).nonzero().flatten().tolist()
             for _ in range(shape.num_layers)]
    return ExecutionPlan(shape, heads, [range(shape.intermediate_size)] * shape.num_layers)


def owned_pages(cache) -> list[int]:
    return [page for s in cache.sequences for layer in range(cache.shape.num_layers)
            for head in cache.page_lists(s, layer) for page in head]


def assert_pages_consistent(cache) -> None:
    pages = owned_pages(cache)
    assert len(pages) == len(set(pages)), "a page is owned twice"
    assert all(0 <= p < cache.num_pages for p in pages), "a page outside the pool (or the scratch page) is owned"
    assert len(pages) == cache.pages_in_use == cache.num_pages - cache.pages_free
    assert sum(cache.sequence_bytes(s) for s in cache.sequences) == cache.bytes_in_use
    for s in cache.sequences:
        for layer in range(SHAPE.num_layers):
            assert cache.kv_heads(s, layer) == cache.plan(s).kv_heads(layer)
            lists, table = cache.page_lists(s, layer), cache.page_table(s, layer)
            assert table.dtype == torch.int32 and table.device.type == cache.pages.device.type
            assert len(lists) == table.shape[0] == len(cache.kv_heads(s, layer))
            if cache.pages.device.type != "meta":
                assert [list(h) for h in lists] == table.cpu().tolist()


def test_model_tables_hold_each_kept_kv_head_pages_and_the_scratch_page_elsewhere():
    cache = LayerSkipKVCache(SHAPE, num_pages=40, page_size=4, dtype=torch.float32, device=DEVICE,
                             scratch_page=True)
    plan = ExecutionPlan(SHAPE, [[0, 1, 2, 3], [3], []], [range(40)] * 3)  # KV heads (0, 1), (1,), ()
    cache.add_sequence("s", plan, 9, reserve=True)  # 3 pages per KV head
    tables = cache.model_tables("s", 5)
    assert tables.shape == (3, 2, 5) and tables.dtype == torch.int32 and tables.device == cache.pages.device
    scratch = cache.scratch_page
    for layer in range(3):
        lists = dict(zip(cache.kv_heads("s", layer), cache.page_lists("s", layer)))
        for k in range(2):
            expected = list(lists[k]) + [scratch] * 2 if k in lists else [scratch] * 5
            assert tables[layer, k].tolist() == expected, (layer, k)
    assert cache.model_tables("s", 5) is tables  # built once
    assert cache.model_tables("s", 3)[:, :, :3].tolist() == tables[:, :, :3].tolist()
    cache.set_plan("s", ExecutionPlan.full(SHAPE))
    after = cache.model_tables("s", 5)
    assert after is not tables and (after[:, :, 3:] == scratch).all() and (after[:, :, :3] != scratch).all()
    assert sorted(p for p in after.flatten().tolist() if p != scratch) == sorted(owned_pages(cache))

    with pytest.raises(ValueError, match="width must be >= the 3 pages per KV head of sequence 's'.*got 2"):
        cache.model_tables("s", 2)
    with pytest.raises(ValueError, match="width must be an int >= 0"):
        cache.model_tables("s", 2.5)
    cache.add_sequence("lazy", plan, 9)
    with pytest.raises(ValueError, match="model_tables needs a sequence added with reserve=True; 'lazy'"):
        cache.model_tables("lazy", 5)
    plain = LayerSkipKVCache(SHAPE, num_pages=40, page_size=4, dtype=torch.float32, device=DEVICE)
    plain.add_sequence("s", plan, 9, reserve=True)
    with pytest.raises(ValueError, match="model_tables needs a scratch page.*scratch_page=True"):
        plain.model_tables("s", 5)


@pytest.mark.parametrize("seed", range(4))
def test_random_admissions_replans_steps_and_frees_never_share_a_page(seed):
    """Reserved sequences come and go, change plans and advance; others append layer by layer and clear.
    After every call: no page is owned twice, the scratch page by none, and the pool counts what they own."""
    generator = torch.Generator().manual_seed(seed)
    cache = LayerSkipKVCache(SHAPE, num_pages=60, page_size=4, dtype=torch.float32, device=DEVICE,
                             scratch_page=True)

    def pick(n):
        return int(torch.randint(n, (1,), generator=generator))

    refused = 0
    for step in range(120):
        live = list(cache.sequences)
        reserved = [s for s in live if s[0] == "r"]
        op = pick(6)
        try:
            if op == 0 or not live:
                kind = "r" if pick(3) else "a"
                cache.add_sequence((kind, step), random_head_plan(generator), 1 + pick(12), reserve=kind == "r")
            elif op == 1:
                cache.free(live[pick(len(live))])
            elif op == 2 and live:
                cache.set_plan(live[pick(len(live))], random_head_plan(generator))
            elif op == 3 and reserved:
                s = reserved[pick(len(reserved))]
                room = cache.max_tokens(s) - max(cache.length(s, i) for i in range(SHAPE.num_layers))
                cache.advance([s], pick(room + 1))
            elif op == 4:
                s = live[pick(len(live))]
                layer = pick(SHAPE.num_layers)
                new = 1 + pick(3)
                if cache.length(s, layer) + new <= cache.max_tokens(s):
                    kv = torch.randn(len(cache.kv_heads(s, layer)), new, 8, device=DEVICE)
                    cache.append(s, layer, kv, kv)
            elif op == 5:
                cache.clear(live[pick(len(live))], None if pick(2) else pick(SHAPE.num_layers))
        except ValueError as error:  # the only refusals these calls can meet
            assert "KV pool exhausted" in str(error) or "(clear the layer first)" in str(error)
            refused += 1
        assert_pages_consistent(cache)
    assert refused < 60  # most calls went through
    for s in list(cache.sequences):
        cache.free(s)
    assert cache.pages_in_use == 0 and cache.pages_free == cache.num_pages
    # Every page came back once: one sequence can take the whole pool, and gets each page once.
    whole = ExecutionPlan(SHAPE, [[0]] + [[]] * 2, [range(40)] + [[]] * 2)  # one (layer, KV head): 60 pages
    cache.add_sequence("all", whole, 60 * 4, reserve=True)
    assert sorted(owned_pages(cache)) == list(range(60))


def test_a_refused_replan_changes_nothing():
    cache = LayerSkipKVCache(SHAPE, num_pages=14, page_size=4, dtype=torch.float32, device=DEVICE)
    narrow = ExecutionPlan(SHAPE, [[0], [], []], [range(40)] * 3)
    cache.add_sequence("s", narrow, 8, reserve=True)  # 2 pages
    cache.add_sequence("t", ExecutionPlan.full(SHAPE), 4, reserve=True)  # 6 pages: 6 left
    lists = [cache.page_lists("s", i) for i in range(3)]
    with pytest.raises(ValueError, match="the new plan of sequence 's' needs 10 more pages, 6 of 14 are free"):
        cache.set_plan("s", ExecutionPlan.full(SHAPE))
    assert [cache.page_lists("s", i) for i in range(3)] == lists and cache.plan("s") == narrow
    assert cache.pages_free == 6
    assert_pages_consistent(cache)
    # A plan that keeps the KV head it had keeps its pages.
    cache.set_plan("s", ExecutionPlan(SHAPE, [[0, 1, 2], [], [3]], [range(40)] * 3))
    assert cache.page_lists("s", 0)[0] == lists[0][0] and cache.pages_free == 2
    assert_pages_consistent(cache)


def test_a_meta_pool_keeps_the_bookkeeping_and_refuses_kernels():
    """A pool on the meta device holds no K/V: admissions, plans and steps are counted at full size."""
    shape = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                       intermediate_size=64, vocab_size=50)
    cache = LayerSkipKVCache(shape, num_pages=200_000, page_size=16, device="meta", scratch_page=True)
    assert cache.pages.device.type == "meta"
    full = ExecutionPlan.full(shape)
    half = ExecutionPlan(shape, [range(16)] * 32, [range(64)] * 32)
    cache.add_sequence("s", full, 800, reserve=True)
    assert cache.pages_in_use == 32 * 32 * 50 == cache.pages_for(full, 800)
    cache.set_plan("s", half)
    assert cache.pages_in_use == 32 * 16 * 50 and len(cache.page_lists("s", 5)) == 16
    assert cache.page_table("s", 5).shape == (16, 50) and cache.page_table("s", 5).device.type == "meta"
    tables = cache.model_tables("s", 64)
    assert tables.shape == (32, 32, 64) and tables.device.type == "meta"
    cache.advance(["s"], 7)
    assert cache.length("s", 31) == 7
    kv = torch.empty(16, 1, 128, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="append_batch runs the cache kernels, which a pool on the meta device"):
        cache.append("s", 0, kv, kv)
    with pytest.raises(ValueError, match="gather runs the cache kernels, which a pool on the meta device"):
        cache.gather("s", 0)
    cache.free("s")
    assert cache.pages_in_use == 0 and cache.sequences == ()
