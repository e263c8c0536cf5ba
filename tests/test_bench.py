"""The benchmark runner runs end to end and records what it ran (no timing is asserted)."""

import importlib.util
import json

import pytest
import torch

from bench import report, timing
from bench.__main__ import main
from bench.attention import HEAD_FRACTIONS
from bench.mlp import KEEP_RATIOS

from adallava_kernels import ExecutionPlan, cost, get_device, get_shape

# The bench runs on CUDA when there is a GPU, which adds the GPU-only providers.
ON_GPU = torch.cuda.is_available()
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run"
    # --models: on CUDA the default adds the llava-7b and -13b op shapes.
    main(["--model", "tiny", "--models", "tiny", "--scale", "1", "--mlp-tokens", "1,9", "--quick", "--no-static",
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
    # The ops are timed in the run's dtype (bfloat16 on CUDA, float32 on a CPU); the bytes follow it.
    element = torch.finfo(getattr(torch, data["meta"]["dtype"])).bits / 8
    precision = cost.Precision(element, element, element)
    for stage, q_len, kv_len in (("prefill", 19, 19), ("decode", 1, 22)):
        rows = [r for r in attention["rows"] if r["stage"] == stage]
        expected = [("sdpa_all", heads)] + [
            (n, round(f * heads)) for f in HEAD_FRACTIONS for n in attention["providers"][1:]
        ]
        assert [(r["provider"], r["heads"]) for r in rows] == expected
        assert all((r["batch"], r["q_len"], r["kv_len"]) == (2, q_len, kv_len) and timed(r) for r in rows)
        for r in rows:
            predicted = cost.masked_attention_cost(shape, heads=r["heads"], kv_heads=r["kv_heads"], q_tokens=q_len,
                                                   kv_tokens=kv_len, batch_size=2, precision=precision)
            full = cost.masked_attention_cost(shape, heads=heads, kv_heads=shape.num_kv_heads, q_tokens=q_len,
                                              kv_tokens=kv_len, batch_size=2, precision=precision)
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
    """A row that carries a wall-time median with its quartiles, its GPU time and host share on a GPU, and
    none on a CPU."""
    # do_bench (an op on CUDA) does not say how many repetitions it took.
    reps_known = row["reps"] >= 1 if row["reps"] is not None else row["timer"] == timing.DO_BENCH
    if not 0 < row["q1_s"] <= row["median_s"] <= row["q3_s"] or not reps_known or not row["timer"]:
        return False
    if ON_GPU:
        return row["gpu_s"] is not None and row["gpu_s"] > 0 and bool(row["gpu_source"]) \
            and row["host_share"] is not None
    return row["gpu_s"] is None and row["host_share"] is None


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


# -- a section that fails ------------------------------------------------------------

def test_a_failing_section_is_recorded_and_the_others_are_written(tmp_path, capsys, monkeypatch):
    import bench.__main__ as runner

    def broken(*args):
        raise ValueError("sequence is full")

    monkeypatch.setattr(runner, "run_attention", broken)
    out = tmp_path / "run"
    results = main(["--model", "tiny", "--models", "tiny", "--only", "attention,kv", "--quick", "--scale", "1",
                    "--attention-seqs", "9", "--attention-contexts", "9", "--budgets", "0.5,1.0", "--out", str(out)])
    captured = capsys.readouterr()
    assert "section attention failed: ValueError: sequence is full (the other sections go on)" in captured.out
    assert "Traceback" in captured.err and runner.exit_status(results) == 1
    data = json.loads((out / "results.json").read_text())
    assert "attention" not in data and data["kv_cache"]["bandwidth"]  # the section after it ran
    error = data["errors"]["attention"]
    assert (error["type"], error["message"]) == ("ValueError", "sequence is full")
    report_md = (out / "report.md").read_text()
    assert "sections that failed: attention (ValueError: sequence is full)" in report_md.splitlines()[0]
    assert "## Sections that failed" in report_md


def test_a_run_without_failures_exits_zero():
    import bench.__main__ as runner

    assert runner.exit_status({"errors": {}}) == 0


# -- clear errors and readable numbers -----------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("cuda", "--device is 'cuda', but CUDA is not available here; use 'cpu'"),
    ("gpu", "--device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"),
], ids=["cuda-without-cuda", "unknown"])
def test_bench_names_a_device_it_cannot_use_in_one_line(device, message, capsys, monkeypatch):
    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (main, gpu_check.main):
        with pytest.raises(SystemExit) as exit_info:
            command(["--device", device])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_small_flops_print_in_a_unit_that_fits():
    from bench import model as model_bench
    from bench import plans
    from bench._common import flops_text

    assert [flops_text(f) for f in (3.765e6, 215.2e6, 1.895e9, 13.48e12, 512)] == [
        "3.765 MFLOP", "215.2 MFLOP", "1.895 GFLOP", "13.48 TFLOP", "512 FLOP"]
    row = {"model": "tiny", "stage": "decode", "family": model_bench.FULL, "label": "full", "layers_on": 4,
           "flops": 3.765e6, "median_s": 1e-3, "iqr_ratio": 0.0, "unstable": False, "gpu_s": None,
           "host_share": None, "roofline_s": 1.5e-6}
    text = model_bench.table([row])
    assert "3.765 MFLOP" in text and "0.0000" not in text
    tiny = get_shape("tiny")
    text = plans.table(plans.run(tiny, [0.5, 1.0], get_device("H200"), 700, 700))
    assert "1.895 GFLOP" in text and "3.789 GFLOP" in text


# -- the decode step's room ---------------------------------------------------------------

@pytest.mark.parametrize("budget", [timing.END_TO_END, timing.QUICK], ids=["end-to-end", "quick"])
def test_a_timed_decode_has_room_for_every_call_the_timer_can_make(budget, monkeypatch):
    from bench import model as model_bench

    bench = model_bench.setup(get_shape("tiny"), "tiny", torch.device("cpu"), torch.float32, get_device("H200"), 16,
                              "torch", budget)
    device = torch.device("cpu")
    most = timing.max_calls(budget, device, model_bench.DECODE_CALLS_PER_REP)

    def every_call(fn, device, budget, most_per_rep):
        # The timer at its worst: as many calls as its budget allows.
        assert most_per_rep == model_bench.DECODE_CALLS_PER_REP
        for _ in range(timing.max_calls(budget, device, most_per_rep)):
            fn()
        return timing.Timing(1e-3, 1e-3, 1e-3, 1, "every call")

    monkeypatch.setattr(timing, "measure", every_call)
    measured, taken = model_bench.runtime_decode_step(bench.model, bench.ids, ExecutionPlan.full(bench.shape),
                                                      "torch", device, budget)
    assert taken == most and measured.timer == "every call"


# -- gpu-check: the reduced plan set in one table -----------------------------------------

def test_gpu_check_prints_one_table_and_writes_json_after_every_plan(tmp_path, capsys, monkeypatch):
    from bench import gpu_check

    written = []
    real_write = gpu_check.write_json
    monkeypatch.setattr(gpu_check, "write_json", lambda path, payload: written.append(
        (path, len(payload["model_runs"]["rows"]), "floor" in payload)) or real_write(path, payload))
    out = tmp_path / "check"
    gpu_check.main(["--device", "cpu", "--quick", "--tokens", "16", "--backend", "torch", "--out", str(out)])
    labels = ["full", "L 0.50", "L 0.75", "L 1.00", "H 0.50", "H 0.75", "H 1.00", "random-H 0", "random-H 1"]
    # results.json after each of the 9 plans (prefill and decode rows), then with the floor, then with the
    # distinct plans' graph count, then with the prefill's host profiles.
    assert [(rows, floor) for _, rows, floor in written] == [(2 * i, False) for i in range(1, 10)] + [(18, True)] * 3
    assert {path for path, _, _ in written} == {out / "results.json"}
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == "tiny" and not data["errors"] and data["meta"]["command"].split()[1:3] == [
        "-m", "bench.gpu_check"]
    assert [r["label"] for r in data["model_runs"]["rows"] if r["stage"] == "decode"] == labels
    # Timed on the CPU whatever the machine has: no GPU time.
    assert all(0 < r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["gpu_s"] is None for r in data["model_runs"]["rows"])

    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if "prefill wall ms" in line)
    assert "decode wall ms" in lines[header] and "GPU / wall" in lines[header]
    table = "\n".join(lines[header:])
    # One row a plan, under the header and its rule.
    assert all(f"  {label}  " in line for line, label in zip(lines[header + 2:header + 11], labels, strict=True))
    check = data["check"]
    for stage in ("prefill", "decode"):
        c = check[stage]
        assert c["plans"] == 9 and c["pearson_gpu"] is None and c["worst_gpu"] is None
        assert f"{stage}: r(FLOPs, wall) {report.r_text(c['pearson_wall'])}, r(FLOPs, GPU) -; worst deviation wall " \
               f"{c['worst_wall']:+.1%} ({c['worst_wall_label']})" in table
    # The floor: the bytes the full plan's decode step reads, at the rate of this run's copy.
    floor = data["floor"]
    full_decode = data["model_runs"]["rows"][1]
    assert floor["read_bytes"] == full_decode["read_bytes"] > 0
    assert floor["floor_s"] == pytest.approx(floor["read_bytes"] / floor["copy_bytes_per_s"])
    assert floor["copy_bytes_per_s"] == pytest.approx(2 * floor["copy_bytes"] / floor["copy"]["median_s"])
    assert floor["step_s"] == full_decode["median_s"] and floor["step_source"] == "median_s"
    assert f"full-plan decode step: wall {floor['step_s'] * 1e3:.3f} ms, {floor['vs_floor']:.2f}x the bandwidth " \
           f"floor of {floor['floor_s'] * 1e3:.3f} ms" in table
    # Where the prefill's host time goes, for the full plan and a -H plan: on a CPU the call returns when done.
    hosts = data["host_profile"]
    assert set(hosts) == {"full", "H 0.50"}
    for label, host in hosts.items():
        assert 0 < host["host_s"] <= host["wall_s"] and host["syncs"] is None and host["reps"] == 3
        assert 0 < len(host["top"]) <= 25 and host["profiled_s"] >= sum(row["own_s"] for row in host["top"])
        assert any("masked_attention.py" in row["function"] for row in host["top"]), host["top"]
        assert f"prefill host time, {label}: returns after {host['host_s'] * 1e3:.3f} ms of " in table


def test_gpu_check_cut_short_keeps_the_plans_it_finished(tmp_path, monkeypatch):
    from bench import gpu_check
    from bench import model as model_bench

    real_rows, done = model_bench.plan_rows, []

    def two_then_fail(bench, family, label, plan):
        if len(done) == 2:
            raise RuntimeError("out of memory")
        done.append(label)
        return real_rows(bench, family, label, plan)

    monkeypatch.setattr(model_bench, "plan_rows", two_then_fail)
    out = tmp_path / "check"
    results = gpu_check.main(["--device", "cpu", "--quick", "--tokens", "8", "--backend", "torch", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in data["model_runs"]["rows"]] == ["full", "full", "L 0.50", "L 0.50"]
    error = data["errors"]["model"]
    assert (error["type"], error["message"]) == ("RuntimeError", "out of memory") and "Traceback" in error["traceback"]
    assert "floor" in data and results["errors"]


def test_kernels_profiles_a_full_and_a_partial_layer_in_prefill_and_decode(tmp_path, capsys):
    main(["--model", "tiny", "--only", "kernels", "--backend", "torch", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "measured copy rate" in printed and "matmul rate" in printed and "ridge point" in printed
    profiled = json.loads((tmp_path / "results.json").read_text())["kernels"]
    assert profiled["copy_bytes_per_s"] > 0 and profiled["matmul_flops_per_s"] > 0
    assert profiled["model"] == "tiny" and profiled["tokens"] > 0 and profiled["context"] > 1
    layers = {(layer["layer"], layer["stage"]): layer for layer in profiled["layers"]}
    assert set(layers) == {(kind, stage) for kind in ("full", "partial") for stage in ("prefill", "decode")}
    for layer in layers.values():
        assert layer["kernel_count"] == len(layer["kernels"]) >= 1 and layer["total_s"] > 0
        assert all(kernel["seconds"] > 0 for kernel in layer["kernels"])
        priced = [kernel for kernel in layer["kernels"] if kernel["ops"] is not None]
        assert priced and all(kernel["flops"] > 0 and kernel["fraction"] > 0 for kernel in priced)
    for stage in ("prefill", "decode"):
        assert layers["partial", stage]["predicted_flops"] < layers["full", stage]["predicted_flops"]
    # The decode step's own kernels, outside its layers (the torch path's): on a CPU its top-level ops, views
    # included, among them the embedding, the final norm's, lm_head and the greedy tokens'.
    ends = profiled["step_ends"]
    names = [kernel["name"] for kernel in ends["kernels"]]
    assert ends["kernel_count"] == len(names) >= 5 and ends["total_s"] > 0 and ends["context"] == profiled["context"]
    if not torch.cuda.is_available():
        assert {"aten::embedding", "aten::rsqrt", "aten::matmul", "aten::argmax"} <= set(names), names
    assert f"a decode step's own kernels, outside its layers (one row, context {ends['context']})" in printed
    if not torch.cuda.is_available():
        # Without a GPU the section adds the static report of the 7B decode step compiled for sm_90.
        static = profiled["static"]
        assert "static model of the llava-7b decode step compiled for cuda:90" in printed
        sites = {row["site"] for row in static["launches"]}
        assert {"decode b1 whole", "decode b1 partial", "decode b16 whole", "decode b16 partial"} <= sites
        assert all(row["failures"] == [] for row in static["launches"])
        assert [(s["batch"], s["partial_layers"]) for s in static["steps"]] == [(1, 0), (1, 16), (16, 0), (16, 16)]
        assert all(0 < s["share"] <= 1 for s in static["steps"])
        # The fixed cost a kernel could pay with the step at the target share: above the model's where the step
        # already meets it, and with it in place of the model's the step lands on the target exactly.
        for s in static["steps"]:
            assert (s["fixed_s_at_target"] >= static["fixed_s"]) == (s["share"] >= static["target_share"])
            seconds = s["seconds"] + s["kernels"] * (s["fixed_s_at_target"] - static["fixed_s"])
            assert s["bytes"] / static["copy_rate"] / seconds == pytest.approx(static["target_share"])
            # With the phased MLP each layer trades a kernel's fixed cost for a phase boundary's; with the phased
            # attention too, two; with the whole attention block phased, three.
            for key, boundaries in (("phase_s_at_target", 1), ("phases_s_at_target", 2),
                                    ("block_phases_s_at_target", 3)):
                phased = s["seconds"] - boundaries * s["layers"] * (static["fixed_s"] - s[key])
                assert s["bytes"] / static["copy_rate"] / phased == pytest.approx(static["target_share"])
        assert (tmp_path / "static.json").exists()


def test_the_host_profile_adds_the_prefill_furthest_above_its_gpu_time():
    from bench.gpu_check import host_profiled

    def row(stage, label, wall, gpu):
        return {"stage": stage, "label": label, "median_s": wall, "gpu_s": gpu}

    rows = [row("prefill", "full", 27.0, 14.4), row("decode", "full", 4.6, 4.4),
            row("prefill", "L 0.50", 22.0, 7.4), row("prefill", "L 0.75", 44.8, 10.9),
            row("decode", "L 0.75", 9.0, 1.0),  # a decode step is not what the profile is for
            row("prefill", "H 0.50", 16.9, 7.2)]
    assert host_profiled(rows) == ["full", "H 0.50", "L 0.75"]
    # No GPU time (a CPU): the fixed plans alone; a plan that did not run is left out.
    assert host_profiled([{**r, "gpu_s": None} for r in rows if r["label"] != "H 0.50"]) == ["full"]
    # The worst is one of the fixed plans: it is not profiled twice.
    assert host_profiled([row("prefill", "full", 50.0, 10.0), row("prefill", "H 0.50", 16.9, 7.2)]) == \
        ["full", "H 0.50"]


def test_host_profile_counts_the_syncs_torch_reports_and_restores_its_mode(monkeypatch):
    """On CUDA the synchronisations of a call are what torch's sync debug mode warns of while it runs; the mode
    is put back to the default after it, even when the call raises. (Its mode and the synchronize are stood
    in for here: the warning is what torch gives for a synchronising call.)"""
    import warnings

    from bench import host

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def call():
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")

    profile = host.host_profile(call, torch.device("cuda"), reps=2)
    assert profile["syncs"] == {"count": 2, "messages": ["called a synchronizing CUDA operation"]}
    assert modes == ["warn", "default"] and profile["reps"] == 2

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        host._syncs(failing, torch.device("cuda"))
    assert modes[-2:] == ["warn", "default"]
