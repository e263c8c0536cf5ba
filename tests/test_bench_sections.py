"""The result tools read every section of a real CPU run: bench.compare pairs each section's rows by their own
keys and says why any did not pair, report.md has a part for each, bench.plot draws each or names what it
did not draw."""

import copy
import json

import pytest

from bench import compare
from bench.__main__ import SECTIONS
from bench.__main__ import main as bench_main

# Each section's key in results.json.
KEYS = {name: compare.SECTIONS[name][0] for name in SECTIONS}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One quick CPU run of every section at the smallest sizes (about 15 s on the 2-core machine)."""
    out = tmp_path_factory.mktemp("bench") / "all"
    bench_main(["--model", "tiny", "--quick", "--backend", "torch", "--budgets", "0.5,1.0", "--random-plans", "1",
                "--decode-steps", "2", "--mlp-tokens", "1", "--attention-seqs", "9", "--attention-contexts", "9",
                "--latency-prompt", "8", "--latency-new-tokens", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["sections"] == list(SECTIONS) and not results["errors"]
    return results


def only(results: dict, section: str) -> dict:
    """``results`` as a run of ``--only section`` writes it: the other sections' keys gone."""
    dropped = {KEYS[name] for name in SECTIONS if name != section}
    return {key: value for key, value in copy.deepcopy(results).items() if key not in dropped} | {
        "sections": [section]}


# -- bench.compare -------------------------------------------------------------------------------------

def test_compare_pairs_every_section_of_a_run_with_itself(cpu_run):
    result = compare.compare(cpu_run, cpu_run)
    by_section = {s["section"]: s for s in result["sections"]}
    assert list(by_section) == list(SECTIONS)
    for name, pairing in by_section.items():
        assert pairing["paired"] > 0 and pairing["reason"] is None, pairing
    assert {r["ratio"] for r in result["rows"]} == {1.0} and not result["only_new"] and not result["only_old"]
    assert not compare.unpaired(result)


@pytest.mark.parametrize("section", SECTIONS)
def test_compare_pairs_two_runs_of_one_section(cpu_run, section, tmp_path, capsys):
    run = only(cpu_run, section)
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path in paths:
        path.write_text(json.dumps(run))
    result = compare.main([str(p) for p in paths])
    assert result["rows"] and all(r["case"].split()[0] == section for r in result["rows"])
    assert [s["section"] for s in result["sections"]] == [section]
    printed = capsys.readouterr().out
    assert "no case in common" not in printed and "not paired" not in printed


def test_compare_says_which_sections_it_could_not_pair_and_why(cpu_run):
    serve, kernels = only(cpu_run, "serve"), only(cpu_run, "kernels")
    result = compare.compare(serve, kernels)
    assert not result["rows"]
    assert compare.unpaired(result) == ["serve: not in the old run", "kernels: not in the new run"]
    text = compare.render(serve, kernels, result)
    assert "not paired: serve: not in the old run" in text and "not paired: kernels: not in the new run" in text

    # The same rows, but the runs served different prompts: paired by name they would time different work.
    longer = copy.deepcopy(serve)
    longer["serve"]["prompt"] = 700
    result = compare.compare(serve, longer)
    assert not result["rows"]
    (pairing,) = result["sections"]
    assert pairing["reason"] == "the runs differ in prompt 32 (new), 700 (old)"
    assert pairing["only_new"] == pairing["only_old"] == len(compare.section_cases(serve)["serve"])

    # A section that failed in one run is named with its error.
    failed = only(cpu_run, "latency") | {"errors": {"kernels": {"type": "RuntimeError", "message": "out of memory"}}}
    result = compare.compare(kernels, failed)
    assert "kernels: failed in the old run (RuntimeError: out of memory)" in compare.unpaired(result)

    # Rows that differ within a section: one kernel fewer in a layer.
    fewer = copy.deepcopy(kernels)
    fewer["kernels"]["layers"][0]["kernels"].pop()
    (reason,) = compare.unpaired(compare.compare(kernels, fewer))
    assert reason.startswith("kernels: 1 case only in the new run, 0 only in the old one (what ran differs, e.g.")
