"""Before and after: every case two runs share, new wall time against old, regressions flagged.

    python -m bench --compare OLD/results.json ...     # run, then compare with OLD
    python -m bench.compare OLD/results.json NEW/results.json

A case is matched by what it ran (op, shape, provider, plan label, budget;
a serving event and batch size, or a served trace and metric; a profiled kernel's layer, stage,
sub-block and name), not by its position, so runs with different options
compare on the cases they share. A section whose settings differ between
the runs (the serve section's host shape or trace, the kernels section's
backend, ...) is not paired at all, and every section that is not, or only in part,
is named with the reason: in one run only, failed in one, settings that
differ, or cases that differ. The ratio is new / old wall-time median; over
``1 + THRESHOLD`` is a regression, and under ``1 - THRESHOLD`` faster, only where the two
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


def _mlp_cases(section: dict) -> dict[str, dict]:
    return {f"mlp {r['model']} {r['tokens']} tok {r['provider']} {r['neurons']} neurons": r for r in section["rows"]}


def _attention_cases(section: dict) -> dict[str, dict]:
    return {f"attention {r['model']} {r['stage']} b{r['batch']} q{r['q_len']} kv{r['kv_len']} {r['provider']} "
            f"{r['heads']} heads": r for r in section["rows"]}


def _kv_cases(section: dict) -> dict[str, dict]:
    return {f"kv {r['model']} {r['op']}": r for r in section.get("bandwidth", [])}


def _model_cases(section: dict) -> dict[str, dict]:
    return {f"model {r['model']} {r['stage']} {r['label']}": r for r in section["rows"]}


def _latency_cases(section: dict) -> dict[str, dict]:
    return {f"latency {r['model']} {r['family']} {r['budget']:.2f} {metric}": r[metric]
            for r in section["rows"] for metric in LATENCY_METRICS}


def _serve_cases(section: dict) -> dict[str, dict]:
    """Each serving event's host time at each batch size (meta device), and on a GPU each trace's (mixed
    plans, full plans) TTFT, TPOT and step wall and GPU times; a run of the old serve section (requests one
    by one, then one batch) has none of these: its cases are named apart and pair with nothing new."""
    if "batch" in section and "keys" not in section:  # the old section
        return {f"serve {section['model']} {r['label']} (one by one)": {"median_s": r["tpot_s"]}
                for r in section["rows"]}
    from .serve import summary_cases

    return summary_cases(section)


def _kernels_cases(section: dict) -> dict[str, dict]:
    """Each kernel by its layer, stage, sub-block, name and how many of that name came before it there (so one
    kernel more or less in a sub-block unpairs that sub-block's kernels of its name, not every later one), and
    each layer's total."""
    found = {}
    for layer in section["layers"]:
        head = f"kernels {section['model']} {layer['layer']} layer {layer['stage']}"
        seen: dict[tuple, int] = {}
        for k in layer["kernels"]:
            where = (k["stage"] or "-", k["name"])
            seen[where] = seen.get(where, 0) + 1
            found[f"{head} {where[0]} {k['name']} #{seen[where]}"] = {"median_s": k["seconds"]}
        found[f"{head} total"] = {"median_s": layer["total_s"]}
    return found


# Per timed section of results.json (named as --only names it): its key, the cases of its rows, and the settings
# its rows do not name but that change what they measure: where both runs record one and they differ, the section
# is not paired.
SECTIONS = {
    "mlp": ("mlp", _mlp_cases, ("scale",)),
    "attention": ("attention", _attention_cases, ("scale", "prefill", "decode")),
    "kv": ("kv_cache", _kv_cases, ("shape",)),
    "model": ("model_runs", _model_cases, ("shape", "tokens", "backend")),
    "latency": ("latency", _latency_cases, ("shape", "prompt_tokens", "new_tokens", "backend")),
    "serve": ("serve", _serve_cases, ("host_shape", "capacity", "gpu_trace", "backend")),
    "kernels": ("kernels", _kernels_cases, ("shape", "dtype", "backend", "tokens", "context")),
}


def section_cases(results: dict) -> dict[str, dict[str, dict]]:
    """Per section the run holds, its timed cases (as :func:`cases`)."""
    return {name: cases_of(results[key]) for name, (key, cases_of, _) in SECTIONS.items() if key in results}


def cases(results: dict) -> dict[str, dict]:
    """Every timed case's timing fields (``median_s`` or, in the first GPU run's model rows, ``seconds``),
    keyed by a name that says what ran; its first word is its section."""
    return {case: row for found in section_cases(results).values() for case, row in found.items()}


def case_times(results: dict) -> dict[str, float]:
    """Wall-time median of every timed case, keyed as :func:`cases`."""
    return {case: row_seconds(row) for case, row in cases(results).items()}


def gpu_sources(results: dict) -> list[str]:
    """How the run's GPU times were taken (``gpu_source`` of its rows), in first-seen order."""
    return list(dict.fromkeys(row["gpu_source"] for row in cases(results).values() if row.get("gpu_source")))


def spread_cases(results: dict) -> list[str]:
    """The cases timed with a spread of their own (an IQR, flagged when over 5% of the median); the kernels
    section times each case as a median with no spread kept, and the serve section's GPU trace reports
    medians over its requests and steps, whose spread is the trace's, not the timing's."""
    return [case for case, row in cases(results).items() if "unstable" in row]


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


def _setting_text(value) -> str:
    return str(value) if not isinstance(value, dict) else ", ".join(f"{k} {v}" for k, v in value.items())


def _differing_settings(name: str, new: dict, old: dict) -> list[str]:
    """The settings of section ``name`` both runs record and that differ, as ``setting NEW (new), OLD (old)``."""
    key, _, settings = SECTIONS[name]
    return [f"{setting} {_setting_text(new[key][setting])} (new), {_setting_text(old[key][setting])} (old)"
            for setting in settings
            if setting in new[key] and setting in old[key] and new[key][setting] != old[key][setting]]


def _failed(results: dict, name: str) -> str | None:
    error = results.get("errors", {}).get(name)
    return None if error is None else f"{error['type']}: {error['message']}"


def _cases(count: int) -> str:
    return f"{count} case" + ("" if count == 1 else "s")


def _pairing_reason(name: str, new: dict, old: dict, new_cases: dict, old_cases: dict,
                    differing: list[str]) -> str | None:
    """Why section ``name``'s cases did not all pair (``None`` when they did)."""
    reasons = [f"failed in the {which} run ({failure})" for which, run in (("new", new), ("old", old))
               if (failure := _failed(run, name))]
    if differing:
        reasons.append("the runs differ in " + "; ".join(differing))
    elif not new_cases and not old_cases:
        pass  # in neither run: nothing to say unless it failed
    elif (not new_cases or not old_cases) and not reasons:
        reasons.append(f"not in the {'old' if not old_cases else 'new'} run")
    elif new_cases and old_cases:
        only_new = [c for c in new_cases if c not in old_cases]
        only_old = [c for c in old_cases if c not in new_cases]
        if only_new or only_old:
            reasons.append(f"{_cases(len(only_new))} only in the new run, {len(only_old)} only in the old one "
                           f"(what ran differs, e.g. {(only_new or only_old)[0]!r})")
    return "; ".join(reasons) or None


def _row(case: str, new_row: dict, old_row: dict, threshold: float, judge: bool) -> dict:
    new_s, old_s = row_seconds(new_row), row_seconds(old_row)
    return {"case": case, "new_s": new_s, "old_s": old_s, "ratio": new_s / old_s if old_s > 0 else math.inf,
            "new_iqr_s": row_iqr(new_row), "old_iqr_s": row_iqr(old_row),
            "verdict": verdict(new_row, old_row, threshold, judge)}


def compare(new: dict, old: dict, threshold: float = THRESHOLD) -> dict:
    """Rows of (case, new_s, old_s, ratio, verdict) for the cases both runs timed, in the new run's order,
    the cases only one of them has, and per section how its cases paired and why any did not (``sections``).

    A section is not paired where both runs record one of its settings (prompt length, backend, ...) and they
    differ: its rows would pair by name but time different work."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    new_sections, old_sections = section_cases(new), section_cases(old)
    judge = judged(new, old)
    rows, only_new, only_old, sections = [], [], [], []
    for name in SECTIONS:
        new_cases, old_cases = new_sections.get(name, {}), old_sections.get(name, {})
        differing = _differing_settings(name, new, old) if new_cases and old_cases else []
        reason = _pairing_reason(name, new, old, new_cases, old_cases, differing)
        pairable = {} if differing else old_cases  # settings that differ pair nothing
        paired = [case for case in new_cases if case in pairable]
        section_new = [case for case in new_cases if case not in pairable]
        section_old = [case for case in old_cases if case not in new_cases or differing]
        if new_cases or old_cases or reason:
            sections.append({"section": name, "paired": len(paired), "only_new": len(section_new),
                             "only_old": len(section_old), "reason": reason})
        only_new += section_new
        only_old += section_old
        rows += [_row(case, new_cases[case], old_cases[case], threshold, judge) for case in paired]
    return {
        "threshold": threshold, "judged": judge, "rows": rows, "only_new": only_new, "only_old": only_old,
        "sections": sections,
        "regressions": sum(r["verdict"] == "regression" for r in rows),
        "faster": sum(r["verdict"] == "faster" for r in rows),
        "within_iqr": sum(r["verdict"] == "within IQR" for r in rows),
        "not_judged": sum(r["verdict"] == "not judged" for r in rows),
        "geomean_ratio": math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
        if rows and all(0 < r["ratio"] < math.inf for r in rows) else None,
    }


def unpaired(result: dict) -> list[str]:
    """One line per section whose cases did not all pair: which, and why."""
    return [f"{s['section']}: {s['reason']}" for s in result.get("sections", []) if s["reason"]]


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
        return "no case in common" + ("" if unpaired(result) else " (neither run timed a case)")
    return format_table(_shown(result), COLUMNS)


def markdown(result: dict) -> str:
    lines = [summary(result) + ".", ""]
    if unpaired(result):
        lines += ["Not paired:", "", *(f"- {line}" for line in unpaired(result)), ""]
    if result["rows"]:
        lines += ["| case | new ms | old ms | new / old | |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['new_ms']:.4f} | {r['old_ms']:.4f} | {r['ratio']:.3f} | {r['flag']} |"
                  for r in _shown(result)]
    return "\n".join(lines)


def render(new: dict, old: dict, result: dict) -> str:
    """The runs, the table, the summary, then a line per section not (all) paired, saying why."""
    lines = [_runs_line(new, old), table(result), summary(result)]
    lines += [f"not paired: {line}" for line in unpaired(result)]
    return "\n".join(lines)


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
