import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
# before any kernel module is imported: without a GPU, kernels run on the CPU
# in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One config per kernel instead of autotuning over its list: on a GPU, compiling
# every config for every shape the suite uses took most of its time.
# test_kernel_configs.py runs each config once.
os.environ.setdefault("ADALLAVA_AUTOTUNE", "0")
# Autotuned winners stay in memory: a test run leaves nothing in the user's tuning cache
# (tests/test_tuning.py gives the cache tests a folder of their own).
os.environ.setdefault("ADALLAVA_TUNING_CACHE", "off")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# tests/vllm/ runs against a vLLM engine in its own venv (`make test-vllm`): where vLLM is not
# installed (the main venv, `make test`) the directory is not collected.
# An installed distribution, not an import: with tests/ on sys.path, ``import vllm`` finds tests/vllm itself.
def _has_vllm() -> bool:
    import importlib.metadata

    return "vllm" in importlib.metadata.packages_distributions()


collect_ignore = [] if _has_vllm() else ["vllm"]
