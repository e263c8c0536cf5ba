"""The rows of vLLM's running batch and the spec of each: kept by a logits processor.

vLLM tells a logits processor, before every forward pass, which requests joined its
persistent batch (with their ``SamplingParams`` and prompt), which left, and which moved
(``BatchUpdate``, the public interface of custom logits processors). The batch's rows are
the requests in the order their tokens are laid out in the forward's flattened input, so
:class:`AdaLlavaPlans` keeps, per row, the request's spec (:mod:`.requests`) and prompt; the
model reads them (:func:`rows_of`). The processor changes no logits.

It also checks each request when it is added (``validate_params``), before it is scheduled:
a budget outside [0.5, 1.0] or a malformed plan is refused there.

A request's spec is set when it joins (its first prefill, or its recompute after a
preemption: the same params, so the same plan) and dropped when it leaves (finished, aborted
or preempted).
"""

from __future__ import annotations

import threading

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .requests import request_spec

__all__ = ["AdaLlavaPlans", "BatchRows", "Row", "rows_of"]

_lock = threading.Lock()
_by_instance: dict[str, "BatchRows"] = {}
# The shapes of the models loaded in this process (an engine in one process: its front end checks a plan's
# shape when the request is added; with the engine core in its own process the model checks it).
_served_shapes: set = set()


def serve_shape(shape) -> None:
    """Record that a model of ``shape`` is served in this process."""
    with _lock:
        _served_shapes.add(shape)


class Row:
    """A request in the batch: its spec, its prompt, and its plan once the model has made it (kept while
    the request is in the batch, dropped with it: a recomputed request's plan is made again)."""

    __slots__ = ("spec", "prompt", "plan")

    def __init__(self, spec, prompt: tuple) -> None:
        self.spec, self.prompt, self.plan = spec, prompt, None


class BatchRows:
    """Per row of the persistent batch, its :class:`Row`; a row absent runs the full plan."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.size = 0
        self.joins = 0  # requests added over the engine's life (a preempted request joins again)
        self._changed: set[int] = set()  # row indices the updates touched since take_changed

    def apply(self, update: BatchUpdate) -> None:
        for index in update.removed:
            self.rows.pop(index, None)
            self._changed.add(index)
        for index, params, prompt, _ in update.added:
            # Checked at admission (validate_params); the model parses the plan once, at the row's first step.
            self.rows[index] = Row(request_spec(params.extra_args, parse_plan=False), tuple(prompt or ()))
            self.joins += 1
            self._changed.add(index)
        for a, b, direction in update.moved:
            self._changed.update((a, b))
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb
        self.size = update.batch_size

    def row(self, index: int) -> Row | None:
        return self.rows.get(index)

    def take_changed(self) -> set[int]:
        """The row indices that joins, leaves and moves touched since the last call (then forgotten): what
        a mirror of the rows must look at again, however large the batch."""
        changed, self._changed = self._changed, set()
        return changed


def rows_of(vllm_config) -> BatchRows | None:
    """The batch rows of the engine of ``vllm_config`` (``None`` until its processor is built)."""
    with _lock:
        return _by_instance.get(getattr(vllm_config, "instance_id", ""))


class AdaLlavaPlans(LogitsProcessor):
    """Carries each request's AdaLLaVA spec to the model; argmax-invariant, it changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        """Refuse a request whose AdaLLaVA key is malformed (vLLM's ``VLLMValidationError``: HTTP 400 online)."""
        try:
            spec = request_spec(sampling_params.extra_args)
            if spec is not None and spec[0] == "plan" and _served_shapes:
                from ..plan import ExecutionPlan

                shape = ExecutionPlan.from_json(spec[1]).shape
                if shape not in _served_shapes:
                    raise ValueError(f"extra_args['adallava_plan'] is a plan for {shape}, which this engine "
                                     "does not serve")
        except ValueError as error:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(error)) from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.batch = BatchRows()
        with _lock:
            _by_instance[getattr(vllm_config, "instance_id", "")] = self.batch

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.batch.apply(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
