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
from adallava_kernels.ops.triton_utils import DECODE_MAX_TOKENS
from adallava_kernels.runtime import DecodeBatch, GraphCache, PlannedDecoder
from adallava_kernels.runtime.binding import SKIP
from adallava_kernels.runtime.layers import BoundLayer, LayerProgram
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
@pytest.mark.parametrize("bind_plans", [False, True], ids=["cohorts", "bound"])
def test_runtime_equals_the_zeroed_model_with_padding(model, backend, device, plans, planner_at, bind_plans):
    # Decode by cohorts (the eager path) or with the plans bound as data (the graphs' path, run eagerly).
    runner = runner_for(model, backend, device, cuda_graphs=False, bind_plans=bind_plans)
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


def sub_blocks_run(layer) -> str:
    """What a layer program or a bound layer runs: "attention+mlp", "attention" or "mlp"."""
    if isinstance(layer, BoundLayer):
        attention, mlp = layer.attention_mode != SKIP, layer.mlp_mode != SKIP
    else:
        attention, mlp = layer.runs_attention, layer.runs_mlp
    return "+".join(name for name, runs in (("attention", attention), ("mlp", mlp)) if runs)


def per_layer(monkeypatch, mode, method, cls=LayerProgram):
    """A :class:`LayerCall` (layer index, ops, syncs, first op, kernel launches, sub-blocks run) of every
    call of ``cls.<method>`` while ``mode`` is on."""
    calls, original = [], getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        start = len(mode.ops)
        out = original(self, *args, **kwargs)
        calls.append(LayerCall(self.index, len(mode.ops) - start, mode.syncs(start), start, mode.launches(start),
                               sub_blocks_run(self)))
        return out

    monkeypatch.setattr(cls, method, wrapped)
    return calls


# The kernels one decoder layer launches, exactly (a custom op counted by the kernels it runs): any kernel
# added fails. Lower a number where a kernel goes. Keys: (stage, backend, decode path or prefill layer, what
# the layer runs); per-kernel breakdowns as measured.
LAYER_LAUNCHES = {
    # Triton (the GPU's path), a whole or a partial layer alike: rms_norm; head_proj (q, k, v with RoPE, K and
    # V to the pages); paged_decode; o_proj (col_gather; a whole layer of the cohort path: aten.mm); the
    # residual add fused with the second rms_norm; gate and up with SiLU-and-multiply (row_gather); down with
    # the residual (col_gather; a whole cohort layer: aten.addmm).
    ("decode", "triton", "cohorts", "attention+mlp"): 7,
    ("decode", "triton", "bound", "attention+mlp"): 7,
    # rms_norm, head_proj, paged_decode, o_proj (col_gather), the residual add (aten.add).
    ("decode", "triton", "cohorts", "attention"): 5,
    # rms_norm, row_gather, col_gather.
    ("decode", "triton", "cohorts", "mlp"): 3,
    # The torch backend (the CPU's reference path), unfused: two RMSNorms (pow, mean, add, rsqrt, mul, mul
    # each); the qkv matmul (mm); RoPE (roll, mul, mul, add); kv_append; the table gather (index); SDPA;
    # o_proj (mm); the residual add (add); gate_up (mm); silu, mul; down with the residual (addmm):
    # mul 7, add 4, mm 3, pow 2, mean 2, rsqrt 2, roll, kv_append, index, sdpa, silu, addmm.
    ("decode", "torch", "cohorts", "attention+mlp"): 26,
    # The same and each row's masks over every unit (o_mask, n_mask): mul 9.
    ("decode", "torch", "bound", "attention+mlp"): 28,
    # One RMSNorm, the attention as above, the residual add: mul 4, add 3, mm 2, pow, mean, rsqrt, roll,
    # kv_append, index, sdpa.
    ("decode", "torch", "cohorts", "attention"): 16,
    # One RMSNorm, gate_up (mm), silu, mul, down with the residual (addmm): mul 3, pow, mean, add, rsqrt, mm,
    # silu, addmm.
    ("decode", "torch", "cohorts", "mlp"): 10,
    # A prefill layer on Triton, whole: rms_norm, qkv (aten.mm), rope, kv_append, flash_attn, o_proj (aten.mm),
    # the residual add fused with rms_norm, gate_up (aten.mm), silu_and_mul, down with the residual
    # (aten.addmm).
    ("prefill", "triton", "whole", "attention+mlp"): 10,
    # Partial: rms_norm, head_proj, kv_append, flash_attn, o_proj (col_gather), rms_norm fused with the
    # residual add, row_gather (SwiGLU), down with the residual (col_gather).
    ("prefill", "triton", "partial", "attention+mlp"): 8,
}


@pytest.mark.parametrize("bind_plans", [False, True], ids=["cohorts", "bound"])
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("plans", [(PLAN_L, PLAN_L), (PLAN_H, PLAN_H2)], ids=["L", "H-two-plans"])
def test_decode_step_reads_nothing_back_and_launches_few_kernels_a_layer(model, backend, device, plans, bind_plans,
                                                                         monkeypatch):
    # Eager steps on every device: a replayed CUDA graph would run no layer to count (what it records is
    # the same sequence of launches).
    runner = runner_for(model, backend, device, cuda_graphs=False, bind_plans=bind_plans)
    ids, mask = prompts()
    seq_ids, _ = generate(runner, ids, mask, plans, 2, room=2)  # prefill and a step: programs built
    batch = runner.decode(seq_ids)
    token = torch.zeros(2, dtype=torch.long, device=device)
    layer_class = BoundLayer if bind_plans else LayerProgram
    with Dispatched(monkeypatch) as mode:
        calls = per_layer(monkeypatch, mode, "decode", layer_class)
        batch.step(token)
        batch.step(token)
    assert mode.syncs() == []
    runs = len(batch.layers) if bind_plans else sum(len(runs) for runs in batch.schedule.layers)
    assert len(calls) == 2 * runs  # every run of every kept layer
    path = "bound" if bind_plans else "cohorts"
    counted = [(call.index, call.runs, len(call.launches)) for call in calls]
    expected = [(call.index, call.runs, LAYER_LAUNCHES["decode", backend, path, call.runs]) for call in calls]
    assert counted == expected, [call.launches for call in calls]
    if plans == (PLAN_H, PLAN_H2) and not bind_plans:  # the cohorts of layers 2 and 3 run one sub-block
        assert {call.runs for call in calls} == {"attention+mlp", "attention", "mlp"}


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
    from adallava_kernels.runtime import layers

    widths, gather = [], layers.attend_gathered_pages

    def spy(q, pages, head_tables, mask, scale):
        widths.append((head_tables.shape[2], mask.shape[-1]))
        return gather(q, pages, head_tables, mask, scale)

    monkeypatch.setattr(layers, "attend_gathered_pages", spy)
    runner = runner_for(model, "torch", torch.device("cpu"), num_pages=2000)
    ids, mask = prompts()
    steps = 5
    _, logits = generate(runner, ids, mask, (PLAN_L, PLAN_H), steps, room=400)  # 414 positions reserved
    # Attention runs per step: layers 0 and 1 for both rows at once (the same program), 2 for the -H row,
    # 3 for the -L row. The prompt is 9 positions in pages of 4: 10, 11, 12, 13 visible -> 3, 3, 3, 4 pages.
    per_step = 4
    assert widths == [(pages, 4 * pages) for pages in (3, 3, 3, 4) for _ in range(per_step)]
    for b, plan in enumerate((PLAN_L, PLAN_H)):
        assert_close(logits[b], oracle_logits(model, ids[b], mask[b], plan, steps), torch.float32)


# --- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("bind_plans", [False, True], ids=["cohorts", "bound"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_decode_step_traces_with_torch_compile(model, backend, device, bind_plans):
    # The traced step (one graph, no break: the Triton kernels enter as custom ops) must give the oracle's
    # logits for the token the oracle generated, not merely its own eager run's.
    plans, steps = (PLAN_H, PLAN_L), 3
    runner = runner_for(model, backend, device, cuda_graphs=False, bind_plans=bind_plans)
    ids, mask = prompts()
    seq_ids, _ = generate(runner, ids, mask, plans, steps - 1, room=1)
    expected = [oracle_logits(model, ids[b], mask[b], plan, steps) for b, plan in enumerate(plans)]
    batch = runner.decode(seq_ids)
    token = torch.stack([e[-2].argmax(-1) for e in expected]).to(device)
    lengths = batch.state[0].clone()
    torch._dynamo.reset()
    compiled = torch.compile(batch.forward_step, fullgraph=True, backend="eager")
    traced = compiled(token, batch.state, batch.views)[0]
    for b in range(len(plans)):
        assert_close(traced[b].cpu(), expected[b][-1], torch.float32)
    assert torch.equal(batch.state[0], lengths + 1)


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
    runner.free("a")
    with pytest.raises(ValueError, match="sequence 'a' was freed or joined another decode batch"):
        batch.step(token)
    assert runner.cache.sequences == ("b",)
    alone = runner.decode(["b"])
    runner.decode(["b"])
    with pytest.raises(ValueError, match="sequence 'b' was freed or joined another decode batch"):
        alone.step(token[:1])


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


# --- graph binding (on the CPU, with a stand-in for CUDA graphs) --------------------------------


@pytest.mark.parametrize("max_graphs", [1, 4])
def test_batches_share_and_hand_over_graphs_without_mixing_state(model, max_graphs):
    """Two batches with one key share a graph, a third with another key competes for a cache of one:
    each keeps its own lengths, so every token equals the eager runtime's. Real CUDA graphs and the
    Triton kernels on a GPU; on a CPU, the torch backend with the stand-in."""
    plans = {"x": PLAN_H, "y": PLAN_H, "z": PLAN_L}
    ids, _ = prompts(batch=3)
    on_gpu = DEVICE.type == "cuda"
    backend, device = ("triton", DEVICE) if on_gpu else ("torch", torch.device("cpu"))
    ids = ids.to(device)

    def run(graphs):
        runner = runner_for(model, backend, device)
        runner.graphs = graphs
        batches, tokens = {}, {}
        for name, plan in plans.items():
            runner.admit(name, plan, 20)
            row = ids[len(batches):len(batches) + 1]  # a different prompt per sequence
            logits = runner.prefill([name], runner.weights.embed[row])
            batches[name], tokens[name] = runner.decode([name]), [logits[:, -1].argmax(-1)]
        for _ in range(3):  # interleaved: x, y (same graph), z (another key), ...
            for name in plans:
                _, token = batches[name].step(tokens[name][-1])
                tokens[name].append(token.clone())
        return {name: torch.cat(t).tolist() for name, t in tokens.items()}, runner

    eager, _ = run(None)
    graphed, runner = run(GraphCache(max_graphs) if on_gpu else RecordingGraphs(max_graphs))
    assert graphed == eager
    stats = runner.graphs.stats
    # Steps x y z, three times; x and y share a key. Four graphs hold both keys: 2 captures, 7 replays.
    # One graph: each switch between the keys evicts and recaptures; only y after x replays.
    expected = (2, 7, 0) if max_graphs > 1 else (6, 3, 5)
    assert (stats.captures, stats.replays, stats.evictions) == expected


def equal_new(plan):
    """A plan equal to ``plan`` but another object (as a scheduler makes one per request)."""
    return ExecutionPlan(plan.shape, [list(h) for h in plan.heads], [list(n) for n in plan.neurons])


def graph_runner(model):
    """Real CUDA graphs and the Triton kernels on a GPU; on a CPU, the torch backend with the recording stand-in."""
    if DEVICE.type == "cuda":
        return runner_for(model, "triton", DEVICE), DEVICE
    runner = runner_for(model, "torch", torch.device("cpu"))
    runner.graphs = RecordingGraphs(4)
    return runner, torch.device("cpu")


def serve_one(runner, name, plan, ids, steps, admitted=None):
    """Admit, prefill and decode one request; its logits ``[steps, vocab]`` (a copy of each step's).
    ``admitted()`` runs once its pages are taken, before its prefill."""
    device = runner.weights.device
    runner.admit(name, plan, ids.shape[0] + steps)
    if admitted is not None:
        admitted()
    logits = runner.prefill([name], runner.weights.embed[ids[None].to(device)])[0, -1:]
    batch = runner.decode([name])
    out, token = [logits.cpu()], logits.argmax(-1)
    for _ in range(steps - 1):
        step_logits, token = batch.step(token)
        out.append(step_logits.cpu().clone())
    return batch, torch.cat(out)


def pages_of(runner, name) -> set[int]:
    """Every page of the pool that sequence ``name`` holds, over its layers and KV heads."""
    return {page for layer in range(LAYERS) for head in runner.cache.page_lists(name, layer) for page in head}


def poison_state_(tensor: torch.Tensor) -> None:
    """NaN in a float tensor, -1 in an int one (an index no kernel may follow)."""
    tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


@pytest.mark.parametrize("own_buffers", [True, False], ids=["runtime", "reading-the-batch's-buffers"])
def test_a_graph_outlives_the_request_that_captured_it(model, own_buffers, monkeypatch):
    # Request a captures the step; a is freed and collected; b, with an equal plan built anew, replays a's
    # graph beside a bystander that holds pages of its own. Everything the graph reads by address must
    # outlive a: the entry's buffers, the weights, the pool. The control case has the step read the
    # capturing batch's own plan data, which dies with it.
    if not own_buffers:
        if DEVICE.type == "cuda":
            pytest.skip("the control case reads freed memory on a GPU; the stand-in shows it on the CPU")
        forward = DecodeBatch.forward_step
        monkeypatch.setattr(DecodeBatch, "forward_step", lambda self, tokens, state, views, visible=None: forward(
            self, tokens, state, self.views, visible))
    runner, device = graph_runner(model)
    ids, _ = prompts(batch=3)
    steps = 3
    batch_a, _ = serve_one(runner, "a", PLAN_H, ids[0], steps)  # the first step is captured, the second replays
    runner.admit("bystander", PLAN_L, ids.shape[1])
    runner.prefill(["bystander"], runner.weights.embed[ids[2:3].to(device)])
    # a's own state and plan data, poisoned before they are freed: a graph that still read them (on a GPU:
    # from freed memory, until it is reused) would read NaN and -1. On the CPU the stand-in holds them
    # weakly, so such a read raises.
    for tensor in (batch_a.state, *batch_a.buffers):
        poison_state_(tensor)
    runner.free("a")
    del batch_a
    gc.collect()
    (entry,) = runner.graphs._entries.values()
    if not own_buffers:
        with pytest.raises(FreedTensorRead):
            serve_one(runner, "b", equal_new(PLAN_H), ids[1], steps)
        return
    if device.type == "cpu":
        assert entry.graph.reads and all(ref() is not None for ref in entry.graph.reads)

    # Once b holds its pages: every page no live sequence holds (a's among them) is NaN, so a replay that
    # read one shows in the logits and one that wrote one shows there; the bystander's pages are kept to
    # compare. b's own pages and the scratch page (where the torch path writes and reads the units a row
    # lacks, masked by a product, so NaN there would spread) hold random values.
    pool, page_size, scratch = runner.cache.pages, runner.cache.page_size, runner.cache.scratch_page
    poisoned_pages, kept = [], {}

    def poison_the_pool():
        owned_by_b, bystander = pages_of(runner, "b"), pages_of(runner, "bystander")
        poisoned_pages.extend(sorted(set(range(runner.cache.num_pages)) - owned_by_b - bystander))
        pool[:, poisoned_pages] = float("nan")
        pool[:, sorted(owned_by_b) + [scratch]] = torch.randn(2, len(owned_by_b) + 1, page_size, HEAD_DIM).to(pool)
        kept.update(bystander=(sorted(bystander), pool[:, sorted(bystander)].clone()),
                    b=(sorted(owned_by_b), pool[:, sorted(owned_by_b)].clone()), scratch=pool[:, scratch].clone())

    _, logits = serve_one(runner, "b", equal_new(PLAN_H), ids[1], steps, admitted=poison_the_pool)
    assert runner.graph_stats()["captures"] == 1  # b replayed a's graph
    assert_close(logits, oracle_logits(model, ids[1], torch.ones_like(ids[1]), PLAN_H, steps), torch.float32)
    assert poisoned_pages and pool[:, poisoned_pages].isnan().all()  # no page of nobody's was written
    pages, before = kept["bystander"]
    assert torch.equal(pool[:, pages], before)
    # b's positions 0 to 10 were written (the prompt by its prefill, 9 and 10 by the replays), position 11 not;
    # the scratch page only at the offsets of the decode positions (on Triton, where a single row's union is
    # its own units, not at all).
    stored = ids.shape[1] + steps - 1
    pages, before = kept["b"]
    for layer in range(LAYERS):
        for head in runner.cache.page_lists("b", layer):
            for position in range(len(head) * page_size):
                page, offset = head[position // page_size], position % page_size
                now, then = pool[:, page, offset], before[:, pages.index(page), offset]
                if position < stored:
                    assert (now != then).all() and now.isfinite().all(), (layer, position)
                else:
                    assert torch.equal(now, then), (layer, position)
    written = sorted({position % page_size for position in range(ids.shape[1], stored)})
    untouched = [offset for offset in range(page_size) if offset not in written]
    assert untouched and torch.equal(pool[:, scratch, untouched], kept["scratch"][:, untouched])


def test_the_graph_stand_in_refuses_a_step_that_reads_host_state(model, monkeypatch):
    # The eager torch step attends the table columns the host's lengths say are filled. A graph would
    # freeze that number at capture and read too few columns once the context crosses a page: the
    # stand-in refuses the replay where the number would change. The prompt is 9 positions in pages of
    # 4: steps at lengths 9 (captured), 10 and 11 (replayed) see 3 pages, the one at 12 would see all 4 of
    # the table (no column slice: other calls).
    forward = DecodeBatch.forward_step
    monkeypatch.setattr(DecodeBatch, "forward_step", lambda self, tokens, state, views, visible=None: forward(
        self, tokens, state, views, self._visible_pages()))
    runner = runner_for(model, "torch", torch.device("cpu"))
    runner.graphs = RecordingGraphs(4)
    with pytest.raises(HostValueChanged, match=r"the step would run \d+ calls, the graph replays \d+"):
        serve_one(runner, "a", PLAN_H, prompts()[0][0], 6)
    assert (runner.graphs.stats.captures, runner.graphs.stats.replays) == (1, 2)


def test_steps_never_compare_or_hash_plans(model, monkeypatch):
    # Requests whose plans equal earlier ones but are other objects: forming their batch and stepping it
    # neither hashes nor compares plans (a 7B plan holds 350k indices).
    runner, device = graph_runner(model)
    ids, _ = prompts(batch=3)
    serve_one(runner, "first", PLAN_H, ids[0], 2)
    for b, name in enumerate(("x", "y"), start=1):
        plan = equal_new(PLAN_H)
        plan.fingerprint  # made once per plan, at plan time
        runner.admit(name, plan, ids.shape[1] + 3)
        runner.prefill([name], runner.weights.embed[ids[b:b + 1].to(device)])

    def refuse(*args):
        raise AssertionError("a plan was hashed or compared on the step path")

    with monkeypatch.context() as patch:
        patch.setattr(ExecutionPlan, "__eq__", refuse)
        patch.setattr(ExecutionPlan, "__hash__", refuse)
        batch = runner.decode(["x", "y"])
        token = torch.zeros(2, dtype=torch.long, device=device)
        for _ in range(3):
            _, token = batch.step(token)


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


def slot_heads(runner, views, rows):
    """Per row, the query heads a bound step's buffers say it runs (read from its layers' slots)."""
    out = []
    for layer, slots in enumerate(views):
        if slots.o_mask is None:
            out.append([list(range(HEADS))] * rows)
            continue
        ids = slots.qkv_heads[:HEADS].tolist() if slots.qkv_heads is not None else list(range(HEADS))
        keep = slots.o_mask[:, ::HEAD_DIM].cpu()
        out.append([[ids[j] for j in range(HEADS) if keep[b, j] != 0] for b in range(rows)])
    return [[out[layer][b] for layer in range(LAYERS)] for b in range(rows)]


def test_distinct_plans_replay_one_graph_per_step_shape(model):
    """16 requests, 16 distinct -H plans, decoded one by one and in batches of 4: one capture per step
    shape (batch size, width bucket), and every later step replays a graph whose buffers hold the plans
    of the batch that steps it. Every row's logits equal the transformers oracle's under its own plan,
    and the tokens the eager bound steps'."""
    plans = distinct_h_plans(16)
    ids, _ = prompts(batch=16)
    on_gpu = DEVICE.type == "cuda"
    backend, device = ("triton", DEVICE) if on_gpu else ("torch", torch.device("cpu"))
    steps = 3

    def run(graphs):
        runner = runner_for(model, backend, device, num_pages=400, cuda_graphs=graphs is not None, bind_plans=True)
        runner.graphs = graphs
        tokens, bound, logits = [], [], {}
        groups = [[b] for b in range(8)] + [list(range(8 + 4 * k, 12 + 4 * k)) for k in range(2)]
        for group in groups:
            names = [f"r{b}" for b in group]
            for b, name in zip(group, names):
                runner.admit(name, plans[b], ids.shape[1] + steps)
                logits[b] = [runner.prefill([name], runner.weights.embed[ids[b:b + 1].to(device)])[0, -1].cpu()]
            batch = runner.decode(names)
            token = torch.stack([logits[b][0].argmax(-1) for b in group]).to(device)
            for _ in range(steps):
                step_logits, token = batch.step(token)
                tokens.append(token.cpu().clone())
                for row, b in enumerate(group):
                    logits[b].append(step_logits[row].cpu().clone())
                if graphs is not None:
                    entry = graphs._entries[batch.key]
                    assert entry.owner() is batch
                    assert all(torch.equal(mine, theirs) for mine, theirs in zip(batch.buffers, entry.buffers))
                    assert slot_heads(runner, entry.views, len(group)) == [
                        [list(plans[b].heads[layer]) for layer in range(LAYERS)] for b in group]
            bound.append(batch.key)
            for name in names:
                runner.free(name)
        return tokens, bound, logits, runner

    eager, _, eager_logits, _ = run(None)
    graphed, keys, graphed_logits, runner = run(GraphCache(4) if on_gpu else RecordingGraphs(4))
    for b, plan in enumerate(plans):
        expected = oracle_logits(model, ids[b], torch.ones_like(ids[b]), plan, steps + 1)
        assert_close(torch.stack(graphed_logits[b]), expected, torch.float32)
        assert_close(torch.stack(eager_logits[b]), expected, torch.float32)
    assert len(graphed) == len(eager) == 10 * steps and all(torch.equal(a, b) for a, b in zip(graphed, eager))
    assert len(set(keys)) == 2  # (1 row, 4 pages) and (4 rows, 4 pages): the plans are not in the key
    stats = runner.graphs.stats
    assert (stats.captures, stats.replays, stats.evictions) == (2, 10 * steps - 2, 0)


def test_step_shape_depends_on_the_layers_that_run_only(model):
    """A bound step's key: which layers run, the batch size and the table width bucket. Plans that keep
    every unit of a layer, none of its heads or none of its neurons share the key of any other plan that
    runs the same layers; a plan that skips a layer has another."""
    runner = runner_for(model, "torch", torch.device("cpu"), bind_plans=True)
    ids = prompts()[0][:1]
    every = [ExecutionPlan.full(SHAPE), PLAN_H, PLAN_H2, *distinct_h_plans(3)]
    keys = []
    for b, plan in enumerate([*every, PLAN_L]):
        name = f"k{b}"
        runner.admit(name, plan, ids.shape[1] + 4)
        runner.prefill([name], runner.weights.embed[ids])
        keys.append(runner.decode([name]).key)
        runner.free(name)
    assert len(set(keys[:-1])) == 1 and keys[-1] != keys[0]
    runner.admit("wide", PLAN_H, ids.shape[1] + 40)  # 13 pages: the 16-page bucket, not the 4-page one
    runner.prefill(["wide"], runner.weights.embed[ids])
    assert runner.decode(["wide"]).key != keys[0]


def test_a_triton_bound_step_replays_through_the_graph_stand_in(model):
    """The Triton backend's bound step, its directly launched kernels (RMSNorm) included, captured once and
    replayed for two distinct -H plans of one step shape: the tokens equal the eager bound steps' and
    the transformers oracle's. Real CUDA graphs on a GPU; on a CPU the stand-in, under the interpreter."""
    plans = distinct_h_plans(2, seed=5)
    ids, _ = prompts(batch=2)
    on_gpu = DEVICE.type == "cuda"
    steps = 3

    def run(graphs):
        runner = runner_for(model, "triton", DEVICE, cuda_graphs=graphs is not None, bind_plans=True)
        if not on_gpu:
            runner.graphs = graphs
        out = []
        for b, plan in enumerate(plans):
            _, logits = serve_one(runner, f"r{b}", plan, ids[b], steps)
            out.append(logits)
            runner.free(f"r{b}")
        return out, runner

    eager, _ = run(None)
    graphed, runner = run(GraphCache(4) if on_gpu else RecordingGraphs(4))
    stats = runner.graphs.stats
    assert (stats.captures, stats.replays) == (1, len(plans) * (steps - 1) - 1)
    for b, (mine, theirs) in enumerate(zip(graphed, eager)):
        assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
        assert_close(mine, theirs, torch.float32)
        assert_close(mine, oracle_logits(model, ids[b], torch.ones_like(ids[b]), plans[b], steps), torch.float32)
