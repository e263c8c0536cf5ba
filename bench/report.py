"""Validation report: when a plan predicts 60% of the FLOPs, does it take 60% of the time?

Each (op, series) group of measurements is judged on two numbers: the Pearson
correlation of measured seconds with predicted FLOPs, and the worst deviation
from proportionality, anchored at the plan with the most FLOPs (the dense or
fullest plan). A high correlation alone is not enough: ``t = a + b * flops``
with a large fixed cost ``a`` correlates perfectly yet saves far less time
than the plan promises, and only the deviation shows it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path
from typing import Sequence

import numpy as np

from ._common import format_table

MIN_PEARSON = 0.99
MAX_DEVIATION = 0.10
REQUIRED_KEYS = ("op", "series", "label", "flops", "seconds")
COLUMNS = (("op", "op"), ("series", "series"), ("plans", "plans"), ("pearson", "pearson r"),
           ("slope", "slope (s/TFLOP)"), ("intercept", "intercept (ms)"),
           ("deviation", "worst deviation"), ("verdict", "verdict"))


@dataclasses.dataclass(frozen=True)
class SeriesReport:
    """How one series of one op scales; ``None`` where a statistic cannot be computed."""

    op: str
    series: str
    points: int
    pearson: float | None
    slope: float | None
    intercept: float | None
    worst_deviation: float
    worst_label: str
    verdict: str


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as float64 arrays of the same length, at least 2 points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"x and y must be 1-D sequences, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError(f"x and y need at least 2 points, got {len(x)}")
    return x, y


def _centered(values: np.ndarray, name: str) -> np.ndarray:
    centered = values - values.mean()
    if not np.any(centered):
        raise ValueError(f"{name} has zero variance (every value is {values[0]:g})")
    return centered


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient of ``x`` and ``y``."""
    x, y = _paired(x, y)
    dx, dy = _centered(x, "x"), _centered(y, "y")
    r = np.dot(dx, dy) / math.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    return float(np.clip(r, -1.0, 1.0))  # rounding can push a perfect fit just past 1


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``y`` on ``x``."""
    x, y = _paired(x, y)
    dx = _centered(x, "x")
    slope = float(np.dot(dx, y - y.mean()) / np.dot(dx, dx))
    return slope, float(y.mean() - slope * x.mean())


def proportional_deviations(flops: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """Relative deviation of each time from ``seconds_ref * flops / flops_ref``.

    The reference is the point with the most FLOPs: it is the plan every other
    plan is meant to be a fraction of.
    """
    flops, seconds = np.asarray(flops, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    if len(flops) != len(seconds) or len(flops) == 0:
        raise ValueError(f"flops and seconds must be non-empty and of the same length, "
                         f"got {len(flops)} and {len(seconds)}")
    if np.any(flops <= 0) or np.any(seconds <= 0):
        raise ValueError("flops and seconds must all be positive")
    ref = int(np.argmax(flops))
    expected = seconds[ref] * flops / flops[ref]
    return (seconds / expected - 1.0).tolist()


def _validated(rows: Sequence[dict]) -> list[dict]:
    for i, row in enumerate(rows):
        for key in REQUIRED_KEYS:
            if key not in row:
                raise ValueError(f"rows[{i}] has no {key!r} key; every row needs {', '.join(REQUIRED_KEYS)}")
        for key in ("flops", "seconds"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rows[{i}][{key!r}] must be a positive finite number, got {value!r}")
    return list(rows)


def _groups(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows keyed by (op, series), in the order each group first appears."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in _validated(rows):
        groups.setdefault((row["op"], row["series"]), []).append(row)
    return groups


def _verdict(points: int, flops_vary: bool, r: float | None, deviation: float, label: str) -> str:
    if points < 3 or not flops_vary:
        return f"too few plans ({points}{'' if flops_vary else ', all with the same FLOPs'})"
    reasons = []
    if r is None:
        reasons.append("r undefined (time is constant)")
    elif r < MIN_PEARSON:
        # Truncate rather than round, so a failing r never prints as the threshold itself.
        reasons.append(f"r {math.floor(r * 1e4) / 1e4:.4f} < {MIN_PEARSON:g}")
    if abs(deviation) > MAX_DEVIATION:
        reasons.append(f"worst deviation {deviation:+.1%} at {label} > {MAX_DEVIATION:.0%}")
    return "; ".join(reasons) or "follows FLOPs"


def _report(op: str, series: str, rows: list[dict]) -> SeriesReport:
    flops = [row["flops"] for row in rows]
    seconds = [row["seconds"] for row in rows]
    flops_vary = len(set(flops)) > 1
    slope = intercept = r = None
    if flops_vary:
        slope, intercept = linear_fit(flops, seconds)
        if len(rows) >= 3 and len(set(seconds)) > 1:
            r = pearson(flops, seconds)
    deviations = proportional_deviations(flops, seconds)
    worst = max(range(len(rows)), key=lambda i: abs(deviations[i]))
    label = str(rows[worst]["label"])
    return SeriesReport(op, series, len(rows), r, slope, intercept, deviations[worst], label,
                        _verdict(len(rows), flops_vary, r, deviations[worst], label))


def summarize(rows: Sequence[dict]) -> list[SeriesReport]:
    """One report per (op, series), in the order the groups first appear in ``rows``."""
    return [_report(op, series, group) for (op, series), group in _groups(rows).items()]


def _cells(report: SeriesReport) -> dict[str, str]:
    """A report's columns as display strings, ``-`` where a value could not be computed."""
    def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, spec)

    return {"op": report.op, "series": report.series, "plans": str(report.points),
            "pearson": fmt(report.pearson, ".4f"), "slope": fmt(report.slope, ".4g", 1e12),
            "intercept": fmt(report.intercept, ".4f", 1e3),
            "deviation": f"{report.worst_deviation:+.1%} ({report.worst_label})", "verdict": report.verdict}


def table(reports: Sequence[SeriesReport]) -> str:
    """The reports as an aligned text table."""
    return format_table([_cells(r) for r in reports], [(key, header, "") for key, header in COLUMNS])


def markdown(reports: Sequence[SeriesReport], meta: dict) -> str:
    """A Markdown summary to paste into an issue: run metadata, the table and the thresholds."""
    def field(key: str) -> str:
        return str(meta.get(key) or "unknown")

    header = (f"**device** {field('device')} · **dtype** {field('dtype')} · **commit** `{field('commit')}`"
              f" · **date** {field('date')} · **command** `{field('command')}`")
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for report in reports:
        cells = _cells(report)
        # A literal pipe would split the cell in two.
        lines.append("| " + " | ".join(cells[key].replace("|", "\\|") for key, _ in COLUMNS) + " |")
    thresholds = (f"A series follows FLOPs when Pearson r >= {MIN_PEARSON:g} and every plan's time is within "
                  f"{MAX_DEVIATION:.0%} of proportional to its FLOPs, anchored at its largest-FLOPs plan.")
    return "\n".join([header, "", *lines, "", thresholds]) + "\n"


def plot(rows: Sequence[dict], path: str | Path) -> Path:
    """Measured time against predicted FLOPs, one subplot per op, written as a PNG."""
    # Imported here so that summarizing never needs matplotlib; the Agg canvas
    # renders off-screen without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _groups(rows)
    if not groups:
        raise ValueError("rows is empty: there is nothing to plot")
    ops = list(dict.fromkeys(op for op, _ in groups))
    ncols, nrows = min(2, len(ops)), math.ceil(len(ops) / 2)
    fig = Figure(figsize=(6 * ncols, 4.5 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, op in zip(axes, ops):
        for (group_op, series), group in groups.items():
            if group_op != op:
                continue
            tflops = np.array([row["flops"] for row in group]) / 1e12
            ms = np.array([row["seconds"] for row in group]) * 1e3
            (points,) = ax.plot(tflops, ms, "o", label=series)
            ref = int(np.argmax(tflops))
            ax.plot([0.0, tflops[ref]], [0.0, ms[ref]], "--", color=points.get_color(),
                    label=f"{series}, proportional")
        ax.set(title=op, xlabel="predicted TFLOPs", ylabel="measured time (ms)")
        ax.set_xlim(left=0), ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def report_json(reports: Sequence[SeriesReport]) -> list[dict]:
    return [dataclasses.asdict(r) for r in reports]
