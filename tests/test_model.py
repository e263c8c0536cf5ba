"""AdaLLaVA on transformers: equivalence with Llava, masked reference, kernels, budgets, training, generate."""

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adallava_kernels import ExecutionPlan, cost
from adallava_kernels.budget import flops_budget, layer_flops
from adallava_kernels.testing import assert_close
from model import IGNORE_INDEX, AdaLlavaForConditionalGeneration, fit_image_tokens
from model import inference
from model.baselines import deterministic_config, early_exit_plan
from model.scheduler import (
    budget_units,
    gates_from_plan,
    plan_from_switches,
    sample_head_switches,
    sample_layer_switches,
)
from model.train import build_optimizer, training_step

from _device import DEVICE
from _tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, tiny_config, tiny_inputs, tiny_model

KINDS = ["L", "H"]


def random_plan(model, seed):
    """A plan that keeps the prefix whole and random units of the rest (a skipped layer included for -L)."""
    g = torch.Generator().manual_seed(seed)
    shape, prefix = model.config.shape, model.scheme.prefix_layers
    heads = [range(shape.num_heads)] * prefix
    neurons = [range(shape.intermediate_size)] * prefix
    for layer in range(prefix, shape.num_layers):
        if model.config.switch_kind == "L":
            on = layer % 2 == 0
            heads.append(range(shape.num_heads) if on else [])
            neurons.append(range(shape.intermediate_size) if on else [])
        else:
            heads.append(sorted(torch.randperm(shape.num_heads, generator=g)[: 1 + layer].tolist()))
            neurons.append(sorted(torch.randperm(shape.intermediate_size, generator=g)[: 37 * layer].tolist()))
    return ExecutionPlan(shape, heads, neurons)


def zeroed_llava(model, plan):
    """transformers' Llava with the weights of the plan's inactive heads and neurons zeroed."""
    ref = LlavaForConditionalGeneration(model.config).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    d = model.config.shape.head_dim
    with torch.no_grad():
        for i, layer in enumerate(ref.model.language_model.layers):
            head_off = torch.ones(model.config.shape.num_heads, dtype=torch.bool)
            head_off[list(plan.heads[i])] = False
            layer.self_attn.o_proj.weight[:, head_off.repeat_interleave(d)] = 0
            neuron_off = torch.ones(model.config.shape.intermediate_size, dtype=torch.bool)
            neuron_off[list(plan.neurons[i])] = False
            layer.mlp.down_proj.weight[:, neuron_off] = 0
    return ref


# --- equivalence ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_plan_without_latency_token_equals_transformers_llava(kind):
    model = tiny_model(kind)
    ids, pixels = tiny_inputs()
    ref = LlavaForConditionalGeneration(model.config).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        dense = model(input_ids=ids, pixel_values=pixels).logits
        planned = model(input_ids=ids, pixel_values=pixels, plan=ExecutionPlan.full(model.config.shape)).logits
    assert_close(dense, expected, torch.float32)
    assert_close(planned, expected, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_equals_the_zero_multiplied_reference(kind):
    model = tiny_model(kind)
    ids, pixels = tiny_inputs()
    plan = random_plan(model, 3)
    with torch.no_grad():
        expected = zeroed_llava(model, plan)(input_ids=ids, pixel_values=pixels).logits
        masked = model(input_ids=ids, pixel_values=pixels, plan=plan).logits
        kernels = model(input_ids=ids, pixel_values=pixels, plan=plan, backend="torch").logits
    assert_close(masked, expected, torch.float32)
    assert_close(kernels, expected, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernels_match_the_masked_reference_under_the_scheduler(kind, backend):
    model = tiny_model(kind)
    ids, pixels = tiny_inputs(batch=3, text=4)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    budgets = [0.55, 0.8, 1.0]  # different plans, so the rows run their layers in separate groups
    # Both paths run where the backend does (Triton: on the GPU when there is one), so they plan alike.
    device = DEVICE if backend == "triton" else torch.device("cpu")
    model, inputs = model.to(device), dict(input_ids=ids.to(device), pixel_values=pixels.to(device),
                                           attention_mask=mask.to(device), latency_budget=budgets)
    with torch.no_grad():
        masked = model(**inputs)
        kernels = model(**inputs, backend=backend)
    assert kernels.plans == masked.plans
    assert len(set(masked.plans)) == 3
    real = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1).bool()  # the latency token is appended
    assert_close(kernels.logits.cpu()[real], masked.logits.cpu()[real], torch.float32)


def test_latency_token_goes_before_the_first_answer_label():
    model = tiny_model("L")
    ids, pixels = tiny_inputs(batch=2, text=6)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -3:] = ids[0, -3:]
    labels[1, -5:] = ids[1, -5:]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, latency_budget=0.7)
    width = ids.shape[1]
    assert out.latency_positions.tolist() == [width - 3, width - 5]
    assert out.labels.shape == (2, width + 1)
    assert (out.labels[[0, 1], out.latency_positions] == IGNORE_INDEX).all()
    assert out.labels[0, -3:].tolist() == ids[0, -3:].tolist()


# --- budgets and plans ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget_cost", ["units", "flops"])
def test_plans_never_exceed_the_budget_and_leave_less_than_a_unit(kind, budget_cost):
    model = tiny_model(kind, budget_cost=budget_cost)
    scheme, shape = model.scheme, model.config.shape
    g = torch.Generator().manual_seed(5)
    tokens = 30
    mask = torch.ones(1, tokens, dtype=torch.long)
    dense_layer = layer_flops(shape, tokens, heads=shape.num_heads, kv_heads=shape.num_kv_heads,
                              neurons=shape.intermediate_size)
    unit_flops = dense_layer / scheme.units_per_layer
    # No unit adds more than one opening a layer: r heads on as many KV heads, r of the largest groups, the norms.
    r = shape.num_heads // scheme.units_per_layer
    largest_unit = layer_flops(shape, tokens, heads=r, kv_heads=min(r, shape.num_kv_heads),
                               neurons=r * -(-shape.intermediate_size // shape.num_heads))
    full_plan = ExecutionPlan.full(shape)
    prefix_plan = ExecutionPlan.from_layer_mask([1] * scheme.prefix_layers + [0] * scheme.switchable_layers, shape)
    for budget in (0.5 + 0.5 * torch.rand(80, generator=g)).tolist():
        logits = torch.randn(1, *model.scheduler(torch.zeros(1, shape.hidden_size)).shape[1:], generator=g)
        plan = model.plan_from_logits(logits, [budget], mask)[0]
        spent = cost.prefill_flops(shape, tokens, plan) - cost.prefill_flops(shape, tokens, prefix_plan)
        units_used = sum(len(h) for h in plan.heads[scheme.prefix_layers:]) // (
            shape.num_heads // scheme.units_per_layer)
        if budget_cost == "flops":
            allowed = flops_budget(scheme, budget, tokens)
            assert spent <= allowed + 1e-6
            assert allowed - spent < largest_unit or plan == full_plan
        else:
            assert units_used == scheme.units_for_budget(budget)
            if kind == "L":
                allowed = budget * shape.num_layers * dense_layer - scheme.prefix_layers * dense_layer
                assert spent <= allowed + 1e-6 and allowed - spent < unit_flops


def test_budget_outside_range_is_rejected():
    model = tiny_model("L")
    ids, pixels = tiny_inputs(batch=1)
    for bad in (0.49, 1.2, [0.7, 0.3]):
        with pytest.raises(ValueError, match=r"latency budget must be a number in \[0.5, 1.0\]|one per sample"):
            model(input_ids=ids, pixel_values=pixels, latency_budget=bad)
    with pytest.raises(ValueError, match="latency budget"):
        model.generate(ids, pixels, latency_budget=1.5)


def test_plan_checks():
    model = tiny_model("H")
    ids, pixels = tiny_inputs(batch=2)
    shape = model.config.shape
    no_prefix = ExecutionPlan.from_layer_mask([0, 1, 1, 1], shape)
    with pytest.raises(ValueError, match="plan must run the 2 prefix layers whole"):
        model(input_ids=ids, pixel_values=pixels, plan=no_prefix)
    with pytest.raises(ValueError, match=r"one per sample \(2\), got 3"):
        model(input_ids=ids, pixel_values=pixels, plan=[ExecutionPlan.full(shape)] * 3)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=torch.cat([ids[:, :3], ids[:, 4:]], 1), pixel_values=pixels, plan=ExecutionPlan.full(shape))
    with pytest.raises(ValueError, match="backend must be one of"):
        model(input_ids=ids, pixel_values=pixels, plan=ExecutionPlan.full(shape), backend="cuda")


@pytest.mark.parametrize("bad_id", [128, -1], ids=["past-the-vocabulary", "negative"])
def test_out_of_vocabulary_ids_are_named(bad_id):
    model = tiny_model("L")
    ids, pixels = tiny_inputs(batch=2)
    ids[1, -1] = bad_id  # the vocabulary is 128 ids; 127 is the image placeholder
    match = rf"input_ids holds token id {bad_id}, outside the vocabulary \[0, 128\)"
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, pixel_values=pixels, latency_budget=0.75)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, pixels, latency_budget=0.75, max_new_tokens=2, backend="torch")


def test_latency_encoder_depends_on_units_only():
    model = tiny_model("H")
    scheme = model.scheme  # 4 layers x 4 units: 0.70 and 0.74 buy floor(11.2) - 8 = floor(11.84) - 8 = 3 units
    assert budget_units(scheme, [0.70, 0.74, 0.8]).tolist() == [3, 3, 4]
    tokens = model.latency_encoder(torch.tensor([0.70, 0.74, 0.8]))
    assert torch.equal(tokens[0], tokens[1]) and not torch.equal(tokens[0], tokens[2])
    with pytest.raises(ValueError, match="latency budget"):
        model.latency_encoder(torch.tensor([0.2]))


# --- sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_without_noise_is_the_best_plan(kind):
    model = tiny_model(kind)
    scheme = model.scheme
    g = torch.Generator().manual_seed(7)
    for budget in (0.5, 0.6, 0.75, 0.9, 1.0):
        logits = torch.randn(1, *model.scheduler(torch.zeros(1, 64)).shape[1:], generator=g)
        units = budget_units(scheme, budget)
        if kind == "L":
            switches = sample_layer_switches(logits, units, 5.0, noise=False)
        else:
            switches = sample_head_switches(logits, units, scheme.rank, 5.0, noise=False)
        assert plan_from_switches(switches[0], scheme) == model.scheduler.best_plan(logits[0], budget)


@pytest.mark.parametrize("kind", KINDS)
def test_gumbel_rounds_spend_exactly_the_units_and_carry_gradients(kind):
    model = tiny_model(kind)
    scheme = model.scheme
    g = torch.Generator().manual_seed(8)
    budgets = [0.55, 0.7, 0.85, 1.0]
    logits = torch.randn(4, *model.scheduler(torch.zeros(1, 64)).shape[1:], generator=g, requires_grad=True)
    units = budget_units(scheme, budgets)
    if kind == "L":
        switches = sample_layer_switches(logits, units, 5.0, generator=g)
        on_units = switches.sum(-1)
    else:
        switches = sample_head_switches(logits, units, scheme.rank, 5.0, generator=g)
        on_units = switches[:, :, 0].sum((1, 2)) / scheme.rank
        assert torch.equal(switches[:, :, 0].sum(-1), switches[:, :, 1].sum(-1))  # heads and groups go together
    assert set(switches.detach().unique().tolist()) <= {0.0, 1.0}
    assert on_units.tolist() == units.float().tolist()
    (switches * torch.randn(switches.shape, generator=g)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --- training -------------------------------------------------------------------------


def training_batch(ids, pixels):
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -4:] = ids[:, -4:]
    return {"input_ids": ids, "pixel_values": pixels, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("kind, mode", [("L", "probabilistic"), ("H", "probabilistic"), ("H", "deterministic")])
def test_training_steps_reduce_the_loss_and_reach_the_scheduler(kind, mode):
    model = tiny_model(kind, scheduler_mode=mode)
    batch = training_batch(*tiny_inputs(batch=2, text=6))
    optimizer = build_optimizer(model, llm_lr=3e-3, scheduler_lr=1e-2)
    assert [group["lr"] for group in optimizer.param_groups] == [3e-3, 1e-2]
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            return float(model(**batch, latency_budget=0.75).loss)

    before = fixed_loss()
    vision = copy.deepcopy(model.model.vision_tower.state_dict())
    g = torch.Generator().manual_seed(0)
    model.train()
    out = model(**batch, latency_budget=[0.6, 0.9], generator=g)
    out.loss.backward()
    for p in model.scheduler_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    if mode == "deterministic":
        assert out.latency_penalty is not None and out.latency_penalty.requires_grad
    for _ in range(8):
        training_step(model, optimizer, batch, g)
    assert fixed_loss() < before
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision[name]), name


def test_kernel_modules_follow_trained_weights():
    model = tiny_model("H")
    ids, pixels = tiny_inputs(batch=1)
    plan = random_plan(model, 4)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, plan=plan, backend="torch")
        for layer in model.decoder_layers:
            layer.self_attn.o_proj.weight.mul_(1.5)
            layer.mlp.down_proj.weight.mul_(0.5)
        masked = model(input_ids=ids, pixel_values=pixels, plan=plan).logits
        kernels = model(input_ids=ids, pixel_values=pixels, plan=plan, backend="torch").logits
    assert_close(kernels, masked, torch.float32)


# --- generation -----------------------------------------------------------------------------


def stepwise_reference(model, ids, pixels, mask, budget, plans, steps):
    """Greedy tokens from full masked forwards, one step at a time, under fixed plans."""
    prompt = ids.shape[1]
    out = ids
    for _ in range(steps):
        step_mask = torch.cat([mask, torch.ones(ids.shape[0], out.shape[1] - prompt, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=out, pixel_values=pixels, attention_mask=step_mask, latency_budget=budget,
                           plan=plans, latency_position=prompt).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_the_stepwise_masked_reference_and_stores_only_the_plan(kind):
    model = tiny_model(kind)
    ids, pixels = tiny_inputs(batch=2, text=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    steps = 6
    gen = model.generate(ids, pixels, mask, latency_budget=[0.6, 0.85], max_new_tokens=steps, backend="torch",
                         keep_cache=True)
    with torch.no_grad():
        planned = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, latency_budget=[0.6, 0.85])
    assert gen.plans == planned.plans
    expected = stepwise_reference(model, ids, pixels, mask, [0.6, 0.85], gen.plans, steps)
    assert gen.sequences.tolist() == expected.tolist()

    cache, shape = gen.kv_cache, model.config.shape
    positions = ids.shape[1] + 1 + steps - 1  # the prompt, the latency token, every new token but the last
    for seq, plan in zip(gen.seq_ids, gen.plans):
        for layer in range(shape.num_layers):
            assert cache.kv_heads(seq, layer) == plan.kv_heads(layer)
            assert cache.length(seq, layer) == (positions if plan.kv_heads(layer) else 0)
        assert cache.sequence_bytes(seq) == cost.kv_cache_bytes(
            shape, positions, plan, kv_bytes=4, page_size=cache.page_size)
    assert gen.prompt_tokens == [ids.shape[1] - 1, ids.shape[1] + 1]


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_generate_stops_at_eos_and_reads_it_back_every_k_steps(check_every, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    model = tiny_model("H")
    ids, pixels = tiny_inputs(batch=1)
    free_run = model.generate(ids, pixels, latency_budget=0.7, max_new_tokens=8, backend="torch").sequences
    new = free_run[0, ids.shape[1]:].tolist()
    eos = new[2]
    stop = new.index(eos) + 1  # transformers stops after the first EOS
    decode = inference.decode_n_tokens

    def counted(*args, **kwargs):
        with Syncs():
            return decode(*args, **kwargs)

    monkeypatch.setattr(inference, "decode_n_tokens", counted)
    gen = model.generate(ids, pixels, latency_budget=0.7, max_new_tokens=8, eos_token_id=eos, backend="torch",
                         eos_check_every=check_every)
    assert gen.sequences[0, ids.shape[1]:].tolist() == new[:stop]
    # Decode steps read nothing back; the EOS check does, once every check_every steps until it stops.
    first_check_done = -(-stop // check_every) * check_every  # the first check after every row has finished
    assert Syncs.count == len(range(check_every, min(first_check_done, 7) + 1, check_every))
    assert model.runtime("torch").sequences == ()  # pages returned without keep_cache


def test_generate_without_budget_is_transformers_generate():
    model = tiny_model("L")
    ids, pixels = tiny_inputs(batch=1)
    ref = LlavaForConditionalGeneration(model.config).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    ours = model.generate(ids, pixels, max_new_tokens=4, do_sample=False)
    theirs = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert ours.tolist() == theirs.tolist()


def test_generate_input_checks():
    model = tiny_model("L")
    ids, pixels = tiny_inputs(batch=1)
    right_padded = torch.ones_like(ids)
    right_padded[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, pixels, right_padded, latency_budget=0.7)
    with pytest.raises(ValueError, match="greedily"):
        model.generate(ids, pixels, latency_budget=0.7, do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        model.generate(ids, pixels, latency_budget=0.7, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_check_every must be an int >= 1"):
        model.generate(ids, pixels, latency_budget=0.7, eos_check_every=0)
    with pytest.raises(ValueError, match=r"takes no \['kv_cache'\]"):
        model.generate(ids, pixels, latency_budget=0.7, kv_cache={})


def test_the_runtimes_hold_the_decoders_weights_once_and_are_kept_until_they_change():
    model = tiny_model("H")
    torch_runtime = model.runtime("torch")
    assert model.runtime("torch") is torch_runtime  # the build made the weights views: not a change
    # A second backend's runtime reads the same stacked q|k|v and gate|up.
    other = model.runtime("triton")
    for a, b in zip(torch_runtime.weights.layers, other.weights.layers):
        assert a.attention.w_qkv.data_ptr() == b.attention.w_qkv.data_ptr()
        assert a.mlp.w_gate_up.data_ptr() == b.mlp.w_gate_up.data_ptr()
    with torch.no_grad():
        model.decoder_layers[0].self_attn.q_proj.weight.mul_(2)  # a training step's in-place update
    assert model.runtime("torch") is not torch_runtime


@pytest.mark.parametrize("k", range(3))
def test_a_request_failing_at_row_k_leaves_the_runtime_as_it_was(k, monkeypatch):
    # Row k refused at admission, or its plan refused when the scheduler's plans are set mid-prefill (the
    # pool's set_plan: its pages not free).
    from adallava_kernels import LayerSkipKVCache, PlannedDecoder

    model = tiny_model("H")
    ids, pixels = tiny_inputs(batch=3)
    budgets = [0.6, 0.85, 0.7]
    runtime = model.runtime("torch")
    runtime.resize_pool(4)  # too small for the request: grown for it, and back to 4 when admission fails
    for owner, method in ((PlannedDecoder, "admit"), (LayerSkipKVCache, "set_plan")):
        real, calls = getattr(owner, method), []

        def failing(self, *args, real=real, calls=calls):
            calls.append(args[0])
            if len(calls) == k + 1:
                raise ValueError(f"row {k} refused")
            return real(self, *args)

        pages = runtime.cache.num_pages
        with monkeypatch.context() as patch:
            patch.setattr(owner, method, failing)
            with pytest.raises(ValueError, match=f"row {k} refused"):
                model.generate(ids, pixels, latency_budget=budgets, max_new_tokens=3, backend="torch")
        assert runtime.sequences == () and runtime.cache.pages_in_use == 0
        assert runtime.cache.num_pages == pages
    fresh = tiny_model("H").generate(ids, pixels, latency_budget=budgets, max_new_tokens=3, backend="torch")
    again = model.generate(ids, pixels, latency_budget=budgets, max_new_tokens=3, backend="torch")
    assert again.sequences.tolist() == fresh.sequences.tolist() and again.plans == fresh.plans


# --- baselines and PruMerge ------------------------------------------------------------


def test_early_exit_drops_the_top_layers():
    shape = tiny_config().shape
    assert early_exit_plan(shape, 0.75).layer_mask == (True, True, True, False)
    assert early_exit_plan(shape, 1.0) == ExecutionPlan.full(shape)
    with pytest.raises(ValueError, match="latency budget"):
        early_exit_plan(shape, 0.3)


def test_deterministic_scheduler_plans_from_signs():
    model = AdaLlavaForConditionalGeneration(deterministic_config(tiny_config("L"), latency_penalty=2.0)).eval()
    logits = torch.tensor([[1.0, -1.0]])
    plan = model.plan_from_logits(logits, [0.5], torch.ones(1, 5))[0]
    assert plan.layer_mask == (True, True, True, False)  # the budget is not enforced: that is the baseline's flaw
    assert model.config.latency_penalty == 2.0


def test_prumerge_composes_with_the_budget():
    model = tiny_model("L", prumerge=True, prumerge_neighbors=4)
    ids, pixels = tiny_inputs(batch=2, text=3)
    counts = [f.shape[0] for f in model.image_features(pixels)]
    assert all(1 <= c < IMAGE_TOKENS for c in counts)
    ids, mask = fit_image_tokens(ids, None, counts, IMAGE_TOKEN, pad_token_id=0)
    assert (ids == IMAGE_TOKEN).sum(1).tolist() == counts
    gen = model.generate(ids, pixels, mask, latency_budget=0.75, max_new_tokens=3, backend="torch")
    plans = gen.plans
    expected = stepwise_reference(model, ids, pixels, mask, 0.75, plans, 3)
    assert gen.sequences.tolist() == expected.tolist()


def test_gates_of_a_layer_plan_zero_skipped_layers():
    model = tiny_model("L")
    plan = ExecutionPlan.from_layer_mask([1, 1, 0, 1], model.config.shape)
    gates = gates_from_plan([plan], model.scheme, "cpu", torch.float32)
    assert set(gates) == {2, 3}
    assert gates[2][1].sum() == 0 and gates[2][2].sum() == 0 and gates[3][2].all()
