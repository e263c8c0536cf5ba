"""Kernel configs measured on a device, read at launch: a committed table, by device, kernel and shape bucket.

Every Triton kernel of the library is tuned per regime (``prefill``,
``decode``) over a short list of configs. Autotuning at run time compiles
and times each of them for every new key, which costs a process seconds
per shape. ``python -m bench.tune`` times the candidates once at LLaVA-1.5
shapes on a GPU and writes the fastest per *shape bucket* into
``tuned_configs.json`` beside this module (the device's name, the date, the
commit and the command recorded with it). A launch then looks up

    table[device name][kernel/regime][bucket]

where the bucket is the kernel's tuning key with every size rounded up to a
power of two (``N=11008`` and ``N=8256`` share ``N=16384``): a hit launches
that config directly (no autotuning, nothing timed); a miss (another device,
a shape no sweep saw) falls back to the kernel's autotuner over its own list.
Under ``TRITON_INTERPRET=1`` the table is never read.

``ADALLAVA_TUNED_CONFIGS=PATH`` lays a second table over the committed one
(its entries win): what ``make gpu-check`` does with the table its sweep
just wrote, so the stages after the sweep run the configs it chose.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Iterator

import torch
import triton
from triton.runtime.jit import KernelInterface

from .common import INTERPRETING

__all__ = ["TABLE", "ENV", "Tuned", "bucket_of", "forcing", "load_table", "lookup", "recording", "config_to_json",
           "config_from_json"]

TABLE = Path(__file__).with_name("tuned_configs.json")
ENV = "ADALLAVA_TUNED_CONFIGS"

# (kernel name, regime) -> the config a sweep forces while it times candidates.
_FORCED: dict[tuple[str, str], triton.Config] = {}
# While a sweep records: the (kernel/regime, bucket) of every launch.
_RECORDED: list | None = None


def config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_json(entry: dict) -> triton.Config:
    return triton.Config(dict(entry["kwargs"]), num_warps=entry["num_warps"], num_stages=entry["num_stages"])


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("configs", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise RuntimeError(f"the tuned-config table {path} cannot be read: {error}") from error


@functools.lru_cache(maxsize=None)
def load_table(overlay: str | None = None) -> dict:
    """``{device: {kernel/regime: {bucket: config json}}}``: the committed table with ``overlay`` over it."""
    table = _read(TABLE)
    if overlay:
        for device, kernels in _read(Path(overlay)).items():
            mine = table.setdefault(device, {})
            for kernel, buckets in kernels.items():
                mine.setdefault(kernel, {}).update(buckets)
    return table


def bucket_of(names: list[str], values: list) -> str:
    """The shape bucket of a tuning key: sizes rounded up to a power of two, flags as 0/1."""
    parts = []
    for name, value in zip(names, values):
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, int) and value > 0:
            value = triton.next_power_of_2(value)
        parts.append(f"{name}={value}")
    return ",".join(parts)


def lookup(device: str, kernel: str, regime: str, bucket: str) -> triton.Config | None:
    entry = load_table(os.environ.get(ENV)).get(device, {}).get(f"{kernel}/{regime}", {}).get(bucket)
    return None if entry is None else config_from_json(entry)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@contextlib.contextmanager
def forcing(kernel: str, regime: str, config: triton.Config) -> Iterator[None]:
    """Launch ``kernel`` in ``regime`` with ``config`` (neither table nor autotuner) inside the block: how
    :mod:`bench.tune` times each candidate through the library's own launchers."""
    key = (kernel, regime)
    before = _FORCED.get(key)
    _FORCED[key] = config
    try:
        yield
    finally:
        if before is None:
            _FORCED.pop(key, None)
        else:
            _FORCED[key] = before


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """The ``(kernel/regime, bucket)`` of every tuned launch inside the block, in order."""
    global _RECORDED
    before, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = before


class Tuned(KernelInterface):
    """One kernel in one regime: launched with the table's config for its device and bucket, or autotuned.

    ``fn`` is the ``@triton.jit`` kernel, ``autotuner`` the ``triton.autotune`` wrapper of it that a miss
    runs, ``configs`` the autotuner's list. The lookup is cached per (device, key values): a launch after
    the first costs a dict lookup.

    A miss autotunes once per shape bucket, not once per exact size: the winner is kept for the bucket (on
    that device, for that dtype) and launched directly for every later size in it. A kernel keyed by a
    plan's width (the union of a batch's neurons, say) would otherwise time every candidate again for each
    new width, seconds of a serving loop each time."""

    def __init__(self, fn, autotuner, regime: str, key: list[str]) -> None:
        self.fn, self.autotuner, self.regime, self.key = fn, autotuner, regime, list(key)
        self.name = fn.__name__
        self.configs = autotuner.configs
        self._positions = [fn.arg_names.index(k) for k in self.key]
        self._chosen: dict[tuple, triton.Config | None] = {}
        self._tuned: dict[tuple, triton.Config] = {}  # (device, overlay, bucket, dtype) -> the autotuner's winner
        self.autotuned = 0  # autotuner runs this kernel paid (each a sweep of its configs on a new bucket)

    def _key_values(self, args: tuple, kwargs: dict) -> list:
        return [args[i] if i < len(args) else kwargs[k] for i, k in zip(self._positions, self.key)]

    def config_for(self, args: tuple, kwargs: dict) -> triton.Config | None:
        """The config this launch takes: forced by a sweep, else the table's, else ``None`` (autotune)."""
        if _RECORDED is not None:
            _RECORDED.append((f"{self.name}/{self.regime}", bucket_of(self.key, self._key_values(args, kwargs))))
        forced = _FORCED.get((self.name, self.regime))
        if forced is not None:
            return forced
        if INTERPRETING:
            return None
        device = args[0].device
        if device.type != "cuda":
            return None
        values = self._key_values(args, kwargs)
        cache_key = (device.index, os.environ.get(ENV), *values)
        if cache_key not in self._chosen:
            name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
            self._chosen[cache_key] = lookup(name, self.name, self.regime, bucket_of(self.key, values))
        return self._chosen[cache_key] or self._tuned.get(self._tuned_key(args, values))

    def _tuned_key(self, args: tuple, values: list) -> tuple:
        return (args[0].device.index, os.environ.get(ENV), bucket_of(self.key, values), getattr(args[0], "dtype", None))

    def run(self, *args, grid, warmup, **kwargs):
        config = self.config_for(args, kwargs)
        if config is not None:
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())
        out = self.autotuner.run(*args, grid=grid, warmup=warmup, **kwargs)
        if not INTERPRETING and args[0].device.type == "cuda":
            self.autotuned += 1
            self._tuned[self._tuned_key(args, self._key_values(args, kwargs))] = self.autotuner.best_config
        return out
