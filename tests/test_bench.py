"""The benchmark runner runs end to end and records what it ran (no timing is asserted)."""

import json

import pytest

from bench.__main__ import main
from bench.mlp import KEEP_RATIOS

from adallava_kernels import ExecutionPlan, cost, get_shape


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    main(["--model", "tiny", "--mlp-scale", "1", "--mlp-tokens", "8", "--quick",
          "--budgets", "0.5,0.75,1.0", "--roofline-device", "A100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "AdaLLaVA-H" in printed and "masked_torch" in printed
    data = json.loads(out.read_text())
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

    mlp_rows = data["mlp"]["rows"]
    assert [r["provider"] for r in mlp_rows] == ["dense"] + ["masked_torch"] * len(KEEP_RATIOS)
    assert [r["keep_ratio"] for r in mlp_rows[1:]] == list(KEEP_RATIOS)
    assert all(r["median_s"] > 0 for r in mlp_rows)


def test_bench_rejects_budget_outside_range(capsys):
    with pytest.raises(SystemExit):
        main(["--budgets", "0.4,0.9"])
    assert "latency budget must be a number in [0.5, 1.0]" in capsys.readouterr().err
