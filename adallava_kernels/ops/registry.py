"""Registering a kernel as a ``torch.ops.adallava`` operator, and calling it without the dispatcher.

A thin module (torch only) that the op modules import to register their own
operators, so that no op module imports :mod:`~adallava_kernels.ops.library`
and the library imports no module that imports it back.
"""

from __future__ import annotations

import torch

__all__ = ["eager_launchers", "register_op"]

# The Python functions behind the registered operators, by name: what an eager caller launches directly.
_FUNCTIONS: dict[str, object] = {}


def register_op(name: str, mutates_args=()):
    """``torch.library.custom_op("adallava::<name>")``, keeping the function for :func:`eager_launchers`."""
    def register(fn):
        _FUNCTIONS[name] = fn
        return torch.library.custom_op(f"adallava::{name}", mutates_args=mutates_args)(fn)
    return register


class _EagerLaunchers:
    """The Triton operators called without the dispatcher outside ``torch.compile`` (a registered Python
    operator costs tens of microseconds of host time a call, which an eager step pays per kernel: a 7B decode
    step launches 165), and through ``torch.ops.adallava`` while ``torch.compile`` traces, where each stays
    one unit of the graph. The same functions run either way, and a CUDA graph records the same kernels."""

    def __getattr__(self, name: str):
        function, op = _FUNCTIONS[name], getattr(torch.ops.adallava, name)

        def launch(*args, **kwargs):
            return op(*args, **kwargs) if torch.compiler.is_compiling() else function(*args, **kwargs)

        launch.__name__ = name
        setattr(self, name, launch)  # resolved once per name
        return launch


_EAGER = _EagerLaunchers()


def eager_launchers() -> _EagerLaunchers:
    """The Triton operators as every launch site calls them (prefill, decode steps, the drop-in modules): see
    :class:`_EagerLaunchers`."""
    return _EAGER
