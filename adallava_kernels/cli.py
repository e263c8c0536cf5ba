"""What the project's command lines share: an argument error is one line on stderr with exit status 2.

argparse prints its usage before an error, so an error that names the option at fault ends up under
a screenful of options; ``python -m bench``, ``bench.compare``, ``bench.plot``, ``bench.gpu_check``,
``model.generate`` and ``model.convert`` print only the line (``--help`` still prints the usage).
"""

from __future__ import annotations

import argparse
from typing import Callable, NoReturn, TypeVar

__all__ = ["ArgumentParser", "checked"]

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose :meth:`error` prints ``PROG: error: MESSAGE`` alone, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def checked(parser: argparse.ArgumentParser, check: Callable[..., T], *args, **kwargs) -> T:
    """``check(*args, **kwargs)``; its ``ValueError`` or ``TypeError`` (a message naming the option, as the
    ``adallava_kernels.checks`` helpers give) ends the command through ``parser.error``."""
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
