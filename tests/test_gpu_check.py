"""``make gpu-check`` (scripts/gpu_check.py) without a GPU: the offline set-up a GPU image takes, the dry run
of every stage, a run killed mid-stage, and the verdict table read from a folder."""

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_verdict  # noqa: E402

# A pip that tried to download would meet these: no index, and a proxy nobody listens on.
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def tracked_copy(dest: Path) -> Path:
    """The project's tracked files (and uncommitted changes to them) in ``dest``: a fresh checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def image_like_venv(path: Path, with_packages: bool) -> Path:
    """A virtualenv whose python holds the test and bench dependencies (the GPU image's python3 is such a venv):
    made without system site-packages, the packages of this interpreter reached through a .pth file."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if with_packages:
        # pip too: the set-up builds with this python's pip.
        Path(purelib, "image_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_the_set_up_builds_offline_with_the_running_python_as_it_is(tmp_path):
    project = tracked_copy(tmp_path / "project")
    python = image_like_venv(tmp_path / "venv", with_packages=True)
    out = tmp_path / "out"
    done = subprocess.run([python, "scripts/gpu_check.py", "--as-is", "--setup-only", "--out", str(out)],
                          cwd=project, capture_output=True, text=True, env=os.environ | OFFLINE, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (project / ".venv").exists()  # no virtualenv of its own
    setup = json.loads((out / "setup.json").read_text())
    assert setup["executable"] == str(python)
    assert Path(setup["extension"]).parent == project / "adallava_kernels"  # built in place, in the copy
    log = (out / "setup.log").read_text()
    assert "--no-index" in log and "Downloading" not in log
    stages = json.loads((out / "stages.json").read_text())
    assert [(s["name"], s["status"]) for s in stages["stages"]] == [("setup", "passed")]
    assert stages["built_in_place"] is True


def test_a_missing_dependency_is_named_before_anything_runs(tmp_path):
    python = image_like_venv(tmp_path / "venv", with_packages=False)
    out = tmp_path / "out"
    done = subprocess.run([python, str(SCRIPT), "--as-is", "--out", str(out)], capture_output=True, text=True,
                          env=os.environ | OFFLINE, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("gpu-check: error:") and "lacks torch, triton, transformers" in line and "pytest-xdist" in line
    assert not (out / "stages.json").exists()


def test_make_test_still_runs_the_suite_in_the_projects_venv():
    """The GPU image's set-up is its own path: make test still makes .venv with scripts/setup_env.sh."""
    env_recipe = subprocess.run(["make", "-n", "-B", "env"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "bash scripts/setup_env.sh" in env_recipe
    test_recipe = subprocess.run(["make", "-n", "test", "VENV=.venv"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout
    assert ".venv/bin/python -m pytest tests" in test_recipe


def dry_run(out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--python", sys.executable, "--dry-run", "--out", str(out),
                             *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_a_dry_run_leaves_every_stages_files_and_the_verdict(tmp_path):
    out = tmp_path / "gpu-check"
    sent = tmp_path / "sent"  # $OUT of a lent machine
    process = dry_run(out, env=os.environ | {"OUT": str(sent)})
    printed, _ = process.communicate(timeout=600)
    assert process.returncode == 0, printed
    stages = json.loads((out / "stages.json").read_text())
    names = ["setup", "tune", "model", "pdl", "phased", "boundary", "phased-pdl", "kernels", "fit", "serve", "probes",
             "tests"]
    assert [(s["name"], s["status"]) for s in stages["stages"]] == [(n, "passed") for n in names]
    for name in ("setup.json", "tune/tuned_configs.json", "model/results.json", "pdl/results.json",
                 "phased/results.json", "boundary/results.json", "phased-pdl/results.json", "kernels/results.json", "fit/predicted.json", "fit/errors.json", "fit/static.json",
                 "serve/results.json", "probes.json", "tests.log", "verdict.md", "verdict.json"):
        assert (out / name).stat().st_size > 0, name
    for name in names:
        assert (out / f"{name}.log").exists() or name == "setup"
    verdict = json.loads((out / "verdict.json").read_text())
    assert any(r["what"] == "full-plan decode step, wall" and r["measured"].endswith(" ms") for r in verdict["rows"])
    assert any(r["what"].startswith("full-plan decode step, wall, with ADALLAVA_PDL=1") for r in verdict["rows"])
    assert any(r["what"].startswith("H 0.50 plan's decode step, wall, with ADALLAVA_PDL=1") for r in verdict["rows"])
    for phased in ("ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv",
                   "ADALLAVA_PDL=1 ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv"):
        assert any(r["what"].startswith(f"full-plan decode step, wall, with {phased}") for r in verdict["rows"])
        assert any(r["what"].startswith(f"H 0.50 plan's decode step, wall, with {phased}")
                   for r in verdict["rows"])
    assert "| issue | what | measured | target | holds |" in printed
    # What a lent machine sends back: the folder packed, the verdict and the stages beside it.
    assert sorted(p.name for p in sent.iterdir()) == ["gpu-check.tar.gz", "stages.json", "verdict.md"]


def test_a_run_killed_mid_stage_keeps_the_finished_stages(tmp_path):
    out = tmp_path / "gpu-check"
    process = dry_run(out, "--only", "setup,model,kernels,serve,tests", start_new_session=True)
    deadline = time.monotonic() + 300
    finished = []
    while time.monotonic() < deadline:
        try:
            finished = json.loads((out / "stages.json").read_text())["stages"]
        except (OSError, ValueError):
            finished = []
        if len(finished) >= 2:
            break
        time.sleep(0.2)
    assert len(finished) >= 2, "the dry run did not finish two stages"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["status"] for s in stages[:2]] == ["passed", "passed"]
    assert json.loads((out / "model" / "results.json").read_text())["model_runs"]["rows"]
    assert (out / "verdict.md").read_text().startswith("# gpu-check verdict")
    assert not list(out.rglob("*.tmp"))


def test_the_verdict_reads_a_test_log_cut_short_and_a_finished_one(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("[gw0] [ 10%] PASSED tests/a.py::t1\n[gw1] [ 20%] FAILED tests/a.py::t2\n"
                   "[gw0] [ 30%] PASSED tests/a.py::t3\n")
    cut = gpu_verdict.test_summary(log)
    assert (cut["passed"], cut["failed"], cut["finished"]) == (2, 1, False)
    log.write_text("...\nworker 'gw3' crashed while running 'tests/b.py::t'\nFAILED tests/b.py::t\n"
                   "==== 1 failed, 1013 passed, 7 skipped, 15 warnings in 196.41s (0:03:16) ====\n")
    done = gpu_verdict.test_summary(log)
    assert (done["passed"], done["failed"], done["skipped"], done["finished"]) == (1013, 1, 7, True)
    assert done["crashed_workers"] == 1 and done["failures"] == ["tests/b.py::t"]


def test_the_verdict_marks_what_did_not_run_as_not_measured(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps({"elapsed_s": 12.0, "stages": [
        {"name": "setup", "status": "passed", "seconds": 10.0}, {"name": "model", "status": "timed out", "seconds": 2}]}))
    verdict = gpu_verdict.verdict(tmp_path)
    rows = {r["what"]: r for r in verdict["rows"]}
    assert rows["stage model"]["holds"] is False and rows["the whole check, seconds"]["holds"] is True
    assert rows["model check ran"]["holds"] is None and rows["serving run ran"]["holds"] is None
    assert "| #27 | model check ran | - | results.json | not measured |" in gpu_verdict.markdown(verdict)


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "5"], "--budget-s must be at least 10"),
    (["--only", "model,nonsense"], "--only names unknown stages ['nonsense']"),
])
def test_bad_arguments_are_one_line_and_status_2(tmp_path, argv, message):
    done = subprocess.run([sys.executable, str(SCRIPT), "--python", sys.executable, "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "stages.json").exists()


def test_the_verdict_sets_the_static_model_against_each_kernels_chosen_configs(tmp_path):
    """fit/errors.json (bench.tune --against): per kernel, the worst error over the configs the sweep chose
    (its fastest measured per case); a kernel off by more than 10% there fails the row."""
    from bench.tune import _config_key, model_errors

    def candidate(bn, seconds):
        return {"kwargs": {"BLOCK_N": bn}, "num_warps": 4, "num_stages": 4, "seconds": seconds}

    sweep = {"cases": [
        {"case": "gate|up b1", "kernel": "_row_gather_kernel/decode", "candidates": [candidate(32, 10e-6),
                                                                                      candidate(64, 20e-6)]},
        {"case": "down b1", "kernel": "_col_gather_kernel/decode", "candidates": [candidate(64, 8e-6)]},
        {"case": "gate|up prefill", "kernel": "_row_gather_kernel/prefill", "candidates": [candidate(128, 1e-3)]},
    ]}
    predicted = {"gate|up b1": {_config_key({"BLOCK_N": 32}, 4, 4): 10.5e-6, _config_key({"BLOCK_N": 64}, 4, 4): 10e-6},
                 "down b1": {_config_key({"BLOCK_N": 64}, 4, 4): 10e-6}}
    errors = model_errors(predicted, sweep)
    assert [(r["case"], r["chosen"], round(r["error"], 6)) for r in errors["rows"]] == [
        ("gate|up b1", True, 0.05), ("gate|up b1", False, -0.5), ("down b1", True, 0.25)]
    row = errors["kernels"]["_row_gather_kernel/decode"]
    assert row["chosen"] == {"count": 1, "median": pytest.approx(0.05), "worst": pytest.approx(0.05)}
    assert row["candidates"]["worst"] == pytest.approx(-0.5) and "_row_gather_kernel/prefill" not in errors["kernels"]

    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "errors.json").write_text(json.dumps(errors))
    rows = [r for r in gpu_verdict.verdict(tmp_path)["rows"] if r["what"].startswith("static model")]
    assert [(r["measured"], r["target"], r["holds"]) for r in rows] == [
        ("col_gather +25.0%, row_gather +5.0%", "within +-10%", False)]
    (tmp_path / "fit" / "errors.json").unlink()
    assert [r["holds"] for r in gpu_verdict.verdict(tmp_path)["rows"] if r["what"].startswith("static model")] == [None]


def test_the_fit_prices_the_models_terms_at_the_copy_rate_it_is_given(tmp_path, capsys):
    """bench.tune --predict keeps each candidate's price terms (bench.static.price_terms), and --against prices
    them at --copy-rate, or at the copy a bench.gpu_check results.json measured on a GPU (--copy-from; the
    model's own rate where it holds none); seconds from an older file are refused at another rate."""
    from bench import static, tune

    key = tune._config_key({"BLOCK_N": 32}, 4, 4)
    sweep = {"cases": [{"case": "gate|up b1", "kernel": "_row_gather_kernel/decode",
                        "candidates": [{"kwargs": {"BLOCK_N": 32}, "num_warps": 4, "num_stages": 4,
                                        "seconds": 20e-6}]}]}
    terms = [[40e6, 10e12]]  # 40 MB, its programs' loads in flight moving up to 10 TB/s
    (tmp_path / "predicted.json").write_text(json.dumps({"gate|up b1": {key: terms}}))
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))

    def priced(*options):
        args = ["--against", str(tmp_path / "predicted.json"), str(tmp_path / "sweep.json"), "--json",
                str(tmp_path / "errors.json"), *options]
        assert tune.main(args) == 0
        return json.loads((tmp_path / "errors.json").read_text())

    for options, rate in (((), static.COPY_RATE), (("--copy-rate", "2e12"), 2e12)):
        errors = priced(*options)
        assert errors["copy_rate"] == rate
        assert errors["rows"][0]["predicted_s"] == pytest.approx(static.FIXED_S + 40e6 / rate)
    results = tmp_path / "model.json"
    for device_type, expected in (("cuda", 3e12), ("cpu", static.COPY_RATE)):
        results.write_text(json.dumps({"device_type": device_type, "floor": {"copy_bytes_per_s": 3e12}}))
        assert priced("--copy-from", str(results))["copy_rate"] == expected
    assert "holds no copy measured on a GPU; pricing at the model's own" in capsys.readouterr().out

    (tmp_path / "predicted.json").write_text(json.dumps({"gate|up b1": {key: 30e-6}}))
    assert priced()["rows"][0]["predicted_s"] == 30e-6
    with pytest.raises(ValueError, match="seconds at the model's own copy rate.*write them again with --predict"):
        priced("--copy-rate", "2e12")
    with pytest.raises(SystemExit):
        tune.main(["--predict", str(tmp_path / "p.json"), "--copy-rate", "2e12"])
    assert "--copy-rate and --copy-from price a comparison: give them with --against" in capsys.readouterr().err


def test_the_verdict_sets_the_static_step_against_the_measured_one_with_and_without_pdl(tmp_path):
    """fit/static.json (bench.static) against the model and pdl stages' full-plan step: the error of the
    model's batch-1 step against the GPU time, and the fixed cost per kernel the measurement implies."""
    (tmp_path / "fit").mkdir()
    # The full b1 step at exactly 85% of the copy rate in the model; the others at 100%.
    steps = [{"batch": b, "partial_layers": p, "seconds": 3.0e-3 if (b, p) == (1, 0) else 1.0, "kernels": 100,
              "bytes": 0.85 * 4e12 * 3.0e-3 if (b, p) == (1, 0) else 4e12}
             for b in (1, 16) for p in (0, 16)]
    (tmp_path / "fit" / "static.json").write_text(json.dumps(
        {"model": "llava-7b", "fixed_s": 4e-6, "copy_rate": 4e12, "target_share": 0.85, "steps": steps}))

    def rows():
        return [r for r in gpu_verdict.verdict(tmp_path)["rows"] if "the static model against" in r["what"]]

    assert [r["holds"] for r in rows()] == [None, None]  # nothing measured yet
    for stage, gpu_s, h_s in (("model", 3.2e-3, 2.5e-3), ("pdl", 2.9e-3, 2.2e-3)):
        (tmp_path / stage).mkdir()
        floor = {"step_s": gpu_s + 1e-4, "gpu_s": gpu_s, "floor_s": 2.5e-3, "vs_floor": (gpu_s + 1e-4) / 2.5e-3,
                 "gpu_vs_floor": gpu_s / 2.5e-3}
        runs = [{"family": "AdaLLaVA-H", "label": "H 0.50", "stage": "decode", "median_s": h_s},
                {"family": "AdaLLaVA-H", "label": "H 0.50", "stage": "prefill", "median_s": 1.0}]
        (tmp_path / stage / "results.json").write_text(json.dumps({"floor": floor, "model_runs": {"rows": runs}}))
    without, with_pdl = rows()
    assert "PDL" not in without["what"] and with_pdl["what"].endswith("with ADALLAVA_PDL=1")
    # 3.0 ms against 3.2: -6.2%; 0.2 ms over 100 kernels is 2 us a kernel above the model's 4.
    assert without["measured"] == "3.000 ms vs 3.200 ms (-6.2%); implied fixed cost 6.00 us a kernel (model 4.0 us)"
    assert (without["target"], without["holds"]) == ("within +-10%", True)
    assert with_pdl["measured"].startswith("3.000 ms vs 2.900 ms (+3.4%); implied fixed cost 3.00 us")
    # The model's steps again, at each implied fixed cost: 3.0 ms + 100 x 2 us = 3.2 ms is 79.7% of the copy
    # rate, 3.0 ms - 100 x 1 us = 2.9 ms is 87.9%.
    at_fixed = [r for r in gpu_verdict.verdict(tmp_path)["rows"] if r["what"].startswith("static decode steps")]
    assert [(r["what"], r["measured"], r["target"], r["holds"]) for r in at_fixed] == [
        ("static decode steps at the implied fixed cost of 6.00 us a kernel",
         "full b1 79.7%, -H b1 100.0%, full b16 100.0%, -H b16 100.0%", ">= 85% each", False),
        ("static decode steps at the implied fixed cost of 3.00 us a kernel, with ADALLAVA_PDL=1",
         "full b1 87.9%, -H b1 100.0%, full b16 100.0%, -H b16 100.0%", ">= 85% each", True)]
    # The pdl stage's -H plan beside the model stage's.
    (ab,) = [r for r in gpu_verdict.verdict(tmp_path)["rows"] if r["what"].startswith("H 0.50 plan's decode")]
    assert (ab["measured"], ab["holds"]) == ("2.200 ms (2.500 ms)", True)


def write_static_steps(out: Path) -> None:
    """fit/static.json with the model's four steps each at 3.0 ms and 85% of a 4 TB/s copy, 100 kernels, 32
    layers (the folder fit/ made beforehand)."""
    steps = [{"batch": b, "partial_layers": p, "seconds": 3.0e-3, "kernels": 100, "bytes": 0.85 * 4e12 * 3.0e-3,
              "layers": 32} for b in (1, 16) for p in (0, 16)]
    (out / "fit" / "static.json").write_text(json.dumps(
        {"model": "llava-7b", "fixed_s": 4e-6, "copy_rate": 4e12, "target_share": 0.85, "steps": steps}))


def test_the_verdict_sets_the_static_model_aside_on_a_device_that_copies_at_another_rate(tmp_path):
    """The static model's times are priced at one device's copy rate (fit/static.json's copy_rate): on a GPU
    whose copy, measured by the model stage, is more than 5% away from it, every row that sets the model
    against a target (the per-kernel fit, the step against the measured one, the steps at a measured cost)
    keeps its figures, says why beside them, and holds nothing; within 5% they are compared as before."""
    (tmp_path / "fit").mkdir()
    write_static_steps(tmp_path)
    chosen = {"count": 1, "median": 0.05, "worst": 0.05}
    (tmp_path / "fit" / "errors.json").write_text(json.dumps(
        {"rows": [], "kernels": {"_row_gather_kernel/decode": {"candidates": chosen, "chosen": chosen}}}))
    (tmp_path / "boundary").mkdir()
    series = [{"mode": "off", "total_bytes": 128 << 20, "parts": [1, 2], "seconds": [1.0, 1.0], "slope_s": 5e-6,
               "intercept_s": 1e-4, "r": 0.9999}]
    (tmp_path / "boundary" / "results.json").write_text(json.dumps({"series": series, "skipped": {}}))
    (tmp_path / "model").mkdir()

    def model_rows(copy_rate):
        floor = {"step_s": 3.1e-3, "gpu_s": 3.0e-3, "floor_s": 2.5e-3, "vs_floor": 3.1 / 2.5, "gpu_vs_floor": 3.0 / 2.5,
                 "copy_bytes_per_s": copy_rate}
        (tmp_path / "model" / "results.json").write_text(json.dumps(
            {"device_type": "cuda", "floor": floor, "model_runs": {"rows": []}}))
        return [r for r in gpu_verdict.verdict(tmp_path)["rows"] if r["measured"] is not None
                and r["what"].startswith(("static", "full-plan decode step at batch 1, the static model"))]

    compared = model_rows(4.1e12)
    assert [r["what"].split(":")[0].split(" at ")[0] for r in compared] == [
        "static model vs the sweep", "full-plan decode step", "static decode steps", "static decode steps"]
    assert all(r["holds"] is not None and "not compared" not in r["measured"] for r in compared)

    aside = model_rows(3.0e12)
    reason = "not compared: the model is priced at a copy of 4.000 TB/s, this device copied 3.000 TB/s"
    assert [(r["measured"], r["holds"]) for r in aside] == [(f"{r['measured']} ({reason})", None) for r in compared]
    assert "| not compared |" in gpu_verdict.markdown(gpu_verdict.verdict(tmp_path))
    # The boundary's slope is this device's own measurement: it stays a row that holds.
    (slope,) = [r for r in gpu_verdict.verdict(tmp_path)["rows"]
                if r["what"].startswith("the cost of one more") and r["measured"] is not None]
    assert slope["holds"] is True


def test_the_verdict_sets_each_opt_in_stage_beside_the_model_stage(tmp_path):
    """pdl/, phased/ and phased-pdl/ (the model check's A/B plans with ADALLAVA_PDL=1, then the phased MLP and
    attention block, then both): the full-plan step against the target, and the -H plan's step no slower than
    without."""
    for stage, full_s, h_s in (("model", 3.9e-3, 2.5e-3), ("pdl", 3.8e-3, 2.6e-3), ("phased", 3.7e-3, 2.4e-3),
                               ("phased-pdl", 3.6e-3, 2.3e-3)):
        (tmp_path / stage).mkdir()
        floor = {"step_s": full_s, "floor_s": 3.2e-3, "vs_floor": full_s / 3.2e-3}
        runs = [{"family": "AdaLLaVA-H", "label": "H 0.50", "stage": "decode", "median_s": h_s}]
        (tmp_path / stage / "results.json").write_text(json.dumps({"floor": floor, "model_runs": {"rows": runs}}))
    rows = {r["what"]: (r["measured"], r["holds"]) for r in gpu_verdict.verdict(tmp_path)["rows"]
            if "with ADALLAVA_" in r["what"] and "decode step, wall" in r["what"]}
    assert rows == {
        "full-plan decode step, wall, with ADALLAVA_PDL=1 (without)": ("3.800 ms (3.900 ms)", True),
        "H 0.50 plan's decode step, wall, with ADALLAVA_PDL=1 (without)": ("2.600 ms (2.500 ms)", False),
        "full-plan decode step, wall, with ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv (without)":
            ("3.700 ms (3.900 ms)", True),
        "H 0.50 plan's decode step, wall, with ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv (without)":
            ("2.400 ms (2.500 ms)", True),
        "full-plan decode step, wall, with ADALLAVA_PDL=1 ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv "
        "(without)": ("3.600 ms (3.900 ms)", True),
        "H 0.50 plan's decode step, wall, with ADALLAVA_PDL=1 ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv "
        "(without)": ("2.300 ms (2.500 ms)", True)}


def test_the_verdict_reports_the_cost_of_a_boundary_and_prices_the_static_steps_at_it(tmp_path):
    """boundary/results.json (bench.boundary): each mode's slopes, and the static steps at its larger slope."""
    def rows():
        return [r for r in gpu_verdict.verdict(tmp_path)["rows"] if "the cost of one more" in r["what"]
                or "at the measured cost" in r["what"]]

    assert [(r["measured"], r["holds"]) for r in rows()] == [(None, None)]  # nothing measured yet
    (tmp_path / "fit").mkdir()
    write_static_steps(tmp_path)
    (tmp_path / "boundary").mkdir()
    series = [{"mode": mode, "total_bytes": total << 20, "parts": [1, 2], "seconds": [1.0, 1.0],
               "slope_s": slope, "intercept_s": 1e-4, "r": 0.99991}
              for mode, total, slope in (("off", 128, 4.5e-6), ("off", 512, 5e-6), ("on", 128, 2e-6),
                                         ("on", 512, 1.5e-6), ("fused", 128, 1e-6), ("fused", 512, 0.5e-6))]
    (tmp_path / "boundary" / "results.json").write_text(json.dumps({"series": series, "skipped": {}}))
    assert [(r["what"], r["measured"], r["holds"]) for r in rows()] == [
        ("the cost of one more kernel in a captured chain (bench.boundary)",
         "4.50 us over 128 MiB (r 0.9999), 5.00 us over 512 MiB (r 0.9999)", True),
        # 3.0 ms + 100 x 1 us: 3.1 ms, 82.3% of the copy rate; 3.0 ms - 100 x 2 us: 2.8 ms, 91.1%.
        ("static decode steps at the measured cost of 5.00 us a kernel",
         "full b1 82.3%, -H b1 82.3%, full b16 82.3%, -H b16 82.3%", False),
        ("the cost of one more kernel in a captured chain (bench.boundary), with ADALLAVA_PDL=1",
         "2.00 us over 128 MiB (r 0.9999), 1.50 us over 512 MiB (r 0.9999)", True),
        ("static decode steps at the measured cost of 2.00 us a kernel, with ADALLAVA_PDL=1",
         "full b1 91.1%, -H b1 91.1%, full b16 91.1%, -H b16 91.1%", True),
        ("the cost of one more phase of one kernel, ordered by tickets (bench.boundary)",
         "1.00 us over 128 MiB (r 0.9999), 0.50 us over 512 MiB (r 0.9999)", True),
        # 3.0 ms - 100 x 3 us: 2.7 ms, 94.4%.
        ("static decode steps at the measured cost of 1.00 us a kernel, were every kernel boundary a phase of one "
         "kernel", "full b1 94.4%, -H b1 94.4%, full b16 94.4%, -H b16 94.4%", True),
        # 3.0 ms + 100 x 1 us - 3 x 32 x (5 - 1) us: 2.716 ms, 93.9%.
        ("static decode steps with the phased MLP and attention block, at the measured costs of 5.00 us a kernel "
         "and 1.00 us a phase", "full b1 93.9%, -H b1 93.9%, full b16 93.9%, -H b16 93.9%", True)]
    # A GPU without PDL: the on rows say why.
    (tmp_path / "boundary" / "results.json").write_text(json.dumps(
        {"series": series[:2] + series[4:], "skipped": {"on": "needs compute capability 9.0+"}}))
    (on,) = [r for r in rows() if r["what"].endswith("with ADALLAVA_PDL=1")]
    assert on["target"] == "reported (needs compute capability 9.0+)" and on["holds"] is None


def test_the_verdict_sets_the_swept_phased_mlp_against_the_two_launches_it_replaces(tmp_path):
    """tune/results.json (bench.tune): each batch's fastest phased MLP against its fastest gate|up plus down."""
    def rows():
        return [(r["measured"], r["holds"]) for r in gpu_verdict.verdict(tmp_path)["rows"]
                if r["what"].startswith("phased MLP")]

    assert rows() == [(None, None), (None, None)]
    (tmp_path / "tune").mkdir()
    times = {"mlp phased b1 full": 60e-6, "gate|up b1 full": 45e-6, "down bound b1": 25e-6,
             "mlp phased b16 full": 80e-6, "gate|up b16 full": 50e-6, "down bound b16": 29e-6}
    cases = [{"case": name, "best": {"seconds": seconds}} for name, seconds in times.items()]
    (tmp_path / "tune" / "results.json").write_text(json.dumps({"cases": cases + [{"case": "cut short"}]}))
    assert rows() == [("60.0 us against 70.0 us: +10.0 us a layer", True),
                      ("80.0 us against 79.0 us: -1.0 us a layer", False)]
    # The sweep never reached batch 16's phased case: not measured.
    (tmp_path / "tune" / "results.json").write_text(json.dumps({"cases": cases[:3]}))
    assert rows()[1] == (None, None)


def test_the_verdict_names_the_sweeps_cases_that_it_compares():
    # The verdict is standard library only, so it keeps its own copy of the sweep's case names.
    import torch

    from bench import tune
    from adallava_kernels import get_shape

    names = {c.name for c in tune.cases(get_shape("tiny"), torch.float32, torch.device("cpu"), 8)}
    for b in tune.DECODE_BATCHES:
        assert gpu_verdict.PHASED_MLP_CASES["phased"].format(b=b) in names
        assert {n.format(b=b) for n in gpu_verdict.PHASED_MLP_CASES["separate"]} <= names


def test_the_verdict_knows_every_boundary_mode():
    # The verdict is standard library only, so it keeps its own copy of bench.boundary's modes.
    from bench import boundary

    assert tuple(gpu_verdict.BOUNDARY_MODES) == boundary.MODES


def test_the_verdict_names_the_full_plan_as_the_model_check_does():
    # The verdict is standard library only, so it keeps its own copy of the family's name.
    from bench import model

    assert gpu_verdict.FULL_FAMILY == model.FULL


def test_the_verdict_reports_the_decode_layers_and_the_steps_own_kernels_from_a_gpu_profile(tmp_path):
    """kernels/results.json of a GPU run: the lowest share of a decode kernel, the kernels per decode layer and
    the step's own kernels outside its layers (a CPU profile gives none of these rows)."""
    def kernel(name, us, fraction=None):
        return {"name": name, "seconds": us * 1e-6, "fraction": fraction, "bound": fraction and "memory"}

    layers = [{"layer": kind, "stage": "decode", "kernel_count": 5,
               "kernels": [kernel("_row_gather_kernel", 46.0, 0.93), kernel("_paged_decode_kernel", 7.0, 0.41)]}
              for kind in ("full", "partial")]
    ends = {"context": 700, "kernel_count": 5, "total_s": 40.5e-6,
            "kernels": [kernel("embedding", 1.0), kernel("_step_inputs_kernel", 1.5), kernel("_rms_norm_kernel", 1.8),
                        kernel("nvjet_gemv", 33.2), kernel("_greedy_kernel", 3.0)]}
    (tmp_path / "kernels").mkdir()
    section = {"time": "GPU time of each device kernel", "layers": layers, "step_ends": ends}
    (tmp_path / "kernels" / "results.json").write_text(json.dumps({"kernels": section}))
    rows = {r["what"]: r for r in gpu_verdict.verdict(tmp_path)["rows"] if r["issue"] in ("#19 #28", "#28")}
    assert rows["decode kernels: the lowest share of the copy rate"]["measured"] == \
        "41.0% (_paged_decode_kernel in the full layer)"
    assert rows["kernels per decode layer (device records)"]["holds"] is True
    step = rows["a decode step's own kernels, outside its layers (one row)"]
    assert (step["measured"], step["holds"]) == ("5 kernels, 40.5 us (the longest nvjet_gemv, 33.2 us)", True)
    section["time"] = "CPU time of each top-level op, 1 thread"
    (tmp_path / "kernels" / "results.json").write_text(json.dumps({"kernels": section}))
    assert not any("own kernels" in r["what"] for r in gpu_verdict.verdict(tmp_path)["rows"])
