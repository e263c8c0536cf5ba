"""The tuned-config table: buckets, lookups, what a launch takes, the committed table's consistency, and the
sweep (bench.tune) run under the interpreter at tiny shapes."""

import json
from types import SimpleNamespace

import pytest
import torch

from adallava_kernels.ops import tuning
from adallava_kernels.ops.gathered_linear import COL_KERNELS, ROW_KERNELS
from adallava_kernels.ops.triton_utils import config

from bench import tune


def test_buckets_round_sizes_up_to_powers_of_two_and_keep_flags():
    names = ["M_BUCKET", "N", "K", "IEEE"]
    assert tuning.bucket_of(names, [1, 11008, 4096, False]) == "M_BUCKET=1,N=16384,K=4096,IEEE=0"
    # An -H width of 8256 shares the full width's bucket; 5504 has the next one down.
    assert tuning.bucket_of(names, [16, 8256, 4096, True]) == "M_BUCKET=16,N=16384,K=4096,IEEE=1"
    assert tuning.bucket_of(names, [16, 5504, 4096, True]) == "M_BUCKET=16,N=8192,K=4096,IEEE=1"


def _table(path, device, kernel, bucket, entry):
    path.write_text(json.dumps({"configs": {device: {kernel: {bucket: entry}}}}))


def test_an_overlay_table_wins_over_the_committed_one(tmp_path, monkeypatch):
    entry = {"kwargs": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "BAND_M": 1}, "num_warps": 2, "num_stages": 5}
    overlay = tmp_path / "tuned.json"
    _table(overlay, "Imaginary GPU", "_row_gather_kernel/decode", "B", entry)
    assert tuning.lookup("Imaginary GPU", "_row_gather_kernel", "decode", "B") is None
    monkeypatch.setenv(tuning.ENV, str(overlay))
    found = tuning.lookup("Imaginary GPU", "_row_gather_kernel", "decode", "B")
    assert (found.kwargs, found.num_warps, found.num_stages) == (entry["kwargs"], 2, 5)
    assert tuning.lookup("Other GPU", "_row_gather_kernel", "decode", "B") is None


def test_an_unreadable_table_is_an_error_naming_it(tmp_path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    monkeypatch.setenv(tuning.ENV, str(broken))
    with pytest.raises(RuntimeError, match="broken.json"):
        tuning.lookup("Imaginary GPU", "k", "decode", "B")


def _launch_args(kernel, device, **values):
    """Positional arguments of a launch of ``kernel`` whose first is on ``device`` and whose tuning-key
    arguments take ``values`` (the rest are never read by config_for)."""
    # As the launchers pass them: positionally up to the last of ``values``, the flags by keyword.
    args = [None] * (1 + max(kernel.fn.arg_names.index(name) for name in values))
    args[0] = SimpleNamespace(device=device)
    for name, value in values.items():
        args[kernel.fn.arg_names.index(name)] = value
    return tuple(args)


def test_a_launch_takes_the_forced_config_then_the_tables_then_autotunes(tmp_path, monkeypatch):
    kernel = ROW_KERNELS["decode"]
    cuda = torch.device("cuda", 0)
    args = _launch_args(kernel, cuda, M_BUCKET=1, N=11008, K=4096)
    entry = {"kwargs": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "BAND_M": 1}, "num_warps": 2, "num_stages": 5}
    overlay = tmp_path / "tuned.json"
    _table(overlay, "Imaginary GPU", "_row_gather_kernel/decode", "M_BUCKET=1,N=16384,K=4096,IEEE=0", entry)
    monkeypatch.setenv(tuning.ENV, str(overlay))
    monkeypatch.setattr(tuning, "_device_name", lambda index: "Imaginary GPU")
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    chosen = kernel.config_for(args, {"IEEE": False})
    assert chosen.kwargs == entry["kwargs"] and chosen.num_stages == 5
    # Another bucket, or another device: the autotuner (None).
    assert kernel.config_for(_launch_args(kernel, cuda, M_BUCKET=16, N=11008, K=4096), {"IEEE": False}) is None
    assert kernel.config_for(_launch_args(kernel, torch.device("cpu"), M_BUCKET=1, N=11008, K=4096),
                             {"IEEE": False}) is None
    forced = config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BAND_M=1)
    with tuning.forcing("_row_gather_kernel", "decode", forced):
        assert kernel.config_for(args, {"IEEE": False}) is forced
        col = COL_KERNELS["decode"]
        assert col.config_for(_launch_args(col, cuda, M_BUCKET=1, N=4096, K=4096), {"IEEE": False}) is not forced
    assert kernel.config_for(args, {"IEEE": False}).kwargs == entry["kwargs"]


def test_a_miss_autotunes_once_a_bucket_then_launches_the_winner_for_every_size_in_it(monkeypatch):
    """An -H plan's width (or a vLLM batch's union of neurons) takes many exact sizes: the autotuner runs on
    the first size of each bucket only (per device and dtype), and the others launch its winner directly."""
    winner = config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BAND_M=1)
    launched = []

    class Kernel:  # the @triton.jit kernel: its argument names, and each direct launch's config
        __name__ = "_fake_kernel"
        arg_names = ["x", "M_BUCKET", "N", "K", "IEEE"]

        def run(self, *args, grid, warmup, **kwargs):
            launched.append(("direct", kwargs.get("BLOCK_N")))

    class Autotuner:  # triton.autotune's wrapper: times its configs, keeps the best
        configs = [winner, config(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, BAND_M=1)]
        best_config = None

        def run(self, *args, grid, warmup, **kwargs):
            self.best_config = winner
            launched.append(("autotuned", args[2]))

    monkeypatch.setattr(tuning, "_device_name", lambda index: "Imaginary GPU")
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    kernel = tuning.Tuned(Kernel(), Autotuner(), "decode", ["M_BUCKET", "N", "K", "IEEE"])
    cuda = torch.device("cuda", 0)

    def launch(n, dtype=torch.bfloat16):
        kernel.run(SimpleNamespace(device=cuda, dtype=dtype), 1, n, 4096, grid=(1,), warmup=False, IEEE=False)

    for n in (8256, 11008, 9000, 16384):  # one bucket: N=16384
        launch(n)
    launch(5504)  # the next bucket down
    launch(8256, torch.float32)  # another dtype
    assert launched == [("autotuned", 8256), ("direct", 64), ("direct", 64), ("direct", 64), ("autotuned", 5504),
                        ("autotuned", 8256)]
    assert kernel.autotuned == 3


def interpreted(code: str, tmp_path) -> None:
    """Run ``code`` in a child process with TRITON_INTERPRET=1 (the kernels interpreted, on any machine: a
    GPU machine's tests run compiled kernels in-process); it fails the test if it raises."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{root}:{root / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_interpreter_never_reads_the_table(tmp_path):
    interpreted("""
        import torch
        from test_tuning import _launch_args
        from adallava_kernels.ops import tuning
        from adallava_kernels.ops.gathered_linear import ROW_KERNELS
        kernel = ROW_KERNELS["decode"]
        assert tuning.INTERPRETING
        args = _launch_args(kernel, torch.device("cuda", 0), M_BUCKET=1, N=11008, K=4096)
        assert kernel.config_for(args, {"IEEE": False}) is None
    """, tmp_path)


def test_every_committed_config_is_a_candidate_of_its_kernel_with_a_measured_time():
    table = json.loads(tuning.TABLE.read_text())
    assert table["configs"], "the committed table is empty"
    for device, kernels in table["configs"].items():
        run = table["runs"][device]
        assert {"date", "commit", "command", "torch", "triton"} <= set(run)
        for key, buckets in kernels.items():
            name, regime = key.split("/")
            # The candidates as the sweep lists them on a GPU (not the interpreter's one config).
            tuned, _ = tune.KERNEL_TABLES[name]
            allowed = [tuning.config_to_json(c) for c in list(tuned[regime]) + tune.EXTRA.get(name, {}).get(regime, [])]
            for bucket, entry in buckets.items():
                assert {k: entry[k] for k in ("kwargs", "num_warps", "num_stages")} in allowed, (key, bucket)
                assert entry["seconds"] > 0


def test_the_sweep_writes_a_table_that_install_merges(tmp_path):
    out = tmp_path / "tune"
    # The sweep's CPU path: the interpreter's one config at tiny shapes.
    interpreted(f"""
        from bench import tune
        assert tune.main(["--quick", "--device", "cpu", "--match", "b1 full", "--out", {str(out)!r}]) == 0
        assert tune.main(["--quick", "--device", "cpu", "--match", "no such case", "--out", {str(out)!r}]) == 2
    """, tmp_path)
    made = json.loads((out / "tuned_configs.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert [c["case"] for c in results["cases"]] == ["gate|up b1 full"]
    (device,) = made["configs"]
    assert list(made["configs"][device]) == ["_row_gather_kernel/decode"]
    (entry,) = made["configs"][device]["_row_gather_kernel/decode"].values()
    assert entry["case"] == "gate|up b1 full" and entry["seconds"] > 0
    # install: the device's entries replace that device's, other devices stay.
    target = tmp_path / "committed.json"
    target.write_text(json.dumps({"about": "", "runs": {"Other": {}}, "configs": {"Other": {"k/decode": {}}}}))
    merged = tune.install(out / "tuned_configs.json", target)
    assert set(merged["configs"]) == {"Other", device} and merged["configs"][device] == made["configs"][device]


def test_a_candidate_that_cannot_run_is_recorded_not_fatal(tmp_path):
    interpreted(f"""
        import math, torch, triton
        from bench import tune
        good = tune.gathered_linear.INTERPRETER_CONFIGS[0]
        bad = triton.Config({{"BLOCK_M": 16}}, num_warps=4, num_stages=1)  # the kernel needs more blocks
        tune.candidates = lambda kernel, regime: [good, bad]
        case = next(c for c in tune.cases(tune.get_shape("tiny"), torch.float32, torch.device("cpu"), 8, (1,))
                    if c.name == "o_proj half b1")
        results = tune.sweep([case], torch.device("cpu"), __import__("pathlib").Path({str(tmp_path)!r}),
                             deadline=math.inf, quick=True)
        (row,) = results["cases"]
        assert "seconds" in row["candidates"][0] and "error" in row["candidates"][1], row
        assert row["best"]["kwargs"] == good.kwargs
    """, tmp_path)
