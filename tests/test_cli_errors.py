"""Every command line refuses a bad argument before it does any work: one line on stderr that names the option
and what it expected, exit status 2, no traceback, and no output file written."""

import subprocess
import sys
from pathlib import Path

import pytest

import adallava_kernels.ops.common as ops_common
from bench import compare, gpu_check, plot
from bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parent.parent


def refusal(capsys, command, argv, prog) -> str:
    """Run ``command(argv)`` expecting a refusal; returns its one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    return lines[0]


def no_file_under(path: Path) -> bool:
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


@pytest.fixture
def not_a_dir(tmp_path):
    """A path under a regular file: no one, root included, can create it."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


@pytest.fixture
def no_interpreter(monkeypatch):
    """A machine where Triton cannot run on the CPU (the suite runs under TRITON_INTERPRET=1)."""
    monkeypatch.setattr(ops_common, "INTERPRETING", False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)


# -- python -m bench -------------------------------------------------------------------------------

BENCH_CASES = {
    "tokens-zero": (["--tokens", "0"], "argument --tokens: expected a positive int, got '0'"),
    "context-negative": (["--context", "-1"], "argument --context: expected a positive int, got '-1'"),
    "roofline-device": (["--roofline-device", "TPU"],
                        "argument --roofline-device: expected one of H200, H100, A100, V100, measure, got 'TPU'"),
    "decode-steps": (["--decode-steps", "0"], "argument --decode-steps: expected a positive int"),
    "random-plans": (["--random-plans", "-1"], "argument --random-plans: expected an int >= 0, got '-1'"),
    "scale": (["--scale", "0"], "argument --scale: expected a positive int"),
    "models": (["--models", "tiny,llava-70b"], "argument --models: expected comma-separated models of"),
    "kv-pool-gib": (["--kv-pool-gib", "0"], "argument --kv-pool-gib: expected a positive float"),
    "mlp-tokens": (["--mlp-tokens", "1,0"], "argument --mlp-tokens: expected comma-separated positive ints"),
    "attention-seqs": (["--attention-seqs", "x"], "argument --attention-seqs: expected comma-separated positive"),
    "attention-contexts": (["--attention-contexts", "-3"], "argument --attention-contexts: expected comma-sep"),
    "attention-batches": (["--attention-batches", "0"], "argument --attention-batches: expected comma-separated"),
    "latency-prompt": (["--latency-prompt", "0"], "argument --latency-prompt: expected a positive int"),
    "latency-new-tokens": (["--latency-new-tokens", "1"], "--latency-new-tokens must be at least 2"),
    "min-reps": (["--min-reps", "0"], "argument --min-reps: expected a positive int"),
    "min-time": (["--min-time", "inf"], "argument --min-time: expected a positive float, got 'inf'"),
    "budgets": (["--budgets", "0.4"], "argument --budgets: latency budget must be a number in [0.5, 1.0]"),
    "only": (["--only", "mlp,gpu"], "argument --only: --only takes a comma-separated subset of"),
    "model": (["--model", "llama"], "argument --model: invalid choice: 'llama'"),
    "dtype": (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    "device": (["--device", "gpu"], "--device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"),
    "backend": (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    "compare": (["--compare", "missing.json"], "argument --compare: --compare: missing.json is not a file"),
    "unknown-option": (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_refuses_a_bad_option_in_one_line(case, capsys, tmp_path):
    argv, message = BENCH_CASES[case]
    out = tmp_path / "out"
    line = refusal(capsys, bench_main, argv + ["--out", str(out)], "python -m bench")
    assert message in line
    assert not out.exists()


def test_bench_refuses_an_out_it_cannot_write_before_timing(capsys, not_a_dir):
    line = refusal(capsys, bench_main, ["--out", str(not_a_dir)], "python -m bench")
    assert f"--out '{not_a_dir}' cannot be written: '{not_a_dir.parent}' is a file, not a directory" in line
    line = refusal(capsys, bench_main, ["--out", str(not_a_dir.parent)], "python -m bench")
    assert "exists and is not a directory" in line


def test_bench_refuses_triton_where_it_cannot_run(capsys, no_interpreter, tmp_path):
    line = refusal(capsys, bench_main, ["--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "o")],
                   "python -m bench")
    assert "--backend is 'triton', but Triton kernels run on CUDA (none here) or on a CPU under TRITON_INTERPRET=1" \
        in line
    assert not (tmp_path / "o").exists()


def test_bench_as_a_process_exits_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "bench", "--tokens", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.splitlines() == ["python -m bench: error: argument --tokens: expected a positive int, got '0'"]


# -- python -m bench.gpu_check --------------------------------------------------------------------------

GPU_CHECK_CASES = {
    "tokens-zero": (["--tokens", "0"], "argument --tokens: expected a positive int, got '0'"),
    "tokens-not-int": (["--tokens", "many"], "argument --tokens: expected a positive int, got 'many'"),
    "roofline-device": (["--roofline-device", "TPU"], "argument --roofline-device: expected one of H200"),
    "device": (["--device", "gpu"], "--device must be a device such as 'cpu' or 'cuda:0'"),
    "model": (["--model", "x"], "argument --model: invalid choice: 'x'"),
    "dtype": (["--dtype", "x"], "argument --dtype: invalid choice: 'x'"),
}


@pytest.mark.parametrize("case", sorted(GPU_CHECK_CASES))
def test_gpu_check_refuses_a_bad_option_in_one_line(case, capsys, tmp_path):
    argv, message = GPU_CHECK_CASES[case]
    out = tmp_path / "out"
    assert message in refusal(capsys, gpu_check.main, argv + ["--out", str(out)], "python -m bench.gpu_check")
    assert not out.exists()


def test_gpu_check_refuses_an_out_it_cannot_write_before_timing(capsys, not_a_dir):
    line = refusal(capsys, gpu_check.main, ["--out", str(not_a_dir)], "python -m bench.gpu_check")
    assert f"--out '{not_a_dir}' cannot be written" in line


def test_gpu_check_refuses_triton_where_it_cannot_run(capsys, no_interpreter, tmp_path):
    line = refusal(capsys, gpu_check.main, ["--backend", "triton", "--out", str(tmp_path / "o")],
                   "python -m bench.gpu_check")
    assert "--backend is 'triton'" in line and not (tmp_path / "o").exists()


# -- python -m bench.compare and python -m bench.plot ----------------------------------------------------

@pytest.fixture
def a_run(tmp_path):
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text('{"meta": {"device": "test"}, "model_runs": {"rows": [{"model": "tiny", "stage": "prefill", '
                    '"family": "f", "label": "L 0.50", "median_s": 0.001}]}}')
    return path


def test_compare_refuses_bad_arguments_in_one_line(capsys, a_run, tmp_path):
    prog = "python -m bench.compare"
    assert "OLD.json: " in refusal(capsys, compare.main, [str(tmp_path / "none.json"), str(a_run)], prog)
    (tmp_path / "bad.json").write_text("{")
    assert "NEW.json: " in refusal(capsys, compare.main, [str(a_run), str(tmp_path / "bad.json")], prog)
    assert "argument --threshold: expected a number >= 0, got '-0.1'" in refusal(
        capsys, compare.main, [str(a_run), str(a_run), "--threshold", "-0.1"], prog)
    assert "the following arguments are required: NEW.json" in refusal(capsys, compare.main, [str(a_run)], prog)


def test_plot_refuses_bad_arguments_in_one_line(capsys, a_run, not_a_dir):
    prog = "python -m bench.plot"
    assert "RESULTS.json: " in refusal(capsys, plot.main, [str(a_run.parent / "none.json")], prog)
    line = refusal(capsys, plot.main, [str(a_run), "--out", str(not_a_dir)], prog)
    assert f"--out '{not_a_dir}' cannot be written" in line
    assert [p.name for p in a_run.parent.iterdir()] == ["results.json"]


def test_a_check_ends_any_parser_in_one_line(capsys):
    # bench.tune keeps argparse's own parser: a failed check is one line there too.
    import argparse

    from adallava_kernels.checks import check_device
    from adallava_kernels.cli import checked

    with pytest.raises(SystemExit) as exit_info:
        checked(argparse.ArgumentParser(prog="python -m bench.tune"), check_device, "--device", "gpu")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("python -m bench.tune: error: --device must be a device such as 'cpu' or 'cuda:0'")
