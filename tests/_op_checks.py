"""Bad calls of the extension's raw ops, ``torch.ops.adallava.kv_append`` and ``kv_gather``.

A bad argument that native code mishandles kills the process (on the H200
image it did: a segfault formatting the message). So the tests run these
calls in a child process: ``python tests/_op_checks.py DEVICE`` makes every
case's arguments, calls the raw op, and prints one JSON object mapping each
case to what it raised and whether the pools were left as they were. It names
each case on stderr before running it, so a crash says which case died.

Shape, dtype and layout cases run on DEVICE. The page-index and position
cases run on the CPU: only the CPU op reads the tables (the CUDA op trusts
them), and :func:`adallava_kernels.kv_cache.ops.kv_append` does not check
them in Python.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, NamedTuple

import torch


class Case(NamedTuple):
    op: str  # "kv_append" or "kv_gather"
    args: Callable[[torch.device], tuple]  # the op's arguments, made on a device; k_pages and v_pages first
    match: str  # a regex the message must match
    reads_tables: bool  # a check of page indices or positions: the CPU op's only


def int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def rows_call(device, **change) -> tuple:
    """A good rows-form kv_append with ``change`` applied: pools [6, 4, 8], 2 rows of 5 tokens."""
    args = {
        "k_pages": torch.zeros(6, 4, 8), "v_pages": torch.zeros(6, 4, 8),
        "key": torch.randn(2, 5, 8), "value": torch.randn(2, 5, 8),
        "block_tables": [[3, 1], [0, 5]], "starts": [1, 0],
    } | change
    return _on(device, args)


def batched_call(device, **change) -> tuple:
    """A good batched kv_append with ``change`` applied: pools [6, 4, 8], key [2 batch, 3 heads, 1 token, 8]."""
    args = {
        "k_pages": torch.zeros(6, 4, 8), "v_pages": torch.zeros(6, 4, 8),
        "key": torch.randn(2, 3, 1, 8), "value": torch.randn(2, 3, 1, 8),
        "block_tables": torch.zeros(2, 3, 1, dtype=torch.int32), "starts": torch.zeros(2, dtype=torch.int32),
    } | change
    return _on(device, args)


def gather_call(device, block_tables, length) -> tuple:
    return (torch.zeros(6, 4, 8, device=device), torch.zeros(6, 4, 8, device=device),
            int32(block_tables, device), length)


def _on(device, args: dict) -> tuple:
    return tuple(
        (t if isinstance(t, torch.Tensor) else int32(t, "cpu")).to(device) for t in args.values()
    )


CASES: dict[str, Case] = {
    # rows form
    "rows-head-dim": Case("kv_append", lambda d: rows_call(d, key=torch.randn(2, 5, 7)),
                          r"key must be \[rows, tokens, 8\]", False),
    "rows-value-shape": Case("kv_append", lambda d: rows_call(d, value=torch.randn(2, 4, 8)),
                             "value must have the shape of key", False),
    "rows-key-dtype": Case(
        "kv_append", lambda d: rows_call(d, key=torch.randn(2, 5, 8).double(), value=torch.randn(2, 5, 8).double()),
        "key must have the dtype", False),
    "rows-tables-int64": Case("kv_append", lambda d: rows_call(d, block_tables=torch.tensor([[3, 1], [0, 5]])),
                              "block_tables must be int32", False),
    "rows-tables-rows": Case("kv_append", lambda d: rows_call(d, block_tables=[[3, 1]]),
                             r"block_tables must have one row per key row \(2\)", False),
    "rows-starts": Case("kv_append", lambda d: rows_call(d, starts=[1]),
                        r"starts must have one entry per key row \(2\)", False),
    "rows-v-pages-dtype": Case("kv_append", lambda d: rows_call(d, v_pages=torch.zeros(6, 4, 8).half()),
                               "v_pages must have the dtype of k_pages", False),
    "rows-pools-4d": Case("kv_append",
                          lambda d: rows_call(d, k_pages=torch.zeros(6, 4, 8, 1), v_pages=torch.zeros(6, 4, 8, 1)),
                          "k_pages must be 3-D", False),
    # batched form (the runtime's)
    "batched-head-dim": Case("kv_append",
                             lambda d: batched_call(d, key=torch.randn(2, 3, 1, 7), value=torch.randn(2, 3, 1, 7)),
                             r"key must be \[batch, heads, tokens, 8\]", False),
    "batched-tables-heads": Case("kv_append",
                                 lambda d: batched_call(d, block_tables=torch.zeros(2, 2, 3, dtype=torch.int32)),
                                 r"block_tables must be \[batch, heads, pages\] = \[2, 3", False),
    "batched-tables-rows-form": Case("kv_append",
                                     lambda d: batched_call(d, block_tables=torch.zeros(6, 3, dtype=torch.int32)),
                                     "block_tables must be 3-D", False),
    "batched-starts": Case("kv_append", lambda d: batched_call(d, starts=torch.zeros(6, dtype=torch.int32)),
                           r"starts must have one entry per batch row \(2\)", False),
    # page indices and positions (the CPU op reads the tables)
    # Batch row 1's three heads are table rows 3-5: three tokens from position 2 overflow their one page.
    "batched-past-the-pages": Case(
        "kv_append",
        lambda d: batched_call(d, key=torch.randn(2, 3, 3, 8), value=torch.randn(2, 3, 3, 8), starts=[0, 2]),
        r"row 3: positions \[2, 5\) do not fit the 1 pages of its block_tables row", True),
    "rows-bad-page": Case("kv_append", lambda d: rows_call(d, block_tables=[[3, 1], [0, 6]]),
                          r"block_tables\[1, 1\] = 6 is not a page of the pool \[0, 6\)", True),
    "rows-past-the-pages": Case("kv_append", lambda d: rows_call(d, starts=[4, 0]),
                                r"row 0: positions \[4, 9\) do not fit the 2 pages", True),
    "gather-length": Case("kv_gather", lambda d: gather_call(d, [[3, 1]], 9), r"length 9 must be in \[0, 8\]", True),
}


def case_device(case: Case, device: torch.device) -> torch.device:
    return torch.device("cpu") if case.reads_tables else device


def run(device: torch.device) -> dict:
    results = {}
    for name, case in CASES.items():
        print(f"case {name}", file=sys.stderr, flush=True)
        args = case.args(case_device(case, device))
        k_pages, v_pages = args[0], args[1]
        before = (k_pages.clone(), v_pages.clone())
        error = message = None
        try:
            getattr(torch.ops.adallava, case.op)(*args)
        except Exception as e:  # noqa: BLE001  (any type is reported; the test says which it expects)
            error, message = type(e).__name__, str(e)
        untouched = torch.equal(k_pages, before[0]) and torch.equal(v_pages, before[1])
        results[name] = {"error": error, "message": message, "untouched": untouched}
    return results


if __name__ == "__main__":
    import adallava_kernels._C  # noqa: F401  (registers the raw ops, with no Python in front of them)

    torch.manual_seed(0)
    print(json.dumps(run(torch.device(sys.argv[1]))))
