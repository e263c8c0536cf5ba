#!/usr/bin/env bash
# Create (or reuse) the virtualenv $VENV and install adallava-kernels with its
# test and bench extras, building the extension against the torch it finds.
#
# The venv sees the system site-packages, so a CUDA torch installed there is
# used as is. Where no torch is importable, the CPU wheel torch==$CPU_TORCH is
# installed first: an unpinned requirement would pull GBs of CUDA packages.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CPU_TORCH=${CPU_TORCH:-2.13.0}
# The Triton release whose interpreter the CPU test suite runs under.
CPU_TRITON=${CPU_TRITON:-3.7.1}
# Empty: the newest transformers the requirements admit. A version: that one
# (make test-oldest pins the oldest supported release).
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if ! "$py" -c "import torch" 2>/dev/null; then
    "${pip[@]}" "torch==$CPU_TORCH"
fi

# Pin what is already installed so resolving the package's requirements
# never replaces torch or its Triton.
constraints="$VENV/constraints.txt"
"$py" - "$CPU_TRITON" >"$constraints" <<'PY'
import importlib.metadata as md
import sys
print(f"torch=={md.version('torch')}")
try:
    print(f"triton=={md.version('triton')}")
except md.PackageNotFoundError:
    print(f"triton=={sys.argv[1]}")
PY
if [ -n "$TRANSFORMERS_VERSION" ]; then
    echo "transformers==$TRANSFORMERS_VERSION" >>"$constraints"
fi

"${pip[@]}" -c "$constraints" "setuptools>=64" wheel ninja
"${pip[@]}" -c "$constraints" --no-build-isolation -e ".[test,bench]"
