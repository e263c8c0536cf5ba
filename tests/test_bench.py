"""The benchmark runner runs end to end and records what it ran (no timing is asserted)."""

import json

import pytest

from bench.__main__ import main
from bench.mlp import KEEP_RATIOS

from adallava_kernels import ExecutionPlan, cost, get_shape


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    main(["--model", "tiny", "--mlp-scale", "1", "--mlp-tokens", "1,9", "--quick",
          "--budgets", "0.5,0.75,1.0", "--roofline-device", "A100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "AdaLLaVA-H" in printed and "index_select" in printed
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

    mlp = data["mlp"]
    names = mlp["providers"]
    # Without a GPU every torch provider runs and the Triton one says why it did not.
    assert names == ["dense", "zero_mask", "index_select", "pregathered"]
    assert set(mlp["skipped"]) == {"triton"}
    for tokens in (1, 9):
        rows = [r for r in mlp["rows"] if r["tokens"] == tokens]
        expected = [("dense", 1.0)] + [(n, r) for r in KEEP_RATIOS for n in names[1:]]
        assert [(r["provider"], r["keep_ratio"]) for r in rows] == expected
    assert all(r["median_s"] > 0 and r["model"] == "tiny" for r in mlp["rows"])


def test_bench_rejects_budget_outside_range(capsys):
    with pytest.raises(SystemExit):
        main(["--budgets", "0.4,0.9"])
    assert "latency budget must be a number in [0.5, 1.0]" in capsys.readouterr().err
