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
The phased kernels are never autotuned (:func:`launch_fixed`): a miss launches
the first config of their list.
Under ``TRITON_INTERPRET=1`` the table is never read.

``ADALLAVA_TUNED_CONFIGS=PATH`` lays a second table over the committed one
(its entries win): what ``make gpu-check`` does with the table its sweep
just wrote, so the stages after the sweep run the configs it chose.

A miss's winner is kept on disk too (:class:`WinnerCache`), per machine: the
next process on the same device launches it without timing the list again
(a serving process that restarts, or a second worker). It lives in
``$ADALLAVA_TUNING_CACHE`` (default ``~/.cache/adallava_kernels``; ``off``
keeps winners in memory only), one file per device, each entry tied to the
kernel's source, the Triton version and the candidate list it was timed
over, so an edited kernel or another Triton times its list again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
import triton
from triton.runtime.jit import KernelInterface

from .common import INTERPRETING, next_power_of_2

__all__ = ["TABLE", "ENV", "CACHE_ENV", "Tuned", "WinnerCache", "bucket_of", "forcing", "launch_fixed", "load_table",
           "lookup", "recording", "config_to_json", "config_from_json", "winner_cache"]

TABLE = Path(__file__).with_name("tuned_configs.json")
ENV = "ADALLAVA_TUNED_CONFIGS"
CACHE_ENV = "ADALLAVA_TUNING_CACHE"
CACHE_OFF = ("", "0", "off")

# (kernel name, regime) -> the config a sweep forces while it times candidates.
_FORCED: dict[tuple[str, str], triton.Config] = {}
# While a sweep records: the (kernel/regime, bucket) of every launch.
_RECORDED: list | None = None
# launch_fixed's table lookups: (kernel, regime, device index, overlay, sizes...) -> the table's config or None.
_FIXED: dict[tuple, triton.Config | None] = {}


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
            value = next_power_of_2(value)
        parts.append(f"{name}={value}")
    return ",".join(parts)


def lookup(device: str, kernel: str, regime: str, bucket: str) -> triton.Config | None:
    entry = load_table(os.environ.get(ENV)).get(device, {}).get(f"{kernel}/{regime}", {}).get(bucket)
    return None if entry is None else config_from_json(entry)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


class WinnerCache:
    """Autotuned winners kept on disk, one JSON file per device: ``{"device", "configs": {kernel/regime:
    {bucket|dtype: {"config", "source", "triton", "candidates"}}}}``.

    An entry is taken only where the kernel's source, the Triton version and the candidate list are those
    it was timed with. A file that cannot be read is skipped, and one that cannot be written leaves the
    winner in memory only: each with one warning naming the file, for it is a cache, never a reason to fail
    a launch. Writes go through a temporary file and a rename, merged with what another process wrote
    meanwhile."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, dict] = {}  # device -> its file's entries, read once
        self._warned: set[Path] = set()

    def path(self, device: str) -> Path:
        return self.directory / f"tuned-{re.sub(r'[^A-Za-z0-9._-]+', '_', device)}.json"

    def get(self, device: str, kernel: str, key: str, stamp: dict) -> triton.Config | None:
        if device not in self._files:
            self._files[device] = self._read(self.path(device))
        entry = self._files[device].get(kernel, {}).get(key)
        if entry is None or any(entry.get(k) != v for k, v in stamp.items()):
            return None
        return config_from_json(entry["config"])

    def put(self, device: str, kernel: str, key: str, stamp: dict, config: triton.Config) -> None:
        path = self.path(device)
        entries = self._read(path)  # what other processes wrote since this one read it
        entries.setdefault(kernel, {})[key] = {"config": config_to_json(config), **stamp}
        self._files[device] = entries
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as f:
                json.dump({"device": device, "configs": entries}, f, indent=1)
            os.replace(f.name, path)
        except OSError as error:
            self._warn(path, f"cannot be written ({error}); the winner is kept in memory only")

    def _read(self, path: Path) -> dict:
        try:
            configs = json.loads(path.read_text())["configs"]
            if isinstance(configs, dict):
                return configs
            raise ValueError("'configs' is not an object")
        except (FileNotFoundError, NotADirectoryError):  # no file yet (a write says why if it cannot make one)
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._warn(path, f"cannot be read ({error}); its winners are timed again")
            return {}

    def _warn(self, path: Path, what: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"the tuning cache {path} {what} (set {CACHE_ENV}=off to keep winners in memory only)",
                          RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _winner_cache(directory: str) -> WinnerCache:
    return WinnerCache(Path(directory))


def winner_cache() -> WinnerCache | None:
    """The on-disk cache of autotuned winners ``$ADALLAVA_TUNING_CACHE`` names (default
    ``$XDG_CACHE_HOME/adallava_kernels`` or ``~/.cache/adallava_kernels``), or ``None`` where it is off."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        value = os.path.join(base, "adallava_kernels")
    elif value.strip().lower() in CACHE_OFF:
        return None
    return _winner_cache(os.path.abspath(os.path.expanduser(value)))


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


def launch_fixed(kernel: str, regime: str, configs: list[triton.Config], key: list[str], values: list,
                 device: torch.device, launch) -> None:
    """``launch(config)`` once, for a kernel that is never autotuned at run time: forced by a sweep, else the
    table's config for ``device`` and the bucket of ``key``'s ``values``, else ``configs[0]`` (the
    interpreter's list's first under TRITON_INTERPRET=1).

    The phased kernels launch so: their programs wait on each other's counters and write the KV pages, so
    an autotuner's repeated timed runs are not what they are built for; a miss runs the list's first config
    (the one every test runs), and ``bench.tune`` times the rest into the table."""
    if _RECORDED is not None:
        _RECORDED.append((f"{kernel}/{regime}", bucket_of(key, values)))
    config = _FORCED.get((kernel, regime))
    if config is None and not INTERPRETING and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Cached per (device, overlay, exact sizes): a launch after the first costs a dict lookup.
        cached = (kernel, regime, index, os.environ.get(ENV), *values)
        if cached not in _FIXED:
            _FIXED[cached] = lookup(_device_name(index), kernel, regime, bucket_of(key, values))
        config = _FIXED[cached]
    launch(configs[0] if config is None else config)


class Tuned(KernelInterface):
    """One kernel in one regime: launched with the table's config for its device and bucket, or autotuned.

    ``fn`` is the ``@triton.jit`` kernel, ``autotuner`` the ``triton.autotune`` wrapper of it that a miss
    runs, ``configs`` the autotuner's list. The lookup is cached per (device, key values): a launch after
    the first costs a dict lookup.

    A miss autotunes once per shape bucket, not once per exact size: the winner is kept for the bucket (on
    that device, for that dtype) and launched directly for every later size in it. A kernel keyed by a
    plan's width (the union of a batch's neurons, say) would otherwise time every candidate again for each
    new width, seconds of a serving loop each time. The winner also goes to the :func:`winner_cache` on
    disk, which a later process reads before it autotunes."""

    def __init__(self, fn, autotuner, regime: str, key: list[str]) -> None:
        self.fn, self.autotuner, self.regime, self.key = fn, autotuner, regime, list(key)
        self.name = fn.__name__
        self.configs = autotuner.configs
        self._positions = [fn.arg_names.index(k) for k in self.key]
        self._chosen: dict[tuple, triton.Config | None] = {}
        self._tuned: dict[tuple, triton.Config] = {}  # (device, overlay, bucket, dtype) -> the autotuner's winner
        self.autotuned = 0  # autotuner runs this kernel paid (each a sweep of its configs on a new bucket)
        self.from_disk = 0  # winners read from the winner cache instead

    def _key_values(self, args: tuple, kwargs: dict) -> list:
        return [args[i] if i < len(args) else kwargs[k] for i, k in zip(self._positions, self.key)]

    def config_for(self, args: tuple, kwargs: dict) -> triton.Config | None:
        """The config this launch takes: forced by a sweep, else the table's, else a winner autotuned before
        (in this process or, from the winner cache, in another), else ``None`` (autotune)."""
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
            self._chosen[cache_key] = lookup(self._device(device), self.name, self.regime, bucket_of(self.key, values))
        if self._chosen[cache_key] is not None:
            return self._chosen[cache_key]
        tuned_key = self._tuned_key(args, values)
        if tuned_key not in self._tuned:
            stored = self._stored(args, values)
            if stored is None:
                return None
            self._tuned[tuned_key] = stored
            self.from_disk += 1
        return self._tuned[tuned_key]

    def _tuned_key(self, args: tuple, values: list) -> tuple:
        return (args[0].device.index, os.environ.get(ENV), bucket_of(self.key, values), getattr(args[0], "dtype", None))

    @staticmethod
    def _device(device: torch.device) -> str:
        return _device_name(device.index if device.index is not None else torch.cuda.current_device())

    # -- the winner cache ----------------------------------------------------------------------------

    def _stamp(self) -> dict:
        """What a stored winner must have been timed with: this kernel's source (a ``@triton.jit``'s hash of
        its source and callees), this Triton, this candidate list."""
        candidates = json.dumps([config_to_json(c) for c in self.configs], sort_keys=True)
        return {"source": getattr(self.fn, "cache_key", self.name), "triton": triton.__version__,
                "candidates": hashlib.sha256(candidates.encode()).hexdigest()[:16]}

    def _cache_entry(self, args: tuple, values: list) -> tuple[str, str, dict]:
        """(the kernel/regime, the entry's key: bucket and dtype, its stamp)."""
        dtype = str(getattr(args[0], "dtype", None)).removeprefix("torch.")
        return f"{self.name}/{self.regime}", f"{bucket_of(self.key, values)}|{dtype}", self._stamp()

    def _stored(self, args: tuple, values: list) -> triton.Config | None:
        cache = winner_cache()
        if cache is None or len(self.configs) < 2:
            return None
        kernel, key, stamp = self._cache_entry(args, values)
        return cache.get(self._device(args[0].device), kernel, key, stamp)

    def _store(self, args: tuple, values: list, config: triton.Config) -> None:
        cache = winner_cache()
        if cache is None or len(self.configs) < 2:  # one candidate: nothing was timed
            return
        kernel, key, stamp = self._cache_entry(args, values)
        cache.put(self._device(args[0].device), kernel, key, stamp, config)

    def run(self, *args, grid, warmup, **kwargs):
        config = self.config_for(args, kwargs)
        if config is not None:
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())
        out = self.autotuner.run(*args, grid=grid, warmup=warmup, **kwargs)
        if not INTERPRETING and args[0].device.type == "cuda":
            self.autotuned += 1
            values = self._key_values(args, kwargs)
            self._tuned[self._tuned_key(args, values)] = self.autotuner.best_config
            self._store(args, values, self.autotuner.best_config)
        return out
