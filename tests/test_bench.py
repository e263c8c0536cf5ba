"""The benchmark runner runs end to end and records what it ran (no timing is asserted)."""

import importlib.util
import json

import pytest
import torch

from bench.__main__ import main
from bench.attention import HEAD_FRACTIONS
from bench.mlp import KEEP_RATIOS

from adallava_kernels import ExecutionPlan, cost, get_shape

# The bench runs on CUDA when there is a GPU, which adds the GPU-only providers.
ON_GPU = torch.cuda.is_available()
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--model", "tiny", "--scale", "1", "--mlp-tokens", "1,9", "--quick",
          "--attention-seqs", "19", "--attention-contexts", "21", "--attention-batches", "2",
          "--budgets", "0.5,0.75,1.0", "--roofline-device", "A100", "--decode-steps", "2", "--random-plans", "2",
          "--latency-prompt", "16", "--latency-new-tokens", "2", "--backend", "torch", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "index_select" in printed and "validation on" in printed and "request latency on" in printed
    # tiny's -H units are whole layers: its -H plans are the -L plans, shown once.
    assert "AdaLLaVA-L = -H" in printed and "each -H unit is a whole layer" in printed
    data = json.loads((out / "results.json").read_text())
    for figure in ("plot.png", "latency.png", "ops.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_md = (out / "report.md").read_text()
    assert report_md.startswith("On ") and "library series follow FLOPs in wall time" in report_md.splitlines()[0]
    assert "| model tiny prefill |" in report_md and "## Request latency per budget" in report_md
    assert {"date", "commit", "command", "device", "dtype", "torch"} <= set(data["meta"])
    assert data["roofline_device"]["name"] == "A100"

    rows = data["plans"]["rows"]
    assert [(r["kind"], r["budget"]) for r in rows] == [
        (k, b) for k in ("AdaLLaVA-L", "AdaLLaVA-H") for b in (0.5, 0.75, 1.0)
    ]
    shape = get_shape("tiny")
    for row in rows:
        plan = ExecutionPlan.from_json(row["plan"], shape=shape)
        assert row["prefill_flops"] == cost.prefill_flops(shape, data["plans"]["num_tokens"], plan)

    mlp = data["mlp"]
    names = mlp["providers"]
    # Every torch provider runs; Triton runs on CUDA and, elsewhere, says why it did not.
    assert names == ["dense", "zero_mask", "index_select", "pregathered"] + (["triton"] if ON_GPU else [])
    assert set(mlp["skipped"]) == (set() if ON_GPU else {"triton"})
    for tokens in (1, 9):
        rows = [r for r in mlp["rows"] if r["tokens"] == tokens]
        expected = [("dense", 1.0)] + [(n, r) for r in KEEP_RATIOS for n in names[1:]]
        assert [(r["provider"], r["keep_ratio"]) for r in rows] == expected
    # The share that ran: whole groups of neurons.
    assert {r["keep_ratio"]: r["kept_share"] for r in mlp["rows"]}[0.85] == 455 / 520
    assert all(r["kept_share"] == r["neurons"] / shape.intermediate_size for r in mlp["rows"])
    assert all(timed(r) and r["model"] == "tiny" for r in mlp["rows"])

    attention = data["attention"]
    # flash_attn (where it imports) and Triton are timed on CUDA only; each says why it did not run.
    on_gpu = ["flash_attn"] * HAS_FLASH_ATTN + ["triton"]
    assert attention["providers"] == ["sdpa_all", "sdpa_gathered"] + (on_gpu if ON_GPU else [])
    assert set(attention["skipped"]) == {"flash_attn", "triton"} - set(on_gpu if ON_GPU else [])
    heads = shape.num_heads
    for stage, q_len, kv_len in (("prefill", 19, 19), ("decode", 1, 22)):
        rows = [r for r in attention["rows"] if r["stage"] == stage]
        expected = [("sdpa_all", heads)] + [
            (n, round(f * heads)) for f in HEAD_FRACTIONS for n in attention["providers"][1:]
        ]
        assert [(r["provider"], r["heads"]) for r in rows] == expected
        assert all((r["batch"], r["q_len"], r["kv_len"]) == (2, q_len, kv_len) and timed(r) for r in rows)
        for r in rows:
            predicted = cost.masked_attention_cost(shape, heads=r["heads"], kv_heads=r["kv_heads"], q_tokens=q_len,
                                                   kv_tokens=kv_len, batch_size=2, precision=cost.Precision(4, 4, 4))
            full = cost.masked_attention_cost(shape, heads=heads, kv_heads=shape.num_kv_heads, q_tokens=q_len,
                                              kv_tokens=kv_len, batch_size=2, precision=cost.Precision(4, 4, 4))
            assert r["flops_ratio"] == predicted.flops / full.flops
            assert r["kv_bytes"] == predicted.kv_load_bytes

    kv = data["kv_cache"]
    # Measured bytes of the real caches equal the cost model's, and the rows cover every plan.
    assert [(r["cache"], r["kind"], r["budget"]) for r in kv["memory"]] == [("DynamicCache", "dense", 1.0)] + [
        ("LayerSkipKVCache", k, b) for k in ("AdaLLaVA-L", "AdaLLaVA-H") for b in (0.5, 0.75, 1.0)
    ]
    assert all(r["bytes"] == r["predicted_bytes"] and r["bytes"] > 0 for r in kv["memory"])
    assert kv["memory"][1]["bytes"] < kv["memory"][0]["bytes"]  # budget 0.5 keeps fewer layers
    assert [r["op"] for r in kv["bandwidth"]] == ["append 1 token(s)", "append 19 token(s)", "gather 21 positions"]
    assert all(timed(r) for r in kv["bandwidth"])

    # End to end: every plan ran in both stages; 3 budgets x 3 families + 2 random plans >= 10 plans,
    # with the full plan and transformers' model as references.
    model_rows = data["model_runs"]["rows"]
    families = {"AdaLLaVA-L", "AdaLLaVA-H", "early-exit", "random-L", "random-H", "dense (transformers)", "full plan"}
    assert {r["family"] for r in model_rows} == families
    for stage in ("prefill", "decode"):
        planned = [r for r in model_rows if r["stage"] == stage and r["family"] != "dense (transformers)"]
        assert len(planned) == 12 and all(timed(r) and r["flops"] > 0 for r in planned)
        for r in planned:
            plan = ExecutionPlan.from_json(r["plan"], shape=shape)
            if stage == "prefill":
                assert r["flops"] == cost.prefill_flops(shape, data["model_runs"]["tokens"], plan, batch_size=1)

    # The report covers every provider that ran, with the number of points it measured.
    series = {(s["op"], s["series"]): s["points"] for s in data["report"]["series"]}
    for provider in names[1:]:
        for tokens in (1, 9):
            assert series[(f"mlp tiny {tokens} tok", provider)] == len(KEEP_RATIOS)
    assert series[("attention tiny prefill b2 q19 kv19", "sdpa_gathered")] == len(HEAD_FRACTIONS)
    assert series[("model tiny prefill", "adallava_kernels (torch), all plans")] == 12
    assert series[("model tiny decode", "adallava_kernels (torch), all plans")] == 12
    assert all(s["verdict"] for s in data["report"]["series"])
    # zero_mask saves nothing by design: a reference, not judged.
    assert {s["verdict"] for s in data["report"]["series"] if s["series"] == "zero_mask"} == {"reference: not judged"}

    # Request latency: every family at every budget, then the full plan and transformers' generate.
    latency = data["latency"]
    assert (latency["prompt_tokens"], latency["new_tokens"]) == (16, 2)
    assert [(r["family"], r["budget"]) for r in latency["rows"]] == [
        (f, b) for f in ("AdaLLaVA-L", "AdaLLaVA-H", "early-exit") for b in (0.5, 0.75, 1.0)
    ] + [("full plan", 1.0), ("dense (transformers)", 1.0)]
    for r in latency["rows"]:
        assert all(timed(r[metric]) for metric in ("ttft", "e2e"))
        plan = r["plan"] and ExecutionPlan.from_json(r["plan"], shape=shape)
        if r["family"] == "early-exit":
            assert sum(plan.layer_mask) == int(shape.num_layers * r["budget"])
    assert data["timing"]["end_to_end"]["min_reps"] == 2  # --quick


def timed(row):
    """A row that carries a wall-time median with its quartiles, and no GPU time on a CPU."""
    if not 0 < row["q1_s"] <= row["median_s"] <= row["q3_s"] or row["reps"] < 1 or not row["timer"]:
        return False
    return ON_GPU or (row["gpu_s"] is None and row["host_share"] is None)


def test_bench_only_runs_the_chosen_sections_and_compares(tmp_path, capsys):
    out = tmp_path / "only"
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    # An earlier run that timed one case in common, at 1 ms.
    old.write_text(json.dumps({"meta": {"device": "elsewhere"}, "model_runs": {"rows": [
        {"model": "tiny", "stage": "prefill", "family": "AdaLLaVA-L", "label": "L 0.50", "seconds": 1e-3}]}}))
    main(["--model", "tiny", "--only", "model", "--quick", "--budgets", "0.5,1.0", "--decode-steps", "2",
          "--random-plans", "6", "--backend", "torch", "--compare", str(old), "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert data["sections"] == ["model"] and "mlp" not in data and "attention" not in data and "latency" not in data
    # 2 budgets x 3 families + 6 random plans + the full plan: the end-to-end correlation covers 13 plans.
    prefill = [s for s in data["report"]["series"] if s["op"] == "model tiny prefill"][0]
    assert prefill["points"] == 13 and prefill["pearson"] is not None
    (row,) = data["compare"]["rows"]
    new_s = [r for r in data["model_runs"]["rows"] if r["stage"] == "prefill" and r["label"] == "L 0.50"][0]
    assert row["case"] == "model tiny prefill L 0.50" and row["old_s"] == 1e-3
    assert row["ratio"] == new_s["median_s"] / 1e-3
    assert f"## Against {old}" in (out / "report.md").read_text()
    assert not (out / "latency.png").exists() and (out / "plot.png").exists()
    with pytest.raises(SystemExit):
        main(["--only", "mlp,gpu"])
    assert "--only takes a comma-separated subset of mlp,attention,kv,model" in capsys.readouterr().err


def test_bench_rejects_budget_outside_range(capsys):
    with pytest.raises(SystemExit):
        main(["--budgets", "0.4,0.9"])
    assert "latency budget must be a number in [0.5, 1.0]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--latency-new-tokens", "1"], "--latency-new-tokens must be at least 2"),
    (["--min-reps", "0"], "expected a positive int, got '0'"),
    (["--min-time", "fast"], "expected a positive float, got 'fast'"),
], ids=["one-new-token", "zero-reps", "not-a-number"])
def test_bench_rejects_bad_timing_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
