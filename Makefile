# Two entry points, each setting up what it needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
# the tests also need PyTorch + timm (conversion parity): installed with the rest, in one pip call
TEST_STAMP := $(VENV)/.tested-$(shell cat requirements.txt requirements-torch.txt | cksum | cut -d' ' -f1)
WORKDIR ?= runs/demo
# Extra arguments for the demo run, e.g. ARGS='--config.total_steps=100'
ARGS ?=

.PHONY: demo test lint format venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

$(TEST_STAMP): requirements.txt requirements-torch.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -r requirements-torch.txt
	@rm -f $(VENV)/.tested-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m usfm_jax.train --config configs/pretrain/demo.py --workdir $(WORKDIR) $(ARGS)

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n 2 -q

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
