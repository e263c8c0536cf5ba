"""ExecutionPlan: which layers, attention heads and MLP neurons a request runs.

The plan is the one currency between the scheduler and the kernels. It is
validated once, when it is built; its int32 index tensors are built once per
device, so a decode step reads them without a host sync or a copy.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Sequence

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
        return _build_layers([(index, heads, neurons)], num_heads, num_kv_heads, head_dim, intermediate_size,
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


def _features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The features of ``heads``: ``heads[i] * head_dim + d`` for every ``d``, int32 (a device op, no copy)."""
    offsets = torch.arange(head_dim, dtype=torch.int32, device=heads.device)
    return (heads.to(torch.int32)[:, None] * head_dim + offsets).reshape(-1)


def _build_layers(
    layers: Sequence[tuple[int, Sequence[int], Sequence[int]]], num_heads: int, num_kv_heads: int, head_dim: int,
    intermediate_size: int, device: torch.device,
) -> list[LayerPlan]:
    """Layer plans from host index lists, every index of every layer sent to ``device`` in one copy."""
    per_kv = num_heads // num_kv_heads
    parts: list[list[int]] = []
    for _, heads, neurons in layers:
        kv = sorted({h // per_kv for h in heads})
        slot = {k: p for p, k in enumerate(kv)}
        parts += [
            list(heads), kv, [slot[h // per_kv] for h in heads],
            [h * head_dim + d for h in heads for d in range(head_dim)],
            [k * head_dim + d for k in kv for d in range(head_dim)],
            list(neurons),
        ]
    flat = torch.tensor([i for part in parts for i in part], dtype=torch.int32).to(device)
    views = iter(flat.split([len(part) for part in parts]))
    return [
        LayerPlan(index, *(next(views) for _ in range(6)), model_heads=num_heads, model_kv_heads=num_kv_heads,
                  head_dim=head_dim, model_neurons=intermediate_size)
        for index, _, _ in layers
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


def _validated_indices(value: Any, name: str, upper: int) -> tuple[int, ...]:
    """A strictly increasing tuple of ints in [0, upper), or a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(value.shape)}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        items = value.tolist()
    else:
        items = list(value)
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
    return tuple(items)


def _ranges(indices: Sequence[int]) -> list[list[int]]:
    """Run-length form ``[[start, stop), ...]`` of sorted indices (groups are contiguous)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _from_ranges(runs: Any, name: str) -> list[int]:
    if not isinstance(runs, list):
        raise ValueError(f"{name} must be a list of [start, stop] pairs, got {runs!r}")
    out: list[int] = []
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(isinstance(x, int) for x in run)):
            raise ValueError(f"{name} must be a list of [start, stop] int pairs, found {run!r}")
        if run[1] <= run[0]:
            raise ValueError(f"{name}: empty or reversed range {run!r}")
        out.extend(range(run[0], run[1]))
    return out


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
    """

    def __init__(
        self,
        shape: ModelShape,
        heads: Sequence[Iterable[int]],
        neurons: Sequence[Iterable[int]],
        *,
        num_groups: int | None = None,
    ) -> None:
        self.shape = check_model_shape("shape", shape)
        self.num_groups = shape.num_heads if num_groups is None else num_groups
        neuron_groups(shape.intermediate_size, self.num_groups)  # validates num_groups
        for name, value in (("heads", heads), ("neurons", neurons)):
            if isinstance(value, (str, bytes)) or not (hasattr(value, "__len__") and hasattr(value, "__iter__")):
                raise TypeError(f"{name} must be a sequence of one index list per layer ({shape.num_layers}), got "
                                f"{type(value).__name__}")
            if len(value) != shape.num_layers:
                raise ValueError(f"{name} must have one entry per layer ({shape.num_layers}), got {len(value)}")
        self.heads = tuple(
            _validated_indices(h, f"heads[{i}]", shape.num_heads) for i, h in enumerate(heads)
        )
        self.neurons = tuple(
            _validated_indices(n, f"neurons[{i}]", shape.intermediate_size) for i, n in enumerate(neurons)
        )
        self._layers: dict[torch.device, tuple[LayerPlan, ...]] = {}
        self._hash: int | None = None
        self._fingerprint: str | None = None

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
        on = _as_binary_tensor(mask, "mask", (shape.num_layers,)).tolist()
        all_heads = range(shape.num_heads)
        all_neurons = range(shape.intermediate_size)
        return cls(
            shape,
            [all_heads if keep else () for keep in on],
            [all_neurons if keep else () for keep in on],
            num_groups=num_groups,
        )

    @classmethod
    def from_switches(cls, switches: Any, shape: ModelShape) -> "ExecutionPlan":
        """AdaLLaVA-H: ``switches`` is ``[layers, 2, num_heads]`` of 0/1.

        Row 0 switches attention heads, row 1 switches MLP neuron groups (as
        many groups as heads, see :func:`neuron_groups`).
        """
        check_model_shape("shape", shape)
        s = _as_binary_tensor(switches, "switches", (shape.num_layers, 2, shape.num_heads))
        groups = neuron_groups(shape.intermediate_size, shape.num_heads)
        heads = [s[layer, 0].nonzero().flatten().tolist() for layer in range(shape.num_layers)]
        neurons = [
            [n for g in s[layer, 1].nonzero().flatten().tolist() for n in groups[g]]
            for layer in range(shape.num_layers)
        ]
        return cls(shape, heads, neurons)

    # -- derived views ------------------------------------------------------

    @property
    def layer_mask(self) -> tuple[bool, ...]:
        """Per layer: True when it runs (has an active head or neuron)."""
        return tuple(bool(h) or bool(n) for h, n in zip(self.heads, self.neurons))

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
        device = check_device("device", device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._layers:
            s = self.shape
            self._layers[device] = tuple(_build_layers(
                [(i, self.heads[i], self.neurons[i]) for i in range(s.num_layers)],
                s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, device,
            ))
        return self._layers[device]

    def check_shape(self, shape: ModelShape, name: str = "plan") -> None:
        """Raise ``ValueError`` unless this plan was built for ``shape``."""
        check_model_shape("shape", shape)
        if shape != self.shape:
            raise ValueError(f"{name} is for {self.shape}, but the model is {shape}")

    # -- serialisation and comparison --------------------------------------

    def to_json(self) -> str:
        """JSON with the shape and, per layer, heads and neuron ranges ``[start, stop)``."""
        return json.dumps(
            {
                "version": _JSON_VERSION,
                "shape": self.shape.to_dict(),
                "num_groups": self.num_groups,
                "layers": [
                    {"heads": list(h), "neurons": _ranges(n)} for h, n in zip(self.heads, self.neurons)
                ],
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
        """A digest of the plan's content (shape, groups, every index), computed once per plan object
        (about 4 ms for a LLaVA-7B -H plan on a CPU core): equal plans have equal fingerprints, so a
        runtime keys its layer programs by it and never compares two plans' 350k indices."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr((dataclasses.astuple(self.shape), self.num_groups)).encode())
            for per_layer in (self.heads, self.neurons):
                for indices in per_layer:
                    digest.update(len(indices).to_bytes(4, "little"))
                    digest.update(array.array("i", indices).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExecutionPlan):
            return NotImplemented
        if other is self:
            return True
        if self._fingerprint is not None and other._fingerprint is not None and self._fingerprint != other._fingerprint:
            return False
        return (self.shape, self.num_groups, self.heads, self.neurons) == (
            other.shape, other.num_groups, other.heads, other.neurons,
        )

    def __hash__(self) -> int:
        # A plan is immutable; its index tuples are long (11008 neurons a layer), so hash them once.
        if self._hash is None:
            self._hash = hash((self.shape, self.num_groups, self.heads, self.neurons))
        return self._hash

    def __repr__(self) -> str:
        s = self.shape
        heads = sum(map(len, self.heads))
        neurons = sum(map(len, self.neurons))
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
