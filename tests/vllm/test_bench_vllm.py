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
        assert row["output_tokens"] == 16 and row["tokens_per_s"] > 0 and row["tpot_ms"] > 0
    rows = results["rows"]
    assert rows["all full"]["flops_vs_full"] == 1.0 and rows["all full"]["tpot_vs_full"] == 1.0
    # The lowest budget's -L plan (budget 0.5) predicts fewer FLOPs than the full plan; the mixed batch's
    # union lies between.
    assert rows["one -L plan"]["flops_vs_full"] < 0.9
    assert rows["one -L plan"]["flops_vs_full"] <= rows["mixed plans"]["flops_vs_full"] <= 1.0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))
