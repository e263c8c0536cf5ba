"""The batch's plans as device tables, patched row by row as vLLM's batch changes.

vLLM tells the plug-in which rows of its persistent batch joined, left or moved
(:class:`.rows.BatchRows`). :class:`BatchPlans` mirrors them on the device: per row, the slot of its
plan in a table of the distinct plans the batch holds (their head and neuron masks) and the slot of
its budget in a table of latency tokens. A join or a leave writes its own rows and, when it brings a
plan (or budget) the batch did not hold or takes the last row of one away, that plan's table row and
its units' counts: the host's work per event follows the event, not the batch. A step then takes its
tokens' plans from the row tables (a slice on a decode step; on a step with prefill chunks, one
``repeat_interleave`` by the rows' token counts), with nothing read back from the device.

Each layer's part (skip, dense, masked, or the union's units as indices on the device) depends only
on which distinct plans are live, so it is made again only when that set changes.

A row vLLM never announced (a warm-up run's) and a padding token take slot 0: their outputs are
dropped, and they add no plan to the union.
"""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np
import torch

from ..plan import ExecutionPlan
from ..shape import ModelShape
from .rows import BatchRows, Row

__all__ = ["BatchPlans", "Slots", "StepPlans"]

_EMPTY = -1  # a row index that holds no request


class Slots:
    """Distinct keys, each at a slot of a table, counted by the rows that use them; a key whose last row
    leaves frees its slot for the next new key. Slots start at ``first``."""

    def __init__(self, first: int = 0) -> None:
        self.first = first
        self.slot_of: dict[Hashable, int] = {}
        self.keys: list = []  # per slot (less first): its key, None when free
        self.users: list[int] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def capacity(self) -> int:
        """One past the highest slot ever used."""
        return self.first + len(self.keys)

    def acquire(self, key: Hashable) -> tuple[int, bool]:
        """A row takes ``key``: its slot, and whether the key is new to the table (its row must be written)."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.users[slot - self.first] += 1
            return slot, False
        if self._free:
            slot = self._free.pop()
            self.keys[slot - self.first], self.users[slot - self.first] = key, 1
        else:
            slot = self.capacity
            self.keys.append(key)
            self.users.append(1)
        self.slot_of[key] = slot
        return slot, True

    def key(self, slot: int):
        return self.keys[slot - self.first]

    def release(self, slot: int):
        """A row leaves ``slot``: its key when that was the key's last row (the slot is then free), else None."""
        i = slot - self.first
        self.users[i] -= 1
        if self.users[i]:
            return None
        key, self.keys[i] = self.keys[i], None
        del self.slot_of[key]
        self._free.append(slot)
        return key


class StepPlans:
    """A forward step's plans as data: per token, the slot of its plan (``token_plan``); per slot, the plan's
    head and neuron masks in the step's dtype (``heads`` ``[slots, layers, heads]``, ``neurons``); per layer,
    its attention and MLP parts: ``("skip", None)``, ``("dense", None)`` (every token runs it whole),
    ``("masked", None)`` (every unit is some token's: dense weights, each token's own units masked) or
    ``("union", indices)`` (int32 on the device). ``kv_heads[layer]``: the KV heads of a union attention's
    query heads (int32 on the device), None for the other kinds."""

    __slots__ = ("token_plan", "heads", "neurons", "layers", "kv_heads")

    def __init__(self, token_plan: torch.Tensor, heads: torch.Tensor, neurons: torch.Tensor, layers: list,
                 kv_heads: list) -> None:
        self.token_plan, self.heads, self.neurons, self.layers = token_plan, heads, neurons, layers
        self.kv_heads = kv_heads

    def head_mask(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """``[tokens, len(heads)]``: 1 where the token's plan keeps the head in ``layer``."""
        return self.heads[:, layer, :][:, heads][self.token_plan]

    def neuron_mask(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        return self.neurons[:, layer, :][:, neurons][self.token_plan]


class BatchPlans:
    """Per row of a :class:`.rows.BatchRows`, its plan's and budget's slots, on the host and on the device.

    ``plan_of(row)`` gives a row's plan (``row`` a :class:`.rows.Row`); ``budget_of(row)`` its budget or
    None; ``latency_token(budget)`` the budget's latency token ``[hidden]`` (None: no budget is served).
    """

    def __init__(self, shape: ModelShape, full: ExecutionPlan, plan_of: Callable[[Row], ExecutionPlan],
                 budget_of: Callable[[Row], float | None],
                 latency_token: Callable[[float], torch.Tensor] | None = None) -> None:
        self.shape, self.full = shape, full
        self.plan_of, self.budget_of, self.latency_token = plan_of, budget_of, latency_token
        self.batch: BatchRows | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None

    # -- the mirror ---------------------------------------------------------------------------------

    def _reset(self, batch: BatchRows, device: torch.device, dtype: torch.dtype) -> None:
        s = self.shape
        self.batch, self.device, self.dtype = batch, device, dtype
        self.plans, self.budgets = Slots(), Slots(first=1)  # budget slot 0: no budget
        self.row_plan = np.full(0, _EMPTY, dtype=np.int64)
        self.row_budget = np.zeros(0, dtype=np.int64)
        self.row_plan_device = torch.zeros(0, dtype=torch.long, device=device)
        self.row_budget_device = torch.zeros(0, dtype=torch.long, device=device)
        self.heads = torch.zeros(0, s.num_layers, s.num_heads, dtype=dtype, device=device)
        self.neurons = torch.zeros(0, s.num_layers, s.intermediate_size, dtype=dtype, device=device)
        self.latency_table = None  # [1 + budget slots, hidden], made with the first budget
        self.head_count = np.zeros((s.num_layers, s.num_heads), dtype=np.int32)
        self.neuron_count = np.zeros((s.num_layers, s.intermediate_size), dtype=np.int32)
        self._layers: list | None = None

    def sync(self, batch: BatchRows, device: torch.device, dtype: torch.dtype) -> None:
        """Bring the tables up to ``batch``: the rows its updates changed since the last sync (every row the
        first time, or for another device or dtype)."""
        if batch is not self.batch or device != self.device or dtype != self.dtype:
            self._reset(batch, device, dtype)
            batch.take_changed()
            changed = set(batch.rows) | set(range(batch.size))
        else:
            changed = batch.take_changed()
        if not changed:
            return
        rows = sorted(changed)
        self._fit_rows(rows[-1] + 1)
        plan_slots, budget_slots = [], []
        for index in rows:
            row = batch.row(index)
            plan = self.plan_of(row) if row is not None else None
            slot = self._move(self.plans, self.row_plan, index, plan, _EMPTY, self._add_plan,
                              lambda gone: self._count(gone, -1))
            plan_slots.append(max(slot, 0))  # an empty row's tokens read slot 0, as padding does
            budget = self.budget_of(row) if row is not None and self.latency_token is not None else None
            budget_slots.append(self._move(self.budgets, self.row_budget, index, budget, 0, self._add_budget))
        at = torch.tensor(rows, dtype=torch.long)
        self.row_plan_device[at.to(device)] = torch.tensor(plan_slots, dtype=torch.long).to(device)
        self.row_budget_device[at.to(device)] = torch.tensor(budget_slots, dtype=torch.long).to(device)

    def _fit_rows(self, rows: int) -> None:
        """Row tables at least ``rows`` long (doubling, so growing costs O(1) a row over the mirror's life)."""
        if rows <= len(self.row_plan):
            return
        size = max(rows, 2 * len(self.row_plan), 8)
        self.row_plan = np.concatenate((self.row_plan, np.full(size - len(self.row_plan), _EMPTY, dtype=np.int64)))
        self.row_budget = np.concatenate((self.row_budget, np.zeros(size - len(self.row_budget), dtype=np.int64)))
        self.row_plan_device = _grown(self.row_plan_device, size)
        self.row_budget_device = _grown(self.row_budget_device, size)

    def _move(self, slots: Slots, table: np.ndarray, index: int, key, empty: int, add, drop=None) -> int:
        """Row ``index`` now holds ``key`` (a plan or a budget; None: nothing) in ``table``: the old key let go
        (``drop`` told when that was its last row, its slot free for the next new key), the new one taken
        (``add`` told when it is new to the table). Returns the row's slot, ``empty`` for none."""
        old = int(table[index])
        if old != empty and key is not None and slots.key(old) == key:
            return old
        if old != empty:
            gone = slots.release(old)
            if gone is not None and drop is not None:
                drop(gone)
        new = empty
        if key is not None:
            new, fresh = slots.acquire(key)
            if fresh:
                add(new, key)
        table[index] = new
        return new

    def _add_plan(self, slot: int, plan: ExecutionPlan) -> None:
        if slot >= self.heads.shape[0]:
            size = max(slot + 1, 2 * self.heads.shape[0], 2)
            self.heads, self.neurons = _grown(self.heads, size), _grown(self.neurons, size)
        heads, neurons = plan.unit_masks(self.device)
        self.heads[slot] = heads
        self.neurons[slot] = neurons
        self._count(plan, +1)

    def _count(self, plan: ExecutionPlan, sign: int) -> None:
        heads, neurons = plan.unit_masks("cpu")
        self.head_count += sign * heads.numpy()
        self.neuron_count += sign * neurons.numpy()
        self._layers = None  # the live set changed: each layer's part is made again

    def _add_budget(self, slot: int, budget: float) -> None:
        token = self.latency_token(budget).to(self.device, self.dtype)
        if self.latency_table is None or slot >= self.latency_table.shape[0]:
            size = max(slot + 1, 2 * (0 if self.latency_table is None else self.latency_table.shape[0]), 2)
            self.latency_table = (torch.zeros(size, token.numel(), dtype=self.dtype, device=self.device)
                                  if self.latency_table is None else _grown(self.latency_table, size))
        self.latency_table[slot] = token

    # -- a step -------------------------------------------------------------------------------------

    @property
    def all_full(self) -> bool:
        """Every live row runs the full plan (or none is live): the step needs no plans."""
        return len(self.plans) == 0 or (len(self.plans) == 1 and self.full in self.plans.slot_of)

    def step(self, starts: np.ndarray, num_tokens: int) -> StepPlans | None:
        """The step's plans for rows starting at ``starts`` (int64, ``[rows + 1]``) in ``num_tokens`` tokens;
        None when every row runs the full plan."""
        if self.all_full:
            return None
        layers = self.layers()
        return StepPlans(self._per_token("row_plan_device", starts, num_tokens), self.heads, self.neurons, layers,
                         self._kv_heads)

    def latency_index(self, starts: np.ndarray, num_tokens: int) -> torch.Tensor | None:
        """Per token, its row's budget slot in ``latency_table`` (0: none); None when no row has a budget."""
        if not len(self.budgets):
            return None
        return self._per_token("row_budget_device", starts, num_tokens)

    def _per_token(self, table: str, starts: np.ndarray, num_tokens: int) -> torch.Tensor:
        """Each token's entry of its row in the row table ``table``; padding tokens take 0."""
        rows = len(starts) - 1
        used = int(starts[-1])
        self._fit_rows(max(num_tokens, rows))
        per_row = getattr(self, table)
        if used == rows:  # a decode step: token r is row r's (a padding token reads a row past the step's: dropped)
            return per_row[:num_tokens]
        counts = torch.from_numpy(np.diff(starts)).to(self.device)
        out = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        out[:used] = torch.repeat_interleave(per_row[:rows], counts, output_size=used)
        return out

    def layers(self) -> list:
        """Each layer's ``(attention, mlp)`` parts over the live plans (see :class:`StepPlans`)."""
        if self._layers is None:
            live = len(self.plans)
            attention = _parts(self.head_count, live, self.device)
            mlp = _parts(self.neuron_count, live, self.device)
            self._layers = list(zip(attention, mlp))
            self._kv_heads = self._union_kv_heads(attention)
        return self._layers

    def _union_kv_heads(self, attention: list) -> list:
        """Per layer of union attention, the KV heads its query heads read."""
        s = self.shape
        union = (self.head_count > 0).reshape(s.num_layers, s.num_kv_heads, s.heads_per_kv_head).any(2)
        return _kept_indices(union, [i for i, (kind, _) in enumerate(attention) if kind == "union"], self.device)


def _parts(count: np.ndarray, live: int, device: torch.device) -> list:
    """Per layer (row of ``count``, the live plans keeping each unit), its part."""
    union = count > 0
    kinds = np.where(~union.any(1), "skip", np.where((count == live).all(1), "dense",
                                                     np.where(union.all(1), "masked", "union")))
    indices = _kept_indices(union, [i for i, kind in enumerate(kinds) if kind == "union"], device)
    return [(str(kind), indices[i]) for i, kind in enumerate(kinds)]


def _kept_indices(keep: np.ndarray, layers: list[int], device: torch.device) -> list:
    """Per row of the bool ``keep`` ``[layers, units]`` named in ``layers``, its kept units' int32 indices on
    ``device`` (None for the other rows): every layer's in one copy to the device."""
    out: list = [None] * len(keep)
    if layers:
        per_layer = [np.flatnonzero(keep[i]).astype(np.int32) for i in layers]
        flat = torch.from_numpy(np.concatenate(per_layer)).to(device)
        for i, indices in zip(layers, flat.split([len(p) for p in per_layer])):
            out[i] = indices
    return out


def _grown(table: torch.Tensor, size: int) -> torch.Tensor:
    """``table`` with rows added (zeros) up to ``size``."""
    out = torch.zeros(size, *table.shape[1:], dtype=table.dtype, device=table.device)
    out[: table.shape[0]] = table
    return out
