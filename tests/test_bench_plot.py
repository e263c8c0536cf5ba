"""The figures are drawn from results.json alone: what each one draws, checked on synthetic results and on the
first GPU run committed under bench/results."""

import json
from pathlib import Path

import pytest

from bench import plot

ROOT = Path(__file__).resolve().parent.parent
FIRST_GPU_RUN = ROOT / "bench" / "results" / "h100-2026-11-23" / "results.json"
FAMILIES = {"AdaLLaVA-L": (0.5, 0.75, 1.0), "AdaLLaVA-H": (0.5, 0.75, 1.0), "early-exit": (0.5, 1.0),
            "random-L": (0.6,)}
FULL_S = {"prefill": 40e-3, "decode": 10e-3}


def model_row(stage, family, label, ratio, gpu=True):
    seconds = FULL_S[stage] * (0.2 + 0.8 * ratio)  # a fixed cost: the time ratio stays above the FLOPs ratio
    return {"model": "tiny", "stage": stage, "family": family, "label": label, "flops": 1e12 * ratio,
            "median_s": seconds, "q1_s": seconds * 0.99, "q3_s": seconds * 1.01,
            "gpu_s": FULL_S[stage] * ratio / 4 if gpu else None}


def synthetic_results(gpu=True):
    model_rows = []
    for stage in ("prefill", "decode"):
        model_rows.append(model_row(stage, "dense (transformers)", "dense", 1.0, gpu))
        model_rows.append(model_row(stage, "full plan", "full", 1.0, gpu))
        for family, ratios in FAMILIES.items():
            model_rows += [model_row(stage, family, f"{family} {r:.2f}", r, gpu) for r in ratios]
    latency_rows = []
    for family, level in [(f, b) for f in ("AdaLLaVA-L", "AdaLLaVA-H", "early-exit") for b in (0.5, 0.75, 1.0)] \
            + [("full plan", 1.0), ("dense (transformers)", 1.0)]:
        metrics = {m: {"median_s": base * (0.3 + 0.7 * level), "q1_s": base * 0.3, "q3_s": base, "unstable": False,
                       "gpu_s": None, "host_share": None}
                   for m, base in (("ttft", 10e-3), ("tpot", 2e-3), ("e2e", 30e-3))}
        # A plan's FLOPs ratio need not be its budget: the ideal follows the FLOPs.
        ratios = {m: 0.4 + 0.6 * level for m in ("ttft", "tpot", "e2e")}
        latency_rows.append({"model": "tiny", "family": family, "budget": level, "prompt_tokens": 64,
                             "new_tokens": 8, "flops_ratio": ratios["ttft"], "flops_ratios": ratios, **metrics})
    report_rows = [{"op": f"{kind} tiny case {i}", "series": series, "label": f"keep {k}", "flops": 1e9 * k,
                    "seconds": 1e-3 * k, "gpu_seconds": None}
                   for kind, cases in (("mlp", 14), ("attention", 3)) for i in range(cases)
                   for series in ("zero_mask", "index_select") for k in (0.5, 1.0)]
    return {"meta": {"device": "test", "dtype": "float32", "commit": "abc", "date": "2026-01-01"}, "model": "tiny",
            "model_runs": {"rows": model_rows}, "latency": {"rows": latency_rows}, "report": {"rows": report_rows}}


def artists(fig, prefix):
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()
            if (line.get_gid() or "").startswith(prefix)}


# -- the headline ---------------------------------------------------------------

def test_headline_has_one_point_per_plan_in_each_stage():
    results = synthetic_results()
    fig = plot.draw_headline(results)
    points = artists(fig, "plans:")
    assert set(points) == {f"plans:{s}:{f}" for s in ("prefill", "decode") for f in FAMILIES}
    for stage in ("prefill", "decode"):
        for family, ratios in FAMILIES.items():
            line = points[f"plans:{stage}:{family}"]
            assert list(line.get_xdata()) == pytest.approx(list(ratios))
            assert list(line.get_ydata()) == pytest.approx([0.2 + 0.8 * r for r in ratios])
    # Hollow GPU points, one per plan too: the GPU time here is proportional to the FLOPs.
    gpu = artists(fig, "gpu:")
    assert list(gpu["gpu:decode:AdaLLaVA-L"].get_ydata()) == pytest.approx([0.5, 0.75, 1.0])


def test_headline_data_takes_ratios_to_the_full_plan_and_keeps_references_apart():
    data = plot.headline_data(synthetic_results(gpu=False))
    prefill = data["prefill"]
    assert set(prefill["families"]) == set(FAMILIES)  # neither the full plan nor transformers is a family
    assert prefill["dense"]["wall_ratio"] == pytest.approx(1.0)
    assert all(p["gpu_ratio"] is None for ps in prefill["families"].values() for p in ps)
    assert not artists(plot.draw_headline(synthetic_results(gpu=False)), "gpu:")


def test_headline_needs_the_model_section():
    with pytest.raises(ValueError, match="no model_runs rows"):
        plot.headline_data({"meta": {}})


# -- latency ----------------------------------------------------------------------

def test_latency_figure_has_one_line_per_family_and_the_ideal():
    fig = plot.draw_latency(synthetic_results())
    lines = artists(fig, "family:")
    families = ("AdaLLaVA-L", "AdaLLaVA-H", "early-exit")
    assert set(lines) == {f"family:{m}:{f}" for m, _ in plot.LATENCY_PANELS for f in families}
    for family in families:
        e2e = lines[f"family:e2e:{family}"]
        assert list(e2e.get_xdata()) == [0.5, 0.75, 1.0]
        assert list(e2e.get_ydata()) == pytest.approx([30 * (0.3 + 0.7 * b) for b in (0.5, 0.75, 1.0)])
    ideal = artists(fig, "ideal:")
    assert set(ideal) == {f"ideal:{m}:{f}" for m, _ in plot.LATENCY_PANELS for f in families}
    # Each plan's FLOPs ratio (0.4 + 0.6 x budget here), not its budget, x the full plan's 10 ms.
    assert list(ideal["ideal:ttft:AdaLLaVA-L"].get_xdata()) == [0.5, 0.75, 1.0]
    assert list(ideal["ideal:ttft:AdaLLaVA-L"].get_ydata()) == pytest.approx([7.0, 8.5, 10.0])


def test_latency_needs_the_latency_section():
    with pytest.raises(ValueError, match="no latency rows"):
        plot.latency_data({"meta": {}})


# -- op pages ---------------------------------------------------------------------

def test_op_pages_hold_twelve_panels_at_most_and_one_kind_each():
    pages = plot.op_pages(synthetic_results()["report"]["rows"])
    assert [(kind, len(ops)) for kind, ops in pages] == [("mlp", 12), ("mlp", 2), ("attention", 3)]


def test_draw_all_writes_every_figure(tmp_path):
    paths = plot.draw_all(synthetic_results(), tmp_path)
    assert [p.name for p in paths] == ["plot.png", "latency.png", "ops.png", "ops-2.png", "ops-3.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# -- the command line, and the first GPU run -----------------------------------------

def test_redraws_the_first_gpu_run(tmp_path, capsys):
    paths = plot.main([str(FIRST_GPU_RUN), "--out", str(tmp_path)])
    # That run had no latency section: no latency.png. 10 MLP and 24 attention cases.
    assert [p.name for p in paths] == ["kv.png", "plot.png", "ops.png", "ops-2.png", "ops-3.png"]
    assert "wrote" in capsys.readouterr().out
    data = plot.headline_data(json.loads(FIRST_GPU_RUN.read_text()))
    # 30 plans per stage, ratios to L 1.00 (that run had no full-plan row).
    assert sum(len(p) for p in data["prefill"]["families"].values()) == 30
    (l_full,) = [p for p in data["decode"]["families"]["AdaLLaVA-L"] if p["label"] == "L 1.00"]
    assert l_full["wall_ratio"] == 1.0 and l_full["flops_ratio"] == 1.0


@pytest.mark.parametrize("content, message", [
    (None, "is not a file"), ("{not json", "is not JSON"), ('{"rows": []}', "no 'meta'"),
], ids=["missing", "not-json", "no-meta"])
def test_plot_command_names_a_bad_results_file(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        plot.main([str(path)])
    err = capsys.readouterr().err
    assert "RESULTS" in err and message in err
