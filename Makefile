# Two commands do everything on a fresh machine: `make bench` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_OUT ?= bench/out/latest.json

.PHONY: env test bench compile-cuda clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/setup_env.sh $(wildcard csrc/*)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

test: env
	$(PY) -m pytest tests

bench: env
	$(PY) -m bench --out $(BENCH_OUT)

# nvcc -c of every CUDA source: needs nvcc, not a GPU nor a CUDA torch.
compile-cuda:
	@command -v nvcc >/dev/null || { echo "compile-cuda: nvcc not found on PATH" >&2; exit 1; }
	mkdir -p build/cuda-check
	for f in csrc/*.cu; do nvcc -c -O3 -Icsrc "$$f" -o build/cuda-check/$$(basename "$$f" .cu).o || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info bench/out
