# Two commands do everything on a fresh machine: `make bench` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_OUT ?= bench/out/latest.json

.PHONY: env test bench clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/setup_env.sh $(wildcard csrc/*)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

test: env
	$(PY) -m pytest tests

bench: env
	$(PY) -m bench --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info bench/out
