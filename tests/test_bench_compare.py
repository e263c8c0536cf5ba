"""Before and after: the arithmetic of --compare on synthetic runs, the old format, and errors that name the file."""

import json
import math
from pathlib import Path

import pytest

from bench import compare
from bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parent.parent
FIRST_GPU_RUN = ROOT / "bench" / "results" / "h100-2026-11-23" / "results.json"


def run(model_seconds, mlp_seconds=(), latency_e2e=None, device="test", seconds_key="median_s"):
    """A results dict with model rows ``{label: seconds}`` (prefill), MLP rows and one latency row."""
    results = {
        "meta": {"device": device, "dtype": "float32", "commit": "abc", "date": "2026-01-01"},
        "model_runs": {"rows": [{"model": "tiny", "stage": "prefill", "family": "f", "label": label,
                                 seconds_key: s} for label, s in model_seconds.items()]},
        "mlp": {"rows": [{"model": "tiny", "tokens": 8, "provider": "index_select", "neurons": n, "median_s": s,
                          "unstable": n == 130} for n, s in mlp_seconds]},
    }
    if latency_e2e is not None:
        metrics = {m: {"median_s": latency_e2e / k, "unstable": False} for m, k in (("ttft", 4), ("tpot", 8),
                                                                                     ("e2e", 1))}
        results["latency"] = {"rows": [{"model": "tiny", "family": "AdaLLaVA-L", "budget": 0.5, **metrics}]}
    return results


def test_ratio_and_regression_flag():
    # Old times of 1 s keep the ratios exact in binary floating point.
    old = run({"L 0.50": 1.0, "L 0.75": 1.0, "L 1.00": 1.0, "H 0.50": 1.0, "exit 0.50": 0.8})
    new = run({"L 0.50": 1.06, "L 0.75": 1.05, "L 1.00": 0.96, "H 0.50": 0.9, "random-L 0": 0.1})
    result = compare.compare(new, old)
    by_case = {r["case"]: r for r in result["rows"]}
    assert list(by_case) == [f"model tiny prefill {label}" for label in ("L 0.50", "L 0.75", "L 1.00", "H 0.50")]
    assert by_case["model tiny prefill L 0.50"]["ratio"] == pytest.approx(1.06)
    # Over 5% slower is a regression; exactly 5% is not; over 5% faster is marked faster.
    assert [by_case[f"model tiny prefill {label}"]["verdict"] for label in ("L 0.50", "L 0.75", "L 1.00", "H 0.50")] \
        == ["regression", "same", "same", "faster"]
    assert (result["regressions"], result["faster"]) == (1, 1)
    assert result["only_new"] == ["model tiny prefill random-L 0"]
    assert result["only_old"] == ["model tiny prefill exit 0.50"]
    ratios = [1.06, 1.05, 0.96, 0.9]
    assert result["geomean_ratio"] == pytest.approx(math.prod(ratios) ** (1 / 4))
    text = compare.table(result)
    assert text.count("REGRESSION") == 1 and "1.060" in text
    assert ("4 cases in common: 1 slower by more than 5% and by more than the runs' combined IQR (regression), "
            "1 faster by more than 5% and the IQR, 0 changed by more than 5% but within the IQR") \
        in compare.summary(result)


def spread_run(cases):
    """A results dict with model rows ``{label: (q1, median, q3)}``."""
    return {"meta": {"device": "test"}, "model_runs": {"rows": [
        {"model": "tiny", "stage": "decode", "family": "f", "label": label, "q1_s": q1, "median_s": median,
         "q3_s": q3} for label, (q1, median, q3) in cases.items()]}}


def test_a_change_inside_the_runs_combined_iqr_is_not_a_regression():
    # IQRs of 0.25 ms in each run: a change of 0.5 ms or less is not resolved, whatever its ratio.
    old = spread_run({"a": (0.875, 1.0, 1.125), "b": (0.875, 1.0, 1.125), "c": (0.875, 1.0, 1.125),
                      "d": (0.875, 1.0, 1.125)})
    new = spread_run({"a": (1.375, 1.5, 1.625), "b": (1.5, 1.625, 1.75), "c": (0.375, 0.5, 0.625),
                      "d": (0.25, 0.375, 0.5)})
    result = compare.compare(new, old)
    assert [r["verdict"] for r in result["rows"]] == ["within IQR", "regression", "within IQR", "faster"]
    assert (result["regressions"], result["faster"], result["within_iqr"]) == (1, 1, 2)
    assert result["rows"][0]["new_iqr_s"] == 0.25 and result["rows"][0]["old_iqr_s"] == 0.25
    text = compare.table(result)
    assert text.count("REGRESSION") == 1 and text.count("(within IQR)") == 2


def test_two_runs_of_the_same_noisy_case_flag_nothing():
    # The same case timed twice on a busy CPU: medians 1.83x apart, but the spread of one run covers it.
    old = spread_run({"attention decode": (0.10, 0.103, 0.25)})
    new = spread_run({"attention decode": (0.10, 0.189, 0.20)})
    assert compare.compare(new, old)["rows"][0]["verdict"] == "within IQR"
    assert compare.compare(new, old)["regressions"] == 0


def test_threshold_is_configurable_and_checked():
    old, new = run({"L 0.50": 10e-3}), run({"L 0.50": 10.3e-3})
    assert compare.compare(new, old)["regressions"] == 0
    assert compare.compare(new, old, threshold=0.02)["regressions"] == 1
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        compare.compare(new, old, threshold=-0.1)


def test_cases_cover_every_section_and_the_old_model_format():
    old = run({"L 0.50": 10e-3}, mlp_seconds=[(260, 1e-4), (130, 2e-4)], latency_e2e=40e-3, seconds_key="seconds")
    times = compare.case_times(old)
    assert times == {
        "mlp tiny 8 tok index_select 260 neurons": 1e-4, "mlp tiny 8 tok index_select 130 neurons": 2e-4,
        "model tiny prefill L 0.50": 10e-3,
        "latency tiny AdaLLaVA-L 0.50 ttft": 10e-3, "latency tiny AdaLLaVA-L 0.50 tpot": 5e-3,
        "latency tiny AdaLLaVA-L 0.50 e2e": 40e-3,
    }
    assert compare.unstable_cases(old) == ["mlp tiny 8 tok index_select 130 neurons"]


def test_different_devices_are_pointed_out():
    old, new = run({"L 0.50": 1e-3}, device="NVIDIA H100"), run({"L 0.50": 1e-3}, device="cpu")
    text = compare.render(new, old, compare.compare(new, old))
    assert "different devices" in text


def test_the_first_gpu_run_against_itself():
    results = json.loads(FIRST_GPU_RUN.read_text())
    result = compare.compare(results, results)
    # 250 MLP, 180 attention, 6 KV-cache and 61 model rows, every ratio 1.
    assert len(result["rows"]) == 497 and {r["ratio"] for r in result["rows"]} == {1.0}
    assert result["regressions"] == 0 and not result["only_new"] and not result["only_old"]


def test_compare_command(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(run({"L 0.50": 10e-3})))
    new.write_text(json.dumps(run({"L 0.50": 12e-3})))
    result = compare.main([str(old), str(new)])
    assert result["regressions"] == 1
    assert "REGRESSION" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "is not a file"), ("[1, 2", "is not JSON"), ('{"model": "tiny"}', "no 'meta'"),
    ('{"meta": {}, "plans": {}}', "has no timed case"),
], ids=["missing", "not-json", "no-meta", "nothing-timed"])
def test_bench_compare_names_a_bad_file_before_timing_anything(tmp_path, capsys, content, message):
    path = tmp_path / "old" / "results.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    with pytest.raises(SystemExit):
        bench_main(["--compare", str(path), "--only", "model"])
    err = capsys.readouterr().err
    assert "--compare" in err and message in err


@pytest.mark.parametrize("device_type, expected", [("cuda", "regression"), ("cpu", "not judged")])
def test_runs_timed_on_a_cpu_are_compared_but_not_judged(device_type, expected):
    # Two runs of the same code on a CPU differ beyond each case's IQR: a 20% change with tight IQRs is a
    # regression between GPU runs and only reported between CPU runs.
    old = spread_run({"full": (0.99, 1.0, 1.01)}) | {"device_type": device_type}
    new = spread_run({"full": (1.19, 1.2, 1.21)}) | {"device_type": device_type}
    result = compare.compare(new, old)
    assert result["rows"][0]["verdict"] == expected
    assert result["regressions"] == (expected == "regression") and result["judged"] == (device_type == "cuda")
    if device_type == "cpu":
        assert "timed on a CPU: 1 changed by more than 5%, not judged" in compare.summary(result)
        assert "(not judged)" in compare.table(result) and "REGRESSION" not in compare.table(result)
