# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.drope-installed
# DeepSpeed: build no CUDA ops at install; at run time take its CPU accelerator when no GPU.
export DS_BUILD_OPS ?= 0

.PHONY: setup demo test bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt tools/install_system_deps.sh
	bash tools/install_system_deps.sh $(if $(wildcard $(BIN)/python),,$(PYTHON))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt -e .
	touch $@

demo: $(STAMP)
	$(BIN)/drope demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Every benchmark in its tiny --quick mode: proves the scripts run (ratios are not asserted).
bench-quick: $(STAMP)
	for b in forward_memory conversion zero_throughput train_throughput step_profile data_resume; do \
		$(BIN)/python benchmarks/$$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) .build
