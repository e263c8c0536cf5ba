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


def test_a_fixed_launch_takes_the_forced_config_then_the_tables_then_its_lists_first(tmp_path, monkeypatch,
                                                                                   imaginary_gpu):
    """A phased kernel (tuning.launch_fixed) is never autotuned: a sweep's forced config, else the table's for its
    device and bucket, else the first of its list. Each launch records its bucket for the sweep."""
    first, second = config(4, 4, BLOCK_M=16, BLOCK_N=32), config(4, 5, BLOCK_M=16, BLOCK_N=64)
    key, cuda = ["M", "N"], torch.device("cuda", 0)
    overlay = tmp_path / "tuned.json"
    _table(overlay, "Imaginary GPU", "_fixed_kernel/decode", "M=1,N=16384", tuning.config_to_json(second))
    monkeypatch.setenv(tuning.ENV, str(overlay))

    def launched(m, n, device=cuda):
        taken = []
        tuning.launch_fixed("_fixed_kernel", "decode", [first, second], key, [m, n], device, taken.append)
        (chosen,) = taken
        return tuning.config_to_json(chosen)

    with tuning.recording() as seen:
        assert launched(1, 11008) == tuning.config_to_json(second)
    assert seen == [("_fixed_kernel/decode", "M=1,N=16384")]
    # Another bucket, or a tensor off the GPU: the list's first.
    assert launched(16, 11008) == tuning.config_to_json(first)
    assert launched(1, 11008, torch.device("cpu")) == tuning.config_to_json(first)
    with tuning.forcing("_fixed_kernel", "decode", first):
        assert launched(1, 11008) == tuning.config_to_json(first)
    monkeypatch.setattr(tuning, "INTERPRETING", True)
    assert launched(1, 11008) == tuning.config_to_json(first)


WINNER = config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BAND_M=1)
RUNNER_UP = config(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, BAND_M=1)


def _fake_tuned(launched: list, configs=(WINNER, RUNNER_UP), source: str = "source-hash") -> tuning.Tuned:
    """A Tuned over a stand-in kernel and autotuner that record each launch in ``launched``: ``("direct",
    BLOCK_N)`` for a launch with a chosen config, ``("autotuned", N)`` for a run of the autotuner (whose
    winner is always WINNER)."""

    class Kernel:  # the @triton.jit kernel: its argument names, its source hash, and each direct launch's config
        __name__ = "_fake_kernel"
        arg_names = ["x", "M_BUCKET", "N", "K", "IEEE"]
        cache_key = source

        def run(self, *args, grid, warmup, **kwargs):
            launched.append(("direct", kwargs.get("BLOCK_N")))

    class Autotuner:  # triton.autotune's wrapper: times its configs, keeps the best
        best_config = None

        def run(self, *args, grid, warmup, **kwargs):
            self.best_config = WINNER
            launched.append(("autotuned", args[2]))

    autotuner = Autotuner()
    autotuner.configs = list(configs)
    return tuning.Tuned(Kernel(), autotuner, "decode", ["M_BUCKET", "N", "K", "IEEE"])


def _launch(kernel: tuning.Tuned, n: int, dtype=torch.bfloat16) -> None:
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
    kernel.run(x, 1, n, 4096, grid=(1,), warmup=False, IEEE=False)


@pytest.fixture
def imaginary_gpu(monkeypatch):
    """Launches on cuda:0, named "Imaginary GPU", with the kernels compiled (not interpreted)."""
    monkeypatch.setattr(tuning, "_device_name", lambda index: "Imaginary GPU")
    monkeypatch.setattr(tuning, "INTERPRETING", False)


@pytest.fixture
def winner_cache_dir(tmp_path, monkeypatch, imaginary_gpu):
    """A winner cache of its own (read afresh, as a new process would), removed after the test."""
    directory = tmp_path / "tuning-cache"
    monkeypatch.setenv(tuning.CACHE_ENV, str(directory))
    tuning._winner_cache.cache_clear()
    yield directory
    tuning._winner_cache.cache_clear()


def test_a_miss_autotunes_once_a_bucket_then_launches_the_winner_for_every_size_in_it(imaginary_gpu, monkeypatch):
    """An -H plan's width (or a vLLM batch's union of neurons) takes many exact sizes: the autotuner runs on
    the first size of each bucket only (per device and dtype), and the others launch its winner directly."""
    monkeypatch.setenv(tuning.CACHE_ENV, "off")
    launched = []
    kernel = _fake_tuned(launched)
    for n in (8256, 11008, 9000, 16384):  # one bucket: N=16384
        _launch(kernel, n)
    _launch(kernel, 5504)  # the next bucket down
    _launch(kernel, 8256, torch.float32)  # another dtype
    assert launched == [("autotuned", 8256), ("direct", 64), ("direct", 64), ("direct", 64), ("autotuned", 5504),
                        ("autotuned", 8256)]
    assert kernel.autotuned == 3


def _new_process() -> None:
    """What a new process starts with: no winner cache read yet."""
    tuning._winner_cache.cache_clear()


def test_a_winner_autotuned_by_one_process_is_launched_by_the_next_without_timing(winner_cache_dir):
    launched = []
    first = _fake_tuned(launched)
    _launch(first, 11008)
    _launch(first, 5504, torch.float32)
    stored = json.loads((winner_cache_dir / "tuned-Imaginary_GPU.json").read_text())
    assert stored["device"] == "Imaginary GPU"
    entries = stored["configs"]["_fake_kernel/decode"]
    assert sorted(entries) == ["M_BUCKET=1,N=16384,K=4096,IEEE=0|bfloat16", "M_BUCKET=1,N=8192,K=4096,IEEE=0|float32"]
    assert all(tuning.config_from_json(e["config"]).kwargs == WINNER.kwargs for e in entries.values())

    _new_process()
    launched.clear()
    second = _fake_tuned(launched)
    _launch(second, 9000)  # another size of the first bucket
    _launch(second, 5504, torch.float32)
    _launch(second, 5504)  # a bucket and dtype nobody timed
    assert launched == [("direct", 64), ("direct", 64), ("autotuned", 5504)]
    assert (second.autotuned, second.from_disk) == (1, 2)


@pytest.mark.parametrize("change", ["kernel source", "triton version", "candidate list"])
def test_a_stored_winner_is_timed_again_when_what_it_was_timed_with_changed(winner_cache_dir, monkeypatch, change):
    launched = []
    _launch(_fake_tuned(launched), 11008)
    _new_process()
    launched.clear()
    if change == "kernel source":
        kernel = _fake_tuned(launched, source="edited-source-hash")
    elif change == "triton version":
        monkeypatch.setattr(tuning.triton, "__version__", "0.0.1")
        kernel = _fake_tuned(launched)
    else:
        kernel = _fake_tuned(launched, configs=(WINNER, RUNNER_UP, config(8, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256,
                                                                          BAND_M=1)))
    _launch(kernel, 11008)
    assert launched == [("autotuned", 11008)] and kernel.from_disk == 0


def test_nothing_is_stored_with_the_cache_off_or_a_single_candidate(winner_cache_dir, monkeypatch):
    launched = []
    _launch(_fake_tuned(launched, configs=(WINNER,)), 11008)  # ADALLAVA_AUTOTUNE=0: nothing was timed
    assert not winner_cache_dir.exists()
    for off in ("off", "0", ""):
        monkeypatch.setenv(tuning.CACHE_ENV, off)
        assert tuning.winner_cache() is None
        _launch(_fake_tuned(launched), 11008)
    assert not winner_cache_dir.exists()


def test_the_default_cache_is_under_the_users_cache_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.winner_cache().directory == tmp_path / "adallava_kernels"


def test_a_cache_file_that_cannot_be_read_or_written_warns_once_and_the_launch_goes_on(winner_cache_dir):
    winner_cache_dir.mkdir()
    path = winner_cache_dir / "tuned-Imaginary_GPU.json"
    path.write_text("{not json")
    launched = []
    kernel = _fake_tuned(launched)
    with pytest.warns(RuntimeWarning, match="tuned-Imaginary_GPU.json cannot be read"):
        _launch(kernel, 11008)
    assert launched == [("autotuned", 11008)]
    # The winner replaced the broken file.
    assert "_fake_kernel/decode" in json.loads(path.read_text())["configs"]

    _new_process()
    blocked = winner_cache_dir / "not-a-directory"
    blocked.write_text("")
    cache = tuning.WinnerCache(blocked / "cache")
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        cache.put("Imaginary GPU", "_fake_kernel/decode", "B", {"source": "s"}, WINNER)
    assert cache.get("Imaginary GPU", "_fake_kernel/decode", "B", {"source": "s"}).kwargs == WINNER.kwargs


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
        assert tune.main(["--quick", "--device", "cpu", "--match", "gate|up b1 full", "--out", {str(out)!r}]) == 0
        assert tune.main(["--quick", "--device", "cpu", "--match", "no such case", "--out", {str(out)!r}]) == 2
    """, tmp_path)
    made = json.loads((out / "tuned_configs.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert [c["case"] for c in results["cases"]] == ["gate|up b1 full"]
    (device,) = made["configs"]
    assert list(made["configs"][device]) == ["_row_gather_kernel/decode"]
    (entry,) = made["configs"][device]["_row_gather_kernel/decode"].values()
    assert entry["cases"] == ["gate|up b1 full"] and entry["seconds"] > 0
    # install: the device's entries replace that device's, other devices stay.
    target = tmp_path / "committed.json"
    target.write_text(json.dumps({"about": "", "runs": {"Other": {}}, "configs": {"Other": {"k/decode": {}}}}))
    merged = tune.install(out / "tuned_configs.json", target)
    assert set(merged["configs"]) == {"Other", device} and merged["configs"][device] == made["configs"][device]


def _swept(case, bucket, **seconds):
    """A sweep's row: ``seconds`` per candidate named by its BLOCK_N (None: the candidate failed there)."""
    candidates = []
    for name, t in seconds.items():
        entry = {"kwargs": {"BLOCK_N": int(name[1:])}, "num_warps": 4, "num_stages": 3}
        entry.update({"seconds": t} if t is not None else {"error": "OutOfResources"})
        candidates.append(entry)
    timed = [c for c in candidates if "seconds" in c]
    return {"case": case, "kernel": "_k/decode", "bucket": bucket, "candidates": candidates,
            "best": min(timed, key=lambda c: c["seconds"]) if timed else None}


def test_a_bucket_takes_the_candidate_least_in_time_summed_over_its_cases():
    rows = [
        # The cheap case alone would pick n32; over both cases n64 costs less (2 + 10 < 1.5 + 12).
        _swept("half", "b", n32=1.5e-6, n64=2e-6, n128=1e-6),
        _swept("whole", "b", n32=12e-6, n64=10e-6, n128=None),  # n128 never ran here: it cannot win the bucket
        _swept("other", "c", n32=5e-6, n64=4e-6, n128=3e-6),
        _swept("a", "d", n32=1e-6, n64=None), _swept("z", "d", n32=None, n64=1e-6),  # no shared candidate
    ]
    table = tune.bucket_winners(rows)
    assert table["_k/decode"]["b"] == {"kwargs": {"BLOCK_N": 64}, "num_warps": 4, "num_stages": 3,
                                       "seconds": pytest.approx(12e-6), "cases": ["half", "whole"]}
    assert table["_k/decode"]["c"]["kwargs"] == {"BLOCK_N": 128} and table["_k/decode"]["c"]["cases"] == ["other"]
    assert "d" not in table["_k/decode"]  # the launch keeps its list's first config
    # A case where nothing ran sets nothing, and does not hide the bucket's other cases.
    assert tune.bucket_winners(rows[:2] + [_swept("broken", "b", n32=None)])["_k/decode"]["b"]["kwargs"] == {
        "BLOCK_N": 64}


@pytest.mark.parametrize("cases, kernel", [("mlp phased b1", "_phased_mlp_kernel"),
                                           ("attention block phased b1", "_phased_attention_kernel")])
def test_a_partial_layers_phased_launch_shares_the_whole_ones_bucket_and_its_choice(tmp_path, cases, kernel):
    # The runtime's partial layer launches a phased kernel over the full width's slots: the sweep's half case
    # records the whole case's bucket, and the table's entry for it is chosen over both.
    out = tmp_path / "tune"
    interpreted(f"""
        from bench import tune
        assert tune.main(["--quick", "--device", "cpu", "--match", {cases!r}, "--out", {str(out)!r}]) == 0
    """, tmp_path)
    rows = json.loads((out / "results.json").read_text())["cases"]
    assert [r["case"] for r in rows] == [f"{cases} full", f"{cases} half"]
    assert rows[0]["bucket"] == rows[1]["bucket"] and all(r["best"] for r in rows)
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    (device,) = json.loads((out / "tuned_configs.json").read_text())["configs"].values()
    (entry,) = device[f"{kernel}/decode"].values()
    assert entry["cases"] == [f"{cases} full", f"{cases} half"]


@pytest.mark.parametrize("kept", [[0, 2, 4, 6], [0, 1, 3], list(range(8))], ids=["every-other", "one-kv-group", "all"])
def test_the_sweeps_attention_block_slots_are_the_runtimes_union(kept):
    # The half case lays its union out as BatchSlots.refresh does for a row keeping those heads: the q|k|v heads,
    # the KV map, the o_proj columns and the live KV slots (tiny: 8 heads on 2 KV heads, so a KV group can be
    # left out whole).
    from adallava_kernels import get_shape
    from adallava_kernels.runtime.slots import BatchSlots

    shape = get_shape("tiny")
    slots = BatchSlots(shape, capacity=1, width=2, scratch_page=9, dtype=torch.float32, device=torch.device("cpu"))
    slots.own_heads[0, 0, kept] = True
    slots.refresh(1)
    heads, kv_map, cols, live = tune._union_head_slots(torch.tensor(kept), shape.num_heads, shape.num_kv_heads,
                                                       shape.head_dim)
    assert torch.equal(heads, slots.qkv_heads[0])
    assert torch.equal(kv_map, slots.kv_map[0, 0])
    assert torch.equal(cols, slots.o_cols[0])
    assert live == int((slots.qkv_heads[0, shape.num_heads:shape.num_heads + shape.num_kv_heads] >= 0).sum())


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
