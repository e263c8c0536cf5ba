"""Plans bound as data: one captured decode step serves every mix of plans of its shape.

A CUDA graph replays fixed launches on fixed addresses, so a step whose
launches are built from the plans (the cohorts of :mod:`.cohorts`) needs a
graph per mix of plans, and AdaLLaVA-H gives nearly every request its own.
A *bound* step instead runs each sub-block of a layer (attention, MLP) in one
of three modes:

- :data:`SKIP`: no row runs the layer; it is absent from the step;
- :data:`SLOTS`: a layer prepared for partial plans (the runner's
  ``partial_layers``) that some row runs: the batch's *union* (every unit
  some row keeps, possibly none or all) runs, read from index lists of the
  full capacity padded with -1 and counts that live in device buffers. A
  row's units outside its own plan are masked: their K/V go to the pool's
  scratch page and their outputs are never read;
- :data:`FULL`: a layer not prepared for partial plans: every row runs all
  its units, the dense matmuls.

So the modes depend on which layers run, never on which heads or neurons:
they, the batch size and the table width are the step's shape, the graph's
key. The indices, counts, masks and block
tables are data, packed in two buffers that a batch copies into its graph's
in one copy each (:class:`BoundPlans`). So after warm-up, a stream of
requests with distinct plans causes no new capture.

On the torch backend the union is every unit (dense compute; the masks zero
what a row lacks): the bound step's reference, and what the CPU stand-in for
CUDA graphs records. What a SLOTS sub-block costs (the union's weights read
once per step, its units computed for every row) is
``cost.batch_decode_cost(..., union=True)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Sequence

import torch

from ..plan import ExecutionPlan
from ..shape import ModelShape

__all__ = ["FULL", "SKIP", "SLOTS", "BoundPlans", "LayerSlots", "bind_plans", "layer_modes", "width_bucket"]

SKIP, FULL, SLOTS = "skip", "full", "slots"

# Host lists of one row's pages in one layer: per kept KV head (the plan's kv_heads order), its pages.
PageLists = Callable[[int, int], Sequence[Sequence[int]]]


@dataclasses.dataclass
class LayerSlots:
    """One layer's bound plan data: views of a batch's (or a graph's) buffers; ``None`` where unused.

    ``tables`` ``[rows, kv_heads, width]``: each row's pages per KV slot (the scratch page where the row keeps
    no KV); ``head_tables`` ``[rows, heads, width]``: the same per query head (torch). Attention slots:
    ``qkv_heads`` (q, k, v head slots of the stacked weight), ``head_to_kv``, ``o_cols`` and ``o_count`` (the
    union's ``o_proj`` columns), ``o_mask`` ``[rows, heads * head_dim]``. MLP slots: ``neurons``,
    ``n_count``, ``n_mask`` ``[rows, neurons]``. Masks hold 1 where the row's own plan keeps the unit.
    """

    tables: torch.Tensor | None = None
    head_tables: torch.Tensor | None = None
    qkv_heads: torch.Tensor | None = None
    head_to_kv: torch.Tensor | None = None
    o_cols: torch.Tensor | None = None
    o_count: torch.Tensor | None = None
    o_mask: torch.Tensor | None = None
    neurons: torch.Tensor | None = None
    n_count: torch.Tensor | None = None
    n_mask: torch.Tensor | None = None


def width_bucket(pages: int) -> int:
    """Table widths a graph serves: the next power of two, so requests of nearby ``max_tokens`` share one."""
    return 1 << max(0, pages - 1).bit_length()


def layer_modes(plans: Sequence[ExecutionPlan], shape: ModelShape, partial: Collection[int]) -> tuple[tuple[str, str], ...]:
    """Per layer, the (attention, MLP) modes of a batch whose rows run ``plans``; ``partial``: the layers
    prepared for partial plans."""
    modes = []
    for i in range(shape.num_layers):
        heads, neurons = [len(p.heads[i]) for p in plans], [len(p.neurons[i]) for p in plans]
        if not any(heads) and not any(neurons):
            modes.append((SKIP, SKIP))
        elif i in partial:
            modes.append((SLOTS, SLOTS))
        else:  # a row that keeps only some units here is refused where the layer is built
            modes.append((_whole(heads, shape.num_heads), _whole(neurons, shape.intermediate_size)))
    return tuple(modes)


def _whole(counts: list[int], capacity: int) -> str:
    return FULL if all(c == capacity for c in counts) else SLOTS


@dataclasses.dataclass
class BoundPlans:
    """A batch's plans as data: ``index`` (int32) and ``masks`` (the model's dtype), on the device, and
    where each layer's :class:`LayerSlots` lie in them."""

    modes: tuple[tuple[str, str], ...]
    index: torch.Tensor
    masks: torch.Tensor
    layout: list[dict[str, tuple[str, int, tuple[int, ...]]]]  # per layer: field -> (buffer, offset, shape)

    def views(self, index: torch.Tensor, masks: torch.Tensor) -> list[LayerSlots]:
        """Each layer's slots as views of ``index`` and ``masks`` (these buffers, or a graph's copies)."""
        buffers = {"index": index, "masks": masks}
        return [LayerSlots(**{name: buffers[kind][offset:offset + _numel(shape)].view(shape)
                              for name, (kind, offset, shape) in fields.items()})
                for fields in self.layout]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Packer:
    """Host tensors packed into the two flat buffers, remembering where each went."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {"index": [], "masks": []}
        self.sizes = {"index": 0, "masks": 0}

    def add(self, kind: str, tensor: torch.Tensor) -> tuple[str, int, tuple[int, ...]]:
        where = (kind, self.sizes[kind], tuple(tensor.shape))
        self.parts[kind].append(tensor.reshape(-1))
        self.sizes[kind] += tensor.numel()
        return where

    def flat(self, kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        parts = self.parts[kind]
        host = torch.cat(parts).to(dtype) if parts else torch.empty(0, dtype=dtype)
        return host.to(device)  # one copy per buffer


def bind_plans(
    plans: Sequence[ExecutionPlan], page_lists: PageLists, shape: ModelShape, *, partial: Collection[int],
    backend: str, width: int, scratch_page: int, dtype: torch.dtype, device: torch.device,
) -> BoundPlans:
    """Bind the plans of a batch (row ``b`` runs ``plans[b]``; ``page_lists(b, layer)`` lists its pages) to
    tables of ``width`` pages, on ``backend`` (``"triton"``: the union's slots; ``"torch"``: every unit);
    ``partial``: the layers prepared for partial plans."""
    modes = layer_modes(plans, shape, partial)
    packer = _Packer()
    layout = []
    for i, (attention, mlp) in enumerate(modes):
        fields: dict = {}
        if attention != SKIP:
            fields.update(_attention(packer, plans, page_lists, shape, i, attention, backend, width, scratch_page))
        if mlp == SLOTS:
            fields.update(_mlp(packer, plans, shape, i, backend))
        layout.append(fields)
    return BoundPlans(modes, packer.flat("index", torch.int32, device), packer.flat("masks", dtype, device), layout)


def _padded(values: torch.Tensor, capacity: int) -> torch.Tensor:
    """``values`` then -1 up to ``capacity`` (free slots, which the kernels skip)."""
    out = torch.full((capacity,), -1, dtype=torch.int32)
    out[:values.numel()] = values
    return out


def _own(plans: Sequence[ExecutionPlan], layer: int, kind: str, capacity: int) -> torch.Tensor:
    """``[rows, capacity]`` bool: which units (``kind``: ``"heads"`` or ``"neurons"``) each row's plan keeps
    in ``layer``, from the plan's own index tensors (built once per plan on the host, then cached)."""
    own = torch.zeros(len(plans), capacity, dtype=torch.bool)
    for b, plan in enumerate(plans):
        own[b, getattr(plan.layer(layer), kind).long()] = True
    return own


def _union(own: torch.Tensor, mode: str, backend: str) -> torch.Tensor:
    """The units a sub-block runs, sorted: the rows' union on Triton's slot kernels, else every unit."""
    if mode == SLOTS and backend == "triton":
        return own.any(0).nonzero().flatten()  # host tensors: no device is read
    return torch.arange(own.shape[1])


def _attention(packer, plans, page_lists, shape, layer, mode, backend, width, scratch_page) -> dict:
    heads, kv_heads, d, per_kv = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.heads_per_kv_head
    own = _own(plans, layer, "heads", heads)
    union = _union(own, mode, backend)
    kv_union = torch.unique(union // per_kv)  # sorted
    slot_of_kv = torch.full((kv_heads,), -1, dtype=torch.long)
    slot_of_kv[kv_union] = torch.arange(kv_union.numel())
    head_to_kv = slot_of_kv[union // per_kv]

    tables = torch.full((len(plans), kv_heads, width), scratch_page, dtype=torch.int32)
    for b, plan in enumerate(plans):
        kept = plan.layer(layer).kv_heads.long()
        if kept.numel():  # every kept KV head holds as many pages (all reserved at admission)
            pages = torch.tensor(page_lists(b, layer), dtype=torch.int32)
            tables[b, slot_of_kv[kept], :pages.shape[1]] = pages
    fields = {"tables": packer.add("index", tables)}
    if backend == "torch":
        fields["head_tables"] = packer.add("index", tables[:, head_to_kv])
    if mode != SLOTS:
        return fields
    if backend == "triton":
        fields["qkv_heads"] = packer.add("index", torch.cat([
            _padded(union, heads), _padded(kv_union + heads, kv_heads), _padded(kv_union + heads + kv_heads, kv_heads)]))
        fields["head_to_kv"] = packer.add("index", _padded(head_to_kv, heads))
        fields["o_cols"] = packer.add("index", _padded((union[:, None] * d + torch.arange(d)).flatten(), heads * d))
        fields["o_count"] = packer.add("index", torch.tensor([union.numel() * d], dtype=torch.int32))
    mask = torch.zeros(len(plans), heads, dtype=torch.bool)
    mask[:, :union.numel()] = own[:, union]
    fields["o_mask"] = packer.add("masks", mask.repeat_interleave(d, dim=1))
    return fields


def _mlp(packer, plans, shape, layer, backend) -> dict:
    neurons = shape.intermediate_size
    own = _own(plans, layer, "neurons", neurons)
    union = _union(own, SLOTS, backend)
    fields = {}
    if backend == "triton":
        fields["neurons"] = packer.add("index", _padded(union, neurons))
        fields["n_count"] = packer.add("index", torch.tensor([union.numel()], dtype=torch.int32))
    mask = torch.zeros(len(plans), neurons, dtype=torch.bool)
    mask[:, :union.numel()] = own[:, union]
    fields["n_mask"] = packer.add("masks", mask)
    return fields
