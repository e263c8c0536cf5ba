"""Before and after: every case two runs share, new wall time against old, regressions flagged.

    python -m bench --compare OLD/results.json ...     # run, then compare with OLD
    python -m bench.compare OLD/results.json NEW/results.json

A case is matched by what it ran (op, shape, provider, plan label, budget),
not by its position, so runs with different options compare on the cases
they share. The ratio is new / old wall-time median; over ``1 + THRESHOLD``
is a regression, and under ``1 - THRESHOLD`` faster, only where the two
medians differ by more than the two runs' IQRs together: a larger change
inside that spread is marked ``within IQR``, as the timing did not resolve
it. Runs timed on a CPU are compared but not judged: there, two runs of the
same code differ by more than each case's own IQR (machine load, clocks and
memory placement move whole runs), so a change over the threshold is marked
``not judged``, never a regression. Reads the current format and the first
GPU run's (which has no IQR).
"""

from __future__ import annotations

import argparse
import math
import sys

from adallava_kernels.cli import ArgumentParser

from ._common import format_table, load_results, non_negative_float, row_iqr, row_seconds
from .timing import within_spread

THRESHOLD = 0.05
LATENCY_METRICS = ("ttft", "tpot", "e2e")


def cases(results: dict) -> dict[str, dict]:
    """Every timed case's timing fields (``median_s`` or, in the first GPU run's model rows, ``seconds``),
    keyed by a name that says what ran."""
    found: dict[str, dict] = {}
    for r in results.get("mlp", {}).get("rows", []):
        found[f"mlp {r['model']} {r['tokens']} tok {r['provider']} {r['neurons']} neurons"] = r
    for r in results.get("attention", {}).get("rows", []):
        found[f"attention {r['model']} {r['stage']} b{r['batch']} q{r['q_len']} kv{r['kv_len']} {r['provider']} "
              f"{r['heads']} heads"] = r
    for r in results.get("kv_cache", {}).get("bandwidth", []):
        found[f"kv {r['model']} {r['op']}"] = r
    for r in results.get("model_runs", {}).get("rows", []):
        found[f"model {r['model']} {r['stage']} {r['label']}"] = r
    for r in results.get("latency", {}).get("rows", []):
        for metric in LATENCY_METRICS:
            found[f"latency {r['model']} {r['family']} {r['budget']:.2f} {metric}"] = r[metric]
    return found


def case_times(results: dict) -> dict[str, float]:
    """Wall-time median of every timed case, keyed as :func:`cases`."""
    return {case: row_seconds(row) for case, row in cases(results).items()}


def gpu_sources(results: dict) -> list[str]:
    """How the run's GPU times were taken (``gpu_source`` of its rows), in first-seen order."""
    return list(dict.fromkeys(row["gpu_source"] for row in cases(results).values() if row.get("gpu_source")))


def unstable_cases(results: dict) -> list[str]:
    """The cases whose IQR exceeds 5% of their median."""
    return [case for case, row in cases(results).items() if row.get("unstable")]


def judged(new: dict, old: dict) -> bool:
    """Whether a change between the two runs can be judged: neither was timed on a CPU."""
    return "cpu" not in (new.get("device_type"), old.get("device_type"))


def verdict(new_row: dict, old_row: dict, threshold: float = THRESHOLD, judge: bool = True) -> str:
    """``regression``, ``faster``, ``within IQR`` (over the threshold, inside the runs' combined IQR), ``not judged``
    (over the threshold, on a CPU) or ``same``."""
    new_s, old_s = row_seconds(new_row), row_seconds(old_row)
    ratio = new_s / old_s if old_s > 0 else math.inf
    if 1 - threshold <= ratio <= 1 + threshold:
        return "same"
    if not judge:
        return "not judged"
    if within_spread(new_s, row_iqr(new_row), old_s, row_iqr(old_row)):
        return "within IQR"
    return "regression" if ratio > 1 else "faster"


def compare(new: dict, old: dict, threshold: float = THRESHOLD) -> dict:
    """Rows of (case, new_s, old_s, ratio, verdict) for the cases both runs timed, in the new run's order,
    and the cases only one of them has."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    new_cases, old_cases = cases(new), cases(old)
    judge = judged(new, old)
    rows = []
    for case, new_row in new_cases.items():
        if case not in old_cases:
            continue
        old_row = old_cases[case]
        new_s, old_s = row_seconds(new_row), row_seconds(old_row)
        rows.append({"case": case, "new_s": new_s, "old_s": old_s, "ratio": new_s / old_s if old_s > 0 else math.inf,
                     "new_iqr_s": row_iqr(new_row), "old_iqr_s": row_iqr(old_row),
                     "verdict": verdict(new_row, old_row, threshold, judge)})
    return {
        "threshold": threshold, "judged": judge, "rows": rows,
        "only_new": [c for c in new_cases if c not in old_cases],
        "only_old": [c for c in old_cases if c not in new_cases],
        "regressions": sum(r["verdict"] == "regression" for r in rows),
        "faster": sum(r["verdict"] == "faster" for r in rows),
        "within_iqr": sum(r["verdict"] == "within IQR" for r in rows),
        "not_judged": sum(r["verdict"] == "not judged" for r in rows),
        "geomean_ratio": math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
        if rows and all(0 < r["ratio"] < math.inf for r in rows) else None,
    }


def _runs_line(new: dict, old: dict) -> str:
    def run(results):
        meta = results.get("meta", {})
        return f"{meta.get('device', '?')}, {meta.get('dtype', '?')}, commit {meta.get('commit', '?')}, " \
               f"{meta.get('date', '?')}"

    line = f"new: {run(new)}\nold: {run(old)}"
    if new.get("meta", {}).get("device") != old.get("meta", {}).get("device"):
        line += "\nthe runs were made on different devices: the ratios compare machines as well as code"
    return line


def summary(result: dict) -> str:
    geomean = result["geomean_ratio"]
    limit = f"{result['threshold']:.0%}"
    if not result.get("judged", True):
        return (f"{len(result['rows'])} cases in common, timed on a CPU: {result['not_judged']} changed by more than "
                f"{limit}, not judged (two runs of the same code on a CPU differ by more than their IQRs)"
                + ("" if geomean is None else f", geometric mean ratio {geomean:.3f}")
                + f"; {len(result['only_new'])} only in the new run, {len(result['only_old'])} only in the old one")
    return (f"{len(result['rows'])} cases in common: {result['regressions']} slower by more than {limit} and by more "
            f"than the runs' combined IQR (regression), {result['faster']} faster by more than {limit} and the IQR, "
            f"{result.get('within_iqr', 0)} changed by more than {limit} but within the IQR"
            + ("" if geomean is None else f", geometric mean ratio {geomean:.3f}")
            + f"; {len(result['only_new'])} only in the new run, {len(result['only_old'])} only in the old one")


COLUMNS = [("case", "case", "s"), ("new_ms", "new ms", ".4f"), ("old_ms", "old ms", ".4f"),
           ("ratio", "new / old", ".3f"), ("flag", "", "s")]


def _shown(result: dict) -> list[dict]:
    return [r | {"new_ms": r["new_s"] * 1e3, "old_ms": r["old_s"] * 1e3,
                 "flag": {"regression": "REGRESSION", "faster": "faster", "within IQR": "(within IQR)",
                          "not judged": "(not judged)"}.get(
                     r["verdict"], "")}
            for r in result["rows"]]


def table(result: dict) -> str:
    if not result["rows"]:
        return "no case in common"
    return format_table(_shown(result), COLUMNS)


def markdown(result: dict) -> str:
    lines = [summary(result) + ".", ""]
    if result["rows"]:
        lines += ["| case | new ms | old ms | new / old | |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['new_ms']:.4f} | {r['old_ms']:.4f} | {r['ratio']:.3f} | {r['flag']} |"
                  for r in _shown(result)]
    return "\n".join(lines)


def render(new: dict, old: dict, result: dict) -> str:
    return "\n".join([_runs_line(new, old), table(result), summary(result)])


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m bench.compare", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", metavar="OLD.json", help="results.json of the earlier run")
    parser.add_argument("new", metavar="NEW.json", help="results.json of the later run")
    parser.add_argument("--threshold", type=non_negative_float, default=THRESHOLD,
                        help=f"relative slow-down flagged as a regression (default {THRESHOLD})")
    args = parser.parse_args(argv)
    try:
        old, new = load_results(args.old, "OLD.json"), load_results(args.new, "NEW.json")
        result = compare(new, old, args.threshold)
    except ValueError as e:
        parser.error(str(e))
    print(render(new, old, result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
