# The two set-up commands the README starts with. Each builds .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[drivers,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmos demo

test: $(STAMP)
	$(PY) -m mypy ipc common text kernel sdk services drivers tools
	$(PY) -m pytest -q

# Everyday work: everything but the chaos, fuzz and long integration runs
# (marked slow). CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m mypy ipc common text kernel sdk services drivers tools
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
