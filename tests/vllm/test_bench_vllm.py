"""python -m bench.vllm_serve runs end to end (at toy sizes)."""

import json

import pytest

pytest.importorskip("vllm")


def test_the_vllm_benchmark_runs(tmp_path):
    from bench.vllm_serve import main

    out = tmp_path / "vllm.json"
    results = main(["--requests", "4", "--prompt", "8", "--new-tokens", "4", "--layers", "2", "--hidden", "512",
                    "--out", str(out)])
    assert set(results["rows"]) == {"all full", "mixed plans", "one -L plan"}
    for row in results["rows"].values():
        assert row["output_tokens"] == 16 and row["tokens_per_s"] > 0 and row["tpot_ms"] > 0 and row["ttft_ms"] > 0
        assert row["timed_by"] == "vLLM's request metrics"
    rows = results["rows"]
    assert rows["all full"]["flops_vs_full"] == 1.0 and rows["all full"]["tpot_vs_full"] == 1.0
    # The lowest budget's -L plan (budget 0.5) predicts fewer FLOPs than the full plan; the mixed batch's
    # union lies between.
    assert rows["one -L plan"]["flops_vs_full"] < 0.9
    assert rows["one -L plan"]["flops_vs_full"] <= rows["mixed plans"]["flops_vs_full"] <= 1.0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))


def test_tpot_needs_two_new_tokens():
    from bench.vllm_serve import main

    with pytest.raises(SystemExit):
        main(["--new-tokens", "1"])


def test_tpot_is_the_run_beyond_its_first_token_where_vllm_records_no_metrics(monkeypatch):
    """Without request metrics TPOT leaves the prefill out by a second run to the first token:
    (whole run - run to the first token) / (steps - 1)."""
    from types import SimpleNamespace

    import bench.vllm_serve as serve

    walls = iter([2.0, 0.5])  # the whole run, then the run to the first token
    outputs = [SimpleNamespace(metrics=None, outputs=[SimpleNamespace(token_ids=list(range(4)))]) for _ in range(2)]
    monkeypatch.setattr(serve, "_generate_s", lambda llm, prompts, params: (next(walls), outputs))
    params = [SimpleNamespace(clone=lambda: SimpleNamespace(max_tokens=4, min_tokens=4))] * 2
    row = serve._run(None, [None, None], params)
    assert row["ttft_ms"] == 500.0 and row["tpot_ms"] == 500.0 and row["output_tokens"] == 8
    assert row["timed_by"] == "a run to the first token"


def test_tpot_and_ttft_are_the_means_of_vllms_request_metrics(monkeypatch):
    from types import SimpleNamespace

    import bench.vllm_serve as serve

    def output(queued, first, last, tokens):
        return SimpleNamespace(metrics=SimpleNamespace(queued_ts=queued, first_token_ts=first, last_token_ts=last),
                               outputs=[SimpleNamespace(token_ids=list(range(tokens)))])

    outputs = [output(0.0, 1.0, 4.0, 4), output(0.0, 2.0, 8.0, 4)]  # TTFT 1 s and 2 s; TPOT 1 s and 2 s
    monkeypatch.setattr(serve, "_generate_s", lambda llm, prompts, params: (10.0, outputs))
    row = serve._run(None, [None, None], [None, None])
    assert row["ttft_ms"] == 1500.0 and row["tpot_ms"] == 1500.0 and row["timed_by"] == "vLLM's request metrics"
