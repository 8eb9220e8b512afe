# gpt2onnx: `make run` and `make test` work on a fresh machine with no network but the
# package registries. Everything lives in .venv; torch is the CPU build 2.13.0 installed
# first by exact version, so no requirement can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# optimum-onnx (the peer we compare with and stay compatible with) needs transformers
# < 4.58, so it gets its own venv; the tests use it too (optimum folders, transformers 4.57).
OPT_VENV  := .venv-optimum
OPT_STAMP := $(OPT_VENV)/.installed
# onnxruntime-genai runs our standard-layout folders (genai_config.json); its own venv, as
# it brings its own onnxruntime build.
GENAI_VENV  := .venv-genai
GENAI_STAMP := $(GENAI_VENV)/.installed
GENAI       := onnxruntime-genai==0.18.0

MODEL     ?= models/pydoc-tiny
OUT       ?= models/pydoc-tiny-onnx
LAYOUT    ?= fused
PRECISION ?= int8
PROMPT    ?= Return the
TOKENS    ?= 60
# A tiny model loops under plain greedy decoding; a mild repetition penalty keeps it on topic.
GEN_ARGS  ?= --repetition-penalty 1.3
PORT      ?= 8000
PYTEST_ARGS ?=

.PHONY: bench-openvino-setup bench-peers bench-peers-run bench-llamacpp-setup setup run export generate test browser test-fast test-slow lint bench bench-core bench-speculative bench-serving bench-setup bench-smoke serve serve-ray tiny-model model-card kvmem clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[export,serve,ray,bench,dev]'
	touch $@

setup: $(STAMP)

# Export the embedded default model (fused layout, int8: the fastest CPU precision whose
# agreement with fp32 is validated) and generate from it.
run: setup
	$(MAKE) --no-print-directory export MODEL=$(MODEL) OUT=$(OUT)
	$(BIN)/python -m gpt2onnx.runtime.generate $(OUT) --prompt "$(PROMPT)" --max-new-tokens $(TOKENS) $(GEN_ARGS) --stream

export: setup
	$(BIN)/python -m gpt2onnx.export $(MODEL) $(OUT) --layout $(LAYOUT) --precision $(PRECISION) $(if $(INT4_BLOCK_SIZE),--int4-block-size $(INT4_BLOCK_SIZE))

generate: setup
	$(BIN)/python -m gpt2onnx.runtime.generate $(OUT) --prompt "$(PROMPT)" --max-new-tokens $(TOKENS) $(GEN_ARGS)

# Everything, the full-size gpt2 runs included (about 2 extra minutes). pytest exits 5 when
# it collects nothing (e.g. a -k that matches no test): not a failure.
test: setup $(OPT_STAMP) $(GENAI_STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The playground's test drives Debian's headless Chromium: installed here where apt-get can
# (root on Debian); elsewhere that one test is skipped with its reason.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver for the playground test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver) >/dev/null 2>&1 \
	      || echo "could not install chromium: the playground's browser test will be skipped"; \
	  else echo "no chromium: the playground's browser test will be skipped"; fi; fi

# Without the full-size gpt2 runs (marked slow).
test-fast: setup $(OPT_STAMP) $(GENAI_STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Only the full-size gpt2 architecture (random weights): every layout and precision.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check gpt2onnx tests tools

# optimum-onnx (the peer the bench compares against) needs transformers < 4.58, so it gets
# its own venv; torch goes in first by exact version (the CPU wheel), as in .venv.
$(OPT_STAMP):
	$(PYTHON) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/pip install -q --upgrade pip
	$(OPT_VENV)/bin/pip install -q $(TORCH)
	$(OPT_VENV)/bin/pip install -q 'optimum-onnx[onnxruntime]==0.1.0' 'transformers>=4.36,<4.58' \
		accelerate psutil
	touch $@

$(GENAI_STAMP):
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q --upgrade pip
	$(GENAI_VENV)/bin/pip install -q '$(GENAI)' numpy
	touch $@

bench-setup: setup $(OPT_STAMP) $(GENAI_STAMP)

# OpenVINO GenAI, for the speculative bench's side-by-side (~2.5 GB; not part of make
# test). optimum-intel pulls torchvision, whose resolver swaps in a CUDA torch (6 GB):
# both go, and the CPU torch 2.13.0 comes back (the export needs only torch itself).
OV_VENV  := .venv-openvino
OV_STAMP := $(OV_VENV)/.installed
$(OV_STAMP):
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/pip install -q --upgrade pip
	$(OV_VENV)/bin/pip install -q $(TORCH)
	$(OV_VENV)/bin/pip install -q 'optimum-intel[openvino]==2.2.0' 'transformers>=4.45,<5.6' \
		'openvino==2026.4.1' 'openvino-genai==2026.4.1.0' 'openvino-tokenizers==2026.4.1.0'
	$(OV_VENV)/bin/pip uninstall -y -q torchvision torch
	$(OV_VENV)/bin/pip install -q $(TORCH)
	$(OV_VENV)/bin/pip list 2>/dev/null | awk '/^(nvidia|cuda)/ {print $$1}' \
		| xargs -r $(OV_VENV)/bin/pip uninstall -y -q
	touch $@

bench-openvino-setup: setup $(OV_STAMP)

# The other engines a CPU user would pick (issue 17), each in its own venv or build folder,
# once, from the package registries alone: CTranslate2 (.venv-ct2, ~1 min), llama.cpp built
# from the source llama-cpp-python's sdist vendors (.venv-llamacpp for its GGUF converter,
# bench/.cache/peers for the build; ~9 min on 2 cores) and OpenVINO GenAI (above). After
# it, `make bench` runs them beside ours; `make bench-peers-run` runs the shorter peers
# preset into bench/results/peers.
CT2_STAMP := .venv-ct2/.installed
$(CT2_STAMP):
	tools/peers/setup_ct2.sh $(PYTHON)

bench-llamacpp-setup:
	PYTHON=$(PYTHON) tools/peers/setup_llamacpp.sh

bench-peers: bench-setup $(OV_STAMP) $(CT2_STAMP) bench-llamacpp-setup

bench-peers-run: bench-peers
	$(BIN)/python -m gpt2onnx.bench --peers

# The full bench (gpt2 architecture, every variant; ~20-30 min on 2 cores), then the
# one-step core's (sampled vs greedy, scoring vs transformers; ~10 min), speculative
# decoding's, and the serving engine's under load (~5 min).
bench: bench-setup
	$(BIN)/python -m gpt2onnx.bench
	$(BIN)/python -m gpt2onnx.bench.core
	$(BIN)/python -m gpt2onnx.bench.speculative
	$(BIN)/python -m gpt2onnx.bench.serving

# Only the serving engine under load (chunked prefill, prefix caching); BASELINE=<git ref>
# adds the engine at that ref, interleaved.
bench-serving: setup
	$(BIN)/python -m gpt2onnx.bench.serving $(if $(BASELINE),--baseline $(BASELINE))

# Only speculative decoding: prompt lookup and draft models against plain decoding.
bench-speculative: setup
	$(BIN)/python -m gpt2onnx.bench.speculative

# Only the one-step core's numbers; BASELINE=<git ref> adds a paired run of that code.
BASELINE ?=
bench-core: setup
	$(BIN)/python -m gpt2onnx.bench.core $(if $(BASELINE),--baseline $(BASELINE))

bench-smoke: setup
	$(BIN)/python -m gpt2onnx.bench --smoke

serve: setup
	$(BIN)/python -m gpt2onnx.serve $(OUT) --port $(PORT)

REPLICAS ?= 2
serve-ray: setup
	$(BIN)/python -m gpt2onnx.serve.ray $(OUT) --replicas $(REPLICAS) --port $(PORT)

kvmem: setup
	$(BIN)/python -m gpt2onnx.kvmem

# Held-out perplexity and top-1 agreement of every exported precision -> the model card.
model-card: setup
	$(BIN)/python tools/evaluate_precisions.py --model $(MODEL)

tiny-model: setup
	$(BIN)/python tools/train_tiny_model.py --out $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
