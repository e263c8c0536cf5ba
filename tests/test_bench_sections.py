"""The result tools read every section of a real CPU run: bench.compare pairs each section's rows by their own
keys and says why any did not pair, report.md has a part for each, bench.plot draws each or names what it
did not draw."""

import copy
import json

import pytest

from bench import compare, plot
from bench.__main__ import SECTIONS, report_markdown
from bench.__main__ import main as bench_main

# Each section's key in results.json.
KEYS = {name: compare.SECTIONS[name][0] for name in SECTIONS}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One quick CPU run of every section at the smallest sizes (about 15 s on the 2-core machine)."""
    out = tmp_path_factory.mktemp("bench") / "all"
    bench_main(["--model", "tiny", "--quick", "--no-static", "--backend", "torch", "--budgets", "0.5,1.0", "--random-plans", "1",
                "--decode-steps", "2", "--mlp-tokens", "1", "--attention-seqs", "9", "--attention-contexts", "9",
                "--latency-prompt", "8", "--latency-new-tokens", "2", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["sections"] == list(SECTIONS) and not results["errors"]
    return results


def only(results: dict, section: str) -> dict:
    """``results`` as a run of ``--only section`` writes it: the other sections' keys and validation rows gone."""
    dropped = {KEYS[name] for name in SECTIONS if name != section}
    kept = {key: value for key, value in copy.deepcopy(results).items() if key not in dropped}
    kept["report"]["rows"] = [r for r in kept["report"]["rows"] if r["op"].split(" ", 1)[0] == section]
    return kept | {"sections": [section]}


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

    # The same rows, but the runs served through batches of another capacity: paired by name they would time
    # different work.
    smaller = copy.deepcopy(serve)
    smaller["serve"]["capacity"] = 32
    result = compare.compare(serve, smaller)
    assert not result["rows"]
    (pairing,) = result["sections"]
    assert pairing["reason"] == "the runs differ in capacity 64 (new), 32 (old)"
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


# -- report.md -----------------------------------------------------------------------------------------

# What report.md shows of each section: the validation table's rows of the op and model sections, a part of
# its own for the others.
REPORT_PARTS = {"mlp": "| mlp tiny ", "attention": "| attention tiny ", "model": "| model tiny prefill |",
                "kv": "## Layer-skip KV cache", "latency": "## Request latency per budget", "serve": "## Serving",
                "kernels": "## Per kernel"}


def tables_have_rows(text: str) -> bool:
    """Every Markdown table (a header, then its rule) has at least one row under the rule."""
    lines = text.splitlines()
    return all(lines[i + 2].startswith("|") for i in range(len(lines) - 2)
               if lines[i].startswith("|") and lines[i + 1].startswith("|---"))


@pytest.mark.parametrize("section", SECTIONS)
def test_report_has_a_part_for_each_section(cpu_run, section):
    text = report_markdown(only(cpu_run, section))
    assert REPORT_PARTS[section] in text and tables_have_rows(text)
    if section not in ("mlp", "attention", "model"):
        # No validation table, and no header over an empty one: a line says why.
        assert "No validation table: no section of this run timed a series of plans against FLOPs" in text
        assert "0 of 0" not in text.splitlines()[0]


def test_report_of_the_whole_run_has_every_part(cpu_run):
    text = report_markdown(cpu_run)
    assert all(part in text for part in REPORT_PARTS.values()) and tables_have_rows(text)


# -- bench.plot ----------------------------------------------------------------------------------------

FIGURES = {"mlp": ["ops.png"], "attention": ["ops.png"], "kv": ["kv.png"], "model": ["plot.png"],
           "latency": ["latency.png"], "serve": ["serve.png"], "kernels": ["kernels.png"]}


@pytest.mark.parametrize("section", SECTIONS)
def test_plot_draws_each_section(cpu_run, section, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(only(cpu_run, section)))
    paths = plot.main([str(path)])
    assert [p.name for p in paths] == FIGURES[section]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert "no figure" not in capsys.readouterr().out


def test_plot_draws_every_section_of_the_whole_run(cpu_run, tmp_path):
    names = [p.name for p in plot.draw_all(cpu_run, tmp_path)]
    assert names == ["kv.png", "plot.png", "latency.png", "serve.png", "kernels.png", "ops.png", "ops-2.png"]
    assert not plot.not_drawn(cpu_run)


def test_plot_names_each_section_it_cannot_draw(cpu_run, tmp_path, capsys):
    failed = {"type": "RuntimeError", "message": "out of memory"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(only(cpu_run, "serve") | {"errors": {"kernels": failed}}))
    assert [p.name for p in plot.main([str(path)])] == ["serve.png"]
    assert "no figure for section kernels: it failed in this run (RuntimeError: out of memory)" in \
        capsys.readouterr().out

    # Nothing to draw at all: one line, exit status 2, no file written.
    nothing = {key: value for key, value in only(cpu_run, "serve").items() if key != "serve"}
    path.write_text(json.dumps(nothing | {"errors": {"serve": failed}}))
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(path), "--out", str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"python -m bench.plot: error: RESULTS.json: {path} has nothing to draw: section serve: "
                          "it failed in this run (RuntimeError: out of memory)")
    assert not (tmp_path / "figures").exists()
