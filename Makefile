# Two commands a newcomer needs on a fresh machine:
#   make demo   sets up .venv and converts mobilevit_s to ParC-Net-S with its audit
#   make test   sets up .venv and runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,onnx,openvino,executorch]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/parc-convert mobilevit_s --rule vit2parc --output out/parcnet_s.safetensors --report out/parcnet_s.md --force

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info out
