"""bench.launch_host: the eager decode step's host time with launches stubbed, at tiny shapes."""

import json

from triton.runtime.jit import JITFunction

from adallava_kernels.ops import common, tuning
from adallava_kernels.runtime import decode, step

from bench import launch_host


def test_it_times_both_layers_of_each_batch_and_restores_what_it_stubbed(tmp_path):
    before = (JITFunction.run, tuning.Tuned.config_for, common.COMPILE_ONLY, step._LAUNCH, decode._LAUNCH)
    out = tmp_path / "host.json"
    assert launch_host.main([str(out), "--model", "tiny", "--batches", "1,3", "--steps", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["path"] == "eager launchers" and [r["batch"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        # The five kernels of each of the 3 layers (q|k|v, attention, o_proj, gate|up, down), and the step's
        # own: the rows' rotary angles, the final norm, the greedy tokens.
        assert row["launches_per_layer"] == 5 and row["launches_per_step"] == 18
        assert min(row["first_layer_us"], row["whole_layer_us"], row["partial_layer_us"], row["per_launch_us"]) > 0
        assert row["step_layers_ms"] > 0
    through = launch_host.measure("tiny", (2,), 2, dispatcher=True)
    assert through["path"] == "dispatcher" and through["rows"][0]["launches_per_layer"] == 5
    assert (JITFunction.run, tuning.Tuned.config_for, common.COMPILE_ONLY, step._LAUNCH, decode._LAUNCH) == before


def test_bad_batches_are_refused_naming_the_flag(tmp_path, capsys):
    import pytest

    for bad in ("0", "a,b", ""):
        with pytest.raises(SystemExit):
            launch_host.main([str(tmp_path / "x.json"), "--batches", bad])
        assert "--batches" in capsys.readouterr().err
