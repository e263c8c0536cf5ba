"""The plan runtime: equal to the zeroed model, no host sync in a step, few ops per layer, traceable, and
admission that refuses what does not fit without touching the other sequences.

Backends: ``torch`` on the CPU, and ``triton`` on DEVICE (the GPU, or the CPU under TRITON_INTERPRET=1).
"""

import collections
import copy
import gc

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from transformers import LlamaConfig, LlamaForCausalLM

from adallava_kernels import ExecutionPlan, ModelShape, cost
from adallava_kernels.ops.triton_utils import DECODE_MAX_TOKENS, PDL_ENV
from adallava_kernels.runtime import DecodeBatch, GraphCache, PlannedDecoder

from adallava_kernels.runtime.layers import LayerProgram
from adallava_kernels.runtime.step import SlotLayer
from adallava_kernels.testing import assert_close

from _device import DEVICE
from _graphs import FreedTensorRead, HostValueChanged, RecordingGraphs

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, NEURONS, LAYERS, VOCAB = 64, 8, 2, 8, 100, 4, 128
SHAPE = ModelShape(HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, NEURONS, VOCAB)
BACKENDS = [pytest.param("torch", torch.device("cpu"), id="torch"), pytest.param("triton", DEVICE, id="triton")]

# -L: a layer skipped; -H: heads and neuron groups off, a layer with attention only, one with its MLP only.
PLAN_L = ExecutionPlan.from_layer_mask([1, 1, 0, 1], SHAPE)
PLAN_H = ExecutionPlan(SHAPE, [range(8), range(8), [1, 2, 5], []],
                       [range(100), range(100), range(0, 100, 3), range(40, 90)])
PLAN_H2 = ExecutionPlan(SHAPE, [range(8), range(8), [0, 7], [3]], [range(100), range(100), [], range(60)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=NEURONS, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB)
    return LlamaForCausalLM(config).eval()


def zeroed(model, plan):
    """The oracle: transformers' Llama with the plan's inactive heads and neurons zeroed in o_proj/down_proj."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            heads_off = torch.ones(HEADS, dtype=torch.bool)
            heads_off[list(plan.heads[i])] = False
            layer.self_attn.o_proj.weight[:, heads_off.repeat_interleave(HEAD_DIM)] = 0
            neurons_off = torch.ones(NEURONS, dtype=torch.bool)
            neurons_off[list(plan.neurons[i])] = False
            layer.mlp.down_proj.weight[:, neurons_off] = 0
    return ref


def prompts(batch=2, length=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


def runner_for(model, backend, device, **kwargs):
    return PlannedDecoder.from_hf(copy.deepcopy(model).to(device), num_pages=kwargs.pop("num_pages", 120),
                                  page_size=4, backend=backend, **kwargs)


def generate(runner, ids, mask, plans, steps, *, planner_at=None, room=0):
    """Greedy tokens and every step's logits through the runtime (plans given at admission or by a planner);
    ``room``: positions reserved beyond the generation."""
    device = runner.weights.device
    seq_ids = [f"s{b}" for b in range(ids.shape[0])]
    for s, plan in zip(seq_ids, plans):
        runner.admit(s, None if planner_at is not None else plan, ids.shape[1] + steps + room)
    embeds = runner.weights.embed[ids.to(device)]
    kwargs = {} if planner_at is None else dict(planner=lambda h: plans, plan_after=planner_at)
    logits = runner.prefill(seq_ids, embeds, mask.to(device), **kwargs)[:, -1]
    batch = runner.decode(seq_ids)
    token, out = logits.argmax(-1), [logits.cpu()]
    for _ in range(steps - 1):
        logits, token = batch.step(token)
        out.append(logits.cpu())
    batch.close()  # the rows leave: the pool records their positions
    return seq_ids, torch.stack(out, 1)


def oracle_logits(model, ids, mask, plan, steps):
    # The prompt's mask is given: without one, generate would take every token equal to pad_token_id (0)
    # for padding.
    prompt = ids[None, mask.bool()]
    with torch.no_grad():
        g = zeroed(model, plan).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                         min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                                         return_dict_in_generate=True)
    return torch.stack(g.logits, 1)[0]


# --- equivalence -------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("plans, planner_at", [((PLAN_L, PLAN_H), None), ((PLAN_H, PLAN_H2), 2)],
                         ids=["L-and-H-at-admission", "H-from-a-planner"])
def test_runtime_equals_the_zeroed_model_with_padding(model, backend, device, plans, planner_at):
    runner = runner_for(model, backend, device, cuda_graphs=False)
    ids, mask = prompts()
    steps = 5
    seq_ids, logits = generate(runner, ids, mask, plans, steps, planner_at=planner_at)
    for b, plan in enumerate(plans):
        assert_close(logits[b], oracle_logits(model, ids[b], mask[b], plan, steps), torch.float32)
    # The pool holds the plans' layers and KV heads only, with every page reserved at admission.
    stored = ids.shape[1] + steps - 1  # the last token is not fed back
    for s, plan in zip(seq_ids, plans):
        for layer in range(LAYERS):
            assert runner.cache.kv_heads(s, layer) == plan.kv_heads(layer)
            assert runner.cache.length(s, layer) == (stored if plan.kv_heads(layer) else 0)
        assert runner.cache.sequence_bytes(s) == cost.kv_cache_bytes(
            SHAPE, ids.shape[1] + steps, plan, kv_bytes=4, page_size=runner.cache.page_size)


@pytest.mark.parametrize("rope_type, tabled", [("linear", True), ("dynamic", False)])
def test_a_triton_step_tables_the_rotary_rows_unless_they_change_with_the_length(model, rope_type, tabled):
    """Decode reads each row's rotary angles from the runner's per-width tables, built by the model's module;
    a rope whose frequencies change with the length (dynamic) keeps calling the module. Either way the
    tokens are transformers' (a dynamic rope's prompt stays below its original length, where it is static)."""
    scaled = copy.deepcopy(model)
    scaled.config.rope_parameters = {**model.config.rope_parameters, "rope_type": rope_type, "factor": 2.0}
    scaled.model.rotary_emb = type(model.model.rotary_emb)(scaled.config)
    runner = runner_for(scaled, "triton", DEVICE, cuda_graphs=False)
    ids, mask = prompts()
    steps = 4
    _, logits = generate(runner, ids, mask, (PLAN_L, PLAN_H), steps)
    assert (runner.rotary_tables(next(iter(runner._rotary_tables))) is not None) == tabled
    for b, plan in enumerate((PLAN_L, PLAN_H)):
        assert_close(logits[b], oracle_logits(scaled, ids[b], mask[b], plan, steps), torch.float32)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_forward_without_cache_equals_the_zeroed_model(model, backend, device):
    runner = runner_for(model, backend, device)
    ids, mask = prompts()
    embeds = runner.weights.embed[ids.to(device)]
    logits, plans = runner.forward(embeds, mask.to(device), [PLAN_H, PLAN_L])
    assert plans == [PLAN_H, PLAN_L] and runner.cache.pages_in_use == 0
    for b, plan in enumerate(plans):
        with torch.no_grad():
            expected = zeroed(model, plan)(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
        real = mask[b].bool()
        assert_close(logits[b].cpu()[real], expected[0][real], torch.float32)


# --- no host sync, few ops ------------------------------------------------------------------

def _triton_launchers() -> list:
    """The classes whose ``run`` launches a Triton kernel: compiled, and under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


# Dispatched ops that launch no kernel: views, allocations, dtype arithmetic.
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
             "aten.empty_like.default", "aten.promote_types.default", "aten._unsafe_view.default"}

SYNC_OPS = {
    "aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
    "aten.unique_consecutive.default", "aten.masked_select.default", "aten.lift_fresh.default",
    "aten.lift_fresh_copy.default",
}


class Dispatched(TorchDispatchMode):
    """Records every aten and custom op dispatched, every Triton kernel launched directly (one entry per
    launch: the interpreter's own tensor ops inside a launch are not the step's), and Tensor.tolist calls
    (which dispatch nothing). A Python custom op (``torch.ops.adallava.*`` from ``torch.library.custom_op``)
    is recorded but launches nothing itself: its function runs under this mode, so the kernels it launches
    and the aten ops it dispatches (a split-K zero-fill, a copy) count one by one. The extension's C++ ops
    (``kv_append``, ``kv_gather``) are one launch each."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops = []
        self.launch = []  # per entry of ops: does it launch a kernel (not a view, an allocation, a tolist)
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.ops.append("Tensor.tolist")
            self.launch.append(False)
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)
        for launcher in _triton_launchers():
            monkeypatch.setattr(launcher, "run", self._launch_counter(launcher.run))

    def _launch_counter(self, run):
        def counted_run(kernel, *args, **kwargs):
            self.ops.append(f"triton.{getattr(kernel, '__name__', type(kernel).__name__)}")
            self.launch.append(True)
            with _disable_current_modes():
                return run(kernel, *args, **kwargs)

        return counted_run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        python_op = OPDEFS.get(func._schema.name)
        if python_op is not None:  # its function, run under this mode: what it runs counts, not the op
            self.launch.append(False)
            with self:
                return python_op._init_fn(*args, **kwargs)
        self.launch.append(not func.is_view and str(func) not in NO_LAUNCH)
        return func(*args, **kwargs)

    def launches(self, start=0, stop=None) -> list[str]:
        return [op for op, launch in zip(self.ops[start:stop], self.launch[start:stop]) if launch]

    def syncs(self, start=0, stop=None):
        return [op for op in self.ops[start:stop] if op in SYNC_OPS or op == "Tensor.tolist"]


LayerCall = collections.namedtuple("LayerCall", "index ops syncs start launches runs")

# Kernels of a torch decode layer, by what runs (see LAYER_LAUNCHES).
TORCH_DECODE_LAUNCHES = {"attention+mlp": 38, "attention": 23, "mlp": 15}


def sub_blocks_run(layer, slots=None) -> str:
    """What a layer program runs in prefill, or a decode layer over ``slots`` (where the host knows the
    union's sizes, the torch backend's eager step): "attention+mlp", "attention", "mlp" or "none"."""
    if isinstance(layer, SlotLayer):
        counts = (1, 1, 1) if slots is None or slots.counts is None else slots.counts
        attention, mlp = counts[0] > 0, counts[2] > 0
    else:
        attention, mlp = layer.runs_attention, layer.runs_mlp
    return "+".join(name for name, runs in (("attention", attention), ("mlp", mlp)) if runs) or "none"


def per_layer(monkeypatch, mode, method, cls=LayerProgram):
    """A :class:`LayerCall` (layer index, ops, syncs, first op, kernel launches, sub-blocks run) of every
    call of ``cls.<method>`` while ``mode`` is on."""
    calls, original = [], getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        start = len(mode.ops)
        out = original(self, *args, **kwargs)
        slots = args[3] if isinstance(self, SlotLayer) else None
        calls.append(LayerCall(self.index, len(mode.ops) - start, mode.syncs(start), start, mode.launches(start),
                               sub_blocks_run(self, slots)))
        return out

    monkeypatch.setattr(cls, method, wrapped)
    return calls


# The kernels one decoder layer launches, exactly (a custom op counted by the kernels it runs): any kernel
# added fails. Lower a number where a kernel goes. Keys: (stage, backend, decode path or prefill layer, what
# the layer runs); per-kernel breakdowns as measured.
LAYER_LAUNCHES = {
    # Triton (the GPU's path), every layer alike, whatever the rows' plans (a sub-block no row runs is an
    # empty launch): head_proj (the input norm, then q, k, v of the union's heads with RoPE, K and V to the
    # pages); paged_decode (each row over its own heads); o_proj with the residual (col_gather); the second
    # norm, gate and up with SiLU-and-multiply (row_gather); down with the residual (col_gather).
    ("decode", "triton", "attention+mlp"): 5,
    # The torch backend (the CPU's reference path), over the union's weights, gathered, a sub-block no row
    # runs left out: two RMSNorms (pow, mean, add, rsqrt, mul, mul each); q|k|v (cat of the union's rows,
    # index_select, mm); RoPE (mul, roll, mul, add); the tables (clone), kv_append; the head tables (gather);
    # the pages (index), SDPA; the heads a row lacks (ge, mul); o_proj (index_select, mm); the residual add
    # (add); gate and up (index_select, mm, silu, index_select, mm, mul); the row's neurons (mul); down with
    # the residual (index_select, addmm). Attention alone: one RMSNorm, the attention, the add; the MLP alone:
    # one RMSNorm and the MLP.
    ("decode", "torch", "attention+mlp"): TORCH_DECODE_LAUNCHES["attention+mlp"],
    ("decode", "torch", "attention"): TORCH_DECODE_LAUNCHES["attention"],
    ("decode", "torch", "mlp"): TORCH_DECODE_LAUNCHES["mlp"],
    ("decode", "torch", "none"): 0,
    # A prefill layer on Triton, whole: rms_norm, qkv (aten.mm), rope, kv_append, flash_attn, o_proj (aten.mm),
    # the residual add fused with rms_norm, gate_up (aten.mm), silu_and_mul, down with the residual
    # (aten.addmm).
    ("prefill", "triton", "whole", "attention+mlp"): 10,
    # Partial: rms_norm, head_proj, kv_append, flash_attn, o_proj (col_gather), rms_norm fused with the
    # residual add, row_gather (SwiGLU), down with the residual (col_gather).
    ("prefill", "triton", "partial", "attention+mlp"): 8,
}


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("plans, torch_runs", [
    ((PLAN_L, PLAN_L), {"attention+mlp", "none"}),  # layer 2: no row runs it
    ((PLAN_H, PLAN_H2), {"attention+mlp"}),  # the union of layers 2 and 3 has heads and neurons
    ((PLAN_H, PLAN_H), {"attention+mlp", "mlp"}),  # layer 3: neurons only
    ((PLAN_H2, PLAN_H2), {"attention+mlp", "attention"}),  # layer 2: heads only
], ids=["L", "H-two-plans", "H-mlp-alone", "H-attention-alone"])
def test_decode_step_reads_nothing_back_and_launches_few_kernels_a_layer(model, backend, device, plans, torch_runs,
                                                                         monkeypatch):
    # Eager steps on every device: a replayed CUDA graph would run no layer to count (what it records is
    # the same sequence of launches).
    runner = runner_for(model, backend, device, cuda_graphs=False)
    ids, mask = prompts()
    seq_ids, _ = generate(runner, ids, mask, plans, 2, room=2)
    batch = runner.decode(seq_ids)
    token = torch.zeros(2, dtype=torch.long, device=device)
    batch.step(token)  # the union, derived when the rows joined: not the step's work
    with Dispatched(monkeypatch) as mode:
        calls = per_layer(monkeypatch, mode, "decode", SlotLayer)
        batch.step(token)
        batch.step()
    assert mode.syncs() == []
    assert len(calls) == 2 * LAYERS  # every layer, every step
    counted = [(call.index, call.runs, len(call.launches)) for call in calls]
    expected = [(call.index, call.runs, LAYER_LAUNCHES["decode", backend, call.runs]) for call in calls]
    assert counted == expected, [call.launches for call in calls]
    # Triton launches a sub-block no row runs, empty; the torch path leaves it out where the host knows.
    assert {call.runs for call in calls} == ({"attention+mlp"} if backend == "triton" else torch_runs)


def test_a_triton_decode_step_launches_few_kernels_outside_its_layers(model, monkeypatch):
    """Around its layers, a Triton step launches what bench/static.py prices it at
    (decode.KERNELS_OUTSIDE_LAYERS), in order: the embedding, the rows' rotary angles and lengths, lm_head
    with the final norm inside it (a row gather of every row), the greedy tokens. ``step`` itself then copies
    its two outputs for the caller (which a captured graph does not hold)."""
    from adallava_kernels.runtime.decode import KERNELS_OUTSIDE_LAYERS

    runner = runner_for(model, "triton", DEVICE, cuda_graphs=False)
    ids, mask = prompts()
    seq_ids, _ = generate(runner, ids, mask, (PLAN_H, PLAN_H2), 2, room=2)
    batch = runner.decode(seq_ids)
    batch.step(torch.zeros(2, dtype=torch.long, device=DEVICE))
    with Dispatched(monkeypatch) as mode:
        calls = per_layer(monkeypatch, mode, "decode", SlotLayer)
        batch.step()
    inside = {i for call in calls for i in range(call.start, call.start + call.ops)}
    outside = [op for i, (op, launch) in enumerate(zip(mode.ops, mode.launch)) if launch and i not in inside]
    assert outside == ["aten.embedding.default", "triton._step_inputs_kernel", "triton._row_gather_kernel",
                       "triton._greedy_kernel", "aten.clone.default", "aten.clone.default"]
    assert len(outside) - 2 == KERNELS_OUTSIDE_LAYERS


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_planned_forward_reuses_the_programs_of_a_plan_it_ran_lately(model, backend, device, monkeypatch):
    """A Triton runner keeps the layer programs of the last RECENT_PLANS plans no one holds: a forward with
    such a plan builds none. Its programs hold index tensors only; the torch backend's hold gathered weight
    copies, so it keeps none and builds them again."""
    from adallava_kernels.runtime import layers

    runner = runner_for(model, backend, device)
    built = []
    init = LayerProgram.__init__

    def counted(self, weights, plan, *args):
        built.append(plan.index)
        init(self, weights, plan, *args)

    monkeypatch.setattr(LayerProgram, "__init__", counted)
    embeds, mask = runner.weights.embed[prompts()[0].to(device)], prompts()[1]
    partial = [i for i in range(LAYERS) if PLAN_H.unit_counts()[0][i] not in (0, HEADS)]
    runner.forward(embeds, mask, [PLAN_H, PLAN_H])
    assert built and set(partial) <= set(built)
    first = len(built)
    runner.forward(embeds, mask, [PLAN_H, PLAN_H])
    keep = layers.RECENT_PLANS[backend]
    assert len(built) == (first if keep else 2 * first)
    # More distinct plans than it keeps: the oldest one's programs go, and come back built anew.
    others = [ExecutionPlan(SHAPE, [range(8), range(8), [j], [j]], [range(100)] * 2 + [[j], [j]])
              for j in range(keep + 1)]
    for plan in others:
        runner.forward(embeds, mask, [plan, plan])
    assert len(runner.programs._recent) == keep and runner.programs._plans.keys() == {runner._full.fingerprint}
    before = len(built)
    runner.forward(embeds, mask, [PLAN_H, PLAN_H])
    assert len(built) > before


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_prefill_layers_read_nothing_back_after_planning(model, backend, device, monkeypatch):
    runner = runner_for(model, backend, device)
    ids, mask = prompts()
    for s in ("a", "b"):
        runner.admit(s, None, 20)
    embeds = runner.weights.embed[ids.to(device)]
    planned_at = []

    def planner(hidden):
        planned_at.append(len(mode.ops))
        return [PLAN_H, PLAN_H2]

    # The pool's set_plan indexes its host page tensors (nonzero, masked_select, tolist of int32 tensors that
    # never live on the device: tests/test_kv_cache.py runs it on a meta pool, where reading a device value
    # would raise), so its ops are set apart: they read nothing back from the device.
    pool_spans = []
    set_plan = type(runner.cache).set_plan

    def recorded_set_plan(cache, *args):
        start = len(mode.ops)
        set_plan(cache, *args)
        pool_spans.append(range(start, len(mode.ops)))

    monkeypatch.setattr(type(runner.cache), "set_plan", recorded_set_plan)
    with Dispatched(monkeypatch) as mode:
        calls = per_layer(monkeypatch, mode, "prefill")
        runner.prefill(["a", "b"], embeds, mask.to(device), planner=planner, plan_after=2)
    assert [call.syncs for call in calls] == [[]] * len(calls)
    # After planning, only plan time builds from host data (the plans' index tables, the row sets): all
    # before the first layer after the planner runs.
    resumed = min(call.start for call in calls if call.start > planned_at[0])
    assert mode.syncs(resumed) == []
    assert len(pool_spans) == 2 and all(planned_at[0] <= span.start and span.stop <= resumed for span in pool_spans)
    outside = [op for i, op in enumerate(mode.ops[planned_at[0]:resumed], planned_at[0])
               if not any(i in span for span in pool_spans)]
    assert {op for op in outside if op in SYNC_OPS or op == "Tensor.tolist"} <= {"aten.lift_fresh.default"}
    assert mode.syncs(0, planned_at[0]) == ["aten._local_scalar_dense.default"]  # the mask is left padding


def test_prefill_layers_launch_few_kernels_whole_or_partial(model, monkeypatch):
    """The Triton path (the GPU's) of one request's prefill: a whole layer and a partial one (some heads,
    some neurons) each launch the kernels LAYER_LAUNCHES counts (at most 15), within 2 of each other, and
    read nothing back."""
    runner = runner_for(model, "triton", DEVICE, cuda_graphs=False)
    plan = ExecutionPlan(SHAPE, [range(HEADS), [1, 2, 5], range(HEADS), [0]],
                         [range(NEURONS), range(0, NEURONS, 3), range(NEURONS), range(10)])
    ids, _ = prompts(length=DECODE_MAX_TOKENS + 5)  # past the decode regime's tiles: a prefill's
    runner.admit("a", plan, ids.shape[1] + 1)
    embeds = runner.weights.embed[ids[:1].to(DEVICE)]
    with Dispatched(monkeypatch) as mode:
        calls = per_layer(monkeypatch, mode, "prefill")
        runner.prefill(["a"], embeds)
    by_layer = {call.index: call for call in calls}
    whole, partial = by_layer[0].launches, by_layer[1].launches
    assert len(whole) == LAYER_LAUNCHES["prefill", "triton", "whole", "attention+mlp"] <= 15, whole
    assert len(partial) == LAYER_LAUNCHES["prefill", "triton", "partial", "attention+mlp"] <= 15, partial
    assert abs(len(whole) - len(partial)) <= 2, (whole, partial)
    assert by_layer[2].launches == whole and by_layer[3].launches == partial
    assert all(call.syncs == [] for call in calls)


def test_eager_torch_step_reads_the_context_not_the_reservation(model, monkeypatch):
    # A step of the torch path gathers the table columns the longest row has filled, not every page that
    # max_tokens reserved (a 55-token context cost 1.3 ms with 64 reserved and 27.8 ms with 8192).
    from adallava_kernels.runtime import step

    widths, gather = [], step.attend_gathered_pages

    def spy(q, pages, head_tables, mask, scale):
        widths.append((head_tables.shape[2], mask.shape[-1]))
        return gather(q, pages, head_tables, mask, scale)

    monkeypatch.setattr(step, "attend_gathered_pages", spy)
    runner = runner_for(model, "torch", torch.device("cpu"), num_pages=2000)
    ids, mask = prompts()
    steps = 5
    _, logits = generate(runner, ids, mask, (PLAN_L, PLAN_H), steps, room=400)  # 414 positions reserved
    # Attention runs once per layer and step, over the union of the rows' heads (every layer has some). The
    # prompt is 9 positions in pages of 4: 10, 11, 12, 13 visible -> 3, 3, 3, 4 pages.
    per_step = 4
    assert widths == [(pages, 4 * pages) for pages in (3, 3, 3, 4) for _ in range(per_step)]
    for b, plan in enumerate((PLAN_L, PLAN_H)):
        assert_close(logits[b], oracle_logits(model, ids[b], mask[b], plan, steps), torch.float32)


# --- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_decode_step_traces_with_torch_compile(model, backend, device):
    # The traced step (one graph, no break: the Triton kernels enter as custom ops) must give the oracle's
    # logits for the token the oracle generated, not merely its own eager run's.
    plans, steps = (PLAN_H, PLAN_L), 3
    runner = runner_for(model, backend, device, cuda_graphs=False)
    ids, mask = prompts()
    seq_ids, _ = generate(runner, ids, mask, plans, steps - 1, room=1)
    expected = [oracle_logits(model, ids[b], mask[b], plan, steps) for b, plan in enumerate(plans)]
    token = torch.stack([e[-2].argmax(-1) for e in expected]).to(device)
    batch = runner.decode(seq_ids, token)
    lengths = [batch.length(s) for s in seq_ids]
    torch._dynamo.reset()
    batch.forward_step = torch.compile(batch.forward_step, fullgraph=True, backend="eager")
    traced, _ = batch.step()
    for b in range(len(plans)):
        assert_close(traced[b].cpu(), expected[b][-1], torch.float32)
    assert [batch.length(s) for s in seq_ids] == [n + 1 for n in lengths]


# --- admission and bad input ------------------------------------------------------------------


def test_admission_refuses_what_does_not_fit_and_changes_nothing(model):
    runner = runner_for(model, "torch", torch.device("cpu"), num_pages=40)
    runner.admit("small", PLAN_L, 12)  # 3 kept layers x 2 KV heads x 3 pages of 4
    assert runner.cache.pages_in_use == 18 == runner.pages_for(PLAN_L, 12)
    tables = [runner.cache.page_table("small", i).clone() for i in range(LAYERS)]
    with pytest.raises(ValueError, match="KV pool exhausted: sequence 'big' needs 24 pages for 12 positions under "
                                         "its plan, 22 of 40 are free"):
        runner.admit("big", None, 12)
    assert runner.sequences == ("small",) and runner.cache.pages_in_use == 18
    assert all(torch.equal(runner.cache.page_table("small", i), t) for i, t in enumerate(tables))
    other = ExecutionPlan.full(ModelShape(HIDDEN, LAYERS, HEADS, HEADS, HEAD_DIM, NEURONS, VOCAB))
    with pytest.raises(ValueError, match="plan is for ModelShape.*num_kv_heads=8.*but the model is.*num_kv_heads=2"):
        runner.admit("other", other, 12)
    with pytest.raises(ValueError, match="sequence 'small' is already admitted"):
        runner.admit("small", PLAN_L, 12)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        runner.admit("zero", PLAN_L, 0)
    assert runner.sequences == ("small",) and runner.cache.pages_in_use == 18


def test_bad_calls_are_clear(model):
    runner = runner_for(model, "torch", torch.device("cpu"))
    ids, mask = prompts()
    embeds = runner.weights.embed[ids]
    runner.admit("a", PLAN_L, 10)
    runner.admit("b", PLAN_H, 10)
    right_padded = torch.ones_like(mask)
    right_padded[0, -1] = 0
    failures = [
        (lambda: runner.prefill(["a", "b"], embeds, right_padded), "attention_mask must be left padding"),
        (lambda: runner.prefill(["a", "b"], embeds.double(), mask), "inputs_embeds must have dtype"),
        (lambda: runner.prefill(["a"], embeds, mask), "inputs_embeds has 2 rows, but 1 sequences"),
        (lambda: runner.prefill(["a", "a"], embeds, mask), "seq_ids must not repeat a sequence"),
        (lambda: runner.prefill([], embeds, mask), "seq_ids must name at least one admitted sequence"),
        (lambda: runner.admit(["unhashable"], PLAN_L, 10), r"seq_id must be hashable .*got a list: \['unhashable'\]"),
        (lambda: runner.prefill(["a", {"b": 1}], embeds, mask), "seq_id must be hashable"),
        (lambda: runner.decode([["a"]]), "seq_id must be hashable"),
        (lambda: runner.prefill(["a", "zzz"], embeds, mask), "sequence 'zzz' is not admitted"),
        (lambda: runner.prefill(["a", "b"], embeds, mask[:, :5]), r"attention_mask must be \[2, 9\]"),
        (lambda: runner.decode(["a", "b"]), "sequence 'a' has not run its prefill"),
        (lambda: runner.prefill(["a", "b"], embeds, mask, planner=lambda h: [PLAN_L] * 2, plan_after=9),
         r"plan_after must be an int in \[0, 4\]"),
    ]
    for call, match in failures:
        with pytest.raises(ValueError, match=match):
            call()
    layer_0_cut = ExecutionPlan(SHAPE, [[0]] + [range(8)] * 3, [range(100)] * 4)
    with pytest.raises(ValueError, match=r"the plan of row 1 changes layers \[0\], which ran before the planner"):
        runner.forward(embeds, mask, None, planner=lambda h: [PLAN_L, layer_0_cut], plan_after=1)
    runner.prefill(["a", "b"], embeds, mask)
    with pytest.raises(ValueError, match="sequence 'a' has run its prefill: its plan is fixed"):
        runner.set_plan("a", PLAN_H)
    batch = runner.decode(["a", "b"])
    token = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens must have dtype"):
        batch.step(token.int())
    with pytest.raises(ValueError, match=rf"tokens holds an id outside the vocabulary \[0, {VOCAB}\)"):
        batch.step(torch.tensor([0, VOCAB]))
    batch.step(token)  # position 10 of 10 (the refused step stored nothing)
    with pytest.raises(ValueError, match="sequence 'a' is full: 10 positions stored of the 10 reserved"):
        batch.step(token)
    runner.free("a")  # a row of a batch leaves it first
    assert batch.seq_ids == ["b"] and runner.cache.sequences == ("b",)
    with pytest.raises(ValueError, match=r"tokens must have one entry per row \(1\), got 2"):
        batch.step(token)
    with pytest.raises(ValueError, match="sequence 'b' is already a row of another decode batch"):
        runner.decode(["b"])
    batch.leave(["b"])
    with pytest.raises(ValueError, match="sequence 'b' is full: 10 positions stored of the 10 reserved by admit"):
        runner.decode(["b"])


# --- a failed call changes nothing -----------------------------------------------------------------

ROWS = 3
GOOD = [PLAN_L, PLAN_H, PLAN_H2]  # each keeps layers 0 and 1 whole: a planner may give them after layer 2


def admitted(model, plan_after_rows=ROWS):
    runner = runner_for(model, "torch", torch.device("cpu"))
    ids, mask = prompts(batch=ROWS)
    seq_ids = [f"r{b}" for b in range(ROWS)]
    for s in seq_ids:
        runner.admit(s, None, 12)
    return runner, seq_ids, runner.weights.embed[ids], mask


def runner_state(runner):
    """What a failed call must leave as it was: each sequence's plan, prefill state and pages per layer (as a set:
    a layer that stores nothing yet may get its pages back in another order), the pages in use and the programs
    each plan holds."""
    cache = runner.cache
    return ({s: (runner.plan(s), runner._requests[s].prefilled, cache.length(s, 0)) for s in runner.sequences},
            {s: [(len(cache.page_table(s, i)), sorted(cache.page_table(s, i).flatten().tolist()))
                 for i in range(LAYERS)] for s in runner.sequences},
            cache.pages_in_use, {fp: held.holders for fp, held in runner.programs._plans.items()})


def still_serves(runner, seq_ids, embeds, mask, model):
    """After a refused call, the same call with good plans gives what a fresh runner gives."""
    logits = runner.prefill(seq_ids, embeds, mask, planner=lambda h: GOOD, plan_after=2)
    fresh, fresh_ids, fresh_embeds, _ = admitted(model)
    assert torch.equal(logits, fresh.prefill(fresh_ids, fresh_embeds, mask, planner=lambda h: GOOD, plan_after=2))
    assert [runner.plan(s) for s in seq_ids] == GOOD


def other_shape_plan():
    return ExecutionPlan.full(ModelShape(HIDDEN, LAYERS, HEADS, HEADS, HEAD_DIM, NEURONS, VOCAB))


# A bad plan in one row, and the error that names it.
BAD_ROWS = {
    "a-string": (lambda: "L 0.5", r"the planner's plan for row {k} must be an ExecutionPlan, got str"),
    "another-shape": (other_shape_plan, r"plan is for ModelShape.*num_kv_heads=8"),
    "changes-the-prefix": (lambda: ExecutionPlan(SHAPE, [[0]] + [range(8)] * 3, [range(100)] * 4),
                           r"the plan of row {k} changes layers \[0\], which ran before the planner"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ROWS))
@pytest.mark.parametrize("k", range(ROWS))
def test_a_planner_bad_for_row_k_sets_no_plan(model, k, bad):
    runner, seq_ids, embeds, mask = admitted(model)
    before = runner_state(runner)
    make, match = BAD_ROWS[bad]
    plans = GOOD[:k] + [make()] + GOOD[k + 1:]
    with pytest.raises(ValueError, match=match.format(k=k)):
        runner.prefill(seq_ids, embeds, mask, planner=lambda h: plans, plan_after=2)
    assert runner_state(runner) == before
    still_serves(runner, seq_ids, embeds, mask, model)


@pytest.mark.parametrize("k", range(ROWS))
def test_setting_row_k_failing_sets_the_earlier_rows_back(model, k, monkeypatch):
    # Row k's pages are not free when its plan is set: the rows set before it go back to the plan they had.
    runner, seq_ids, embeds, mask = admitted(model)
    before = runner_state(runner)
    real, calls = runner.cache.set_plan, []

    def set_plan(seq_id, plan):
        calls.append(seq_id)
        if len(calls) == k + 1:
            raise ValueError(f"KV pool exhausted: the new plan of sequence {seq_id!r} needs 8 more pages")
        return real(seq_id, plan)

    monkeypatch.setattr(runner.cache, "set_plan", set_plan)
    with pytest.raises(ValueError, match=f"the new plan of sequence 'r{k}'"):
        runner.prefill(seq_ids, embeds, mask, planner=lambda h: GOOD, plan_after=2)
    assert runner_state(runner) == before
    monkeypatch.setattr(runner.cache, "set_plan", real)
    still_serves(runner, seq_ids, embeds, mask, model)


def test_a_layer_failing_after_the_planner_sets_the_plans_back(model, monkeypatch):
    runner, seq_ids, embeds, mask = admitted(model)
    before = runner_state(runner)
    real = runner._prefill_layers

    def fails_after_planning(h, start, stop, *args):
        if start == 2:
            raise RuntimeError("out of memory")
        return real(h, start, stop, *args)

    monkeypatch.setattr(runner, "_prefill_layers", fails_after_planning)
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.prefill(seq_ids, embeds, mask, planner=lambda h: GOOD, plan_after=2)
    assert runner_state(runner) == before


@pytest.mark.parametrize("returned, error, match", [
    ("LHL", TypeError, r"the planner must return a sequence of 3 ExecutionPlans, one per row, got str"),
    (None, TypeError, r"the planner must return a sequence of 3 ExecutionPlans, one per row, got NoneType"),
    (PLAN_L, TypeError, r"the planner must return a sequence of 3 ExecutionPlans, one per row, got ExecutionPlan"),
    ({0: PLAN_L}, TypeError, r"got dict"),
    ([PLAN_L] * 2, ValueError, r"the planner must return one plan per row \(3\), got 2"),
], ids=["string", "none", "one-plan", "dict", "too-few"])
def test_a_planner_return_that_is_not_one_plan_per_row_is_named(model, returned, error, match):
    runner, seq_ids, embeds, mask = admitted(model)
    before = runner_state(runner)
    with pytest.raises(error, match=match):
        runner.prefill(seq_ids, embeds, mask, planner=lambda h: returned, plan_after=2)
    assert runner_state(runner) == before


def test_a_planner_that_cannot_be_called_is_refused_before_any_layer_runs(model, monkeypatch):
    runner, seq_ids, embeds, mask = admitted(model)
    ran = []
    monkeypatch.setattr(runner, "_prefill_layers", lambda *args: ran.append(args))
    for call in (lambda: runner.prefill(seq_ids, embeds, mask, planner="scheduler", plan_after=2),
                 lambda: runner.forward(embeds, mask, planner=[PLAN_L] * 3, plan_after=2)):
        with pytest.raises(TypeError, match=r"planner must be callable, got (str|list)"):
            call()
    assert not ran


@pytest.mark.parametrize("k", range(ROWS))
def test_forward_with_a_planner_bad_for_row_k_holds_no_program(model, k):
    runner = runner_for(model, "torch", torch.device("cpu"))
    ids, mask = prompts(batch=ROWS)
    embeds = runner.weights.embed[ids]
    before = runner_state(runner)
    plans = GOOD[:k] + [other_shape_plan()] + GOOD[k + 1:]
    with pytest.raises(ValueError, match="plan is for ModelShape"):
        runner.forward(embeds, mask, planner=lambda h: plans, plan_after=2)
    assert runner_state(runner) == before
    with pytest.raises(TypeError, match=r"plans must hold a sequence of 3 ExecutionPlans, one per row, got str"):
        runner.forward(embeds, mask, "LHL")
    assert runner_state(runner) == before


# --- a running batch: rows join and leave between steps ------------------------------------------

def equal_new(plan):
    """A plan equal to ``plan`` but another object (as a scheduler makes one per request)."""
    return ExecutionPlan(plan.shape, [list(h) for h in plan.heads], [list(n) for n in plan.neurons])


def distinct_h_plans(count, seed=0):
    """``count`` distinct -H plans: the prefix layers whole, then random heads and neurons (some of each)."""
    g = torch.Generator().manual_seed(seed)
    plans = []
    while len(plans) < count:
        heads, neurons = [range(HEADS)] * 2, [range(NEURONS)] * 2
        for _ in range(LAYERS - 2):
            heads.append(sorted(torch.randperm(HEADS, generator=g)[:int(torch.randint(1, HEADS, (1,), generator=g))].tolist()))
            neurons.append(sorted(torch.randperm(NEURONS, generator=g)[:int(torch.randint(1, NEURONS, (1,), generator=g))].tolist()))
        plan = ExecutionPlan(SHAPE, heads, neurons)
        if all(plan.fingerprint != p.fingerprint for p in plans):
            plans.append(plan)
    return plans


# Backends and graphs of a running batch: eager on each backend, and through the graph stand-in on the CPU
# (real CUDA graphs on a GPU).
STREAM_PATHS = [pytest.param("torch", False, id="torch"), pytest.param("triton", False, id="triton"),
                pytest.param("torch", True, id="torch-graphs"), pytest.param("triton", True, id="triton-graphs")]


def stream_runner(model, backend, graphs, **kwargs):
    device = DEVICE if backend == "triton" else torch.device("cpu")
    runner = runner_for(model, backend, device, cuda_graphs=graphs, num_pages=kwargs.pop("num_pages", 400), **kwargs)
    if graphs and device.type == "cpu":
        runner.graphs, runner.prepare_graphs = RecordingGraphs(16), RecordingGraphs(16)
    return runner, device


def admit_and_prefill(runner, name, plan, ids, max_tokens):
    """Admit and prefill one request; its first generated token ``[1]`` and the prefill's last logits."""
    device = runner.weights.device
    runner.admit(name, plan, max_tokens)
    logits = runner.prefill([name], runner.weights.embed[ids[None].to(device)])[0, -1]
    return logits.argmax(-1).view(1), logits.cpu()


def decode_alone(model, backend, plan, ids, steps):
    """The tokens and logits ``[steps, vocab]`` of one request decoded alone, eagerly: made once per model,
    backend, plan, prompt and length in a worker (a stream's eager and graphed runs check against the same)."""
    key = (model, backend, tuple(map(tuple, plan.heads)), tuple(map(tuple, plan.neurons)), tuple(ids.tolist()), steps)
    if key not in _ALONE:
        _ALONE[key] = _decode_alone(model, backend, plan, ids, steps)
    return _ALONE[key]


_ALONE: dict = {}


def _decode_alone(model, backend, plan, ids, steps):
    runner, _ = stream_runner(model, backend, False)
    token, first = admit_and_prefill(runner, "alone", plan, ids, ids.shape[0] + steps)
    batch = runner.decode(["alone"], token)
    logits = [first]
    for _ in range(steps - 1):
        step_logits, _ = batch.step()
        logits.append(step_logits[0].cpu())
    return torch.stack(logits)


# (step, event, request): requests join (with their first token) and leave between steps.
STREAM = [(0, "join", 0), (0, "join", 1), (1, "join", 2), (2, "leave", 0), (2, "join", 3), (3, "join", 4),
          (4, "leave", 2), (4, "leave", 1), (5, "join", 5), (7, "leave", 3)]
STREAM_STEPS = 8


def stream_plans():
    return [PLAN_L, PLAN_H, PLAN_H2, ExecutionPlan.full(SHAPE), *distinct_h_plans(2, seed=3)]


def run_stream(runner, plans, ids, *, capacity=4, on_open=None):
    """Replay STREAM on one running batch; per request, its logits (the prefill's, then one per step it was a
    row of). ``on_open(batch)``: called on the empty batch first."""
    room = STREAM_STEPS + 1
    logits = {}
    batch = runner.decode(capacity=capacity, max_tokens=ids.shape[1] + room)
    if on_open is not None:
        on_open(batch)
    for step in range(STREAM_STEPS):
        for when, event, r in STREAM:
            if when != step:
                continue
            if event == "join":
                token, first = admit_and_prefill(runner, f"r{r}", plans[r], ids[r], ids.shape[1] + room)
                logits[r] = [first]
                batch.join([f"r{r}"], token)
            else:
                batch.leave([f"r{r}"])
                runner.free(f"r{r}")
        step_logits, _ = batch.step()
        for row, name in enumerate(batch.seq_ids):
            logits[int(name[1:])].append(step_logits[row].cpu())
    return {r: torch.stack(v) for r, v in logits.items()}, batch


# The Triton stream's eager and graphed runs in one pytest-xdist worker (`make test` runs `--dist loadgroup`): they
# check against the same decodes alone, made once (decode_alone), which are most of their time under the interpreter.
ALONE_GROUPED = [pytest.param(*p.values, id=p.id, marks=pytest.mark.xdist_group("triton-stream-alone"))
                 if p.values[0] == "triton" else p for p in STREAM_PATHS]


@pytest.mark.parametrize("backend, graphs", ALONE_GROUPED)
def test_rows_joining_and_leaving_mid_decode_decode_as_alone(model, backend, graphs):
    """Six requests (-L, -H, full, distinct -H plans) join and leave one running batch of capacity 4: every
    row's logits equal the transformers oracle's under its own plan, and its tokens those it gives decoded
    alone; with graphs, one capture per bucket of rows, whatever the plans."""
    runner, device = stream_runner(model, backend, graphs)
    plans = stream_plans()
    ids, _ = prompts(batch=len(plans))
    logits, batch = run_stream(runner, plans, ids)
    for r, plan in enumerate(plans):
        got = logits[r]
        assert_close(got, oracle_logits(model, ids[r], torch.ones_like(ids[r]), plan, got.shape[0]), torch.float32)
        alone = decode_alone(model, backend, plan, ids[r], got.shape[0])
        assert torch.equal(got.argmax(-1), alone.argmax(-1))
    if graphs:
        stats = runner.graph_stats() if device.type == "cuda" else runner.graphs.stats.as_dict()
        assert stats["captures"] == 2  # buckets of 2 and 4 rows
        assert stats["replays"] == STREAM_STEPS - 2


def test_a_warmed_up_batch_captures_nothing_after_and_decodes_as_alone(model):
    """warm_up() on the empty batch captures the step and the refresh of every bucket up to its capacity
    (1, 2, 4): the stream after it captures nothing, and every row still decodes as the oracle says."""
    runner, _ = stream_runner(model, "torch", True)
    plans = stream_plans()
    ids, _ = prompts(batch=len(plans))
    warm = {}

    def on_open(batch):
        with pytest.raises(ValueError, match="the batch is closed"):
            _closed(batch).warm_up()
        warm["keys"] = batch.warm_up()
        warm["captures"] = (runner.graphs.stats.captures, runner.prepare_graphs.stats.captures)
        assert batch.warm_up() == warm["keys"]  # captured already: nothing more
        assert (runner.graphs.stats.captures, runner.prepare_graphs.stats.captures) == warm["captures"]

    logits, batch = run_stream(runner, plans, ids, on_open=on_open)
    assert [key[1] for key in warm["keys"]] == [1, 2, 4] == list(batch.buckets)
    assert warm["captures"] == (3, 3)
    assert (runner.graphs.stats.captures, runner.prepare_graphs.stats.captures) == (3, 3)  # none in the stream
    for r, plan in enumerate(plans):
        assert_close(logits[r], oracle_logits(model, ids[r], torch.ones_like(ids[r]), plan, logits[r].shape[0]),
                     torch.float32)
    with pytest.raises(ValueError, match="warm_up needs an empty batch: it has 2 rows"):
        batch.warm_up()


def _closed(batch):
    """A closed batch of the same runner (warm_up refuses it)."""
    other = batch.runner.decode(capacity=1, max_tokens=4)
    other.close()
    return other


@pytest.mark.parametrize("backend, graphs", STREAM_PATHS)
def test_a_leaving_row_gives_its_positions_to_the_pool(model, backend, graphs):
    runner, _ = stream_runner(model, backend, graphs)
    ids, _ = prompts(batch=2)
    token, _ = admit_and_prefill(runner, "a", PLAN_H, ids[0], 20)
    batch = runner.decode(["a"], token)
    for _ in range(3):
        batch.step()
    assert batch.length("a") == ids.shape[1] + 3
    batch.leave(["a"])
    assert runner.cache.length("a", 0) == ids.shape[1] + 3 and batch.rows == 0
    batch.join(["a"], token)  # rejoin: it goes on from where it was
    assert batch.length("a") == ids.shape[1] + 3


def test_two_batches_never_read_each_others_outputs(model):
    # A batch's step outputs are the caller's: a step of another batch (the same bucket, so on f7c0b14 the
    # same graph and output buffers) leaves them as they were.
    runner, device = stream_runner(model, "torch", True)
    ids, _ = prompts(batch=2)
    batches = {}
    for b, name in enumerate("xy"):
        token, _ = admit_and_prefill(runner, name, [PLAN_H, PLAN_L][b], ids[b], 20)
        batches[name] = runner.decode([name], token)
    for _ in range(3):
        logits_x, tokens_x = batches["x"].step()
        kept = logits_x.clone(), tokens_x.clone()
        batches["y"].step()
        assert torch.equal(logits_x, kept[0]) and torch.equal(tokens_x, kept[1])
    out = torch.empty(1, VOCAB), torch.empty(1, dtype=torch.long)
    assert batches["x"].step(out=out) is out


def test_mixed_layer_plans_run_without_partial_layers(model):
    # A batch of -L plans that differ on a layer, on a runner with no layer prepared for partial plans: the
    # layer runs for one row and is skipped for the other (on f7c0b14 the graph path refused it).
    runner, device = stream_runner(model, "triton", True, partial_layers=[])
    plans = [PLAN_L, ExecutionPlan.full(SHAPE)]
    ids, _ = prompts(batch=2)
    tokens, firsts = zip(*(admit_and_prefill(runner, f"r{b}", plan, ids[b], 16) for b, plan in enumerate(plans)))
    batch = runner.decode(["r0", "r1"], torch.cat(tokens))
    logits = [torch.stack(firsts)]
    for _ in range(3):
        logits.append(batch.step()[0].cpu())
    logits = torch.stack(logits, 1)
    for b, plan in enumerate(plans):
        assert_close(logits[b], oracle_logits(model, ids[b], torch.ones_like(ids[b]), plan, 4), torch.float32)
    with pytest.raises(ValueError, match="plan keeps only some units of layer 2, which was not prepared for partial"):
        runner.admit("h", PLAN_H, 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_table_columns_never_name_a_live_sequence_page(model, backend):
    # Rows of different max_tokens: the narrower row's table is padded to the batch's width. On f7c0b14 the
    # eager path padded with page 0, a page of a live sequence; a NaN there reached the logits.
    runner, device = stream_runner(model, backend, False, num_pages=200)
    ids, _ = prompts(batch=3)
    admit_and_prefill(runner, "owner", PLAN_L, ids[2], 12)
    owned = pages_of(runner, "owner")
    assert 0 in owned
    runner.cache.pages[:, sorted(owned)] = float("nan")
    short, first_short = admit_and_prefill(runner, "short", PLAN_H, ids[0], 12)
    long, first_long = admit_and_prefill(runner, "long", PLAN_H2, ids[1], 40)
    batch = runner.decode(["short", "long"], torch.cat([short, long]))
    logits = [torch.stack([first_short, first_long])]
    for _ in range(2):
        logits.append(batch.step()[0].cpu())
    logits = torch.stack(logits, 1)
    for b, plan in enumerate((PLAN_H, PLAN_H2)):
        assert_close(logits[b], oracle_logits(model, ids[b], torch.ones_like(ids[b]), plan, 3), torch.float32)


def three_steps(model, graphs=False):
    """The logits of 3 decode steps of a -H and an -L row in one batch, through a new runner."""
    runner, _ = stream_runner(model, "triton", graphs)
    ids, _ = prompts(batch=2)
    tokens = [admit_and_prefill(runner, f"r{b}", plan, ids[b], 16)[0] for b, plan in enumerate((PLAN_H, PLAN_L))]
    batch = runner.decode(["r0", "r1"], torch.cat(tokens))
    return torch.stack([batch.step()[0].cpu() for _ in range(3)])


def test_a_step_is_bitwise_repeatable(model):
    # The same requests through two runners give bit-equal logits: every split reduction adds its partials
    # in a fixed order (no float atomics).
    assert torch.equal(three_steps(model), three_steps(model))


# The phased launches a decode layer may run (each an opt-in variable and its value), by the SlotLayer method that
# runs each and the flag it sets: the MLP alone, then the attention with o_proj too (a layer of three launches),
# then the whole attention block (two).
PHASED = {"mlp": ({"ADALLAVA_PHASED_MLP": "1"}, "_mlp_triton", "phased_mlp"),
          "mlp+attention": ({"ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "1"}, "_attend_o_proj",
                            "phased_attention"),
          "mlp+block": ({"ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "qkv"}, "_attention_block",
                        "phased_qkv")}


@pytest.mark.parametrize("phased", PHASED)
@pytest.mark.parametrize("graphs", [False, True] if torch.cuda.is_available() else [False],
                         ids=["eager", "graphs"][:2 if torch.cuda.is_available() else 1])
def test_a_step_with_the_phased_launches_equals_the_step_without(model, monkeypatch, graphs, phased):
    # ADALLAVA_PHASED_MLP=1, ADALLAVA_PHASED_ATTENTION=1 or qkv: launches of a decode layer as phases of one, the
    # same tiles and programs (bit-equal under the interpreter, whose configs are theirs; on a GPU the phased
    # kernels' configs are their own).
    from adallava_kernels.ops.phased_attention import PHASED_ATTENTION_ENV
    from adallava_kernels.ops.phased_mlp import PHASED_ENV

    switches, method, flag = PHASED[phased]
    assert set(switches) <= {PHASED_ENV, PHASED_ATTENTION_ENV}
    for name in (PHASED_ENV, PHASED_ATTENTION_ENV):
        monkeypatch.delenv(name, raising=False)
    without = three_steps(model, graphs)
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    launched = []
    real = getattr(SlotLayer, method)

    def recording(self, *args):
        launched.append(getattr(self, flag))
        return real(self, *args)

    monkeypatch.setattr(SlotLayer, method, recording)
    with_phases = three_steps(model, graphs)
    assert launched and all(launched)
    if DEVICE.type == "cpu":
        assert torch.equal(with_phases, without)
    assert_close(with_phases, without, torch.float32)


def test_an_unknown_phased_attention_mode_is_refused(monkeypatch):
    from adallava_kernels.ops.phased_attention import PHASED_ATTENTION_ENV, phased_attention_mode

    for value, mode in (("", None), ("0", None), ("1", "o_proj"), ("qkv", "qkv")):
        monkeypatch.setenv(PHASED_ATTENTION_ENV, value)
        assert phased_attention_mode() == mode
    monkeypatch.setenv(PHASED_ATTENTION_ENV, "2")
    with pytest.raises(ValueError, match=r"ADALLAVA_PHASED_ATTENTION must be 0, 1 .* or qkv .*, got '2'"):
        phased_attention_mode()


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a GPU of compute capability 9.0+")
@pytest.mark.parametrize("phased", [None, "mlp+attention", "mlp+block"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_step_with_pdl_equals_the_step_without(model, monkeypatch, graphs, phased):
    # ADALLAVA_PDL=1 changes when a kernel's programs start (and adds L2 prefetches before they wait), never
    # what they compute: bit-equal logits, eager and replayed; so with the phased launches (whose tickets are
    # taken after the wait).
    for name, value in (PHASED[phased][0] if phased else {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(PDL_ENV, raising=False)
    without = three_steps(model, graphs)
    monkeypatch.setenv(PDL_ENV, "1")
    assert torch.equal(three_steps(model, graphs), without)


def graph_keys_trace(runner, plans, ids, events, capacity, seed=0):
    """Random joins and leaves on one running batch (``events`` of them, a step after each): each request
    decodes a few steps, then leaves. Returns the graph captures after each event."""
    g = torch.Generator().manual_seed(seed)
    batch = runner.decode(capacity=capacity, max_tokens=ids.shape[1] + 8)
    admitted, captures, count = {}, [], 0
    for _ in range(events):
        join = batch.rows == 0 or (batch.rows < capacity and torch.rand(1, generator=g).item() < 0.55)
        if join:
            name, count = f"q{count}", count + 1
            token, _ = admit_and_prefill(runner, name, plans[count % len(plans)], ids[count % ids.shape[0]],
                                         ids.shape[1] + 8)
            batch.join([name], token)
            admitted[name] = 0
        else:
            name = batch.seq_ids[int(torch.randint(batch.rows, (1,), generator=g))]
            batch.leave([name])
            runner.free(name)
            del admitted[name]
        for name in [n for n, steps in admitted.items() if steps >= 6]:  # out of room: leave
            batch.leave([name])
            runner.free(name)
            del admitted[name]
        if batch.rows:
            batch.step()
            for name in admitted:
                admitted[name] += 1
        captures.append(runner.graphs.stats.captures)
    return captures, batch


def test_graph_keys_are_row_buckets_whatever_the_plans(model):
    # A stream of -L, -H and full plans through one running batch of capacity 8: the graphs are keyed by the
    # bucket of rows alone (1, 2, 4, 8), none captured once each bucket has been seen.
    runner, _ = stream_runner(model, "torch", True, num_pages=2000)
    plans = [PLAN_L, PLAN_H, PLAN_H2, ExecutionPlan.full(SHAPE), *distinct_h_plans(4, seed=1)]
    ids, _ = prompts(batch=4)
    captures, _ = graph_keys_trace(runner, plans, ids, 60, capacity=8)
    keys = runner.graph_stats()["keys"] if runner.graphs.__class__ is GraphCache else [k[1] for k in runner.graphs.keys()]
    assert sorted(keys) == [1, 2, 4, 8] and captures[-1] == 4
    assert captures[-1] == captures[len(captures) // 2]  # the second half captured nothing
    # The refresh after joins and leaves is captured by the same key and replayed after.
    prepare = runner.prepare_graphs
    assert sorted(k[1] for k in prepare.keys()) == [1, 2, 4, 8]
    assert prepare.stats.captures == 4 and prepare.stats.replays > 10


def test_bad_joins_leaves_and_steps_are_refused_and_change_nothing(model):
    runner, device = stream_runner(model, "torch", False)
    ids, _ = prompts(batch=5)
    tokens = {}
    for b, (name, plan, room) in enumerate([("a", PLAN_H, 4), ("b", PLAN_L, 4), ("c", PLAN_H2, 4), ("d", PLAN_H, 0),
                                            ("e", PLAN_L, 4)]):
        tokens[name], _ = admit_and_prefill(runner, name, plan, ids[b], ids.shape[1] + room)
    runner.admit("unprefilled", PLAN_L, 20)
    batch = runner.decode(["a", "b"], torch.cat([tokens["a"], tokens["b"]]), capacity=2, max_tokens=16)
    other = runner.decode(["c"], tokens["c"], capacity=4, max_tokens=16)
    batch.step()
    slots = batch.slots

    def snapshot():
        buffers = (slots.own_heads, slots.own_neurons, slots.model_tables, slots.state, slots.tokens, slots.live,
                   runner.cache.pages)
        return [t.clone() for t in buffers], list(batch.seq_ids), list(other.seq_ids), runner.cache.pages_in_use

    def unchanged(before, after):
        return all(torch.equal(x, y) for x, y in zip(before[0], after[0])) and before[1:] == after[1:]

    before = snapshot()
    refused = [
        (lambda: batch.join(["zzz"], tokens["a"]), "sequence 'zzz' is not admitted"),
        (lambda: batch.join(["unprefilled"], tokens["a"]), "sequence 'unprefilled' has not run its prefill"),
        (lambda: batch.join(["a"], tokens["a"]), "sequence 'a' is already a row of this batch"),
        (lambda: batch.join(["c"], tokens["c"]), "sequence 'c' is already a row of another decode batch"),
        (lambda: batch.join(["e", "e"], None), "seq_ids must not repeat a sequence"),
        (lambda: batch.join(["e"], tokens["e"]), r"the batch is full: 2 rows of 2, 1 joining"),
        (lambda: other.join(["d"], tokens["d"]), "sequence 'd' is full: 9 positions stored of the 9 reserved"),
        (lambda: other.join(["e", "d"], torch.cat([tokens["e"], tokens["d"]])), "sequence 'd' is full"),
        (lambda: other.join(["e"], tokens["e"].int()), "tokens must have dtype"),
        (lambda: other.join(["e"], torch.cat([tokens["e"]] * 2)), r"tokens must have one entry per row \(1\), got 2"),
        (lambda: batch.leave(["c"]), "sequence 'c' is not a row of this batch"),
        (lambda: batch.leave(["a", "a"]), "seq_ids must not repeat a sequence"),
        (lambda: batch.leave(["a", "zzz"]), "sequence 'zzz' is not a row of this batch"),
        (lambda: batch.step(tokens["a"]), r"tokens must have one entry per row \(2\), got 1"),
        (lambda: batch.step(torch.zeros(2, dtype=torch.int32)), "tokens must have dtype"),
        (lambda: batch.step(torch.zeros(2, 1, dtype=torch.long)), "tokens must be"),
        (lambda: batch.step(out=(torch.empty(2, VOCAB), torch.empty(2))), r"out\[1\] must be a torch.int64 tensor"),
    ]
    for call, match in refused:
        with pytest.raises(ValueError, match=match):
            call()
        assert unchanged(before, snapshot()), match
    for _ in range(3):
        batch.step()  # a and b now hold 9 + 4 positions: full
    with pytest.raises(ValueError, match="sequence 'a' is full: 13 positions stored of the 13 reserved by admit"):
        batch.step()
    batch.close()
    with pytest.raises(ValueError, match="the batch is closed"):
        batch.step()
    empty = runner.decode(capacity=4, max_tokens=8)
    with pytest.raises(ValueError, match="the batch has no rows"):
        empty.step()
    with pytest.raises(ValueError, match="sequence 'e' reserves 4 pages per KV head, more than the batch's tables"):
        empty.join(["e"], tokens["e"])
    with pytest.raises(ValueError, match=r"decode\(\) with no sequences needs max_tokens"):
        runner.decode()
    tokenless = runner.decode(["e"])
    with pytest.raises(ValueError, match="sequence 'e' joined without a token: pass tokens"):
        tokenless.step()
    tokenless.step(tokens["e"])
    tokenless.step()  # then its own greedy token


def pages_of(runner, name) -> set[int]:
    """Every page of the pool that sequence ``name`` holds, over its layers and KV heads."""
    return {page for layer in range(LAYERS) for head in runner.cache.page_lists(name, layer) for page in head}


def test_a_graph_outlives_the_request_that_captured_it(model):
    # Request a captures the step of a one-row batch; a leaves and is freed; b, with an equal plan built
    # anew, joins and replays a's graph beside a bystander that holds pages of its own. Every page no live
    # sequence holds is NaN while b decodes: a replay that read or wrote one shows.
    runner, device = stream_runner(model, "torch", True)
    ids, _ = prompts(batch=3)
    steps = 3
    token, _ = admit_and_prefill(runner, "a", PLAN_H, ids[0], ids.shape[1] + steps)
    batch = runner.decode(["a"], token, max_tokens=16)
    for _ in range(steps - 1):
        batch.step()
    batch.leave(["a"])
    runner.free("a")
    gc.collect()
    admit_and_prefill(runner, "bystander", PLAN_L, ids[2], ids.shape[1])
    pool, page_size, scratch = runner.cache.pages, runner.cache.page_size, runner.cache.scratch_page
    token, first = admit_and_prefill(runner, "b", equal_new(PLAN_H), ids[1], ids.shape[1] + steps)
    owned_by_b, bystander = pages_of(runner, "b"), pages_of(runner, "bystander")
    nobody = sorted(set(range(runner.cache.num_pages)) - owned_by_b - bystander)
    pool[:, nobody] = float("nan")
    kept_bystander = pool[:, sorted(bystander)].clone()
    kept_scratch = pool[:, scratch].clone()
    batch.join(["b"], token)
    logits = [first]
    for _ in range(steps - 1):
        logits.append(batch.step()[0][0].cpu())
    assert runner.graphs.stats.captures == 1  # b replayed a's graph
    assert_close(torch.stack(logits), oracle_logits(model, ids[1], torch.ones_like(ids[1]), PLAN_H, steps),
                 torch.float32)
    assert pool[:, nobody].isnan().all()  # no page of nobody's was written
    assert torch.equal(pool[:, sorted(bystander)], kept_bystander)
    # The scratch page takes the K/V of the units a row of the union lacks (none here: one row) and of the
    # padded rows: only at the offsets of the decode positions.
    written = {position % page_size for position in range(ids.shape[1], ids.shape[1] + steps - 1)} | {0}
    untouched = [offset for offset in range(page_size) if offset not in written]
    assert untouched and torch.equal(pool[:, scratch, untouched], kept_scratch[:, untouched])


def test_the_graph_stand_in_refuses_a_step_that_reads_host_state(model, monkeypatch):
    # The eager torch step attends the table columns the host's lengths say are filled. A graph would
    # freeze that number at capture and read too few columns once the context crosses a page: the
    # stand-in refuses the replay where the number would change. The prompt is 9 positions in pages of
    # 4: steps at lengths 9 (captured), 10 and 11 (replayed) see 3 pages, the one at 12 would see 4.
    forward = DecodeBatch.forward_step
    monkeypatch.setattr(DecodeBatch, "forward_step", lambda self, bucket, visible=None: forward(
        self, bucket, self._visible_pages()))
    runner, _ = stream_runner(model, "torch", True)
    token, _ = admit_and_prefill(runner, "a", PLAN_H, prompts()[0][0], 15)
    batch = runner.decode(["a"], token)
    with pytest.raises(HostValueChanged, match="a host value frozen at capture, 12, would be 16 now"):
        for _ in range(4):
            batch.step()
    assert (runner.graphs.stats.captures, runner.graphs.stats.replays) == (1, 2)


def test_steps_never_compare_or_hash_plans(model, monkeypatch):
    # Requests whose plans equal earlier ones but are other objects: joining a batch and stepping it
    # neither hashes nor compares plans (a 7B plan holds 350k indices).
    runner, device = stream_runner(model, "torch", True)
    ids, _ = prompts(batch=3)
    tokens = []
    for b, name in enumerate(("x", "y")):
        plan = equal_new(PLAN_H)
        plan.fingerprint  # made once per plan, at plan time
        tokens.append(admit_and_prefill(runner, name, plan, ids[b], ids.shape[1] + 3)[0])

    def refuse(*args):
        raise AssertionError("a plan was hashed or compared on the step path")

    with monkeypatch.context() as patch:
        patch.setattr(ExecutionPlan, "__eq__", refuse)
        patch.setattr(ExecutionPlan, "__hash__", refuse)
        batch = runner.decode(["x"], tokens[0], capacity=2)
        batch.step()
        batch.join(["y"], tokens[1])
        for _ in range(2):
            batch.step()
