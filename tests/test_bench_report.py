"""The validation report judges whether measured time follows the FLOPs a plan predicts."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import report

BUDGETS = (1.0, 0.85, 0.75, 0.6, 0.5)
DENSE_FLOPS = 2e12


def rows_for(op, series, seconds_of, budgets=BUDGETS):
    """Rows whose FLOPs are ``budget * DENSE_FLOPS`` and whose time is ``seconds_of(flops)``."""
    return [{"op": op, "series": series, "label": f"budget {b}", "flops": b * DENSE_FLOPS,
             "seconds": seconds_of(b * DENSE_FLOPS)} for b in budgets]


def proportional(flops):
    return 5e-3 * flops / DENSE_FLOPS


# -- pearson and linear_fit ---------------------------------------------------

@pytest.mark.parametrize("n", [2, 7, 100])
def test_pearson_and_fit_match_numpy_on_random_data(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(size=n) + 0.5 * np.arange(n)
    assert report.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12, abs=1e-12)
    slope, intercept = report.linear_fit(x, y)
    np_slope, np_intercept = np.polyfit(x, y, 1)
    assert slope == pytest.approx(np_slope, rel=1e-10)
    assert intercept == pytest.approx(np_intercept, rel=1e-10, abs=1e-12)


def test_pearson_and_fit_on_a_hand_computed_example():
    # x = [1, 2, 3], y = [2, 4, 7]: deviations from the means (2, 13/3) are
    # dx = [-1, 0, 1] and dy = [-7/3, -1/3, 8/3], so sum(dx*dy) = 5,
    # sum(dx^2) = 2, sum(dy^2) = 114/9 and r = 5 / sqrt(2 * 114 / 9) = 0.99339...
    x, y = [1, 2, 3], [2, 4, 7]
    assert report.pearson(x, y) == pytest.approx(5 / math.sqrt(2 * 114 / 9), rel=1e-14)
    assert report.pearson(x, y) == pytest.approx(0.993399267799, rel=1e-11)
    slope, intercept = report.linear_fit(x, y)
    assert slope == pytest.approx(2.5, rel=1e-14)
    assert intercept == pytest.approx(-2 / 3, rel=1e-14)
    assert isinstance(report.pearson(x, y), float) and isinstance(slope, float)


def test_perfectly_proportional_data():
    x = [0.5, 1.0, 1.5, 4.0]
    y = [3.0 * v for v in x]
    assert report.pearson(x, y) == pytest.approx(1.0, abs=1e-15)
    assert report.pearson(x, y) <= 1.0
    slope, intercept = report.linear_fit(x, y)
    assert slope == 3.0
    assert intercept == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("x, y, message", [
    ([1.0], [2.0], "at least 2 points, got 1"),
    ([1.0, 2.0, 3.0], [1.0, 2.0], "same length, got 3 and 2"),
    ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], "x has zero variance"),
    ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], "y has zero variance"),
], ids=["one-point", "length-mismatch", "constant-x", "constant-y"])
def test_pearson_rejects_what_it_cannot_compute(x, y, message):
    with pytest.raises(ValueError, match=message):
        report.pearson(x, y)


def test_linear_fit_rejects_constant_x():
    with pytest.raises(ValueError, match="x has zero variance"):
        report.linear_fit([1.0, 1.0], [1.0, 2.0])


# -- proportional_deviations --------------------------------------------------

def test_deviations_when_one_point_is_20_percent_slow():
    flops = [4.0, 3.0, 2.0, 1.0]
    seconds = [8.0, 6.0 * 1.2, 4.0, 2.0]
    assert report.proportional_deviations(flops, seconds) == pytest.approx([0.0, 0.2, 0.0, 0.0], abs=1e-12)


def test_deviations_are_anchored_at_the_largest_flops_point_wherever_it_is():
    # The dense point sits in the middle; the first point would give a different anchor.
    flops = [1.0, 2.0, 4.0, 3.0]
    seconds = [3.0, 4.0, 8.0, 9.0]
    assert report.proportional_deviations(flops, seconds) == pytest.approx([0.5, 0.0, 0.0, 0.5], abs=1e-12)


def test_deviations_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        report.proportional_deviations([1.0, 2.0], [1.0])


# -- summarize ----------------------------------------------------------------

def test_proportional_timings_follow_flops():
    (result,) = report.summarize(rows_for("mlp", "triton", proportional))
    assert result.verdict == "follows FLOPs"
    assert result.points == len(BUDGETS)
    assert result.pearson == pytest.approx(1.0)
    assert result.slope == pytest.approx(5e-3 / DENSE_FLOPS)
    assert result.intercept == pytest.approx(0.0, abs=1e-15)
    assert abs(result.worst_deviation) < 1e-12


def test_constant_overhead_correlates_but_fails_on_deviation():
    # t = a + b * flops with a as large as the dense compute: r is 1, yet the
    # half-budget plan takes 75% of the dense time instead of 50%.
    rows = rows_for("attention", "sdpa_gathered", lambda f: 5e-3 + 5e-3 * f / DENSE_FLOPS)
    (result,) = report.summarize(rows)
    assert result.pearson == pytest.approx(1.0)
    assert result.worst_label == "budget 0.5"
    assert result.worst_deviation == pytest.approx(0.5)
    assert result.verdict == "worst deviation +50.0% at budget 0.5 > 10%"


def test_uncorrelated_timings_fail_on_r():
    seconds = iter([1.0e-3, 1.3e-3, 0.9e-3, 1.2e-3, 1.05e-3])
    rows = rows_for("mlp", "index_select", lambda f: next(seconds))
    (result,) = report.summarize(rows)
    assert result.pearson < report.MIN_PEARSON
    assert result.verdict.startswith("r ")
    assert f"< {report.MIN_PEARSON:g}" in result.verdict
    assert "worst deviation" in result.verdict  # these timings are far from proportional too


def slow_point_with_iqr(iqr_share):
    """Proportional rows but the 0.6 plan 20% slow, every point with an IQR of ``iqr_share`` of its time."""
    rows = rows_for("mlp", "index_select", lambda f: proportional(f) * (1.2 if f == 0.6 * DENSE_FLOPS else 1.0))
    return [r | {"iqr_seconds": iqr_share * r["seconds"]} for r in rows]


def test_a_deviation_inside_the_iqrs_gets_no_verdict():
    # The slow point is 0.6 ms over its proportional 3 ms: IQRs of 10% (0.36 ms) and the anchor's 10% scaled to
    # the plan's FLOPs (0.3 ms) cover it, so the timing did not resolve the deviation.
    (result,) = report.summarize(slow_point_with_iqr(0.10))
    assert result.worst_deviation == pytest.approx(0.2) and result.worst_label == "budget 0.6"
    assert result.within_spread and not result.follows
    assert result.verdict == ("within the measured spread: every deviation over 10% (worst +20.0% at budget 0.6) "
                              "is inside the IQRs; no verdict")


def test_a_deviation_beyond_the_iqrs_is_held_against_the_series():
    # IQRs of 2%: 0.06 + 0.072 ms, far under the 0.6 ms deviation.
    (result,) = report.summarize(slow_point_with_iqr(0.02))
    assert not result.within_spread
    assert result.verdict.endswith("worst deviation +20.0% at budget 0.6 > 10%")


def test_summary_line_says_which_series_deviate_only_within_the_spread():
    noisy = slow_point_with_iqr(0.10)
    model = [r | {"op": "model tiny decode", "series": "adallava_kernels (torch), all plans"} for r in noisy]
    line = report.summary_line(report.summarize(noisy + rows_for("mlp", "triton", proportional) + model), 0, 15,
                               "cpu")
    assert line.startswith("On cpu, 1 of 3 library series follow FLOPs in wall time; 2 deviate from it only within "
                           "the measured spread (IQR): no verdict;")
    assert "end to end decode: r wall 0.9" in line and "(deviations within the measured spread)" in line


def test_two_plans_are_too_few():
    (result,) = report.summarize(rows_for("mlp", "triton", proportional, budgets=(1.0, 0.5)))
    assert result.verdict == "too few plans (2)"
    assert result.pearson is None


def test_plans_with_equal_flops_are_too_few():
    rows = rows_for("mlp", "triton", proportional, budgets=(1.0, 1.0, 1.0))
    (result,) = report.summarize(rows)
    assert result.verdict.startswith("too few plans (3")
    assert result.pearson is None and result.slope is None and result.intercept is None


def test_groups_by_op_and_series_in_first_seen_order():
    a = rows_for("mlp", "triton", proportional)
    b = rows_for("attention", "triton", proportional)
    c = rows_for("mlp", "index_select", proportional)
    interleaved = [a[0], b[0], c[0], *a[1:], *c[1:], *b[1:]]
    results = report.summarize(interleaved)
    assert [(r.op, r.series, r.points) for r in results] == [
        ("mlp", "triton", 5), ("attention", "triton", 5), ("mlp", "index_select", 5)]


@pytest.mark.parametrize("index, key, value, message", [
    (2, "seconds", None, r"rows\[2\] has no 'seconds'"),
    (1, "label", None, r"rows\[1\] has no 'label'"),
    (3, "flops", 0.0, r"rows\[3\]\['flops'\] must be a positive"),
    (0, "seconds", -1e-3, r"rows\[0\]\['seconds'\] must be a positive"),
    (4, "seconds", float("nan"), r"rows\[4\]\['seconds'\] must be a positive"),
    (1, "flops", "1e12", r"rows\[1\]\['flops'\] must be a positive"),
], ids=["missing-seconds", "missing-label", "zero-flops", "negative-seconds", "nan-seconds", "string-flops"])
def test_bad_rows_name_the_row_and_key(index, key, value, message):
    rows = rows_for("mlp", "triton", proportional)
    if value is None:
        del rows[index][key]
    else:
        rows[index][key] = value
    with pytest.raises(ValueError, match=message):
        report.summarize(rows)


# -- table, markdown, json ----------------------------------------------------

@pytest.fixture
def mixed_reports():
    rows = (rows_for("mlp", "triton", proportional)
            + rows_for("model-prefill", "AdaLLaVA-H/kernels", lambda f: 5e-3 + proportional(f))
            + rows_for("model-decode", "AdaLLaVA-L", proportional, budgets=(1.0, 0.5)))
    return report.summarize(rows)


def test_table_lists_every_series_and_verdict(mixed_reports):
    text = report.table(mixed_reports)
    for r in mixed_reports:
        assert r.series in text and r.verdict in text
    assert "r wall" in text and "r GPU" in text and "slope (s/TFLOP)" in text and "verdict (wall)" in text
    (decode_line,) = [line for line in text.splitlines() if "AdaLLaVA-L" in line]
    assert "-" in decode_line.split()  # two plans: no pearson r
    # Slope is seconds per TFLOP: 5 ms per 2 TFLOP.
    assert "0.0025" in text


def test_markdown_has_meta_table_and_thresholds(mixed_reports):
    meta = {"device": "NVIDIA H200", "dtype": "bfloat16", "commit": "abc123",
            "date": "2025-01-01T00:00:00+00:00", "command": "python -m bench"}
    text = report.markdown(mixed_reports, meta)
    for value in meta.values():
        assert value in text
    for r in mixed_reports:
        assert r.series in text and r.verdict in text
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(mixed_reports)
    assert len({line.count("|") for line in table_lines}) == 1
    assert f">= {report.MIN_PEARSON:g}" in text and f"{report.MAX_DEVIATION:.0%}" in text


def test_markdown_marks_missing_meta_as_unknown(mixed_reports):
    text = report.markdown(mixed_reports, {"device": "cpu"})
    header = text.splitlines()[0]
    assert "cpu" in header
    assert header.count("unknown") == 4


def test_report_json_is_plain_dicts(mixed_reports):
    data = report.report_json(mixed_reports)
    assert [d["series"] for d in data] == [r.series for r in mixed_reports]
    assert set(data[0]) == {"op", "series", "points", "pearson", "slope", "intercept", "worst_deviation",
                            "worst_label", "verdict", "role", "pearson_gpu", "host_share", "unstable"}


# -- roles, GPU time, r as printed ------------------------------------------------

def test_reference_series_are_shown_but_not_judged():
    (result,) = report.summarize(rows_for("mlp", "zero_mask", lambda f: 5e-3))
    assert result.role == report.REFERENCE and not result.judged
    assert result.verdict == report.NOT_JUDGED
    assert result.worst_deviation == pytest.approx(1.0)  # still measured: half the FLOPs, the same time


@pytest.mark.parametrize("series, role", [
    ("triton", "library"), ("index_select", "library (torch)"), ("sdpa_gathered", "library (torch)"),
    ("pregathered", "alternative"), ("flash_attn", "alternative"), ("zero_mask", "reference"),
    ("adallava_kernels (auto), all plans", "library"), ("kernels, all plans", "library"), ("other", "alternative"),
])
def test_role_of_each_series(series, role):
    assert report.role_of(series) == role


def test_a_row_may_name_its_role():
    rows = [r | {"role": "reference"} for r in rows_for("mlp", "triton", proportional)]
    assert report.summarize(rows)[0].verdict == report.NOT_JUDGED


@pytest.mark.parametrize("r, text", [(0.77059, "0.7705"), (-0.42167, "-0.4217"), (1.0, "1.0000"),
                                     (0.98999, "0.9899")])
def test_r_text_truncates_to_four_decimals(r, text):
    assert report.r_text(r) == text


def test_table_and_verdict_print_the_same_r():
    # Find timings whose r rounds and truncates differently at 4 decimals (the case the two used to disagree on).
    rng = np.random.default_rng(0)
    for _ in range(1000):
        seconds = iter(rng.uniform(1e-3, 2e-3, size=len(BUDGETS)))
        rows = rows_for("mlp", "index_select", lambda f: next(seconds))
        (result,) = report.summarize(rows)
        if result.pearson is not None and f"{result.pearson:.4f}" != report.r_text(result.pearson):
            break
    else:
        pytest.fail("no r found whose rounding and truncation differ")
    text = report.table([result])
    printed = report.r_text(result.pearson)
    assert f"r {printed} < 0.99" in result.verdict
    (line,) = [line for line in text.splitlines() if "index_select" in line]
    assert line.split()[5] == printed  # op, series, role "library (torch)", plans, r wall
    assert f"{result.pearson:.4f}" not in line


def test_gpu_correlation_and_host_share():
    # Wall time carries a fixed host cost of 5 ms; the GPU time is proportional to the FLOPs.
    rows = [r | {"gpu_seconds": proportional(r["flops"]), "seconds": 5e-3 + proportional(r["flops"])}
            for r in rows_for("model tiny prefill", "adallava_kernels (auto), all plans", proportional)]
    rows[1]["unstable"] = True
    (result,) = report.summarize(rows)
    assert result.pearson_gpu == pytest.approx(1.0)
    # Host share per plan: 5 / (5 + 5 b) for budgets 1.0, 0.85, 0.75, 0.6, 0.5; the median is at b = 0.75.
    assert result.host_share == pytest.approx(5 / (5 + 5 * 0.75))
    assert result.unstable == 1
    assert result.verdict.startswith("worst deviation")  # judged on wall time
    cells = report.table([result]).splitlines()[2]
    assert "57%" in cells


def test_gpu_statistics_need_every_point():
    rows = rows_for("mlp", "triton", proportional)
    rows[0]["gpu_seconds"] = 1e-3
    (result,) = report.summarize(rows)
    assert result.pearson_gpu is None and result.host_share is None
    rows[0]["gpu_seconds"] = -1.0
    with pytest.raises(ValueError, match=r"rows\[0\]\['gpu_seconds'\] must be None or a positive"):
        report.summarize(rows)


def test_summary_line_counts_library_series_and_states_end_to_end_r():
    follows = rows_for("mlp", "triton", proportional)
    fails = rows_for("mlp", "index_select", lambda f: 5e-3 + proportional(f))
    reference = rows_for("mlp", "zero_mask", lambda f: 5e-3)
    model = [r | {"gpu_seconds": proportional(r["flops"]) / 2}
             for r in rows_for("model tiny decode", "adallava_kernels (auto), all plans", proportional)]
    line = report.summary_line(report.summarize(follows + fails + reference + model), 3, 40, "NVIDIA H100",
                               ["a request at budget 0.50 takes 0.60"])
    assert line.startswith("On NVIDIA H100, 2 of 3 library series follow FLOPs in wall time")
    assert "end to end decode: r wall 1.0000, GPU 1.0000, host 50% of wall" in line
    assert "a request at budget 0.50 takes 0.60" in line
    assert line.endswith("3 of 40 timed cases have an IQR over 5% of their median.")
    assert "\n" not in line


def test_markdown_opens_with_the_summary_and_appends_sections(mixed_reports):
    text = report.markdown(mixed_reports, {"device": "cpu"}, "One line.", [("Latency", "| a |")])
    lines = text.splitlines()
    assert lines[0] == "One line." and lines[2].startswith("**device** cpu")
    assert text.rstrip().endswith("## Latency\n\n| a |")


def test_importing_the_report_does_not_import_matplotlib():
    import subprocess

    code = "import sys, bench.report; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- request latency: the ideal is the plan's FLOPs ratio, and a difference inside the IQRs is said to be ------

def latency_row(family, budget, e2e, iqr, flops_ratio):
    """A latency row whose metrics all take ``e2e`` seconds with an IQR of ``iqr`` seconds."""
    timed = {"median_s": e2e, "q1_s": e2e - iqr / 2, "q3_s": e2e + iqr / 2, "unstable": False, "gpu_s": None,
             "host_share": None}
    return {"family": family, "budget": budget, "layers_on": 2, "flops_ratio": flops_ratio,
            "flops_ratios": {"ttft": flops_ratio, "tpot": flops_ratio, "e2e": flops_ratio},
            "ttft": timed, "tpot": timed, "e2e": timed}


def test_latency_ideal_divides_by_the_plans_flops_ratio_not_the_budget():
    from bench import latency

    # At budget 0.7 the plan keeps 0.501 of the FLOPs: its ideal is 0.501 x the full plan's 10 ms.
    rows = [latency_row("AdaLLaVA-L", 0.7, 6.0, 0.0, 0.501), latency_row("full plan", 1.0, 10.0, 0.0, 1.0)]
    shown = latency.comparisons(rows)[0]
    assert shown["e2e_vs_ideal"] == pytest.approx(6.0 / (0.501 * 10.0))
    assert shown["e2e_flops_ratio"] == 0.501
    assert "1.198" in latency.table(rows)  # 6 / 5.01


def test_latency_summary_says_when_a_difference_is_inside_the_iqrs():
    from bench import latency

    full = latency_row("full plan", 1.0, 10.0, 2.0, 1.0)
    resolved = latency_row("AdaLLaVA-L", 0.5, 6.0, 0.5, 0.501)
    noisy = latency_row("AdaLLaVA-H", 0.5, 9.0, 2.0, 0.501)  # 1 s under the full plan, IQRs of 2 s each
    line = latency.summary([resolved, noisy, full])
    assert line == ("a request at budget 0.50 takes 0.60 (AdaLLaVA-L, ideal 0.501), 0.90 (AdaLLaVA-H, ideal 0.501; "
                    "within the IQRs of the full plan's: no difference resolved) of the full plan's end-to-end "
                    "latency")
