"""What the project's command lines share: an argument error is one line on stderr with exit status 2.

argparse prints its usage before an error, so an error that names the option at fault ends up under
a screenful of options; ``python -m bench``, ``bench.compare``, ``bench.plot``, ``bench.gpu_check``,
``model.generate`` and ``model.convert`` print only the line (``--help`` still prints the usage).
"""

from __future__ import annotations

import argparse
from typing import Callable, NoReturn, TypeVar

__all__ = ["ArgumentParser", "checked", "fail"]

T = TypeVar("T")


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """End the command with ``PROG: error: MESSAGE`` on one line of stderr, exit status 2 (any parser)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose :meth:`error` prints ``PROG: error: MESSAGE`` alone, exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self, message)


def checked(parser: argparse.ArgumentParser, check: Callable[..., T], *args, **kwargs) -> T:
    """``check(*args, **kwargs)``; its ``ValueError`` or ``TypeError`` (a message naming the option, as the
    ``adallava_kernels.checks`` helpers give) ends the command in one line (:func:`fail`), whatever the parser."""
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError) as error:
        fail(parser, str(error))
