"""What every benchmark shares: timing, run metadata, tables and JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Iterable, Sequence

import torch

from adallava_kernels import PRESETS, cost
from adallava_kernels.checks import check_device
from adallava_kernels.cli import checked
from adallava_kernels.devices import DEVICES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def timing_cells(row: dict) -> dict[str, str]:
    """A timed row's wall time, spread, GPU time and host share as table cells (``-`` where not measured)."""
    gpu, host = row.get("gpu_s"), row.get("host_share")
    return {
        "wall_ms": f"{row['median_s'] * 1e3:.3f}",
        "iqr": f"{row['iqr_ratio']:.1%}" + (" !" if row["unstable"] else ""),
        "gpu_ms": "-" if gpu is None else f"{gpu * 1e3:.3f}",
        "host": "-" if host is None else f"{host:.0%}",
    }


# Columns of timing_cells; "!" marks an IQR over 5% of the median.
TIMING_COLUMNS = [("wall_ms", "wall ms", "s"), ("iqr", "IQR", "s"), ("gpu_ms", "GPU ms", "s"), ("host", "host", "s")]


def progress(items: Iterable, desc: str) -> Iterable:
    """A progress bar over ``items`` on a terminal (tqdm turns itself off when stderr is not one)."""
    from tqdm import tqdm

    return tqdm(list(items), desc=desc, leave=False, disable=None, file=sys.stderr)


def checked_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """``--device`` as a device this process can allocate on; otherwise the parser exits with status 2 and a
    one-line error naming ``--device``.

    Checked after parsing rather than with ``type=``, so that the error is one line rather than under the long
    usage; left to torch, a CUDA device without CUDA fails deep inside with an ``AssertionError``.
    """
    return checked(parser, check_device, "--device", text)


# -- option types: each a one-line error naming the option (argparse prefixes "argument --NAME: ") ----------

def positive(kind):
    """An option type: a ``kind`` (int or float) > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def non_negative_int(text: str) -> int:
    """An option type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An option type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """An option type: comma-separated positive ints."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return values


def model_list(text: str) -> list[str]:
    """An option type: comma-separated model presets."""
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated models of {', '.join(sorted(PRESETS))}, "
                                         f"got {text!r}")
    return names


ROOFLINE_DEVICES = (*DEVICES, "measure")


def roofline_device(text: str) -> str:
    """An option type: a device the roofline predicts for (``measure``: this CPU, probed when used)."""
    if text not in ROOFLINE_DEVICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(ROOFLINE_DEVICES)}, got {text!r}")
    return text


def default_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``, by default bfloat16 on CUDA and float32 on a CPU."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on a CPU): a wall clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # torch.utils.benchmark times on one thread; the machine's size is context.
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores), timed on 1 thread"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def metadata(device: torch.device, dtype: torch.dtype, module: str = "bench") -> dict:
    """Where and how a run was made, stored with its numbers; ``module``: what ``python -m`` ran."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable), "-m", module, *sys.argv[1:]]),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a Markdown table; ``columns`` as :func:`format_table`'s. A literal pipe would split a cell."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], spec).replace("|", "\\|") for key, _, spec in columns) + " |")
    return "\n".join(lines)


def row_seconds(row: dict) -> float:
    """A timed row's wall time (its median); the first GPU run's model rows called it ``seconds``."""
    return row["median_s"] if "median_s" in row else row["seconds"]


def error_record(error: BaseException) -> dict:
    """An exception as results.json records it, with its traceback printed to stderr."""
    traceback.print_exc()
    return {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}


def row_iqr(row: dict) -> float:
    """A timed row's wall-time IQR; 0 for the first GPU run's model rows, which recorded none."""
    return row["q3_s"] - row["q1_s"] if "q1_s" in row and "q3_s" in row else 0.0


def ideal_ratio(row: dict, metric: str) -> float:
    """The FLOPs ratio to the full plan that a latency row's plan predicts for ``metric`` (ttft, tpot, e2e): its
    ideal time is that share of the full plan's (runs before ``flops_ratios`` recorded only the prefill's)."""
    ratios = row.get("flops_ratios")
    return ratios[metric] if ratios else row["flops_ratio"]


def si_scale(value: float) -> tuple[float, str]:
    """The scale and SI prefix of the largest unit (T down to none) that ``value`` reaches."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return scale, prefix
    return 1.0, ""


def flops_unit(flops: float) -> tuple[float, str]:
    """The scale and name of the largest unit (TFLOP down to FLOP) that ``flops`` reaches."""
    scale, prefix = si_scale(flops)
    return scale, prefix + "FLOP"


def si_text(value: float, unit: str) -> str:
    """``value`` in the SI prefix that fits, four significant digits: ``215.2 MFLOP``, ``13.48 GB``."""
    scale, prefix = si_scale(value)
    return f"{value / scale:.4g} {prefix}{unit}"


flops_text = cost.format_flops  # one FLOPs format for the library, its CLIs and the bench


def load_results(path: str | Path, argument: str = "RESULTS") -> dict:
    """A ``results.json`` written by ``python -m bench``; a ``ValueError`` naming ``argument`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: {path} is not a file")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{argument}: {path} is not JSON ({e})") from None
    if not isinstance(results, dict) or "meta" not in results:
        raise ValueError(f"{argument}: {path} is not a results.json written by python -m bench (no 'meta')")
    return results


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
