"""ExecutionPlan: which layers, attention heads and MLP neurons a request runs.

The plan is the one currency between the scheduler and the kernels. It is
validated once, when it is built; its int32 index tensors are built once per
device, so a decode step reads them without a host sync or a copy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .checks import check_device, check_int
from .shape import ModelShape, check_model_shape

__all__ = ["ExecutionPlan", "LayerPlan", "check_execution_plan", "neuron_groups"]

_JSON_VERSION = 1


def neuron_groups(intermediate_size: int, num_groups: int) -> list[range]:
    """Split ``intermediate_size`` MLP neurons into ``num_groups`` contiguous groups.

    Each group has ``intermediate_size // num_groups`` neurons; the remainder
    goes one neuron each to the first groups (7B: 11008 = 32 * 344, no
    remainder; 13B: 13824 = 40 * 345 + 24, so groups 0-23 have 346).
    """
    check_int("intermediate_size", intermediate_size, 1)
    check_int("num_groups", num_groups, 1)
    if num_groups > intermediate_size:
        raise ValueError(f"num_groups must be in [1, {intermediate_size}], got {num_groups}")
    base, extra = divmod(intermediate_size, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        stop = start + base + (1 if g < extra else 0)
        groups.append(range(start, stop))
        start = stop
    return groups


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """The active units of one decoder layer on one device: the one device form of a plan.

    int32 index tensors, built once per (plan, device), with their counts
    known on the host (so a caller never reads a device value back):

    - ``heads``: active query heads; ``kv_heads``: the KV heads they read
      (GQA: a KV head is kept while any of its query heads is active);
    - ``head_to_kv[i]``: position in ``kv_heads`` of the KV head of
      ``heads[i]`` (after masking the query-to-KV map is arbitrary);
    - ``q_features`` / ``kv_features``: the weight rows of ``heads`` /
      ``kv_heads`` (``heads[i] * head_dim + d``; ``q_features`` are also
      ``o_proj``'s columns);
    - ``neurons``: active MLP neurons.

    ``model_heads``, ``model_kv_heads``, ``head_dim`` and ``model_neurons``
    are the dimensions of the model it was built for: a module or runtime
    given a plan checks them against its own.
    """

    index: int
    heads: torch.Tensor
    kv_heads: torch.Tensor
    head_to_kv: torch.Tensor
    q_features: torch.Tensor
    kv_features: torch.Tensor
    neurons: torch.Tensor
    model_heads: int
    model_kv_heads: int
    head_dim: int
    model_neurons: int

    @classmethod
    def build(
        cls, index: int, heads: Sequence[int], neurons: Sequence[int], *, num_heads: int, num_kv_heads: int,
        head_dim: int, intermediate_size: int, device: torch.device | str = "cpu",
    ) -> "LayerPlan":
        """From sorted host index lists, already validated; one host-to-device copy."""
        head_mask = np.zeros((1, num_heads), dtype=bool)
        head_mask[0, _host_indices(heads)] = True
        neurons = _host_indices(neurons)
        runs = _neuron_runs(np.zeros(len(neurons), dtype=np.int64), neurons)
        return _build_layers([index], head_mask, runs, num_heads, num_kv_heads, head_dim, intermediate_size,
                             torch.device(device))[0]

    @classmethod
    def for_heads(cls, heads: torch.Tensor, kv_heads: torch.Tensor, head_to_kv: torch.Tensor, *, num_heads: int,
                  num_kv_heads: int, head_dim: int) -> "LayerPlan":
        """An attention-only layer plan from index tensors already on the device (no MLP neuron)."""
        heads, kv_heads = heads.to(torch.int32), kv_heads.to(torch.int32)
        return cls(
            index=-1, heads=heads, kv_heads=kv_heads, head_to_kv=head_to_kv.to(torch.int32),
            q_features=_features(heads, head_dim), kv_features=_features(kv_heads, head_dim),
            neurons=heads.new_empty(0), model_heads=num_heads, model_kv_heads=num_kv_heads, head_dim=head_dim,
            model_neurons=0,
        )

    @property
    def is_active(self) -> bool:
        return self.heads.numel() > 0 or self.neurons.numel() > 0

    @property
    def num_heads(self) -> int:
        return self.heads.numel()

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads.numel()

    @property
    def num_neurons(self) -> int:
        return self.neurons.numel()

    @property
    def full_attention(self) -> bool:
        """Every query head is active (the attention can run dense)."""
        return self.num_heads == self.model_heads

    @property
    def full_mlp(self) -> bool:
        """Every neuron is active (the MLP can run dense)."""
        return self.num_neurons == self.model_neurons

    @property
    def device(self) -> torch.device:
        return self.heads.device

    def describe_model(self) -> str:
        return (f"{self.model_heads} heads over {self.model_kv_heads} KV heads of dim {self.head_dim}"
                + (f", {self.model_neurons} MLP neurons" if self.model_neurons else ""))

    def to(self, device: torch.device | str) -> "LayerPlan":
        """The same layer plan on ``device`` (a copy of each index tensor; itself when already there)."""
        device = check_device("device", device)
        if self.heads.device == device:
            return self
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors)


def _host_indices(indices: Sequence[int] | torch.Tensor) -> np.ndarray:
    """Indices as an int64 host array (from a tensor on any device or a sequence of ints)."""
    if isinstance(indices, torch.Tensor):
        return indices.detach().cpu().numpy().astype(np.int64).reshape(-1)
    return np.array(list(indices), dtype=np.int64)


def _features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The features of ``heads``: ``heads[i] * head_dim + d`` for every ``d``, int32 (a device op, no copy)."""
    offsets = torch.arange(head_dim, dtype=torch.int32, device=heads.device)
    return (heads.to(torch.int32)[:, None] * head_dim + offsets).reshape(-1)


# -- the host form of a plan: a head mask and neuron runs ----------------------------------------
#
# A plan holds, for the whole model, a bool mask of its query heads ``[layers, num_heads]`` and its
# neurons as maximal runs ``[layer, start, stop)`` sorted by layer and start, int64 ``[runs, 3]``.
# Both are canonical (equal plans hold equal arrays) and small: neuron groups are contiguous, so an
# AdaLLaVA-H layer is at most 16 runs where its index list is up to 11008 ints. Everything else (the
# index tuples, the device index tensors, the masks, the digest) is derived from them with array
# operations over all layers at once.


def _neuron_runs(layers: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """Maximal runs ``[layer, start, stop)`` of sorted, unique ``neurons`` listed with their ``layers``."""
    if neurons.size == 0:
        return np.empty((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(neurons) != 1) | (np.diff(layers) != 0)) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [neurons.size - 1]))
    return np.stack((layers[first], neurons[first], neurons[last] + 1), axis=1).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _group_bounds(intermediate_size: int, num_groups: int) -> np.ndarray:
    """``bounds[g]:bounds[g + 1]`` are the neurons of group ``g`` (as :func:`neuron_groups` splits them)."""
    base, extra = divmod(intermediate_size, num_groups)
    sizes = np.full(num_groups, base, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    bounds.setflags(write=False)  # shared by every caller through the cache
    return bounds


def _group_runs(groups_on: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Maximal neuron runs of the groups on in each row of ``groups_on`` ``[layers, groups]``: a run of
    adjacent groups is one run of neurons, since groups are contiguous."""
    layers, num_groups = groups_on.shape
    padded = np.zeros((layers, num_groups + 2), dtype=np.int8)
    padded[:, 1:-1] = groups_on
    edges = np.diff(padded, axis=1)  # +1 where a run of groups starts, -1 one past where it ends
    layer, first = np.nonzero(edges == 1)
    _, stop = np.nonzero(edges == -1)  # row-major, so the k-th stop closes the k-th start
    return np.stack((layer, bounds[first], bounds[stop]), axis=1).astype(np.int64)


def _neuron_mask(runs: np.ndarray, num_layers: int, intermediate_size: int) -> np.ndarray:
    """Bool ``[num_layers, intermediate_size]``, True on the neurons of ``runs``."""
    # Over the flattened mask the runs split it into alternating off/on segments (some empty).
    offsets = runs[:, 0] * intermediate_size
    bounds = np.empty(2 * len(runs) + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, num_layers * intermediate_size
    bounds[1:-1:2] = offsets + runs[:, 1]
    bounds[2:-1:2] = offsets + runs[:, 2]
    values = np.zeros(2 * len(runs) + 1, dtype=bool)
    values[1::2] = True
    return np.repeat(values, np.diff(bounds)).reshape(num_layers, intermediate_size)


def _expand_runs_into(out: np.ndarray, runs: np.ndarray) -> None:
    """Write every neuron of ``runs`` in order into the int32 ``out`` (as long as the runs together):
    ``start, start + 1, ..., stop - 1``, run after run."""
    lengths = runs[:, 2] - runs[:, 1]
    first = np.cumsum(lengths) - lengths  # each run's first position in ``out``
    # Position p of a run holds start + (p - first).
    shift = np.repeat((runs[:, 1] - first).astype(np.int32), lengths)
    np.add(shift, np.arange(len(out), dtype=np.int32), out=out)


def _build_rows(whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``whole``, a per-layer bool: the layers built one by one (those not whole), and per layer its
    row among the built rows (its own, or for a whole layer the one row after them that they share)."""
    partial = np.flatnonzero(~whole)
    row = np.full(len(whole), len(partial))
    row[partial] = np.arange(len(partial))
    return partial, row


def _build_layers(
    indices: Sequence[int], head_mask: np.ndarray, runs: np.ndarray, num_heads: int, num_kv_heads: int,
    head_dim: int, intermediate_size: int, device: torch.device,
) -> list[LayerPlan]:
    """Layer plans from a head mask ``[layers, num_heads]`` and neuron runs (``runs[:, 0]`` a row of the
    mask), ``indices[row]`` naming each row's layer; every index of every layer goes to ``device`` in
    one copy.

    The index lists of a whole attention, and of a whole MLP, are the same in every layer: the layers
    that run one whole share one copy of its tensors (the prefix layers of an AdaLLaVA plan, every
    layer of a dense one), so the work and the bytes scale with the partial layers.
    """
    whole_attention = head_mask.all(axis=1)
    partial, attention_row = _build_rows(whole_attention)
    heads_on = head_mask[partial]
    if whole_attention.any():
        heads_on = np.concatenate((heads_on, np.ones((1, num_heads), dtype=bool)))
    whole_run = (runs[:, 1] == 0) & (runs[:, 2] == intermediate_size)
    whole_mlp = np.zeros(len(head_mask), dtype=bool)
    whole_mlp[runs[whole_run, 0]] = True
    partial, mlp_row = _build_rows(whole_mlp)
    mlp_runs = runs[~whole_run]
    mlp_runs = np.concatenate((mlp_row[mlp_runs[:, 0], None], mlp_runs[:, 1:]), axis=1)
    if whole_mlp.any():
        mlp_runs = np.concatenate((mlp_runs, [[len(partial), 0, intermediate_size]]))

    per_kv = num_heads // num_kv_heads
    kv_on = heads_on.reshape(len(heads_on), num_kv_heads, per_kv).any(axis=2)  # GQA: kept while any query head is
    head_rows, heads = np.nonzero(heads_on)
    kv_heads = np.nonzero(kv_on)[1]
    slot = np.cumsum(kv_on, axis=1, dtype=np.int32) - 1  # position of each kept KV head in its layer's list
    head_counts, kv_counts = heads_on.sum(axis=1), kv_on.sum(axis=1)
    neuron_counts = np.zeros(len(partial) + whole_mlp.any(), dtype=np.int64)
    np.add.at(neuron_counts, mlp_runs[:, 0], mlp_runs[:, 2] - mlp_runs[:, 1])
    sizes = np.concatenate((head_counts, kv_counts, head_counts, head_counts * head_dim, kv_counts * head_dim,
                            neuron_counts))
    # One flat host array, section by section (every row's heads, then every row's KV heads, ...).
    flat = np.empty(int(sizes.sum()), dtype=np.int32)
    bounds = np.cumsum([0, len(heads), len(kv_heads), len(heads), len(heads) * head_dim, len(kv_heads) * head_dim])
    sections = [flat[a:b] for a, b in zip(bounds, np.append(bounds[1:], len(flat)))]
    sections[0][:] = heads
    sections[1][:] = kv_heads
    sections[2][:] = slot[head_rows, heads // per_kv]
    offsets = np.arange(head_dim, dtype=np.int32)
    for part, of in ((3, heads), (4, kv_heads)):  # feature rows: head * head_dim + d
        np.add((of.astype(np.int32) * head_dim)[:, None], offsets, out=sections[part].reshape(-1, head_dim))
    _expand_runs_into(sections[5], mlp_runs)
    views = torch.from_numpy(flat).to(device).split(sizes.tolist())
    n = len(heads_on)
    attention = list(zip(*(views[part * n: (part + 1) * n] for part in range(5))))  # per row: its 5 tensors
    neurons = views[5 * n:]
    return [
        LayerPlan(index, *attention[a], neurons[m], model_heads=num_heads, model_kv_heads=num_kv_heads,
                  head_dim=head_dim, model_neurons=intermediate_size)
        for index, a, m in zip(indices, attention_row.tolist(), mlp_row.tolist())
    ]


def _as_binary_tensor(value: Any, name: str, expected_shape: tuple[int, ...]) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or nested sequence of 0/1 of shape {list(expected_shape)}, got "
                        f"{type(value).__name__}") from None
    if tuple(tensor.shape) != expected_shape:
        raise ValueError(f"{name} must have shape {list(expected_shape)}, got {list(tensor.shape)}")
    if tensor.dtype != torch.bool:
        if not ((tensor == 0) | (tensor == 1)).all():
            bad = tensor[(tensor != 0) & (tensor != 1)][0].item()
            raise ValueError(f"{name} must be 0/1, found {bad!r}")
    return tensor.bool()


_NO_INDICES = np.empty(0, dtype=np.int64)
_NO_INDICES.setflags(write=False)


def _validated_indices(value: Any, name: str, upper: int) -> np.ndarray:
    """A strictly increasing int64 array of indices in [0, upper), or a ValueError naming ``name``.

    Valid input is checked with array operations; input that fails them goes through
    :func:`_check_index_items`, one item at a time, for the message that names the first bad item.
    """
    if isinstance(value, range) and value.step > 0 and (not value or (value[0] >= 0 and value[-1] < upper)):
        return np.arange(value.start, value.stop, value.step, dtype=np.int64)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind == "i":
        indices = value.astype(np.int64)
        if _strictly_increasing_in(indices, upper):
            return indices
        _check_index_items(indices.tolist(), name, upper, check_types=False)
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        indices = value.detach().cpu().numpy().astype(np.int64)  # an unsigned index past int64 turns negative
        if _strictly_increasing_in(indices, upper):
            return indices
        items = value.tolist()
    else:
        items = list(value)
        # Exactly int, not bool: an int subclass is checked item by item below.
        if not items:
            return _NO_INDICES
        if set(map(type, items)) == {int}:
            try:
                indices = np.array(items, dtype=np.int64)
            except OverflowError:
                indices = None
            if indices is not None and _strictly_increasing_in(indices, upper):
                return indices
    _check_index_items(items, name, upper, check_types=not isinstance(value, torch.Tensor))
    return np.array([int(item) for item in items], dtype=np.int64)


def _strictly_increasing_in(indices: np.ndarray, upper: int) -> bool:
    return indices.size == 0 or (indices[0] >= 0 and indices[-1] < upper and bool((np.diff(indices) > 0).all()))


def _check_index_items(items: list, name: str, upper: int, *, check_types: bool) -> None:
    """Raise the ValueError naming ``name`` and the first item that is not an int, is out of [0, upper),
    or is not above the one before it."""
    if check_types:
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"{name} must hold ints, found {item!r}")
    for item in items:
        if not 0 <= item < upper:
            raise ValueError(f"{name}: index {item} out of range [0, {upper})")
    for prev, item in zip(items, items[1:]):
        if item == prev:
            raise ValueError(f"{name}: index {item} is duplicated")
        if item < prev:
            raise ValueError(f"{name} must be sorted ascending: {prev} comes before {item}")


def _from_ranges(runs: Any, name: str) -> range | np.ndarray:
    """The neurons of ``[start, stop)`` pairs: a ``range`` for one pair, an int64 array for several (never a
    list of Python ints: a LLaVA-7B plan holds a few hundred thousand neurons)."""
    if not isinstance(runs, list):
        raise ValueError(f"{name} must be a list of [start, stop] pairs, got {runs!r}")
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(type(x) is int for x in run)):
            raise ValueError(f"{name} must be a list of [start, stop] int pairs, found {run!r}")
        if run[1] <= run[0]:
            raise ValueError(f"{name}: empty or reversed range {run!r}")
    if len(runs) == 1:
        return range(runs[0][0], runs[0][1])
    if not runs:
        return _NO_INDICES
    return np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in runs])


@functools.lru_cache(maxsize=8)
def _all_indices(size: int) -> tuple[int, ...]:
    """``tuple(range(size))``, one shared object: whole layers of every plan hold it."""
    return tuple(range(size))


def _resolved_device(device: torch.device | str) -> torch.device:
    """``device`` checked, with a bare ``cuda`` pinned to the current GPU (so it keys one cache entry)."""
    device = check_device("device", device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ExecutionPlan:
    """Active attention heads and MLP neurons of every decoder layer.

    A layer with no active head and no active neuron is skipped: it is the
    identity and stores no KV. Indices are validated here, once; the kernels
    trust them.

    Args:
        shape: the model the plan is for.
        heads: per layer, the active query heads (sorted, unique).
        neurons: per layer, the active MLP neurons (sorted, unique).
        num_groups: how many MLP neuron groups the switches address
            (default: one per attention head, as AdaLLaVA-H does).

    The plan keeps a head mask and neuron runs (see :func:`_neuron_runs`);
    ``heads`` and ``neurons``, the index tuples, are built from them on first
    use.
    """

    def __init__(
        self,
        shape: ModelShape,
        heads: Sequence[Iterable[int]],
        neurons: Sequence[Iterable[int]],
        *,
        num_groups: int | None = None,
    ) -> None:
        check_model_shape("shape", shape)
        num_groups = shape.num_heads if num_groups is None else num_groups
        neuron_groups(shape.intermediate_size, num_groups)  # validates num_groups
        for name, value in (("heads", heads), ("neurons", neurons)):
            if isinstance(value, (str, bytes)) or not (hasattr(value, "__len__") and hasattr(value, "__iter__")):
                raise TypeError(f"{name} must be a sequence of one index list per layer ({shape.num_layers}), got "
                                f"{type(value).__name__}")
            if len(value) != shape.num_layers:
                raise ValueError(f"{name} must have one entry per layer ({shape.num_layers}), got {len(value)}")
        head_mask = np.zeros((shape.num_layers, shape.num_heads), dtype=bool)
        for i, h in enumerate(heads):
            head_mask[i, _validated_indices(h, f"heads[{i}]", shape.num_heads)] = True
        per_layer = [_validated_indices(n, f"neurons[{i}]", shape.intermediate_size) for i, n in enumerate(neurons)]
        layers = np.repeat(np.arange(shape.num_layers), [len(n) for n in per_layer])
        runs = _neuron_runs(layers, np.concatenate(per_layer))
        self._init(shape, head_mask, runs, num_groups)

    def _init(self, shape: ModelShape, head_mask: np.ndarray, runs: np.ndarray, num_groups: int) -> None:
        """Set the plan from its validated host form: a bool head mask ``[layers, num_heads]`` and maximal
        neuron runs ``[layer, start, stop)`` sorted by layer, int64 ``[runs, 3]``."""
        self.shape = shape
        self.num_groups = num_groups
        # Copies: the arrays may view a caller's tensor (the switches), and a plan is immutable.
        self._head_mask = np.array(head_mask, dtype=bool, order="C")
        self._runs = np.array(runs, dtype=np.int64, order="C").reshape(-1, 3)
        self._head_mask.setflags(write=False)
        self._runs.setflags(write=False)
        self._heads: tuple[tuple[int, ...], ...] | None = None
        self._neurons: tuple[tuple[int, ...], ...] | None = None
        self._counts: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._layers: dict[torch.device, tuple[LayerPlan, ...]] = {}
        self._masks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hash: int | None = None
        self._fingerprint: str | None = None

    @classmethod
    def _from_host_form(cls, shape: ModelShape, head_mask: np.ndarray, runs: np.ndarray,
                        num_groups: int | None = None) -> "ExecutionPlan":
        """A plan from a head mask and neuron runs that are valid by construction (no index is checked)."""
        plan = cls.__new__(cls)
        plan._init(shape, head_mask, runs, shape.num_heads if num_groups is None else num_groups)
        return plan

    # -- constructors -------------------------------------------------------

    @classmethod
    def full(cls, shape: ModelShape, *, num_groups: int | None = None) -> "ExecutionPlan":
        """Every layer, head and neuron on: the dense model."""
        check_model_shape("shape", shape)
        return cls.from_layer_mask([1] * shape.num_layers, shape, num_groups=num_groups)

    @classmethod
    def from_layer_mask(cls, mask: Any, shape: ModelShape, *, num_groups: int | None = None) -> "ExecutionPlan":
        """AdaLLaVA-L: ``mask[l]`` is 1 to run layer ``l`` whole, 0 to skip it."""
        check_model_shape("shape", shape)
        on = _as_binary_tensor(mask, "mask", (shape.num_layers,)).numpy()
        if num_groups is not None:
            neuron_groups(shape.intermediate_size, num_groups)  # validates num_groups
        head_mask = np.repeat(on[:, None], shape.num_heads, axis=1)
        runs = _group_runs(on[:, None], np.array([0, shape.intermediate_size]))  # a layer on is one run
        return cls._from_host_form(shape, head_mask, runs, num_groups)

    @classmethod
    def from_switches(cls, switches: Any, shape: ModelShape) -> "ExecutionPlan":
        """AdaLLaVA-H: ``switches`` is ``[layers, 2, num_heads]`` of 0/1.

        Row 0 switches attention heads, row 1 switches MLP neuron groups (as
        many groups as heads, see :func:`neuron_groups`).
        """
        check_model_shape("shape", shape)
        s = _as_binary_tensor(switches, "switches", (shape.num_layers, 2, shape.num_heads)).numpy()
        runs = _group_runs(s[:, 1], _group_bounds(shape.intermediate_size, shape.num_heads))
        return cls._from_host_form(shape, s[:, 0], runs)

    # -- derived views ------------------------------------------------------

    @property
    def heads(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the active query heads, ascending (built on first use)."""
        if self._heads is None:
            self._heads = tuple(tuple(row.nonzero()[0].tolist()) for row in self._head_mask)
        return self._heads

    @property
    def neurons(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the active MLP neurons, ascending (built on first use; a whole layer's tuple is
        one object shared by every plan)."""
        if self._neurons is None:
            per_layer: list[list[range]] = [[] for _ in range(self.shape.num_layers)]
            for layer, start, stop in self._runs.tolist():
                per_layer[layer].append(range(start, stop))
            size = self.shape.intermediate_size
            self._neurons = tuple(
                _all_indices(size) if len(r) == 1 and len(r[0]) == size else tuple(itertools.chain.from_iterable(r))
                for r in per_layer
            )
        return self._neurons

    def unit_counts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per layer, how many query heads and how many MLP neurons the plan keeps: array work over the
        head mask and the neuron runs (no index list is built), cached."""
        if self._counts is None:
            neurons = np.zeros(self.shape.num_layers, dtype=np.int64)
            np.add.at(neurons, self._runs[:, 0], self._runs[:, 2] - self._runs[:, 1])
            self._counts = (tuple(self._head_mask.sum(axis=1).tolist()), tuple(neurons.tolist()))
        return self._counts

    @property
    def layer_mask(self) -> tuple[bool, ...]:
        """Per layer: True when it runs (has an active head or neuron)."""
        active = self._head_mask.any(axis=1)
        active[self._runs[:, 0]] = True
        return tuple(active.tolist())

    def kv_heads(self, layer: int) -> tuple[int, ...]:
        """KV heads that layer ``layer`` needs: those read by an active query head."""
        per_kv = self.shape.heads_per_kv_head
        return tuple(sorted({h // per_kv for h in self.heads[layer]}))

    def layer(self, index: int, device: torch.device | str = "cpu") -> LayerPlan:
        """Index tensors of one layer on ``device`` (built on first use, then cached)."""
        check_int("index", index, -self.shape.num_layers)
        if not -self.shape.num_layers <= index < self.shape.num_layers:
            raise ValueError(f"layer index {index} out of range for {self.shape.num_layers} layers")
        return self.layers(device)[index]

    def layers(self, device: torch.device | str = "cpu") -> tuple[LayerPlan, ...]:
        """Index tensors of every layer on ``device``, built once per device (one host-to-device copy)."""
        device = _resolved_device(device)
        if device not in self._layers:
            s = self.shape
            self._layers[device] = tuple(_build_layers(
                range(s.num_layers), self._head_mask, self._runs, s.num_heads, s.num_kv_heads, s.head_dim,
                s.intermediate_size, device,
            ))
        return self._layers[device]

    def unit_masks(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The kept units as bool masks on ``device``: query heads ``[num_layers, num_heads]`` and MLP
        neurons ``[num_layers, intermediate_size]``; built once per device (one host-to-device copy
        each), then cached, so callers must not write to them."""
        device = _resolved_device(device)
        if device not in self._masks:
            s = self.shape
            heads = torch.from_numpy(self._head_mask.copy())  # the plan's own array stays read-only
            neurons = torch.from_numpy(_neuron_mask(self._runs, s.num_layers, s.intermediate_size))
            self._masks[device] = (heads.to(device), neurons.to(device))
        return self._masks[device]

    def check_shape(self, shape: ModelShape, name: str = "plan") -> None:
        """Raise ``ValueError`` unless this plan was built for ``shape``."""
        check_model_shape("shape", shape)
        if shape != self.shape:
            raise ValueError(f"{name} is for {self.shape}, but the model is {shape}")

    # -- serialisation and comparison --------------------------------------

    def to_json(self) -> str:
        """JSON with the shape and, per layer, heads and neuron ranges ``[start, stop)``."""
        ranges: list[list[list[int]]] = [[] for _ in range(self.shape.num_layers)]
        for layer, start, stop in self._runs.tolist():
            ranges[layer].append([start, stop])
        return json.dumps(
            {
                "version": _JSON_VERSION,
                "shape": self.shape.to_dict(),
                "num_groups": self.num_groups,
                "layers": [{"heads": list(h), "neurons": n} for h, n in zip(self.heads, ranges)],
            }
        )

    @classmethod
    def from_json(cls, text: str, shape: ModelShape | None = None) -> "ExecutionPlan":
        """Inverse of :meth:`to_json`; with ``shape``, also checks the plan is for it."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"text must be the JSON string of ExecutionPlan.to_json, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"text is not plan JSON ({error})") from None
        if not isinstance(data, dict) or data.get("version") != _JSON_VERSION:
            raise ValueError(f"plan JSON must be an object with version {_JSON_VERSION}")
        plan_shape = ModelShape.from_dict(data["shape"])
        layers = data["layers"]
        if not isinstance(layers, list):
            raise ValueError("plan JSON 'layers' must be a list")
        plan = cls(
            plan_shape,
            [layer["heads"] for layer in layers],
            [_from_ranges(layer["neurons"], f"layers[{i}].neurons") for i, layer in enumerate(layers)],
            num_groups=data["num_groups"],
        )
        if shape is not None:
            plan.check_shape(shape)
        return plan

    @property
    def fingerprint(self) -> str:
        """A digest of the plan's content (shape, groups, every head and neuron), computed once per plan
        object: equal plans have equal fingerprints, so a runtime keys its layer programs by it and never
        compares two plans' indices. It digests the head mask and the neuron runs, a few kilobytes for a
        LLaVA-7B plan; it is a key within a process, not a stored identifier."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr((dataclasses.astuple(self.shape), self.num_groups)).encode())
            # The shape fixes the mask's length, so the runs that follow it are read unambiguously.
            digest.update(self._head_mask.tobytes())
            digest.update(self._runs.astype("<i8", copy=False).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExecutionPlan):
            return NotImplemented
        if other is self:
            return True
        if self._fingerprint is not None and other._fingerprint is not None and self._fingerprint != other._fingerprint:
            return False
        return (
            (self.shape, self.num_groups) == (other.shape, other.num_groups)
            and np.array_equal(self._head_mask, other._head_mask)
            and np.array_equal(self._runs, other._runs)
        )

    def __hash__(self) -> int:
        # A plan is immutable and its host form canonical: hash it once.
        if self._hash is None:
            self._hash = hash((self.shape, self.num_groups, self._head_mask.tobytes(), self._runs.tobytes()))
        return self._hash

    def __repr__(self) -> str:
        s = self.shape
        heads = int(self._head_mask.sum())
        neurons = int((self._runs[:, 2] - self._runs[:, 1]).sum())
        return (
            f"ExecutionPlan(layers={sum(self.layer_mask)}/{s.num_layers}, "
            f"heads={heads}/{s.num_layers * s.num_heads}, "
            f"neurons={neurons}/{s.num_layers * s.intermediate_size})"
        )


def check_execution_plan(name: str, plan: object, *, optional: bool = False) -> ExecutionPlan | None:
    """``plan`` if it is an :class:`ExecutionPlan` (or ``None`` where ``optional``), else ``ValueError`` naming
    ``name`` and the type it got (a layer's :class:`LayerPlan` is not a plan of the model: it is
    ``plan.layer(i)``)."""
    if plan is None and optional:
        return None
    if not isinstance(plan, ExecutionPlan):
        raise ValueError(f"{name} must be an ExecutionPlan{' or None' if optional else ''}, got {type(plan).__name__}")
    return plan
