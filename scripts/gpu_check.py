#!/usr/bin/env python3
"""``make gpu-check``: every GPU check of the project in one capped command, each stage kept as it ends.

Written for a short, offline GPU window. Standard library only: it runs before the package is installed.

Set-up. When the running Python already imports a CUDA build of torch (a GPU image whose ``python3`` holds
torch, Triton, transformers and the test tools), it is used as it is: no virtualenv, nothing downloaded; the
package is built in place with ``pip install --no-deps --no-build-isolation --no-index -e .``. A dependency
that is missing is named and the command stops with status 2 before anything runs. Elsewhere (a CPU machine)
it runs in the project's virtualenv, made by ``make env`` as ``make test`` makes it, with ``tiny`` shapes: a
dry run of the same stages.

Stages, in the order of what they are worth, each under its own time cap and all under ``--budget-s``
(8 minutes by default):

1. ``setup``: build and import (the extension ``_C`` loaded, device, SMs, versions) -> ``setup.json``;
2. ``tune``: the kernel config sweep (``python -m bench.tune``) -> ``tune/tuned_configs.json``, which the
   later stages read (``ADALLAVA_TUNED_CONFIGS``);
3. ``model``: full, -L and -H plans, wall and GPU time, the copy floor, where a prefill's host time goes
   (``python -m bench.gpu_check``);
4. ``pdl``: the full plan's decode step and floor, and the -H 0.50 plan's, again with programmatic
   dependent launch on, each decode kernel prefetching its first weight or K/V tiles into L2 before it
   waits (``ADALLAVA_PDL=1``; ``python -m bench.gpu_check --plans ab``);
5. ``phased``: the same plans again with each decode layer's MLP one launch of two phases, and its
   attention block (q, k and v, the attention, ``o_proj``) one of three: two launches a layer instead of five
   (``ADALLAVA_PHASED_MLP=1 ADALLAVA_PHASED_ATTENTION=qkv``; ``adallava_kernels/ops/phased_mlp.py``,
   ``phased_attention.py``);
6. ``boundary``: what one more boundary costs in a captured run: one stream of bytes read in 1 to 32 slices,
   a kernel a slice without PDL and with it, or a phase of one kernel a slice; the slope of the run's time
   (``python -m bench.boundary``);
7. ``phased-pdl``: the ``phased`` stage's plans with PDL on too (the phased kernels prefetch their first phase's
   tiles before they wait);
8. ``kernels``: the per-kernel profile (``python -m bench --only kernels``);
9. ``fit``: the static latency model's time of every decode candidate the sweep timed, beside the measured
   one (``python -m bench.tune --predict``, then ``--against``): the model's error per kernel; and its whole
   decode steps (``python -m bench.static``), which the verdict sets against the ``model`` and ``pdl``
   stages' measured step, with the fixed cost per kernel the measurement implies. The model's side needs no
   GPU: ``make fit-inputs`` computes it beforehand into ``bench/out/fit-inputs`` (carry it with the tree),
   which the stage reuses where it matches the tree, Triton and model (``python -m bench.fit_inputs``);
10. ``serve``: the serving run (``python -m bench --only serve``);
11. ``probes``: the extension's bad-input calls in a child process (``tests/_op_checks.py``): a crash is a
   failed row, not a lost run;
12. ``tests``: the test suite on pytest-xdist workers with a per-test timeout (``-v``, so a run cut short
   still lists every test that finished).

Each stage writes its log and JSON under ``--out`` the moment it ends, a stage that fails or runs out of
time does not stop the next, and after every stage ``stages.json`` and the verdict table
(``verdict.md``, ``verdict.json``: each acceptance target of the open issues as measured / target / holds)
are written again. Where ``$OUT`` is set (a lent GPU machine), the output folder is also packed into
``$OUT/gpu-check.tar.gz`` after every stage, beside copies of ``verdict.md`` and ``stages.json``; every file
is written to a temporary name and renamed, so a SIGINT or SIGKILL at any point leaves every finished
stage's files complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_verdict  # noqa: E402  (stdlib only, like this file)

DEFAULT_BUDGET_S = 480
# On a CPU the tests stage is a dry run of its own mechanics: a few fast files, not the suite (make test).
DRY_RUN_TESTS = ("tests/test_shape.py", "tests/test_budget.py")
# The fit stage's static side, computed before the GPU run (`make fit-inputs`) and carried with the tree.
FIT_INPUTS = ROOT / "bench" / "out" / "fit-inputs"
# What the stages import, by module name -> the package that provides it (named when missing).
REQUIRED = {"torch": "torch", "triton": "triton", "transformers": "transformers", "safetensors": "safetensors",
            "pytest": "pytest", "xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout",
            "hypothesis": "hypothesis", "matplotlib": "matplotlib", "tqdm": "tqdm", "numpy": "numpy",
            "setuptools": "setuptools", "PIL": "pillow"}
BUILD = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-v",
         "--disable-pip-version-check", "-e", "."]
IMPORT_PROBE = r"""
import json, platform, sys, torch, triton, transformers
import adallava_kernels
from adallava_kernels import _C
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
        "extension": _C.__file__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), multiprocessors=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), capability=list(torch.cuda.get_device_capability(0)))
else:
    info.update(device=platform.processor() or platform.machine(), multiprocessors=None)
# How the extension was linked: the shared libstdc++ must be a NEEDED library (csrc/README.md).
sys.path.insert(0, "tests")
from _elf import needed_libraries
import subprocess
info["extension_needs"] = needed_libraries(_C.__file__)
info["toolchain"] = {name: subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True,
                                          text=True).stdout.strip() for name in ("libstdc++.so", "libstdc++.a")}
print(json.dumps(info))
"""


@dataclass
class Stage:
    name: str
    cap_s: int  # the most this stage may take
    commands: list  # argv lists after the interpreter, run in order; a string is a shell-free argv[0]
    outputs: list = field(default_factory=list)  # files under the stage's folder it should leave
    env: dict = field(default_factory=dict)  # variables this stage adds


@dataclass
class StageResult:
    name: str
    status: str  # "passed", "failed", "timed out", "skipped", "not run"
    seconds: float = 0.0
    returncode: int | None = None
    cap_s: float = 0.0
    note: str = ""


def stages(on_gpu: bool, build: bool, out: Path, workers: int, tune_s: int,
           test_paths: list[str] | None = None) -> list[Stage]:
    """The stages in the order they run; ``build``: install the package in place first (an interpreter used
    as it is). Without ``on_gpu`` (a CPU, or ``--dry-run``) every stage runs on the CPU at the dry run's
    shapes (tiny, quick)."""
    quick = [] if on_gpu else ["--quick", "--device", "cpu"]
    cpu = [] if on_gpu else ["--device", "cpu"]
    # The sweep has nothing to time on a CPU; under the interpreter it runs its own path at tiny shapes.
    tests = test_paths or (["tests"] if on_gpu else list(DRY_RUN_TESTS))
    # The fit prices the static model at the copy the model stage measured on this GPU (the model's own rate
    # where there is none: a CPU, or a model stage that did not run).
    copy_from = out / "model" / "results.json"
    return [
        Stage("setup", 150, [BUILD] if build else [], ["setup.json"]),
        Stage("tune", tune_s + 30, [["-m", "bench.tune", "--out", str(out / "tune"), "--budget-s", str(tune_s),
                                     *quick]], ["tune/tuned_configs.json"], {} if on_gpu else {"TRITON_INTERPRET": "1"}),
        Stage("model", 150, [["-m", "bench.gpu_check", "--out", str(out / "model"), *quick]],
              ["model/results.json"]),
        # The same check with programmatic dependent launch on (ADALLAVA_PDL=1): its full-plan step beside
        # the model stage's is the A/B that decides whether PDL becomes the default.
        Stage("pdl", 120, [["-m", "bench.gpu_check", "--plans", "ab", "--out", str(out / "pdl"), *quick]],
              ["pdl/results.json"],
              {"ADALLAVA_PDL": "1"}),
        # The same with each decode layer's MLP one launch of two phases and its attention block one of three
        # (adallava_kernels/ops/phased_mlp.py, phased_attention.py): the A/B that decides whether the phases
        # become the default.
        Stage("phased", 120, [["-m", "bench.gpu_check", "--plans", "ab", "--out", str(out / "phased"), *quick]],
              ["phased/results.json"], {"ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "qkv"}),
        # What one more kernel costs in a captured chain, without PDL and with it, and one more phase of one
        # kernel (bench/boundary.py): the numbers that decide between fusing kernels and hiding their fixed cost.
        Stage("boundary", 60, [["-m", "bench.boundary", str(out / "boundary" / "results.json"), *quick]],
              ["boundary/results.json"], {} if on_gpu else {"TRITON_INTERPRET": "1"}),
        # The phased stage's plans again with PDL on too: whether the two hide more together than either alone.
        Stage("phased-pdl", 120, [["-m", "bench.gpu_check", "--plans", "ab", "--out", str(out / "phased-pdl"),
                                   *quick]],
              ["phased-pdl/results.json"],
              {"ADALLAVA_PDL": "1", "ADALLAVA_PHASED_MLP": "1", "ADALLAVA_PHASED_ATTENTION": "qkv"}),
        # On a GPU the section has no static report; a dry run leaves it out too (the fit stage makes one).
        Stage("kernels", 75, [["-m", "bench", "--only", "kernels", "--out", str(out / "kernels"),
                               *(cpu and [*cpu, "--no-static"])]],
              ["kernels/results.json"]),
        # The static model's time of every swept decode candidate beside the sweep's measured time (the
        # model's error per kernel), and its whole decode steps, which the verdict sets against the model and
        # pdl stages' measured step. The model's side needs no GPU: `make fit-inputs` computes it beforehand
        # (bench/fit_inputs.py), reused here where it matches the tree and Triton; compiled here otherwise,
        # which takes 90 s at 7B shapes from a cold cache on the 2-core CPU machine. Both keep their price
        # terms, priced here at this GPU's measured copy.
        Stage("fit", 150, [["-m", "bench.fit_inputs", str(out / "fit"), "--reuse", str(FIT_INPUTS),
                            "--model", "llava-7b" if on_gpu else "tiny"],
                           ["-m", "bench.static", str(out / "fit" / "static.json"), "--from",
                            str(out / "fit" / "static.json"), "--copy-from", str(copy_from)],
                           ["-m", "bench.tune", "--against", str(out / "fit" / "predicted.json"),
                            str(out / "tune" / "results.json"), "--json", str(out / "fit" / "errors.json"),
                            "--copy-from", str(copy_from)]],
              ["fit/errors.json", "fit/static.json"], {"TRITON_INTERPRET": "0"}),
        Stage("serve", 150, [["-m", "bench", "--only", "serve", "--out", str(out / "serve"), *quick]],
              ["serve/results.json"]),
        Stage("probes", 45, [["tests/_op_checks.py", "cuda" if on_gpu else "cpu"]], ["probes.json"]),
        Stage("tests", 420, [["-m", "pytest", *tests, "-v", "-p", "no:cacheprovider", "--timeout", "150", "-rfE",
                              *(["-n", str(workers)] if workers else [])]], ["tests.log"]),
    ]


# -- the environment -------------------------------------------------------------------------------


def cuda_torch(python: str) -> bool:
    """Whether ``python`` imports a CUDA build of torch (a GPU image's interpreter)."""
    probe = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def missing_packages(python: str) -> list[str]:
    """The packages of :data:`REQUIRED` that ``python`` cannot find (by import spec, nothing imported)."""
    code = ("import importlib.util, json, sys; names = json.loads(sys.argv[1]); "
            "print(json.dumps([n for n in names if importlib.util.find_spec(n) is None]))")
    probe = subprocess.run([python, "-c", code, json.dumps(list(REQUIRED))], capture_output=True, text=True)
    if probe.returncode != 0:
        return ["(the interpreter itself: " + probe.stderr.strip().splitlines()[-1] + ")"]
    return [REQUIRED[n] for n in json.loads(probe.stdout)]


def choose_python(args) -> tuple[str, bool]:
    """``(interpreter, build)``. ``--python``: that interpreter, the package already installed in it. The
    running one, the package built in place, where it imports a CUDA torch (a GPU image) or with
    ``--as-is``. Else the project's virtualenv, made by ``make env`` as ``make test`` makes it."""
    if args.python:
        return args.python, False
    if args.as_is or cuda_torch(sys.executable):
        return sys.executable, True
    subprocess.run(["make", "-C", str(ROOT), "env"], check=True, stdout=sys.stderr)
    return str(ROOT / ".venv" / "bin" / "python"), False


# -- running stages --------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_command(argv: list[str], log: Path, timeout_s: float, env: dict) -> tuple[int | None, bool]:
    """Run ``argv`` in its own process group, output appended to ``log``; ``(returncode, timed_out)``. At the
    deadline the whole group is killed (TERM, then KILL), so no child lives on into the next stage."""
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        try:
            return process.wait(timeout=max(1.0, timeout_s)), False
        except subprocess.TimeoutExpired:
            stop_group(process)
            sink.write(f"\n[gpu-check] killed after {timeout_s:.0f} s\n")
            return process.returncode, True
        except BaseException:  # SIGINT, SIGTERM: the stage goes with the driver
            stop_group(process)
            raise


def stop_group(process: subprocess.Popen) -> None:
    """TERM, then KILL, the stage's whole process group (pytest's workers, a sweep's compilers)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:
    """A stage is killed with the driver even when the driver is SIGKILLed (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_stage(stage: Stage, python: str, out: Path, deadline: float, env: dict) -> StageResult:
    left = deadline - time.monotonic()
    result = StageResult(stage.name, "not run", cap_s=min(stage.cap_s, max(0.0, left)))
    if left < 5:
        result.note = "no time left in the budget"
        return result
    log = out / f"{stage.name}.log"
    log.unlink(missing_ok=True)
    start = time.monotonic()
    for argv in stage.commands:
        remaining = min(stage.cap_s, deadline - time.monotonic()) - (time.monotonic() - start)
        full = [python, *argv] if argv[0].startswith("-") or argv[0].endswith(".py") else argv
        code, timed_out = run_command(full, log, remaining, {**env, **stage.env})
        result.returncode = code
        if timed_out:
            result.status = "timed out"
            break
        if code != 0:
            result.status = "failed"
            break
    else:
        result.status = "passed"
    result.seconds = round(time.monotonic() - start, 1)
    return result


def setup_stage(stage: Stage, python: str, out: Path, deadline: float, env: dict) -> StageResult:
    """The build (on a GPU image), then the import probe whose JSON is ``setup.json``."""
    result = run_stage(stage, python, out, deadline, env)
    if result.status not in ("passed",):
        return result
    start = time.monotonic()
    probe = subprocess.run([python, "-c", IMPORT_PROBE], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=max(5.0, deadline - time.monotonic()))
    with open(out / "setup.log", "a") as sink:
        sink.write(probe.stdout + probe.stderr)
    if probe.returncode != 0:
        result.status, result.returncode = "failed", probe.returncode
        result.note = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
    else:
        atomic_write(out / "setup.json", probe.stdout)
    result.seconds = round(result.seconds + time.monotonic() - start, 1)
    return result


def probes_stage(stage: Stage, python: str, out: Path, deadline: float, env: dict) -> StageResult:
    """The child prints one JSON object on stdout; a crash is the stage's failure with its signal named."""
    result = run_stage(stage, python, out, deadline, env)
    text = (out / "probes.log").read_text() if (out / "probes.log").exists() else ""
    start = text.find("{\"")
    if start >= 0:
        try:
            cases = json.loads(text[start:text.rfind("}") + 1])
            atomic_write(out / "probes.json", json.dumps({"returncode": result.returncode, "cases": cases}, indent=1))
        except json.JSONDecodeError:
            pass
    if result.returncode is not None and result.returncode < 0:
        result.note = f"the child died of signal {-result.returncode}"
    return result


def sync_out(out: Path, dest: str | None) -> None:
    """Pack ``out`` into ``$OUT/gpu-check.tar.gz`` and copy the verdict and stage files there, each through a
    temporary name (at most 8 files come back from a lent machine)."""
    if not dest:
        return
    dest_dir = Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / "gpu-check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname="gpu-check", filter=lambda info: None if info.name.endswith(".tmp") else info)
    os.replace(tmp, dest_dir / "gpu-check.tar.gz")
    for name in ("verdict.md", "stages.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest_dir / (name + ".tmp"))
            os.replace(dest_dir / (name + ".tmp"), dest_dir / name)


def record(out: Path, results: list[StageResult], meta: dict) -> None:
    atomic_write(out / "stages.json", json.dumps({**meta, "stages": [asdict(r) for r in results]}, indent=1))
    verdict = gpu_verdict.verdict(out)
    atomic_write(out / "verdict.json", json.dumps(verdict, indent=1))
    atomic_write(out / "verdict.md", gpu_verdict.markdown(verdict))


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu-check",
                        help="output folder (default bench/out/gpu-check)")
    parser.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S,
                        help=f"all stages together, seconds (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--tune-s", type=int, default=120, help="the kernel sweep's own budget (default 120)")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (default all)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers (default: min(14, cores - 2) on a GPU, none on a CPU)")
    parser.add_argument("--as-is", action="store_true",
                        help="use the running Python as it is and build the package in place, as on a GPU image, "
                             "even without a CUDA torch")
    parser.add_argument("--python", default=None,
                        help="use this interpreter, where the package is installed already (no build)")
    parser.add_argument("--setup-only", action="store_true", help="the set-up checks and the build, then stop")
    parser.add_argument("--tests", default=None, metavar="PATHS",
                        help="comma-separated test files or folders the tests stage runs (default: tests)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU at tiny shapes, even where there is a GPU (what a CPU runs)")
    args = parser.parse_args(argv)
    if args.budget_s < 10:
        parser.error(f"--budget-s must be at least 10, got {args.budget_s}")
    if args.tune_s < 1:
        parser.error(f"--tune-s must be positive, got {args.tune_s}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        parser.error(f"--out {args.out} cannot be written: {e.strerror or e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    python, build = choose_python(args)
    on_gpu = cuda_torch(python) and not args.dry_run
    missing = missing_packages(python)
    if missing:
        print(f"gpu-check: error: {python} lacks {', '.join(missing)}; nothing was run", file=sys.stderr)
        return 2
    out = args.out.resolve()
    workers = args.workers if args.workers is not None else (max(1, min(14, (os.cpu_count() or 4) - 2))
                                                              if on_gpu else 0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INDEX="1",
               ADALLAVA_TUNED_CONFIGS=str(out / "tune" / "tuned_configs.json"))
    plan = stages(on_gpu, build, out, workers, args.tune_s, args.tests.split(",") if args.tests else None)
    if args.setup_only:
        plan = plan[:1]
    elif args.only:
        chosen = {s.strip() for s in args.only.split(",")}
        unknown = chosen - {s.name for s in plan}
        if unknown:
            print(f"gpu-check: error: --only names unknown stages {sorted(unknown)}", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in chosen]
    meta = {"python": python, "built_in_place": build, "on_gpu": on_gpu, "budget_s": args.budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results: list[StageResult] = []
    special = {"setup": setup_stage, "probes": probes_stage}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # TERM ends the stage as INT does
    for stage in plan:
        print(f"[gpu-check] {stage.name} (cap {stage.cap_s} s, {deadline - time.monotonic():.0f} s left)",
              flush=True)
        try:
            result = special.get(stage.name, run_stage)(stage, python, out, deadline, env)
        except KeyboardInterrupt:
            results.append(StageResult(stage.name, "interrupted", cap_s=stage.cap_s))
            record(out, results, meta)
            sync_out(out, os.environ.get("OUT"))
            print(f"[gpu-check] interrupted in {stage.name}: the finished stages' files are kept", file=sys.stderr)
            return 130
        results.append(result)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        record(out, results, meta)
        sync_out(out, os.environ.get("OUT"))
        print(f"[gpu-check] {stage.name}: {result.status} in {result.seconds} s {result.note}".rstrip(), flush=True)
        if stage.name == "setup" and result.status != "passed":
            print("[gpu-check] set-up failed: the other stages need the package built and importable",
                  file=sys.stderr)
            break
    print(gpu_verdict.markdown(gpu_verdict.verdict(out)))
    return 0 if results and all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
