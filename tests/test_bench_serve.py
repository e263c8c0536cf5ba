"""The serve section: a seeded trace, the serving loop over it on a meta runner (keys, batches), the host time per
event, the measured path (on a CPU at tiny shapes with the torch backend, as the GPU runs it), and the section's
tables, report part and figure (no timing is asserted)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from adallava_kernels import ExecutionPlan, UnitScheme, best_plan, cost, get_shape
from adallava_kernels.runtime.slots import bucket_of

from bench import compare, plot, serve
from bench.__main__ import main as bench_main
from bench.__main__ import report_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gpu_verdict  # noqa: E402

ON_GPU = torch.cuda.is_available()
TINY = get_shape("tiny")
SMALL = serve.TraceConfig(24, 0.7, (8, 40), (2, 12), full_share=0.25, seed=5)


@pytest.fixture(scope="module")
def tiny_meta():
    """A tiny runner on the meta device (weights and pool shapes only)."""
    return serve.meta_runner(TINY, max_tokens=256)


def test_the_trace_is_drawn_from_its_seed():
    trace = serve.make_trace(TINY, SMALL)
    again = serve.make_trace(TINY, SMALL)
    other = serve.make_trace(TINY, dataclasses.replace(SMALL, seed=6))

    def plain(t):
        return [(r.arrival, r.prompt, r.output, r.kind, r.budget) for r in t.requests]

    assert plain(trace) == plain(again) and plain(trace) != plain(other)
    for a, b in zip(trace.requests, again.requests):
        scores_a, scores_b = (a.scores, b.scores) if a.kind == "H" else ((a.scores,), (b.scores,))
        assert a.kind == serve.FULL or all(torch.equal(x, y) for x, y in zip(scores_a, scores_b))
    assert [r.index for r in trace.requests] == list(range(SMALL.requests))
    assert trace.summary() == again.summary() and json.loads(json.dumps(trace.summary())) == trace.summary()


def test_the_trace_draws_poisson_arrivals_lengths_and_plans_as_configured():
    config = serve.TraceConfig(4000, 0.5, (32, 700), (8, 128), full_share=0.2, seed=1)
    trace = serve.make_trace(TINY, config)
    arrivals = [r.arrival for r in trace.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    # Poisson at 0.5 a step: 4000 arrivals over about 8000 steps, about half the steps with none.
    assert 7600 < arrivals[-1] < 8400
    assert all(32 <= r.prompt <= 700 and 8 <= r.output <= 128 for r in trace.requests)
    assert {r.prompt for r in trace.requests} >= {32, 700} and {r.output for r in trace.requests} >= {8, 128}
    kinds = trace.summary()["kinds"]
    assert 0.17 < kinds[serve.FULL] / 4000 < 0.23 and abs(kinds["L"] - kinds["H"]) < 250
    for r in trace.requests:
        assert r.max_tokens == r.prompt + r.output - 1
        if r.kind == serve.FULL:
            assert r.budget == 1.0 and r.scores is None
            continue
        assert 0.5 <= r.budget <= 1.0
        scheme = UnitScheme.default(r.kind, TINY)
        shapes = [tuple(s.shape) for s in (r.scores if r.kind == "H" else (r.scores,))]
        expected = [(scheme.switchable_layers, TINY.num_heads)] * 2 if r.kind == "H" else [(scheme.switchable_layers,)]
        assert shapes == expected
    # At LLaVA-7B each -H request gets a plan of its own (the scheduler's, over its own logits).
    big = get_shape("llava-7b")
    seven = serve.make_trace(big, dataclasses.replace(SMALL, requests=12))
    h = [r for r in seven.requests if r.kind == "H"]
    fingerprints = {best_plan(UnitScheme.default("H", big), r.budget, r.scores).fingerprint for r in h}
    assert len(h) >= 3 and len(fingerprints) == len(h)


def test_the_serving_loop_follows_the_trace_and_counts_the_graph_keys(tiny_meta):
    trace = serve.make_trace(TINY, SMALL)
    server = serve.MetaServer(tiny_meta, trace, capacity=4)  # a small batch: requests queue for a row
    log = server.run()
    assert tiny_meta.sequences == ()  # every request left and was freed
    n = SMALL.requests
    assert log.events == 2 * n and set(log.joined) == set(log.left) == set(range(n))
    assert max(log.rows) == 4 and min(log.rows) >= 1 and len(log.rows) == len(log.keys) == len(log.members)
    steps_of = {}
    for step, members in enumerate(log.members):
        assert len(members) == log.rows[step] and len(set(members)) == len(members)
        for index in members:
            steps_of.setdefault(index, []).append(step)
    for r in trace.requests:
        steps = steps_of[r.index]
        # In the batch for output - 1 consecutive steps (the first token is its prefill's), joined after it arrived.
        assert steps == list(range(log.joined[r.index], log.left[r.index])) and len(steps) == r.output - 1
        plan = log.plans[r.index]
        assert plan == (ExecutionPlan.full(TINY) if r.kind == serve.FULL
                        else best_plan(UnitScheme.default(r.kind, TINY), r.budget, r.scores))
    assert {key[1] for key in log.keys} == {bucket_of(rows) for rows in log.rows}
    assert all(key[1] == bucket_of(rows) for key, rows in zip(log.keys, log.rows))
    assert log.events_before == sorted(log.events_before)

    keys = serve.key_trace(tiny_meta, trace, capacity=4, warm_events=10)
    assert keys["events"] == 2 * n and keys["rows_per_step"] == log.rows and keys["rows_max"] == 4
    first = {}
    for key, before in zip(log.keys, log.events_before):
        first.setdefault(key[1], before)
    # warm_up() named every bucket up to the capacity before the first request: the trace adds none.
    assert [key[1] for key in log.warm_keys] == [1, 2, 4] and set(first) <= {1, 2, 4}
    assert keys["distinct_keys"] == keys["warm_up_keys"] == 3 == len({k["bucket"] for k in keys["keys"]})
    assert keys["new_keys_after_warm_up"] == keys["new_keys_after_warm"] == 0
    assert json.loads(json.dumps(keys)) == keys


def test_every_plan_full_keeps_the_batches(tiny_meta):
    trace = serve.make_trace(TINY, SMALL)
    mixed = serve.MetaServer(tiny_meta, trace, capacity=4).run()
    full = serve.MetaServer(tiny_meta, trace, capacity=4, all_full=True).run()
    assert mixed.members == full.members
    assert all(plan == ExecutionPlan.full(TINY) for plan in full.plans.values())
    predicted = serve.predict(TINY, trace, mixed, "H200", count=5)
    assert predicted["priced_steps"] == 5 and predicted["steps"] == len(mixed.rows)
    assert 0 < predicted["flops_ratio"] < 1 and 0 < predicted["roofline_s_ratio"] <= 1
    step = serve.priced_steps(len(mixed.rows), 5)[2]
    members = mixed.members[step]
    context = round(sum(trace.requests[i].prompt + step - mixed.joined[i] for i in members) / len(members)) + 1
    one = cost.batch_decode_cost(TINY, context, [mixed.plans[i] for i in members], union=True)
    assert one.flops <= predicted["mixed"]["flops"]
    assert serve.priced_steps(10, 4) == [0, 3, 6, 9] and serve.priced_steps(3, 4) == [0, 1, 2]


def test_mark_prefilled_records_what_a_prefill_records(tiny_meta):
    plan = ExecutionPlan.full(TINY)
    tiny_meta.admit("p", plan, 20)
    try:
        serve.mark_prefilled(tiny_meta, "p", 7)
        request = tiny_meta.decode_request("p")  # refused unless prefilled
        assert (request.prefilled, request.length) == (True, 7) and tiny_meta.cache.length("p", 0) == 7
        assert request.starts.shape == (1,) and request.starts.dtype == torch.int32
        with pytest.raises(ValueError, match="already prefilled"):
            serve.mark_prefilled(tiny_meta, "p", 7)
    finally:
        tiny_meta.free("p")


def test_host_times_on_a_tiny_meta_shape(tiny_meta):
    rows = serve.host_times(TINY, batch_sizes=(1, 4), repeats=2, steps=2, prompt=8, max_tokens=256,
                            runner=tiny_meta)
    assert [(r["event"], r["batch"]) for r in rows] == [(e, b) for b in (1, 4) for e in serve.EVENTS]
    for r in rows:
        assert 0 < r["q1_s"] <= r["median_s"] <= r["q3_s"] and isinstance(r["ops"], int)
        assert r["reps"] == {"step": 4, "admission -L": 1, "admission -H": 1}.get(r["event"], 2)
    ops = {(r["event"], r["batch"]): r["ops"] for r in rows}
    # A join, a step and the union's derivation launch as many ops at 1 row as at 4.
    for event in ("join", "prepare", "step", "admission -L", "admission -H"):
        assert ops[event, 1] == ops[event, 4] > 0
    assert tiny_meta.sequences == ()


def test_the_measured_path_on_a_cpu(tmp_path):
    """What a GPU runs (real prefills and steps, timed; then every plan full), on a CPU at tiny shapes."""
    trace = serve.make_trace(TINY, dataclasses.replace(SMALL, requests=8))
    runner = serve.gpu_runner(TINY, torch.device("cpu"), torch.float32, trace, backend="torch", capacity=4)
    measured = serve.measure_trace(runner, trace, capacity=4, priced=3)
    assert runner.sequences == ()
    tokens = sum(r.output for r in trace.requests)
    for which in ("mixed", "full"):
        run = measured[which]
        assert run["output_tokens"] == tokens and run["tokens_per_s"] > 0
        assert run["ttft"]["count"] == run["tpot"]["count"] == 8 and run["step_wall"]["count"] == run["steps"]
        assert run["step_gpu"]["count"] == 0 and run["step_gpu_sum_s"] is None  # no GPU time on a CPU
        assert run["graphs"] == {"enabled": False}
    assert measured["warm_up"]["requests"] == 4
    assert measured["predicted"]["priced_steps"] == 3 and measured["measured_ratio"]["step_wall_priced"] > 0
    json.dumps(measured)
    # The host-time events on that runner (on a GPU: real launches), as the section times them after the trace.
    rows = serve.host_times(TINY, batch_sizes=(1, 4), repeats=2, steps=1, prompt=8, max_tokens=trace.max_tokens,
                            runner=runner)
    assert len(rows) == 2 * len(serve.EVENTS) and runner.sequences == ()


def test_the_section_runs_renders_and_is_read_by_the_result_tools(tmp_path, capsys):
    out = tmp_path / "run"
    results = bench_main(["--model", "tiny", "--only", "serve", "--quick", "--backend", "torch" if not ON_GPU
                          else "auto", "--serve-events", "40", "--serve-requests", "6", "--out", str(out)])
    served = json.loads((out / "results.json").read_text())["serve"]
    assert served == json.loads(json.dumps(results["serve"]))
    assert served["host_model"] == "tiny" and served["host_device"] == "meta" and served["threads"] == 1
    assert {(r["event"], r["batch"]) for r in served["rows"]} == {(e, b) for e in serve.EVENTS
                                                                 for b in serve.BATCH_SIZES}
    assert served["keys"]["events"] == 40 and served["keys"]["distinct_keys"] >= 1
    printed = capsys.readouterr().out
    assert "one thread" in printed and "graph keys over a trace of 40 join/leave events" in printed
    if ON_GPU:
        assert served["gpu"]["mixed"]["graphs"]["captures"] == 0 and "tokens/s" in printed
    else:
        assert served["gpu"]["status"] == "pending" and "measured: pending" in printed
        assert 0 < served["predicted"]["roofline_s_ratio"] <= 1
    # A GPU run adds the events timed on its runner: a table of their own, cases of their own.
    on_device = served | {"device_rows": served["rows"], "device_repeats": 5, "backend": "triton"}
    assert "the same events on the GPU runner" in serve.table(on_device)
    assert "the same events on the GPU runner" in serve.markdown(on_device)
    assert "serve tiny device join B16" in serve.summary_cases(on_device)
    report = (out / "report.md").read_text()
    assert "## Serving: a trace of requests" in report and "| plan -H |" in report
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cases = compare.section_cases(results)["serve"]
    assert "serve tiny meta prepare B64" in cases and len(cases) >= len(serve.EVENTS) * len(serve.BATCH_SIZES)
    result = compare.compare(results, results)
    assert result["rows"] and not compare.unpaired(result)
    assert report_markdown(results) == report
    assert plot.not_drawn(results) == []
    # The gpu-check verdict reads the section from a folder laid out as gpu_check's.
    (tmp_path / "check" / "serve").mkdir(parents=True)
    (out / "results.json").rename(tmp_path / "check" / "serve" / "results.json")
    rows = {r["what"]: r for r in gpu_verdict.verdict(tmp_path / "check")["rows"]}
    keys = rows["graph keys over a 40-event trace: distinct, new after 100 events"]
    assert keys["measured"] == f"{served['keys']['distinct_keys']}, {served['keys']['new_keys_after_warm']}"
    if ON_GPU:
        assert rows["graph captures while the traces run (after warm-up)"]["holds"] is True
    else:
        assert rows["serving trace measured on the GPU"]["holds"] is None
