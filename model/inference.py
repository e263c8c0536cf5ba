"""Inference through the plan runtime (:class:`~adallava_kernels.runtime.PlannedDecoder`).

A skipped layer is absent and stores no KV, an active layer computes its active units only, and
AdaLLaVA's scheduler is the prefill's planner: it reads each latency token's hidden state after the
prefix layers and plans, the one read-back of a request. Read top-down: a request is prefilled
(:func:`start_request`), then decoded one token (:func:`decode_one_token`) and n tokens
(:func:`decode_n_tokens`) at a time; :func:`generate` is the three in a row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Hashable

import torch

from adallava_kernels import ExecutionPlan, LayerSkipKVCache
from adallava_kernels.runtime import DecodeBatch, PlannedDecoder

from .outputs import AdaLlavaOutput, next_token_loss
from .prumerge import embed_inputs
from .scheduler import check_budgets, check_inputs, check_plans, insert_latency_token, plan_from_logits

__all__ = [
    "AdaGeneration",
    "AdaRequest",
    "Runtimes",
    "decode_n_tokens",
    "decode_one_token",
    "generate",
    "kernel_forward",
    "start_request",
]

BACKENDS = ("auto", "torch", "triton")
_sequence_ids = itertools.count()
# Pages of a runtime's first KV pool; a request grows an empty pool to what it needs.
_INITIAL_PAGES = 256


@dataclass
class AdaGeneration:
    """What ``generate(..., latency_budget=l)`` returns.

    ``sequences`` are the prompt's ids followed by the new tokens (the latency
    token has no id and does not appear). With ``keep_cache``, ``kv_cache``
    (the runtime's pool) still holds ``seq_ids`` (row ``b`` is ``seq_ids[b]``)
    until the caller frees them; otherwise both are empty.
    """

    sequences: torch.Tensor
    plans: list[ExecutionPlan]
    prompt_tokens: list[int]
    kv_cache: LayerSkipKVCache | None = None
    seq_ids: list[Hashable] = field(default_factory=list)


@dataclass
class AdaRequest:
    """A prefilled request (:func:`start_request`): its sequences in ``runtime`` (row ``b`` is
    ``seq_ids[b]``), the prompt's last logits, the plans chosen, and the attention mask with the
    latency token."""

    runtime: PlannedDecoder
    seq_ids: list[Hashable]
    logits: torch.Tensor
    plans: list[ExecutionPlan]
    attention_mask: torch.Tensor

    def free(self) -> None:
        """Return the sequences' pages to the runtime's pool."""
        for s in self.seq_ids:
            if s in self.runtime.sequences:
                self.runtime.free(s)


class Runtimes:
    """A model's plan runtimes, one per backend, rebuilt when the decoder's weights change (training).

    Switchable layers get the column-major copies the gathered kernels read; the prefix layers always
    run whole.
    """

    def __init__(self) -> None:
        self._by_backend: dict[str, tuple] = {}

    def get(self, model, backend: str) -> PlannedDecoder:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        cached = self._by_backend.get(backend)
        if cached is None or cached[0] != _weights_stamp(model):
            if cached is not None and cached[1].sequences:
                raise ValueError("the decoder's weights changed while sequences are admitted to its runtime")
            runner = PlannedDecoder.from_hf(
                model, num_pages=_INITIAL_PAGES, backend=backend,
                partial_layers=range(model.scheme.prefix_layers, model.config.shape.num_layers),
            )
            # Taken after the build: it made q/k/v and gate/up views of its stacked tensors, which moved them.
            cached = self._by_backend[backend] = (_weights_stamp(model), runner)
        return cached[1]


def _weights_stamp(model) -> tuple:
    """Where the decoder's projection weights lie and how often they were changed in place."""
    return tuple((w.data_ptr(), w._version) for layer in model.decoder_layers for w in (
        layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
        layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
        layer.mlp.down_proj.weight))


def scheduler_planner(model, budgets, mask2d, where):
    """The prefill callback of the runtime: the scheduler reads each latency token's hidden state after
    the prefix layers and plans (the one read-back of the request)."""

    def planner(hidden):
        logits = model.scheduler(hidden[torch.arange(hidden.shape[0], device=hidden.device), where])
        return plan_from_logits(model.scheduler, model.config, logits, budgets, mask2d)

    return planner


@torch.no_grad()
def kernel_forward(model, h, mask2d, labels, budgets, plans, where, backend, keep) -> AdaLlavaOutput:
    """A planned forward over whole sequences through the runtime, storing no KV."""
    runner = model.runtime(backend)
    planner = None if plans is not None else scheduler_planner(model, budgets, mask2d, where)
    logits, plans = runner.forward(h, mask2d, plans, planner=planner, plan_after=model.scheme.prefix_layers,
                                   logits_to_keep=keep)
    loss = None if labels is None else next_token_loss(logits, labels)
    return AdaLlavaOutput(logits=logits, loss=loss, labels=labels, plans=plans, latency_positions=where)


# -- prefill ----------------------------------------------------------------------------------


@torch.no_grad()
def start_request(model, input_ids, pixel_values=None, attention_mask=None, *, latency_budget, plan=None,
                  max_new_tokens: int = 32, backend: str = "auto") -> AdaRequest:
    """Admit the request's sequences to ``model.runtime(backend)`` for ``max_new_tokens`` new tokens,
    prefill them (the scheduler plans after the prefix layers, unless ``plan`` is given) and return an
    :class:`AdaRequest`. Its sequences stay admitted until ``request.free()``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_inputs(input_ids, pixel_values, attention_mask)
    batch = input_ids.shape[0]
    budgets = check_budgets(latency_budget, batch)
    plans = check_plans(plan, batch, model.scheme)
    runner = model.runtime(backend)
    mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if mask2d.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                         f"got {list(mask2d.shape)}")
    h = embed_inputs(model, input_ids, pixel_values)
    h, mask2d, _, where = insert_latency_token(model.latency_encoder, h, mask2d, None, budgets, mask2d.shape[1])
    # Every position but the last new token's is stored: it is never fed back.
    total = mask2d.shape[1] + max_new_tokens - 1
    pages = runner.cache.num_pages
    seq_ids = _admit(runner, plans, batch, total)
    try:
        planner = None if plans is not None else scheduler_planner(model, budgets, mask2d, where)
        logits = runner.prefill(seq_ids, h, mask2d, planner=planner, plan_after=model.scheme.prefix_layers)
    except Exception:
        for s in seq_ids:
            runner.free(s)
        _shrink_back(runner, pages)
        raise
    return AdaRequest(runner, seq_ids, logits, [runner.plan(s) for s in seq_ids], mask2d)


def _admit(runner: PlannedDecoder, plans, batch: int, total: int) -> list[Hashable]:
    """Admit the request's sequences (for any plan when the scheduler plans), growing an empty pool that
    is too small; a pool in use that cannot hold them refuses them (ValueError, nothing changes). If one
    row's admission fails, the rows admitted before it are freed and a pool grown for them shrinks back
    (as :func:`start_request` does when the prefill fails)."""
    row_plans = plans if plans is not None else [None] * batch
    needed = sum(runner.pages_for(p, total) for p in row_plans)
    pages = runner.cache.num_pages
    if not runner.sequences and needed > pages:
        runner.resize_pool(max(needed, 2 * pages))
    run = next(_sequence_ids)
    seq_ids = [("adallava", run, b) for b in range(batch)]
    admitted = []
    try:
        for s, p in zip(seq_ids, row_plans):
            runner.admit(s, p, total)
            admitted.append(s)
    except Exception:
        for s in admitted:
            runner.free(s)
        _shrink_back(runner, pages)
        raise
    return seq_ids


def _shrink_back(runner: PlannedDecoder, pages: int) -> None:
    """A pool grown for a request that then failed, empty again: back to its ``pages``."""
    if runner.cache.num_pages != pages and not runner.sequences:
        runner.resize_pool(pages)


# -- decode ----------------------------------------------------------------------------------


def decode_one_token(steps: DecodeBatch, token: torch.Tensor, done: torch.Tensor | None, pad) -> torch.Tensor:
    """The greedy next token of every row; a finished row (``done``) repeats the pad token."""
    _, token = steps.step(token)
    return token if done is None else torch.where(done, pad, token)


def decode_n_tokens(runner, seq_ids, logits, max_new_tokens, eos_token_id, check_every, pad):
    """Greedy steps over the runtime from the prompt's last ``logits``. Returns the new tokens
    ``[batch, max_new_tokens]`` and, on the device, how many of them to keep: up to the step where
    every row had finished, as transformers stops. Reads back only whether every row has finished,
    once every ``check_every`` steps."""
    token = logits.argmax(-1)
    out = token.new_full((token.shape[0], max_new_tokens), 0 if pad is None else pad)
    out[:, 0] = token
    finished = torch.full((), max_new_tokens, dtype=torch.long, device=token.device)
    done = torch.zeros_like(token, dtype=torch.bool)
    steps = runner.decode(seq_ids) if max_new_tokens > 1 else None
    for step in range(1, max_new_tokens):
        if eos_token_id is not None:
            done |= token == eos_token_id
            finished = torch.where(done.all() & (finished == max_new_tokens), step, finished)
            if step % check_every == 0 and bool(done.all()):
                break
        token = decode_one_token(steps, token, done if eos_token_id is not None else None, pad)
        out[:, step] = token
    if steps is not None:
        steps.close()
    return out, finished


@torch.no_grad()
def generate(model, input_ids, pixel_values, attention_mask, *, latency_budget, plan, max_new_tokens: int,
             eos_token_id: int | None, backend: str, keep_cache: bool, eos_check_every: int) -> AdaGeneration:
    """Prefill, then greedy decoding of ``max_new_tokens`` under the request's plans (see
    ``AdaLlavaForConditionalGeneration.generate``)."""
    for name, value in (("max_new_tokens", max_new_tokens), ("eos_check_every", eos_check_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    request = start_request(model, input_ids, pixel_values, attention_mask, latency_budget=latency_budget,
                            plan=plan, max_new_tokens=max_new_tokens, backend=backend)
    runner, seq_ids = request.runtime, request.seq_ids
    pad = model.config.text_config.pad_token_id
    pad = eos_token_id if pad is None else pad
    try:
        new_tokens, finished = decode_n_tokens(runner, seq_ids, request.logits[:, -1], max_new_tokens,
                                               eos_token_id, eos_check_every, pad)
        # The request's last read-back: where every row had finished, and the prompts' lengths.
        counts = torch.cat([finished.view(1), request.attention_mask.sum(-1)]).tolist()
    finally:
        if not keep_cache:
            request.free()
    return AdaGeneration(
        sequences=torch.cat([input_ids, new_tokens[:, :counts[0]]], dim=1), plans=request.plans,
        prompt_tokens=[int(n) for n in counts[1:]], kv_cache=runner.cache if keep_cache else None,
        seq_ids=seq_ids if keep_cache else [],
    )
