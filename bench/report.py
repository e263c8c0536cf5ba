"""Validation report: when a plan predicts 60% of the FLOPs, does it take 60% of the time?

The measurements of each (op, series) are judged on two numbers: the Pearson
correlation of measured wall time with predicted FLOPs, and the worst
deviation from proportionality, anchored at the plan with the most FLOPs (the
dense or fullest plan). A high correlation alone is not enough: ``t = a + b *
flops`` with a large fixed cost ``a`` correlates perfectly yet saves far less
time than the plan promises, and only the deviation shows it.

A deviation is only held against a series when the timing resolved it: a
point whose time is within its IQR and the anchor's (scaled to its FLOPs) of
proportional could be proportional, and a series whose every deviation over
the limit is of that kind gets no verdict ("within the measured spread"),
rather than one drawn from noise.

The verdict is on wall time, which is what users get. Where the GPU time was
measured its correlation with FLOPs is shown beside it, with the host's share
of the wall time: a series whose GPU time follows the FLOPs while its wall
time does not is held back by the host.

Every series has a role: ``library`` (what ``adallava_kernels`` runs on a GPU:
its Triton kernels, the model's kernel path), ``library (torch)`` (its PyTorch
backend, what runs on a CPU), ``alternative`` (another way to skip the same
work, for comparison) or ``reference`` (a baseline that saves nothing by
design, such as ``zero_mask``: shown, not judged).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import numpy as np

from ._common import format_table
from .timing import within_spread

MIN_PEARSON = 0.99
MAX_DEVIATION = 0.10
REQUIRED_KEYS = ("op", "series", "label", "flops", "seconds")
LIBRARY, LIBRARY_TORCH, ALTERNATIVE, REFERENCE = "library", "library (torch)", "alternative", "reference"
# Series names across the benchmarks and their role. "library" is what the library runs on a GPU (its
# Triton kernels, the model's kernel path); "library (torch)" its PyTorch backend, what runs on a CPU.
# The model's series is "adallava_kernels (backend), all plans" (the first GPU run: "kernels, all plans").
ROLES = {
    "triton": LIBRARY, "kernels, all plans": LIBRARY, "index_select": LIBRARY_TORCH, "sdpa_gathered": LIBRARY_TORCH,
    "pregathered": ALTERNATIVE, "flash_attn": ALTERNATIVE,
    "zero_mask": REFERENCE, "dense": REFERENCE, "sdpa_all": REFERENCE,
}
NOT_JUDGED = "reference: not judged"
FOLLOWS = "follows FLOPs"
WITHIN_SPREAD = "within the measured spread"
NO_SERIES = ("No validation table: no section of this run timed a series of plans against FLOPs (the mlp, "
             "attention and model sections do).")
COLUMNS = (("op", "op"), ("series", "series"), ("role", "role"), ("plans", "plans"), ("pearson", "r wall"),
           ("pearson_gpu", "r GPU"), ("slope", "slope (s/TFLOP)"), ("intercept", "intercept (ms)"),
           ("deviation", "worst deviation"), ("host", "host share"), ("unstable", "IQR > 5%"),
           ("verdict", "verdict (wall)"))


def role_of(series: str) -> str:
    """``library``, ``library (torch)``, ``alternative`` or ``reference``: what a series is there for."""
    if series in ROLES:
        return ROLES[series]
    return LIBRARY if series.startswith("adallava_kernels") else ALTERNATIVE


def r_text(r: float) -> str:
    """r to 4 decimals, truncated toward minus infinity, so a failing r never prints as the threshold itself;
    the table and the verdict both print it this way. The 1e-6 absorbs rounding error, so a perfect fit
    computed as 0.99999999999 prints as 1.0000."""
    return f"{math.floor(r * 1e4 + 1e-6) / 1e4:.4f}"


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
    role: str = LIBRARY
    pearson_gpu: float | None = None
    host_share: float | None = None
    unstable: int = 0

    @property
    def judged(self) -> bool:
        return self.role != REFERENCE

    @property
    def follows(self) -> bool:
        return self.verdict == FOLLOWS

    @property
    def within_spread(self) -> bool:
        """No verdict: every deviation over the limit is inside the measured spread."""
        return self.verdict.startswith(WITHIN_SPREAD)


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


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def _validated(rows: Sequence[dict]) -> list[dict]:
    for i, row in enumerate(rows):
        for key in REQUIRED_KEYS:
            if key not in row:
                raise ValueError(f"rows[{i}] has no {key!r} key; every row needs {', '.join(REQUIRED_KEYS)}")
        for key in ("flops", "seconds"):
            if not _positive(row[key]):
                raise ValueError(f"rows[{i}][{key!r}] must be a positive finite number, got {row[key]!r}")
        gpu = row.get("gpu_seconds")
        if gpu is not None and not _positive(gpu):
            raise ValueError(f"rows[{i}]['gpu_seconds'] must be None or a positive finite number, got {gpu!r}")
    return list(rows)


def _by_series(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows keyed by (op, series), in the order each (op, series) first appears."""
    keyed: dict[tuple[str, str], list[dict]] = {}
    for row in _validated(rows):
        keyed.setdefault((row["op"], row["series"]), []).append(row)
    return keyed


def unresolved(flops: Sequence[float], seconds: Sequence[float], iqrs: Sequence[float]) -> list[bool]:
    """Per point: whether its time is within the IQRs (its own and the anchor's, scaled to its FLOPs) of the
    time proportional to its FLOPs, anchored as :func:`proportional_deviations` is."""
    ref = int(np.argmax(flops))
    return [within_spread(s, iqr, seconds[ref] * f / flops[ref], iqrs[ref] * f / flops[ref])
            for f, s, iqr in zip(flops, seconds, iqrs)]


def _verdict(points: int, flops_vary: bool, r: float | None, deviations: list[float], labels: list[str],
             noise: list[bool]) -> str:
    if points < 3 or not flops_vary:
        return f"too few plans ({points}{'' if flops_vary else ', all with the same FLOPs'})"
    over = [i for i, d in enumerate(deviations) if abs(d) > MAX_DEVIATION]
    resolved = [i for i in over if not noise[i]]
    if over and not resolved:
        worst = max(over, key=lambda i: abs(deviations[i]))
        return (f"{WITHIN_SPREAD}: every deviation over {MAX_DEVIATION:.0%} (worst {deviations[worst]:+.1%} at "
                f"{labels[worst]}) is inside the IQRs; no verdict")
    reasons = []
    if r is None:
        reasons.append("r undefined (time is constant)")
    elif r < MIN_PEARSON:
        reasons.append(f"r {r_text(r)} < {MIN_PEARSON:g}")
    if resolved:
        worst = max(resolved, key=lambda i: abs(deviations[i]))
        reasons.append(f"worst deviation {deviations[worst]:+.1%} at {labels[worst]} > {MAX_DEVIATION:.0%}")
    return "; ".join(reasons) or FOLLOWS


def _correlation(flops: list[float], seconds: list[float]) -> float | None:
    """Pearson r where it is defined: 3 points or more, FLOPs and times that vary."""
    if len(flops) < 3 or len(set(flops)) < 2 or len(set(seconds)) < 2:
        return None
    return pearson(flops, seconds)


def _report(op: str, series: str, rows: list[dict]) -> SeriesReport:
    flops = [row["flops"] for row in rows]
    seconds = [row["seconds"] for row in rows]
    gpu = [row.get("gpu_seconds") for row in rows]
    has_gpu = all(g is not None for g in gpu)
    flops_vary = len(set(flops)) > 1
    slope = intercept = None
    if flops_vary:
        slope, intercept = linear_fit(flops, seconds)
    r = _correlation(flops, seconds)
    deviations = proportional_deviations(flops, seconds)
    worst = max(range(len(rows)), key=lambda i: abs(deviations[i]))
    labels = [str(row["label"]) for row in rows]
    noise = unresolved(flops, seconds, [row.get("iqr_seconds") or 0.0 for row in rows])
    role = rows[0].get("role") or role_of(series)
    verdict = NOT_JUDGED if role == REFERENCE else _verdict(len(rows), flops_vary, r, deviations, labels, noise)
    return SeriesReport(
        op, series, len(rows), r, slope, intercept, deviations[worst], labels[worst], verdict, role,
        pearson_gpu=_correlation(flops, gpu) if has_gpu else None,
        host_share=float(np.median([(s - g) / s for s, g in zip(seconds, gpu)])) if has_gpu else None,
        unstable=sum(bool(row.get("unstable")) for row in rows),
    )


def summarize(rows: Sequence[dict]) -> list[SeriesReport]:
    """One report per (op, series), in the order they first appear in ``rows``."""
    return [_report(op, series, measured) for (op, series), measured in _by_series(rows).items()]


def _cells(report: SeriesReport) -> dict[str, str]:
    """A report's columns as display strings, ``-`` where a value could not be computed."""
    def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, spec)

    return {"op": report.op, "series": report.series, "role": report.role, "plans": str(report.points),
            "pearson": "-" if report.pearson is None else r_text(report.pearson),
            "pearson_gpu": "-" if report.pearson_gpu is None else r_text(report.pearson_gpu),
            "slope": fmt(report.slope, ".4g", 1e12), "intercept": fmt(report.intercept, ".4f", 1e3),
            "deviation": f"{report.worst_deviation:+.1%} ({report.worst_label})",
            "host": fmt(report.host_share, ".0%"), "unstable": str(report.unstable), "verdict": report.verdict}


def table(reports: Sequence[SeriesReport]) -> str:
    """The reports as an aligned text table."""
    return format_table([_cells(r) for r in reports], [(key, header, "") for key, header in COLUMNS])


def summary_line(reports: Sequence[SeriesReport], unstable: int, timed: int, device: str,
                 extra: Sequence[str] = ()) -> str:
    """One sentence: how many of the library's series follow FLOPs (and how many the timing could not judge), the
    end-to-end r, ``extra`` clauses, and how stable the timing was."""
    judged = [r for r in reports if r.role in (LIBRARY, LIBRARY_TORCH)]
    first = f"On {device}, {sum(r.follows for r in judged)} of {len(judged)} library series follow FLOPs in wall time"
    if not judged:
        first = (f"On {device}, no library series was timed against FLOPs (the mlp, attention and model sections "
                 f"time them)")
    noisy = sum(r.within_spread for r in judged)
    if noisy:
        first += (f"; {noisy} {'deviates' if noisy == 1 else 'deviate'} from it only within the measured spread "
                  f"(IQR): no verdict")
    parts = [first]
    for r in reports:
        if r.op.startswith("model ") and r.role in (LIBRARY, LIBRARY_TORCH):
            stage = r.op.rsplit(" ", 1)[-1]
            wall = "-" if r.pearson is None else r_text(r.pearson)
            gpu = "" if r.pearson_gpu is None else f", GPU {r_text(r.pearson_gpu)}"
            host = "" if r.host_share is None else f", host {r.host_share:.0%} of wall"
            spread = " (deviations within the measured spread)" if r.within_spread else ""
            parts.append(f"end to end {stage}: r wall {wall}{gpu}{host}{spread}")
    parts += extra
    if timed:  # the kernels section keeps no IQR, nor the serve section's GPU trace rows
        parts.append(f"{unstable} of {timed} timed cases have an IQR over 5% of their median")
    return "; ".join(parts) + "."


def markdown(reports: Sequence[SeriesReport], meta: dict, summary: str | None = None,
             sections: Sequence[tuple[str, str]] = ()) -> str:
    """A Markdown report to paste into an issue: a one-line summary, run metadata, the validation table,
    the thresholds, then ``sections`` (title, Markdown body) such as the latency table."""
    def field(key: str) -> str:
        return str(meta.get(key) or "unknown")

    header = (f"**device** {field('device')} · **dtype** {field('dtype')} · **commit** `{field('commit')}`"
              f" · **date** {field('date')} · **command** `{field('command')}`")
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for report in reports:
        cells = _cells(report)
        # A literal pipe would split the cell in two.
        lines.append("| " + " | ".join(cells[key].replace("|", "\\|") for key, _ in COLUMNS) + " |")
    thresholds = (f"A series follows FLOPs when the Pearson r of its wall time with FLOPs is >= {MIN_PEARSON:g} "
                  f"and every plan's wall time is within {MAX_DEVIATION:.0%} of proportional to its FLOPs, "
                  f"anchored at its largest-FLOPs plan; a deviation inside the plan's and the anchor's IQRs is not "
                  f"held against it, and a series with no other gets no verdict. r is truncated to 4 decimals. "
                  f"Reference series save nothing by design and are not judged. Host share: (wall - GPU) / wall, "
                  f"the median over the series' plans; IQR > 5%: plans whose timing spread exceeds 5% of the median.")
    if not reports:  # no header over an empty table: say why there is none
        lines, thresholds = [NO_SERIES], ""
    parts = ([summary, ""] if summary else []) + [header, "", *lines] + (["", thresholds] if thresholds else [])
    for title, body in sections:
        parts += ["", f"## {title}", "", body]
    return "\n".join(parts) + "\n"


def report_json(reports: Sequence[SeriesReport]) -> list[dict]:
    return [dataclasses.asdict(r) for r in reports]
