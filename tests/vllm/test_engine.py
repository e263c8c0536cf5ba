"""vLLM generates, for every request, the plan runtime's greedy tokens for that request alone."""

import re

import pytest
import torch

from _engine import VOCAB, engine, reference_tokens, shape

from adallava_kernels import ExecutionPlan, ModelShape
from adallava_kernels.vllm import BUDGET_KEY, PLAN_KEY
from adallava_kernels.vllm import model as vllm_model
from adallava_kernels.vllm.rows import rows_of

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

STEPS = 12


def plans():
    """-L (layer 2 skipped), -H (some heads and neuron groups of layers 2 and 3 off), full, and none."""
    s = shape()
    layers = ExecutionPlan.from_layer_mask([1, 1, 0, 1], s)
    switches = torch.ones(s.num_layers, 2, s.num_heads, dtype=torch.bool)
    switches[2, 0, 1] = switches[2, 0, 3] = switches[3, 0, 0] = False
    switches[2, 1, 2] = switches[3, 1, :2] = False
    heads = ExecutionPlan.from_switches(switches, s)
    return [("L", layers), ("H", heads), ("budget 1.0", None), ("no extra_args", None)]


def params_for(name, plan, steps=STEPS):
    extra = {PLAN_KEY: plan.to_json()} if plan is not None else {BUDGET_KEY: 1.0} if name == "budget 1.0" else None
    return SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, extra_args=extra)


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def check_batch(llm, model, lengths, steps=STEPS):
    named = plans()
    cases = [named[i % len(named)] for i in range(len(lengths))]
    ids = prompts(lengths)
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], [params_for(n, p, steps) for n, p in cases],
                        use_tqdm=False)
    for (name, plan), prompt, out in zip(cases, ids, outs):
        expected = reference_tokens(model, prompt, plan, steps)
        assert list(out.outputs[0].token_ids) == expected, (name, len(prompt))
    # The plans change the tokens: the check would catch a plan that is not applied.
    full = [reference_tokens(model, p, None, steps) for p in ids[:2]]
    assert [list(o.outputs[0].token_ids) for o in outs[:2]] != full


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return engine(tiny_llama[0])


def test_a_mixed_batch_matches_the_runtime_request_by_request(llm, tiny_llama):
    check_batch(llm, tiny_llama[1], [9, 17, 5, 12, 30, 3, 21, 8])


def test_a_batch_of_partial_plans_runs_the_union_of_their_units(llm, tiny_llama):
    # An -L and an -H request alone: layer 2's attention runs the -H plan's heads only (q/k/v, o_proj and the
    # MLP gathered over the union), not every head masked.
    check_batch(llm, tiny_llama[1], [9, 5])


def test_a_budget_outside_the_range_is_refused_before_it_runs_and_the_others_go_on(llm, tiny_llama):
    engine_ = llm.llm_engine
    ids = prompts([11, 6, 14])
    named = plans()
    for i, prompt in enumerate(ids):
        engine_.add_request(f"ok-{i}", {"prompt_token_ids": prompt}, params_for(*named[i]))
    for bad in (0.4, 1.5, "0.7"):
        with pytest.raises(VLLMValidationError, match=re.escape(f"['{BUDGET_KEY}'] must be a latency budget in [0.5, 1.0], got {bad!r}")):
            engine_.add_request(f"bad-{bad}", {"prompt_token_ids": ids[0]},
                                SamplingParams(max_tokens=4, extra_args={BUDGET_KEY: bad}))
    with pytest.raises(VLLMValidationError, match=PLAN_KEY):
        engine_.add_request("bad-plan", {"prompt_token_ids": ids[0]},
                            SamplingParams(max_tokens=4, extra_args={PLAN_KEY: "{not json"}))
    other = ExecutionPlan.full(ModelShape(64, 2, 2, 2, 32, 96, VOCAB))
    with pytest.raises(VLLMValidationError, match="does not serve"):
        engine_.add_request("other-shape", {"prompt_token_ids": ids[0]},
                            SamplingParams(max_tokens=4, extra_args={PLAN_KEY: other.to_json()}))
    outputs = {}
    while engine_.has_unfinished_requests():
        for out in engine_.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    assert sorted(outputs) == ["ok-0", "ok-1", "ok-2"]
    for i, prompt in enumerate(ids):
        assert outputs[f"ok-{i}"] == reference_tokens(tiny_llama[1], prompt, named[i][1], STEPS)


def test_the_library_kernels_serve_the_union_layers(tiny_llama, monkeypatch):
    # The gathered Triton kernels (Triton's interpreter on a CPU) instead of PyTorch ops.
    monkeypatch.setenv("ADALLAVA_VLLM_BACKEND", "triton")
    llm = engine(tiny_llama[0])
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert model.backend == "triton"
    ops, calls = vllm_model._ops(), []

    class Counted:  # the library's ops, each call recorded: the union layers must reach them
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setattr(vllm_model, "_ops", Counted)
    check_batch(llm, tiny_llama[1], [9, 5], steps=4)
    assert {"row_gathered_linear", "swiglu_gathered", "col_gathered_linear"} <= set(calls)


def test_chunked_prefill_matches_the_runtime(tiny_llama):
    # 16 tokens a step: the long prompts are prefilled in chunks, next to other requests' decode tokens.
    llm = engine(tiny_llama[0], enable_chunked_prefill=True,
                 max_num_batched_tokens=16, max_num_seqs=4)
    check_batch(llm, tiny_llama[1], [40, 9, 33, 5, 47, 21])


def test_preempted_requests_are_recomputed_under_the_same_plans(tiny_llama):
    # A KV cache of a few pages: running requests are preempted and recomputed.
    llm = engine(tiny_llama[0], kv_cache_memory_bytes=300 << 10, max_model_len=96, block_size=32)
    lengths = [30, 25, 34, 28, 31, 27, 33, 26]
    check_batch(llm, tiny_llama[1], lengths, steps=40)
    batch = rows_of(llm.llm_engine.vllm_config)
    assert batch.joins > len(lengths), "no request was preempted"


def test_prefix_caching_is_refused_with_the_setting_named(tiny_llama):
    with pytest.raises(Exception, match=r"enable_prefix_caching=False"):
        engine(tiny_llama[0], enable_prefix_caching=True)


def test_one_long_prompt_under_three_plans_in_turn_gets_each_plans_tokens(tiny_llama):
    # A prompt of several 32-token blocks, run again under each plan once the last has finished: the blocks
    # one plan left behind must not serve another (the case prefix caching gets wrong).
    llm = engine(tiny_llama[0], block_size=32)
    prompt = prompts([120])[0]
    for name, plan in plans()[:2] + plans()[3:]:
        out = llm.generate([{"prompt_token_ids": prompt}], [params_for(name, plan, 8)], use_tqdm=False)
        assert list(out[0].outputs[0].token_ids) == reference_tokens(tiny_llama[1], prompt, plan, 8), name


@pytest.mark.parametrize("prefix, graphs, parallel, refused", [
    (False, "NONE", {}, None), (True, "NONE", {}, "enable_prefix_caching=False"),
    (False, "FULL", {}, "enforce_eager=True"), (False, "FULL_DECODE_ONLY", {}, "enforce_eager=True"),
    (False, "NONE", {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 4}, None),
    (False, "NONE", {"tensor_parallel_size": 2}, "tensor_parallel_size must be 1, got 2"),
    (False, "NONE", {"pipeline_parallel_size": 2}, "pipeline_parallel_size must be 1, got 2"),
    (False, "NONE", {"decode_context_parallel_size": 2}, "decode_context_parallel_size must be 1, got 2"),
    (False, "NONE", {"prefill_context_parallel_size": 2}, "prefill_context_parallel_size must be 1, got 2")])
def test_engine_settings_that_would_replay_another_plan_or_split_the_model_are_refused(prefix, graphs, parallel,
                                                                                          refused):
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    from adallava_kernels.vllm.model import check_engine_config

    config = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=prefix),
                             compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[graphs]),
                             parallel_config=SimpleNamespace(**parallel))
    if refused is None:
        check_engine_config(config)
    else:
        with pytest.raises(ValueError, match=re.escape(refused)):
            check_engine_config(config)
